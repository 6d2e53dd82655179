// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Taking chains from the available ring: one at a time (`pop_chain`), or
//! in bounded batches through the one loop of `source.rs`.

use super::source::{queue_error, take_batch, BatchStop, ChainSource, MappedSource, QueueSource};
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
            let next = resubmit.queue.iter(mem).map_err(queue_error(index))?.next();
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
        let chain = self.queue.iter(mem).map_err(queue_error(index))?.next();
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
        if self.needs_reset {
            return Ok(0);
        }
        let done = self.resubmit_phase(|chain, _| f(chain).into())?;
        let rest = self.batch_limit().saturating_sub(done);
        Ok(done + self.queue_phase(rest, |chain, _| f(chain).into())?)
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
        let done = self.resubmit_phase(|chain, table| f(table.chain(chain.head_index())).into())?;
        let rest = self.batch_limit().saturating_sub(done);
        let more = match self.mapped_phase(rest, |descs| f(descs).into())? {
            Some(n) => n,
            None => self.queue_phase(rest, |chain, table| {
                f(table.chain(chain.head_index())).into()
            })?,
        };
        Ok(done + more)
    }

    /// The chains a previous backend left in flight, all of them (at most a
    /// queue size), before any new one.
    fn resubmit_phase<F>(&mut self, mut f: F) -> Result<usize, VringError>
    where
        F: for<'m> FnMut(DescriptorChain<&'m GuestMemoryLog>, &'m DescTable<'m>) -> Completion,
    {
        let Some(mut resubmit) = self.resubmit.take() else {
            return Ok(0);
        };
        let result = {
            let mem = resubmit.mem.memory();
            let guest = self.mem.memory();
            let table = DescTable::new(&mem, &resubmit.queue);
            let source = QueueSource {
                private: Some(&mut resubmit.queue),
                mem: &mem,
                guest: &guest,
            };
            self.batch(source, usize::MAX, |chain| f(chain, &table))
        };
        self.end_batch(result)
    }

    /// Up to `limit` new chains through `virtio-queue`.
    fn queue_phase<F>(&mut self, limit: usize, mut f: F) -> Result<usize, VringError>
    where
        F: for<'m> FnMut(DescriptorChain<&'m GuestMemoryLog>, &'m DescTable<'m>) -> Completion,
    {
        let result = {
            let guard = self.mem.memory();
            let table = DescTable::new(&guard, &self.queue);
            self.batch(QueueSource::guest(&guard), limit, |chain| f(chain, &table))
        };
        self.end_batch(result)
    }

    /// [`take_batch`] on this vring's queue and in-flight tracking.
    fn batch<'m, S: ChainSource<'m>>(
        &mut self,
        mut source: S,
        limit: usize,
        mut f: impl FnMut(S::Item) -> Completion,
    ) -> Result<usize, BatchStop> {
        take_batch(
            &mut self.queue,
            &mut self.inflight,
            &mut source,
            limit,
            &mut f,
        )
    }

    /// Up to `limit` new chains through the mapped rings; `None` when the
    /// rings cannot be mapped (the caller takes the `virtio-queue` path).
    fn mapped_phase<F>(&mut self, limit: usize, mut f: F) -> Result<Option<usize>, VringError>
    where
        F: FnMut(DescIter<'_>) -> Completion,
    {
        let result = {
            let guard = self.mem.memory();
            let mem: &GuestMemoryLog = &guard;
            match MappedSource::new(mem, &self.queue) {
                Ok(None) => return Ok(None),
                Err(e) => Err(BatchStop::Queue(e)),
                Ok(Some(source)) => {
                    let table = DescTable::new(mem, &self.queue);
                    self.batch(source, limit, |head| f(table.chain(head)))
                }
            }
        };
        self.end_batch(result).map(Some)
    }

    /// A batch's count, or the error that ended it (a chain the device
    /// cannot complete stops the ring until reset).
    fn end_batch(&mut self, result: Result<usize, BatchStop>) -> Result<usize, VringError> {
        match result {
            Ok(done) => Ok(done),
            Err(BatchStop::Queue(source)) => Err(queue_error(self.index)(source)),
            Err(BatchStop::NeedsReset(head)) => Err(self.stop_for_reset(head)),
        }
    }
}
