// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-blk`: the reference virtio-blk device served over vhost-user.
//!
//! ```text
//! vhost-user-blk --socket-path /tmp/blk.sock --blk-file disk.raw [--read-only]
//! vhost-user-blk --socket-path /tmp/blk.sock --null --size 1073741824
//! vhost-user-blk --fd 3 --blk-file disk.raw          # an inherited listening socket
//! vhost-user-blk --print-capabilities
//! ```
//!
//! The defaults fit QEMU's: as many queues as a frontend asks for by
//! default (the host's CPU count, at least 8; a queue the driver never
//! enables costs no thread), queues of 1024, serving the next frontend
//! after a disconnect. See `daemon_cli` for the options every daemon has,
//! the signals and the exit status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use log::info;
use vmm_example::daemon_cli::{run_daemon, DaemonArgs, DaemonKind};
use vmm_example::devices::{BlkConfig, BlkDevice, ImageOptions, Target};

const KIND: DaemonKind = DaemonKind {
    name: "vhost-user-blk",
    backend_type: "block",
    features: &["read-only", "blk-file"],
    description: "virtio-blk backend of virtio-backend-kit (raw images and block devices)",
};

/// Fewest queues offered by default: what common frontends ask for.
const MIN_DEFAULT_QUEUES: usize = 8;

fn default_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.clamp(MIN_DEFAULT_QUEUES, 64) as u16
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}': expected on or off")),
    }
}

/// vhost-user-blk: serve a virtio-blk device (a raw image, a block device
/// or a null disk) to a vhost-user frontend such as QEMU, Cloud
/// Hypervisor, crosvm or libblkio.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version)]
#[command(group(ArgGroup::new("target").args(["image", "null"])))]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Raw disk image or block device to serve.
    #[arg(long = "blk-file", visible_alias = "image", value_name = "PATH")]
    image: Option<PathBuf>,
    /// Serve a null device that completes requests without touching data.
    #[arg(long, requires = "size")]
    null: bool,
    /// Size in bytes of the --null device.
    #[arg(long)]
    size: Option<u64>,
    /// Number of virtqueues offered [default: the CPU count, at least 8].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: Option<u16>,
    /// Queue size offered to the driver (a power of two).
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Logical block size offered to the driver (512 to 65536, a power of two).
    #[arg(long, default_value_t = 512)]
    logical_block_size: u32,
    /// Serial number the driver reads (GET_ID, at most 20 bytes)
    /// [default: derived from the image].
    #[arg(long)]
    serial: Option<String>,
    /// Offer DISCARD.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = on_off)]
    discard: bool,
    /// Offer WRITE_ZEROES.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = on_off)]
    write_zeroes: bool,
    /// Bypass the host page cache (O_DIRECT) for aligned requests.
    #[arg(long)]
    direct: bool,
    /// Do not lock the image (by default it is locked: shared when
    /// read-only, exclusive when read-write).
    #[arg(long)]
    no_lock: bool,
    /// Testing knob (fault injection), simulating a slow disk: hold every
    /// request this many microseconds after it is taken from the ring.
    #[arg(long, hide = true, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    latency_us: u32,
}

fn device(args: &Args) -> Result<BlkDevice, Box<dyn std::error::Error>> {
    let target = match (&args.image, args.null, args.size) {
        (Some(path), _, _) => Target::open_image_with(
            path,
            ImageOptions {
                read_only: args.read_only,
                lock: !args.no_lock,
                direct: args.direct,
            },
        )?,
        (None, true, Some(size)) => Target::null(size),
        _ => return Err("give --blk-file PATH or --null --size BYTES".into()),
    };
    let queues = args.queues.unwrap_or_else(default_queues);
    let cfg = BlkConfig {
        queues,
        queue_size: args.queue_size,
        read_only: args.read_only,
        blk_size: args.logical_block_size,
        serial: args.serial.clone(),
        discard: args.discard,
        write_zeroes: args.write_zeroes,
        injected_latency: (args.latency_us > 0)
            .then(|| Duration::from_micros(u64::from(args.latency_us))),
        ..BlkConfig::default()
    };
    let device = BlkDevice::new(target, cfg)?;
    info!(
        "virtio-blk: {} sectors, {queues} queue(s) of {}, {}",
        device.capacity_sectors(),
        args.queue_size,
        if device.is_read_only() {
            "read-only"
        } else {
            "read-write"
        }
    );
    if let Some(d) = device.config().injected_latency {
        info!("virtio-blk: test knob on: every request is held {d:?} (--latency-us)");
    }
    Ok(device)
}

fn main() -> ExitCode {
    run_daemon(&KIND, |args: &Args| &args.daemon, device)
}
