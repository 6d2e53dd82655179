// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Cost of one virtio-blk request round trip through the virtio-mmio
//! transport, side by side in the three homes the conformance suite covers:
//! in process on worker threads, in process on an `event-manager` loop, and
//! out of process (the `vhost-user-blk` daemon behind the frontend adapter).
//!
//! Each request: the driver queues a 4 KiB read on a null target, signals
//! the kick eventfd (what a KVM ioeventfd does), waits for the interrupt
//! eventfd (a KVM irqfd) and acknowledges InterruptStatus. The KVM part
//! (guest exit into the ioeventfd) is measured by `tests/kvm_inprocess.rs`.
//!
//! Run: `cargo build --release --workspace && cargo bench --bench inprocess_roundtrip`

#[path = "../tests/mmio_driver/mod.rs"]
mod mmio_driver;
#[path = "../tests/process/mod.rs"]
mod process;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use mmio_driver::{guest_memory, Driver};
use virtio_backend_kit::core::DeviceCore;
use virtio_backend_kit::frontend::{FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::mmio::MmioTransport;
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const REQUESTS: usize = 20_000;
const ROUNDS: usize = 5;
const SIZE: u64 = 1 << 30;

fn device() -> Arc<BlkDevice> {
    let cfg = BlkConfig {
        queues: 1,
        queue_size: 64,
        ..BlkConfig::default()
    };
    Arc::new(BlkDevice::new(Target::null(SIZE), cfg).expect("null device"))
}

fn measure(driver: &mut Driver) -> Vec<f64> {
    driver.negotiate_and_start(1, 64);
    for _ in 0..1000 {
        driver.blk_read(0, 0, 4096);
    }
    let mut per_request = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for i in 0..REQUESTS {
            let (status, _) = driver.blk_read(0, (i as u64 * 8) % (SIZE / 512 - 8), 4096);
            assert_eq!(status, 0);
        }
        per_request.push(start.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64);
    }
    driver.reset();
    per_request
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut rows = Vec::new();

    let mem = guest_memory();
    let core = DeviceCore::new(device()).expect("core");
    let t = MmioTransport::new(Box::new(core), mem.clone()).expect("transport");
    rows.push((
        "in process, worker thread",
        median(measure(&mut Driver::new(t, mem))),
    ));

    let mem = guest_memory();
    let (core, subscribers) = DeviceCore::with_event_loop(device()).expect("core");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_loop = stop.clone();
    let event_loop = std::thread::spawn(move || {
        let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().expect("em");
        for s in subscribers {
            em.add_subscriber(Box::new(s));
        }
        while !stop_loop.load(Ordering::SeqCst) {
            let _ = em.run_with_timeout(50);
        }
    });
    let t = MmioTransport::new(Box::new(core), mem.clone()).expect("transport");
    rows.push((
        "in process, event-manager loop",
        median(measure(&mut Driver::new(t, mem))),
    ));
    stop.store(true, Ordering::SeqCst);
    let _ = event_loop.join();

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("blk.sock");
    match process::binary("vhost-user-blk") {
        Ok(bin) => {
            let mut cmd = std::process::Command::new(bin);
            cmd.arg("--socket").arg(&sock).args([
                "--null",
                "--size",
                &SIZE.to_string(),
                "--queue-size",
                "64",
            ]);
            let mut daemon =
                process::Backend::spawn("vhost-user-blk", cmd, dir.path().join("daemon.log"));
            daemon.wait_for_socket(&sock);
            let mem = guest_memory();
            let adapter = VhostUserFrontendDevice::connect(&sock, FrontendOptions::new(2, 1, 64))
                .expect("adapter");
            let t = MmioTransport::new(Box::new(adapter), mem.clone()).expect("transport");
            let mut driver = Driver::new(t, mem);
            rows.push((
                "out of process, vhost-user-blk",
                median(measure(&mut driver)),
            ));
            drop(driver);
            daemon.stop(Duration::from_secs(5));
        }
        Err(e) => eprintln!("out-of-process row skipped: {e}"),
    }

    println!("\n| home | µs per request (median of {ROUNDS} x {REQUESTS}) | vs worker thread |");
    println!("|---|---|---|");
    let base = rows[0].1;
    for (name, us) in &rows {
        println!("| {name} | {us:.2} | {:.2}x |", us / base);
    }
}
