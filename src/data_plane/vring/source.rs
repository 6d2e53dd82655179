// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The one batch loop, and the three places a batch takes its chains from.
//!
//! A batch picks its [`ChainSource`] once: `virtio-queue` walking the
//! chains a previous backend left in flight or the guest's rings
//! ([`QueueSource`]), or the rings mapped straight from guest memory
//! ([`MappedSource`]). [`take_batch`] is the only loop over available
//! chains, and the only place in-flight tracking happens for a batch.

use super::*;

/// The `VringError` of queue `index` for a `virtio-queue` error.
pub(super) fn queue_error(index: u16) -> impl Fn(virtio_queue::Error) -> VringError {
    move |source| VringError::Queue { index, source }
}

/// Where a batch takes chains from and puts them back as used.
pub(super) trait ChainSource<'m> {
    /// What the device's closure is handed for each chain.
    type Item;

    /// The next available chain, its position taken from `queue`.
    fn next(&mut self, queue: &mut Queue) -> Result<Option<Self::Item>, virtio_queue::Error>;

    /// The head index of `item`.
    fn head(item: &Self::Item) -> u16;

    /// Put `head` on `queue`'s used ring with `len` bytes written.
    fn push_used(
        &mut self,
        queue: &mut Queue,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error>;
}

/// Why a batch ended early.
pub(super) enum BatchStop {
    /// A ring access failed.
    Queue(virtio_queue::Error),
    /// The device could not complete chain `head` honestly.
    NeedsReset(u16),
}

impl From<virtio_queue::Error> for BatchStop {
    fn from(e: virtio_queue::Error) -> Self {
        BatchStop::Queue(e)
    }
}

/// Hand up to `limit` chains from `source` to `f`, putting each on the used
/// ring as `f` completes it, with in-flight tracking around every chain:
/// `begin` before the device sees it, `pre_complete` before the used entry
/// is written, `post_complete` after. Returns how many were completed.
pub(super) fn take_batch<'m, S, F>(
    queue: &mut Queue,
    inflight: &mut Option<InflightQueue>,
    source: &mut S,
    limit: usize,
    f: &mut F,
) -> Result<usize, BatchStop>
where
    S: ChainSource<'m>,
    F: FnMut(S::Item) -> Completion,
{
    let mut done = 0;
    while done < limit {
        let Some(item) = source.next(queue)? else {
            break;
        };
        let head = S::head(&item);
        if let Some(inflight) = inflight.as_mut() {
            inflight.begin(head);
        }
        let Completion::Used(len) = f(item) else {
            return Err(BatchStop::NeedsReset(head));
        };
        if let Some(inflight) = inflight.as_mut() {
            inflight.pre_complete(head);
        }
        source.push_used(queue, head, len)?;
        if let Some(inflight) = inflight.as_mut() {
            inflight.post_complete(head, queue.next_used());
        }
        done += 1;
    }
    Ok(done)
}

/// `virtio-queue` walks the rings: the guest's own, or (resubmitting after
/// a restart) a private available ring listing the heads a previous backend
/// left in flight, read in `mem` (guest memory with the private ring's
/// region added). Completions always go to the guest's used ring, in
/// `guest`.
pub(super) struct QueueSource<'m> {
    pub(super) private: Option<&'m mut Queue>,
    pub(super) mem: &'m GuestMemoryLog,
    pub(super) guest: &'m GuestMemoryLog,
}

impl<'m> QueueSource<'m> {
    /// New chains from the guest's own rings in `guest`.
    pub(super) fn guest(guest: &'m GuestMemoryLog) -> Self {
        QueueSource {
            private: None,
            mem: guest,
            guest,
        }
    }
}

impl<'m> ChainSource<'m> for QueueSource<'m> {
    type Item = DescriptorChain<&'m GuestMemoryLog>;

    fn next(&mut self, queue: &mut Queue) -> Result<Option<Self::Item>, virtio_queue::Error> {
        let walked = match self.private.as_deref_mut() {
            Some(private) => private,
            None => queue,
        };
        Ok(walked.iter(self.mem)?.next())
    }

    fn head(item: &Self::Item) -> u16 {
        item.head_index()
    }

    fn push_used(
        &mut self,
        queue: &mut Queue,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        queue.add_used(self.guest, head, len)
    }
}

/// The available and used rings mapped once for the batch: a head costs a
/// load, a used entry two stores. The queue's indexes follow every step.
pub(super) struct MappedSource<'m> {
    rings: RingMap<'m>,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    avail_idx: Wrapping<u16>,
}

impl<'m> MappedSource<'m> {
    /// The mapped view of `queue`'s rings, if both lie inside one memory
    /// region each (`Ok(None)` otherwise: take the `virtio-queue` path).
    pub(super) fn new(
        mem: &'m GuestMemoryLog,
        queue: &Queue,
    ) -> Result<Option<Self>, virtio_queue::Error> {
        let Some(rings) = RingMap::new(mem, queue) else {
            return Ok(None);
        };
        if !queue.ready() || queue.avail_ring() == 0 {
            return Err(virtio_queue::Error::QueueNotReady);
        }
        let next_avail = Wrapping(queue.next_avail());
        let avail_idx = rings.avail_idx(next_avail)?;
        Ok(Some(MappedSource {
            rings,
            next_avail,
            next_used: Wrapping(queue.next_used()),
            avail_idx,
        }))
    }
}

// Inlined (with `RingMap`'s accessors) into `take_batch`, which is
// instantiated in the device's crate for the device's closure.
impl<'m> ChainSource<'m> for MappedSource<'m> {
    type Item = u16;

    #[inline]
    fn next(&mut self, queue: &mut Queue) -> Result<Option<u16>, virtio_queue::Error> {
        if self.next_avail == self.avail_idx {
            // Caught up with the index read last: read it again once.
            self.avail_idx = self.rings.avail_idx(self.next_avail)?;
            if self.next_avail == self.avail_idx {
                return Ok(None);
            }
        }
        let head = self.rings.avail_head(self.next_avail);
        self.next_avail += Wrapping(1);
        queue.set_next_avail(self.next_avail.0);
        Ok(Some(head))
    }

    #[inline]
    fn head(item: &u16) -> u16 {
        *item
    }

    #[inline]
    fn push_used(
        &mut self,
        queue: &mut Queue,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        self.rings.push_used(self.next_used, head, len)?;
        self.next_used += Wrapping(1);
        queue.set_next_used(self.next_used.0);
        Ok(())
    }
}
