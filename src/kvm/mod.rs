// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! KVM wiring for the in-process home.
//!
//! A virtio-mmio device inside a KVM-based VMM needs three things from KVM,
//! and this module is the only place in the kit that asks for them:
//!
//! - [`KvmWiring`]: one *ioeventfd* per queue on the device's QueueNotify
//!   register (datamatch = queue index), so a guest notification wakes the
//!   data plane without a vCPU exit to user space, and one *irqfd* that turns
//!   a write to the device's interrupt eventfd into an interrupt on the
//!   VMM-chosen GSI. Everything it registers it unregisters again on
//!   [`KvmWiring::unregister`] and on drop.
//! - [`KvmMemorySlots`]: the guest memory the kit's vrings use
//!   ([`GuestMemoryLog`](crate::memory::GuestMemoryLog)) registered as KVM memory slots, so guest and device
//!   share the very same pages, with KVM's dirty-page log for a live migration.
//! - [`pic_irr`]: the pending-interrupt register of the in-kernel PICs, for
//!   checking that an irqfd really reached the interrupt controller.
//!
//! The eventfds are the transport's own (see
//! [`crate::mmio::MmioTransport::queue_kicks`] and
//! [`crate::mmio::MmioTransport::irq_eventfd`]): the kick eventfds are the
//! ones the data plane already waits on, the interrupt eventfd the one its
//! call notifiers signal. KVM identifies a registration by the eventfd
//! object, not by the descriptor number, so the wiring keeps duplicates of
//! the descriptors it registered and uses them to unregister.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, VmFd};
use log::warn;
use vmm_sys_util::eventfd::EventFd;

mod memory_slots;
pub use memory_slots::KvmMemorySlots;

/// Offset of the virtio-mmio QueueNotify register in a device window.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Errors from KVM wiring operations.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The queue already has an ioeventfd in this wiring.
    #[error("queue {0} is already wired")]
    QueueWired(u16),
    /// The wiring already has an irqfd.
    #[error("an irqfd is already wired (GSI {0})")]
    IrqWired(u32),
    /// The eventfd could not be duplicated (the wiring keeps a duplicate to
    /// unregister it later).
    #[error("cannot duplicate the eventfd")]
    EventFd(#[source] std::io::Error),
    /// `KVM_IOEVENTFD` refused to register a queue's notification.
    #[error("cannot register the ioeventfd of queue {queue} at {addr:#x}")]
    RegisterIoevent {
        /// Queue index (the datamatch value).
        queue: u16,
        /// Guest physical address of QueueNotify.
        addr: u64,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` refused to unregister a queue's notification.
    #[error("cannot unregister the ioeventfd of queue {queue} at {addr:#x}")]
    UnregisterIoevent {
        /// Queue index (the datamatch value).
        queue: u16,
        /// Guest physical address of QueueNotify.
        addr: u64,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` refused to register the interrupt eventfd.
    #[error("cannot register the irqfd for GSI {gsi}")]
    RegisterIrqfd {
        /// The interrupt line.
        gsi: u32,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` refused to unregister the interrupt eventfd.
    #[error("cannot unregister the irqfd for GSI {gsi}")]
    UnregisterIrqfd {
        /// The interrupt line.
        gsi: u32,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` refused a slot.
    #[error("cannot set memory slot {slot} ({size:#x} bytes at {gpa:#x})")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        gpa: u64,
        /// Size in bytes (0 when removing).
        size: u64,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("cannot read the dirty log of memory slot {slot}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_IRQCHIP` failed (no in-kernel irqchip?).
    #[error("cannot read in-kernel irqchip {chip}")]
    GetIrqchip {
        /// The chip id (0: master PIC, 1: slave PIC, 2: IOAPIC).
        chip: u32,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of a KVM wiring operation.
pub type Result<T> = std::result::Result<T, KvmError>;

/// The ioeventfds and the irqfd of one virtio-mmio device.
///
/// The wiring shares the VM (`Arc<VmFd>`) so it can unregister on drop.
/// Registration is all or nothing: if a step fails, what the same call had
/// registered is undone before the error is returned.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use virtio_backend_kit::kvm::KvmWiring;
/// # use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
/// # fn demo(vm: Arc<kvm_ioctls::VmFd>, kick: &EventFd, irq: &EventFd)
/// #     -> Result<(), virtio_backend_kit::kvm::KvmError> {
/// let mut wiring = KvmWiring::register(vm, 0xd000_0000, [(0, kick)], irq, 5)?;
/// // ... the guest runs; its QueueNotify writes never leave the kernel ...
/// wiring.unregister()?; // or just drop it
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct KvmWiring {
    vm: Arc<VmFd>,
    mmio_base: u64,
    /// Registered queue notifications: queue index and a duplicate of the
    /// kick eventfd.
    ioevents: Vec<(u16, EventFd)>,
    /// The registered irqfd: GSI and a duplicate of the interrupt eventfd.
    irqfd: Option<(u32, EventFd)>,
}

impl KvmWiring {
    /// An empty wiring for the device window at guest physical address
    /// `mmio_base`; nothing is registered yet.
    pub fn new(vm: Arc<VmFd>, mmio_base: u64) -> Self {
        KvmWiring {
            vm,
            mmio_base,
            ioevents: Vec::new(),
            irqfd: None,
        }
    }

    /// Wire a whole device: one ioeventfd per `(queue index, kick eventfd)`
    /// on `mmio_base + 0x50` and the interrupt eventfd `irq` as an irqfd on
    /// `gsi` (the VM needs an in-kernel irqchip for that).
    pub fn register<'a>(
        vm: Arc<VmFd>,
        mmio_base: u64,
        kicks: impl IntoIterator<Item = (u16, &'a EventFd)>,
        irq: &EventFd,
        gsi: u32,
    ) -> Result<Self> {
        let mut wiring = KvmWiring::new(vm, mmio_base);
        // On error, dropping `wiring` unregisters what was registered.
        for (index, kick) in kicks {
            wiring.register_queue(index, kick)?;
        }
        wiring.register_irq(irq, gsi)?;
        Ok(wiring)
    }

    /// Guest physical address of the device's QueueNotify register.
    pub fn notify_address(&self) -> u64 {
        self.mmio_base + QUEUE_NOTIFY_OFFSET
    }

    /// Guest physical address of the device window.
    pub fn mmio_base(&self) -> u64 {
        self.mmio_base
    }

    /// The VM this wiring registers with.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The queues whose notifications currently bypass user space.
    pub fn wired_queues(&self) -> Vec<u16> {
        self.ioevents.iter().map(|(q, _)| *q).collect()
    }

    /// The GSI of the registered irqfd, if any.
    pub fn gsi(&self) -> Option<u32> {
        self.irqfd.as_ref().map(|(gsi, _)| *gsi)
    }

    /// Whether anything is registered.
    pub fn is_registered(&self) -> bool {
        !self.ioevents.is_empty() || self.irqfd.is_some()
    }

    /// Register `kick` as the ioeventfd of queue `index`: a 4-byte guest
    /// write of `index` to QueueNotify signals `kick` inside the kernel.
    pub fn register_queue(&mut self, index: u16, kick: &EventFd) -> Result<()> {
        if self.ioevents.iter().any(|(q, _)| *q == index) {
            return Err(KvmError::QueueWired(index));
        }
        let kept = kick.try_clone().map_err(KvmError::EventFd)?;
        let addr = self.notify_address();
        self.vm
            .register_ioevent(&kept, &IoEventAddress::Mmio(addr), u32::from(index))
            .map_err(|source| KvmError::RegisterIoevent {
                queue: index,
                addr,
                source,
            })?;
        self.ioevents.push((index, kept));
        Ok(())
    }

    /// Register `irq` as an irqfd: each write to it raises `gsi` (an edge;
    /// on the PIC and IOAPIC pins of GSIs below 16 with KVM's default
    /// routing).
    pub fn register_irq(&mut self, irq: &EventFd, gsi: u32) -> Result<()> {
        if let Some((wired, _)) = &self.irqfd {
            return Err(KvmError::IrqWired(*wired));
        }
        let kept = irq.try_clone().map_err(KvmError::EventFd)?;
        self.vm
            .register_irqfd(&kept, gsi)
            .map_err(|source| KvmError::RegisterIrqfd { gsi, source })?;
        self.irqfd = Some((gsi, kept));
        Ok(())
    }

    /// Unregister the ioeventfd of queue `index` (nothing if it has none).
    pub fn unregister_queue(&mut self, index: u16) -> Result<()> {
        let Some(pos) = self.ioevents.iter().position(|(q, _)| *q == index) else {
            return Ok(());
        };
        let (index, kick) = self.ioevents.remove(pos);
        let addr = self.notify_address();
        self.vm
            .unregister_ioevent(&kick, &IoEventAddress::Mmio(addr), u32::from(index))
            .map_err(|source| KvmError::UnregisterIoevent {
                queue: index,
                addr,
                source,
            })
    }

    /// Unregister the irqfd (nothing if there is none).
    pub fn unregister_irq(&mut self) -> Result<()> {
        let Some((gsi, irq)) = self.irqfd.take() else {
            return Ok(());
        };
        self.vm
            .unregister_irqfd(&irq, gsi)
            .map_err(|source| KvmError::UnregisterIrqfd { gsi, source })
    }

    /// Unregister everything (e.g. when the driver resets the device).
    ///
    /// Every registration is attempted even if one fails; the first error is
    /// returned. Afterwards the wiring holds nothing, whatever the outcome:
    /// a registration KVM refused to remove cannot be retried usefully.
    pub fn unregister(&mut self) -> Result<()> {
        let mut first_error = None;
        let queues: Vec<u16> = self.wired_queues();
        for index in queues {
            if let Err(e) = self.unregister_queue(index) {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.unregister_irq() {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for KvmWiring {
    fn drop(&mut self) {
        if let Err(e) = self.unregister() {
            warn!("KVM wiring at {:#x}: {e}", self.mmio_base);
        }
    }
}

/// The interrupt request registers of the in-kernel 8259 PICs: the master's
/// IRR in bits 0–7, the slave's in bits 8–15 (bit n is pending IRQ n, which
/// is GSI n under KVM's default routing). An IRQ stays pending until the
/// guest's CPU acknowledges it.
pub fn pic_irr(vm: &VmFd) -> Result<u16> {
    let mut irr = 0u16;
    for chip in [
        kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    ] {
        let mut state = kvm_bindings::kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        vm.get_irqchip(&mut state)
            .map_err(|source| KvmError::GetIrqchip { chip, source })?;
        // SAFETY: for the PIC chip ids KVM fills the union's `pic` member;
        // every bit pattern is a valid `kvm_pic_state` (plain bytes).
        let pic = unsafe { state.chip.pic };
        irr |= u16::from(pic.irr) << (8 * chip);
    }
    Ok(irr)
}
