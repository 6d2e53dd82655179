// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use std::io::{Seek, SeekFrom, Write};

use super::*;
use crate::vmm::vcpu::VcpuState;

const MIB: u64 = 1 << 20;

fn vcpu(id: u8) -> VcpuState {
    let mut s = VcpuState {
        id,
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 0x1234_5678_9abc,
            ..Default::default()
        }],
        events: Default::default(),
    };
    s.regs.rip = 0xffff_ffff_8100_0000 + u64::from(id);
    s.sregs.cr3 = 0x9000;
    s.xsave.region[7] = 0xdead_beef;
    s.lapic.regs[0x20] = id as std::os::raw::c_char;
    s
}

fn state(mem_mib: u64) -> VmState {
    VmState {
        mem_mib,
        vcpus: vec![vcpu(0), vcpu(1)],
        irqchips: (0..3)
            .map(|id| kvm_irqchip {
                chip_id: id,
                ..Default::default()
            })
            .collect(),
        pit: Default::default(),
        clock: kvm_clock_data {
            clock: 123_456_789,
            ..Default::default()
        },
        serial: SerialSnapshot {
            divisor: [12, 0],
            interrupt_enable: 2,
            in_buffer: vec![b'x'],
            ..Default::default()
        },
        devices: vec![DeviceRecord {
            spec: DeviceSpec::in_process("rng", Default::default()),
            envelope: vec![1, 2, 3],
        }],
    }
}

/// A 2 MiB "guest RAM" file: a pattern in page 3, one byte in the last
/// page, the rest never written.
fn ram() -> File {
    let mut f = tempfile::tempfile().unwrap();
    f.set_len(2 * MIB).unwrap();
    f.write_all_at(&[0xa5; 4096], 3 * 4096).unwrap();
    f.seek(SeekFrom::Start(2 * MIB - 1)).unwrap();
    f.write_all(&[7]).unwrap();
    f
}

fn written(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("vm.snap");
    let size = write(&path, &state(2), &ram(), 2 * MIB).unwrap();
    assert_eq!(size.ram_data, 2 * 4096, "only the two non-zero pages");
    assert_eq!(size.file % PAGE, 0);
    path
}

/// Why opening the snapshot at `path` failed; panics if it opened.
fn refused(path: &std::path::Path) -> VmSnapshotError {
    match SnapshotFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn round_trip_keeps_state_and_ram() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(&dir);
    let snap = SnapshotFile::open(&path).unwrap();
    let s = &snap.state;
    assert_eq!(s.mem_mib, 2);
    assert_eq!(s.vcpus.len(), 2);
    assert_eq!(s.vcpus[1].regs.rip, 0xffff_ffff_8100_0001);
    assert_eq!(s.vcpus[0].xsave.region[7], 0xdead_beef);
    assert_eq!(s.vcpus[1].lapic.regs[0x20], 1);
    assert_eq!(s.vcpus[0].msrs[0].data, 0x1234_5678_9abc);
    assert_eq!(s.clock.clock, 123_456_789);
    assert_eq!(s.serial.in_buffer, b"x");
    assert_eq!(
        s.devices[0].spec,
        DeviceSpec::in_process("rng", Default::default())
    );
    assert_eq!(s.devices[0].envelope, [1, 2, 3]);

    let target = tempfile::tempfile().unwrap();
    target.set_len(2 * MIB).unwrap();
    assert_eq!(snap.load_ram(&target).unwrap(), 2 * 4096);
    let mut back = vec![0u8; (2 * MIB) as usize];
    target.read_exact_at(&mut back, 0).unwrap();
    let mut want = vec![0u8; (2 * MIB) as usize];
    want[3 * 4096..4 * 4096].fill(0xa5);
    want[(2 * MIB - 1) as usize] = 7;
    assert!(back == want, "RAM differs after the round trip");
}

fn corrupt(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn bad_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(&dir);
    corrupt(&path, 1, b"X");
    let e = refused(&path);
    assert!(matches!(e, VmSnapshotError::Magic), "{e}");
    let empty = dir.path().join("empty");
    File::create(&empty).unwrap();
    assert!(matches!(
        SnapshotFile::open(&empty),
        Err(VmSnapshotError::Magic)
    ));
}

#[test]
fn newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(&dir);
    corrupt(&path, 8, &(FORMAT_VERSION + 1).to_le_bytes());
    let e = refused(&path);
    assert!(matches!(e, VmSnapshotError::Version(v) if v == FORMAT_VERSION + 1));
}

#[test]
fn flipped_state_byte_fails_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(&dir);
    let mut byte = [0u8];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut byte, 40)
        .unwrap();
    corrupt(&path, 40, &[byte[0] ^ 0x20]);
    let e = refused(&path);
    assert!(matches!(e, VmSnapshotError::Checksum { .. }), "{e}");
}

#[test]
fn oversized_or_inconsistent_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    type Check = fn(&VmSnapshotError) -> bool;
    let cases: [(u64, Vec<u8>, Check); 4] = [
        // State length past the limit.
        (12, (MAX_STATE_LEN + 1).to_le_bytes().to_vec(), |e| {
            matches!(e, VmSnapshotError::StateLength(_))
        }),
        // Reserved bytes set.
        (10, vec![1, 0], |e| {
            matches!(e, VmSnapshotError::Reserved(1))
        }),
        // RAM claimed past the end of the file.
        (24, (64 * MIB).to_le_bytes().to_vec(), |e| {
            matches!(e, VmSnapshotError::RamPlacement { .. })
        }),
        // RAM offset inside the state.
        (16, PAGE.to_le_bytes().to_vec(), |e| {
            matches!(e, VmSnapshotError::RamPlacement { .. })
        }),
    ];
    for (at, bytes, expected) in cases {
        let path = written(&dir);
        corrupt(&path, at, &bytes);
        let e = refused(&path);
        assert!(expected(&e), "bytes at {at}: {e}");
    }
}

#[test]
fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = written(&dir);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 4096).unwrap();
    let e = refused(&path);
    assert!(matches!(e, VmSnapshotError::RamPlacement { .. }), "{e}");
}

#[test]
fn ram_size_must_match_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    // The state says 4 MiB, the RAM section holds 2.
    write(&path, &state(4), &ram(), 2 * MIB).unwrap();
    let e = refused(&path);
    assert!(matches!(e, VmSnapshotError::RamSize { .. }), "{e}");
}
