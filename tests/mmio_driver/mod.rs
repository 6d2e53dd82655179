// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A guest-side virtio-mmio driver for tests: programs the transport's
//! registers, lays out split virtqueues and virtio-blk requests in memfd
//! guest memory, notifies through the kick eventfds (as a KVM ioeventfd
//! would) and waits for the interrupt eventfd (a KVM irqfd).
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use virtio_backend_kit::memory::GuestMemoryLog;
use virtio_backend_kit::mmio::*;
use virtio_backend_kit::testing::{self, SplitQueueDriver};
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};

/// Guest RAM size used by the driver.
pub const MEM_SIZE: usize = 16 << 20;
const QUEUE_AREA: u64 = 0x10_0000;
const DATA_BASE: u64 = 0x80_0000;

/// Memfd-backed guest RAM at gpa 0, shareable with an external backend.
pub fn guest_memory() -> GuestMemoryLog {
    testing::shared_guest_memory(0, MEM_SIZE).unwrap()
}

/// The driver.
pub struct Driver {
    /// The transport under test.
    pub t: MmioTransport,
    mem: GuestMemoryLog,
    queues: Vec<SplitQueueDriver>,
    interrupts: usize,
    data_next: u64,
}

impl Driver {
    /// Drive `t` whose guest RAM is `mem`.
    pub fn new(t: MmioTransport, mem: GuestMemoryLog) -> Self {
        Driver {
            t,
            mem,
            queues: Vec::new(),
            interrupts: 0,
            data_next: DATA_BASE,
        }
    }

    /// Swap in another transport (a device moved to another home) and
    /// return the old one; the driver's ring state carries on.
    pub fn replace_transport(&mut self, t: MmioTransport) -> MmioTransport {
        std::mem::replace(&mut self.t, t)
    }

    fn rd(&mut self, off: u64) -> u32 {
        self.t.read_u32(off)
    }

    fn wr(&mut self, off: u64, v: u32) {
        self.t.write_u32(off, v)
    }

    /// DeviceID.
    pub fn device_id(&mut self) -> u32 {
        self.rd(DEVICE_ID)
    }

    /// Status.
    pub fn status(&mut self) -> u32 {
        self.rd(STATUS)
    }

    /// Interrupts received so far.
    pub fn interrupts(&self) -> usize {
        self.interrupts
    }

    /// A little-endian u64 from the config space.
    pub fn config_u64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.t.read(CONFIG_OFFSET + off, &mut b);
        u64::from_le_bytes(b)
    }

    /// A little-endian u16 from the config space.
    pub fn config_u16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.t.read(CONFIG_OFFSET + off, &mut b);
        u16::from_le_bytes(b)
    }

    /// Negotiate VERSION_1 (+ the device's other features) and start
    /// `queues` queues of `size`.
    pub fn negotiate_and_start(&mut self, queues: u16, size: u16) {
        self.wr(STATUS, 0);
        self.wr(STATUS, STATUS_ACKNOWLEDGE);
        self.wr(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.wr(DEVICE_FEATURES_SEL, 1);
        let high = self.rd(DEVICE_FEATURES);
        self.wr(DEVICE_FEATURES_SEL, 0);
        // Accept everything but EVENT_IDX (bit 29), so every used buffer
        // interrupts and the test can count on it.
        let low = self.rd(DEVICE_FEATURES) & !(1 << 29);
        self.wr(DRIVER_FEATURES_SEL, 0);
        self.wr(DRIVER_FEATURES, low);
        self.wr(DRIVER_FEATURES_SEL, 1);
        self.wr(DRIVER_FEATURES, high);
        self.wr(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(
            self.rd(STATUS) & STATUS_FEATURES_OK,
            0,
            "FEATURES_OK refused"
        );
        self.queues.clear();
        for q in 0..queues {
            let area = QUEUE_AREA * (1 + u64::from(q));
            let queue = SplitQueueDriver::new(&self.mem, q, size, area);
            let (desc, avail, used) = queue.rings();
            self.wr(QUEUE_SEL, u32::from(q));
            assert!(self.rd(QUEUE_NUM_MAX) >= u32::from(size));
            self.wr(QUEUE_NUM, u32::from(size));
            self.wr(QUEUE_DESC_LOW, desc as u32);
            self.wr(QUEUE_DESC_HIGH, 0);
            self.wr(QUEUE_DRIVER_LOW, avail as u32);
            self.wr(QUEUE_DRIVER_HIGH, 0);
            self.wr(QUEUE_DEVICE_LOW, used as u32);
            self.wr(QUEUE_DEVICE_HIGH, 0);
            self.wr(QUEUE_READY, 1);
            assert_eq!(self.rd(QUEUE_READY), 1, "queue {q} not ready");
            self.queues.push(queue);
        }
        self.wr(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(
            self.rd(STATUS) & STATUS_DEVICE_NEEDS_RESET,
            0,
            "activation failed"
        );
    }

    /// Reset the device.
    pub fn reset(&mut self) {
        self.wr(STATUS, 0);
        self.queues.clear();
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 15) & !15;
        if self.data_next + len > MEM_SIZE as u64 {
            self.data_next = DATA_BASE;
        }
        let at = self.data_next;
        self.data_next += len;
        at
    }

    /// Submit a chain of (gpa, len, writable) and wait for its completion;
    /// returns the used length.
    pub fn submit(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u32 {
        self.publish(q, bufs);
        self.wait_used(q)
    }

    /// Publish a chain of (gpa, len, writable) and kick, without waiting.
    fn publish(&mut self, q: u16, bufs: &[(u64, u32, bool)]) {
        let qi = usize::from(q);
        self.queues[qi].add_chain(bufs);
        // What a KVM ioeventfd does for a QueueNotify write.
        self.t.queue_kicks()[qi].1.write(1).unwrap();
    }

    /// Submit a read whose last descriptor (where the status byte goes) is
    /// device-readable, so the device has nowhere to report a status; wait
    /// up to 10 s for DEVICE_NEEDS_RESET. Returns whether the device asked
    /// for a reset, whether a config-change interrupt came, and whether the
    /// chain was (wrongly) put on the used ring.
    pub fn blk_without_status_byte(&mut self, q: u16) -> (bool, bool, bool) {
        let hdr = self.alloc(16);
        self.mem.write_obj(0u32, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u64, GuestAddress(hdr + 8)).unwrap();
        let data = self.alloc(512);
        self.publish(q, &[(hdr, 16, false), (data, 512, false)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut config_irq = false;
        while self.status() & 0x40 == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.t.irq_eventfd().read().is_ok() {
            let status = self.rd(INTERRUPT_STATUS);
            config_irq = status & 2 != 0;
            self.wr(INTERRUPT_ACK, status);
        }
        let completed = self.queues[usize::from(q)].pop_used().is_some();
        let needs_reset = self.status() & 0x40 != 0;
        (needs_reset, config_irq, completed)
    }

    fn wait_used(&mut self, q: u16) -> u32 {
        let qi = usize::from(q);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut pfd = libc::pollfd {
                fd: self.t.irq_eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is valid for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            if pfd.revents & libc::POLLIN != 0 {
                let _ = self.t.irq_eventfd().read();
                let status = self.rd(INTERRUPT_STATUS);
                if status != 0 {
                    self.interrupts += 1;
                    self.wr(INTERRUPT_ACK, status);
                }
            }
            if let Some((_, len)) = self.queues[qi].pop_used() {
                return len;
            }
            assert!(Instant::now() < deadline, "queue {q}: no completion");
        }
    }

    fn blk(&mut self, q: u16, kind: u32, sector: u64, data: Option<(&[u8], bool)>) -> (u8, u64) {
        let hdr = self.alloc(16);
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let mut bufs = vec![(hdr, 16, false)];
        let mut data_at = 0;
        if let Some((bytes, writable)) = data {
            data_at = self.alloc(bytes.len());
            self.mem.write_slice(bytes, GuestAddress(data_at)).unwrap();
            bufs.push((data_at, bytes.len() as u32, writable));
        }
        let st = self.alloc(1);
        self.mem.write_obj(0xeeu8, GuestAddress(st)).unwrap();
        bufs.push((st, 1, true));
        self.submit(q, &bufs);
        (self.mem.read_obj(GuestAddress(st)).unwrap(), data_at)
    }

    /// T_OUT; returns the status byte.
    pub fn blk_write(&mut self, q: u16, sector: u64, data: &[u8]) -> u8 {
        self.blk(q, 1, sector, Some((data, false))).0
    }

    /// T_IN; returns (status, data).
    pub fn blk_read(&mut self, q: u16, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let zeros = vec![0u8; len];
        let (st, at) = self.blk(q, 0, sector, Some((&zeros, true)));
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(at)).unwrap();
        (st, out)
    }

    /// A request without data (e.g. T_FLUSH = 4); returns the status byte.
    pub fn blk_simple(&mut self, q: u16, kind: u32, sector: u64) -> u8 {
        self.blk(q, kind, sector, None).0
    }

    /// T_GET_ID; returns (status, id bytes).
    pub fn blk_get_id(&mut self, q: u16) -> (u8, Vec<u8>) {
        let zeros = [0u8; 20];
        let (st, at) = self.blk(q, 8, 0, Some((&zeros, true)));
        let mut out = vec![0u8; 20];
        self.mem.read_slice(&mut out, GuestAddress(at)).unwrap();
        (st, out)
    }
}
