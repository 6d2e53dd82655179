// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The reference virtio-blk device's data path, driven from the driver side:
//! requests are laid out as descriptor chains in memfd guest memory shared
//! over a real vhost-user socket, the queue is kicked, and the results are
//! read from the used ring, the status bytes and the image file. Malicious
//! chains (out-of-range addresses, loops, zero-length and oversized buffers,
//! too many segments) must each get a clear answer and leave the device
//! serving.

mod common;

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use common::blk::{self, S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use common::*;
use virtio_backend_kit::vhost_user::ServeMode;
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 64;
const IMAGE_SIZE: u64 = 1 << 20;
const STATUS_UNTOUCHED: u8 = 0xee;

struct BlkRig {
    _daemon: Daemon<BlkDevice>,
    _client: Client,
    queues: Vec<SplitQueue>,
    image: File,
    _dir: tempfile::TempDir,
}

impl BlkRig {
    fn new(num_queues: u16, features: u64) -> BlkRig {
        let dir = tempfile::tempdir().unwrap();
        let (path, image) = blk::image(dir.path(), IMAGE_SIZE);
        let cfg = BlkConfig {
            queues: num_queues,
            queue_size: QSIZE,
            ..BlkConfig::default()
        };
        let device = BlkDevice::new(Target::open_image(&path, false).unwrap(), cfg).unwrap();
        let daemon = spawn_daemon(Arc::new(device), ServeMode::Once);
        let (mut client, guest) =
            daemon.ready_frontend(u64::from(num_queues), features, GUEST_GPA, GUEST_SIZE);
        let queues: Vec<SplitQueue> = (0..num_queues)
            .map(|i| {
                let q = SplitQueue::new(&guest, i, QSIZE, GUEST_GPA + u64::from(i) * QUEUE_AREA);
                client.start_queue(&q, 0);
                q
            })
            .collect();
        BlkRig {
            _daemon: daemon,
            _client: client,
            queues,
            image,
            _dir: dir,
        }
    }
}

/// Queue a request: header, optional data buffer, status byte. Returns
/// (head, data gpa, status gpa).
fn request(
    q: &mut SplitQueue,
    kind: u32,
    sector: u64,
    data: Option<(&[u8], bool)>,
) -> (u16, u64, u64) {
    let (bufs, data_gpa, status) = blk::request(q, kind, sector, data, STATUS_UNTOUCHED);
    let head = q.add_chain(&bufs);
    (head, data_gpa, status)
}

fn complete(q: &mut SplitQueue) -> (u32, u32) {
    q.kick();
    let used = q.wait_used(1);
    used[0]
}

fn status(q: &SplitQueue, at: u64) -> u8 {
    q.read(at, 1)[0]
}

/// A one-queue rig (VERSION_1) with the header of a read of sector 0 and
/// an untouched status byte laid out on its queue: (rig, header gpa,
/// status gpa).
fn rig_with_a_read_header() -> (BlkRig, u64, u64) {
    let mut rig = BlkRig::new(1, VIRTIO_F_VERSION_1);
    let (hdr, st) = blk::header_and_status(&mut rig.queues[0], T_IN, 0, STATUS_UNTOUCHED);
    (rig, hdr, st)
}

/// Reset the status byte at `st`, then queue and complete a request with
/// the header at `hdr` and the `data` buffers: (status, used length).
fn read_into(q: &mut SplitQueue, hdr: u64, data: &[Buf], st: u64) -> (u8, u32) {
    q.write(st, &[STATUS_UNTOUCHED]);
    q.add_chain(&blk::chain(hdr, data, st));
    let (_, len) = complete(q);
    (status(q, st), len)
}

/// A good write then read, to prove the device still serves.
fn still_serves(rig: &mut BlkRig, q: usize, sector: u64, seed: u8) {
    let q = &mut rig.queues[q];
    let data = pattern(seed, 4096);
    let (_, _, st) = request(q, T_OUT, sector, Some((&data, false)));
    let (_, len) = complete(q);
    assert_eq!((status(q, st), len), (S_OK, 1));
    let (_, buf, st) = request(q, T_IN, sector, Some((&[0u8; 4096], true)));
    let (_, len) = complete(q);
    assert_eq!((status(q, st), len), (S_OK, 4097));
    assert_eq!(q.read(buf, 4096), data);
}

#[test]
fn write_read_flush_get_id_round_trip_reaches_the_image() {
    let mut rig = BlkRig::new(1, VIRTIO_F_VERSION_1);
    still_serves(&mut rig, 0, 8, 3);
    let q = &mut rig.queues[0];
    let (_, _, st) = request(q, T_FLUSH, 0, None);
    let (_, len) = complete(q);
    assert_eq!((status(q, st), len), (S_OK, 1));
    let (_, id, st) = request(q, T_GET_ID, 0, Some((&[0u8; 20], true)));
    let (_, len) = complete(q);
    assert_eq!(status(q, st), S_OK);
    assert_eq!(len, 21);
    assert!(q.read(id, 20).starts_with(b"vbk-"));
    assert_eq!(blk::read_image(&rig.image, 8 * 512, 4096), pattern(3, 4096));
}

#[test]
fn out_of_range_sector_and_unknown_type_get_virtio_status() {
    let mut rig = BlkRig::new(1, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let q = &mut rig.queues[0];
    let last = IMAGE_SIZE / 512;
    let (_, _, st) = request(q, T_IN, last, Some((&[0u8; 512], true)));
    complete(q);
    assert_eq!(status(q, st), S_IOERR, "read past the end");
    let (_, _, st) = request(q, T_OUT, last - 1, Some((&[1u8; 1024], false)));
    complete(q);
    assert_eq!(status(q, st), S_IOERR, "write straddling the end");
    let (_, _, st) = request(q, T_IN, u64::MAX, Some((&[0u8; 512], true)));
    complete(q);
    assert_eq!(status(q, st), S_IOERR, "sector overflow");
    let (_, _, st) = request(q, 0x7777, 0, Some((&[0u8; 512], true)));
    complete(q);
    assert_eq!(status(q, st), S_UNSUPP, "unknown type");
    let (_, _, st) = request(q, T_OUT, 0, Some((&[1u8; 100], false)));
    complete(q);
    assert_eq!(status(q, st), S_IOERR, "length not a multiple of 512");
    still_serves(&mut rig, 0, 0, 9);
}

#[test]
fn out_of_range_guest_addresses_are_refused() {
    let (mut rig, hdr, st) = rig_with_a_read_header();
    let q = &mut rig.queues[0];
    let data_outside = [
        // Data buffer far outside guest memory.
        0x7fff_0000_0000,
        // Data buffer running past the end of guest memory.
        GUEST_GPA + GUEST_SIZE - 512,
    ];
    for gpa in data_outside {
        let (st_val, _) = read_into(q, hdr, &[Buf::writable(gpa, 4096)], st);
        assert_eq!(st_val, S_IOERR, "data buffer at {gpa:#x}");
    }
    // Header outside guest memory, status byte reachable: IOERR.
    q.write(st, &[0xff]);
    q.add_chain(&[Buf::readable(0x7fff_0000_0000, 16), Buf::writable(st, 1)]);
    let (_, len) = complete(q);
    assert_eq!(len, 1);
    assert_eq!(status(q, st), S_IOERR);
    still_serves(&mut rig, 0, 16, 4);
}

#[test]
fn zero_length_and_oversized_buffers_are_refused() {
    let (mut rig, hdr, st) = rig_with_a_read_header();
    let q = &mut rig.queues[0];
    // A 2 GiB data buffer: refused, nothing allocated for it.
    let (st_val, _) = read_into(q, hdr, &[Buf::writable(GUEST_GPA, 0x8000_0000)], st);
    assert_eq!(st_val, S_IOERR);
    // A zero-length data descriptor in the middle of a read.
    let data = q.alloc(512);
    let zero_then_512 = [Buf::writable(data, 0), Buf::writable(data, 512)];
    assert_eq!(read_into(q, hdr, &zero_then_512, st), (S_OK, 513));
    still_serves(&mut rig, 0, 24, 5);
}

/// Chains with no status byte the device can find: not completed (a used
/// entry would make the driver read a status nobody wrote); the queue's
/// err fd fires and the queue stops until it is set up again.
#[test]
fn chains_without_a_reachable_status_byte_stop_the_queue() {
    /// A chain laid out from (header, status) addresses.
    type Layout = fn(u64, u64) -> Vec<Buf>;
    let cases: [(&str, Layout); 2] = [
        ("zero-length status descriptor", |hdr, st| {
            vec![Buf::readable(hdr, 16), Buf::writable(st, 0)]
        }),
        // Lengths adding up past 2^32 bytes: illegal, the walk stops
        // before the status descriptor.
        ("chain over 4 GiB", |hdr, st| {
            blk::chain(hdr, &[Buf::writable(GUEST_GPA, u32::MAX)], st)
        }),
    ];
    for (what, chain) in cases {
        let (mut rig, hdr, st) = rig_with_a_read_header();
        let q = &mut rig.queues[0];
        q.add_chain(&chain(hdr, st));
        q.kick();
        assert!(q.wait_err(Duration::from_secs(5)), "{what}: no err signal");
        assert_eq!(q.used_idx(), 0, "{what}: completed");
        assert_eq!(status(q, st), STATUS_UNTOUCHED, "{what}: status written");
    }
}

#[test]
fn descriptor_loop_and_too_many_segments_do_not_hang() {
    let mut rig = BlkRig::new(1, VIRTIO_F_VERSION_1);
    let q = &mut rig.queues[0];
    let hdr = q.alloc(16);
    q.write(hdr, &blk::header(T_IN, 0));
    let data = q.alloc(512);
    // d0 -> d1 -> d0 -> ...: a loop.
    let first = q.alloc_descs(2);
    q.write_desc(
        first,
        Desc {
            addr: hdr,
            len: 16,
            flags: VRING_DESC_F_NEXT,
            next: first + 1,
        },
    );
    q.write_desc(
        first + 1,
        Desc {
            addr: data,
            len: 512,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: first,
        },
    );
    q.publish(first);
    // The walk stops after queue-size descriptors; the device sees an
    // over-long chain and answers IOERR in the last writable byte, or gives
    // up on the chain (used length 0). Either way it returns it.
    let (id, len) = complete(q);
    assert_eq!(id, u32::from(first));
    assert!(len <= 1, "used length {len} for a looping chain");
    // More segments than seg_max: each 512 bytes, 60 of them fill the queue.
    let st = q.alloc(1);
    q.write(st, &[STATUS_UNTOUCHED]);
    let segments = vec![Buf::writable(data, 512); usize::from(QSIZE - 4)];
    q.add_chain(&blk::chain(hdr, &segments, st));
    complete(q);
    let st_val = status(q, st);
    assert!(st_val == S_OK || st_val == S_IOERR, "status {st_val}");
    still_serves(&mut rig, 0, 32, 6);
}

#[test]
fn two_queues_carry_independent_traffic() {
    let mut rig = BlkRig::new(2, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    for round in 0..8u8 {
        still_serves(&mut rig, 0, u64::from(round) * 8, round);
        still_serves(&mut rig, 1, 512 + u64::from(round) * 8, round + 100);
    }
    assert_eq!(
        blk::read_image(&rig.image, 512 * 512 + 7 * 8 * 512, 4096),
        pattern(107, 4096)
    );
}
