// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line every daemon of the kit shares, so that a device
//! author's daemon gets it by flattening one struct into its arguments
//! (and its whole `main` is one call to [`run_daemon`]):
//!
//! - where to serve: `--socket-path PATH` (alias `--socket`), `--fd FDNUM`
//!   (an inherited listening socket), systemd socket activation
//!   (`LISTEN_FDS`), or `--client` to connect to a listening frontend;
//! - serving the next frontend after a disconnect (the default; `--once`
//!   serves one);
//! - QEMU's backend program conventions: `--print-capabilities`, and
//!   `--install-descriptor DIR` for the JSON descriptor management tools
//!   read;
//! - SIGTERM and SIGINT: stop accepting, end the session (requests being
//!   processed finish), remove the socket file, exit 0;
//! - a seccomp sandbox ([`sandbox`]), on unless `--no-seccomp`.
//!
//! Exit status: 0 after a clean stop (a signal, or in `--once` mode the
//! frontend hanging up); 1 on a startup error, on a runtime failure, or in
//! `--once` mode when the session ended on an error; 2 for a usage error.

pub mod capabilities;
pub mod sandbox;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use virtio_backend_kit::vhost_user::{listener, Endpoint, ServeMode, VhostUserDaemon};
use virtio_backend_kit::DeviceBackend;

pub use capabilities::DaemonKind;

/// Where and how a daemon serves: flatten into a daemon's clap arguments
/// with `#[command(flatten)]`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DaemonArgs {
    /// Unix socket to listen on (or, with --client, to connect to).
    #[arg(long = "socket-path", visible_alias = "socket", value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve this inherited, already listening unix socket instead.
    #[arg(long, value_name = "FDNUM", conflicts_with_all = ["socket_path", "client"])]
    pub fd: Option<i32>,
    /// Connect to a frontend listening on --socket-path instead of
    /// listening (retrying until it is there).
    #[arg(long)]
    pub client: bool,
    /// Serve one frontend and exit when it disconnects (exit status 1 if
    /// the session ended on an error). The default serves the next one.
    #[arg(long)]
    pub once: bool,
    /// Accepted for compatibility: serving the next frontend is the default.
    #[arg(long, hide = true, conflicts_with = "once")]
    pub keep_serving: bool,
    /// Print the backend's capabilities as JSON (QEMU's vhost-user.json
    /// schema) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Write the JSON descriptor management tools (libvirt) read for this
    /// daemon into DIR (for example /usr/share/qemu/vhost-user) and exit.
    #[arg(long, value_name = "DIR")]
    pub install_descriptor: Option<PathBuf>,
    /// Run without the seccomp sandbox.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Keep the device state in this file: restored at start if it exists,
    /// rewritten as it settles, so a restarted daemon gets it back.
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
}

/// Why a daemon could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Neither a socket path, nor an fd, nor socket activation.
    #[error("give --socket-path PATH or --fd FDNUM (or start under systemd socket activation)")]
    NoEndpoint,
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] virtio_backend_kit::vhost_user::DaemonError),
    /// The sandbox could not be installed.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    /// A descriptor file could not be written.
    #[error("cannot write the descriptor file {}", .0.display())]
    Descriptor(PathBuf, #[source] std::io::Error),
    /// The signal thread could not be set up.
    #[error("cannot watch SIGTERM/SIGINT")]
    Signals(#[source] std::io::Error),
}

impl DaemonArgs {
    /// Handle the options that print or write something and exit
    /// (`--print-capabilities`, `--install-descriptor`). Returns the exit
    /// code when the daemon should not serve.
    pub fn early_exit(&self, kind: &DaemonKind) -> Option<ExitCode> {
        if self.print_capabilities {
            println!("{}", kind.capabilities_json());
            return Some(ExitCode::SUCCESS);
        }
        if let Some(dir) = &self.install_descriptor {
            return Some(exit_code(
                kind.install_descriptor(dir)
                    .map(|path| println!("{}", path.display()))
                    .map_err(|(path, e)| ServeError::Descriptor(path, e).into()),
            ));
        }
        None
    }

    fn mode(&self) -> ServeMode {
        if self.once {
            ServeMode::Once
        } else {
            ServeMode::KeepServing
        }
    }
}

/// Where the daemon meets its frontend, once resolved.
enum Place {
    /// A listener we bound (its file is removed at the end).
    Bound(std::os::unix::net::UnixListener, PathBuf),
    /// A listener we were given.
    Inherited(std::os::unix::net::UnixListener),
    /// A frontend to connect to.
    Client(PathBuf),
}

fn resolve(args: &DaemonArgs) -> Result<Place, ServeError> {
    if let Some(fd) = args.fd {
        return Ok(Place::Inherited(listener::from_fd(fd)?));
    }
    if let Some(l) = listener::from_systemd()? {
        info!("serving the socket systemd passed (LISTEN_FDS)");
        return Ok(Place::Inherited(l));
    }
    let path = args.socket_path.clone().ok_or(ServeError::NoEndpoint)?;
    if args.client {
        return Ok(Place::Client(path));
    }
    let l = listener::bind(&path)?;
    info!("listening on {}", path.display());
    Ok(Place::Bound(l, path))
}

/// Serve `device` as `args` say, until a signal (or, with `--once`, the
/// frontend) ends it.
pub fn serve<B: DeviceBackend>(
    device: B,
    args: &DaemonArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut daemon = VhostUserDaemon::new(Arc::new(device))?;
    if let Some(path) = &args.state_file {
        daemon = daemon.with_state_file(path.clone())?;
    }
    let stopper = daemon.stopper();
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(ServeError::Signals)?;
    let signal_thread = std::thread::Builder::new()
        .name("vbk-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!("signal {sig}: stopping (no new frontends; the session ends once its requests are done)");
                stopper.stop();
            }
        })
        .map_err(ServeError::Signals)?;
    drop(signal_thread);
    // Bound only now that signals are handled: a frontend that finds the
    // socket can rely on SIGTERM stopping the daemon cleanly.
    let place = resolve(args)?;
    if args.no_seccomp {
        warn!("running without the seccomp sandbox (--no-seccomp)");
    } else {
        sandbox::install()?;
    }
    let mode = args.mode();
    let result = match &place {
        Place::Bound(l, _) | Place::Inherited(l) => daemon.serve_listener(l, mode),
        Place::Client(path) => daemon.run(&Endpoint::Connect(path.clone()), mode),
    };
    if let Place::Bound(_, path) = &place {
        let _ = std::fs::remove_file(path);
    }
    result?;
    info!("stopped");
    Ok(())
}

/// Log `result`'s error with its causes and turn it into an exit code.
pub fn exit_code(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", crate::vmm::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Print `result`'s error on stderr as `PREFIX: ERROR` and turn it into an
/// exit code: for the programs that report without a logger.
pub fn print_exit_code(prefix: &str, result: Result<(), impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prefix}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The logger every daemon uses: `RUST_LOG`, `info` by default.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// A daemon binary's whole `main`: parse its arguments `A`, handle the
/// options that exit early ([`DaemonArgs::early_exit`]), set up logging,
/// build the device with `device` and [`serve`] it, and turn the outcome
/// into the exit status. `daemon_args` picks the flattened [`DaemonArgs`]
/// out of `A`.
pub fn run_daemon<A, B>(
    kind: &DaemonKind,
    daemon_args: fn(&A) -> &DaemonArgs,
    device: impl FnOnce(&A) -> Result<B, Box<dyn std::error::Error>>,
) -> ExitCode
where
    A: clap::Parser,
    B: DeviceBackend,
{
    let args = A::parse();
    let daemon = daemon_args(&args);
    if let Some(code) = daemon.early_exit(kind) {
        return code;
    }
    init_logging();
    exit_code(device(&args).and_then(|device| serve(device, daemon)))
}
