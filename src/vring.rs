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

/// The plain, serializable state of one vring.
///
/// It may come from a peer or a snapshot file: treat it as untrusted.
/// [`VringState::validate`] checks it before it touches a live queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    /// Negotiated queue size (number of descriptors).
    pub size: u16,
    /// Whether the driver marked the queue ready (in-process transports).
    #[serde(default)]
    pub ready: bool,
    /// Whether the queue is enabled for processing.
    #[serde(default)]
    pub enabled: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// Index of the next available-ring entry the device will read.
    pub next_avail: u16,
    /// Index of the next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in effect.
    #[serde(default)]
    pub event_idx: bool,
    /// Used index at the last interrupt sent, if any.
    #[serde(default)]
    pub signalled_used: Option<u16>,
}

impl VringState {
    /// Check the parts of the state that do not depend on guest memory.
    pub fn validate(&self, max_size: u16) -> Result<(), VringError> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max_size {
            return Err(VringError::InvalidState("queue size"));
        }
        if !self.desc_table.is_multiple_of(16) {
            return Err(VringError::InvalidState("descriptor table alignment"));
        }
        if !self.avail_ring.is_multiple_of(2) {
            return Err(VringError::InvalidState("available ring alignment"));
        }
        if !self.used_ring.is_multiple_of(4) {
            return Err(VringError::InvalidState("used ring alignment"));
        }
        Ok(())
    }
}

/// Interrupt-status bit for "used buffer" (virtio-mmio `InterruptStatus`).
pub const INTERRUPT_USED_BUFFER: u32 = 0x1;
/// Interrupt-status bit for "configuration change".
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// Where a notification goes: an eventfd (a vhost-user call or err fd, or
/// a KVM irqfd) and, for transports with an interrupt status register, the
/// status word whose bit is set before the eventfd fires.
#[derive(Debug)]
pub struct Notifier {
    fd: EventFd,
    /// Status words and the bit set in each before `fd` fires.
    status: Vec<(Arc<std::sync::atomic::AtomicU32>, u32)>,
    trace: Option<Arc<crate::mmio::InterruptTrace>>,
}

impl Notifier {
    /// A plain eventfd notifier.
    pub fn new(fd: EventFd) -> Self {
        Notifier {
            fd,
            status: Vec::new(),
            trace: None,
        }
    }

    /// A notifier that sets `bit` in `status` before signalling `fd`.
    pub fn with_status(fd: EventFd, status: Arc<std::sync::atomic::AtomicU32>, bit: u32) -> Self {
        Notifier {
            fd,
            status: vec![(status, bit)],
            trace: None,
        }
    }

    /// The same notifier, also setting `bit` in `status` before signalling
    /// (e.g. DEVICE_NEEDS_RESET in a device status word beside the
    /// config-change bit in InterruptStatus).
    pub fn and_status(mut self, status: Arc<std::sync::atomic::AtomicU32>, bit: u32) -> Self {
        self.status.push((status, bit));
        self
    }

    /// The same notifier, counting what it raises in `trace`.
    pub fn traced(mut self, trace: Arc<crate::mmio::InterruptTrace>) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// Raise the notification.
    pub fn notify(&self) -> std::io::Result<()> {
        for (status, bit) in &self.status {
            status.fetch_or(*bit, Ordering::SeqCst);
        }
        if let Some(trace) = &self.trace {
            trace.raising();
        }
        let result = match self.fd.write(1) {
            // A non-blocking fd that cannot take more: an eventfd whose
            // counter is saturated (the peer has a notification pending
            // already) or a pipe nobody reads. Dropping this one loses
            // nothing the peer could still read, and never blocks.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        };
        if let (Err(_), Some(trace)) = (&result, &self.trace) {
            trace.failed();
        }
        result
    }
}

/// A shared, swappable notifier slot (call or err).
pub type NotifierSlot = Arc<ArcSwapOption<Notifier>>;

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

/// Chains to hand out again after a restart: a private available ring (in a
/// memory region appended above guest RAM) listing the in-flight heads in
/// their original order, walked through the guest's descriptor table.
#[derive(Debug)]
struct Resubmit {
    queue: Queue,
    mem: GuestMemoryHandle,
}

impl Resubmit {
    fn new(
        index: u16,
        real: &Queue,
        guest: &GuestMemoryLog,
        heads: &[u16],
    ) -> Result<Self, VringError> {
        use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
        let fail = |reason: String| VringError::Resubmit { index, reason };
        let size = u64::from(real.size());
        let avail_len = (6 + 2 * size).div_ceil(4096) * 4096;
        let used_len = (6 + 8 * size).div_ceil(4096) * 4096;
        let base = guest
            .last_addr()
            .0
            .checked_add(4096)
            .map(|a| a & !4095)
            .ok_or_else(|| fail("no address space left above guest RAM".into()))?;
        let map = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            (avail_len + used_len) as usize,
            DirtyLogBitmap::default(),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .map_err(|e| fail(e.to_string()))?;
        let region = GuestRegionLog::new(map, GuestAddress(base))
            .ok_or_else(|| fail("private region rejected".into()))?;
        let mem = guest
            .insert_region(Arc::new(region))
            .map_err(|e| fail(e.to_string()))?;
        for (i, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(base + 4 + 2 * i as u64))
                .map_err(|e| fail(e.to_string()))?;
        }
        mem.write_obj(heads.len() as u16, GuestAddress(base + 2))
            .map_err(|e| fail(e.to_string()))?;
        let mut queue =
            Queue::new(real.max_size()).map_err(|source| VringError::Queue { index, source })?;
        queue.set_size(real.size());
        let desc = real.desc_table();
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(base as u32), Some((base >> 32) as u32));
        let used = GuestAddress(base).unchecked_add(avail_len).0;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        Ok(Resubmit {
            queue,
            mem: GuestMemoryHandle::new(mem),
        })
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
        let mut queue =
            Queue::new(max_size).map_err(|source| VringError::Queue { index, source })?;
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
            .map_err(|source| VringError::Queue { index, source })?
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

    /// Pop the next available descriptor chain, if any.
    ///
    /// An available index that runs more than a queue size ahead is a
    /// driver error reported as `Err`; the queue is then broken until reset.
    pub fn pop_chain(&mut self) -> Result<Option<Chain>, VringError> {
        let index = self.index;
        if self.needs_reset {
            return Ok(None);
        }
        if let Some(resubmit) = &mut self.resubmit {
            let mem = resubmit.mem.memory();
            let next = resubmit
                .queue
                .iter(mem)
                .map_err(|source| VringError::Queue { index, source })?
                .next();
            match next {
                Some(chain) => {
                    if let Some(inflight) = &mut self.inflight {
                        inflight.begin(chain.head_index());
                    }
                    return Ok(Some(chain));
                }
                None => self.resubmit = None,
            }
        }
        let mem = self.mem.memory();
        let chain = self
            .queue
            .iter(mem)
            .map_err(|source| VringError::Queue { index, source })?
            .next();
        if let (Some(inflight), Some(chain)) = (&mut self.inflight, &chain) {
            inflight.begin(chain.head_index());
        }
        Ok(chain)
    }

    /// Process every available chain with `f`, which returns the used
    /// length of each; the chains are put on the used ring as they complete.
    /// Returns how many were processed.
    ///
    /// The batch form of [`Vring::pop_chain`] + [`Vring::add_used`]: guest
    /// memory is loaded once per batch and chains borrow it, so the hot
    /// path touches no reference count per request. In-flight tracking and
    /// resubmission after a restart apply as with `pop_chain`.
    ///
    /// `f` returns the used length (or any [`Completion`]); a
    /// [`Completion::NeedsReset`] ends the batch with
    /// [`VringError::NeedsReset`].
    pub fn process_available<F, R>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: FnMut(DescriptorChain<&GuestMemoryLog>) -> R,
        R: Into<Completion>,
    {
        self.drain_available(|chain, _| f(chain).into())
    }

    /// [`Vring::process_available`], handing `f` a [`DescIter`] instead of
    /// a `virtio-queue` chain: the same descriptors under the same rules
    /// (loop limit, indirect tables, 4 GiB cap), but the descriptor table is
    /// mapped once per batch, so reading a descriptor costs a bounds check
    /// and a load instead of a guest-memory lookup. The available and used
    /// rings are mapped once per batch too (when each lies inside one memory
    /// region; otherwise, and while resubmitting, `virtio-queue` reads and
    /// writes them).
    pub fn process_available_descs<F, R>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: FnMut(DescIter<'_>) -> R,
        R: Into<Completion>,
    {
        if self.needs_reset {
            return Ok(0);
        }
        let guard = self.mem.memory();
        let mem: &GuestMemoryLog = &guard;
        let rings = match RingMap::new(mem, &self.queue) {
            Some(rings) if self.resubmit.is_none() => rings,
            _ => {
                return self
                    .drain_available(|chain, table| f(table.chain(chain.head_index())).into())
            }
        };
        let index = self.index;
        let qerr = |source| VringError::Queue { index, source };
        if !self.queue.ready() || self.queue.avail_ring() == 0 {
            return Err(qerr(virtio_queue::Error::QueueNotReady));
        }
        let table = DescTable::new(mem, &self.queue);
        let mut next_avail = Wrapping(self.queue.next_avail());
        let mut next_used = Wrapping(self.queue.next_used());
        let mut avail_idx = rings.avail_idx(next_avail).map_err(qerr)?;
        let limit = self.batch_limit();
        let mut done = 0;
        while done < limit {
            if next_avail == avail_idx {
                avail_idx = rings.avail_idx(next_avail).map_err(qerr)?;
                if next_avail == avail_idx {
                    break;
                }
            }
            let head = rings.avail_head(next_avail);
            next_avail += Wrapping(1);
            self.queue.set_next_avail(next_avail.0);
            if let Some(inflight) = &mut self.inflight {
                inflight.begin(head);
            }
            let Completion::Used(len) = f(table.chain(head)).into() else {
                return Err(self.stop_for_reset(head));
            };
            if let Some(inflight) = &mut self.inflight {
                inflight.pre_complete(head);
            }
            rings.push_used(next_used, head, len).map_err(qerr)?;
            next_used += Wrapping(1);
            self.queue.set_next_used(next_used.0);
            if let Some(inflight) = &mut self.inflight {
                inflight.post_complete(head, next_used.0);
            }
            done += 1;
        }
        Ok(done)
    }

    fn drain_available<F>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: for<'m> FnMut(DescriptorChain<&'m GuestMemoryLog>, &'m DescTable<'m>) -> Completion,
    {
        let index = self.index;
        let mut done = 0;
        if self.needs_reset {
            return Ok(0);
        }
        if let Some(resubmit) = self.resubmit.take() {
            let guard = resubmit.mem.memory();
            let mut queue = resubmit.queue;
            let table = DescTable::new(&guard, &queue);
            loop {
                let next = queue
                    .iter(&*guard)
                    .map_err(|source| VringError::Queue { index, source })?
                    .next();
                let Some(chain) = next else { break };
                let head = chain.head_index();
                if let Some(inflight) = &mut self.inflight {
                    inflight.begin(head);
                }
                let Completion::Used(len) = f(chain, &table) else {
                    return Err(self.stop_for_reset(head));
                };
                self.add_used(head, len)?;
                done += 1;
            }
        }
        let guard = self.mem.memory();
        let mem: &GuestMemoryLog = &guard;
        let table = DescTable::new(mem, &self.queue);
        let limit = self.batch_limit();
        while done < limit {
            let next = self
                .queue
                .iter(mem)
                .map_err(|source| VringError::Queue { index, source })?
                .next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            if let Some(inflight) = &mut self.inflight {
                inflight.begin(head);
                let Completion::Used(len) = f(chain, &table) else {
                    return Err(self.stop_for_reset(head));
                };
                inflight.pre_complete(head);
                self.queue
                    .add_used(mem, head, len)
                    .map_err(|source| VringError::Queue { index, source })?;
                inflight.post_complete(head, self.queue.next_used());
            } else {
                let Completion::Used(len) = f(chain, &table) else {
                    return Err(self.stop_for_reset(head));
                };
                self.queue
                    .add_used(mem, head, len)
                    .map_err(|source| VringError::Queue { index, source })?;
            }
            done += 1;
        }
        Ok(done)
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
            .map_err(|source| VringError::Queue { index, source })?;
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
            .map_err(|source| VringError::Queue { index, source })
    }

    /// Ask the driver not to kick while we are polling.
    pub fn disable_notification(&mut self) -> Result<(), VringError> {
        let index = self.index;
        self.queue
            .disable_notification(&*self.mem.memory())
            .map_err(|source| VringError::Queue { index, source })
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
            .map_err(|source| VringError::Queue { index, source })?;
        Ok((avail - Wrapping(self.queue.next_avail())).0)
    }
}

/// Exclusive access to a [`Vring`], whatever the sharing model.
pub trait VringT: Send + 'static {
    /// The guard [`VringT::lock`] returns.
    type Guard<'a>: DerefMut<Target = Vring>
    where
        Self: 'a;

    /// Wrap a live vring.
    fn from_vring(vring: Vring) -> Self;

    /// Get exclusive access for a batch of operations.
    fn lock(&self) -> Self::Guard<'_>;

    /// Convenience: export the state.
    fn state(&self) -> VringState {
        self.lock().state()
    }

    /// Convenience: put a chain on the used ring.
    fn add_used(&self, head: u16, len: u32) -> Result<(), VringError> {
        self.lock().add_used(head, len)
    }

    /// Convenience: signal the driver if it wants it.
    fn notify_if_needed(&self) -> Result<bool, VringError> {
        self.lock().notify_if_needed()
    }

    /// Convenience: signal the driver unconditionally.
    fn signal_used_queue(&self) -> Result<(), VringError> {
        self.lock().signal_used_queue()
    }
}

/// A vring owned by a single worker thread: no lock, only a borrow flag.
#[derive(Debug)]
pub struct VringOwned(RefCell<Vring>);

impl VringT for VringOwned {
    type Guard<'a> = RefMut<'a, Vring>;

    fn from_vring(vring: Vring) -> Self {
        VringOwned(RefCell::new(vring))
    }

    fn lock(&self) -> RefMut<'_, Vring> {
        self.0.borrow_mut()
    }
}

/// A vring shareable between threads behind a mutex.
#[derive(Clone, Debug)]
pub struct VringMutex(Arc<Mutex<Vring>>);

impl VringT for VringMutex {
    type Guard<'a> = MutexGuard<'a, Vring>;

    fn from_vring(vring: Vring) -> Self {
        VringMutex(Arc::new(Mutex::new(vring)))
    }

    fn lock(&self) -> MutexGuard<'_, Vring> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A vring shareable between threads behind a read-write lock.
#[derive(Clone, Debug)]
pub struct VringRwLock(Arc<RwLock<Vring>>);

impl VringRwLock {
    /// Shared read access, e.g. to export state while workers run.
    pub fn read_state(&self) -> VringState {
        self.0.read().unwrap_or_else(|e| e.into_inner()).state()
    }
}

impl VringT for VringRwLock {
    type Guard<'a> = RwLockWriteGuard<'a, Vring>;

    fn from_vring(vring: Vring) -> Self {
        VringRwLock(Arc::new(RwLock::new(vring)))
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Vring> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

type LogBitmapSlice<'m> = BS<'m, DirtyLogBitmap>;
type LogArray<'m, T> = VolatileArrayRef<'m, T, LogBitmapSlice<'m>>;

/// The mapping of the region holding `len` bytes at `addr`, and the offset
/// of `addr` in it; `None` unless the whole range lies inside one region.
fn map_range(
    mem: &GuestMemoryLog,
    addr: GuestAddress,
    len: usize,
) -> Option<(&MmapRegion<DirtyLogBitmap>, usize)> {
    let (region, offset) = mem.to_region_addr(addr)?;
    let offset = usize::try_from(offset.raw_value()).ok()?;
    let map: &MmapRegion<DirtyLogBitmap> = region;
    // The range check `get_array_ref` and friends repeat; done here too so
    // that a `Some` always means "inside one region".
    offset
        .checked_add(len)
        .filter(|end| *end <= map.len())
        .map(|_| (map, offset))
}

/// A descriptor table (the queue's, or an indirect one), mapped once as an
/// array of descriptors when it lies inside one memory region.
#[derive(Clone, Copy)]
struct TableMap<'m> {
    addr: GuestAddress,
    size: u16,
    array: Option<LogArray<'m, Descriptor>>,
}

impl<'m> TableMap<'m> {
    fn new(mem: &'m GuestMemoryLog, addr: GuestAddress, size: u16) -> Self {
        let n = usize::from(size);
        let array = map_range(mem, addr, n * DESC_SIZE)
            .and_then(|(map, offset)| map.get_array_ref::<Descriptor>(offset, n).ok());
        TableMap { addr, size, array }
    }

    /// Descriptor `index`; the caller has checked `index < self.size`.
    #[inline]
    fn read(&self, mem: &GuestMemoryLog, index: u16) -> Option<Descriptor> {
        match &self.array {
            // The array holds exactly `size` descriptors; `load` asserts the
            // index (never failing after the caller's check) and does one
            // volatile read.
            Some(array) => Some(array.load(usize::from(index))),
            None => {
                let addr = self
                    .addr
                    .checked_add(usize::from(index) as u64 * DESC_SIZE as u64)?;
                mem.read_obj::<Descriptor>(addr).ok()
            }
        }
    }
}

const DESC_SIZE: usize = std::mem::size_of::<Descriptor>();

/// The available and used rings of a queue for one batch, each mapped once:
/// the indexes as atomics, the entries as arrays.
struct RingMap<'m> {
    avail_idx: &'m AtomicU16,
    avail: LogArray<'m, u16>,
    used_idx: &'m AtomicU16,
    /// Used elements as (id, len) pairs of little-endian words.
    used: LogArray<'m, [u32; 2]>,
    /// The used ring's region bitmap and the offset of `used_idx` in that
    /// region, to log the index store (atomics bypass the slice bitmaps).
    used_idx_log: (&'m DirtyLogBitmap, usize),
    size: u16,
}

impl<'m> RingMap<'m> {
    /// `None` unless each ring lies inside one memory region (and is
    /// aligned for its atomic index).
    fn new(mem: &'m GuestMemoryLog, queue: &Queue) -> Option<Self> {
        let size = queue.size();
        if size == 0 {
            return None;
        }
        let n = usize::from(size);
        let (amap, aoff) = map_range(mem, GuestAddress(queue.avail_ring()), 4 + 2 * n)?;
        let (umap, uoff) = map_range(mem, GuestAddress(queue.used_ring()), 4 + 8 * n)?;
        Some(RingMap {
            avail_idx: amap.get_atomic_ref::<AtomicU16>(aoff + 2).ok()?,
            avail: amap.get_array_ref::<u16>(aoff + 4, n).ok()?,
            used_idx: umap.get_atomic_ref::<AtomicU16>(uoff + 2).ok()?,
            used: umap.get_array_ref::<[u32; 2]>(uoff + 4, n).ok()?,
            used_idx_log: (umap.bitmap(), uoff + 2),
            size,
        })
    }

    /// The driver's available index (Acquire), checked against `next_avail`
    /// as `virtio-queue` does: it may run at most a queue size ahead.
    fn avail_idx(&self, next_avail: Wrapping<u16>) -> Result<Wrapping<u16>, virtio_queue::Error> {
        let idx = Wrapping(u16::from_le(self.avail_idx.load(Ordering::Acquire)));
        if (idx - next_avail).0 > self.size {
            return Err(virtio_queue::Error::InvalidAvailRingIndex);
        }
        Ok(idx)
    }

    /// The head index in available-ring entry `next_avail`. Read after the
    /// Acquire load of the available index that covered it, as the driver
    /// wrote it before its Release store of that index.
    fn avail_head(&self, next_avail: Wrapping<u16>) -> u16 {
        u16::from_le(self.avail.load(usize::from(next_avail.0 % self.size)))
    }

    /// Write used element `next_used`, then publish it with a Release store
    /// of the used index, as `virtio-queue`'s `add_used` does. Both writes
    /// are dirty-logged.
    fn push_used(
        &self,
        next_used: Wrapping<u16>,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        if head >= self.size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = usize::from(next_used.0 % self.size);
        self.used
            .store(slot, [u32::from(head).to_le(), len.to_le()]);
        self.used_idx
            .store((next_used + Wrapping(1)).0.to_le(), Ordering::Release);
        let (bitmap, offset) = self.used_idx_log;
        bitmap.mark_dirty(offset, 2);
        Ok(())
    }
}
const DESC_ALIGN: u32 = 16;

/// The queue's descriptor table for one batch, and the memory region the
/// batch's requests last touched through [`DescIter::get_ref`].
struct DescTable<'m> {
    mem: &'m GuestMemoryLog,
    table: TableMap<'m>,
    hint: Cell<Option<&'m GuestRegionLog>>,
}

impl<'m> DescTable<'m> {
    fn new(mem: &'m GuestMemoryLog, queue: &Queue) -> Self {
        DescTable {
            mem,
            table: TableMap::new(mem, GuestAddress(queue.desc_table()), queue.size()),
            hint: Cell::new(None),
        }
    }

    fn chain(&'m self, head: u16) -> DescIter<'m> {
        DescIter {
            mem: self.mem,
            hint: &self.hint,
            head,
            table: self.table,
            next_index: head,
            ttl: self.table.size,
            is_indirect: false,
            yielded_bytes: 0,
        }
    }
}

/// The descriptors of one available chain, read through a descriptor table
/// mapped once per batch (see [`Vring::process_available_descs`]).
///
/// It yields exactly what `virtio-queue`'s `DescriptorChain` yields: it
/// stops at an index outside the table, after as many descriptors as the
/// table has (loops), at an unreadable descriptor, at a malformed or nested
/// indirect table, and before the chain would exceed 4 GiB.
///
/// [`DescIter::get_ref`] reaches the buffers the descriptors point to
/// without a full guest-memory lookup when they lie in the region the batch
/// touched last.
pub struct DescIter<'m> {
    mem: &'m GuestMemoryLog,
    hint: &'m Cell<Option<&'m GuestRegionLog>>,
    head: u16,
    table: TableMap<'m>,
    next_index: u16,
    ttl: u16,
    is_indirect: bool,
    yielded_bytes: u32,
}

impl<'m> DescIter<'m> {
    /// Index of the chain's head descriptor.
    #[inline]
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// The guest memory the descriptors point into.
    #[inline]
    pub fn memory(&self) -> &'m GuestMemoryLog {
        self.mem
    }

    /// A volatile reference to a `T` at guest address `addr`, if the whole
    /// object lies inside one memory region (`None` otherwise: the caller
    /// falls back to [`DescIter::memory`]'s `Bytes` methods, which also
    /// handle objects spanning regions).
    ///
    /// The region the batch touched last is tried before a lookup in the
    /// memory map; either way the range is checked against the region's
    /// bounds. Stores through the reference are dirty-logged.
    #[inline]
    pub fn get_ref<T: ByteValued>(
        &self,
        addr: GuestAddress,
    ) -> Option<VolatileRef<'m, T, LogBitmapSlice<'m>>> {
        if let Some(region) = self.hint.get() {
            if let Some(r) = region_ref(region, addr) {
                return Some(r);
            }
        }
        let region = self.mem.find_region(addr)?;
        self.hint.set(Some(region));
        region_ref(region, addr)
    }

    fn switch_to_indirect(&mut self, desc: Descriptor) -> Option<()> {
        if self.is_indirect || desc.len() & (DESC_ALIGN - 1) != 0 {
            return None;
        }
        let size = u16::try_from(desc.len() / DESC_ALIGN).ok()?;
        self.table = TableMap::new(self.mem, desc.addr(), size);
        self.next_index = 0;
        self.ttl = size;
        self.is_indirect = true;
        Some(())
    }
}

/// A reference to a `T` at `addr` if it lies inside `region`.
#[inline]
fn region_ref<T: ByteValued>(
    region: &GuestRegionLog,
    addr: GuestAddress,
) -> Option<VolatileRef<'_, T, LogBitmapSlice<'_>>> {
    let offset = addr.checked_offset_from(region.start_addr())?;
    let offset = usize::try_from(offset).ok()?;
    let map: &MmapRegion<DirtyLogBitmap> = region;
    // `get_ref` checks `offset + size_of::<T>()` against the mapping.
    map.get_ref::<T>(offset).ok()
}

impl std::fmt::Debug for DescIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DescIter")
            .field("head", &self.head)
            .field("next_index", &self.next_index)
            .field("ttl", &self.ttl)
            .field("is_indirect", &self.is_indirect)
            .finish()
    }
}

impl Iterator for DescIter<'_> {
    type Item = Descriptor;

    // Inlined into the device's loop over the chain (another crate).
    #[inline]
    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next_index >= self.table.size {
                return None;
            }
            let desc = self.table.read(self.mem, self.next_index)?;
            if desc.refers_to_indirect_table() {
                self.switch_to_indirect(desc)?;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next_index = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// A vring of `SIZE` on the test layout (`DESC`, `AVAIL`, `USED`),
    /// resuming at index `start`, without call or err notifiers.
    fn test_vring(mem: &GuestMemoryHandle, start: u16, event_idx: bool) -> Vring {
        let state = VringState {
            size: SIZE,
            ready: true,
            enabled: true,
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            next_avail: start,
            next_used: start,
            event_idx,
            signalled_used: None,
        };
        let slot = || Arc::new(ArcSwapOption::empty());
        Vring::new(0, SIZE, &state, mem.clone(), slot(), slot()).unwrap()
    }

    /// `DescIter` yields exactly what virtio-queue's chain yields.
    #[test]
    fn desc_iter_matches_descriptor_chain() {
        use virtio_bindings::virtio_ring::{
            VRING_DESC_F_INDIRECT as IND, VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as W,
        };
        let (ind, next, w) = (IND as u16, NEXT as u16, W as u16);
        let mem: GuestMemoryLog =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let table: [(u16, RawDescriptor); 11] = [
            // 0 -> 1 -> 2: a plain request.
            (0, desc(0x4000, 16, next, 1)),
            (1, desc(0x5000, 512, next | w, 2)),
            (2, desc(0x6000, 1, w, 0)),
            // 3 -> 4 -> 3: a loop.
            (3, desc(0x4000, 16, next, 4)),
            (4, desc(0x4000, 16, next, 3)),
            // 5: next index outside the table.
            (5, desc(0x4000, 16, next, SIZE + 3)),
            // 6: an indirect table of two descriptors.
            (6, desc(0x8000, 32, ind, 0)),
            // 7: a misaligned indirect table.
            (7, desc(0x8000, 20, ind, 0)),
            // 8: an indirect table outside memory.
            (8, desc(0xffff_0000, 32, ind, 0)),
            // 9 -> 10: more than 4 GiB.
            (9, desc(0x4000, u32::MAX, next, 10)),
            (10, desc(0x4000, 2, 0, 0)),
        ];
        for (i, d) in table {
            mem.write_obj(d, GuestAddress(DESC + u64::from(i) * 16))
                .unwrap();
        }
        mem.write_obj(desc(0x4000, 16, next, 1), GuestAddress(0x8000))
            .unwrap();
        mem.write_obj(desc(0x6000, 1, w, 0), GuestAddress(0x8010))
            .unwrap();
        let heads: Vec<u16> = (0..11).chain([SIZE + 1]).collect();
        for (slot, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
            .unwrap();

        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let descs = DescTable::new(&mem, &queue);
        let mut seen = 0;
        for chain in queue.iter(&mem).unwrap() {
            let head = chain.head_index();
            let key = |d: Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
            let ours: Vec<_> = descs.chain(head).map(key).collect();
            let theirs: Vec<_> = chain.map(key).collect();
            assert_eq!(ours, theirs, "chain {head}");
            seen += 1;
        }
        assert_eq!(seen, heads.len());
        // The table lookups fall back to plain reads when there is no slice.
        let mut unmapped = DescTable::new(&mem, &queue);
        unmapped.table.array = None;
        assert_eq!(unmapped.chain(0).count(), 3);
        assert_eq!(unmapped.chain(6).count(), 2);
    }

    /// The batch path (rings mapped once per batch) leaves the used ring,
    /// the queue state and event_idx decisions exactly as `virtio-queue`'s
    /// `add_used` path does, across the 16-bit index wrap.
    #[test]
    fn mapped_rings_match_virtio_queue() {
        let start = u16::MAX - 5;
        let setup = || {
            let mem: GuestMemoryLog =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            for i in 0..SIZE {
                mem.write_obj(
                    desc(0x4000, 16, 0, 0),
                    GuestAddress(DESC + u64::from(i) * 16),
                )
                .unwrap();
            }
            let handle = GuestMemoryHandle::new(mem);
            let vring = test_vring(&handle, start, true);
            (handle, vring)
        };
        let offer = |mem: &GuestMemoryLog, from: u16, n: u16, used_event: u16| {
            for k in 0..n {
                let idx = from.wrapping_add(k);
                let slot = u64::from(idx % SIZE);
                mem.write_obj(idx % SIZE, GuestAddress(AVAIL + 4 + 2 * slot))
                    .unwrap();
            }
            mem.write_obj(from.wrapping_add(n), GuestAddress(AVAIL + 2))
                .unwrap();
            mem.write_obj(used_event, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
                .unwrap();
        };
        let (mem_a, mut fast) = setup();
        let (mem_b, mut slow) = setup();
        let mut next = start;
        let batches = [
            (3u16, start.wrapping_add(1), true),
            (5, 0, true),
            (4, 100, false),
            (2, 7, true),
        ];
        for (n, used_event, notify) in batches {
            offer(&mem_a.memory(), next, n, used_event);
            offer(&mem_b.memory(), next, n, used_event);
            let a = fast
                .process_available_descs(|c| u32::from(c.head_index()) + 7)
                .unwrap();
            let b = slow
                .process_available(|c| u32::from(c.head_index()) + 7)
                .unwrap();
            assert_eq!((a, b), (usize::from(n), usize::from(n)));
            assert_eq!(fast.state(), slow.state());
            // virtio-queue's own answer, from its `add_used` bookkeeping.
            let theirs = slow.queue.needs_notification(&*mem_b.memory()).unwrap();
            assert_eq!(theirs, notify);
            assert_eq!(fast.needs_notification().unwrap(), notify);
            assert_eq!(slow.needs_notification().unwrap(), notify);
            let ring = |m: &GuestMemoryLog| {
                let mut buf = [0u8; 4 + 8 * SIZE as usize];
                m.read_slice(&mut buf, GuestAddress(USED)).unwrap();
                buf
            };
            assert_eq!(ring(&mem_a.memory()), ring(&mem_b.memory()));
            next = next.wrapping_add(n);
        }
        assert_eq!(fast.state().next_used, start.wrapping_add(14));
        // An available index more than a queue size ahead is refused.
        offer(&mem_a.memory(), next, SIZE + 1, 0);
        let err = fast.process_available_descs(|_| 0).unwrap_err();
        assert!(matches!(
            err,
            VringError::Queue {
                source: virtio_queue::Error::InvalidAvailRingIndex,
                ..
            }
        ));
    }

    /// The mapped batch path: `DescIter::get_ref` takes only ranges inside
    /// one region (whichever region the hint holds), and every write it and
    /// the mapped used ring make is dirty-logged while logging is on.
    #[test]
    fn mapped_path_checks_ranges_and_logs_writes() {
        use crate::memory::{DirtyLog, LOG_PAGE_SIZE};
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        const HALF: u64 = 0x10000;
        let log = DirtyLog::new();
        let log_file = tempfile::tempfile().unwrap();
        log_file.set_len(64).unwrap();
        log.set_area(&log_file, 64, 0).unwrap();
        let region = |base: u64| {
            let map = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
                HALF as usize,
                DirtyLogBitmap::new(log.clone(), base),
            )
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .unwrap();
            GuestRegionLog::new(map, GuestAddress(base)).unwrap()
        };
        // Two adjacent regions: [0, HALF) and [HALF, 2 * HALF).
        let mem = GuestMemoryLog::from_regions(vec![region(0), region(HALF)]).unwrap();
        let (next, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        for head in (0..SIZE).step_by(2) {
            // A header in the first region, a status byte in the second.
            let base = DESC + u64::from(head) * 16;
            mem.write_obj(desc(0x4000, 16, next, head + 1), GuestAddress(base))
                .unwrap();
            mem.write_obj(desc(HALF + 0x5000, 1, w, 0), GuestAddress(base + 16))
                .unwrap();
        }
        let handle = GuestMemoryHandle::new(mem);
        let mut vring = test_vring(&handle, 0, false);
        let offer = |idx: u16| {
            let m = handle.memory();
            let head = (idx % (SIZE / 2)) * 2;
            m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % SIZE)))
                .unwrap();
            m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
                .unwrap();
        };
        let logged = || {
            let mut bytes = [0u8; 64];
            std::os::unix::fs::FileExt::read_at(&log_file, &mut bytes, 0).unwrap();
            let pages: Vec<u64> = (0..64 * 8)
                .filter(|p| bytes[p / 8] & (1 << (p % 8)) != 0)
                .map(|p| p as u64 * LOG_PAGE_SIZE)
                .collect();
            pages
        };
        let run = |vring: &mut Vring, status: u8| {
            vring
                .process_available_descs(|chain| {
                    let at = GuestAddress;
                    // Inside one region, the hint on either side.
                    assert!(chain.get_ref::<[u64; 2]>(at(0x4000)).is_some());
                    assert!(chain.get_ref::<u8>(at(HALF - 1)).is_some());
                    assert!(chain.get_ref::<u16>(at(HALF)).is_some());
                    assert!(chain.get_ref::<u8>(at(2 * HALF - 1)).is_some());
                    // Across the boundary (whichever region the hint holds),
                    // and beyond memory: refused.
                    assert!(chain.get_ref::<u64>(at(HALF - 4)).is_none());
                    assert!(chain.get_ref::<u8>(at(HALF - 1)).is_some());
                    assert!(chain.get_ref::<u64>(at(HALF - 4)).is_none());
                    assert!(chain.get_ref::<u8>(at(2 * HALF)).is_none());
                    assert!(chain.get_ref::<u16>(at(2 * HALF - 1)).is_none());
                    assert!(chain.get_ref::<u8>(at(u64::MAX)).is_none());
                    let descs: Vec<Descriptor> = chain.collect();
                    assert_eq!(descs.len(), 2);
                    1
                })
                .unwrap();
            // The status byte, written as a device would.
            let guard = handle.memory();
            let table = DescTable::new(&guard, vring.queue_mut());
            let chain = table.chain(0);
            chain
                .get_ref::<u8>(GuestAddress(HALF + 0x5000))
                .unwrap()
                .store(status);
        };
        offer(0);
        run(&mut vring, 1);
        assert_eq!(logged(), Vec::<u64>::new(), "logged while logging is off");
        assert_eq!(vring.state().next_used, 1);

        offer(1);
        // (After the driver-side writes above, which would be logged too.)
        log.set_active(true);
        run(&mut vring, 2);
        // The used ring (element and index) and the status byte's page.
        assert_eq!(logged(), vec![USED, HALF + 0x5000]);
        let m = handle.memory();
        assert_eq!(m.read_obj::<u8>(GuestAddress(HALF + 0x5000)).unwrap(), 2);
        assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
        // Used element 1: head 2, length 1.
        assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 12)).unwrap(), 2);
        assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 16)).unwrap(), 1);
    }

    /// An in-flight area sized for a larger ring cannot make this ring
    /// resubmit a head it cannot have.
    #[test]
    fn inflight_heads_beyond_the_ring_are_refused() {
        let mem: GuestMemoryLog =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let area = Arc::new(crate::inflight::InflightArea::create(1, 1024).unwrap());
        let mut q = area.queue(0).unwrap();
        q.recover(0);
        q.begin(SIZE + 100);
        let mut vring = test_vring(&GuestMemoryHandle::new(mem), 0, false);
        let err = vring.attach_inflight(area.queue(0).unwrap()).unwrap_err();
        assert!(
            matches!(err, VringError::InvalidState(m) if m.contains("beyond the queue")),
            "{err}"
        );
    }
}
