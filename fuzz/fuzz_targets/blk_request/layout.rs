// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `blk_request` target's driver side: the requests the fuzzer picks
//! and how they are laid out as descriptor chains in guest memory.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::GuestMemoryLog;

use crate::common::*;

pub const MEM_SIZE: u64 = 0x2_0000;
/// Indirect tables: one 16-entry slot per chain of a round.
pub const SLOT: u64 = 256;
pub const BUFS: u64 = DATA + SLOT * MAX_QUEUE as u64 / 4;
pub const OUTSIDE: u64 = MEM_SIZE + 0x1000;
/// Buffers end here; the last page is where raw addresses start, so a
/// device write through one (straddling the end of memory or beyond it)
/// never lands on the rings or on another request's buffers.
pub const RAW_BASE: u64 = MEM_SIZE - 0x1000;
pub const SECTOR: u64 = 512;
pub const ID_LEN: usize = 20;
pub const OK: u8 = 0;
pub const IOERR: u8 = 1;
pub const UNSUPP: u8 = 2;

#[derive(Arbitrary, Debug)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Header {
    Whole,
    Split(u8),
    WithData,
    Short(u8),
    Writable,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Status {
    Separate,
    Wide(u8),
    SharedWithLast,
    Missing,
    Outside,
}

#[derive(Arbitrary, Debug)]
pub struct Piece {
    /// Whole sectors (0..=8) if `sectors`, else bytes (0..=4096).
    pub len: u16,
    pub sectors: bool,
    /// Against the request's direction (writable for OUT, ...).
    pub flip: bool,
    pub raw_addr: Option<u64>,
}

#[derive(Arbitrary, Debug)]
pub struct Req {
    pub kind: Kind,
    pub sector: u8,
    pub far_sector: Option<u64>,
    pub header: Header,
    pub data: Vec<Piece>,
    pub status: Status,
    pub indirect: bool,
    pub seed: u8,
    /// Discard / write-zeroes segments: (sector, sectors, flags).
    pub segments: Vec<(u8, u8, u8)>,
}

/// One laid-out request: its descriptors (address, length, writable) and
/// what the checks need to know.
pub struct Laid {
    pub descs: Vec<(u64, u32, bool)>,
    /// Payload of the readable data descriptors, in order.
    pub payload: Vec<u8>,
    /// (address, length) of the writable data pieces.
    pub out: Vec<(u64, u32)>,
    pub data_len: u64,
    pub clean: bool,
}

/// Bump allocator over the buffer area, filled as it goes.
pub struct Bufs<'m>(pub &'m GuestMemoryLog, pub u64);

impl Bufs<'_> {
    pub fn take(&mut self, bytes: &[u8]) -> Option<u64> {
        let at = self.1;
        self.1 = (at + bytes.len() as u64 + 15) & !15;
        (self.1 <= RAW_BASE).then(|| {
            let _ = self.0.write_slice(bytes, GuestAddress(at));
            at
        })
    }
}

fn lay_out(r: &Req, header: [u8; 16], bufs: &mut Bufs) -> Option<Laid> {
    let to_device = !matches!(r.kind, Kind::In | Kind::GetId);
    let mut segs: Vec<u8> = r.segments.iter().take(8).flat_map(seg_bytes).collect();
    let mut pieces: Vec<(u32, bool, Option<u64>)> = r
        .data
        .iter()
        .take(12)
        .map(|p| {
            let len = if p.sectors {
                u32::from(p.len % 9) * 512
            } else {
                u32::from(p.len % 4097)
            };
            (len, to_device ^ p.flip, p.raw_addr)
        })
        .collect();
    let dwz = matches!(r.kind, Kind::Discard | Kind::WriteZeroes);
    if pieces.is_empty() && !segs.is_empty() && dwz {
        pieces.push((segs.len() as u32, true, None));
    }
    let mut l = Laid {
        descs: Vec::new(),
        payload: Vec::new(),
        out: Vec::new(),
        data_len: 0,
        clean: r
            .data
            .iter()
            .take(12)
            .all(|p| !p.flip && p.raw_addr.is_none()),
    };
    let mut data = Vec::new();
    for (i, (len, readable, raw)) in pieces.iter().enumerate() {
        let mut bytes: Vec<u8> = (0..*len)
            .map(|k| r.seed.wrapping_add(k as u8 ^ i as u8))
            .collect();
        if dwz {
            // Segments first, then zero segments (no-ops).
            segs.resize(bytes.len().max(segs.len()), 0);
            let n = bytes.len();
            bytes.copy_from_slice(&segs[..n]);
            segs.drain(..n);
        }
        if !readable {
            bytes.fill(0x5a);
        }
        let addr = match raw {
            Some(a) => RAW_BASE.saturating_add(*a),
            None => bufs.take(&bytes)?,
        };
        if *readable {
            l.payload.extend_from_slice(&bytes)
        } else {
            l.out.push((addr, *len))
        }
        data.push((addr, *len, !readable));
        l.data_len += u64::from(*len);
    }
    lay_out_header(r.header, header, bufs, &mut l, &mut data)?;
    l.clean &= matches!(r.header, Header::Whole | Header::Split(_));
    l.descs.extend(data);
    lay_out_status(r.status, bufs, &mut l)?;
    Some(l)
}

/// The request header's descriptors as `kind` places it (or, for
/// `WithData`, merged into the first data buffer in `data`).
fn lay_out_header(
    kind: Header,
    header: [u8; 16],
    bufs: &mut Bufs,
    l: &mut Laid,
    data: &mut [(u64, u32, bool)],
) -> Option<()> {
    match kind {
        Header::Whole => l.descs.push((bufs.take(&header)?, 16, false)),
        Header::Split(a) => {
            let a = 1 + usize::from(a % 15);
            l.descs.push((bufs.take(&header[..a])?, a as u32, false));
            l.descs
                .push((bufs.take(&header[a..])?, 16 - a as u32, false));
        }
        Header::WithData if data.first().is_some_and(|d| !d.2) && l.clean => {
            let mut first = header.to_vec();
            first.extend_from_slice(&l.payload[..data[0].1 as usize]);
            data[0] = (bufs.take(&first)?, 16 + data[0].1, false);
            l.clean = false;
        }
        Header::WithData => l.descs.push((bufs.take(&header)?, 16, false)),
        Header::Short(n) => l.descs.push((
            bufs.take(&header[..usize::from(n % 16)])?,
            u32::from(n % 16),
            false,
        )),
        Header::Writable => l.descs.push((bufs.take(&header)?, 16, true)),
    }
    Some(())
}

/// The status byte's descriptor as `kind` places it.
fn lay_out_status(kind: Status, bufs: &mut Bufs, l: &mut Laid) -> Option<()> {
    match kind {
        Status::Separate => l.descs.push((bufs.take(&[0xff])?, 1, true)),
        Status::Wide(k) => {
            // All but its last byte are data.
            l.clean = false;
            let k = 1 + usize::from(k % 8);
            l.descs.push((bufs.take(&vec![0xff; k])?, k as u32, true));
        }
        Status::SharedWithLast => {
            l.clean = false;
            let last = l.descs.last_mut().filter(|d| d.1 > 0);
            match last {
                Some(d) => d.2 = true,
                None => l.descs.push((bufs.take(&[0xff])?, 1, true)),
            }
        }
        Status::Missing => l.clean = false,
        Status::Outside => {
            l.descs.push((OUTSIDE, 1, true));
            l.clean = false;
        }
    }
    Some(())
}

fn seg_bytes(&(sector, n, flags): &(u8, u8, u8)) -> Vec<u8> {
    let mut s = u64::from(sector).to_le_bytes().to_vec();
    s.extend_from_slice(&u32::from(n).to_le_bytes());
    s.extend_from_slice(&u32::from(flags & 3).to_le_bytes());
    s
}

/// Where the device must write the status byte, if anywhere.
pub fn status_at(descs: &[(u64, u32, bool)], queue: u16) -> Option<u64> {
    let &(addr, len, writable) = descs.last()?;
    let at = addr.checked_add(u64::from(len))?.checked_sub(1)?;
    (writable && len > 0 && at < MEM_SIZE && descs.len() <= usize::from(queue)).then_some(at)
}

/// The request's type field.
pub fn type_of(kind: &Kind) -> u32 {
    match kind {
        Kind::In => 0,
        Kind::Out => 1,
        Kind::Flush => 4,
        Kind::GetId => 8,
        Kind::Discard => 11,
        Kind::WriteZeroes => 13,
        Kind::Other(t) => *t,
    }
}

/// The driver's ring for one round: descriptor-table entries in use and
/// the available index.
pub struct Ring<'m> {
    pub mem: &'m GuestMemoryLog,
    pub queue: u16,
    pub next_desc: u16,
    pub avail: u16,
}

impl Ring<'_> {
    /// Lay `r` out (direct, or through the indirect slot `slot` if asked
    /// or the table is short) and make it available; `None` when memory or
    /// the table is full. Returns the sector and the chain.
    pub fn post(&mut self, r: &Req, slot: usize, bufs: &mut Bufs) -> Option<(u64, Laid)> {
        let sector = r.far_sector.unwrap_or(u64::from(r.sector));
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&type_of(&r.kind).to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let l = lay_out(r, header, bufs)?;
        let k = l.descs.len() as u16;
        let indirect = r.indirect || k > self.queue - self.next_desc;
        if indirect && self.next_desc == self.queue {
            return None;
        }
        let (table, first) = match indirect {
            true => (DATA + SLOT * slot as u64, 0),
            false => (DESC, self.next_desc),
        };
        for (i, &(addr, len, w)) in l.descs.iter().enumerate() {
            let more = if i + 1 < l.descs.len() { F_NEXT } else { 0 };
            let flags = if w { F_WRITE } else { 0 } | more;
            let d = desc_bytes(addr, len, flags, first + i as u16 + 1);
            let _ = self
                .mem
                .write_slice(&d, GuestAddress(table + 16 * u64::from(first + i as u16)));
        }
        if indirect {
            let d = desc_bytes(table, 16 * u32::from(k), F_INDIRECT, 0);
            let _ = self
                .mem
                .write_slice(&d, GuestAddress(DESC + 16 * u64::from(self.next_desc)));
        }
        put_u16(
            self.mem,
            AVAIL + 4 + 2 * u64::from(self.avail % self.queue),
            self.next_desc,
        );
        self.avail = self.avail.wrapping_add(1);
        self.next_desc += if indirect { 1 } else { k };
        Some((sector, l))
    }
}
