// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request dispatcher: one frontend connection, each message turned into
//! control-core operations.
//!
//! A message goes through three steps: `request::decode` checks its
//! payload and fds and makes it a typed `Request` (pure, tested on bytes);
//! `Session::serve` hands it to the handler of its group (`features.rs`,
//! `memory.rs`, `vrings.rs`, `device_state.rs`, `postcopy_memory.rs`);
//! `Session::dispatch` turns the result into the reply the protocol owes,
//! and ends the session on the one kind of failure that must
//! ([`RequestError::ends_session`]).
//!
//! Rules this dispatcher keeps, whatever the frontend does:
//! - a request that fails is NACKed (when the frontend asked for an ack) and
//!   logged; the session goes on. Only a broken socket ends it;
//! - REPLY_ACK is always offered, and honoured as soon as the frontend acks
//!   it with `SET_PROTOCOL_FEATURES`, whether or not it ever sent
//!   `GET_FEATURES` or `GET_PROTOCOL_FEATURES` (a frontend restored from a
//!   migration skips them);
//! - requests that carry an explicit reply always get one, even on error
//!   (an empty payload), so the frontend never waits forever.

use std::fs::File;
use std::os::unix::net::UnixStream;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64,
    VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use std::sync::Arc;

use super::backend_channel::BackendChannel;
use super::connection::{Connection, ConnectionError, Message};
use super::memory_table::{MappedRegion, MemoryTable, RegionError};
#[cfg(feature = "postcopy")]
use super::postcopy::{PendingMemory, Postcopy, PostcopyError};
use super::state_transfer::StateTransfer;
use crate::backend::{ConfigNotifier, DeviceBackend};
use crate::core::{CoreError, DeviceCore};
use crate::inflight::{InflightArea, InflightError};

mod device_state;
mod error;
mod features;
mod memory;
mod outcome;
mod postcopy_memory;
mod request;
mod vrings;

pub use error::RequestError;
use outcome::*;
use request::{Request, StateDirection, VringFdKind};

pub(crate) use crate::features::VHOST_USER_TRANSPORT_FEATURES as TRANSPORT_FEATURES;
pub use crate::features::{VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES};
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 64;
/// The most guest memory one session maps: 16 TiB, beyond the largest
/// guests run today, and small enough that a frontend sending sparse
/// memfds of any claimed size cannot use up the 128 TiB address space of
/// the process (even while a new table is mapped beside the old one).
pub const MAX_GUEST_MEMORY: u64 = 16 << 40;

/// Protocol features the kit offers: a fixed set, plus `PAGEFAULT` with the
/// `postcopy` feature where this process can use userfaultfd.
pub fn kit_protocol_features() -> VhostUserProtocolFeatures {
    let fixed = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE;
    #[cfg(feature = "postcopy")]
    if super::userfaultfd::available() {
        return fixed | VhostUserProtocolFeatures::PAGEFAULT;
    }
    fixed
}

/// Why the state file could not be written (logged; serving goes on).
#[derive(Debug, thiserror::Error)]
enum StateFileError {
    #[error("cannot take the checkpoint")]
    Snapshot(#[source] CoreError),
    #[error("cannot encode the checkpoint")]
    Encode(#[source] crate::snapshot::SnapshotError),
    #[error("cannot write the file")]
    Write(#[source] std::io::Error),
}

/// One frontend connection.
pub struct Session<'a, B: DeviceBackend> {
    core: &'a mut DeviceCore<B>,
    conn: Connection,
    regions: MemoryTable,
    acked_protocol: u64,
    protocol_set: bool,
    status: u8,
    channel: BackendChannel,
    transfer: Option<StateTransfer>,
    state_file: Option<std::path::PathBuf>,
    check_grace: std::time::Duration,
    #[cfg(feature = "postcopy")]
    postcopy: Postcopy,
}

impl<B: DeviceBackend> std::fmt::Debug for Session<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("core", &self.core)
            .field(
                "acked_protocol",
                &format_args!("{:#x}", self.acked_protocol),
            )
            .field("status", &self.status)
            .field("transfer", &self.transfer.is_some())
            .finish_non_exhaustive()
    }
}

/// How long `CHECK_DEVICE_STATE` waits by default for a transfer the
/// frontend should already have drained (save) or closed (load) before
/// cancelling it.
pub const DEFAULT_CHECK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl<'a, B: DeviceBackend> Session<'a, B> {
    /// Start a session on a connected socket.
    pub fn new(core: &'a mut DeviceCore<B>, sock: UnixStream) -> Self {
        let channel = BackendChannel::default();
        let notify = channel.clone();
        core.set_config_notifier(ConfigNotifier::new(move || notify.notify_config_change()));
        Session {
            core,
            conn: Connection::new(sock),
            regions: MemoryTable::default(),
            acked_protocol: 0,
            protocol_set: false,
            status: 0,
            channel,
            transfer: None,
            state_file: None,
            check_grace: DEFAULT_CHECK_GRACE,
            #[cfg(feature = "postcopy")]
            postcopy: Postcopy::default(),
        }
    }

    /// How long `CHECK_DEVICE_STATE` waits for an unfinished transfer
    /// (default [`DEFAULT_CHECK_GRACE`](super::DEFAULT_CHECK_GRACE)).
    pub fn with_check_grace(mut self, grace: std::time::Duration) -> Self {
        self.check_grace = grace;
        self
    }

    /// Persist the device state to `path` as it settles (see
    /// [`super::VhostUserDaemon::with_state_file`]).
    pub fn with_state_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.state_file = path;
        self
    }

    /// Write the state file, atomically (temporary file, then rename).
    fn persist(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let result = (self.core.checkpoint(Some(self.acked_protocol)))
            .map_err(StateFileError::Snapshot)
            .and_then(|snap| crate::snapshot::encode(&snap).map_err(StateFileError::Encode))
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(StateFileError::Write)
            });
        if let Err(e) = result {
            let e = crate::error_chain(&e);
            warn!("cannot write state file {}: {e}", path.display());
        }
    }

    /// Serve requests until the socket breaks or closes. The device is
    /// reset afterwards so the next session starts clean.
    pub fn run(mut self) -> ConnectionError {
        let end = loop {
            let msg = match self.conn.recv() {
                Ok(m) => m,
                Err(e) => break e,
            };
            let settles = matches!(
                FrontendReq::try_from(msg.request),
                Ok(FrontendReq::SET_FEATURES | FrontendReq::GET_VRING_BASE)
            );
            if let Err(e) = self.dispatch(msg) {
                break e;
            }
            if settles {
                self.persist();
            }
        };
        // Before anything waits for the workers: one may be blocked on a
        // fault the frontend will never resolve now.
        #[cfg(feature = "postcopy")]
        self.postcopy.shutdown();
        self.persist();
        self.core.reset();
        self.core.clear_memory();
        self.channel.clear();
        end
    }

    fn protocol_offered(&self) -> u64 {
        kit_protocol_features().bits() | self.core.backend().protocol_features()
    }

    fn reply_ack_enabled(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// With LOG_SHMFD, SET_LOG_BASE carries an explicit reply the frontend
    /// waits for, also when the request fails.
    fn log_shmfd_enabled(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::LOG_SHMFD.bits() != 0
    }

    fn protocol_negotiated(&self) -> bool {
        self.protocol_set || self.core.acked_features() & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Handle one message; `Err` only when the socket broke.
    fn dispatch(&mut self, mut msg: Message) -> Result<(), ConnectionError> {
        let code = msg.request;
        let need_reply = msg.need_reply();
        let request = FrontendReq::try_from(code).ok();
        let region_reply = request.is_some_and(|r| self.postcopy_region_reply_owed(r, &msg));
        let result = if !msg.header_valid() {
            Err(RequestError::BadHeader(msg.flags))
        } else {
            match request {
                Some(req) => self.handle(req, &mut msg),
                None => Err(RequestError::Unsupported(code)),
            }
        };
        let result = match result {
            Err(e) if e.ends_session() => {
                error!("{e}: ending the session");
                return Err(ConnectionError::Fatal(Box::new(e)));
            }
            other => other,
        };
        let explicit = request.is_some_and(has_reply)
            || region_reply
            || (request == Some(FrontendReq::SET_LOG_BASE) && self.log_shmfd_enabled());
        match result {
            Ok(Outcome::Reply(payload)) => self.conn.send_reply(code, &payload),
            Ok(Outcome::ReplyWithFile(payload, area)) => {
                use std::os::fd::AsRawFd;
                self.conn
                    .send_reply_with_fds(code, &payload, &[area.file().as_raw_fd()])
            }
            #[cfg(feature = "postcopy")]
            Ok(Outcome::ReplyWithFd(payload, fd)) => {
                use std::os::fd::AsRawFd;
                self.conn
                    .send_reply_with_fds(code, &payload, &[fd.as_raw_fd()])
            }
            Ok(Outcome::Ack) => {
                if need_reply && self.reply_ack_enabled() {
                    self.conn.send_reply(code, VhostUserU64::new(0).as_slice())
                } else {
                    Ok(())
                }
            }
            Err(e) => {
                warn!(
                    "refused {}: {e}",
                    request.map_or_else(|| format!("request {code}"), |r| format!("{r:?}"))
                );
                if request == Some(FrontendReq::GET_INFLIGHT_FD) {
                    // A full-size, all-zero reply without an fd: frontends
                    // that read a fixed-size body (the `vhost` crate's) do
                    // not block, and the missing fd marks the failure.
                    self.conn
                        .send_reply(code, VhostUserInflight::default().as_slice())
                } else if request == Some(FrontendReq::POSTCOPY_END) {
                    // Its reply is a status word: non-zero is failure.
                    self.conn.send_reply(code, VhostUserU64::new(1).as_slice())
                } else if explicit {
                    // An empty reply tells the frontend the request failed
                    // without leaving it blocked on a read.
                    self.conn.send_reply(code, &[])
                } else if need_reply && self.reply_ack_enabled() {
                    self.conn.send_reply(code, VhostUserU64::new(1).as_slice())
                } else {
                    Ok(())
                }
            }
        }
    }

    fn handle(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        debug!(
            "{req:?} ({} bytes, {} fds)",
            msg.payload.len(),
            msg.files.len()
        );
        #[cfg(feature = "postcopy")]
        if self.is_postcopy_ack(req, msg) {
            return self.postcopy_ack(req, msg);
        }
        let files = std::mem::take(&mut msg.files);
        let request = request::decode(req, &msg.payload, files)?;
        self.serve(request)
    }

    /// Carry out one decoded request; each group's handlers live in the
    /// file named after it.
    fn serve(&mut self, request: Request) -> RequestResult {
        match request {
            // features.rs: features, status, config space, the session.
            Request::GetFeatures => Ok(u64_reply(self.offered_features())),
            Request::SetFeatures(features) => self.set_features(features),
            Request::GetProtocolFeatures => Ok(u64_reply(self.protocol_offered())),
            Request::SetProtocolFeatures(features) => self.set_protocol_features(features),
            Request::SetOwner | Request::SetLogFd => Ok(Outcome::Ack),
            Request::Reset => Ok(self.reset()),
            Request::GetQueueNum => Ok(u64_reply(self.core.num_queues() as u64)),
            Request::GetMaxMemSlots => Ok(u64_reply(MAX_MEM_SLOTS)),
            Request::SetStatus(status) => Ok(self.set_status(status)),
            Request::GetStatus => Ok(u64_reply(u64::from(self.status))),
            Request::GetConfig { header } => self.get_config(header),
            Request::SetConfig { offset, data } => self.set_config(offset, &data),
            Request::SetBackendReqFd(file) => Ok(self.set_backend_req_fd(file)),
            // memory.rs: guest memory and the dirty log.
            Request::SetMemTable { header, regions } => self.set_mem_table(header, regions),
            Request::AddMemReg(region, file) => self.add_mem_reg(region, file),
            Request::RemMemReg(region) => self.rem_mem_reg(region),
            Request::SetLogBase(log, file) => self.set_log_base(log, file),
            // vrings.rs: the queues and their in-flight area.
            Request::SetVringNum { index, size } => self.set_vring_num(index, size),
            Request::SetVringAddr(addr) => self.set_vring_addr(&addr),
            Request::SetVringBase { index, base } => self.set_vring_base(index, base),
            Request::GetVringBase { index } => self.get_vring_base(index),
            Request::SetVringFd { kind, index, file } => self.set_vring_fd(kind, index, file),
            Request::SetVringEnable { index, enable } => self.set_vring_enable(index, enable),
            Request::GetInflightFd(want) => self.get_inflight_fd(&want),
            Request::SetInflightFd(info, file) => self.set_inflight_fd(&info, file),
            // device_state.rs: DEVICE_STATE.
            Request::SetDeviceStateFd(direction, file) => self.set_device_state_fd(direction, file),
            Request::CheckDeviceState => Ok(u64_reply(u64::from(!self.check_device_state()))),
            // postcopy_memory.rs: PAGEFAULT.
            Request::PostcopyAdvise => self.postcopy_advise(),
            Request::PostcopyListen => self.postcopy_listen(),
            Request::PostcopyEnd => self.postcopy_end(),
        }
    }
}
