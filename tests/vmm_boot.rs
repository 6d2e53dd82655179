// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of `vmm-example`, booting the real Debian 6.1 cloud
//! kernel with the busybox test initramfs of `tests/guest/`.
//!
//! One boot (run by `tests/guest/run-vmm.sh`, nested under QEMU TCG where
//! `/dev/kvm` is PVM, direct where KVM is real) carries the disks
//! `/dev/vda` in-process, `/dev/vdb` served by our `vhost-user-blk` daemon,
//! `/dev/vdc` served by `qemu-storage-daemon` (if installed), a virtio-rng,
//! and two virtio-consoles (`/dev/hvc0` in process, `/dev/hvc1` from the
//! `vhost-user-console` daemon);
//! the tests below each check one fact of that boot's console. The bad
//! kernel tests run `vmm-example` directly on the host.
//!
//! Without `/dev/kvm` every test prints a loud SKIPPED line and passes.
//! Build first: `cargo build --release --workspace`.
//! Run: `cargo test --release --test vmm_boot -- --nocapture`.

mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: /dev/kvm is absent !!!!!!!!\n");
    false
}

fn have_qsd() -> bool {
    process::have("qemu-storage-daemon")
}

/// The console of the shared boot (run once, by whichever test comes first).
fn boot_log() -> &'static Result<String, String> {
    static LOG: OnceLock<Result<String, String>> = OnceLock::new();
    LOG.get_or_init(|| {
        let bin = process::binary("vmm-example")?;
        let bin_dir = bin.parent().ok_or("no binary directory")?.to_path_buf();
        let mut devices = vec!["disk", "vhost-user-blk"];
        if have_qsd() {
            devices.push("qsd-blk");
        }
        devices.push("rng");
        devices.extend(["console", "console-vhost-user"]);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/run-vmm.sh");
        let run = || -> Result<(bool, String), String> {
            let (status, text, took) = process::run_captured(
                Command::new("bash")
                    .arg(&script)
                    .args(&devices)
                    .env("VBK_BIN_DIR", &bin_dir)
                    .env("VBK_VCPUS", "2")
                    .env("VBK_TEST", "blk,rng,console"),
            )
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            println!(
                "[run-vmm.sh {} took {:.1}s, {status}]\n{text}",
                devices.join(" "),
                took.as_secs_f64(),
            );
            Ok((status.success(), text))
        };
        // One boot, judged as it is: a stall is a failure, not a reason to
        // boot again (the VMM's stall report is in the console above).
        let (ok, text) = run()?;
        if !ok {
            println!("\n!!!!!!!! NESTED BOOT FAILED: see the console and any VBK-STALL-REPORT lines !!!!!!!!\n");
        }
        Ok(text)
    })
}

/// The boot's console, or `None` when the test must be skipped.
fn console(test: &str) -> Option<&'static str> {
    if !kvm_or_skip(test) {
        return None;
    }
    match boot_log() {
        Ok(text) => Some(text),
        Err(e) => panic!("{e}"),
    }
}

/// The L2 guest's `VBK-RESULT` line that contains `key`.
fn l2_result<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .filter_map(|l| l.strip_prefix("L2| "))
        .find(|l| l.starts_with("VBK-RESULT") && l.contains(key))
        .unwrap_or_else(|| panic!("no L2 result line with '{key}' in:\n{log}"))
}

/// Some line of `log` starts with `prefix`; else `what` fails the test.
fn assert_has_line(log: &str, prefix: &str, what: &str) {
    assert!(log.lines().any(|l| l.starts_with(prefix)), "{what}:\n{log}");
}

/// The body of test `test`: every check of the L2 guest's I/O on `disk`
/// passed.
fn disk_verified_io(test: &str, disk: &str) {
    let Some(log) = console(test) else {
        return;
    };
    let line = l2_result(log, &format!("disk={disk} "));
    for want in ["write=ok", "read=ok", "verify=ok", "flush=ok", "marker=ok"] {
        assert!(line.contains(want), "{disk}: '{want}' missing in: {line}");
    }
}

#[test]
fn boots_to_userspace() {
    let Some(log) = console("boots_to_userspace") else {
        return;
    };
    assert_has_line(log, "L2| VBK-BOOT ", "the L2 guest never reached /init");
}

#[test]
fn in_process_disk_verified_io() {
    disk_verified_io("in_process_disk_verified_io", "vda");
}

#[test]
fn vhost_user_blk_disk_verified_io() {
    disk_verified_io("vhost_user_blk_disk_verified_io", "vdb");
}

#[test]
fn qemu_storage_daemon_disk_verified_io() {
    if !have_qsd() {
        eprintln!("\n!!!!!!!! SKIPPED qemu_storage_daemon_disk_verified_io: no qemu-storage-daemon !!!!!!!!\n");
        return;
    }
    disk_verified_io("qemu_storage_daemon_disk_verified_io", "vdc");
}

#[test]
fn rng_bytes_read() {
    let Some(log) = console("rng_bytes_read") else {
        return;
    };
    let line = l2_result(log, "rng=");
    assert!(line.contains("rng=ok bytes=64"), "{line}");
    assert!(line.contains("virtio_rng"), "not the virtio rng: {line}");
}

/// `/dev/hvc0` (in process) and `/dev/hvc1` (the `vhost-user-console`
/// daemon): the guest writes a line the host side receives, and reads the
/// line the host types in reply.
#[test]
fn console_carries_bytes_both_ways_in_both_homes() {
    let Some(log) = console("console_carries_bytes_both_ways_in_both_homes") else {
        return;
    };
    let guest: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("VBK-RESULT console dev=").nth(1))
        .collect();
    assert_eq!(guest.len(), 2, "two consoles expected: {guest:?}");
    for line in &guest {
        assert!(
            line.contains("read=VBK-HVC-IN console"),
            "guest read nothing: {line}"
        );
    }
    let host: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("VBK-RESULT console-host"))
        .collect();
    assert_eq!(host.len(), 2, "{host:?}");
    for (line, dev) in host.iter().zip(["hvc0", "hvc1"]) {
        assert!(
            line.contains(&format!("got=VBK-HVC-OUT from={dev}")),
            "{line}"
        );
    }
}

#[test]
fn guest_sees_two_vcpus() {
    let Some(log) = console("guest_sees_two_vcpus") else {
        return;
    };
    let boot = log
        .lines()
        .find(|l| l.starts_with("L2| VBK-BOOT "))
        .unwrap_or_else(|| panic!("no L2 boot line:\n{log}"));
    assert!(boot.contains("cpus=2"), "{boot}");
}

#[test]
fn clean_shutdown_after_guest_poweroff() {
    let Some(log) = console("clean_shutdown_after_guest_poweroff") else {
        return;
    };
    assert_has_line(
        log,
        "L2| VBK-DONE status=ok",
        "the L2 guest did not finish its tests",
    );
    assert!(
        log.contains("guest stopped (PowerOff)"),
        "vmm-example did not see the ACPI power-off:\n{log}"
    );
    assert_has_line(log, "VBK-RESULT vmm=ok rc=0", "vmm-example did not exit 0");
}

fn run_vmm(kernel: &Path) -> (i32, String) {
    let bin = process::binary("vmm-example").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(bin)
        .arg("--kernel")
        .arg(kernel)
        .stdin(Stdio::null())
        .output()
        .expect("run vmm-example");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn missing_kernel_gives_clear_error() {
    if !kvm_or_skip("missing_kernel_gives_clear_error") {
        return;
    }
    let (code, err) = run_vmm(&PathBuf::from("/nonexistent/vmlinuz"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot open kernel /nonexistent/vmlinuz") && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn garbage_kernel_gives_clear_error() {
    if !kvm_or_skip("garbage_kernel_gives_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("not-a-kernel");
    std::fs::write(&kernel, vec![0x5au8; 8192]).expect("write");
    let (code, err) = run_vmm(&kernel);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a bootable x86-64 bzImage"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
