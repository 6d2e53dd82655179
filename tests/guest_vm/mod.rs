// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared support for the QEMU tests that drive the guest's write/verify loop
//! (`tests/guest/rootfs/vbk/test-writeloop.sh`) while the host disturbs the
//! backend: `tests/qemu_restart.rs` (SIGKILL + restart of `vhost-user-blk`)
//! and `tests/qemu_migration.rs` (live migration between two QEMUs).
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::process::{self, have};

/// Image size; records live in [0, 32 MiB), the stop block at 48 MiB.
pub const IMAGE_SIZE: u64 = 64 << 20;
pub const RECORD: usize = 4096;
/// Record slots per guest writer (the guest default).
pub const PER_WORKER: u64 = 4096;
/// 4 KiB block index of the stop marker (the guest default: 48 MiB).
pub const CTL_BLOCK: u64 = 12288;
/// Queues of the disk: QEMU's default for the `-smp 2` guest (one per vCPU).
pub const QUEUES: u32 = 2;
pub const GUEST_MEM: &str = "256M";

pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest")
}

/// Serializes QEMU guests across test binaries run by hand in parallel
/// (cargo itself runs test binaries one after another): an flock held
/// until the returned file is dropped.
pub fn machine_lock() -> File {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("vbk-qemu-guest.lock"))
        .expect("open lock file");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an fd we own; blocks until the lock is ours.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

/// Fails the test, or with VBK_ALLOW_SKIP_QEMU=1 prints a loud SKIPPED line.
/// Returns true if the caller should return early (skipped).
pub fn skip_or_fail(why: &str) -> bool {
    if std::env::var("VBK_ALLOW_SKIP_QEMU").as_deref() == Ok("1") {
        eprintln!("\n!!!!!!!! SKIPPED QEMU guest test (VBK_ALLOW_SKIP_QEMU=1): {why} !!!!!!!!\n");
        println!("!!!!!!!! SKIPPED QEMU guest test (VBK_ALLOW_SKIP_QEMU=1): {why} !!!!!!!!");
        return true;
    }
    panic!("{why}\n(set VBK_ALLOW_SKIP_QEMU=1 to skip this test instead of failing)");
}

/// The preamble of every QEMU guest test: the machine lock, held while it
/// lives, and the guest prepared. `None` when the test is to be skipped
/// (see [`skip_or_fail`]).
pub fn lock_and_prepare() -> Option<File> {
    let lock = machine_lock();
    if let Err(e) = prepare_guest() {
        if skip_or_fail(&e) {
            return None;
        }
    }
    Some(lock)
}

/// A zeroed disk image of [`IMAGE_SIZE`] bytes at `img`.
pub fn create_image(img: &Path) {
    File::create(img)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create image");
}

fn run_script(name: &str) -> Result<(), String> {
    let (status, text, _) = process::run_captured(Command::new("bash").arg(guest_dir().join(name)))
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    println!("[{name}] {}", text.trim_end());
    if status.success() {
        Ok(())
    } else {
        Err(format!("tests/guest/{name} failed ({status}):\n{text}"))
    }
}

/// install-deps.sh + build-image.sh, once per test process; Err if QEMU or
/// the guest image is unavailable.
pub fn prepare_guest() -> Result<(), String> {
    static PREP: OnceLock<Result<(), String>> = OnceLock::new();
    PREP.get_or_init(|| {
        let deps = run_script("install-deps.sh");
        if !have("qemu-system-x86_64") {
            return Err(format!(
                "qemu-system-x86_64 not found and tests/guest/install-deps.sh could not \
                 install it: {}",
                deps.err().unwrap_or_default()
            ));
        }
        deps?;
        run_script("build-image.sh")
    })
    .clone()
}

/// TCG when /dev/kvm is PVM or the CPU has no VMX/SVM, KVM otherwise.
pub fn accel_args() -> Vec<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    let kvm_ok = hw
        && !Path::new("/sys/module/kvm_pvm").exists()
        && OpenOptions::new().write(true).open("/dev/kvm").is_ok();
    let a: &[&str] = if kvm_ok {
        &["-accel", "kvm", "-cpu", "host"]
    } else {
        &["-accel", "tcg,thread=multi", "-cpu", "max"]
    };
    a.iter().map(|s| s.to_string()).collect()
}

/// Starts `vhost-user-blk --socket-path SOCK --blk-file IMG` (its default
/// queues, as an operator would run it) with RUST_LOG=info (or the
/// caller's RUST_LOG), logging to `log`.
pub fn spawn_daemon(name: &'static str, sock: &Path, img: &Path, log: PathBuf) -> process::Backend {
    spawn_daemon_with(name, sock, img, log, &[])
}

/// [`spawn_daemon`] with `extra` arguments appended (e.g. `--latency-us N`).
pub fn spawn_daemon_with(
    name: &'static str,
    sock: &Path,
    img: &Path,
    log: PathBuf,
    extra: &[&str],
) -> process::Backend {
    let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
    let mut c = Command::new(&bin);
    c.arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(img)
        .args(extra);
    c.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let mut b = process::Backend::spawn(name, c, log);
    b.wait_for_socket(sock);
    b
}

/// A QEMU instance booting the test guest with one vhost-user-blk-pci disk
/// on `sock` (chardev reconnect on), its serial console in a file and a QMP
/// socket. Killed when dropped.
pub struct Qemu {
    pub child: Child,
    pub console: PathBuf,
    pub qmp_path: PathBuf,
    pub name: &'static str,
}

pub struct QemuOpts<'a> {
    pub name: &'static str,
    pub dir: &'a Path,
    pub sock: &'a Path,
    pub tag: &'a str,
    pub secs: u32,
    pub incoming: Option<&'a Path>,
}

impl Qemu {
    pub fn spawn(o: QemuOpts<'_>) -> Qemu {
        let out = guest_dir().join("out");
        let console = o.dir.join(format!("{}-console.log", o.name));
        let qmp_path = o.dir.join(format!("{}-qmp.sock", o.name));
        let stdio = o.dir.join(format!("{}-qemu.log", o.name));
        let mut c = Command::new("qemu-system-x86_64");
        c.args(accel_args())
            .args(["-smp", "2", "-m", GUEST_MEM])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={GUEST_MEM},share=on"
            ))
            .args(["-machine", "q35,memory-backend=mem"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(out.join("vmlinuz"))
            .arg("-initrd")
            .arg(out.join("initramfs.gz"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 vbk.test=writeloop vbk.wl.tag={} \
                 vbk.wl.secs={} vbk.wl.stall=100",
                o.tag, o.secs
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=c0,path={},reconnect-ms=1000",
                o.sock.display()
            ))
            .arg("-device")
            // No num-queues: QEMU's default, one queue per vCPU.
            .arg("vhost-user-blk-pci,chardev=c0")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(mig) = o.incoming {
            c.arg("-incoming").arg(format!("unix:{}", mig.display()));
        }
        let child = process::spawn_logged(&mut c, &stdio)
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        println!(
            "{}: qemu pid {} console {}",
            o.name,
            child.id(),
            console.display()
        );
        Qemu {
            child,
            console,
            qmp_path,
            name: o.name,
        }
    }

    pub fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn qemu_log(&self) -> String {
        let p = self
            .console
            .with_file_name(format!("{}-qemu.log", self.name));
        fs::read_to_string(p).unwrap_or_default()
    }

    /// Panics (with the console) if QEMU exited.
    pub fn check_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "{}: QEMU exited early ({st})\n---- qemu ----\n{}\n---- console ----\n{}",
                self.name,
                self.qemu_log(),
                self.console_text()
            );
        }
    }

    /// Waits for QEMU to exit by itself; kills it after `timeout`.
    /// Ends a source QEMU after migration: `quit` through QMP, then wait.
    /// A source that had already exited is reported with its status and
    /// log (it should not have).
    pub fn quit_after_migration(&mut self, qmp: &mut Qmp) {
        if let Ok(Some(status)) = self.child.try_wait() {
            println!(
                "NOTE: {} QEMU had already exited ({status}); its log:\n{}",
                self.name,
                self.qemu_log()
            );
        }
        qmp.quit();
        self.wait_exit(Duration::from_secs(20));
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal QMP client.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("QMP {path:?}: {e}"),
                Err(_) => sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.read_msg();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn read_msg(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP: bad JSON {line:?}: {e}"))
    }

    /// Asks QEMU to quit. A QEMU that already went away (its QMP socket
    /// closed) is fine: the caller waits for the process either way.
    pub fn quit(&mut self) {
        let msg = json!({"execute": "quit", "arguments": {}});
        if writeln!(self.writer, "{msg}").is_err() {
            return;
        }
        let mut line = String::new();
        let _ = self.reader.read_line(&mut line);
    }

    /// `query-migrate`: the migration's status and the whole answer.
    pub fn migration_status(&mut self) -> (String, Value) {
        let q = self
            .execute("query-migrate", json!({}))
            .expect("query-migrate");
        let s = q
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        (s, q)
    }

    /// Runs a command; Ok(return) or Err(error object). Events are skipped.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let v = self.read_msg();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
        }
    }
}

/// The number at `path` in a JSON answer (e.g. `["ram", "transferred"]`).
pub fn json_u64(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, p| v.get(p))?.as_u64()
}

/// A live migration of the write-loop guest between two QEMUs, each on
/// its own `vhost-user-blk` daemon, both daemons serving one image file
/// (shared storage). Dropped in the reverse order of creation.
pub struct Migration {
    /// The destination QEMU, started with `-incoming unix:MIG`.
    pub dst: Qemu,
    /// The source QEMU.
    pub src: Qemu,
    /// The destination's daemon (opens the image unlocked).
    pub daemon_b: process::Backend,
    /// The source's daemon.
    pub daemon_a: process::Backend,
    /// The migration socket.
    pub mig: PathBuf,
    /// The image file.
    pub img: PathBuf,
    /// Holds the image, sockets and logs.
    pub dir: tempfile::TempDir,
}

impl Migration {
    /// Start both daemons and both QEMUs, the guest's loop tagged `tag`,
    /// and wait until the source's writers completed `records` records.
    pub fn start(tag: &str, records: u64) -> Migration {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        let sock_a = dir.path().join("blk-a.sock");
        let sock_b = dir.path().join("blk-b.sock");
        let mig = dir.path().join("mig.sock");
        create_image(&img);
        let daemon_a = spawn_daemon("vhost-user-blk A", &sock_a, &img, dir.path().join("a.log"));
        // Shared storage: the source holds the image lock, the destination
        // opens the image unlocked while both run.
        let daemon_b = spawn_daemon_with(
            "vhost-user-blk B",
            &sock_b,
            &img,
            dir.path().join("b.log"),
            &["--no-lock"],
        );
        let mut src = Qemu::spawn(QemuOpts {
            name: "src",
            dir: dir.path(),
            sock: &sock_a,
            tag,
            secs: 150,
            incoming: None,
        });
        let dst = Qemu::spawn(QemuOpts {
            name: "dst",
            dir: dir.path(),
            sock: &sock_b,
            tag,
            secs: 150,
            incoming: Some(&mig),
        });
        wait_console(&mut src, Duration::from_secs(90), "the write loop", |c| {
            let p = progress(c);
            p[0] + p[1] >= records
        });
        Migration {
            dst,
            src,
            daemon_b,
            daemon_a,
            mig,
            img,
            dir,
        }
    }

    /// Start the migration through the source's QMP.
    pub fn migrate(&self, sq: &mut Qmp) {
        sq.execute(
            "migrate",
            json!({"uri": format!("unix:{}", self.mig.display())}),
        )
        .expect("migrate");
    }

    /// The migration ended in `status`, as `last` (its last `query-migrate`)
    /// says: it must be "completed"; else every log is shown.
    pub fn assert_completed(&self, status: &str, last: &Value) {
        assert_eq!(
            status,
            "completed",
            "migration {status}: {last}\n---- src qemu ----\n{}\n---- dst qemu ----\n{}\n---- daemon A ----\n{}\n---- daemon B ----\n{}",
            self.src.qemu_log(),
            self.dst.qemu_log(),
            self.daemon_a.log_text(),
            self.daemon_b.log_text()
        );
    }

    /// After the migration: quit the source QEMU, stop its daemon.
    pub fn quit_source(&mut self, sq: &mut Qmp) {
        self.src.quit_after_migration(sq);
        self.daemon_a.stop(Duration::from_secs(5));
    }

    /// Wait for `records` more records than `during` on the destination,
    /// then stop the guest's loop, wait for the destination to power off
    /// and stop its daemon. Returns (the progress then, whether it powered
    /// off).
    pub fn finish_on_destination(&mut self, during: [u64; 2], records: u64) -> ([u64; 2], bool) {
        wait_console(
            &mut self.dst,
            Duration::from_secs(90),
            "records on the destination",
            |c| {
                let p = progress(c);
                p[0] + p[1] >= during[0] + during[1] + records
            },
        );
        let after = progress(&self.dst.console_text());
        write_stop_marker(&self.img);
        let exited = self.dst.wait_exit(Duration::from_secs(90));
        self.daemon_b.stop(Duration::from_secs(5));
        (after, exited)
    }
}

/// `key=value` field of a console line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The VBK-* lines of a console, with whatever precedes them stripped.
pub fn vbk_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.find("VBK-").map(|i| l[i..].trim_end().to_string()))
        .collect()
}

/// Records completed so far per writer, from the progress lines.
pub fn progress(console: &str) -> [u64; 2] {
    let mut k = [0u64; 2];
    for l in vbk_lines(console) {
        if l.starts_with("VBK-WL progress") {
            let w: usize = field(&l, "w").and_then(|v| v.parse().ok()).unwrap_or(9);
            let n: u64 = field(&l, "k").and_then(|v| v.parse().ok()).unwrap_or(0);
            if w < 2 {
                k[w] = k[w].max(n);
            }
        }
    }
    k
}

/// Prints the guest's VBK lines of `console` but its progress lines, under
/// a heading naming `guest`.
pub fn print_vbk_lines(guest: &str, console: &str) {
    println!("---- {guest} VBK lines (progress omitted) ----");
    for l in vbk_lines(console) {
        if !l.starts_with("VBK-WL progress") {
            println!("{l}");
        }
    }
}

/// `records_before=N records_during=N records_after=N` of a migration's
/// summary line, from the writers' progress before, at the end of and
/// after the migration.
pub fn migration_records(before: [u64; 2], during: [u64; 2], after: [u64; 2]) -> String {
    let total = |p: [u64; 2]| p[0] + p[1];
    format!(
        "records_before={} records_during={} records_after={}",
        total(before),
        total(during).saturating_sub(total(before)),
        total(after).saturating_sub(total(during))
    )
}

/// Waits until `cond(console)` holds, QEMU stays alive; panics after `timeout`.
pub fn wait_console(qemu: &mut Qemu, timeout: Duration, what: &str, cond: impl Fn(&str) -> bool) {
    process::poll_until(timeout, Duration::from_millis(100), |late| {
        if cond(&qemu.console_text()) {
            return true;
        }
        qemu.check_alive();
        assert!(
            !late,
            "{}: timed out waiting for {what}\n---- console ----\n{}",
            qemu.name,
            qemu.console_text()
        );
        false
    });
}

/// What the guest writes in record `k` of writer `w`.
pub fn expected_record(tag: &str, w: u64, k: u64) -> Vec<u8> {
    let slot = w * PER_WORKER + k;
    let s = format!("VBK-WREC v1 tag={tag} w={w} k={k:06} slot={slot:06} ");
    let line = format!("{s:.<63}\n");
    assert_eq!(line.len(), 64);
    line.repeat(RECORD / 64).into_bytes()
}

/// Tells the guest loop to stop: the VBK-STOP block, written straight into
/// the image file (the guest reads it through the daemon with O_DIRECT).
pub fn write_stop_marker(img: &Path) {
    let mut block = format!("{:<4095}\n", "VBK-STOP host says stop").into_bytes();
    block.truncate(RECORD);
    let f = OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open image");
    f.write_all_at(&block, CTL_BLOCK * RECORD as u64)
        .expect("write stop marker");
    f.sync_data().ok();
}

/// Checks every record the guest reported in the image file; returns the
/// number of records verified. Panics on the first bad one.
pub fn verify_records(img: &Path, tag: &str, counts: &[u64]) -> u64 {
    let mut data = Vec::new();
    File::open(img)
        .and_then(|mut f| f.read_to_end(&mut data))
        .expect("read image");
    assert_eq!(data.len() as u64, IMAGE_SIZE, "image size changed");
    let mut n = 0;
    for (w, &count) in counts.iter().enumerate() {
        assert!(count <= PER_WORKER);
        for k in 0..count {
            let want = expected_record(tag, w as u64, k);
            let off = ((w as u64 * PER_WORKER + k) as usize) * RECORD;
            let got = &data[off..off + RECORD];
            if got != want.as_slice() {
                let p = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                let s = p / 64 * 64;
                panic!(
                    "image: record w={w} k={k} (byte {:#x}) is wrong at +{p}:\n got: {:?}\nwant: {:?}",
                    off,
                    String::from_utf8_lossy(&got[s..s + 64]),
                    String::from_utf8_lossy(&want[s..s + 64])
                );
            }
            n += 1;
        }
        // The slot after the last reported record must not hold a record:
        // the guest counts every write it issued.
        if count < PER_WORKER {
            let off = ((w as u64 * PER_WORKER + count) as usize) * RECORD;
            assert!(
                !data[off..off + 8].starts_with(b"VBK-WREC"),
                "image: writer {w} has a record past its reported count {count}"
            );
        }
    }
    n
}

/// The guest's `VBK-RESULT <tag> ...` line and its per-writer counts.
pub struct LoopResult {
    pub line: String,
    pub records: u64,
    pub errors: u64,
    pub counts: Vec<u64>,
    pub maxgap_ms: u64,
    pub stalls: Vec<String>,
}

pub fn parse_result(console: &str, tag: &str) -> Option<LoopResult> {
    let lines = vbk_lines(console);
    let prefix = format!("VBK-RESULT {tag} ");
    let line = lines.iter().find(|l| l.starts_with(&prefix))?.clone();
    let num = |k: &str| {
        field(&line, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    Some(LoopResult {
        records: num("records"),
        errors: num("errors"),
        maxgap_ms: num("maxgap_ms"),
        counts: field(&line, "counts")
            .unwrap_or("")
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect(),
        stalls: lines
            .iter()
            .filter(|l| l.starts_with("VBK-STALL"))
            .cloned()
            .collect(),
        line,
    })
}

/// Prints the last `n` lines of a log under a heading.
pub fn print_tail(what: &str, text: &str, n: usize) {
    let lines: Vec<&str> = text.lines().collect();
    println!("---- {what} (last {n} lines) ----");
    for l in &lines[lines.len().saturating_sub(n)..] {
        println!("{l}");
    }
}
