// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration of a running VM to another `vmm-example` process, each
//! device free to change home on the way.
//!
//! The source ([`MigrateTo`], on SIGUSR1) turns dirty logging on for the
//! guest's own writes (KVM's log of its memory slots) and for the devices'
//! writes (the kit's [`SharedDirtyLog`](virtio_backend_kit::SharedDirtyLog): in-process devices log into it
//! through guest memory, vhost-user backends through `SET_LOG_BASE` and
//! `VHOST_F_LOG_ALL`), sends all of RAM while the guest runs, then the
//! pages dirtied meanwhile, round after round, until what is left would go
//! within the downtime limit at the rate measured so far. Then it stops the
//! vCPUs and the devices, sends the last pages, the vCPU, interrupt
//! controller, clock and console state and every device's kit snapshot
//! (the device's own state through DEVICE_STATE for vhost-user backends),
//! and waits for the destination's answer. On any failure before that
//! answer, or a second SIGUSR1, the source cancels: devices and vCPUs run
//! on where they stopped, logging is turned off, and the guest never knows.
//!
//! The destination ([`receive`]) reads the stream ([`stream`]: header,
//! version, a CRC per record, every field checked) into fresh RAM, answers,
//! waits until the source has let go of the VM (closed the connection, so
//! its backends and images are free), and builds the VM as a restore does,
//! with each device in the home its command line gives.

mod address;
mod destination;
mod dirty;
mod source;
pub mod stream;

use std::time::Duration;

pub use address::{Connection, MigrationAddress, MigrationListener};
pub use destination::receive;
pub use stream::StreamError;

/// Most pre-copy rounds before the VM is stopped whatever is left.
pub const MAX_ROUNDS: u32 = 30;

/// How a source migrates.
#[derive(Clone, Debug)]
pub struct MigrateTo {
    /// Where the destination listens.
    pub address: MigrationAddress,
    /// The longest the guest may be stopped for the last copy, as far as
    /// the measured transfer rate predicts (QEMU's `downtime-limit`).
    pub max_downtime: Duration,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The destination could not be reached or listened on.
    #[error("cannot {what} {address}")]
    Connect {
        /// Connect or listen.
        what: &'static str,
        /// The address.
        address: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The stream could not be sent or was refused on reading.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Guest RAM could not be read or written.
    #[error("guest RAM: {what}")]
    Ram {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Dirty logging could not be turned on or read.
    #[error("dirty logging: {0}")]
    DirtyLog(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// The VM could not be stopped or captured.
    #[error("stopping the VM")]
    Cut(#[source] Box<super::VmmError>),
    /// The VM state could not be encoded or decoded.
    #[error("the VM state")]
    State(#[source] serde_json::Error),
    /// The destination refused the stream.
    #[error("the destination refused the stream")]
    Refused,
    /// The destination did not answer.
    #[error("the destination did not answer within {0:?}")]
    NoAnswer(Duration),
    /// A second SIGUSR1 cancelled the migration.
    #[error("cancelled by SIGUSR1")]
    Cancelled,
    /// The source did not let go of the VM after the destination accepted.
    #[error("the source did not close the connection within {0:?}")]
    SourceHeld(Duration),
}
