// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A hostile guest's register accesses to the virtio-mmio transport.
//!
//! Untrusted input: a sequence of guest reads and writes on an
//! `MmioTransport` in front of a `DeviceCore` with a small device — any
//! offset (the registers, anywhere in the first 0x200 bytes including the
//! config space, or far beyond), any width (1, 2, 4, 8), any value — mixed
//! with the steps a driver takes (feature negotiation, queue setup with
//! ring addresses inside, straddling or outside guest memory, DRIVER_OK,
//! kicks), resets, and snapshots taken mid-sequence and restored into a
//! new transport, as a migration would.
//!
//! Asserted: nothing panics; a 4-byte write of 0 to Status resets the
//! device (Status, InterruptStatus and QueueReady read 0, not activated);
//! the identity registers read their values and accesses of another width
//! below the config space read zeroes; the Status register and
//! `status()` agree (but for DEVICE_NEEDS_RESET, which worker threads set
//! when they give up on a queue), an activated device has DRIVER_OK; a
//! restored transport is active; no queue is made ready with a ring
//! outside guest memory.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use common::{FuzzDevice, Shape};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::core::DeviceCore;
use virtio_backend_kit::mmio::*;
use virtio_backend_kit::GuestMemoryLog;

const MEM_SIZE: u64 = 0x1_0000;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 29) | (1 << 5);
const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
#[rustfmt::skip]
const REGS: [u64; 27] = [
    MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
    DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY,
    QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS, QUEUE_DESC_LOW, QUEUE_DESC_HIGH,
    QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, SHM_LEN_LOW,
    SHM_LEN_HIGH, CONFIG_GENERATION, CONFIG_OFFSET, CONFIG_OFFSET + 4,
];

/// Two queues of up to 16, 8 bytes of writable config.
const SHAPE: Shape = Shape {
    device_type: 42,
    queues: 2,
    max_queue_size: 16,
    features: FEATURES,
    config_size: 8,
    max_state: 4096,
};

#[derive(Arbitrary, Debug)]
enum Offset {
    /// One of the registers (or the config space).
    Reg(u8),
    /// Anywhere in the first 0x200 bytes.
    Window(u16),
    /// Anywhere at all.
    Far(u64),
}

impl Offset {
    fn get(&self) -> u64 {
        match *self {
            Offset::Reg(i) => REGS[usize::from(i) % REGS.len()],
            Offset::Window(o) => u64::from(o % 0x200),
            Offset::Far(o) => o,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Gpa {
    /// A 4 KiB page of guest memory (0..16) or just past it.
    Page(u8),
    /// Just below the end of guest memory.
    End(u16),
    Raw(u64),
}

impl Gpa {
    fn get(&self) -> u64 {
        match *self {
            Gpa::Page(p) => 0x1000 * u64::from(p % 17),
            Gpa::End(back) => MEM_SIZE.wrapping_sub(u64::from(back)),
            Gpa::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        at: Offset,
        width: u8,
    },
    Write {
        at: Offset,
        width: u8,
        value: u64,
    },
    /// ACKNOWLEDGE, DRIVER, both feature words, FEATURES_OK.
    Negotiate {
        features: u64,
        offered: bool,
    },
    /// QueueSel, QueueNum, the three ring addresses, QueueReady.
    SetupQueue {
        queue: u8,
        size: u16,
        desc: Gpa,
        avail: Gpa,
        used: Gpa,
    },
    DriverOk,
    Kick(u8),
    Reset,
    /// Snapshot and restore into a new transport.
    Migrate,
}

fn transport(mem: &GuestMemoryLog) -> MmioTransport {
    let core = DeviceCore::new(Arc::new(FuzzDevice::new(SHAPE))).expect("a control core");
    MmioTransport::new(Box::new(core), mem.clone()).expect("a transport")
}

/// Snapshot `t` and restore it elsewhere; `None` if the device is not
/// running or the restore is refused (then `t` is reset and kept).
fn migrate(t: &mut MmioTransport, mem: &GuestMemoryLog) -> Option<MmioTransport> {
    // (The snapshot's encoding is the `snapshot` target's business.)
    let snap = t.snapshot().ok()?;
    let core = DeviceCore::new(Arc::new(FuzzDevice::new(SHAPE))).expect("a control core");
    match MmioTransport::restore(Box::new(core), mem.clone(), snap) {
        Ok(restored) => Some(restored),
        Err(_) => {
            t.write_u32(STATUS, 0);
            None
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = common::zeroed_memory(MEM_SIZE as usize);
    let mut t = transport(&mem);
    // Each restore starts a new core and its worker thread: two per input
    // keep the target fast.
    let mut migrations = 0;
    for op in ops.iter().take(48) {
        match op {
            Op::Read { at, width } => {
                let (off, mut buf) = (at.get(), [0xa5u8; 8]);
                let data = &mut buf[..1 << (width % 4)];
                t.read(off, data);
                let reg = off < CONFIG_OFFSET;
                if reg && (data.len() != 4 || off % 4 != 0) {
                    assert!(
                        data.iter().all(|b| *b == 0),
                        "{}-byte read at {off:#x}",
                        data.len()
                    );
                }
                if data.len() == 4 && (off == MAGIC_VALUE || off == VERSION) {
                    let want = if off == MAGIC_VALUE {
                        MMIO_MAGIC
                    } else {
                        MMIO_VERSION
                    };
                    assert_eq!(
                        u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                        want
                    );
                }
                if off >= CONFIG_OFFSET + 8 {
                    assert!(data.iter().all(|b| *b == 0), "config read past its end");
                }
            }
            Op::Write { at, width, value } => {
                let off = at.get();
                let data = &value.to_le_bytes()[..1 << (width % 4)];
                t.write(off, data);
                if off == STATUS && data == [0, 0, 0, 0] {
                    assert_eq!(t.read_u32(STATUS), 0, "Status after reset");
                    assert_eq!(
                        t.read_u32(INTERRUPT_STATUS),
                        0,
                        "InterruptStatus after reset"
                    );
                    assert_eq!(t.read_u32(QUEUE_READY), 0, "QueueReady after reset");
                    assert!(!t.is_activated(), "active after reset");
                }
            }
            Op::Negotiate { features, offered } => {
                let f = if *offered {
                    features & FEATURES
                } else {
                    *features
                };
                t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
                t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                for (sel, half) in [(0, f as u32), (1, (f >> 32) as u32)] {
                    t.write_u32(DRIVER_FEATURES_SEL, sel);
                    t.write_u32(DRIVER_FEATURES, half);
                }
                t.write_u32(
                    STATUS,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                );
            }
            Op::SetupQueue {
                queue,
                size,
                desc,
                avail,
                used,
            } => {
                t.write_u32(QUEUE_SEL, u32::from(*queue % 3));
                let was_ready = t.read_u32(QUEUE_READY) == 1;
                t.write_u32(QUEUE_NUM, u32::from(*size));
                let rings = [desc.get(), avail.get(), used.get()];
                let regs = [QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW];
                for (reg, addr) in regs.into_iter().zip(rings) {
                    t.write_u32(reg, addr as u32);
                    t.write_u32(reg + 4, (addr >> 32) as u32);
                }
                t.write_u32(QUEUE_READY, 1);
                let in_memory = rings.iter().all(|a| *a < MEM_SIZE);
                if !was_ready && t.read_u32(QUEUE_READY) == 1 && !in_memory {
                    panic!("queue made ready with rings outside memory: {rings:x?}");
                }
            }
            Op::DriverOk => {
                let status = t.read_u32(STATUS);
                t.write_u32(STATUS, status | STATUS_DRIVER_OK);
            }
            Op::Kick(q) => t.write_u32(QUEUE_NOTIFY, u32::from(*q % 3)),
            Op::Reset => t.write_u32(STATUS, 0),
            Op::Migrate if migrations < 2 => {
                migrations += 1;
                if let Some(restored) = migrate(&mut t, &mem) {
                    t = restored;
                    assert!(t.is_activated(), "restored transport not active");
                    // (A worker may already have given up on a queue: NEEDS_RESET.)
                    let status = t.read_u32(STATUS) & !STATUS_DEVICE_NEEDS_RESET;
                    assert_eq!(status, ALL_OK, "restored Status");
                }
            }
            Op::Migrate => {}
        }
        // DEVICE_NEEDS_RESET is set by worker threads at any time.
        let status = t.read_u32(STATUS) & !STATUS_DEVICE_NEEDS_RESET;
        let direct = t.status() & !STATUS_DEVICE_NEEDS_RESET;
        assert_eq!(status, direct, "Status register and status()");
        if t.is_activated() {
            assert_eq!(
                status & ALL_OK,
                ALL_OK,
                "active without DRIVER_OK: {status:#x}"
            );
        }
    }
});
