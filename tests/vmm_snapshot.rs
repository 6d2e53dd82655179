// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whole-VM snapshots with `vmm-example`, and moving a running guest's disk
//! and console between homes through them.
//!
//! `tests/guest/run-vmm.sh` with `VBK_SCENARIO=snapshot` (nested under QEMU
//! TCG where `/dev/kvm` is PVM, direct where KVM is real) boots the test
//! guest writing numbered records to its disk, then: SIGUSR1 saves the VM
//! (disk in process) → restore with the disk served by a `vhost-user-blk`
//! process → SIGUSR1 again → restore with the disk back in process → the
//! guest finishes, and every record it wrote is checked in the image. The
//! console moves with the disk (in process → `vhost-user-console` → in
//! process) holding host input the guest reads only at the end: some of it
//! in the device's own state at both cuts, so it crosses through
//! DEVICE_STATE. The figures are in the `VBK-VMSNAP` and
//! `VBK-VMSNAP-CONSOLE` summary lines.
//!
//! The command-line and file checks run `vmm-example` on the host.
//! Without `/dev/kvm` the boot test prints a loud SKIPPED line and passes.
//! Build first: `cargo build --release --workspace`.
//! Run: `cargo test --release --test vmm_snapshot -- --nocapture`.

mod process;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use vmm_example::vmm::snapshot::{write, DeviceRecord, VmState};
use vmm_example::vmm::DeviceSpec;

/// `key=value` fields of the first line starting with `prefix`.
fn fields(text: &str, prefix: &str) -> Option<HashMap<String, String>> {
    let line = text.lines().find(|l| l.trim_start().starts_with(prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn guest_survives_two_snapshots_while_its_disk_changes_homes() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("\n!!!!!!!! SKIPPED guest_survives_two_snapshots: /dev/kvm is absent !!!!!!!!\n");
        return;
    }
    let (status, text) = process::run_vmm_scenario("snapshot", 600, "VBK-VMSNAP");
    let f = fields(&text, "VBK-VMSNAP ").expect("summary line");
    let num = |k: &str| -> u64 { f[k].parse().unwrap_or_else(|_| panic!("{k}={}", f[k])) };
    assert_eq!(num("cuts"), 2);
    assert_eq!(num("lost"), 0, "records lost across the snapshots");
    assert_eq!(num("errors"), 0, "the guest saw I/O errors");
    assert!(num("records") >= 48, "too few records: {}", num("records"));
    assert_eq!(num("verified"), num("records"));
    // The save lines name both homes.
    assert!(text.contains("VBK-VMSNAP-CUT n=1 home=in-process"));
    assert!(text.contains("VBK-VMSNAP-CUT n=2 home=vhost-user"));
    // The console's bytes: all read by the guest, in order, after crossing
    // both cuts partly in the device's own state.
    let c = fields(&text, "VBK-VMSNAP-CONSOLE ").expect("console summary line");
    assert_eq!(c["lost"], "0", "console bytes lost");
    assert_eq!(c["md5"], "match", "console bytes out of order or corrupt");
    assert_eq!(c["sent"], c["received"]);
    let states: Vec<u64> = c["state_at_cuts"]
        .split(',')
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    assert_eq!(states.len(), 2, "state_at_cuts={}", c["state_at_cuts"]);
    assert!(
        states.iter().all(|&s| s > 0),
        "the console carried no state of its own at a cut: {states:?}"
    );
    assert!(status.success());
}

fn vmm(args: &[&str]) -> Output {
    let bin = process::binary("vmm-example").unwrap();
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn restore_refuses_a_file_that_is_not_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.snap");
    std::fs::write(&junk, vec![0x55u8; 8192]).unwrap();
    fails_with(
        &vmm(&["--restore-from", junk.to_str().unwrap()]),
        "not a vmm-example snapshot",
    );
    let missing = dir.path().join("missing.snap");
    fails_with(
        &vmm(&["--restore-from", missing.to_str().unwrap()]),
        "opening the snapshot file",
    );
}

#[test]
fn restore_refuses_devices_of_another_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let snap = virtio_backend_kit::snapshot::DeviceSnapshot {
        device_type: 4, // entropy
        ..Default::default()
    };
    let state = VmState {
        mem_mib: 64,
        vcpus: Vec::new(),
        irqchips: Vec::new(),
        pit: Default::default(),
        clock: Default::default(),
        serial: Default::default(),
        devices: vec![DeviceRecord {
            spec: DeviceSpec::in_process("rng", Default::default()),
            envelope: virtio_backend_kit::snapshot::encode(&snap).unwrap(),
        }],
    };
    let ram = tempfile::tempfile().unwrap();
    ram.set_len(64 << 20).unwrap();
    write(&path, &state, &ram, 64 << 20).unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let p = path.to_str().unwrap();
    fails_with(
        &vmm(&["--restore-from", p, "--disk", image.to_str().unwrap()]),
        "virtio device type 4",
    );
    fails_with(
        &vmm(&[
            "--restore-from",
            p,
            "--rng",
            "--disk",
            image.to_str().unwrap(),
        ]),
        "the snapshot has 1 device(s), 2 given",
    );
}

#[test]
fn restore_and_kernel_options_conflict() {
    let out = vmm(&["--restore-from", "/x.snap", "--kernel", "/vmlinuz"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error expected");
    let out = vmm(&["--restore-from", "/x.snap", "--mem-mib", "128"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error expected");
}
