// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The feature bits the kit itself interprets, defined once.
//!
//! Device-specific bits belong to the device; these are the ones the kit's
//! transports, rings, snapshots and vhost-user session act on. Older paths
//! (`core::VIRTIO_RING_F_EVENT_IDX`, `mmio::regs::VIRTIO_F_VERSION_1`,
//! `vhost_user::session::VHOST_F_LOG_ALL`, ...) re-export these.

/// `VIRTIO_F_VERSION_1` (bit 32): a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC` (bit 28): indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX` (bit 29): `used_event` and `avail_event`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VHOST_F_LOG_ALL` (bit 26): a vhost feature, dirty logging of every
/// guest-memory write the backend makes.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): a vhost-user feature, the
/// protocol-feature negotiation.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// The bits a vhost-user home adds to the device's own features (and that
/// a frontend strips before it hands features to its guest).
pub const VHOST_USER_TRANSPORT_FEATURES: u64 = VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL;
