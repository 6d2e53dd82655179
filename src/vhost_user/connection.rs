// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Framing of vhost-user messages on a unix stream socket: a 12-byte header
//! (request, flags, payload size), the payload, and file descriptors passed
//! as `SCM_RIGHTS` ancillary data with the first bytes of the message.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the vhost-user message header.
pub const HEADER_SIZE: usize = 12;
/// The protocol version carried in the low bits of the header flags.
pub const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// Header flag: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// Errors on the socket. All of them end the session.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// A read or write failed.
    #[error("socket I/O failed")]
    Io(#[source] std::io::Error),
    /// A header announced a payload larger than the protocol allows; the
    /// stream cannot be resynchronised.
    #[error("payload of {0} bytes exceeds the protocol limit")]
    OversizedPayload(u32),
    /// A request failed in a way that ends the session
    /// ([`super::session::RequestError::ends_session`]): a worker left
    /// blocked, for example on a postcopy fault the frontend never serves.
    /// Ending the session releases the fault and lets the daemon serve the
    /// next frontend.
    #[error("a request failed in a way that ends the session")]
    Fatal(#[source] Box<super::session::RequestError>),
}

/// A received request.
#[derive(Debug)]
pub struct Message {
    /// Raw request code.
    pub request: u32,
    /// Raw header flags.
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Attached file descriptors, owned.
    pub files: Vec<File>,
}

impl Message {
    /// Whether the header carries protocol version 1 and is not a reply.
    pub fn header_valid(&self) -> bool {
        self.flags & VERSION_MASK == VERSION && self.flags & FLAG_REPLY == 0
    }

    /// Whether the sender asked for a REPLY_ACK.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// A message header as it stands on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Raw request code.
    pub(crate) request: u32,
    /// Raw header flags.
    pub(crate) flags: u32,
    /// Payload size in bytes.
    pub(crate) size: u32,
}

impl Header {
    /// The header in `bytes`.
    pub(crate) fn parse(bytes: &[u8; HEADER_SIZE]) -> Header {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }
}

/// One message as bytes: the header (protocol version or'ed into `flags`)
/// and `payload`.
pub(crate) fn encode(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&(VERSION | flags).to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

/// One vhost-user connection.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
}

impl Connection {
    /// Wrap a connected stream.
    pub fn new(sock: UnixStream) -> Self {
        Connection { sock }
    }

    /// Receive one message.
    pub fn recv(&mut self) -> Result<Message, ConnectionError> {
        let mut hdr = [0u8; HEADER_SIZE];
        let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HEADER_SIZE,
        }];
        let (got, nfds) = loop {
            // SAFETY: the iovec points at `hdr`, which outlives the call and
            // is HEADER_SIZE bytes long; `fds` has room for the maximum
            // number of descriptors we accept. Received fds are wrapped in
            // `File`s just below, so each is owned exactly once.
            match unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) } {
                Ok(r) => break r,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(ConnectionError::Io(e.into())),
            }
        };
        let files: Vec<File> = fds[..nfds]
            .iter()
            // SAFETY: these fds were just received through SCM_RIGHTS and
            // nothing else refers to them.
            .map(|fd| unsafe { File::from_raw_fd(*fd) })
            .collect();
        if got == 0 {
            return Err(ConnectionError::Closed);
        }
        if got < HEADER_SIZE {
            self.read_exact(&mut hdr[got..])?;
        }
        let Header {
            request,
            flags,
            size,
        } = Header::parse(&hdr);
        if size as usize > MAX_MSG_SIZE {
            return Err(ConnectionError::OversizedPayload(size));
        }
        let mut payload = vec![0u8; size as usize];
        self.read_exact(&mut payload)?;
        Ok(Message {
            request,
            flags,
            payload,
            files,
        })
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ConnectionError> {
        self.sock.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ConnectionError::Closed
            } else {
                ConnectionError::Io(e)
            }
        })
    }

    /// Send a reply to `request` with `payload`.
    pub fn send_reply(&mut self, request: u32, payload: &[u8]) -> Result<(), ConnectionError> {
        let buf = encode(request, FLAG_REPLY, payload);
        self.sock.write_all(&buf).map_err(ConnectionError::Io)
    }

    /// Send a reply to `request` with `payload` and file descriptors.
    pub fn send_reply_with_fds(
        &mut self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), ConnectionError> {
        self.send_request(request, FLAG_REPLY, payload, fds)
    }

    /// Send a request (backend-initiated channel) with optional fds.
    pub fn send_request(
        &mut self,
        request: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), ConnectionError> {
        let buf = encode(request, flags, payload);
        if fds.is_empty() {
            return self.sock.write_all(&buf).map_err(ConnectionError::Io);
        }
        let sent = self
            .sock
            .send_with_fds(&[&buf[..]], fds)
            .map_err(|e| ConnectionError::Io(e.into()))?;
        if sent < buf.len() {
            self.sock
                .write_all(&buf[sent..])
                .map_err(ConnectionError::Io)?;
        }
        Ok(())
    }
}
