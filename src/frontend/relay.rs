// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The relay thread: backend calls and err notifications to the
//! transport's notifiers, backend requests (config change, vring
//! reconfiguration), request deadlines and hang-up detection.

use super::*;
use crate::vhost_user::connection::{encode, Header, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE};

/// The cached config space.
#[derive(Debug, Default)]
pub(super) struct ConfigCache {
    pub(super) bytes: Vec<u8>,
    /// A config-change notice arrived since the last `GET_CONFIG`.
    pub(super) stale: bool,
}

/// A backend call (or err) eventfd and where its wake-ups go.
pub(super) struct RelayedCall {
    pub(super) backend_call: EventFd,
    pub(super) notifier: Notifier,
    /// Wake-ups read from `backend_call` (each may stand for several calls).
    pub(super) received: u64,
    /// Interrupts passed on to the notifier.
    pub(super) relayed: u64,
    /// Reads or notifications that failed.
    pub(super) errors: u64,
}

/// State shared by the control side and the relay thread.
pub(super) struct Shared {
    pub(super) epoll: Epoll,
    /// Indexed by queue (= epoll token).
    pub(super) calls: Mutex<Vec<Option<RelayedCall>>>,
    /// The queues' err eventfds, indexed by queue (epoll token
    /// [`TOKEN_ERR_BASE`] + queue): a backend that gives up on a queue
    /// signals it, and the transport marks the device DEVICE_NEEDS_RESET.
    pub(super) errs: Mutex<Vec<Option<RelayedCall>>>,
    pub(super) config: Mutex<ConfigCache>,
    pub(super) config_notifier: Mutex<Option<ConfigNotifier>>,
    /// When the request in flight must have been answered.
    pub(super) deadline: Mutex<Option<Instant>>,
    /// Wakes the relay to re-read `deadline`.
    pub(super) wake: EventFd,
    pub(super) exit: EventFd,
    pub(super) connected: AtomicBool,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) const TOKEN_EXIT: u64 = u64::MAX;
pub(super) const TOKEN_WAKE: u64 = u64::MAX - 1;
pub(super) const TOKEN_BACKEND_REQ: u64 = u64::MAX - 2;
pub(super) const TOKEN_HANGUP: u64 = u64::MAX - 3;
/// Err eventfds are watched with this plus the queue index as token.
pub(super) const TOKEN_ERR_BASE: u64 = 1 << 32;

/// Arms the request timeout for as long as it lives.
pub(super) struct RequestGuard<'a> {
    pub(super) shared: &'a Shared,
}

impl<'a> RequestGuard<'a> {
    pub(super) fn arm(shared: &'a Shared, timeout: Option<Duration>) -> Self {
        if let Some(t) = timeout {
            *lock(&shared.deadline) = Some(Instant::now() + t);
            let _ = shared.wake.write(1);
        }
        RequestGuard { shared }
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        // The relay sees `None` at its next wake-up; no need to wake it.
        *lock(&self.shared.deadline) = None;
    }
}

/// The relay thread's own state.
pub(super) struct Relay {
    pub(super) shared: Arc<Shared>,
    /// A duplicate of the main socket: watched for hang-up, shut down on a
    /// request timeout.
    pub(super) main_sock: UnixStream,
    pub(super) backend_req: Option<BackendRequests>,
}

impl Relay {
    pub(super) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let timeout_ms = self.timeout_ms();
            let n = match self.shared.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("vhost-user relay: epoll_wait failed: {e}; interrupts stop");
                    return;
                }
            };
            self.check_deadline();
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => return,
                    TOKEN_WAKE => {
                        let _ = self.shared.wake.read();
                    }
                    TOKEN_HANGUP => self.hung_up(),
                    TOKEN_BACKEND_REQ => self.backend_request(),
                    token if token >= TOKEN_ERR_BASE => {
                        let queue = (token - TOKEN_ERR_BASE) as usize;
                        self.relay(&self.shared.errs, queue, "err");
                    }
                    queue => self.relay(&self.shared.calls, queue as usize, "call"),
                }
            }
        }
    }

    /// Milliseconds until the armed request deadline (-1: none).
    pub(super) fn timeout_ms(&self) -> i32 {
        match *lock(&self.shared.deadline) {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline.
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
        }
    }

    pub(super) fn check_deadline(&self) {
        let expired = lock(&self.shared.deadline).is_some_and(|d| Instant::now() >= d);
        if expired && self.shared.connected.swap(false, Ordering::SeqCst) {
            error!("vhost-user backend did not answer in time; disconnecting");
            // Shutting the socket down makes the blocked request read EOF
            // and fail with an error.
            let _ = self.main_sock.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(super) fn hung_up(&self) {
        if self.shared.connected.swap(false, Ordering::SeqCst) {
            warn!("vhost-user backend hung up");
        }
        // Level-triggered and permanent: stop watching.
        let _ = self.shared.epoll.ctl(
            ControlOperation::Delete,
            self.main_sock.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    pub(super) fn relay(&self, list: &Mutex<Vec<Option<RelayedCall>>>, queue: usize, what: &str) {
        let mut calls = lock(list);
        let Some(Some(call)) = calls.get_mut(queue) else {
            return;
        };
        match call.backend_call.read() {
            Ok(_) => {
                call.received += 1;
                match call.notifier.notify() {
                    Ok(()) => call.relayed += 1,
                    Err(e) => {
                        call.errors += 1;
                        warn!("queue {queue}: cannot pass on the {what} notification: {e}");
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                call.errors += 1;
                warn!("queue {queue}: cannot read the {what} eventfd: {e}");
            }
        }
    }

    pub(super) fn backend_request(&mut self) {
        let Some(chan) = self.backend_req.as_mut() else {
            return;
        };
        if let Err(why) = chan.serve(&self.shared) {
            info!("vhost-user backend request channel closed: {why}");
            let _ = self.shared.epoll.ctl(
                ControlOperation::Delete,
                chan.sock.as_raw_fd(),
                EpollEvent::default(),
            );
            self.backend_req = None;
        }
    }
}

/// Our end of the backend request channel (`SET_BACKEND_REQ_FD`).
///
/// Served by hand rather than with the `vhost` crate's handler: it must not
/// block the relay on a half-sent message, and it accepts a
/// `CONFIG_CHANGE_MSG` whatever payload the backend attaches (the spec
/// gives it none; some backends, this kit's daemon included, send an empty
/// `VhostUserConfig`). The bytes are framed with the daemon's own header
/// parser and encoder (`vhost_user::connection`), only buffered here.
pub(super) struct BackendRequests {
    pub(super) sock: UnixStream,
    pub(super) buf: Vec<u8>,
}

impl BackendRequests {
    /// Read what is available and handle every complete message.
    pub(super) fn serve(&mut self, shared: &Shared) -> Result<(), &'static str> {
        let mut chunk = [0u8; 1024];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err("end of file"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err("read error"),
            }
        }
        while let Some(header) = self.buf.first_chunk::<HEADER_SIZE>().map(Header::parse) {
            let (request, flags, size) = (header.request, header.flags, header.size as usize);
            if size > MAX_BACKEND_REQ_PAYLOAD {
                return Err("oversized message");
            }
            if self.buf.len() < HEADER_SIZE + size {
                break;
            }
            self.buf.drain(..HEADER_SIZE + size);
            let ok = self.handle(request, shared);
            if flags & FLAG_NEED_REPLY != 0 {
                self.reply(request, if ok { 0 } else { 1 })?;
            }
        }
        Ok(())
    }

    pub(super) fn handle(&self, request: u32, shared: &Shared) -> bool {
        if request != u32::from(BackendReq::CONFIG_CHANGE_MSG) {
            warn!("vhost-user backend request {request} not supported");
            return false;
        }
        debug!("vhost-user backend: config changed");
        lock(&shared.config).stale = true;
        let notifier = lock(&shared.config_notifier).clone();
        if let Some(n) = notifier {
            n.notify();
        }
        true
    }

    pub(super) fn reply(&mut self, request: u32, value: u64) -> Result<(), &'static str> {
        let msg = encode(request, FLAG_REPLY, &value.to_le_bytes());
        // A 20-byte write to a socket nobody else writes to does not block
        // in practice; if it would, the backend is not reading its replies.
        self.sock.write_all(&msg).map_err(|_| "cannot send a reply")
    }
}

/// A freshly started relay thread.
pub(super) struct RelayStart {
    pub(super) shared: Arc<Shared>,
    pub(super) handle: JoinHandle<()>,
    /// The backend's end of the backend request channel.
    pub(super) backend_req: UnixStream,
}
