// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The out-of-process home: serving a [`crate::DeviceBackend`] to any
//! vhost-user frontend (QEMU, Cloud Hypervisor, crosvm, libblkio) over a
//! unix socket.
//!
//! The kit owns the request dispatcher (the crate-private `session`: typed
//! requests, one handler per group) and reuses the `vhost` crate's message
//! definitions only. The wire layer (`connection`, `session`,
//! `memory_table`, `backend_channel`, `state_transfer`, `postcopy`,
//! `userfaultfd`) is private to the crate; what a VMM or a daemon needs is
//! re-exported here. The VMM's side of the same protocol, a device whose
//! backend is another process, is [`crate::frontend`].

pub(crate) mod backend_channel;
pub(crate) mod connection;
pub mod daemon;
pub mod listener;
pub(crate) mod memory_table;
#[cfg(feature = "postcopy")]
pub(crate) mod postcopy;
pub(crate) mod session;
pub(crate) mod state_transfer;
#[cfg(feature = "postcopy")]
pub(crate) mod userfaultfd;

pub use connection::ConnectionError;
pub use memory_table::RegionError;
#[cfg(feature = "postcopy")]
pub use postcopy::PostcopyError;
pub use state_transfer::TransferError;

pub use daemon::{DaemonError, DaemonStopper, Endpoint, ServeMode, VhostUserDaemon};
pub use session::{
    kit_protocol_features, RequestError, Session, DEFAULT_CHECK_GRACE, MAX_GUEST_MEMORY,
};
