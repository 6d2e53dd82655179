// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty logging for a live migration: the VMM's [`SharedDirtyLog`] handed
//! to the backend (`SET_LOG_BASE` with the log's memfd, LOG_SHMFD), the
//! `VHOST_F_LOG_ALL` feature and the `VHOST_VRING_F_LOG` flag on every
//! running ring, switched on and off while the device runs and re-applied
//! by every activation that happens while logging is on.

use std::fs::File;

use vhost::vhost_user::message::{FrontendReq, VhostUserVringAddrFlags};

use super::*;
use crate::data_plane::SharedDirtyLog;

/// The log the backend writes into while logging is on: a duplicate of
/// the VMM's log file, so that it outlives the caller's borrow.
#[derive(Debug)]
pub(super) struct LogArea {
    file: File,
    size: u64,
}

impl LogArea {
    fn new(log: &SharedDirtyLog) -> Result<Self, FrontendError> {
        let file = log.file().try_clone().map_err(FrontendError::LogFile)?;
        Ok(LogArea {
            file,
            size: log.size(),
        })
    }

    /// Guest physical addresses `[0, covered)` the log has a bit for.
    pub(super) fn covered(&self) -> u64 {
        self.size
            .saturating_mul(8)
            .saturating_mul(crate::memory::LOG_PAGE_SIZE)
    }
}

/// One ring as the driver laid it out: (index, size, descriptor table,
/// available ring, used ring), guest physical addresses.
pub(super) type RingLayout = (u16, u16, u64, u64, u64);

impl VhostUserFrontendDevice {
    /// Whether dirty logging is on.
    pub fn is_logging(&self) -> bool {
        self.dirty_log.is_some()
    }

    /// What `SET_FEATURES` carries for the driver's `features`: plus the
    /// vhost-user bits in use (protocol features, `LOG_ALL` while logging
    /// is on, or `log` when given).
    pub(super) fn backend_ack(&self, features: u64, log: bool) -> u64 {
        let mut ack = features;
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            ack |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        if log {
            ack |= VHOST_F_LOG_ALL;
        }
        ack
    }

    /// The `SET_VRING_ADDR` payload for `ring` in `memory`: frontend
    /// virtual addresses, and with `log` the `VHOST_VRING_F_LOG` flag and
    /// the used ring's guest physical address to log its writes at.
    pub(super) fn vring_config(
        &self,
        memory: &GuestMemoryLog,
        ring: RingLayout,
        log: bool,
    ) -> Result<VringConfigData, ControlError> {
        let (_, size, desc, avail, used) = ring;
        let n = u64::from(size);
        let host = |gpa, len, what| {
            Self::host_address(memory, gpa, len).ok_or(ControlError::Invalid(what))
        };
        let (flags, log_addr) = if log {
            (
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
                Some(used),
            )
        } else {
            (0, None)
        };
        Ok(VringConfigData {
            queue_max_size: self.max_queue_size,
            queue_size: size,
            flags,
            desc_table_addr: host(desc, 16 * n, "descriptor table outside memory")?,
            avail_ring_addr: host(avail, 6 + 2 * n, "available ring outside memory")?,
            used_ring_addr: host(used, 6 + 8 * n, "used ring outside memory")?,
            log_addr,
        })
    }

    /// Refuse logging with a backend that cannot do it.
    fn check_log_support(&self) -> Result<(), FrontendError> {
        if self.backend_features & VHOST_F_LOG_ALL == 0 {
            return Err(FrontendError::DirtyLogUnsupported("VHOST_F_LOG_ALL"));
        }
        if !self.has(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(FrontendError::DirtyLogUnsupported("LOG_SHMFD"));
        }
        Ok(())
    }

    /// `SET_LOG_BASE` with `area`'s file, the whole of it. Sent by hand
    /// (see [`super::raw`]): backends answer it with different payloads.
    fn send_log_base(&self, area: &LogArea) -> Result<(), FrontendError> {
        let mut log = area.size.to_le_bytes().to_vec();
        log.extend_from_slice(&0u64.to_le_bytes());
        let fds = [area.file.as_raw_fd()];
        self.raw_request(
            "SET_LOG_BASE",
            FrontendReq::SET_LOG_BASE,
            0,
            &log,
            &fds,
            true,
        )?;
        Ok(())
    }

    /// At activation, after `SET_MEM_TABLE`: hand the log on again (the
    /// backend may have dropped it on reset). The rings and features of
    /// the activation carry the logging bits themselves.
    pub(super) fn apply_log_at_activation(&self) -> Result<(), FrontendError> {
        match &self.dirty_log {
            Some(area) => self.send_log_base(area),
            None => Ok(()),
        }
    }

    /// `SET_FEATURES` and `SET_VRING_ADDR` of every running ring, with the
    /// logging bits on or off.
    fn switch_running_device(&self, log: bool) -> Result<(), ControlError> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        let features = self.backend_ack(active.features, log);
        self.request("SET_FEATURES", |fe| fe.set_features(features))?;
        for &ring in &active.layout {
            let config = self.vring_config(&active._memory, ring, log)?;
            let index = usize::from(ring.0);
            self.request("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &config))?;
        }
        Ok(())
    }

    /// [`DeviceControl::set_dirty_log`] for the adapter.
    pub(super) fn set_logging(&mut self, log: Option<&SharedDirtyLog>) -> Result<(), ControlError> {
        let Some(log) = log else {
            if self.dirty_log.is_none() {
                return Ok(());
            }
            // Forgotten whatever the backend answers: a failed switch-off
            // leaves a broken link, not a log the VMM must keep.
            self.dirty_log = None;
            return self.switch_running_device(false);
        };
        self.check_log_support()?;
        let area = LogArea::new(log)?;
        self.send_log_base(&area)?;
        if let Err(e) = self.switch_running_device(true) {
            if let Err(undo) = self.switch_running_device(false) {
                debug!("cannot switch logging back off: {undo}");
            }
            return Err(e);
        }
        self.dirty_log = Some(area);
        Ok(())
    }
}
