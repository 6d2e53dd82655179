// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory as the backend knows it: the table of an activation and
//! changes to it while the device runs ([`DeviceControl::update_memory`]).
//!
//! With the `CONFIGURE_MEM_SLOTS` protocol feature the backend is told of
//! each change on its own: `REM_MEM_REG` for every region that went away,
//! then `ADD_MEM_REG` for every new one (removals first, so a region
//! replaced by a larger one at the same address never overlaps it, and the
//! slots in use never exceed `GET_MAX_MEM_SLOTS`). Without it the whole new
//! table goes in one `SET_MEM_TABLE`, followed by `SET_LOG_BASE` while
//! dirty logging is on (as at an activation).
//!
//! A region is the same region when its guest physical address, size,
//! backing file offset and VMM address are the same: the backend maps the
//! file itself but translates the frontend addresses it was given (rings)
//! through the VMM address of each region, so a region mapped anew is a
//! different region to it. The memory of the tables the backend may still
//! hold is kept mapped, so no new mapping can take such an address.

use super::*;

/// Why guest memory cannot be handed to the backend. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum MemoryUpdateError {
    /// A region is not backed by a file (a memfd) the backend could map.
    #[error("the guest memory region at {gpa:#x} is not backed by a file the backend can map")]
    NotFileBacked {
        /// Guest physical address of the region.
        gpa: u64,
    },
    /// The memory has no region.
    #[error("no guest memory")]
    Empty,
    /// More regions than the backend takes: `GET_MAX_MEM_SLOTS` with
    /// `CONFIGURE_MEM_SLOTS`, the 8 of one `SET_MEM_TABLE` without.
    #[error("{regions} guest memory regions, but the backend takes at most {max}")]
    TooManyRegions {
        /// Regions in the memory.
        regions: usize,
        /// What the backend takes.
        max: u64,
    },
    /// A running queue's rings would not stay where the backend was told
    /// they are (their region removed or mapped anew): the rings cannot
    /// move under a running device.
    #[error("queue {queue}'s rings would not stay mapped where the backend has them")]
    RingMoved {
        /// The queue.
        queue: u16,
    },
    /// Dirty logging is on and the memory reaches past what the log
    /// covers: the backend could not log its writes there.
    #[error("guest memory ends at {end:#x}, past the {covered:#x} bytes the dirty log covers")]
    BeyondDirtyLog {
        /// End of guest memory (exclusive).
        end: u64,
        /// Guest physical addresses the log covers.
        covered: u64,
    },
}

impl MemoryUpdateError {
    /// The error as an activation reports it: a bad [`Activation`]'s
    /// memory is [`ControlError::Invalid`], like the rest of it.
    pub(super) fn at_activation(self) -> ControlError {
        ControlError::Invalid(match self {
            MemoryUpdateError::NotFileBacked { .. } => "guest memory region without a file",
            MemoryUpdateError::Empty => "no guest memory",
            MemoryUpdateError::TooManyRegions { .. } => {
                "more guest memory regions than the backend takes"
            }
            MemoryUpdateError::RingMoved { .. } | MemoryUpdateError::BeyondDirtyLog { .. } => {
                "guest memory the backend cannot take"
            }
        })
    }
}

/// One region as the backend was told of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RegionKey {
    gpa: u64,
    size: u64,
    offset: u64,
    host: u64,
}

impl RegionKey {
    fn of(info: &VhostUserMemoryRegionInfo) -> Self {
        RegionKey {
            gpa: info.guest_phys_addr,
            size: info.memory_size,
            offset: info.mmap_offset,
            host: info.userspace_addr,
        }
    }

    /// The region as `REM_MEM_REG` names it (no file is sent).
    fn info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host,
            mmap_offset: self.offset,
            mmap_handle: -1,
        }
    }
}

/// The regions the backend holds, and the memory that keeps them mapped
/// in this process besides the activation's current memory.
#[derive(Debug, Default)]
pub(super) struct BackendTable {
    regions: Vec<RegionKey>,
    /// Memory of earlier updates that failed half way: the backend may
    /// still hold some of its regions.
    retired: Vec<GuestMemoryLog>,
}

impl BackendTable {
    pub(super) fn new(regions: Vec<RegionKey>) -> Self {
        BackendTable {
            regions,
            retired: Vec::new(),
        }
    }
}

impl VhostUserFrontendDevice {
    /// At the handshake: how many regions the backend takes
    /// (`GET_MAX_MEM_SLOTS` with `CONFIGURE_MEM_SLOTS`, else 8).
    pub(super) fn learn_mem_slots(&mut self) -> Result<(), FrontendError> {
        self.max_mem_slots = if self.has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let n = self.request("GET_MAX_MEM_SLOTS", |fe| fe.get_max_mem_slots())?;
            debug!("vhost-user backend takes {n} memory regions");
            n
        } else {
            MAX_MEM_TABLE_REGIONS as u64
        };
        Ok(())
    }

    /// The most guest memory regions the backend takes: what it answered
    /// `GET_MAX_MEM_SLOTS` with `CONFIGURE_MEM_SLOTS`, else the 8 of one
    /// `SET_MEM_TABLE`.
    pub fn max_memory_regions(&self) -> u64 {
        self.max_mem_slots
    }

    /// The memory table entries for `memory`, checked against what the
    /// backend takes; every region must be backed by a file the backend
    /// can map.
    pub(super) fn memory_table(
        &self,
        memory: &GuestMemoryLog,
    ) -> Result<Vec<VhostUserMemoryRegionInfo>, MemoryUpdateError> {
        let regions: Vec<_> = memory
            .iter()
            .map(|r| {
                let gpa = r.start_addr().raw_value();
                let file = r
                    .file_offset()
                    .ok_or(MemoryUpdateError::NotFileBacked { gpa })?;
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: gpa,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: file.start(),
                    mmap_handle: file.file().as_raw_fd(),
                })
            })
            .collect::<Result<_, MemoryUpdateError>>()?;
        if regions.is_empty() {
            return Err(MemoryUpdateError::Empty);
        }
        if regions.len() as u64 > self.max_mem_slots {
            return Err(MemoryUpdateError::TooManyRegions {
                regions: regions.len(),
                max: self.max_mem_slots,
            });
        }
        Ok(regions)
    }

    /// Hand `regions` to a backend with no table of ours (an activation):
    /// `SET_MEM_TABLE` with the first 8, `ADD_MEM_REG` for the rest (only
    /// with `CONFIGURE_MEM_SLOTS`: [`Self::memory_table`] allows no more
    /// otherwise). Returns the table the backend then holds.
    pub(super) fn send_memory_table(
        &self,
        regions: &[VhostUserMemoryRegionInfo],
    ) -> Result<BackendTable, FrontendError> {
        let first = regions.len().min(MAX_MEM_TABLE_REGIONS);
        let (table, rest) = regions.split_at(first);
        self.request("SET_MEM_TABLE", |fe| fe.set_mem_table(table))?;
        for region in rest {
            self.request("ADD_MEM_REG", |fe| fe.add_mem_region(region))?;
        }
        Ok(BackendTable::new(
            regions.iter().map(RegionKey::of).collect(),
        ))
    }

    /// [`DeviceControl::update_memory`] for the adapter.
    pub(super) fn change_memory(&mut self, memory: GuestMemoryLog) -> Result<(), ControlError> {
        let regions = self.memory_table(&memory).map_err(FrontendError::from)?;
        let Some(active) = self.active.as_ref() else {
            // The next activation brings its memory; nothing to tell.
            return Ok(());
        };
        self.check_update(active, &memory)
            .map_err(FrontendError::from)?;
        let held = active.mem_table.regions.clone();
        let (table, result) = if self.has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            self.update_slots(held, &regions)
        } else {
            self.replace_table(held, &regions)
        };
        let Some(active) = self.active.as_mut() else {
            return result.map_err(ControlError::from);
        };
        active.mem_table.regions = table;
        match result {
            Ok(()) => {
                active._memory = memory;
                active.mem_table.retired.clear();
                debug!("guest memory updated: {} region(s)", regions.len());
                Ok(())
            }
            Err(e) => {
                // The backend may hold some of the new regions already.
                active.mem_table.retired.push(memory);
                Err(e.into())
            }
        }
    }

    /// What an update of running `active` to `memory` must keep: every
    /// started ring at the VMM addresses the backend has, and (while
    /// logging) memory within the log.
    fn check_update(
        &self,
        active: &ActiveState,
        memory: &GuestMemoryLog,
    ) -> Result<(), MemoryUpdateError> {
        for &ring in &active.layout {
            let queue = ring.0;
            let same = match (
                self.vring_config(&active._memory, ring, false),
                self.vring_config(memory, ring, false),
            ) {
                (Ok(old), Ok(new)) => {
                    (old.desc_table_addr, old.avail_ring_addr, old.used_ring_addr)
                        == (new.desc_table_addr, new.avail_ring_addr, new.used_ring_addr)
                }
                _ => false,
            };
            if !same {
                return Err(MemoryUpdateError::RingMoved { queue });
            }
        }
        if let Some(covered) = self.dirty_log.as_ref().map(LogArea::covered) {
            let end = memory.last_addr().raw_value().saturating_add(1);
            if end > covered {
                return Err(MemoryUpdateError::BeyondDirtyLog { end, covered });
            }
        }
        Ok(())
    }

    /// `REM_MEM_REG` for the regions of `held` not in `regions`, then
    /// `ADD_MEM_REG` for those of `regions` not held; returns what the
    /// backend holds afterwards, also when a request failed.
    fn update_slots(
        &self,
        held: Vec<RegionKey>,
        regions: &[VhostUserMemoryRegionInfo],
    ) -> (Vec<RegionKey>, Result<(), FrontendError>) {
        let wanted: Vec<RegionKey> = regions.iter().map(RegionKey::of).collect();
        let mut table = held.clone();
        for gone in held.iter().filter(|k| !wanted.contains(k)) {
            let info = gone.info();
            if let Err(e) = self.request("REM_MEM_REG", |fe| fe.remove_mem_region(&info)) {
                return (table, Err(e));
            }
            table.retain(|k| k != gone);
        }
        for region in regions {
            let key = RegionKey::of(region);
            if table.contains(&key) {
                continue;
            }
            if let Err(e) = self.request("ADD_MEM_REG", |fe| fe.add_mem_region(region)) {
                return (table, Err(e));
            }
            table.push(key);
        }
        (table, Ok(()))
    }

    /// The whole of `regions` in one `SET_MEM_TABLE`, and the dirty log
    /// again while logging is on; returns what the backend holds
    /// afterwards (`held` when it refused the table).
    fn replace_table(
        &self,
        held: Vec<RegionKey>,
        regions: &[VhostUserMemoryRegionInfo],
    ) -> (Vec<RegionKey>, Result<(), FrontendError>) {
        if let Err(e) = self.request("SET_MEM_TABLE", |fe| fe.set_mem_table(regions)) {
            return (held, Err(e));
        }
        let table = regions.iter().map(RegionKey::of).collect();
        // The backend may drop the log with the table it belonged to.
        (table, self.apply_log_at_activation())
    }
}
