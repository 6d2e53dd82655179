// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blk_load`: drive a vhost-user-blk backend with libblkio random reads,
//! for profiling a backend under load (see `benches/blk_vs_peers/` for the
//! comparison itself).
//!
//! ```text
//! blk_load --socket /tmp/blk.sock [--queues 1] [--depth 32] [--secs 5] [--cpu 1]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vmm_example::blkio_client::BlkioClient;

/// Random 4 KiB reads against a vhost-user-blk socket.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Backend socket.
    #[arg(long)]
    socket: PathBuf,
    /// Queues to use.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Queue depth per queue.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Run time in seconds.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    block: usize,
    /// Pin this process to a CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(cpu) = args.cpu {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only
        // touch that local set.
        let r = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let mut client = BlkioClient::connect(
        &args.socket,
        args.queues,
        args.queues * args.depth * args.block,
    )?;
    let mut stats = client.random_reads_multi(
        args.queues,
        args.depth,
        args.block,
        Duration::from_secs_f64(args.secs),
    )?;
    let (p50, p99) = (stats.latency_us(50.0), stats.latency_us(99.0));
    println!(
        "{} requests, {:.0} IOPS, p50 {p50:.1} µs, p99 {p99:.1} µs",
        stats.requests,
        stats.iops(),
    );
    Ok(())
}
