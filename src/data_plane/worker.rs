// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data plane: the loop that owns a queue group's vrings.
//!
//! A [`WorkerLoop`] owns the vrings of its queue group and reacts to their
//! kick eventfds, the device's own fds, its control eventfd and exit events.
//! The control core hands a vring over with [`WorkerCommand::Start`] and
//! takes it back with [`WorkerCommand::Stop`]; between the two, only the
//! loop touches it, so the hot path takes no lock.
//!
//! The same loop runs in two flavours: on a thread of its own, epoll-waiting
//! ([`WorkerHandle::spawn`]), or as an `event-manager` subscriber on a VMM's
//! event loop ([`super::event_loop::DataPlaneSubscriber`]). Only the
//! [`FdRegistry`] differs.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::waker::{FdChange, WorkerWaker};
use crate::backend::{DeviceBackend, DeviceEvent, QueueSet};
use crate::vring::{Vring, VringState, VringT};

pub(crate) const TOKEN_CONTROL: u64 = 0;
pub(crate) const TOKEN_EXIT: u64 = 1;
pub(crate) const TOKEN_DEVICE_EXIT: u64 = 2;
pub(crate) const TOKEN_KICK_BASE: u64 = 0x1000;
pub(crate) const TOKEN_DEVICE_BASE: u64 = 1 << 32;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An epoll or eventfd operation failed.
    #[error("worker setup failed")]
    Setup(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn worker thread")]
    Spawn(#[source] std::io::Error),
}

/// What the control core asks of a worker.
pub(crate) enum WorkerCommand {
    /// Take ownership of a vring and start serving it.
    Start { vring: Vring, kick: EventFd },
    /// Stop serving a vring and send its state back.
    Stop {
        index: u16,
        reply: SyncSender<Option<VringState>>,
    },
    /// The device asked to run (a [`WorkerWaker::wake`]).
    Wake,
    /// The device changes the fds polled for it.
    DeviceFd(FdChange),
}

/// Registration of fds with whatever waits on them.
pub(crate) trait FdRegistry {
    /// Watch `fd` for input; events come back with `token`.
    fn add(&mut self, fd: RawFd, token: u64) -> std::io::Result<()>;
    /// Stop watching `fd`.
    fn remove(&mut self, fd: RawFd, token: u64) -> std::io::Result<()>;
}

impl FdRegistry for Epoll {
    fn add(&mut self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    fn remove(&mut self, fd: RawFd, _token: u64) -> std::io::Result<()> {
        self.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// Whether the loop goes on after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Exit,
}

/// Starts a worker thread the first time it is needed.
type PendingSpawn = Box<dyn FnOnce() -> std::io::Result<JoinHandle<()>> + Send>;

/// The control core's handle to one data-plane loop.
pub(crate) struct WorkerHandle {
    commands: Sender<WorkerCommand>,
    wake: EventFd,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
    /// A threaded worker not spawned yet: idle queues cost no thread.
    pending: Option<PendingSpawn>,
}

impl WorkerHandle {
    /// Create the loop for worker `id` of `backend`, without running it.
    pub(crate) fn new_loop<B: DeviceBackend>(
        id: usize,
        backend: Arc<B>,
    ) -> Result<(Self, WorkerLoop<B>), WorkerError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::Setup)?;
        let exit = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::Setup)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let wake_pending = Arc::new(AtomicBool::new(false));
        backend.set_waker(
            id,
            WorkerWaker::new(
                id,
                tx.clone(),
                wake.try_clone().map_err(WorkerError::Setup)?,
                wake_pending.clone(),
            ),
        );
        let worker = WorkerLoop {
            id,
            queues: QueueSet::new(backend.num_queues()),
            device_exit: backend.exit_event(id),
            device_fds: backend
                .worker_fds(id)
                .into_iter()
                .map(|(fd, token)| DeviceFd {
                    fd,
                    token,
                    paused: false,
                })
                .collect(),
            wake_pending,
            backend,
            commands: rx,
            wake: wake.try_clone().map_err(WorkerError::Setup)?,
            exit: exit.try_clone().map_err(WorkerError::Setup)?,
            kicks: Vec::new(),
            deferred: Vec::new(),
        };
        let handle = WorkerHandle {
            commands: tx,
            wake,
            exit,
            thread: None,
            pending: None,
        };
        Ok((handle, worker))
    }

    /// Worker `id` for `backend` on a thread of its own, spawned when the
    /// first command (a queue start) arrives.
    pub(crate) fn spawn<B: DeviceBackend>(id: usize, backend: Arc<B>) -> Result<Self, WorkerError> {
        let (mut handle, worker) = Self::new_loop(id, backend)?;
        let mut epoll = Epoll::new().map_err(WorkerError::Setup)?;
        worker.register(&mut epoll).map_err(WorkerError::Setup)?;
        handle.pending = Some(Box::new(move || {
            std::thread::Builder::new()
                .name(format!("vbk-worker-{id}"))
                .spawn(move || worker.run(epoll))
        }));
        Ok(handle)
    }

    /// Whether the worker's thread runs (false before its first queue and
    /// for workers on an event loop).
    pub(crate) fn has_thread(&self) -> bool {
        self.thread.is_some()
    }

    /// Send a command and wake the worker. Returns false if the worker is gone.
    pub(crate) fn send(&mut self, cmd: WorkerCommand) -> bool {
        if let Some(spawn) = self.pending.take() {
            match spawn() {
                Ok(thread) => self.thread = Some(thread),
                Err(e) => {
                    error!("cannot spawn a worker thread: {e}");
                    return false;
                }
            }
        }
        if self.commands.send(cmd).is_err() {
            return false;
        }
        self.wake.write(1).is_ok()
    }

    /// Whether the worker is still running.
    pub(crate) fn is_alive(&self) -> bool {
        match &self.thread {
            Some(t) => !t.is_finished(),
            // Not spawned yet, or on an event loop: alive as long as it
            // holds the receiver, which `send` detects.
            None => true,
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("a worker thread panicked");
            }
        }
    }
}

/// One queue group's data plane.
pub(crate) struct WorkerLoop<B: DeviceBackend> {
    id: usize,
    backend: Arc<B>,
    queues: QueueSet<B::Vring>,
    commands: Receiver<WorkerCommand>,
    wake: EventFd,
    exit: EventFd,
    /// Kick eventfds of the running queues, by queue index.
    kicks: Vec<Option<EventFd>>,
    device_exit: Option<EventFd>,
    device_fds: Vec<DeviceFd>,
    /// A [`WorkerWaker::wake`] is queued.
    wake_pending: Arc<AtomicBool>,
    /// Queues whose device asked to run again ([`Vring::defer`]).
    deferred: Vec<u16>,
}

/// One fd the device asked the worker to poll.
#[derive(Clone, Copy, Debug)]
struct DeviceFd {
    fd: RawFd,
    token: u64,
    paused: bool,
}

impl<B: DeviceBackend> WorkerLoop<B> {
    /// Register the loop's fixed fds.
    pub(crate) fn register(&self, reg: &mut dyn FdRegistry) -> std::io::Result<()> {
        reg.add(self.wake.as_raw_fd(), TOKEN_CONTROL)?;
        reg.add(self.exit.as_raw_fd(), TOKEN_EXIT)?;
        if let Some(evt) = &self.device_exit {
            reg.add(evt.as_raw_fd(), TOKEN_DEVICE_EXIT)?;
        }
        for d in &self.device_fds {
            reg.add(d.fd, TOKEN_DEVICE_BASE + d.token)?;
        }
        Ok(())
    }

    /// Apply a device's change to the fds polled for it.
    fn change_device_fd(&mut self, change: FdChange, reg: &mut dyn FdRegistry) {
        let find = |fds: &[DeviceFd], token| fds.iter().position(|d| d.token == token);
        let result = match change {
            FdChange::Add(fd, token) => {
                if find(&self.device_fds, token).is_some() {
                    warn!("worker {}: device fd token {token} is taken", self.id);
                    return;
                }
                self.device_fds.push(DeviceFd {
                    fd,
                    token,
                    paused: false,
                });
                reg.add(fd, TOKEN_DEVICE_BASE + token)
            }
            FdChange::Pause(token) | FdChange::Remove(token) => {
                let Some(i) = find(&self.device_fds, token) else {
                    return;
                };
                let d = self.device_fds[i];
                if matches!(change, FdChange::Remove(_)) {
                    self.device_fds.remove(i);
                } else {
                    self.device_fds[i].paused = true;
                }
                if d.paused {
                    Ok(())
                } else {
                    reg.remove(d.fd, TOKEN_DEVICE_BASE + token)
                }
            }
            FdChange::Resume(token) => {
                let Some(i) = find(&self.device_fds, token) else {
                    return;
                };
                if !self.device_fds[i].paused {
                    return;
                }
                self.device_fds[i].paused = false;
                reg.add(self.device_fds[i].fd, TOKEN_DEVICE_BASE + token)
            }
        };
        if let Err(e) = result {
            warn!("worker {}: {change:?}: {e}", self.id);
        }
    }

    fn run(mut self, mut epoll: Epoll) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("worker {}: epoll_wait failed: {e}", self.id);
                    return;
                }
            };
            for ev in &events[..n] {
                if self.on_event(ev.data(), &mut epoll) == Flow::Exit {
                    return;
                }
            }
        }
    }

    /// React to the event carrying `token`.
    pub(crate) fn on_event(&mut self, token: u64, reg: &mut dyn FdRegistry) -> Flow {
        match token {
            TOKEN_CONTROL => {
                let _ = self.wake.read();
                self.drain_commands(reg);
                // Queues whose device stopped a batch with work left run
                // again now: after the kicks and commands that were
                // pending, so no queue and no stop request waits for them.
                for index in std::mem::take(&mut self.deferred) {
                    if self.queues.get(index).is_some() {
                        self.dispatch(DeviceEvent::Queue(index));
                    }
                }
            }
            TOKEN_EXIT => {
                self.stop_all(reg);
                return Flow::Exit;
            }
            TOKEN_DEVICE_EXIT => {
                debug!("worker {}: device asked to exit", self.id);
                self.stop_all(reg);
                return Flow::Exit;
            }
            t if (TOKEN_KICK_BASE..TOKEN_DEVICE_BASE).contains(&t) => {
                let index = (t - TOKEN_KICK_BASE) as u16;
                let Some(Some(kick)) = self.kicks.get(usize::from(index)) else {
                    return Flow::Continue;
                };
                // Consume the counter; the device drains the ring.
                match kick.read() {
                    // An eventfd never reads 0: this is a pipe or socket at
                    // EOF, readable forever. Stop polling it (no spinning)
                    // and report the queue broken; a new SET_VRING_KICK
                    // restarts it.
                    Ok(0) => self.kick_broken(index, t, reg, "at end of file"),
                    Ok(_) => self.dispatch(DeviceEvent::Queue(index)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => self.kick_broken(index, t, reg, &e.to_string()),
                }
            }
            t => self.dispatch(DeviceEvent::Fd(t - TOKEN_DEVICE_BASE)),
        }
        Flow::Continue
    }

    fn kick_broken(&mut self, index: u16, token: u64, reg: &mut dyn FdRegistry, why: &str) {
        if let Some(Some(kick)) = self.kicks.get(usize::from(index)) {
            let _ = reg.remove(kick.as_raw_fd(), token);
        }
        error!(
            "worker {}: kick fd of queue {index} {why}; no longer polled",
            self.id
        );
        if let Some(v) = self.queues.get(index) {
            v.lock().signal_error();
        }
    }

    fn dispatch(&mut self, event: DeviceEvent) {
        if let Err(e) = self.backend.handle_event(event, &self.queues, self.id) {
            warn!("worker {}: {event:?}: {e}", self.id);
            if let DeviceEvent::Queue(index) = event {
                if let Some(v) = self.queues.get(index) {
                    v.lock().signal_error();
                }
            }
        }
        if let DeviceEvent::Queue(index) = event {
            let again = self
                .queues
                .get(index)
                .is_some_and(|v| v.lock().take_deferred());
            if again && !self.deferred.contains(&index) {
                self.deferred.push(index);
                // Our own control eventfd: the loop comes back after the
                // other ready events.
                let _ = self.wake.write(1);
            }
        }
    }

    fn drain_commands(&mut self, reg: &mut dyn FdRegistry) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                WorkerCommand::Start { vring, kick } => self.start(vring, kick, reg),
                WorkerCommand::Wake => {
                    self.wake_pending.store(false, Ordering::SeqCst);
                    self.dispatch(DeviceEvent::Wake);
                }
                WorkerCommand::DeviceFd(change) => self.change_device_fd(change, reg),
                WorkerCommand::Stop { index, reply } => {
                    let state = self.stop(index, reg);
                    let _ = reply.send(state);
                }
            }
        }
    }

    fn start(&mut self, vring: Vring, kick: EventFd, reg: &mut dyn FdRegistry) {
        let index = vring.index();
        if self
            .kicks
            .get(usize::from(index))
            .is_some_and(Option::is_some)
        {
            // Restarting a running queue: retire the old one first.
            self.stop(index, reg);
        }
        let token = TOKEN_KICK_BASE + u64::from(index);
        if let Err(e) = reg.add(kick.as_raw_fd(), token) {
            error!(
                "worker {}: cannot poll kick fd of queue {index}: {e}",
                self.id
            );
            return;
        }
        let slot = usize::from(index);
        if self.kicks.len() <= slot {
            self.kicks.resize_with(slot + 1, || None);
        }
        self.kicks[slot] = Some(kick);
        self.queues.insert(index, B::Vring::from_vring(vring));
        self.backend.queue_started(index);
        // Buffers made available before the queue started must not wait for
        // another kick.
        self.dispatch(DeviceEvent::Queue(index));
    }

    fn stop(&mut self, index: u16, reg: &mut dyn FdRegistry) -> Option<VringState> {
        if let Some(kick) = self
            .kicks
            .get_mut(usize::from(index))
            .and_then(Option::take)
        {
            let _ = reg.remove(kick.as_raw_fd(), TOKEN_KICK_BASE + u64::from(index));
        }
        let vring = self.queues.take(index)?;
        self.backend.queue_stopped(index);
        Some(vring.state())
    }

    fn stop_all(&mut self, reg: &mut dyn FdRegistry) {
        let running: Vec<u16> = (0..self.kicks.len() as u16)
            .filter(|q| self.kicks[usize::from(*q)].is_some())
            .collect();
        for index in running {
            self.stop(index, reg);
        }
    }
}
