// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Random-read load: one or several queues kept `depth` requests deep for
//! a while, completions taken from the queues' completion eventfds.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkioq, Completion, ReqFlags};

use super::{reaped, wrap, BlkioClient, ClientError, RunStats};

impl BlkioClient {
    /// Random `block`-byte reads at queue depth `depth` on queue `q` for
    /// `duration`. Each in-flight request reads into its own buffer slot.
    pub fn random_reads(
        &mut self,
        q: usize,
        depth: usize,
        block: usize,
        duration: Duration,
    ) -> Result<RunStats, ClientError> {
        let mut run = self.random_run(
            depth,
            depth,
            block,
            duration,
            "depth * block exceeds the buffer",
        )?;
        run.issue_all(std::slice::from_mut(&mut self.queues[q]));
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        let mut in_flight = depth;
        while in_flight > 0 {
            let n = wrap("do_io", self.queues[q].do_io(&mut slots, 1, None, None))?;
            // SAFETY: do_io initialised the first `n` entries.
            let reaped = unsafe { reaped(&slots, n) };
            in_flight -= run.completed(&mut self.queues[q], reaped)?;
        }
        Ok(run.finish())
    }

    /// Check that `slots` buffer slots of `block` bytes fit the buffer
    /// region and the disk (`invalid` says why not), and set up a random
    /// read run over them, `depth` slots a queue, for `duration`.
    fn random_run(
        &self,
        slots: usize,
        depth: usize,
        block: usize,
        duration: Duration,
        invalid: &'static str,
    ) -> Result<RandomReadRun<impl FnMut() -> u64>, ClientError> {
        if depth == 0 || slots * block > self.region.len || self.capacity < block as u64 {
            return Err(ClientError::Invalid(invalid));
        }
        Ok(RandomReadRun {
            base: self.region.addr as *mut u8,
            block,
            depth,
            issued_at: vec![Instant::now(); slots],
            stats: RunStats::default(),
            next_offset: random_offsets(self.capacity, block),
            start: Instant::now(),
            duration,
            draining: false,
        })
    }
}

impl BlkioClient {
    /// Random `block`-byte reads on queues `0..num_queues` at queue depth
    /// `depth` on each, for `duration`, from this one thread.
    ///
    /// Completions are interrupt driven, as with [`BlkioClient::random_reads`]:
    /// every queue is drained without blocking, and only when none has
    /// anything does the thread arm the queues' completion eventfds and sleep
    /// in `poll(2)` on all of them. With one queue this is
    /// [`BlkioClient::random_reads`].
    pub fn random_reads_multi(
        &mut self,
        num_queues: usize,
        depth: usize,
        block: usize,
        duration: Duration,
    ) -> Result<RunStats, ClientError> {
        if num_queues == 1 {
            return self.random_reads(0, depth, block, duration);
        }
        if num_queues == 0 || num_queues > self.queues.len() {
            return Err(ClientError::Invalid("num_queues"));
        }
        let slots_total = num_queues * depth;
        let mut run = self.random_run(
            slots_total,
            depth,
            block,
            duration,
            "num_queues * depth * block exceeds the buffer",
        )?;
        let mut fds = self.completion_pollfds(num_queues)?;
        run.issue_all(&mut self.queues[..num_queues]);
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        let mut in_flight = vec![depth; num_queues];
        let mut total_in_flight = slots_total;
        let mut armed = false;
        while total_in_flight > 0 {
            let mut got = 0usize;
            for (q, queue_in_flight) in in_flight.iter_mut().enumerate() {
                if *queue_in_flight == 0 {
                    continue;
                }
                let n = wrap(
                    "do_io",
                    self.queues[q].do_io(&mut completions, 0, None, None),
                )?;
                got += n;
                // SAFETY: do_io initialised the first `n` entries.
                let reaped = unsafe { reaped(&completions, n) };
                let retired = run.completed(&mut self.queues[q], reaped)?;
                *queue_in_flight -= retired;
                total_in_flight -= retired;
            }
            if got > 0 {
                if armed {
                    self.set_completion_fds(num_queues, false);
                    armed = false;
                }
                continue;
            }
            if total_in_flight == 0 {
                break;
            }
            if !armed {
                // Arm the completion eventfds, then look once more before
                // sleeping so a completion that raced with arming is seen.
                self.set_completion_fds(num_queues, true);
                armed = true;
                continue;
            }
            sleep_on_completions(&mut fds)?;
        }
        if armed {
            self.set_completion_fds(num_queues, false);
        }
        Ok(run.finish())
    }

    /// Arm (`on`) or disarm the completion eventfds of the first
    /// `num_queues` queues.
    fn set_completion_fds(&mut self, num_queues: usize, on: bool) {
        for q in &mut self.queues[..num_queues] {
            q.set_completion_fd_enabled(on);
        }
    }

    /// A `pollfd` for the completion eventfd of each of the first
    /// `num_queues` queues.
    fn completion_pollfds(&self, num_queues: usize) -> Result<Vec<libc::pollfd>, ClientError> {
        self.queues[..num_queues]
            .iter()
            .map(|q| {
                let fd = q
                    .get_completion_fd()
                    .ok_or(ClientError::Invalid("queue has no completion fd"))?;
                Ok(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
            })
            .collect()
    }
}

/// One random-read run: `issued_at.len()` buffer slots of `block` bytes
/// in the buffer region at `base`, `depth` of them a queue (slot `s` is
/// queue `s / depth`'s), each re-issued as it completes until `duration`
/// has passed, then drained.
struct RandomReadRun<F> {
    /// The buffer region; [`BlkioClient::random_run`] checked that every
    /// slot fits it.
    base: *mut u8,
    block: usize,
    depth: usize,
    /// When each slot's request was issued.
    issued_at: Vec<Instant>,
    stats: RunStats,
    next_offset: F,
    /// When the first requests were all issued.
    start: Instant,
    duration: Duration,
    /// Whether the run is over and completions are no longer re-issued.
    draining: bool,
}

impl<F: FnMut() -> u64> RandomReadRun<F> {
    /// Issue slot `slot`'s next read on `queue`.
    fn issue(&mut self, queue: &mut Blkioq, slot: usize) {
        self.issued_at[slot] = Instant::now();
        // SAFETY: `slot < issued_at.len()` (the index above checked it), and
        // every one of those slots fits the region (`random_run` checked
        // `slots * block <= region.len`).
        let buf = unsafe { self.base.add(slot * self.block) };
        queue.read(
            (self.next_offset)(),
            buf,
            self.block,
            slot,
            ReqFlags::empty(),
        );
    }

    /// Issue every slot on its queue (`queues[slot / depth]`), and start
    /// the clock.
    fn issue_all(&mut self, queues: &mut [Blkioq]) {
        for slot in 0..self.issued_at.len() {
            self.issue(&mut queues[slot / self.depth], slot);
        }
        self.start = Instant::now();
    }

    /// Account for `completions`, just reaped from `queue`: re-issue each
    /// slot, or once `duration` has passed retire it. Returns how many
    /// slots were retired.
    fn completed(
        &mut self,
        queue: &mut Blkioq,
        completions: impl Iterator<Item = Completion>,
    ) -> Result<usize, ClientError> {
        let now = Instant::now();
        if !self.draining && now.duration_since(self.start) >= self.duration {
            self.draining = true;
        }
        let mut retired = 0;
        for c in completions {
            BlkioClient::check("read", 0, &c)?;
            let slot = c.user_data;
            self.stats.requests += 1;
            if self.stats.requests.is_multiple_of(16) || self.stats.latencies_ns.len() < 4096 {
                self.stats
                    .latencies_ns
                    .push(now.duration_since(self.issued_at[slot]).as_nanos() as u64);
            }
            if self.draining {
                retired += 1;
            } else {
                self.issue(queue, slot);
            }
        }
        Ok(retired)
    }

    /// The run's figures.
    fn finish(mut self) -> RunStats {
        self.stats.elapsed = self.start.elapsed();
        self.stats
    }
}

/// Block-aligned offsets spread over `capacity` bytes (xorshift64, the
/// same sequence every run).
fn random_offsets(capacity: u64, block: usize) -> impl FnMut() -> u64 {
    let blocks = capacity / block as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * block as u64
    }
}

/// Sleep in `poll(2)` until one of the completion eventfds `fds` fires, and
/// reset those that did.
fn sleep_on_completions(fds: &mut [libc::pollfd]) -> Result<(), ClientError> {
    for p in fds.iter_mut() {
        p.revents = 0;
    }
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
    // outlives the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(ClientError::Blkio {
                op: "poll",
                message: e.to_string(),
            });
        }
    }
    for p in fds.iter() {
        if p.revents & libc::POLLIN != 0 {
            let mut val = [0u8; 8];
            // SAFETY: reads 8 bytes into a local 8-byte buffer from an
            // eventfd libblkio keeps open while the queue lives.
            let _ = unsafe { libc::read(p.fd, val.as_mut_ptr().cast(), 8) };
        }
    }
    Ok(())
}
