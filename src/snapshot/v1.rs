// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Format version 1, frozen.
//!
//! These structs are the payload of every version-1 snapshot ever written.
//! Never change them: files in `snapshots/v1/` must keep decoding. Version 1
//! has no in-flight records; it converts forward into the current
//! [`DeviceSnapshot`](super::DeviceSnapshot) with none, and the current
//! model converts back only when it has none.

use serde::{Deserialize, Serialize};

/// A version-1 device snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSnapshot {
    /// The virtio device ID.
    pub device_type: u32,
    /// Every queue of the device, by index.
    pub queues: Vec<VringSnapshot>,
    /// The negotiated virtio features.
    pub acked_features: u64,
    /// The acked vhost-user protocol features, if any.
    pub acked_protocol_features: Option<u64>,
    /// The device config space.
    #[serde(with = "super::hex")]
    pub config: Vec<u8>,
    /// The device's own state.
    #[serde(with = "super::hex")]
    pub device_state: Vec<u8>,
}

/// A version-1 vring snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VringSnapshot {
    /// Queue size; 0 when never set up.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Whether the queue was enabled.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index.
    pub next_avail: u16,
    /// Next used index.
    pub next_used: u16,
    /// Whether event_idx is in effect.
    pub event_idx: bool,
    /// Used index at the last interrupt sent.
    pub signalled_used: Option<u16>,
}

impl From<VringSnapshot> for super::VringSnapshot {
    fn from(v: VringSnapshot) -> Self {
        super::VringSnapshot {
            size: v.size,
            ready: v.ready,
            enabled: v.enabled,
            desc_table: v.desc_table,
            avail_ring: v.avail_ring,
            used_ring: v.used_ring,
            next_avail: v.next_avail,
            next_used: v.next_used,
            event_idx: v.event_idx,
            signalled_used: v.signalled_used,
        }
    }
}

impl From<DeviceSnapshot> for super::DeviceSnapshot {
    /// Upgrade: a version-1 snapshot has no in-flight records.
    fn from(v: DeviceSnapshot) -> Self {
        super::DeviceSnapshot {
            device_type: v.device_type,
            queues: v.queues.into_iter().map(Into::into).collect(),
            acked_features: v.acked_features,
            acked_protocol_features: v.acked_protocol_features,
            config: v.config,
            device_state: v.device_state,
            in_flight: Vec::new(),
        }
    }
}

impl From<&super::VringSnapshot> for VringSnapshot {
    fn from(v: &super::VringSnapshot) -> Self {
        VringSnapshot {
            size: v.size,
            ready: v.ready,
            enabled: v.enabled,
            desc_table: v.desc_table,
            avail_ring: v.avail_ring,
            used_ring: v.used_ring,
            next_avail: v.next_avail,
            next_used: v.next_used,
            event_idx: v.event_idx,
            signalled_used: v.signalled_used,
        }
    }
}

/// Why the current model cannot be written as version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("version 1 cannot record {0} in-flight request(s)")]
pub struct HasInflight(pub usize);

impl TryFrom<&super::DeviceSnapshot> for DeviceSnapshot {
    type Error = HasInflight;

    /// Downgrade, for a destination that reads only version 1: possible
    /// only when no request was in flight.
    fn try_from(s: &super::DeviceSnapshot) -> Result<Self, HasInflight> {
        if !s.in_flight.is_empty() {
            return Err(HasInflight(s.in_flight.len()));
        }
        Ok(DeviceSnapshot {
            device_type: s.device_type,
            queues: s.queues.iter().map(Into::into).collect(),
            acked_features: s.acked_features,
            acked_protocol_features: s.acked_protocol_features,
            config: s.config.clone(),
            device_state: s.device_state.clone(),
        })
    }
}
