// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A hostile driver's split ring, processed through the kit's `Vring`.
//!
//! Untrusted input: everything a guest driver controls in a split virtqueue
//! — the descriptor table, indirect tables, buffer bytes, the available
//! ring's entries and index (including an index that runs ahead of the
//! ring), `used_event` — plus the queue size (1..=64), EVENT_IDX on or off,
//! whether indirect descriptors are used, and a start index (often just
//! below the 16-bit wrap). Each round the driver publishes some heads and
//! the device takes chains one of the three ways the kit offers
//! (`pop_chain` + `add_used` with completions out of order,
//! `process_available`, `process_available_descs`), reads every readable
//! descriptor and writes every writable one, and completes the chain.
//!
//! Asserted: nothing panics; a chain walk ends (after at most one indirect
//! table's worth of descriptors plus the queue's); every chain handed out
//! has exactly the head and descriptors `virtio-queue`'s own walk of the
//! same ring position yields (so the kit's mapped walker `DescIter` and
//! its mapped rings agree with the reference); every used entry the kit
//! writes has an id below the queue size and the length the device
//! returned; the used index advances by exactly the number of chains
//! completed, and only a head beyond the queue fails to complete; the
//! notification-suppression fields read back as the kit set them.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::*;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::virtio_queue::desc::split::Descriptor;
use virtio_backend_kit::virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::{GuestMemoryLog, Vring};

const MEM_SIZE: usize = 0x1_0000;
const DATA_LEN: u64 = MEM_SIZE as u64 - DATA;
/// Bytes the device reads or writes per chain at most (keeps a chain of
/// thousands of big descriptors cheap; every descriptor is still walked).
const TOUCH_BUDGET: u32 = 512;
/// No chain can be longer: an indirect table holds at most 65535
/// descriptors and a direct chain at most the queue size.
const CHAIN_BOUND: usize = 65535 + MAX_QUEUE as usize;
const ROUNDS: usize = 8;

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    /// Low 3 bits: NEXT, WRITE, INDIRECT; bit 7 sets all unknown flags;
    /// bit 6 keeps `addr` and `len` raw (else: a buffer of up to 4 KiB in
    /// the data area).
    flags: u8,
    next: u8,
}

impl Desc {
    fn bytes(&self, indirect_desc: bool) -> [u8; 16] {
        let (mut addr, mut len) = (self.addr, self.len);
        if self.flags & 0x40 == 0 {
            (addr, len) = (DATA + addr % DATA_LEN, len % 0x1000);
        }
        let mut flags = u16::from(self.flags & 7);
        if self.flags & 0x80 != 0 {
            flags |= 0xfff8;
        }
        if !indirect_desc {
            // A driver without VIRTIO_RING_F_INDIRECT_DESC uses none.
            flags &= !F_INDIRECT;
        }
        desc_bytes(addr, len, flags, u16::from(self.next))
    }
}

#[derive(Arbitrary, Debug)]
enum Mode {
    Pop,
    Process,
    Descs,
}

#[derive(Arbitrary, Debug)]
struct Round {
    /// Heads to publish, each taken modulo `size + 1` (so `size` itself is
    /// the out-of-range head).
    heads: Vec<u16>,
    /// Added to the honest available index: a driver that lies about it.
    idx_skew: Option<u16>,
    used_event: u16,
    mode: Mode,
    /// Bit 0: disable notifications before, bit 1: enable after, bit 2:
    /// ask whether to notify.
    notify: u8,
    /// Completion order seed for `Mode::Pop`.
    order: u64,
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    event_idx: bool,
    indirect_desc: bool,
    /// Start index: `65535 - start` if `near_wrap`.
    start: u16,
    near_wrap: bool,
    table: Vec<Desc>,
    /// Descriptor tables written into the data area (16-byte aligned).
    indirect: Vec<(u16, Vec<Desc>)>,
    /// Buffer bytes written into the data area.
    fill: Vec<(u16, Vec<u8>)>,
    rounds: Vec<Round>,
}

/// The reference and the kit must see the same descriptors.
fn key(d: &Descriptor) -> (u64, u32, u16, u16) {
    (d.addr().0, d.len(), d.flags(), d.next())
}

/// What the device does with one chain: collect its descriptors (checking
/// the walk ends), compare them with `virtio-queue`'s walk of the next
/// available entry, then touch the buffers. Returns the used length.
struct Device<'a> {
    mem: &'a GuestMemoryLog,
    reference: Queue,
    seen: Vec<Descriptor>,
    expected: Vec<Descriptor>,
    buf: [u8; TOUCH_BUDGET as usize],
}

impl Device<'_> {
    fn serve(&mut self, head: u16, descs: impl Iterator<Item = Descriptor>, walker: bool) -> u32 {
        self.seen.clear();
        for d in descs {
            self.seen.push(d);
            assert!(self.seen.len() <= CHAIN_BOUND, "chain {head} never ends");
        }
        let chain = self
            .reference
            .iter(self.mem)
            .ok()
            .and_then(|mut it| it.next())
            .unwrap_or_else(|| panic!("chain {head} handed out, none available"));
        assert_eq!(
            chain.head_index(),
            head,
            "kit and virtio-queue heads differ"
        );
        if walker {
            // The kit's own walker: it must yield what virtio-queue yields
            // (the other modes hand out virtio-queue's chains themselves).
            self.expected.clear();
            self.expected.extend(chain);
            let same = self.seen.iter().map(key).eq(self.expected.iter().map(key));
            assert!(same, "chain {head}: kit walk differs from virtio-queue's");
        }

        let mut budget = TOUCH_BUDGET;
        let mut written = 0u32;
        for (i, d) in self.seen.iter().enumerate() {
            let n = d.len().min(budget);
            budget -= n;
            let slice = &mut self.buf[..n as usize];
            if d.is_write_only() {
                // Only data buffers: the rings stay as the driver wrote them.
                slice.fill(head as u8 ^ i as u8);
                if d.addr().0 >= DATA && self.mem.write_slice(slice, d.addr()).is_ok() {
                    written += n;
                }
            } else {
                let _ = self.mem.read_slice(slice, d.addr());
            }
        }
        written
    }
}

/// xorshift: the out-of-order completion of `Mode::Pop`.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// One round of the device; returns the (head, len) completed, in order.
fn run_round(vr: &mut Vring, dev: &mut Device, size: u16, r: &Round) -> Vec<(u16, u32)> {
    dev.reference.set_next_avail(vr.state().next_avail);
    let mut calls = Vec::new();
    let result = match r.mode {
        Mode::Pop => {
            let mut held = Vec::new();
            while let Ok(Some(chain)) = vr.pop_chain() {
                let head = chain.head_index();
                held.push((head, dev.serve(head, chain, false)));
                assert!(held.len() <= usize::from(size), "more than a ring's worth");
            }
            shuffle(&mut held, r.order);
            for (head, len) in held {
                let ok = vr.add_used(head, len).is_ok();
                assert_eq!(ok, head < size, "add_used({head}) on a queue of {size}");
                if ok {
                    calls.push((head, len));
                }
            }
            return calls;
        }
        Mode::Process => vr.process_available(|chain| {
            let head = chain.head_index();
            let len = dev.serve(head, chain, false);
            calls.push((head, len));
            len
        }),
        Mode::Descs => vr.process_available_descs(|chain| {
            let head = chain.head_index();
            let len = dev.serve(head, chain, true);
            calls.push((head, len));
            len
        }),
    };
    assert!(calls.len() <= vr.batch_limit(), "batch beyond its limit");
    match result {
        Ok(n) => {
            assert_eq!(n, calls.len(), "count returned != chains processed");
            assert!(calls.iter().all(|(h, _)| *h < size), "bad head completed");
        }
        Err(_) => {
            // Only a head beyond the queue stops a batch (the avail index
            // cannot change under it here); it is the last one taken.
            if let Some((h, _)) = calls.pop() {
                assert!(h >= size, "batch failed on good head {h}");
            }
            assert!(calls.iter().all(|(h, _)| *h < size), "bad head completed");
        }
    }
    calls
}

fuzz_target!(|input: Input| {
    let size = 1u16 << (input.size_log2 % 7);
    let n = u64::from(size);
    let start = match input.near_wrap {
        true => u16::MAX - input.start % 512,
        false => input.start,
    };
    let mem = zeroed_memory(MEM_SIZE);
    let put_descs = |base: u64, descs: &[Desc]| {
        for (i, d) in descs.iter().enumerate() {
            let at = GuestAddress(base + 16 * i as u64);
            let _ = mem.write_slice(&d.bytes(input.indirect_desc), at);
        }
    };
    put_descs(
        DESC,
        &input.table[..input.table.len().min(usize::from(size))],
    );
    for (off, table) in input.indirect.iter().take(8) {
        put_descs(
            (DATA + u64::from(*off) % DATA_LEN) & !15,
            &table[..table.len().min(64)],
        );
    }
    for (off, bytes) in input.fill.iter().take(16) {
        let at = DATA + u64::from(*off) % DATA_LEN;
        let len = bytes.len().min((MEM_SIZE as u64 - at) as usize);
        let _ = mem.write_slice(&bytes[..len], GuestAddress(at));
    }
    set_ring_indexes(&mem, size, start);

    let mut vr = vring(&mem, size, start, input.event_idx);
    let mut reference = Queue::new(size).expect("queue of a power-of-two size");
    reference.set_desc_table_address(Some(DESC as u32), Some(0));
    reference.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    reference.set_used_ring_address(Some(USED as u32), Some(0));
    reference.set_ready(true);
    let mut dev = Device {
        mem: &mem,
        reference,
        seen: Vec::new(),
        expected: Vec::new(),
        buf: [0; TOUCH_BUDGET as usize],
    };

    let mut avail = start;
    for round in input.rounds.iter().take(ROUNDS) {
        for h in round.heads.iter().take(usize::from(size)) {
            let slot = AVAIL + 4 + 2 * u64::from(avail % size);
            put_u16(&mem, slot, h % (size + 1));
            avail = avail.wrapping_add(1);
        }
        let published = avail.wrapping_add(round.idx_skew.unwrap_or(0));
        put_u16(&mem, AVAIL + 2, published);
        put_u16(&mem, AVAIL + 4 + 2 * n, round.used_event);

        if round.notify & 1 != 0 {
            let _ = vr.disable_notification();
            if !input.event_idx {
                assert_eq!(get_u16(&mem, USED), 1, "VRING_USED_F_NO_NOTIFY not set");
            }
        }
        let before = vr.next_used();
        let done = run_round(&mut vr, &mut dev, size, round);
        let after = vr.next_used();
        let completed = done.len() as u16;
        assert_eq!(after.wrapping_sub(before), completed, "used index drift");
        assert_eq!(get_u16(&mem, USED + 2), after, "used index in memory");
        for (i, (head, len)) in done.iter().enumerate() {
            let (id, l) = used_elem(&mem, size, before.wrapping_add(i as u16));
            assert!(id < u32::from(size), "used id {id} beyond the queue");
            assert_eq!((id, l), (u32::from(*head), *len), "used entry {i}");
        }
        if round.notify & 2 != 0 {
            if let Ok(more) = vr.enable_notification() {
                let next_avail = vr.state().next_avail;
                assert_eq!(more, published != next_avail, "enable_notification");
                if input.event_idx {
                    assert_eq!(get_u16(&mem, USED + 4 + 8 * n), next_avail, "avail_event");
                } else {
                    assert_eq!(get_u16(&mem, USED), 0, "used flags after enable");
                }
            }
        }
        if round.notify & 4 != 0 {
            let notify = vr.notify_if_needed();
            if !input.event_idx {
                assert!(matches!(notify, Ok(true)), "no EVENT_IDX: always notify");
            }
        }
        // A driver that lied resumes honestly from what the device took.
        avail = vr.state().next_avail;
    }
});
