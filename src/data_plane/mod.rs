// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data plane: what runs for every request, in either home.
//!
//! | module | job |
//! |---|---|
//! | [`vring`] | one live virtqueue: taking chains (one batch loop over resubmissions, mapped rings or `virtio-queue`), completing them, notifying |
//! | [`memory`] | guest memory whose writes are dirty-logged for migration |
//! | [`shared_log`] | the frontend's dirty log file, shared with in-process devices and backends |
//! | [`inflight`] | the shared in-flight area that lets requests survive a backend restart |
//! | `worker` | a worker thread: epoll over kicks and device fds, the device's `handle_event` |
//! | `event_loop` | the same worker body as an `event-manager` subscriber ([`DataPlaneSubscriber`]) |
//! | `waker` | the device's handle on its worker: wake it, add, pause, resume fds ([`WorkerWaker`]) |
//!
//! The control core ([`crate::core`]) starts and stops this plane; the two
//! homes ([`crate::vhost_user`], [`crate::mmio`] with [`crate::kvm`]) feed it
//! notifications and memory. The modules are also reachable at the crate
//! root (`crate::vring`, `crate::memory`, `crate::inflight`) and the worker
//! types through `crate::core`, as before.

pub(crate) mod event_loop;
pub mod inflight;
pub mod memory;
pub mod shared_log;
pub mod vring;
pub(crate) mod waker;
pub(crate) mod worker;

pub use event_loop::DataPlaneSubscriber;
pub use shared_log::{SharedDirtyLog, SharedLogError};
pub use waker::WorkerWaker;
pub use worker::WorkerError;
