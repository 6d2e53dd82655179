// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vrings: size, addresses, base, eventfds, enabling, and the in-flight
//! area that survives a backend restart.

use super::*;
use crate::vring::Notifier;

impl<B: DeviceBackend> Session<'_, B> {
    pub(super) fn set_vring_num(&mut self, index: u32, size: u32) -> RequestResult {
        self.core.set_queue_size(index, size)?;
        Ok(Outcome::Ack)
    }

    /// `SET_VRING_ADDR`: the frontend's virtual addresses, translated to
    /// guest-physical ones through the memory table.
    pub(super) fn set_vring_addr(&mut self, a: &VhostUserVringAddr) -> RequestResult {
        if self.regions.is_empty() {
            return Err(RequestError::NoMemory(FrontendReq::SET_VRING_ADDR));
        }
        let tr = |vva| {
            self.regions
                .vva_to_gpa(vva)
                .ok_or(RequestError::UnmappedAddress(vva))
        };
        let (desc, avail, used) = (tr(a.descriptor)?, tr(a.available)?, tr(a.used)?);
        self.core.set_queue_addresses(a.index, desc, avail, used)?;
        Ok(Outcome::Ack)
    }

    pub(super) fn set_vring_base(&mut self, index: u32, base: u16) -> RequestResult {
        self.core.set_queue_base(index, base, None)?;
        Ok(Outcome::Ack)
    }

    /// `GET_VRING_BASE`: stop the queue and report where it stopped.
    pub(super) fn get_vring_base(&mut self, index: u32) -> RequestResult {
        let state = self.core.stop_queue(index)?;
        let reply = VhostUserVringState::new(index, u32::from(state.next_avail));
        Ok(Outcome::Reply(reply.as_slice().to_vec()))
    }

    /// `SET_VRING_KICK`, `SET_VRING_CALL`, `SET_VRING_ERR`.
    pub(super) fn set_vring_fd(
        &mut self,
        kind: VringFdKind,
        index: u32,
        file: Option<File>,
    ) -> RequestResult {
        if index as usize >= self.core.num_queues() {
            return Err(RequestError::Core(CoreError::QueueIndex(index)));
        }
        let fd = file.map(|file| {
            // The peer chose this fd: it may be a full eventfd or a pipe
            // that nobody reads. Non-blocking, a write to it fails with
            // EAGAIN (the notification is dropped, see `Notifier::notify`)
            // instead of wedging the worker, and a read of a kick that is
            // not ready returns instead of blocking. The flag is on the
            // shared open file description; the frontend's eventfds are
            // non-blocking anyway.
            if let Err(e) = super::super::state_transfer::set_nonblocking(&file) {
                warn!("{kind:?} fd of queue {index}: cannot make it non-blocking: {e}");
            }
            file_to_eventfd(file)
        });
        match kind {
            VringFdKind::Kick => {
                if fd.is_none() {
                    // Polling mode (no kick fd) is not supported.
                    return Err(RequestError::BadFds {
                        request: FrontendReq::SET_VRING_KICK,
                        expected: 1,
                        got: 0,
                    });
                }
                if !self.protocol_negotiated() {
                    self.core.set_queue_enabled(index, true)?;
                }
                self.core.set_kick(index, fd)?;
            }
            VringFdKind::Call => self.core.set_call_notifier(index, fd.map(Notifier::new))?,
            VringFdKind::Err => self.core.set_err_notifier(index, fd.map(Notifier::new))?,
        }
        Ok(Outcome::Ack)
    }

    pub(super) fn set_vring_enable(&mut self, index: u32, enable: bool) -> RequestResult {
        self.core.set_queue_enabled(index, enable)?;
        Ok(Outcome::Ack)
    }

    /// `GET_INFLIGHT_FD`: a new in-flight area of the geometry asked for,
    /// shared with the frontend.
    pub(super) fn get_inflight_fd(&mut self, want: &VhostUserInflight) -> RequestResult {
        self.check_inflight_geometry(FrontendReq::GET_INFLIGHT_FD, want)?;
        let area = Arc::new(InflightArea::create(want.num_queues, want.queue_size)?);
        let reply = VhostUserInflight::new(area.len() as u64, 0, want.num_queues, want.queue_size);
        self.core.set_inflight(Some(area.clone()));
        Ok(Outcome::ReplyWithFile(reply.as_slice().to_vec(), area))
    }

    /// `SET_INFLIGHT_FD`: the area a previous backend process left.
    pub(super) fn set_inflight_fd(
        &mut self,
        info: &VhostUserInflight,
        file: File,
    ) -> RequestResult {
        self.check_inflight_geometry(FrontendReq::SET_INFLIGHT_FD, info)?;
        let area = InflightArea::from_file(
            file,
            info.mmap_size,
            info.mmap_offset,
            info.num_queues,
            info.queue_size,
        )?;
        self.core.set_inflight(Some(Arc::new(area)));
        Ok(Outcome::Ack)
    }

    fn check_inflight_geometry(
        &self,
        req: FrontendReq,
        info: &VhostUserInflight,
    ) -> Result<(), RequestError> {
        if usize::from(info.num_queues) > self.core.num_queues()
            || info.queue_size > self.core.backend().max_queue_size().max(1024)
        {
            return Err(RequestError::BadPayload {
                request: req,
                len: std::mem::size_of::<VhostUserInflight>(),
            });
        }
        Ok(())
    }
}

fn file_to_eventfd(file: File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` transfers ownership of a valid fd we received;
    // `EventFd` takes it over and closes it on drop. If the fd is not an
    // eventfd, reads and writes on it fail with an error, never UB.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}
