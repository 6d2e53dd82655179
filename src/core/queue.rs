// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-queue configuration held by the control core while a queue is not
//! owned by a worker.

use vmm_sys_util::eventfd::EventFd;

use crate::vring::{NotifierSlot, VringState};

/// Everything the control core knows about one queue.
#[derive(Debug, Default)]
pub(crate) struct QueueSlot {
    /// Configured state; next_avail/next_used are exact when not running.
    pub(crate) state: VringState,
    /// Whether the ring addresses were given.
    pub(crate) addresses_set: bool,
    /// The kick eventfd (the queue is "started" when present).
    pub(crate) kick: Option<EventFd>,
    /// The call notifier, shared with the running vring.
    pub(crate) call: NotifierSlot,
    /// The err notifier, shared with the running vring.
    pub(crate) err: NotifierSlot,
    /// Whether the queue is handed to its worker.
    pub(crate) running: bool,
    /// Heads to submit again when the queue next starts (from a snapshot).
    pub(crate) resubmit: Vec<u16>,
}
