// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real third-party frontend: the `blkio` crate's `virtio-blk-vhost-user`
//! driver (libblkio, as used by QEMU's blkio block driver) against our
//! `vhost-user-blk` daemon running as a separate process.
//!
//! Needs the release binaries: `cargo build --release --workspace`.

mod process;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use process::Backend;
use vmm_example::blkio_client::BlkioClient;

const IMAGE_SIZE: u64 = 32 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    image: PathBuf,
    daemon: Backend,
}

fn start(extra: &[&str], with_image: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let image = dir.path().join("disk.raw");
    let f = File::create(&image).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin);
    cmd.arg("--socket").arg(&sock).env("RUST_LOG", "info");
    if with_image {
        cmd.arg("--image").arg(&image);
    }
    cmd.args(extra);
    let mut daemon = Backend::spawn("vhost-user-blk", cmd, dir.path().join("daemon.log"));
    daemon.wait_for_socket(&sock);
    Setup {
        _dir: dir,
        sock,
        image,
        daemon,
    }
}

fn connect(sock: &Path, queues: usize) -> BlkioClient {
    BlkioClient::connect(sock, queues, 1 << 20).unwrap_or_else(|e| panic!("blkio connect: {e}"))
}

#[test]
fn blkio_verified_io_on_image_two_queues() {
    let mut s = start(&["--queues", "2"], true);
    {
        let mut c = connect(&s.sock, 2);
        assert_eq!(c.capacity(), IMAGE_SIZE);
        assert_eq!(c.num_queues(), 2);
        for q in 0..2 {
            let (w, r) = c
                .verified_io(q, 4 << 20, 64 << 10, q as u8 + 1)
                .unwrap_or_else(|e| panic!("queue {q}: {e}"));
            println!(
                "VBK-BLKIO queue={q} write_MBps={:.0} read_MBps={:.0}",
                w / 1e6,
                r / 1e6
            );
        }
        // A marker at the end of the disk, checked from the host below.
        c.buffer()[..4096].fill(0xa5);
        c.write(0, IMAGE_SIZE - 4096, 4096).unwrap();
        c.flush(1).unwrap();
        // Write-zeroes and discard over a written range read back as zeroes.
        c.buffer()[..65536].fill(0x5a);
        c.write(0, 8 << 20, 65536).unwrap();
        c.write_zeroes(0, 8 << 20, 32768).unwrap();
        c.discard(1, (8 << 20) + 32768, 32768).unwrap();
        c.read(0, 8 << 20, 65536).unwrap();
        assert!(
            c.buffer()[..65536].iter().all(|b| *b == 0),
            "zeroed range not zero"
        );
        // Out of range: refused by the device, the session goes on.
        assert!(c.read(0, IMAGE_SIZE, 4096).is_err());
        c.read(0, 0, 4096).unwrap();
    }
    s.daemon.stop(Duration::from_secs(5));
    let img = File::open(&s.image).unwrap();
    let mut tail = vec![0u8; 4096];
    img.read_exact_at(&mut tail, IMAGE_SIZE - 4096).unwrap();
    assert!(
        tail.iter().all(|b| *b == 0xa5),
        "marker not in the image file"
    );
    let mut first = vec![0u8; 512];
    img.read_exact_at(&mut first, 0).unwrap();
    assert!(
        first.iter().any(|b| *b != 0),
        "queue 1 pattern missing at offset 0"
    );
}

#[test]
fn blkio_read_only_refuses_writes() {
    let mut s = start(&["--read-only"], true);
    {
        let mut c = BlkioClient::connect_with(&s.sock, 1, 1 << 20, true)
            .unwrap_or_else(|e| panic!("blkio connect: {e}"));
        c.buffer()[..4096].fill(1);
        assert!(
            c.write(0, 0, 4096).is_err(),
            "write on a read-only disk succeeded"
        );
        c.read(0, 0, 4096).unwrap();
        assert!(c.buffer()[..4096].iter().all(|b| *b == 0));
    }
    s.daemon.stop(Duration::from_secs(5));
    let mut head = vec![0u8; 4096];
    File::open(&s.image)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(head.iter().all(|b| *b == 0), "read-only image was modified");
}

#[test]
fn blkio_null_target_random_reads() {
    let mut s = start(&["--null", "--size", "1073741824"], false);
    {
        let mut c = connect(&s.sock, 1);
        assert_eq!(c.capacity(), 1 << 30);
        let mut stats = c
            .random_reads(0, 32, 4096, Duration::from_millis(300))
            .unwrap();
        assert!(stats.requests > 32, "too few requests completed");
        println!(
            "VBK-BLKIO null qd=32 iops={:.0} p50_us={:.1}",
            stats.iops(),
            stats.latency_us(50.0)
        );
    }
    s.daemon.stop(Duration::from_secs(5));
}

#[test]
fn serves_frontend_after_frontend_by_default() {
    let mut s = start(&[], true);
    for round in 0..3u8 {
        let mut c = connect(&s.sock, 1);
        c.verified_io(0, 1 << 20, 64 << 10, round)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    assert!(
        s.daemon.child.try_wait().unwrap().is_none(),
        "daemon exited after a frontend left"
    );
    s.daemon.stop(Duration::from_millis(100));
}
