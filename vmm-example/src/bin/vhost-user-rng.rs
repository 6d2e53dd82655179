//! `vhost-user-rng`: the virtio-rng device served over vhost-user.
//!
//! ```text
//! vhost-user-rng --socket /tmp/rng.sock [--client] [--keep-serving]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_example::daemon_cli::{exit_code, serve, ServeOptions};
use vmm_example::devices::RngDevice;

/// Serve a virtio-rng device (entropy from the host's getrandom) to a
/// vhost-user frontend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Unix socket path: listened on, or connected to with --client.
    #[arg(long)]
    socket: PathBuf,
    /// Connect to a frontend listening on --socket instead of listening.
    #[arg(long)]
    client: bool,
    /// Queue size offered to the driver (power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// After a frontend disconnects, serve the next one instead of exiting.
    #[arg(long)]
    keep_serving: bool,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = RngDevice::new(args.queue_size)?;
    serve(
        device,
        &ServeOptions {
            socket: args.socket,
            client: args.client,
            keep_serving: args.keep_serving,
            state_file: None,
        },
    )
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    exit_code(run(Args::parse()))
}
