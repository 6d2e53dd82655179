// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-flight area a vhost-user frontend hands a restarted backend
//! (`SET_INFLIGHT_FD`): untrusted bytes in shared memory.
//!
//! Untrusted input: the geometry the frontend claims (queues, queue size,
//! mmap size and offset, a file that may be shorter), the raw bytes of
//! the area and, on top, structured header fields and descriptor records
//! (in-flight flag, counter), and the used index each ring shows. The area
//! is written into a memfd and loaded as a restarted backend does
//! (`InflightArea::from_file`, then `recover` per queue); then one queue is
//! attached to a live `Vring` (`attach_inflight`), which hands the
//! resubmitted chains out again, and they are completed.
//!
//! Asserted: nothing panics; the area maps exactly when the file holds
//! the geometry at a page-aligned offset; every resubmitted head is below
//! the queue size and none comes twice; the order is by counter (oldest
//! first, as the vhost-user spec says), exactly the heads a reference
//! reading of the raw bytes finds (flag 1, minus the last batch head when
//! the used index moved on, nothing for an area never used); a second
//! restart before any progress finds the same; the vring refuses heads it
//! cannot have and otherwise pops exactly those heads in that order; and
//! once they are completed a third restart finds nothing in flight.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::*;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::inflight::{queue_area_size, InflightArea};

const MEM_SIZE: usize = 0x1_0000;
const PAGE: u64 = 4096;

#[derive(Arbitrary, Debug)]
enum Offset {
    Zero,
    Pages(u8),
    Raw(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    num_queues: u8,
    queue_log2: u8,
    /// Size of the ring attached (default: the area's queue size).
    ring_log2: Option<u8>,
    offset: Offset,
    /// Bytes the frontend says are mapped, if not exactly what is needed.
    mmap_size: Option<u64>,
    /// Bytes missing at the end of the file.
    file_short: Option<u16>,
    /// The used index each ring shows.
    used_idx: Vec<u16>,
    /// Raw bytes of the area, from its start.
    raw: Vec<u8>,
    /// Per queue header: version, last_batch_head, used_idx.
    headers: Vec<(u8, u16, u16, u16)>,
    /// Records: queue, head, in-flight flag, counter.
    records: Vec<(u8, u16, u8, u64)>,
    /// Which queue to attach to a vring.
    attach: u8,
}

thread_local! {
    static FILE: File = {
        memfd(c"vbk-fuzz-inflight", 0)
    };
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// What a restarted backend must resubmit, read straight from the bytes
/// of one queue's area: heads flagged 1, by counter (then head).
fn reference(q: &[u8], size: u16, ring_used: u16) -> Vec<u16> {
    if u16_at(q, 8) == 0 {
        return Vec::new(); // version 0: never used
    }
    let last = u16_at(q, 12);
    let mut heads: Vec<(u64, u16)> = (0..size)
        .filter(|h| *h != last || u16_at(q, 14) == ring_used)
        .filter_map(|h| {
            let rec = &q[16 + 16 * usize::from(h)..][..16];
            let counter = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
            (rec[0] == 1).then_some((counter, h))
        })
        .collect();
    heads.sort_unstable();
    heads.into_iter().map(|(_, h)| h).collect()
}

/// Map the memfd as a restarted backend does.
fn open(size: u64, offset: u64, nq: u16, qs: u16) -> Option<Arc<InflightArea>> {
    let file = FILE.with(|f| f.try_clone()).expect("dup the memfd");
    InflightArea::from_file(file, size, offset, nq, qs)
        .ok()
        .map(Arc::new)
}

fuzz_target!(|input: Input| {
    let nq = 1 + u16::from(input.num_queues % 4);
    let qs = 1u16 << (input.queue_log2 % 9);
    let qlen = queue_area_size(qs);
    let needed = qlen * usize::from(nq);
    let offset = match input.offset {
        Offset::Zero => 0,
        Offset::Pages(p) => PAGE * u64::from(p % 4),
        Offset::Raw(o) => u64::from(o),
    };
    let mut area = vec![0u8; needed];
    let n = input.raw.len().min(needed);
    area[..n].copy_from_slice(&input.raw[..n]);
    for &(q, version, last, used) in &input.headers {
        let at = usize::from(u16::from(q) % nq) * qlen;
        area[at + 8..at + 10].copy_from_slice(&version.to_le_bytes());
        area[at + 12..at + 14].copy_from_slice(&last.to_le_bytes());
        area[at + 14..at + 16].copy_from_slice(&used.to_le_bytes());
    }
    for &(q, head, flag, counter) in &input.records {
        let at = usize::from(u16::from(q) % nq) * qlen + 16 + 16 * usize::from(head % qs);
        area[at] = flag;
        area[at + 8..at + 16].copy_from_slice(&counter.to_le_bytes());
    }
    let short = usize::from(input.file_short.unwrap_or(0)).min(needed);
    let file_len = offset + (needed - short) as u64;
    FILE.with(|f| {
        f.set_len(0)?;
        f.set_len(file_len)?;
        f.write_all_at(&area[..needed - short], offset)
    })
    .expect("memfd write");
    let size = input.mmap_size.unwrap_or(needed as u64);

    let Some(first) = open(size, offset, nq, qs) else {
        let fits = size.min(file_len - offset) >= needed as u64;
        assert!(!fits || offset % PAGE != 0, "a good area refused");
        return;
    };
    assert!(offset % PAGE == 0, "mapped at an unaligned offset");
    assert!(
        size >= needed as u64 && file_len - offset >= needed as u64,
        "short area mapped"
    );
    let used = |q: u16| input.used_idx.get(usize::from(q)).copied().unwrap_or(0);
    let mut lists = Vec::new();
    for q in 0..nq {
        let base = usize::from(q) * qlen;
        let expected = reference(&area[base..base + qlen], qs, used(q));
        let mut tracker = first.queue(q).expect("a queue of the area");
        let got = tracker.recover(used(q)).resubmit;
        assert!(got.iter().all(|h| *h < qs), "queue {q}: head beyond {qs}");
        let mut seen = vec![false; usize::from(qs)];
        assert!(
            got.iter()
                .all(|h| !std::mem::replace(&mut seen[usize::from(*h)], true)),
            "twice"
        );
        assert_eq!(got, expected, "queue {q}: resubmission list");
        lists.push(got);
    }
    drop(first);

    // Restarted again before doing anything: what the first restart left
    // (its fix-ups, and the stamp on a never-used area, whose records it
    // does not clear) is read the same way; an area in use gives the same
    // list again.
    let mut left = vec![0u8; needed];
    FILE.with(|f| f.read_exact_at(&mut left, offset))
        .expect("memfd read");
    let second = open(size, offset, nq, qs).expect("the same area maps again");
    let mut again = Vec::new();
    for (q, list) in (0..nq).zip(&lists) {
        let base = usize::from(q) * qlen;
        let got = second.queue(q).expect("a queue").recover(used(q)).resubmit;
        assert_eq!(
            got,
            reference(&left[base..base + qlen], qs, used(q)),
            "queue {q}: again"
        );
        if u16_at(&area[base..], 8) != 0 {
            assert_eq!(&got, list, "queue {q}: second restart");
        }
        again.push(got);
    }

    // A live ring resubmits them, oldest first, then they complete.
    let q = u16::from(input.attach) % nq;
    let ring = input.ring_log2.map_or(qs, |l| 1 << (l % 9));
    let list = &again[usize::from(q)];
    let mem = zeroed_memory(MEM_SIZE);
    let start = used(q);
    set_ring_indexes(&mem, ring, start);
    put_u16(&mem, AVAIL + 2, start.wrapping_add(list.len() as u16));
    let mut vr = vring(&mem, ring, start.wrapping_sub(7), false);
    let tracker = second.queue(q).expect("a queue");
    let fits = list.iter().all(|h| *h < ring) && list.len() <= usize::from(ring);
    match vr.attach_inflight(tracker) {
        Ok(n) => assert!(
            fits && n == list.len(),
            "attached {n} of {list:?} on a ring of {ring}"
        ),
        Err(e) => {
            assert!(!fits, "attach refused {list:?} on a ring of {ring}: {e}");
            return;
        }
    }
    for (i, want) in list.iter().enumerate() {
        let chain = vr
            .pop_chain()
            .expect("resubmitted chain")
            .expect("one more");
        assert_eq!(chain.head_index(), *want, "resubmission {i} of {list:?}");
        vr.add_used(*want, 0).expect("a head below the ring size");
    }
    assert!(
        matches!(vr.pop_chain(), Ok(None)),
        "more than was in flight"
    );
    let done = vr.next_used();
    assert_eq!(done, start.wrapping_add(list.len() as u16), "used index");
    drop((vr, second));
    let third = open(size, offset, nq, qs).expect("the same area maps again");
    let left = third.queue(q).expect("a queue").recover(done).resubmit;
    assert!(
        left.is_empty(),
        "queue {q}: {left:?} still in flight after completion"
    );
});
