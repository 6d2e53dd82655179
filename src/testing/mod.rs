// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test support for device authors (cargo feature `test-utils`): guest
//! memory shared the way a VMM shares it, an interrupt line as an
//! in-process transport has it, and the driver side of a split virtqueue
//! that can post buffers now and collect their completions later (what a
//! receive queue needs).
//!
//! With these a device can be driven in every home from one test: hand
//! [`SplitQueueDriver::activation`] to a [`crate::core::DeviceCore`] (in
//! process) or to a [`crate::frontend::VhostUserFrontendDevice`] (a
//! vhost-user backend), post chains, kick, and read the used ring.
//!
//! These are test harness pieces: they panic on failures of memory they
//! own (a driver writing outside its own guest memory is a bug in the
//! test, not input to handle).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{DirtyLogBitmap, GuestMemoryLog, GuestRegionLog};
use crate::vring::{Notifier, INTERRUPT_USED_BUFFER};

#[cfg(feature = "frontend-adapter")]
mod conformance;
mod queue_driver;

#[cfg(feature = "frontend-adapter")]
pub use conformance::{Conformance, ConformanceError, Home, MoveReport, Phase, Rig};
pub use queue_driver::{RawDescriptor, SplitQueueDriver};

/// `size` bytes of guest memory at `gpa`, backed by a memfd mapped shared:
/// what a VMM gives a vhost-user backend, and what works in process too.
pub fn shared_guest_memory(gpa: u64, size: usize) -> std::io::Result<GuestMemoryLog> {
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vbk-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size as u64)?;
    let region = MmapRegionBuilder::new_with_bitmap(size, DirtyLogBitmap::default())
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let region = GuestRegionLog::new(region, GuestAddress(gpa))
        .ok_or_else(|| std::io::Error::other("guest region overflows"))?;
    GuestMemoryLog::from_regions(vec![region]).map_err(|e| std::io::Error::other(format!("{e}")))
}

/// An interrupt line as an in-process transport has it: the eventfd KVM
/// would inject from (an irqfd) and the virtio-mmio InterruptStatus word.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: EventFd,
    status: Arc<AtomicU32>,
}

impl Default for Interrupt {
    fn default() -> Self {
        Self::new()
    }
}

impl Interrupt {
    /// A fresh line.
    pub fn new() -> Self {
        Interrupt {
            irqfd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            status: Arc::new(AtomicU32::new(0)),
        }
    }

    /// A used-buffer notifier for a queue on this line.
    pub fn notifier(&self) -> Notifier {
        Notifier::with_status(
            self.irqfd.try_clone().expect("eventfd dup"),
            self.status.clone(),
            INTERRUPT_USED_BUFFER,
        )
    }

    /// The InterruptStatus word as the guest would read it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Wait up to `timeout` for the line to fire; returns whether it did,
    /// acknowledging it. Panics if it fired before InterruptStatus had the
    /// used-buffer bit (a guest would miss that interrupt's cause).
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.irqfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
            return false;
        }
        let status = self
            .status
            .fetch_and(!INTERRUPT_USED_BUFFER, Ordering::SeqCst);
        assert_ne!(
            status & INTERRUPT_USED_BUFFER,
            0,
            "irqfd fired before the InterruptStatus bit was set"
        );
        let _ = self.irqfd.read();
        true
    }
}
