// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small safe wrapper around the `blkio` crate's `virtio-blk-vhost-user`
//! driver (the library QEMU's `blkio` block driver uses), used by the demo,
//! the tests and the benchmark as a real third-party vhost-user frontend.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

mod random_reads;

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

impl std::fmt::Debug for BlkioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkioClient")
            .field("queues", &self.queues.len())
            .field("region_len", &self.region.len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
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

impl Drop for BlkioClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
