// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A conformance harness: one device, driven through the same traffic in
//! every home and moved between them in between.
//!
//! [`Conformance::run`] activates a fresh device in the `from` home, runs
//! the caller's traffic ([`Phase::Before`]), snapshots the device, passes
//! the snapshot through the versioned envelope as a real move does,
//! restores it into a fresh device in the `to` home, and runs the traffic
//! again ([`Phase::After`]) on the same rings. The homes:
//!
//! - [`Home::InProcess`]: a [`DeviceCore`](crate::core::DeviceCore) on worker threads, as a VMM
//!   embeds it;
//! - [`Home::EventLoop`]: the same core with its data plane on an
//!   `event-manager` loop ([`DeviceCore::with_event_loop`](crate::core::DeviceCore::with_event_loop)),
//!   as a VMM that runs devices on its own loop embeds it (the loop on a
//!   thread of the harness);
//! - [`Home::VhostUser`]: the kit's [`VhostUserDaemon`] on one end of a
//!   unix socket pair, driven through the VMM-side
//!   [`VhostUserFrontendDevice`]; the device's own state crosses through
//!   `DEVICE_STATE`.
//!
//! The traffic closure gets the [`Rig`] (guest memory, one driver per
//! queue, the interrupt line) and the device of the current home, so it can
//! play the host side too (a console's host input, a disk image).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{shared_guest_memory, Interrupt, SplitQueueDriver};
use crate::backend::DeviceBackend;
use crate::core::{Activation, ControlError, CoreError, DeviceControl};
use crate::frontend::{FrontendError, FrontendOptions, VhostUserFrontendDevice};
use crate::memory::GuestMemoryLog;
use crate::snapshot::{self, SnapshotError};
use crate::vhost_user::{DaemonError, VhostUserDaemon};

/// Guest-physical address of the harness's guest memory.
const MEMORY_GPA: u64 = 0x10_0000;
/// Room per queue: three ring pages and the queue's buffers.
const QUEUE_AREA: u64 = 0x10_0000;
/// virtio feature bits the harness's driver does not implement: EVENT_IDX,
/// the vhost-user protocol-feature bit, packed rings (34).
const UNSUPPORTED_FEATURES: u64 =
    VIRTIO_RING_F_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES | (1 << 34);
use crate::features::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Where a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    /// In process: a [`DeviceCore`](crate::core::DeviceCore) on worker threads.
    InProcess,
    /// In process, the data plane on an `event-manager` loop.
    EventLoop,
    /// Out of process: the kit's vhost-user daemon, reached through the
    /// VMM-side adapter (here on a thread of the test, over a socket).
    VhostUser,
}

impl Home {
    /// Every home.
    pub const ALL: [Home; 3] = [Home::InProcess, Home::EventLoop, Home::VhostUser];

    fn name(self) -> &'static str {
        match self {
            Home::InProcess => "in-process",
            Home::EventLoop => "event-loop",
            Home::VhostUser => "vhost-user",
        }
    }
}

impl std::fmt::Display for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which side of the move the traffic runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// In the first home, after activation.
    Before,
    /// In the second home, after the restore.
    After,
}

/// Why a conformance run failed (the traffic's own checks panic, as test
/// assertions do).
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// Guest memory could not be created.
    #[error("cannot create guest memory")]
    Memory(#[source] std::io::Error),
    /// The in-process home could not be built.
    #[error("cannot build the in-process home")]
    Core(#[source] CoreError),
    /// The event-manager loop could not be built.
    #[error("cannot build the event loop")]
    EventLoop(#[source] event_manager::Error),
    /// The daemon could not be built.
    #[error("cannot build the vhost-user daemon")]
    Daemon(#[source] DaemonError),
    /// The socket pair for the daemon could not be made.
    #[error("cannot make the vhost-user socket")]
    Socket(#[source] std::io::Error),
    /// The VMM-side adapter could not connect.
    #[error("cannot connect to the vhost-user daemon")]
    Connect(#[source] FrontendError),
    /// A step of the run failed in a home.
    #[error("{step} failed in the {home} home")]
    Step {
        /// activate, snapshot or restore.
        step: &'static str,
        /// Where.
        home: Home,
        /// Cause.
        #[source]
        source: ControlError,
    },
    /// The snapshot did not survive the versioned envelope.
    #[error("the snapshot does not round-trip through the envelope")]
    Envelope(#[source] SnapshotError),
}

/// What a move showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveReport {
    /// The first home.
    pub from: Home,
    /// The second home.
    pub to: Home,
    /// Bytes of the device's own state that crossed.
    pub device_state_len: usize,
    /// Bytes of the whole snapshot in its envelope.
    pub snapshot_len: usize,
}

/// The driver's side of a run: guest memory, one split-queue driver per
/// queue with its kick, and the interrupt line all queues share.
#[derive(Debug)]
pub struct Rig {
    /// Guest memory (a memfd, shared with the vhost-user daemon).
    pub memory: GuestMemoryLog,
    /// One driver per queue; buffers go from its
    /// [`SplitQueueDriver::data_area`] on (1 MiB per queue, rings included).
    pub queues: Vec<SplitQueueDriver>,
    /// The interrupt line.
    pub interrupt: Interrupt,
    kicks: Vec<EventFd>,
}

impl Rig {
    /// Notify the device that queue `index` has new buffers.
    pub fn kick(&self, index: usize) {
        if let Some(kick) = self.kicks.get(index) {
            // A full eventfd counter still wakes the device.
            let _ = kick.write(1);
        }
    }

    /// Wait up to `timeout` for the next used entry `(id, len)` of queue
    /// `index`.
    pub fn wait_used(&mut self, index: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.queues.get_mut(index)?.pop_used() {
                return Some(used);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            // Interrupts may be suppressed or already taken: look again
            // at least every 10 ms.
            self.interrupt.wait(left.min(Duration::from_millis(10)));
        }
    }

    fn activation(&mut self, features: u64) -> Activation {
        let (queues, kicks) = self
            .queues
            .iter()
            .map(|q| q.activation(&self.interrupt))
            .unzip();
        self.kicks = kicks;
        Activation {
            features,
            memory: self.memory.clone(),
            queues,
        }
    }
}

/// One device under test, in whichever home.
struct Placed<B> {
    control: Box<dyn DeviceControl>,
    device: Arc<B>,
    /// The daemon's thread (vhost-user), or the event loop's thread and its
    /// stop flag (event loop).
    daemon: Option<JoinHandle<()>>,
    event_loop: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

impl<B> Placed<B> {
    /// Let the device go: the adapter's socket closes, which ends the
    /// daemon's session, and its thread is waited for; an event loop is
    /// stopped once the core has taken its queues back.
    fn retire(self) {
        let Placed {
            control,
            daemon,
            event_loop,
            ..
        } = self;
        drop(control);
        if let Some(daemon) = daemon {
            let _ = daemon.join();
        }
        if let Some((thread, stop)) = event_loop {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

/// Run `subscribers` on an `event-manager` loop on a thread of its own
/// until the flag is set.
fn spawn_event_loop<B: DeviceBackend + 'static>(
    subscribers: Vec<crate::core::DataPlaneSubscriber<B>>,
) -> Result<(JoinHandle<()>, Arc<AtomicBool>), ConformanceError> {
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(ConformanceError::EventLoop)?;
    for s in subscribers {
        em.add_subscriber(Box::new(s));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_loop = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop_loop.load(Ordering::SeqCst) {
            if let Err(e) = em.run_with_timeout(20) {
                log::error!("conformance event loop: {e:?}");
                return;
            }
        }
    });
    Ok((thread, stop))
}

/// The harness for devices `make` builds (a fresh one per home).
pub struct Conformance<B> {
    make: Box<dyn Fn() -> Arc<B>>,
    queue_size: u16,
    features: Option<u64>,
}

impl<B> std::fmt::Debug for Conformance<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conformance")
            .field("queue_size", &self.queue_size)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl<B: DeviceBackend + 'static> Conformance<B> {
    /// A harness for devices from `make`. Queues get the device's largest
    /// size (at most 256); the features negotiated are the device's, less
    /// what the driver does not implement (EVENT_IDX, packed rings).
    pub fn new(make: impl Fn() -> Arc<B> + 'static) -> Self {
        Conformance {
            make: Box::new(make),
            queue_size: 256,
            features: None,
        }
    }

    /// Negotiate `features` instead.
    pub fn features(mut self, features: u64) -> Self {
        self.features = Some(features);
        self
    }

    /// Queues of `size` entries (a power of two up to 256).
    pub fn queue_size(mut self, size: u16) -> Self {
        self.queue_size = size;
        self
    }

    /// Traffic in `from`, a move to `to`, the same traffic again.
    pub fn run(
        &self,
        from: Home,
        to: Home,
        mut traffic: impl FnMut(&mut Rig, Phase, &B),
    ) -> Result<MoveReport, ConformanceError> {
        let mut first = self.place(from)?;
        let queues = first.control.num_queues();
        let size = self.queue_size.min(first.control.max_queue_size());
        let features = self.features.unwrap_or_else(|| {
            (first.control.device_features() & !UNSUPPORTED_FEATURES) | VIRTIO_F_VERSION_1
        });
        let memory = shared_guest_memory(MEMORY_GPA, queues.max(1) * QUEUE_AREA as usize)
            .map_err(ConformanceError::Memory)?;
        let mut rig = Rig {
            queues: (0..queues)
                .map(|i| {
                    let area = MEMORY_GPA + i as u64 * QUEUE_AREA;
                    SplitQueueDriver::new(&memory, i as u16, size, area)
                })
                .collect(),
            memory,
            interrupt: Interrupt::new(),
            kicks: Vec::new(),
        };
        let activation = rig.activation(features);
        first
            .control
            .activate(activation)
            .map_err(|source| step("activate", from, source))?;
        traffic(&mut rig, Phase::Before, &first.device);

        let snap = first
            .control
            .snapshot()
            .map_err(|source| step("snapshot", from, source))?;
        first.retire();
        let bytes = snapshot::encode(&snap).map_err(ConformanceError::Envelope)?;
        let snap = snapshot::decode(&bytes).map_err(ConformanceError::Envelope)?;
        let device_state_len = snap.device_state.len();

        let mut second = self.place(to)?;
        let activation = rig.activation(features);
        second
            .control
            .restore(snap, activation)
            .map_err(|source| step("restore", to, source))?;
        traffic(&mut rig, Phase::After, &second.device);
        second.retire();
        Ok(MoveReport {
            from,
            to,
            device_state_len,
            snapshot_len: bytes.len(),
        })
    }

    /// [`Conformance::run`] for every pair of homes, a home to itself
    /// included (a restart in place).
    pub fn run_all(
        &self,
        mut traffic: impl FnMut(&mut Rig, Phase, &B),
    ) -> Result<Vec<MoveReport>, ConformanceError> {
        let mut reports = Vec::new();
        for from in Home::ALL {
            for to in Home::ALL {
                reports.push(self.run(from, to, &mut traffic)?);
            }
        }
        Ok(reports)
    }

    fn place(&self, home: Home) -> Result<Placed<B>, ConformanceError> {
        let device = (self.make)();
        match home {
            Home::InProcess => {
                let core =
                    crate::core::DeviceCore::new(device.clone()).map_err(ConformanceError::Core)?;
                Ok(Placed {
                    control: Box::new(core),
                    device,
                    daemon: None,
                    event_loop: None,
                })
            }
            Home::EventLoop => {
                let (core, subscribers) = crate::core::DeviceCore::with_event_loop(device.clone())
                    .map_err(ConformanceError::Core)?;
                Ok(Placed {
                    control: Box::new(core),
                    device,
                    daemon: None,
                    event_loop: Some(spawn_event_loop(subscribers)?),
                })
            }
            Home::VhostUser => {
                let (vmm_end, daemon_end) = UnixStream::pair().map_err(ConformanceError::Socket)?;
                let mut daemon =
                    VhostUserDaemon::new(device.clone()).map_err(ConformanceError::Daemon)?;
                let thread = std::thread::spawn(move || {
                    daemon.serve_stream(daemon_end);
                });
                let mut options = FrontendOptions::new(
                    device.device_type(),
                    device.num_queues(),
                    device.max_queue_size(),
                );
                options.stateful = true;
                let adapter = VhostUserFrontendDevice::from_stream(vmm_end, options)
                    .map_err(ConformanceError::Connect)?;
                Ok(Placed {
                    control: Box::new(adapter),
                    device,
                    daemon: Some(thread),
                    event_loop: None,
                })
            }
        }
    }
}

fn step(step: &'static str, home: Home, source: ControlError) -> ConformanceError {
    ConformanceError::Step { step, home, source }
}
