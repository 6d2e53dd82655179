// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared support for the integration tests.
//!
//! * memfd-backed guest memory, mapped on the test (driver) side as a
//!   `vm-memory` collection so the test can read and write rings and buffers;
//! * [`TestDevice`], a small but real [`DeviceBackend`] that answers every
//!   chain with the bitwise complement of its readable bytes and records its
//!   lifecycle calls;
//! * [`spawn_daemon`], serving a device on a real unix socket in a thread;
//! * [`RawClient`], a byte-level vhost-user client for messages the `vhost`
//!   crate's `Frontend` cannot send (or cannot send malformed);
//! * [`SplitQueue`], the kit's `testing::SplitQueueDriver` with the
//!   eventfds and frontend addresses a vhost-user test needs; it can also
//!   build malicious chains.
//!
//! Everything waits with a timeout so a bug fails a test instead of hanging it.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_backend_kit::testing;
use virtio_backend_kit::vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use virtio_backend_kit::vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_backend_kit::vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_backend_kit::vhost_user::{
    kit_protocol_features, DaemonError, ServeMode, VhostUserDaemon,
};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::vmm_sys_util::sock_ctrl_msg::ScmSocket;
use virtio_backend_kit::{
    BackendError, ConfigNotifier, DeviceBackend, GuestMemoryLog, Vring, VringOwned,
};

/// How long any single wait in a test may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

// Not every test binary uses every bit.
#[allow(unused_imports)]
pub use virtio_backend_kit::features::{
    VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// Header flag bits of a vhost-user message.
pub const FLAG_VERSION_1: u32 = 0x1;
/// The message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// The sender wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Split-ring descriptor flags.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// The buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

// ---------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------

/// Create an anonymous memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `cname` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("ftruncate memfd");
    file
}

/// One memfd-backed region of guest memory, also mapped on the driver side.
pub struct GuestMem {
    /// The memfd (sent to the backend).
    pub file: File,
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The driver's shared mapping of the same file.
    pub mem: GuestMemoryLog,
}

impl GuestMem {
    /// Create `size` bytes of guest memory at `gpa`.
    pub fn new(gpa: u64, size: u64) -> Self {
        let mem = testing::shared_guest_memory(gpa, size as usize).expect("guest memory");
        let file = mem
            .iter()
            .next()
            .and_then(|r| r.file_offset())
            .expect("a memfd-backed region")
            .file()
            .try_clone()
            .unwrap();
        GuestMem {
            file,
            gpa,
            size,
            mem,
        }
    }

    /// The driver's virtual address of guest physical address `gpa`; it is
    /// also the "frontend virtual address" given to the backend.
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// The region as `SET_MEM_TABLE` / `ADD_MEM_REG` describe it.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host_addr(self.gpa),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Write `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    /// Read `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf
    }
}

/// A dirty-log area (`SET_LOG_BASE` with `LOG_SHMFD`).
pub struct LogArea {
    /// The memfd holding the bitmap.
    pub file: File,
    /// Its size in bytes.
    pub size: u64,
}

impl LogArea {
    /// A zeroed log of `size` bytes.
    pub fn new(size: u64) -> Self {
        LogArea {
            file: memfd("vbk-log", size),
            size,
        }
    }

    /// The whole bitmap.
    pub fn bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; self.size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut buf, 0).unwrap();
        buf
    }

    /// Whether the page holding `gpa` is marked dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / 4096;
        self.bytes()[(page / 8) as usize] & (1 << (page % 8)) != 0
    }

    /// Clear every bit.
    pub fn clear(&self) {
        let zero = vec![0u8; self.size as usize];
        std::os::unix::fs::FileExt::write_all_at(&self.file, &zero, 0).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The test device
// ---------------------------------------------------------------------------

/// Device type of [`TestDevice`] (outside the range the virtio spec assigns).
pub const TEST_DEVICE_TYPE: u32 = 0xfff0;
/// Size of [`TestDevice`]'s config space.
pub const TEST_CONFIG_SIZE: usize = 16;
/// Features [`TestDevice`] offers.
pub const TEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
/// Readable bytes a chain may carry before the device stops reading.
const MAX_CHAIN_BYTES: usize = 1 << 20;

/// A lifecycle call [`TestDevice`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceCall {
    /// `acked_features`.
    AckedFeatures(u64),
    /// `set_event_idx`.
    EventIdx(bool),
    /// `update_memory`.
    MemoryUpdated,
    /// `queue_started`.
    QueueStarted(u16),
    /// `queue_stopped`.
    QueueStopped(u16),
    /// `reset`.
    Reset,
    /// `write_config`.
    ConfigWritten {
        /// Offset written.
        offset: u32,
        /// Bytes written.
        len: usize,
    },
}

/// The bytes [`TestDevice`] writes back for `input`.
pub fn transform(input: &[u8]) -> Vec<u8> {
    input.iter().map(|b| b ^ 0xff).collect()
}

/// A device with `num_queues` queues: for each chain it reads the readable
/// bytes and writes their complement (XOR 0xff) into the writable
/// descriptors, puts the chain on the used ring with the length written and
/// signals the driver if it wants it. A chain touching memory outside guest
/// memory is returned with length 0. Its 16-byte config space is writable;
/// each write announces a config change.
pub struct TestDevice {
    num_queues: usize,
    max_queue_size: u16,
    config: Mutex<[u8; TEST_CONFIG_SIZE]>,
    notifier: Mutex<Option<ConfigNotifier>>,
    calls: Mutex<Vec<DeviceCall>>,
    /// Chains completed.
    pub chains: AtomicU64,
    /// Chains that touched memory outside the guest.
    pub bad_chains: AtomicU64,
}

impl TestDevice {
    /// A device with `num_queues` queues of at most 256 entries.
    pub fn new(num_queues: usize) -> Arc<Self> {
        let mut config = [0u8; TEST_CONFIG_SIZE];
        for (i, b) in config.iter_mut().enumerate() {
            *b = 0xa0 + i as u8;
        }
        Arc::new(TestDevice {
            num_queues,
            max_queue_size: 256,
            config: Mutex::new(config),
            notifier: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
            chains: AtomicU64::new(0),
            bad_chains: AtomicU64::new(0),
        })
    }

    /// The initial config space contents.
    pub fn initial_config() -> Vec<u8> {
        (0..TEST_CONFIG_SIZE as u8).map(|i| 0xa0 + i).collect()
    }

    fn record(&self, call: DeviceCall) {
        self.calls.lock().unwrap().push(call);
    }

    /// Every call recorded so far.
    pub fn calls(&self) -> Vec<DeviceCall> {
        self.calls.lock().unwrap().clone()
    }

    /// Forget the recorded calls.
    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Whether `call` was recorded.
    pub fn has_call(&self, call: &DeviceCall) -> bool {
        self.calls.lock().unwrap().contains(call)
    }

    /// Wait until `call` is recorded (worker calls arrive asynchronously).
    pub fn wait_for_call(&self, call: &DeviceCall) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.has_call(call) {
            assert!(
                Instant::now() < deadline,
                "device never saw {call:?}; calls: {:?}",
                self.calls()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn process_chain(chain: virtio_backend_kit::Chain) -> (u16, u32, bool) {
        let head = chain.head_index();
        let mem = chain.memory();
        let descs: Vec<_> = chain.clone().collect();
        let mut input = Vec::new();
        for d in descs.iter().filter(|d| !d.is_write_only()) {
            let len = d.len() as usize;
            if input.len() + len > MAX_CHAIN_BYTES {
                return (head, 0, true);
            }
            let start = input.len();
            input.resize(start + len, 0);
            if mem.read_slice(&mut input[start..], d.addr()).is_err() {
                return (head, 0, true);
            }
        }
        let output = transform(&input);
        let mut written = 0usize;
        for d in descs.iter().filter(|d| d.is_write_only()) {
            let n = (d.len() as usize).min(output.len() - written);
            if mem
                .write_slice(&output[written..written + n], d.addr())
                .is_err()
            {
                return (head, 0, true);
            }
            written += n;
        }
        (head, written as u32, false)
    }
}

impl DeviceBackend for TestDevice {
    type Vring = VringOwned;

    fn device_type(&self) -> u32 {
        TEST_DEVICE_TYPE
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        TEST_FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.record(DeviceCall::AckedFeatures(features));
    }

    fn set_event_idx(&self, enabled: bool) {
        self.record(DeviceCall::EventIdx(enabled));
    }

    fn config_size(&self) -> usize {
        TEST_CONFIG_SIZE
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let config = self.config.lock().unwrap();
        data.fill(0);
        let start = (offset as usize).min(TEST_CONFIG_SIZE);
        let n = data.len().min(TEST_CONFIG_SIZE - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), BackendError> {
        let start = offset as usize;
        let end = start
            .checked_add(data.len())
            .filter(|e| *e <= TEST_CONFIG_SIZE)
            .ok_or("config write out of range")?;
        self.config.lock().unwrap()[start..end].copy_from_slice(data);
        self.record(DeviceCall::ConfigWritten {
            offset,
            len: data.len(),
        });
        if let Some(n) = self.notifier.lock().unwrap().as_ref() {
            n.notify();
        }
        Ok(())
    }

    fn update_memory(
        &self,
        _mem: &virtio_backend_kit::GuestMemoryHandle,
    ) -> Result<(), BackendError> {
        self.record(DeviceCall::MemoryUpdated);
        Ok(())
    }

    fn process_queue(&self, _index: u16, vring: &mut Vring) -> Result<(), BackendError> {
        let mut done = 0;
        while let Some(chain) = vring.pop_chain()? {
            let (head, len, bad) = Self::process_chain(chain);
            if bad {
                self.bad_chains.fetch_add(1, Ordering::SeqCst);
            }
            vring.add_used(head, len)?;
            self.chains.fetch_add(1, Ordering::SeqCst);
            done += 1;
        }
        if done > 0 {
            vring.notify_if_needed()?;
        }
        Ok(())
    }

    fn queue_started(&self, index: u16) {
        self.record(DeviceCall::QueueStarted(index));
    }

    fn queue_stopped(&self, index: u16) {
        self.record(DeviceCall::QueueStopped(index));
    }

    fn reset(&self) {
        self.record(DeviceCall::Reset);
    }

    fn set_config_notifier(&self, notifier: ConfigNotifier) {
        *self.notifier.lock().unwrap() = Some(notifier);
    }
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// Aborts the test process if a test is still running after `limit`: a
/// `vhost::Frontend` call waiting for a reply that never comes retries its
/// read forever, whatever the socket timeout, and must not hang the suite.
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl Watchdog {
    /// Arm a watchdog for the current test.
    pub fn new(limit: Duration) -> Self {
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed test")
            .to_owned();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("{name}: still running after {limit:?}, aborting (hung?)");
                std::process::abort();
            }
        });
        Watchdog { done: Some(tx) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

/// Run `f` on its own thread and panic if it does not finish within
/// [`TIMEOUT`] (for steps that may block forever if the backend is wrong).
pub fn within_timeout<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| panic!("{what} did not complete within {TIMEOUT:?}"))
}

/// A daemon serving a device on a socket in a temporary directory.
pub struct Daemon<D: DeviceBackend> {
    /// Keeps the socket directory alive.
    pub dir: tempfile::TempDir,
    /// The socket path.
    pub path: PathBuf,
    /// The device, shared with the daemon.
    pub device: Arc<D>,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
    _watchdog: Watchdog,
}

/// A pipe: (read end, write end).
pub fn pipe() -> (File, File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Serve `device` on a fresh socket in a thread.
pub fn spawn_daemon<D: DeviceBackend>(device: Arc<D>, mode: ServeMode) -> Daemon<D> {
    spawn_daemon_with(device, mode, |d| d)
}

/// [`spawn_daemon`], with the daemon adjusted by `configure` first.
pub fn spawn_daemon_with<D: DeviceBackend>(
    device: Arc<D>,
    mode: ServeMode,
    configure: impl FnOnce(VhostUserDaemon<D>) -> VhostUserDaemon<D>,
) -> Daemon<D> {
    let watchdog = Watchdog::new(Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost-user.sock");
    // Bound before the thread starts, so a client can connect at once.
    let listener = UnixListener::bind(&path).unwrap();
    let mut daemon = configure(VhostUserDaemon::new(device.clone()).expect("create daemon"));
    let thread = std::thread::Builder::new()
        .name("vbk-test-daemon".into())
        .spawn(move || daemon.serve_listener(&listener, mode))
        .unwrap();
    Daemon {
        dir,
        path,
        device,
        thread: Some(thread),
        _watchdog: watchdog,
    }
}

impl<D: DeviceBackend> Daemon<D> {
    /// Connect a raw socket with read and write timeouts.
    pub fn connect(&self) -> UnixStream {
        let sock = UnixStream::connect(&self.path).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(TIMEOUT)).unwrap();
        sock
    }

    /// Connect a raw client.
    pub fn raw(&self) -> RawClient {
        RawClient::new(self.connect())
    }

    /// Connect a `vhost` frontend (plus a raw handle on the same socket).
    pub fn frontend(&self, num_queues: u64) -> Client {
        Client::new(self.connect(), num_queues)
    }

    /// A frontend that negotiated `features` and the default protocol
    /// features and installed `size` bytes of guest memory at `gpa`.
    pub fn ready_frontend(
        &self,
        num_queues: u64,
        features: u64,
        gpa: u64,
        size: u64,
    ) -> (Client, GuestMem) {
        let mut client = self.frontend(num_queues);
        client.negotiate(features, Client::default_protocol());
        let guest = GuestMem::new(gpa, size);
        client
            .frontend
            .set_mem_table(&[guest.region_info()])
            .unwrap();
        (client, guest)
    }

    /// Whether the daemon thread has returned.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait (bounded) for the daemon thread to return, and return its result.
    pub fn join(&mut self, timeout: Duration) -> Option<Result<(), DaemonError>> {
        let deadline = Instant::now() + timeout;
        while !self.is_finished() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = self.thread.take()?;
        Some(t.join().expect("daemon thread panicked"))
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A reply read off the socket.
#[derive(Debug)]
pub struct Reply {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Reply {
    /// The payload as a u64 (REPLY_ACK and u64 replies).
    pub fn u64(&self) -> u64 {
        assert_eq!(self.payload.len(), 8, "not a u64 reply: {self:?}");
        u64::from_le_bytes(self.payload[..8].try_into().unwrap())
    }
}

/// Build a vhost-user message.
pub fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(12 + payload.len());
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

/// Concatenate little-endian u64 words.
pub fn u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A `VhostUserVringState` payload.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// A byte-level vhost-user client.
pub struct RawClient {
    /// The socket (with timeouts).
    pub sock: UnixStream,
}

impl RawClient {
    /// Wrap a connected socket (timeouts are set here too).
    pub fn new(sock: UnixStream) -> Self {
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(TIMEOUT)).unwrap();
        RawClient { sock }
    }

    /// Send raw bytes with `fds` attached to the first byte.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) {
        if fds.is_empty() {
            (&self.sock).write_all(bytes).unwrap();
            return;
        }
        let sent = self.sock.send_with_fds(&[bytes], fds).unwrap();
        if sent < bytes.len() {
            (&self.sock).write_all(&bytes[sent..]).unwrap();
        }
    }

    /// Send a message with explicit header flags.
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        self.send_bytes(&message(request, flags, payload), fds);
    }

    /// Read one message; `Err` on timeout or a closed socket.
    pub fn recv(&self) -> std::io::Result<Reply> {
        let mut hdr = [0u8; 12];
        (&self.sock).read_exact(&mut hdr)?;
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        (&self.sock).read_exact(&mut payload)?;
        Ok(Reply {
            request: word(0),
            flags: word(4),
            payload,
        })
    }

    /// Read the reply to `request`, checking its header.
    pub fn reply_to(&self, request: u32) -> Reply {
        let r = self
            .recv()
            .unwrap_or_else(|e| panic!("no reply to request {request}: {e}"));
        assert_eq!(r.request, request, "reply to the wrong request: {r:?}");
        assert_eq!(r.flags & 0x3, FLAG_VERSION_1, "bad reply version: {r:?}");
        assert_ne!(r.flags & FLAG_REPLY, 0, "reply flag missing: {r:?}");
        r
    }

    /// Send with NEED_REPLY and return the REPLY_ACK value (0 = success).
    pub fn ack(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(request, FLAG_VERSION_1 | FLAG_NEED_REPLY, payload, fds);
        self.reply_to(request).u64()
    }

    /// Send a request that has an explicit reply and return the reply.
    pub fn call(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> Reply {
        self.send(request, FLAG_VERSION_1, payload, fds);
        self.reply_to(request)
    }

    /// Assert nothing arrives within `wait`.
    pub fn expect_silence(&self, wait: Duration) {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut byte = [0u8; 1];
        let res = (&self.sock).read(&mut byte);
        self.sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        match res {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("unexpected data or error on the socket: {other:?}"),
        }
    }

    /// A request that must succeed: `GET_QUEUE_NUM` gets its answer.
    pub fn get_queue_num(&self) -> u64 {
        self.call(17, &[], &[]).u64()
    }
}

/// The `vhost` crate's frontend plus a raw handle on the same socket.
pub struct Client {
    /// The frontend.
    pub frontend: Frontend,
    /// A raw handle to the same connection (do not interleave half-messages).
    pub raw: RawClient,
}

impl Client {
    /// Wrap a connected socket.
    pub fn new(sock: UnixStream, num_queues: u64) -> Self {
        let raw = RawClient::new(sock.try_clone().unwrap());
        Client {
            frontend: Frontend::from_stream(sock, num_queues),
            raw,
        }
    }

    /// Negotiate: SET_OWNER, GET/SET_FEATURES (`virtio` plus bit 30),
    /// GET/SET_PROTOCOL_FEATURES (`protocol`), and from then on ask for an
    /// ack on every request so each step is checked.
    pub fn negotiate(&mut self, virtio: u64, protocol: VhostUserProtocolFeatures) {
        use virtio_backend_kit::vhost::vhost_user::message::VhostUserHeaderFlag;
        let fe = &mut self.frontend;
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert_eq!(offered & virtio, virtio, "features {virtio:#x} not offered");
        fe.set_features(virtio | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        let offered_proto = fe.get_protocol_features().unwrap();
        assert!(offered_proto.contains(protocol));
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_protocol_features(protocol).unwrap();
    }

    /// The protocol features the tests use by default: all the kit offers
    /// but `DEVICE_STATE` and `PAGEFAULT`, which the tests of device state
    /// and of postcopy ask for themselves.
    pub fn default_protocol() -> VhostUserProtocolFeatures {
        kit_protocol_features()
            - VhostUserProtocolFeatures::DEVICE_STATE
            - VhostUserProtocolFeatures::PAGEFAULT
    }

    /// Configure and start `q`: NUM, ADDR, BASE, CALL, ERR, KICK, ENABLE.
    pub fn start_queue(&mut self, q: &SplitQueue, base: u16) {
        let i = q.index as usize;
        let fe = &mut self.frontend;
        fe.set_vring_num(i, q.size).unwrap();
        fe.set_vring_addr(i, &q.config_data()).unwrap();
        fe.set_vring_base(i, base).unwrap();
        fe.set_vring_call(i, &q.call).unwrap();
        fe.set_vring_err(i, &q.err).unwrap();
        fe.set_vring_kick(i, &q.kick).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The split-virtqueue driver
// ---------------------------------------------------------------------------

/// A buffer in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn readable(gpa: u64, len: u32) -> Self {
        Buf {
            gpa,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(gpa: u64, len: u32) -> Self {
        Buf {
            gpa,
            len,
            writable: true,
        }
    }
}

/// A raw split-ring descriptor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor index.
    pub next: u16,
}

/// Bytes one queue's [`SplitQueue::new`] area takes.
pub const QUEUE_AREA: u64 = 0x10000;

/// A driver-side split virtqueue living in a [`GuestMem`]: the kit's public
/// [`testing::SplitQueueDriver`] for the rings, plus what a vhost-user test
/// needs around it (kick, call and err eventfds, the frontend's ring
/// addresses, a data area and chains built from raw descriptors).
///
/// Its area of [`QUEUE_AREA`] bytes holds the descriptor table, the
/// available ring and (on its own page) the used ring, then a data area
/// handed out by [`SplitQueue::alloc`].
pub struct SplitQueue {
    driver: testing::SplitQueueDriver,
    /// Queue index.
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Descriptor table gpa.
    pub desc: u64,
    /// Available ring gpa.
    pub avail: u64,
    /// Used ring gpa.
    pub used: u64,
    /// Driver → device notification.
    pub kick: EventFd,
    /// Device → driver notification.
    pub call: EventFd,
    /// Device error notification.
    pub err: EventFd,
    next_desc: u16,
    data_start: u64,
    data_end: u64,
    data_next: u64,
}

impl SplitQueue {
    /// A queue of `size` entries (≤ 256) whose rings and data live in the
    /// [`QUEUE_AREA`] bytes at `area` inside `guest`. The rings are zeroed.
    pub fn new(guest: &GuestMem, index: u16, size: u16, area: u64) -> Self {
        assert!(area >= guest.gpa && area + QUEUE_AREA <= guest.gpa + guest.size);
        let driver = testing::SplitQueueDriver::new(&guest.mem, index, size, area);
        let (desc, avail, used) = driver.rings();
        let data_start = driver.data_area();
        SplitQueue {
            driver,
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            err: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            data_start,
            data_end: area + QUEUE_AREA,
            data_next: data_start,
        }
    }

    /// The ring addresses as `SET_VRING_ADDR` carries them (the frontend's
    /// virtual addresses).
    pub fn config_data(&self) -> VringConfigData {
        let mem = self.driver.memory();
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: host(self.desc),
            used_ring_addr: host(self.used),
            avail_ring_addr: host(self.avail),
            log_addr: None,
        }
    }

    /// Allocate `len` bytes (16-byte aligned) in the data area, wrapping
    /// around when it is exhausted.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len + 15) & !15;
        assert!(len <= self.data_end - self.data_start);
        if self.data_next + len > self.data_end {
            self.data_next = self.data_start;
        }
        let gpa = self.data_next;
        self.data_next += len;
        gpa
    }

    /// Allocate a page-aligned buffer of `len` bytes on pages of its own.
    pub fn alloc_page_aligned(&mut self, len: u64) -> u64 {
        let start = (self.data_next + 0xfff) & !0xfff;
        let end = (start + len + 0xfff) & !0xfff;
        assert!(end <= self.data_end, "data area exhausted");
        self.data_next = end;
        start
    }

    /// Write `data` into guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.driver.write(gpa, data);
    }

    /// Read guest memory.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.driver.read(gpa, len)
    }

    /// Reserve `n` consecutive descriptor slots and return the first.
    pub fn alloc_descs(&mut self, n: u16) -> u16 {
        assert!(n <= self.size);
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    /// Write descriptor `slot` of the table at `table` (the queue's own
    /// table unless building an indirect one).
    pub fn write_desc_at(&self, table: u64, slot: u16, d: Desc) {
        let raw = testing::RawDescriptor {
            addr: d.addr,
            len: d.len,
            flags: d.flags,
            next: d.next,
        };
        self.driver.write_descriptor(table, slot, raw);
    }

    /// Write descriptor `slot` of the queue's table.
    pub fn write_desc(&self, slot: u16, d: Desc) {
        self.write_desc_at(self.desc, slot, d);
    }

    /// Write `descs` as a chain into consecutive slots, linking them with
    /// NEXT; returns the head. Flags other than NEXT are taken as given.
    pub fn write_chain(&mut self, descs: &[Desc]) -> u16 {
        let n = u16::try_from(descs.len()).unwrap();
        let first = self.alloc_descs(n);
        for (i, d) in descs.iter().enumerate() {
            let slot = first + i as u16;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = slot + 1;
            }
            self.write_desc(slot, d);
        }
        first
    }

    /// Put `head` on the available ring and publish the new index.
    pub fn publish(&mut self, head: u16) {
        self.driver.publish(head);
    }

    /// Overwrite the published available index (for malformed rings).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.driver.set_avail_idx(idx);
    }

    /// The driver's available index.
    pub fn avail_idx(&self) -> u16 {
        self.driver.avail_idx()
    }

    /// Build a chain of `bufs`, publish it and return its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let descs: Vec<Desc> = bufs
            .iter()
            .map(|b| Desc {
                addr: b.gpa,
                len: b.len,
                flags: if b.writable { VRING_DESC_F_WRITE } else { 0 },
                next: 0,
            })
            .collect();
        let head = self.write_chain(&descs);
        self.publish(head);
        head
    }

    /// Allocate a readable buffer holding `data` and a writable buffer of
    /// `out_len` bytes, chain them and publish; returns (head, out gpa).
    pub fn add_request(&mut self, data: &[u8], out_len: u32) -> (u16, u64) {
        let input = self.alloc(data.len() as u64);
        self.write(input, data);
        let output = self.alloc(u64::from(out_len));
        self.write(output, &vec![0u8; out_len as usize]);
        let head = self.add_chain(&[
            Buf::readable(input, data.len() as u32),
            Buf::writable(output, out_len),
        ]);
        (head, output)
    }

    /// Notify the device.
    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// `used_event` (in the available ring, used with EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        self.driver.set_used_event(value);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.driver.used_idx()
    }

    /// Used ring entry `i` (modulo the size): (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        self.driver.used_entry(i)
    }

    /// The used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.driver.last_used()
    }

    /// Wait until `n` more chains are used and return their (id, len).
    pub fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let target = self.last_used().wrapping_add(n);
        let deadline = Instant::now() + TIMEOUT;
        while self.used_idx().wrapping_sub(self.last_used()) < n {
            assert!(
                Instant::now() < deadline,
                "queue {}: used idx stuck at {} (want {target})",
                self.index,
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (0..n)
            .map(|_| self.driver.pop_used().expect("counted as used"))
            .collect()
    }

    /// Wait up to `timeout` for the call eventfd; consumes the signal.
    pub fn wait_call(&self, timeout: Duration) -> bool {
        poll_eventfd(&self.call, timeout)
    }

    /// Wait up to `timeout` for the err eventfd; consumes the signal.
    pub fn wait_err(&self, timeout: Duration) -> bool {
        poll_eventfd(&self.err, timeout)
    }
}

/// Poll an eventfd for up to `timeout`; reads it (resetting it) if ready.
pub fn poll_eventfd(evt: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n == 1 && pfd.revents & libc::POLLIN != 0 {
        let _ = evt.read();
        true
    } else {
        false
    }
}

/// A deterministic test pattern of `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------
// virtio-blk requests
// ---------------------------------------------------------------------------

/// Requests for `vmm-example`'s virtio-blk device, laid out on a
/// [`SplitQueue`].
pub mod blk {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    use super::{Buf, SplitQueue};

    /// `VIRTIO_BLK_T_IN`: read.
    pub const T_IN: u32 = 0;
    /// `VIRTIO_BLK_T_OUT`: write.
    pub const T_OUT: u32 = 1;
    /// `VIRTIO_BLK_T_FLUSH`.
    pub const T_FLUSH: u32 = 4;
    /// `VIRTIO_BLK_T_GET_ID`.
    pub const T_GET_ID: u32 = 8;
    /// `VIRTIO_BLK_S_OK`.
    pub const S_OK: u8 = 0;
    /// `VIRTIO_BLK_S_IOERR`.
    pub const S_IOERR: u8 = 1;
    /// `VIRTIO_BLK_S_UNSUPP`.
    pub const S_UNSUPP: u8 = 2;

    /// A fresh raw image file of `size` bytes at `dir/disk.raw`, opened for
    /// reading and writing.
    pub fn image(dir: &Path, size: u64) -> (PathBuf, File) {
        let path = dir.join("disk.raw");
        let image = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        image.set_len(size).unwrap();
        (path, image)
    }

    /// `len` bytes of `image` at byte `offset`.
    pub fn read_image(image: &File, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        image.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// A request header: type, reserved, sector.
    pub fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// Allocate and write a header for (`kind`, `sector`), then a status
    /// byte holding `status_fill`; returns (header gpa, status gpa).
    pub fn header_and_status(
        q: &mut SplitQueue,
        kind: u32,
        sector: u64,
        status_fill: u8,
    ) -> (u64, u64) {
        let hdr = q.alloc(16);
        q.write(hdr, &header(kind, sector));
        let status = q.alloc(1);
        q.write(status, &[status_fill]);
        (hdr, status)
    }

    /// A request's chain: the 16-byte header at `hdr`, the `data` buffers,
    /// the status byte at `status`.
    pub fn chain(hdr: u64, data: &[Buf], status: u64) -> Vec<Buf> {
        let mut bufs = vec![Buf::readable(hdr, 16)];
        bufs.extend_from_slice(data);
        bufs.push(Buf::writable(status, 1));
        bufs
    }

    /// Allocate and write, in this order, a header for (`kind`, `sector`),
    /// with `data` = `Some((bytes, writable))` a buffer holding `bytes`, and
    /// a status byte holding `status_fill`. Nothing is published. Returns
    /// (chain, data gpa or 0, status gpa).
    pub fn request(
        q: &mut SplitQueue,
        kind: u32,
        sector: u64,
        data: Option<(&[u8], bool)>,
        status_fill: u8,
    ) -> (Vec<Buf>, u64, u64) {
        let hdr = q.alloc(16);
        q.write(hdr, &header(kind, sector));
        let mut bufs = Vec::new();
        let mut data_gpa = 0;
        if let Some((bytes, writable)) = data {
            data_gpa = q.alloc(bytes.len() as u64);
            q.write(data_gpa, bytes);
            bufs.push(Buf {
                gpa: data_gpa,
                len: bytes.len() as u32,
                writable,
            });
        }
        let status = q.alloc(1);
        q.write(status, &[status_fill]);
        (chain(hdr, &bufs, status), data_gpa, status)
    }
}

/// Adapter options for [`TestDevice`]: one queue of up to 256 entries,
/// `wait` for the connection and for each reply.
#[allow(dead_code)]
pub fn test_device_options(wait: Duration) -> virtio_backend_kit::frontend::FrontendOptions {
    virtio_backend_kit::frontend::FrontendOptions {
        config_size: TEST_CONFIG_SIZE as u32,
        connect_timeout: wait,
        request_timeout: Some(wait),
        ..virtio_backend_kit::frontend::FrontendOptions::new(TEST_DEVICE_TYPE, 1, 256)
    }
}

/// What a driver writes to set up queue 0 of `t` on `ring` and make it
/// ready (the caller checks QueueReady).
#[allow(dead_code)]
pub fn mmio_setup_queue(
    t: &mut virtio_backend_kit::mmio::MmioTransport,
    ring: &testing::SplitQueueDriver,
) {
    use virtio_backend_kit::mmio::*;
    let (desc, avail, used) = ring.rings();
    t.write_u32(QUEUE_SEL, 0);
    t.write_u32(QUEUE_NUM, u32::from(ring.size()));
    for (low, addr) in [
        (QUEUE_DESC_LOW, desc),
        (QUEUE_DRIVER_LOW, avail),
        (QUEUE_DEVICE_LOW, used),
    ] {
        t.write_u32(low, addr as u32);
        t.write_u32(low + 4, (addr >> 32) as u32);
    }
    t.write_u32(QUEUE_READY, 1);
}
