// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device status the driver writes to a virtio-mmio transport reaches
//! a vhost-user backend (STATUS protocol feature) through the adapter, and
//! a backend that clears FEATURES_OK makes the transport refuse the
//! driver's features. Against the kit's daemon on a real socket; to play a
//! backend that refuses, a proxy on the socket edits its GET_STATUS reply.

mod common;
mod vhost_proxy;

use std::time::{Duration, Instant};

use common::{spawn_daemon, transform, TestDevice};
use vhost_proxy::{Filter, GET_STATUS, SET_STATUS};
use virtio_backend_kit::frontend::VhostUserFrontendDevice;
use virtio_backend_kit::mmio::*;
use virtio_backend_kit::testing::{self, SplitQueueDriver};
use virtio_backend_kit::vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_backend_kit::vhost_user::ServeMode;

const MEM_GPA: u64 = 0x4000_0000;
const MEM_SIZE: usize = 4 << 20;
const WAIT: Duration = Duration::from_secs(5);
/// `SET_VRING_KICK`, the last request of a queue's start.
const SET_VRING_KICK: u32 = 12;
const ACK_DRIVER: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER;

/// A transport over the adapter, connected to the kit's daemon through a
/// proxy applying `filter`.
fn transport(filter: &Filter) -> (MmioTransport, SplitQueueDriver, Keep) {
    let _ = env_logger::builder().is_test(true).try_init();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let (dir, sock, _proxy) = vhost_proxy::spawn(daemon.path.clone(), filter.clone());
    let options = common::test_device_options(WAIT);
    let dev = VhostUserFrontendDevice::connect(&sock, options).unwrap();
    assert!(
        dev.protocol_features()
            .contains(VhostUserProtocolFeatures::STATUS),
        "STATUS not negotiated"
    );
    let mem = testing::shared_guest_memory(MEM_GPA, MEM_SIZE).unwrap();
    let ring = SplitQueueDriver::new(&mem, 0, 64, MEM_GPA);
    let t = MmioTransport::new(Box::new(dev), mem).unwrap();
    (t, ring, (daemon, dir))
}

/// The daemon and the proxy's socket directory, kept for the test.
type Keep = (common::Daemon<TestDevice>, tempfile::TempDir);

/// The driver's steps up to FEATURES_OK (VIRTIO_F_VERSION_1 accepted);
/// returns Status as the driver re-reads it.
fn negotiate(t: &mut MmioTransport) -> u32 {
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
    t.write_u32(STATUS, ACK_DRIVER);
    t.write_u32(DRIVER_FEATURES_SEL, 1);
    t.write_u32(DRIVER_FEATURES, 1);
    t.write_u32(STATUS, ACK_DRIVER | STATUS_FEATURES_OK);
    t.read_u32(STATUS)
}

#[test]
fn the_driver_status_reaches_the_backend() {
    let filter = Filter::default();
    let (mut t, mut ring, _keep) = transport(&filter);
    let features_ok = ACK_DRIVER | STATUS_FEATURES_OK;
    assert_eq!(negotiate(&mut t), features_ok, "FEATURES_OK refused");
    assert_eq!(
        filter.values_of(GET_STATUS).len(),
        1,
        "the backend was not asked whether it keeps FEATURES_OK"
    );
    common::mmio_setup_queue(&mut t, &ring);
    let driver_ok = features_ok | STATUS_DRIVER_OK;
    t.write_u32(STATUS, driver_ok);
    assert!(t.is_activated());
    assert_eq!(t.read_u32(STATUS), driver_ok);
    assert_eq!(
        filter.values_of(SET_STATUS),
        vec![
            u64::from(STATUS_ACKNOWLEDGE),
            u64::from(ACK_DRIVER),
            u64::from(features_ok),
            u64::from(driver_ok)
        ]
    );
    // DRIVER_OK goes to the backend once its queue is started.
    let seen = filter.seen.lock().unwrap().clone();
    let kick = seen.iter().position(|&(r, _)| r == SET_VRING_KICK);
    let ok = seen
        .iter()
        .position(|&(r, v)| (r, v) == (SET_STATUS, u64::from(driver_ok)));
    assert!(kick.is_some() && kick < ok, "{seen:?}");

    // The device runs.
    let data = ring.data_area();
    ring.write(data, b"sixteen bytes...");
    ring.add_chain(&[(data, 16, false), (data + 0x1000, 16, true)]);
    t.write_u32(QUEUE_NOTIFY, 0);
    let deadline = Instant::now() + WAIT;
    while ring.pop_used().is_none() {
        assert!(Instant::now() < deadline, "request never completed");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(ring.read(data + 0x1000, 16), transform(b"sixteen bytes..."));

    // A reset reaches the backend as status 0.
    t.write_u32(STATUS, 0);
    assert!(!t.is_activated());
    assert_eq!(filter.values_of(SET_STATUS).last(), Some(&0));
}

#[test]
fn a_backend_that_clears_features_ok_refuses_the_features() {
    let filter = Filter {
        cleared_status: u64::from(STATUS_FEATURES_OK),
        ..Default::default()
    };
    let (mut t, ring, _keep) = transport(&filter);
    assert_eq!(
        negotiate(&mut t),
        ACK_DRIVER,
        "FEATURES_OK shown though the backend cleared it"
    );
    // A driver that goes on to DRIVER_OK anyway (FEATURES_OK in the same
    // write) is refused too: the device does not start.
    common::mmio_setup_queue(&mut t, &ring);
    t.write_u32(STATUS, ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert!(!t.is_activated());
    assert_eq!(t.read_u32(STATUS) & STATUS_FEATURES_OK, 0);
    assert_eq!(filter.values_of(GET_STATUS).len(), 2, "not asked again");
    // A reset and a fresh start are possible.
    t.write_u32(STATUS, 0);
    assert_eq!(t.read_u32(STATUS), 0);
}
