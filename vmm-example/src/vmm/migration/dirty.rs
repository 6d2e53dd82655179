// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The dirty set of a migration: the guest's own writes (KVM's dirty log)
//! merged with the devices' (the shared log in-process devices and
//! vhost-user backends write into).

use std::sync::{Arc, Mutex};

use log::warn;
use virtio_backend_kit::kvm::KvmMemorySlots;
use virtio_backend_kit::mmio::MmioTransport;
use virtio_backend_kit::{error_chain, SharedDirtyLog};

use super::MigrationError;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Dirty logging, on for as long as this lives.
pub(super) struct DirtyTracking<'a> {
    slots: &'a Mutex<KvmMemorySlots>,
    log: &'a SharedDirtyLog,
    transports: &'a [Arc<Mutex<MmioTransport>>],
    /// Devices that took the log so far.
    logging: usize,
}

impl<'a> DirtyTracking<'a> {
    /// Turn logging on everywhere; on failure, off again where it was
    /// turned on.
    pub(super) fn start(
        slots: &'a Mutex<KvmMemorySlots>,
        log: &'a SharedDirtyLog,
        transports: &'a [Arc<Mutex<MmioTransport>>],
    ) -> Result<Self, MigrationError> {
        let mut tracking = DirtyTracking {
            slots,
            log,
            transports,
            logging: 0,
        };
        log.set_active(true);
        lock(slots)
            .set_dirty_logging(true)
            .map_err(|e| MigrationError::DirtyLog("KVM", Box::new(e)))?;
        for transport in transports {
            lock(transport)
                .set_dirty_log(Some(log))
                .map_err(|e| MigrationError::DirtyLog("a device", Box::new(e)))?;
            tracking.logging += 1;
        }
        Ok(tracking)
    }

    /// The pages written since the last call (or since logging began), in
    /// ascending order, each once.
    pub(super) fn take(&self) -> Result<Vec<u64>, MigrationError> {
        let mut pages = lock(self.slots)
            .take_dirty_pages()
            .map_err(|e| MigrationError::DirtyLog("KVM", Box::new(e)))?;
        pages.extend(self.log.take_dirty_pages());
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}

impl Drop for DirtyTracking<'_> {
    fn drop(&mut self) {
        for transport in &self.transports[..self.logging] {
            if let Err(e) = lock(transport).set_dirty_log(None) {
                warn!("a device did not stop logging: {}", error_chain(&e));
            }
        }
        if let Err(e) = lock(self.slots).set_dirty_logging(false) {
            warn!("KVM dirty logging stays on: {}", error_chain(&e));
        }
        self.log.set_active(false);
        // Bits left over from this migration must not leak into the next.
        let _ = self.log.take_dirty_pages();
    }
}
