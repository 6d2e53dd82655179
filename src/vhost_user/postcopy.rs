// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Postcopy live migration on the backend side
//! (`VHOST_USER_PROTOCOL_F_PAGEFAULT`): the state a session walks through
//! and the userfaultfd registrations it holds.
//!
//! ```text
//!  Inactive ──ADVISE──► Advised ──LISTEN──► Listening ──END──► Ended
//!     ▲                (uffd made,         (every mapping       (uffd
//!     └──── ADVISE ◄── sent to frontend)    registered)          closed)
//! ```
//!
//! While listening, a new memory table is mapped and registered but not
//! used: its mapping addresses go back to the frontend, which acks once it
//! can resolve faults on them. Only then does the device see the memory
//! ([`PendingMemory`]).

use std::os::fd::OwnedFd;

use log::{debug, info, warn};

use super::memory_table::MappedRegion;
use super::userfaultfd::{Userfaultfd, UserfaultfdError};

/// Why a postcopy request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The frontend did not negotiate `VHOST_USER_PROTOCOL_F_PAGEFAULT`.
    #[error("PAGEFAULT protocol feature not negotiated")]
    NotNegotiated,
    /// The request does not fit the current state.
    #[error("{request} while postcopy is {state}")]
    WrongState {
        /// The request.
        request: &'static str,
        /// The state it came in.
        state: &'static str,
    },
    /// userfaultfd is not available or failed.
    #[error(transparent)]
    Userfaultfd(#[from] UserfaultfdError),
    /// The userfaultfd could not be duplicated for the frontend.
    #[error("cannot duplicate the userfaultfd")]
    Dup(#[source] std::io::Error),
}

/// A memory change mapped and registered while listening, waiting for the
/// frontend's acknowledgement before the device may touch it.
#[derive(Debug)]
pub enum PendingMemory {
    /// A whole new table (`SET_MEM_TABLE`).
    Replace(Vec<MappedRegion>),
    /// Regions to add (`ADD_MEM_REG`), in order.
    Add(Vec<MappedRegion>),
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Inactive,
    Advised(Userfaultfd),
    Listening(Userfaultfd),
    Ended,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Inactive => "inactive",
            State::Advised(_) => "advised",
            State::Listening(_) => "listening",
            State::Ended => "ended",
        }
    }
}

/// The postcopy state of one session.
#[derive(Debug, Default)]
pub struct Postcopy {
    state: State,
    /// Ranges (address, length) registered with the userfaultfd.
    registered: Vec<(u64, u64)>,
    pending: Option<PendingMemory>,
}

impl Postcopy {
    /// `POSTCOPY_ADVISE`: open a userfaultfd and return the fd to send to
    /// the frontend. Refused while a postcopy migration is under way.
    pub fn advise(&mut self) -> Result<OwnedFd, PostcopyError> {
        if !matches!(self.state, State::Inactive | State::Ended) {
            return Err(self.wrong("POSTCOPY_ADVISE"));
        }
        let uffd = Userfaultfd::new()?;
        let copy = uffd.try_clone().map_err(PostcopyError::Dup)?;
        self.state = State::Advised(uffd);
        info!("postcopy advised: userfaultfd sent to the frontend");
        Ok(copy)
    }

    /// `POSTCOPY_LISTEN`: register every region already mapped
    /// (`(address, length)` in this process), so pages not yet received
    /// fault instead of reading as zero.
    pub fn listen(&mut self, mapped: &[(u64, u64)]) -> Result<(), PostcopyError> {
        if !matches!(self.state, State::Advised(_)) {
            return Err(self.wrong("POSTCOPY_LISTEN"));
        }
        let State::Advised(uffd) = std::mem::take(&mut self.state) else {
            return Err(self.wrong("POSTCOPY_LISTEN"));
        };
        for &(addr, len) in mapped {
            if let Err(e) = uffd.register_missing(addr, len) {
                self.unregister_all(&uffd);
                self.state = State::Advised(uffd);
                return Err(e.into());
            }
            self.registered.push((addr, len));
        }
        self.state = State::Listening(uffd);
        info!("postcopy listening ({} region(s) registered)", mapped.len());
        Ok(())
    }

    /// `POSTCOPY_END`: unregister everything and close the userfaultfd.
    pub fn end(&mut self) -> Result<(), PostcopyError> {
        if !self.is_listening() {
            return Err(self.wrong("POSTCOPY_END"));
        }
        self.close();
        self.state = State::Ended;
        info!("postcopy ended: userfaultfd closed");
        Ok(())
    }

    /// Whether `POSTCOPY_LISTEN` was received and `POSTCOPY_END` not yet.
    pub fn is_listening(&self) -> bool {
        matches!(self.state, State::Listening(_))
    }

    /// Register a fresh mapping (listening only).
    pub fn register(&mut self, region: &MappedRegion) -> Result<(), PostcopyError> {
        let State::Listening(uffd) = &self.state else {
            return Err(self.wrong("memory registration"));
        };
        let range = (region.host_addr(), region.size);
        uffd.register_missing(range.0, range.1)?;
        info!(
            "postcopy: region gpa {:#x} ({:#x} bytes) registered at {:#x}",
            region.gpa, region.size, range.0
        );
        self.registered.push(range);
        Ok(())
    }

    /// Park a memory change until the frontend acks it. A change still
    /// waiting is dropped (the frontend sent a newer one instead).
    pub fn set_pending(&mut self, change: PendingMemory) {
        if self.pending.replace(change).is_some() {
            warn!("postcopy: a memory change was never acknowledged; replaced");
        }
    }

    /// Park regions to add, after any already waiting.
    pub fn add_pending(&mut self, region: MappedRegion) {
        match &mut self.pending {
            Some(PendingMemory::Add(list)) => list.push(region),
            _ => self.set_pending(PendingMemory::Add(vec![region])),
        }
    }

    /// The sizes of regions parked to be added (they count against the
    /// session's memory limit before they are installed).
    pub fn pending_sizes(&self) -> impl Iterator<Item = u64> + '_ {
        let list = match &self.pending {
            Some(PendingMemory::Add(list)) => list.as_slice(),
            _ => &[],
        };
        list.iter().map(|r| r.size)
    }

    /// The memory change the frontend just acknowledged.
    pub fn take_pending(&mut self) -> Option<PendingMemory> {
        self.pending.take()
    }

    /// Session end: unregister everything (waking any thread blocked on a
    /// fault, so the device can stop) and close the userfaultfd.
    pub fn shutdown(&mut self) {
        self.close();
        self.state = State::Inactive;
    }

    fn close(&mut self) {
        self.pending = None;
        match std::mem::take(&mut self.state) {
            State::Advised(uffd) | State::Listening(uffd) => self.unregister_all(&uffd),
            other => self.state = other,
        }
    }

    fn unregister_all(&mut self, uffd: &Userfaultfd) {
        for (addr, len) in self.registered.drain(..) {
            // A region unmapped since took its registration with it.
            if let Err(e) = uffd.unregister(addr, len) {
                debug!("postcopy: {e}");
            }
        }
    }

    fn wrong(&self, request: &'static str) -> PostcopyError {
        PostcopyError::WrongState {
            request,
            state: self.state.name(),
        }
    }
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        self.close();
    }
}
