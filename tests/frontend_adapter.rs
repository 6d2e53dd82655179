// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM-side vhost-user frontend adapter against real backends served by
//! the kit's daemon on real sockets: the virtio-blk device from
//! `vmm-example` and the suite's `TestDevice`.
//!
//! The test plays the transport: it lays out split rings in memfd-backed
//! guest memory, activates the adapter with kick eventfds (KVM's ioeventfds
//! in a VMM) and irqfd-plus-status-bit notifiers, kicks, and waits for the
//! interrupt the relay raises.

mod common;
mod process;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{blk, spawn_daemon, TestDevice, Watchdog, TEST_CONFIG_SIZE, TEST_DEVICE_TYPE};
use virtio_backend_kit::core::{Activation, ControlError, DeviceControl, QueueActivation};
use virtio_backend_kit::frontend::{FrontendError, FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::testing::{self, Interrupt, SplitQueueDriver};
use virtio_backend_kit::vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_backend_kit::vhost_user::daemon::bind;
use virtio_backend_kit::vhost_user::{ServeMode, VhostUserDaemon};
use virtio_backend_kit::vm_memory::GuestAddress;
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::GuestMemoryLog;
use virtio_backend_kit::{ConfigNotifier, DeviceBackend};
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// Guest memory: one region at a non-zero gpa, so a gpa used where a host
/// address belongs (or the other way round) cannot go unnoticed.
const MEM_GPA: u64 = 0x4000_0000;
const MEM_SIZE: usize = 4 << 20;
/// Each queue gets this much memory: rings, then request buffers.
const QUEUE_AREA: u64 = 0x10_0000;
const IMAGE_SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Guest memory and a tiny split-ring driver
// ---------------------------------------------------------------------------

/// memfd-backed guest memory, as a VMM would build it for vhost-user.
fn shared_guest_memory() -> GuestMemoryLog {
    testing::shared_guest_memory(MEM_GPA, MEM_SIZE).unwrap()
}

/// The kit's test driver for one split virtqueue.
type Ring = SplitQueueDriver;

/// Queue `index` in its own area of the test's guest memory.
fn queue_at(mem: &GuestMemoryLog, index: u16, size: u16) -> Ring {
    SplitQueueDriver::new(mem, index, size, MEM_GPA + u64::from(index) * QUEUE_AREA)
}

/// Lay out one virtio-blk request (header, data, status) in this
/// queue's buffer area and make it available. For a write, `data` is
/// the payload; for a read, its length is the size read.
fn blk_request(ring: &mut Ring, kind: u32, sector: u64, data: &[u8]) -> BlkRequest {
    let hdr = ring.data_area();
    let buf = hdr + 0x1000;
    let status = buf + data.len() as u64;
    ring.write(hdr, &blk::header(kind, sector));
    ring.write(buf, data);
    ring.write(status, &[0xff]);
    let head = ring.add_chain(&[
        (hdr, 16, false),
        (buf, data.len() as u32, kind == blk::T_IN),
        (status, 1, true),
    ]);
    BlkRequest {
        head,
        buf,
        len: data.len(),
        status,
    }
}

/// Activate `dev` with the one queue (index, size) = `queue` and
/// `features`; returns the queue's ring and kick.
fn activate_one(
    dev: &mut VhostUserFrontendDevice,
    mem: &GuestMemoryLog,
    irq: &Interrupt,
    (index, size): (u16, u16),
    features: u64,
) -> (Ring, EventFd) {
    let ring = queue_at(mem, index, size);
    let (q, kick) = ring.activation(irq);
    dev.activate(Activation {
        features,
        memory: mem.clone(),
        queues: vec![q],
    })
    .unwrap();
    (ring, kick)
}

struct BlkRequest {
    head: u16,
    buf: u64,
    len: usize,
    status: u64,
}

/// Kick, wait for the interrupt and return the completed request's status.
fn complete(ring: &mut Ring, kick: &EventFd, irq: &Interrupt, req: &BlkRequest) -> u8 {
    kick.write(1).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(irq.wait(WAIT), "no interrupt within {WAIT:?}");
        if let Some((id, _len)) = ring.pop_used() {
            assert_eq!(id, u32::from(req.head));
            break;
        }
        assert!(Instant::now() < deadline, "request never completed");
    }
    ring.read(req.status, 1)[0]
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

fn blk_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let f = File::create(&path).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    path
}

/// What a test of a blk backend on a socket starts with (logging on): a
/// watchdog, a new directory, a fresh image and a socket path in it.
fn blk_setup() -> (Watchdog, tempfile::TempDir, PathBuf, PathBuf) {
    let _ = env_logger::builder().is_test(true).try_init();
    let watchdog = Watchdog::new(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let image = blk_image(dir.path());
    let sock = dir.path().join("blk.sock");
    (watchdog, dir, image, sock)
}

fn blk_daemon(image: &Path, queues: u16) -> VhostUserDaemon<BlkDevice> {
    let cfg = BlkConfig {
        queues,
        queue_size: 256,
        ..Default::default()
    };
    let dev = BlkDevice::new(Target::open_image(image, false).unwrap(), cfg).unwrap();
    VhostUserDaemon::new(Arc::new(dev)).unwrap()
}

fn blk_options(queues: usize) -> FrontendOptions {
    FrontendOptions {
        connect_timeout: WAIT,
        request_timeout: Some(WAIT),
        ..FrontendOptions::new(VIRTIO_ID_BLOCK, queues, 256)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn is_external(r: Result<(), ControlError>) -> bool {
    matches!(r, Err(ControlError::External(_)))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn blk_round_trip_reset_and_reactivate() {
    let (_watchdog, _dir, image, sock) = blk_setup();

    // The backend binds its socket only after a while: connect must wait.
    let mut daemon = blk_daemon(&image, 2);
    let daemon_sock = sock.clone();
    let daemon_thread = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        let listener = bind(&daemon_sock).unwrap();
        daemon.serve_listener(&listener, ServeMode::Once)
    });

    let mut dev = VhostUserFrontendDevice::connect(&sock, blk_options(4)).unwrap();
    assert!(dev.is_connected());

    // What the transport offers the guest.
    assert_eq!(dev.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(
        dev.num_queues(),
        2,
        "lowered to the backend's GET_QUEUE_NUM"
    );
    assert_eq!(dev.max_queue_size(), 256);
    let features = dev.device_features();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & VIRTIO_BLK_F_MQ, 0);
    assert_eq!(
        features & ((1 << 30) | (1 << 26)),
        0,
        "vhost-user bits leak"
    );
    let proto = dev.protocol_features();
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::BACKEND_REQ,
    ] {
        assert!(proto.contains(f), "{f:?} not negotiated: {proto:?}");
    }
    assert!(proto.contains(VhostUserProtocolFeatures::STATUS));

    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), IMAGE_SIZE / 512);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    let mut past_end = [0xaau8; 8];
    dev.read_config(58, &mut past_end);
    assert_eq!(&past_end[2..], &[0u8; 6], "bytes past the config read as 0");

    // Activate both queues.
    let mem = shared_guest_memory();
    let irqs = [Interrupt::new(), Interrupt::new()];
    let mut rings = [queue_at(&mem, 0, 64), queue_at(&mem, 1, 64)];
    let (q0, kick0) = rings[0].activation(&irqs[0]);
    let (q1, kick1) = rings[1].activation(&irqs[1]);
    dev.activate(Activation {
        features: VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_MQ,
        memory: mem.clone(),
        queues: vec![q0, q1],
    })
    .unwrap();
    assert!(dev.is_active());

    // Write on queue 0, read back on queue 1.
    let data = pattern(4096, 0x5a);
    let req = blk_request(&mut rings[0], blk::T_OUT, 8, &data);
    assert_eq!(complete(&mut rings[0], &kick0, &irqs[0], &req), blk::S_OK);
    let mut on_disk = vec![0u8; data.len()];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, data, "the image holds what the guest wrote");

    let req = blk_request(&mut rings[1], blk::T_IN, 8, &vec![0u8; 4096]);
    assert_eq!(complete(&mut rings[1], &kick1, &irqs[1], &req), blk::S_OK);
    assert_eq!(rings[1].read(req.buf, req.len), data);

    // Reset, then the driver sets the device up again from scratch.
    dev.reset().unwrap();
    assert!(!dev.is_active());
    kick0.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(irqs[0].status(), 0, "a reset device must not interrupt");

    let irq = Interrupt::new();
    let (mut ring, kick0) = activate_one(&mut dev, &mem, &irq, (0, 128), VIRTIO_F_VERSION_1);
    let second = pattern(1024, 0xc3);
    let req = blk_request(&mut ring, blk::T_OUT, 100, &second);
    assert_eq!(complete(&mut ring, &kick0, &irq, &req), blk::S_OK);
    let req = blk_request(&mut ring, blk::T_IN, 8, &vec![0u8; 4096]);
    assert_eq!(complete(&mut ring, &kick0, &irq, &req), blk::S_OK);
    assert_eq!(ring.read(req.buf, req.len), data, "data survives a reset");

    // Activating an active device resets it first.
    let (mut ring, kick1) = activate_one(
        &mut dev,
        &mem,
        &irq,
        (1, 32),
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_MQ,
    );
    let req = blk_request(&mut ring, blk::T_IN, 100, &vec![0u8; 1024]);
    assert_eq!(complete(&mut ring, &kick1, &irq, &req), blk::S_OK);
    assert_eq!(ring.read(req.buf, req.len), second);

    dev.reset().unwrap();
    drop(dev);
    daemon_thread.join().unwrap().unwrap();
}

/// A change that makes a queue activation invalid.
type Tweak = Box<dyn Fn(&mut QueueActivation)>;

#[test]
fn bad_activations_are_refused() {
    let (_watchdog, _dir, image, sock) = blk_setup();
    let listener = bind(&sock).unwrap();
    let mut daemon = blk_daemon(&image, 1);
    let daemon_thread =
        std::thread::spawn(move || daemon.serve_listener(&listener, ServeMode::Once));
    let mut dev = VhostUserFrontendDevice::connect(&sock, blk_options(1)).unwrap();
    let irq = Interrupt::new();

    // Anonymous memory cannot be shared with another process.
    let anon = GuestMemoryLog::from_ranges(&[(GuestAddress(MEM_GPA), MEM_SIZE)]).unwrap();
    let ring = queue_at(&anon, 0, 64);
    let (q, _) = ring.activation(&irq);
    let r = dev.activate(Activation {
        features: VIRTIO_F_VERSION_1,
        memory: anon,
        queues: vec![q],
    });
    assert!(matches!(r, Err(ControlError::Invalid(_))), "{r:?}");

    let mem = shared_guest_memory();
    let cases: Vec<(&str, Tweak, u64)> = vec![
        ("queue index", Box::new(|q| q.index = 1), VIRTIO_F_VERSION_1),
        ("queue size", Box::new(|q| q.size = 48), VIRTIO_F_VERSION_1),
        ("queue size", Box::new(|q| q.size = 512), VIRTIO_F_VERSION_1),
        (
            "ring outside memory",
            Box::new(|q| q.used_ring = MEM_GPA + MEM_SIZE as u64 - 16),
            VIRTIO_F_VERSION_1,
        ),
        ("features", Box::new(|_| {}), VIRTIO_F_VERSION_1 | (1 << 30)),
    ];
    for (what, tweak, features) in cases {
        let ring = queue_at(&mem, 0, 64);
        let (mut q, _) = ring.activation(&irq);
        tweak(&mut q);
        let r = dev.activate(Activation {
            features,
            memory: mem.clone(),
            queues: vec![q],
        });
        assert!(matches!(r, Err(ControlError::Invalid(_))), "{what}: {r:?}");
        assert!(!dev.is_active());
    }

    // The device still works after the refusals.
    let (mut ring, kick) = activate_one(&mut dev, &mem, &irq, (0, 64), VIRTIO_F_VERSION_1);
    let req = blk_request(&mut ring, blk::T_IN, 0, &vec![0u8; 512]);
    assert_eq!(complete(&mut ring, &kick, &irq, &req), blk::S_OK);
    drop(dev);
    daemon_thread.join().unwrap().unwrap();
}

#[test]
fn config_writes_and_change_notices() {
    let _ = env_logger::builder().is_test(true).try_init();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let options = FrontendOptions {
        config_size: TEST_CONFIG_SIZE as u32,
        ..FrontendOptions::new(TEST_DEVICE_TYPE, 1, 256)
    };
    let mut dev = VhostUserFrontendDevice::connect(&daemon.path, options).unwrap();
    let notices = Arc::new(AtomicUsize::new(0));
    let counter = notices.clone();
    dev.set_config_notifier(ConfigNotifier::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    let wait_notice = |n: usize| {
        let deadline = Instant::now() + WAIT;
        while notices.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "no config-change notice");
            std::thread::sleep(Duration::from_millis(2));
        }
    };

    let mut cfg = [0u8; TEST_CONFIG_SIZE];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg.to_vec(), TestDevice::initial_config());

    // A driver write goes to the backend (SET_CONFIG) and is seen at once.
    dev.write_config(4, &[1, 2, 3]).unwrap();
    let mut three = [0u8; 3];
    dev.read_config(4, &mut three);
    assert_eq!(three, [1, 2, 3]);
    // The test device announces every config write.
    wait_notice(1);

    // A change made by the backend on its own: the notice marks the cached
    // copy stale and the next read fetches it again.
    daemon.device.write_config(8, &[9, 8, 7, 6]).unwrap();
    wait_notice(2);
    let mut four = [0u8; 4];
    dev.read_config(8, &mut four);
    assert_eq!(four, [9, 8, 7, 6]);

    // Out-of-range writes are refused by the backend, not by a panic.
    assert!(is_external(dev.write_config(14, &[0; 8])));
    assert!(dev.is_connected(), "a refused request keeps the session");
}

/// Serve `daemon` on the first connection to `sock`, handing the test a
/// duplicate of the backend's end so it can cut the connection.
fn killable_backend<B: DeviceBackend>(
    sock: &Path,
    mut daemon: VhostUserDaemon<B>,
) -> (
    std::sync::mpsc::Receiver<UnixStream>,
    std::thread::JoinHandle<()>,
) {
    let listener = bind(sock).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        tx.send(stream.try_clone().unwrap()).unwrap();
        daemon.serve_stream(stream);
    });
    (rx, t)
}

#[test]
fn backend_death_is_an_error_not_a_panic() {
    let (_watchdog, _dir, image, sock) = blk_setup();
    let (backend_end, daemon_thread) = killable_backend(&sock, blk_daemon(&image, 1));
    let mut dev = VhostUserFrontendDevice::connect(&sock, blk_options(1)).unwrap();
    let backend_end = backend_end.recv().unwrap();

    let mem = shared_guest_memory();
    let irq = Interrupt::new();
    let (mut ring, kick) = activate_one(&mut dev, &mem, &irq, (0, 64), VIRTIO_F_VERSION_1);
    let req = blk_request(&mut ring, blk::T_IN, 0, &vec![0u8; 512]);
    assert_eq!(complete(&mut ring, &kick, &irq, &req), blk::S_OK);

    // The backend goes away mid-session (as its socket does when the
    // process dies).
    backend_end.shutdown(std::net::Shutdown::Both).unwrap();
    daemon_thread.join().unwrap();
    let deadline = Instant::now() + WAIT;
    while dev.is_connected() {
        assert!(Instant::now() < deadline, "hang-up not noticed");
        std::thread::sleep(Duration::from_millis(2));
    }

    assert!(is_external(dev.reset()));
    let ring = queue_at(&mem, 0, 64);
    let (q, _) = ring.activation(&irq);
    assert!(is_external(dev.activate(Activation {
        features: VIRTIO_F_VERSION_1,
        memory: mem.clone(),
        queues: vec![q],
    })));
    assert!(is_external(dev.write_config(0, &[0])));
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), IMAGE_SIZE / 512, "the cached copy");
}

/// A socket `name` in a new directory; a thread accepts one connection on
/// it and hands it to `serve`. Returns (directory, socket, thread).
fn accept_once(
    name: &str,
    serve: impl FnOnce(UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join(name);
    let listener = bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream);
    });
    (dir, sock, t)
}

#[test]
fn backend_dying_during_the_handshake_is_an_error() {
    let _watchdog = Watchdog::new(Duration::from_secs(60));
    let (_dir, sock, t) = accept_once("gone.sock", drop);
    let r = VhostUserFrontendDevice::connect(&sock, blk_options(1));
    // Depending on who sees the hang-up first: the request or the relay.
    assert!(
        matches!(
            r,
            Err(FrontendError::Request { .. } | FrontendError::Disconnected)
        ),
        "{r:?}"
    );
    t.join().unwrap();
}

#[test]
fn silent_backend_times_out() {
    let _watchdog = Watchdog::new(Duration::from_secs(60));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // Accept and never answer.
    let (_dir, sock, t) = accept_once("silent.sock", move |_stream| {
        let _ = rx.recv_timeout(WAIT);
    });
    let options = FrontendOptions {
        request_timeout: Some(Duration::from_millis(200)),
        ..blk_options(1)
    };
    let start = Instant::now();
    let r = VhostUserFrontendDevice::connect(&sock, options);
    assert!(matches!(r, Err(FrontendError::Request { .. })), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(tx);
    t.join().unwrap();
}

#[test]
fn missing_socket_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let options = FrontendOptions {
        connect_timeout: Duration::from_millis(100),
        ..blk_options(1)
    };
    let start = Instant::now();
    let r = VhostUserFrontendDevice::connect(dir.path().join("nobody.sock"), options);
    assert!(matches!(r, Err(FrontendError::Connect { .. })), "{r:?}");
    assert!(start.elapsed() >= Duration::from_millis(100));
}

// ---------------------------------------------------------------------------
// Device state across homes
// ---------------------------------------------------------------------------

/// A device whose state is a counter, kept in its own memory.
#[derive(Default)]
struct Stateful {
    value: std::sync::atomic::AtomicU64,
}

const STATEFUL_TYPE: u32 = 0x7e;

impl Stateful {
    fn get(&self) -> u64 {
        self.value.load(Ordering::SeqCst)
    }
    fn set(&self, v: u64) {
        self.value.store(v, Ordering::SeqCst);
    }
}

impl DeviceBackend for Stateful {
    type Vring = virtio_backend_kit::VringOwned;
    fn device_type(&self) -> u32 {
        STATEFUL_TYPE
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        64
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn handle_event(
        &self,
        _: virtio_backend_kit::DeviceEvent,
        _: &virtio_backend_kit::QueueSet<virtio_backend_kit::VringOwned>,
        _: usize,
    ) -> Result<(), virtio_backend_kit::BackendError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, virtio_backend_kit::BackendError> {
        Ok(self.get().to_le_bytes().to_vec())
    }
    fn restore_state(&self, data: &[u8]) -> Result<(), virtio_backend_kit::BackendError> {
        let bytes: [u8; 8] = data.try_into().map_err(|_| "state is not 8 bytes")?;
        self.set(u64::from_le_bytes(bytes));
        Ok(())
    }
}

fn one_queue(ring: &Ring, irq: &Interrupt, mem: &GuestMemoryLog) -> Activation {
    Activation {
        features: VIRTIO_F_VERSION_1,
        memory: mem.clone(),
        queues: vec![ring.activation(irq).0],
    }
}

/// A device's own state moves in process → vhost-user backend (loaded
/// through DEVICE_STATE) → in process (saved through DEVICE_STATE).
#[test]
fn device_state_crosses_homes_both_ways() {
    use virtio_backend_kit::core::DeviceCore;
    let mem = shared_guest_memory();
    let ring = queue_at(&mem, 0, 64);
    let irq = Interrupt::new();

    let first = Arc::new(Stateful::default());
    first.set(0x1122_3344);
    let mut core = DeviceCore::new(first).unwrap();
    DeviceControl::activate(&mut core, one_queue(&ring, &irq, &mem)).unwrap();
    let snap = DeviceControl::snapshot(&mut core).unwrap();
    assert_eq!(snap.device_state, 0x1122_3344u64.to_le_bytes());

    let daemon = spawn_daemon(Arc::new(Stateful::default()), ServeMode::Once);
    let options = FrontendOptions::new(STATEFUL_TYPE, 1, 64);
    let mut adapter = VhostUserFrontendDevice::connect(&daemon.path, options).unwrap();
    adapter.restore(snap, one_queue(&ring, &irq, &mem)).unwrap();
    assert_eq!(
        daemon.device.get(),
        0x1122_3344,
        "state not loaded into the backend"
    );

    // The backend's device moves on; its new state comes back.
    daemon.device.set(0x5566_7788);
    let snap = adapter.snapshot().unwrap();
    assert_eq!(snap.device_state, 0x5566_7788u64.to_le_bytes());

    let back = Arc::new(Stateful::default());
    let mut core = DeviceCore::new(back.clone()).unwrap();
    DeviceControl::restore(&mut core, snap, one_queue(&ring, &irq, &mem)).unwrap();
    assert_eq!(
        back.get(),
        0x5566_7788,
        "state lost on the way back in process"
    );
    println!("VBK-CROSSHOME device=stateful in-process->vhost-user->in-process state=ok");
}

/// A snapshot with device state cannot go to a backend without
/// DEVICE_STATE (qemu-storage-daemon's vhost-user-blk export here): the
/// restore fails and says why in its top-level message.
#[test]
fn device_state_for_a_backend_without_device_state_is_refused() {
    if !process::have("qemu-storage-daemon") {
        assert!(
            std::env::var_os("VBK_ALLOW_SKIP_QEMU").is_some(),
            "qemu-storage-daemon not installed (VBK_ALLOW_SKIP_QEMU=1 to skip)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = blk_image(dir.path());
    let (mut qsd, sock) = process::qsd_blk_export(dir.path(), &img);
    let mut adapter = VhostUserFrontendDevice::connect(&sock, blk_options(1)).unwrap();

    let mem = shared_guest_memory();
    let ring = queue_at(&mem, 0, 64);
    let irq = Interrupt::new();
    let mut core = virtio_backend_kit::core::DeviceCore::new(Arc::new(
        BlkDevice::new(Target::null(IMAGE_SIZE), BlkConfig::default()).unwrap(),
    ))
    .unwrap();
    DeviceControl::activate(&mut core, one_queue(&ring, &irq, &mem)).unwrap();
    let mut snap = DeviceControl::snapshot(&mut core).unwrap();
    snap.device_state = vec![7; 19];
    let err = adapter
        .restore(snap, one_queue(&ring, &irq, &mem))
        .expect_err("device state given to a backend that cannot load it");
    let msg = err.to_string();
    println!("VBK-CROSSHOME refused: {msg}");
    assert!(
        msg.contains("19 bytes of device state") && msg.contains("DEVICE_STATE"),
        "the reason is not in the top-level message: {msg}"
    );
    drop(adapter);

    // A device the VMM knows keeps state (a console, say) cannot be
    // snapshotted through this backend: refused, and it keeps running.
    let options = FrontendOptions {
        stateful: true,
        ..blk_options(1)
    };
    let mut adapter = VhostUserFrontendDevice::connect(&sock, options).unwrap();
    adapter.activate(one_queue(&ring, &irq, &mem)).unwrap();
    let msg = adapter
        .snapshot()
        .expect_err("state would be lost")
        .to_string();
    println!("VBK-CROSSHOME refused: {msg}");
    assert!(
        msg.contains("does not offer DEVICE_STATE to save it"),
        "{msg}"
    );
    assert!(adapter.is_connected());
    drop(adapter);
    qsd.stop(Duration::from_secs(5));
}

/// The adapter learns from a kit backend what vhost-user cannot tell: the
/// config size (none was given here) and the device type, checked.
#[test]
fn identity_is_learned_from_a_kit_backend() {
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::KeepServing);
    let options = FrontendOptions {
        config_size: 0,
        ..FrontendOptions::new(TEST_DEVICE_TYPE, 4, 256)
    };
    let dev = VhostUserFrontendDevice::connect(&daemon.path, options).unwrap();
    assert_eq!(
        dev.num_queues(),
        1,
        "queue count not taken from the backend"
    );
    let mut cfg = [0u8; TEST_CONFIG_SIZE];
    dev.read_config(0, &mut cfg);
    assert_eq!(
        cfg.to_vec(),
        TestDevice::initial_config(),
        "config read as zeros"
    );
    drop(dev);

    // A transport for another kind of device is refused at connect.
    let wrong = FrontendOptions::new(VIRTIO_ID_BLOCK, 1, 256);
    match VhostUserFrontendDevice::connect(&daemon.path, wrong) {
        Err(FrontendError::WrongDevice { expected, found }) => {
            assert_eq!((expected, found), (VIRTIO_ID_BLOCK, TEST_DEVICE_TYPE));
        }
        other => panic!("expected WrongDevice, got {:?}", other.err()),
    }
}

// ---------------------------------------------------------------------------
// The console: a device with state of its own, moving under traffic
// ---------------------------------------------------------------------------

/// The guest side of a one-port console: receiveq and transmitq.
struct ConsoleGuest {
    rx: Ring,
    tx: Ring,
    /// Receive buffers posted, by head: (gpa, len).
    posted: std::collections::HashMap<u16, u64>,
    next_buf: u64,
}

const RX_BUF: u32 = 4096;

impl ConsoleGuest {
    fn new(mem: &GuestMemoryLog) -> Self {
        let rx = queue_at(mem, 0, 64);
        let data = rx.data_area();
        ConsoleGuest {
            rx,
            tx: queue_at(mem, 1, 64),
            posted: std::collections::HashMap::new(),
            next_buf: data,
        }
    }

    fn activation(&self, irq: &Interrupt, mem: &GuestMemoryLog) -> (Activation, [EventFd; 2]) {
        let (rx, rx_kick) = self.rx.activation(irq);
        let (tx, tx_kick) = self.tx.activation(irq);
        let activation = Activation {
            features: VIRTIO_F_VERSION_1,
            memory: mem.clone(),
            queues: vec![rx, tx],
        };
        (activation, [rx_kick, tx_kick])
    }

    /// Post `n` receive buffers and kick.
    fn post(&mut self, n: usize, kick: &EventFd) {
        for _ in 0..n {
            let gpa = self.next_buf;
            self.next_buf += u64::from(RX_BUF);
            if self.next_buf + u64::from(RX_BUF) > self.rx.data_area() + 0x8_0000 {
                self.next_buf = self.rx.data_area();
            }
            let head = self.rx.add_chain(&[(gpa, RX_BUF, true)]);
            self.posted.insert(head, gpa);
        }
        kick.write(1).unwrap();
    }

    /// Collect received bytes until `want` have arrived.
    fn receive(&mut self, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        while got.len() < want {
            match self.rx.pop_used() {
                Some((id, len)) => {
                    let gpa = self.posted.remove(&(id as u16)).expect("a posted buffer");
                    got.extend(self.rx.read(gpa, len as usize));
                }
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "received {} of {want} bytes",
                        got.len()
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        got
    }

    /// Transmit `bytes` and wait for the device to take them.
    fn transmit(&mut self, bytes: &[u8], kick: &EventFd) {
        let gpa = self.tx.data_area();
        self.tx.write(gpa, bytes);
        self.tx.add_chain(&[(gpa, bytes.len() as u32, false)]);
        kick.write(1).unwrap();
        let deadline = Instant::now() + WAIT;
        while self.tx.pop_used().is_none() {
            assert!(Instant::now() < deadline, "transmit never completed");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A console for the host pipes: (device, host writes here, host reads here).
fn console() -> (Arc<vmm_example::devices::ConsoleDevice>, File, File) {
    let (input, host_in) = common::pipe();
    let (host_out, output) = common::pipe();
    let dev = vmm_example::devices::ConsoleDevice::new(input, output, 64).unwrap();
    (Arc::new(dev), host_in, host_out)
}

fn read_exactly(from: &mut File, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = vec![0u8; n];
    from.read_exact(&mut v).unwrap();
    v
}

/// Host input waiting for the guest (more than the guest has buffers for)
/// moves with the console: in process → `vhost-user` (the kit's daemon,
/// through the adapter and DEVICE_STATE) → in process, and every byte
/// arrives in order; guest output reaches the host in every home.
#[test]
fn console_moves_between_homes_with_bytes_pending() {
    use std::io::Write;
    use virtio_backend_kit::core::DeviceCore;
    use vmm_example::devices::VIRTIO_ID_CONSOLE;
    let mem = shared_guest_memory();
    let irq = Interrupt::new();
    let mut guest = ConsoleGuest::new(&mem);
    let input: Vec<u8> = (0..40_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut delivered = Vec::new();

    // In process: 20000 bytes typed, room for 8192 of them.
    let (dev, mut host_in, mut host_out) = console();
    let mut core = DeviceCore::new(dev.clone()).unwrap();
    let (activation, kicks) = guest.activation(&irq, &mem);
    DeviceControl::activate(&mut core, activation).unwrap();
    host_in.write_all(&input[..20_000]).unwrap();
    guest.post(2, &kicks[0]);
    delivered.extend(guest.receive(8192));
    let deadline = Instant::now() + WAIT;
    while dev.pending() != 20_000 - 8192 {
        assert!(Instant::now() < deadline, "pending {} bytes", dev.pending());
        std::thread::sleep(Duration::from_millis(2));
    }
    guest.transmit(b"in process\n", &kicks[1]);
    assert_eq!(read_exactly(&mut host_out, 11), b"in process\n");
    let snap = DeviceControl::snapshot(&mut core).unwrap();
    let pending = snap.device_state.len() - 1;
    println!("VBK-CROSSHOME device=console from=in-process to=vhost-user pending={pending}");
    drop(core);

    // vhost-user: the daemon's console gets the pending bytes.
    let (dev, mut host_in, mut host_out) = console();
    let daemon = spawn_daemon(dev.clone(), ServeMode::Once);
    let options = FrontendOptions::new(VIRTIO_ID_CONSOLE, 2, 64);
    let mut adapter = VhostUserFrontendDevice::connect(&daemon.path, options).unwrap();
    let (activation, kicks) = guest.activation(&irq, &mem);
    adapter.restore(snap, activation).unwrap();
    guest.post(3, &kicks[0]);
    delivered.extend(guest.receive(pending));
    guest.transmit(b"vhost-user\n", &kicks[1]);
    assert_eq!(read_exactly(&mut host_out, 11), b"vhost-user\n");
    // More typed while the guest has no buffers: pending in the daemon.
    host_in.write_all(&input[20_000..]).unwrap();
    let deadline = Instant::now() + WAIT;
    while dev.pending() != 20_000 {
        assert!(Instant::now() < deadline, "pending {} bytes", dev.pending());
        std::thread::sleep(Duration::from_millis(2));
    }
    let snap = adapter.snapshot().unwrap();
    let pending = snap.device_state.len() - 1;
    println!("VBK-CROSSHOME device=console from=vhost-user to=in-process pending={pending}");
    drop(adapter);

    // Back in process.
    let (dev, _host_in, _host_out) = console();
    let mut core = DeviceCore::new(dev).unwrap();
    let (activation, kicks) = guest.activation(&irq, &mem);
    DeviceControl::restore(&mut core, snap, activation).unwrap();
    guest.post(5, &kicks[0]);
    delivered.extend(guest.receive(pending));
    let lost = input.len() as i64 - delivered.len() as i64;
    println!(
        "VBK-CROSSHOME device=console delivered={} lost={lost}",
        delivered.len()
    );
    assert_eq!(delivered, input, "host input lost or reordered on the way");
}

/// The `vhost-user-console` daemon, a process of its own: what its stdin
/// gets reaches the guest, what the guest writes comes out of its stdout.
#[test]
fn vhost_user_console_daemon_carries_stdin_and_stdout() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    use vmm_example::devices::VIRTIO_ID_CONSOLE;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("console.sock");
    let bin = process::binary("vhost-user-console").unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(bin)
        .args(["--socket-path", sock.to_str().unwrap(), "--once"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The config size and queue count come from the backend.
    let options = FrontendOptions {
        config_size: 0,
        ..FrontendOptions::new(VIRTIO_ID_CONSOLE, 2, 64)
    };
    let mut adapter = VhostUserFrontendDevice::connect(&sock, options).unwrap();
    let mem = shared_guest_memory();
    let irq = Interrupt::new();
    let mut guest = ConsoleGuest::new(&mem);
    let (activation, kicks) = guest.activation(&irq, &mem);
    adapter.activate(activation).unwrap();
    guest.post(2, &kicks[0]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed on the host\n").unwrap();
    assert_eq!(guest.receive(18), b"typed on the host\n");
    guest.transmit(b"printed by the guest\n", &kicks[1]);
    let mut out = vec![0u8; 21];
    child.stdout.as_mut().unwrap().read_exact(&mut out).unwrap();
    assert_eq!(out, b"printed by the guest\n");
    drop(adapter);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "vhost-user-console --once exited with {status}"
    );
}
