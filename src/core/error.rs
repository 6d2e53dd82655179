// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why a control-core operation failed.

use crate::data_plane::WorkerError;
use crate::vring::VringError;

/// Errors from control-core operations. Each maps to a refused request;
/// only [`CoreError::WorkerStuck`] also ends the frontend's session
/// ([`CoreError::is_fatal`]).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The queue index is beyond the device's queues.
    #[error("queue index {0} out of range")]
    QueueIndex(u32),
    /// The queue size is zero, not a power of two or above the maximum.
    #[error("invalid queue size {size} (max {max})")]
    QueueSize {
        /// Requested size.
        size: u32,
        /// Device maximum.
        max: u16,
    },
    /// The driver acked features the device did not offer.
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    /// Queue configuration change while the queue runs.
    #[error("queue {0} is running")]
    QueueRunning(u16),
    /// The queue cannot start with its current configuration.
    #[error("queue {index} cannot start")]
    QueueStart {
        /// Queue index.
        index: u16,
        /// Why.
        #[source]
        source: VringError,
    },
    /// A guest memory region was rejected (overlapping, unknown, empty).
    #[error("invalid guest memory region")]
    Memory(#[source] vm_memory::GuestRegionCollectionError),
    /// The lock around the guest memory handle was poisoned by a panic.
    #[error("guest memory lock poisoned")]
    MemoryPoisoned,
    /// A queue's kick eventfd could not be duplicated for its worker.
    #[error("cannot duplicate the kick eventfd of queue {index}")]
    KickFd {
        /// Queue index.
        index: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config space access is out of range.
    #[error("config access out of range (offset {offset}, len {len})")]
    ConfigRange {
        /// Offset.
        offset: u32,
        /// Length.
        len: usize,
    },
    /// The device refused the request.
    #[error("device error: {0}")]
    Device(#[source] crate::backend::BackendError),
    /// A worker thread died.
    #[error("worker thread for queue {0} is gone")]
    WorkerGone(u16),
    /// The worker of a queue did not stop it in time: it is blocked (on a
    /// postcopy fault the frontend never resolves, or in the device). The
    /// queue still counts as running; a later stop tries again.
    #[error("the worker of queue {index} did not stop it within {waited:?}")]
    WorkerStuck {
        /// Queue index.
        index: u16,
        /// How long the core waited.
        waited: std::time::Duration,
    },
    /// Worker setup failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Why saved state bytes could not be loaded into a device
/// ([`DeviceCore::load_device_state`](super::DeviceCore::load_device_state)).
#[derive(Debug, thiserror::Error)]
pub enum LoadStateError {
    /// The bytes are not a snapshot that fits the device.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::RestoreError),
    /// The device refused its state.
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl CoreError {
    /// Whether the core cannot go on serving its current frontend: a worker
    /// did not stop its queue ([`CoreError::WorkerStuck`]). Every other
    /// failure refuses one operation and leaves the core as it was.
    pub fn is_fatal(&self) -> bool {
        match self {
            CoreError::WorkerStuck { .. } => true,
            CoreError::QueueIndex(_)
            | CoreError::QueueSize { .. }
            | CoreError::UnofferedFeatures(_)
            | CoreError::QueueRunning(_)
            | CoreError::QueueStart { .. }
            | CoreError::Memory(_)
            | CoreError::MemoryPoisoned
            | CoreError::KickFd { .. }
            | CoreError::ConfigRange { .. }
            | CoreError::Device(_)
            | CoreError::WorkerGone(_)
            | CoreError::Worker(_) => false,
        }
    }
}

/// Result of a control-core operation.
pub type Result<T> = std::result::Result<T, CoreError>;
