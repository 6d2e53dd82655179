// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The frontend's side of the dirty log: a memfd in the vhost-user log
//! format (one bit per 4 KiB page, by guest physical address) that the VMM
//! creates for a live migration. In-process devices log into it through
//! [`DirtyLogBitmap`](super::memory::DirtyLogBitmap)s built on
//! [`SharedDirtyLog::log`]; vhost-user backends get the same file with
//! `SET_LOG_BASE` and set bits in it directly. The migration reads and
//! clears it with [`SharedDirtyLog::take_dirty_pages`].

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::memory::{DirtyLog, DirtyLogError, LOG_PAGE_SIZE};
use crate::shared_mapping::SharedMapping;

/// Errors creating a [`SharedDirtyLog`].
#[derive(Debug, thiserror::Error)]
pub enum SharedLogError {
    /// The memory to cover is empty or too large.
    #[error("a dirty log for {0} bytes of guest memory is not supported")]
    Size(u64),
    /// `memfd_create` or `ftruncate` failed.
    #[error("cannot create the dirty log file")]
    Create(#[source] std::io::Error),
    /// The file could not be mapped.
    #[error("cannot map the dirty log file")]
    Map(#[source] std::io::Error),
    /// The kit's own log could not use the file.
    #[error(transparent)]
    Log(#[from] DirtyLogError),
}

/// A dirty log shared by a frontend, its in-process devices and its
/// vhost-user backends.
#[derive(Debug)]
pub struct SharedDirtyLog {
    file: File,
    size: u64,
    log: Arc<DirtyLog>,
    reader: SharedMapping,
}

impl SharedDirtyLog {
    /// A log covering guest physical addresses `[0, memory_end)`, with
    /// logging off.
    pub fn new(memory_end: u64) -> Result<Self, SharedLogError> {
        let pages = memory_end.div_ceil(LOG_PAGE_SIZE);
        let size = pages.div_ceil(8);
        if size == 0 || size > 1 << 32 {
            return Err(SharedLogError::Size(memory_end));
        }
        let name = CString::from(c"vbk-dirty-log");
        // SAFETY: `name` is a valid NUL-terminated string; the call creates
        // a new fd (or fails) and touches no memory of ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(SharedLogError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(SharedLogError::Create)?;
        let log = DirtyLog::new();
        log.set_area(&file, size, 0)?;
        let reader = SharedMapping::new(&file, size as usize, 0).map_err(SharedLogError::Map)?;
        Ok(SharedDirtyLog {
            file,
            size,
            log,
            reader,
        })
    }

    /// The kit's log over this file, for the [`DirtyLogBitmap`]s of guest
    /// memory regions (see [`DirtyLogBitmap::new`]).
    ///
    /// [`DirtyLogBitmap`]: super::memory::DirtyLogBitmap
    /// [`DirtyLogBitmap::new`]: super::memory::DirtyLogBitmap::new
    pub fn log(&self) -> &Arc<DirtyLog> {
        &self.log
    }

    /// The log file, for `SET_LOG_BASE`.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the log file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Start or stop logging the writes of in-process devices.
    pub fn set_active(&self, active: bool) {
        self.log.set_active(active);
    }

    /// The guest page numbers (guest physical address / 4096) logged since
    /// the last call, in ascending order; their bits are cleared. A bit set
    /// while this runs is either returned now or kept for the next call.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        let base = self.reader.as_ptr();
        for byte in 0..self.reader.len() {
            // SAFETY: `byte` is inside the mapping, which lives as long as
            // `self`; `AtomicU8` has the size and alignment of `u8`. Backends
            // set bits with atomic byte operations too.
            let cell = unsafe { &*(base.add(byte) as *const AtomicU8) };
            if cell.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let bits = cell.swap(0, Ordering::AcqRel);
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    pages.push(byte as u64 * 8 + bit);
                }
            }
        }
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{DirtyLogBitmap, GuestMemoryLog, GuestRegionLog};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn in_process_writes_are_taken_once_and_only_while_active() {
        let shared = SharedDirtyLog::new(0x10_0000).unwrap();
        assert_eq!(shared.size(), 32);
        let mapping = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            0x10_0000,
            DirtyLogBitmap::new(shared.log().clone(), 0),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .unwrap();
        let mem = GuestMemoryLog::from_regions(vec![
            GuestRegionLog::new(mapping, GuestAddress(0)).unwrap()
        ])
        .unwrap();
        mem.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        assert!(shared.take_dirty_pages().is_empty(), "logged while off");
        shared.set_active(true);
        mem.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(1u32, GuestAddress(0xf_fff0)).unwrap();
        mem.write_slice(&[7u8; 0x2000], GuestAddress(0x8800))
            .unwrap();
        assert_eq!(shared.take_dirty_pages(), vec![3, 8, 9, 10, 0xff]);
        assert!(shared.take_dirty_pages().is_empty(), "bits not cleared");
    }

    #[test]
    fn empty_memory_is_refused() {
        assert!(matches!(
            SharedDirtyLog::new(0),
            Err(SharedLogError::Size(0))
        ));
    }
}
