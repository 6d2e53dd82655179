// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Saving and restoring a transport with its device: the snapshot, a
//! restore into a fresh transport, and resuming after a cancelled move.

use std::sync::atomic::Ordering;

use super::{
    MmioError, MmioTransport, QueueRegs, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use crate::core::DeviceControl;
use crate::memory::GuestMemoryLog;
use crate::vring::INTERRUPT_USED_BUFFER;

/// Why a transport could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioSnapshotError {
    /// The device is not running (no DRIVER_OK yet).
    #[error("the device is not active")]
    NotActive,
    /// The transport could not be created.
    #[error(transparent)]
    Transport(#[from] MmioError),
    /// The device refused.
    #[error(transparent)]
    Device(#[from] crate::core::ControlError),
    /// A snapshot can only be loaded into a transport the driver has not
    /// touched yet.
    #[error("the transport is already in use (status {0:#x})")]
    InUse(u32),
    /// Only a transport stopped by [`MmioTransport::snapshot`] can resume.
    #[error("the transport was not stopped by a snapshot (status {0:#x})")]
    NotStopped(u32),
}

impl MmioTransport {
    /// Stop the device and capture its state. Everything the driver set up
    /// through the registers (features, queue layout) is in the snapshot,
    /// so [`MmioTransport::restore`] rebuilds the registers from it. The
    /// transport is inert afterwards: reset it or drop it.
    pub fn snapshot(&mut self) -> Result<crate::snapshot::DeviceSnapshot, MmioSnapshotError> {
        if !self.activated {
            return Err(MmioSnapshotError::NotActive);
        }
        let snapshot = self.device.snapshot()?;
        self.activated = false;
        Ok(snapshot)
    }

    /// A transport for `device` that resumes where `snapshot` left off: the
    /// driver sees an active device (DRIVER_OK) with its queues as it set
    /// them up, and every queue continues from its saved indices. The
    /// snapshot is validated by the device before anything is applied.
    pub fn restore(
        device: Box<dyn DeviceControl>,
        memory: GuestMemoryLog,
        snapshot: crate::snapshot::DeviceSnapshot,
    ) -> Result<Self, MmioSnapshotError> {
        let mut t = Self::new(device, memory)?;
        t.load_snapshot(snapshot)?;
        Ok(t)
    }

    /// [`MmioTransport::restore`] for a transport that already exists (so
    /// that its kick and interrupt eventfds can be wired up first) and that
    /// no driver has touched: the registers are rebuilt from `snapshot` and
    /// the device resumes from it.
    pub fn load_snapshot(
        &mut self,
        snapshot: crate::snapshot::DeviceSnapshot,
    ) -> Result<(), MmioSnapshotError> {
        if self.activated || self.status != 0 {
            return Err(MmioSnapshotError::InUse(self.status));
        }
        self.driver_features = snapshot.acked_features;
        for (i, q) in snapshot.queues.iter().enumerate() {
            if let Some(regs) = self.queues.get_mut(i) {
                *regs = QueueRegs {
                    size: q.size,
                    ready: q.is_configured() && q.ready,
                    desc: q.desc_table,
                    avail: q.avail_ring,
                    used: q.used_ring,
                };
            }
        }
        let activation = self
            .build_activation()
            .map_err(|_| MmioSnapshotError::NotActive)?;
        if let Err(e) = self.device.restore(snapshot, activation) {
            self.queues.fill(QueueRegs::default());
            self.driver_features = 0;
            return Err(e.into());
        }
        self.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.activated = true;
        // An interrupt raised just before the cut may not have reached the
        // driver; one more is harmless (the driver checks its used rings).
        self.interrupt_status
            .fetch_or(INTERRUPT_USED_BUFFER, Ordering::SeqCst);
        let _ = self.irq.write(1);
        Ok(())
    }

    /// Start the device again from `snapshot`, the one
    /// [`MmioTransport::snapshot`] just took from this transport, when the
    /// move it was taken for did not happen (a cancelled migration). The
    /// registers still hold the driver's setup; the device resumes from the
    /// snapshot's indices and state, so nothing is lost or done twice.
    pub fn resume(
        &mut self,
        snapshot: crate::snapshot::DeviceSnapshot,
    ) -> Result<(), MmioSnapshotError> {
        if self.activated || self.status & STATUS_DRIVER_OK == 0 {
            return Err(MmioSnapshotError::NotStopped(self.status));
        }
        let activation = self
            .build_activation()
            .map_err(|_| MmioSnapshotError::NotActive)?;
        self.device.restore(snapshot, activation)?;
        self.activated = true;
        self.interrupt_status
            .fetch_or(INTERRUPT_USED_BUFFER, Ordering::SeqCst);
        let _ = self.irq.write(1);
        Ok(())
    }

    /// Log the device's writes to guest memory in `log`, or stop (`None`):
    /// see [`DeviceControl::set_dirty_log`].
    pub fn set_dirty_log(
        &mut self,
        log: Option<&crate::data_plane::SharedDirtyLog>,
    ) -> Result<(), crate::core::ControlError> {
        self.device.set_dirty_log(log)
    }

    /// Guest memory changed: hand `memory` to the device (see
    /// [`DeviceControl::update_memory`]) and use it for later activations.
    /// When the device refuses, both keep the old memory.
    pub fn update_memory(
        &mut self,
        memory: GuestMemoryLog,
    ) -> Result<(), crate::core::ControlError> {
        self.device.update_memory(memory.clone())?;
        self.memory = memory;
        Ok(())
    }
}
