// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The out-of-process home: a vhost-user backend daemon on a unix socket.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};

use super::connection::ConnectionError;
use super::session::Session;
use crate::backend::DeviceBackend;
use crate::core::{CoreError, DeviceCore};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The control core could not be created.
    #[error("cannot set up the device")]
    Core(#[from] CoreError),
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A live daemon already listens on the socket path.
    #[error("{} is served by another live daemon", .0.display())]
    InUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// An inherited fd (`--fd`, socket activation) is not a listening unix socket.
    #[error("fd {fd} cannot be served: {why}")]
    BadFd {
        /// The fd.
        fd: i32,
        /// What is wrong with it.
        why: String,
    },
    /// accept() failed.
    #[error("cannot accept a connection")]
    Accept(#[source] std::io::Error),
    /// The state file could not be read or does not fit the device.
    #[error("state file {path}: {reason}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// In `--once` mode: the one session ended on an error (a protocol
    /// violation, a broken connection) rather than a clean hang-up.
    #[error("the session ended on an error")]
    Session(#[source] ConnectionError),
    /// connect() failed.
    #[error("cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Where the daemon meets its frontend.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// Listen on this path (removing a stale socket file first).
    Listen(PathBuf),
    /// Connect to a frontend listening on this path.
    Connect(PathBuf),
}

/// Whether to serve one frontend or keep going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeMode {
    /// Return when the first frontend disconnects.
    Once,
    /// Serve the next connection after each disconnect (QEMU's `reconnect=`).
    KeepServing,
}

/// A vhost-user daemon for one device.
pub struct VhostUserDaemon<B: DeviceBackend> {
    core: DeviceCore<B>,
    state_file: Option<PathBuf>,
    check_grace: Duration,
    stop: DaemonStopper,
}

impl<B: DeviceBackend> std::fmt::Debug for VhostUserDaemon<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDaemon")
            .field("core", &self.core)
            .field("state_file", &self.state_file)
            .field("check_grace", &self.check_grace)
            .finish_non_exhaustive()
    }
}

/// Ends a running daemon from another thread (for example on SIGTERM):
/// the daemon stops accepting, its session ends as if the frontend had
/// hung up (the rings are stopped, so requests being processed finish),
/// and [`VhostUserDaemon::run`] returns `Ok`.
#[derive(Clone, Debug, Default)]
pub struct DaemonStopper {
    inner: Arc<StopState>,
}

#[derive(Debug, Default)]
struct StopState {
    stopping: AtomicBool,
    /// A duplicate of the listening socket, shut down to end `accept`.
    listener: Mutex<Option<OwnedFd>>,
    /// The connected frontend, shut down to end the session.
    stream: Mutex<Option<UnixStream>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DaemonStopper {
    /// Stop the daemon. Safe to call from any thread, more than once.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        if let Some(l) = lock(&self.inner.listener).as_ref() {
            // SAFETY: shutdown(2) on an fd we own; it wakes a blocked
            // accept(), which then fails with EINVAL.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(s) = lock(&self.inner.stream).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether [`DaemonStopper::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }
}

impl<B: DeviceBackend> VhostUserDaemon<B> {
    /// Create the daemon and the device's worker threads.
    pub fn new(backend: Arc<B>) -> Result<Self, DaemonError> {
        Ok(VhostUserDaemon {
            core: DeviceCore::new(backend)?,
            state_file: None,
            check_grace: super::session::DEFAULT_CHECK_GRACE,
            stop: DaemonStopper::default(),
        })
    }

    /// Keep the device's state in `path`: restore it from there now if the
    /// file exists (a restarted daemon), and rewrite it whenever the state
    /// settles (features negotiated, a ring stopped, a session ended).
    pub fn with_state_file(mut self, path: PathBuf) -> Result<Self, DaemonError> {
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|source| DaemonError::StateFile {
                path: path.clone(),
                reason: source.to_string(),
            })?;
            let bad = |reason: String| DaemonError::StateFile {
                path: path.clone(),
                reason,
            };
            self.core
                .load_device_state(&bytes, super::session::TRANSPORT_FEATURES, u64::MAX)
                .map_err(|e| bad(e.to_string()))?;
            info!("device state restored from {}", path.display());
        }
        self.state_file = Some(path);
        Ok(self)
    }

    /// How long stopping a queue waits for its worker (default
    /// [`crate::core::DEFAULT_STOP_TIMEOUT`]); a session whose request
    /// leaves a worker blocked longer is ended.
    pub fn with_stop_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.core.set_stop_timeout(timeout);
        self
    }

    /// How long `CHECK_DEVICE_STATE` waits for a transfer the frontend
    /// left unfinished (default [`super::DEFAULT_CHECK_GRACE`]).
    pub fn with_check_grace(mut self, grace: Duration) -> Self {
        self.check_grace = grace;
        self
    }

    /// The control core (for inspection and tests).
    pub fn core(&self) -> &DeviceCore<B> {
        &self.core
    }

    /// A handle that stops this daemon from another thread.
    pub fn stopper(&self) -> DaemonStopper {
        self.stop.clone()
    }

    /// Serve one connected frontend until it disconnects.
    pub fn serve_stream(&mut self, stream: UnixStream) -> ConnectionError {
        *lock(&self.stop.inner.stream) = stream.try_clone().ok();
        if self.stop.is_stopping() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        crate::fault_guard::set_session_socket(Some(stream.as_raw_fd()));
        let end = Session::new(&mut self.core, stream)
            .with_state_file(self.state_file.clone())
            .with_check_grace(self.check_grace)
            .run();
        *lock(&self.stop.inner.stream) = None;
        crate::fault_guard::set_session_socket(None);
        match &end {
            _ if self.stop.is_stopping() => info!("session ended: the daemon is stopping"),
            ConnectionError::Closed => info!("frontend disconnected"),
            e => warn!("session ended: {e}"),
        }
        end
    }

    /// Serve frontends on `listener`.
    pub fn serve_listener(
        &mut self,
        listener: &UnixListener,
        mode: ServeMode,
    ) -> Result<(), DaemonError> {
        if let Ok(dup) = listener.as_fd().try_clone_to_owned() {
            *lock(&self.stop.inner.listener) = Some(dup);
        }
        let result = self.accept_loop(listener, mode);
        *lock(&self.stop.inner.listener) = None;
        result
    }

    fn accept_loop(&mut self, listener: &UnixListener, mode: ServeMode) -> Result<(), DaemonError> {
        loop {
            if self.stop.is_stopping() {
                return Ok(());
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) if self.stop.is_stopping() => return Ok(()),
                Err(e) => return Err(DaemonError::Accept(e)),
            };
            info!("frontend connected");
            if let Some(done) = self.serve_one(stream, mode) {
                return done;
            }
        }
    }

    /// Serve the frontend on `stream`. `Some(result)` when the daemon is
    /// done (it is stopping, or it serves only once); `None` to go on with
    /// the next frontend.
    fn serve_one(
        &mut self,
        stream: UnixStream,
        mode: ServeMode,
    ) -> Option<Result<(), DaemonError>> {
        let end = self.serve_stream(stream);
        if self.stop.is_stopping() {
            return Some(Ok(()));
        }
        if mode != ServeMode::Once {
            return None;
        }
        Some(match end {
            ConnectionError::Closed => Ok(()),
            e => Err(DaemonError::Session(e)),
        })
    }

    /// Run on `endpoint` in `mode`.
    pub fn run(&mut self, endpoint: &Endpoint, mode: ServeMode) -> Result<(), DaemonError> {
        match endpoint {
            Endpoint::Listen(path) => {
                let listener = bind(path)?;
                info!("listening on {}", path.display());
                self.serve_listener(&listener, mode)
            }
            Endpoint::Connect(path) => loop {
                let stream = connect_retrying(path, mode)?;
                info!("connected to {}", path.display());
                if let Some(done) = self.serve_one(stream, mode) {
                    return done;
                }
            },
        }
    }
}

pub use super::listener::bind;

fn connect_retrying(path: &Path, mode: ServeMode) -> Result<UnixStream, DaemonError> {
    let mut delay = Duration::from_millis(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(source) if mode == ServeMode::Once => {
                return Err(DaemonError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
            Err(_) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
