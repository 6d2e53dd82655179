//! The out-of-process home: a vhost-user backend daemon on a unix socket.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
}

impl<B: DeviceBackend> VhostUserDaemon<B> {
    /// Create the daemon and the device's worker threads.
    pub fn new(backend: Arc<B>) -> Result<Self, DaemonError> {
        Ok(VhostUserDaemon {
            core: DeviceCore::new(backend)?,
            state_file: None,
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
            let snap = crate::snapshot::decode(&bytes).map_err(|e| bad(e.to_string()))?;
            let limits = crate::snapshot::SnapshotLimits::for_backend(
                &**self.core.backend(),
                super::session::VHOST_USER_F_PROTOCOL_FEATURES | super::session::VHOST_F_LOG_ALL,
                u64::MAX,
            );
            let valid = crate::snapshot::ValidatedSnapshot::new(snap, &limits)
                .map_err(|e| bad(e.to_string()))?;
            self.core
                .restore_device_state(&valid)
                .map_err(|e| bad(e.to_string()))?;
            info!("device state restored from {}", path.display());
        }
        self.state_file = Some(path);
        Ok(self)
    }

    /// The control core (for inspection and tests).
    pub fn core(&self) -> &DeviceCore<B> {
        &self.core
    }

    /// Serve one connected frontend until it disconnects.
    pub fn serve_stream(&mut self, stream: UnixStream) -> ConnectionError {
        let end = Session::new(&mut self.core, stream)
            .with_state_file(self.state_file.clone())
            .run();
        match &end {
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
        loop {
            let (stream, _) = listener.accept().map_err(DaemonError::Accept)?;
            info!("frontend connected");
            self.serve_stream(stream);
            if mode == ServeMode::Once {
                return Ok(());
            }
        }
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
                self.serve_stream(stream);
                if mode == ServeMode::Once {
                    return Ok(());
                }
            },
        }
    }
}

/// Bind a listening socket at `path`, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        path: path.to_owned(),
        source,
    })
}

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
