// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user message stream from an untrusted frontend, into a live
//! session of the kit's daemon over a unix socketpair, with fds attached.
//!
//! Input: a sequence of records, each `fd_mask: u16, len: u16, bytes`
//! (little endian). The record's bytes go to the daemon in one `sendmsg`
//! carrying the fds `fd_mask` selects from a pool the target owns: bit 0 a
//! 1 MiB guest-memory memfd, 1 a 64 KiB memfd, 2–4 eventfds, 5 an empty
//! memfd, 6 the read end of a pipe holding a few bytes and already at end
//! of file (a device state to load), 7 the write end of a pipe the target
//! drains (a device state to save), 8 a socket (a backend channel).
//! The bytes are raw wire bytes: a record may hold one message, several,
//! or part of one, so framing, header validation, payload decoding, fd
//! accounting and every request handler (memory tables, vrings, features,
//! config, in-flight, device state, dirty log) are reached. Then the
//! frontend end is shut down for writing and the session must end.
//!
//! Asserted: no panic; the session returns (a hang is a libFuzzer timeout);
//! it never answers with more bytes than a reply can hold per request.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use common::{memfd, FuzzDevice, Shape};
use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::vhost_user::VhostUserDaemon;

/// Two queues of up to 256 with VERSION_1, EVENT_IDX and INDIRECT_DESC, 16
/// bytes of config, state of its own.
const SHAPE: Shape = Shape {
    device_type: 0x7f,
    queues: 2,
    max_queue_size: 256,
    features: (1 << 32) | (1 << 29) | (1 << 28),
    config_size: 16,
    max_state: 4096,
};

/// The fds a record can attach, created once and reset for every input
/// (the daemon receives duplicates, so the originals stay ours).
struct FdPool {
    ram: File,
    small: File,
    empty: File,
    eventfds: [File; 3],
    /// Read end of a pipe at EOF after a few bytes; made for every input.
    load: File,
    /// A pipe whose write end the daemon may get; we drain the read end.
    save: (File, File),
    socket: (UnixStream, UnixStream),
}

fn eventfd() -> File {
    // SAFETY: plain syscall; the fd is checked and then owned by the `File`.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: `fd` is a fresh fd nobody else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A non-blocking pipe: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
        0
    );
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// A pipe's read end holding `bytes`, its write end closed.
fn loaded_pipe(bytes: &[u8]) -> File {
    let (read, mut write) = pipe();
    write.write_all(bytes).expect("a few bytes fit in a pipe");
    read
}

impl FdPool {
    fn new() -> Self {
        let socket = UnixStream::pair().expect("socketpair");
        socket.1.set_nonblocking(true).expect("nonblocking");
        FdPool {
            ram: memfd(c"fuzz-ram", 1 << 20),
            small: memfd(c"fuzz-small", 64 << 10),
            empty: memfd(c"fuzz-empty", 0),
            eventfds: [eventfd(), eventfd(), eventfd()],
            load: loaded_pipe(b""),
            save: pipe(),
            socket,
        }
    }

    fn fd(&self, bit: u32) -> RawFd {
        match bit {
            0 => self.ram.as_raw_fd(),
            1 => self.small.as_raw_fd(),
            2..=4 => self.eventfds[bit as usize - 2].as_raw_fd(),
            5 => self.empty.as_raw_fd(),
            6 => self.load.as_raw_fd(),
            7 => self.save.1.as_raw_fd(),
            _ => self.socket.0.as_raw_fd(),
        }
    }

    /// Undo what the previous input's session did to the pool: sizes,
    /// eventfd counters, bytes left in the pipe and the socket.
    fn reset(&mut self) {
        let _ = self.ram.set_len(0);
        let _ = self.ram.set_len(1 << 20);
        let _ = self.small.set_len(0);
        let _ = self.small.set_len(64 << 10);
        let _ = self.empty.set_len(0);
        let mut sink = [0u8; 4096];
        for e in &mut self.eventfds {
            let _ = e.read(&mut sink[..8]);
        }
        self.load = loaded_pipe(b"device state");
        while matches!(self.save.0.read(&mut sink), Ok(n) if n > 0) {}
        while matches!((&self.socket.1).read(&mut sink), Ok(n) if n > 0) {}
    }
}

thread_local! {
    static POOL: std::cell::RefCell<FdPool> = std::cell::RefCell::new(FdPool::new());
}

/// Send `bytes` with `fds` in one `sendmsg`; false if the daemon is gone.
fn send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
    if fds.is_empty() {
        return (&*sock).write_all(bytes).is_ok();
    }
    let iov = [IoSlice::new(bytes)];
    let space = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let mut cmsg_buf = vec![0u8; unsafe { libc::CMSG_SPACE(space) } as usize];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_buf.len();
    // SAFETY: `msg` points at a control buffer of CMSG_SPACE(space) bytes,
    // so the first header and its data (`space` bytes) fit; the fds are
    // copied into it before sendmsg reads it; iov and buffers outlive it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(space) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) == bytes.len() as isize
    }
}

fuzz_target!(|data: &[u8]| {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.reset();
        let (frontend, backend) = UnixStream::pair().expect("socketpair");
        let mut rest = data;
        while rest.len() >= 4 {
            let mask = u16::from_le_bytes([rest[0], rest[1]]);
            let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
            let bytes = &rest[4..4 + len];
            rest = &rest[4 + len..];
            let fds: Vec<RawFd> = (0..9)
                .filter(|b| mask & (1 << b) != 0)
                .map(|b| pool.fd(b))
                .collect();
            if bytes.is_empty() || !send(&frontend, bytes, &fds) {
                break;
            }
        }
        // Everything is in the socket buffer (inputs are far smaller): the
        // daemon reads it all, then end of file.
        let _ = frontend.shutdown(std::net::Shutdown::Write);
        // A worker blocked for good (a postcopy fault the input never
        // serves) ends the session after this, well inside the 1 s limit.
        let mut daemon = VhostUserDaemon::new(Arc::new(FuzzDevice::new(SHAPE)))
            .expect("daemon")
            .with_stop_timeout(std::time::Duration::from_millis(50))
            // A transfer the input never finishes is cancelled at CHECK
            // after this (the 2 s default would make such inputs slow).
            .with_check_grace(std::time::Duration::from_millis(50));
        let _ = daemon.serve_stream(backend);
        // Dropped while the replies, and the userfaultfd copies they carry,
        // are still unread: a worker must not stay asleep on a postcopy
        // fault after its session ended (fuzz/regressions/ holds the input
        // that once left one there).
        drop(daemon);
        let mut replies = Vec::new();
        let _ = (&frontend).read_to_end(&mut replies);
        // Replies are bounded by what was asked: a header (12 bytes) plus at
        // most 256 bytes of config or a 64-region table per request.
        assert!(
            replies.len() <= 12 + data.len() * (12 + 1024),
            "{} reply bytes",
            replies.len()
        );
    });
});
