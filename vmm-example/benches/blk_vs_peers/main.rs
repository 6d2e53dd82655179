// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blk_vs_peers`: our `vhost-user-blk` against the backends people run
//! today, through a real vhost-user frontend (libblkio's
//! `virtio-blk-vhost-user` driver, the library QEMU's `blkio` driver uses).
//!
//! ```text
//! cargo bench -p vmm-example --bench blk_vs_peers
//! cargo bench -p vmm-example --bench blk_vs_peers -- --reps 3 --secs 1 --unpinned
//! cargo bench -p vmm-example --bench blk_vs_peers -- --help
//! ```
//!
//! Backends, each a fresh process per run:
//!
//! - `ours`: `vhost-user-blk --null` / `--image`.
//! - `peer`: `examples/peer_vub_blk.rs`, the same device written on rust-vmm's
//!   `vhost-user-backend` 0.24.
//! - `qsd`: `qemu-storage-daemon` with a `null-co` or `file` blockdev and a
//!   `vhost-user-blk` export, when it is installed.
//!
//! The load is 4 KiB random reads at queue depth 1, 32 and 128 (per queue)
//! on 1 and 2 queues, completions taken from blkio's completion eventfd (the
//! client sleeps in `ppoll`/`poll`; nobody busy-polls). By default the
//! benchmark and the backend are pinned to the same CPU, which makes the
//! numbers stable on small machines; `--unpinned` lets the scheduler place
//! them. For every repetition each backend runs once, in a rotating order,
//! and the medians over repetitions are reported.
//!
//! Before measuring, the benchmark builds the backends itself with
//! `cargo build --release -p vmm-example --bins --examples` (skip with
//! `--no-build`). Nothing here is asserted: the issue's targets are printed
//! as met or not met next to the ratios.

mod args;
mod backend;
mod report;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use args::{parse_args, Kind, Mode, Opts};
use backend::{build_backends, make_image, pin_self, release_dir, run_one, Setup, QSD};
use report::{report, Results};

/// Every backend once per repetition of every (target, queues, depth)
/// cell, in a rotating order; the samples by cell.
fn measure(setup: &Setup<'_>, opts: &Opts, kinds: &[Kind]) -> Results {
    let mut res = Results {
        samples: BTreeMap::new(),
    };
    let cells = opts.modes.len() * opts.queues.len() * opts.depths.len();
    let total = cells * opts.reps * kinds.len();
    let mut done = 0;
    for &mode in &opts.modes {
        for &nq in &opts.queues {
            for &depth in &opts.depths {
                for rep in 0..opts.reps {
                    // Rotate the order so no backend always runs first.
                    for i in 0..kinds.len() {
                        let kind = kinds[(i + rep) % kinds.len()];
                        let s = run_one(setup, opts, kind, mode, nq, depth);
                        done += 1;
                        eprintln!(
                            "[{done}/{total}] {} q{nq} qd{depth} rep {rep} {:>5}: {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs  {:>6.0} ns CPU/req",
                            mode.name(),
                            kind.name(),
                            s.iops,
                            s.p50_us,
                            s.p99_us,
                            s.cpu_ns_per_req
                        );
                        res.samples
                            .entry((mode, nq, depth, kind))
                            .or_default()
                            .push(s);
                    }
                }
            }
        }
    }
    res
}

fn main() {
    let mut opts = parse_args();
    if opts.build {
        build_backends();
    }
    let release = release_dir();
    for bin in ["vhost-user-blk", "examples/peer_vub_blk"] {
        assert!(
            release.join(bin).exists(),
            "{} is missing: run cargo build --release -p vmm-example --bins --examples",
            release.join(bin).display()
        );
    }
    if opts.kinds.contains(&Kind::Qsd) && !Path::new(QSD).exists() {
        eprintln!("{QSD} not installed: skipping qemu-storage-daemon");
        opts.kinds.retain(|k| *k != Kind::Qsd);
    }
    let dir = release.join("..").join("blk_vs_peers");
    std::fs::create_dir_all(&dir).expect("create work dir");
    let image = dir.join("disk.raw");
    if opts.modes.contains(&Mode::File) {
        eprintln!("preparing a {} MiB raw image", opts.size >> 20);
        make_image(&image, opts.size);
    }
    if let Some(cpu) = opts.cpu {
        pin_self(cpu);
    }
    let setup = Setup {
        release: &release,
        dir: &dir,
        image: &image,
        size: opts.size,
        cpu: opts.cpu,
    };
    let kinds = opts.kinds.clone();
    let res = measure(&setup, &opts, &kinds);
    let table = report(&opts, &res, &kinds);
    println!("\n{table}");
    let out = opts.out.clone().unwrap_or_else(|| dir.join("results.md"));
    if let Ok(mut f) = File::create(&out) {
        let _ = f.write_all(table.as_bytes());
        eprintln!("table written to {}", out.display());
    }
}
