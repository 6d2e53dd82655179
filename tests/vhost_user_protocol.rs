// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user protocol conformance of the kit's daemon, over a real unix
//! socket with real memfd guest memory.
//!
//! The happy paths are driven by the `vhost` crate's `Frontend`; requests it
//! cannot send (or cannot send malformed) are written byte by byte with
//! [`common::RawClient`]. Every wait is bounded: a bug fails a test, it never
//! hangs it.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use virtio_backend_kit::vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserProtocolFeatures,
};
use virtio_backend_kit::vhost::vhost_user::VhostUserFrontend;
use virtio_backend_kit::vhost::{VhostBackend, VhostUserDirtyLogRegion};
use virtio_backend_kit::vhost_user::ServeMode;

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 16;
const NUM_QUEUES: usize = 2;
/// Short wait used to show something does NOT happen.
const QUIET: Duration = Duration::from_millis(200);

fn code(req: FrontendReq) -> u32 {
    req.into()
}

/// A daemon, a negotiated frontend and mapped guest memory.
struct Rig {
    daemon: Daemon<TestDevice>,
    client: Client,
    guest: GuestMem,
}

impl Rig {
    /// Negotiate `features` (plus bit 30) and the default protocol features,
    /// then install the memory table.
    fn new(features: u64) -> Rig {
        let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::KeepServing);
        Rig::connect(daemon, features)
    }

    fn connect(daemon: Daemon<TestDevice>, features: u64) -> Rig {
        let (client, guest) =
            daemon.ready_frontend(NUM_QUEUES as u64, features, GUEST_GPA, GUEST_SIZE);
        Rig {
            daemon,
            client,
            guest,
        }
    }

    fn queue(&self, index: u16) -> SplitQueue {
        SplitQueue::new(
            &self.guest,
            index,
            QSIZE,
            GUEST_GPA + u64::from(index) * QUEUE_AREA,
        )
    }

    /// A started and enabled queue.
    fn running_queue(&mut self, index: u16) -> SplitQueue {
        let q = self.queue(index);
        self.client.start_queue(&q, 0);
        self.daemon
            .device
            .wait_for_call(&DeviceCall::QueueStarted(index));
        q
    }

    fn raw(&self) -> &RawClient {
        &self.client.raw
    }
}

/// Send `data` through `q`, check the used entry and the returned bytes.
fn roundtrip(q: &mut SplitQueue, data: &[u8]) {
    let (head, out) = q.add_request(data, data.len() as u32);
    q.kick();
    let used = q.wait_used(1);
    assert_eq!(used, vec![(u32::from(head), data.len() as u32)]);
    assert_eq!(q.read(out, data.len()), transform(data));
}

/// A `SET_MEM_TABLE` payload for `regions` (gpa, size, user_addr, offset).
fn mem_table_payload(num_regions: u32, regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = num_regions.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, uaddr, off) in regions {
        p.extend_from_slice(&u64s(&[gpa, size, uaddr, off]));
    }
    p
}

/// A `SET_VRING_ADDR` payload for queue `index` with `q`'s addresses.
fn vring_addr_payload(index: u32, q: &SplitQueue) -> Vec<u8> {
    let c = q.config_data();
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes()); // flags
    p.extend_from_slice(&u64s(&[
        c.desc_table_addr,
        c.used_ring_addr,
        c.avail_ring_addr,
        0,
    ]));
    p
}

/// A `VhostUserConfig` payload.
fn config_payload(offset: u32, size: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(data);
    p
}

/// Raw negotiation with REPLY_ACK, for tests that need no `Frontend`.
fn raw_negotiate(raw: &RawClient) {
    raw.send(
        code(FrontendReq::SET_FEATURES),
        FLAG_VERSION_1,
        &u64s(&[TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES]),
        &[],
    );
    let proto = Client::default_protocol().bits();
    assert_eq!(
        raw.ack(
            code(FrontendReq::SET_PROTOCOL_FEATURES),
            &u64s(&[proto]),
            &[]
        ),
        0
    );
}

/// Raw `SET_MEM_TABLE` of `guest`; returns the ack.
fn raw_set_mem_table(raw: &RawClient, guest: &GuestMem) -> u64 {
    let p = mem_table_payload(1, &[(guest.gpa, guest.size, guest.host_addr(guest.gpa), 0)]);
    raw.ack(
        code(FrontendReq::SET_MEM_TABLE),
        &p,
        &[guest.file.as_raw_fd()],
    )
}

// ---------------------------------------------------------------------------
// Happy path
// ---------------------------------------------------------------------------

#[test]
fn negotiation_offers_expected_features() {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::KeepServing);
    let mut client = daemon.frontend(NUM_QUEUES as u64);
    let fe = &mut client.frontend;
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_eq!(features & TEST_FEATURES, TEST_FEATURES);
    assert_ne!(
        features & VHOST_USER_F_PROTOCOL_FEATURES,
        0,
        "bit 30 not offered"
    );
    assert_ne!(features & VHOST_F_LOG_ALL, 0, "LOG_ALL not offered");
    fe.set_features(TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES)
        .unwrap();
    let proto = fe.get_protocol_features().unwrap();
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::STATUS,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    ] {
        assert!(proto.contains(f), "{f:?} not offered (got {proto:?})");
    }
    fe.set_protocol_features(Client::default_protocol())
        .unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), NUM_QUEUES as u64);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 64);
    // The device sees the virtio features only, without transport bits.
    daemon
        .device
        .wait_for_call(&DeviceCall::AckedFeatures(TEST_FEATURES));
    assert!(daemon.device.has_call(&DeviceCall::EventIdx(true)));
}

#[test]
fn traffic_on_every_queue_with_used_ring_and_calls() {
    let mut rig = Rig::new(TEST_FEATURES & !VIRTIO_RING_F_EVENT_IDX);
    let mut queues: Vec<SplitQueue> = (0..NUM_QUEUES as u16)
        .map(|i| rig.running_queue(i))
        .collect();
    for round in 0..3u8 {
        for q in queues.iter_mut() {
            let data = pattern(round * 7 + q.index as u8, 100 + usize::from(round) * 13);
            roundtrip(q, &data);
            assert!(q.wait_call(TIMEOUT), "queue {} not signalled", q.index);
        }
    }
    // A chain of several readable and writable pieces: the output is
    // scattered over the writable ones in order.
    let q = &mut queues[1];
    let input = pattern(9, 48);
    let (a, b) = (q.alloc(16), q.alloc(32));
    q.write(a, &input[..16]);
    q.write(b, &input[16..]);
    let (w1, w2) = (q.alloc(20), q.alloc(40));
    let head = q.add_chain(&[
        Buf {
            gpa: a,
            len: 16,
            writable: false,
        },
        Buf {
            gpa: b,
            len: 32,
            writable: false,
        },
        Buf {
            gpa: w1,
            len: 20,
            writable: true,
        },
        Buf {
            gpa: w2,
            len: 40,
            writable: true,
        },
    ]);
    q.kick();
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 48)]);
    let mut out = q.read(w1, 20);
    out.extend(q.read(w2, 28));
    assert_eq!(out, transform(&input));
    assert_eq!(rig.daemon.device.chains.load(Ordering::SeqCst), 7);
}

#[test]
fn get_vring_base_after_traffic_and_restart_with_set_vring_base() {
    let mut rig = Rig::new(TEST_FEATURES);
    let mut q = rig.running_queue(0);
    for i in 0..3 {
        roundtrip(&mut q, &pattern(i, 64));
    }
    // GET_VRING_BASE stops the ring and reports where it stopped.
    let base = rig.client.frontend.get_vring_base(0).unwrap();
    assert_eq!(base, 3);
    rig.daemon
        .device
        .wait_for_call(&DeviceCall::QueueStopped(0));

    // While stopped, a kicked chain is not processed.
    let data = pattern(42, 80);
    let (head, out) = q.add_request(&data, 80);
    q.kick();
    std::thread::sleep(QUIET);
    assert_eq!(q.used_idx(), 3, "stopped ring was processed");

    // Restart from the reported base: the pending chain is picked up and the
    // used ring continues where it was.
    rig.daemon.device.clear_calls();
    rig.client.frontend.set_vring_base(0, base as u16).unwrap();
    rig.client.frontend.set_vring_kick(0, &q.kick).unwrap();
    rig.daemon
        .device
        .wait_for_call(&DeviceCall::QueueStarted(0));
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 80)]);
    assert_eq!(q.read(out, 80), transform(&data));
    roundtrip(&mut q, &pattern(43, 16));
    assert_eq!(q.used_idx(), 5);
    assert_eq!(rig.client.frontend.get_vring_base(0).unwrap(), 5);
}

#[test]
fn config_space_read_write_and_change_notice() {
    let mut rig = Rig::new(TEST_FEATURES);
    let fe = &mut rig.client.frontend;
    let (hdr, data) = fe
        .get_config(
            0,
            TEST_CONFIG_SIZE as u32,
            VhostUserConfigFlags::WRITABLE,
            &[0; 16],
        )
        .unwrap();
    assert_eq!((hdr.offset, hdr.size), (0, 16));
    assert_eq!(data, TestDevice::initial_config());
    // Reading past the end of the config space yields zeros.
    let (_, tail) = fe
        .get_config(8, 16, VhostUserConfigFlags::WRITABLE, &[0; 16])
        .unwrap();
    assert_eq!(&tail[..8], &TestDevice::initial_config()[8..]);
    assert_eq!(&tail[8..], &[0u8; 8]);

    // The backend request channel carries a CONFIG_CHANGE_MSG after a write.
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    fe.set_config(4, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .unwrap();
    let channel = RawClient::new(ours);
    let notice = channel.recv().expect("no CONFIG_CHANGE_MSG");
    assert_eq!(notice.request, 2, "not CONFIG_CHANGE_MSG: {notice:?}");
    assert_eq!(notice.flags & 0x3, FLAG_VERSION_1);
    assert_eq!(notice.flags & FLAG_REPLY, 0);
    assert!(notice.payload.is_empty(), "the notice has no payload");

    let (_, data) = fe
        .get_config(0, 16, VhostUserConfigFlags::WRITABLE, &[0; 16])
        .unwrap();
    let mut expected = TestDevice::initial_config();
    expected[4..8].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(data, expected);
    assert!(rig
        .daemon
        .device
        .has_call(&DeviceCall::ConfigWritten { offset: 4, len: 4 }));

    // A write past the device's config space is refused...
    assert!(fe
        .set_config(12, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .is_err());
    // ...and a GET_CONFIG beyond the protocol limit gets an (empty) reply.
    let r = rig.raw().call(
        code(FrontendReq::GET_CONFIG),
        &config_payload(0x1000 - 4, 10, &[0; 10]),
        &[],
    );
    assert!(r.payload.is_empty(), "error reply should be empty: {r:?}");
    assert_eq!(rig.raw().get_queue_num(), NUM_QUEUES as u64);
}

#[test]
fn status_set_get_and_reset_device() {
    let mut rig = Rig::new(TEST_FEATURES);
    let set_status = code(FrontendReq::SET_STATUS);
    let get_status = code(FrontendReq::GET_STATUS);
    assert_eq!(rig.raw().ack(set_status, &u64s(&[0x0f]), &[]), 0);
    assert_eq!(rig.raw().call(get_status, &[], &[]).u64(), 0x0f);
    // A status that does not fit the status byte is refused.
    assert_ne!(rig.raw().ack(set_status, &u64s(&[0x1ff]), &[]), 0);
    assert_eq!(rig.raw().call(get_status, &[], &[]).u64(), 0x0f);

    // Writing status 0 resets the device.
    let mut q = rig.running_queue(0);
    roundtrip(&mut q, &pattern(1, 32));
    rig.daemon.device.clear_calls();
    assert_eq!(rig.raw().ack(set_status, &u64s(&[0]), &[]), 0);
    assert_eq!(rig.raw().call(get_status, &[], &[]).u64(), 0);
    assert!(rig.daemon.device.has_call(&DeviceCall::Reset));
    assert!(rig.daemon.device.has_call(&DeviceCall::QueueStopped(0)));

    // RESET_DEVICE stops running queues and resets the device and status.
    let _q = features_and_a_round_trip_again(&mut rig, 2);
    assert_eq!(rig.raw().ack(set_status, &u64s(&[0x07]), &[]), 0);
    rig.daemon.device.clear_calls();
    rig.client.frontend.reset_device().unwrap();
    assert!(rig.daemon.device.has_call(&DeviceCall::QueueStopped(0)));
    assert!(rig.daemon.device.has_call(&DeviceCall::Reset));
    assert_eq!(rig.raw().call(get_status, &[], &[]).u64(), 0);

    // After a reset the device can be brought up again.
    features_and_a_round_trip_again(&mut rig, 3);
}

/// After a reset: SET_FEATURES again, queue 0 started and a round trip on
/// it with pattern `seed`; returns the running queue.
fn features_and_a_round_trip_again(rig: &mut Rig, seed: u8) -> SplitQueue {
    rig.client
        .frontend
        .set_features(TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES)
        .unwrap();
    let mut q = rig.running_queue(0);
    roundtrip(&mut q, &pattern(seed, 32));
    q
}

#[test]
fn memory_slots_add_and_remove_regions() {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::KeepServing);
    let mut client = daemon.frontend(NUM_QUEUES as u64);
    client.negotiate(TEST_FEATURES, Client::default_protocol());
    let fe = &mut client.frontend;
    assert_eq!(fe.get_max_mem_slots().unwrap(), 64);

    // Two regions added one at a time; the queue lives in the second one.
    let low = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    let high = GuestMem::new(0x4000_0000, 0x4_0000);
    fe.add_mem_region(&low.region_info()).unwrap();
    fe.add_mem_region(&high.region_info()).unwrap();
    let mut q = SplitQueue::new(&high, 0, QSIZE, high.gpa);
    client.start_queue(&q, 0);
    roundtrip(&mut q, &pattern(5, 200));
    assert_eq!(client.frontend.get_vring_base(0).unwrap(), 1);

    // Removing the region makes its addresses unknown to the backend.
    let fe = &mut client.frontend;
    fe.remove_mem_region(&high.region_info()).unwrap();
    assert!(fe.set_vring_addr(0, &q.config_data()).is_err());
    // Removing it again is refused; the session goes on.
    assert!(fe.remove_mem_region(&high.region_info()).is_err());
    assert_eq!(client.raw.get_queue_num(), NUM_QUEUES as u64);

    // The other region still works.
    let mut q = SplitQueue::new(&low, 0, QSIZE, low.gpa);
    client.start_queue(&q, 0);
    roundtrip(&mut q, &pattern(6, 200));
}

#[test]
fn dirty_log_follows_log_all() {
    let mut rig = Rig::new(TEST_FEATURES);
    // One bit per 4 KiB page from gpa 0: 2 MiB of address space = 64 bytes.
    let log = LogArea::new(4096);
    // With LOG_SHMFD, SET_LOG_BASE has a reply the frontend waits for: a log
    // area that cannot be mapped must still be answered.
    let r = rig.raw().call(
        code(FrontendReq::SET_LOG_BASE),
        &u64s(&[0, 0]),
        &[log.file.as_raw_fd()],
    );
    assert!(r.payload.is_empty(), "error reply should be empty: {r:?}");
    let frontend = rig.client.frontend.clone();
    let region = VhostUserDirtyLogRegion {
        mmap_size: log.size,
        mmap_offset: 0,
        mmap_handle: log.file.as_raw_fd(),
    };
    within_timeout("SET_LOG_BASE", move || {
        frontend.set_log_base(0, Some(region))
    })
    .expect("SET_LOG_BASE");
    rig.client
        .frontend
        .set_features(TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL)
        .unwrap();
    let mut q = rig.running_queue(0);

    let data = pattern(3, 100);
    let input = q.alloc_page_aligned(100);
    let output = q.alloc_page_aligned(100);
    q.write(input, &data);
    let head = q.add_chain(&[
        Buf {
            gpa: input,
            len: 100,
            writable: false,
        },
        Buf {
            gpa: output,
            len: 100,
            writable: true,
        },
    ]);
    q.kick();
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 100)]);
    assert!(log.is_dirty(output), "written buffer not logged");
    assert!(log.is_dirty(q.used), "used ring not logged");
    assert!(!log.is_dirty(input), "read-only buffer logged");
    assert!(
        !log.is_dirty(GUEST_GPA + GUEST_SIZE - 1),
        "untouched page logged"
    );

    // Dropping LOG_ALL stops logging.
    rig.client
        .frontend
        .set_features(TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES)
        .unwrap();
    log.clear();
    roundtrip(&mut q, &pattern(4, 100));
    assert!(
        log.bytes().iter().all(|b| *b == 0),
        "logged without LOG_ALL"
    );
}

#[test]
fn event_idx_signals_only_when_the_driver_asks() {
    let mut rig = Rig::new(TEST_FEATURES);
    let mut q = rig.running_queue(0);
    // used_event far ahead: the driver does not want an interrupt.
    q.set_used_event(100);
    roundtrip(&mut q, &pattern(1, 10));
    assert!(!q.wait_call(QUIET), "signalled although used_event said no");
    // used_event = current used index: the next completion must signal.
    q.set_used_event(q.used_idx());
    roundtrip(&mut q, &pattern(2, 10));
    assert!(q.wait_call(TIMEOUT), "not signalled at used_event");
    // Past it again: quiet.
    roundtrip(&mut q, &pattern(3, 10));
    assert!(!q.wait_call(QUIET), "signalled past used_event");
}

#[test]
fn kick_before_enable_is_not_lost() {
    let mut rig = Rig::new(TEST_FEATURES);
    let mut q = rig.queue(0);
    let fe = &mut rig.client.frontend;
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(0, &q.config_data()).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &q.call).unwrap();
    fe.set_vring_kick(0, &q.kick).unwrap();
    let data = pattern(11, 77);
    let (head, out) = q.add_request(&data, 77);
    q.kick();
    std::thread::sleep(QUIET);
    assert_eq!(q.used_idx(), 0, "disabled ring was processed");
    assert!(!rig.daemon.device.has_call(&DeviceCall::QueueStarted(0)));
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 77)]);
    assert_eq!(q.read(out, 77), transform(&data));

    // Disabling stops processing; re-enabling picks up what was queued.
    fe.set_vring_enable(0, false).unwrap();
    rig.daemon
        .device
        .wait_for_call(&DeviceCall::QueueStopped(0));
    let (head, _) = q.add_request(&data, 77);
    q.kick();
    std::thread::sleep(QUIET);
    assert_eq!(q.used_idx(), 1);
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 77)]);
}

// ---------------------------------------------------------------------------
// Refused requests: each is NACKed and the session goes on.
// ---------------------------------------------------------------------------

#[test]
fn vring_addr_before_mem_table_is_nacked() {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::Once);
    let raw = daemon.raw();
    raw_negotiate(&raw);
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    let q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    let addr = vring_addr_payload(0, &q);
    assert_ne!(raw.ack(code(FrontendReq::SET_VRING_ADDR), &addr, &[]), 0);
    assert_eq!(raw_set_mem_table(&raw, &guest), 0);
    assert_eq!(raw.ack(code(FrontendReq::SET_VRING_ADDR), &addr, &[]), 0);
}

#[test]
fn queue_index_out_of_range_is_refused() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    let q = rig.queue(0);
    let bad = NUM_QUEUES as u32;
    let evt = vmm_sys_util_eventfd();
    let cases: Vec<(FrontendReq, Vec<u8>, bool)> = vec![
        (FrontendReq::SET_VRING_NUM, vring_state(bad, 16), false),
        (
            FrontendReq::SET_VRING_ADDR,
            vring_addr_payload(bad, &q),
            false,
        ),
        (FrontendReq::SET_VRING_BASE, vring_state(bad, 0), false),
        (FrontendReq::SET_VRING_KICK, u64s(&[u64::from(bad)]), true),
        (FrontendReq::SET_VRING_CALL, u64s(&[u64::from(bad)]), true),
        (FrontendReq::SET_VRING_ERR, u64s(&[u64::from(bad)]), true),
        (FrontendReq::SET_VRING_ENABLE, vring_state(bad, 1), false),
        (
            FrontendReq::SET_VRING_NUM,
            vring_state(0xffff_ffff, 16),
            false,
        ),
        (FrontendReq::SET_VRING_ENABLE, vring_state(255, 1), false),
    ];
    for (req, payload, with_fd) in cases {
        let fds = if with_fd {
            vec![evt.as_raw_fd()]
        } else {
            vec![]
        };
        assert_ne!(
            raw.ack(code(req), &payload, &fds),
            0,
            "{req:?} with index {bad} accepted"
        );
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    // GET_VRING_BASE has an explicit reply: it must come, even on error.
    for index in [bad, 255, 0xffff_ffff] {
        raw.send(
            code(FrontendReq::GET_VRING_BASE),
            FLAG_VERSION_1 | FLAG_NEED_REPLY,
            &vring_state(index, 0),
            &[],
        );
        let r = raw.reply_to(code(FrontendReq::GET_VRING_BASE));
        assert!(r.payload.is_empty(), "error reply should be empty: {r:?}");
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    // A valid index still works.
    assert_eq!(
        raw.ack(code(FrontendReq::SET_VRING_NUM), &vring_state(1, 16), &[]),
        0
    );
}

fn vmm_sys_util_eventfd() -> virtio_backend_kit::vmm_sys_util::eventfd::EventFd {
    virtio_backend_kit::vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

#[test]
fn invalid_queue_sizes_are_refused() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    let num = code(FrontendReq::SET_VRING_NUM);
    for size in [0, 3, 24, 255, 512, 0x1_0000] {
        assert_ne!(
            raw.ack(num, &vring_state(0, size), &[]),
            0,
            "size {size} accepted"
        );
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    for size in [1, 2, 128, 256] {
        assert_eq!(
            raw.ack(num, &vring_state(0, size), &[]),
            0,
            "size {size} refused"
        );
    }
}

#[test]
fn unknown_request_is_nacked() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    for req in [999u32, 0, 26 /* CREATE_CRYPTO_SESSION */, 0xffff_ffff] {
        assert_ne!(raw.ack(req, &u64s(&[0]), &[]), 0, "request {req} acked");
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    // Without NEED_REPLY nothing comes back, and the session goes on.
    raw.send(999, FLAG_VERSION_1, &[], &[]);
    raw.expect_silence(QUIET);
    assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
}

#[test]
fn malformed_payload_sizes_are_nacked() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    let guest = &rig.guest;
    let q = rig.queue(0);
    let cases: Vec<(FrontendReq, Vec<u8>)> = vec![
        (FrontendReq::SET_FEATURES, vec![0; 4]),
        (FrontendReq::SET_FEATURES, vec![0; 16]),
        (FrontendReq::SET_PROTOCOL_FEATURES, vec![]),
        (FrontendReq::SET_VRING_NUM, vec![0; 12]),
        (FrontendReq::SET_VRING_BASE, vec![0; 4]),
        (
            FrontendReq::SET_VRING_ADDR,
            vring_addr_payload(0, &q)[..32].to_vec(),
        ),
        (FrontendReq::SET_VRING_ENABLE, vec![0; 7]),
        (FrontendReq::SET_VRING_ENABLE, vring_state(0, 2)),
        (FrontendReq::SET_STATUS, vec![0; 1]),
        (FrontendReq::REM_MEM_REG, vec![0; 8]),
        (FrontendReq::SET_CONFIG, config_payload(0, 4, &[1, 2])),
        (FrontendReq::SET_CONFIG, vec![0; 6]),
        (FrontendReq::SET_MEM_TABLE, vec![1, 0, 0]),
        // Claims two regions but carries one.
        (
            FrontendReq::SET_MEM_TABLE,
            mem_table_payload(2, &[(guest.gpa, guest.size, guest.host_addr(guest.gpa), 0)]),
        ),
        // Zero regions.
        (FrontendReq::SET_MEM_TABLE, mem_table_payload(0, &[])),
    ];
    for (req, payload) in cases {
        let fds = if req == FrontendReq::SET_MEM_TABLE {
            vec![guest.file.as_raw_fd()]
        } else {
            vec![]
        };
        assert_ne!(
            raw.ack(code(req), &payload, &fds),
            0,
            "{req:?} with {} bytes accepted",
            payload.len()
        );
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    // Requests with an explicit reply answer malformed payloads with an
    // empty reply.
    let r = raw.call(code(FrontendReq::GET_VRING_BASE), &[0; 3], &[]);
    assert!(r.payload.is_empty());
    let r = raw.call(
        code(FrontendReq::GET_CONFIG),
        &config_payload(0, 8, &[0; 4]),
        &[],
    );
    assert!(r.payload.is_empty());
    assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
}

#[test]
fn mem_table_with_fewer_fds_than_regions_is_refused() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    let a = GuestMem::new(0x100_0000, 0x10_0000);
    let b = GuestMem::new(0x200_0000, 0x10_0000);
    let p = mem_table_payload(
        2,
        &[
            (a.gpa, a.size, a.host_addr(a.gpa), 0),
            (b.gpa, b.size, b.host_addr(b.gpa), 0),
        ],
    );
    let set = code(FrontendReq::SET_MEM_TABLE);
    assert_ne!(raw.ack(set, &p, &[a.file.as_raw_fd()]), 0);
    assert_ne!(raw.ack(set, &p, &[]), 0);
    assert_eq!(
        raw.ack(set, &p, &[a.file.as_raw_fd(), b.file.as_raw_fd()]),
        0
    );
    // ADD_MEM_REG without its fd.
    let c = GuestMem::new(0x300_0000, 0x1000);
    let single = u64s(&[0, c.gpa, c.size, c.host_addr(c.gpa), 0]);
    assert_ne!(raw.ack(code(FrontendReq::ADD_MEM_REG), &single, &[]), 0);
    assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
}

/// Sparse memfds can claim any size: without a cap a frontend could map
/// region after region until the daemon's address space is gone (and then
/// every allocation fails). One session maps at most `MAX_GUEST_MEMORY`.
#[test]
fn sparse_regions_cannot_use_up_the_address_space() {
    use virtio_backend_kit::vhost_user::MAX_GUEST_MEMORY;
    const TIB: u64 = 1 << 40;
    let mut rig = Rig::new(TEST_FEATURES);
    let sparse = memfd("sparse", 10 * TIB);
    let fd = [sparse.as_raw_fd()];
    let raw = rig.raw();
    // One table of two 9 TiB regions: refused as a whole.
    let set = code(FrontendReq::SET_MEM_TABLE);
    let p = mem_table_payload(
        2,
        &[
            (1 << 44, 9 * TIB, 1 << 44, 0),
            (2 << 44, 9 * TIB, 2 << 44, 0),
        ],
    );
    assert_ne!(raw.ack(set, &p, &[fd[0], fd[0]]), 0);
    // Region by region: added until the limit, then refused.
    let add = code(FrontendReq::ADD_MEM_REG);
    let mut accepted = 0u64;
    for i in 1..=40u64 {
        let gpa = i << 42;
        let single = u64s(&[0, gpa, 4 * TIB, gpa, 0]);
        if raw.ack(add, &single, &fd) == 0 {
            accepted += 1;
        }
    }
    println!("VBK-HOSTILE sparse_regions accepted={accepted} of 40 (4 TiB each)");
    assert_eq!(
        accepted * 4 * TIB,
        MAX_GUEST_MEMORY - 4 * TIB,
        "the cap was not applied"
    );
    // The daemon still serves the table it had.
    let mut q = rig.running_queue(0);
    roundtrip(&mut q, &pattern(9, 256));
}

#[test]
fn mem_table_region_larger_than_file_is_refused() {
    let mut rig = Rig::new(TEST_FEATURES);
    let small = GuestMem::new(0x100_0000, 0x1_0000);
    let set = code(FrontendReq::SET_MEM_TABLE);
    let fd = [small.file.as_raw_fd()];
    let raw = rig.raw();
    // Larger than the file.
    let p = mem_table_payload(1, &[(small.gpa, 0x10_0000, small.host_addr(small.gpa), 0)]);
    assert_ne!(raw.ack(set, &p, &fd), 0);
    // Fits in size, but the offset pushes it past the end of the file.
    let p = mem_table_payload(
        1,
        &[(small.gpa, 0x1_0000, small.host_addr(small.gpa), 0x1000)],
    );
    assert_ne!(raw.ack(set, &p, &fd), 0);
    // Offset + size overflows.
    let p = mem_table_payload(
        1,
        &[(small.gpa, 0x1_0000, small.host_addr(small.gpa), u64::MAX)],
    );
    assert_ne!(raw.ack(set, &p, &fd), 0);
    // Zero-sized and wrapping regions.
    let p = mem_table_payload(1, &[(small.gpa, 0, small.host_addr(small.gpa), 0)]);
    assert_ne!(raw.ack(set, &p, &fd), 0);
    let p = mem_table_payload(
        1,
        &[(u64::MAX - 0xfff, 0x1_0000, small.host_addr(small.gpa), 0)],
    );
    assert_ne!(raw.ack(set, &p, &fd), 0);
    // The same through ADD_MEM_REG.
    let single = u64s(&[0, small.gpa, 0x10_0000, small.host_addr(small.gpa), 0]);
    assert_ne!(raw.ack(code(FrontendReq::ADD_MEM_REG), &single, &fd), 0);
    // A guest address that is not 8-byte aligned: its rings would sit at
    // misaligned host addresses and never be served.
    let p = mem_table_payload(1, &[(small.gpa + 4, 0x1000, small.host_addr(small.gpa), 0)]);
    assert_ne!(raw.ack(set, &p, &fd), 0);
    let single = u64s(&[0, small.gpa + 4, 0x1000, small.host_addr(small.gpa), 0]);
    assert_ne!(raw.ack(code(FrontendReq::ADD_MEM_REG), &single, &fd), 0);

    // The earlier, valid table is still in place: traffic works, so nothing
    // maps beyond a file (that would SIGBUS the daemon).
    let mut q = rig.running_queue(0);
    roundtrip(&mut q, &pattern(8, 256));
}

#[test]
fn unoffered_features_are_refused() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    let set = code(FrontendReq::SET_FEATURES);
    let bad = TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | (1 << 63);
    assert_ne!(raw.ack(set, &u64s(&[bad]), &[]), 0);
    assert_ne!(raw.ack(set, &u64s(&[1 << 0]), &[]), 0);
    assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    assert_eq!(
        raw.ack(
            set,
            &u64s(&[TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES]),
            &[]
        ),
        0
    );

    let set_proto = code(FrontendReq::SET_PROTOCOL_FEATURES);
    let offered = Client::default_protocol().bits();
    for extra in [
        VhostUserProtocolFeatures::HOST_NOTIFIER.bits(),
        VhostUserProtocolFeatures::CRYPTO_SESSION.bits(),
        1 << 62,
    ] {
        assert_ne!(
            raw.ack(set_proto, &u64s(&[offered | extra]), &[]),
            0,
            "{extra:#x} accepted"
        );
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    // The refused SET_PROTOCOL_FEATURES changed nothing: acks still come.
    assert_eq!(raw.ack(code(FrontendReq::SET_OWNER), &[], &[]), 0);
}

#[test]
fn bad_header_flags_are_refused() {
    let rig = Rig::new(TEST_FEATURES);
    let raw = rig.raw();
    let owner = code(FrontendReq::SET_OWNER);
    for flags in [0x0, 0x2, 0x3, FLAG_VERSION_1 | FLAG_REPLY] {
        raw.send(owner, flags | FLAG_NEED_REPLY, &[], &[]);
        let r = raw.reply_to(owner);
        assert_ne!(r.u64(), 0, "header flags {flags:#x} accepted");
        assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
    }
    // A bad header on a state-changing request changes nothing.
    raw.send(
        code(FrontendReq::SET_VRING_NUM),
        0x2 | FLAG_NEED_REPLY,
        &vring_state(0, 3),
        &[],
    );
    assert_ne!(raw.reply_to(code(FrontendReq::SET_VRING_NUM)).u64(), 0);
    assert_eq!(raw.ack(owner, &[], &[]), 0);
}

#[test]
fn reply_ack_honoured_without_get_protocol_features() {
    // A frontend restored from migration skips GET_FEATURES and
    // GET_PROTOCOL_FEATURES: its acks must still come.
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::Once);
    let raw = daemon.raw();
    raw.send(
        code(FrontendReq::SET_FEATURES),
        FLAG_VERSION_1,
        &u64s(&[TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES]),
        &[],
    );
    let proto = (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ).bits();
    assert_eq!(
        raw.ack(
            code(FrontendReq::SET_PROTOCOL_FEATURES),
            &u64s(&[proto]),
            &[]
        ),
        0
    );
    assert_eq!(raw.ack(code(FrontendReq::SET_OWNER), &[], &[]), 0);
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    assert_eq!(raw_set_mem_table(&raw, &guest), 0);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    let (call, kick) = (q.call.as_raw_fd(), q.kick.as_raw_fd());
    let queue_setup = [
        (FrontendReq::SET_VRING_NUM, vring_state(0, 16), None),
        (FrontendReq::SET_VRING_ADDR, vring_addr_payload(0, &q), None),
        (FrontendReq::SET_VRING_BASE, vring_state(0, 0), None),
        (FrontendReq::SET_VRING_CALL, u64s(&[0]), Some(call)),
        (FrontendReq::SET_VRING_KICK, u64s(&[0]), Some(kick)),
        (FrontendReq::SET_VRING_ENABLE, vring_state(0, 1), None),
    ];
    for (req, payload, fd) in queue_setup {
        let fds: Vec<_> = fd.into_iter().collect();
        assert_eq!(raw.ack(code(req), &payload, &fds), 0, "{req:?} not acked");
    }
    roundtrip(&mut q, &pattern(1, 50));
    // A failing request is NACKed, not silently dropped.
    assert_ne!(
        raw.ack(code(FrontendReq::SET_VRING_NUM), &vring_state(0, 3), &[]),
        0
    );
    assert_eq!(raw.get_queue_num(), NUM_QUEUES as u64);
}

#[test]
fn without_reply_ack_no_acks_are_sent() {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::Once);
    let raw = daemon.raw();
    let requests = [
        (
            FrontendReq::SET_FEATURES,
            u64s(&[TEST_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES]),
        ),
        (FrontendReq::SET_OWNER, Vec::new()),
        (FrontendReq::SET_VRING_NUM, vring_state(0, 3)),
    ];
    for (req, payload) in requests {
        raw.send(code(req), FLAG_VERSION_1 | FLAG_NEED_REPLY, &payload, &[]);
    }
    raw.expect_silence(QUIET);
    // GET_PROTOCOL_FEATURES has an explicit reply regardless.
    let r = raw.call(code(FrontendReq::GET_PROTOCOL_FEATURES), &[], &[]);
    assert_ne!(r.u64() & VhostUserProtocolFeatures::REPLY_ACK.bits(), 0);
}

// ---------------------------------------------------------------------------
// Data path robustness
// ---------------------------------------------------------------------------

#[test]
fn malicious_chains_do_not_break_the_daemon() {
    let mut rig = Rig::new(TEST_FEATURES);
    let mut q = rig.running_queue(0);
    let device = rig.daemon.device.clone();
    let buf = q.alloc(64);
    q.write(buf, &pattern(1, 64));

    // A descriptor loop: 0 -> 1 -> 0 ...; the walk ends after `size` hops.
    let first = q.alloc_descs(2);
    q.write_desc(
        first,
        Desc {
            addr: buf,
            len: 8,
            flags: VRING_DESC_F_NEXT,
            next: first + 1,
        },
    );
    q.write_desc(
        first + 1,
        Desc {
            addr: buf,
            len: 8,
            flags: VRING_DESC_F_NEXT,
            next: first,
        },
    );
    q.publish(first);
    // A buffer outside guest memory.
    let out_of_range = q.write_chain(&[
        Desc {
            addr: 0xdead_0000_0000,
            len: 64,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: buf,
            len: 64,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        },
    ]);
    q.publish(out_of_range);
    // A writable buffer straddling the end of guest memory.
    let straddle = q.write_chain(&[
        Desc {
            addr: buf,
            len: 64,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: GUEST_GPA + GUEST_SIZE - 16,
            len: 64,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        },
    ]);
    q.publish(straddle);
    // Zero-length buffers.
    let zero = q.write_chain(&[
        Desc {
            addr: buf,
            len: 0,
            flags: 0,
            next: 0,
        },
        Desc {
            addr: buf,
            len: 0,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        },
    ]);
    q.publish(zero);
    // A next index beyond the queue size.
    let wild_next = q.alloc_descs(1);
    q.write_desc(
        wild_next,
        Desc {
            addr: buf,
            len: 8,
            flags: VRING_DESC_F_NEXT,
            next: 1000,
        },
    );
    q.publish(wild_next);
    // Indirect tables: badly sized, outside memory, and nested.
    let table = q.alloc(64);
    q.write_desc_at(
        table,
        0,
        Desc {
            addr: table,
            len: 32,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    );
    for d in [
        Desc {
            addr: table,
            len: 17,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
        Desc {
            addr: 0xdead_0000_0000,
            len: 64,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
        Desc {
            addr: table,
            len: 16,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    ] {
        let head = q.write_chain(&[d]);
        q.publish(head);
    }
    // A head index beyond the queue size.
    q.publish(QSIZE + 5);
    q.kick();

    // Every chain with a valid head comes back, harmful ones with length 0;
    // the head beyond the queue size cannot be returned: the device reports
    // it and the err eventfd fires.
    let used = q.wait_used(8);
    let len_of = |head: u16| {
        used.iter()
            .find(|(id, _)| *id == u32::from(head))
            .map(|u| u.1)
    };
    assert_eq!(len_of(out_of_range), Some(0));
    assert_eq!(len_of(straddle), Some(0));
    assert_eq!(len_of(zero), Some(0));
    assert!(len_of(first).is_some(), "looping chain not returned");
    assert!(
        len_of(wild_next).is_some(),
        "chain with a wild next not returned"
    );
    assert!(q.wait_err(TIMEOUT), "bad head index not reported");
    std::thread::sleep(QUIET);
    assert_eq!(q.used_idx(), q.last_used(), "bad head put on the used ring");
    assert!(device.bad_chains.load(Ordering::SeqCst) >= 2);

    // The queue and the session still work.
    roundtrip(&mut q, &pattern(2, 100));
    assert_eq!(rig.raw().get_queue_num(), NUM_QUEUES as u64);
}

#[test]
fn avail_index_too_far_ahead_signals_err_and_session_survives() {
    let mut rig = Rig::new(TEST_FEATURES);
    let mut q = rig.running_queue(0);
    roundtrip(&mut q, &pattern(1, 10));
    q.set_avail_idx(q.avail_idx().wrapping_add(QSIZE + 1));
    q.kick();
    assert!(q.wait_err(TIMEOUT), "err eventfd not signalled");
    assert_eq!(rig.raw().get_queue_num(), NUM_QUEUES as u64);
    // Stopping and restarting the ring from a sane base recovers it.
    let base = rig.client.frontend.get_vring_base(0).unwrap();
    assert_eq!(base, 1);
    let mut q = rig.queue(0);
    rig.client.start_queue(&q, 0);
    roundtrip(&mut q, &pattern(2, 10));
}

// ---------------------------------------------------------------------------
// Disconnects
// ---------------------------------------------------------------------------

#[test]
fn keep_serving_survives_a_frontend_dropped_mid_traffic() {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::KeepServing);
    let mut rig = Rig::connect(daemon, TEST_FEATURES);
    let mut q0 = rig.running_queue(0);
    let mut q1 = rig.running_queue(1);
    roundtrip(&mut q0, &pattern(1, 64));
    // Leave work in flight on both queues and vanish.
    for _ in 0..4 {
        q0.add_request(&pattern(2, 512), 512);
        q1.add_request(&pattern(3, 512), 512);
    }
    q0.kick();
    q1.kick();
    let Rig {
        daemon,
        client,
        guest,
    } = rig;
    drop(client);
    daemon.device.wait_for_call(&DeviceCall::Reset);
    assert!(daemon.device.has_call(&DeviceCall::QueueStopped(0)));
    assert!(daemon.device.has_call(&DeviceCall::QueueStopped(1)));
    drop((q0, q1, guest));
    assert!(!daemon.is_finished());

    // A new frontend with new memory sets everything up again.
    daemon.device.clear_calls();
    let mut rig = Rig::connect(daemon, TEST_FEATURES);
    let mut q0 = rig.running_queue(0);
    let mut q1 = rig.running_queue(1);
    for i in 0..3 {
        roundtrip(&mut q0, &pattern(10 + i, 300));
        roundtrip(&mut q1, &pattern(20 + i, 300));
    }
    assert_eq!(rig.client.frontend.get_vring_base(1).unwrap(), 3);
}

#[test]
fn once_mode_returns_after_disconnect() {
    let mut daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::Once);
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    let mut client = daemon.frontend(NUM_QUEUES as u64);
    client.negotiate(TEST_FEATURES, Client::default_protocol());
    client
        .frontend
        .set_mem_table(&[guest.region_info()])
        .unwrap();
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    roundtrip(&mut q, &pattern(1, 64));
    assert!(!daemon.is_finished());
    drop(client);
    let result = daemon
        .join(TIMEOUT)
        .expect("daemon did not return after disconnect");
    assert!(result.is_ok(), "{result:?}");
    assert!(daemon.device.has_call(&DeviceCall::QueueStopped(0)));
    assert!(daemon.device.has_call(&DeviceCall::Reset));
}

#[test]
fn truncated_messages_do_not_wedge_the_daemon() {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::KeepServing);
    let set_owner = message(code(FrontendReq::SET_OWNER), FLAG_VERSION_1, &[]);
    // Half a header, then gone.
    let raw = daemon.raw();
    raw.send_bytes(&set_owner[..6], &[]);
    drop(raw);
    // A header promising 64 bytes, 10 delivered, then gone.
    let raw = daemon.raw();
    let mut partial = message(code(FrontendReq::SET_FEATURES), FLAG_VERSION_1, &[0; 64]);
    partial.truncate(12 + 10);
    raw.send_bytes(&partial, &[]);
    drop(raw);
    // A header announcing more than the protocol allows.
    let raw = daemon.raw();
    let mut huge = message(code(FrontendReq::SET_MEM_TABLE), FLAG_VERSION_1, &[]);
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.send_bytes(&huge, &[]);
    // The daemon drops this connection rather than reading 4 GiB.
    let mut byte = [0u8; 1];
    let n = std::io::Read::read(&mut &raw.sock, &mut byte);
    assert!(matches!(n, Ok(0)) || n.is_err(), "{n:?}");
    drop(raw);
    // An fd attached to a truncated message is not leaked into a crash.
    let raw = daemon.raw();
    let guest = GuestMem::new(GUEST_GPA, 0x1000);
    raw.send_bytes(
        &message(code(FrontendReq::SET_MEM_TABLE), FLAG_VERSION_1, &[0; 40])[..20],
        &[guest.file.as_raw_fd()],
    );
    drop(raw);

    // The next frontend is served normally.
    let mut rig = Rig::connect(daemon, TEST_FEATURES);
    let mut q = rig.running_queue(0);
    roundtrip(&mut q, &pattern(4, 128));
}

#[test]
fn once_mode_returns_after_a_truncated_message() {
    let mut daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::Once);
    let raw = daemon.raw();
    let msg = message(
        code(FrontendReq::SET_VRING_NUM),
        FLAG_VERSION_1,
        &vring_state(0, 16),
    );
    raw.send_bytes(&msg[..msg.len() - 3], &[]);
    drop(raw);
    let result = daemon
        .join(TIMEOUT)
        .expect("daemon hung on a truncated message");
    assert!(result.is_ok(), "{result:?}");
}
