// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Checks a loaded snapshot against the device it is meant for.
//!
//! Everything in a snapshot may come from a file someone edited or from a
//! peer that is confused or hostile. [`ValidatedSnapshot::new`] refuses
//! anything a live queue or device could trip over; what it cannot check
//! (whether rings lie inside guest memory) is checked again when a queue
//! starts.

use std::collections::HashSet;

use super::{DeviceSnapshot, VringSnapshot, MAX_PAYLOAD_LEN};
use crate::backend::DeviceBackend;
use crate::vring::{VringError, VringState};

/// The largest split-ring queue size virtio allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// The most queues a snapshot may describe, whatever the device says.
pub const MAX_QUEUES: usize = 1024;

/// The longest config space a snapshot may carry, whatever the device says.
pub const MAX_CONFIG_LEN: usize = 4096;

use crate::features::VIRTIO_RING_F_EVENT_IDX as EVENT_IDX;

/// What the receiving device accepts; a snapshot is checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// The device ID the snapshot must carry.
    pub device_type: u32,
    /// The device's number of queues (the snapshot may describe fewer).
    pub num_queues: usize,
    /// The device's largest queue size.
    pub max_queue_size: u16,
    /// Every virtio feature bit the receiving home offers, transport bits
    /// included.
    pub offered_features: u64,
    /// The vhost-user protocol features the receiving home offers; checked
    /// only when the snapshot carries some. `u64::MAX` accepts any (an
    /// in-process home ignores them).
    pub offered_protocol_features: u64,
    /// The device's config space size.
    pub config_size: usize,
    /// The longest device-private state accepted.
    pub max_device_state: usize,
}

impl SnapshotLimits {
    /// The limits of `backend` in a home that offers `transport_features`
    /// on top of the device's own and `offered_protocol_features` (see
    /// [`SnapshotLimits::offered_protocol_features`]).
    pub fn for_backend<B: DeviceBackend>(
        backend: &B,
        transport_features: u64,
        offered_protocol_features: u64,
    ) -> Self {
        SnapshotLimits {
            device_type: backend.device_type(),
            num_queues: backend.num_queues(),
            max_queue_size: backend.max_queue_size(),
            offered_features: backend.features() | transport_features,
            offered_protocol_features,
            config_size: backend.config_size(),
            max_device_state: MAX_PAYLOAD_LEN as usize,
        }
    }
}

/// Why a snapshot does not fit the device it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The snapshot is of another kind of device.
    #[error("snapshot of device type {found}, expected {expected}")]
    DeviceType {
        /// The device's type.
        expected: u32,
        /// The snapshot's.
        found: u32,
    },
    /// More queues than the device has.
    #[error("snapshot has {found} queues, the device at most {max}")]
    TooManyQueues {
        /// Queues in the snapshot.
        found: usize,
        /// The limit.
        max: usize,
    },
    /// Acked features the receiving home does not offer.
    #[error("acked features {0:#x} are not offered")]
    UnofferedFeatures(u64),
    /// Acked protocol features the receiving home does not offer.
    #[error("acked protocol features {0:#x} are not offered")]
    UnofferedProtocolFeatures(u64),
    /// The config space is longer than the device's.
    #[error("config space of {len} bytes, the device has {max}")]
    ConfigTooLong {
        /// Bytes in the snapshot.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The device-private state is longer than allowed.
    #[error("device state of {len} bytes exceeds {max}")]
    DeviceStateTooLong {
        /// Bytes in the snapshot.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A queue size that is not a power of two or above the maximum.
    #[error("queue {queue}: size {size} is not a power of two up to {max}")]
    QueueSize {
        /// Queue index.
        queue: u16,
        /// Size in the snapshot.
        size: u16,
        /// The limit.
        max: u16,
    },
    /// A queue the driver never set up (size 0) marked ready.
    #[error("queue {queue}: ready with size 0")]
    UnconfiguredReady {
        /// Queue index.
        queue: u16,
    },
    /// A ring address that breaks the split-ring alignment.
    #[error("queue {queue}: {ring} at {addr:#x} is misaligned")]
    Alignment {
        /// Queue index.
        queue: u16,
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
    },
    /// A ring that would wrap around the end of the address space.
    #[error("queue {queue}: {ring} wraps past the end of the address space")]
    RingOverflow {
        /// Queue index.
        queue: u16,
        /// Which ring.
        ring: &'static str,
    },
    /// Event-idx in effect on a queue while the feature is not acked.
    #[error("queue {queue}: event_idx without VIRTIO_RING_F_EVENT_IDX")]
    EventIdxNotNegotiated {
        /// Queue index.
        queue: u16,
    },
    /// More requests popped and not completed than the queue holds.
    #[error("queue {queue}: {outstanding} requests outstanding, more than its size {size}")]
    Outstanding {
        /// Queue index.
        queue: u16,
        /// `next_avail - next_used`.
        outstanding: u16,
        /// Queue size.
        size: u16,
    },
    /// The vring state is refused by [`VringState::validate`].
    #[error("queue {queue}")]
    Vring {
        /// Queue index.
        queue: u16,
        /// What the vring check said.
        #[source]
        source: VringError,
    },
    /// An in-flight record names a queue that is absent or not set up.
    #[error("in-flight request on queue {queue}, which is not set up")]
    InflightQueue {
        /// Queue index in the record.
        queue: u16,
    },
    /// An in-flight head beyond its queue's size.
    #[error("queue {queue}: in-flight head {head} out of range (size {size})")]
    InflightHead {
        /// Queue index.
        queue: u16,
        /// Head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// The same head recorded twice on one queue.
    #[error("queue {queue}: in-flight head {head} recorded twice")]
    InflightDuplicateHead {
        /// Queue index.
        queue: u16,
        /// Head index.
        head: u16,
    },
    /// The same order recorded twice on one queue.
    #[error("queue {queue}: in-flight order {order} recorded twice")]
    InflightDuplicateOrder {
        /// Queue index.
        queue: u16,
        /// Order value.
        order: u64,
    },
    /// More in-flight records than requests outstanding on the queue.
    #[error(
        "queue {queue}: {count} in-flight records but only {outstanding} requests outstanding"
    )]
    InflightCount {
        /// Queue index.
        queue: u16,
        /// Records for the queue.
        count: usize,
        /// `next_avail - next_used`.
        outstanding: u16,
    },
}

impl DeviceSnapshot {
    /// Check the snapshot against the device described by `limits`.
    pub fn validate(&self, limits: &SnapshotLimits) -> Result<(), ValidationError> {
        if self.device_type != limits.device_type {
            return Err(ValidationError::DeviceType {
                expected: limits.device_type,
                found: self.device_type,
            });
        }
        let max_queues = limits.num_queues.min(MAX_QUEUES);
        if self.queues.len() > max_queues {
            return Err(ValidationError::TooManyQueues {
                found: self.queues.len(),
                max: max_queues,
            });
        }
        let unoffered = self.acked_features & !limits.offered_features;
        if unoffered != 0 {
            return Err(ValidationError::UnofferedFeatures(unoffered));
        }
        if let Some(protocol) = self.acked_protocol_features {
            let unoffered = protocol & !limits.offered_protocol_features;
            if unoffered != 0 {
                return Err(ValidationError::UnofferedProtocolFeatures(unoffered));
            }
        }
        let max_config = limits.config_size.min(MAX_CONFIG_LEN);
        if self.config.len() > max_config {
            return Err(ValidationError::ConfigTooLong {
                len: self.config.len(),
                max: max_config,
            });
        }
        if self.device_state.len() > limits.max_device_state {
            return Err(ValidationError::DeviceStateTooLong {
                len: self.device_state.len(),
                max: limits.max_device_state,
            });
        }
        let max_size = limits.max_queue_size.min(MAX_QUEUE_SIZE);
        for (index, q) in self.queues.iter().enumerate() {
            // Fits: the queue count is at most MAX_QUEUES.
            self.check_queue(index as u16, q, max_size)?;
        }
        self.check_in_flight()
    }

    fn check_queue(&self, queue: u16, q: &VringSnapshot, max: u16) -> Result<(), ValidationError> {
        if !q.is_configured() {
            if q.ready {
                return Err(ValidationError::UnconfiguredReady { queue });
            }
            return Ok(());
        }
        if !q.size.is_power_of_two() || q.size > max {
            return Err(ValidationError::QueueSize {
                queue,
                size: q.size,
                max,
            });
        }
        let size = u64::from(q.size);
        // (name, address, alignment, length) of the three split-ring parts;
        // the rings' 6 bytes are flags, idx and the event-idx word.
        let rings = [
            ("descriptor table", q.desc_table, 16, 16 * size),
            ("available ring", q.avail_ring, 2, 6 + 2 * size),
            ("used ring", q.used_ring, 4, 6 + 8 * size),
        ];
        for (ring, addr, align, len) in rings {
            if addr % align != 0 {
                return Err(ValidationError::Alignment { queue, ring, addr });
            }
            if addr.checked_add(len - 1).is_none() {
                return Err(ValidationError::RingOverflow { queue, ring });
            }
        }
        if q.event_idx && self.acked_features & EVENT_IDX == 0 {
            return Err(ValidationError::EventIdxNotNegotiated { queue });
        }
        if q.outstanding() > q.size {
            return Err(ValidationError::Outstanding {
                queue,
                outstanding: q.outstanding(),
                size: q.size,
            });
        }
        VringState::from(*q)
            .validate(max)
            .map_err(|source| ValidationError::Vring { queue, source })
    }

    fn check_in_flight(&self) -> Result<(), ValidationError> {
        let mut heads = HashSet::new();
        let mut orders = HashSet::new();
        let mut counts = vec![0usize; self.queues.len()];
        for r in &self.in_flight {
            let queue = r.queue;
            let q = self
                .queues
                .get(usize::from(queue))
                .filter(|q| q.is_configured())
                .ok_or(ValidationError::InflightQueue { queue })?;
            if r.head >= q.size {
                return Err(ValidationError::InflightHead {
                    queue,
                    head: r.head,
                    size: q.size,
                });
            }
            if !heads.insert((queue, r.head)) {
                return Err(ValidationError::InflightDuplicateHead {
                    queue,
                    head: r.head,
                });
            }
            if !orders.insert((queue, r.order)) {
                return Err(ValidationError::InflightDuplicateOrder {
                    queue,
                    order: r.order,
                });
            }
            let count = &mut counts[usize::from(queue)];
            *count += 1;
            if *count > usize::from(q.outstanding()) {
                return Err(ValidationError::InflightCount {
                    queue,
                    count: *count,
                    outstanding: q.outstanding(),
                });
            }
        }
        Ok(())
    }
}

/// A snapshot that passed [`DeviceSnapshot::validate`] for one device: the
/// only form restore code should accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedSnapshot {
    inner: DeviceSnapshot,
}

/// Why bytes did not become a [`ValidatedSnapshot`].
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The bytes are not a snapshot envelope this build reads.
    #[error(transparent)]
    Format(#[from] super::SnapshotError),
    /// The snapshot does not fit the device.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl ValidatedSnapshot {
    /// Decode `bytes` (an envelope of any version this build reads) and
    /// check the snapshot against `limits`: the one way from untrusted bytes
    /// (a state file, a DEVICE_STATE transfer, a migration stream) to a
    /// snapshot a device may load.
    pub fn decode(bytes: &[u8], limits: &SnapshotLimits) -> Result<Self, RestoreError> {
        Ok(ValidatedSnapshot::new(super::decode(bytes)?, limits)?)
    }

    /// Check `snapshot` against `limits`.
    pub fn new(snapshot: DeviceSnapshot, limits: &SnapshotLimits) -> Result<Self, ValidationError> {
        snapshot.validate(limits)?;
        Ok(ValidatedSnapshot { inner: snapshot })
    }

    /// The checked snapshot.
    pub fn snapshot(&self) -> &DeviceSnapshot {
        &self.inner
    }

    /// Give the snapshot back.
    pub fn into_inner(self) -> DeviceSnapshot {
        self.inner
    }

    /// The state of every queue the driver set up, with its index, ready for
    /// the control core's queue restore.
    /// Queues of size 0 are left out: they stay unconfigured.
    pub fn queue_states(&self) -> impl Iterator<Item = (u16, VringState)> + '_ {
        self.inner
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.is_configured())
            .map(|(i, q)| (i as u16, VringState::from(*q)))
    }

    /// The in-flight heads of `queue`, in the order they were popped (the
    /// order to submit them again).
    pub fn in_flight_heads(&self, queue: u16) -> Vec<u16> {
        let mut records: Vec<_> = self
            .inner
            .in_flight
            .iter()
            .filter(|r| r.queue == queue)
            .collect();
        records.sort_by_key(|r| r.order);
        records.iter().map(|r| r.head).collect()
    }
}

impl TryFrom<(DeviceSnapshot, &SnapshotLimits)> for ValidatedSnapshot {
    type Error = ValidationError;

    fn try_from(
        (snapshot, limits): (DeviceSnapshot, &SnapshotLimits),
    ) -> Result<Self, ValidationError> {
        ValidatedSnapshot::new(snapshot, limits)
    }
}
