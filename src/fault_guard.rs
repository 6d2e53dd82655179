// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Surviving memory a peer shrinks under a live mapping.
//!
//! Guest memory regions, the dirty log and the in-flight area are files
//! the frontend gave us, size-checked when they were mapped. A frontend can
//! truncate such a file afterwards; the next access to a page past the new
//! end raises SIGBUS, which kills the process by default.
//!
//! The design: every such mapping is registered here while it lives. A
//! SIGBUS handler (installed once, chaining to whatever handler was there
//! before, for example Rust's stack-overflow reporter) looks the faulting
//! address up; inside a registered mapping it maps an anonymous zero page
//! over the faulting page (`MAP_FIXED`), marks the mapping broken and
//! returns, so the access completes (reading zeroes, or writing into memory
//! nobody else sees) instead of killing the process. It then shuts down the
//! socket of the session the mapping belongs to (registered with
//! [`set_session_socket`]): the session ends as if the frontend had hung up,
//! its rings stop and its mappings go, and the daemon serves the next
//! frontend. Requests the workers were processing at the fault completed
//! with whatever the zero page held; the frontend that truncated its own
//! memory cannot trust them, and no other frontend's data is touched.
//!
//! Everything the handler does is async-signal-safe: atomics, `mmap`,
//! `shutdown`, `write`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings that can be guarded at once (memory slots, dirty log, in-flight
/// areas of a few sessions).
const SLOTS: usize = 2048;
const PAGE: usize = 4096;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    broken: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    broken: AtomicBool::new(false),
};

static SLOTS_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Faults handled since start (for logs and tests).
static FAULTS: AtomicUsize = AtomicUsize::new(0);
/// The socket of the session being served, shut down on a fault (-1: none).
static SESSION_SOCKET: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();
/// The handler that was installed before ours (a `sigaction`, read only
/// after `INSTALL` completed).
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registered mapping; dropping it unregisters (do so before unmapping).
#[derive(Debug)]
pub(crate) struct FaultGuard {
    slot: Option<usize>,
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let s = &SLOTS_TABLE[i];
            s.broken.store(false, Ordering::Release);
            s.len.store(0, Ordering::Release);
            s.start.store(0, Ordering::Release);
        }
    }
}

/// Guard `len` bytes at `start`. When the table is full the mapping is
/// simply not guarded (logged): a fault in it kills the process as before.
pub(crate) fn guard(start: *const u8, len: usize) -> FaultGuard {
    install();
    let start = start as usize;
    for (i, s) in SLOTS_TABLE.iter().enumerate() {
        if s.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.broken.store(false, Ordering::Release);
            s.len.store(len, Ordering::Release);
            return FaultGuard { slot: Some(i) };
        }
    }
    log::warn!("fault guard table full: a mapping of {len} bytes is not guarded");
    FaultGuard { slot: None }
}

/// The socket of the session now being served (`None` when it ends): a
/// fault in a guarded mapping shuts it down.
pub fn set_session_socket(fd: Option<std::os::fd::RawFd>) {
    SESSION_SOCKET.store(fd.unwrap_or(-1), Ordering::Release);
}

/// How many faults were survived since the process started.
pub fn faults_survived() -> usize {
    FAULTS.load(Ordering::Acquire)
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we fill in the handler and
        // flags, and sigaction() copies it. PREVIOUS is written here, inside
        // call_once, before any handler of ours can run.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) == 0 {
                PREVIOUS = Some(old);
            } else {
                log::warn!(
                    "cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in SLOTS_TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= start.saturating_add(len) {
            continue;
        }
        let page = addr & !(PAGE - 1);
        // SAFETY: the page lies inside a mapping this process made and
        // still holds (it is registered); replacing it with a private zero
        // page changes only what that mapping shows from now on.
        let p = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break;
        }
        s.broken.store(true, Ordering::Release);
        FAULTS.fetch_add(1, Ordering::AcqRel);
        let sock = SESSION_SOCKET.load(Ordering::Acquire);
        if sock >= 0 {
            // SAFETY: shutdown(2) is async-signal-safe; a stale fd number
            // at worst shuts down nothing or fails.
            unsafe { libc::shutdown(sock, libc::SHUT_RDWR) };
        }
        const MSG: &[u8] =
            b"vbk: SIGBUS in peer memory (file shrunk); page replaced, session ended\n";
        // SAFETY: write(2) to stderr is async-signal-safe.
        unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        return;
    }
    // Not ours: hand over to the handler that was there, or die as usual.
    // SAFETY: PREVIOUS was set before our handler was installed and is
    // never written again.
    let previous = unsafe { *std::ptr::addr_of!(PREVIOUS) };
    match previous {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a handler installed with SA_SIGINFO has this type.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: restoring the default action and returning makes the
            // faulting access fault again, now fatally, as without us.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}
