// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Requests to hand to the device again before new ones: the in-flight
//! requests a previous backend left behind.

use super::*;

/// Chains to hand out again after a restart: a private available ring (in a
/// memory region appended above guest RAM) listing the in-flight heads in
/// their original order, walked through the guest's descriptor table.
#[derive(Debug)]
pub(super) struct Resubmit {
    pub(super) queue: Queue,
    pub(super) mem: GuestMemoryHandle,
}

impl Resubmit {
    pub(super) fn new(
        index: u16,
        real: &Queue,
        guest: &GuestMemoryLog,
        heads: &[u16],
    ) -> Result<Self, VringError> {
        use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
        let fail = |reason: String| VringError::Resubmit { index, reason };
        let size = u64::from(real.size());
        let avail_len = (6 + 2 * size).div_ceil(4096) * 4096;
        let used_len = (6 + 8 * size).div_ceil(4096) * 4096;
        let base = guest
            .last_addr()
            .0
            .checked_add(4096)
            .map(|a| a & !4095)
            .ok_or_else(|| fail("no address space left above guest RAM".into()))?;
        let map = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            (avail_len + used_len) as usize,
            DirtyLogBitmap::default(),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .map_err(|e| fail(e.to_string()))?;
        let region = GuestRegionLog::new(map, GuestAddress(base))
            .ok_or_else(|| fail("private region rejected".into()))?;
        let mem = guest
            .insert_region(Arc::new(region))
            .map_err(|e| fail(e.to_string()))?;
        for (i, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(base + 4 + 2 * i as u64))
                .map_err(|e| fail(e.to_string()))?;
        }
        mem.write_obj(heads.len() as u16, GuestAddress(base + 2))
            .map_err(|e| fail(e.to_string()))?;
        let mut queue = Queue::new(real.max_size()).map_err(queue_error(index))?;
        queue.set_size(real.size());
        let desc = real.desc_table();
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(base as u32), Some((base >> 32) as u32));
        let used = GuestAddress(base).unchecked_add(avail_len).0;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        Ok(Resubmit {
            queue,
            mem: GuestMemoryHandle::new(mem),
        })
    }
}
