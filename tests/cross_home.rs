// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Moving a running device between homes without losing a request: the
//! reference virtio-blk device runs in process behind the virtio-mmio
//! transport, is snapshotted (through the versioned envelope), restored into
//! a `vhost-user-blk` process behind the same transport via the frontend
//! adapter, and moved back in process. The driver's rings carry on across
//! both moves; every write is read back and the image file is checked.

mod mmio_driver;
mod process;

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmio_driver::{guest_memory, Driver};
use process::Backend;
use virtio_backend_kit::core::DeviceCore;
use virtio_backend_kit::frontend::{FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::mmio::MmioTransport;
use virtio_backend_kit::snapshot;
use virtio_backend_kit::GuestMemoryLog;
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const IMAGE_SIZE: u64 = 8 << 20;
const QUEUES: u16 = 2;

fn record(n: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (n * 131 + i * 7) as u8).collect()
}

/// Write records `range` alternating queues, then read each back.
fn traffic(d: &mut Driver, range: std::ops::Range<u64>) -> u64 {
    for n in range.clone() {
        assert_eq!(
            d.blk_write((n % 2) as u16, n * 8, &record(n)),
            0,
            "write {n}"
        );
    }
    for n in range.clone() {
        let (st, data) = d.blk_read(((n + 1) % 2) as u16, n * 8, 4096);
        assert_eq!(st, 0);
        assert_eq!(data, record(n), "record {n} corrupted");
    }
    range.end - range.start
}

fn in_process(path: &std::path::Path) -> Box<DeviceCore<BlkDevice>> {
    let cfg = BlkConfig {
        queues: QUEUES,
        queue_size: 64,
        ..BlkConfig::default()
    };
    let dev = BlkDevice::new(Target::open_image(path, false).unwrap(), cfg).unwrap();
    Box::new(DeviceCore::new(Arc::new(dev)).unwrap())
}

/// Snapshot through the envelope, as a file would carry it.
fn cut(d: &mut Driver) -> (snapshot::DeviceSnapshot, usize, Instant) {
    let start = Instant::now();
    let snap = d.t.snapshot().expect("snapshot");
    let bytes = snapshot::encode(&snap).expect("encode");
    let back = snapshot::decode(&bytes).expect("decode");
    assert_eq!(back, snap);
    (back, bytes.len(), start)
}

/// A fresh image in a new directory and a started driver of the device
/// in process on it.
fn in_process_rig() -> (tempfile::TempDir, PathBuf, GuestMemoryLog, Driver) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    File::create(&path).unwrap().set_len(IMAGE_SIZE).unwrap();
    let mem = guest_memory();
    let t = MmioTransport::new(in_process(&path), mem.clone()).unwrap();
    let mut d = Driver::new(t, mem.clone());
    d.negotiate_and_start(QUEUES, 64);
    (dir, path, mem, d)
}

/// Move `d`'s device to the home `restore` makes of its snapshot, cut
/// through the envelope; records `records` then go through the new home,
/// the first of them ending the downtime. Prints the `VBK-MOVE` line of
/// move `what`; returns the records done.
fn move_home(
    d: &mut Driver,
    what: &str,
    records: Range<u64>,
    restore: impl FnOnce(snapshot::DeviceSnapshot) -> MmioTransport,
) -> u64 {
    let (snap, size, start) = cut(d);
    let in_flight: usize = snap.queues.iter().map(|q| q.outstanding() as usize).sum();
    drop(d.replace_transport(restore(snap)));
    let mut done = traffic(d, records.start..records.start + 1);
    let downtime = start.elapsed();
    done += traffic(d, records.start + 1..records.end);
    println!(
        "VBK-MOVE {what} snapshot_bytes={size} in_flight={in_flight} lost=0 downtime_us={}",
        downtime.as_micros()
    );
    done
}

#[test]
fn device_moves_in_process_to_vhost_user_and_back() {
    // Home 1: in process.
    let (dir, path, mem, mut d) = in_process_rig();
    let mut done = traffic(&mut d, 0..16);

    // Move out: vhost-user-blk in its own process.
    let sock = dir.path().join("blk.sock");
    let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--socket").arg(&sock).arg("--image").arg(&path);
    cmd.args(["--queues", "2", "--queue-size", "64"]);
    let mut daemon = Backend::spawn("vhost-user-blk", cmd, dir.path().join("daemon.log"));
    daemon.wait_for_socket(&sock);
    done += move_home(&mut d, "in-process->vhost-user", 16..32, |snap| {
        let adapter = VhostUserFrontendDevice::connect(&sock, FrontendOptions::new(2, 2, 64))
            .unwrap_or_else(|e| panic!("adapter: {e}"));
        MmioTransport::restore(Box::new(adapter), mem.clone(), snap).expect("restore out")
    });

    // Move back in process.
    done += move_home(&mut d, "vhost-user->in-process", 32..48, |snap| {
        MmioTransport::restore(in_process(&path), mem.clone(), snap).expect("restore in")
    });
    daemon.stop(Duration::from_secs(5));

    // Every record of every home is on disk.
    let f = File::open(&path).unwrap();
    for n in 0..48u64 {
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, n * 8 * 512).unwrap();
        assert_eq!(buf, record(n), "record {n} not on disk");
    }
    assert_eq!(done, 48);
}

#[test]
fn corrupt_or_foreign_snapshots_are_refused_at_restore() {
    let (_dir, path, mem, mut d) = in_process_rig();
    traffic(&mut d, 0..4);
    let snap = d.t.snapshot().unwrap();
    let mut bytes = snapshot::encode(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    assert!(snapshot::decode(&bytes).is_err(), "corruption not detected");

    let mut foreign = snap.clone();
    foreign.device_type = 4;
    assert!(MmioTransport::restore(in_process(&path), mem.clone(), foreign).is_err());
    let mut huge = snap.clone();
    huge.queues[0].size = 4096;
    assert!(MmioTransport::restore(in_process(&path), mem.clone(), huge).is_err());
    let mut misaligned = snap;
    misaligned.queues[1].used_ring += 2;
    assert!(MmioTransport::restore(in_process(&path), mem, misaligned).is_err());
}
