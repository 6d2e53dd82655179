// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM's control thread: device state for a restore, the vCPU threads,
//! and on SIGUSR1 saving the VM to its snapshot file or migrating it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_irqchip;
use kvm_ioctls::VmFd;
use log::{error, info};
use signal_hook::iterator::Signals;
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::mmio::MmioTransport;
use virtio_backend_kit::snapshot::{self as device_snapshot, DeviceSnapshot};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::{GuestMemoryLog, SharedDirtyLog};

use super::machine::IRQCHIP_IDS;
use super::migration::MigrateTo;
use super::serial::SerialConsole;
use super::snapshot::{self, DeviceRecord, VmState};
use super::vcpu::{Buses, PauseGate, Vcpu};
use super::{error_chain, memory, DeviceHome, DeviceSpec, ExitReason, ExitSignal, VmmError};

/// How long vCPUs get to stop for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The VM's control thread: loads restored device state, starts the vCPUs,
/// and saves the VM when asked. Device control calls go through here, off
/// the event loop's thread, because in-process data planes take their
/// queues from that loop.
pub(super) struct Control {
    pub(super) vcpus: Vec<Vcpu>,
    pub(super) gate: Arc<PauseGate>,
    pub(super) buses: Arc<Buses>,
    pub(super) exit: Arc<ExitSignal>,
    pub(super) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) specs: Vec<DeviceSpec>,
    pub(super) pending: Vec<Option<DeviceSnapshot>>,
    pub(super) vm: Arc<VmFd>,
    pub(super) memory: GuestMemoryLog,
    pub(super) log: Arc<SharedDirtyLog>,
    pub(super) slots: Arc<Mutex<KvmMemorySlots>>,
    pub(super) mem_mib: u64,
    pub(super) serial: Arc<Mutex<SerialConsole>>,
    pub(super) on_signal: Option<(SignalAction, Signals)>,
}

/// What SIGUSR1 asks for.
#[derive(Debug)]
pub(super) enum SignalAction {
    /// Save the VM to this file and stop.
    Snapshot(PathBuf),
    /// Migrate the VM (see [`super::migration`]).
    Migrate(MigrateTo),
}

/// The VM stopped at a cut: its state, and each device's snapshot (kept to
/// resume the devices if the cut is not used after all).
pub(super) struct Cut {
    pub(super) state: VmState,
    pub(super) snapshots: Vec<DeviceSnapshot>,
    pub(super) queued: u64,
    pub(super) in_flight: u64,
}

impl Control {
    /// Start the VM; on failure, log why and stop it.
    pub(super) fn run(mut self) {
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
        let Some((action, mut signals)) = self.on_signal.take() else {
            return Ok(());
        };
        match action {
            SignalAction::Snapshot(path) => {
                if signals.forever().next().is_none() {
                    return Ok(());
                }
                info!("SIGUSR1: saving the VM to {}", path.display());
                self.save(&threads, &path)?;
                self.exit.signal(ExitReason::Snapshot);
            }
            SignalAction::Migrate(to) => {
                while signals.wait().next().is_some() {
                    info!("SIGUSR1: migrating the VM to {}", to.address);
                    match self.migrate(&threads, &to, &mut signals) {
                        Ok(()) => {
                            self.exit.signal(ExitReason::Migrated);
                            return Ok(());
                        }
                        Err(e) => error!(
                            "migration to {} failed; the VM runs on here: {}",
                            to.address,
                            error_chain(&e)
                        ),
                    }
                }
            }
        }
        Ok(())
    }

    /// Stop the vCPUs, pause the devices and write everything to `path`.
    fn save(&self, threads: &[JoinHandle<()>], path: &Path) -> Result<(), VmmError> {
        let started = Instant::now();
        let cut = self.cut(threads)?;
        let ram = memory::ram_file(&self.memory).ok_or(VmmError::NoRamFile)?;
        let devices_paused = started.elapsed();
        let size = snapshot::write(path, &cut.state, ram, self.mem_mib << 20)?;
        info!(
            "saved to {}: devices paused at {:.1} ms; {} device(s), \
             {} request(s) in flight and {} queued at the cut; state {} bytes, \
             RAM {} MiB ({} KiB not zero); {:.1} ms in all",
            path.display(),
            devices_paused.as_secs_f64() * 1e3,
            self.specs.len(),
            cut.in_flight,
            cut.queued,
            size.state,
            self.mem_mib,
            size.ram_data >> 10,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Stop the vCPUs and the devices and capture the VM's state. If a
    /// device cannot be saved, the ones already stopped and the vCPUs go
    /// on and the error is returned.
    pub(super) fn cut(&self, threads: &[JoinHandle<()>]) -> Result<Cut, VmmError> {
        let started = Instant::now();
        let vcpus = match self.gate.stop_all(threads, PAUSE_TIMEOUT) {
            Ok(v) => v,
            Err(e) => {
                self.gate.open();
                return Err(e.into());
            }
        };
        info!(
            "vCPUs stopped in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        let mut snapshots = Vec::new();
        for (index, transport) in self.transports.iter().enumerate() {
            match lock(transport).snapshot() {
                Ok(snap) => snapshots.push(snap),
                Err(e) => {
                    self.resume(snapshots);
                    return Err(VmmError::DeviceSnapshot(index, Box::new(e)));
                }
            }
        }
        match self.capture(vcpus, &snapshots) {
            Ok((state, queued, in_flight)) => Ok(Cut {
                state,
                snapshots,
                queued,
                in_flight,
            }),
            Err(e) => {
                self.resume(snapshots);
                Err(e)
            }
        }
    }

    /// Let the devices and vCPUs stopped by [`Control::cut`] go on from
    /// where they stopped.
    pub(super) fn resume(&self, snapshots: Vec<DeviceSnapshot>) {
        for (index, (transport, snap)) in self.transports.iter().zip(snapshots).enumerate() {
            if let Err(e) = lock(transport).resume(snap) {
                error!("device {index} cannot resume: {}", error_chain(&e));
            }
        }
        self.gate.open();
    }

    fn capture(
        &self,
        vcpus: Vec<super::vcpu::VcpuState>,
        snapshots: &[DeviceSnapshot],
    ) -> Result<(VmState, u64, u64), VmmError> {
        let mut devices = Vec::new();
        let (mut queued, mut in_flight) = (0u64, 0u64);
        for (index, (spec, snap)) in self.specs.iter().zip(snapshots).enumerate() {
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
            let envelope = device_snapshot::encode(snap)
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
        Ok((state, queued, in_flight))
    }
}
