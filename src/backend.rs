// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one trait a device author implements.
//!
//! [`DeviceBackend`] describes a virtio device (its queues, features and
//! config space) and handles its events. It names no vhost-user or KVM type:
//! the same implementation runs behind the vhost-user daemon or inside a VMM.
//! [`DeviceBackendMut`] is the `&mut self` flavour; wrap it in a [`Mutex`] or
//! [`RwLock`] to get a [`DeviceBackend`].
//!
//! # Lifecycle
//!
//! ```text
//!  created ──► features acked ──► memory set ──► queue started ──► events …
//!     ▲                                              │
//!     └──────────────── reset ◄──── queue stopped ◄──┘
//! ```
//!
//! Worker threads call [`DeviceBackend::handle_event`] (by default it hands
//! queue events to [`DeviceBackend::process_queue`]); everything else is
//! called from the control thread of the home the device runs in.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

use crate::features::VIRTIO_F_VERSION_1;
use crate::memory::GuestMemoryHandle;
use crate::vring::{Vring, VringT};

/// The queue size [`DeviceBackend::max_queue_size`] offers unless a device
/// says otherwise.
pub const DEFAULT_MAX_QUEUE_SIZE: u16 = 256;

/// The error a device reports to the kit. Boxed so the device's own error
/// type does not leak into the kit's generics.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a worker is calling the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The driver kicked queue `n`, or the queue just started (so buffers
    /// made available before it started are not missed).
    Queue(u16),
    /// A device fd registered through [`DeviceBackend::worker_fds`] or
    /// [`crate::core::WorkerWaker::add_fd`] is ready; the value is the token
    /// the device gave it.
    Fd(u64),
    /// The device asked to run ([`crate::core::WorkerWaker::wake`]).
    Wake,
}

/// The queues a worker owns, indexed by queue number. Queues that are not
/// running (or belong to another worker) are `None`.
#[derive(Debug)]
pub struct QueueSet<V> {
    slots: Vec<Option<V>>,
}

impl<V: VringT> QueueSet<V> {
    /// An empty set for a device with `num_queues` queues (workers build
    /// these; device unit tests can too).
    pub fn new(num_queues: usize) -> Self {
        QueueSet {
            slots: (0..num_queues).map(|_| None).collect(),
        }
    }

    /// The running vring `index`, if this worker owns it.
    pub fn get(&self, index: u16) -> Option<&V> {
        self.slots.get(usize::from(index)).and_then(Option::as_ref)
    }

    /// The running vring a [`DeviceEvent::Queue`] event is for, with its
    /// index; `None` for other events and for queues this worker does not
    /// own. The usual first line of a [`DeviceBackend::handle_event`] that
    /// only serves queues: `let Some((index, vring)) = queues.for_event(event)
    /// else { return Ok(()) };`.
    pub fn for_event(&self, event: DeviceEvent) -> Option<(u16, &V)> {
        match event {
            DeviceEvent::Queue(index) => self.get(index).map(|v| (index, v)),
            DeviceEvent::Fd(_) | DeviceEvent::Wake => None,
        }
    }

    /// Iterate over the running vrings with their index.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &V)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i as u16, v)))
    }

    /// Put a running vring in slot `index` (ignored if out of range).
    pub fn insert(&mut self, index: u16, vring: V) {
        if let Some(slot) = self.slots.get_mut(usize::from(index)) {
            *slot = Some(vring);
        }
    }

    /// Take the vring out of slot `index`.
    pub fn take(&mut self, index: u16) -> Option<V> {
        self.slots
            .get_mut(usize::from(index))
            .and_then(Option::take)
    }
}

/// Lets a device tell the driver its config space changed; works the same
/// in every home (a vhost-user backend message or a config interrupt).
#[derive(Clone)]
pub struct ConfigNotifier(Arc<dyn Fn() + Send + Sync>);

impl ConfigNotifier {
    /// Build a notifier from the transport's action.
    pub fn new(notify: impl Fn() + Send + Sync + 'static) -> Self {
        ConfigNotifier(Arc::new(notify))
    }

    /// Tell the driver the config space changed.
    pub fn notify(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for ConfigNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigNotifier")
    }
}

// `DeviceBackend` and `DeviceBackendMut` are one method list with two
// receivers (`&self`, `&mut self`); this macro writes both from that one
// list so they cannot drift apart. Every method's documentation is here and
// rustdoc shows each trait as a plain trait: read the generated docs
// (`cargo doc --open`, or docs.rs) rather than following go-to-definition
// into the macro.
macro_rules! backend_trait {
    ($(#[$doc:meta])* $name:ident, [$($ref_:tt)+] $s:ident) => {
        $(#[$doc])*
        pub trait $name: Send + Sync + 'static {
            /// How workers hold this device's vrings ([`crate::VringOwned`]
            /// for the lock-free hot path).
            type Vring: VringT;

            /// The virtio device ID (2 for block, 4 for entropy, ...): the
            /// one identity method without a default.
            fn device_type(&self) -> u32;

            /// Number of virtqueues. Default: one.
            fn num_queues(&self) -> usize {
                1
            }

            /// Largest queue size the device accepts (a power of two, at
            /// most 32768). Default: [`DEFAULT_MAX_QUEUE_SIZE`].
            fn max_queue_size(&self) -> u16 {
                DEFAULT_MAX_QUEUE_SIZE
            }

            /// Virtio feature bits the device offers, including transport
            /// bits such as `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX`.
            /// Default: [`VIRTIO_F_VERSION_1`] alone, what every virtio 1.x
            /// device offers; a device with feature bits of its own, or one
            /// that wants EVENT_IDX, returns its set.
            fn features(&self) -> u64 {
                VIRTIO_F_VERSION_1
            }

            /// Raw vhost-user protocol feature bits the device needs beyond
            /// the set the kit always offers. Ignored in-process.
            fn protocol_features(&self) -> u64 {
                0
            }

            /// The driver accepted these features.
            fn acked_features($($ref_)+ $s, _features: u64) {}

            /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
            fn set_event_idx($($ref_)+ $s, _enabled: bool) {}

            /// Size of the device config space in bytes.
            fn config_size(&self) -> usize {
                0
            }

            /// Read the config space at `offset` into `data`. Bytes past the
            /// end of the config space read as zero.
            fn read_config(&self, _offset: u32, data: &mut [u8]) {
                data.fill(0);
            }

            /// The driver wrote the config space.
            fn write_config($($ref_)+ $s, _offset: u32, _data: &[u8]) -> Result<(), BackendError> {
                Err("config space is read-only".into())
            }

            /// Guest memory changed (regions added, removed or replaced).
            fn update_memory($($ref_)+ $s, _mem: &GuestMemoryHandle) -> Result<(), BackendError> {
                Ok(())
            }

            /// How queues are grouped into worker threads: one bit mask of
            /// queue indices per worker. The default puts every queue on one
            /// worker.
            fn queue_groups(&self) -> Vec<u64> {
                let n = self.num_queues().min(64);
                vec![if n == 64 { u64::MAX } else { (1u64 << n) - 1 }]
            }

            /// Device fds worker `worker` should poll, each with a token that
            /// comes back in [`DeviceEvent::Fd`].
            fn worker_fds(&self, _worker: usize) -> Vec<(RawFd, u64)> {
                Vec::new()
            }

            /// Receive the handle that schedules worker `worker` and changes
            /// the fds it polls (see [`crate::core::WorkerWaker`]); called
            /// once per worker when the device's core is created. Keep it to
            /// wake the worker from any thread, or to pause an fd the device
            /// cannot serve now instead of letting it spin.
            fn set_waker($($ref_)+ $s, _worker: usize, _waker: crate::core::WorkerWaker) {}

            /// An eventfd that, when written by the device, stops worker
            /// `worker`.
            fn exit_event(&self, _worker: usize) -> Option<EventFd> {
                None
            }

            /// Serve queue `index` (the driver kicked it, or it just
            /// started): the one method a device that only serves queues
            /// writes. The default [`handle_event`](Self::handle_event)
            /// calls it with the vring locked. A device that never overrides
            /// this nor `handle_event` fails every kick with an error.
            fn process_queue(
                $($ref_)+ $s,
                _index: u16,
                _vring: &mut Vring,
            ) -> Result<(), BackendError> {
                Err("the device implements neither process_queue nor handle_event".into())
            }

            /// Handle an event on worker `worker`. An error is logged and the
            /// queue's err notifier signalled; the worker keeps running.
            /// The default passes queue events to
            /// [`process_queue`](Self::process_queue) and ignores the others;
            /// a device with fds of its own or a waker overrides it.
            fn handle_event(
                $($ref_)+ $s,
                event: DeviceEvent,
                queues: &QueueSet<Self::Vring>,
                _worker: usize,
            ) -> Result<(), BackendError> {
                match queues.for_event(event) {
                    Some((index, vring)) => $s.process_queue(index, &mut vring.lock()),
                    None => Ok(()),
                }
            }

            /// Queue `index` started running.
            fn queue_started($($ref_)+ $s, _index: u16) {}

            /// Queue `index` stopped; no more events will arrive for it.
            fn queue_stopped($($ref_)+ $s, _index: u16) {}

            /// The driver reset the device.
            fn reset($($ref_)+ $s) {}

            /// Receive the handle used to announce config-space changes.
            fn set_config_notifier($($ref_)+ $s, _notifier: ConfigNotifier) {}

            /// Save the device's own state (not its queues) for a snapshot.
            fn save_state(&self) -> Result<Vec<u8>, BackendError> {
                Ok(Vec::new())
            }

            /// Restore state produced by `save_state`. The bytes are
            /// untrusted: validate them.
            fn restore_state($($ref_)+ $s, data: &[u8]) -> Result<(), BackendError> {
                if data.is_empty() {
                    Ok(())
                } else {
                    Err("this device keeps no state".into())
                }
            }
        }
    };
}

backend_trait!(
    /// A virtio device backend, shared between the control thread and the
    /// worker threads (`&self` methods, interior mutability).
    DeviceBackend, [&] self
);

backend_trait!(
    /// A virtio device backend with `&mut self` methods; use it through
    /// `Mutex<T>` or `RwLock<T>`, which implement [`DeviceBackend`].
    ///
    /// The cost: every call goes through that lock, `handle_event`
    /// included, so each event takes one write lock (`Mutex::lock` or
    /// `RwLock::write`; only the read-only identity methods such as
    /// `features` take a read lock on an `RwLock`). Workers of different
    /// queue groups then run one at a time, and the control thread waits
    /// for a batch in progress. Fine for single-queue devices and for
    /// prototypes; a multi-queue device that wants its queues served in
    /// parallel implements [`DeviceBackend`] with interior mutability of
    /// its own (per-queue state, atomics), as the reference blk device does.
    DeviceBackendMut, [&mut] self
);

// Every wrapper below forwards each method to the device it holds, through
// one accessor for the identity and config reads (`$read`) and one for the
// calls that may change the device (`$write`).
macro_rules! forward_backend {
    ($wrapper:ident<T: $bound:ident>, $read:path, $write:path) => {
        impl<T: $bound> DeviceBackend for $wrapper<T> {
            type Vring = T::Vring;

            fn device_type(&self) -> u32 {
                $read(self).device_type()
            }
            fn num_queues(&self) -> usize {
                $read(self).num_queues()
            }
            fn max_queue_size(&self) -> u16 {
                $read(self).max_queue_size()
            }
            fn features(&self) -> u64 {
                $read(self).features()
            }
            fn protocol_features(&self) -> u64 {
                $read(self).protocol_features()
            }
            fn acked_features(&self, features: u64) {
                $write(self).acked_features(features)
            }
            fn set_event_idx(&self, enabled: bool) {
                $write(self).set_event_idx(enabled)
            }
            fn config_size(&self) -> usize {
                $read(self).config_size()
            }
            fn read_config(&self, offset: u32, data: &mut [u8]) {
                $read(self).read_config(offset, data)
            }
            fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), BackendError> {
                $write(self).write_config(offset, data)
            }
            fn update_memory(&self, mem: &GuestMemoryHandle) -> Result<(), BackendError> {
                $write(self).update_memory(mem)
            }
            fn queue_groups(&self) -> Vec<u64> {
                $read(self).queue_groups()
            }
            fn worker_fds(&self, worker: usize) -> Vec<(RawFd, u64)> {
                $read(self).worker_fds(worker)
            }
            fn exit_event(&self, worker: usize) -> Option<EventFd> {
                $read(self).exit_event(worker)
            }
            fn set_waker(&self, worker: usize, waker: crate::core::WorkerWaker) {
                $write(self).set_waker(worker, waker)
            }
            fn handle_event(
                &self,
                event: DeviceEvent,
                queues: &QueueSet<Self::Vring>,
                worker: usize,
            ) -> Result<(), BackendError> {
                $write(self).handle_event(event, queues, worker)
            }
            fn process_queue(&self, index: u16, vring: &mut Vring) -> Result<(), BackendError> {
                $write(self).process_queue(index, vring)
            }
            fn queue_started(&self, index: u16) {
                $write(self).queue_started(index)
            }
            fn queue_stopped(&self, index: u16) {
                $write(self).queue_stopped(index)
            }
            fn reset(&self) {
                $write(self).reset()
            }
            fn set_config_notifier(&self, notifier: ConfigNotifier) {
                $write(self).set_config_notifier(notifier)
            }
            fn save_state(&self) -> Result<Vec<u8>, BackendError> {
                $read(self).save_state()
            }
            fn restore_state(&self, data: &[u8]) -> Result<(), BackendError> {
                $write(self).restore_state(data)
            }
        }
    };
}

// A lock poisoned by a panic elsewhere still holds the device: the
// wrappers keep calling it rather than panic on every later call.
fn lock_mutex<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read_rwlock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write_rwlock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
fn shared<T>(a: &Arc<T>) -> &T {
    a
}

forward_backend!(Mutex<T: DeviceBackendMut>, lock_mutex, lock_mutex);
forward_backend!(RwLock<T: DeviceBackendMut>, read_rwlock, write_rwlock);
forward_backend!(Arc<T: DeviceBackend>, shared, shared);
