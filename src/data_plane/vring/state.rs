// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The plain, serializable state of a vring, as snapshots and peers carry it.

use super::*;

/// The plain, serializable state of one vring.
///
/// It may come from a peer or a snapshot file: treat it as untrusted.
/// [`VringState::validate`] checks it before it touches a live queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    /// Negotiated queue size (number of descriptors).
    pub size: u16,
    /// Whether the driver marked the queue ready (in-process transports).
    #[serde(default)]
    pub ready: bool,
    /// Whether the queue is enabled for processing.
    #[serde(default)]
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
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in effect.
    #[serde(default)]
    pub event_idx: bool,
    /// Used index at the last interrupt sent, if any.
    #[serde(default)]
    pub signalled_used: Option<u16>,
}

impl VringState {
    /// Check the parts of the state that do not depend on guest memory.
    pub fn validate(&self, max_size: u16) -> Result<(), VringError> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max_size {
            return Err(VringError::InvalidState("queue size"));
        }
        if !self.desc_table.is_multiple_of(16) {
            return Err(VringError::InvalidState("descriptor table alignment"));
        }
        if !self.avail_ring.is_multiple_of(2) {
            return Err(VringError::InvalidState("available ring alignment"));
        }
        if !self.used_ring.is_multiple_of(4) {
            return Err(VringError::InvalidState("used ring alignment"));
        }
        Ok(())
    }
}
