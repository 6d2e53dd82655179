// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: which backends, targets, queue counts and depths to
//! run, and for how long.

use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Ours,
    Peer,
    Qsd,
}

impl Kind {
    pub(crate) const ALL: [Kind; 3] = [Kind::Ours, Kind::Peer, Kind::Qsd];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Peer => "peer",
            Kind::Qsd => "qsd",
        }
    }

    pub(crate) fn long_name(self) -> &'static str {
        match self {
            Kind::Ours => "ours (`vhost-user-blk`)",
            Kind::Peer => "peer (`vhost-user-backend` 0.24)",
            Kind::Qsd => "qemu-storage-daemon",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    Null,
    File,
}

impl Mode {
    pub(crate) const ALL: [Mode; 2] = [Mode::Null, Mode::File];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Null => "null",
            Mode::File => "file",
        }
    }
}

pub(crate) struct Opts {
    pub(crate) reps: usize,
    pub(crate) secs: f64,
    pub(crate) warmup: f64,
    pub(crate) cpu: Option<usize>,
    pub(crate) depths: Vec<usize>,
    pub(crate) queues: Vec<usize>,
    pub(crate) kinds: Vec<Kind>,
    pub(crate) modes: Vec<Mode>,
    pub(crate) size: u64,
    pub(crate) build: bool,
    pub(crate) out: Option<PathBuf>,
}

const USAGE: &str = "blk_vs_peers [--reps N (5)] [--secs S (2)] [--warmup S (0.2)]
             [--cpu N (last CPU) | --unpinned] [--depths 1,32,128] [--queues 1,2]
             [--backends ours,peer,qsd] [--modes null,file] [--size-mib 1024]
             [--no-build] [--out FILE (target/blk_vs_peers/results.md)]";

fn parse_list<T: std::str::FromStr>(v: &str) -> Vec<T> {
    v.split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

/// A comma-separated list of the values in `all`, each given by its
/// `name` (panics on an unknown `what`).
fn parse_names<T: Copy>(v: &str, all: &[T], name: fn(T) -> &'static str, what: &str) -> Vec<T> {
    v.split(',')
        .map(|s| {
            all.iter()
                .copied()
                .find(|&t| name(t) == s)
                .unwrap_or_else(|| panic!("unknown {what} {s}"))
        })
        .collect()
}

pub(crate) fn parse_args() -> Opts {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut o = Opts {
        reps: 5,
        secs: 2.0,
        warmup: 0.2,
        cpu: Some(ncpu - 1),
        depths: vec![1, 32, 128],
        queues: vec![1, 2],
        kinds: vec![Kind::Ours, Kind::Peer, Kind::Qsd],
        modes: vec![Mode::Null, Mode::File],
        size: 1 << 30,
        build: true,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            "--reps" => o.reps = val().parse().expect("--reps"),
            "--secs" => o.secs = val().parse().expect("--secs"),
            "--warmup" => o.warmup = val().parse().expect("--warmup"),
            "--cpu" => o.cpu = Some(val().parse().expect("--cpu")),
            "--unpinned" => o.cpu = None,
            "--depths" => o.depths = parse_list(&val()),
            "--queues" => o.queues = parse_list(&val()),
            "--size-mib" => o.size = val().parse::<u64>().expect("--size-mib") << 20,
            "--no-build" => o.build = false,
            "--out" => o.out = Some(PathBuf::from(val())),
            "--backends" => o.kinds = parse_names(&val(), &Kind::ALL, Kind::name, "backend"),
            "--modes" => o.modes = parse_names(&val(), &Mode::ALL, Mode::name, "mode"),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    o
}
