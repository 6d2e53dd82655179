// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Building a VM from a snapshot file: RAM, the VM-wide KVM state, vCPUs,
//! the serial console, and each device in the home the caller chooses.

use super::*;
use virtio_backend_kit::vm_memory::GuestMemoryBackend;

impl Vmm {
    /// Build the VM saved in `path`. `devices` chooses each device's home
    /// (in process or a vhost-user backend); it must list the same kinds of
    /// device in the same order as the snapshot, or be empty to keep the
    /// homes the snapshot records. Their kinds come from `registry`.
    pub fn restore(
        path: &Path,
        devices: Vec<DeviceSpec>,
        registry: &DeviceRegistry,
    ) -> Result<Self, VmmError> {
        let started = Instant::now();
        let file = SnapshotFile::open(path)?;
        let ram = memory::create(file.state.mem_mib)?;
        let file_ram = memory::ram_file(&ram.memory).ok_or(VmmError::NoRamFile)?;
        let t = Instant::now();
        let loaded = file.load_ram(file_ram)?;
        let origin = format!(
            "{} ({} MiB loaded in {:.1} ms)",
            path.display(),
            loaded >> 20,
            t.elapsed().as_secs_f64() * 1e3
        );
        Self::from_state(&file.state, ram, devices, registry, &origin, started)
    }

    /// Build the VM `state` describes on `ram` (already holding the
    /// guest's memory), each device in the home `devices` gives (or the
    /// one `state` records, when empty). `origin` says where it came from,
    /// for the log.
    pub(super) fn from_state(
        state: &VmState,
        ram: memory::GuestRam,
        devices: Vec<DeviceSpec>,
        registry: &DeviceRegistry,
        origin: &str,
        started: Instant,
    ) -> Result<Self, VmmError> {
        let specs = if devices.is_empty() {
            state.devices.iter().map(|d| d.spec.clone()).collect()
        } else {
            devices
        };
        let pending = device_snapshots(&specs, &state.devices, registry)?;
        let vcpu_count = check_vcpus(state.vcpus.len())?;
        if ram.memory.last_addr().0.checked_add(1) != state.mem_mib.checked_shl(20) {
            return Err(VmmError::RamSize(state.mem_mib));
        }
        let (machine, slots) = Machine::build(ram, &specs, registry)?;
        restore_vm_state(&machine.vm, state)?;
        let serial_irq = machine.serial_irq()?;
        let serial = SerialConsole::restore(
            serial_irq.try_clone().map_err(VmmError::EventFd)?,
            &state.serial,
        )
        .map_err(|e| VmmError::Setup("restoring the serial console", e))?;
        let serial = Arc::new(Mutex::new(serial));
        let pio = machine.port_bus(serial.clone())?;
        let msrs = vcpu::msr_indices(&machine.kvm)?;
        let vcpus = state
            .vcpus
            .iter()
            .map(|s| Vcpu::restore(&machine.kvm, &machine.vm, vcpu_count, s, msrs.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        info!(
            "restored from {origin}: {} vCPU(s), {} device(s), {} MiB RAM in {:.1} ms",
            vcpu_count,
            specs.len(),
            state.mem_mib,
            started.elapsed().as_secs_f64() * 1e3
        );
        let mem_mib = state.mem_mib;
        machine.into_vmm(
            slots, vcpus, specs, pending, mem_mib, serial, serial_irq, pio,
        )
    }
}

/// Each device's kit snapshot from `records`, checked against the kind
/// `specs` gives it (same count, same virtio device type).
pub(super) fn device_snapshots(
    specs: &[DeviceSpec],
    records: &[DeviceRecord],
    registry: &DeviceRegistry,
) -> Result<Vec<Option<DeviceSnapshot>>, VmmError> {
    if specs.len() != records.len() {
        return Err(VmmError::DeviceCount {
            saved: records.len(),
            given: specs.len(),
        });
    }
    let mut pending = Vec::with_capacity(records.len());
    for (index, (spec, record)) in specs.iter().zip(records).enumerate() {
        let snap = device_snapshot::decode(&record.envelope)
            .map_err(|e| VmmError::DeviceSnapshot(index, Box::new(e)))?;
        let kind = registry
            .get(&spec.kind)
            .map_err(|e| VmmError::Device(index, e))?;
        let device_type = kind.info().device_type;
        if snap.device_type != device_type {
            return Err(VmmError::DeviceType {
                index,
                saved: snap.device_type,
                spec: Box::new(spec.clone()),
                given: device_type,
            });
        }
        pending.push(Some(snap));
    }
    Ok(pending)
}

/// The VM-wide KVM state: the PIT, the clock value and the interrupt
/// controllers, in the order [`IRQCHIP_IDS`] gives.
fn restore_vm_state(vm: &VmFd, state: &VmState) -> Result<(), VmmError> {
    vm.set_pit2(&state.pit)
        .map_err(|e| VmmError::VmIoctl("KVM_SET_PIT2", e))?;
    let mut clock = state.clock;
    // Only the clock value is restored; the flags describe the source
    // host's clock.
    clock.flags = 0;
    clock.realtime = 0;
    clock.host_tsc = 0;
    vm.set_clock(&clock)
        .map_err(|e| VmmError::VmIoctl("KVM_SET_CLOCK", e))?;
    if state.irqchips.len() != IRQCHIP_IDS.len() {
        return Err(VmmError::IrqchipCount(state.irqchips.len()));
    }
    for (chip, id) in state.irqchips.iter().zip(IRQCHIP_IDS) {
        if chip.chip_id != id {
            return Err(VmmError::IrqchipOrder(chip.chip_id));
        }
        vm.set_irqchip(chip)
            .map_err(|e| VmmError::VmIoctl("KVM_SET_IRQCHIP", e))?;
    }
    Ok(())
}
