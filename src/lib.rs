// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

pub mod backend;
pub mod core;
pub mod data_plane;
pub mod fault_guard;
pub mod features;
#[cfg(feature = "frontend-adapter")]
pub mod frontend;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod mmio;
mod shared_mapping;
pub mod snapshot;
#[cfg(feature = "test-utils")]
pub mod testing;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;

pub use backend::{
    BackendError, ConfigNotifier, DeviceBackend, DeviceBackendMut, DeviceEvent, QueueSet,
    DEFAULT_MAX_QUEUE_SIZE,
};
pub use data_plane::{inflight, memory, vring, SharedDirtyLog};
pub use memory::{DirtyLog, DirtyLogBitmap, GuestMemoryHandle, GuestMemoryLog, GuestRegionLog};
pub use vring::{
    Chain, Completion, DescIter, Vring, VringError, VringMutex, VringOwned, VringRwLock,
    VringState, VringT,
};

/// The `kvm-ioctls` crate the KVM wiring is built on.
#[cfg(feature = "kvm")]
pub use kvm_ioctls;
/// The `vhost` crate this kit is built on, re-exported so users never mix versions.
#[cfg(feature = "vhost-user")]
pub use vhost;
/// The `virtio-queue` crate this kit is built on.
pub use virtio_queue;
/// The `vm-memory` crate this kit is built on.
pub use vm_memory;
/// The `vmm-sys-util` crate this kit is built on.
pub use vmm_sys_util;

/// An error and its sources on one line (`outer: inner: innermost`), for
/// logs: the kit's errors keep their cause as a typed `source`, not in
/// their own message.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    std::iter::successors(e.source(), |s| s.source())
        .fold(e.to_string(), |msg, s| format!("{msg}: {s}"))
}
