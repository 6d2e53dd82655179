// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! In-flight tracking across a backend restart (`INFLIGHT_SHMFD`), driven
//! over real sockets with memfd memory.
//!
//! A first backend tracks requests in the in-flight memfd it hands to the
//! frontend. The frontend then stages the state a backend leaves when it is
//! killed mid-I/O with out-of-order completion: of three chains made
//! available, the first was popped and is still in flight, the second was
//! popped and completed, the third was never popped. A freshly started
//! backend given the same memfd must resubmit exactly the first, skip the
//! second and then carry on with the third.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;
use virtio_backend_kit::vhost::vhost_user::message::VhostUserInflight;
use virtio_backend_kit::vhost::vhost_user::VhostUserFrontend;
use virtio_backend_kit::vhost::VhostBackend;
use virtio_backend_kit::vhost_user::ServeMode;

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 16;
const FEATURES: u64 = 1 << 32;
/// Per-queue area: 16-byte header, 16 bytes per descriptor, 64-byte aligned.
const HEADER: u64 = 16;

fn desc_record(file: &File, head: u16) -> (u8, u64) {
    let mut rec = [0u8; 16];
    file.read_exact_at(&mut rec, HEADER + 16 * u64::from(head))
        .unwrap();
    (rec[0], u64::from_le_bytes(rec[8..16].try_into().unwrap()))
}

fn header_used_idx(file: &File) -> u16 {
    let mut b = [0u8; 2];
    file.read_exact_at(&mut b, 14).unwrap();
    u16::from_le_bytes(b)
}

fn set_desc_record(file: &File, head: u16, inflight: u8, counter: u64) {
    let mut rec = [0u8; 16];
    rec[0] = inflight;
    rec[8..16].copy_from_slice(&counter.to_le_bytes());
    file.write_all_at(&rec, HEADER + 16 * u64::from(head))
        .unwrap();
}

#[test]
fn restarted_backend_resubmits_in_flight_requests_only() {
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);

    // First backend: tracks two completed requests.
    let first = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let mut client = first.frontend(1);
    client.negotiate(FEATURES, Client::default_protocol());
    let (info, memfd) = client
        .frontend
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .unwrap();
    assert_eq!(info.num_queues, 1);
    assert!(info.mmap_size >= HEADER + 16 * u64::from(QSIZE));
    client
        .frontend
        .set_mem_table(&[guest.region_info()])
        .unwrap();
    client.start_queue(&q, 0);
    for seed in 0..2u8 {
        let data = pattern(seed, 64);
        let (head, out) = q.add_request(&data, 64);
        q.kick();
        assert_eq!(q.wait_used(1), vec![(u32::from(head), 64)]);
        assert_eq!(q.read(out, 64), transform(&data));
        let (inflight, counter) = desc_record(&memfd, head);
        assert_eq!((inflight, counter), (0, u64::from(seed)), "head {head}");
    }
    assert_eq!(header_used_idx(&memfd), 2);
    drop(client);

    // What the backend left when it died: h1 popped and in flight, h2
    // popped and completed (out of order), h3 made available, never popped.
    let (h1, out1) = q.add_request(&pattern(11, 64), 64);
    let (h2, out2) = q.add_request(&pattern(12, 64), 64);
    let (h3, out3) = q.add_request(&pattern(13, 64), 64);
    set_desc_record(&memfd, h1, 1, 2);
    set_desc_record(&memfd, h2, 0, 3);
    q.write(out2, &[0x77; 64]);
    q.write(q.used + 4 + 8 * 2, &u32::from(h2).to_le_bytes());
    q.write(q.used + 4 + 8 * 2 + 4, &64u32.to_le_bytes());
    q.write(q.used + 2, &3u16.to_le_bytes());
    memfd.write_all_at(&3u16.to_le_bytes(), 14).unwrap();
    assert_eq!(q.wait_used(1), vec![(u32::from(h2), 64)]);

    // The restarted backend gets the same memfd back.
    let second = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let mut client = second.frontend(1);
    client.negotiate(FEATURES, Client::default_protocol());
    client
        .frontend
        .set_inflight_fd(&info, memfd.as_raw_fd())
        .unwrap();
    client
        .frontend
        .set_mem_table(&[guest.region_info()])
        .unwrap();
    // A frontend that lost the backend restarts the ring at its used index.
    client.start_queue(&q, 3);
    let used = q.wait_used(2);
    assert_eq!(used, vec![(u32::from(h1), 64), (u32::from(h3), 64)]);
    assert_eq!(q.read(out1, 64), transform(&pattern(11, 64)));
    assert_eq!(q.read(out3, 64), transform(&pattern(13, 64)));
    assert_eq!(q.read(out2, 64), vec![0x77; 64], "completed request re-run");
    assert_eq!(header_used_idx(&memfd), 5);
    assert_eq!(desc_record(&memfd, h1).0, 0);
    assert_eq!(desc_record(&memfd, h3).0, 0);
}

#[test]
fn bad_inflight_geometry_is_refused() {
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let mut client = daemon.frontend(1);
    client.negotiate(FEATURES, Client::default_protocol());
    for (queues, size) in [(0u16, 16u16), (1, 0), (1, 12), (9, 16)] {
        assert!(
            client
                .frontend
                .get_inflight_fd(&VhostUserInflight::new(0, 0, queues, size))
                .is_err(),
            "{queues} x {size} accepted"
        );
    }
    // A memfd too small for the geometry it claims.
    let (info, memfd) = client
        .frontend
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 16))
        .unwrap();
    let lying = VhostUserInflight::new(info.mmap_size, 0, 1, 4096);
    assert!(client
        .frontend
        .set_inflight_fd(&lying, memfd.as_raw_fd())
        .is_err());
    assert_eq!(client.frontend.get_features().unwrap() & FEATURES, FEATURES);
}
