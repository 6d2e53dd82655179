// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The example devices through the kit's conformance harness
//! (`virtio_backend_kit::testing::Conformance`): traffic in one home, a
//! move (snapshot → envelope → restore) to another, the same traffic
//! again, for every pair of homes (in process, vhost-user).
//!
//! The console carries host input the guest had no buffers for across
//! each move (its own state, through DEVICE_STATE out of process); the
//! disk's requests written before a move are read back after it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_backend_kit::testing::{Conformance, Home, MoveReport, Phase, Rig};
use vmm_example::devices::{BlkConfig, BlkDevice, ConsoleDevice, Target};

const WAIT: Duration = Duration::from_secs(10);
const RX_BUF: u32 = 4096;
/// Host input per move: more than the two receive buffers posted before.
const TYPED: usize = 20_000;

fn pipe() -> (File, File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// The host's ends of one console: (what it types into, what it reads).
type HostEnds = (File, File);

/// The guest side of a console: receive buffers posted, by head.
#[derive(Default)]
struct ConsoleGuest {
    posted: HashMap<u16, u64>,
    next: u64,
}

impl ConsoleGuest {
    fn post(&mut self, rig: &mut Rig, n: usize) {
        let rx = &mut rig.queues[0];
        let start = rx.data_area();
        for _ in 0..n {
            if self.next < start || self.next + u64::from(RX_BUF) > start + 0x8_0000 {
                self.next = start;
            }
            let head = rx.add_chain(&[(self.next, RX_BUF, true)]);
            self.posted.insert(head, self.next);
            self.next += u64::from(RX_BUF);
        }
        rig.kick(0);
    }

    fn receive(&mut self, rig: &mut Rig, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            let (id, len) = rig
                .wait_used(0, WAIT)
                .unwrap_or_else(|| panic!("received {} of {want} bytes", got.len()));
            let gpa = self.posted.remove(&(id as u16)).expect("a posted buffer");
            got.extend(rig.queues[0].read(gpa, len as usize));
        }
        got
    }

    /// A line the guest transmits arrives on the host's end.
    fn output_reaches(&mut self, rig: &mut Rig, host_out: &mut File) {
        self.transmit(rig, b"guest output\n");
        let mut echo = [0u8; 13];
        host_out.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"guest output\n");
    }

    fn transmit(&mut self, rig: &mut Rig, bytes: &[u8]) {
        let tx = &mut rig.queues[1];
        let gpa = tx.data_area();
        tx.write(gpa, bytes);
        tx.add_chain(&[(gpa, bytes.len() as u32, false)]);
        rig.kick(1);
        assert!(rig.wait_used(1, WAIT).is_some(), "transmit never completed");
    }
}

/// Every pair of homes moved, each carrying the `pending` bytes (plus the
/// state's format byte) as the console's own state.
fn check_console_moves(reports: &[MoveReport], pending: usize, label: &str) {
    for r in reports {
        assert_eq!(r.device_state_len, 1 + pending, "{r:?}");
        println!(
            "VBK-CROSSHOME device=console{label} from={} to={} pending={pending} lost=0",
            r.from, r.to
        );
    }
    assert_eq!(reports.len(), Home::ALL.len().pow(2));
}

fn wait_pending(dev: &ConsoleDevice, want: usize) {
    let deadline = Instant::now() + WAIT;
    while dev.pending() != want {
        assert!(Instant::now() < deadline, "pending {} bytes", dev.pending());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn console_in_every_home_and_between_them_loses_no_byte() {
    let hosts: Rc<RefCell<Vec<HostEnds>>> = Rc::default();
    let made = hosts.clone();
    let harness = Conformance::new(move || {
        let (input, host_in) = pipe();
        let (host_out, output) = pipe();
        made.borrow_mut().push((host_in, host_out));
        Arc::new(ConsoleDevice::new(input, output, 64).expect("console"))
    })
    .queue_size(64);

    let input: Vec<u8> = (0..TYPED as u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut guest = ConsoleGuest::default();
    let mut delivered = Vec::new();
    let mut pending_at_move = 0;
    let reports = harness
        .run_all(|rig, phase, dev| {
            let mut hosts = hosts.borrow_mut();
            let (host_in, host_out) = hosts.last_mut().expect("a console was made");
            match phase {
                Phase::Before => {
                    guest = ConsoleGuest::default();
                    delivered.clear();
                    // Room for two buffers of what is typed: the rest
                    // waits in the device when it moves.
                    host_in.write_all(&input).unwrap();
                    guest.post(rig, 2);
                    delivered.extend(guest.receive(rig, 2 * RX_BUF as usize));
                    pending_at_move = TYPED - 2 * RX_BUF as usize;
                    wait_pending(dev, pending_at_move);
                }
                Phase::After => {
                    guest.post(rig, 8);
                    delivered.extend(guest.receive(rig, pending_at_move));
                    assert_eq!(delivered, input, "host input lost or reordered");
                }
            }
            guest.output_reaches(rig, host_out);
        })
        .unwrap();
    check_console_moves(&reports, pending_at_move, "");
}

/// The host input a regular file: epoll cannot watch it (nor `/dev/null`,
/// the input of the home it moves to), so the device reads it as the guest
/// takes bytes, waking its own worker. Before the fix the in-process home
/// never read it and the vhost-user daemon refused to start.
#[test]
fn console_reading_a_regular_file_moves_between_homes_with_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let typed = dir.path().join("typed");
    let input: Vec<u8> = (0..TYPED as u32).map(|i| (i * 13 + i / 97) as u8).collect();
    std::fs::write(&typed, &input).unwrap();
    let outputs: Rc<RefCell<Vec<File>>> = Rc::default();
    let made = outputs.clone();
    let count = std::cell::Cell::new(0usize);
    let harness = Conformance::new(move || {
        // The first home of each move reads the file, the second
        // `/dev/null`: what it delivers crossed the move.
        let path = if count.get().is_multiple_of(2) {
            typed.as_path()
        } else {
            std::path::Path::new("/dev/null")
        };
        count.set(count.get() + 1);
        let (host_out, output) = pipe();
        made.borrow_mut().push(host_out);
        let file = File::open(path).expect("console input");
        Arc::new(ConsoleDevice::new(file, output, 64).expect("console"))
    })
    .queue_size(64);
    let mut guest = ConsoleGuest::default();
    let mut delivered = Vec::new();
    let pending_at_move = TYPED - 2 * RX_BUF as usize;
    let reports = harness
        .run_all(|rig, phase, dev| {
            match phase {
                Phase::Before => {
                    guest = ConsoleGuest::default();
                    delivered.clear();
                    guest.post(rig, 2);
                    delivered.extend(guest.receive(rig, 2 * RX_BUF as usize));
                    wait_pending(dev, pending_at_move);
                }
                Phase::After => {
                    guest.post(rig, 8);
                    delivered.extend(guest.receive(rig, pending_at_move));
                    assert_eq!(delivered, input, "host input lost or reordered");
                }
            }
            let mut outputs = outputs.borrow_mut();
            let host_out = outputs.last_mut().expect("a console was made");
            guest.output_reaches(rig, host_out);
        })
        .unwrap();
    check_console_moves(&reports, pending_at_move, " input=file");
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const RECORD: u32 = 4096;

fn record(n: u64) -> Vec<u8> {
    (0..u64::from(RECORD))
        .map(|i| (n * 131 + i * 7) as u8)
        .collect()
}

/// One blk request on queue 0: header, data, status; returns the status
/// and (for reads) the data.
fn blk(rig: &mut Rig, kind: u32, sector: u64, data: Option<&[u8]>) -> (u8, Vec<u8>) {
    let q = &mut rig.queues[0];
    let hdr = q.data_area();
    let buf = hdr + 0x1000;
    let status = buf + u64::from(RECORD);
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&kind.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&sector.to_le_bytes());
    q.write(hdr, &header);
    if let Some(data) = data {
        q.write(buf, data);
    }
    q.write(status, &[0xee]);
    q.add_chain(&[
        (hdr, 16, false),
        (buf, RECORD, kind == T_IN),
        (status, 1, true),
    ]);
    rig.kick(0);
    assert!(rig.wait_used(0, WAIT).is_some(), "request never completed");
    let q = &rig.queues[0];
    (q.read(status, 1)[0], q.read(buf, RECORD as usize))
}

#[test]
fn disk_in_every_home_and_between_them_keeps_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    File::create(&path).unwrap().set_len(4 << 20).unwrap();
    let image = path.clone();
    let harness = Conformance::new(move || {
        let cfg = BlkConfig {
            queues: 1,
            queue_size: 64,
            ..BlkConfig::default()
        };
        let target = Target::open_image(&image, false).expect("image");
        Arc::new(BlkDevice::new(target, cfg).expect("blk device"))
    });
    let mut round = 0u64;
    let reports = harness
        .run_all(|rig, phase, _dev| {
            if phase == Phase::Before {
                round += 1;
            }
            // Before: records 0..8 of this round; after: 8..16, and all
            // 16 read back.
            let range = match phase {
                Phase::Before => 0..8,
                Phase::After => 8..16,
            };
            for n in range {
                let n = round * 100 + n;
                assert_eq!(blk(rig, T_OUT, n * 8, Some(&record(n))).0, S_OK);
            }
            if phase == Phase::After {
                for n in 0..16 {
                    let n = round * 100 + n;
                    let (status, data) = blk(rig, T_IN, n * 8, None);
                    assert_eq!(status, S_OK);
                    assert_eq!(data, record(n), "record {n}");
                }
            }
        })
        .unwrap();
    for r in &reports {
        println!(
            "VBK-CROSSHOME device=blk from={} to={} snapshot={} bytes lost=0",
            r.from, r.to, r.snapshot_len
        );
    }
    assert_eq!(reports.len(), Home::ALL.len().pow(2));
}
