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
    /// The device state could not be captured.
    #[error("device state: {0}")]
    State(String),
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

/// What a successful request sends back.
enum Outcome {
    /// Nothing beyond an optional REPLY_ACK.
    Ack,
    /// An explicit reply payload.
    Reply(Vec<u8>),
    /// An explicit reply payload with a file descriptor.
    ReplyWithFile(Vec<u8>, std::sync::Arc<InflightArea>),
    /// An explicit reply payload with a file descriptor of our own, closed
    /// once sent.
    #[cfg(feature = "postcopy")]
    ReplyWithFd(Vec<u8>, std::os::fd::OwnedFd),
}

type RequestResult = Result<Outcome, RequestError>;

fn parse<T: ByteValued + Default>(request: FrontendReq, payload: &[u8]) -> Result<T, RequestError> {
    let mut value = T::default();
    if payload.len() != std::mem::size_of::<T>() {
        return Err(RequestError::BadPayload {
            request,
            len: payload.len(),
        });
    }
    value.as_mut_slice().copy_from_slice(payload);
    Ok(value)
}

fn u64_reply(v: u64) -> Outcome {
    Outcome::Reply(VhostUserU64::new(v).as_slice().to_vec())
}

/// Whether a request carries an explicit reply (so an error reply is owed).
fn has_reply(req: FrontendReq) -> bool {
    matches!(
        req,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_CONFIG
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::GET_STATUS
            | FrontendReq::GET_INFLIGHT_FD
            | FrontendReq::GET_SHARED_OBJECT
            | FrontendReq::CHECK_DEVICE_STATE
            | FrontendReq::SET_DEVICE_STATE_FD
            | FrontendReq::GET_SHMEM_CONFIG
            | FrontendReq::POSTCOPY_ADVISE
            | FrontendReq::POSTCOPY_END
    )
}

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

    fn set_device_state_fd(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let t = parse::<VhostUserTransferDeviceState>(req, &msg.payload)?;
        let file = msg.take_single_file().ok_or(RequestError::BadFds {
            request: req,
            expected: 1,
            got: msg.files.len(),
        })?;
        // Only the STOPPED phase exists: the rings were stopped with
        // GET_VRING_BASE before this.
        if t.phase != 0 || t.direction > 1 {
            return Err(RequestError::BadPayload {
                request: req,
                len: msg.payload.len(),
            });
        }
        // A transfer still running is cancelled (its thread ends) first.
        self.transfer = None;
        let transfer = if t.direction == 0 {
            let snap = self.core.snapshot(Some(self.acked_protocol))?;
            // The rings were already stopped; a frontend that cancels the
            // migration restarts them with SET_VRING_KICK as usual.
            self.core.resume();
            let bytes =
                crate::snapshot::encode(&snap).map_err(|e| RequestError::State(e.to_string()))?;
            StateTransfer::save(file, bytes)
        } else {
            let cap = crate::snapshot::MAX_PAYLOAD_LEN as u64 + 64;
            StateTransfer::load(file, cap)
        };
        self.transfer = Some(transfer.map_err(|e| RequestError::State(e.to_string()))?);
        // Success, and no fd of our own: the frontend's fd is used.
        Ok(u64_reply(0x100))
    }

    /// Finish the transfer started by SET_DEVICE_STATE_FD; true on success.
    fn check_device_state(&mut self) -> bool {
        let loading = self.transfer.as_ref().is_some_and(StateTransfer::is_load);
        let result = match self.transfer.take() {
            None => Err("no state transfer was started".to_string()),
            Some(t) => t.finish(self.check_grace).map_err(|e| e.to_string()),
        };
        let result = result.and_then(|bytes| {
            if loading {
                self.load_device_state(&bytes)
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => true,
            Err(e) => {
                warn!("device state transfer failed: {e}");
                false
            }
        }
    }

    fn load_device_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let snap = crate::snapshot::decode(bytes).map_err(|e| e.to_string())?;
        let limits = crate::snapshot::SnapshotLimits::for_backend(
            &**self.core.backend(),
            VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
            self.protocol_offered(),
        );
        let valid =
            crate::snapshot::ValidatedSnapshot::new(snap, &limits).map_err(|e| e.to_string())?;
        // The frontend sets up features and rings itself; what travels here
        // is what only the backend knows.
        self.core
            .restore_device_state(&valid)
            .map_err(|e| e.to_string())
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

    fn set_mem_table(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let hdr_len = std::mem::size_of::<VhostUserMemory>();
        let reg_len = std::mem::size_of::<VhostUserMemoryRegion>();
        let p = &msg.payload;
        if p.len() < hdr_len {
            return Err(RequestError::BadPayload {
                request: req,
                len: p.len(),
            });
        }
        let hdr = parse::<VhostUserMemory>(req, &p[..hdr_len])?;
        let n = hdr.num_regions as usize;
        if n == 0 || n > MAX_ATTACHED_FD_ENTRIES || p.len() != hdr_len + n * reg_len {
            return Err(RequestError::BadPayload {
                request: req,
                len: p.len(),
            });
        }
        if msg.files.len() != n {
            return Err(RequestError::BadFds {
                request: req,
                expected: n,
                got: msg.files.len(),
            });
        }
        let regions = (0..n)
            .map(|i| {
                let off = hdr_len + i * reg_len;
                parse::<VhostUserMemoryRegion>(req, &msg.payload[off..off + reg_len])
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The new table replaces the old one: only its own total counts.
        check_memory_limit(regions.iter().map(|r| r.memory_size))?;
        let mut mapped = Vec::with_capacity(n);
        let files = std::mem::take(&mut msg.files);
        for (file, r) in files.into_iter().zip(regions) {
            mapped.push(MappedRegion::map(
                file,
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                self.core.dirty_log(),
            )?);
        }
        #[cfg(feature = "postcopy")]
        if self.postcopy.is_listening() {
            return self.postcopy_mem_table(&msg.payload[..hdr_len], mapped);
        }
        self.install_table(mapped)?;
        Ok(Outcome::Ack)
    }

    /// The sizes of the regions mapped now, including regions a postcopy
    /// frontend has yet to acknowledge.
    fn mapped_sizes(&self) -> impl Iterator<Item = u64> + '_ {
        let sizes = self.regions.sizes();
        #[cfg(feature = "postcopy")]
        let sizes = sizes.chain(self.postcopy.pending_sizes());
        sizes
    }

    /// Make `mapped` the guest memory of the device and of the session.
    fn install_table(&mut self, mapped: Vec<MappedRegion>) -> Result<(), RequestError> {
        let vm_regions = mapped.iter().map(|m| m.region.clone()).collect();
        self.core.set_memory(vm_regions)?;
        self.regions.replace(mapped);
        Ok(())
    }

    /// Add `mapped` to the guest memory of the device and of the session.
    fn install_region(&mut self, mapped: MappedRegion) -> Result<(), RequestError> {
        self.core.add_region(mapped.region.clone())?;
        self.regions.add(mapped);
        Ok(())
    }

    fn add_mem_reg(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let r = parse::<VhostUserSingleMemoryRegion>(req, &msg.payload)?;
        let file = msg.take_single_file().ok_or(RequestError::BadFds {
            request: req,
            expected: 1,
            got: msg.files.len(),
        })?;
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(RequestError::TooManyRegions(self.regions.len() + 1));
        }
        check_memory_limit(self.mapped_sizes().chain(std::iter::once(r.memory_size)))?;
        let mapped = MappedRegion::map(
            file,
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
            self.core.dirty_log(),
        )?;
        #[cfg(feature = "postcopy")]
        if self.postcopy.is_listening() {
            return self.postcopy_add_region(mapped);
        }
        self.install_region(mapped)?;
        Ok(Outcome::Ack)
    }

    fn set_log_base(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let log = parse::<VhostUserLog>(req, &msg.payload)?;
        let file = msg.take_single_file().ok_or(RequestError::BadFds {
            request: req,
            expected: 1,
            got: msg.files.len(),
        })?;
        self.core
            .dirty_log()
            .set_area(&file, log.mmap_size, log.mmap_offset)?;
        // With LOG_SHMFD the frontend waits for this reply. Echo the log
        // description: the `vhost` crate's frontend reads exactly a
        // `VhostUserLog` back (a u64 left it blocked on the missing bytes),
        // and QEMU accepts any payload.
        Ok(Outcome::Reply(log.as_slice().to_vec()))
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

/// Postcopy (`PAGEFAULT`): the memory-table replies and their acks.
impl<B: DeviceBackend> Session<'_, B> {
    /// Whether `req` owes the frontend its mapping addresses: a memory
    /// update (not an ack) while postcopy is listening.
    #[cfg(feature = "postcopy")]
    fn postcopy_region_reply_owed(&self, req: FrontendReq, msg: &Message) -> bool {
        self.postcopy.is_listening()
            && matches!(req, FrontendReq::SET_MEM_TABLE | FrontendReq::ADD_MEM_REG)
            && !self.is_postcopy_ack(req, msg)
    }

    #[cfg(not(feature = "postcopy"))]
    fn postcopy_region_reply_owed(&self, _req: FrontendReq, _msg: &Message) -> bool {
        false
    }

    #[cfg(feature = "postcopy")]
    fn require_pagefault(&self) -> Result<(), RequestError> {
        if self.acked_protocol & VhostUserProtocolFeatures::PAGEFAULT.bits() == 0 {
            return Err(PostcopyError::NotNegotiated.into());
        }
        Ok(())
    }

    /// While listening, the frontend acknowledges the mapping addresses
    /// with the same request, no fds and a u64 status (QEMU) or nothing.
    #[cfg(feature = "postcopy")]
    fn is_postcopy_ack(&self, req: FrontendReq, msg: &Message) -> bool {
        let len = msg.payload.len();
        self.postcopy.is_listening()
            && msg.files.is_empty()
            && match req {
                FrontendReq::SET_MEM_TABLE => len == 0 || len == 8,
                FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG => len == 8,
                _ => false,
            }
    }

    /// The ack: the frontend can now resolve faults on the new mappings, so
    /// the device may use them. A non-zero status drops them.
    #[cfg(feature = "postcopy")]
    fn postcopy_ack(&mut self, req: FrontendReq, msg: &Message) -> RequestResult {
        let status = if msg.payload.len() == 8 {
            parse::<VhostUserU64>(req, &msg.payload)?.value
        } else {
            0
        };
        match self.postcopy.take_pending() {
            None => debug!("{req:?} postcopy ack with nothing pending"),
            Some(_) if status != 0 => {
                warn!("frontend refused the postcopy mappings (status {status}); dropped");
            }
            Some(PendingMemory::Replace(mapped)) => self.install_table(mapped)?,
            Some(PendingMemory::Add(list)) => {
                for mapped in list {
                    self.install_region(mapped)?;
                }
            }
        }
        Ok(Outcome::Ack)
    }

    /// SET_MEM_TABLE while listening: register the new mappings, park them
    /// until the ack, and reply with the request's table where each user
    /// address is replaced by where this process mapped the region.
    #[cfg(feature = "postcopy")]
    fn postcopy_mem_table(&mut self, header: &[u8], mapped: Vec<MappedRegion>) -> RequestResult {
        let mut reply = header.to_vec();
        for m in &mapped {
            self.postcopy.register(m)?;
            let r = VhostUserMemoryRegion::new(m.gpa, m.size, m.host_addr(), m.mmap_offset);
            reply.extend_from_slice(r.as_slice());
        }
        self.postcopy.set_pending(PendingMemory::Replace(mapped));
        Ok(Outcome::Reply(reply))
    }

    /// ADD_MEM_REG while listening: the same, for one region.
    #[cfg(feature = "postcopy")]
    fn postcopy_add_region(&mut self, mapped: MappedRegion) -> RequestResult {
        self.postcopy.register(&mapped)?;
        let reply = VhostUserSingleMemoryRegion::new(
            mapped.gpa,
            mapped.size,
            mapped.host_addr(),
            mapped.mmap_offset,
        );
        self.postcopy.add_pending(mapped);
        Ok(Outcome::Reply(reply.as_slice().to_vec()))
    }
}

/// Refuse region sizes adding up to more than [`MAX_GUEST_MEMORY`].
fn check_memory_limit(sizes: impl Iterator<Item = u64>) -> Result<(), RequestError> {
    let requested = sizes.fold(0u64, u64::saturating_add);
    if requested > MAX_GUEST_MEMORY {
        return Err(RequestError::TooMuchMemory {
            requested,
            limit: MAX_GUEST_MEMORY,
        });
    }
    Ok(())
}

fn file_to_eventfd(file: File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` transfers ownership of a valid fd we received;
    // `EventFd` takes it over and closes it on drop. If the fd is not an
    // eventfd, reads and writes on it fail with an error, never UB.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}
