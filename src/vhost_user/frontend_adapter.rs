// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM side of vhost-user: a device whose data plane runs in another
//! process, driven through the same [`DeviceControl`] trait as an
//! in-process [`DeviceCore`](crate::core::DeviceCore).
//!
//! [`VhostUserFrontendDevice`] connects to a vhost-user backend (this kit's
//! own daemon, QEMU's `vhost-user-blk`, any other) and translates what the
//! transport learned from the driver into vhost-user messages:
//!
//! - [`VhostUserFrontendDevice::connect`] sends `SET_OWNER`, `GET_FEATURES`,
//!   `GET_PROTOCOL_FEATURES`/`SET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`,
//!   `SET_BACKEND_REQ_FD` and `GET_CONFIG` (cached);
//! - [`DeviceControl::activate`] sends `SET_FEATURES`, `SET_MEM_TABLE`, then
//!   per queue `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`,
//!   `SET_VRING_CALL`, `SET_VRING_KICK`, `SET_VRING_ENABLE`;
//! - [`DeviceControl::reset`] sends `GET_VRING_BASE` per started queue, then
//!   `RESET_DEVICE` when the backend supports it;
//! - [`DeviceControl::write_config`] sends `SET_CONFIG`.
//!
//! # Kicks go straight through, calls take one hop
//!
//! The queue's kick eventfd (the one KVM's ioeventfd signals on a write to
//! QueueNotify) is handed to the backend as is: a guest notification wakes
//! the backend with no exit to the VMM's user space.
//!
//! Calls cannot be handed over the same way on virtio-mmio. Before the
//! interrupt is injected the transport's `InterruptStatus` register must
//! have its "used buffer" bit set, or the guest's interrupt handler reads 0,
//! finds nothing to do and the completion is lost. That bit lives in this
//! process; an external backend can only write an eventfd. So each queue
//! gets a fresh call eventfd for the backend, and one relay thread per
//! device waits on all of them and, for each wake-up, calls the queue's
//! [`Notifier`] (sets the status bit, writes the irqfd). With MSI-X on
//! virtio-pci there is no status register to update and the irqfd itself
//! could be given to the backend; virtio-mmio pays one thread hop.
//!
//! The same thread also serves the backend request channel (config-change
//! notices, which mark the cached config stale and call the transport's
//! [`ConfigNotifier`]), watches the socket for the backend hanging up, and
//! enforces the request timeout: a backend that does not answer a request in
//! time gets its socket shut down, so the waiting call fails instead of
//! hanging the VMM's vCPU thread.
//!
//! # Failure model
//!
//! Nothing the backend sends is trusted: every reply is checked, a
//! disconnect or a refusal surfaces as [`ControlError::External`] (wrapping
//! a [`FrontendError`]), never a panic. After a disconnect the device stays
//! broken; the VMM decides whether to reconnect (build a new device) or to
//! report `DEVICE_NEEDS_RESET` to the guest.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    BackendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::ConfigNotifier;
use crate::core::{Activation, ControlError, DeviceControl, QueueActivation};
use crate::memory::GuestMemoryLog;
use crate::snapshot::{DeviceSnapshot, SnapshotLimits, ValidatedSnapshot, VringSnapshot};
use crate::vring::Notifier;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user-only feature bit.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL`: a vhost-only feature bit (dirty logging).
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Size of the virtio-blk config space as the kit's block device and
/// Linux (without the secure-erase and zoned fields) lay it out.
pub const VIRTIO_BLK_CONFIG_SIZE: u32 = 60;

/// Virtio device IDs with a config size [`FrontendOptions::new`] knows.
const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_VSOCK: u32 = 19;
const VIRTIO_ID_FS: u32 = 26;

/// Protocol features the adapter can make use of; it acks the subset the
/// backend offers. `STATUS` is left out (the transport does not pass the
/// device status on), and so is `CONFIGURE_MEM_SLOTS` (memory is set in one
/// `SET_MEM_TABLE` per activation).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// Regions one `SET_MEM_TABLE` may carry by the vhost-user spec.
const MAX_MEM_TABLE_REGIONS: usize = 8;
/// Largest backend request payload the relay accepts.
const MAX_BACKEND_REQ_PAYLOAD: usize = 4096;
/// Size of a vhost-user message header.
const HEADER_LEN: usize = 12;

/// Errors of the vhost-user frontend adapter. Transport-facing operations
/// wrap them in [`ControlError::External`].
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The socket did not accept a connection in time.
    #[error("cannot connect to {path} within {timeout:?}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// How long we tried.
        timeout: Duration,
        /// The last OS error.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed (refused, disconnected, timed out or
    /// answered with an invalid reply).
    #[error("vhost-user {request} failed")]
    Request {
        /// The request.
        request: &'static str,
        /// What the `vhost` crate reported.
        #[source]
        source: vhost::Error,
    },
    /// The backend offers no queue.
    #[error("the backend offers no queues")]
    NoQueues,
    /// The backend serves a different kind of device.
    #[error("the backend serves virtio device type {found}, not {expected}")]
    WrongDevice {
        /// The type the VMM asked for.
        expected: u32,
        /// The type the backend's state names.
        found: u32,
    },
    /// The operation needs a protocol feature the backend did not offer.
    #[error("the backend does not support {0}")]
    Unsupported(&'static str),
    /// The backend hung up (or was cut off after a request timeout).
    #[error("the backend is disconnected")]
    Disconnected,
    /// The relay thread or one of its eventfds could not be set up.
    #[error("cannot set up the interrupt relay")]
    Relay(#[source] std::io::Error),
    /// The device's own state could not be moved through DEVICE_STATE.
    #[error("device state transfer failed")]
    StateTransfer(#[from] super::adapter_state::StateTransferError),
    /// The backend's device state is not a snapshot in the kit's format.
    #[error("the backend's device state is not in the kit's snapshot format")]
    StateFormat(#[source] crate::snapshot::SnapshotError),
    /// The device keeps state of its own, but the backend cannot save it.
    #[error(
        "the device keeps state of its own, but the vhost-user backend does not offer \
         DEVICE_STATE to save it: a snapshot would lose it"
    )]
    StateNotSaved,
    /// A snapshot holds device state for a backend that cannot take it.
    #[error(
        "the snapshot holds {len} bytes of device state, but the vhost-user backend \
         does not offer DEVICE_STATE to load them"
    )]
    StateUnsupported {
        /// Bytes of device state in the snapshot.
        len: usize,
    },
}

impl From<FrontendError> for ControlError {
    fn from(e: FrontendError) -> Self {
        ControlError::External(Box::new(e))
    }
}

/// What the caller knows about the device that vhost-user cannot tell.
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Virtio device ID (vhost-user has no message to ask for it).
    pub device_type: u32,
    /// Queues the VMM wants; lowered to what the backend supports.
    pub num_queues: usize,
    /// Largest queue size the transport offers the driver.
    pub max_queue_size: u16,
    /// Bytes of config space to fetch with `GET_CONFIG` (0: none).
    pub config_size: u32,
    /// How long [`VhostUserFrontendDevice::connect`] waits for the socket
    /// to appear and accept.
    pub connect_timeout: Duration,
    /// How long one request may wait for its reply before the connection is
    /// cut (`None`: wait forever).
    pub request_timeout: Option<Duration>,
    /// The device keeps state of its own (a console's pending bytes): a
    /// snapshot of a backend without DEVICE_STATE then fails instead of
    /// silently dropping that state. vhost-user cannot tell this; the VMM
    /// knows what kind of device it attaches.
    pub stateful: bool,
}

impl FrontendOptions {
    /// Options for a device of type `device_type`, with the config size of
    /// the well-known types (block, net, vsock, fs; others 0), a 5 s
    /// connect timeout and a 10 s request timeout.
    ///
    /// A config size of 0 is learned from the backend where it can tell:
    /// a backend on this kit offers DEVICE_STATE, and its (stopped, fresh)
    /// state names the device type, its queues and its config space.
    pub fn new(device_type: u32, num_queues: usize, max_queue_size: u16) -> Self {
        let config_size = match device_type {
            VIRTIO_ID_BLOCK => VIRTIO_BLK_CONFIG_SIZE,
            VIRTIO_ID_NET => 12,
            VIRTIO_ID_VSOCK => 8,
            VIRTIO_ID_FS => 40,
            _ => 0,
        };
        FrontendOptions {
            device_type,
            num_queues,
            max_queue_size,
            config_size,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(10)),
            stateful: false,
        }
    }
}

/// The cached config space.
#[derive(Debug, Default)]
struct ConfigCache {
    bytes: Vec<u8>,
    /// A config-change notice arrived since the last `GET_CONFIG`.
    stale: bool,
}

/// A backend call (or err) eventfd and where its wake-ups go.
struct RelayedCall {
    backend_call: EventFd,
    notifier: Notifier,
    /// Wake-ups read from `backend_call` (each may stand for several calls).
    received: u64,
    /// Interrupts passed on to the notifier.
    relayed: u64,
    /// Reads or notifications that failed.
    errors: u64,
}

/// State shared by the control side and the relay thread.
struct Shared {
    epoll: Epoll,
    /// Indexed by queue (= epoll token).
    calls: Mutex<Vec<Option<RelayedCall>>>,
    /// The queues' err eventfds, indexed by queue (epoll token
    /// [`TOKEN_ERR_BASE`] + queue): a backend that gives up on a queue
    /// signals it, and the transport marks the device DEVICE_NEEDS_RESET.
    errs: Mutex<Vec<Option<RelayedCall>>>,
    config: Mutex<ConfigCache>,
    config_notifier: Mutex<Option<ConfigNotifier>>,
    /// When the request in flight must have been answered.
    deadline: Mutex<Option<Instant>>,
    /// Wakes the relay to re-read `deadline`.
    wake: EventFd,
    exit: EventFd,
    connected: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const TOKEN_EXIT: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;
const TOKEN_BACKEND_REQ: u64 = u64::MAX - 2;
const TOKEN_HANGUP: u64 = u64::MAX - 3;
/// Err eventfds are watched with this plus the queue index as token.
const TOKEN_ERR_BASE: u64 = 1 << 32;

/// Arms the request timeout for as long as it lives.
struct RequestGuard<'a> {
    shared: &'a Shared,
}

impl<'a> RequestGuard<'a> {
    fn arm(shared: &'a Shared, timeout: Option<Duration>) -> Self {
        if let Some(t) = timeout {
            *lock(&shared.deadline) = Some(Instant::now() + t);
            let _ = shared.wake.write(1);
        }
        RequestGuard { shared }
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        // The relay sees `None` at its next wake-up; no need to wake it.
        *lock(&self.shared.deadline) = None;
    }
}

/// The relay thread's own state.
struct Relay {
    shared: Arc<Shared>,
    /// A duplicate of the main socket: watched for hang-up, shut down on a
    /// request timeout.
    main_sock: UnixStream,
    backend_req: Option<BackendRequests>,
}

impl Relay {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let timeout_ms = self.timeout_ms();
            let n = match self.shared.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("vhost-user relay: epoll_wait failed: {e}; interrupts stop");
                    return;
                }
            };
            self.check_deadline();
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_WAKE => {
                        let _ = self.shared.wake.read();
                    }
                    TOKEN_HANGUP => self.hung_up(),
                    TOKEN_BACKEND_REQ => self.backend_request(),
                    token if token >= TOKEN_ERR_BASE => {
                        let queue = (token - TOKEN_ERR_BASE) as usize;
                        self.relay(&self.shared.errs, queue, "err");
                    }
                    queue => self.relay(&self.shared.calls, queue as usize, "call"),
                }
            }
        }
    }

    /// Milliseconds until the armed request deadline (-1: none).
    fn timeout_ms(&self) -> i32 {
        match *lock(&self.shared.deadline) {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline.
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
        }
    }

    fn check_deadline(&self) {
        let expired = lock(&self.shared.deadline).is_some_and(|d| Instant::now() >= d);
        if expired && self.shared.connected.swap(false, Ordering::SeqCst) {
            error!("vhost-user backend did not answer in time; disconnecting");
            // Shutting the socket down makes the blocked request read EOF
            // and fail with an error.
            let _ = self.main_sock.shutdown(std::net::Shutdown::Both);
        }
    }

    fn hung_up(&self) {
        if self.shared.connected.swap(false, Ordering::SeqCst) {
            warn!("vhost-user backend hung up");
        }
        // Level-triggered and permanent: stop watching.
        let _ = self.shared.epoll.ctl(
            ControlOperation::Delete,
            self.main_sock.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    fn relay(&self, list: &Mutex<Vec<Option<RelayedCall>>>, queue: usize, what: &str) {
        let mut calls = lock(list);
        let Some(Some(call)) = calls.get_mut(queue) else {
            return;
        };
        match call.backend_call.read() {
            Ok(_) => {
                call.received += 1;
                match call.notifier.notify() {
                    Ok(()) => call.relayed += 1,
                    Err(e) => {
                        call.errors += 1;
                        warn!("queue {queue}: cannot pass on the {what} notification: {e}");
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                call.errors += 1;
                warn!("queue {queue}: cannot read the {what} eventfd: {e}");
            }
        }
    }

    fn backend_request(&mut self) {
        let Some(chan) = self.backend_req.as_mut() else {
            return;
        };
        if let Err(why) = chan.serve(&self.shared) {
            info!("vhost-user backend request channel closed: {why}");
            let _ = self.shared.epoll.ctl(
                ControlOperation::Delete,
                chan.sock.as_raw_fd(),
                EpollEvent::default(),
            );
            self.backend_req = None;
        }
    }
}

/// Our end of the backend request channel (`SET_BACKEND_REQ_FD`).
///
/// Served by hand rather than with the `vhost` crate's handler: it must not
/// block the relay on a half-sent message, and it accepts a
/// `CONFIG_CHANGE_MSG` whatever payload the backend attaches (the spec
/// gives it none; some backends, this kit's daemon included, send an empty
/// `VhostUserConfig`).
struct BackendRequests {
    sock: UnixStream,
    buf: Vec<u8>,
}

impl BackendRequests {
    /// Read what is available and handle every complete message.
    fn serve(&mut self, shared: &Shared) -> Result<(), &'static str> {
        let mut chunk = [0u8; 1024];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err("end of file"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err("read error"),
            }
        }
        while self.buf.len() >= HEADER_LEN {
            let word = |i: usize| {
                let mut w = [0u8; 4];
                w.copy_from_slice(&self.buf[i..i + 4]);
                u32::from_le_bytes(w)
            };
            let (request, flags, size) = (word(0), word(4), word(8) as usize);
            if size > MAX_BACKEND_REQ_PAYLOAD {
                return Err("oversized message");
            }
            if self.buf.len() < HEADER_LEN + size {
                break;
            }
            self.buf.drain(..HEADER_LEN + size);
            let ok = self.handle(request, shared);
            if flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 {
                self.reply(request, if ok { 0 } else { 1 })?;
            }
        }
        Ok(())
    }

    fn handle(&self, request: u32, shared: &Shared) -> bool {
        if request != u32::from(BackendReq::CONFIG_CHANGE_MSG) {
            warn!("vhost-user backend request {request} not supported");
            return false;
        }
        debug!("vhost-user backend: config changed");
        lock(&shared.config).stale = true;
        let notifier = lock(&shared.config_notifier).clone();
        if let Some(n) = notifier {
            n.notify();
        }
        true
    }

    fn reply(&mut self, request: u32, value: u64) -> Result<(), &'static str> {
        let flags = 0x1 | VhostUserHeaderFlag::REPLY.bits();
        let mut msg = Vec::with_capacity(HEADER_LEN + 8);
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&value.to_le_bytes());
        // A 20-byte write to a socket nobody else writes to does not block
        // in practice; if it would, the backend is not reading its replies.
        self.sock.write_all(&msg).map_err(|_| "cannot send a reply")
    }
}

/// A freshly started relay thread.
struct RelayStart {
    shared: Arc<Shared>,
    handle: JoinHandle<()>,
    /// The backend's end of the backend request channel.
    backend_req: UnixStream,
}

/// What an activation set up, undone by reset.
struct ActiveState {
    /// Queues the backend was told to start.
    started: Vec<u16>,
    /// The driver's features and queue layout, for snapshots.
    features: u64,
    layout: Vec<(u16, u16, u64, u64, u64)>,
    /// Kept so the addresses given to the backend stay mapped.
    _memory: GuestMemoryLog,
    /// Kept so the kick eventfds live as long as the activation.
    _kicks: Vec<EventFd>,
}

/// A virtio device implemented by an external vhost-user backend, driven
/// by an in-process transport through [`DeviceControl`].
pub struct VhostUserFrontendDevice {
    frontend: Frontend,
    shared: Arc<Shared>,
    relay: Option<JoinHandle<()>>,
    device_type: u32,
    num_queues: usize,
    max_queue_size: u16,
    config_size: u32,
    request_timeout: Option<Duration>,
    stateful: bool,
    /// Features from `GET_FEATURES`, vhost-user bits included.
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    active: Option<ActiveState>,
}

impl std::fmt::Debug for VhostUserFrontendDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFrontendDevice")
            .field("device_type", &self.device_type)
            .field("num_queues", &self.num_queues)
            .field("backend_features", &self.backend_features)
            .field("protocol", &self.protocol)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream, FrontendError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(FrontendError::Connect {
                    path: path.to_owned(),
                    timeout,
                    source,
                })
            }
        }
    }
}

impl VhostUserFrontendDevice {
    /// Connect to the backend listening on `socket_path` (retrying until it
    /// appears or `options.connect_timeout` passes) and negotiate: owner,
    /// features, protocol features, queue count, backend request channel,
    /// config space.
    pub fn connect(
        socket_path: impl AsRef<Path>,
        options: FrontendOptions,
    ) -> Result<Self, FrontendError> {
        let path = socket_path.as_ref();
        let sock = connect_socket(path, options.connect_timeout)?;
        info!("connected to vhost-user backend at {}", path.display());
        Self::from_stream(sock, options)
    }

    /// Negotiate with a backend over an already connected socket.
    pub fn from_stream(sock: UnixStream, options: FrontendOptions) -> Result<Self, FrontendError> {
        if options.num_queues == 0 {
            return Err(FrontendError::NoQueues);
        }
        let relay = Self::start_relay(&sock)?;
        let mut dev = VhostUserFrontendDevice {
            frontend: Frontend::from_stream(sock, options.num_queues as u64),
            shared: relay.shared,
            relay: Some(relay.handle),
            device_type: options.device_type,
            num_queues: options.num_queues,
            max_queue_size: options.max_queue_size,
            config_size: options.config_size,
            request_timeout: options.request_timeout,
            stateful: options.stateful,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            active: None,
        };
        dev.handshake(relay.backend_req)?;
        Ok(dev)
    }

    /// Create the relay thread; returns it and the frontend end of a
    /// backend request channel (sent if the backend supports one).
    fn start_relay(sock: &UnixStream) -> Result<RelayStart, FrontendError> {
        let io = FrontendError::Relay;
        let shared = Arc::new(Shared {
            epoll: Epoll::new().map_err(io)?,
            calls: Mutex::new(Vec::new()),
            errs: Mutex::new(Vec::new()),
            config: Mutex::new(ConfigCache::default()),
            config_notifier: Mutex::new(None),
            deadline: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK).map_err(io)?,
            exit: EventFd::new(EFD_NONBLOCK).map_err(io)?,
            connected: AtomicBool::new(true),
        });
        let main_sock = sock.try_clone().map_err(io)?;
        let (ours, theirs) = UnixStream::pair().map_err(io)?;
        ours.set_nonblocking(true).map_err(io)?;
        let ep = &shared.epoll;
        let add = |fd, events, token| {
            ep.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(io)
        };
        add(shared.exit.as_raw_fd(), EventSet::IN, TOKEN_EXIT)?;
        add(shared.wake.as_raw_fd(), EventSet::IN, TOKEN_WAKE)?;
        add(main_sock.as_raw_fd(), EventSet::READ_HANG_UP, TOKEN_HANGUP)?;
        add(ours.as_raw_fd(), EventSet::IN, TOKEN_BACKEND_REQ)?;
        let relay = Relay {
            shared: shared.clone(),
            main_sock,
            backend_req: Some(BackendRequests {
                sock: ours,
                buf: Vec::new(),
            }),
        };
        let handle = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || relay.run())
            .map_err(io)?;
        Ok(RelayStart {
            shared,
            handle,
            backend_req: theirs,
        })
    }

    fn handshake(&mut self, backend_req: UnixStream) -> Result<(), FrontendError> {
        self.request("SET_OWNER", |fe| fe.set_owner())?;
        self.backend_features = self.request("GET_FEATURES", |fe| fe.get_features())?;
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = self.request("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let acked = offered & wanted_protocol_features();
            self.request("SET_PROTOCOL_FEATURES", |fe| {
                fe.set_protocol_features(acked)
            })?;
            self.protocol = acked;
            debug!("vhost-user protocol features: {acked:?}");
        }
        if self.has(VhostUserProtocolFeatures::MQ) {
            let n = self.request("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n == 0 {
                return Err(FrontendError::NoQueues);
            }
            self.num_queues = self.num_queues.min(n);
        }
        if self.has(VhostUserProtocolFeatures::BACKEND_REQ) {
            self.request("SET_BACKEND_REQ_FD", |fe| {
                fe.set_backend_request_fd(&backend_req)
            })?;
        }
        // Without the channel our end reads EOF and the relay forgets it.
        drop(backend_req);
        if self.has(VhostUserProtocolFeatures::DEVICE_STATE) {
            self.learn_identity()?;
        }
        self.refresh_config()?;
        Ok(())
    }

    /// What a kit backend's state tells about its device, before anything
    /// runs: its type must be the one asked for, its queue count bounds
    /// ours, and its config size is used when the caller gave none. A
    /// backend whose state is not in the kit's format tells nothing.
    fn learn_identity(&mut self) -> Result<(), FrontendError> {
        let snap = match self.backend_snapshot() {
            Ok(snap) => snap,
            Err(e) => {
                debug!("vhost-user backend identity not learned: {e}");
                return Ok(());
            }
        };
        if snap.device_type != self.device_type {
            return Err(FrontendError::WrongDevice {
                expected: self.device_type,
                found: snap.device_type,
            });
        }
        if !snap.queues.is_empty() {
            self.num_queues = self.num_queues.min(snap.queues.len());
        }
        if self.config_size == 0 {
            self.config_size = u32::try_from(snap.config.len()).unwrap_or(0);
            debug!(
                "vhost-user backend config space: {} bytes",
                self.config_size
            );
        }
        Ok(())
    }

    fn has(&self, feature: VhostUserProtocolFeatures) -> bool {
        self.protocol.contains(feature)
    }

    /// Run one request with the request timeout armed, asking for a
    /// REPLY_ACK when negotiated so that refusals are seen right away.
    fn request<T>(
        &self,
        request: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        if !self.shared.connected.load(Ordering::SeqCst) {
            return Err(FrontendError::Disconnected);
        }
        let mut fe = self.frontend.clone();
        let _armed = RequestGuard::arm(&self.shared, self.request_timeout);
        // `Frontend` only waits for the ack of requests without an explicit
        // reply; requests with one ignore the flag.
        if self.has(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let result = f(&mut fe);
        fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        result.map_err(|source| {
            warn!("vhost-user {request} failed: {source}");
            FrontendError::Request { request, source }
        })
    }

    /// Fetch the config space with `GET_CONFIG` into the cache.
    fn refresh_config(&self) -> Result<(), FrontendError> {
        if self.config_size == 0 || !self.has(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        let size = self.config_size;
        let buf = vec![0u8; size as usize];
        // Cleared before asking, so a notice that arrives meanwhile is not
        // lost: it marks the copy stale again.
        lock(&self.shared.config).stale = false;
        let reply = self.request("GET_CONFIG", |fe| {
            fe.get_config(0, size, VhostUserConfigFlags::empty(), &buf)
        });
        let mut cache = lock(&self.shared.config);
        match reply {
            Ok((_, bytes)) => {
                cache.bytes = bytes;
                Ok(())
            }
            Err(e) => {
                cache.stale = true;
                Err(e)
            }
        }
    }

    /// Whether the backend is still connected (false once it hung up or
    /// missed a request deadline).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// The protocol features both sides agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Whether the device is activated.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The memory table entries for `memory`; every region must be backed
    /// by a file the backend can map.
    fn memory_table(
        memory: &GuestMemoryLog,
    ) -> Result<Vec<VhostUserMemoryRegionInfo>, ControlError> {
        let regions: Vec<_> = memory
            .iter()
            .map(|r| {
                let file = r
                    .file_offset()
                    .ok_or(ControlError::Invalid("guest memory region without a file"))?;
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().raw_value(),
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: file.start(),
                    mmap_handle: file.file().as_raw_fd(),
                })
            })
            .collect::<Result<_, ControlError>>()?;
        if regions.is_empty() {
            return Err(ControlError::Invalid("no guest memory"));
        }
        if regions.len() > MAX_MEM_TABLE_REGIONS {
            return Err(ControlError::Invalid("more than 8 guest memory regions"));
        }
        Ok(regions)
    }

    /// The VMM's address of `len` bytes at `gpa`, which must lie in one
    /// region (vhost-user ring addresses are frontend virtual addresses).
    fn host_address(memory: &GuestMemoryLog, gpa: u64, len: u64) -> Option<u64> {
        let region = memory.find_region(GuestAddress(gpa))?;
        let offset = gpa - region.start_addr().raw_value();
        if offset.checked_add(len)? > region.len() {
            return None;
        }
        memory
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    fn check_queue(&self, q: &QueueActivation) -> Result<(), ControlError> {
        if usize::from(q.index) >= self.num_queues {
            return Err(ControlError::Invalid(
                "queue index beyond the device's queues",
            ));
        }
        if q.size == 0 || !q.size.is_power_of_two() || q.size > self.max_queue_size {
            return Err(ControlError::Invalid("queue size"));
        }
        Ok(())
    }

    fn start_queue(
        &mut self,
        memory: &GuestMemoryLog,
        q: QueueActivation,
        base: u16,
    ) -> Result<EventFd, ControlError> {
        self.check_queue(&q)?;
        let size = u64::from(q.size);
        let ring = |gpa, len, what| {
            Self::host_address(memory, gpa, len).ok_or(ControlError::Invalid(what))
        };
        let config = VringConfigData {
            queue_max_size: self.max_queue_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: ring(q.desc_table, 16 * size, "descriptor table outside memory")?,
            avail_ring_addr: ring(q.avail_ring, 6 + 2 * size, "available ring outside memory")?,
            used_ring_addr: ring(q.used_ring, 6 + 8 * size, "used ring outside memory")?,
            log_addr: None,
        };
        let index = usize::from(q.index);
        let backend_call = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::Relay)?;
        let backend_err = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::Relay)?;

        self.request("SET_VRING_NUM", |fe| fe.set_vring_num(index, q.size))?;
        self.request("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &config))?;
        self.request("SET_VRING_BASE", |fe| fe.set_vring_base(index, base))?;
        self.request("SET_VRING_CALL", |fe| {
            fe.set_vring_call(index, &backend_call)
        })?;
        self.relay_calls(index, backend_call, q.call)?;
        self.request("SET_VRING_ERR", |fe| fe.set_vring_err(index, &backend_err))?;
        self.relay_to(&self.shared.errs, TOKEN_ERR_BASE, index, backend_err, q.err)?;
        self.request("SET_VRING_KICK", |fe| fe.set_vring_kick(index, &q.kick))?;
        if let Some(active) = self.active.as_mut() {
            active.started.push(q.index);
            active
                .layout
                .push((q.index, q.size, q.desc_table, q.avail_ring, q.used_ring));
        }
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            self.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, true))?;
        }
        Ok(q.kick)
    }

    /// Route wake-ups of `backend_call` to `notifier`.
    fn relay_calls(
        &self,
        index: usize,
        backend_call: EventFd,
        notifier: Notifier,
    ) -> Result<(), FrontendError> {
        self.relay_to(&self.shared.calls, 0, index, backend_call, notifier)
    }

    /// Route wake-ups of `backend_fd` to `notifier`, as entry `index` of
    /// `list` watched with epoll token `token_base + index`.
    fn relay_to(
        &self,
        list: &Mutex<Vec<Option<RelayedCall>>>,
        token_base: u64,
        index: usize,
        backend_call: EventFd,
        notifier: Notifier,
    ) -> Result<(), FrontendError> {
        let mut calls = lock(list);
        if calls.len() <= index {
            calls.resize_with(index + 1, || None);
        }
        self.shared
            .epoll
            .ctl(
                ControlOperation::Add,
                backend_call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token_base + index as u64),
            )
            .map_err(FrontendError::Relay)?;
        calls[index] = Some(RelayedCall {
            backend_call,
            notifier,
            received: 0,
            relayed: 0,
            errors: 0,
        });
        Ok(())
    }

    /// Stop relaying calls and errs of every queue.
    fn clear_calls(&self) {
        for list in [&self.shared.calls, &self.shared.errs] {
            for call in lock(list).drain(..).flatten() {
                let _ = self.shared.epoll.ctl(
                    ControlOperation::Delete,
                    call.backend_call.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// How long a DEVICE_STATE transfer may take.
    fn state_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or(Duration::from_secs(30))
    }

    /// The stopped backend's own state (DEVICE_STATE save): the kit's
    /// snapshot envelope from the backend, of which the device's bytes are
    /// kept (rings and features come from the transport).
    fn save_backend_state(&self) -> Result<Vec<u8>, FrontendError> {
        Ok(self.backend_snapshot()?.device_state)
    }

    /// The stopped backend's snapshot, through DEVICE_STATE.
    fn backend_snapshot(&self) -> Result<DeviceSnapshot, FrontendError> {
        use super::adapter_state::{pipe, read_all};
        let (ours, theirs) = pipe()?;
        let own = self.request("SET_DEVICE_STATE_FD", |fe| {
            fe.set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(theirs),
            )
        })?;
        // A backend may hand back an fd of its own to read from instead.
        let bytes = read_all(own.unwrap_or(ours), self.state_timeout())?;
        self.request("CHECK_DEVICE_STATE", |fe| fe.check_device_state())?;
        crate::snapshot::decode(&bytes).map_err(FrontendError::StateFormat)
    }

    /// Load `snap`'s device state into the stopped backend (DEVICE_STATE
    /// load), in the kit's snapshot envelope.
    fn load_backend_state(&self, snap: &DeviceSnapshot) -> Result<(), FrontendError> {
        use super::adapter_state::{pipe, write_all};
        let bytes = crate::snapshot::encode(snap).map_err(FrontendError::StateFormat)?;
        let (theirs, ours) = pipe()?;
        let own = self.request("SET_DEVICE_STATE_FD", |fe| {
            fe.set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(theirs),
            )
        })?;
        write_all(own.unwrap_or(ours), &bytes, self.state_timeout())?;
        self.request("CHECK_DEVICE_STATE", |fe| fe.check_device_state())?;
        Ok(())
    }

    fn do_activate(&mut self, activation: Activation, bases: &[u16]) -> Result<(), ControlError> {
        let offered = self.device_features();
        if activation.features & !offered != 0 {
            return Err(ControlError::Invalid("driver features outside the offer"));
        }
        for q in &activation.queues {
            self.check_queue(q)?;
        }
        let regions = Self::memory_table(&activation.memory)?;
        let mut features = activation.features;
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.request("SET_FEATURES", |fe| fe.set_features(features))?;
        self.request("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))?;
        let memory = activation.memory.clone();
        self.active = Some(ActiveState {
            started: Vec::new(),
            features: activation.features,
            layout: Vec::new(),
            _memory: activation.memory,
            _kicks: Vec::new(),
        });
        for q in activation.queues {
            let base = bases.get(usize::from(q.index)).copied().unwrap_or(0);
            let kick = self.start_queue(&memory, q, base)?;
            if let Some(active) = self.active.as_mut() {
                active._kicks.push(kick);
            }
        }
        Ok(())
    }

    fn do_reset(&mut self) -> Result<(), FrontendError> {
        let mut first_error = None;
        if let Some(active) = self.active.take() {
            for q in active.started {
                let index = usize::from(q);
                match self.request("GET_VRING_BASE", |fe| fe.get_vring_base(index)) {
                    Ok(base) => debug!("queue {q} stopped at {base}"),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        self.clear_calls();
        if first_error.is_none() && self.has(VhostUserProtocolFeatures::RESET_DEVICE) {
            if let Err(e) = self.request("RESET_DEVICE", |fe| fe.reset_device()) {
                first_error = Some(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl ActiveState {
    fn memory_ref(&self) -> &GuestMemoryLog {
        &self._memory
    }
}

impl DeviceControl for VhostUserFrontendDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn diagnostics(&self) -> Option<String> {
        let connected = self.shared.connected.load(Ordering::SeqCst);
        let relay = match self.shared.calls.try_lock() {
            Ok(calls) => calls
                .iter()
                .enumerate()
                .filter_map(|(q, c)| c.as_ref().map(|c| (q, c)))
                .map(|(q, c)| {
                    format!(
                        " q{q}: calls={} relayed={} errors={}",
                        c.received, c.relayed, c.errors
                    )
                })
                .collect::<String>(),
            Err(_) => " relay busy (its lock is held)".to_string(),
        };
        Some(format!("vhost-user connected={connected}{relay}"))
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn device_features(&self) -> u64 {
        self.backend_features & !(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        if lock(&self.shared.config).stale && self.is_connected() {
            if let Err(e) = self.refresh_config() {
                warn!("cannot re-read the config space: {e}");
            }
        }
        let cache = lock(&self.shared.config);
        let start = offset as usize;
        if start < cache.bytes.len() {
            let n = data.len().min(cache.bytes.len() - start);
            data[..n].copy_from_slice(&cache.bytes[start..start + n]);
        }
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ControlError> {
        if !self.has(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::Unsupported("config space access (CONFIG)").into());
        }
        self.request("SET_CONFIG", |fe| {
            fe.set_config(offset, VhostUserConfigFlags::empty(), data)
        })?;
        let mut cache = lock(&self.shared.config);
        let start = offset as usize;
        if let Some(dst) = cache.bytes.get_mut(start..start.saturating_add(data.len())) {
            dst.copy_from_slice(data);
        } else {
            // Outside what we cache: ask again next time.
            cache.stale = true;
        }
        Ok(())
    }

    fn set_config_notifier(&mut self, notifier: ConfigNotifier) {
        *lock(&self.shared.config_notifier) = Some(notifier);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ControlError> {
        if self.active.is_some() {
            self.do_reset()?;
        }
        let result = self.do_activate(activation, &[]);
        if result.is_err() {
            // Leave nothing half started; the activation error is the one
            // worth reporting.
            if let Err(e) = self.do_reset() {
                debug!("cleanup after a failed activation: {e}");
            }
        }
        result
    }

    fn reset(&mut self) -> Result<(), ControlError> {
        Ok(self.do_reset()?)
    }

    fn snapshot(&mut self) -> Result<DeviceSnapshot, ControlError> {
        if self.stateful && !self.has(VhostUserProtocolFeatures::DEVICE_STATE) {
            // Refused before anything stops: the device keeps running.
            return Err(FrontendError::StateNotSaved.into());
        }
        let active = self.active.take().ok_or(ControlError::Invalid(
            "snapshot of a device that is not active",
        ))?;
        let mut queues = vec![VringSnapshot::default(); self.num_queues];
        for &(index, size, desc, avail, used) in &active.layout {
            let i = usize::from(index);
            // GET_VRING_BASE stops the ring; the backend finishes what it
            // popped first, so the used index then catches up with it.
            let next_avail = self.request("GET_VRING_BASE", |fe| fe.get_vring_base(i))?;
            let next_used: u16 = active
                .memory_ref()
                .read_obj(GuestAddress(used + 2))
                .map_err(|_| ControlError::Invalid("used ring outside memory"))?;
            if let Some(slot) = queues.get_mut(i) {
                *slot = VringSnapshot {
                    size,
                    ready: true,
                    enabled: true,
                    desc_table: desc,
                    avail_ring: avail,
                    used_ring: used,
                    next_avail: next_avail as u16,
                    next_used,
                    event_idx: active.features & (1 << 29) != 0,
                    signalled_used: None,
                };
            }
        }
        self.clear_calls();
        let device_state = if self.has(VhostUserProtocolFeatures::DEVICE_STATE) {
            self.save_backend_state()?
        } else {
            Vec::new()
        };
        let mut config = vec![0u8; self.config_size as usize];
        self.read_config(0, &mut config);
        Ok(DeviceSnapshot {
            device_type: self.device_type,
            queues,
            acked_features: active.features,
            acked_protocol_features: Some(self.protocol_features().bits()),
            config,
            device_state,
            in_flight: Vec::new(),
        })
    }

    fn restore(
        &mut self,
        snapshot: DeviceSnapshot,
        activation: Activation,
    ) -> Result<(), ControlError> {
        let has_state = self.has(VhostUserProtocolFeatures::DEVICE_STATE);
        if !snapshot.device_state.is_empty() && !has_state {
            return Err(FrontendError::StateUnsupported {
                len: snapshot.device_state.len(),
            }
            .into());
        }
        let limits = SnapshotLimits {
            device_type: self.device_type,
            num_queues: self.num_queues,
            max_queue_size: self.max_queue_size,
            offered_features: !0,
            offered_protocol_features: u64::MAX,
            config_size: self.config_size as usize,
            max_device_state: if has_state {
                crate::snapshot::MAX_PAYLOAD_LEN as usize
            } else {
                0
            },
        };
        let snapshot = ValidatedSnapshot::new(snapshot, &limits)?;
        let snap = snapshot.snapshot();
        if !snap.in_flight.is_empty() {
            // The backend has no way to take these over; refusing is
            // better than losing them.
            return Err(ControlError::Invalid(
                "in-flight requests cannot be handed to a vhost-user backend",
            ));
        }
        let mut bases = vec![0u16; self.num_queues];
        for (index, state) in snapshot.queue_states() {
            if state.next_avail != state.next_used {
                return Err(ControlError::Invalid("snapshot has requests in flight"));
            }
            if let Some(b) = bases.get_mut(usize::from(index)) {
                *b = state.next_avail;
            }
        }
        let mut activation = activation;
        activation.features = snap.acked_features & self.device_features();
        if self.active.is_some() {
            self.do_reset()?;
        }
        if !snap.device_state.is_empty() {
            // Loaded while the rings are stopped, before they start.
            self.load_backend_state(snap)?;
        }
        let result = self.do_activate(activation, &bases);
        if result.is_err() {
            if let Err(e) = self.do_reset() {
                debug!("cleanup after a failed restore: {e}");
            }
        }
        result
    }
}

impl Drop for VhostUserFrontendDevice {
    fn drop(&mut self) {
        // No messages here: a hung backend must not hang the drop. Closing
        // the socket tells the backend to stop.
        self.clear_calls();
        let _ = self.shared.exit.write(1);
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}
