// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The machine under construction: the KVM VM, guest RAM, the devices on
//! the MMIO bus and their data planes, before the vCPUs and the event
//! loop make it a running [`Vmm`].

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use log::info;
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::snapshot::DeviceSnapshot;
use virtio_backend_kit::{GuestMemoryLog, SharedDirtyLog};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{Bus, PowerDevice, ResetDevice};
use super::devices::{self, AttachedDevice, Subscribers};
use super::memory::GuestRam;
use super::registry::DeviceRegistry;
use super::serial::SerialConsole;
use super::vcpu::{Buses, Vcpu};
use super::{layout, DeviceSpec, ExitSignal, ExitSubscriber, Vmm, VmmError};

pub(super) fn create_vm(kvm: &Kvm) -> Result<Arc<VmFd>, VmmError> {
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

pub(super) fn check_vcpus(count: usize) -> Result<u8, VmmError> {
    u8::try_from(count)
        .ok()
        .filter(|n| (1..=32).contains(n))
        .ok_or(VmmError::VcpuCount(count))
}

/// KVM's in-kernel interrupt controllers: PIC master, PIC slave, I/O APIC.
pub(super) const IRQCHIP_IDS: [u32; 3] = [0, 1, 2];

/// What the fresh-boot and restore paths build the same way.
pub(super) struct Machine {
    pub(super) kvm: Kvm,
    pub(super) vm: Arc<VmFd>,
    pub(super) memory: GuestMemoryLog,
    pub(super) log: Arc<SharedDirtyLog>,
    pub(super) exit: Arc<ExitSignal>,
    pub(super) subscribers: Subscribers,
    pub(super) mmio: Bus,
    pub(super) devices: Vec<AttachedDevice>,
}

impl Machine {
    /// A VM on `ram` (already filled, for a restore or a migration) with
    /// `specs` attached.
    pub(super) fn build(
        ram: GuestRam,
        specs: &[DeviceSpec],
        registry: &DeviceRegistry,
    ) -> Result<(Self, KvmMemorySlots), VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Kvm)?;
        let vm = create_vm(&kvm)?;
        let GuestRam { memory, log } = ram;
        let slots =
            KvmMemorySlots::register(vm.clone(), &memory, 0).map_err(VmmError::MemorySlots)?;
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::EventFd)?);
        let mut machine = Machine {
            kvm,
            vm,
            memory,
            log,
            exit,
            subscribers: Vec::new(),
            mmio: Bus::default(),
            devices: Vec::new(),
        };
        for (index, spec) in specs.iter().enumerate() {
            let dev = devices::attach(
                spec,
                registry,
                index,
                &machine.memory,
                &machine.vm,
                &mut machine.subscribers,
            )
            .map_err(|e| VmmError::Device(index, e))?;
            let w = dev.window;
            info!("{} at {:#x}, GSI {}", dev.description, w.base, w.gsi);
            machine.mmio.insert(w.base, w.size, dev.transport.clone())?;
            machine.devices.push(dev);
        }
        Ok((machine, slots))
    }

    /// The port-I/O platform (console, power-off, reset) around `serial`.
    pub(super) fn port_bus(&self, serial: Arc<Mutex<SerialConsole>>) -> Result<Bus, VmmError> {
        let mut pio = Bus::default();
        pio.insert(layout::SERIAL_PORT.into(), 8, serial)?;
        pio.insert(
            layout::SLEEP_CONTROL_PORT.into(),
            2,
            Arc::new(Mutex::new(PowerDevice::new(self.exit.clone()))),
        )?;
        pio.insert(
            layout::RESET_PORT.into(),
            1,
            Arc::new(Mutex::new(ResetDevice::new(
                layout::RESET_VALUE,
                self.exit.clone(),
            ))),
        )?;
        pio.insert(
            layout::I8042_COMMAND_PORT.into(),
            1,
            Arc::new(Mutex::new(ResetDevice::new(0xfe, self.exit.clone()))),
        )?;
        Ok(pio)
    }

    pub(super) fn serial_irq(&self) -> Result<EventFd, VmmError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm
            .register_irqfd(&irq, layout::SERIAL_GSI)
            .map_err(|e| VmmError::VmIoctl("KVM_IRQFD (serial)", e))?;
        Ok(irq)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn into_vmm(
        self,
        slots: KvmMemorySlots,
        vcpus: Vec<Vcpu>,
        specs: Vec<DeviceSpec>,
        pending: Vec<Option<DeviceSnapshot>>,
        mem_mib: u64,
        serial: Arc<Mutex<SerialConsole>>,
        serial_irq: EventFd,
        pio: Bus,
    ) -> Result<Vmm, VmmError> {
        let mut event_loop: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(VmmError::EventLoop)?;
        event_loop.add_subscriber(Box::new(ExitSubscriber(self.exit.clone())));
        for s in self.subscribers {
            event_loop.add_subscriber(s);
        }
        Ok(Vmm {
            vcpus,
            buses: Arc::new(Buses {
                mmio: self.mmio,
                pio,
            }),
            exit: self.exit,
            event_loop,
            devices: self.devices,
            specs,
            pending,
            memory: self.memory,
            log: self.log,
            mem_mib,
            serial,
            on_signal: None,
            vm: self.vm,
            _serial_irq: serial_irq,
            slots: Arc::new(Mutex::new(slots)),
        })
    }
}
