// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Requests the adapter frames itself on the main socket, with the header
//! codec of the kit's daemon, because the `vhost` crate's frontend cannot
//! send them as backends answer them:
//!
//! - `SET_LOG_BASE` with LOG_SHMFD: the crate waits for a reply of exactly
//!   a `VhostUserLog`, but libvhost-user (qemu-storage-daemon) answers
//!   with a u64, which leaves the crate waiting for bytes that never come.
//!   The spec gives the reply no payload of its own; like QEMU, the
//!   adapter reads whatever payload the header announces.
//! - `SET_STATUS` / `GET_STATUS`, for which the crate has no call.
//!
//! Requests are only made by the control side (`&mut` or `&` of the one
//! device, never two at once), and the crate's own requests read exactly
//! their bytes: the two never interleave on the socket.

use std::os::fd::RawFd;

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::vhost_user::connection::{encode, Header, FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE};

/// How a request framed by the adapter itself failed.
#[derive(Debug, thiserror::Error)]
pub enum RawRequestError {
    /// The request could not be written to the socket.
    #[error("cannot send the request")]
    Send(#[source] std::io::Error),
    /// No complete reply could be read (the backend hung up or the request
    /// timed out).
    #[error("no reply")]
    Recv(#[source] std::io::Error),
    /// The reply answers another request.
    #[error("the reply is for request {found}, not {expected}")]
    WrongReply {
        /// The request sent.
        expected: u32,
        /// The request the reply names.
        found: u32,
    },
    /// The reply lacks the reply flag or has the wrong version.
    #[error("the reply has bad header flags {0:#x}")]
    BadFlags(u32),
    /// The reply's payload is larger than any reply of these requests.
    #[error("the reply announces a {0}-byte payload")]
    Oversized(u32),
    /// The reply's payload does not have the size the request's reply has.
    #[error("the reply has a {0}-byte payload, not a u64")]
    NotU64(usize),
    /// The backend answered REPLY_ACK with a failure.
    #[error("the backend refused the request (status {0})")]
    Refused(u64),
}

impl VhostUserFrontendDevice {
    /// Send `payload` (with `fds`) as `request`; with `reply`, read the
    /// reply and return its payload. The request timeout applies.
    pub(super) fn raw_request(
        &self,
        name: &'static str,
        request: FrontendReq,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
        reply: bool,
    ) -> Result<Vec<u8>, FrontendError> {
        if !self.shared.connected.load(Ordering::SeqCst) {
            return Err(FrontendError::Disconnected);
        }
        let code = u32::from(request);
        let _armed = RequestGuard::arm(&self.shared, self.request_timeout);
        let result = self.send_raw(code, flags, payload, fds).and_then(|()| {
            if reply {
                self.recv_raw(code)
            } else {
                Ok(Vec::new())
            }
        });
        result.map_err(|source| {
            warn!("vhost-user {name} failed: {source}");
            FrontendError::Raw {
                request: name,
                source,
            }
        })
    }

    /// `request` with a u64 payload, acknowledged when REPLY_ACK is on.
    pub(super) fn raw_set_u64(
        &self,
        name: &'static str,
        request: FrontendReq,
        value: u64,
    ) -> Result<(), FrontendError> {
        let ack = self.has(VhostUserProtocolFeatures::REPLY_ACK);
        let flags = if ack { FLAG_NEED_REPLY } else { 0 };
        let reply = self.raw_request(name, request, flags, &value.to_le_bytes(), &[], ack)?;
        if !ack {
            return Ok(());
        }
        match u64_of(&reply) {
            Ok(0) => Ok(()),
            Ok(status) => Err(RawRequestError::Refused(status)),
            Err(e) => Err(e),
        }
        .map_err(|source| FrontendError::Raw {
            request: name,
            source,
        })
    }

    /// `request` without payload, answered with a u64.
    pub(super) fn raw_get_u64(
        &self,
        name: &'static str,
        request: FrontendReq,
    ) -> Result<u64, FrontendError> {
        let reply = self.raw_request(name, request, 0, &[], &[], true)?;
        u64_of(&reply).map_err(|source| FrontendError::Raw {
            request: name,
            source,
        })
    }

    fn send_raw(
        &self,
        code: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), RawRequestError> {
        let msg = encode(code, flags, payload);
        let mut sent = 0;
        if !fds.is_empty() {
            sent = self
                .raw_sock
                .send_with_fds(&[&msg[..]], fds)
                .map_err(|e| RawRequestError::Send(std::io::Error::from(e)))?;
        }
        (&self.raw_sock)
            .write_all(&msg[sent..])
            .map_err(RawRequestError::Send)
    }

    fn recv_raw(&self, code: u32) -> Result<Vec<u8>, RawRequestError> {
        let mut header = [0u8; HEADER_SIZE];
        (&self.raw_sock)
            .read_exact(&mut header)
            .map_err(RawRequestError::Recv)?;
        let header = Header::parse(&header);
        if header.request != code {
            return Err(RawRequestError::WrongReply {
                expected: code,
                found: header.request,
            });
        }
        if header.flags & 0x3 != crate::vhost_user::connection::VERSION
            || header.flags & FLAG_REPLY == 0
        {
            return Err(RawRequestError::BadFlags(header.flags));
        }
        if header.size as usize > MAX_BACKEND_REQ_PAYLOAD {
            return Err(RawRequestError::Oversized(header.size));
        }
        let mut payload = vec![0u8; header.size as usize];
        (&self.raw_sock)
            .read_exact(&mut payload)
            .map_err(RawRequestError::Recv)?;
        Ok(payload)
    }
}

/// The u64 a reply carries.
fn u64_of(payload: &[u8]) -> Result<u64, RawRequestError> {
    let bytes: [u8; 8] = payload
        .try_into()
        .map_err(|_| RawRequestError::NotU64(payload.len()))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Device status FEATURES_OK (virtio 1.2, 2.1).
const STATUS_FEATURES_OK: u32 = 8;
/// Device status DRIVER_OK.
const STATUS_DRIVER_OK: u32 = 4;

impl VhostUserFrontendDevice {
    /// [`DeviceControl::driver_status`] for the adapter: `SET_STATUS`, and
    /// while the driver is between FEATURES_OK and DRIVER_OK, `GET_STATUS`
    /// for the backend's verdict on the features. Without the STATUS
    /// protocol feature the status stays with the transport.
    pub(super) fn forward_status(&self, status: u32) -> Result<u32, FrontendError> {
        if !self.has(VhostUserProtocolFeatures::STATUS) {
            return Ok(status);
        }
        // The vhost-user status is the virtio status byte.
        let byte = u64::from(status & 0xff);
        self.raw_set_u64("SET_STATUS", FrontendReq::SET_STATUS, byte)?;
        if status & STATUS_FEATURES_OK == 0 || status & STATUS_DRIVER_OK != 0 {
            return Ok(status);
        }
        let held = self.raw_get_u64("GET_STATUS", FrontendReq::GET_STATUS)?;
        if held & u64::from(STATUS_FEATURES_OK) == 0 {
            info!("the vhost-user backend cleared FEATURES_OK: it refuses the features");
            return Ok(status & !STATUS_FEATURES_OK);
        }
        Ok(status)
    }
}
