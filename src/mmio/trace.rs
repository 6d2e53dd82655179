// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a transport can tell about a queue that seems stuck.
//!
//! A stalled disk shows up in the guest as a request that never completes,
//! and nothing in the logs. To tell "the device never completed it" from
//! "it completed and the interrupt was lost" the transport keeps, per queue,
//! an [`InterruptTrace`]: how many used-buffer interrupts it raised, how
//! many of those failed, and the used index in guest memory when the last
//! one was raised. [`MmioTransport::diagnostics`] puts that beside what
//! guest memory says now (avail and used indexes, the EVENT_IDX fields) and
//! the InterruptStatus register.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress};

use super::MmioTransport;
use crate::memory::GuestMemoryLog;

/// No interrupt raised yet (a value a 16-bit index never takes).
const NONE: u32 = u32::MAX;

/// Counters of one queue's used-buffer interrupts, shared between the
/// transport and the queue's [`Notifier`](crate::vring::Notifier).
#[derive(Debug)]
pub struct InterruptTrace {
    memory: GuestMemoryLog,
    used_idx: GuestAddress,
    raised: AtomicU64,
    failed: AtomicU64,
    last_used: AtomicU32,
}

impl InterruptTrace {
    /// A trace for the queue whose used ring is at `used_ring` in `memory`.
    pub fn new(memory: GuestMemoryLog, used_ring: u64) -> Self {
        InterruptTrace {
            memory,
            used_idx: GuestAddress(used_ring.wrapping_add(2)),
            raised: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_used: AtomicU32::new(NONE),
        }
    }

    /// Called by the notifier as it raises the interrupt.
    pub(crate) fn raising(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Ok(idx) = self.memory.read_obj::<u16>(self.used_idx) {
            self.last_used.store(u32::from(idx), Ordering::Relaxed);
        }
    }

    /// Called by the notifier when writing the interrupt eventfd failed.
    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One queue as the transport and guest memory see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueDiagnostics {
    /// Queue index.
    pub index: u16,
    /// QueueReady as the driver set it.
    pub ready: bool,
    /// Queue size.
    pub size: u16,
    /// `avail->idx` in guest memory (what the driver published).
    pub avail_idx: Option<u16>,
    /// `used->idx` in guest memory (what the device completed).
    pub used_idx: Option<u16>,
    /// `avail->used_event` (EVENT_IDX: the driver wants an interrupt once
    /// the used index passes it).
    pub used_event: Option<u16>,
    /// `used->avail_event` (EVENT_IDX: the device wants a kick once the
    /// avail index passes it).
    pub avail_event: Option<u16>,
    /// Used-buffer interrupts raised since activation.
    pub interrupts: u64,
    /// Interrupts whose eventfd write failed.
    pub interrupt_errors: u64,
    /// `used->idx` when the last interrupt was raised.
    pub last_interrupt_used_idx: Option<u16>,
}

/// A transport's state for a stall report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportDiagnostics {
    /// The device status register.
    pub status: u32,
    /// The InterruptStatus register.
    pub interrupt_status: u32,
    /// Whether the device was activated (DRIVER_OK accepted).
    pub activated: bool,
    /// Per queue.
    pub queues: Vec<QueueDiagnostics>,
    /// What the device behind the transport adds (a vhost-user adapter:
    /// connection state and relay counters).
    pub device: Option<String>,
}

fn opt(v: Option<u16>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

impl fmt::Display for TransportDiagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status={:#x} interrupt_status={:#x} activated={}",
            self.status, self.interrupt_status, self.activated
        )?;
        for q in &self.queues {
            write!(
                f,
                "; q{} ready={} size={} avail={} used={} used_event={} avail_event={} \
                 irqs={} irq_errors={} last_irq_used={}",
                q.index,
                q.ready,
                q.size,
                opt(q.avail_idx),
                opt(q.used_idx),
                opt(q.used_event),
                opt(q.avail_event),
                q.interrupts,
                q.interrupt_errors,
                opt(q.last_interrupt_used_idx),
            )?;
        }
        if let Some(d) = &self.device {
            write!(f, "; device: {d}")?;
        }
        Ok(())
    }
}

impl MmioTransport {
    /// Everything the transport knows about its queues, read now.
    pub fn diagnostics(&self) -> TransportDiagnostics {
        let read = |addr: u64| self.memory.read_obj::<u16>(GuestAddress(addr)).ok();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let size = u64::from(q.size);
                let trace = self.traces.get(i).and_then(|t| t.as_ref());
                let in_memory = q.ready && q.size != 0;
                QueueDiagnostics {
                    index: i as u16,
                    ready: q.ready,
                    size: q.size,
                    avail_idx: in_memory.then(|| read(q.avail + 2)).flatten(),
                    used_idx: in_memory.then(|| read(q.used + 2)).flatten(),
                    used_event: in_memory.then(|| read(q.avail + 4 + 2 * size)).flatten(),
                    avail_event: in_memory.then(|| read(q.used + 4 + 8 * size)).flatten(),
                    interrupts: trace.map_or(0, |t| t.raised.load(Ordering::Relaxed)),
                    interrupt_errors: trace.map_or(0, |t| t.failed.load(Ordering::Relaxed)),
                    last_interrupt_used_idx: trace.and_then(|t| {
                        let v = t.last_used.load(Ordering::Relaxed);
                        u16::try_from(v).ok()
                    }),
                }
            })
            .collect();
        TransportDiagnostics {
            status: self.status,
            interrupt_status: self.interrupt_status(),
            activated: self.activated,
            queues,
            device: self.device.diagnostics(),
        }
    }
}
