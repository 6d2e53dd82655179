// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty logging through the VMM-side vhost-user adapter, against the kit's
//! daemon on a real socket with memfd guest memory: the backend marks what
//! it writes (used ring, device-writable buffers) in the VMM's
//! `SharedDirtyLog` while logging is on, and nothing once it is off.
//!
//! The test plays the transport, as tests/frontend_adapter.rs does. A
//! backend without LOG_SHMFD is the kit's daemon behind a proxy that hides
//! it (the daemon always offers its full set). Its own
//! ring writes go through guest memory that does not log, so every page in
//! the log was marked by the backend.

mod common;
mod process;
mod vhost_proxy;

use std::fs::File;
use std::time::{Duration, Instant};

use common::{blk, spawn_daemon, transform, TestDevice};
use virtio_backend_kit::core::{Activation, ControlError, DeviceControl};
use virtio_backend_kit::frontend::{FrontendError, FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::testing::{self, Interrupt, SplitQueueDriver};
use virtio_backend_kit::vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_backend_kit::vhost_user::ServeMode;
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::{GuestMemoryLog, SharedDirtyLog};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Guest memory at a non-zero gpa, so page numbers are not offsets.
const MEM_GPA: u64 = 0x4000_0000;
const MEM_SIZE: usize = 4 << 20;
const PAGE: u64 = 4096;
const WAIT: Duration = Duration::from_secs(5);

fn options() -> FrontendOptions {
    common::test_device_options(WAIT)
}

/// memfd guest memory and a dirty log covering all of it.
fn memory_and_log() -> (GuestMemoryLog, SharedDirtyLog) {
    let _ = env_logger::builder().is_test(true).try_init();
    let mem = testing::shared_guest_memory(MEM_GPA, MEM_SIZE).unwrap();
    let log = SharedDirtyLog::new(MEM_GPA + MEM_SIZE as u64).unwrap();
    (mem, log)
}

/// The guest's one queue and the transport's end of it.
struct Guest {
    ring: SplitQueueDriver,
    irq: Interrupt,
}

impl Guest {
    fn new(mem: &GuestMemoryLog) -> Self {
        Guest {
            ring: SplitQueueDriver::new(mem, 0, 64, MEM_GPA),
            irq: Interrupt::new(),
        }
    }

    /// What the transport hands the device at DRIVER_OK, and the kick.
    fn activation(&self) -> (Activation, EventFd) {
        let (q, kick) = self.ring.activation(&self.irq);
        let activation = Activation {
            features: VIRTIO_F_VERSION_1,
            memory: self.ring.memory().clone(),
            queues: vec![q],
        };
        (activation, kick)
    }

    fn used_ring_page(&self) -> u64 {
        self.ring.rings().2 / PAGE
    }

    /// One request: `input` in a device-readable buffer at `read_gpa`, a
    /// device-writable buffer of the same size at `write_gpa`. Waits for
    /// the completion and checks what the device wrote.
    fn request(&mut self, kick: &EventFd, read_gpa: u64, write_gpa: u64, input: &[u8]) {
        self.ring.write(read_gpa, input);
        self.ring.write(write_gpa, &vec![0u8; input.len()]);
        let len = input.len() as u32;
        let head = self
            .ring
            .add_chain(&[(read_gpa, len, false), (write_gpa, len, true)]);
        kick.write(1).unwrap();
        let deadline = Instant::now() + WAIT;
        let (id, written) = loop {
            if let Some(used) = self.ring.pop_used() {
                break used;
            }
            assert!(Instant::now() < deadline, "request never completed");
            self.irq.wait(Duration::from_millis(20));
        };
        assert_eq!((id, written), (u32::from(head), len));
        assert_eq!(self.ring.read(write_gpa, input.len()), transform(input));
    }
}

/// A request reading page `data + 0` and writing page `data + 2`; returns
/// the number of the page written.
fn read_one_page_write_another(guest: &mut Guest, kick: &EventFd, seed: u8) -> u64 {
    let data = guest.ring.data_area();
    let input: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ seed).collect();
    guest.request(kick, data, data + 2 * PAGE + 0x100, &input);
    (data + 2 * PAGE) / PAGE
}

/// The error inside an adapter's `ControlError::External`.
fn frontend_error(e: &ControlError) -> &FrontendError {
    match e {
        ControlError::External(inner) => inner
            .downcast_ref::<FrontendError>()
            .unwrap_or_else(|| panic!("not a FrontendError: {inner}")),
        other => panic!("not an external error: {other:?}"),
    }
}

#[test]
fn completions_are_logged_only_while_logging_is_on() {
    let (mem, log) = memory_and_log();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let mut dev = VhostUserFrontendDevice::connect(&daemon.path, options()).unwrap();
    assert!(
        dev.protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD not negotiated: {:?}",
        dev.protocol_features()
    );
    let mut guest = Guest::new(&mem);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();

    // Before logging: the backend has no log, nothing is marked.
    read_one_page_write_another(&mut guest, &kick, 1);
    assert_eq!(log.take_dirty_pages(), Vec::<u64>::new());

    // On while the device runs.
    dev.set_dirty_log(Some(&log)).unwrap();
    assert!(dev.is_logging());
    assert_eq!(log.take_dirty_pages(), Vec::<u64>::new(), "marked unasked");
    let written = read_one_page_write_another(&mut guest, &kick, 2);
    let mut want = vec![guest.used_ring_page(), written];
    want.sort();
    assert_eq!(
        log.take_dirty_pages(),
        want,
        "the used ring page and the written buffer's page, not the page read"
    );
    // Each completion marks its pages again.
    let written = read_one_page_write_another(&mut guest, &kick, 3);
    let mut want = vec![guest.used_ring_page(), written];
    want.sort();
    assert_eq!(log.take_dirty_pages(), want);

    // Off: completions go on, unlogged.
    dev.set_dirty_log(None).unwrap();
    assert!(!dev.is_logging());
    read_one_page_write_another(&mut guest, &kick, 4);
    read_one_page_write_another(&mut guest, &kick, 5);
    assert_eq!(
        log.take_dirty_pages(),
        Vec::<u64>::new(),
        "logged while off"
    );
    // Turning it off twice is fine.
    dev.set_dirty_log(None).unwrap();
}

#[test]
fn logging_turned_on_before_activation_applies_at_activation() {
    let (mem, log) = memory_and_log();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let mut dev = VhostUserFrontendDevice::connect(&daemon.path, options()).unwrap();
    dev.set_dirty_log(Some(&log)).unwrap();
    assert!(dev.is_logging() && !dev.is_active());

    let mut guest = Guest::new(&mem);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    let written = read_one_page_write_another(&mut guest, &kick, 6);
    let mut want = vec![guest.used_ring_page(), written];
    want.sort();
    assert_eq!(log.take_dirty_pages(), want, "not logged after activation");

    // A reset and a new activation while logging is on log again.
    dev.reset().unwrap();
    let mut guest = Guest::new(&mem);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    let written = read_one_page_write_another(&mut guest, &kick, 7);
    let mut want = vec![guest.used_ring_page(), written];
    want.sort();
    assert_eq!(
        log.take_dirty_pages(),
        want,
        "not logged after reactivation"
    );

    // So does a restore (the device moving back in after a snapshot).
    let snapshot = dev.snapshot().unwrap();
    log.take_dirty_pages();
    let (activation, kick) = guest.activation();
    dev.restore(snapshot, activation).unwrap();
    let written = read_one_page_write_another(&mut guest, &kick, 8);
    let mut want = vec![guest.used_ring_page(), written];
    want.sort();
    assert_eq!(log.take_dirty_pages(), want, "not logged after a restore");
}

#[test]
fn a_backend_without_log_shmfd_is_refused_and_keeps_running() {
    let (mem, log) = memory_and_log();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let filter = vhost_proxy::Filter {
        hidden_protocol: VhostUserProtocolFeatures::LOG_SHMFD.bits(),
        ..Default::default()
    };
    let (_dir, sock, proxy) = vhost_proxy::spawn(daemon.path.clone(), filter);
    let mut dev = VhostUserFrontendDevice::connect(&sock, options()).unwrap();
    assert!(!dev
        .protocol_features()
        .contains(VhostUserProtocolFeatures::LOG_SHMFD));
    let mut guest = Guest::new(&mem);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    read_one_page_write_another(&mut guest, &kick, 9);

    let err = dev.set_dirty_log(Some(&log)).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::DirtyLogUnsupported("LOG_SHMFD")
        ),
        "{err:?}"
    );
    let msg = virtio_backend_kit::error_chain(&err);
    assert!(
        msg.contains("cannot log dirty pages") && msg.contains("LOG_SHMFD"),
        "{msg}"
    );
    assert!(!dev.is_logging());
    assert!(dev.is_connected() && dev.is_active());

    // The device keeps running, and nothing was handed a log.
    read_one_page_write_another(&mut guest, &kick, 10);
    assert_eq!(log.take_dirty_pages(), Vec::<u64>::new());
    drop(dev);
    proxy.join().unwrap();
}

/// qemu-storage-daemon's vhost-user-blk export (libvhost-user) takes the
/// log (its `SET_LOG_BASE` reply is a u64, not the kit daemon's echo) and
/// marks the buffers it fills and the used ring, not the header it reads.
#[test]
fn qemu_storage_daemon_logs_used_ring_and_written_buffers() {
    if !process::have("qemu-storage-daemon") {
        assert!(
            std::env::var_os("VBK_ALLOW_SKIP_QEMU").is_some(),
            "qemu-storage-daemon not installed (VBK_ALLOW_SKIP_QEMU=1 to skip)"
        );
        return;
    }
    let (mem, log) = memory_and_log();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let (mut qsd, sock) = process::qsd_blk_export(dir.path(), &img);
    let options = FrontendOptions {
        connect_timeout: WAIT,
        request_timeout: Some(WAIT),
        ..FrontendOptions::new(2, 1, 256)
    };
    let mut dev = VhostUserFrontendDevice::connect(&sock, options).unwrap();
    let mut guest = Guest::new(&mem);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    dev.set_dirty_log(Some(&log)).unwrap();

    // A read of sector 0: the header is only read, the data buffer and
    // the status byte are written, each on a page of its own.
    let data = guest.ring.data_area();
    let (hdr, buf, status) = (data, data + 2 * PAGE, data + 4 * PAGE);
    guest.ring.write(hdr, &blk::header(blk::T_IN, 0));
    guest.ring.write(status, &[0xff]);
    let head = guest
        .ring
        .add_chain(&[(hdr, 16, false), (buf, 512, true), (status, 1, true)]);
    kick.write(1).unwrap();
    let deadline = Instant::now() + WAIT;
    let (id, _) = loop {
        if let Some(used) = guest.ring.pop_used() {
            break used;
        }
        assert!(Instant::now() < deadline, "request never completed");
        guest.irq.wait(Duration::from_millis(20));
    };
    assert_eq!(id, u32::from(head));
    assert_eq!(guest.ring.read(status, 1), [blk::S_OK]);
    let mut want = vec![guest.used_ring_page(), buf / PAGE, status / PAGE];
    want.sort();
    assert_eq!(log.take_dirty_pages(), want);

    dev.set_dirty_log(None).unwrap();
    drop(dev);
    // It serves on after the adapter leaves: stop it right away.
    qsd.stop(Duration::ZERO);
}
