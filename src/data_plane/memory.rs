// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory as the kit sees it: an mmap-backed `vm-memory` collection
//! whose regions carry a [`DirtyLogBitmap`], so that every write the kit (or a
//! device) makes through `vm-memory` can be recorded in a live-migration dirty
//! log.
//!
//! The dirty log follows the vhost-user convention: one bit per 4 KiB guest
//! page, indexed by guest physical address, in a shared memory area handed over
//! by the frontend (`SET_LOG_BASE`). Logging costs one relaxed atomic load per
//! write while it is off.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use crate::shared_mapping::SharedMapping;
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

/// Size of the page one dirty-log bit stands for.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Guest memory regions with dirty-log tracking.
pub type GuestMemoryLog = GuestMemoryMmap<DirtyLogBitmap>;
/// One region of [`GuestMemoryLog`].
pub type GuestRegionLog = GuestRegionMmap<DirtyLogBitmap>;
/// The hot-swappable handle to guest memory shared by the control core,
/// the workers and the device.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryLog>;

/// Errors raised while setting up the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The log area could not be mapped.
    #[error("cannot map the dirty log area ({size} bytes at offset {offset})")]
    Map {
        /// Requested size.
        size: u64,
        /// Requested file offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The log area is empty or too large to map.
    #[error("invalid dirty log size {0}")]
    InvalidSize(u64),
    /// The log fd is shorter than the area the frontend announced.
    #[error("dirty log needs {needed} bytes of its file but the file has {actual}")]
    FileTooSmall {
        /// offset + size.
        needed: u64,
        /// Actual file size.
        actual: u64,
    },
}

/// A shared mapping of the frontend's dirty log bitmap.
#[derive(Debug)]
struct LogArea(SharedMapping);

impl LogArea {
    fn map(file: &File, size: u64, offset: u64) -> Result<Self, DirtyLogError> {
        let len = usize::try_from(size)
            .ok()
            .filter(|l| *l > 0 && *l <= (1 << 40))
            .ok_or(DirtyLogError::InvalidSize(size))?;
        // Mapping past the end of the file would fault on the first mark.
        let actual = file
            .metadata()
            .map_err(|source| DirtyLogError::Map {
                size,
                offset,
                source,
            })?
            .len();
        if offset.checked_add(size).is_none_or(|end| end > actual) {
            return Err(DirtyLogError::FileTooSmall {
                needed: offset.saturating_add(size),
                actual,
            });
        }
        SharedMapping::new(file, len, offset)
            .map(LogArea)
            .map_err(|source| DirtyLogError::Map {
                size,
                offset,
                source,
            })
    }

    fn mark_pages(&self, first_page: u64, last_page: u64) {
        for page in first_page..=last_page {
            let byte = (page / 8) as usize;
            if byte >= self.0.len() {
                // The frontend sized the log for less memory than it gave us;
                // nothing sensible to record beyond its end.
                return;
            }
            // SAFETY: `byte < len`, so the address lies inside our mapping,
            // and `AtomicU8` has the alignment and size of `u8`.
            let cell = unsafe { &*(self.0.as_ptr().add(byte) as *const AtomicU8) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

/// The state of the dirty log shared by every region of one device.
#[derive(Debug, Default)]
pub struct DirtyLog {
    active: AtomicBool,
    area: RwLock<Option<Arc<LogArea>>>,
}

impl DirtyLog {
    /// A new, inactive log with no area.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Map `size` bytes of `file` at `offset` as the log area, replacing any
    /// previous one.
    pub fn set_area(&self, file: &File, size: u64, offset: u64) -> Result<(), DirtyLogError> {
        let area = LogArea::map(file, size, offset)?;
        *self.area.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(area));
        Ok(())
    }

    /// Drop the log area.
    pub fn clear_area(&self) {
        *self.area.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Start or stop logging (the `VHOST_F_LOG_ALL` feature).
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Release);
    }

    /// Whether writes are being logged.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether a log area has been provided.
    pub fn has_area(&self) -> bool {
        self.area.read().map(|a| a.is_some()).unwrap_or(false)
    }

    /// Record a write of `len` bytes at guest physical address `gpa`.
    ///
    /// Inlined into every guest-memory write: while logging is off this is
    /// one relaxed load and a branch.
    #[inline]
    pub fn mark(&self, gpa: u64, len: usize) {
        if len == 0 || !self.active.load(Ordering::Relaxed) {
            return;
        }
        self.mark_active(gpa, len);
    }

    #[cold]
    #[inline(never)]
    fn mark_active(&self, gpa: u64, len: usize) {
        let guard = self.area.read().unwrap_or_else(|e| e.into_inner());
        if let Some(area) = guard.as_ref() {
            let last = gpa.saturating_add(len as u64 - 1);
            area.mark_pages(gpa / LOG_PAGE_SIZE, last / LOG_PAGE_SIZE);
        }
    }
}

/// A `vm-memory` bitmap that forwards writes to the device's [`DirtyLog`],
/// translated to guest physical addresses.
#[derive(Clone, Debug, Default)]
pub struct DirtyLogBitmap {
    log: Option<Arc<DirtyLog>>,
    gpa_base: u64,
}

impl DirtyLogBitmap {
    /// A bitmap for a region starting at guest physical address `gpa_base`.
    pub fn new(log: Arc<DirtyLog>, gpa_base: u64) -> Self {
        DirtyLogBitmap {
            log: Some(log),
            gpa_base,
        }
    }
}

// Slices borrow the region's bitmap instead of cloning it: a clone would
// touch the `Arc<DirtyLog>` reference count on every guest-memory access.
impl<'a> WithBitmapSlice<'a> for DirtyLogBitmap {
    type S = RefSlice<'a, DirtyLogBitmap>;
}

impl Bitmap for DirtyLogBitmap {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(log) = &self.log {
            log.mark(self.gpa_base.wrapping_add(offset as u64), len);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        // The log lives in the frontend's memory and is only ever set by us;
        // we never need to query it.
        false
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyLogBitmap> {
        RefSlice::new(self, offset)
    }
}

impl vm_memory::bitmap::NewBitmap for DirtyLogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn memfd(size: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn writes_are_logged_only_while_active() {
        let log = DirtyLog::new();
        let log_file = memfd(4096);
        log.set_area(&log_file, 4096, 0).unwrap();
        let base = 0x10_0000u64;
        let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            0x4000,
            DirtyLogBitmap::new(log.clone(), base),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .unwrap();
        let mem =
            GuestMemoryLog::from_regions(vec![
                GuestRegionLog::new(mapping, GuestAddress(base)).unwrap()
            ])
            .unwrap();
        mem.write_obj(7u32, GuestAddress(base + 0x1000)).unwrap();
        let mut bytes = [0u8; 64];
        std::os::unix::fs::FileExt::read_at(&log_file, &mut bytes, 0).unwrap();
        assert!(bytes.iter().all(|b| *b == 0), "logged while inactive");

        log.set_active(true);
        mem.write_obj(7u32, GuestAddress(base + 0x2ffe)).unwrap();
        std::os::unix::fs::FileExt::read_at(&log_file, &mut bytes, 0).unwrap();
        let page = (base + 0x2ffe) / LOG_PAGE_SIZE;
        let next = page + 1;
        assert_ne!(bytes[(page / 8) as usize] & (1 << (page % 8)), 0);
        assert_ne!(bytes[(next / 8) as usize] & (1 << (next % 8)), 0);
        let before = page - 1;
        assert_eq!(bytes[(before / 8) as usize] & (1 << (before % 8)), 0);
    }
}
