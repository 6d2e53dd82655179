// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Taking chains from the available ring, one at a time or in bounded
//! batches, with in-flight tracking.

use super::*;

impl Vring {
    /// Pop the next available descriptor chain, if any.
    ///
    /// An available index that runs more than a queue size ahead is a
    /// driver error reported as `Err`; the queue is then broken until reset.
    pub fn pop_chain(&mut self) -> Result<Option<Chain>, VringError> {
        let index = self.index;
        if self.needs_reset {
            return Ok(None);
        }
        if let Some(resubmit) = &mut self.resubmit {
            let mem = resubmit.mem.memory();
            let next = resubmit
                .queue
                .iter(mem)
                .map_err(|source| VringError::Queue { index, source })?
                .next();
            match next {
                Some(chain) => {
                    if let Some(inflight) = &mut self.inflight {
                        inflight.begin(chain.head_index());
                    }
                    return Ok(Some(chain));
                }
                None => self.resubmit = None,
            }
        }
        let mem = self.mem.memory();
        let chain = self
            .queue
            .iter(mem)
            .map_err(|source| VringError::Queue { index, source })?
            .next();
        if let (Some(inflight), Some(chain)) = (&mut self.inflight, &chain) {
            inflight.begin(chain.head_index());
        }
        Ok(chain)
    }

    /// Process every available chain with `f`, which returns the used
    /// length of each; the chains are put on the used ring as they complete.
    /// Returns how many were processed.
    ///
    /// The batch form of [`Vring::pop_chain`] + [`Vring::add_used`]: guest
    /// memory is loaded once per batch and chains borrow it, so the hot
    /// path touches no reference count per request. In-flight tracking and
    /// resubmission after a restart apply as with `pop_chain`.
    ///
    /// `f` returns the used length (or any [`Completion`]); a
    /// [`Completion::NeedsReset`] ends the batch with
    /// [`VringError::NeedsReset`].
    pub fn process_available<F, R>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: FnMut(DescriptorChain<&GuestMemoryLog>) -> R,
        R: Into<Completion>,
    {
        self.drain_available(|chain, _| f(chain).into())
    }

    /// [`Vring::process_available`], handing `f` a [`DescIter`] instead of
    /// a `virtio-queue` chain: the same descriptors under the same rules
    /// (loop limit, indirect tables, 4 GiB cap), but the descriptor table is
    /// mapped once per batch, so reading a descriptor costs a bounds check
    /// and a load instead of a guest-memory lookup. The available and used
    /// rings are mapped once per batch too (when each lies inside one memory
    /// region; otherwise, and while resubmitting, `virtio-queue` reads and
    /// writes them).
    pub fn process_available_descs<F, R>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: FnMut(DescIter<'_>) -> R,
        R: Into<Completion>,
    {
        if self.needs_reset {
            return Ok(0);
        }
        let guard = self.mem.memory();
        let mem: &GuestMemoryLog = &guard;
        let rings = match RingMap::new(mem, &self.queue) {
            Some(rings) if self.resubmit.is_none() => rings,
            _ => {
                return self
                    .drain_available(|chain, table| f(table.chain(chain.head_index())).into())
            }
        };
        let index = self.index;
        let qerr = |source| VringError::Queue { index, source };
        if !self.queue.ready() || self.queue.avail_ring() == 0 {
            return Err(qerr(virtio_queue::Error::QueueNotReady));
        }
        let table = DescTable::new(mem, &self.queue);
        let mut next_avail = Wrapping(self.queue.next_avail());
        let mut next_used = Wrapping(self.queue.next_used());
        let mut avail_idx = rings.avail_idx(next_avail).map_err(qerr)?;
        let limit = self.batch_limit();
        let mut done = 0;
        while done < limit {
            if next_avail == avail_idx {
                avail_idx = rings.avail_idx(next_avail).map_err(qerr)?;
                if next_avail == avail_idx {
                    break;
                }
            }
            let head = rings.avail_head(next_avail);
            next_avail += Wrapping(1);
            self.queue.set_next_avail(next_avail.0);
            if let Some(inflight) = &mut self.inflight {
                inflight.begin(head);
            }
            let Completion::Used(len) = f(table.chain(head)).into() else {
                return Err(self.stop_for_reset(head));
            };
            if let Some(inflight) = &mut self.inflight {
                inflight.pre_complete(head);
            }
            rings.push_used(next_used, head, len).map_err(qerr)?;
            next_used += Wrapping(1);
            self.queue.set_next_used(next_used.0);
            if let Some(inflight) = &mut self.inflight {
                inflight.post_complete(head, next_used.0);
            }
            done += 1;
        }
        Ok(done)
    }

    pub(super) fn drain_available<F>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: for<'m> FnMut(DescriptorChain<&'m GuestMemoryLog>, &'m DescTable<'m>) -> Completion,
    {
        let index = self.index;
        let mut done = 0;
        if self.needs_reset {
            return Ok(0);
        }
        if let Some(resubmit) = self.resubmit.take() {
            let guard = resubmit.mem.memory();
            let mut queue = resubmit.queue;
            let table = DescTable::new(&guard, &queue);
            loop {
                let next = queue
                    .iter(&*guard)
                    .map_err(|source| VringError::Queue { index, source })?
                    .next();
                let Some(chain) = next else { break };
                let head = chain.head_index();
                if let Some(inflight) = &mut self.inflight {
                    inflight.begin(head);
                }
                let Completion::Used(len) = f(chain, &table) else {
                    return Err(self.stop_for_reset(head));
                };
                self.add_used(head, len)?;
                done += 1;
            }
        }
        let guard = self.mem.memory();
        let mem: &GuestMemoryLog = &guard;
        let table = DescTable::new(mem, &self.queue);
        let limit = self.batch_limit();
        while done < limit {
            let next = self
                .queue
                .iter(mem)
                .map_err(|source| VringError::Queue { index, source })?
                .next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            if let Some(inflight) = &mut self.inflight {
                inflight.begin(head);
                let Completion::Used(len) = f(chain, &table) else {
                    return Err(self.stop_for_reset(head));
                };
                inflight.pre_complete(head);
                self.queue
                    .add_used(mem, head, len)
                    .map_err(|source| VringError::Queue { index, source })?;
                inflight.post_complete(head, self.queue.next_used());
            } else {
                let Completion::Used(len) = f(chain, &table) else {
                    return Err(self.stop_for_reset(head));
                };
                self.queue
                    .add_used(mem, head, len)
                    .map_err(|source| VringError::Queue { index, source })?;
            }
            done += 1;
        }
        Ok(done)
    }
}
