// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control core: one device's vrings, features, guest memory and
//! workers, behind transport-neutral operations.
//!
//! Both homes drive a [`DeviceCore`]: the vhost-user dispatcher translates
//! protocol messages into these calls, the in-process transport translates
//! register writes. A queue runs (is handed to its worker) once guest memory
//! exists, the queue is configured, it has a kick eventfd and it is enabled.

// The per-request operations a transport's dispatcher drives (`set_kick`,
// `set_queue_size`, ...) are crate-private: the vhost-user session is their
// only caller, so without that home some of them are unused.
#![cfg_attr(not(feature = "vhost-user"), allow(dead_code))]

mod control;
mod error;
mod queue;
mod snapshot;

use std::sync::Arc;

use log::{debug, warn};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{ConfigNotifier, DeviceBackend};
use crate::data_plane::worker::{WorkerCommand, WorkerHandle};
pub use crate::data_plane::{DataPlaneSubscriber, WorkerError, WorkerWaker};
use crate::inflight::InflightArea;
use crate::memory::{DirtyLog, GuestMemoryHandle, GuestMemoryLog, GuestRegionLog};
use crate::vring::{Notifier, Vring, VringState};
pub use control::{Activation, ControlError, DeviceControl, QueueActivation};
pub use error::{CoreError, LoadStateError, Result};
use queue::QueueSlot;

pub use crate::features::VIRTIO_RING_F_EVENT_IDX;

/// One device's control state. Not `Sync`: a single control thread drives it.
pub struct DeviceCore<B: DeviceBackend> {
    backend: Arc<B>,
    mem: GuestMemoryHandle,
    log: Arc<DirtyLog>,
    acked_features: u64,
    queues: Vec<QueueSlot>,
    workers: Vec<WorkerHandle>,
    worker_of_queue: Vec<usize>,
    inflight: Option<Arc<InflightArea>>,
    paused: bool,
    /// How long stopping a queue waits for its worker.
    stop_timeout: std::time::Duration,
}

impl<B: DeviceBackend> std::fmt::Debug for DeviceCore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCore")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("queues", &self.queues.len())
            .field("workers", &self.workers.len())
            .field("inflight", &self.inflight.is_some())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

/// How long stopping a queue waits for its worker by default: long enough
/// for a batch of slow I/O to finish, bounded so that a worker blocked for
/// good (a postcopy fault nobody serves) cannot hang the control thread.
pub const DEFAULT_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl<B: DeviceBackend> DeviceCore<B> {
    /// Create the core. Each queue group's worker thread is spawned when
    /// the group's first queue starts, so queues a driver never enables
    /// cost no thread.
    pub fn new(backend: Arc<B>) -> Result<Self> {
        let groups = backend.queue_groups().len().max(1);
        let workers = (0..groups)
            .map(|id| WorkerHandle::spawn(id, backend.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self::with_workers(backend, workers))
    }

    /// Create the core with its data plane as `event-manager` subscribers
    /// (one per queue group) instead of threads. Add the subscribers to the
    /// VMM's `EventManager`; drive the core from another thread.
    pub fn with_event_loop(backend: Arc<B>) -> Result<(Self, Vec<DataPlaneSubscriber<B>>)> {
        let groups = backend.queue_groups().len().max(1);
        let mut handles = Vec::with_capacity(groups);
        let mut subscribers = Vec::with_capacity(groups);
        for id in 0..groups {
            let (handle, worker) = WorkerHandle::new_loop(id, backend.clone())?;
            handles.push(handle);
            subscribers.push(DataPlaneSubscriber::new(worker));
        }
        Ok((Self::with_workers(backend, handles), subscribers))
    }

    fn with_workers(backend: Arc<B>, workers: Vec<WorkerHandle>) -> Self {
        let num_queues = backend.num_queues();
        let mut worker_of_queue = vec![0usize; num_queues];
        let groups = backend.queue_groups();
        for (w, mask) in groups.iter().enumerate() {
            for (q, slot) in worker_of_queue.iter_mut().enumerate().take(64) {
                if mask & (1 << q) != 0 {
                    *slot = w;
                }
            }
        }
        DeviceCore {
            mem: GuestMemoryHandle::new(GuestMemoryLog::default()),
            log: DirtyLog::new(),
            acked_features: 0,
            queues: (0..num_queues).map(|_| QueueSlot::default()).collect(),
            workers,
            worker_of_queue,
            backend,
            inflight: None,
            paused: false,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }

    /// How long stopping a queue waits for its worker before failing with
    /// [`CoreError::WorkerStuck`] (default [`DEFAULT_STOP_TIMEOUT`]).
    pub(crate) fn set_stop_timeout(&mut self, timeout: std::time::Duration) {
        self.stop_timeout = timeout;
    }

    /// Track in-flight requests of every queue started from now on in
    /// `area` (recovering what a previous backend left in it), or stop
    /// tracking with `None`.
    pub(crate) fn set_inflight(&mut self, area: Option<Arc<InflightArea>>) {
        self.inflight = area;
    }

    /// The device.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Worker threads running now (a queue group gets its thread when its
    /// first queue starts; workers on an event loop have none).
    pub fn worker_threads(&self) -> usize {
        self.workers.iter().filter(|w| w.has_thread()).count()
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The guest memory handle shared with vrings and device.
    pub fn memory(&self) -> &GuestMemoryHandle {
        &self.mem
    }

    /// The dirty log every region of this device writes into.
    pub(crate) fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.log
    }

    /// Virtio features the device offers.
    pub fn device_features(&self) -> u64 {
        self.backend.features()
    }

    /// The negotiated virtio features.
    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Accept the driver's features. `transport_bits` are bits the transport
    /// offered on top of the device's own (they are accepted, then masked
    /// off before the device sees them).
    pub fn set_features(&mut self, features: u64, transport_bits: u64) -> Result<()> {
        let offered = self.backend.features() | transport_bits;
        if features & !offered != 0 {
            return Err(CoreError::UnofferedFeatures(features & !offered));
        }
        self.acked_features = features;
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.state.event_idx = event_idx;
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features & !transport_bits);
        Ok(())
    }

    /// Install a config-change notifier in the device.
    pub fn set_config_notifier(&self, notifier: ConfigNotifier) {
        self.backend.set_config_notifier(notifier);
    }

    /// Replace guest memory with `regions`.
    pub(crate) fn set_memory(&mut self, regions: Vec<Arc<GuestRegionLog>>) -> Result<()> {
        let mem = GuestMemoryLog::from_arc_regions(regions).map_err(CoreError::Memory)?;
        self.install_memory(mem)
    }

    /// Add one region to guest memory.
    pub(crate) fn add_region(&mut self, region: Arc<GuestRegionLog>) -> Result<()> {
        let mem = self
            .mem
            .memory()
            .insert_region(region)
            .map_err(CoreError::Memory)?;
        self.install_memory(mem)
    }

    /// Remove the region that starts at `gpa` with `size` bytes.
    pub(crate) fn remove_region(&mut self, gpa: u64, size: u64) -> Result<()> {
        let (mem, _removed) = self
            .mem
            .memory()
            .remove_region(GuestAddress(gpa), size)
            .map_err(CoreError::Memory)?;
        self.install_memory(mem)
    }

    /// Replace guest memory with `mem` (an in-process VMM's own memory).
    pub(crate) fn set_guest_memory(&mut self, mem: GuestMemoryLog) -> Result<()> {
        self.install_memory(mem)
    }

    fn install_memory(&mut self, mem: GuestMemoryLog) -> Result<()> {
        // Swapping the memory is seen by running vrings at their next batch.
        self.mem
            .lock()
            .map_err(|_| CoreError::MemoryPoisoned)?
            .replace(mem);
        self.backend
            .update_memory(&self.mem)
            .map_err(CoreError::Device)?;
        self.try_start_all();
        Ok(())
    }

    /// Whether any guest memory is configured.
    pub(crate) fn has_memory(&self) -> bool {
        self.mem.memory().num_regions() > 0
    }

    fn slot(&mut self, index: u32) -> Result<&mut QueueSlot> {
        self.queues
            .get_mut(index as usize)
            .ok_or(CoreError::QueueIndex(index))
    }

    fn check_index(&self, index: u32) -> Result<u16> {
        if (index as usize) < self.queues.len() {
            Ok(index as u16)
        } else {
            Err(CoreError::QueueIndex(index))
        }
    }

    /// Set the size of queue `index`.
    pub(crate) fn set_queue_size(&mut self, index: u32, size: u32) -> Result<()> {
        let max = self.backend.max_queue_size();
        if size == 0 || size > u32::from(max) || !size.is_power_of_two() {
            return Err(CoreError::QueueSize { size, max });
        }
        let slot = self.slot(index)?;
        if slot.running {
            return Err(CoreError::QueueRunning(index as u16));
        }
        slot.state.size = size as u16;
        Ok(())
    }

    /// Set the guest physical addresses of queue `index`'s rings.
    pub(crate) fn set_queue_addresses(
        &mut self,
        index: u32,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<()> {
        let slot = self.slot(index)?;
        if slot.running {
            // A vhost-user frontend re-sends the same addresses on a running
            // ring to switch dirty logging on or off (VHOST_VRING_F_LOG, at
            // the start and end of a live migration); every write we make
            // is logged by guest physical address anyway, so that is a no-op.
            let s = &slot.state;
            if (s.desc_table, s.avail_ring, s.used_ring) == (desc, avail, used) {
                return Ok(());
            }
            return Err(CoreError::QueueRunning(index as u16));
        }
        slot.state.desc_table = desc;
        slot.state.avail_ring = avail;
        slot.state.used_ring = used;
        slot.addresses_set = true;
        Ok(())
    }

    /// Set where queue `index` resumes (`next_avail`; `next_used` follows it
    /// unless given).
    pub(crate) fn set_queue_base(
        &mut self,
        index: u32,
        next_avail: u16,
        next_used: Option<u16>,
    ) -> Result<()> {
        let slot = self.slot(index)?;
        if slot.running {
            return Err(CoreError::QueueRunning(index as u16));
        }
        slot.state.next_avail = next_avail;
        slot.state.next_used = next_used.unwrap_or(next_avail);
        Ok(())
    }

    /// Attach (or detach with `None`) the kick eventfd of queue `index`.
    /// A queue with a kick fd is "started" and runs once enabled.
    pub(crate) fn set_kick(&mut self, index: u32, kick: Option<EventFd>) -> Result<()> {
        let q = self.check_index(index)?;
        self.stop_running(q)?;
        self.queues[q as usize].kick = kick;
        self.try_start(q)
    }

    /// Attach (or detach) the call notifier of queue `index` (an eventfd,
    /// or an irqfd with an interrupt status bit). Takes effect
    /// immediately, even while the queue runs.
    pub(crate) fn set_call_notifier(&mut self, index: u32, call: Option<Notifier>) -> Result<()> {
        let slot = self.slot(index)?;
        slot.call.store(call.map(Arc::new));
        Ok(())
    }

    /// Attach (or detach) the err notifier of queue `index` (e.g. one that
    /// sets DEVICE_NEEDS_RESET and raises a config interrupt).
    pub(crate) fn set_err_notifier(&mut self, index: u32, err: Option<Notifier>) -> Result<()> {
        let slot = self.slot(index)?;
        slot.err.store(err.map(Arc::new));
        Ok(())
    }

    /// Enable or disable queue `index`.
    pub(crate) fn set_queue_enabled(&mut self, index: u32, enabled: bool) -> Result<()> {
        let q = self.check_index(index)?;
        self.queues[q as usize].state.enabled = enabled;
        if enabled {
            self.try_start(q)
        } else {
            self.stop_running(q)
        }
    }

    /// Mark queue `index` ready or not (in-process transports).
    pub(crate) fn set_queue_ready(&mut self, index: u32, ready: bool) -> Result<()> {
        let slot = self.slot(index)?;
        slot.state.ready = ready;
        Ok(())
    }

    /// Stop queue `index`, drop its kick fd and return its state (the
    /// vhost-user `GET_VRING_BASE`).
    pub(crate) fn stop_queue(&mut self, index: u32) -> Result<VringState> {
        let q = self.check_index(index)?;
        self.stop_running(q)?;
        let slot = &mut self.queues[q as usize];
        slot.kick = None;
        Ok(slot.state)
    }

    /// The last known state of queue `index` (exact when it is not running).
    pub(crate) fn queue_state(&self, index: u32) -> Result<VringState> {
        let q = self.check_index(index)?;
        Ok(self.queues[q as usize].state)
    }

    /// Whether queue `index` is handed to its worker.
    pub(crate) fn is_queue_running(&self, index: u32) -> bool {
        self.queues.get(index as usize).is_some_and(|s| s.running)
    }

    /// Restore a queue from saved state (validated first).
    pub(crate) fn restore_queue(&mut self, index: u32, state: VringState) -> Result<()> {
        let q = self.check_index(index)?;
        state
            .validate(self.backend.max_queue_size())
            .map_err(|source| CoreError::QueueStart { index: q, source })?;
        self.stop_running(q)?;
        let slot = &mut self.queues[q as usize];
        slot.state = state;
        slot.addresses_set = true;
        self.try_start(q)
    }

    /// Stop every queue, forget features and memory, and reset the device.
    pub fn reset(&mut self) {
        for q in 0..self.queues.len() as u16 {
            if let Err(e) = self.stop_running(q) {
                warn!("reset: {e}");
            }
        }
        for slot in &mut self.queues {
            *slot = QueueSlot::default();
        }
        self.acked_features = 0;
        self.inflight = None;
        self.paused = false;
        self.log.set_active(false);
        self.log.clear_area();
        self.backend.reset();
    }

    /// Forget guest memory (e.g. when a frontend disconnects).
    pub(crate) fn clear_memory(&mut self) {
        if let Ok(g) = self.mem.lock() {
            g.replace(GuestMemoryLog::default());
        }
    }

    /// Read the device config space. Bytes past its end read as zero (some
    /// drivers read the whole config structure of their device type).
    pub fn read_config(&self, offset: u32, data: &mut [u8]) -> Result<()> {
        let size = self.backend.config_size();
        let start = offset as usize;
        data.fill(0);
        if start < size {
            let end = start.saturating_add(data.len()).min(size);
            self.backend.read_config(offset, &mut data[..end - start]);
        }
        Ok(())
    }

    /// Write the device config space.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<()> {
        self.check_config_range(offset, data.len())?;
        self.backend
            .write_config(offset, data)
            .map_err(CoreError::Device)
    }

    fn check_config_range(&self, offset: u32, len: usize) -> Result<()> {
        let size = self.backend.config_size();
        if (offset as usize).saturating_add(len) > size {
            return Err(CoreError::ConfigRange { offset, len });
        }
        Ok(())
    }

    fn try_start_all(&mut self) {
        for q in 0..self.queues.len() as u16 {
            if let Err(e) = self.try_start(q) {
                warn!("{e}");
            }
        }
    }

    fn try_start(&mut self, q: u16) -> Result<()> {
        let has_memory = self.has_memory();
        let paused = self.paused;
        let slot = &mut self.queues[q as usize];
        if slot.running
            || paused
            || !has_memory
            || !slot.addresses_set
            || slot.state.size == 0
            || !slot.state.enabled
        {
            return Ok(());
        }
        let Some(kick) = slot.kick.as_ref() else {
            return Ok(());
        };
        let kick = kick
            .try_clone()
            .map_err(|source| CoreError::KickFd { index: q, source })?;
        let mut vring = Vring::new(
            q,
            self.backend.max_queue_size(),
            &slot.state,
            self.mem.clone(),
            slot.call.clone(),
            slot.err.clone(),
        )
        .map_err(|source| CoreError::QueueStart { index: q, source })?;
        if !slot.resubmit.is_empty() {
            vring
                .resubmit_heads(&slot.resubmit)
                .map_err(|source| CoreError::QueueStart { index: q, source })?;
            slot.resubmit.clear();
        }
        if let Some(tracker) = self.inflight.as_ref().and_then(|a| a.queue(q)) {
            let resubmitted = vring
                .attach_inflight(tracker)
                .map_err(|source| CoreError::QueueStart { index: q, source })?;
            if resubmitted > 0 {
                log::info!("queue {q}: resubmitting {resubmitted} in-flight request(s)");
            }
        }
        let worker = &mut self.workers[self.worker_of_queue[q as usize]];
        if !worker.send(WorkerCommand::Start { vring, kick }) {
            return Err(CoreError::WorkerGone(q));
        }
        debug!("queue {q} started: {:?}", slot.state);
        slot.running = true;
        Ok(())
    }

    fn stop_running(&mut self, q: u16) -> Result<()> {
        let slot = &mut self.queues[q as usize];
        if !slot.running {
            return Ok(());
        }
        let worker = &mut self.workers[self.worker_of_queue[q as usize]];
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if !worker.send(WorkerCommand::Stop {
            index: q,
            reply: tx,
        }) || !worker.is_alive()
        {
            slot.running = false;
            return Err(CoreError::WorkerGone(q));
        }
        let reply = rx.recv_timeout(self.stop_timeout);
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = reply {
            // Still the worker's: a later stop sends another request (the
            // worker answers a stop of a queue it no longer has with None).
            return Err(CoreError::WorkerStuck {
                index: q,
                waited: self.stop_timeout,
            });
        }
        slot.running = false;
        match reply {
            Ok(Some(state)) => {
                slot.state.next_avail = state.next_avail;
                slot.state.next_used = state.next_used;
                slot.state.signalled_used = state.signalled_used;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(_) => Err(CoreError::WorkerGone(q)),
        }
    }
}
