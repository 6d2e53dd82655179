// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A view of the rings and descriptor table mapped straight from guest
//! memory, for the fast path (its equivalence with virtio-queue is tested
//! in `tests.rs`).

use super::*;

pub(super) type LogBitmapSlice<'m> = BS<'m, DirtyLogBitmap>;
pub(super) type LogArray<'m, T> = VolatileArrayRef<'m, T, LogBitmapSlice<'m>>;

/// The mapping of the region holding `len` bytes at `addr`, and the offset
/// of `addr` in it; `None` unless the whole range lies inside one region.
pub(super) fn map_range(
    mem: &GuestMemoryLog,
    addr: GuestAddress,
    len: usize,
) -> Option<(&MmapRegion<DirtyLogBitmap>, usize)> {
    let (region, offset) = mem.to_region_addr(addr)?;
    let offset = usize::try_from(offset.raw_value()).ok()?;
    let map: &MmapRegion<DirtyLogBitmap> = region;
    // The range check `get_array_ref` and friends repeat; done here too so
    // that a `Some` always means "inside one region".
    offset
        .checked_add(len)
        .filter(|end| *end <= map.len())
        .map(|_| (map, offset))
}

/// A descriptor table (the queue's, or an indirect one), mapped once as an
/// array of descriptors when it lies inside one memory region.
#[derive(Clone, Copy)]
pub(super) struct TableMap<'m> {
    pub(super) addr: GuestAddress,
    pub(super) size: u16,
    pub(super) array: Option<LogArray<'m, Descriptor>>,
}

impl<'m> TableMap<'m> {
    pub(super) fn new(mem: &'m GuestMemoryLog, addr: GuestAddress, size: u16) -> Self {
        let n = usize::from(size);
        let array = map_range(mem, addr, n * DESC_SIZE)
            .and_then(|(map, offset)| map.get_array_ref::<Descriptor>(offset, n).ok());
        TableMap { addr, size, array }
    }

    /// Descriptor `index`; the caller has checked `index < self.size`.
    #[inline]
    pub(super) fn read(&self, mem: &GuestMemoryLog, index: u16) -> Option<Descriptor> {
        match &self.array {
            // The array holds exactly `size` descriptors; `load` asserts the
            // index (never failing after the caller's check) and does one
            // volatile read.
            Some(array) => Some(array.load(usize::from(index))),
            None => {
                let addr = self
                    .addr
                    .checked_add(usize::from(index) as u64 * DESC_SIZE as u64)?;
                mem.read_obj::<Descriptor>(addr).ok()
            }
        }
    }
}

pub(super) const DESC_SIZE: usize = std::mem::size_of::<Descriptor>();

/// The available and used rings of a queue for one batch, each mapped once:
/// the indexes as atomics, the entries as arrays.
pub(super) struct RingMap<'m> {
    pub(super) avail_idx: &'m AtomicU16,
    pub(super) avail: LogArray<'m, u16>,
    pub(super) used_idx: &'m AtomicU16,
    /// Used elements as (id, len) pairs of little-endian words.
    pub(super) used: LogArray<'m, [u32; 2]>,
    /// The used ring's region bitmap and the offset of `used_idx` in that
    /// region, to log the index store (atomics bypass the slice bitmaps).
    pub(super) used_idx_log: (&'m DirtyLogBitmap, usize),
    pub(super) size: u16,
}

impl<'m> RingMap<'m> {
    /// `None` unless each ring lies inside one memory region (and is
    /// aligned for its atomic index).
    pub(super) fn new(mem: &'m GuestMemoryLog, queue: &Queue) -> Option<Self> {
        let size = queue.size();
        if size == 0 {
            return None;
        }
        let n = usize::from(size);
        let (amap, aoff) = map_range(mem, GuestAddress(queue.avail_ring()), 4 + 2 * n)?;
        let (umap, uoff) = map_range(mem, GuestAddress(queue.used_ring()), 4 + 8 * n)?;
        Some(RingMap {
            avail_idx: amap.get_atomic_ref::<AtomicU16>(aoff + 2).ok()?,
            avail: amap.get_array_ref::<u16>(aoff + 4, n).ok()?,
            used_idx: umap.get_atomic_ref::<AtomicU16>(uoff + 2).ok()?,
            used: umap.get_array_ref::<[u32; 2]>(uoff + 4, n).ok()?,
            used_idx_log: (umap.bitmap(), uoff + 2),
            size,
        })
    }

    /// The driver's available index (Acquire), checked against `next_avail`
    /// as `virtio-queue` does: it may run at most a queue size ahead.
    pub(super) fn avail_idx(
        &self,
        next_avail: Wrapping<u16>,
    ) -> Result<Wrapping<u16>, virtio_queue::Error> {
        let idx = Wrapping(u16::from_le(self.avail_idx.load(Ordering::Acquire)));
        if (idx - next_avail).0 > self.size {
            return Err(virtio_queue::Error::InvalidAvailRingIndex);
        }
        Ok(idx)
    }

    /// The head index in available-ring entry `next_avail`. Read after the
    /// Acquire load of the available index that covered it, as the driver
    /// wrote it before its Release store of that index.
    #[inline]
    pub(super) fn avail_head(&self, next_avail: Wrapping<u16>) -> u16 {
        u16::from_le(self.avail.load(usize::from(next_avail.0 % self.size)))
    }

    /// Write used element `next_used`, then publish it with a Release store
    /// of the used index, as `virtio-queue`'s `add_used` does. Both writes
    /// are dirty-logged.
    #[inline]
    pub(super) fn push_used(
        &self,
        next_used: Wrapping<u16>,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        if head >= self.size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = usize::from(next_used.0 % self.size);
        self.used
            .store(slot, [u32::from(head).to_le(), len.to_le()]);
        self.used_idx
            .store((next_used + Wrapping(1)).0.to_le(), Ordering::Release);
        let (bitmap, offset) = self.used_idx_log;
        bitmap.mark_dirty(offset, 2);
        Ok(())
    }
}
pub(super) const DESC_ALIGN: u32 = 16;

/// The queue's descriptor table for one batch, and the memory region the
/// batch's requests last touched through [`DescIter::get_ref`].
pub(super) struct DescTable<'m> {
    pub(super) mem: &'m GuestMemoryLog,
    pub(super) table: TableMap<'m>,
    pub(super) hint: Cell<Option<&'m GuestRegionLog>>,
}

impl<'m> DescTable<'m> {
    pub(super) fn new(mem: &'m GuestMemoryLog, queue: &Queue) -> Self {
        DescTable {
            mem,
            table: TableMap::new(mem, GuestAddress(queue.desc_table()), queue.size()),
            hint: Cell::new(None),
        }
    }

    pub(super) fn chain(&'m self, head: u16) -> DescIter<'m> {
        DescIter {
            mem: self.mem,
            hint: &self.hint,
            head,
            table: self.table,
            next_index: head,
            ttl: self.table.size,
            is_indirect: false,
            yielded_bytes: 0,
        }
    }
}

/// The descriptors of one available chain, read through a descriptor table
/// mapped once per batch (see [`Vring::process_available_descs`]).
///
/// It yields exactly what `virtio-queue`'s `DescriptorChain` yields: it
/// stops at an index outside the table, after as many descriptors as the
/// table has (loops), at an unreadable descriptor, at a malformed or nested
/// indirect table, and before the chain would exceed 4 GiB.
///
/// [`DescIter::get_ref`] reaches the buffers the descriptors point to
/// without a full guest-memory lookup when they lie in the region the batch
/// touched last.
pub struct DescIter<'m> {
    mem: &'m GuestMemoryLog,
    hint: &'m Cell<Option<&'m GuestRegionLog>>,
    head: u16,
    table: TableMap<'m>,
    next_index: u16,
    ttl: u16,
    is_indirect: bool,
    yielded_bytes: u32,
}

impl<'m> DescIter<'m> {
    /// Index of the chain's head descriptor.
    #[inline]
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// The guest memory the descriptors point into.
    #[inline]
    pub fn memory(&self) -> &'m GuestMemoryLog {
        self.mem
    }

    /// A volatile reference to a `T` at guest address `addr`, if the whole
    /// object lies inside one memory region (`None` otherwise: the caller
    /// falls back to [`DescIter::memory`]'s `Bytes` methods, which also
    /// handle objects spanning regions).
    ///
    /// The region the batch touched last is tried before a lookup in the
    /// memory map; either way the range is checked against the region's
    /// bounds. Stores through the reference are dirty-logged.
    #[inline]
    pub fn get_ref<T: ByteValued>(
        &self,
        addr: GuestAddress,
    ) -> Option<VolatileRef<'m, T, LogBitmapSlice<'m>>> {
        if let Some(region) = self.hint.get() {
            if let Some(r) = region_ref(region, addr) {
                return Some(r);
            }
        }
        let region = self.mem.find_region(addr)?;
        self.hint.set(Some(region));
        region_ref(region, addr)
    }

    pub(super) fn switch_to_indirect(&mut self, desc: Descriptor) -> Option<()> {
        if self.is_indirect || desc.len() & (DESC_ALIGN - 1) != 0 {
            return None;
        }
        let size = u16::try_from(desc.len() / DESC_ALIGN).ok()?;
        self.table = TableMap::new(self.mem, desc.addr(), size);
        self.next_index = 0;
        self.ttl = size;
        self.is_indirect = true;
        Some(())
    }
}

/// A reference to a `T` at `addr` if it lies inside `region`.
#[inline]
pub(super) fn region_ref<T: ByteValued>(
    region: &GuestRegionLog,
    addr: GuestAddress,
) -> Option<VolatileRef<'_, T, LogBitmapSlice<'_>>> {
    let offset = addr.checked_offset_from(region.start_addr())?;
    let offset = usize::try_from(offset).ok()?;
    let map: &MmapRegion<DirtyLogBitmap> = region;
    // `get_ref` checks `offset + size_of::<T>()` against the mapping.
    map.get_ref::<T>(offset).ok()
}

impl std::fmt::Debug for DescIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DescIter")
            .field("head", &self.head)
            .field("next_index", &self.next_index)
            .field("ttl", &self.ttl)
            .field("is_indirect", &self.is_indirect)
            .finish()
    }
}

impl Iterator for DescIter<'_> {
    type Item = Descriptor;

    // Inlined into the device's loop over the chain (another crate).
    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next_index >= self.table.size {
                return None;
            }
            let desc = self.table.read(self.mem, self.next_index)?;
            if desc.refers_to_indirect_table() {
                self.switch_to_indirect(desc)?;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next_index = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}
