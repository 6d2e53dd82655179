// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small VMM on rust-vmm crates that boots a stock x86-64 Linux with
//! virtio-mmio devices served by the kit, in-process or out of process.
//!
//! One module per concern, each with its own error type:
//!
//! | module | job |
//! |---|---|
//! | [`memory`] | memfd-backed guest RAM and the guest physical [`layout`] |
//! | [`boot`] | bzImage, initramfs, command line, zero page, page tables |
//! | [`acpi`] | RSDP, XSDT, FADT (power-off), MADT (CPUs), DSDT (devices) |
//! | [`vcpu`] | CPUID/MSR/LAPIC setup and the exit dispatch loop |
//! | [`bus`] | MMIO and port-I/O buses, power-off and reset registers |
//! | [`serial`] | the 16550 console on stdout |
//! | [`devices`] | virtio devices behind [`virtio_backend_kit::mmio::MmioTransport`] |
//! | [`registry`], [`device_spec`] | the open list of device kinds; what the user asked for |
//! | [`snapshot`] | the whole VM in one file: vCPUs, irqchips, devices, RAM |
//! | [`migration`] | the running VM to another process: pre-copy of RAM, then the rest |
//!
//! [`Vmm::new`] builds the machine for a fresh boot and [`Vmm::restore`]
//! from a snapshot file; [`Vmm::run`] runs the devices' data planes on an
//! `event-manager` loop on the calling thread, and the vCPUs on their own
//! threads, until the guest powers off, resets or fails, or (with
//! [`Vmm::snapshot_on_signal`]) until SIGUSR1 asks for a snapshot.

pub mod acpi;
pub mod boot;
mod builtin_kinds;
pub mod bus;
mod control;
pub mod device_spec;
pub mod devices;
pub mod diagnostics;
mod machine;
pub mod memory;
pub mod migration;
mod pause;
pub mod registry;
mod restore;
pub mod serial;
pub mod snapshot;
pub mod vcpu;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use log::{error, info};
use signal_hook::consts::SIGUSR1;
use signal_hook::iterator::Signals;
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::snapshot::{self as device_snapshot, DeviceSnapshot};
use virtio_backend_kit::vm_memory::GuestAddress;
use virtio_backend_kit::{GuestMemoryLog, SharedDirtyLog};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use device_spec::{DeviceHome, DeviceOptions, DeviceSpec};
pub use memory::layout;
pub use registry::{BuildResult, DeviceKind, DeviceRegistry, KindInfo};

use control::{Control, SignalAction};
use devices::AttachedDevice;
use machine::{check_vcpus, Machine, IRQCHIP_IDS};
pub use migration::MigrateTo;
use serial::SerialConsole;
use snapshot::{DeviceRecord, SnapshotFile, VmState};
use vcpu::{Buses, PauseGate, Vcpu};

/// What to boot, and with what.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// bzImage to boot.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (device announcements are appended).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Devices, in the order the guest should see them.
    pub devices: Vec<DeviceSpec>,
    /// The kinds `devices` name.
    pub registry: DeviceRegistry,
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI power-off.
    PowerOff,
    /// Reset (ACPI reset register, keyboard controller, triple fault).
    Reset,
    /// A vCPU failed (see the log).
    Failure,
    /// The VM was saved to its snapshot file; it carries on when restored.
    Snapshot,
    /// The VM was migrated; it runs on at the destination.
    Migrated,
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The vCPU count is out of range.
    #[error("invalid configuration: {0} vCPUs (1 to 32 supported)")]
    VcpuCount(usize),
    /// Guest RAM is not backed by a file (a snapshot needs one).
    #[error("invalid configuration: guest RAM has no backing file")]
    NoRamFile,
    /// A restore was given another number of devices than the snapshot
    /// holds.
    #[error("invalid configuration: the snapshot has {saved} device(s), {given} given")]
    DeviceCount {
        /// Devices in the snapshot.
        saved: usize,
        /// Devices given for the restore.
        given: usize,
    },
    /// A restore was given a device of another virtio type than the
    /// snapshot holds at that place.
    #[error(
        "invalid configuration: device {index}: the snapshot holds virtio device type {saved}, \
         {spec:?} is type {given}"
    )]
    DeviceType {
        /// The device's index (counting from 0).
        index: usize,
        /// The virtio device type in the snapshot.
        saved: u32,
        /// The device given for the restore.
        spec: Box<DeviceSpec>,
        /// Its virtio device type.
        given: u32,
    },
    /// The snapshot does not hold one state per in-kernel interrupt
    /// controller.
    #[error(
        "invalid configuration: {0} interrupt controllers in the snapshot (expected {n})",
        n = IRQCHIP_IDS.len()
    )]
    IrqchipCount(usize),
    /// The snapshot's interrupt controllers are not in KVM chip ID order.
    #[error("invalid configuration: irqchip {0} out of order")]
    IrqchipOrder(u32),
    /// The RAM given does not match the VM state's size.
    #[error("invalid configuration: the RAM does not match the state's {0} MiB")]
    RamSize(u64),
    /// `/dev/kvm` cannot be used.
    #[error("cannot use /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{0} failed")]
    VmIoctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Guest memory could not be registered with KVM.
    #[error("cannot register guest memory with KVM")]
    MemorySlots(#[source] virtio_backend_kit::kvm::KvmError),
    /// Loading the kernel or initramfs.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Building the ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Attaching device number `.0` (counting from 0).
    #[error("device {0}")]
    Device(usize, #[source] devices::DeviceError),
    /// A bus refused a device.
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    /// A vCPU could not be set up, stopped or saved.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// The snapshot file.
    #[error(transparent)]
    Snapshot(#[from] snapshot::VmSnapshotError),
    /// A live migration.
    #[error(transparent)]
    Migration(#[from] migration::MigrationError),
    /// Device number `.0`'s state could not be saved or loaded.
    #[error("device {0}: snapshot")]
    DeviceSnapshot(usize, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// A thread or signal handler could not be set up.
    #[error("{0}")]
    Setup(&'static str, #[source] std::io::Error),
}

/// How the vCPUs tell the main thread that the guest is done.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Record `reason` (the first one wins) and wake the main thread.
    pub fn signal(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(reason);
        // A full eventfd counter still wakes the reader.
        let _ = self.evt.write(1);
    }

    /// Why the guest stopped, once it has.
    pub fn reason(&self) -> Option<ExitReason> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wakes the event loop when [`ExitSignal`] is raised.
struct ExitSubscriber(Arc<ExitSignal>);

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            error!("cannot watch the exit eventfd: {e:?}");
        }
    }
}

/// A built VM, ready to run.
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    buses: Arc<Buses>,
    exit: Arc<ExitSignal>,
    event_loop: EventManager<Box<dyn MutEventSubscriber + Send>>,
    devices: Vec<AttachedDevice>,
    specs: Vec<DeviceSpec>,
    /// Device states to load once the event loop runs (in-process data
    /// planes take their queues from it).
    pending: Vec<Option<DeviceSnapshot>>,
    memory: GuestMemoryLog,
    log: Arc<SharedDirtyLog>,
    mem_mib: u64,
    serial: Arc<Mutex<SerialConsole>>,
    on_signal: Option<SignalAction>,
    vm: Arc<VmFd>,
    /// Guest RAM's KVM slots, for the VM's lifetime (a migration turns
    /// their dirty logging on).
    slots: Arc<Mutex<KvmMemorySlots>>,
    // Kept alive for the VM's lifetime.
    _serial_irq: EventFd,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus)
            .field("devices", &self.devices)
            .field("specs", &self.specs)
            .field("mem_mib", &self.mem_mib)
            .field("on_signal", &self.on_signal)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Build the VM: memory, devices, kernel, ACPI tables, vCPUs.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let vcpu_count = check_vcpus(usize::from(config.vcpus))?;
        // Cheap checks first: a typo in a path should not cost a backend
        // connection.
        for (path, what) in [
            (Some(&config.kernel), "kernel"),
            (config.initrd.as_ref(), "initramfs"),
        ] {
            if let Some(path) = path {
                std::fs::File::open(path).map_err(|e| match what {
                    "kernel" => boot::BootError::OpenKernel(path.clone(), e),
                    _ => boot::BootError::OpenInitrd(path.clone(), e),
                })?;
            }
        }
        let ram = memory::create(config.mem_mib)?;
        let (machine, slots) = Machine::build(ram, &config.devices, &config.registry)?;

        let mut cmdline = config.cmdline.trim().to_string();
        for dev in &machine.devices {
            // For kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
            let w = dev.window;
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", w.base, w.gsi));
        }
        let rsdp = GuestAddress(layout::ACPI_START);
        let entry = boot::load_linux(
            &machine.memory,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
            rsdp,
        )?;
        let windows: Vec<_> = machine.devices.iter().map(|d| d.window).collect();
        acpi::write_tables(&machine.memory, vcpu_count, &windows)?;

        let serial_irq = machine.serial_irq()?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq.try_clone().map_err(VmmError::EventFd)?,
        )));
        let pio = machine.port_bus(serial.clone())?;
        let msrs = vcpu::msr_indices(&machine.kvm)?;
        let vcpus = (0..vcpu_count)
            .map(|id| {
                Vcpu::new(
                    &machine.kvm,
                    &machine.vm,
                    id,
                    vcpu_count,
                    entry,
                    msrs.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pending = vec![None; config.devices.len()];
        machine.into_vmm(
            slots,
            vcpus,
            config.devices.clone(),
            pending,
            config.mem_mib,
            serial,
            serial_irq,
            pio,
        )
    }

    /// Save the VM to `path` and stop when the process receives SIGUSR1.
    pub fn snapshot_on_signal(&mut self, path: PathBuf) {
        self.on_signal = Some(SignalAction::Snapshot(path));
    }

    /// Migrate the running VM to the destination `to` names when the
    /// process receives SIGUSR1 (see [`migration`]); a second SIGUSR1
    /// during the migration cancels it. A migration that fails or is
    /// cancelled leaves the VM running here, and SIGUSR1 tries again.
    pub fn migrate_on_signal(&mut self, to: MigrateTo) {
        self.on_signal = Some(SignalAction::Migrate(to));
    }

    /// The attached devices, in guest order.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// Start the vCPUs and serve the devices until the guest stops (or is
    /// saved).
    ///
    /// The vCPU threads are left blocked in KVM when this returns: the
    /// caller is expected to end the process (dropping a running VM would
    /// pull memory from under them).
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let started = Instant::now();
        let on_signal = match self.on_signal.take() {
            Some(action) => Some((
                action,
                Signals::new([SIGUSR1]).map_err(|e| VmmError::Setup("watching SIGUSR1", e))?,
            )),
            None => None,
        };
        let control = Control {
            vcpus: std::mem::take(&mut self.vcpus),
            gate: PauseGate::new()?,
            buses: self.buses.clone(),
            exit: self.exit.clone(),
            transports: self.devices.iter().map(|d| d.transport.clone()).collect(),
            specs: self.specs.clone(),
            pending: std::mem::take(&mut self.pending),
            vm: self.vm.clone(),
            memory: self.memory.clone(),
            log: self.log.clone(),
            slots: self.slots.clone(),
            mem_mib: self.mem_mib,
            serial: self.serial.clone(),
            on_signal,
        };
        diagnostics::report_on_signal(
            (self.devices.iter())
                .map(|d| diagnostics::Reported {
                    description: d.description.clone(),
                    base: d.window.base,
                    transport: d.transport.clone(),
                })
                .collect(),
        );
        std::thread::Builder::new()
            .name("vmm-control".into())
            .spawn(move || control.run())
            .map_err(|e| VmmError::Setup("spawning the control thread", e))?;
        loop {
            if let Some(reason) = self.exit.reason() {
                info!(
                    "guest stopped ({reason:?}) after {:.2} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(reason);
            }
            self.event_loop.run().map_err(VmmError::EventLoop)?;
        }
    }
}

pub use virtio_backend_kit::error_chain;
