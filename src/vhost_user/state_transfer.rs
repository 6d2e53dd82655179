// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The DEVICE_STATE transfer: the device's state written to (save) or read
//! from (load) the pipe the frontend passed with `SET_DEVICE_STATE_FD`, on
//! a thread of its own so the session keeps answering messages meanwhile.
//!
//! The frontend owns the other end of the pipe and may never read from it
//! or never close it. So the thread never blocks on the pipe alone: the fd
//! is made non-blocking and the thread polls it together with a cancel
//! eventfd. `CHECK_DEVICE_STATE` gives the transfer a short grace to finish
//! (the frontend is supposed to have drained or closed the pipe by then)
//! and cancels it otherwise; a new `SET_DEVICE_STATE_FD` or the end of the
//! session cancels the one before. No thread outlives its transfer.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// Why a transfer did not complete.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The pipe failed.
    #[error("device state pipe")]
    Io(#[source] io::Error),
    /// The frontend did not drain (save) or close (load) the pipe in time.
    #[error("the frontend did not finish the transfer in time; cancelled")]
    Timeout,
    /// Another transfer or the end of the session cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The transfer thread could not be started or died.
    #[error("the transfer thread failed")]
    Thread,
}

/// A running transfer. Dropping it cancels it and waits for its thread.
#[derive(Debug)]
pub struct StateTransfer {
    load: bool,
    cancel: EventFd,
    done: Option<Receiver<Result<Vec<u8>, TransferError>>>,
    thread: Option<JoinHandle<()>>,
}

/// Set `O_NONBLOCK` on a peer's fd (here the state pipe; the session uses
/// it for kick, call and err fds too).
pub(crate) fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own; F_GETFL/F_SETFL touch only flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until `file` is ready for `events` or `cancel` fires; false when
/// cancelled.
fn wait(file: &File, events: libc::c_short, cancel: &EventFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: file.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: cancel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(fds[1].revents == 0);
    }
}

fn write_all(mut file: File, bytes: &[u8], cancel: &EventFd) -> Result<Vec<u8>, TransferError> {
    let mut done = 0;
    while done < bytes.len() {
        match file.write(&bytes[done..]) {
            Ok(0) => return Err(TransferError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait(&file, libc::POLLOUT, cancel).map_err(TransferError::Io)? {
                    return Err(TransferError::Cancelled);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::Io(e)),
        }
    }
    Ok(Vec::new())
}

fn read_to_end(mut file: File, cap: u64, cancel: &EventFd) -> Result<Vec<u8>, TransferError> {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if bytes.len() as u64 > cap {
                    return Err(TransferError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("device state larger than {cap} bytes"),
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait(&file, libc::POLLIN, cancel).map_err(TransferError::Io)? {
                    return Err(TransferError::Cancelled);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::Io(e)),
        }
    }
}

impl StateTransfer {
    fn start(
        load: bool,
        file: File,
        work: impl FnOnce(File, &EventFd) -> Result<Vec<u8>, TransferError> + Send + 'static,
    ) -> Result<Self, TransferError> {
        set_nonblocking(&file).map_err(TransferError::Io)?;
        let cancel = EventFd::new(libc::EFD_NONBLOCK).map_err(TransferError::Io)?;
        let theirs = cancel.try_clone().map_err(TransferError::Io)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("vbk-device-state".into())
            .spawn(move || {
                let _ = tx.send(work(file, &theirs));
            })
            .map_err(|_| TransferError::Thread)?;
        Ok(StateTransfer {
            load,
            cancel,
            done: Some(rx),
            thread: Some(thread),
        })
    }

    /// Write `bytes` to `file` (the save direction).
    pub fn save(file: File, bytes: Vec<u8>) -> Result<Self, TransferError> {
        Self::start(false, file, move |f, cancel| write_all(f, &bytes, cancel))
    }

    /// Read `file` to its end, at most `cap` bytes (the load direction).
    pub fn load(file: File, cap: u64) -> Result<Self, TransferError> {
        Self::start(true, file, move |f, cancel| read_to_end(f, cap, cancel))
    }

    /// Whether this is the load direction (its bytes are the state).
    pub fn is_load(&self) -> bool {
        self.load
    }

    /// Wait up to `grace` for the transfer; cancel it if it has not
    /// finished by then. Returns what was read (empty for a save).
    pub fn finish(mut self, grace: Duration) -> Result<Vec<u8>, TransferError> {
        let Some(rx) = self.done.take() else {
            return Err(TransferError::Thread);
        };
        let result = match rx.recv_timeout(grace) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.cancel.write(1);
                let _ = rx.recv();
                Err(TransferError::Timeout)
            }
            Err(RecvTimeoutError::Disconnected) => Err(TransferError::Thread),
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        result
    }
}

impl Drop for StateTransfer {
    fn drop(&mut self) {
        let _ = self.cancel.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
