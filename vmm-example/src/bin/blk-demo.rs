// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blk-demo`: the kit's out-of-process home end to end.
//!
//! Starts `vhost-user-blk` (built next to this binary) on a fresh raw image,
//! drives it with the `blkio` crate's `virtio-blk-vhost-user` driver (a real
//! third-party frontend) on two queues, verifies every byte read back and,
//! after the daemon exits, every byte of the image file from the host. Then
//! it serves a null device and measures 4 KiB random-read IOPS.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use clap::Parser;
use vmm_example::blkio_client::{pattern_byte, BlkioClient, ClientError};
use vmm_example::daemon_cli::print_exit_code;
use vmm_example::vmm::error_chain;

/// Run the vhost-user-blk demo.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Image size in MiB.
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// MiB written and verified per queue.
    #[arg(long, default_value_t = 64)]
    verify_mib: u64,
    /// Seconds per random-read run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    /// This program's own path is unknown.
    #[error("cannot find this program's path")]
    CurrentExe(#[source] io::Error),
    /// The daemon binary is not next to this one.
    #[error("{} not found: run `cargo build --release --workspace` first", .0.display())]
    NoDaemon(PathBuf),
    /// The daemon could not be started.
    #[error("cannot start vhost-user-blk")]
    Spawn(#[source] io::Error),
    /// The daemon exited before it listened.
    #[error("vhost-user-blk exited early: {0}")]
    EarlyExit(ExitStatus),
    /// The daemon did not listen in time.
    #[error("vhost-user-blk did not create its socket")]
    NoSocket,
    /// The daemon exited with a failure.
    #[error("vhost-user-blk failed: {0}")]
    DaemonFailed(ExitStatus),
    /// The daemon kept running after its frontend left.
    #[error("vhost-user-blk did not exit after the frontend left")]
    NoExit,
    /// The daemon's status could not be read.
    #[error("cannot wait for vhost-user-blk")]
    Wait(#[source] io::Error),
    /// The scratch directory could not be made.
    #[error("cannot create a temporary directory")]
    TempDir(#[source] io::Error),
    /// The image could not be created.
    #[error("cannot create the image {}", .0.display())]
    CreateImage(PathBuf, #[source] io::Error),
    /// The frontend could not connect.
    #[error("cannot connect to {}", .0.display())]
    Connect(PathBuf, #[source] ClientError),
    /// Writing or verifying through a queue failed.
    #[error("queue {0}")]
    Queue(usize, #[source] ClientError),
    /// A random-read run failed.
    #[error("random reads at queue depth {0}")]
    RandomReads(usize, #[source] ClientError),
    /// The image could not be read back from the host.
    #[error("cannot read the image {}", .0.display())]
    ReadImage(PathBuf, #[source] io::Error),
    /// The image does not hold what the frontend wrote.
    #[error("image file differs at byte {0}")]
    ImageDiffers(u64),
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon_binary() -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::CurrentExe)?;
    let bin = exe.with_file_name("vhost-user-blk");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(DemoError::NoDaemon(bin))
    }
}

/// Start `vhost-user-blk` on `sock` for one frontend (`--once`: it exits
/// when that frontend leaves) and wait until it listens.
fn start_daemon(sock: &Path, args: &[&OsStr]) -> Result<Daemon, DemoError> {
    let child = Command::new(daemon_binary()?)
        .arg("--socket")
        .arg(sock)
        .arg("--once")
        .args(args)
        .env("RUST_LOG", "warn")
        .spawn()
        .map_err(DemoError::Spawn)?;
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(st)) = daemon.0.try_wait() {
            return Err(DemoError::EarlyExit(st));
        }
        if Instant::now() > deadline {
            return Err(DemoError::NoSocket);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

fn wait_exit(daemon: &mut Daemon) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match daemon.0.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(DemoError::DaemonFailed(st)),
            Ok(None) if Instant::now() > deadline => return Err(DemoError::NoExit),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(DemoError::Wait(e)),
        }
    }
}

/// Write and read back `per_queue` bytes through each of two queues of a
/// daemon on a fresh `size`-byte image in `dir`, then check the image file
/// from the host once the daemon has exited.
fn verify_image(dir: &Path, args: &Args) -> Result<(), DemoError> {
    let image = dir.join("disk.raw");
    let size = args.image_mib << 20;
    let per_queue = (args.verify_mib << 20).min(size / 2);
    File::create(&image)
        .and_then(|f| f.set_len(size))
        .map_err(|e| DemoError::CreateImage(image.clone(), e))?;

    println!(
        "== vhost-user-blk on a {} MiB raw image, 2 queues, blkio frontend",
        args.image_mib
    );
    let sock = dir.join("blk.sock");
    let mut daemon = start_daemon(
        &sock,
        &[
            "--image".as_ref(),
            image.as_os_str(),
            "--queues".as_ref(),
            "2".as_ref(),
        ],
    )?;
    {
        let mut c = BlkioClient::connect(&sock, 2, 1 << 20)
            .map_err(|e| DemoError::Connect(sock.clone(), e))?;
        for q in 0..2 {
            // Queue q covers its own half of the disk.
            let (w, r) = c
                .verified_io_at(q, q as u64 * (size / 2), per_queue, 1 << 20, q as u8 + 1)
                .map_err(|e| DemoError::Queue(q, e))?;
            println!(
                "queue {q}: wrote {} MiB at {:.0} MB/s, read back and verified at {:.0} MB/s",
                per_queue >> 20,
                w / 1e6,
                r / 1e6
            );
        }
    }
    wait_exit(&mut daemon)?;
    let read_err = |e| DemoError::ReadImage(image.clone(), e);
    let file = File::open(&image).map_err(read_err)?;
    let mut buf = vec![0u8; 1 << 20];
    for q in 0..2u64 {
        let base = q * (size / 2);
        let mut off = 0;
        while off < per_queue {
            file.read_exact_at(&mut buf, base + off).map_err(read_err)?;
            if let Some(i) =
                (0..buf.len()).find(|i| buf[*i] != pattern_byte(q as u8 + 1, off + *i as u64))
            {
                return Err(DemoError::ImageDiffers(base + off + i as u64));
            }
            off += buf.len() as u64;
        }
    }
    println!(
        "host: image file verified byte for byte ({} MiB)",
        (2 * per_queue) >> 20
    );
    Ok(())
}

/// Measure 4 KiB random reads of a null device at a few queue depths.
fn null_iops(dir: &Path, args: &Args) -> Result<(), DemoError> {
    println!("== vhost-user-blk --null, 4 KiB random reads, 1 queue");
    let sock = dir.join("null.sock");
    let mut daemon = start_daemon(
        &sock,
        &["--null".as_ref(), "--size".as_ref(), "4294967296".as_ref()],
    )?;
    {
        let mut c = BlkioClient::connect(&sock, 1, 4 << 20)
            .map_err(|e| DemoError::Connect(sock.clone(), e))?;
        for depth in [1usize, 32, 128] {
            let mut s = c
                .random_reads(0, depth, 4096, Duration::from_secs_f64(args.seconds))
                .map_err(|e| DemoError::RandomReads(depth, e))?;
            println!(
                "qd {depth:>3}: {:>9.0} IOPS  p50 {:>6.1} us  p99 {:>6.1} us",
                s.iops(),
                s.latency_us(50.0),
                s.latency_us(99.0)
            );
        }
    }
    wait_exit(&mut daemon)
}

fn run(args: Args) -> Result<(), DemoError> {
    let dir = tempfile::tempdir().map_err(DemoError::TempDir)?;
    verify_image(dir.path(), &args)?;
    null_iops(dir.path(), &args)?;
    println!("demo: OK");
    Ok(())
}

fn main() -> ExitCode {
    let result = run(Args::parse()).map_err(|e| error_chain(&e));
    print_exit_code("blk-demo: error", result)
}
