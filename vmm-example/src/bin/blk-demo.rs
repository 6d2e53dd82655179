// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blk-demo`: the kit's out-of-process home end to end.
//!
//! Starts `vhost-user-blk` (built next to this binary) on a fresh raw image,
//! drives it with the `blkio` crate's `virtio-blk-vhost-user` driver (a real
//! third-party frontend) on two queues, verifies every byte read back and,
//! after the daemon exits, every byte of the image file from the host. Then
//! it serves a null device and measures 4 KiB random-read IOPS.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use vmm_example::blkio_client::{pattern_byte, BlkioClient};
use vmm_example::daemon_cli::print_exit_code;

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

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("vhost-user-blk");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release --workspace` first",
            bin.display()
        ))
    }
}

fn start_daemon(sock: &Path, args: &[&str]) -> Result<Daemon, String> {
    let child = Command::new(daemon_binary()?)
        .arg("--socket")
        .arg(sock)
        .args(args)
        .env("RUST_LOG", "warn")
        .spawn()
        .map_err(|e| format!("cannot start vhost-user-blk: {e}"))?;
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(st)) = daemon.0.try_wait() {
            return Err(format!("vhost-user-blk exited early: {st}"));
        }
        if Instant::now() > deadline {
            return Err("vhost-user-blk did not create its socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(daemon)
}

fn wait_exit(daemon: &mut Daemon) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match daemon.0.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("vhost-user-blk failed: {st}")),
            Ok(None) if Instant::now() > deadline => {
                return Err("vhost-user-blk did not exit after the frontend left".into())
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = dir.path().join("disk.raw");
    let size = args.image_mib << 20;
    let per_queue = (args.verify_mib << 20).min(size / 2);
    File::create(&image)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("cannot create the image: {e}"))?;

    println!(
        "== vhost-user-blk on a {} MiB raw image, 2 queues, blkio frontend",
        args.image_mib
    );
    let sock = dir.path().join("blk.sock");
    let mut daemon = start_daemon(
        &sock,
        &[
            "--image",
            image.to_str().unwrap_or_default(),
            "--queues",
            "2",
        ],
    )?;
    {
        let mut c = BlkioClient::connect(&sock, 2, 1 << 20).map_err(|e| e.to_string())?;
        for q in 0..2 {
            // Queue q covers its own half of the disk.
            let (w, r) = c
                .verified_io_at(q, q as u64 * (size / 2), per_queue, 1 << 20, q as u8 + 1)
                .map_err(|e| format!("queue {q}: {e}"))?;
            println!(
                "queue {q}: wrote {} MiB at {:.0} MB/s, read back and verified at {:.0} MB/s",
                per_queue >> 20,
                w / 1e6,
                r / 1e6
            );
        }
    }
    wait_exit(&mut daemon)?;
    let file = File::open(&image).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for q in 0..2u64 {
        let base = q * (size / 2);
        let mut off = 0;
        while off < per_queue {
            file.read_exact_at(&mut buf, base + off)
                .map_err(|e| e.to_string())?;
            if let Some(i) =
                (0..buf.len()).find(|i| buf[*i] != pattern_byte(q as u8 + 1, off + *i as u64))
            {
                return Err(format!(
                    "image file differs at byte {}",
                    base + off + i as u64
                ));
            }
            off += buf.len() as u64;
        }
    }
    println!(
        "host: image file verified byte for byte ({} MiB)",
        (2 * per_queue) >> 20
    );

    println!("== vhost-user-blk --null, 4 KiB random reads, 1 queue");
    let sock = dir.path().join("null.sock");
    let mut daemon = start_daemon(&sock, &["--null", "--size", "4294967296"])?;
    {
        let mut c = BlkioClient::connect(&sock, 1, 4 << 20).map_err(|e| e.to_string())?;
        for depth in [1usize, 32, 128] {
            let mut s = c
                .random_reads(0, depth, 4096, Duration::from_secs_f64(args.seconds))
                .map_err(|e| e.to_string())?;
            println!(
                "qd {depth:>3}: {:>9.0} IOPS  p50 {:>6.1} us  p99 {:>6.1} us",
                s.iops(),
                s.latency_us(50.0),
                s.latency_us(99.0)
            );
        }
    }
    wait_exit(&mut daemon)?;
    println!("demo: OK");
    Ok(())
}

fn main() -> ExitCode {
    print_exit_code("blk-demo: error", run(Args::parse()))
}
