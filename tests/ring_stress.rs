// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Split-ring stress: a driver thread and a device thread race on shared
//! guest memory, and a missed kick or a missed interrupt is a hang that the
//! test reports.
//!
//! The driver posts chains of random shape (1–8 descriptors, readable then
//! writable, some through an indirect table), publishes them in random
//! batches, kicks only when the device asked for it (`used->flags` or
//! `avail_event` with EVENT_IDX) and never polls for completions: when it
//! has nothing left to do it re-enables interrupts and sleeps on the call
//! eventfd. If no interrupt comes within [`HANG`], the test fails with both
//! sides' indexes. The device sleeps on the kick eventfd the same way,
//! disables and re-enables notifications at random and, in the
//! `kit-pop` mode, completes the chains of a batch out of order.
//!
//! Indexes start just below the 16-bit wrap and every configuration runs
//! enough requests to wrap them several times. Every request must complete
//! exactly once, with the used length and the bytes the device wrote.
//!
//! The device side runs on the kit's [`Vring`] (its three ways of taking
//! chains) and, as a reference, on `virtio-queue`'s `Queue`.
//! Seed: `VBK_STRESS_SEED=N` replays a run; `VBK_STRESS_REQUESTS` sets the
//! request count per configuration.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use virtio_backend_kit::virtio_queue::desc::split::Descriptor;
use virtio_backend_kit::virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::vring::Notifier;
use virtio_backend_kit::{GuestMemoryLog, Vring, VringState};

const QUEUE_SIZE: u16 = 64;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Indirect tables: one slot of `MAX_INDIRECT` entries per head index.
const INDIRECT_BASE: u64 = 0x1_0000;
const MAX_INDIRECT: u64 = 8;
/// Data buffers: one slot per (table, entry).
const DATA_BASE: u64 = 0x10_0000;
const SLOT: u64 = 256;
const MEM_SIZE: usize = 0x80_0000;
/// How long either side may sleep before the test calls it a hang.
const HANG: Duration = Duration::from_secs(5);
const START_INDEX: u16 = 0xffff - 300;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// xorshift64*: small, seedable, good enough for shapes and timing.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Guest memory with the ring indexes and the EVENT_IDX fields at
/// [`START_INDEX`]: a fresh queue (where all four are 0) shifted to just
/// below the wrap.
fn memory() -> GuestMemoryLog {
    let mem = GuestMemoryLog::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory");
    let q = u64::from(QUEUE_SIZE);
    for idx in [
        AVAIL_RING + 2,
        USED_RING + 2,
        AVAIL_RING + 4 + 2 * q,
        USED_RING + 4 + 8 * q,
    ] {
        mem.write_obj(START_INDEX.to_le(), GuestAddress(idx))
            .expect("ring index");
    }
    mem
}

/// The byte the device writes at `offset` of the writable part of request `seq`.
fn pattern(seq: u64, offset: u64) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(offset) % 251) as u8
}

fn wait_readable(fd: &EventFd, stop: Option<&EventFd>, limit: Duration) -> bool {
    let mut fds = vec![libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(s) = stop {
        fds.push(libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let ms = limit.as_millis() as i32;
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
    // outlives the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    n > 0
}

// ---------------------------------------------------------------- device

/// How the device takes chains.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `Vring::pop_chain` + `Vring::add_used`, completions out of order.
    KitPop,
    /// `Vring::process_available` (virtio-queue chains, batch loop).
    KitProcess,
    /// `Vring::process_available_descs` (the mapped-ring walker).
    KitDescs,
    /// `virtio-queue`'s `Queue` directly: the reference.
    Reference,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KitPop => "kit-pop",
            Mode::KitProcess => "kit-process",
            Mode::KitDescs => "kit-descs",
            Mode::Reference => "virtio-queue",
        }
    }
}

/// Serve one chain: read the request number from the first readable
/// descriptor, fill every writable one with its pattern; the used length
/// is the writable bytes.
fn serve(mem: &GuestMemoryLog, descs: impl Iterator<Item = Descriptor>) -> u32 {
    let mut seq = None;
    let mut written = 0u64;
    for d in descs {
        if !d.is_write_only() {
            if seq.is_none() {
                seq = mem.read_obj::<u64>(d.addr()).ok();
            }
            continue;
        }
        let Some(s) = seq else { return 0 };
        let bytes: Vec<u8> = (0..u64::from(d.len()))
            .map(|i| pattern(s, written + i))
            .collect();
        mem.write_slice(&bytes, d.addr())
            .expect("writable buffer in memory");
        written += u64::from(d.len());
    }
    written as u32
}

fn kit_vring(mem: &GuestMemoryLog, event_idx: bool, call: &EventFd) -> Vring {
    let state = VringState {
        size: QUEUE_SIZE,
        ready: true,
        enabled: true,
        desc_table: DESC_TABLE,
        avail_ring: AVAIL_RING,
        used_ring: USED_RING,
        next_avail: START_INDEX,
        next_used: START_INDEX,
        event_idx,
        signalled_used: None,
    };
    let notifier = Notifier::new(call.try_clone().expect("dup call"));
    Vring::new(
        0,
        QUEUE_SIZE,
        &state,
        GuestMemoryAtomic::new(mem.clone()),
        Arc::new(ArcSwapOption::from_pointee(notifier)),
        Arc::new(ArcSwapOption::empty()),
    )
    .expect("vring")
}

fn reference_queue(event_idx: bool) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_next_avail(START_INDEX);
    q.set_next_used(START_INDEX);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// One batch of the kit's vring in `mode`; returns the chains completed.
fn kit_batch(vr: &mut Vring, mode: Mode, mem: &GuestMemoryLog, rng: &mut Rng) -> usize {
    match mode {
        Mode::KitPop => {
            let mut held = Vec::new();
            while let Some(chain) = vr.pop_chain().expect("pop_chain") {
                let head = chain.head_index();
                let len = serve(mem, chain);
                held.push((head, len));
                if rng.chance(10) {
                    break;
                }
            }
            // Complete out of order.
            for i in (1..held.len()).rev() {
                held.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let n = held.len();
            for (head, len) in held {
                vr.add_used(head, len).expect("add_used");
            }
            n
        }
        Mode::KitProcess => vr
            .process_available(|chain| serve(mem, chain))
            .expect("process_available"),
        Mode::KitDescs => vr
            .process_available_descs(|descs| serve(mem, descs))
            .expect("process_available_descs"),
        Mode::Reference => unreachable!(),
    }
}

/// Counters the device reports.
#[derive(Debug, Default)]
struct DeviceStats {
    wakeups: u64,
    interrupts: u64,
}

/// The device thread: sleeps on the kick eventfd (a kick that never comes
/// is a hang) and runs `on_kick` after each wake-up, until stopped.
fn serve_kicks(side: &DeviceSide, mut on_kick: impl FnMut(&mut DeviceStats)) -> DeviceStats {
    let (kick, stop) = (&side.kick, &side.stop);
    let mut stats = DeviceStats::default();
    loop {
        if !wait_readable(kick, Some(stop), HANG * 4) {
            panic!("device: no kick for {:?} (driver hung?)", HANG * 4);
        }
        if stop.read().is_ok() {
            return stats;
        }
        let _ = kick.read();
        stats.wakeups += 1;
        on_kick(&mut stats);
    }
}

/// What the device thread gets.
struct DeviceSide {
    mem: GuestMemoryLog,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    stop: EventFd,
    seed: u64,
}

fn run_kit_device(side: DeviceSide, mode: Mode) -> DeviceStats {
    let mem = &side.mem;
    let mut vr = kit_vring(mem, side.event_idx, &side.call);
    let mut rng = Rng(side.seed ^ 0x9e37_79b9_7f4a_7c15);
    serve_kicks(&side, |stats| {
        let mut completed = 0;
        loop {
            let disabled = rng.chance(70);
            if disabled {
                vr.disable_notification().expect("disable");
            }
            completed += kit_batch(&mut vr, mode, mem, &mut rng);
            if rng.chance(20) && vr.notify_if_needed().expect("notify") {
                stats.interrupts += 1;
            }
            if !vr.enable_notification().expect("enable") {
                break;
            }
        }
        if completed > 0 && vr.notify_if_needed().expect("notify") {
            stats.interrupts += 1;
        }
    })
}

fn run_reference_device(side: DeviceSide) -> DeviceStats {
    let mem = &side.mem;
    let mut q = reference_queue(side.event_idx);
    let mut rng = Rng(side.seed ^ 0x51ed_270b_2d1f_4a3d);
    serve_kicks(&side, |stats| {
        let mut completed = 0;
        loop {
            if rng.chance(70) {
                q.disable_notification(mem).expect("disable");
            }
            while let Some(chain) = q.iter(mem).expect("iter").next() {
                let head = chain.head_index();
                let len = serve(mem, chain);
                q.add_used(mem, head, len).expect("add_used");
                completed += 1;
            }
            if !q.enable_notification(mem).expect("enable") {
                break;
            }
        }
        if completed > 0 && q.needs_notification(mem).expect("needs_notification") {
            side.call.write(1).expect("call");
            stats.interrupts += 1;
        }
    })
}

// ---------------------------------------------------------------- driver

/// A request the driver has published and not seen completed.
#[derive(Clone, Debug)]
struct Posted {
    seq: u64,
    /// Descriptor-table entries it holds (for the free list).
    descs: Vec<u16>,
    /// Writable buffers (address, length) in order.
    writable: Vec<(u64, u32)>,
}

struct Driver {
    mem: GuestMemoryLog,
    event_idx: bool,
    rng: Rng,
    free: Vec<u16>,
    posted: Vec<Option<Posted>>,
    avail_idx: Wrapping<u16>,
    /// Avail index at the last kick decision.
    kicked_at: Wrapping<u16>,
    last_used: Wrapping<u16>,
    next_seq: u64,
    completed: u64,
    kicks: u64,
    sleeps: u64,
}

fn write_desc(mem: &GuestMemoryLog, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).expect("descriptor");
}

impl Driver {
    fn new(mem: GuestMemoryLog, event_idx: bool, seed: u64) -> Self {
        let n = usize::from(QUEUE_SIZE);
        Driver {
            mem,
            event_idx,
            rng: Rng(seed),
            free: (0..QUEUE_SIZE).rev().collect(),
            posted: vec![None; n],
            avail_idx: Wrapping(START_INDEX),
            kicked_at: Wrapping(START_INDEX),
            last_used: Wrapping(START_INDEX),
            next_seq: 1,
            completed: 0,
            kicks: 0,
            sleeps: 0,
        }
    }

    fn store_u16(&self, addr: u64, v: u16) {
        self.mem
            .store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("ring store");
    }

    fn load_u16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(addr), Ordering::Acquire)
                .expect("ring load"),
        )
    }

    /// Build one chain (if descriptors are free) and put its head in the
    /// avail ring, unpublished. Returns false when the table is full.
    fn post_one(&mut self) -> bool {
        let indirect = self.rng.chance(20);
        let len = 1 + self.rng.below(if indirect { MAX_INDIRECT } else { 8 }) as usize;
        let need = if indirect { 1 } else { len.max(2) };
        if self.free.len() < need {
            return false;
        }
        let len = len.max(2);
        let readable = 1 + self.rng.below(len as u64 - 1) as usize;
        let seq = self.next_seq;
        self.next_seq += 1;
        let descs: Vec<u16> = (0..need).map(|_| self.free.pop().expect("free")).collect();
        let head = descs[0];
        // (address of the entry, buffer address) for each chain entry.
        let entries: Vec<(u64, u64)> = if indirect {
            let table = INDIRECT_BASE + u64::from(head) * MAX_INDIRECT * 16;
            (0..len as u64)
                .map(|j| {
                    let slot = u64::from(QUEUE_SIZE) + u64::from(head) * MAX_INDIRECT + j;
                    (table + j * 16, DATA_BASE + slot * SLOT)
                })
                .collect()
        } else {
            descs
                .iter()
                .map(|d| {
                    (
                        DESC_TABLE + u64::from(*d) * 16,
                        DATA_BASE + u64::from(*d) * SLOT,
                    )
                })
                .collect()
        };
        let mut writable = Vec::new();
        for (j, (entry, buf)) in entries.iter().enumerate() {
            let write = j >= readable;
            let blen = if j == 0 {
                8 + self.rng.below(SLOT - 8) as u32
            } else {
                1 + self.rng.below(SLOT) as u32
            };
            if j == 0 {
                self.mem
                    .write_obj(seq, GuestAddress(*buf))
                    .expect("request number");
            }
            if write {
                // Poison, so a buffer the device skipped is caught.
                self.mem
                    .write_slice(&vec![0xee; blen as usize], GuestAddress(*buf))
                    .expect("poison");
                writable.push((*buf, blen));
            }
            let last = j + 1 == entries.len();
            let next_idx = if indirect {
                j as u16 + 1
            } else {
                descs.get(j + 1).copied().unwrap_or(0)
            };
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            write_desc(
                &self.mem,
                *entry,
                *buf,
                blen,
                flags,
                if last { 0 } else { next_idx },
            );
        }
        if indirect {
            let table = INDIRECT_BASE + u64::from(head) * MAX_INDIRECT * 16;
            write_desc(
                &self.mem,
                DESC_TABLE + u64::from(head) * 16,
                table,
                (len * 16) as u32,
                F_INDIRECT,
                0,
            );
        }
        let slot = u64::from(self.avail_idx.0 % QUEUE_SIZE);
        self.store_u16(AVAIL_RING + 4 + 2 * slot, head);
        self.avail_idx += Wrapping(1);
        self.posted[usize::from(head)] = Some(Posted {
            seq,
            descs,
            writable,
        });
        true
    }

    /// Publish the avail index and kick if the device wants it.
    fn publish(&mut self, kick: &EventFd) {
        self.store_u16(AVAIL_RING + 2, self.avail_idx.0);
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.kicked_at, self.avail_idx);
        let want = if self.event_idx {
            let event = Wrapping(self.load_u16(USED_RING + 4 + 8 * u64::from(QUEUE_SIZE)));
            (self.avail_idx - event - Wrapping(1)) < (self.avail_idx - old)
        } else {
            self.load_u16(USED_RING) & USED_F_NO_NOTIFY == 0
        };
        if want {
            kick.write(1).expect("kick");
            self.kicks += 1;
        }
    }

    /// Take every completion the device published; returns how many.
    fn reap(&mut self) -> usize {
        let used_idx = Wrapping(self.load_u16(USED_RING + 2));
        let mut n = 0;
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used.0 % QUEUE_SIZE);
            let at = USED_RING + 4 + 8 * slot;
            let id = self.mem.read_obj::<u32>(GuestAddress(at)).expect("used id");
            let len = self
                .mem
                .read_obj::<u32>(GuestAddress(at + 4))
                .expect("used len");
            let head = usize::try_from(id).expect("id");
            assert!(head < usize::from(QUEUE_SIZE), "used id {id} out of range");
            let p = self.posted[head]
                .take()
                .unwrap_or_else(|| panic!("head {head} completed twice or never posted"));
            let want: u32 = p.writable.iter().map(|(_, l)| *l).sum();
            assert_eq!(len, want, "request {} (head {head}): used length", p.seq);
            let mut off = 0u64;
            for (addr, blen) in &p.writable {
                let mut got = vec![0u8; *blen as usize];
                self.mem
                    .read_slice(&mut got, GuestAddress(*addr))
                    .expect("read back");
                for (i, b) in got.iter().enumerate() {
                    assert_eq!(
                        *b,
                        pattern(p.seq, off + i as u64),
                        "request {} byte {}",
                        p.seq,
                        off + i as u64
                    );
                }
                off += u64::from(*blen);
            }
            self.free.extend(p.descs);
            self.last_used += Wrapping(1);
            self.completed += 1;
            n += 1;
        }
        n
    }

    fn set_interrupts(&self, on: bool) {
        if self.event_idx {
            let at = AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
            let v = if on {
                self.last_used
            } else {
                self.last_used - Wrapping(0x8000)
            };
            self.store_u16(at, v.0);
        } else {
            self.store_u16(AVAIL_RING, if on { 0 } else { AVAIL_F_NO_INTERRUPT });
        }
    }

    fn run(&mut self, total: u64, kick: &EventFd, call: &EventFd) {
        self.set_interrupts(false);
        while self.completed < total {
            // Post a random batch, publishing at random points.
            let want = 1 + self.rng.below(u64::from(QUEUE_SIZE));
            let mut posted = 0;
            while posted < want && self.next_seq <= total && self.post_one() {
                posted += 1;
                if self.rng.chance(25) {
                    self.publish(kick);
                }
            }
            if self.avail_idx != self.kicked_at {
                self.publish(kick);
            }
            if self.reap() > 0 && self.rng.chance(60) {
                continue;
            }
            if self.next_seq - 1 == self.completed {
                // Nothing outstanding: no interrupt to wait for.
                continue;
            }
            // Nothing to reap now: interrupts on, re-check, then sleep.
            self.set_interrupts(true);
            fence(Ordering::SeqCst);
            if self.reap() > 0 {
                self.set_interrupts(false);
                continue;
            }
            if self.completed >= total {
                break;
            }
            self.sleeps += 1;
            if !wait_readable(call, None, HANG) {
                let used = self.load_u16(USED_RING + 2);
                let avail = self.load_u16(AVAIL_RING + 2);
                panic!(
                    "driver slept {HANG:?} with no interrupt: avail={avail} used={used} \
                     driver_seen={} completed={} outstanding={} (a lost interrupt or kick)",
                    self.last_used,
                    self.completed,
                    self.posted.iter().flatten().count()
                );
            }
            let _ = call.read();
            self.set_interrupts(false);
        }
    }
}

// ---------------------------------------------------------------- runner

fn seed() -> u64 {
    std::env::var("VBK_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            t | 1
        })
}

fn requests() -> u64 {
    std::env::var("VBK_STRESS_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        // Enough to wrap the 16-bit indexes three times.
        .unwrap_or(3 * 65_536 + 1_000)
}

fn stress(mode: Mode, event_idx: bool) {
    let seed = seed();
    let total = requests();
    let mem = memory();
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick");
    let call = EventFd::new(libc::EFD_NONBLOCK).expect("call");
    let stop = EventFd::new(libc::EFD_NONBLOCK).expect("stop");
    let device = {
        let side = DeviceSide {
            mem: mem.clone(),
            event_idx,
            kick: kick.try_clone().expect("dup"),
            call: call.try_clone().expect("dup"),
            stop: stop.try_clone().expect("dup"),
            seed,
        };
        std::thread::spawn(move || match mode {
            Mode::Reference => run_reference_device(side),
            _ => run_kit_device(side, mode),
        })
    };
    let started = Instant::now();
    let mut driver = Driver::new(mem, event_idx, seed);
    driver.run(total, &kick, &call);
    stop.write(1).expect("stop");
    let stats = device.join().expect("device thread panicked");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(driver.completed, total, "every request completes");
    assert!(
        driver.posted.iter().all(Option::is_none),
        "requests left outstanding"
    );
    let wraps = (u64::from(START_INDEX) + total) / 65_536;
    println!(
        "VBK-RINGSTRESS impl={} event_idx={} requests={total} wraps={wraps} secs={secs:.2} \
         kicks={} device_wakeups={} interrupts={} driver_sleeps={} seed={seed}",
        mode.name(),
        if event_idx { "on" } else { "off" },
        driver.kicks,
        stats.wakeups,
        stats.interrupts,
        driver.sleeps,
    );
}

/// Two tests per device implementation: with and without EVENT_IDX.
macro_rules! stress_tests {
    ($($event_idx:ident, $no_event_idx:ident: $mode:ident;)*) => {$(
        #[test]
        fn $event_idx() {
            stress(Mode::$mode, true);
        }

        #[test]
        fn $no_event_idx() {
            stress(Mode::$mode, false);
        }
    )*};
}

stress_tests! {
    kit_pop_chain_out_of_order_event_idx, kit_pop_chain_out_of_order_no_event_idx: KitPop;
    kit_process_available_event_idx, kit_process_available_no_event_idx: KitProcess;
    kit_mapped_descs_event_idx, kit_mapped_descs_no_event_idx: KitDescs;
    reference_virtio_queue_event_idx, reference_virtio_queue_no_event_idx: Reference;
}
