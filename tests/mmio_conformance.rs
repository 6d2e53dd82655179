// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One driver-side conformance suite for the in-process home, run against
//! the reference virtio-blk device in every set-up:
//!
//! - in process, data plane on the kit's worker threads;
//! - in process, data plane on an `event-manager` loop;
//! - out of process: the same virtio-mmio transport backed by the
//!   `vhost-user-blk` daemon through the vhost-user frontend adapter.
//!
//! The driver programs the virtio-mmio registers like a guest would, lays out
//! virtio-blk requests in memfd guest memory, notifies through the kick
//! eventfd (what a KVM ioeventfd does), waits for the interrupt eventfd (a
//! KVM irqfd) and checks InterruptStatus. Each set-up produces a transcript of
//! results; all transcripts must be identical.

mod event_loop;
mod mmio_driver;
mod process;

use std::fs::File;
use std::sync::Arc;

use event_loop::EventLoop;
use mmio_driver::{guest_memory, Driver};
use process::Backend;
use virtio_backend_kit::core::DeviceCore;
use virtio_backend_kit::frontend::{FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::mmio::MmioTransport;
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const IMAGE_SIZE: u64 = 4 << 20;

fn image(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("disk.raw");
    File::create(&path).unwrap().set_len(IMAGE_SIZE).unwrap();
    path
}

fn blk(path: &std::path::Path) -> Arc<BlkDevice> {
    let cfg = BlkConfig {
        queues: 2,
        queue_size: 64,
        ..BlkConfig::default()
    };
    Arc::new(BlkDevice::new(Target::open_image(path, false).unwrap(), cfg).unwrap())
}

/// The suite: returns a transcript of what the device answered.
fn suite(driver: &mut Driver) -> Vec<String> {
    let mut log = Vec::new();
    log.push(format!("device_id={}", driver.device_id()));
    log.push(format!("capacity_sectors={}", driver.config_u64(0)));
    log.push(format!("num_queues_cfg={}", driver.config_u16(34)));
    driver.negotiate_and_start(2, 64);
    log.push(format!("status={:#x}", driver.status()));
    for q in 0..2u16 {
        let data: Vec<u8> = (0..8192u32).map(|i| (i as u8) ^ (q as u8 * 0x55)).collect();
        let sector = 64 * u64::from(q);
        log.push(format!("q{q} write={}", driver.blk_write(q, sector, &data)));
        let (st, back) = driver.blk_read(q, sector, data.len());
        log.push(format!("q{q} read={st} same={}", back == data));
        log.push(format!("q{q} flush={}", driver.blk_simple(q, 4, 0)));
        let (st, id) = driver.blk_get_id(q);
        log.push(format!(
            "q{q} get_id={st} prefix={}",
            String::from_utf8_lossy(&id[..4])
        ));
        let (st, _) = driver.blk_read(q, IMAGE_SIZE / 512, 512);
        log.push(format!("q{q} read_past_end={st}"));
        log.push(format!(
            "q{q} unknown_type={}",
            driver.blk_simple(q, 0x7777, 0)
        ));
    }
    // A request the device cannot complete honestly (no writable status
    // byte): not put on the used ring; DEVICE_NEEDS_RESET instead.
    let (needs_reset, config_irq, completed) = driver.blk_without_status_byte(1);
    log.push(format!(
        "no_status_byte needs_reset={needs_reset} config_irq={config_irq} completed={completed}"
    ));
    log.push(format!("interrupts_seen={}", driver.interrupts() > 0));
    driver.reset();
    log.push(format!("after_reset_status={:#x}", driver.status()));
    // The device comes back after a reset.
    driver.negotiate_and_start(1, 64);
    let (st, back) = driver.blk_read(0, 64, 8192);
    log.push(format!("reread={st} first={:#x}", back[1]));
    driver.reset();
    log
}

fn check_image(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; 8192];
    f.read_exact_at(&mut buf, 64 * 512).unwrap();
    assert!(buf.iter().enumerate().all(|(i, b)| *b == (i as u8) ^ 0x55));
}

fn in_process_worker_threads() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let mem = guest_memory();
    let core = DeviceCore::new(blk(&path)).unwrap();
    let transport = MmioTransport::new(Box::new(core), mem.clone()).unwrap();
    let log = suite(&mut Driver::new(transport, mem));
    check_image(&path);
    log
}

fn in_process_event_manager() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let mem = guest_memory();
    let (core, subscribers) = DeviceCore::with_event_loop(blk(&path)).unwrap();
    let event_loop = EventLoop::spawn(subscribers);
    let transport = MmioTransport::new(Box::new(core), mem.clone()).unwrap();
    let log = suite(&mut Driver::new(transport, mem));
    event_loop.stop();
    check_image(&path);
    log
}

fn out_of_process_vhost_user_blk() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir);
    let sock = dir.path().join("blk.sock");
    let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--image")
        .arg(&path)
        .args(["--queues", "2", "--queue-size", "64"]);
    let mut daemon = Backend::spawn("vhost-user-blk", cmd, dir.path().join("daemon.log"));
    daemon.wait_for_socket(&sock);
    let mem = guest_memory();
    let adapter = VhostUserFrontendDevice::connect(&sock, FrontendOptions::new(2, 2, 64))
        .unwrap_or_else(|e| panic!("adapter: {e}"));
    let transport = MmioTransport::new(Box::new(adapter), mem.clone()).unwrap();
    let mut driver = Driver::new(transport, mem);
    let log = suite(&mut driver);
    drop(driver);
    daemon.stop(std::time::Duration::from_secs(5));
    check_image(&path);
    log
}

#[test]
fn same_results_in_every_home() {
    let threads = in_process_worker_threads();
    let event_loop = in_process_event_manager();
    let out_of_process = out_of_process_vhost_user_blk();
    for line in &threads {
        println!("VBK-CONFORMANCE {line}");
    }
    assert_eq!(threads, event_loop, "worker threads vs event-manager");
    assert_eq!(threads, out_of_process, "in process vs vhost-user-blk");
    assert!(threads.iter().any(|l| l == "q1 read=0 same=true"));
    assert!(threads.iter().any(|l| l == "q0 read_past_end=1"));
    assert!(threads.iter().any(|l| l == "q0 unknown_type=2"));
    assert!(threads
        .iter()
        .any(|l| l == "no_status_byte needs_reset=true config_irq=true completed=false"));
}
