//! `vhost-user-blk`: the reference virtio-blk device served over vhost-user.
//!
//! ```text
//! vhost-user-blk --socket /tmp/blk.sock --image disk.raw [--queues 2] [--read-only]
//! vhost-user-blk --socket /tmp/blk.sock --null --size 1073741824
//! vhost-user-blk --socket /tmp/blk.sock --image disk.raw --latency-us 20000   # test knob: slow disk
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use log::info;
use vmm_example::daemon_cli::{exit_code, serve, ServeOptions};
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

/// Serve a virtio-blk device to a vhost-user frontend (QEMU, Cloud
/// Hypervisor, crosvm, libblkio, ...).
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(group(ArgGroup::new("target").required(true).args(["image", "null"])))]
struct Args {
    /// Unix socket path: listened on, or connected to with --client.
    #[arg(long)]
    socket: PathBuf,
    /// Connect to a frontend listening on --socket instead of listening.
    #[arg(long)]
    client: bool,
    /// Raw disk image to serve.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Serve a null device that completes requests without touching data.
    #[arg(long, requires = "size")]
    null: bool,
    /// Size in bytes of the --null device.
    #[arg(long)]
    size: Option<u64>,
    /// Number of virtqueues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Queue size offered to the driver (power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// After a frontend disconnects, serve the next one instead of exiting.
    #[arg(long)]
    keep_serving: bool,
    /// Keep the device state in this file: restored at start if it exists,
    /// rewritten as it settles, so a restarted daemon gets it back.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Testing knob (fault injection), simulating a slow disk: hold every
    /// request this many microseconds after it is taken from the ring (so
    /// it is marked in flight) before completing it, half before and half
    /// after performing it. Lets crash-restart tests kill the daemon with
    /// requests in flight. 0 (the default) disables it.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    latency_us: u32,
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let target = match (&args.image, args.null, args.size) {
        (Some(path), _, _) => Target::open_image(path, args.read_only)?,
        (None, true, Some(size)) => Target::null(size),
        _ => return Err("give --image FILE or --null --size BYTES".into()),
    };
    let cfg = BlkConfig {
        queues: args.queues,
        queue_size: args.queue_size,
        read_only: args.read_only,
        injected_latency: (args.latency_us > 0)
            .then(|| Duration::from_micros(u64::from(args.latency_us))),
        ..BlkConfig::default()
    };
    let device = BlkDevice::new(target, cfg)?;
    info!(
        "virtio-blk: {} sectors, {} queue(s), {}",
        device.capacity_sectors(),
        args.queues,
        if device.is_read_only() {
            "read-only"
        } else {
            "read-write"
        }
    );
    if let Some(d) = device.config().injected_latency {
        info!("virtio-blk: test knob on: every request is held {d:?} (--latency-us)");
    }
    serve(
        device,
        &ServeOptions {
            socket: args.socket,
            client: args.client,
            keep_serving: args.keep_serving,
            state_file: args.state_file,
        },
    )
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    exit_code(run(Args::parse()))
}
