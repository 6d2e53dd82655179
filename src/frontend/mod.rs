// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM side of vhost-user (cargo feature `frontend-adapter`): a device
//! whose data plane runs in another process, driven through the same
//! [`DeviceControl`] trait as an in-process
//! [`DeviceCore`](crate::core::DeviceCore). It belongs to the in-process
//! home (a VMM's transport drives it) and shares only the message framing
//! with the daemon of [`crate::vhost_user`].
//!
//! [`VhostUserFrontendDevice`] connects to a vhost-user backend (this kit's
//! own daemon, QEMU's `vhost-user-blk`, any other) and translates what the
//! transport learned from the driver into vhost-user messages:
//!
//! - [`VhostUserFrontendDevice::connect`] sends `SET_OWNER`, `GET_FEATURES`,
//!   `GET_PROTOCOL_FEATURES`/`SET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`,
//!   `GET_MAX_MEM_SLOTS`, `SET_BACKEND_REQ_FD` and `GET_CONFIG` (cached);
//! - [`DeviceControl::activate`] sends `SET_FEATURES`, `SET_MEM_TABLE`, then
//!   per queue `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`,
//!   `SET_VRING_CALL`, `SET_VRING_KICK`, `SET_VRING_ENABLE`;
//! - [`DeviceControl::reset`] sends `GET_VRING_BASE` per started queue, then
//!   `RESET_DEVICE` when the backend supports it;
//! - [`DeviceControl::write_config`] sends `SET_CONFIG`;
//! - [`DeviceControl::driver_status`] sends `SET_STATUS` (STATUS) and,
//!   after FEATURES_OK, `GET_STATUS` to learn whether the backend keeps it;
//! - [`DeviceControl::set_dirty_log`] sends `SET_LOG_BASE` (LOG_SHMFD) and,
//!   on a running device, `SET_FEATURES` with `VHOST_F_LOG_ALL` and
//!   `SET_VRING_ADDR` with `VHOST_VRING_F_LOG` per ring (or both without,
//!   to stop); an activation while logging is on applies the log as well;
//! - [`DeviceControl::update_memory`] sends `REM_MEM_REG`/`ADD_MEM_REG`
//!   (CONFIGURE_MEM_SLOTS) or `SET_MEM_TABLE`, see [`memory_update`].
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

mod activation;
mod control;
mod dirty_log;
pub mod memory_update;
mod raw;
mod relay;
pub mod state_fd;

use dirty_log::{LogArea, RingLayout};
use relay::*;

pub use memory_update::MemoryUpdateError;
pub use raw::RawRequestError;

pub use crate::features::{VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES};
/// Size of the virtio-blk config space as the kit's block device and
/// Linux (without the secure-erase and zoned fields) lay it out.
pub const VIRTIO_BLK_CONFIG_SIZE: u32 = 60;

/// Virtio device IDs with a config size [`FrontendOptions::new`] knows.
const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_VSOCK: u32 = 19;
const VIRTIO_ID_FS: u32 = 26;

/// Protocol features the adapter can make use of; it acks the subset the
/// backend offers. With `CONFIGURE_MEM_SLOTS` memory changes one region at
/// a time (see [`DeviceControl::update_memory`]). `LOG_SHMFD` is what dirty logging
/// needs (see [`DeviceControl::set_dirty_log`]); with `STATUS` the device
/// status the driver writes is passed on (see
/// [`DeviceControl::driver_status`]).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Regions one `SET_MEM_TABLE` may carry by the vhost-user spec.
const MAX_MEM_TABLE_REGIONS: usize = 8;
/// Largest backend request payload the relay accepts.
const MAX_BACKEND_REQ_PAYLOAD: usize = 4096;

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
    /// A request the adapter frames itself (see [`RawRequestError`])
    /// failed.
    #[error("vhost-user {request} failed")]
    Raw {
        /// The request.
        request: &'static str,
        /// What went wrong.
        #[source]
        source: RawRequestError,
    },
    /// The socket could not be duplicated for the adapter's own requests.
    #[error("cannot duplicate the vhost-user socket")]
    Socket(#[source] std::io::Error),
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
    /// Dirty logging was asked for, but the backend does not offer what it
    /// takes (the `VHOST_F_LOG_ALL` feature or the `LOG_SHMFD` protocol
    /// feature, named here). Nothing was changed.
    #[error("the backend cannot log dirty pages for a live migration: it does not offer {0}")]
    DirtyLogUnsupported(&'static str),
    /// The dirty log file could not be duplicated for the backend.
    #[error("cannot duplicate the dirty log file")]
    LogFile(#[source] std::io::Error),
    /// The backend hung up (or was cut off after a request timeout).
    #[error("the backend is disconnected")]
    Disconnected,
    /// Guest memory the backend cannot be given.
    #[error("guest memory refused")]
    Memory(#[from] MemoryUpdateError),
    /// The relay thread or one of its eventfds could not be set up.
    #[error("cannot set up the interrupt relay")]
    Relay(#[source] std::io::Error),
    /// The device's own state could not be moved through DEVICE_STATE.
    #[error("device state transfer failed")]
    StateTransfer(#[from] state_fd::StateTransferError),
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

/// What an activation set up, undone by reset.
struct ActiveState {
    /// Queues the backend was told to start.
    started: Vec<u16>,
    /// The driver's features and queue layout, for snapshots.
    features: u64,
    layout: Vec<RingLayout>,
    /// Kept so the addresses given to the backend stay mapped.
    _memory: GuestMemoryLog,
    /// The regions the backend holds.
    mem_table: memory_update::BackendTable,
    /// Kept so the kick eventfds live as long as the activation.
    _kicks: Vec<EventFd>,
}

/// A virtio device implemented by an external vhost-user backend, driven
/// by an in-process transport through [`DeviceControl`].
pub struct VhostUserFrontendDevice {
    frontend: Frontend,
    /// The main socket again, for the requests the adapter frames itself.
    raw_sock: UnixStream,
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
    /// Most memory regions the backend takes.
    max_mem_slots: u64,
    active: Option<ActiveState>,
    /// The dirty log while logging is on, applied to every activation.
    dirty_log: Option<LogArea>,
}

impl std::fmt::Debug for VhostUserFrontendDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFrontendDevice")
            .field("device_type", &self.device_type)
            .field("num_queues", &self.num_queues)
            .field("backend_features", &self.backend_features)
            .field("protocol", &self.protocol)
            .field("active", &self.active.is_some())
            .field("logging", &self.dirty_log.is_some())
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
        let raw_sock = sock.try_clone().map_err(FrontendError::Socket)?;
        let mut dev = VhostUserFrontendDevice {
            raw_sock,
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
            max_mem_slots: MAX_MEM_TABLE_REGIONS as u64,
            active: None,
            dirty_log: None,
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
        self.learn_mem_slots()?;
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
}
