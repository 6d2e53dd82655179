// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The out-of-process home: serving a [`crate::DeviceBackend`] to any
//! vhost-user frontend (QEMU, Cloud Hypervisor, crosvm, libblkio) over a
//! unix socket.
//!
//! The kit owns the request dispatcher ([`session`]) and reuses the `vhost`
//! crate's message definitions only.

pub mod adapter_state;
pub mod backend_channel;
pub mod connection;
pub mod daemon;
pub mod frontend_adapter;
pub mod listener;
pub mod memory_table;
#[cfg(feature = "postcopy")]
pub mod postcopy;
pub mod session;
pub mod state_transfer;
#[cfg(feature = "postcopy")]
pub mod userfaultfd;

pub use daemon::{DaemonError, DaemonStopper, Endpoint, ServeMode, VhostUserDaemon};
pub use frontend_adapter::{FrontendError, FrontendOptions, VhostUserFrontendDevice};
pub use session::{kit_protocol_features, RequestError, Session, MAX_GUEST_MEMORY};
