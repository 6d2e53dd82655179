// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A Linux userfaultfd (see userfaultfd(2)): creation, the `UFFDIO_API`
//! handshake, and registration of mapped ranges in MISSING mode.
//!
//! Only the backend's side lives here: a postcopy frontend reads the fault
//! events from its copy of the fd and resolves them (`UFFDIO_COPY`); the
//! backend only registers and unregisters its own mappings.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The ioctl type of userfaultfd requests.
const UFFDIO: u32 = 0xAA;
/// The API version of `UFFDIO_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING faults on shared memory (memfd,
/// tmpfs), what vhost-user guest memory is.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Bit of `_UFFDIO_REGISTER` in the ioctl mask `UFFDIO_API` returns.
const UFFDIO_REGISTER_BIT: u64 = 1 << 0;
/// The page granularity registrations are rounded to.
const PAGE_SIZE: u64 = 4096;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// The request numbers (private: the macros declare public functions).
mod nr {
    use super::{UffdioApi, UffdioRange, UffdioRegister, UFFDIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    // On /dev/userfaultfd.
    ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
}

/// Why a userfaultfd could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum UserfaultfdError {
    /// Neither userfaultfd(2) nor /dev/userfaultfd gave an fd.
    #[error("cannot create a userfaultfd (syscall: {syscall}; /dev/userfaultfd: {device})")]
    Create {
        /// Why the system call failed.
        syscall: io::Error,
        /// Why /dev/userfaultfd failed.
        device: io::Error,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    /// The kernel cannot fault on shared memory or cannot register ranges.
    #[error("userfaultfd lacks MISSING faults on shared memory (features {features:#x}, ioctls {ioctls:#x})")]
    Unsupported {
        /// Features the kernel reported.
        features: u64,
        /// Ioctls the kernel reported.
        ioctls: u64,
    },
    /// A range could not be registered.
    #[error("cannot register {len:#x} bytes at {addr:#x} with the userfaultfd")]
    Register {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A range could not be unregistered.
    #[error("cannot unregister {len:#x} bytes at {addr:#x} from the userfaultfd")]
    Unregister {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// An open, handshaken userfaultfd of this process.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Open a userfaultfd (close-on-exec, non-blocking) with the system
    /// call, or with /dev/userfaultfd where the call is not permitted, and
    /// check that it can fault on shared memory.
    ///
    /// Faults taken inside the kernel (a `pwrite` straight out of guest
    /// memory) must be caught too, so `UFFD_USER_MODE_ONLY` is not used.
    pub fn new() -> Result<Self, UserfaultfdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match Self::from_syscall(flags) {
            Ok(fd) => fd,
            Err(syscall) => Self::from_device(flags)
                .map_err(|device| UserfaultfdError::Create { syscall, device })?,
        };
        let uffd = Userfaultfd { fd };
        uffd.handshake()?;
        Ok(uffd)
    }

    fn from_syscall(flags: i32) -> io::Result<OwnedFd> {
        // SAFETY: userfaultfd(2) takes one integer argument and returns a
        // new fd or -1; no memory is passed.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = i32::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned `raw` as a new fd owned by nobody
        // else.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn from_device(flags: i32) -> io::Result<OwnedFd> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and
        // returns a new fd or -1; `dev` is a valid open fd.
        let ret =
            unsafe { ioctl_with_val(&dev, nr::USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned `ret` as a new fd owned by nobody
        // else.
        Ok(unsafe { OwnedFd::from_raw_fd(ret) })
    }

    fn handshake(&self) -> Result<(), UserfaultfdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..UffdioApi::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct
        // uffdio_api`, which `api` is (repr(C), three u64s), and `self.fd`
        // is an open userfaultfd.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_API(), &mut api) };
        if ret < 0 {
            return Err(UserfaultfdError::Api(io::Error::last_os_error()));
        }
        if api.features & UFFD_FEATURE_MISSING_SHMEM == 0 || api.ioctls & UFFDIO_REGISTER_BIT == 0 {
            return Err(UserfaultfdError::Unsupported {
                features: api.features,
                ioctls: api.ioctls,
            });
        }
        Ok(())
    }

    /// Register `len` bytes at `addr` (a mapping of this process) so that
    /// touching a page missing from the backing file blocks the toucher
    /// and queues a fault event on this fd. `len` is rounded up to whole
    /// pages, as the mapping itself is.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UserfaultfdError> {
        let len = page_round_up(len);
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct
        // uffdio_register`, which `reg` is; the kernel validates the range
        // against this process's mappings and fails on anything else.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, nr::UFFDIO_REGISTER(), &mut reg) };
        if ret < 0 {
            return Err(UserfaultfdError::Register {
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Unregister `len` bytes at `addr` and wake every thread blocked on
    /// a fault in the range, which then faults the page in from the
    /// backing file as usual.
    ///
    /// The kernel wakes blocked faulters itself while it unregisters, but
    /// a fault taken under the per-VMA lock can queue its waiter just
    /// after that wake and then sleep on a range nobody serves any more
    /// (found by the `vhost_user_session` fuzz target: a worker stayed in
    /// `handle_userfault` on an unregistered mapping for good). The
    /// explicit `UFFDIO_WAKE` afterwards reaches such a waiter: the
    /// unregistration has by then waited for the faulting thread to
    /// release the mapping, so its waiter is queued.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UserfaultfdError> {
        let len = page_round_up(len);
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which
        // `range` is; the kernel validates the range.
        let ret = unsafe { ioctl_with_ref(&self.fd, nr::UFFDIO_UNREGISTER(), &range) };
        let unregistered = if ret < 0 {
            Err(UserfaultfdError::Unregister {
                addr,
                len,
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        };
        // Also after a failed unregistration (the mapping went away with
        // a waiter on it): a wake is harmless where nobody waits.
        self.wake(addr, len);
        unregistered
    }

    /// Wake threads blocked on faults in `len` bytes at `addr`.
    fn wake(&self, addr: u64, len: u64) {
        let range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`, which
        // `range` is; the kernel only checks it against the address space
        // size and wakes this userfaultfd's waiters in it.
        let ret = unsafe { ioctl_with_ref(&self.fd, nr::UFFDIO_WAKE(), &range) };
        if ret < 0 {
            log::debug!(
                "userfaultfd: cannot wake {len:#x} bytes at {addr:#x}: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// A second fd for the same userfaultfd, to hand to the frontend.
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn page_round_up(len: u64) -> u64 {
    len.checked_next_multiple_of(PAGE_SIZE).unwrap_or(len)
}

/// Whether this process can use userfaultfd for shared memory; probed once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match Userfaultfd::new() {
        Ok(_) => true,
        Err(e) => {
            log::info!("postcopy (PAGEFAULT) not offered: {e}");
            false
        }
    })
}
