// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pieces the fuzz targets share: guest memory reused across inputs, split
//! ring layout helpers, a small vring builder and a device (`device`). Included by each target
//! with `#[path = "common/mod.rs"] mod common;`, so not every target uses
//! every item.
#![allow(dead_code)]

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

mod device;
#[allow(unused_imports)] // Not every target runs the device.
pub use device::{FuzzDevice, Shape};

use virtio_backend_kit::vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use virtio_backend_kit::vring::NotifierSlot;
use virtio_backend_kit::{GuestMemoryLog, Vring, VringState};

/// A memfd of `size` bytes named `name`.
pub fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the returned fd is checked and
    // owned by the `File`.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh fd nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).expect("sizing a memfd");
    file
}

/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const F_INDIRECT: u16 = 4;

/// The ring layout every target uses: descriptor table, available ring and
/// used ring on their own 4 KiB pages at the bottom of guest memory (room
/// for queues of up to 256), data above.
pub const DESC: u64 = 0x0000;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const DATA: u64 = 0x3000;

/// Largest queue the layout has room for.
pub const MAX_QUEUE: u16 = 256;

thread_local! {
    static MEMORIES: RefCell<Vec<(usize, GuestMemoryLog)>> = const { RefCell::new(Vec::new()) };
}

/// Guest memory of `size` bytes at GPA 0, zeroed. One mapping per size is
/// kept for the life of the process and zeroed again for every input, so
/// that no input pays for an mmap (nothing outlives an input that could
/// still write into it: every target drops its vrings and devices first).
pub fn zeroed_memory(size: usize) -> GuestMemoryLog {
    static ZEROES: [u8; 0x1_0000] = [0; 0x1_0000];
    let mem = MEMORIES.with(|m| {
        let mut m = m.borrow_mut();
        if let Some((_, mem)) = m.iter().find(|(s, _)| *s == size) {
            return mem.clone();
        }
        let mem = GuestMemoryLog::from_ranges(&[(GuestAddress(0), size)])
            .expect("anonymous guest memory");
        m.push((size, mem.clone()));
        mem
    });
    let mut at = 0;
    while at < size {
        let n = (size - at).min(ZEROES.len());
        mem.write_slice(&ZEROES[..n], GuestAddress(at as u64))
            .expect("zeroing guest memory inside its bounds");
        at += n;
    }
    mem
}

/// One split-ring descriptor as the driver lays it out.
pub fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    raw
}

/// Write a little-endian u16 (ignoring addresses outside memory).
pub fn put_u16(mem: &GuestMemoryLog, addr: u64, v: u16) {
    let _ = mem.write_slice(&v.to_le_bytes(), GuestAddress(addr));
}

/// Read a little-endian u16 (0 outside memory).
pub fn get_u16(mem: &GuestMemoryLog, addr: u64) -> u16 {
    let mut b = [0u8; 2];
    let _ = mem.read_slice(&mut b, GuestAddress(addr));
    u16::from_le_bytes(b)
}

/// Read a little-endian u32 (0 outside memory).
pub fn get_u32(mem: &GuestMemoryLog, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    let _ = mem.read_slice(&mut b, GuestAddress(addr));
    u32::from_le_bytes(b)
}

/// Used element `slot` (id, len) of a ring of `size` at [`USED`].
pub fn used_elem(mem: &GuestMemoryLog, size: u16, idx: u16) -> (u32, u32) {
    let at = USED + 4 + 8 * u64::from(idx % size);
    (get_u32(mem, at), get_u32(mem, at + 4))
}

/// Ring indexes as a driver resuming at `start` has them: available and
/// used index, `used_event` and `avail_event` all at `start`.
pub fn set_ring_indexes(mem: &GuestMemoryLog, size: u16, start: u16) {
    let n = u64::from(size);
    put_u16(mem, AVAIL + 2, start);
    put_u16(mem, AVAIL + 4 + 2 * n, start);
    put_u16(mem, USED + 2, start);
    put_u16(mem, USED + 4 + 8 * n, start);
}

/// A live vring of `size` on the layout above, resuming at `start`,
/// without call or err notifier.
pub fn vring(mem: &GuestMemoryLog, size: u16, start: u16, event_idx: bool) -> Vring {
    let state = VringState {
        size,
        ready: true,
        enabled: true,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        next_avail: start,
        next_used: start,
        event_idx,
        signalled_used: None,
    };
    Vring::new(
        0,
        size,
        &state,
        GuestMemoryAtomic::new(mem.clone()),
        NotifierSlot::default(),
        NotifierSlot::default(),
    )
    .expect("a vring on the fixed in-memory layout")
}
