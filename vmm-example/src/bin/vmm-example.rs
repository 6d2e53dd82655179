// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vmm-example`: boot a Linux guest with virtio devices served by the kit.
//!
//! ```text
//! vmm-example --kernel PATH [--initrd PATH] [--cmdline STR] [--mem-mib N] [--vcpus N]
//!             [--disk FILE[,read-only]]... [--disk-vhost-user SOCKET]...
//!             [--rng] [--rng-vhost-user SOCKET]
//!             [--console OUT[,input=IN]] [--console-vhost-user SOCKET] [--snapshot-to FILE]
//! vmm-example --restore-from FILE [DEVICES...] [--snapshot-to FILE]
//! vmm-example ... --migrate-to ADDR [--max-downtime-ms N]
//! vmm-example --migrate-from ADDR [DEVICES...] [--migrate-to ADDR]
//! ```
//!
//! Devices appear in the guest in the order given on the command line.
//! With `--snapshot-to`, SIGUSR1 saves the whole VM (vCPUs, interrupt
//! controllers, devices, RAM) to FILE and ends the process; `--restore-from`
//! carries on from such a file, with each device in the home the command
//! line gives (or the one it had, when no device is given).
//! With `--migrate-to ADDR` (`unix:PATH`, a path, or `tcp:HOST:PORT`),
//! SIGUSR1 migrates the running VM live to a `vmm-example --migrate-from
//! ADDR` (a second SIGUSR1 cancels; a failed or cancelled migration leaves
//! the VM running here); the destination's devices may live in other
//! homes than the source's.
//! Exits 0 when the guest powers off or reboots or the VM was saved or
//! migrated, 1 on any error (a destination that refused a stream too).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use log::error;
use vmm_example::vmm::migration::{self, MigrationAddress};
use vmm_example::vmm::{
    error_chain, DeviceOptions, DeviceRegistry, DeviceSpec, ExitReason, MigrateTo, VmConfig, Vmm,
};

/// Boot a Linux guest under KVM with virtio-mmio devices, each served in
/// this process or by a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kernel (bzImage).
    #[arg(long, required_unless_present_any = ["restore_from", "migrate_from"])]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long, conflicts_with_all = ["restore_from", "migrate_from"])]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(
        long,
        default_value = "console=ttyS0 panic=-1",
        conflicts_with_all = ["restore_from", "migrate_from"]
    )]
    cmdline: String,
    /// Guest RAM in MiB [default: 512].
    #[arg(long, conflicts_with_all = ["restore_from", "migrate_from"])]
    mem_mib: Option<u64>,
    /// Number of vCPUs [default: 2].
    #[arg(long, conflicts_with_all = ["restore_from", "migrate_from"])]
    vcpus: Option<u8>,
    /// On SIGUSR1, save the whole VM to FILE and exit.
    #[arg(long, value_name = "FILE")]
    snapshot_to: Option<PathBuf>,
    /// Resume the VM saved in FILE instead of booting a kernel.
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    restore_from: Option<PathBuf>,
    /// On SIGUSR1, migrate the running VM to the destination at ADDR
    /// (`unix:PATH`, a path, or `tcp:HOST:PORT`).
    #[arg(long, value_name = "ADDR", conflicts_with = "snapshot_to")]
    migrate_to: Option<MigrationAddress>,
    /// The longest the guest may stop for the last copy of a migration.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 300,
        requires = "migrate_to"
    )]
    max_downtime_ms: u64,
    /// Wait on ADDR for a VM migrated by `--migrate-to` and run it.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["kernel", "restore_from"])]
    migrate_from: Option<MigrationAddress>,
    /// A virtio-blk disk served in this process: FILE or FILE,read-only.
    #[arg(long, value_name = "FILE[,read-only]")]
    disk: Vec<String>,
    /// A virtio-blk disk served by the vhost-user backend on SOCKET.
    #[arg(long, value_name = "SOCKET")]
    disk_vhost_user: Vec<PathBuf>,
    /// A virtio-rng device served in this process.
    #[arg(long)]
    rng: bool,
    /// A virtio-rng device served by the vhost-user backend on SOCKET.
    #[arg(long, value_name = "SOCKET")]
    rng_vhost_user: Option<PathBuf>,
    /// A virtio-console (/dev/hvc0 in the guest) served in this process:
    /// guest output appended to OUT, host input read from IN.
    #[arg(long, value_name = "OUT[,input=IN]")]
    console: Option<String>,
    /// A virtio-console served by the vhost-user backend on SOCKET.
    #[arg(long, value_name = "SOCKET")]
    console_vhost_user: Option<PathBuf>,
}

fn parse_console(arg: &str) -> Result<DeviceSpec, String> {
    let (output, input) = match arg.split_once(',') {
        Some((out, opt)) => match opt.strip_prefix("input=") {
            Some(input) if !input.is_empty() => (out, Some(input)),
            _ => return Err(format!("--console {arg}: unknown option '{opt}'")),
        },
        None => (arg, None),
    };
    if output.is_empty() {
        return Err("--console needs an output file".into());
    }
    let mut options = DeviceOptions::new().with("output", output);
    if let Some(input) = input {
        options = options.with("input", input);
    }
    Ok(DeviceSpec::in_process("console", options))
}

fn parse_disk(arg: &str) -> Result<DeviceSpec, String> {
    let (path, read_only) = match arg.rsplit_once(',') {
        Some((path, "read-only")) => (path, true),
        Some((_, other)) => return Err(format!("--disk {arg}: unknown option '{other}'")),
        None => (arg, false),
    };
    if path.is_empty() {
        return Err("--disk needs a file".into());
    }
    let mut options = DeviceOptions::new().with("path", path);
    if read_only {
        options = options.with("read-only", "true");
    }
    Ok(DeviceSpec::in_process("disk", options))
}

/// The devices in command-line order (clap groups values per option; their
/// indices give the order back).
fn devices(args: &Args, matches: &ArgMatches) -> Result<Vec<DeviceSpec>, String> {
    let indices = |id: &str| -> Vec<usize> {
        matches
            .indices_of(id)
            .map(|i| i.collect())
            .unwrap_or_default()
    };
    let mut found: Vec<(usize, DeviceSpec)> = Vec::new();
    for (i, d) in indices("disk").into_iter().zip(&args.disk) {
        found.push((i, parse_disk(d)?));
    }
    for (i, s) in indices("disk_vhost_user")
        .into_iter()
        .zip(&args.disk_vhost_user)
    {
        found.push((i, DeviceSpec::vhost_user("disk", s)));
    }
    if args.rng {
        found.extend(
            indices("rng")
                .first()
                .map(|i| (*i, DeviceSpec::in_process("rng", DeviceOptions::new()))),
        );
    }
    if let Some(s) = &args.rng_vhost_user {
        found.extend(
            indices("rng_vhost_user")
                .first()
                .map(|i| (*i, DeviceSpec::vhost_user("rng", s))),
        );
    }
    if let (Some(c), Some(i)) = (&args.console, indices("console").first()) {
        found.push((*i, parse_console(c)?));
    }
    if let (Some(s), Some(i)) = (
        &args.console_vhost_user,
        indices("console_vhost_user").first(),
    ) {
        found.push((*i, DeviceSpec::vhost_user("console", s)));
    }
    found.sort_by_key(|(i, _)| *i);
    Ok(found.into_iter().map(|(_, d)| d).collect())
}

fn run() -> Result<ExitReason, Box<dyn std::error::Error>> {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches)?;
    let devices = devices(&args, &matches)?;
    let registry = DeviceRegistry::with_builtin_kinds();
    let mut vmm = match (args.restore_from, args.kernel) {
        _ if args.migrate_from.is_some() => {
            let from = args.migrate_from.as_ref().ok_or("--migrate-from")?;
            migration::receive(from, devices, &registry)?
        }
        (Some(snapshot), _) => Vmm::restore(&snapshot, devices, &registry)?,
        (None, Some(kernel)) => Vmm::new(&VmConfig {
            devices,
            registry: registry.clone(),
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            mem_mib: args.mem_mib.unwrap_or(512),
            vcpus: args.vcpus.unwrap_or(2),
        })?,
        (None, None) => return Err("--kernel or --restore-from is required".into()),
    };
    if let Some(path) = args.snapshot_to {
        vmm.snapshot_on_signal(path);
    }
    if let Some(address) = args.migrate_to {
        vmm.migrate_on_signal(MigrateTo {
            address,
            max_downtime: Duration::from_millis(args.max_downtime_ms),
        });
    }
    let reason = vmm.run()?;
    // Leave `vmm` alive: the process ends now, with vCPU threads parked in
    // KVM (see `Vmm::run`).
    std::mem::forget(vmm);
    Ok(reason)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let code = match run() {
        Ok(
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Snapshot | ExitReason::Migrated,
        ) => 0,
        Ok(ExitReason::Failure) => {
            error!("the guest failed");
            1
        }
        Err(e) => {
            error!("{}", error_chain(e.as_ref()));
            1
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Exit without unwinding the VM: vCPU threads may still be in KVM_RUN.
    std::process::exit(code)
}
