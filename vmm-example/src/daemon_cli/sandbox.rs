// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemons' seccomp sandbox: an allow-list of the system calls a
//! vhost-user daemon of this kit makes once it serves, built with
//! `seccompiler` and installed on every thread (`TSYNC`) after the socket
//! is open. Any other call fails with `EPERM` instead of running: a
//! compromised daemon cannot exec, ptrace, mount, open network sockets of
//! other families' kinds or load modules, and a path the list forgot
//! fails loudly with an error rather than killing the process mid-request.
//!
//! The list covers every path the daemons take: serving and reconnecting
//! (accept, connect for `--client`), guest memory and the in-flight area
//! (mmap, memfd), the data plane (epoll, eventfd, preadv/pwritev,
//! fallocate for discard and write-zeroes, fdatasync), worker threads
//! spawned when queues start (clone3, rseq, robust lists), DEVICE_STATE
//! transfers and the state file (pipes, write, rename, fsync), postcopy
//! (userfaultfd and its ioctls) and the rng (getrandom).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// Why the sandbox could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This architecture has no filter.
    #[error("no seccomp filter for {0}")]
    Arch(&'static str),
    /// The filter could not be built.
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::Error),
    /// The kernel refused it.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// The system calls the daemons make.
fn allowed() -> Vec<libc::c_long> {
    let mut calls = vec![
        // I/O on sockets, eventfds, pipes and the image.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstatfs,
        libc::SYS_openat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_getcwd,
        libc::SYS_readlinkat,
        libc::SYS_pipe2,
        libc::SYS_flock,
        // Memory: guest regions, the in-flight area, the dirty log.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_memfd_create,
        libc::SYS_userfaultfd,
        // Threads, signals, time.
        libc::SYS_futex,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_tgkill,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_prctl,
        libc::SYS_prlimit64,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Waiting.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_ppoll,
        // The vhost-user socket.
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_accept4,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_epoll_wait,
        libc::SYS_poll,
        libc::SYS_accept,
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_rename,
        libc::SYS_unlink,
        libc::SYS_readlink,
        libc::SYS_pipe,
    ]);
    calls
}

fn program() -> Result<BpfProgram, SandboxError> {
    let arch = std::env::consts::ARCH;
    let target = TargetArch::try_from(arch).map_err(|_| SandboxError::Arch(arch))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        target,
    )
    .map_err(|e| SandboxError::Build(seccompiler::Error::Backend(e)))?;
    filter
        .try_into()
        .map_err(|e| SandboxError::Build(seccompiler::Error::Backend(e)))
}

/// Install the filter on every thread of the process.
pub fn install() -> Result<(), SandboxError> {
    let prog = program()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(SandboxError::Install)?;
    log::info!(
        "seccomp sandbox on ({} system calls allowed)",
        allowed().len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call outside the list fails with EPERM, one on it runs; the filter
    /// is installed on one thread only (`apply_filter`), so the test
    /// process is not sandboxed.
    #[test]
    fn a_call_outside_the_list_is_refused() {
        // SAFETY: getppid has no preconditions.
        let control = unsafe { libc::getppid() };
        assert!(control > 0, "control: getppid works unfiltered");
        let prog = program().unwrap();
        let (ppid, errno, pid) = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            // SAFETY: getppid has no preconditions. Through syscall(2),
            // which sets errno (glibc's getppid() does not check).
            let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            (ppid, errno, pid)
        })
        .join()
        .unwrap();
        assert_eq!(ppid, -1, "getppid is not on the list");
        assert_eq!(errno, Some(libc::EPERM));
        assert_eq!(pid, std::process::id() as i32, "getpid is on the list");
    }
}
