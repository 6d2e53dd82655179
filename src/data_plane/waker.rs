// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device-driven events: a handle a device keeps to schedule its own worker
//! and to change, at run time, which of its fds the worker polls.
//!
//! A device receives one [`WorkerWaker`] per worker through
//! [`crate::DeviceBackend::set_waker`]. From any thread it can
//!
//! - [`WorkerWaker::wake`] the worker, which then calls `handle_event` with
//!   [`crate::DeviceEvent::Wake`] (wake-ups coalesce: many calls before the
//!   worker runs give one event);
//! - [`WorkerWaker::add_fd`] / [`WorkerWaker::remove_fd`] an fd;
//! - [`WorkerWaker::pause_fd`] an fd it cannot serve now and
//!   [`WorkerWaker::resume_fd`] it later. Device fds are polled
//!   level-triggered, so a readable fd the device leaves unread would call
//!   it again and again: a console holding host input while the guest has
//!   posted no receive buffer pauses its input fd until buffers arrive.
//!
//! Changes take effect in the worker, in order, before its next event. A
//! worker's thread starts with its first queue; what is sent before waits
//! for it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::worker::WorkerCommand;

/// A change to the fds a worker polls for its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FdChange {
    /// Poll `fd`; its events come back as `DeviceEvent::Fd(token)`.
    Add(RawFd, u64),
    /// Stop polling the fd of `token` until resumed.
    Pause(u64),
    /// Poll the fd of `token` again.
    Resume(u64),
    /// Forget the fd of `token`.
    Remove(u64),
}

/// A device's handle to one of its workers (see the module docs).
#[derive(Clone, Debug)]
pub struct WorkerWaker {
    worker: usize,
    commands: Sender<WorkerCommand>,
    wake: Arc<EventFd>,
    /// A wake-up is queued and not yet delivered.
    pending: Arc<AtomicBool>,
}

impl WorkerWaker {
    pub(crate) fn new(
        worker: usize,
        commands: Sender<WorkerCommand>,
        wake: EventFd,
        pending: Arc<AtomicBool>,
    ) -> Self {
        WorkerWaker {
            worker,
            commands,
            wake: Arc::new(wake),
            pending,
        }
    }

    /// The worker this handle schedules.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Schedule a [`crate::DeviceEvent::Wake`] on the worker. Returns false
    /// if the worker is gone (the device was dropped).
    pub fn wake(&self) -> bool {
        if self.pending.swap(true, Ordering::SeqCst) {
            return true;
        }
        self.send(WorkerCommand::Wake)
    }

    /// Poll `fd` too; its readiness comes back as
    /// [`crate::DeviceEvent::Fd`]`(token)`. The device keeps `fd` open for
    /// as long as it is registered.
    pub fn add_fd(&self, fd: RawFd, token: u64) -> bool {
        self.send(WorkerCommand::DeviceFd(FdChange::Add(fd, token)))
    }

    /// Stop polling the fd registered with `token` (from
    /// [`crate::DeviceBackend::worker_fds`] or [`WorkerWaker::add_fd`])
    /// until [`WorkerWaker::resume_fd`].
    pub fn pause_fd(&self, token: u64) -> bool {
        self.send(WorkerCommand::DeviceFd(FdChange::Pause(token)))
    }

    /// Poll the fd registered with `token` again.
    pub fn resume_fd(&self, token: u64) -> bool {
        self.send(WorkerCommand::DeviceFd(FdChange::Resume(token)))
    }

    /// Stop polling the fd registered with `token` and forget it.
    pub fn remove_fd(&self, token: u64) -> bool {
        self.send(WorkerCommand::DeviceFd(FdChange::Remove(token)))
    }

    fn send(&self, cmd: WorkerCommand) -> bool {
        self.commands.send(cmd).is_ok() && self.wake.write(1).is_ok()
    }
}
