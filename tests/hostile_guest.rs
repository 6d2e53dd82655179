// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A guest that keeps republishing buffers must not keep a worker inside
//! one batch: the reference virtio-blk device (null target) served by the
//! kit's daemon, a driver thread that republishes as fast as the device
//! completes (the device slowed down with the test knob so that it never
//! catches up), and the control path (GET_VRING_BASE) and the other queue
//! still answered. Every wait is bounded.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use virtio_backend_kit::vhost::VhostBackend;
use virtio_backend_kit::vhost_user::ServeMode;
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 64;

/// A read of sector 0 into 512 bytes: header, data, status.
fn read_request(q: &mut SplitQueue) -> Vec<Buf> {
    blk::request(q, blk::T_IN, 0, Some((&[0u8; 512], true)), 0xff).0
}

/// The blk device (null target) configured by `cfg`, served by the kit's
/// daemon, with a ready frontend: `queues` queues of [`QSIZE`], each
/// request taking `latency` more.
fn blk_rig(queues: u16, latency: Option<Duration>) -> (Daemon<BlkDevice>, Client, GuestMem) {
    let cfg = BlkConfig {
        queues,
        queue_size: QSIZE,
        injected_latency: latency,
        ..BlkConfig::default()
    };
    let queues = u64::from(queues);
    let device = BlkDevice::new(Target::null(1 << 20), cfg).unwrap();
    let daemon = spawn_daemon(Arc::new(device), ServeMode::KeepServing);
    let (client, guest) = daemon.ready_frontend(queues, VIRTIO_F_VERSION_1, GUEST_GPA, GUEST_SIZE);
    (daemon, client, guest)
}

/// Start queue 1 and complete one read on it within the timeout (`what`
/// names the step); returns the request's status byte.
fn queue_1_read(guest: &GuestMem, client: &mut Client, what: &str) -> u8 {
    let mut q1 = SplitQueue::new(guest, 1, QSIZE, GUEST_GPA + QUEUE_AREA);
    let bufs = read_request(&mut q1);
    client.start_queue(&q1, 0);
    within_timeout(what, move || {
        let head = q1.add_chain(&bufs);
        q1.kick();
        assert_eq!(q1.wait_used(1), vec![(u32::from(head), 513)]);
        q1.read(bufs[2].gpa, 1)[0]
    })
}

#[test]
fn an_endless_batch_does_not_hold_the_worker() {
    // Each request takes 1 ms, so the driver thread republishes far
    // faster than the device completes: the device would catch up only
    // if the driver thread were off the CPU for a whole ring (64 ms).
    let (daemon, mut client, guest) = blk_rig(2, Some(Duration::from_millis(1)));

    let mut q0 = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    let bufs = read_request(&mut q0);
    client.start_queue(&q0, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let hostile = {
        let (stop, published) = (stop.clone(), published.clone());
        std::thread::spawn(move || {
            // Publish the same request again whenever the ring has room.
            let head = q0.add_chain(&bufs);
            q0.kick();
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                if q0.avail_idx().wrapping_sub(q0.used_idx()) < QSIZE {
                    q0.publish(head);
                    n += 1;
                    if n.is_multiple_of(8) {
                        q0.kick();
                    }
                }
            }
            published.store(n, Ordering::Relaxed);
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The control path is answered while the guest keeps publishing.
    let base = within_timeout("GET_VRING_BASE during an endless batch", {
        let fe = client.frontend.clone();
        move || fe.get_vring_base(0).unwrap()
    });
    stop.store(true, Ordering::Relaxed);
    hostile.join().unwrap();
    let published = published.load(Ordering::Relaxed);
    println!("VBK-HOSTILE endless_batch served={base} published={published}");
    assert!(
        published > u64::from(QSIZE) * 2,
        "the device barely ran: {published}"
    );

    // The daemon goes on serving: the other queue completes a request.
    let status = queue_1_read(&guest, &mut client, "queue 1");
    assert_eq!(status, blk::S_OK, "VIRTIO_BLK_S_OK");
    drop(daemon);
}

/// A batch that ends on a driver error (here the available index jumps
/// more than a queue size ahead while the device works) still signals
/// the completions it already put in the used ring.
#[test]
fn completions_before_an_error_mid_batch_are_signalled() {
    // Slow enough that the bad index lands while the batch runs.
    let (daemon, mut client, guest) = blk_rig(1, Some(Duration::from_millis(20)));
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    let mut status = Vec::new();
    for _ in 0..3 {
        let bufs = read_request(&mut q);
        status.push(bufs[2].gpa);
        q.add_chain(&bufs);
    }
    q.kick();
    std::thread::sleep(Duration::from_millis(10));
    let bad = q.avail_idx().wrapping_add(QSIZE * 3);
    q.set_avail_idx(bad);
    assert!(
        q.wait_call(Duration::from_secs(5)),
        "completions before the error were never signalled"
    );
    assert_eq!(q.used_idx(), 3);
    for s in status {
        assert_eq!(q.read(s, 1), vec![0], "VIRTIO_BLK_S_OK");
    }
    assert!(
        q.wait_err(Duration::from_secs(5)),
        "the error was not reported"
    );
    drop(daemon);
}

/// A request whose status byte lies outside guest memory cannot be
/// completed honestly: a used entry would make the driver read a status
/// nobody wrote. The requests before it in the batch complete and are
/// signalled; that one stays off the used ring, the queue's err fd fires,
/// the queue takes nothing more until it is set up again, and the other
/// queue goes on serving.
#[test]
fn a_request_whose_status_byte_is_unreachable_is_not_completed() {
    let (daemon, mut client, guest) = blk_rig(2, None);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    let good = read_request(&mut q);
    let mut bad = read_request(&mut q);
    // The status descriptor points past the end of guest memory.
    bad[2].gpa = GUEST_GPA + GUEST_SIZE + 0x1000;
    let after = read_request(&mut q);
    q.add_chain(&good);
    q.add_chain(&bad);
    q.add_chain(&after);
    q.kick();
    assert!(
        q.wait_err(Duration::from_secs(5)),
        "the unreachable status byte was not reported on the err fd"
    );
    assert!(
        q.wait_call(Duration::from_secs(5)),
        "the good request was not signalled"
    );
    assert_eq!(
        q.used_idx(),
        1,
        "only the request before the bad one completes"
    );
    assert_eq!(q.read(good[2].gpa, 1), vec![0], "VIRTIO_BLK_S_OK");
    // Kicking again takes nothing more from the stopped ring.
    q.kick();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q.used_idx(), 1, "a stopped queue completed a request");
    assert_eq!(
        q.read(after[2].gpa, 1),
        vec![0xff],
        "status written on a stopped queue"
    );

    queue_1_read(&guest, &mut client, "queue 1 after queue 0 stopped");
    drop(daemon);
}
