// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One request from its descriptor chain: header, status byte, the
//! batch loop over a ring, and completion.

use super::*;

/// Request status as written into the status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    pub(super) fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// Descriptor scratch space, reused by every request of a batch so that
/// processing a chain allocates nothing.
pub struct ChainScratch {
    descs: [Descriptor; SCRATCH_DESCS],
}

impl ChainScratch {
    /// Fresh scratch space (about 4 KiB; fine on the stack).
    pub fn new() -> Self {
        ChainScratch {
            descs: [Descriptor::default(); SCRATCH_DESCS],
        }
    }
}

impl Default for ChainScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ChainScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainScratch")
    }
}

/// Where the status byte goes: the last byte of the last descriptor, which
/// must be device-writable.
pub(super) fn status_address(last: Descriptor) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    last.addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
}

/// Read the 16-byte request header from the leading readable descriptors.
/// Returns it with the position right after it: index of the descriptor
/// and bytes of it the header used.
pub(super) fn read_header<M: GuestMemory + ?Sized, A: HeaderStatusAccess + ?Sized>(
    mem: &M,
    fast: &A,
    descs: &[Descriptor],
) -> Option<([u8; HEADER_LEN], usize, u32)> {
    let mut header = [0u8; HEADER_LEN];
    // Fast path: the whole header in the first descriptor.
    if let Some(d) = descs.first() {
        if !d.is_write_only() && d.len() as usize >= HEADER_LEN {
            if let Some(h) = fast.read_header(d.addr()) {
                header = h;
            } else if !read_guest(mem, &mut header, d.addr()) {
                return None;
            }
            return Some(if d.len() as usize == HEADER_LEN {
                (header, 1, 0)
            } else {
                (header, 0, HEADER_LEN as u32)
            });
        }
    }
    let mut got = 0usize;
    for (i, d) in descs.iter().enumerate() {
        if d.is_write_only() {
            return None;
        }
        let take = (d.len() as usize).min(HEADER_LEN - got);
        if !read_guest(mem, &mut header[got..got + take], d.addr()) {
            return None;
        }
        got += take;
        if got == HEADER_LEN {
            return Some(if take == d.len() as usize {
                (header, i + 1, 0)
            } else {
                (header, i, take as u32)
            });
        }
    }
    None
}

/// Copy `buf.len()` bytes of guest memory at `addr` into `buf`. A range
/// inside one region of plain guest memory is read through a single
/// `VolatileSlice` (one region lookup); anything else (a range crossing
/// regions, IOMMU-translated memory) takes vm-memory's general path.
pub(super) fn read_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    buf: &mut [u8],
    addr: GuestAddress,
) -> bool {
    if let Some(phys) = mem.physical_memory() {
        if let Ok(slice) = phys.get_slice(addr, buf.len()) {
            return slice.read_slice(buf, 0).is_ok();
        }
    }
    mem.read_slice(buf, addr).is_ok()
}

/// A shortcut to a request's header and status byte in guest memory, tried
/// before the generic `GuestMemory` paths (which also handle what the
/// shortcut declines, such as a header spanning two regions).
pub(super) trait HeaderStatusAccess {
    /// The 16-byte request header at `addr`, or `None` to take the
    /// generic path.
    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_LEN]>;
    /// Store the status byte at `addr`; false to take the generic path.
    fn write_status(&self, addr: GuestAddress, byte: u8) -> bool;
}

/// No shortcut (chains from `virtio-queue`).
impl HeaderStatusAccess for () {
    fn read_header(&self, _addr: GuestAddress) -> Option<[u8; HEADER_LEN]> {
        None
    }

    fn write_status(&self, _addr: GuestAddress, _byte: u8) -> bool {
        false
    }
}

/// Through the batch's region hint ([`DescIter::get_ref`]): bounds-checked
/// against the region, dirty-logged, without a memory-map lookup when the
/// request's buffers share a region with the previous request's.
impl HeaderStatusAccess for &mut DescIter<'_> {
    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_LEN]> {
        // Two 8-byte volatile loads (a byte array would be read byte by
        // byte), put back in memory order.
        let [a, b] = self.get_ref::<[u64; 2]>(addr)?.load();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&a.to_ne_bytes());
        header[8..].copy_from_slice(&b.to_ne_bytes());
        Some(header)
    }

    fn write_status(&self, addr: GuestAddress, byte: u8) -> bool {
        self.get_ref::<u8>(addr).map(|r| r.store(byte)).is_some()
    }
}

/// Write the status byte and return the completion: the used length, or
/// [`Completion::NeedsReset`] when the byte cannot be written.
pub(super) fn write_status<M: GuestMemory + ?Sized, A: HeaderStatusAccess + ?Sized>(
    mem: &M,
    fast: &A,
    addr: GuestAddress,
    status: Status,
    data_written: u32,
    head: u16,
) -> Completion {
    if fast.write_status(addr, status.byte()) {
        return Completion::Used(data_written.saturating_add(1));
    }
    let written = match mem.physical_memory().map(|m| m.get_slice(addr, 1)) {
        // One region lookup and a volatile store (dirty-logged through the
        // slice's bitmap) instead of vm-memory's generic slice iterator.
        Some(Ok(slice)) => slice
            .write_obj(status.byte(), 0)
            .map_err(GuestMemoryError::from),
        _ => mem.write_obj(status.byte(), addr),
    };
    match written {
        Ok(()) => Completion::Used(data_written.saturating_add(1)),
        Err(e) => {
            warn!("virtio-blk: chain {head}: cannot write the status byte: {e}; the queue stops until reset");
            Completion::NeedsReset
        }
    }
}

/// Whether every data buffer of `span` lies in guest memory the device may
/// access as `access` says.
pub(super) fn buffers_in_memory<M: GuestMemory + ?Sized>(
    mem: &M,
    span: &DataSpan<'_>,
    access: Permissions,
) -> bool {
    span.segments()
        .all(|seg| mem.check_range(seg.addr, seg.len as usize, access))
}

impl BlkDevice {
    /// Drain one vring: process every available chain, put each on the
    /// used ring, and notify the driver once at the end if anything
    /// completed and the driver wants it (`EVENT_IDX` aware).
    ///
    /// This is what [`DeviceBackend::handle_event`] runs for a queue event;
    /// it is public so a VMM or a test can drive a [`Vring`] directly.
    pub fn process_vring(&self, vr: &mut Vring) -> Result<(), VringError> {
        if !vr.is_enabled() {
            return Ok(());
        }
        thread_local! {
            // One per worker thread: zeroing 4 KiB per batch showed up in
            // profiles at queue depth 1.
            static SCRATCH: std::cell::RefCell<ChainScratch> =
                std::cell::RefCell::new(ChainScratch::new());
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => self.drain_vring(vr, &mut scratch),
            Err(_) => self.drain_vring(vr, &mut ChainScratch::new()),
        })
    }

    pub(super) fn drain_vring(
        &self,
        vr: &mut Vring,
        scratch: &mut ChainScratch,
    ) -> Result<(), VringError> {
        let hold = self.cfg.injected_latency;
        let limit = vr.batch_limit();
        let first_used = vr.next_used();
        let mut completed = 0usize;
        let result = loop {
            if let Err(e) = vr.disable_notification() {
                break Err(e);
            }
            let batch = vr.process_available_descs(|mut chain| {
                let (head, mem) = (chain.head_index(), chain.memory());
                if let Some(d) = hold {
                    // Test knob: the request is marked in flight, not yet
                    // performed.
                    std::thread::sleep(d / 2);
                }
                let len = self.process_descs(head, mem, &mut chain, scratch);
                if let Some(d) = hold {
                    // Performed (data moved, status written), not completed.
                    std::thread::sleep(d - d / 2);
                }
                len
            });
            match batch {
                Ok(n) => completed += n,
                Err(e) => break Err(e),
            }
            if completed >= limit {
                // A ring's worth in one event and maybe more waiting (a
                // driver that keeps republishing): let the worker serve its
                // other queues and any stop request first, then come back.
                vr.defer();
                break Ok(());
            }
            match vr.enable_notification() {
                Ok(false) => break Ok(()),
                Ok(true) => {}
                Err(e) => break Err(e),
            }
        };
        // Completions already in the used ring are signalled even when the
        // batch ended on an error (whose partial count is not returned, so
        // the used index tells); a spurious kick completes nothing and must
        // not interrupt the guest.
        if completed > 0 || vr.next_used() != first_used {
            let notified = vr.notify_if_needed();
            return result.and(notified.map(|_| ()));
        }
        result
    }

    /// Process one request chain and return its completion: the used
    /// length to report (the bytes written into the chain, status byte
    /// included), or [`Completion::NeedsReset`] when the chain has no
    /// status byte the device can write (a used entry would make the driver
    /// read a status nobody wrote).
    ///
    /// This is a plain function of the chain, its memory and the target, so
    /// it can be tested without a worker.
    pub fn process_chain<M>(
        &self,
        mut chain: DescriptorChain<M>,
        scratch: &mut ChainScratch,
    ) -> Completion
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let (n, overflow, last) = self.collect_descs(&mut chain, scratch);
        self.finish_chain(head, chain.memory(), &(), scratch, n, overflow, last)
    }

    /// [`BlkDevice::process_chain`] for a chain given as its head index, its
    /// memory and an iterator over its descriptors (which may also offer a
    /// shortcut to the header and status byte).
    pub(super) fn process_descs<M, I>(
        &self,
        head: u16,
        mem: &M,
        mut descs: I,
        scratch: &mut ChainScratch,
    ) -> Completion
    where
        M: GuestMemory + ?Sized,
        I: Iterator<Item = Descriptor> + HeaderStatusAccess,
    {
        let (n, overflow, last) = self.collect_descs(&mut descs, scratch);
        self.finish_chain(head, mem, &descs, scratch, n, overflow, last)
    }

    /// Copy up to `seg_max + 2` descriptors into the scratch array; returns
    /// how many, whether there were more, and the chain's last descriptor.
    pub(super) fn collect_descs<I: Iterator<Item = Descriptor>>(
        &self,
        descs: I,
        scratch: &mut ChainScratch,
    ) -> (usize, bool, Option<Descriptor>) {
        let cap = (self.cfg.seg_max as usize + 2).min(SCRATCH_DESCS);
        let mut n = 0usize;
        let mut overflow = false;
        let mut last = None;
        // No chain is longer than the queue (virtio 2.7.5.2): an indirect
        // table can claim 65535 entries, and walking them all for the status
        // byte at the end would let one request cost that much. Counted
        // here rather than with `take` and one more `next`: with a single
        // call site, the kit's `DescIter::next` is inlined into this loop.
        let mut room = usize::from(self.cfg.queue_size);
        for desc in descs {
            if room == 0 {
                // Where its status byte is cannot be known without the walk.
                return (n, true, None);
            }
            room -= 1;
            if n < cap {
                scratch.descs[n] = desc;
                n += 1;
            } else {
                overflow = true;
            }
            last = Some(desc);
        }
        (n, overflow, last)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_chain<M: GuestMemory + ?Sized, A: HeaderStatusAccess + ?Sized>(
        &self,
        head: u16,
        mem: &M,
        fast: &A,
        scratch: &ChainScratch,
        n: usize,
        overflow: bool,
        last: Option<Descriptor>,
    ) -> Completion {
        let cap = (self.cfg.seg_max as usize + 2).min(SCRATCH_DESCS);

        let Some(status_addr) = last.and_then(status_address) else {
            warn!(
                "virtio-blk: chain {head} has no writable status byte; the queue stops until reset"
            );
            return Completion::NeedsReset;
        };
        if overflow {
            warn!("virtio-blk: chain {head} has more than {cap} descriptors");
            return write_status(mem, fast, status_addr, Status::IoErr, 0, head);
        }

        let descs = &scratch.descs[..n];
        let Some((header, first, skip)) = read_header(mem, fast, descs) else {
            // The status byte is reachable: the guest is told, rather than
            // left to read whatever its status buffer held.
            warn!("virtio-blk: chain {head} has no readable 16-byte header");
            return write_status(mem, fast, status_addr, Status::IoErr, 0, head);
        };
        let span = DataSpan {
            descs: &descs[first..],
            skip,
        };
        let (status, written) = self.execute(mem, &header, span);
        write_status(mem, fast, status_addr, status, written, head)
    }
}
