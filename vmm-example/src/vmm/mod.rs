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
pub mod device_spec;
pub mod devices;
pub mod diagnostics;
mod machine;
pub mod memory;
pub mod registry;
mod restore;
pub mod serial;
pub mod snapshot;
pub mod vcpu;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use kvm_bindings::kvm_irqchip;
use kvm_ioctls::VmFd;
use log::{error, info};
use signal_hook::consts::SIGUSR1;
use signal_hook::iterator::Signals;
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::mmio::MmioTransport;
use virtio_backend_kit::snapshot::{self as device_snapshot, DeviceSnapshot};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::GuestMemoryLog;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use device_spec::{DeviceHome, DeviceOptions, DeviceSpec};
pub use memory::layout;
pub use registry::{DeviceKind, DeviceRegistry, KindInfo};

use devices::AttachedDevice;
use machine::{check_vcpus, Machine, IRQCHIP_IDS};
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
}

/// How long vCPUs get to stop for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    /// Device number `.0`'s state could not be saved or loaded.
    #[error("device {0}: snapshot")]
    DeviceSnapshot(usize, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// A thread or signal handler could not be set up.
    #[error("{0}")]
    Setup(&'static str, #[source] std::io::Error),
}

/// How the vCPUs tell the main thread that the guest is done.
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

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    mem_mib: u64,
    serial: Arc<Mutex<SerialConsole>>,
    snapshot_to: Option<PathBuf>,
    vm: Arc<VmFd>,
    // Kept alive for the VM's lifetime.
    _serial_irq: EventFd,
    _slots: KvmMemorySlots,
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
        let (machine, slots) = Machine::build(
            config.mem_mib,
            &config.devices,
            &config.registry,
            |_| Ok(()),
        )?;

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
        self.snapshot_to = Some(path);
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
        let signals = match self.snapshot_to {
            Some(_) => {
                Some(Signals::new([SIGUSR1]).map_err(|e| VmmError::Setup("watching SIGUSR1", e))?)
            }
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
            mem_mib: self.mem_mib,
            serial: self.serial.clone(),
            save: self.snapshot_to.clone().zip(signals),
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

/// The VM's control thread: loads restored device state, starts the vCPUs,
/// and saves the VM when asked. Device control calls go through here, off
/// the event loop's thread, because in-process data planes take their
/// queues from that loop.
struct Control {
    vcpus: Vec<Vcpu>,
    gate: Arc<PauseGate>,
    buses: Arc<Buses>,
    exit: Arc<ExitSignal>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    specs: Vec<DeviceSpec>,
    pending: Vec<Option<DeviceSnapshot>>,
    vm: Arc<VmFd>,
    memory: GuestMemoryLog,
    mem_mib: u64,
    serial: Arc<Mutex<SerialConsole>>,
    save: Option<(PathBuf, Signals)>,
}

impl Control {
    fn run(mut self) {
        if let Err(e) = self.start() {
            error!("{}", error_chain(&e));
            self.exit.signal(ExitReason::Failure);
        }
    }

    fn start(&mut self) -> Result<(), VmmError> {
        let pending = std::mem::take(&mut self.pending);
        for (index, (transport, snap)) in self.transports.iter().zip(pending).enumerate() {
            if let Some(snap) = snap {
                lock(transport)
                    .load_snapshot(snap)
                    .map_err(|e| VmmError::DeviceSnapshot(index, Box::new(e)))?;
            }
        }
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            threads.push(vcpu.spawn(self.buses.clone(), self.exit.clone(), self.gate.clone())?);
        }
        let Some((path, mut signals)) = self.save.take() else {
            return Ok(());
        };
        if signals.forever().next().is_none() {
            return Ok(());
        }
        info!("SIGUSR1: saving the VM to {}", path.display());
        self.save(&threads, &path)?;
        self.exit.signal(ExitReason::Snapshot);
        Ok(())
    }

    /// Stop the vCPUs, pause the devices and write everything to `path`.
    fn save(&self, threads: &[JoinHandle<()>], path: &Path) -> Result<(), VmmError> {
        let started = Instant::now();
        let vcpus = self.gate.stop_all(threads, PAUSE_TIMEOUT)?;
        let vcpus_stopped = started.elapsed();
        let mut devices = Vec::new();
        let (mut queued, mut in_flight) = (0u64, 0u64);
        for (index, (spec, transport)) in self.specs.iter().zip(&self.transports).enumerate() {
            let snap = lock(transport)
                .snapshot()
                .map_err(|e| VmmError::DeviceSnapshot(index, Box::new(e)))?;
            for q in snap.queues.iter().filter(|q| q.is_configured()) {
                // Requests the driver made available that the device had not
                // taken yet: they wait in guest RAM for the restored device.
                let avail_idx: u16 = self
                    .memory
                    .read_obj(GuestAddress(q.avail_ring + 2))
                    .unwrap_or(q.next_avail);
                queued += u64::from(avail_idx.wrapping_sub(q.next_avail));
                in_flight += u64::from(q.outstanding());
            }
            let home = match &spec.home {
                DeviceHome::InProcess(_) => "in process",
                DeviceHome::VhostUser(_) => "vhost-user",
            };
            info!(
                "device {index} ({}, {home}): {} bytes of its own state",
                spec.kind,
                snap.device_state.len()
            );
            let envelope = device_snapshot::encode(&snap)
                .map_err(|e| VmmError::DeviceSnapshot(index, Box::new(e)))?;
            devices.push(DeviceRecord {
                spec: spec.clone(),
                envelope,
            });
        }
        let mut irqchips = Vec::new();
        for id in IRQCHIP_IDS {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(|e| VmmError::VmIoctl("KVM_GET_IRQCHIP", e))?;
            irqchips.push(chip);
        }
        let state = VmState {
            mem_mib: self.mem_mib,
            vcpus,
            irqchips,
            pit: self
                .vm
                .get_pit2()
                .map_err(|e| VmmError::VmIoctl("KVM_GET_PIT2", e))?,
            clock: self
                .vm
                .get_clock()
                .map_err(|e| VmmError::VmIoctl("KVM_GET_CLOCK", e))?,
            serial: lock(&self.serial).snapshot(),
            devices,
        };
        let ram = memory::ram_file(&self.memory)
            .ok_or(VmmError::Config("guest RAM has no backing file".into()))?;
        let devices_paused = started.elapsed();
        let size = snapshot::write(path, &state, ram, self.mem_mib << 20)?;
        info!(
            "saved to {}: vCPUs stopped in {:.1} ms, devices paused at {:.1} ms; {} device(s), \
             {in_flight} request(s) in flight and {queued} queued at the cut; state {} bytes, \
             RAM {} MiB ({} KiB not zero); {:.1} ms in all",
            path.display(),
            vcpus_stopped.as_secs_f64() * 1e3,
            devices_paused.as_secs_f64() * 1e3,
            self.specs.len(),
            size.state,
            self.mem_mib,
            size.ram_data >> 10,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }
}

pub use virtio_backend_kit::error_chain;
