// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why a frontend request was refused.

use super::*;
use crate::vhost_user::TransferError;

/// Why a request was refused. Sent back as a NACK and logged.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The header has a bad version or the reply flag.
    #[error("invalid message header (flags {0:#x})")]
    BadHeader(u32),
    /// The request code is unknown or not supported.
    #[error("unsupported request {0}")]
    Unsupported(u32),
    /// The payload has the wrong size or invalid contents.
    #[error("malformed payload for {request:?} ({len} bytes)")]
    BadPayload {
        /// Request.
        request: FrontendReq,
        /// Payload size received.
        len: usize,
    },
    /// The wrong number of fds came with the request.
    #[error("{request:?} needs {expected} fd(s), got {got}")]
    BadFds {
        /// Request.
        request: FrontendReq,
        /// Expected fds.
        expected: usize,
        /// Received fds.
        got: usize,
    },
    /// A vring message came before any guest memory.
    #[error("{0:?} before SET_MEM_TABLE")]
    NoMemory(FrontendReq),
    /// A vring address is not inside any region.
    #[error("vring address {0:#x} is outside the memory table")]
    UnmappedAddress(u64),
    /// Protocol features acked that were not offered.
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocolFeatures(u64),
    /// A region could not be mapped.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The control core refused.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Too many memory slots.
    #[error("too many memory regions ({0})")]
    TooManyRegions(usize),
    /// The regions add up to more than [`MAX_GUEST_MEMORY`].
    #[error("{requested:#x} bytes of guest memory exceed the limit of {limit:#x}")]
    TooMuchMemory {
        /// What the session would map.
        requested: u64,
        /// [`MAX_GUEST_MEMORY`].
        limit: u64,
    },
    /// REM_MEM_REG of a region we do not have.
    #[error("no region at gpa {0:#x} to remove")]
    NoSuchRegion(u64),
    /// The dirty log could not be set up.
    #[error(transparent)]
    Log(#[from] crate::memory::DirtyLogError),
    /// The device state could not be encoded for the frontend.
    #[error("cannot encode the device state")]
    StateEncode(#[source] crate::snapshot::SnapshotError),
    /// The device state transfer could not be started.
    #[error("cannot start the device state transfer")]
    StateTransfer(#[source] TransferError),
    /// The in-flight area could not be set up.
    #[error(transparent)]
    Inflight(#[from] InflightError),
    /// An fd could not be duplicated or converted.
    #[error("bad file descriptor")]
    Fd(#[source] std::io::Error),
    /// A postcopy request was refused.
    #[cfg(feature = "postcopy")]
    #[error(transparent)]
    Postcopy(#[from] PostcopyError),
}

impl RequestError {
    /// Whether the session must end after this failure, instead of refusing
    /// the request and going on. Only a worker the core could not stop (it
    /// is blocked, on a postcopy fault the frontend never serves or in the
    /// device) ends it: ending the session releases the fault and lets the
    /// daemon serve the next frontend. The match is exhaustive on purpose: a
    /// new kind of failure must be classified before it compiles.
    pub fn ends_session(&self) -> bool {
        match self {
            RequestError::Core(e) => e.is_fatal(),
            RequestError::BadHeader(_)
            | RequestError::Unsupported(_)
            | RequestError::BadPayload { .. }
            | RequestError::BadFds { .. }
            | RequestError::NoMemory(_)
            | RequestError::UnmappedAddress(_)
            | RequestError::UnofferedProtocolFeatures(_)
            | RequestError::Region(_)
            | RequestError::TooManyRegions(_)
            | RequestError::TooMuchMemory { .. }
            | RequestError::NoSuchRegion(_)
            | RequestError::Log(_)
            | RequestError::StateEncode(_)
            | RequestError::StateTransfer(_)
            | RequestError::Inflight(_)
            | RequestError::Fd(_) => false,
            #[cfg(feature = "postcopy")]
            RequestError::Postcopy(_) => false,
        }
    }
}
