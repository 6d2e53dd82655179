// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The transport-facing view of a device: what an in-process transport
//! (virtio-mmio) needs from whatever implements the device, be it a
//! [`DeviceCore`] in this process or a vhost-user backend in another one.

use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{CoreError, DeviceCore};
use crate::backend::{BackendError, ConfigNotifier, DeviceBackend};
use crate::data_plane::SharedDirtyLog;
use crate::memory::GuestMemoryLog;
use crate::snapshot::{DeviceSnapshot, SnapshotLimits, ValidatedSnapshot, ValidationError};
use crate::vring::Notifier;

/// Why a transport-level operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The in-process control core refused.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The external backend (or the link to it) failed.
    #[error("external backend: {0}")]
    External(#[source] BackendError),
    /// The activation asked for something impossible.
    #[error("invalid activation: {0}")]
    Invalid(&'static str),
    /// A snapshot does not fit this device.
    #[error("snapshot refused")]
    Snapshot(#[from] ValidationError),
}

/// One queue as the driver set it up.
#[derive(Debug)]
pub struct QueueActivation {
    /// Queue index.
    pub index: u16,
    /// Negotiated size.
    pub size: u16,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest physical address of the used (device) ring.
    pub used_ring: u64,
    /// The eventfd the driver's notifications arrive on (a KVM ioeventfd).
    pub kick: EventFd,
    /// Where used-buffer notifications go (a KVM irqfd plus status bit).
    pub call: Notifier,
    /// Where the device reports that the queue hit an error it cannot
    /// recover from (see [`crate::vring::Completion::NeedsReset`]): for
    /// virtio-mmio, DEVICE_NEEDS_RESET plus a config-change interrupt.
    pub err: Notifier,
}

/// Everything a device needs when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// The features the driver accepted.
    pub features: u64,
    /// Guest memory. Regions must be file-backed (memfd) for an external
    /// backend to map them.
    pub memory: GuestMemoryLog,
    /// The queues the driver made ready.
    pub queues: Vec<QueueActivation>,
}

/// A device as a transport drives it.
pub trait DeviceControl: Send {
    /// Virtio device ID.
    fn device_type(&self) -> u32;
    /// Number of queues.
    fn num_queues(&self) -> usize;
    /// Largest queue size.
    fn max_queue_size(&self) -> u16;
    /// Offered virtio features.
    fn device_features(&self) -> u64;
    /// Read the config space (bytes past its end read as zero).
    fn read_config(&self, offset: u32, data: &mut [u8]);
    /// Write the config space.
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ControlError>;
    /// Where config-change notices go.
    fn set_config_notifier(&mut self, notifier: ConfigNotifier);
    /// Start the device with the driver's setup.
    fn activate(&mut self, activation: Activation) -> Result<(), ControlError>;
    /// Stop all queues and return to the initial state.
    fn reset(&mut self) -> Result<(), ControlError>;
    /// Stop the device and capture its state, to move it elsewhere (another
    /// process, another home). The device stays stopped until reset.
    fn snapshot(&mut self) -> Result<DeviceSnapshot, ControlError>;
    /// Start the device from `snapshot` instead of from scratch: like
    /// [`DeviceControl::activate`], but every queue resumes where the
    /// snapshot left it. The snapshot is untrusted and validated first.
    fn restore(
        &mut self,
        snapshot: DeviceSnapshot,
        activation: Activation,
    ) -> Result<(), ControlError>;
    /// One line for a stall report: what the device knows beyond the
    /// transport's registers and guest memory (for example a vhost-user
    /// adapter's connection state and relay counters). `None` by default.
    fn diagnostics(&self) -> Option<String> {
        None
    }
    /// Log every write the device makes to guest memory in `log` from now
    /// on, or stop logging (`None`), for a live migration. A device that
    /// writes through the [`Activation`]'s memory needs nothing here when
    /// that memory's regions log into `log` (the default does nothing); a
    /// device that writes guest memory some other way (a vhost-user
    /// backend in another process) hands `log` on, and fails if it cannot.
    fn set_dirty_log(&mut self, log: Option<&SharedDirtyLog>) -> Result<(), ControlError> {
        let _ = log;
        Ok(())
    }
    /// The driver wrote `status` to the device status field (0: reset,
    /// after [`DeviceControl::reset`]; DRIVER_OK: after a successful
    /// [`DeviceControl::activate`]). Returns the status as the device
    /// holds it: a device that cannot accept the driver's features clears
    /// FEATURES_OK (virtio 1.2, 3.1.1), and the transport then does not
    /// show it to the driver. The default keeps no status and returns
    /// `status` unchanged; a vhost-user backend with the STATUS protocol
    /// feature gets it passed on.
    fn driver_status(&mut self, status: u32) -> Result<u32, ControlError> {
        Ok(status)
    }
    /// Guest memory changed (a region plugged in or taken out): from now on
    /// the device uses `memory`, which must hold every ring of every
    /// running queue at the same place. On an active device the change
    /// takes effect before this returns, while the queues keep running: a
    /// [`DeviceCore`] swaps the memory its queues read at their next batch
    /// (requests in flight keep the old memory mapped until they finish);
    /// a vhost-user backend is told with `ADD_MEM_REG`/`REM_MEM_REG` or a
    /// new `SET_MEM_TABLE`. An inactive device keeps nothing: the next
    /// [`Activation`] brings its memory. Fails, leaving the device on its
    /// old memory, when the device cannot use `memory` (no region, rings
    /// outside it; for a vhost-user backend also regions not backed by a
    /// file, or more regions than it takes). The default refuses: a device
    /// must opt in.
    fn update_memory(&mut self, memory: GuestMemoryLog) -> Result<(), ControlError> {
        let _ = memory;
        Err(ControlError::Invalid(
            "the device cannot change guest memory while it runs",
        ))
    }
}

impl<B: DeviceBackend> DeviceControl for DeviceCore<B> {
    fn device_type(&self) -> u32 {
        self.backend.device_type()
    }

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> u16 {
        self.backend.max_queue_size()
    }

    fn device_features(&self) -> u64 {
        self.backend.features()
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        // `DeviceCore::read_config` zero-fills and cannot fail.
        let _ = DeviceCore::read_config(self, offset, data);
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ControlError> {
        Ok(DeviceCore::write_config(self, offset, data)?)
    }

    fn set_config_notifier(&mut self, notifier: ConfigNotifier) {
        DeviceCore::set_config_notifier(self, notifier)
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ControlError> {
        self.set_features(activation.features, 0)?;
        self.set_guest_memory(activation.memory)?;
        for q in activation.queues {
            let i = u32::from(q.index);
            self.set_queue_size(i, u32::from(q.size))?;
            self.set_queue_addresses(i, q.desc_table, q.avail_ring, q.used_ring)?;
            self.set_queue_base(i, 0, None)?;
            self.set_queue_ready(i, true)?;
            self.wire_and_start(q)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), ControlError> {
        DeviceCore::reset(self);
        self.clear_memory();
        Ok(())
    }

    fn snapshot(&mut self) -> Result<DeviceSnapshot, ControlError> {
        Ok(DeviceCore::snapshot(self, None)?)
    }

    fn update_memory(&mut self, memory: GuestMemoryLog) -> Result<(), ControlError> {
        if !self.has_memory() {
            // Not active: the next activation brings its memory.
            return Ok(());
        }
        self.check_rings_in(&memory)?;
        Ok(self.set_guest_memory(memory)?)
    }

    fn restore(
        &mut self,
        snapshot: DeviceSnapshot,
        activation: Activation,
    ) -> Result<(), ControlError> {
        // Bits of another transport (e.g. vhost-user's) are dropped by
        // `DeviceCore::restore`; accept them here.
        let limits = SnapshotLimits::for_backend(&*self.backend, !0, u64::MAX);
        let snapshot = ValidatedSnapshot::new(snapshot, &limits)?;
        self.set_guest_memory(activation.memory)?;
        DeviceCore::restore(self, &snapshot, 0)?;
        for q in activation.queues {
            let i = u32::from(q.index);
            let saved = self.queue_state(i)?;
            if saved.size != q.size || saved.desc_table != q.desc_table {
                return Err(ControlError::Invalid(
                    "activation does not match the snapshot",
                ));
            }
            self.wire_and_start(q)?;
        }
        Ok(())
    }
}

impl<B: DeviceBackend> DeviceCore<B> {
    /// Refuse `memory` unless it has a region and holds every ring of every
    /// running queue (a running ring cannot leave guest memory).
    fn check_rings_in(&self, memory: &GuestMemoryLog) -> Result<(), ControlError> {
        if memory.num_regions() == 0 {
            return Err(ControlError::Invalid("no guest memory"));
        }
        let holds = |gpa: u64, len: u64| {
            usize::try_from(len).is_ok_and(|len| memory.check_range(GuestAddress(gpa), len))
        };
        for i in (0..self.queues.len() as u32).filter(|&i| self.is_queue_running(i)) {
            let s = self.queue_state(i)?;
            let n = u64::from(s.size);
            if !holds(s.desc_table, 16 * n)
                || !holds(s.avail_ring, 6 + 2 * n)
                || !holds(s.used_ring, 6 + 8 * n)
            {
                return Err(ControlError::Invalid(
                    "a running queue's rings lie outside the new guest memory",
                ));
            }
        }
        Ok(())
    }

    /// The last steps of starting a configured queue from an activation:
    /// its call and err notifiers, enable, the kick that starts it.
    fn wire_and_start(&mut self, q: QueueActivation) -> Result<(), ControlError> {
        let i = u32::from(q.index);
        self.set_call_notifier(i, Some(q.call))?;
        self.set_err_notifier(i, Some(q.err))?;
        self.set_queue_enabled(i, true)?;
        self.set_kick(i, Some(q.kick))?;
        if !self.is_queue_running(i) {
            return Err(ControlError::Invalid("queue did not start"));
        }
        Ok(())
    }
}
