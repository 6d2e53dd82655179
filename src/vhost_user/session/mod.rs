// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request dispatcher: one frontend connection, each message turned into
//! control-core operations.
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
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserTransferDeviceState, VhostUserU64, VhostUserVringAddr, VhostUserVringState,
    MAX_ATTACHED_FD_ENTRIES, VHOST_USER_CONFIG_SIZE,
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
mod memory;
mod outcome;
mod postcopy_memory;

pub use error::RequestError;
use outcome::*;

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL`.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 64;
/// The most guest memory one session maps: 16 TiB, beyond the largest
/// guests run today, and small enough that a frontend sending sparse
/// memfds of any claimed size cannot use up the 128 TiB address space of
/// the process (even while a new table is mapped beside the old one).
pub const MAX_GUEST_MEMORY: u64 = 16 << 40;
const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD_MASK: u64 = 0x100;

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
    /// (default [`DEFAULT_CHECK_GRACE`]).
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
        let result = self
            .core
            .checkpoint(Some(self.acked_protocol))
            .map_err(|e| e.to_string())
            .and_then(|snap| crate::snapshot::encode(&snap).map_err(|e| e.to_string()))
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes)
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
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
        if let Err(RequestError::Core(e @ CoreError::WorkerStuck { .. })) = result {
            error!("{e}: ending the session");
            return Err(ConnectionError::WorkerStuck(e));
        }
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
        let p = &msg.payload;
        match req {
            FrontendReq::GET_FEATURES => Ok(u64_reply(
                self.core.device_features() | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
            )),
            FrontendReq::SET_FEATURES => {
                let features = parse::<VhostUserU64>(req, p)?.value;
                self.core
                    .set_features(features, VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)?;
                let log_all = features & VHOST_F_LOG_ALL != 0;
                self.core.dirty_log().set_active(log_all);
                if !self.protocol_negotiated() {
                    // Without protocol features, started rings are enabled.
                    for q in 0..self.core.num_queues() as u32 {
                        self.core.set_queue_enabled(q, true)?;
                    }
                }
                Ok(Outcome::Ack)
            }
            FrontendReq::GET_PROTOCOL_FEATURES => Ok(u64_reply(self.protocol_offered())),
            FrontendReq::SET_PROTOCOL_FEATURES => {
                let features = parse::<VhostUserU64>(req, p)?.value;
                let unoffered = features & !self.protocol_offered();
                if unoffered != 0 {
                    return Err(RequestError::UnofferedProtocolFeatures(unoffered));
                }
                self.acked_protocol = features;
                self.protocol_set = true;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_OWNER => Ok(Outcome::Ack),
            FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE => {
                self.core.reset();
                self.status = 0;
                Ok(Outcome::Ack)
            }
            FrontendReq::GET_QUEUE_NUM => Ok(u64_reply(self.core.num_queues() as u64)),
            FrontendReq::GET_MAX_MEM_SLOTS => Ok(u64_reply(MAX_MEM_SLOTS)),
            FrontendReq::SET_MEM_TABLE => self.set_mem_table(req, msg),
            FrontendReq::ADD_MEM_REG => self.add_mem_reg(req, msg),
            FrontendReq::REM_MEM_REG => {
                let r = parse::<VhostUserSingleMemoryRegion>(req, p)?;
                if !self.regions.remove(r.guest_phys_addr, r.memory_size) {
                    return Err(RequestError::NoSuchRegion(r.guest_phys_addr));
                }
                self.core.remove_region(r.guest_phys_addr, r.memory_size)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_LOG_BASE => self.set_log_base(req, msg),
            FrontendReq::SET_LOG_FD => Ok(Outcome::Ack),
            FrontendReq::SET_VRING_NUM => {
                let s = parse::<VhostUserVringState>(req, p)?;
                self.core.set_queue_size(s.index, s.num)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_VRING_ADDR => {
                let a = parse::<VhostUserVringAddr>(req, p)?;
                if self.regions.is_empty() {
                    return Err(RequestError::NoMemory(req));
                }
                let tr = |vva| {
                    self.regions
                        .vva_to_gpa(vva)
                        .ok_or(RequestError::UnmappedAddress(vva))
                };
                let (desc, avail, used) = (tr(a.descriptor)?, tr(a.available)?, tr(a.used)?);
                self.core.set_queue_addresses(a.index, desc, avail, used)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_VRING_BASE => {
                let s = parse::<VhostUserVringState>(req, p)?;
                let base = u16::try_from(s.num).map_err(|_| RequestError::BadPayload {
                    request: req,
                    len: p.len(),
                })?;
                self.core.set_queue_base(s.index, base, None)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::GET_VRING_BASE => {
                let s = parse::<VhostUserVringState>(req, p)?;
                let state = self.core.stop_queue(s.index)?;
                Ok(Outcome::Reply(
                    VhostUserVringState::new(s.index, u32::from(state.next_avail))
                        .as_slice()
                        .to_vec(),
                ))
            }
            FrontendReq::SET_VRING_KICK => {
                let (index, fd) = self.vring_fd(req, msg)?;
                if fd.is_none() {
                    // Polling mode (no kick fd) is not supported.
                    return Err(RequestError::BadFds {
                        request: req,
                        expected: 1,
                        got: 0,
                    });
                }
                if !self.protocol_negotiated() {
                    self.core.set_queue_enabled(index, true)?;
                }
                self.core.set_kick(index, fd)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_VRING_CALL => {
                let (index, fd) = self.vring_fd(req, msg)?;
                self.core.set_call(index, fd)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_VRING_ERR => {
                let (index, fd) = self.vring_fd(req, msg)?;
                self.core.set_err(index, fd)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_VRING_ENABLE => {
                let s = parse::<VhostUserVringState>(req, p)?;
                if s.num > 1 {
                    return Err(RequestError::BadPayload {
                        request: req,
                        len: p.len(),
                    });
                }
                self.core.set_queue_enabled(s.index, s.num == 1)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::GET_CONFIG => self.get_config(req, p),
            FrontendReq::SET_CONFIG => {
                let (offset, data) = self.config_request(req, p)?;
                self.core.write_config(offset, data)?;
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_BACKEND_REQ_FD => {
                let file = msg.take_single_file().ok_or(RequestError::BadFds {
                    request: req,
                    expected: 1,
                    got: msg.files.len(),
                })?;
                self.channel
                    .set(UnixStream::from(std::os::fd::OwnedFd::from(file)));
                Ok(Outcome::Ack)
            }
            FrontendReq::SET_STATUS => {
                let status = parse::<VhostUserU64>(req, p)?.value;
                let status = u8::try_from(status).map_err(|_| RequestError::BadPayload {
                    request: req,
                    len: p.len(),
                })?;
                if status == 0 && self.status != 0 {
                    info!("driver reset the device (status 0)");
                    self.core.reset();
                }
                self.status = status;
                Ok(Outcome::Ack)
            }
            FrontendReq::GET_STATUS => Ok(u64_reply(u64::from(self.status))),
            FrontendReq::SET_DEVICE_STATE_FD => self.set_device_state_fd(req, msg),
            FrontendReq::CHECK_DEVICE_STATE => {
                let ok = self.check_device_state();
                Ok(u64_reply(u64::from(!ok)))
            }
            FrontendReq::GET_INFLIGHT_FD => {
                let want = parse::<VhostUserInflight>(req, p)?;
                self.check_inflight_geometry(req, &want)?;
                let area = Arc::new(InflightArea::create(want.num_queues, want.queue_size)?);
                let reply =
                    VhostUserInflight::new(area.len() as u64, 0, want.num_queues, want.queue_size);
                self.core.set_inflight(Some(area.clone()));
                Ok(Outcome::ReplyWithFile(reply.as_slice().to_vec(), area))
            }
            FrontendReq::SET_INFLIGHT_FD => {
                let info = parse::<VhostUserInflight>(req, p)?;
                self.check_inflight_geometry(req, &info)?;
                let file = msg.take_single_file().ok_or(RequestError::BadFds {
                    request: req,
                    expected: 1,
                    got: msg.files.len(),
                })?;
                let area = InflightArea::from_file(
                    file,
                    info.mmap_size,
                    info.mmap_offset,
                    info.num_queues,
                    info.queue_size,
                )?;
                self.core.set_inflight(Some(Arc::new(area)));
                Ok(Outcome::Ack)
            }
            #[cfg(feature = "postcopy")]
            FrontendReq::POSTCOPY_ADVISE => {
                self.require_pagefault()?;
                let fd = self.postcopy.advise()?;
                Ok(Outcome::ReplyWithFd(Vec::new(), fd))
            }
            #[cfg(feature = "postcopy")]
            FrontendReq::POSTCOPY_LISTEN => {
                self.require_pagefault()?;
                self.postcopy.listen(&self.regions.host_ranges())?;
                Ok(Outcome::Ack)
            }
            #[cfg(feature = "postcopy")]
            FrontendReq::POSTCOPY_END => {
                self.require_pagefault()?;
                self.postcopy.end()?;
                Ok(u64_reply(0))
            }
            other => Err(RequestError::Unsupported(other.into())),
        }
    }

    fn check_inflight_geometry(
        &self,
        req: FrontendReq,
        info: &VhostUserInflight,
    ) -> Result<(), RequestError> {
        if usize::from(info.num_queues) > self.core.num_queues()
            || info.queue_size > self.core.backend().max_queue_size().max(1024)
        {
            return Err(RequestError::BadPayload {
                request: req,
                len: std::mem::size_of::<VhostUserInflight>(),
            });
        }
        Ok(())
    }

    /// Parse the u64 payload of SET_VRING_KICK/CALL/ERR and its optional fd.
    fn vring_fd(
        &self,
        req: FrontendReq,
        msg: &mut Message,
    ) -> Result<(u32, Option<EventFd>), RequestError> {
        let v = parse::<VhostUserU64>(req, &msg.payload)?.value;
        let index = (v & VRING_IDX_MASK) as u32;
        if index as usize >= self.core.num_queues() || v & !(VRING_IDX_MASK | VRING_NOFD_MASK) != 0
        {
            return Err(RequestError::Core(CoreError::QueueIndex(index)));
        }
        if v & VRING_NOFD_MASK != 0 {
            return Ok((index, None));
        }
        let file = msg.take_single_file().ok_or(RequestError::BadFds {
            request: req,
            expected: 1,
            got: msg.files.len(),
        })?;
        // The peer chose this fd: it may be a full eventfd or a pipe that
        // nobody reads. Non-blocking, a write to it fails with EAGAIN (the
        // notification is dropped, see `Notifier::notify`) instead of
        // wedging the worker, and a read of a kick that is not ready
        // returns instead of blocking. The flag is on the shared open file
        // description; the frontend's eventfds are non-blocking anyway.
        if let Err(e) = super::state_transfer::set_nonblocking(&file) {
            warn!("{req:?}: cannot make the fd non-blocking: {e}");
        }
        Ok((index, Some(file_to_eventfd(file))))
    }

    fn config_request<'p>(
        &self,
        req: FrontendReq,
        p: &'p [u8],
    ) -> Result<(u32, &'p [u8]), RequestError> {
        let hdr_len = std::mem::size_of::<VhostUserConfig>();
        let bad = || RequestError::BadPayload {
            request: req,
            len: p.len(),
        };
        if p.len() < hdr_len {
            return Err(bad());
        }
        let hdr = parse::<VhostUserConfig>(req, &p[..hdr_len])?;
        let data = &p[hdr_len..];
        if hdr.size as usize != data.len()
            || hdr.size > VHOST_USER_CONFIG_SIZE
            || hdr
                .offset
                .checked_add(hdr.size)
                .is_none_or(|end| end > VHOST_USER_CONFIG_SIZE)
        {
            return Err(bad());
        }
        Ok((hdr.offset, data))
    }

    fn get_config(&mut self, req: FrontendReq, p: &[u8]) -> RequestResult {
        let (offset, data) = self.config_request(req, p)?;
        let hdr_len = std::mem::size_of::<VhostUserConfig>();
        let mut reply = p[..hdr_len].to_vec();
        let mut buf = vec![0u8; data.len()];
        self.core.read_config(offset, &mut buf)?;
        reply.extend_from_slice(&buf);
        Ok(Outcome::Reply(reply))
    }
}

fn file_to_eventfd(file: File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` transfers ownership of a valid fd we received;
    // `EventFd` takes it over and closes it on drop. If the fd is not an
    // eventfd, reads and writes on it fail with an error, never UB.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}
