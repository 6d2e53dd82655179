// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-blk requests from a hostile driver, parsed and executed by the
//! reference device (`vmm_example::devices::BlkDevice`).
//!
//! Untrusted input: rounds of requests — type (the six supported ones and
//! any other number), sector, how the header is laid out (whole, split over
//! two descriptors, sharing a descriptor with data, too short, writable),
//! the data descriptors (sizes, device-writable or not, addresses outside
//! memory), where the status byte is (its own descriptor, a wider one,
//! the last data byte, missing, outside memory), direct or indirect
//! chains — and the device: a null target or a memfd image (opened
//! read-only or not, locked, O_DIRECT), read-only config, `seg_max`,
//! discard and write-zeroes, queue size, EVENT_IDX, taken through
//! `process_vring` or `pop_chain` + `process_chain`.
//!
//! Asserted: nothing panics; every chain whose status byte is reachable
//! (last descriptor writable, in memory, chain no longer than the queue)
//! completes, in order, with VIRTIO_BLK_S_OK/IOERR/UNSUPP written there; a
//! chain without one is not completed and stops the queue; well-formed
//! requests get the status and used length the spec gives; and a model of
//! the image (written sectors, write-zeroes; discarded ranges unknown)
//! agrees with every successful read and with the image at the end, so a
//! write followed by a read of the same sector returns the written data.
#![no_main]

#[path = "common/mod.rs"]
mod common;
#[path = "blk_request/layout.rs"]
mod layout;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;
use layout::*;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::Completion;
use vmm_example::devices::blk::ChainScratch;
use vmm_example::devices::{BlkConfig, BlkDevice, ImageOptions, Target};

#[derive(Arbitrary, Debug)]
struct Input {
    image: Option<ImageFlags>,
    cfg_read_only: bool,
    image_sectors: u8,
    image_tail: u16,
    queue_log2: u8,
    seg_max: u8,
    discard: bool,
    write_zeroes: bool,
    may_unmap: bool,
    event_idx: bool,
    start: u8,
    pop: bool,
    rounds: Vec<Vec<Req>>,
}

#[derive(Arbitrary, Debug)]
struct ImageFlags {
    read_only: bool,
    lock: bool,
    direct: bool,
}

thread_local! {
    /// The image: one memfd for the process, emptied for every input.
    static IMAGE: File = {
        memfd(c"vbk-fuzz-blk", 0)
    };
}

/// The image as the requests so far left it: its bytes, and which of
/// them are known (discarded or partly written ranges are not).
struct Model {
    bytes: Vec<u8>,
    known: Vec<bool>,
    all_known: bool,
}

impl Model {
    fn forget(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.bytes.len() as u64);
        if start < end {
            self.known[start as usize..end as usize].fill(false);
            self.all_known = false;
        }
    }

    fn set(&mut self, start: u64, data: &[u8]) {
        let r = start as usize..start as usize + data.len();
        self.bytes[r.clone()].copy_from_slice(data);
        self.known[r].fill(true);
    }

    /// Whether `data` may be the image at `start` (slice compares: no
    /// per-byte loop in the common all-known case).
    fn agrees(&self, start: u64, data: &[u8]) -> bool {
        let r = start as usize..start as usize + data.len();
        if self.all_known {
            return self.bytes[r] == *data;
        }
        let known = &self.known[r.clone()];
        self.bytes[r]
            .iter()
            .zip(data)
            .zip(known)
            .all(|((m, d), k)| !k || m == d)
    }
}

/// The status and used length the spec gives a well-formed request
/// (`None`: not modelled).
fn expected(
    r: &Req,
    l: &Laid,
    start: Option<u64>,
    capacity: u64,
    seg_max: u32,
    ro: bool,
    input: &Input,
) -> Option<(u8, u32)> {
    let end = start.and_then(|s| s.checked_add(l.data_len));
    let rw_ok = l.data_len % SECTOR == 0 && end.is_some_and(|e| e <= capacity);
    let fail = (IOERR, 1);
    Some(match r.kind {
        _ if !l.clean => return None,
        _ if l.descs.len() as u32 > seg_max + 2 => fail,
        Kind::In if rw_ok => (OK, l.data_len as u32 + 1),
        Kind::Out if rw_ok && !ro => (OK, 1),
        Kind::In | Kind::Out => fail,
        Kind::Flush => (OK, 1),
        Kind::GetId if l.data_len > 0 => (OK, l.data_len.min(ID_LEN as u64) as u32 + 1),
        Kind::GetId => fail,
        Kind::Discard if !input.discard => (UNSUPP, 1),
        Kind::WriteZeroes if !input.write_zeroes => (UNSUPP, 1),
        Kind::Other(t) if ![0, 1, 4, 8, 11, 13].contains(&t) => (UNSUPP, 1),
        _ => return None,
    })
}

/// A request that may have changed the image in ways the model does not
/// follow (a refused, partial or garbled write, a discard): whatever it
/// could have touched becomes unknown.
fn forget_written(m: &mut Model, segs: &[(u8, u8, u8)], h: &Header, ty: u32, start: u64, l: &Laid) {
    match (ty, h) {
        // The header was read partly from data: any type, any sector.
        (_, Header::Short(_)) => m.forget(0, u64::MAX),
        (1, _) => m.forget(start, l.descs.iter().map(|d| u64::from(d.1)).sum()),
        (11 | 13, _) => {
            for &(s, n, _) in segs.iter().take(8) {
                m.forget(u64::from(s) * SECTOR, u64::from(n) * SECTOR);
            }
        }
        _ => {}
    }
}

fuzz_target!(|input: Input| {
    let size =
        SECTOR * (1 + u64::from(input.image_sectors % 64)) + u64::from(input.image_tail % 512);
    let capacity = size / SECTOR * SECTOR;
    let queue = 1u16 << (input.queue_log2 % 7);
    let seg_max = 1 + u32::from(input.seg_max % 8);
    let cfg = BlkConfig {
        queue_size: queue,
        read_only: input.cfg_read_only,
        seg_max,
        discard: input.discard,
        write_zeroes: input.write_zeroes,
        max_discard_seg: 4,
        max_discard_sectors: 64,
        max_write_zeroes_seg: 4,
        max_write_zeroes_sectors: 64,
        write_zeroes_may_unmap: input.may_unmap,
        ..BlkConfig::default()
    };
    let target = match &input.image {
        None => Target::null(size),
        Some(f) => {
            let opened = IMAGE.with(|img| {
                img.set_len(0)
                    .and_then(|_| img.set_len(size))
                    .expect("memfd resize");
                let path = format!("/proc/self/fd/{}", img.as_raw_fd());
                let opts = ImageOptions {
                    read_only: f.read_only,
                    lock: f.lock,
                    direct: f.direct,
                };
                Target::open_image_with(path, opts)
            });
            // O_DIRECT or a lock may be refused by the host; not the device's fault.
            let Ok(t) = opened else { return };
            t
        }
    };
    let dev = BlkDevice::new(target, cfg).expect("a valid configuration and image");
    let ro = dev.is_read_only();
    let mut model = Model {
        bytes: vec![0; capacity as usize],
        known: vec![true; capacity as usize],
        all_known: true,
    };
    let mem = zeroed_memory(MEM_SIZE as usize);
    let start = u16::MAX - u16::from(input.start);
    set_ring_indexes(&mem, queue, start);
    let mut vr = vring(&mem, queue, start, input.event_idx);
    let mut scratch = ChainScratch::new();
    let mut avail = start;

    for round in input.rounds.iter().take(4) {
        let mut bufs = Bufs(&mem, BUFS);
        let mut ring = Ring {
            mem: &mem,
            queue,
            next_desc: 0,
            avail,
        };
        let mut laid = Vec::new();
        for (slot, r) in round.iter().take(usize::from(queue)).enumerate() {
            let Some((sector, l)) = ring.post(r, slot, &mut bufs) else {
                break;
            };
            laid.push((r, sector, type_of(&r.kind), l));
        }
        avail = ring.avail;
        put_u16(&mem, AVAIL + 2, avail);

        let before = vr.next_used();
        if input.pop {
            while let Ok(Some(chain)) = vr.pop_chain() {
                let head = chain.head_index();
                let Completion::Used(len) = dev.process_chain(chain, &mut scratch) else {
                    break;
                };
                vr.add_used(head, len).expect("a head the device was given");
            }
        } else {
            let _ = dev.process_vring(&mut vr);
        }
        let done = vr.next_used().wrapping_sub(before);
        let stalled = laid
            .iter()
            .position(|(_, _, _, l)| status_at(&l.descs, queue).is_none());
        assert_eq!(
            usize::from(done),
            stalled.unwrap_or(laid.len()),
            "completions"
        );

        for (i, (r, sector, ty, l)) in laid.iter().take(usize::from(done)).enumerate() {
            let at = status_at(&l.descs, queue).expect("completed, so reachable");
            let mut st = [0u8];
            mem.read_slice(&mut st, GuestAddress(at))
                .expect("status in memory");
            let (_, used) = used_elem(&mem, queue, before.wrapping_add(i as u16));
            assert!(
                st[0] <= UNSUPP && used >= 1,
                "request {i}: status {} used {used}",
                st[0]
            );
            let start = sector.checked_mul(SECTOR);
            let expect = expected(r, l, start, capacity, seg_max, ro, &input);
            if let Some(e) = expect {
                assert_eq!((st[0], used), e, "request {i} ({:?})", r.kind);
            }
            // Fully modelled success (discard / write-zeroes: all segments done).
            let dwz = matches!(r.kind, Kind::Discard | Kind::WriteZeroes);
            let ok = st[0] == OK && (expect.is_some() || (dwz && l.clean));
            let sent = r.segments.len().min(8).min((l.data_len / 16) as usize);
            let start = start.unwrap_or(u64::MAX);
            match (*ty, &r.header) {
                (1, _) if ok => model.set(start, &l.payload),
                (13, _) if ok && !matches!(r.header, Header::Short(_)) => {
                    for &(s, n, _) in r.segments.iter().take(sent) {
                        model.set(u64::from(s) * SECTOR, &vec![0; usize::from(n) * 512]);
                    }
                    let rest = r.segments.get(sent..).unwrap_or_default();
                    forget_written(&mut model, rest, &r.header, *ty, start, l);
                }
                (_, Header::Short(_)) | (1 | 11 | 13, _) => {
                    forget_written(&mut model, &r.segments, &r.header, *ty, start, l)
                }
                (0, _) if ok => {
                    let mut got = Vec::new();
                    for &(a, n) in &l.out {
                        let mut b = vec![0u8; n as usize];
                        mem.read_slice(&mut b, GuestAddress(a))
                            .expect("buffer in memory");
                        got.extend(b);
                    }
                    let agrees = match input.image {
                        None => got.iter().all(|b| *b == 0x5a),
                        Some(_) => model.agrees(start, &got),
                    };
                    assert!(agrees, "read of sector {sector}: not what the model has");
                }
                (8, _) if ok => {
                    let mut id = vec![0u8; l.data_len.min(ID_LEN as u64) as usize];
                    let (a, n) = l.out[0];
                    if n as usize >= id.len() && mem.read_slice(&mut id, GuestAddress(a)).is_ok() {
                        assert_eq!(id, dev.serial()[..id.len()], "GET_ID serial");
                    }
                }
                _ => {}
            }
        }
        if let Some(k) = stalled {
            // Not completed, but it may have been carried out (the device
            // runs a request before it finds its status byte unwritable).
            let (r, sector, ty, l) = &laid[k];
            let start = sector.checked_mul(SECTOR).unwrap_or(u64::MAX);
            forget_written(&mut model, &r.segments, &r.header, *ty, start, l);
            break;
        }
    }
    drop(vr);
    if input.image.is_some() {
        let mut bytes = vec![0u8; capacity as usize];
        IMAGE
            .with(|img| img.read_exact_at(&mut bytes, 0))
            .expect("image read");
        assert!(model.agrees(0, &bytes), "image differs from the model");
    }
});
