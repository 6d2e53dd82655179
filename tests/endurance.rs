// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Endurance (not in the suite: `#[ignore]`, minutes long). One
//! `vhost-user-blk` process serves a storm of frontends, one after the
//! other: full sessions that do verified I/O and then disconnect cleanly or
//! in the middle of traffic, connections cut in the middle of a message,
//! connections that send garbage, and connections that hang up at once.
//! The daemon's fd count, thread count and RSS are sampled when it is idle
//! after a warm-up and again at the end; they must not grow beyond a small
//! fixed slack, and the daemon must never die.
//!
//! Run (10 minutes; `VBK_ENDURANCE_SECS` changes the length):
//! `cargo build --release --workspace && cargo test --release --test endurance -- --ignored --nocapture`
//!
//! Summary line: `VBK-ENDURANCE secs=N sessions=N io_sessions=N requests=N
//! cut_mid_traffic=N cut_mid_message=N garbage=N hangups=N fds=A->B
//! threads=A->B rss_kb=A->B`.

mod common;
mod process;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use process::Backend;
use virtio_backend_kit::vhost::VhostBackend;

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 64;
const IMAGE_SIZE: u64 = 16 << 20;
/// Growth allowed between the warm sample and the last one.
const FD_SLACK: i64 = 4;
const THREAD_SLACK: i64 = 2;
const RSS_SLACK_KB: i64 = 16 << 10;

/// fds, threads and RSS (KiB) of process `pid`.
fn sample(pid: u32) -> (i64, i64, i64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon alive")
        .count() as i64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon alive");
    let field = |name: &str| -> i64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (fds, field("Threads:"), field("VmRSS:"))
}

/// A small deterministic generator (xorshift), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// A blk request on `q`: header (type, sector), 4 KiB of data (written
/// by the device when `read`), status byte. Returns (data gpa, status gpa).
fn blk_request(q: &mut SplitQueue, read: bool, sector: u64, fill: u8) -> (u64, u64) {
    let kind = if read { blk::T_IN } else { blk::T_OUT };
    let (bufs, data, status) = blk::request(q, kind, sector, Some((&[fill; 4096], read)), 0xff);
    q.add_chain(&bufs);
    (data, status)
}

/// A full session: set-up, `n` verified write+read pairs, then a clean
/// end or (with `cut`) more requests published and the socket dropped
/// while the device works on them. Returns the requests completed.
fn io_session(sock: &Path, n: u64, cut: bool, rng: &mut Rng) -> u64 {
    let mut client = Client::new(UnixStream::connect(sock).expect("connect"), 1);
    client.negotiate(VIRTIO_F_VERSION_1, Client::default_protocol());
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    client
        .frontend
        .set_mem_table(&[guest.region_info()])
        .expect("SET_MEM_TABLE");
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    for _ in 0..n {
        let sector = 8 * rng.next(IMAGE_SIZE / 4096);
        let fill = rng.next(255) as u8 + 1;
        let (_, st) = blk_request(&mut q, false, sector, fill);
        q.kick();
        q.wait_used(1);
        assert_eq!(q.read(st, 1), vec![0], "write status");
        let (data, st) = blk_request(&mut q, true, sector, 0);
        q.kick();
        q.wait_used(1);
        assert_eq!(q.read(st, 1), vec![0], "read status");
        assert_eq!(q.read(data, 4096), vec![fill; 4096], "read back");
    }
    if cut {
        for _ in 0..8 {
            blk_request(&mut q, false, 8 * rng.next(IMAGE_SIZE / 4096), 0xee);
        }
        q.kick();
        // Dropping the client closes the socket under the device.
    }
    2 * n
}

#[test]
#[ignore = "endurance run, minutes long: see the module docs"]
fn reconnect_storm_does_not_leak() {
    let secs: u64 = std::env::var("VBK_ENDURANCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("blk.sock");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("image");
    let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin);
    cmd.args(["--socket-path", sock.to_str().expect("utf-8 path")])
        .args(["--blk-file", image.to_str().expect("utf-8 path")])
        .args(["--queues", "1"])
        .env("RUST_LOG", "warn");
    let mut daemon = Backend::spawn("vhost-user-blk", cmd, dir.path().join("daemon.log"));
    daemon.wait_for_socket(&sock);
    let pid = daemon.child.id();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(pid));
    let idle = |daemon: &mut Backend| {
        // Let the daemon finish tearing down the last session.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            daemon.child.try_wait().expect("wait").is_none(),
            "the daemon died; log:\n{}",
            daemon.log_text()
        );
        sample(pid)
    };

    let mut counts = [0u64; 5]; // io, cut traffic, cut message, garbage, hang-up
    let mut requests = 0u64;
    let mut warm = None;
    let start = Instant::now();
    let mut sessions = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        if sessions == 50 {
            warm = Some(idle(&mut daemon));
        }
        sessions += 1;
        match rng.next(10) {
            0..=3 => {
                requests += io_session(&sock, 1 + rng.next(16), false, &mut rng);
                counts[0] += 1;
            }
            4..=5 => {
                requests += io_session(&sock, rng.next(4), true, &mut rng);
                counts[1] += 1;
            }
            6..=7 => {
                // A SET_MEM_TABLE header promising 40 bytes, then 10.
                let mut s = UnixStream::connect(&sock).expect("connect");
                let mut msg = message(5, 1, &[0u8; 40]);
                msg.truncate(12 + 10);
                let _ = s.write_all(&msg);
                counts[2] += 1;
            }
            8 => {
                let mut s = UnixStream::connect(&sock).expect("connect");
                let junk: Vec<u8> = (0..64 + rng.next(512))
                    .map(|_| rng.next(256) as u8)
                    .collect();
                let _ = s.write_all(&junk);
                counts[3] += 1;
            }
            _ => {
                drop(UnixStream::connect(&sock).expect("connect"));
                counts[4] += 1;
            }
        }
    }
    let end = idle(&mut daemon);
    let warm = warm.unwrap_or_else(|| panic!("only {sessions} sessions in {secs} s"));
    println!(
        "VBK-ENDURANCE secs={secs} sessions={sessions} io_sessions={} requests={requests} \
         cut_mid_traffic={} cut_mid_message={} garbage={} hangups={} fds={}->{} threads={}->{} \
         rss_kb={}->{}",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        warm.0,
        end.0,
        warm.1,
        end.1,
        warm.2,
        end.2
    );
    daemon.stop(Duration::from_secs(5));
    assert!(
        end.0 - warm.0 <= FD_SLACK,
        "fds grew {} -> {}",
        warm.0,
        end.0
    );
    assert!(
        end.1 - warm.1 <= THREAD_SLACK,
        "threads grew {} -> {}",
        warm.1,
        end.1
    );
    assert!(
        end.2 - warm.2 <= RSS_SLACK_KB,
        "RSS grew {} -> {} KiB",
        warm.2,
        end.2
    );
}
