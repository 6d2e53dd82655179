// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! In-flight request tracking in shared memory, so that a backend process
//! that dies mid-I/O can be restarted without losing a request.
//!
//! The layout is the one vhost-user frontends (QEMU, libvhost-user, DPDK)
//! share for split virtqueues (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): per
//! queue a 16-byte header (`features: u64, version: u16, desc_num: u16,
//! last_batch_head: u16, used_idx: u16`) followed by one 16-byte record per
//! descriptor (`inflight: u8, padding: [u8; 5], next: u16, counter: u64`),
//! each queue's area rounded up to 64 bytes. The frontend keeps the memfd
//! across backend restarts and hands it to the new backend
//! (`SET_INFLIGHT_FD`).
//!
//! A request is marked in flight when its chain is popped, and cleared once
//! its used entry is published. After a restart, the heads still marked are
//! resubmitted in the order they were first popped.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::shared_mapping::SharedMapping;

/// Format version written in each queue header.
pub const INFLIGHT_VERSION: u16 = 1;
const HEADER_SIZE: usize = 16;
const DESC_SIZE: usize = 16;
const QUEUE_ALIGN: usize = 64;
/// Largest queue size accepted for an in-flight area.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Errors creating or mapping an in-flight area.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size out of range.
    #[error("invalid in-flight geometry: {num_queues} queues of {queue_size}")]
    Geometry {
        /// Number of queues.
        num_queues: u16,
        /// Queue size.
        queue_size: u16,
    },
    /// The area the frontend gave is smaller than the geometry needs.
    #[error("in-flight area of {actual} bytes is smaller than the {needed} needed")]
    TooSmall {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        actual: u64,
    },
    /// A system call failed.
    #[error("in-flight area: {what}")]
    Os {
        /// Which call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Bytes one queue of `queue_size` descriptors takes.
pub fn queue_area_size(queue_size: u16) -> usize {
    let raw = HEADER_SIZE + DESC_SIZE * usize::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// A mapped in-flight area for all queues of a device.
#[derive(Debug)]
pub struct InflightArea {
    file: File,
    map: SharedMapping,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// Allocate a fresh, zeroed area in a new memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let len = queue_area_size(queue_size) * usize::from(num_queues);
        // SAFETY: memfd_create with a valid NUL-terminated name; the
        // result is checked and then owned by a File.
        let fd = unsafe {
            libc::memfd_create(
                c"vbk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .map_err(|source| InflightError::Os {
                what: "ftruncate",
                source,
            })?;
        // The frontend gets this fd: it must not be able to shrink the area
        // under our mapping (a SIGBUS on the next access).
        // SAFETY: fcntl on an fd we own; F_ADD_SEALS only restricts it.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
            return Err(os("F_ADD_SEALS"));
        }
        let area = Self::map(file, len, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            area.queue_header(q, |h| {
                h.version.store(INFLIGHT_VERSION, Ordering::Relaxed);
                h.desc_num.store(queue_size, Ordering::Relaxed);
            });
        }
        Ok(area)
    }

    /// Map an area the frontend handed back (SET_INFLIGHT_FD). The contents
    /// are untrusted: every index read from it is bounds-checked.
    pub fn from_file(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size)?;
        let needed = (queue_area_size(queue_size) * usize::from(num_queues)) as u64;
        let file_len = file
            .metadata()
            .map_err(|source| InflightError::Os {
                what: "fstat",
                source,
            })?
            .len();
        let actual = mmap_size.min(file_len.saturating_sub(mmap_offset));
        if actual < needed {
            return Err(InflightError::TooSmall { needed, actual });
        }
        Self::map(file, needed as usize, mmap_offset, num_queues, queue_size)
    }

    fn map(
        file: File,
        len: usize,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let map = SharedMapping::new(&file, len, offset).map_err(|source| InflightError::Os {
            what: "mmap",
            source,
        })?;
        Ok(InflightArea {
            file,
            map,
            num_queues,
            queue_size,
        })
    }

    /// The memfd, to send to the frontend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the area is empty (never: geometry is checked).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_base(&self, q: u16) -> *mut u8 {
        // SAFETY: q < num_queues is checked by every caller, so the offset
        // lies inside the mapping.
        unsafe {
            self.map
                .as_ptr()
                .add(queue_area_size(self.queue_size) * usize::from(q))
        }
    }

    fn queue_header<R>(&self, q: u16, f: impl FnOnce(&Header) -> R) -> R {
        // SAFETY: the header is 16 bytes at a 64-byte aligned offset inside
        // the mapping; all its fields are accessed atomically.
        let h = unsafe { &*(self.queue_base(q) as *const Header) };
        f(h)
    }

    /// The tracker for queue `q`, if it exists.
    pub fn queue(self: &Arc<Self>, q: u16) -> Option<InflightQueue> {
        (q < self.num_queues).then(|| InflightQueue {
            area: self.clone(),
            index: q,
            counter: 0,
        })
    }
}

fn os(what: &'static str) -> InflightError {
    InflightError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0
        || queue_size == 0
        || queue_size > MAX_QUEUE_SIZE
        || !queue_size.is_power_of_two()
    {
        return Err(InflightError::Geometry {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

#[repr(C)]
struct Header {
    features: AtomicU64,
    version: AtomicU16,
    desc_num: AtomicU16,
    last_batch_head: AtomicU16,
    used_idx: AtomicU16,
}

#[repr(C)]
struct DescState {
    inflight: AtomicU8,
    _padding: [u8; 5],
    next: AtomicU16,
    counter: AtomicU64,
}

/// What recovery found in a queue's area.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads still in flight, oldest first.
    pub resubmit: Vec<u16>,
}

/// In-flight tracking for one queue.
#[derive(Debug)]
pub struct InflightQueue {
    area: Arc<InflightArea>,
    index: u16,
    counter: u64,
}

impl InflightQueue {
    fn desc(&self, head: u16) -> Option<&DescState> {
        if head >= self.area.queue_size {
            return None;
        }
        let base = self.area.queue_base(self.index);
        // SAFETY: head < queue_size, so the 16-byte record lies inside this
        // queue's area; records are 16-byte aligned and accessed atomically.
        Some(unsafe {
            &*(base.add(HEADER_SIZE + DESC_SIZE * usize::from(head)) as *const DescState)
        })
    }

    /// A chain with head `head` was popped.
    pub fn begin(&mut self, head: u16) {
        let counter = self.counter;
        if let Some(d) = self.desc(head) {
            d.counter.store(counter, Ordering::Relaxed);
            d.inflight.store(1, Ordering::Release);
            // Never near the end: `recover` renumbers from 0.
            self.counter = self.counter.wrapping_add(1);
        }
    }

    /// About to publish the used entry for `head`.
    pub fn pre_complete(&self, head: u16) {
        self.area.queue_header(self.index, |h| {
            h.last_batch_head.store(head, Ordering::Release)
        });
    }

    /// The used entry for `head` is published and the used index is now
    /// `used_idx`.
    pub fn post_complete(&self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            d.inflight.store(0, Ordering::Release);
        }
        self.area.queue_header(self.index, |h| {
            h.used_idx.store(used_idx, Ordering::Release)
        });
    }

    /// After a restart: reconcile with the used index the driver sees and
    /// list the heads to resubmit, oldest first.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovered {
        let (version, recorded_used, last_head) = self.area.queue_header(self.index, |h| {
            (
                h.version.load(Ordering::Acquire),
                h.used_idx.load(Ordering::Acquire),
                h.last_batch_head.load(Ordering::Acquire),
            )
        });
        if version == 0 {
            // Never used: stamp it.
            self.area.queue_header(self.index, |h| {
                h.version.store(INFLIGHT_VERSION, Ordering::Release);
                h.desc_num.store(self.area.queue_size, Ordering::Release);
            });
            return Recovered::default();
        }
        if recorded_used != ring_used_idx {
            // We died after publishing the used index but before clearing
            // the last completed head's flag.
            if let Some(d) = self.desc(last_head) {
                d.inflight.store(0, Ordering::Release);
            }
            self.area.queue_header(self.index, |h| {
                h.used_idx.store(ring_used_idx, Ordering::Release)
            });
        }
        let mut heads: Vec<(u64, u16)> = (0..self.area.queue_size)
            .filter_map(|h| {
                let d = self.desc(h)?;
                (d.inflight.load(Ordering::Acquire) == 1)
                    .then(|| (d.counter.load(Ordering::Acquire), h))
            })
            .collect();
        heads.sort_unstable();
        // The counters came from the area, which the frontend can write:
        // renumber the survivors 0.. in their order, so that new requests
        // count on from there and no counter is near the end of its range
        // (a counter of u64::MAX would wrap, and the next recovery would
        // put new requests before old ones).
        for (order, (_, head)) in heads.iter().enumerate() {
            if let Some(d) = self.desc(*head) {
                d.counter.store(order as u64, Ordering::Release);
            }
        }
        self.counter = heads.len() as u64;
        Recovered {
            resubmit: heads.into_iter().map(|(_, h)| h).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_and_recovers_in_pop_order() {
        let area = Arc::new(InflightArea::create(2, 8).unwrap());
        assert_eq!(area.len(), 2 * queue_area_size(8));
        let mut q = area.queue(1).unwrap();
        for head in [5, 2, 7] {
            q.begin(head);
        }
        q.pre_complete(2);
        q.post_complete(2, 1);
        // A new process maps the same memfd.
        let file = area.file().try_clone().unwrap();
        let again = Arc::new(InflightArea::from_file(file, area.len() as u64, 0, 2, 8).unwrap());
        let mut q2 = again.queue(1).unwrap();
        assert_eq!(q2.recover(1).resubmit, vec![5, 7]);
        assert!(again.queue(0).unwrap().recover(0).resubmit.is_empty());
        assert!(again.queue(2).is_none());
    }

    #[test]
    fn crash_between_used_index_and_flag_clear_is_repaired() {
        let area = Arc::new(InflightArea::create(1, 4).unwrap());
        let mut q = area.queue(0).unwrap();
        q.begin(1);
        q.begin(3);
        q.pre_complete(3);
        // Died here: the driver already sees used index 1.
        assert_eq!(q.recover(1).resubmit, vec![1]);
    }

    /// Counters are the frontend's to write: huge ones neither overflow
    /// nor reorder the requests that follow (found by the inflight fuzz
    /// target: a counter of u64::MAX overflowed in `recover`).
    #[test]
    fn counters_at_the_end_of_their_range_are_renumbered() {
        let area = Arc::new(InflightArea::create(1, 4).unwrap());
        let mut q = area.queue(0).unwrap();
        q.begin(2);
        q.begin(0);
        // A hostile area: head 2 last-but-one, head 0 at the very end.
        q.desc(2)
            .unwrap()
            .counter
            .store(u64::MAX - 1, Ordering::Release);
        q.desc(0)
            .unwrap()
            .counter
            .store(u64::MAX, Ordering::Release);
        let mut q = area.queue(0).unwrap();
        assert_eq!(q.recover(0).resubmit, vec![2, 0]);
        // A new request comes after the resubmitted ones, also at the next
        // restart.
        q.begin(3);
        let mut again = area.queue(0).unwrap();
        assert_eq!(again.recover(0).resubmit, vec![2, 0, 3]);
    }

    #[test]
    fn bad_geometry_and_short_files_are_refused() {
        assert!(InflightArea::create(0, 8).is_err());
        assert!(InflightArea::create(1, 6).is_err());
        let area = InflightArea::create(1, 8).unwrap();
        let file = area.file().try_clone().unwrap();
        assert!(matches!(
            InflightArea::from_file(file, area.len() as u64, 0, 4, 8),
            Err(InflightError::TooSmall { .. })
        ));
    }
}
