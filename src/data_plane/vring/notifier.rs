// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where a vring's notifications go (call and err).

use super::*;

/// Interrupt-status bit for "used buffer" (virtio-mmio `InterruptStatus`).
pub const INTERRUPT_USED_BUFFER: u32 = 0x1;
/// Interrupt-status bit for "configuration change".
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// Where a notification goes: an eventfd (a vhost-user call or err fd, or
/// a KVM irqfd) and, for transports with an interrupt status register, the
/// status word whose bit is set before the eventfd fires.
#[derive(Debug)]
pub struct Notifier {
    fd: EventFd,
    /// Status words and the bit set in each before `fd` fires.
    status: Vec<(Arc<std::sync::atomic::AtomicU32>, u32)>,
    trace: Option<Arc<crate::mmio::InterruptTrace>>,
}

impl Notifier {
    /// A plain eventfd notifier.
    pub fn new(fd: EventFd) -> Self {
        Notifier {
            fd,
            status: Vec::new(),
            trace: None,
        }
    }

    /// A notifier that sets `bit` in `status` before signalling `fd`.
    pub fn with_status(fd: EventFd, status: Arc<std::sync::atomic::AtomicU32>, bit: u32) -> Self {
        Notifier {
            fd,
            status: vec![(status, bit)],
            trace: None,
        }
    }

    /// The same notifier, also setting `bit` in `status` before signalling
    /// (e.g. DEVICE_NEEDS_RESET in a device status word beside the
    /// config-change bit in InterruptStatus).
    pub fn and_status(mut self, status: Arc<std::sync::atomic::AtomicU32>, bit: u32) -> Self {
        self.status.push((status, bit));
        self
    }

    /// The same notifier, counting what it raises in `trace`.
    pub fn traced(mut self, trace: Arc<crate::mmio::InterruptTrace>) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// Raise the notification.
    pub fn notify(&self) -> std::io::Result<()> {
        for (status, bit) in &self.status {
            status.fetch_or(*bit, Ordering::SeqCst);
        }
        if let Some(trace) = &self.trace {
            trace.raising();
        }
        let result = match self.fd.write(1) {
            // A non-blocking fd that cannot take more: an eventfd whose
            // counter is saturated (the peer has a notification pending
            // already) or a pipe nobody reads. Dropping this one loses
            // nothing the peer could still read, and never blocks.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        };
        if let (Err(_), Some(trace)) = (&result, &self.trace) {
            trace.failed();
        }
        result
    }
}

/// A shared, swappable notifier slot (call or err).
pub type NotifierSlot = Arc<ArcSwapOption<Notifier>>;
