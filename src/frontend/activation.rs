// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Starting and stopping the backend's queues: the memory table (see
//! [`super::memory_update`]), vring setup, call relaying, the device's own state through DEVICE_STATE.

use super::*;

impl VhostUserFrontendDevice {
    /// The VMM's address of `len` bytes at `gpa`, which must lie in one
    /// region (vhost-user ring addresses are frontend virtual addresses).
    pub(super) fn host_address(memory: &GuestMemoryLog, gpa: u64, len: u64) -> Option<u64> {
        let region = memory.find_region(GuestAddress(gpa))?;
        let offset = gpa - region.start_addr().raw_value();
        if offset.checked_add(len)? > region.len() {
            return None;
        }
        memory
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    pub(super) fn check_queue(&self, q: &QueueActivation) -> Result<(), ControlError> {
        if usize::from(q.index) >= self.num_queues {
            return Err(ControlError::Invalid(
                "queue index beyond the device's queues",
            ));
        }
        if q.size == 0 || !q.size.is_power_of_two() || q.size > self.max_queue_size {
            return Err(ControlError::Invalid("queue size"));
        }
        Ok(())
    }

    pub(super) fn start_queue(
        &mut self,
        memory: &GuestMemoryLog,
        q: QueueActivation,
        base: u16,
    ) -> Result<EventFd, ControlError> {
        self.check_queue(&q)?;
        let layout = (q.index, q.size, q.desc_table, q.avail_ring, q.used_ring);
        let config = self.vring_config(memory, layout, self.is_logging())?;
        let index = usize::from(q.index);
        let backend_call = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::Relay)?;
        let backend_err = EventFd::new(EFD_NONBLOCK).map_err(FrontendError::Relay)?;

        self.request("SET_VRING_NUM", |fe| fe.set_vring_num(index, q.size))?;
        self.request("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &config))?;
        self.request("SET_VRING_BASE", |fe| fe.set_vring_base(index, base))?;
        self.request("SET_VRING_CALL", |fe| {
            fe.set_vring_call(index, &backend_call)
        })?;
        self.relay_calls(index, backend_call, q.call)?;
        self.request("SET_VRING_ERR", |fe| fe.set_vring_err(index, &backend_err))?;
        self.relay_to(&self.shared.errs, TOKEN_ERR_BASE, index, backend_err, q.err)?;
        self.request("SET_VRING_KICK", |fe| fe.set_vring_kick(index, &q.kick))?;
        if let Some(active) = self.active.as_mut() {
            active.started.push(q.index);
            active.layout.push(layout);
        }
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            self.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, true))?;
        }
        Ok(q.kick)
    }

    /// Route wake-ups of `backend_call` to `notifier`.
    pub(super) fn relay_calls(
        &self,
        index: usize,
        backend_call: EventFd,
        notifier: Notifier,
    ) -> Result<(), FrontendError> {
        self.relay_to(&self.shared.calls, 0, index, backend_call, notifier)
    }

    /// Route wake-ups of `backend_fd` to `notifier`, as entry `index` of
    /// `list` watched with epoll token `token_base + index`.
    pub(super) fn relay_to(
        &self,
        list: &Mutex<Vec<Option<RelayedCall>>>,
        token_base: u64,
        index: usize,
        backend_call: EventFd,
        notifier: Notifier,
    ) -> Result<(), FrontendError> {
        let mut calls = lock(list);
        if calls.len() <= index {
            calls.resize_with(index + 1, || None);
        }
        self.shared
            .epoll
            .ctl(
                ControlOperation::Add,
                backend_call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token_base + index as u64),
            )
            .map_err(FrontendError::Relay)?;
        // The backend holds the replaced eventfd too, so closing ours would
        // not end its epoll registration: end it here, or a signal on it
        // would wake the relay for ever under this queue's token.
        if let Some(old) = calls[index].take() {
            self.unwatch(&old);
        }
        calls[index] = Some(RelayedCall {
            backend_call,
            notifier,
            received: 0,
            relayed: 0,
            errors: 0,
        });
        Ok(())
    }

    /// Stop relaying calls and errs of every queue.
    pub(super) fn clear_calls(&self) {
        for list in [&self.shared.calls, &self.shared.errs] {
            for call in lock(list).drain(..).flatten() {
                self.unwatch(&call);
            }
        }
    }

    /// End the relay's epoll registration of `call`'s eventfd.
    fn unwatch(&self, call: &RelayedCall) {
        let _ = self.shared.epoll.ctl(
            ControlOperation::Delete,
            call.backend_call.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// How long a DEVICE_STATE transfer may take.
    pub(super) fn state_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or(Duration::from_secs(30))
    }

    /// The stopped backend's own state (DEVICE_STATE save): the kit's
    /// snapshot envelope from the backend, of which the device's bytes are
    /// kept (rings and features come from the transport).
    pub(super) fn save_backend_state(&self) -> Result<Vec<u8>, FrontendError> {
        Ok(self.backend_snapshot()?.device_state)
    }

    /// `SET_DEVICE_STATE_FD` for a transfer in `direction` of the stopped
    /// backend over `theirs`; the backend may answer with an fd of its own.
    fn set_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        theirs: std::fs::File,
    ) -> Result<Option<std::fs::File>, FrontendError> {
        self.request("SET_DEVICE_STATE_FD", |fe| {
            fe.set_device_state_fd(
                direction,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(theirs),
            )
        })
    }

    /// The stopped backend's snapshot, through DEVICE_STATE.
    pub(super) fn backend_snapshot(&self) -> Result<DeviceSnapshot, FrontendError> {
        use super::state_fd::{pipe, read_all};
        let (ours, theirs) = pipe()?;
        let own = self.set_state_fd(VhostTransferStateDirection::SAVE, theirs)?;
        // A backend may hand back an fd of its own to read from instead.
        let bytes = read_all(own.unwrap_or(ours), self.state_timeout())?;
        self.request("CHECK_DEVICE_STATE", |fe| fe.check_device_state())?;
        crate::snapshot::decode(&bytes).map_err(FrontendError::StateFormat)
    }

    /// Load `snap`'s device state into the stopped backend (DEVICE_STATE
    /// load), in the kit's snapshot envelope.
    pub(super) fn load_backend_state(&self, snap: &DeviceSnapshot) -> Result<(), FrontendError> {
        use super::state_fd::{pipe, write_all};
        let bytes = crate::snapshot::encode(snap).map_err(FrontendError::StateFormat)?;
        let (theirs, ours) = pipe()?;
        let own = self.set_state_fd(VhostTransferStateDirection::LOAD, theirs)?;
        write_all(own.unwrap_or(ours), &bytes, self.state_timeout())?;
        self.request("CHECK_DEVICE_STATE", |fe| fe.check_device_state())?;
        Ok(())
    }

    pub(super) fn do_activate(
        &mut self,
        activation: Activation,
        bases: &[u16],
    ) -> Result<(), ControlError> {
        let offered = self.device_features();
        if activation.features & !offered != 0 {
            return Err(ControlError::Invalid("driver features outside the offer"));
        }
        for q in &activation.queues {
            self.check_queue(q)?;
        }
        let regions = self
            .memory_table(&activation.memory)
            .map_err(MemoryUpdateError::at_activation)?;
        let features = self.backend_ack(activation.features, self.is_logging());
        self.request("SET_FEATURES", |fe| fe.set_features(features))?;
        let mem_table = self.send_memory_table(&regions)?;
        self.apply_log_at_activation()?;
        let memory = activation.memory.clone();
        self.active = Some(ActiveState {
            started: Vec::new(),
            features: activation.features,
            layout: Vec::new(),
            _memory: activation.memory,
            mem_table,
            _kicks: Vec::new(),
        });
        for q in activation.queues {
            let base = bases.get(usize::from(q.index)).copied().unwrap_or(0);
            let kick = self.start_queue(&memory, q, base)?;
            if let Some(active) = self.active.as_mut() {
                active._kicks.push(kick);
            }
        }
        Ok(())
    }

    pub(super) fn do_reset(&mut self) -> Result<(), FrontendError> {
        let mut first_error = None;
        if let Some(active) = self.active.take() {
            for q in active.started {
                let index = usize::from(q);
                match self.request("GET_VRING_BASE", |fe| fe.get_vring_base(index)) {
                    Ok(base) => debug!("queue {q} stopped at {base}"),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        self.clear_calls();
        if first_error.is_none() && self.has(VhostUserProtocolFeatures::RESET_DEVICE) {
            if let Err(e) = self.request("RESET_DEVICE", |fe| fe.reset_device()) {
                first_error = Some(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
