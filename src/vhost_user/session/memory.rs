// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory requests: the memory table, regions added and removed one
//! at a time, the dirty log.

use super::*;

impl<B: DeviceBackend> Session<'_, B> {
    pub(super) fn set_mem_table(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let hdr_len = std::mem::size_of::<VhostUserMemory>();
        let reg_len = std::mem::size_of::<VhostUserMemoryRegion>();
        let p = &msg.payload;
        if p.len() < hdr_len {
            return Err(RequestError::BadPayload {
                request: req,
                len: p.len(),
            });
        }
        let hdr = parse::<VhostUserMemory>(req, &p[..hdr_len])?;
        let n = hdr.num_regions as usize;
        if n == 0 || n > MAX_ATTACHED_FD_ENTRIES || p.len() != hdr_len + n * reg_len {
            return Err(RequestError::BadPayload {
                request: req,
                len: p.len(),
            });
        }
        if msg.files.len() != n {
            return Err(RequestError::BadFds {
                request: req,
                expected: n,
                got: msg.files.len(),
            });
        }
        let regions = (0..n)
            .map(|i| {
                let off = hdr_len + i * reg_len;
                parse::<VhostUserMemoryRegion>(req, &msg.payload[off..off + reg_len])
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The new table replaces the old one: only its own total counts.
        check_memory_limit(regions.iter().map(|r| r.memory_size))?;
        let mut mapped = Vec::with_capacity(n);
        let files = std::mem::take(&mut msg.files);
        for (file, r) in files.into_iter().zip(regions) {
            mapped.push(MappedRegion::map(
                file,
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                self.core.dirty_log(),
            )?);
        }
        #[cfg(feature = "postcopy")]
        if self.postcopy.is_listening() {
            return self.postcopy_mem_table(&msg.payload[..hdr_len], mapped);
        }
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

    pub(super) fn add_mem_reg(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let r = parse::<VhostUserSingleMemoryRegion>(req, &msg.payload)?;
        let file = msg.take_single_file().ok_or(RequestError::BadFds {
            request: req,
            expected: 1,
            got: msg.files.len(),
        })?;
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(RequestError::TooManyRegions(self.regions.len() + 1));
        }
        check_memory_limit(self.mapped_sizes().chain(std::iter::once(r.memory_size)))?;
        let mapped = MappedRegion::map(
            file,
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
            self.core.dirty_log(),
        )?;
        #[cfg(feature = "postcopy")]
        if self.postcopy.is_listening() {
            return self.postcopy_add_region(mapped);
        }
        self.install_region(mapped)?;
        Ok(Outcome::Ack)
    }

    pub(super) fn set_log_base(&mut self, req: FrontendReq, msg: &mut Message) -> RequestResult {
        let log = parse::<VhostUserLog>(req, &msg.payload)?;
        let file = msg.take_single_file().ok_or(RequestError::BadFds {
            request: req,
            expected: 1,
            got: msg.files.len(),
        })?;
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
