// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The frontend side of `DEVICE_STATE` for the VMM-side adapter: the bytes
//! of a stopped backend's own state, read through a pipe after
//! `SET_DEVICE_STATE_FD` (save) or written into one (load), each transfer
//! closed by `CHECK_DEVICE_STATE`.
//!
//! The adapter and the kit's daemon speak the kit's snapshot envelope over
//! this channel, so a device's state can leave a vhost-user backend for an
//! in-process core and come back. The pipe is non-blocking and every wait
//! has a deadline: a backend that neither reads nor writes fails the
//! transfer instead of hanging the VMM.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// Largest state the adapter accepts from a backend.
pub const MAX_STATE_LEN: usize = crate::snapshot::MAX_PAYLOAD_LEN as usize + 64;

/// Why a state transfer through the pipe failed.
#[derive(Debug, thiserror::Error)]
pub enum StateTransferError {
    /// The pipe could not be created or used.
    #[error("device state pipe")]
    Pipe(#[source] std::io::Error),
    /// The backend did not finish within the deadline.
    #[error("the backend did not finish the device state transfer within {0:?}")]
    Timeout(Duration),
    /// The backend sent more than [`MAX_STATE_LEN`] bytes.
    #[error("the backend's device state exceeds {MAX_STATE_LEN} bytes")]
    TooLarge,
}

/// A close-on-exec pipe: (read end, write end). The caller makes its own
/// end non-blocking; the backend's end is left as a backend expects it.
pub(crate) fn pipe() -> Result<(File, File), StateTransferError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes on success.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(StateTransferError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded: both fds are fresh and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Wait until `fd` is ready for `events` or `deadline` passes.
fn wait(
    fd: &File,
    events: libc::c_short,
    deadline: Instant,
    limit: Duration,
) -> Result<(), StateTransferError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(StateTransferError::Timeout(limit));
    }
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(left.as_millis().saturating_add(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(StateTransferError::Pipe(e));
        }
    }
    Ok(())
}

/// Read `from` to end of file within `limit`.
pub(crate) fn read_all(mut from: File, limit: Duration) -> Result<Vec<u8>, StateTransferError> {
    crate::vhost_user::state_transfer::set_nonblocking(&from).map_err(StateTransferError::Pipe)?;
    let deadline = Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                if bytes.len() + n > MAX_STATE_LEN {
                    return Err(StateTransferError::TooLarge);
                }
                bytes.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                wait(&from, libc::POLLIN, deadline, limit)?
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(StateTransferError::Pipe(e)),
        }
    }
}

/// Write all of `bytes` into `to` within `limit`, then close it.
pub(crate) fn write_all(
    mut to: File,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), StateTransferError> {
    crate::vhost_user::state_transfer::set_nonblocking(&to).map_err(StateTransferError::Pipe)?;
    let deadline = Instant::now() + limit;
    let mut at = 0;
    while at < bytes.len() {
        match to.write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                wait(&to, libc::POLLOUT, deadline, limit)?
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(StateTransferError::Pipe(e)),
        }
    }
    Ok(())
}
