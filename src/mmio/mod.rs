// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-process front door: a virtio-mmio transport (virtio 1.x, register
//! layout version 2) that a VMM's MMIO bus calls on guest reads and writes.
//!
//! It drives any [`DeviceControl`]: a [`crate::core::DeviceCore`] running the
//! device in this process, or a vhost-user frontend adapter talking to a
//! backend in another one. Each queue has a kick eventfd (register it as a
//! KVM ioeventfd on [`QUEUE_NOTIFY_OFFSET`] with the queue index as
//! datamatch) and the device has one interrupt eventfd (register it as a KVM
//! irqfd). Writes to QueueNotify that do reach the transport (no ioeventfd)
//! are forwarded to the same kick eventfd, so both paths behave the same.
//!
//! The driver's misbehaviour is refused the way the virtio spec prescribes
//! and logged: features outside the offer leave FEATURES_OK unset, bad queue
//! setups are not made ready, an activation failure sets
//! DEVICE_NEEDS_RESET with a config interrupt, unknown or unaligned register
//! accesses are ignored (reads return zeroes). Nothing a guest does panics.

mod activation;
mod persist;
mod regs;
mod trace;

use activation::ActivationError;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::ConfigNotifier;
use crate::core::{Activation, ControlError, DeviceControl, QueueActivation};
use crate::memory::GuestMemoryLog;
use crate::vring::{Notifier, VringState, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};
pub use regs::*;
pub use trace::{InterruptTrace, QueueDiagnostics, TransportDiagnostics};

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The driver-visible state of one queue.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// A virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn DeviceControl>,
    memory: GuestMemoryLog,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    status: u32,
    /// DEVICE_NEEDS_RESET when a queue's err notifier fired (set from the
    /// device's worker threads; read as part of Status).
    device_error: Arc<AtomicU32>,
    activated: bool,
    interrupt_status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    kicks: Vec<EventFd>,
    irq: EventFd,
    /// Per queue, the interrupt counters of the current activation.
    traces: Vec<Option<Arc<InterruptTrace>>>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &format_args!("{:#x}", self.status))
            .field(
                "driver_features",
                &format_args!("{:#x}", self.driver_features),
            )
            .field("activated", &self.activated)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

impl MmioTransport {
    /// A transport for `device` in a guest whose RAM is `memory`.
    pub fn new(
        mut device: Box<dyn DeviceControl>,
        memory: GuestMemoryLog,
    ) -> Result<Self, MmioError> {
        let kicks = (0..device.num_queues())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::EventFd)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let config_generation = Arc::new(AtomicU32::new(0));
        let notify_irq = irq.try_clone().map_err(MmioError::EventFd)?;
        let (status, generation) = (interrupt_status.clone(), config_generation.clone());
        device.set_config_notifier(ConfigNotifier::new(move || {
            generation.fetch_add(1, Ordering::SeqCst);
            status.fetch_or(INTERRUPT_CONFIG_CHANGE, Ordering::SeqCst);
            let _ = notify_irq.write(1);
        }));
        Ok(MmioTransport {
            queues: vec![QueueRegs::default(); device.num_queues()],
            device,
            memory,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            device_error: Arc::new(AtomicU32::new(0)),
            activated: false,
            interrupt_status,
            config_generation,
            kicks,
            irq,
            traces: Vec::new(),
        })
    }

    /// The kick eventfd of each queue, to register as KVM ioeventfds on
    /// `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
    pub fn queue_kicks(&self) -> Vec<(u16, &EventFd)> {
        self.kicks
            .iter()
            .enumerate()
            .map(|(i, k)| (i as u16, k))
            .collect()
    }

    /// The interrupt eventfd, to register as a KVM irqfd.
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// The current InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::SeqCst)
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status | self.device_error.load(Ordering::SeqCst)
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn DeviceControl {
        &*self.device
    }

    /// A 32-bit register read at `offset`, as a driver makes it: for
    /// tests, fuzzers and VMMs that decode accesses themselves.
    pub fn read_u32(&mut self, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        self.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// A 32-bit register write of `value` at `offset`.
    pub fn write_u32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Handle a guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            match u32::try_from(offset - CONFIG_OFFSET) {
                Ok(off) => self.device.read_config(off, data),
                Err(_) => data.fill(0),
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn!(
                "virtio-mmio: refused {}-byte read at {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => match self.selected() {
                Some(_) => u32::from(self.device.max_queue_size()),
                None => 0,
            },
            QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt_status(),
            STATUS => self.status(),
            CONFIG_GENERATION => self.config_generation.load(Ordering::SeqCst),
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX, // no shared memory regions
            _ => {
                warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handle a guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            let Ok(off) = u32::try_from(offset - CONFIG_OFFSET) else {
                return;
            };
            if let Err(e) = self.device.write_config(off, data) {
                warn!("virtio-mmio: config write at {off:#x} refused: {e}");
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "virtio-mmio: refused {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            warn!("virtio-mmio: refused unaligned write at {offset:#x}");
            return;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => self.write_queue_num(value),
            QUEUE_READY => self.write_queue_ready(value),
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            STATUS => self.write_status(value),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => self.write_queue_address(offset, value),
            _ => warn!("virtio-mmio: write of {value:#x} to unknown register {offset:#x}"),
        }
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may still configure it.
    fn configurable(&mut self, what: &str) -> Option<&mut QueueRegs> {
        let sel = self.queue_sel;
        if self.activated {
            warn!("virtio-mmio: {what} after DRIVER_OK refused");
            return None;
        }
        match self.queues.get_mut(sel as usize) {
            Some(q) if q.ready => {
                warn!("virtio-mmio: {what} on ready queue {sel} refused");
                None
            }
            Some(q) => Some(q),
            None => {
                warn!("virtio-mmio: {what} on missing queue {sel} refused");
                None
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            warn!(
                "virtio-mmio: DriverFeatures written in status {:#x}, refused",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, false, value),
            1 => set_half(&mut self.driver_features, true, value),
            sel => warn!("virtio-mmio: DriverFeatures with select {sel} refused"),
        }
    }

    fn write_queue_num(&mut self, value: u32) {
        let max = u32::from(self.device.max_queue_size());
        let Some(q) = self.configurable("QueueNum") else {
            return;
        };
        if value == 0 || value > max || !value.is_power_of_two() {
            warn!("virtio-mmio: queue size {value} refused (max {max}, power of two)");
            return;
        }
        q.size = value as u16;
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.configurable("queue address") else {
            return;
        };
        let high = offset % 8 == 4;
        match offset & !4 {
            QUEUE_DESC_LOW => set_half(&mut q.desc, high, value),
            QUEUE_DRIVER_LOW => set_half(&mut q.avail, high, value),
            _ => set_half(&mut q.used, high, value),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let sel = self.queue_sel;
        let max = self.device.max_queue_size();
        if value == 0 {
            if let Some(q) = self.queues.get_mut(sel as usize) {
                if self.activated && q.ready {
                    warn!("virtio-mmio: cannot stop queue {sel} alone; reset the device");
                    return;
                }
                q.ready = false;
            }
            return;
        }
        let memory = self.memory.clone();
        let Some(q) = self.configurable("QueueReady") else {
            return;
        };
        let state = VringState {
            size: q.size,
            desc_table: q.desc,
            avail_ring: q.avail,
            used_ring: q.used,
            ..VringState::default()
        };
        if let Err(e) = state.validate(max) {
            warn!("virtio-mmio: queue {sel} not made ready: {e}");
            return;
        }
        let in_memory = |addr: u64, len: u64| {
            use vm_memory::{GuestAddress, GuestMemoryBackend};
            memory.check_range(GuestAddress(addr), len as usize)
        };
        let n = u64::from(q.size);
        if q.desc == 0
            || !in_memory(q.desc, 16 * n)
            || !in_memory(q.avail, 6 + 2 * n)
            || !in_memory(q.used, 6 + 8 * n)
        {
            warn!("virtio-mmio: queue {sel} rings missing or outside guest memory, not made ready");
            return;
        }
        q.ready = true;
    }

    fn notify(&mut self, value: u32) {
        match self.kicks.get(value as usize) {
            Some(kick) if self.activated => {
                if let Err(e) = kick.write(1) {
                    warn!("virtio-mmio: cannot kick queue {value}: {e}");
                }
            }
            Some(_) => debug!("virtio-mmio: notify of queue {value} before DRIVER_OK ignored"),
            None => warn!("virtio-mmio: notify of missing queue {value}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            if let Err(e) = self.device.driver_status(0) {
                warn!("virtio-mmio: device did not take status 0: {e}");
            }
            return;
        }
        let old = self.status();
        if value & old != old {
            warn!("virtio-mmio: status {value:#x} clears bits of {old:#x}; only 0 resets, refused");
            return;
        }
        let added = value & !old;
        let has = |bit| value & bit != 0;
        if (has(STATUS_DRIVER) && !has(STATUS_ACKNOWLEDGE))
            || (has(STATUS_FEATURES_OK) && !has(STATUS_DRIVER))
            || (has(STATUS_DRIVER_OK) && !has(STATUS_FEATURES_OK))
        {
            warn!("virtio-mmio: status {value:#x} skips a step, refused");
            return;
        }
        let mut accepted = value;
        // Whether the device was told of this write's status already.
        let mut told = false;
        if added & STATUS_FEATURES_OK != 0 {
            // The driver re-reads Status and sees FEATURES_OK unset if the
            // transport or the device refuses its features.
            if !self.features_acceptable() || !self.device_takes(accepted & !STATUS_DRIVER_OK) {
                accepted &= !STATUS_FEATURES_OK;
            } else {
                told = added & STATUS_DRIVER_OK == 0;
            }
        }
        self.status = accepted;
        if added & STATUS_DRIVER_OK != 0 && accepted & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
        if !told {
            if let Err(e) = self.device.driver_status(self.status) {
                warn!(
                    "virtio-mmio: device did not take status {:#x}: {e}",
                    self.status
                );
            }
        }
    }

    /// Tell the device of `status` with FEATURES_OK; whether it keeps it.
    fn device_takes(&mut self, status: u32) -> bool {
        match self.device.driver_status(status) {
            Ok(held) if held & STATUS_FEATURES_OK != 0 => true,
            Ok(_) => {
                warn!("virtio-mmio: the device refused the driver's features");
                false
            }
            Err(e) => {
                warn!("virtio-mmio: device did not take status {status:#x}: {e}");
                false
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        let extra = self.driver_features & !offered;
        if extra != 0 {
            warn!("virtio-mmio: driver accepted unoffered features {extra:#x}");
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let result = self.build_activation().and_then(|activation| {
            (self.device.activate(activation)).map_err(ActivationError::Device)
        });
        match result {
            Ok(()) => {
                self.activated = true;
                debug!("virtio-mmio: device activated");
            }
            Err(e) => {
                let e = crate::error_chain(&e);
                warn!("virtio-mmio: activation failed: {e}; DEVICE_NEEDS_RESET");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt_status
                    .fetch_or(INTERRUPT_CONFIG_CHANGE, Ordering::SeqCst);
                let _ = self.irq.write(1);
            }
        }
    }

    fn reset(&mut self) {
        if let Err(e) = self.device.reset() {
            warn!("virtio-mmio: device reset failed: {e}");
        }
        for kick in &self.kicks {
            // Drop notifications left over from before the reset.
            let _ = kick.read();
        }
        self.queues.fill(QueueRegs::default());
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.device_error.store(0, Ordering::SeqCst);
        self.activated = false;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }
}

pub use persist::MmioSnapshotError;

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.activated {
            let _ = self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests;
