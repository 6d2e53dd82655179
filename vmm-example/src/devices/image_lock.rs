// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whole-file OFD locks on disk images.
//!
//! Open file description locks (`F_OFD_SETLK`) belong to the open file,
//! not to the process, so they are not dropped when some other descriptor
//! of the same file is closed, and they conflict between threads and
//! processes alike. QEMU locks its images with them too.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Lock all of `file`: shared for a reader, exclusive for a writer. Fails
/// at once (no waiting) if another open file holds a conflicting lock.
pub fn lock(file: &File, read_only: bool) -> io::Result<()> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, however the file grows
                  // SAFETY: `fl` is a valid flock for the duration of the call and the
                  // fd is open for as long as `file` is borrowed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, write: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_second_writer_and_a_reader_beside_a_writer_are_refused() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let writer = open(img.path(), true);
        lock(&writer, false).unwrap();
        let e = lock(&open(img.path(), true), false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
        let e = lock(&open(img.path(), false), true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
        drop(writer);
        lock(&open(img.path(), true), false).unwrap();
    }

    #[test]
    fn readers_share() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let a = open(img.path(), false);
        let b = open(img.path(), false);
        lock(&a, true).unwrap();
        lock(&b, true).unwrap();
        let e = lock(&open(img.path(), true), false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
    }
}
