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
//!
//! [`Vmm::new`] builds the machine; [`Vmm::run`] runs the vCPUs on their own
//! threads and the devices' data planes on an `event-manager` loop on the
//! calling thread until the guest powers off, resets or fails.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod memory;
pub mod serial;
pub mod vcpu;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use log::{error, info};
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use devices::DeviceSpec;
pub use memory::layout;

use bus::{Bus, PowerDevice, ResetDevice};
use devices::AttachedDevice;
use vcpu::{Buses, Vcpu};

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
}

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
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
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

/// A built VM, ready to run.
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    buses: Arc<Buses>,
    exit: Arc<ExitSignal>,
    event_loop: EventManager<Box<dyn MutEventSubscriber + Send>>,
    devices: Vec<AttachedDevice>,
    // Kept alive for the VM's lifetime.
    _serial_irq: EventFd,
    _slots: KvmMemorySlots,
    _vm: Arc<VmFd>,
}

fn create_vm(kvm: &Kvm) -> Result<Arc<VmFd>, VmmError> {
    let vm = kvm.create_vm().map_err(VmmError::Kvm)?;
    vm.set_tss_address(layout::KVM_TSS_ADDR)
        .map_err(|e| VmmError::VmIoctl("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmmError::VmIoctl("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmmError::VmIoctl("KVM_CREATE_PIT2", e))?;
    Ok(Arc::new(vm))
}

impl Vmm {
    /// Build the VM: memory, devices, kernel, ACPI tables, vCPUs.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        if !(1..=32).contains(&config.vcpus) {
            return Err(VmmError::Config(format!(
                "{} vCPUs (1 to 32 supported)",
                config.vcpus
            )));
        }
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
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let vm = create_vm(&kvm)?;
        let memory = memory::create(config.mem_mib)?;
        let slots =
            KvmMemorySlots::register(vm.clone(), &memory, 0).map_err(VmmError::MemorySlots)?;
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::EventFd)?);

        let mut subscribers = Vec::new();
        let mut mmio = Bus::default();
        let mut devices = Vec::new();
        let mut cmdline = config.cmdline.trim().to_string();
        for (index, spec) in config.devices.iter().enumerate() {
            let dev = devices::attach(spec, index, &memory, &vm, &mut subscribers)
                .map_err(|e| VmmError::Device(index, e))?;
            let w = dev.window;
            info!("{} at {:#x}, GSI {}", dev.description, w.base, w.gsi);
            mmio.insert(w.base, w.size, dev.transport.clone())?;
            // For kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", w.base, w.gsi));
            devices.push(dev);
        }

        let rsdp = GuestAddress(layout::ACPI_START);
        let entry = boot::load_linux(
            &memory,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
            rsdp,
        )?;
        let windows: Vec<_> = devices.iter().map(|d| d.window).collect();
        acpi::write_tables(&memory, config.vcpus, &windows)?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_GSI)
            .map_err(|e| VmmError::VmIoctl("KVM_IRQFD (serial)", e))?;
        let serial_trigger = serial_irq.try_clone().map_err(VmmError::EventFd)?;
        let mut pio = Bus::default();
        pio.insert(
            layout::SERIAL_PORT.into(),
            8,
            Arc::new(Mutex::new(serial::SerialConsole::new(serial_trigger))),
        )?;
        pio.insert(
            layout::SLEEP_CONTROL_PORT.into(),
            2,
            Arc::new(Mutex::new(PowerDevice::new(exit.clone()))),
        )?;
        pio.insert(
            layout::RESET_PORT.into(),
            1,
            Arc::new(Mutex::new(ResetDevice::new(
                layout::RESET_VALUE,
                exit.clone(),
            ))),
        )?;
        pio.insert(
            layout::I8042_COMMAND_PORT.into(),
            1,
            Arc::new(Mutex::new(ResetDevice::new(0xfe, exit.clone()))),
        )?;

        let vcpus = (0..config.vcpus)
            .map(|id| Vcpu::new(&kvm, &vm, id, config.vcpus, entry))
            .collect::<Result<Vec<_>, _>>()?;

        let mut event_loop: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        event_loop.add_subscriber(Box::new(ExitSubscriber(exit.clone())));
        for s in subscribers {
            event_loop.add_subscriber(s);
        }
        Ok(Vmm {
            vcpus,
            buses: Arc::new(Buses { mmio, pio }),
            exit,
            event_loop,
            devices,
            _serial_irq: serial_irq,
            _slots: slots,
            _vm: vm,
        })
    }

    /// The attached devices, in guest order.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// Start the vCPUs and serve the devices until the guest stops.
    ///
    /// The vCPU threads are left blocked in KVM when this returns: the
    /// caller is expected to end the process (dropping a running VM would
    /// pull memory from under them).
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let started = Instant::now();
        for vcpu in self.vcpus.drain(..) {
            vcpu.spawn(self.buses.clone(), self.exit.clone())?;
        }
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
