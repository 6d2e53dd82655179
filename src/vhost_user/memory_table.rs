// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The frontend's memory regions: mapping the fds it sends, and translating
//! its virtual addresses (used for vring addresses) to guest physical ones.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};

use crate::memory::{DirtyLog, DirtyLogBitmap, GuestRegionLog};

/// The alignment a region's guest address must have: what the rings'
/// atomic index accesses need at the host addresses the region maps them
/// to (sizes need none: libblkio sends regions of any length).
const REGION_ALIGN: u64 = 8;

/// Why a region was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Zero size or an address range that wraps around.
    #[error("region at gpa {gpa:#x} with size {size:#x} is empty or overflows")]
    BadRange {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// The guest address is not 8-byte aligned: rings inside such a region
    /// would sit at misaligned host addresses, where the atomic accesses to
    /// their indexes fail, so the region could never be served.
    #[error("region at gpa {gpa:#x} (size {size:#x}) is not {REGION_ALIGN}-byte aligned")]
    Misaligned {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// The fd is shorter than the region claims: touching the tail would
    /// fault.
    #[error("region needs {needed} bytes of its file but the file has {actual}")]
    FileTooSmall {
        /// offset + size.
        needed: u64,
        /// Actual file size.
        actual: u64,
    },
    /// fstat failed.
    #[error("cannot inspect region fd")]
    Stat(#[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region.
    #[error("region rejected by vm-memory")]
    Region,
}

/// One mapped region with the frontend's view of it.
#[derive(Debug, Clone)]
pub struct MappedRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address of the region.
    pub user_addr: u64,
    /// Offset of the region in its file.
    #[cfg_attr(not(feature = "postcopy"), allow(dead_code))]
    pub mmap_offset: u64,
    /// The mapped region as vm-memory sees it.
    pub region: Arc<GuestRegionLog>,
    /// A SIGBUS in the mapping (the frontend shrank the file) is survived
    /// while this lives; it goes before the mapping does (the mapping
    /// outlives every `MappedRegion` clone through `region`).
    _guard: Arc<crate::fault_guard::FaultGuard>,
}

impl MappedRegion {
    /// Map the region the frontend describes in `r` (`memory_size` bytes of
    /// `file` at `mmap_offset`) as guest memory at `guest_phys_addr`.
    pub fn map(
        file: File,
        r: &VhostUserMemoryRegion,
        log: &Arc<DirtyLog>,
    ) -> Result<Self, RegionError> {
        let (gpa, size, user_addr, mmap_offset) =
            (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
        let bad = RegionError::BadRange { gpa, size };
        if size == 0 || gpa.checked_add(size).is_none() || user_addr.checked_add(size).is_none() {
            return Err(bad);
        }
        if !gpa.is_multiple_of(REGION_ALIGN) {
            return Err(RegionError::Misaligned { gpa, size });
        }
        let needed = mmap_offset.checked_add(size).ok_or(bad)?;
        let len = usize::try_from(size).map_err(|_| RegionError::BadRange { gpa, size })?;
        let actual = file.metadata().map_err(RegionError::Stat)?.len();
        if actual < needed {
            return Err(RegionError::FileTooSmall { needed, actual });
        }
        let mapping =
            MmapRegionBuilder::new_with_bitmap(len, DirtyLogBitmap::new(log.clone(), gpa))
                .with_file_offset(FileOffset::new(file, mmap_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(RegionError::Map)?;
        let guard = crate::fault_guard::guard(mapping.as_ptr(), len);
        let region = GuestRegionLog::new(mapping, GuestAddress(gpa)).ok_or(RegionError::Region)?;
        Ok(MappedRegion {
            gpa,
            size,
            user_addr,
            mmap_offset,
            region: Arc::new(region),
            _guard: Arc::new(guard),
        })
    }

    /// Where this process mapped the region.
    #[cfg(feature = "postcopy")]
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }
}

/// The set of regions of one session.
#[derive(Debug, Default)]
pub struct MemoryTable {
    regions: Vec<MappedRegion>,
}

impl MemoryTable {
    /// Replace all regions.
    pub fn replace(&mut self, regions: Vec<MappedRegion>) {
        self.regions = regions;
    }

    /// Add a region.
    pub fn add(&mut self, region: MappedRegion) {
        self.regions.push(region);
    }

    /// Remove the region matching `gpa` and `size`; returns whether found.
    pub fn remove(&mut self, gpa: u64, size: u64) -> bool {
        let before = self.regions.len();
        self.regions.retain(|r| !(r.gpa == gpa && r.size == size));
        self.regions.len() != before
    }

    /// The size of each region.
    pub fn sizes(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().map(|r| r.size)
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether there are no regions.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Translate a frontend virtual address to a guest physical address.
    pub fn vva_to_gpa(&self, vva: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| vva >= r.user_addr && vva - r.user_addr < r.size)
            .map(|r| r.gpa + (vva - r.user_addr))
    }

    /// Where this process mapped each region: (address, length).
    #[cfg(feature = "postcopy")]
    pub fn host_ranges(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.host_addr(), r.size))
            .collect()
    }
}
