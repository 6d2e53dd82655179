// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Support for tests that run the workspace's binaries and peer programs as
//! real processes.
#![allow(dead_code)]

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Whether a unix socket is bound at `sock` and listening. The file
/// appears at bind(), before listen(): a connect in between is refused, so
/// the file alone is not enough. /proc/net/unix marks listening sockets
/// with the `__SO_ACCEPTCON` flag (00010000) beside the bound path.
fn is_listening(sock: &Path) -> bool {
    let is_socket = fs::metadata(sock)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if !is_socket {
        return false;
    }
    let (Some(path), Ok(table)) = (sock.to_str(), fs::read_to_string("/proc/net/unix")) else {
        return true;
    };
    if !sock.is_absolute() {
        // Bound relative to the daemon's directory: the table's path may
        // not be ours to compare.
        return true;
    }
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == "00010000" && fields[7] == path
    })
}

/// A workspace binary: VBK_BIN_DIR, then
/// `<target>/<profile>/` derived from this test executable
/// (`<target>/<profile>/deps/qemu_guest-*`), then the other profile.
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("VBK_BIN_DIR") {
        candidates.push(PathBuf::from(d).join(name));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            candidates.push(profile_dir.join(name));
            if let Some(target) = profile_dir.parent() {
                candidates.push(target.join("release").join(name));
                candidates.push(target.join("debug").join(name));
            }
        }
    }
    candidates.dedup();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "{name} binary not found (looked at {candidates:?}); \
             run `cargo build --release --workspace` first, or set VBK_BIN_DIR"
            )
        })
}

/// Run `cmd` to the end with stdin from /dev/null: its exit status, its
/// stdout and stderr as one text, and how long it ran.
pub fn run_captured(cmd: &mut Command) -> std::io::Result<(ExitStatus, String, Duration)> {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status, text, t.elapsed()))
}

/// Calls `step` every `interval` until it returns true; its argument says
/// whether `timeout` has passed (the step then fails the test, or keeps
/// going if it may).
pub fn poll_until(timeout: Duration, interval: Duration, mut step: impl FnMut(bool) -> bool) {
    let deadline = Instant::now() + timeout;
    while !step(Instant::now() > deadline) {
        sleep(interval);
    }
}

/// Start `cmd` with stdin from /dev/null and stdout and stderr into a new
/// file `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> std::io::Result<Child> {
    let f = File::create(log).expect("create the log file");
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
}

/// A child process that is killed (SIGTERM, then SIGKILL) when dropped.
pub struct Backend {
    /// The process.
    pub child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Backend {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Backend {
        let child = spawn_logged(&mut cmd, &log)
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Backend { child, name, log }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_socket(&mut self, sock: &Path) {
        poll_until(Duration::from_secs(15), Duration::from_millis(20), |late| {
            if is_listening(sock) {
                return true;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before creating {sock:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                !late,
                "{} did not create {sock:?} within 15s; log:\n{}",
                self.name,
                self.log_text()
            );
            false
        });
    }

    /// Waits up to `grace` for the process to exit by itself, then stops it.
    pub fn stop(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                println!("{} exited by itself: {st}", self.name);
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                println!("{} stopped with SIGTERM", self.name);
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        println!("{} killed", self.name);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `tests/guest/run-vmm.sh` with `VBK_SCENARIO=scenario` (nested where
/// `/dev/kvm` is PVM) and the binaries next to this test's, print what it
/// said and its `marker` lines, and check that the scenario passed.
/// Returns the exit status and the console text.
#[allow(dead_code)]
pub fn run_vmm_scenario(scenario: &str, timeout_s: u32, marker: &str) -> (ExitStatus, String) {
    let bin = binary("vmm-example").unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/run-vmm.sh");
    let (status, text, took) = run_captured(
        Command::new("bash")
            .arg(&script)
            .env("VBK_BIN_DIR", bin.parent().unwrap())
            .env("VBK_SCENARIO", scenario)
            .env("VBK_TIMEOUT", timeout_s.to_string()),
    )
    .unwrap();
    println!(
        "[run-vmm.sh {scenario} took {:.1}s, {status}]\n{text}",
        took.as_secs_f64()
    );
    for line in text.lines().filter(|l| l.contains(marker)) {
        println!("{line}");
    }
    assert!(
        text.contains(&format!("VBK-RESULT vmm=ok scenario={scenario}")),
        "scenario {scenario} failed"
    );
    (status, text)
}

/// qemu-storage-daemon exporting `img` (raw, writable) as a vhost-user-blk
/// backend on `dir/qsd.sock`, ready to connect to, logging to
/// `dir/qsd.log`.
#[allow(dead_code)]
pub fn qsd_blk_export(dir: &Path, img: &Path) -> (Backend, PathBuf) {
    let sock = dir.join("qsd.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ));
    let mut qsd = Backend::spawn("qemu-storage-daemon", cmd, dir.join("qsd.log"));
    qsd.wait_for_socket(&sock);
    (qsd, sock)
}
