// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pausing a device and moving its state in and out of the control core as a
//! [`DeviceSnapshot`].
//!
//! Pausing hands every running vring back from its worker. The kit's workers
//! finish the event they are handling before they take a command, so a
//! device that completes requests within `handle_event` (as the reference
//! block device does) has nothing in flight once paused; a device that
//! completes asynchronously records its requests in the in-flight area.

use super::{CoreError, DeviceCore, LoadStateError, Result};
use crate::backend::DeviceBackend;
use crate::snapshot::{
    DeviceSnapshot, InflightRecord, SnapshotLimits, ValidatedSnapshot, VringSnapshot,
};

impl<B: DeviceBackend> DeviceCore<B> {
    /// Stop every running queue; they restart on [`DeviceCore::resume`].
    pub fn pause(&mut self) -> Result<()> {
        self.paused = true;
        for q in 0..self.queues.len() as u16 {
            self.stop_running(q)?;
        }
        Ok(())
    }

    /// Restart the queues [`DeviceCore::pause`] stopped.
    pub fn resume(&mut self) {
        self.paused = false;
        for q in 0..self.queues.len() as u16 {
            if let Err(e) = self.try_start(q) {
                log::warn!("resume: {e}");
            }
        }
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pause the device (if it is not) and capture its state.
    /// `acked_protocol_features` is what the vhost-user session negotiated,
    /// `None` in process. The device stays paused.
    pub fn snapshot(&mut self, acked_protocol_features: Option<u64>) -> Result<DeviceSnapshot> {
        self.pause()?;
        self.checkpoint(acked_protocol_features)
    }

    /// The device's state as last known, without pausing it: ring indices
    /// are exact for stopped queues and as of their start for running ones.
    /// Meant for a state file that lets a restarted backend get the
    /// device's own state back without the frontend's help.
    pub(crate) fn checkpoint(
        &self,
        acked_protocol_features: Option<u64>,
    ) -> Result<DeviceSnapshot> {
        let mut config = vec![0u8; self.backend.config_size()];
        self.read_config(0, &mut config)?;
        let device_state = self.backend.save_state().map_err(CoreError::Device)?;
        let mut in_flight = Vec::new();
        for (q, slot) in self.queues.iter().enumerate() {
            for (order, head) in slot.resubmit.iter().enumerate() {
                in_flight.push(InflightRecord {
                    queue: q as u16,
                    head: *head,
                    order: order as u64,
                });
            }
        }
        Ok(DeviceSnapshot {
            device_type: self.backend.device_type(),
            queues: self
                .queues
                .iter()
                .map(|slot| {
                    if slot.addresses_set {
                        VringSnapshot::from(slot.state)
                    } else {
                        VringSnapshot::default()
                    }
                })
                .collect(),
            acked_features: self.acked_features,
            acked_protocol_features,
            config,
            device_state,
            in_flight,
        })
    }

    /// Load saved state `bytes` (a state file, a DEVICE_STATE transfer) into
    /// the device: decode them, check them against this device in a home
    /// offering `transport_features` and `offered_protocol_features`, then
    /// [`DeviceCore::restore_device_state`]. Every path from bytes to a
    /// device's own state goes through here.
    pub fn load_device_state(
        &mut self,
        bytes: &[u8],
        transport_features: u64,
        offered_protocol_features: u64,
    ) -> std::result::Result<(), LoadStateError> {
        let limits = SnapshotLimits::for_backend(
            &*self.backend,
            transport_features,
            offered_protocol_features,
        );
        let valid = ValidatedSnapshot::decode(bytes, &limits)?;
        Ok(self.restore_device_state(&valid)?)
    }

    /// Load only what a device keeps to itself: its own state and the
    /// requests it had in flight (a vhost-user frontend restores features
    /// and rings itself).
    pub fn restore_device_state(&mut self, snapshot: &ValidatedSnapshot) -> Result<()> {
        for q in 0..self.queues.len() as u16 {
            let heads = snapshot.in_flight_heads(q);
            self.queues[usize::from(q)].resubmit = heads;
        }
        self.backend
            .restore_state(&snapshot.snapshot().device_state)
            .map_err(CoreError::Device)
    }

    /// Load a validated snapshot: features (minus bits this home did not
    /// offer, i.e. other transports' bits), queue states, in-flight requests
    /// and the device's own state. Guest memory, kick and call fds come from
    /// the home as usual; queues start once they have them. The device is
    /// left paused if it was.
    pub fn restore(&mut self, snapshot: &ValidatedSnapshot, transport_bits: u64) -> Result<()> {
        let snap = snapshot.snapshot();
        let offered = self.backend.features() | transport_bits;
        self.set_features(snap.acked_features & offered, transport_bits)?;
        for (index, state) in snapshot.queue_states() {
            if let Some(slot) = self.queues.get_mut(usize::from(index)) {
                slot.resubmit = snapshot.in_flight_heads(index);
            }
            self.restore_queue(u32::from(index), state)?;
        }
        self.backend
            .restore_state(&snap.device_state)
            .map_err(CoreError::Device)?;
        Ok(())
    }
}
