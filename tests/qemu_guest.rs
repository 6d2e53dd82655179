// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests with a real Linux guest: QEMU boots the Debian 6.1 cloud
//! kernel with the busybox initramfs from `tests/guest/`, whose virtio-blk
//! disk is served over vhost-user by
//!
//! * `vhost_user_blk_daemon_with_qemu_guest`: our `vhost-user-blk` daemon;
//! * `qemu_storage_daemon_with_qemu_guest`: `qemu-storage-daemon`, the
//!   interop baseline showing the guest image and scripts themselves work.
//!
//! The guest writes a deterministic pattern (`tests/guest/rootfs/vbk/pattern.awk`)
//! at offset 0 and a marker block (`marker.awk`) at 32 MiB, verifies them, and
//! prints `VBK-RESULT ...` / `VBK-DONE status=...` lines.  Afterwards the host
//! checks the backing image file byte for byte.
//!
//! Needs root-level setup (apt) the first time: `tests/guest/install-deps.sh`
//! and `tests/guest/build-image.sh` are run from here and are cached.
//! Without qemu-system-x86_64 the tests FAIL, unless `VBK_ALLOW_SKIP_QEMU=1`.
//! Our daemon must be built first: `cargo build --release --workspace`.
//! Run: `cargo test --release --test qemu_guest -- --nocapture --test-threads=1`.

mod guest_vm;
mod process;

use guest_vm::{create_image, field, guest_dir, lock_and_prepare, print_tail, IMAGE_SIZE};
use process::Backend;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Must match the guest defaults: vbk.mib=8, vbk.seed=1, marker at 32 MiB.
const PATTERN_BYTES: usize = 8 << 20;
const PATTERN_SEED: u64 = 1;
const MARKER_OFFSET: usize = 32 << 20;
const QUEUES: u32 = 2;

/// How QEMU is configured for a run.
#[derive(Clone, Copy)]
struct Frontend {
    /// vCPUs.
    smp: u32,
    /// `num-queues` of the disk; `None` leaves QEMU's default (one per vCPU).
    queues: Option<u32>,
}

/// Runs tests/guest/run-qemu-blk.sh; returns (success, console text).
fn run_guest(sock: &Path, fe: Frontend) -> (bool, String) {
    let (status, console, took) = process::run_captured(
        Command::new("bash")
            .arg(guest_dir().join("run-qemu-blk.sh"))
            .arg(sock)
            .env(
                "VBK_QUEUES",
                fe.queues.map(|q| q.to_string()).unwrap_or_default(),
            )
            .env("VBK_SMP", fe.smp.to_string())
            .env("VBK_TEST", "blk"),
    )
    .expect("run tests/guest/run-qemu-blk.sh");
    println!("QEMU run took {:.1}s ({status})", took.as_secs_f64());
    (status.success(), console)
}

/// Checks the guest's VBK-RESULT / VBK-DONE lines.
fn check_console(backend: &str, ok: bool, console: &str) {
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.find("VBK-").map(|i| l[i..].trim_end()))
        .collect();
    println!("---- guest result lines (backend: {backend}) ----");
    for l in &lines {
        println!("{l}"); // raw, so `grep ^VBK-` on the test output finds them
    }
    let fail = |why: &str| -> ! { panic!("{why}\n---- guest console ----\n{console}\n----") };
    let disks: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("VBK-RESULT") && field(l, "disk").is_some())
        .collect();
    if disks.is_empty() {
        fail("guest printed no VBK-RESULT disk=... line");
    }
    for l in &disks {
        for key in ["write", "read", "verify", "flush", "marker"] {
            if field(l, key) != Some("ok") {
                fail(&format!("guest reports {key} != ok: {l}"));
            }
        }
    }
    if field(disks[0], "disk") != Some("vda") {
        fail("first disk is not vda");
    }
    if !lines
        .iter()
        .any(|l| l.starts_with("VBK-DONE") && field(l, "status") == Some("ok"))
    {
        fail("guest did not print VBK-DONE status=ok");
    }
    if !ok {
        fail("run-qemu-blk.sh failed");
    }
}

/// Regenerates what rootfs/vbk/pattern.awk writes (see the format there).
fn expected_pattern(disk: &str, seed: u64, bytes: usize) -> Vec<u8> {
    const AZ: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut v = Vec::with_capacity(bytes);
    let mut x = seed;
    for k in 0..bytes / 512 {
        let hdr = format!(
            "vbk seed={seed:08} disk={disk:<4} off={:012} {x:010}-{:07}\n",
            k * 512,
            k % 10_000_000
        );
        assert_eq!(hdr.len(), 64);
        v.extend_from_slice(hdr.as_bytes());
        let j = (x % 16) as usize;
        for i in 0..7 {
            v.resize(v.len() + 63, AZ[(j * 7 + i) % 26]);
            v.push(b'\n');
        }
        x = x * 48271 % 2_147_483_647;
    }
    v
}

/// Regenerates rootfs/vbk/marker.awk's 4 KiB block.
fn expected_marker(disk: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4096);
    for i in 0..64 {
        let s = format!("VBK-MARKER v1 disk={disk:<4} line={i:02} ");
        v.extend_from_slice(format!("{s:.<63}\n").as_bytes());
    }
    v
}

fn compare(what: &str, got: &[u8], want: &[u8], base: usize) {
    if got != want {
        let off = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let s = off / 64 * 64;
        let e = (s + 64).min(got.len()).min(want.len());
        panic!(
            "image file: {what} differs at byte {:#x}:\n got: {:?}\nwant: {:?}",
            base + off,
            String::from_utf8_lossy(&got[s..e]),
            String::from_utf8_lossy(&want[s..e])
        );
    }
}

/// Host-side check of what the guest left in the backing file.
fn verify_image(img: &Path) {
    let mut data = Vec::new();
    File::open(img)
        .and_then(|mut f| f.read_to_end(&mut data))
        .expect("read image");
    assert_eq!(data.len() as u64, IMAGE_SIZE, "image size changed");
    compare(
        "pattern",
        &data[..PATTERN_BYTES],
        &expected_pattern("vda", PATTERN_SEED, PATTERN_BYTES),
        0,
    );
    compare(
        "marker",
        &data[MARKER_OFFSET..MARKER_OFFSET + 4096],
        &expected_marker("vda"),
        MARKER_OFFSET,
    );
    println!("host: image pattern (8 MiB @0) and marker (4 KiB @32 MiB) verified");
}

/// Common part: prepare (skip/fail), make the image, start the backend
/// built by `make_backend(socket, image)`, run the guest, check everything.
/// `exit_grace`: how long the backend gets to exit by itself after QEMU quit.
fn guest_test(
    name: &'static str,
    exit_grace: Duration,
    fe: Frontend,
    make_backend: impl FnOnce(&Path, &Path) -> Command,
) -> String {
    let Some(_serial) = lock_and_prepare() else {
        return String::new();
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("blk.sock");
    create_image(&img);

    let mut backend = Backend::spawn(
        name,
        make_backend(&sock, &img),
        dir.path().join("backend.log"),
    );
    backend.wait_for_socket(&sock);
    let (ok, console) = run_guest(&sock, fe);
    backend.stop(exit_grace);
    let log = backend.log_text();
    if !log.trim().is_empty() {
        print_tail(&format!("{name} log"), &log, 40);
    }
    check_console(name, ok, &console);
    verify_image(&img);
    console
}

/// QEMU's default configuration: `-smp 4` and no `num-queues` (QEMU asks
/// for one queue per vCPU), against the daemon's default flags.
#[test]
fn vhost_user_blk_daemon_with_qemu_guest() {
    let fe = Frontend {
        smp: 4,
        queues: None,
    };
    // The daemon keeps serving after QEMU quits: it is stopped with SIGTERM.
    let console = guest_test("vhost-user-blk", Duration::ZERO, fe, |sock, img| {
        let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
        println!("daemon: {}", bin.display());
        let mut c = Command::new(&bin);
        c.arg("--socket-path").arg(sock).arg("--blk-file").arg(img);
        c.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        c
    });
    let Some(line) = console.lines().find(|l| l.contains("VBK-RESULT disk=vda")) else {
        return; // skipped
    };
    assert_eq!(
        field(line, "queues"),
        Some("4"),
        "the guest should use one queue per vCPU: {line}"
    );
}

#[test]
fn qemu_storage_daemon_with_qemu_guest() {
    // qemu-storage-daemon keeps serving: stop it right away.
    let fe = Frontend {
        smp: 2,
        queues: Some(QUEUES),
    };
    guest_test("qemu-storage-daemon", Duration::ZERO, fe, |sock, img| {
        let mut c = Command::new("qemu-storage-daemon");
        c.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                 writable=on,num-queues={QUEUES}",
                sock.display()
            ));
        c
    });
}
