// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Versioned device snapshots: the data model, the on-disk envelope and the
//! validation that loaded state goes through before it touches a device.
//!
//! A [`DeviceSnapshot`] is plain data, separate from the live objects: the
//! state of every vring ([`VringSnapshot`]), the negotiated features, the
//! config space, the device's own bytes (from
//! [`DeviceBackend::save_state`](crate::DeviceBackend::save_state)) and the
//! requests that were in flight at the cut ([`InflightRecord`]). The same
//! snapshot serves live migration, a backend restart and a move between the
//! in-process and out-of-process homes.
//!
//! # The envelope
//!
//! [`encode`] wraps a snapshot in a self-checking envelope and [`decode`]
//! unwraps it (also [`write_to`] / [`read_from`] for streams):
//!
//! ```text
//! offset  size  field
//!      0     8  magic            89 56 42 4b 53 4e 50 0a  ("\x89VBKSNP\n")
//!      8     2  format version   u16, little endian (1, 2, ...)
//!     10     2  encoding         u16, little endian (1 = JSON)
//!     12     4  payload length   u32, little endian, at most MAX_PAYLOAD_LEN
//!     16     n  payload          the snapshot, in the encoding above
//!   16+n     8  checksum         CRC-64/XZ of bytes 0..16+n, little endian
//! ```
//!
//! Every format version ever written stays readable: the frozen structs of
//! old versions live in their own module (see [`v1`]) and are converted
//! forward on load. A newer version, a bad magic, a bad checksum, a
//! truncated, oversized or over-long input is refused with a
//! [`SnapshotError`] that says which.
//!
//! # Untrusted input
//!
//! A decoded snapshot is only well-formed, not trusted. Check it against the
//! device it is meant for with [`ValidatedSnapshot::new`] (queue sizes,
//! ring alignment, features, config length, in-flight records, ...) before
//! restoring anything from it.
//!
//! # Changing the format
//!
//! The payload of the newest version is the serde form of the public types
//! of this module; `tests/snapshot_format.rs` checks that a fixed state
//! still encodes to the newest golden file in `snapshots/` byte for byte, so
//! any change to these types is noticed. To change them: copy the current
//! types into a frozen `vN` module (as [`v1`] is), convert that version
//! forward in `decode`, bump [`CURRENT_FORMAT_VERSION`], give added fields
//! `#[serde(default)]`, and add the new golden folder (`VBK_BLESS=1`).

mod envelope;
mod hex;
pub mod v1;
mod validate;
#[cfg(feature = "versionize")]
mod versionize_impl;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::vring::VringState;

pub use envelope::{
    decode, encode, encode_version, parse_header, read_from, write_to, Encoding, EnvelopeHeader,
    SnapshotError, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN, TRAILER_LEN,
};
pub use validate::{
    RestoreError, SnapshotLimits, ValidatedSnapshot, ValidationError, MAX_CONFIG_LEN, MAX_QUEUES,
    MAX_QUEUE_SIZE,
};

/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u16 = 1;

/// The format version [`encode`] writes, and the newest one [`decode`]
/// reads. Version 2 added [`DeviceSnapshot::in_flight`].
pub const CURRENT_FORMAT_VERSION: u16 = 2;

/// The saved state of one device.
///
/// Plain data, independent of the live device: build it from the control
/// core and the backend, write it with [`encode`], read it back with
/// [`decode`], and check it with [`ValidatedSnapshot::new`] before use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSnapshot {
    /// The virtio device ID (2 for block, 4 for entropy, ...).
    pub device_type: u32,
    /// Every queue of the device, by index. A queue the driver never set up
    /// has size 0.
    pub queues: Vec<VringSnapshot>,
    /// The negotiated virtio features, transport bits included.
    pub acked_features: u64,
    /// The acked vhost-user protocol features, when the snapshot was taken
    /// from (or for) a vhost-user session; `None` in process.
    pub acked_protocol_features: Option<u64>,
    /// The device config space.
    #[serde(with = "hex")]
    pub config: Vec<u8>,
    /// The device's own state, as returned by
    /// [`DeviceBackend::save_state`](crate::DeviceBackend::save_state).
    #[serde(with = "hex")]
    pub device_state: Vec<u8>,
    /// Requests popped from a queue but not completed at the cut, to be
    /// submitted again after restore (format version 2 and later; empty
    /// when read from version 1).
    #[serde(default)]
    pub in_flight: Vec<InflightRecord>,
}

/// The saved state of one split virtqueue.
///
/// The snapshot's own type, so that the on-disk format does not change when
/// [`VringState`] does; convert with `From` in either direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VringSnapshot {
    /// Queue size (number of descriptors); 0 when the queue was never set up.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Whether the queue was enabled for processing.
    pub enabled: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// Index of the next available-ring entry the device will read.
    pub next_avail: u16,
    /// Index of the next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in effect on this queue.
    pub event_idx: bool,
    /// Used index at the last interrupt sent, if any.
    pub signalled_used: Option<u16>,
}

impl VringSnapshot {
    /// Whether the driver set this queue up (a non-zero size).
    pub fn is_configured(&self) -> bool {
        self.size != 0
    }

    /// Requests popped but not yet put on the used ring
    /// (`next_avail - next_used`, modulo 2^16).
    pub fn outstanding(&self) -> u16 {
        self.next_avail.wrapping_sub(self.next_used)
    }
}

impl From<VringState> for VringSnapshot {
    fn from(s: VringState) -> Self {
        VringSnapshot {
            size: s.size,
            ready: s.ready,
            enabled: s.enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx,
            signalled_used: s.signalled_used,
        }
    }
}

impl From<VringSnapshot> for VringState {
    fn from(s: VringSnapshot) -> Self {
        VringState {
            size: s.size,
            ready: s.ready,
            enabled: s.enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx,
            signalled_used: s.signalled_used,
        }
    }
}

/// A request that was popped from a queue but not completed when the
/// snapshot was taken. After restore it is submitted again, in `order`.
///
/// The queue's `next_avail` counts these requests (they were popped) and
/// its `next_used` does not, so a queue has at most `next_avail -
/// next_used` records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InflightRecord {
    /// Queue index.
    pub queue: u16,
    /// Head descriptor index of the request's chain.
    pub head: u16,
    /// When the request was popped, relative to the other records of the
    /// same queue (smaller is earlier); unique within a queue.
    pub order: u64,
}
