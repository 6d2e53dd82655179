// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The data plane as an `event-manager` subscriber, for VMMs that want a
//! device's queues served on their own event loop instead of on the kit's
//! worker threads.
//!
//! Control operations on the [`crate::core::DeviceCore`] (starting and stopping
//! queues) hand vrings to the subscriber through a channel and wait for the
//! loop to take them: call them from a thread other than the one running
//! the event loop (a vCPU or control thread, as VMMs usually do).

use std::os::fd::RawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::error;
use vmm_sys_util::epoll::EventSet;

use super::worker::{FdRegistry, Flow, WorkerLoop, TOKEN_DEVICE_BASE};
use crate::backend::DeviceBackend;

/// Data for device fds starts here (kick and control tokens stay below).
const DEVICE_DATA_BASE: u32 = 0x10_0000;

/// One queue group's data plane, to be added to an `EventManager`.
pub struct DataPlaneSubscriber<B: DeviceBackend> {
    worker: WorkerLoop<B>,
    /// The device's fd tokens, by slot: event-manager carries a u32, so a
    /// device fd is registered with `DEVICE_DATA_BASE + slot`.
    device_tokens: Vec<u64>,
    exited: bool,
}

impl<B: DeviceBackend> std::fmt::Debug for DataPlaneSubscriber<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneSubscriber")
            .field("device_fds", &self.device_tokens.len())
            .field("exited", &self.exited)
            .finish_non_exhaustive()
    }
}

impl<B: DeviceBackend> DataPlaneSubscriber<B> {
    pub(crate) fn new(worker: WorkerLoop<B>) -> Self {
        DataPlaneSubscriber {
            device_tokens: Vec::new(),
            worker,
            exited: false,
        }
    }
}

/// Translates the loop's u64 tokens to event-manager's u32 data.
struct OpsRegistry<'a, 'b> {
    ops: &'a mut EventOps<'b>,
    device_tokens: &'a mut Vec<u64>,
}

impl OpsRegistry<'_, '_> {
    fn data_of(&mut self, token: u64) -> u32 {
        if token >= TOKEN_DEVICE_BASE {
            let t = token - TOKEN_DEVICE_BASE;
            let slot = match self.device_tokens.iter().position(|dt| *dt == t) {
                Some(slot) => slot,
                None => {
                    // Fds a device adds at run time get a slot of their own
                    // (kept if removed, so a token always maps the same).
                    self.device_tokens.push(t);
                    self.device_tokens.len() - 1
                }
            };
            DEVICE_DATA_BASE + slot as u32
        } else {
            token as u32
        }
    }
}

impl FdRegistry for OpsRegistry<'_, '_> {
    fn add(&mut self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let data = self.data_of(token);
        self.ops
            .add(Events::with_data_raw(fd, data, EventSet::IN))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))
    }

    fn remove(&mut self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let data = self.data_of(token);
        self.ops
            .remove(Events::with_data_raw(fd, data, EventSet::IN))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))
    }
}

impl<B: DeviceBackend> MutEventSubscriber for DataPlaneSubscriber<B> {
    fn init(&mut self, ops: &mut EventOps) {
        let mut reg = OpsRegistry {
            ops,
            device_tokens: &mut self.device_tokens,
        };
        if let Err(e) = self.worker.register(&mut reg) {
            error!("data plane: cannot register its fds: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.exited {
            return;
        }
        let data = events.data();
        let token = if data >= DEVICE_DATA_BASE {
            match self.device_tokens.get((data - DEVICE_DATA_BASE) as usize) {
                Some(t) => TOKEN_DEVICE_BASE + t,
                None => return,
            }
        } else {
            u64::from(data)
        };
        let mut reg = OpsRegistry {
            ops,
            device_tokens: &mut self.device_tokens,
        };
        if self.worker.on_event(token, &mut reg) == Flow::Exit {
            self.exited = true;
        }
    }
}
