// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A filter on the socket between a frontend and the kit's daemon, to play
//! a backend that offers less, or answers otherwise, than the daemon: it
//! passes every message on both ways, file descriptors included, records
//! the frontend's requests, and edits the daemon's replies as told.
//! Serves one connection.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_backend_kit::vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `GET_PROTOCOL_FEATURES`.
pub const GET_PROTOCOL_FEATURES: u32 = 15;
/// `SET_STATUS`.
pub const SET_STATUS: u32 = 39;
/// `GET_STATUS`.
pub const GET_STATUS: u32 = 40;
const FLAG_REPLY: u32 = 0x4;

/// What the proxy changes, and what it saw.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Protocol features removed from the `GET_PROTOCOL_FEATURES` reply.
    pub hidden_protocol: u64,
    /// Bits cleared in `GET_STATUS` replies.
    pub cleared_status: u64,
    /// The frontend's requests: (request, first 8 payload bytes as u64).
    pub seen: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl Filter {
    /// The u64 payloads of the recorded `request`s, in order.
    pub fn values_of(&self, request: u32) -> Vec<u64> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(r, _)| *r == request)
            .map(|(_, v)| *v)
            .collect()
    }
}

/// Listen on a new socket; the first connection to it is passed on to
/// `backend`. Returns (directory, socket, thread ending with the session).
pub fn spawn(backend: PathBuf, filter: Filter) -> (tempfile::TempDir, PathBuf, JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("proxy.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let thread = std::thread::spawn(move || {
        let (frontend, _) = listener.accept().unwrap();
        let backend = UnixStream::connect(backend).unwrap();
        let (f2, b2) = (frontend.try_clone().unwrap(), backend.try_clone().unwrap());
        let replies = filter.clone();
        let back = std::thread::spawn(move || forward(&b2, &f2, &replies, false));
        forward(&frontend, &backend, &filter, true);
        back.join().unwrap();
    });
    (dir, sock, thread)
}

/// Pass messages from `from` to `to` until `from` ends: requests are
/// recorded, replies edited.
fn forward(from: &UnixStream, to: &UnixStream, filter: &Filter, requests: bool) {
    while let Some((mut msg, files)) = read_message(from) {
        let word = |i: usize| u32::from_le_bytes(msg[i..i + 4].try_into().unwrap());
        let (request, reply) = (word(0), word(4) & FLAG_REPLY != 0);
        let value = msg
            .get(12..20)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
        if requests {
            filter.seen.lock().unwrap().push((request, value));
        }
        let mask = match request {
            GET_PROTOCOL_FEATURES => filter.hidden_protocol,
            GET_STATUS => filter.cleared_status,
            _ => 0,
        };
        if reply && mask != 0 && msg.len() == 20 {
            msg[12..20].copy_from_slice(&(value & !mask).to_le_bytes());
        }
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let sent = to.send_with_fds(&[&msg[..]], &fds).unwrap();
        (&*to).write_all(&msg[sent..]).unwrap();
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// One vhost-user message (header and payload) and the fds sent with it;
/// `None` at end of file.
fn read_message(from: &UnixStream) -> Option<(Vec<u8>, Vec<File>)> {
    let mut msg = vec![0u8; 12];
    let mut fds = [-1 as RawFd; 8];
    let mut iov = [libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    }];
    // SAFETY: `iov` describes `msg`, which outlives the call; `fds` has
    // room for the 8 descriptors asked for.
    let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    let files = fds[..nfds]
        .iter()
        // SAFETY: the kernel just installed these descriptors for us.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return None;
    }
    (&*from).read_exact(&mut msg[n..]).ok()?;
    let size = u32::from_le_bytes(msg[8..12].try_into().unwrap()) as usize;
    msg.resize(12 + size, 0);
    (&*from).read_exact(&mut msg[12..]).ok()?;
    Some((msg, files))
}
