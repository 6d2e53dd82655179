//! Data-plane worker threads.
//!
//! Each worker owns the vrings of its queue group and epoll-waits on their
//! kick eventfds, the device's own fds, its control eventfd and the exit
//! events. The control core hands a vring over with [`WorkerCommand::Start`]
//! and takes it back with [`WorkerCommand::Stop`]; between the two, only the
//! worker touches it, so the hot path takes no lock.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{DeviceBackend, DeviceEvent, QueueSet};
use crate::vring::{Vring, VringState, VringT};

const TOKEN_CONTROL: u64 = 0;
const TOKEN_EXIT: u64 = 1;
const TOKEN_DEVICE_EXIT: u64 = 2;
const TOKEN_KICK_BASE: u64 = 0x1000;
const TOKEN_DEVICE_BASE: u64 = 1 << 32;

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
}

/// The control core's handle to one worker thread.
pub(crate) struct WorkerHandle {
    commands: Sender<WorkerCommand>,
    wake: EventFd,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Spawn worker `id` for `backend`.
    pub(crate) fn spawn<B: DeviceBackend>(id: usize, backend: Arc<B>) -> Result<Self, WorkerError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::Setup)?;
        let exit = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::Setup)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let epoll = Epoll::new().map_err(WorkerError::Setup)?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(wake.as_raw_fd(), TOKEN_CONTROL).map_err(WorkerError::Setup)?;
        add(exit.as_raw_fd(), TOKEN_EXIT).map_err(WorkerError::Setup)?;
        let device_exit = backend.exit_event(id);
        if let Some(evt) = &device_exit {
            add(evt.as_raw_fd(), TOKEN_DEVICE_EXIT).map_err(WorkerError::Setup)?;
        }
        for (fd, token) in backend.worker_fds(id) {
            add(fd, TOKEN_DEVICE_BASE + token).map_err(WorkerError::Setup)?;
        }
        let worker = Worker {
            id,
            queues: QueueSet::new(backend.num_queues()),
            backend,
            epoll,
            commands: rx,
            wake: wake.try_clone().map_err(WorkerError::Setup)?,
            kicks: HashMap::new(),
            _device_exit: device_exit,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vbk-worker-{id}"))
            .spawn(move || worker.run())
            .map_err(WorkerError::Spawn)?;
        Ok(WorkerHandle {
            commands: tx,
            wake,
            exit,
            thread: Some(thread),
        })
    }

    /// Send a command and wake the worker. Returns false if the worker is gone.
    pub(crate) fn send(&self, cmd: WorkerCommand) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        self.wake.write(1).is_ok()
    }

    /// Whether the worker thread is still running.
    pub(crate) fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
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

struct Worker<B: DeviceBackend> {
    id: usize,
    backend: Arc<B>,
    queues: QueueSet<B::Vring>,
    epoll: Epoll,
    commands: Receiver<WorkerCommand>,
    wake: EventFd,
    kicks: HashMap<u16, EventFd>,
    _device_exit: Option<EventFd>,
}

impl<B: DeviceBackend> Worker<B> {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("worker {}: epoll_wait failed: {e}", self.id);
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_CONTROL => {
                        let _ = self.wake.read();
                        self.drain_commands();
                    }
                    TOKEN_EXIT => {
                        self.stop_all();
                        return;
                    }
                    TOKEN_DEVICE_EXIT => {
                        debug!("worker {}: device asked to exit", self.id);
                        self.stop_all();
                        return;
                    }
                    t if (TOKEN_KICK_BASE..TOKEN_DEVICE_BASE).contains(&t) => {
                        let index = (t - TOKEN_KICK_BASE) as u16;
                        if let Some(kick) = self.kicks.get(&index) {
                            // Consume the counter; the device drains the ring.
                            let _ = kick.read();
                            self.dispatch(DeviceEvent::Queue(index));
                        }
                    }
                    t => self.dispatch(DeviceEvent::Fd(t - TOKEN_DEVICE_BASE)),
                }
            }
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
    }

    fn drain_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                WorkerCommand::Start { vring, kick } => self.start(vring, kick),
                WorkerCommand::Stop { index, reply } => {
                    let state = self.stop(index);
                    let _ = reply.send(state);
                }
            }
        }
    }

    fn start(&mut self, vring: Vring, kick: EventFd) {
        let index = vring.index();
        if self.kicks.contains_key(&index) {
            // Restarting a running queue: hand back the old one first.
            self.stop(index);
        }
        let token = TOKEN_KICK_BASE + u64::from(index);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        ) {
            error!(
                "worker {}: cannot poll kick fd of queue {index}: {e}",
                self.id
            );
            return;
        }
        self.kicks.insert(index, kick);
        self.queues.insert(index, B::Vring::from_vring(vring));
        self.backend.queue_started(index);
        // Buffers made available before the queue started must not wait for
        // another kick.
        self.dispatch(DeviceEvent::Queue(index));
    }

    fn stop(&mut self, index: u16) -> Option<VringState> {
        if let Some(kick) = self.kicks.remove(&index) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                kick.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        let vring = self.queues.take(index)?;
        self.backend.queue_stopped(index);
        let state = vring.state();
        Some(state)
    }

    fn stop_all(&mut self) {
        let running: Vec<u16> = self.kicks.keys().copied().collect();
        for index in running {
            self.stop(index);
        }
    }
}
