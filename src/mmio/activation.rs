// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the transport hands its device at DRIVER_OK: the negotiated
//! features, guest memory and, per ready queue, its rings, its kick eventfd
//! and notifiers that set InterruptStatus before the irqfd fires.

use super::*;

/// Why the transport could not activate its device (logged; the driver
/// sees DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub(super) enum ActivationError {
    /// An eventfd could not be duplicated for the device.
    #[error("cannot duplicate an eventfd for the device")]
    EventFd(#[source] std::io::Error),
    /// The device refused to start.
    #[error("the device refused to start")]
    Device(#[source] ControlError),
}

impl MmioTransport {
    pub(super) fn build_activation(&mut self) -> Result<Activation, ActivationError> {
        let mut queues = Vec::new();
        self.traces = vec![None; self.queues.len()];
        let ready: Vec<(usize, QueueRegs)> = (self.queues.iter().copied().enumerate())
            .filter(|(_, q)| q.ready)
            .collect();
        for (i, q) in ready {
            let dup = |fd: &EventFd| fd.try_clone().map_err(ActivationError::EventFd);
            let trace = Arc::new(InterruptTrace::new(self.memory.clone(), q.used));
            self.traces[i] = Some(trace.clone());
            queues.push(QueueActivation {
                index: i as u16,
                size: q.size,
                desc_table: q.desc,
                avail_ring: q.avail,
                used_ring: q.used,
                kick: dup(&self.kicks[i])?,
                call: Notifier::with_status(
                    dup(&self.irq)?,
                    self.interrupt_status.clone(),
                    INTERRUPT_USED_BUFFER,
                )
                .traced(trace),
                // A queue the device gave up on: DEVICE_NEEDS_RESET and a
                // config-change interrupt (virtio 1.2, 2.1.2).
                err: Notifier::with_status(
                    dup(&self.irq)?,
                    self.interrupt_status.clone(),
                    INTERRUPT_CONFIG_CHANGE,
                )
                .and_status(self.device_error.clone(), STATUS_DEVICE_NEEDS_RESET),
            });
        }
        Ok(Activation {
            features: self.driver_features,
            memory: self.memory.clone(),
            queues,
        })
    }
}
