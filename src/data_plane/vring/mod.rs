// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Vring access for device code.
//!
//! [`Vring`] is one live virtqueue: a `virtio-queue` [`Queue`], the guest
//! memory it lives in, and the call/err notifiers. Device code reaches it
//! through the [`VringT`] trait, which hands out exclusive access with
//! [`VringT::lock`]. Three implementations pick the sharing model:
//!
//! - [`VringOwned`]: owned by one worker thread, no lock at all (a `RefCell`
//!   borrow flag). The default for the hot path.
//! - [`VringMutex`] and [`VringRwLock`]: shareable between threads, for devices
//!   that complete requests on threads of their own.
//!
//! A vring's plain, serializable state is [`VringState`]; it is untrusted and
//! becomes a live queue only through validation.

mod access;
mod batch;
mod mapped;
mod notifier;
mod resubmit;
mod source;
mod state;

pub use access::{VringMutex, VringOwned, VringRwLock, VringT};
pub use mapped::DescIter;
use mapped::*;
pub use notifier::{Notifier, NotifierSlot, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};
use resubmit::*;
use source::queue_error;
pub use state::VringState;

use std::cell::{Cell, RefCell, RefMut};
use std::num::Wrapping;
use std::ops::DerefMut;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryRegion, VolatileArrayRef, VolatileMemory, VolatileRef,
};
use vmm_sys_util::eventfd::EventFd;

use crate::inflight::InflightQueue;
use crate::memory::{DirtyLogBitmap, GuestMemoryHandle, GuestMemoryLog, GuestRegionLog};

/// A descriptor chain popped from a [`Vring`].
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryLog>>;

/// Errors from vring operations.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// The queue rejected an operation (bad index, bad ring contents, ...).
    #[error("virtqueue {index}: {source}")]
    Queue {
        /// Queue index.
        index: u16,
        /// What `virtio-queue` reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// Writing the call or err eventfd failed.
    #[error("virtqueue {index}: cannot signal the frontend")]
    Signal {
        /// Queue index.
        index: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device could not complete chain `head` honestly and stopped
    /// the queue (see [`Completion::NeedsReset`]).
    #[error("virtqueue {index}: chain {head} cannot be completed; the device needs a reset")]
    NeedsReset {
        /// Queue index.
        index: u16,
        /// The chain's head descriptor.
        head: u16,
    },
    /// A saved state cannot be applied to a queue.
    #[error("invalid vring state: {0}")]
    InvalidState(&'static str),
    /// The private ring used to resubmit in-flight requests could not be
    /// set up.
    #[error("virtqueue {index}: cannot prepare resubmission: {reason}")]
    Resubmit {
        /// Queue index.
        index: u16,
        /// Why.
        reason: String,
    },
}

/// One live virtqueue with its memory and notifiers.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    queue: Queue,
    mem: GuestMemoryHandle,
    call: NotifierSlot,
    err: NotifierSlot,
    enabled: bool,
    signalled_used: Option<u16>,
    /// `next_used` when [`Vring::needs_notification`] last ran (or when the
    /// queue was set up): the event_idx window starts here. `virtio-queue`
    /// keeps the same thing as a count of `add_used` calls, which the
    /// batch path (writing the used ring itself) does not go through.
    notified_used: Wrapping<u16>,
    inflight: Option<InflightQueue>,
    resubmit: Option<Resubmit>,
    /// The device stopped with work left and wants to run again (see
    /// [`Vring::defer`]).
    deferred: bool,
    /// The device met a chain it cannot complete honestly (see
    /// [`Completion::NeedsReset`]); nothing more is taken from this ring.
    needs_reset: bool,
}

/// What a device did with one chain, as returned by the closures of
/// [`Vring::process_available`] and [`Vring::process_available_descs`].
///
/// A plain `u32` converts into [`Completion::Used`], so a closure that
/// returns the used length needs no change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Put the chain on the used ring with this many bytes written.
    Used(u32),
    /// The chain cannot be completed without lying to the driver (for
    /// example a block request whose status byte is outside guest memory:
    /// a used entry would make the driver read a status nobody wrote). The
    /// chain stays off the used ring (and in flight), the batch ends with
    /// [`VringError::NeedsReset`], and the ring hands out no more chains
    /// until it is set up again. The worker then signals the queue's err
    /// notifier: an in-process transport sets DEVICE_NEEDS_RESET, a
    /// vhost-user frontend sees the vring's err fd.
    NeedsReset,
}

impl From<u32> for Completion {
    fn from(len: u32) -> Self {
        Completion::Used(len)
    }
}

impl Vring {
    /// Build a live vring from validated state.
    pub fn new(
        index: u16,
        max_size: u16,
        state: &VringState,
        mem: GuestMemoryHandle,
        call: NotifierSlot,
        err: NotifierSlot,
    ) -> Result<Self, VringError> {
        state.validate(max_size)?;
        let mut queue = Queue::new(max_size).map_err(queue_error(index))?;
        queue.set_size(state.size);
        queue.set_desc_table_address(
            Some(state.desc_table as u32),
            Some((state.desc_table >> 32) as u32),
        );
        queue.set_avail_ring_address(
            Some(state.avail_ring as u32),
            Some((state.avail_ring >> 32) as u32),
        );
        queue.set_used_ring_address(
            Some(state.used_ring as u32),
            Some((state.used_ring >> 32) as u32),
        );
        queue.set_next_avail(state.next_avail);
        queue.set_next_used(state.next_used);
        queue.set_event_idx(state.event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&*mem.memory()) {
            return Err(VringError::InvalidState(
                "rings outside guest memory or misaligned",
            ));
        }
        Ok(Vring {
            index,
            queue,
            mem,
            call,
            err,
            enabled: state.enabled,
            signalled_used: state.signalled_used,
            notified_used: Wrapping(state.next_used),
            inflight: None,
            resubmit: None,
            deferred: false,
            needs_reset: false,
        })
    }

    /// Hand out the chains at `heads` again (oldest first) before new ones:
    /// requests that were in flight when a snapshot was taken.
    pub fn resubmit_heads(&mut self, heads: &[u16]) -> Result<(), VringError> {
        if heads.is_empty() {
            return Ok(());
        }
        let size = self.queue.size();
        if heads.iter().any(|h| *h >= size) || heads.len() > usize::from(size) {
            return Err(VringError::InvalidState("in-flight head beyond the queue"));
        }
        self.resubmit = Some(Resubmit::new(
            self.index,
            &self.queue,
            &self.mem.memory(),
            heads,
        )?);
        Ok(())
    }

    /// Track in-flight requests in `inflight`, first recovering what a
    /// previous backend left there: heads still in flight are handed out
    /// again by [`Vring::pop_chain`] (oldest first) and the ring resumes
    /// after the last chain that process popped.
    pub fn attach_inflight(&mut self, mut inflight: InflightQueue) -> Result<usize, VringError> {
        let index = self.index;
        let used_idx = self
            .queue
            .used_idx(&*self.mem.memory(), Ordering::Acquire)
            .map_err(queue_error(index))?
            .0;
        let recovered = inflight.recover(used_idx);
        let count = recovered.resubmit.len();
        // The area comes from the frontend and may be sized for a larger
        // ring than this one: a head this ring cannot have is corruption.
        let size = self.queue.size();
        if recovered.resubmit.iter().any(|h| *h >= size) || count > usize::from(size) {
            return Err(VringError::InvalidState("in-flight head beyond the queue"));
        }
        // Keep the entries added since the last notification check pending.
        let added = Wrapping(self.queue.next_used()) - self.notified_used;
        self.notified_used = Wrapping(used_idx) - added;
        self.queue.set_next_used(used_idx);
        self.queue
            .set_next_avail(used_idx.wrapping_add(count as u16));
        if count > 0 {
            self.resubmit = Some(Resubmit::new(
                index,
                &self.queue,
                &self.mem.memory(),
                &recovered.resubmit,
            )?);
        }
        self.inflight = Some(inflight);
        Ok(count)
    }

    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Whether the queue is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Enable or disable processing.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// The guest memory this vring lives in.
    pub fn memory(&self) -> GuestMemoryLoadGuard<GuestMemoryLog> {
        self.mem.memory()
    }

    /// Direct access to the `virtio-queue` queue.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }
    /// Stop taking chains from this ring because the device cannot complete
    /// chain `head` (see [`Completion::NeedsReset`]); for devices that use
    /// [`Vring::pop_chain`]. The worker signals the err notifier when the
    /// device's event handler returns the error this gives.
    pub fn mark_needs_reset(&mut self, head: u16) -> VringError {
        self.stop_for_reset(head)
    }

    /// Whether the device stopped this ring for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn stop_for_reset(&mut self, head: u16) -> VringError {
        self.needs_reset = true;
        VringError::NeedsReset {
            index: self.index,
            head,
        }
    }

    /// Put chain `head` on the used ring with `len` bytes written.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), VringError> {
        let index = self.index;
        if let Some(inflight) = &self.inflight {
            inflight.pre_complete(head);
        }
        self.queue
            .add_used(&*self.mem.memory(), head, len)
            .map_err(queue_error(index))?;
        if let Some(inflight) = &self.inflight {
            inflight.post_complete(head, self.queue.next_used());
        }
        Ok(())
    }

    /// Whether the driver wants an interrupt now (event_idx aware).
    ///
    /// `virtio-queue`'s rule (the Linux kernel's `vring_need_event`): with
    /// event_idx, notify when the driver's `used_event` lies among the
    /// entries added since the previous check.
    pub fn needs_notification(&mut self) -> Result<bool, VringError> {
        let index = self.index;
        let used_idx = Wrapping(self.queue.next_used());
        // Complete all the used-ring writes before reading the event.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.queue.event_idx_enabled() {
            return Ok(true);
        }
        let addr = GuestAddress(self.queue.avail_ring())
            .checked_add(4 + 2 * u64::from(self.queue.size()))
            .ok_or(VringError::Queue {
                index,
                source: virtio_queue::Error::AddressOverflow,
            })?;
        let used_event = self
            .mem
            .memory()
            .load::<u16>(addr, Ordering::Relaxed)
            .map(|v| Wrapping(u16::from_le(v)))
            .map_err(|e| VringError::Queue {
                index,
                source: virtio_queue::Error::GuestMemory(e),
            })?;
        let old = std::mem::replace(&mut self.notified_used, used_idx);
        Ok(used_idx - used_event - Wrapping(1) < used_idx - old)
    }

    /// Re-enable guest notifications (kicks); returns true if more buffers
    /// arrived meanwhile and the caller should keep processing.
    ///
    /// A ring stopped for a reset has nothing more to give: always false.
    pub fn enable_notification(&mut self) -> Result<bool, VringError> {
        if self.needs_reset {
            return Ok(false);
        }
        let index = self.index;
        self.queue
            .enable_notification(&*self.mem.memory())
            .map_err(queue_error(index))
    }

    /// Ask the driver not to kick while we are polling.
    pub fn disable_notification(&mut self) -> Result<(), VringError> {
        let index = self.index;
        self.queue
            .disable_notification(&*self.mem.memory())
            .map_err(queue_error(index))
    }

    /// Signal the call eventfd unconditionally.
    pub fn signal_used_queue(&mut self) -> Result<(), VringError> {
        self.signalled_used = Some(self.queue.next_used());
        if let Some(call) = self.call.load().as_ref() {
            call.notify().map_err(|source| VringError::Signal {
                index: self.index,
                source,
            })?;
        }
        Ok(())
    }

    /// Signal the call eventfd if event_idx (or its absence) says the driver
    /// wants it. Returns whether a signal was sent.
    pub fn notify_if_needed(&mut self) -> Result<bool, VringError> {
        if self.needs_notification()? {
            self.signal_used_queue()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Tell the frontend this queue hit an unrecoverable error.
    pub fn signal_error(&self) {
        if let Some(err) = self.err.load().as_ref() {
            let _ = err.notify();
        }
    }

    /// Export the full state of the vring.
    pub fn state(&self) -> VringState {
        VringState {
            size: self.queue.size(),
            ready: self.queue.ready(),
            enabled: self.enabled,
            desc_table: self.queue.desc_table(),
            avail_ring: self.queue.avail_ring(),
            used_ring: self.queue.used_ring(),
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
            event_idx: self.queue.event_idx_enabled(),
            signalled_used: self.signalled_used,
        }
    }

    /// The next used-ring index the device will write (what it completed
    /// so far, modulo 2^16).
    pub fn next_used(&self) -> u16 {
        self.queue.next_used()
    }

    /// Most chains one call of [`Vring::process_available`] or
    /// [`Vring::process_available_descs`] takes: the queue size, all a
    /// well-behaved driver can have outstanding. A driver that keeps
    /// republishing buffers cannot keep a worker in one call: when a call
    /// returns this many, more may be waiting, and the device should
    /// [`Vring::defer`] rather than loop, so that the worker serves its
    /// other queues and the control path (a stop, a reset) in between.
    pub fn batch_limit(&self) -> usize {
        usize::from(self.queue.size()).max(1)
    }

    /// Ask the worker to run this queue's event again soon, after the other
    /// events and commands already pending: for a device that stopped a
    /// batch with work left (see [`Vring::batch_limit`]).
    pub fn defer(&mut self) {
        self.deferred = true;
    }

    /// Whether [`Vring::defer`] was called since the last check.
    pub(crate) fn take_deferred(&mut self) -> bool {
        std::mem::take(&mut self.deferred)
    }

    /// Number of chains the driver has made available that we have not
    /// popped yet.
    pub fn pending(&self) -> Result<u16, VringError> {
        let index = self.index;
        let avail = self
            .queue
            .avail_idx(&*self.mem.memory(), Ordering::Acquire)
            .map_err(queue_error(index))?;
        Ok((avail - Wrapping(self.queue.next_avail())).0)
    }
}

#[cfg(test)]
mod tests;
