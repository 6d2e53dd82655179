// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small safe wrapper around the `blkio` crate's `virtio-blk-vhost-user`
//! driver (the library QEMU's `blkio` block driver uses), used by the demo,
//! the tests and the benchmark as a real third-party vhost-user frontend.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Errors from the blkio frontend.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// libblkio reported an error.
    #[error("blkio {op}: {message}")]
    Blkio {
        /// What we were doing.
        op: &'static str,
        /// libblkio's message.
        message: String,
    },
    /// A request completed with an error.
    #[error("{op} at offset {offset} failed with {ret}")]
    Request {
        /// Request kind.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Negative errno.
        ret: i32,
    },
    /// Data read back differs from what was written.
    #[error("data mismatch at offset {0}")]
    Mismatch(u64),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    Invalid(&'static str),
}

fn wrap<T>(op: &'static str, r: blkio::Result<T>) -> Result<T, ClientError> {
    r.map_err(|e| ClientError::Blkio {
        op,
        message: e.message().to_string(),
    })
}

/// The byte [`BlkioClient::verified_io`] writes at disk offset `pos` for
/// `seed`, so a host can check an image file afterwards.
pub fn pattern_byte(seed: u8, pos: u64) -> u8 {
    ((pos / 512) as usize + (pos % 512) as usize).wrapping_mul(31) as u8 ^ seed
}

/// Figures from one random-read run.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Completed requests.
    pub requests: u64,
    /// Wall-clock duration.
    pub elapsed: Duration,
    /// Per-request latencies in nanoseconds (sampled).
    pub latencies_ns: Vec<u64>,
}

impl RunStats {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency percentile `p` (0..=100) in microseconds.
    pub fn latency_us(&mut self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.sort_unstable();
        let idx = ((p / 100.0) * (self.latencies_ns.len() - 1) as f64).round() as usize;
        self.latencies_ns[idx.min(self.latencies_ns.len() - 1)] as f64 / 1000.0
    }
}

/// A connected, started `virtio-blk-vhost-user` frontend with one shared
/// buffer region.
pub struct BlkioClient {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
    // Keep last: the driver must outlive the queues and the region.
    blkio: Blkio,
}

impl BlkioClient {
    /// Connect to a vhost-user-blk backend at `socket` with `num_queues`
    /// queues and a `buf_len`-byte buffer region.
    pub fn connect(socket: &Path, num_queues: usize, buf_len: usize) -> Result<Self, ClientError> {
        Self::connect_with(socket, num_queues, buf_len, false)
    }

    /// Like [`BlkioClient::connect`], for a read-only device when
    /// `read_only` is set (libblkio refuses to start a read-only device
    /// otherwise).
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        buf_len: usize,
        read_only: bool,
    ) -> Result<Self, ClientError> {
        let mut blkio = wrap("new", Blkio::new("virtio-blk-vhost-user"))?;
        let path = socket.to_str().ok_or(ClientError::Invalid("socket path"))?;
        wrap("set path", blkio.set_str("path", path))?;
        wrap("set read-only", blkio.set_bool("read-only", read_only))?;
        wrap("connect", blkio.connect())?;
        wrap(
            "set num-queues",
            blkio.set_i32("num-queues", num_queues as i32),
        )?;
        let capacity = wrap("get capacity", blkio.get_u64("capacity"))?;
        let started = wrap("start", blkio.start())?;
        let align = wrap(
            "get mem-region-alignment",
            blkio.get_u64("mem-region-alignment"),
        )? as usize;
        let len = buf_len.div_ceil(align.max(1)) * align.max(1);
        let region = wrap("alloc_mem_region", blkio.alloc_mem_region(len))?;
        wrap("map_mem_region", blkio.map_mem_region(&region))?;
        Ok(BlkioClient {
            queues: started.queues,
            region,
            capacity,
            blkio,
        })
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The shared buffer.
    pub fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: the region was allocated and mapped by libblkio with
        // `len` bytes at `addr`, stays mapped until `self` drops, and
        // `&mut self` makes this the only live reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn wait(&mut self, q: usize, want: usize) -> Result<Vec<Completion>, ClientError> {
        let mut done = Vec::with_capacity(want);
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..want).map(|_| MaybeUninit::uninit()).collect();
        while done.len() < want {
            let n = wrap(
                "do_io",
                self.queues[q].do_io(&mut slots[..want - done.len()], 1, None, None),
            )?;
            // SAFETY: do_io initialised the first `n` entries.
            done.extend(unsafe { reaped(&slots, n) });
        }
        Ok(done)
    }

    /// The buffer start, for a request of `len` bytes (`too_large` when
    /// they do not fit the buffer).
    fn buffer_for(&self, len: usize, too_large: &'static str) -> Result<*mut u8, ClientError> {
        if len > self.region.len {
            return Err(ClientError::Invalid(too_large));
        }
        Ok(self.region.addr as *mut u8)
    }

    /// Wait for the one request in flight on queue `q` (an `op` at
    /// `offset`) and check how it ended.
    fn complete_one(&mut self, q: usize, op: &'static str, offset: u64) -> Result<(), ClientError> {
        let c = self.wait(q, 1)?;
        Self::check(op, offset, &c[0])
    }

    fn check(op: &'static str, offset: u64, c: &Completion) -> Result<(), ClientError> {
        if c.ret < 0 {
            return Err(ClientError::Request {
                op,
                offset,
                ret: c.ret,
            });
        }
        Ok(())
    }

    /// Write `len` bytes from the buffer start to `offset` on queue `q`.
    pub fn write(&mut self, q: usize, offset: u64, len: usize) -> Result<(), ClientError> {
        let buf = self.buffer_for(len, "write larger than the buffer")?;
        self.queues[q].write(offset, buf, len, 0, ReqFlags::empty());
        self.complete_one(q, "write", offset)
    }

    /// Read `len` bytes at `offset` into the buffer start on queue `q`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<(), ClientError> {
        let buf = self.buffer_for(len, "read larger than the buffer")?;
        self.queues[q].read(offset, buf, len, 0, ReqFlags::empty());
        self.complete_one(q, "read", offset)
    }

    /// Flush on queue `q`.
    pub fn flush(&mut self, q: usize) -> Result<(), ClientError> {
        self.queues[q].flush(0, ReqFlags::empty());
        self.complete_one(q, "flush", 0)
    }

    /// Write-zeroes `len` bytes at `offset` on queue `q`.
    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> Result<(), ClientError> {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete_one(q, "write_zeroes", offset)
    }

    /// Discard `len` bytes at `offset` on queue `q`.
    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> Result<(), ClientError> {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.complete_one(q, "discard", offset)
    }

    /// Write a pattern over `total` bytes in `chunk`-byte requests, read it
    /// back and compare; returns (write, read) throughput in bytes/s.
    pub fn verified_io(
        &mut self,
        q: usize,
        total: u64,
        chunk: usize,
        seed: u8,
    ) -> Result<(f64, f64), ClientError> {
        self.verified_io_at(q, 0, total, chunk, seed)
    }

    /// [`BlkioClient::verified_io`] over `total` bytes starting at `base`.
    /// The pattern depends on the offset relative to `base`.
    pub fn verified_io_at(
        &mut self,
        q: usize,
        base: u64,
        total: u64,
        chunk: usize,
        seed: u8,
    ) -> Result<(f64, f64), ClientError> {
        if chunk == 0 || chunk > self.region.len || base.saturating_add(total) > self.capacity {
            return Err(ClientError::Invalid("chunk or total size"));
        }
        let pattern = |off: u64, i: usize| pattern_byte(seed, off + i as u64);
        let start = Instant::now();
        let mut off = 0;
        while off < total {
            let n = chunk.min((total - off) as usize);
            for (i, b) in self.buffer()[..n].iter_mut().enumerate() {
                *b = pattern(off, i);
            }
            self.write(q, base + off, n)?;
            off += n as u64;
        }
        self.flush(q)?;
        let wrote = start.elapsed();
        let start = Instant::now();
        off = 0;
        while off < total {
            let n = chunk.min((total - off) as usize);
            self.buffer()[..n].fill(0);
            self.read(q, base + off, n)?;
            let mismatch = self.buffer()[..n]
                .iter()
                .enumerate()
                .any(|(i, b)| *b != pattern(off, i));
            if mismatch {
                return Err(ClientError::Mismatch(base + off));
            }
            off += n as u64;
        }
        let read = start.elapsed();
        Ok((
            total as f64 / wrote.as_secs_f64().max(1e-9),
            total as f64 / read.as_secs_f64().max(1e-9),
        ))
    }

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

/// The completions in the first `n` entries of `slots`.
///
/// # Safety
///
/// Those entries must be initialised (`do_io` just filled them).
unsafe fn reaped(
    slots: &[MaybeUninit<Completion>],
    n: usize,
) -> impl Iterator<Item = Completion> + '_ {
    slots[..n].iter().map(|s| {
        // SAFETY: the caller promises the first `n` entries are initialised.
        unsafe { s.assume_init_read() }
    })
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

impl Drop for BlkioClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
