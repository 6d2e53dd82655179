// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-rng`: the virtio-rng device served over vhost-user.
//!
//! ```text
//! vhost-user-rng --socket-path /tmp/rng.sock [--client] [--once]
//! vhost-user-rng --print-capabilities
//! ```

use std::process::ExitCode;

use clap::Parser;
use vmm_example::daemon_cli::{run_daemon, DaemonArgs, DaemonKind};
use vmm_example::devices::RngDevice;

const KIND: DaemonKind = DaemonKind {
    name: "vhost-user-rng",
    backend_type: "rng",
    features: &[],
    description: "virtio-rng backend of virtio-backend-kit (entropy from getrandom)",
};

/// vhost-user-rng: serve a virtio-rng device (entropy from the host's
/// getrandom) to a vhost-user frontend.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-rng", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Queue size offered to the driver (a power of two).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
}

fn device(args: &Args) -> Result<RngDevice, Box<dyn std::error::Error>> {
    Ok(RngDevice::new(args.queue_size)?)
}

fn main() -> ExitCode {
    run_daemon(&KIND, |args: &Args| &args.daemon, device)
}
