// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-console with one port (no MULTIPORT): a device with state of its
//! own, the bytes the host sent that the guest has not taken yet.
//!
//! Queue 0 (receiveq) carries host → guest bytes, queue 1 (transmitq)
//! guest → host. The host side is two fds: `input` (read) and `output`
//! (written). An input that can be polled (a terminal, a pipe, a socket) is
//! one of the worker's fds; one that cannot (a regular file, `/dev/null`:
//! epoll refuses them) is read whenever the device has room, the device
//! waking its own worker ([`WorkerWaker::wake`]) while that makes progress.
//!
//! Host input is read into a bounded buffer ([`MAX_PENDING`]), once the
//! driver has started the receive queue, and copied into the receive
//! buffers the guest posts. While the buffer is full (the
//! guest takes nothing) the device pauses its input fd (a [`WorkerWaker`]):
//! the fd stays readable and would otherwise be polled for ever. It
//! resumes the fd from the receive-queue event that makes room. Bytes still buffered are
//! the device's state: [`DeviceBackend::save_state`] saves them, so a
//! console changing home (in process ↔ vhost-user) loses none.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use log::warn;
use virtio_backend_kit::core::WorkerWaker;
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::{BackendError, DeviceBackend, DeviceEvent, QueueSet, VringOwned, VringT};

/// Virtio device ID of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
const RECEIVEQ: u16 = 0;
const TRANSMITQ: u16 = 1;
/// Token of the host input fd.
const INPUT: u64 = 0;
/// Host bytes buffered for the guest at most.
pub const MAX_PENDING: usize = 64 << 10;
/// Bytes copied per descriptor at most (the guest picks lengths).
const CHUNK: usize = 4096;
/// First byte of the saved state: its format.
const STATE_V1: u8 = 1;

/// Errors setting up a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The queue size is not a power of two up to 32768.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// The host fds could not be made non-blocking.
    #[error("cannot set up the host fds")]
    HostFd(#[source] std::io::Error),
}

/// What the worker shares with the control side.
#[derive(Debug, Default)]
struct State {
    /// Host bytes not yet given to the guest.
    pending: VecDeque<u8>,
    /// The input fd is paused (full buffer or no receive buffers).
    input_paused: bool,
    /// The host input reached end of file.
    input_closed: bool,
    waker: Option<WorkerWaker>,
}

/// Whether epoll can watch `file` (regular files and `/dev/null` it
/// refuses with EPERM).
fn pollable(file: &File) -> std::io::Result<bool> {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let epoll = Epoll::new()?;
    match epoll.ctl(
        ControlOperation::Add,
        file.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    ) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A one-port virtio-console (see the module docs).
#[derive(Debug)]
pub struct ConsoleDevice {
    input: File,
    /// `input` is a worker fd (else it is read when there is room).
    input_pollable: bool,
    output: Mutex<File>,
    queue_size: u16,
    state: Mutex<State>,
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own; F_GETFL/F_SETFL touch only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl ConsoleDevice {
    /// A console reading host input from `input` and writing guest output
    /// to `output` (blocking writes: a host that stops reading stalls the
    /// transmit queue, as a terminal does), queues of up to `queue_size`.
    pub fn new(input: File, output: File, queue_size: u16) -> Result<Self, ConsoleError> {
        if !super::valid_queue_size(queue_size) {
            return Err(ConsoleError::QueueSize(queue_size));
        }
        set_nonblocking(&input).map_err(ConsoleError::HostFd)?;
        let input_pollable = pollable(&input).map_err(ConsoleError::HostFd)?;
        Ok(ConsoleDevice {
            input,
            input_pollable,
            output: Mutex::new(output),
            queue_size,
            state: Mutex::new(State::default()),
        })
    }

    /// Host bytes buffered for the guest.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Read host input into the buffer, up to its bound; returns how many
    /// bytes came.
    fn read_input(&self, st: &mut State) -> usize {
        let mut buf = [0u8; CHUNK];
        let mut read = 0;
        while st.pending.len() < MAX_PENDING && !st.input_closed {
            let room = (MAX_PENDING - st.pending.len()).min(CHUNK);
            match (&self.input).read(&mut buf[..room]) {
                Ok(0) => st.input_closed = true,
                Ok(n) => {
                    st.pending.extend(&buf[..n]);
                    read += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("virtio-console: host input: {e}; closed");
                    st.input_closed = true;
                }
            }
        }
        read
    }

    /// Copy buffered bytes into the guest's receive buffers; returns how
    /// many buffers were filled.
    fn deliver(
        &self,
        st: &mut State,
        queues: &QueueSet<VringOwned>,
    ) -> Result<usize, BackendError> {
        let Some(vring) = queues.get(RECEIVEQ) else {
            return Ok(0);
        };
        let mut vring = vring.lock();
        let mem = vring.memory();
        let mut completed = 0;
        while !st.pending.is_empty() {
            let Some(chain) = vring.pop_chain()? else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                let n = (desc.len() as usize).min(CHUNK).min(st.pending.len());
                let bytes: Vec<u8> = st.pending.iter().take(n).copied().collect();
                if let Err(e) = mem.write_slice(&bytes, desc.addr()) {
                    warn!("virtio-console: receive buffer of chain {head}: {e}");
                    break;
                }
                st.pending.drain(..n);
                written += n as u32;
                if st.pending.is_empty() {
                    break;
                }
            }
            vring.add_used(head, written)?;
            completed += 1;
        }
        if completed > 0 {
            vring.notify_if_needed()?;
        }
        Ok(completed)
    }

    /// Pause the input fd while nothing more can be taken from it (the
    /// buffer is full, it is at end of file and readable for ever, or the
    /// receive queue is not running), resume it when there is room again.
    fn steer_input(&self, st: &mut State, receiving: bool) {
        if !self.input_pollable {
            return;
        }
        let want_paused = st.input_closed || st.pending.len() >= MAX_PENDING || !receiving;
        if want_paused == st.input_paused {
            return;
        }
        if let Some(w) = &st.waker {
            if want_paused {
                w.pause_fd(INPUT);
            } else {
                w.resume_fd(INPUT);
            }
            st.input_paused = want_paused;
        }
    }

    /// Send what the guest transmitted to the host.
    fn transmit(&self, queues: &QueueSet<VringOwned>) -> Result<(), BackendError> {
        let Some(vring) = queues.get(TRANSMITQ) else {
            return Ok(());
        };
        let mut vring = vring.lock();
        let mem = vring.memory();
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = [0u8; CHUNK];
        for _ in 0..vring.batch_limit() {
            let Some(chain) = vring.pop_chain()? else {
                break;
            };
            let head = chain.head_index();
            for desc in chain.readable() {
                let mut at = 0u64;
                while at < u64::from(desc.len()) {
                    let n = (u64::from(desc.len()) - at).min(CHUNK as u64) as usize;
                    let Some(addr) = desc.addr().0.checked_add(at) else {
                        break;
                    };
                    if let Err(e) = mem.read_slice(&mut buf[..n], GuestAddress(addr)) {
                        warn!("virtio-console: transmit buffer of chain {head}: {e}");
                        break;
                    }
                    if let Err(e) = out.write_all(&buf[..n]) {
                        warn!("virtio-console: host output: {e}");
                    }
                    at += n as u64;
                }
            }
            vring.add_used(head, 0)?;
        }
        if vring.pending()? > 0 {
            vring.defer();
        }
        vring.notify_if_needed()?;
        Ok(())
    }
}

impl DeviceBackend for ConsoleDevice {
    type Vring = VringOwned;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }
    fn config_size(&self) -> usize {
        // cols, rows, max_nr_ports, emerg_wr: meaningful only with features
        // this device does not offer, but the space exists.
        12
    }
    fn worker_fds(&self, _worker: usize) -> Vec<(RawFd, u64)> {
        if self.input_pollable {
            vec![(self.input.as_raw_fd(), INPUT)]
        } else {
            Vec::new()
        }
    }
    fn set_waker(&self, _worker: usize, waker: WorkerWaker) {
        if !self.input_pollable {
            // Nothing will say the input is readable: take the first look.
            waker.wake();
        }
        self.lock().waker = Some(waker);
    }
    fn handle_event(
        &self,
        event: DeviceEvent,
        queues: &QueueSet<VringOwned>,
        _worker: usize,
    ) -> Result<(), BackendError> {
        match event {
            DeviceEvent::Queue(TRANSMITQ) => return self.transmit(queues),
            DeviceEvent::Fd(INPUT) | DeviceEvent::Queue(RECEIVEQ) | DeviceEvent::Wake => {}
            _ => return Ok(()),
        }
        let mut st = self.lock();
        // Host input is taken only once the guest can receive it: bytes
        // read before the driver started the receive queue would be
        // thrown away by the driver's reset.
        let receiving = queues.get(RECEIVEQ).is_some();
        let read = if receiving {
            self.read_input(&mut st)
        } else {
            0
        };
        let filled = self.deliver(&mut st, queues)?;
        self.steer_input(&mut st, receiving);
        if !self.input_pollable && !st.input_closed && (read > 0 || filled > 0) {
            // Progress, and more may come: look again after the worker's
            // other events. Without progress (the buffer full, no receive
            // buffers) the next receive-queue event looks again: no spin.
            if let Some(w) = &st.waker {
                w.wake();
            }
        }
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, BackendError> {
        let st = self.lock();
        let mut out = Vec::with_capacity(1 + st.pending.len());
        out.push(STATE_V1);
        out.extend(&st.pending);
        Ok(out)
    }
    fn restore_state(&self, data: &[u8]) -> Result<(), BackendError> {
        let mut st = self.lock();
        match data.split_first() {
            None => st.pending.clear(),
            Some((&STATE_V1, bytes)) if bytes.len() <= MAX_PENDING => {
                st.pending = bytes.iter().copied().collect();
            }
            Some((&STATE_V1, bytes)) => {
                return Err(format!(
                    "console state of {} bytes exceeds {MAX_PENDING}",
                    bytes.len()
                )
                .into())
            }
            Some((v, _)) => return Err(format!("unknown console state format {v}").into()),
        }
        Ok(())
    }
    fn reset(&self) {
        self.lock().pending.clear();
    }
}
