// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory changing under a running device (`DeviceControl::
//! update_memory`): a second memfd region plugged in and taken out again.
//!
//! - through the vhost-user adapter to the kit's daemon, which offers
//!   CONFIGURE_MEM_SLOTS: `ADD_MEM_REG` / `REM_MEM_REG`;
//! - to the daemon behind a proxy hiding CONFIGURE_MEM_SLOTS: one new
//!   `SET_MEM_TABLE` (and `SET_LOG_BASE` again while dirty logging is on);
//! - in process: a `DeviceCore` behind an `MmioTransport`.
//!
//! The proxy (tests/vhost_proxy) records what the backend was sent; the
//! suite's `TestDevice` answers every chain with the complement of its
//! readable bytes, and a chain touching memory it does not have with
//! length 0, so a request in a region tells whether the backend has it.

mod common;
mod vhost_proxy;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{spawn_daemon, transform, TestDevice};
use virtio_backend_kit::core::{Activation, ControlError, DeviceControl, DeviceCore};
use virtio_backend_kit::frontend::{
    FrontendError, FrontendOptions, MemoryUpdateError, VhostUserFrontendDevice,
};
use virtio_backend_kit::mmio::*;
use virtio_backend_kit::testing::{self, Interrupt, SplitQueueDriver};
use virtio_backend_kit::vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use virtio_backend_kit::vhost_user::ServeMode;
use virtio_backend_kit::vm_memory::{Bytes, GuestAddress};
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::{GuestMemoryLog, SharedDirtyLog};

/// The memory the device starts with; the rings live here.
const MEM_GPA: u64 = 0x4000_0000;
const MEM_SIZE: usize = 4 << 20;
/// The region plugged in later, well above the first.
const HOT_GPA: u64 = 0x1_0000_0000;
const HOT_SIZE: usize = 2 << 20;
const PAGE: u64 = 4096;
const WAIT: Duration = Duration::from_secs(5);
/// Regions the kit's daemon answers `GET_MAX_MEM_SLOTS` with.
const DAEMON_MEM_SLOTS: u64 = 64;

fn code(req: FrontendReq) -> u32 {
    u32::from(req)
}

fn options() -> FrontendOptions {
    common::test_device_options(WAIT)
}

/// The first region alone, and both regions (the hot-plugged one a memfd
/// of its own).
fn memories() -> (GuestMemoryLog, GuestMemoryLog) {
    let _ = env_logger::builder().is_test(true).try_init();
    let base = testing::shared_guest_memory(MEM_GPA, MEM_SIZE).unwrap();
    let hot = testing::shared_guest_memory(HOT_GPA, HOT_SIZE).unwrap();
    let (_, region) = hot
        .remove_region(GuestAddress(HOT_GPA), HOT_SIZE as u64)
        .unwrap();
    let both = base.insert_region(region).unwrap();
    (base, both)
}

/// The error inside an adapter's `ControlError::External`.
fn frontend_error(e: &ControlError) -> &FrontendError {
    match e {
        ControlError::External(inner) => inner
            .downcast_ref::<FrontendError>()
            .unwrap_or_else(|| panic!("not a FrontendError: {inner}")),
        other => panic!("not an external error: {other:?}"),
    }
}

/// The guest's one queue, its rings in the first region; buffers are
/// written and read through `mem`, the guest's memory as it is now.
struct Guest {
    ring: SplitQueueDriver,
    irq: Interrupt,
    mem: GuestMemoryLog,
}

impl Guest {
    fn new(base: &GuestMemoryLog) -> Self {
        Guest {
            ring: SplitQueueDriver::new(base, 0, 64, MEM_GPA),
            irq: Interrupt::new(),
            mem: base.clone(),
        }
    }

    fn activation(&self) -> (Activation, EventFd) {
        let (q, kick) = self.ring.activation(&self.irq);
        let activation = Activation {
            features: common::VIRTIO_F_VERSION_1,
            memory: self.mem.clone(),
            queues: vec![q],
        };
        (activation, kick)
    }

    /// A chain reading `len` bytes at `gpa` and writing as many at
    /// `gpa + 2 pages`; returns the length the device reported and what it
    /// wrote (zeroes where it wrote nothing).
    fn request(&mut self, kick: &EventFd, gpa: u64, seed: u8) -> (u32, Vec<u8>, Vec<u8>) {
        let input: Vec<u8> = (0..700u32)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect();
        let out = gpa + 2 * PAGE + 0x80;
        self.mem.write_slice(&input, GuestAddress(gpa)).unwrap();
        self.mem
            .write_slice(&vec![0u8; input.len()], GuestAddress(out))
            .unwrap();
        let len = input.len() as u32;
        let head = self.ring.add_chain(&[(gpa, len, false), (out, len, true)]);
        kick.write(1).unwrap();
        let deadline = Instant::now() + WAIT;
        let (id, written) = loop {
            if let Some(used) = self.ring.pop_used() {
                break used;
            }
            assert!(Instant::now() < deadline, "request never completed");
            self.irq.wait(Duration::from_millis(20));
        };
        assert_eq!(id, u32::from(head));
        let mut back = vec![0u8; input.len()];
        self.mem.read_slice(&mut back, GuestAddress(out)).unwrap();
        (written, input, back)
    }

    /// A request at `gpa` the device must serve in full.
    fn served(&mut self, kick: &EventFd, gpa: u64, seed: u8) {
        let (written, input, back) = self.request(kick, gpa, seed);
        assert_eq!(
            written,
            input.len() as u32,
            "request at {gpa:#x} not served"
        );
        assert_eq!(back, transform(&input), "wrong data at {gpa:#x}");
    }
}

/// Buffers at the start of the hot region / of the first region's data.
fn hot_buffer() -> u64 {
    HOT_GPA + 0x1000
}

#[test]
fn mem_slots_backend_gets_add_and_rem_mem_reg_while_running() {
    let (base, both) = memories();
    let device = TestDevice::new(1);
    let daemon = spawn_daemon(device.clone(), ServeMode::Once);
    let filter = vhost_proxy::Filter::default();
    let (_dir, sock, proxy) = vhost_proxy::spawn(daemon.path.clone(), filter.clone());
    let mut dev = VhostUserFrontendDevice::connect(&sock, options()).unwrap();
    assert!(
        dev.protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
        "{:?}",
        dev.protocol_features()
    );
    assert_eq!(dev.max_memory_regions(), DAEMON_MEM_SLOTS);
    assert_eq!(
        filter.values_of(code(FrontendReq::GET_MAX_MEM_SLOTS)).len(),
        1
    );

    let mut guest = Guest::new(&base);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    let data = guest.ring.data_area();
    guest.served(&kick, data, 1);

    // Plug the second region in.
    dev.update_memory(both.clone()).unwrap();
    guest.mem = both.clone();
    guest.served(&kick, hot_buffer(), 2);
    guest.served(&kick, hot_buffer() + 0x10_0000, 3);
    guest.served(&kick, data, 4);
    assert_eq!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).len(), 1);
    assert_eq!(filter.values_of(code(FrontendReq::REM_MEM_REG)).len(), 0);
    assert_eq!(
        filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(),
        1,
        "only the activation's table"
    );
    // The same memory again changes nothing.
    dev.update_memory(both.clone()).unwrap();
    assert_eq!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).len(), 1);

    // Take it out again: the first region still serves, the backend no
    // longer has the second.
    dev.update_memory(base.clone()).unwrap();
    assert_eq!(filter.values_of(code(FrontendReq::REM_MEM_REG)).len(), 1);
    assert_eq!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).len(), 1);
    assert_eq!(filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(), 1);
    guest.served(&kick, data + 0x4000, 5);
    assert_eq!(device.bad_chains.load(Ordering::SeqCst), 0);
    let (written, _, back) = guest.request(&kick, hot_buffer(), 6);
    assert_eq!(written, 0, "the backend still reads the removed region");
    assert!(back.iter().all(|&b| b == 0), "the backend wrote into it");
    assert_eq!(device.bad_chains.load(Ordering::SeqCst), 1);
    guest.served(&kick, data, 7);

    // And in once more, as a fresh region to the backend.
    dev.update_memory(both.clone()).unwrap();
    assert_eq!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).len(), 2);
    guest.served(&kick, hot_buffer(), 8);
    assert!(dev.is_connected() && dev.is_active());
    drop(dev);
    proxy.join().unwrap();
}

#[test]
fn memory_the_backend_cannot_take_is_refused_and_the_device_runs_on() {
    let (base, both) = memories();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let filter = vhost_proxy::Filter::default();
    let (_dir, sock, proxy) = vhost_proxy::spawn(daemon.path.clone(), filter.clone());
    let mut dev = VhostUserFrontendDevice::connect(&sock, options()).unwrap();
    let mut guest = Guest::new(&base);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    let sent = || filter.seen.lock().unwrap().len();

    // Anonymous memory: nothing the backend could map.
    let anon = GuestMemoryLog::from_ranges(&[(GuestAddress(HOT_GPA), HOT_SIZE)]).unwrap();
    let (_, anon_region) = anon
        .remove_region(GuestAddress(HOT_GPA), HOT_SIZE as u64)
        .unwrap();
    let with_anon = base.insert_region(anon_region).unwrap();
    let err = dev.update_memory(with_anon).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::Memory(MemoryUpdateError::NotFileBacked { gpa: HOT_GPA })
        ),
        "{err:?}"
    );

    // The region holding the rings cannot go.
    let (hot_only, _) = both
        .remove_region(GuestAddress(MEM_GPA), MEM_SIZE as u64)
        .unwrap();
    let err = dev.update_memory(hot_only).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::Memory(MemoryUpdateError::RingMoved { queue: 0 })
        ),
        "{err:?}"
    );
    // Nor may it be replaced by another mapping at the same guest address
    // and size (the backend has the rings at the old VMM address).
    let remapped = testing::shared_guest_memory(MEM_GPA, MEM_SIZE).unwrap();
    let err = dev.update_memory(remapped).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::Memory(MemoryUpdateError::RingMoved { queue: 0 })
        ),
        "{err:?}"
    );

    // Dirty logging on with a log covering the first region only.
    let log = SharedDirtyLog::new(MEM_GPA + MEM_SIZE as u64).unwrap();
    dev.set_dirty_log(Some(&log)).unwrap();
    let before_log = sent();
    let err = dev.update_memory(both.clone()).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::Memory(MemoryUpdateError::BeyondDirtyLog { end, .. })
                if *end == HOT_GPA + HOT_SIZE as u64
        ),
        "{err:?}"
    );
    assert_eq!(sent(), before_log, "a refused update sent requests");
    dev.set_dirty_log(None).unwrap();
    assert_eq!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).len(), 0);
    assert_eq!(filter.values_of(code(FrontendReq::REM_MEM_REG)).len(), 0);
    assert_eq!(filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(), 1);

    // The device runs on, on its old memory.
    assert!(dev.is_connected() && dev.is_active());
    let data = guest.ring.data_area();
    guest.served(&kick, data, 9);
    drop(dev);
    proxy.join().unwrap();
}

#[test]
fn backend_without_mem_slots_gets_a_new_mem_table() {
    let (base, both) = memories();
    let device = TestDevice::new(1);
    let daemon = spawn_daemon(device.clone(), ServeMode::Once);
    let filter = vhost_proxy::Filter {
        hidden_protocol: VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits(),
        ..Default::default()
    };
    let (_dir, sock, proxy) = vhost_proxy::spawn(daemon.path.clone(), filter.clone());
    let mut dev = VhostUserFrontendDevice::connect(&sock, options()).unwrap();
    assert!(!dev
        .protocol_features()
        .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    assert_eq!(dev.max_memory_regions(), 8);
    assert!(filter
        .values_of(code(FrontendReq::GET_MAX_MEM_SLOTS))
        .is_empty());

    // Dirty logging on before the update: the new table gets the log too.
    let log = SharedDirtyLog::new(HOT_GPA + HOT_SIZE as u64).unwrap();
    let mut guest = Guest::new(&base);
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    dev.set_dirty_log(Some(&log)).unwrap();
    let data = guest.ring.data_area();
    guest.served(&kick, data, 1);
    log.take_dirty_pages();
    assert_eq!(filter.values_of(code(FrontendReq::SET_LOG_BASE)).len(), 1);

    dev.update_memory(both.clone()).unwrap();
    guest.mem = both.clone();
    assert_eq!(filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(), 2);
    assert_eq!(filter.values_of(code(FrontendReq::SET_LOG_BASE)).len(), 2);
    assert!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).is_empty());
    guest.served(&kick, hot_buffer(), 2);
    let used_page = guest.ring.rings().2 / PAGE;
    let written_page = (hot_buffer() + 2 * PAGE) / PAGE;
    assert_eq!(log.take_dirty_pages(), vec![used_page, written_page]);
    guest.served(&kick, data, 3);
    dev.set_dirty_log(None).unwrap();

    // Out again: a third table, with the first region only.
    dev.update_memory(base.clone()).unwrap();
    assert_eq!(filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(), 3);
    assert!(filter.values_of(code(FrontendReq::REM_MEM_REG)).is_empty());
    guest.served(&kick, data + 0x8000, 4);
    let (written, _, _) = guest.request(&kick, hot_buffer(), 5);
    assert_eq!(written, 0, "the backend still has the removed region");
    assert_eq!(device.bad_chains.load(Ordering::SeqCst), 1);

    // Nine regions do not fit one SET_MEM_TABLE.
    let mut nine = base.clone();
    for i in 0..8u64 {
        let gpa = HOT_GPA + i * 0x10_0000;
        let one = testing::shared_guest_memory(gpa, 0x1_0000).unwrap();
        let (_, region) = one.remove_region(GuestAddress(gpa), 0x1_0000).unwrap();
        nine = nine.insert_region(region).unwrap();
    }
    let err = dev.update_memory(nine).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::Memory(MemoryUpdateError::TooManyRegions { regions: 9, max: 8 })
        ),
        "{err:?}"
    );
    assert_eq!(filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(), 3);
    guest.served(&kick, data, 6);
    drop(dev);
    proxy.join().unwrap();
}

#[test]
fn inactive_adapter_takes_memory_for_the_next_activation() {
    let (base, both) = memories();
    let daemon = spawn_daemon(TestDevice::new(1), ServeMode::Once);
    let filter = vhost_proxy::Filter::default();
    let (_dir, sock, proxy) = vhost_proxy::spawn(daemon.path.clone(), filter.clone());
    let mut dev = VhostUserFrontendDevice::connect(&sock, options()).unwrap();
    // Nothing is running: nothing is sent.
    dev.update_memory(both.clone()).unwrap();
    assert!(filter
        .values_of(code(FrontendReq::SET_MEM_TABLE))
        .is_empty());
    assert!(filter.values_of(code(FrontendReq::ADD_MEM_REG)).is_empty());
    // Memory that could never be mapped is refused all the same.
    let anon = GuestMemoryLog::from_ranges(&[(GuestAddress(MEM_GPA), MEM_SIZE)]).unwrap();
    let err = dev.update_memory(anon).unwrap_err();
    assert!(
        matches!(
            frontend_error(&err),
            FrontendError::Memory(MemoryUpdateError::NotFileBacked { gpa: MEM_GPA })
        ),
        "{err:?}"
    );
    // The activation brings both regions in its table.
    let mut guest = Guest::new(&base);
    guest.mem = both;
    let (activation, kick) = guest.activation();
    dev.activate(activation).unwrap();
    assert_eq!(filter.values_of(code(FrontendReq::SET_MEM_TABLE)).len(), 1);
    guest.served(&kick, hot_buffer(), 1);
    drop(dev);
    proxy.join().unwrap();
}

// ---------------------------------------------------------------------------
// In process: DeviceCore behind MmioTransport
// ---------------------------------------------------------------------------

/// Program the transport like a guest driver: features, queue 0 at
/// `area` in `mem`, DRIVER_OK. Returns the driver's ring and whether the
/// queue was made ready and the device started.
fn start_mmio(t: &mut MmioTransport, mem: &GuestMemoryLog, area: u64) -> (SplitQueueDriver, bool) {
    t.write_u32(STATUS, 0);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    t.write_u32(DRIVER_FEATURES_SEL, 1);
    t.write_u32(DRIVER_FEATURES, (common::VIRTIO_F_VERSION_1 >> 32) as u32);
    t.write_u32(DRIVER_FEATURES_SEL, 0);
    t.write_u32(DRIVER_FEATURES, 0);
    let features_ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    t.write_u32(STATUS, features_ok);
    assert_ne!(t.read_u32(STATUS) & STATUS_FEATURES_OK, 0);
    let ring = SplitQueueDriver::new(mem, 0, 64, area);
    common::mmio_setup_queue(t, &ring);
    if t.read_u32(QUEUE_READY) != 1 {
        return (ring, false);
    }
    t.write_u32(STATUS, features_ok | STATUS_DRIVER_OK);
    let started = t.is_activated() && t.read_u32(STATUS) & STATUS_DEVICE_NEEDS_RESET == 0;
    (ring, started)
}

/// One request through the transport's queue 0: `len` bytes read at
/// `gpa`, as many written two pages on. Returns (used length, input,
/// what was written).
fn mmio_request(
    t: &mut MmioTransport,
    ring: &mut SplitQueueDriver,
    mem: &GuestMemoryLog,
    gpa: u64,
    seed: u8,
) -> (u32, Vec<u8>, Vec<u8>) {
    let input: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ seed).collect();
    let out = gpa + 2 * PAGE;
    mem.write_slice(&input, GuestAddress(gpa)).unwrap();
    mem.write_slice(&vec![0u8; 512], GuestAddress(out)).unwrap();
    let head = ring.add_chain(&[(gpa, 512, false), (out, 512, true)]);
    t.queue_kicks()[0].1.write(1).unwrap();
    let deadline = Instant::now() + WAIT;
    let (id, written) = loop {
        if let Some(used) = ring.pop_used() {
            break used;
        }
        assert!(
            Instant::now() < deadline,
            "request at {gpa:#x} never completed"
        );
        common::poll_eventfd(t.irq_eventfd(), Duration::from_millis(20));
    };
    assert_eq!(id, u32::from(head));
    assert_ne!(t.interrupt_status() & 1, 0, "no used-buffer interrupt");
    t.write_u32(INTERRUPT_ACK, 1);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(out)).unwrap();
    (written, input, back)
}

#[test]
fn in_process_core_behind_mmio_takes_a_new_region_while_running() {
    let (base, both) = memories();
    let device = TestDevice::new(1);
    let core = DeviceCore::new(device.clone()).unwrap();
    let mut t = MmioTransport::new(Box::new(core), base.clone()).unwrap();
    let (mut ring, started) = start_mmio(&mut t, &base, MEM_GPA);
    assert!(started, "activation failed");
    let data = ring.data_area();
    let (n, input, back) = mmio_request(&mut t, &mut ring, &base, data, 1);
    assert_eq!((n, back), (512, transform(&input)));
    // Before the update the device does not have the second region.
    let (n, _, _) = mmio_request(&mut t, &mut ring, &both, hot_buffer(), 2);
    assert_eq!(n, 0);
    assert_eq!(device.bad_chains.load(Ordering::SeqCst), 1);

    t.update_memory(both.clone()).unwrap();
    for (i, gpa) in [hot_buffer(), hot_buffer() + 0x10_0000, data]
        .into_iter()
        .enumerate()
    {
        let (n, input, back) = mmio_request(&mut t, &mut ring, &both, gpa, 3 + i as u8);
        assert_eq!(n, 512, "request at {gpa:#x} not served");
        assert_eq!(back, transform(&input));
    }
    assert_eq!(device.bad_chains.load(Ordering::SeqCst), 1);

    // Memory without the rings' region is refused; the device runs on.
    let (hot_only, _) = both
        .remove_region(GuestAddress(MEM_GPA), MEM_SIZE as u64)
        .unwrap();
    let err = t.update_memory(hot_only).unwrap_err();
    assert!(matches!(err, ControlError::Invalid(_)), "{err:?}");
    let (n, _, _) = mmio_request(&mut t, &mut ring, &both, hot_buffer(), 6);
    assert_eq!(n, 512, "the refused update changed the device's memory");

    // The transport uses the new memory for later activations: a queue in
    // the second region is accepted after a reset.
    t.write_u32(STATUS, 0);
    assert!(!t.is_activated());
    let (mut ring, started) = start_mmio(&mut t, &both, HOT_GPA + 0x8_0000);
    assert!(started, "a queue in the plugged-in region was refused");
    let hot_data = ring.data_area();
    let (n, input, back) = mmio_request(&mut t, &mut ring, &both, hot_data, 7);
    assert_eq!((n, back), (512, transform(&input)));

    // Take the region out again (after moving the queue back): the first
    // region serves, the second no longer does.
    t.write_u32(STATUS, 0);
    let (mut ring, started) = start_mmio(&mut t, &both, MEM_GPA);
    assert!(started);
    t.update_memory(base.clone()).unwrap();
    let (n, input, back) = mmio_request(&mut t, &mut ring, &both, data, 8);
    assert_eq!((n, back), (512, transform(&input)));
    let bad = device.bad_chains.load(Ordering::SeqCst);
    let (n, _, _) = mmio_request(&mut t, &mut ring, &both, hot_buffer(), 9);
    assert_eq!(n, 0, "the device still uses the removed region");
    assert_eq!(device.bad_chains.load(Ordering::SeqCst), bad + 1);
    // And a later activation may not put a queue there.
    t.write_u32(STATUS, 0);
    let (_, started) = start_mmio(&mut t, &both, HOT_GPA + 0x8_0000);
    assert!(
        !started,
        "a queue outside the transport's memory was accepted"
    );
    drop(t);
}
