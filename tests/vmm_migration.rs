// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration with `vmm-example`, on the host.
//!
//! - A destination refuses a corrupt or truncated stream with a clear
//!   error and exits 1, telling the source so (no KVM needed: the stream is
//!   checked before a VM is built).
//! - A running VM (`/dev/kvm`; the test kernel runs its decompressor under
//!   PVM, which is all the vCPU needs to keep writing memory) migrates
//!   between two processes, the destination on TCP; before that, a
//!   destination that goes away in the middle of the stream and a second
//!   SIGUSR1 during the migration leave the source running, and the same
//!   source migrates on the next SIGUSR1. The guest's disks changing homes
//!   under a Linux that writes records the whole time is the nested test,
//!   `tests/guest/run-vmm.sh` with `VBK_SCENARIO=livemig` (run by
//!   `tests/vmm_boot.rs`).
//!
//! Build first: `cargo build --release --workspace`.
//! Run: `cargo test --release --test vmm_migration -- --nocapture`.

mod process;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_example::vmm::migration::stream::{StreamWriter, PAGE_SIZE};

fn spawn_vmm(args: &[&str], log: &Path) -> Child {
    let bin = process::binary("vmm-example").unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null());
    process::spawn_logged(&mut cmd, log).unwrap()
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn wait_for_text(log: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_log(log);
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "'{needle}' not in the log after {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm-example did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigusr1(child: &Child) {
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-USR1", &pid]).status().unwrap();
    assert!(sent.success(), "kill -USR1 {pid}");
}

fn connect(sock: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
    }
}

/// A destination is sent `bytes` (then the connection is closed): it must
/// exit 1 saying `needle`, and answer "refused" when it got that far.
fn destination_refuses(bytes: &[u8], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mig.sock");
    let log = dir.path().join("dest.log");
    let addr = format!("unix:{}", sock.display());
    let mut dest = spawn_vmm(&["--migrate-from", &addr], &log);
    let mut conn = connect(&sock);
    // The destination may stop reading (and close) as soon as it sees the
    // damage: a failed write here is fine.
    let _ = conn.write_all(bytes);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = conn.read_to_end(&mut answer);
    let code = wait_exit(&mut dest, Duration::from_secs(20));
    let text = read_log(&log);
    println!("--- destination fed {} bytes:\n{text}", bytes.len());
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(needle), "expected '{needle}' in:\n{text}");
    assert!(text.contains("refusing the migration"), "{text}");
    if !answer.is_empty() {
        assert_eq!(answer, [0x52], "the answer must be 'refused'");
    }
}

fn good_stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), 64 << 20).unwrap();
    w.ram(0x10_0000, &vec![0xa5; 4 * PAGE_SIZE as usize])
        .unwrap();
    w.ram(0x20_0000, &vec![0x5a; PAGE_SIZE as usize]).unwrap();
    w.state(b"{\"mem_mib\":64}").unwrap();
    w.end().unwrap();
    std::mem::take(w.get_mut())
}

#[test]
fn destination_refuses_corrupt_and_truncated_streams() {
    let good = good_stream();
    // A flipped bit in the second page of the first RAM record.
    let mut corrupt = good.clone();
    corrupt[32 + 8 + 8 + PAGE_SIZE as usize + 100] ^= 0x01;
    destination_refuses(&corrupt, "RAM record checksum mismatch");
    // Cut inside the second RAM record.
    let cut = 32 + 8 + 8 + 4 * PAGE_SIZE as usize + 8 + 100;
    destination_refuses(&good[..cut], "the migration stream ended early");
    // Another program's bytes.
    destination_refuses(&[0x55u8; 4096], "bad magic");
    // Intact, but the state is not a VM: refused after the last record.
    destination_refuses(&good, "the VM state");
}

fn kernel() -> Option<(PathBuf, PathBuf)> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/out");
    let (k, i) = (out.join("vmlinuz"), out.join("initramfs.gz"));
    (k.exists() && i.exists()).then_some((k, i))
}

#[test]
fn running_vm_migrates_after_a_destination_that_went_away() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("\n!!!!!!!! SKIPPED running_vm_migrates: /dev/kvm is absent !!!!!!!!\n");
        return;
    }
    let (kernel, initrd) = kernel().expect("tests/guest/build-image.sh first (tests/run.sh does)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mig.sock");
    let addr = format!("unix:{}", sock.display());
    let src_log = dir.path().join("src.log");
    let mut src = spawn_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem-mib",
            "128",
            "--vcpus",
            "1",
            "--migrate-to",
            &addr,
        ],
        &src_log,
    );
    std::thread::sleep(Duration::from_millis(500));

    // A destination that takes 4 MiB of the stream and goes away.
    let listener = UnixListener::bind(&sock).unwrap();
    sigusr1(&src);
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = vec![0u8; 4 << 20];
    conn.read_exact(&mut buf).unwrap();
    drop(conn);
    drop(listener);
    std::fs::remove_file(&sock).unwrap();
    let text = wait_for_text(&src_log, "the VM runs on here", Duration::from_secs(60));
    assert!(
        src.try_wait().unwrap().is_none(),
        "the source ended:\n{text}"
    );
    assert!(!text.contains("migrated to"), "{text}");

    // A second SIGUSR1 while the migration runs cancels it: this
    // destination stops reading after 1 MiB, the signal comes, then it
    // reads on to the end, which comes early.
    let listener = UnixListener::bind(&sock).unwrap();
    sigusr1(&src);
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    conn.read_exact(&mut buf).unwrap();
    sigusr1(&src);
    std::thread::sleep(Duration::from_millis(200));
    let mut rest = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = conn.read_to_end(&mut rest);
    drop(conn);
    drop(listener);
    std::fs::remove_file(&sock).unwrap();
    let text = wait_for_text(&src_log, "cancelled by SIGUSR1", Duration::from_secs(60));
    assert!(
        src.try_wait().unwrap().is_none(),
        "the source ended:\n{text}"
    );
    assert!(
        (rest.len() as u64) < 128 << 20,
        "the whole RAM was sent ({} bytes) although cancelled",
        rest.len()
    );

    // The same source, to a real destination, over TCP on loopback this
    // time (the source's address is fixed at start: a relay thread carries
    // the unix connection to the destination's TCP port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let dest_log = dir.path().join("dest.log");
    let mut dest = spawn_vmm(&["--migrate-from", &tcp], &dest_log);
    let relay = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let (unix, _) = relay.accept().unwrap();
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut unix_r, mut tcp_w) = (unix.try_clone().unwrap(), tcp.try_clone().unwrap());
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut unix_r, &mut tcp_w);
            let _ = tcp_w.shutdown(std::net::Shutdown::Write);
        });
        let (mut tcp_r, mut unix_w) = (tcp, unix);
        let _ = std::io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
    });
    wait_for_text(
        &dest_log,
        "waiting for a migration",
        Duration::from_secs(10),
    );
    sigusr1(&src);
    let code = wait_exit(&mut src, Duration::from_secs(120));
    let text = read_log(&src_log);
    println!("--- source:\n{text}");
    assert_eq!(code, Some(0), "the source did not end cleanly");
    let line = text
        .lines()
        .find(|l| l.contains("migrated to"))
        .expect("the source's summary line");
    println!(
        "VBK-LIVEMIG-HOST {}",
        line.split("migrated to ").nth(1).unwrap_or("")
    );
    let dest_text = wait_for_text(
        &dest_log,
        "restored from migration",
        Duration::from_secs(30),
    );
    // The guest runs on there.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        dest.try_wait().unwrap().is_none(),
        "the destination ended:\n{}",
        read_log(&dest_log)
    );
    println!("--- destination:\n{dest_text}");
    let _ = dest.kill();
    let _ = dest.wait();
}

/// `key=value` fields of every line starting with `prefix`.
fn lines_with(text: &str, prefix: &str) -> Vec<std::collections::HashMap<String, String>> {
    text.lines()
        .filter(|l| l.trim_start().starts_with(prefix))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn guest_keeps_writing_while_migrated_live_between_homes() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!(
            "\n!!!!!!!! SKIPPED guest_keeps_writing_while_migrated: /dev/kvm is absent !!!!!!!!\n"
        );
        return;
    }
    let (status, text) = process::run_vmm_scenario("livemig", 900, "VBK-LIVEMIG");
    let cases = lines_with(&text, "VBK-LIVEMIG ");
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str()).collect();
    for want in [
        "inproc-to-vhost-user",
        "vhost-user-to-inproc",
        "vhost-user-kept",
        "console-inproc-to-vhost-user",
        "console-vhost-user-to-inproc",
    ] {
        assert!(names.contains(&want), "case {want} missing: {names:?}");
    }
    for c in &cases {
        assert_eq!(c["lost"], "0", "records lost: {c:?}");
        let records: u64 = c["records"].parse().unwrap();
        assert!(records >= 64, "too few records: {c:?}");
        let rounds: u64 = c["rounds"].parse().unwrap();
        assert!(rounds >= 1, "{c:?}");
    }
    let cancels = lines_with(&text, "VBK-LIVEMIG-CANCEL ");
    let kinds: Vec<&str> = cancels.iter().map(|c| c["kind"].as_str()).collect();
    assert_eq!(kinds, ["destination-gone", "refused-after-stop"]);
    assert!(cancels.iter().all(|c| c["resumed"] == "yes"), "{cancels:?}");
    // The console's bytes: all read by the guest, in order, after crossing
    // every cut partly in the device's own state.
    let console = &lines_with(&text, "VBK-LIVEMIG-CONSOLE ")[0];
    assert_eq!(console["lost"], "0", "console bytes lost: {console:?}");
    assert_eq!(
        console["md5"], "match",
        "console bytes out of order or corrupt"
    );
    let states: Vec<u64> = console["state_at_cuts"]
        .split(',')
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    assert_eq!(
        states.len(),
        3,
        "two migrations and the refused one: {states:?}"
    );
    assert!(states.iter().all(|&s| s > 0), "{states:?}");
    let summary = &lines_with(&text, "VBK-LIVEMIG-SUMMARY ")[0];
    assert_eq!(summary["lost"], "0");
    assert_eq!(summary["errors"], "0", "the guest saw I/O errors");
    assert_eq!(summary["verified"], summary["records"]);
    assert!(status.success());
}
