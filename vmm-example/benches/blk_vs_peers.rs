// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blk_vs_peers`: our `vhost-user-blk` against the backends people run
//! today, through a real vhost-user frontend (libblkio's
//! `virtio-blk-vhost-user` driver, the library QEMU's `blkio` driver uses).
//!
//! ```text
//! cargo bench -p vmm-example --bench blk_vs_peers
//! cargo bench -p vmm-example --bench blk_vs_peers -- --reps 3 --secs 1 --unpinned
//! cargo bench -p vmm-example --bench blk_vs_peers -- --help
//! ```
//!
//! Backends, each a fresh process per run:
//!
//! - `ours`: `vhost-user-blk --null` / `--image`.
//! - `peer`: `examples/peer_vub_blk.rs`, the same device written on rust-vmm's
//!   `vhost-user-backend` 0.24.
//! - `qsd`: `qemu-storage-daemon` with a `null-co` or `file` blockdev and a
//!   `vhost-user-blk` export, when it is installed.
//!
//! The load is 4 KiB random reads at queue depth 1, 32 and 128 (per queue)
//! on 1 and 2 queues, completions taken from blkio's completion eventfd (the
//! client sleeps in `ppoll`/`poll`; nobody busy-polls). By default the
//! benchmark and the backend are pinned to the same CPU, which makes the
//! numbers stable on small machines; `--unpinned` lets the scheduler place
//! them. For every repetition each backend runs once, in a rotating order,
//! and the medians over repetitions are reported.
//!
//! Before measuring, the benchmark builds the backends itself with
//! `cargo build --release -p vmm-example --bins --examples` (skip with
//! `--no-build`). Nothing here is asserted: the issue's targets are printed
//! as met or not met next to the ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_example::blkio_client::BlkioClient;

const BLOCK: usize = 4096;
const QSD: &str = "/usr/bin/qemu-storage-daemon";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ours,
    Peer,
    Qsd,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Ours, Kind::Peer, Kind::Qsd];

    fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Peer => "peer",
            Kind::Qsd => "qsd",
        }
    }

    fn long_name(self) -> &'static str {
        match self {
            Kind::Ours => "ours (`vhost-user-blk`)",
            Kind::Peer => "peer (`vhost-user-backend` 0.24)",
            Kind::Qsd => "qemu-storage-daemon",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Null,
    File,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Null, Mode::File];

    fn name(self) -> &'static str {
        match self {
            Mode::Null => "null",
            Mode::File => "file",
        }
    }
}

struct Opts {
    reps: usize,
    secs: f64,
    warmup: f64,
    cpu: Option<usize>,
    depths: Vec<usize>,
    queues: Vec<usize>,
    kinds: Vec<Kind>,
    modes: Vec<Mode>,
    size: u64,
    build: bool,
    out: Option<PathBuf>,
}

const USAGE: &str = "blk_vs_peers [--reps N (5)] [--secs S (2)] [--warmup S (0.2)]
             [--cpu N (last CPU) | --unpinned] [--depths 1,32,128] [--queues 1,2]
             [--backends ours,peer,qsd] [--modes null,file] [--size-mib 1024]
             [--no-build] [--out FILE (target/blk_vs_peers/results.md)]";

fn parse_list<T: std::str::FromStr>(v: &str) -> Vec<T> {
    v.split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

/// A comma-separated list of the values in `all`, each given by its
/// `name` (panics on an unknown `what`).
fn parse_names<T: Copy>(v: &str, all: &[T], name: fn(T) -> &'static str, what: &str) -> Vec<T> {
    v.split(',')
        .map(|s| {
            all.iter()
                .copied()
                .find(|&t| name(t) == s)
                .unwrap_or_else(|| panic!("unknown {what} {s}"))
        })
        .collect()
}

fn parse_args() -> Opts {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut o = Opts {
        reps: 5,
        secs: 2.0,
        warmup: 0.2,
        cpu: Some(ncpu - 1),
        depths: vec![1, 32, 128],
        queues: vec![1, 2],
        kinds: vec![Kind::Ours, Kind::Peer, Kind::Qsd],
        modes: vec![Mode::Null, Mode::File],
        size: 1 << 30,
        build: true,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            "--reps" => o.reps = val().parse().expect("--reps"),
            "--secs" => o.secs = val().parse().expect("--secs"),
            "--warmup" => o.warmup = val().parse().expect("--warmup"),
            "--cpu" => o.cpu = Some(val().parse().expect("--cpu")),
            "--unpinned" => o.cpu = None,
            "--depths" => o.depths = parse_list(&val()),
            "--queues" => o.queues = parse_list(&val()),
            "--size-mib" => o.size = val().parse::<u64>().expect("--size-mib") << 20,
            "--no-build" => o.build = false,
            "--out" => o.out = Some(PathBuf::from(val())),
            "--backends" => o.kinds = parse_names(&val(), &Kind::ALL, Kind::name, "backend"),
            "--modes" => o.modes = parse_names(&val(), &Mode::ALL, Mode::name, "mode"),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    o
}

/// `target/release`, found from this executable (`target/release/deps/…`).
fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("bench executable lives in target/<profile>/deps")
        .to_path_buf()
}

fn build_backends() {
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

fn pin_self(cpu: usize) {
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

struct Setup<'a> {
    release: &'a Path,
    dir: &'a Path,
    image: &'a Path,
    size: u64,
    cpu: Option<usize>,
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
struct Sample {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_ns_per_req: f64,
    rss_kib: u64,
    threads: u64,
}

fn run_one(
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

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A raw image of `size` bytes with real (non-zero) data in every block, so
/// the file is fully allocated and in the page cache after it is written.
fn make_image(path: &Path, size: u64) {
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

type Key = (Mode, usize, usize, Kind);

struct Results {
    samples: BTreeMap<Key, Vec<Sample>>,
}

impl Results {
    fn med(&self, key: Key, f: impl Fn(&Sample) -> f64) -> f64 {
        self.samples
            .get(&key)
            .map_or(f64::NAN, |v| median(v.iter().map(f).collect()))
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    // SAFETY: sysconf only reads a configuration value. (Not
    // available_parallelism: this thread may already be pinned.)
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{ncpu} × {model}, Linux {}", kernel.trim())
}

fn today() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown date".into(), |s| s.trim().to_string())
}

fn fmt_iops(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else {
        format!("{:.0} K", v / 1e3)
    }
}

fn fmt_f(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.prec$}")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

fn report(opts: &Opts, res: &Results, kinds: &[Kind]) -> String {
    let mut s = String::new();
    let w = &mut s;
    let pin = match opts.cpu {
        Some(c) => format!("client and backend pinned to CPU {c}"),
        None => "unpinned".into(),
    };
    let _ = writeln!(
        w,
        "### virtio-blk over vhost-user: ours vs peers ({})\n",
        today()
    );
    let _ = writeln!(w, "Machine: {}.  ", machine());
    let _ = writeln!(
        w,
        "Load: libblkio `virtio-blk-vhost-user`, 4 KiB random reads, completion eventfd (no polling), \
         {pin}; queue depth is per queue; {} interleaved repetitions of {} s each, medians shown; \
         disk {} MiB (file: raw, preallocated, page-cache warm).  ",
        opts.reps,
        opts.secs,
        opts.size >> 20
    );
    let _ = writeln!(
        w,
        "Command: `cargo bench -p vmm-example --bench blk_vs_peers`\n"
    );
    for &mode in &opts.modes {
        mode_table(w, opts, res, kinds, mode);
    }

    // Idle footprint: after the handshake, before any I/O.
    let _ = writeln!(
        w,
        "Idle footprint after the handshake (median VmRSS / threads):\n"
    );
    let _ = writeln!(w, "| backend | target | queues | VmRSS KiB | threads |");
    let _ = writeln!(w, "|---|---|---|---:|---:|");
    for &k in kinds {
        for &mode in &opts.modes {
            for &nq in &opts.queues {
                let all: Vec<&Sample> = opts
                    .depths
                    .iter()
                    .filter_map(|&d| res.samples.get(&(mode, nq, d, k)))
                    .flatten()
                    .collect();
                if all.is_empty() {
                    continue;
                }
                let rss = median(all.iter().map(|s| s.rss_kib as f64).collect());
                let thr = median(all.iter().map(|s| s.threads as f64).collect());
                let _ = writeln!(
                    w,
                    "| {} | {} | {nq} | {rss:.0} | {thr:.0} |",
                    k.long_name(),
                    mode.name()
                );
            }
        }
    }
    let _ = writeln!(w);

    targets(w, opts, res, kinds);
    s
}

/// The results table of one target `mode`: IOPS, ratios, latencies and
/// CPU per request of every backend, by queues and depth.
fn mode_table(w: &mut String, opts: &Opts, res: &Results, kinds: &[Kind], mode: Mode) {
    let has = |k: Kind| kinds.contains(&k);
    let _ = writeln!(w, "#### {} target\n", mode.name());
    let mut hdr = String::from("| queues | depth |");
    let mut sep = String::from("|---|---|");
    for &k in kinds {
        let _ = write!(hdr, " {} IOPS |", k.name());
        sep.push_str("---:|");
    }
    if has(Kind::Peer) {
        hdr.push_str(" ours/peer |");
        sep.push_str("---:|");
    }
    if has(Kind::Qsd) {
        hdr.push_str(" ours/qsd |");
        sep.push_str("---:|");
    }
    for &k in kinds {
        let _ = write!(hdr, " {} p50/p99 µs |", k.name());
        sep.push_str("---:|");
    }
    for &k in kinds {
        let _ = write!(hdr, " {} CPU ns/req |", k.name());
        sep.push_str("---:|");
    }
    let _ = writeln!(w, "{hdr}\n{sep}");
    for &nq in &opts.queues {
        for &d in &opts.depths {
            let mut row = format!("| {nq} | {d} |");
            for &k in kinds {
                let _ = write!(
                    row,
                    " {} |",
                    fmt_iops(res.med((mode, nq, d, k), |x| x.iops))
                );
            }
            let ours = res.med((mode, nq, d, Kind::Ours), |x| x.iops);
            for other in [Kind::Peer, Kind::Qsd] {
                if has(other) {
                    let r = ours / res.med((mode, nq, d, other), |x| x.iops);
                    let _ = write!(row, " {}× |", fmt_f(r, 2));
                }
            }
            for &k in kinds {
                let _ = write!(
                    row,
                    " {} / {} |",
                    fmt_f(res.med((mode, nq, d, k), |x| x.p50_us), 1),
                    fmt_f(res.med((mode, nq, d, k), |x| x.p99_us), 1)
                );
            }
            for &k in kinds {
                let _ = write!(
                    row,
                    " {} |",
                    fmt_f(res.med((mode, nq, d, k), |x| x.cpu_ns_per_req), 0)
                );
            }
            let _ = writeln!(w, "{row}");
        }
    }
    let _ = writeln!(w);
}

/// The bound a target ratio should keep.
#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// One target: the 1-queue ratio ours/other of a metric at a queue depth,
/// its name, and its bound.
type Target = (Kind, usize, &'static str, fn(&Sample) -> f64, Bound);

/// The targets from the issue, in report order.
#[rustfmt::skip]
const TARGETS: [Target; 7] = [
    (Kind::Peer, 32, "IOPS ours/peer ≥ 1.3", |x| x.iops, Bound::AtLeast(1.3)),
    (Kind::Peer, 32, "CPU/request ours/peer ≤ 0.7", |x| x.cpu_ns_per_req, Bound::AtMost(0.7)),
    (Kind::Peer, 128, "IOPS ours/peer ≥ 1.3", |x| x.iops, Bound::AtLeast(1.3)),
    (Kind::Peer, 128, "CPU/request ours/peer ≤ 0.7", |x| x.cpu_ns_per_req, Bound::AtMost(0.7)),
    (Kind::Peer, 1, "p50 latency ours/peer ≤ 1.0", |x| x.p50_us, Bound::AtMost(1.0)),
    (Kind::Qsd, 32, "IOPS ours/qsd ≥ 5", |x| x.iops, Bound::AtLeast(5.0)),
    (Kind::Qsd, 128, "IOPS ours/qsd ≥ 5", |x| x.iops, Bound::AtLeast(5.0)),
];

/// The targets from the issue, reported, never asserted.
fn targets(w: &mut String, opts: &Opts, res: &Results, kinds: &[Kind]) {
    let _ = writeln!(w, "Targets (1 queue):\n");
    let _ = writeln!(w, "| target | value | status |\n|---|---:|---|");
    for &mode in &opts.modes {
        let m = mode.name();
        for &(other, d, what, metric, bound) in &TARGETS {
            let key = |k| (mode, 1, d, k);
            if !kinds.contains(&other) || !res.samples.contains_key(&key(Kind::Ours)) {
                continue;
            }
            let r = res.med(key(Kind::Ours), metric) / res.med(key(other), metric);
            let met = match bound {
                Bound::AtLeast(b) => r >= b,
                Bound::AtMost(b) => r <= b,
            };
            let _ = writeln!(
                w,
                "| {m}, qd {d}: {what} | {}× | {} |",
                fmt_f(r, 2),
                verdict(met)
            );
        }
    }
}

fn main() {
    let mut opts = parse_args();
    if opts.build {
        build_backends();
    }
    let release = release_dir();
    for bin in ["vhost-user-blk", "examples/peer_vub_blk"] {
        assert!(
            release.join(bin).exists(),
            "{} is missing: run cargo build --release -p vmm-example --bins --examples",
            release.join(bin).display()
        );
    }
    if opts.kinds.contains(&Kind::Qsd) && !Path::new(QSD).exists() {
        eprintln!("{QSD} not installed: skipping qemu-storage-daemon");
        opts.kinds.retain(|k| *k != Kind::Qsd);
    }
    let dir = release.join("..").join("blk_vs_peers");
    std::fs::create_dir_all(&dir).expect("create work dir");
    let image = dir.join("disk.raw");
    if opts.modes.contains(&Mode::File) {
        eprintln!("preparing a {} MiB raw image", opts.size >> 20);
        make_image(&image, opts.size);
    }
    if let Some(cpu) = opts.cpu {
        pin_self(cpu);
    }
    let setup = Setup {
        release: &release,
        dir: &dir,
        image: &image,
        size: opts.size,
        cpu: opts.cpu,
    };
    let kinds = opts.kinds.clone();
    let mut res = Results {
        samples: BTreeMap::new(),
    };
    let cells = opts.modes.len() * opts.queues.len() * opts.depths.len();
    let total = cells * opts.reps * kinds.len();
    let mut done = 0;
    for &mode in &opts.modes {
        for &nq in &opts.queues {
            for &depth in &opts.depths {
                for rep in 0..opts.reps {
                    // Rotate the order so no backend always runs first.
                    for i in 0..kinds.len() {
                        let kind = kinds[(i + rep) % kinds.len()];
                        let s = run_one(&setup, &opts, kind, mode, nq, depth);
                        done += 1;
                        eprintln!(
                            "[{done}/{total}] {} q{nq} qd{depth} rep {rep} {:>5}: {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs  {:>6.0} ns CPU/req",
                            mode.name(),
                            kind.name(),
                            s.iops,
                            s.p50_us,
                            s.p99_us,
                            s.cpu_ns_per_req
                        );
                        res.samples
                            .entry((mode, nq, depth, kind))
                            .or_default()
                            .push(s);
                    }
                }
            }
        }
    }
    let table = report(&opts, &res, &kinds);
    println!("\n{table}");
    let out = opts.out.clone().unwrap_or_else(|| dir.join("results.md"));
    if let Ok(mut f) = File::create(&out) {
        let _ = f.write_all(table.as_bytes());
        eprintln!("table written to {}", out.display());
    }
}
