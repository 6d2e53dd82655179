// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running the backends: building and finding them, starting one per run
//! (pinned if asked), driving it with libblkio, and what it cost.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_example::blkio_client::BlkioClient;

use crate::args::{Kind, Mode, Opts};

const BLOCK: usize = 4096;
pub(crate) const QSD: &str = "/usr/bin/qemu-storage-daemon";

/// `target/release`, found from this executable (`target/release/deps/…`).
pub(crate) fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("bench executable lives in target/<profile>/deps")
        .to_path_buf()
}

pub(crate) fn build_backends() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!("building the backends: cargo build --release -p vmm-example --bins --examples");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "vmm-example",
            "--bins",
            "--examples",
        ])
        .current_dir(workspace)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the backends failed");
}

pub(crate) fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only touch that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            panic!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

struct Running {
    child: Child,
    kind: Kind,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Ours and the peer exit when the frontend disconnects; give them a
        // moment, then make sure (qemu-storage-daemon keeps serving).
        let deadline = Instant::now() + Duration::from_millis(500);
        if self.kind != Kind::Qsd {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) struct Setup<'a> {
    pub(crate) release: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) image: &'a Path,
    pub(crate) size: u64,
    pub(crate) cpu: Option<usize>,
}

fn spawn(setup: &Setup<'_>, kind: Kind, mode: Mode, nq: usize, sock: &Path) -> Running {
    let _ = std::fs::remove_file(sock);
    let sock_s = sock.to_str().expect("utf-8 path");
    let image = setup.image.to_str().expect("utf-8 path");
    let mut cmd = match kind {
        Kind::Ours | Kind::Peer => {
            let bin = match kind {
                Kind::Ours => setup.release.join("vhost-user-blk"),
                _ => setup.release.join("examples/peer_vub_blk"),
            };
            let mut c = Command::new(bin);
            c.args(["--socket", sock_s, "--queues", &nq.to_string()]);
            if kind == Kind::Ours {
                // One frontend per process: exit when it leaves.
                c.arg("--once");
            }
            match mode {
                Mode::Null => c.args(["--null", "--size", &setup.size.to_string()]),
                Mode::File => c.args(["--image", image]),
            };
            c.env("RUST_LOG", "warn");
            c
        }
        Kind::Qsd => {
            let mut c = Command::new(QSD);
            let blockdev = match mode {
                Mode::Null => format!(
                    "driver=null-co,node-name=n,size={},read-zeroes=off",
                    setup.size
                ),
                Mode::File => format!("driver=file,node-name=n,filename={image},cache.direct=off"),
            };
            c.args([
                "--blockdev",
                &blockdev,
                "--export",
                &format!(
                    "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock_s},num-queues={nq},writable=on"
                ),
            ]);
            c
        }
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(
        File::create(setup.dir.join(format!("{}.log", kind.name())))
            .map_or(Stdio::null(), Stdio::from),
    );
    if let Some(cpu) = setup.cpu {
        // SAFETY: the closure runs in the forked child before exec and only
        // makes the async-signal-safe sched_setaffinity system call on a
        // local set.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {kind:?}: {e}"));
    let running = Running { child, kind };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not create {}",
            kind.name(),
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    running
}

/// utime + stime of a process (all its threads), in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
}

/// (VmRSS in KiB, thread count) from /proc/<pid>/status.
fn rss_threads(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("Threads:"))
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) iops: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) cpu_ns_per_req: f64,
    pub(crate) rss_kib: u64,
    pub(crate) threads: u64,
}

pub(crate) fn run_one(
    setup: &Setup<'_>,
    opts: &Opts,
    kind: Kind,
    mode: Mode,
    nq: usize,
    depth: usize,
) -> Sample {
    let sock = setup.dir.join(format!("{}.sock", kind.name()));
    let backend = spawn(setup, kind, mode, nq, &sock);
    // The socket file can exist a moment before the backend listens on it
    // (qemu-storage-daemon binds, then listens): retry briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut client = loop {
        match BlkioClient::connect(&sock, nq, nq * depth * BLOCK) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("connect to {}: {e}", kind.name()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // Give the backend's workers a moment to settle after the handshake.
    std::thread::sleep(Duration::from_millis(20));
    let (rss_kib, threads) = rss_threads(backend.pid());
    if opts.warmup > 0.0 {
        client
            .random_reads_multi(nq, depth, BLOCK, Duration::from_secs_f64(opts.warmup))
            .unwrap_or_else(|e| panic!("{} warm-up: {e}", kind.name()));
    }
    let cpu0 = cpu_ns(backend.pid());
    let mut stats = client
        .random_reads_multi(nq, depth, BLOCK, Duration::from_secs_f64(opts.secs))
        .unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
    let cpu1 = cpu_ns(backend.pid());
    drop(client);
    drop(backend);
    Sample {
        iops: stats.iops(),
        p50_us: stats.latency_us(50.0),
        p99_us: stats.latency_us(99.0),
        cpu_ns_per_req: (cpu1 - cpu0) as f64 / stats.requests.max(1) as f64,
        rss_kib,
        threads,
    }
}

/// A raw image of `size` bytes with real (non-zero) data in every block, so
/// the file is fully allocated and in the page cache after it is written.
pub(crate) fn make_image(path: &Path, size: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        // Reuse it; reading it back keeps it warm.
        let f = File::open(path).expect("open image");
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = f.read_at(&mut buf, off).expect("read image");
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        return;
    }
    let f = File::create(path).expect("create image");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((off as usize / 4096) ^ i) as u8 | 1;
        }
        f.write_all_at(&buf, off).expect("write image");
        off += buf.len() as u64;
    }
    f.set_len(size).expect("truncate image");
}
