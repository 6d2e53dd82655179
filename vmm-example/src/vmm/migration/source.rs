// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source side: pre-copy rounds while the guest runs, then the
//! stop-and-copy, and going on here if the destination does not take over.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use signal_hook::consts::SIGUSR1;
use signal_hook::iterator::Signals;

use super::dirty::DirtyTracking;
use super::stream::{Reply, StreamError, StreamWriter, MAX_RAM_PAGES, PAGE_SIZE};
use super::{Connection, MigrateTo, MigrationError, MAX_ROUNDS};
use crate::vmm::control::Control;
use crate::vmm::memory;

/// How long a destination may stop reading before the source gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination gets to check the stream and answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn ram_err(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Ram { what, source }
}

/// Sends pages of guest RAM, counting what went.
struct RamSender<'a> {
    out: StreamWriter<BufWriter<Connection>>,
    ram: &'a File,
    buf: Vec<u8>,
    pages_sent: u64,
}

impl RamSender<'_> {
    /// Send `pages` (ascending page numbers), contiguous runs in one
    /// record each.
    fn pages(&mut self, pages: &[u64]) -> Result<(), MigrationError> {
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let mut n = 1;
            while i + n < pages.len() && n < MAX_RAM_PAGES && pages[i + n] == first + n as u64 {
                n += 1;
            }
            self.run(first, n)?;
            i += n;
        }
        Ok(())
    }

    fn run(&mut self, first: u64, n: usize) -> Result<(), MigrationError> {
        let len = n * PAGE_SIZE as usize;
        self.buf.resize(len, 0);
        self.ram
            .read_exact_at(&mut self.buf, first * PAGE_SIZE)
            .map_err(ram_err("reading a page"))?;
        self.out.ram(first * PAGE_SIZE, &self.buf)?;
        self.pages_sent += n as u64;
        Ok(())
    }

    /// Round 0: every page of RAM that holds data (the destination's RAM
    /// starts zeroed; all-zero pages are skipped).
    fn all(&mut self, ram_len: u64) -> Result<(), MigrationError> {
        let chunk_len = MAX_RAM_PAGES * PAGE_SIZE as usize;
        let mut chunk = vec![0u8; chunk_len];
        let mut at = 0u64;
        while at < ram_len {
            let n = (ram_len - at).min(chunk_len as u64) as usize;
            self.ram
                .read_exact_at(&mut chunk[..n], at)
                .map_err(ram_err("reading RAM"))?;
            let mut page = 0;
            while page < n {
                let start = page;
                while page < n && !is_zero(&chunk[page..page + PAGE_SIZE as usize]) {
                    page += PAGE_SIZE as usize;
                }
                if page > start {
                    self.out.ram(at + start as u64, &chunk[start..page])?;
                    self.pages_sent += ((page - start) / PAGE_SIZE as usize) as u64;
                }
                page += PAGE_SIZE as usize;
            }
            at += n as u64;
        }
        self.flush()
    }

    /// Push out what is buffered, so that a round's time is its transfer.
    fn flush(&mut self) -> Result<(), MigrationError> {
        self.out.get_mut().flush().map_err(|source| {
            MigrationError::Stream(StreamError::Io {
                what: "sending pages",
                source,
            })
        })
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; `align_to` only splits
        // the slice at alignment boundaries.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// What a finished migration measured.
#[derive(Debug, Default)]
struct Figures {
    rounds: u32,
    bytes_per_s: f64,
}

impl Control {
    /// Migrate the VM as `to` says. `Ok` means the destination has taken
    /// over and this process must end; on `Err` the VM runs on here.
    pub(in crate::vmm) fn migrate(
        &self,
        threads: &[JoinHandle<()>],
        to: &MigrateTo,
        signals: &mut Signals,
    ) -> Result<(), MigrationError> {
        let started = Instant::now();
        let conn = to.address.connect()?;
        conn.set_write_timeout(Some(STALL_TIMEOUT))
            .map_err(ram_err("setting a timeout"))?;
        let ram = memory::ram_file(&self.memory).ok_or(MigrationError::Ram {
            what: "guest RAM has no file",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let ram_len = self.mem_mib << 20;
        let out = StreamWriter::new(BufWriter::with_capacity(1 << 20, conn), ram_len)?;
        let mut sender = RamSender {
            out,
            ram,
            buf: Vec::new(),
            pages_sent: 0,
        };
        let tracking = DirtyTracking::start(&self.slots, &self.log, &self.transports)?;
        let (left, figures) = self.precopy(&mut sender, &tracking, to, signals, ram_len)?;
        let precopy = started.elapsed();

        let stop = Instant::now();
        let cut = self
            .cut(threads)
            .map_err(|e| MigrationError::Cut(Box::new(e)))?;
        let result = (|| {
            // The devices have stopped and finished what they had taken:
            // their last writes are in the log now.
            let mut last = left;
            last.extend(tracking.take()?);
            last.sort_unstable();
            last.dedup();
            let last_pages = last.len();
            sender.pages(&last)?;
            let json = serde_json::to_vec(&cut.state).map_err(MigrationError::State)?;
            sender.out.state(&json)?;
            sender.out.end()?;
            let conn = sender.out.get_mut().get_mut();
            conn.set_read_timeout(Some(ANSWER_TIMEOUT))
                .map_err(ram_err("setting a timeout"))?;
            let mut answer = [0u8; 1];
            match conn.read_exact(&mut answer) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(MigrationError::NoAnswer(ANSWER_TIMEOUT))
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(MigrationError::NoAnswer(ANSWER_TIMEOUT))
                }
                Err(_) => return Err(MigrationError::Refused),
            }
            match Reply::from_byte(answer[0]) {
                Some(Reply::Accepted) => Ok(last_pages),
                _ => Err(MigrationError::Refused),
            }
        })();
        match result {
            Ok(last_pages) => {
                info!(
                    "migrated to {}: rounds={} ram_mib={} transferred_mib={} \
                     last_pages={last_pages} precopy_ms={:.0} downtime_ms={:.0} (source side: \
                     stop to accepted) total_ms={:.0} rate_mib_s={:.0}; {} request(s) in flight \
                     and {} queued at the cut",
                    to.address,
                    figures.rounds,
                    self.mem_mib,
                    sender.out.bytes() >> 20,
                    precopy.as_secs_f64() * 1e3,
                    stop.elapsed().as_secs_f64() * 1e3,
                    started.elapsed().as_secs_f64() * 1e3,
                    figures.bytes_per_s / f64::from(1 << 20),
                    cut.in_flight,
                    cut.queued,
                );
                Ok(())
            }
            Err(e) => {
                warn!("migration cancelled after the VM stopped: resuming it here");
                self.resume(cut.snapshots);
                Err(e)
            }
        }
    }

    /// Round 0 and the rounds after it. Returns the pages still to send
    /// and the measured figures.
    fn precopy(
        &self,
        sender: &mut RamSender<'_>,
        tracking: &DirtyTracking<'_>,
        to: &MigrateTo,
        signals: &mut Signals,
        ram_len: u64,
    ) -> Result<(Vec<u64>, Figures), MigrationError> {
        let mut figures = Figures::default();
        let t = Instant::now();
        let before = sender.out.bytes();
        sender.all(ram_len)?;
        let mut rate = (sender.out.bytes() - before) as f64 / t.elapsed().as_secs_f64().max(1e-6);
        info!(
            "migration round 0: {} pages in {:.0} ms",
            sender.pages_sent,
            t.elapsed().as_secs_f64() * 1e3
        );
        loop {
            if signals.pending().any(|s| s == SIGUSR1) {
                return Err(MigrationError::Cancelled);
            }
            let dirty = tracking.take()?;
            let bytes = dirty.len() as f64 * PAGE_SIZE as f64;
            let predicted = Duration::from_secs_f64(bytes / rate.max(1.0));
            figures.rounds += 1;
            figures.bytes_per_s = rate;
            if predicted <= to.max_downtime || figures.rounds > MAX_ROUNDS {
                if predicted > to.max_downtime {
                    warn!(
                        "migration did not converge in {MAX_ROUNDS} rounds: stopping with {} \
                         pages left (about {predicted:?})",
                        dirty.len()
                    );
                }
                return Ok((dirty, figures));
            }
            let t = Instant::now();
            let before = sender.out.bytes();
            sender.pages(&dirty)?;
            sender.flush()?;
            let took = t.elapsed().as_secs_f64().max(1e-6);
            rate = (sender.out.bytes() - before) as f64 / took;
            info!(
                "migration round {}: {} pages in {:.0} ms",
                figures.rounds,
                dirty.len(),
                took * 1e3
            );
        }
    }
}
