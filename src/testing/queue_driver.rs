// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver side of a split virtqueue, for tests.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Interrupt;
use crate::core::QueueActivation;
use crate::memory::GuestMemoryLog;
use crate::vring::Notifier;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// One split-ring descriptor as a driver writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest-physical address of the buffer (or of an indirect table).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` bits: 1 next, 2 device-writable, 4 indirect.
    pub flags: u16,
    /// The next descriptor's slot, when `flags` has NEXT.
    pub next: u16,
}

/// The driver side of one split virtqueue (up to 256 entries) laid out at
/// `area`: descriptor table, available ring and used ring on their own
/// 4 KiB pages, buffers from `area + 0x3000` ([`SplitQueueDriver::data_area`]).
#[derive(Debug)]
pub struct SplitQueueDriver {
    mem: GuestMemoryLog,
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    data: u64,
}

impl SplitQueueDriver {
    /// Queue `index` of `size` entries (a power of two up to 256) at
    /// `area` in `mem`, its rings zeroed.
    pub fn new(mem: &GuestMemoryLog, index: u16, size: u16, area: u64) -> Self {
        assert!(size.is_power_of_two() && size <= 256, "queue size {size}");
        mem.write_slice(&[0u8; 0x3000], GuestAddress(area))
            .expect("the rings lie in guest memory");
        SplitQueueDriver {
            mem: mem.clone(),
            index,
            size,
            desc: area,
            avail: area + 0x1000,
            used: area + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            data: area + 0x3000,
        }
    }

    /// The queue as a transport hands it to the device, interrupts on
    /// `irq`; and the driver's end of its kick eventfd.
    pub fn activation(&self, irq: &Interrupt) -> (QueueActivation, EventFd) {
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let driver_kick = kick.try_clone().expect("eventfd dup");
        let q = QueueActivation {
            index: self.index,
            size: self.size,
            desc_table: self.desc,
            avail_ring: self.avail,
            used_ring: self.used,
            kick,
            call: irq.notifier(),
            err: Notifier::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        };
        (q, driver_kick)
    }

    /// Make a chain of `(gpa, len, device_writes)` buffers available;
    /// returns its head. Completion comes later, through
    /// [`SplitQueueDriver::pop_used`].
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let slot = (self.next_desc + i as u16) % self.size;
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let next = (slot + 1) % self.size;
            self.write_descriptor(
                self.desc,
                slot,
                RawDescriptor {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// The next used entry `(id, len)`, if the device published one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        fence(Ordering::SeqCst);
        if self.used_idx() == self.last_used {
            return None;
        }
        let entry = self.used_entry(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        Some(entry)
    }

    /// Write `d` into slot `slot` of the descriptor table at `table` (the
    /// queue's own, [`SplitQueueDriver::rings`]`.0`, or an indirect table
    /// the test placed in guest memory). Nothing is checked: hostile-guest
    /// tests write loops, lengths and addresses no driver should.
    pub fn write_descriptor(&self, table: u64, slot: u16, d: RawDescriptor) {
        let at = table + 16 * u64::from(slot);
        self.write_obj(d.addr, at);
        self.write_obj(d.len, at + 8);
        self.write_obj(d.flags, at + 12);
        self.write_obj(d.next, at + 14);
    }

    /// Put `head` on the available ring and publish the new available
    /// index (after the entry, as the split-ring rules require).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.write_obj(head, slot);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_obj(self.avail_idx, self.avail + 2);
        fence(Ordering::SeqCst);
    }

    /// Publish `idx` as the available index whatever the ring holds (a
    /// guest claiming buffers it never made available, for example).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        fence(Ordering::SeqCst);
        self.write_obj(idx, self.avail + 2);
        fence(Ordering::SeqCst);
    }

    /// The available index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Write `used_event` (the last word of the available ring; the device
    /// reads it when VIRTIO_RING_F_EVENT_IDX is negotiated).
    pub fn set_used_event(&self, value: u16) {
        self.write_obj(value, self.avail + 4 + 2 * u64::from(self.size));
        fence(Ordering::SeqCst);
    }

    /// The used index as the device left it in guest memory.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.read_obj(self.used + 2)
    }

    /// Used ring entry `i` (taken modulo the queue size): `(id, len)`.
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let e = self.used + 4 + 8 * u64::from(i % self.size);
        (self.read_obj(e), self.read_obj(e + 4))
    }

    /// The used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, the available
    /// ring and the used ring (what a driver programs into a transport).
    pub fn rings(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Where this queue's buffers may go (up to the next queue's area).
    pub fn data_area(&self) -> u64 {
        self.data
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &GuestMemoryLog {
        &self.mem
    }

    /// Read `len` bytes of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("the test's buffer lies in guest memory");
        v
    }

    /// Write `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .expect("the test's buffer lies in guest memory");
    }

    fn write_obj<T: vm_memory::ByteValued>(&self, value: T, gpa: u64) {
        self.mem
            .write_obj(value, GuestAddress(gpa))
            .expect("the rings lie in guest memory");
    }

    fn read_obj<T: vm_memory::ByteValued>(&self, gpa: u64) -> T {
        self.mem
            .read_obj(GuestAddress(gpa))
            .expect("the rings lie in guest memory")
    }
}
