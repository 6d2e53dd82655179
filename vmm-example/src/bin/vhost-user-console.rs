// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-console`: a one-port virtio-console served over vhost-user.
//! The guest's console output goes to this process's stdout, and what
//! arrives on its stdin is typed into the guest (a pipe, a file or a
//! terminal). Bytes the guest has not taken yet are the device's state:
//! they travel with a snapshot or migration (DEVICE_STATE) and survive a
//! move between homes.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;

use clap::Parser;
use vmm_example::daemon_cli::{run_daemon, DaemonArgs, DaemonKind};
use vmm_example::devices::ConsoleDevice;

const KIND: DaemonKind = DaemonKind {
    name: "vhost-user-console",
    backend_type: "console",
    features: &[],
    description: "virtio-console backend of virtio-backend-kit (one port on stdin/stdout)",
};

#[derive(Debug, Parser)]
#[command(name = "vhost-user-console", version)]
/// A one-port virtio-console over vhost-user, on stdin and stdout.
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Queue size offered to the driver (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
}

fn device(args: &Args) -> Result<ConsoleDevice, Box<dyn std::error::Error>> {
    let input = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    Ok(ConsoleDevice::new(input, output, args.queue_size)?)
}

fn main() -> ExitCode {
    run_daemon(&KIND, |args: &Args| &args.daemon, device)
}
