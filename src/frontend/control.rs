// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`DeviceControl`] for the adapter: what the transport calls.

use super::*;

impl ActiveState {
    fn memory_ref(&self) -> &GuestMemoryLog {
        &self._memory
    }
}

impl DeviceControl for VhostUserFrontendDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn diagnostics(&self) -> Option<String> {
        let connected = self.shared.connected.load(Ordering::SeqCst);
        let relay = match self.shared.calls.try_lock() {
            Ok(calls) => calls
                .iter()
                .enumerate()
                .filter_map(|(q, c)| c.as_ref().map(|c| (q, c)))
                .map(|(q, c)| {
                    format!(
                        " q{q}: calls={} relayed={} errors={}",
                        c.received, c.relayed, c.errors
                    )
                })
                .collect::<String>(),
            Err(_) => " relay busy (its lock is held)".to_string(),
        };
        Some(format!("vhost-user connected={connected}{relay}"))
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn device_features(&self) -> u64 {
        self.backend_features & !crate::features::VHOST_USER_TRANSPORT_FEATURES
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        if lock(&self.shared.config).stale && self.is_connected() {
            if let Err(e) = self.refresh_config() {
                warn!("cannot re-read the config space: {e}");
            }
        }
        let cache = lock(&self.shared.config);
        let start = offset as usize;
        if start < cache.bytes.len() {
            let n = data.len().min(cache.bytes.len() - start);
            data[..n].copy_from_slice(&cache.bytes[start..start + n]);
        }
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ControlError> {
        if !self.has(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::Unsupported("config space access (CONFIG)").into());
        }
        self.request("SET_CONFIG", |fe| {
            fe.set_config(offset, VhostUserConfigFlags::empty(), data)
        })?;
        let mut cache = lock(&self.shared.config);
        let start = offset as usize;
        if let Some(dst) = cache.bytes.get_mut(start..start.saturating_add(data.len())) {
            dst.copy_from_slice(data);
        } else {
            // Outside what we cache: ask again next time.
            cache.stale = true;
        }
        Ok(())
    }

    fn set_config_notifier(&mut self, notifier: ConfigNotifier) {
        *lock(&self.shared.config_notifier) = Some(notifier);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ControlError> {
        if self.active.is_some() {
            self.do_reset()?;
        }
        let result = self.do_activate(activation, &[]);
        if result.is_err() {
            // Leave nothing half started; the activation error is the one
            // worth reporting.
            if let Err(e) = self.do_reset() {
                debug!("cleanup after a failed activation: {e}");
            }
        }
        result
    }

    fn reset(&mut self) -> Result<(), ControlError> {
        Ok(self.do_reset()?)
    }

    fn driver_status(&mut self, status: u32) -> Result<u32, ControlError> {
        Ok(self.forward_status(status)?)
    }

    fn set_dirty_log(
        &mut self,
        log: Option<&crate::data_plane::SharedDirtyLog>,
    ) -> Result<(), ControlError> {
        self.set_logging(log)
    }

    fn update_memory(&mut self, memory: GuestMemoryLog) -> Result<(), ControlError> {
        self.change_memory(memory)
    }

    fn snapshot(&mut self) -> Result<DeviceSnapshot, ControlError> {
        if self.stateful && !self.has(VhostUserProtocolFeatures::DEVICE_STATE) {
            // Refused before anything stops: the device keeps running.
            return Err(FrontendError::StateNotSaved.into());
        }
        let active = self.active.take().ok_or(ControlError::Invalid(
            "snapshot of a device that is not active",
        ))?;
        let mut queues = vec![VringSnapshot::default(); self.num_queues];
        for &(index, size, desc, avail, used) in &active.layout {
            let i = usize::from(index);
            // GET_VRING_BASE stops the ring; the backend finishes what it
            // popped first, so the used index then catches up with it.
            let next_avail = self.request("GET_VRING_BASE", |fe| fe.get_vring_base(i))?;
            let next_used: u16 = active
                .memory_ref()
                .read_obj(GuestAddress(used + 2))
                .map_err(|_| ControlError::Invalid("used ring outside memory"))?;
            if let Some(slot) = queues.get_mut(i) {
                *slot = VringSnapshot {
                    size,
                    ready: true,
                    enabled: true,
                    desc_table: desc,
                    avail_ring: avail,
                    used_ring: used,
                    next_avail: next_avail as u16,
                    next_used,
                    event_idx: active.features & crate::features::VIRTIO_RING_F_EVENT_IDX != 0,
                    signalled_used: None,
                };
            }
        }
        self.clear_calls();
        let device_state = if self.has(VhostUserProtocolFeatures::DEVICE_STATE) {
            self.save_backend_state()?
        } else {
            Vec::new()
        };
        let mut config = vec![0u8; self.config_size as usize];
        self.read_config(0, &mut config);
        Ok(DeviceSnapshot {
            device_type: self.device_type,
            queues,
            acked_features: active.features,
            acked_protocol_features: Some(self.protocol_features().bits()),
            config,
            device_state,
            in_flight: Vec::new(),
        })
    }

    fn restore(
        &mut self,
        snapshot: DeviceSnapshot,
        activation: Activation,
    ) -> Result<(), ControlError> {
        let has_state = self.has(VhostUserProtocolFeatures::DEVICE_STATE);
        if !snapshot.device_state.is_empty() && !has_state {
            return Err(FrontendError::StateUnsupported {
                len: snapshot.device_state.len(),
            }
            .into());
        }
        let limits = SnapshotLimits {
            device_type: self.device_type,
            num_queues: self.num_queues,
            max_queue_size: self.max_queue_size,
            offered_features: !0,
            offered_protocol_features: u64::MAX,
            config_size: self.config_size as usize,
            max_device_state: if has_state {
                crate::snapshot::MAX_PAYLOAD_LEN as usize
            } else {
                0
            },
        };
        let snapshot = ValidatedSnapshot::new(snapshot, &limits)?;
        let snap = snapshot.snapshot();
        if !snap.in_flight.is_empty() {
            // The backend has no way to take these over; refusing is
            // better than losing them.
            return Err(ControlError::Invalid(
                "in-flight requests cannot be handed to a vhost-user backend",
            ));
        }
        let mut bases = vec![0u16; self.num_queues];
        for (index, state) in snapshot.queue_states() {
            if state.next_avail != state.next_used {
                return Err(ControlError::Invalid("snapshot has requests in flight"));
            }
            if let Some(b) = bases.get_mut(usize::from(index)) {
                *b = state.next_avail;
            }
        }
        let mut activation = activation;
        activation.features = snap.acked_features & self.device_features();
        if self.active.is_some() {
            self.do_reset()?;
        }
        if !snap.device_state.is_empty() {
            // Loaded while the rings are stopped, before they start.
            self.load_backend_state(snap)?;
        }
        let result = self.do_activate(activation, &bases);
        if result.is_err() {
            if let Err(e) = self.do_reset() {
                debug!("cleanup after a failed restore: {e}");
            }
        }
        result
    }
}

impl Drop for VhostUserFrontendDevice {
    fn drop(&mut self) {
        // No messages here: a hung backend must not hang the drop. Closing
        // the socket tells the backend to stop.
        self.clear_calls();
        let _ = self.shared.exit.write(1);
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}
