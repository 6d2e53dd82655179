// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory requests: the memory table, regions added and removed one
//! at a time, the dirty log.

use super::*;

impl<B: DeviceBackend> Session<'_, B> {
    /// `SET_MEM_TABLE`: map the new table and make it the device's (or,
    /// while postcopy listens, park it until the frontend's ack).
    pub(super) fn set_mem_table(
        &mut self,
        header: VhostUserMemory,
        regions: Vec<(VhostUserMemoryRegion, File)>,
    ) -> RequestResult {
        // The new table replaces the old one: only its own total counts.
        check_memory_limit(regions.iter().map(|(r, _)| r.memory_size))?;
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, file) in regions {
            mapped.push(MappedRegion::map(file, &r, self.core.dirty_log())?);
        }
        #[cfg(feature = "postcopy")]
        if self.postcopy.is_listening() {
            return self.postcopy_mem_table(header.as_slice(), mapped);
        }
        let _ = header;
        self.install_table(mapped)?;
        Ok(Outcome::Ack)
    }

    /// The sizes of the regions mapped now, including regions a postcopy
    /// frontend has yet to acknowledge.
    pub(super) fn mapped_sizes(&self) -> impl Iterator<Item = u64> + '_ {
        let sizes = self.regions.sizes();
        #[cfg(feature = "postcopy")]
        let sizes = sizes.chain(self.postcopy.pending_sizes());
        sizes
    }

    /// Make `mapped` the guest memory of the device and of the session.
    pub(super) fn install_table(&mut self, mapped: Vec<MappedRegion>) -> Result<(), RequestError> {
        let vm_regions = mapped.iter().map(|m| m.region.clone()).collect();
        self.core.set_memory(vm_regions)?;
        self.regions.replace(mapped);
        Ok(())
    }

    /// Add `mapped` to the guest memory of the device and of the session.
    pub(super) fn install_region(&mut self, mapped: MappedRegion) -> Result<(), RequestError> {
        self.core.add_region(mapped.region.clone())?;
        self.regions.add(mapped);
        Ok(())
    }

    /// `ADD_MEM_REG`: one more region, within the slot and size limits.
    pub(super) fn add_mem_reg(
        &mut self,
        r: VhostUserSingleMemoryRegion,
        file: File,
    ) -> RequestResult {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(RequestError::TooManyRegions(self.regions.len() + 1));
        }
        check_memory_limit(self.mapped_sizes().chain(std::iter::once(r.memory_size)))?;
        let mapped = MappedRegion::map(file, &r, self.core.dirty_log())?;
        #[cfg(feature = "postcopy")]
        if self.postcopy.is_listening() {
            return self.postcopy_add_region(mapped);
        }
        self.install_region(mapped)?;
        Ok(Outcome::Ack)
    }

    /// `REM_MEM_REG`: a region the session has, by address and size.
    pub(super) fn rem_mem_reg(&mut self, r: VhostUserSingleMemoryRegion) -> RequestResult {
        if !self.regions.remove(r.guest_phys_addr, r.memory_size) {
            return Err(RequestError::NoSuchRegion(r.guest_phys_addr));
        }
        self.core.remove_region(r.guest_phys_addr, r.memory_size)?;
        Ok(Outcome::Ack)
    }

    /// `SET_LOG_BASE`: the dirty log the device writes while `LOG_ALL` is on.
    pub(super) fn set_log_base(&mut self, log: VhostUserLog, file: File) -> RequestResult {
        self.core
            .dirty_log()
            .set_area(&file, log.mmap_size, log.mmap_offset)?;
        // With LOG_SHMFD the frontend waits for this reply. Echo the log
        // description: the `vhost` crate's frontend reads exactly a
        // `VhostUserLog` back (a u64 left it blocked on the missing bytes),
        // and QEMU accepts any payload.
        Ok(Outcome::Reply(log.as_slice().to_vec()))
    }
}

/// Refuse region sizes adding up to more than [`MAX_GUEST_MEMORY`].
pub(super) fn check_memory_limit(sizes: impl Iterator<Item = u64>) -> Result<(), RequestError> {
    let requested = sizes.fold(0u64, u64::saturating_add);
    if requested > MAX_GUEST_MEMORY {
        return Err(RequestError::TooMuchMemory {
            requested,
            limit: MAX_GUEST_MEMORY,
        });
    }
    Ok(())
}
