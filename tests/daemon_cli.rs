// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemons as an operator runs them: `vhost-user-blk` started with its
//! defaults, driven by libblkio's `virtio-blk-vhost-user` driver, stopped
//! with signals, started twice on one socket or one image, given its
//! socket as an inherited fd or by socket activation, asked for its
//! capabilities.
//!
//! Needs the release binaries: `cargo build --release --workspace`.

mod process;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use process::Backend;
use vmm_example::blkio_client::BlkioClient;

const IMAGE_SIZE: u64 = 32 << 20;
const BLOCK: usize = 4096;

fn bin() -> PathBuf {
    process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"))
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn image(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        File::create(&p).unwrap().set_len(IMAGE_SIZE).unwrap();
        p
    }
}

fn daemon(dir: &Dir, log: &str, args: &[&str]) -> Backend {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("RUST_LOG", "info");
    Backend::spawn("vhost-user-blk", cmd, dir.path(log))
}

/// The daemon on `sock` serving `image`, with `extra` arguments, logging to
/// `log`; not waited for.
fn serving(dir: &Dir, log: &str, sock: &Path, image: &Path, extra: &[&str]) -> Backend {
    let mut args = vec![
        "--socket-path",
        sock.to_str().unwrap(),
        "--blk-file",
        image.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    daemon(dir, log, &args)
}

fn started(dir: &Dir, sock: &Path, image: &Path, extra: &[&str]) -> Backend {
    let mut d = serving(dir, "daemon.log", sock, image, extra);
    d.wait_for_socket(sock);
    d
}

/// A daemon started with `extra` on `blk.sock` and a fresh `disk.raw`
/// in a new directory: (directory, socket, image, daemon).
fn started_fresh(extra: &[&str]) -> (Dir, PathBuf, PathBuf, Backend) {
    let dir = Dir::new();
    let (sock, image) = (dir.path("blk.sock"), dir.image("disk.raw"));
    let d = started(&dir, &sock, &image, extra);
    (dir, sock, image, d)
}

fn wait_exit(d: &mut Backend, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "daemon still running after {limit:?}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(d: &Backend, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, sig) }, 0);
}

fn threads(d: &Backend) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn connect(sock: &Path, queues: usize) -> BlkioClient {
    BlkioClient::connect(sock, queues, 1 << 20).unwrap_or_else(|e| panic!("blkio connect: {e}"))
}

/// A one-queue session that does verified I/O (1 MiB at offset 0 in
/// 64 KiB requests, pattern `seed`) and disconnects.
fn verified_session(sock: &Path, seed: u8) {
    let mut c = connect(sock, 1);
    c.verified_io(0, 1 << 20, 64 << 10, seed).unwrap();
}

#[test]
fn defaults_offer_eight_queues_and_serve_frontend_after_frontend() {
    let (_dir, sock, _image, mut d) = started_fresh(&[]);
    let idle = threads(&d);
    // A frontend with a single queue: one worker, not one per offered queue.
    let c = connect(&sock, 1);
    std::thread::sleep(Duration::from_millis(200));
    let one_queue = threads(&d);
    drop(c);
    println!("VBK-DAEMON threads idle={idle} one_queue_connected={one_queue}");
    assert!(
        one_queue <= idle + 1,
        "{one_queue} threads with one queue started (idle: {idle})"
    );
    for round in 0..3u8 {
        // What QEMU asks for with -smp 8 and no num-queues.
        let mut c = connect(&sock, 8);
        assert_eq!(c.num_queues(), 8);
        for q in 0..8 {
            c.verified_io_at(
                q,
                (u64::from(round) * 8 + q as u64) << 16,
                64 << 10,
                16 << 10,
                round,
            )
            .unwrap_or_else(|e| panic!("round {round} queue {q}: {e}"));
        }
    }
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon exited after a frontend left"
    );
    let log = d.log_text();
    assert!(
        log.contains("queue(s) of 1024"),
        "default queue size: {log}"
    );
    d.stop(Duration::from_millis(10));
}

#[test]
fn once_exits_zero_when_the_frontend_leaves() {
    let (_dir, sock, _image, mut d) = started_fresh(&["--once"]);
    verified_session(&sock, 7);
    let st = wait_exit(&mut d, Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "log:\n{}", d.log_text());
}

#[test]
fn once_exits_one_when_the_session_ends_on_an_error() {
    let (_dir, sock, _image, mut d) = started_fresh(&["--once"]);
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        // A header announcing a payload far beyond any message's size.
        let mut msg = Vec::new();
        msg.extend_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
        msg.extend_from_slice(&1u32.to_le_bytes()); // version 1
        msg.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        s.write_all(&msg).unwrap();
    }
    let st = wait_exit(&mut d, Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "log:\n{}", d.log_text());
}

#[test]
fn sigterm_under_io_exits_zero_removes_the_socket_and_loses_no_write() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (_dir, sock, image, mut d) = started_fresh(&[]);
        let done: Arc<Mutex<Vec<u64>>> = Arc::default();
        let writer = {
            let (sock, done) = (sock.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = connect(&sock, 1);
                for i in 0..(IMAGE_SIZE / BLOCK as u64) {
                    c.buffer()[..BLOCK]
                        .chunks_mut(8)
                        .for_each(|w| w.copy_from_slice(&(i + 1).to_le_bytes()));
                    if c.write(0, i * BLOCK as u64, BLOCK).is_err() {
                        return;
                    }
                    done.lock().unwrap().push(i);
                }
            })
        };
        while done.lock().unwrap().len() < 200 {
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&d, sig);
        let st = wait_exit(&mut d, Duration::from_secs(10));
        let log = d.log_text();
        assert_eq!(st.code(), Some(0), "signal {sig}; log:\n{log}");
        assert!(!sock.exists(), "socket file left behind");
        // The writer may stay blocked on a request nobody completes now;
        // it is left behind. Every write it saw complete is in the image.
        drop(writer);
        let done = done.lock().unwrap().clone();
        let img = File::open(&image).unwrap();
        let mut buf = vec![0u8; BLOCK];
        for &i in &done {
            img.read_exact_at(&mut buf, i * BLOCK as u64).unwrap();
            assert!(
                buf.chunks(8).all(|w| w == (i + 1).to_le_bytes()),
                "block {i} lost after signal {sig}"
            );
        }
        println!(
            "VBK-DAEMON signal={sig} completed_writes={} lost=0 exit=0",
            done.len()
        );
    }
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused() {
    let (dir, sock, _image, mut first) = started_fresh(&[]);
    let other = dir.image("other.raw");
    let mut second = serving(&dir, "second.log", &sock, &other, &[]);
    let st = wait_exit(&mut second, Duration::from_secs(10));
    assert_eq!(st.code(), Some(1));
    let log = second.log_text();
    assert!(log.contains("served by another live daemon"), "{log}");
    // The first one still serves.
    let mut c = connect(&sock, 1);
    c.verified_io(0, 4096, 4096, 3).unwrap();
    drop(c);
    first.stop(Duration::from_millis(10));
    // A socket file whose daemon is gone is taken over.
    std::os::unix::net::UnixListener::bind(dir.path("stale.sock")).unwrap();
    let stale = dir.path("stale.sock");
    let mut third = started(&dir, &stale, &other, &[]);
    // The stale file was there already: wait for the daemon's own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !third.log_text().contains("listening on") {
        assert!(Instant::now() < deadline, "{}", third.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    connect(&stale, 1).verified_io(0, 4096, 4096, 4).unwrap();
    third.stop(Duration::from_millis(10));
}

#[test]
fn a_second_writer_on_a_locked_image_is_refused() {
    let dir = Dir::new();
    let image = dir.image("disk.raw");
    let mut first = started(&dir, &dir.path("a.sock"), &image, &[]);
    for (extra, what) in [(&[][..], "writer"), (&["--read-only"][..], "reader")] {
        let mut second = serving(&dir, "second.log", &dir.path("b.sock"), &image, extra);
        let st = wait_exit(&mut second, Duration::from_secs(10));
        let log = second.log_text();
        assert_eq!(st.code(), Some(1), "second {what}: {log}");
        assert!(log.contains("in use by another process"), "{log}");
    }
    // --no-lock opts out.
    let sock = dir.path("c.sock");
    let mut unlocked = started(&dir, &sock, &image, &["--no-lock"]);
    unlocked.stop(Duration::from_millis(10));
    first.stop(Duration::from_millis(10));
}

#[test]
fn print_capabilities_help_and_version() {
    let out = Command::new(bin())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], "block");
    assert_eq!(
        caps["features"],
        serde_json::json!(["read-only", "blk-file"])
    );

    let out = Command::new(bin()).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.starts_with("vhost-user-blk "), "{version}");

    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.starts_with("vhost-user-blk: "), "{help}");
    for flag in [
        "--socket-path",
        "--fd",
        "--once",
        "--print-capabilities",
        "--logical-block-size",
        "--serial",
        "--discard",
        "--write-zeroes",
        "--no-lock",
        "--no-seccomp",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    assert!(!help.contains("--latency-us"), "a test knob in --help");

    let dir = Dir::new();
    let out = Command::new(bin())
        .arg("--install-descriptor")
        .arg(dir.path("vhost-user"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let file = dir.path("vhost-user").join("50-vhost-user-blk.json");
    let desc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(desc["type"], "block");
    assert_eq!(
        desc["binary"],
        bin().canonicalize().unwrap().to_str().unwrap()
    );
}

/// A listening socket the test binds, to hand to the daemon as fd 3.
fn listener_as_fd3(cmd: &mut Command, listener: &UnixListener) {
    let fd: RawFd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and
    // exec; fd 3 is then the listener, without FD_CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            Ok(())
        });
    }
}

#[test]
fn an_inherited_socket_and_socket_activation_are_served() {
    let dir = Dir::new();
    let image = dir.image("disk.raw");
    for activation in [false, true] {
        let sock = dir.path(if activation { "sd.sock" } else { "fd.sock" });
        let listener = UnixListener::bind(&sock).unwrap();
        let mut cmd = if activation {
            // As systemd does: LISTEN_PID names the daemon itself.
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --blk-file \"$1\"")
                .arg(bin())
                .arg(&image);
            c
        } else {
            let mut c = Command::new(bin());
            c.args(["--fd", "3", "--blk-file"]).arg(&image);
            c
        };
        cmd.env("RUST_LOG", "info");
        listener_as_fd3(&mut cmd, &listener);
        let mut d = Backend::spawn("vhost-user-blk", cmd, dir.path("fd.log"));
        drop(listener);
        let mut c = connect(&sock, 1);
        c.verified_io(0, 64 << 10, 64 << 10, 9).unwrap();
        drop(c);
        assert!(
            sock.metadata().unwrap().file_type().is_socket(),
            "an inherited socket's file is not ours to remove"
        );
        signal(&d, libc::SIGTERM);
        let st = wait_exit(&mut d, Duration::from_secs(10));
        assert_eq!(st.code(), Some(0), "{}", d.log_text());
        if activation {
            assert!(d.log_text().contains("LISTEN_FDS"), "{}", d.log_text());
        }
    }
    // Anything but a listening unix socket is refused.
    let out = Command::new(bin())
        .args(["--fd", "0", "--null", "--size", "4096"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fd 0 cannot be served"));
}

#[test]
fn direct_opens_the_image_with_o_direct() {
    let (_dir, sock, image, mut d) = started_fresh(&["--direct"]);
    verified_session(&sock, 5);
    let pid = d.child.id();
    let image = image.canonicalize().unwrap();
    let direct = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(image.as_path()))
        .any(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & libc::O_DIRECT as u32 != 0)
        });
    assert!(direct, "no O_DIRECT descriptor of the image");
    d.stop(Duration::from_millis(10));
}
