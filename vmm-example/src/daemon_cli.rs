//! What the example daemons (`vhost-user-blk`, `vhost-user-rng`) share:
//! serving a device on the socket the command line names, and reporting an
//! error with its whole chain of causes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use virtio_backend_kit::vhost_user::{Endpoint, ServeMode, VhostUserDaemon};
use virtio_backend_kit::DeviceBackend;

/// Where and how a daemon serves.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The unix socket.
    pub socket: PathBuf,
    /// Connect to a listening frontend instead of listening.
    pub client: bool,
    /// Serve the next frontend after a disconnect.
    pub keep_serving: bool,
    /// Keep device state in this file.
    pub state_file: Option<PathBuf>,
}

/// Serve `device` until the frontend leaves (or forever with
/// `keep_serving`).
pub fn serve<B: DeviceBackend>(
    device: B,
    opts: &ServeOptions,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut daemon = VhostUserDaemon::new(Arc::new(device))?;
    if let Some(path) = &opts.state_file {
        daemon = daemon.with_state_file(path.clone())?;
    }
    let endpoint = if opts.client {
        Endpoint::Connect(opts.socket.clone())
    } else {
        Endpoint::Listen(opts.socket.clone())
    };
    let mode = if opts.keep_serving {
        ServeMode::KeepServing
    } else {
        ServeMode::Once
    };
    daemon.run(&endpoint, mode)?;
    Ok(())
}

/// Log `result`'s error with its causes and turn it into an exit code.
pub fn exit_code(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            log::error!("{msg}");
            ExitCode::FAILURE
        }
    }
}
