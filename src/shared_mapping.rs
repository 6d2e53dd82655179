// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A read-write `MAP_SHARED` mapping of a file handed over by a peer (the
//! dirty log, the in-flight area). The raw `mmap`/`munmap` calls for such
//! areas live here only.

use std::fs::File;
use std::os::fd::AsRawFd;

/// A shared mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    addr: *mut u8,
    len: usize,
    /// A SIGBUS in the mapping (the peer shrank the file) is survived while
    /// this lives; taken before the unmapping.
    guard: Option<crate::fault_guard::FaultGuard>,
}

// SAFETY: the mapping is plain shared memory; users access it only through
// atomics. The pointer stays valid until Drop, which needs ownership.
unsafe impl Send for SharedMapping {}
// SAFETY: see `Send`.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Map `len` bytes of `file` at `offset`, readable and writable, shared.
    pub(crate) fn new(file: &File, len: usize, offset: u64) -> std::io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh shared mapping of a file we hold open; the kernel
        // checks the arguments and the result is checked below. No existing
        // memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SharedMapping {
            addr: addr.cast(),
            len,
            guard: Some(crate::fault_guard::guard(addr.cast(), len)),
        })
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The start of the mapping.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // Unguarded first: a fault after the unmapping is not ours.
        drop(self.guard.take());
        // SAFETY: `addr`/`len` describe the mapping `new` created, owned by
        // this object alone.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}
