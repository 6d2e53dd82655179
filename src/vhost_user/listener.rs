// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where a daemon's listening socket comes from: a path it binds (refusing
//! one that a live daemon serves), a file descriptor it inherited
//! (`--fd FDNUM` in the spec's backend program conventions), or systemd
//! socket activation (`LISTEN_FDS`).

use std::io::BufRead;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::daemon::DaemonError;

/// `__SO_ACCEPTCON` in `/proc/net/unix`'s flags: a listening socket.
const PROC_NET_UNIX_LISTENING: u32 = 0x0001_0000;
/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: RawFd = 3;

/// `path` made absolute (against the current directory), so that
/// `/proc/net/unix` shows it the same way whoever asks.
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_owned();
    }
    std::env::current_dir().map_or_else(|_| path.to_owned(), |d| d.join(path))
}

/// Whether some process listens on a unix socket bound at `path`.
///
/// Read from `/proc/net/unix` rather than probed with `connect()`: a probe
/// would be a real connection, and a daemon serving one frontend would take
/// it as its frontend. Where `/proc` cannot be read, a probe it is.
pub fn is_live(path: &Path) -> bool {
    let want = absolute(path);
    let Ok(file) = std::fs::File::open("/proc/net/unix") else {
        return UnixStream::connect(path).is_ok();
    };
    std::io::BufReader::new(file)
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let listening = cols
                .get(3)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|f| f & PROC_NET_UNIX_LISTENING != 0);
            listening && cols.get(7).is_some_and(|p| Path::new(p) == want)
        })
}

/// Bind a listening socket at `path` (made absolute). A socket file left
/// by a daemon that is gone is replaced; one that a live daemon listens on
/// is refused ([`DaemonError::InUse`]), and so is any other kind of file.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let path = absolute(path);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::NotASocket(path));
        }
        if is_live(&path) {
            return Err(DaemonError::InUse(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    UnixListener::bind(&path).map_err(|source| DaemonError::Bind { path, source })
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given;
    // the kernel checks `fd`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Take over `fd`, which must be a listening unix stream socket (the
/// spec's `--fd FDNUM`). Checked first: anything else is refused with
/// [`DaemonError::BadFd`] and left open.
pub fn from_fd(fd: RawFd) -> Result<UnixListener, DaemonError> {
    let bad = |why: &str| DaemonError::BadFd {
        fd,
        why: why.to_string(),
    };
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(&e.to_string()))?;
    let kind = sockopt(fd, libc::SO_TYPE).map_err(|e| bad(&e.to_string()))?;
    let listening = sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(&e.to_string()))?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(bad("not a unix stream socket"));
    }
    if listening == 0 {
        return Err(bad("not listening"));
    }
    // SAFETY: `fd` is an open listening unix socket (checked above) that
    // the caller hands over; nothing else in this process owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Accepted connections must not leak into exec'ed children.
    // SAFETY: a plain fcntl on an fd we now own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

/// The listening socket systemd passed (socket activation), if this
/// process was started that way: `LISTEN_PID` is ours and `LISTEN_FDS` is
/// 1. The variables are removed so children do not see them.
pub fn from_systemd() -> Result<Option<UnixListener>, DaemonError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    match fds.trim().parse::<u32>() {
        Ok(1) => from_fd(SD_LISTEN_FDS_START).map(Some),
        _ => Err(DaemonError::BadFd {
            fd: SD_LISTEN_FDS_START,
            why: format!("LISTEN_FDS={fds}: exactly one socket is served"),
        }),
    }
}
