// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Register-level tests of the virtio-mmio transport, over a real control
//! core and a small real device.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::backend::{BackendError, DeviceBackend};
use crate::core::DeviceCore;
use crate::memory::{DirtyLogBitmap, GuestMemoryHandle, GuestRegionLog};
use crate::vring::{Vring, VringOwned};

const MEM_SIZE: usize = 0x10_0000;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 5);

/// One queue; every chain is returned with length 7. Config: 8 bytes.
#[derive(Default)]
struct Echo {
    started: AtomicUsize,
    handled: AtomicUsize,
    fail_memory: AtomicBool,
    config: Mutex<[u8; 8]>,
    notifier: Mutex<Option<ConfigNotifier>>,
}

impl DeviceBackend for Echo {
    type Vring = VringOwned;
    fn device_type(&self) -> u32 {
        42
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        64
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn config_size(&self) -> usize {
        8
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let cfg = self.config.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), BackendError> {
        let mut cfg = self.config.lock().unwrap();
        let end = offset as usize + data.len();
        cfg.get_mut(offset as usize..end)
            .ok_or("out of range")?
            .copy_from_slice(data);
        Ok(())
    }
    fn set_config_notifier(&self, notifier: ConfigNotifier) {
        *self.notifier.lock().unwrap() = Some(notifier);
    }
    fn update_memory(&self, _mem: &GuestMemoryHandle) -> Result<(), BackendError> {
        if self.fail_memory.load(Ordering::SeqCst) {
            return Err("memory refused".into());
        }
        Ok(())
    }
    fn queue_started(&self, _index: u16) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
    fn process_queue(&self, _index: u16, v: &mut Vring) -> Result<(), BackendError> {
        while let Some(chain) = v.pop_chain()? {
            v.add_used(chain.head_index(), 7)?;
            self.handled.fetch_add(1, Ordering::SeqCst);
        }
        v.signal_used_queue()?;
        Ok(())
    }
}

fn memory() -> GuestMemoryLog {
    let map = MmapRegionBuilder::new_with_bitmap(MEM_SIZE, DirtyLogBitmap::default())
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .unwrap();
    GuestMemoryLog::from_regions(vec![GuestRegionLog::new(map, GuestAddress(0)).unwrap()]).unwrap()
}

fn transport() -> (MmioTransport, Arc<Echo>, GuestMemoryLog) {
    let dev = Arc::new(Echo::default());
    let core = DeviceCore::new(dev.clone()).unwrap();
    let mem = memory();
    (
        MmioTransport::new(Box::new(core), mem.clone()).unwrap(),
        dev,
        mem,
    )
}

fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    t.write_u32(DRIVER_FEATURES_SEL, 0);
    t.write_u32(DRIVER_FEATURES, features as u32);
    t.write_u32(DRIVER_FEATURES_SEL, 1);
    t.write_u32(DRIVER_FEATURES, (features >> 32) as u32);
    t.write_u32(
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    t.read_u32(STATUS)
}

/// Queue 0 with size 16: desc at 0x1000, avail at 0x2000, used at 0x3000.
fn setup_queue(t: &mut MmioTransport) {
    t.write_u32(QUEUE_SEL, 0);
    t.write_u32(QUEUE_NUM, 16);
    t.write_u32(QUEUE_DESC_LOW, 0x1000);
    t.write_u32(QUEUE_DESC_HIGH, 0);
    t.write_u32(QUEUE_DRIVER_LOW, 0x2000);
    t.write_u32(QUEUE_DEVICE_LOW, 0x3000);
    t.write_u32(QUEUE_READY, 1);
}

/// Set QueueReady on the selected queue; what QueueReady then reads.
fn ready(t: &mut MmioTransport) -> u32 {
    t.write_u32(QUEUE_READY, 1);
    t.read_u32(QUEUE_READY)
}

const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _, _) = transport();
    assert_eq!(t.read_u32(MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(t.read_u32(VERSION), 2);
    assert_eq!(t.read_u32(DEVICE_ID), 42);
    assert_eq!(t.read_u32(VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(t.read_u32(SHM_LEN_LOW), u32::MAX);
}

#[test]
fn device_features_by_select() {
    let (mut t, _, _) = transport();
    t.write_u32(DEVICE_FEATURES_SEL, 0);
    assert_eq!(t.read_u32(DEVICE_FEATURES), FEATURES as u32);
    t.write_u32(DEVICE_FEATURES_SEL, 1);
    assert_eq!(t.read_u32(DEVICE_FEATURES), (FEATURES >> 32) as u32);
    t.write_u32(DEVICE_FEATURES_SEL, 7);
    assert_eq!(t.read_u32(DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_refused_for_unoffered_features_or_missing_version_1() {
    let (mut t, _, _) = transport();
    let st = negotiate(&mut t, FEATURES | (1 << 9));
    assert_eq!(st & STATUS_FEATURES_OK, 0, "unoffered feature accepted");
    t.write_u32(STATUS, 0);
    let st = negotiate(&mut t, 1 << 5);
    assert_eq!(st & STATUS_FEATURES_OK, 0, "accepted without VERSION_1");
    t.write_u32(STATUS, 0);
    assert_ne!(negotiate(&mut t, FEATURES) & STATUS_FEATURES_OK, 0);
}

#[test]
fn driver_features_only_between_driver_and_features_ok() {
    let (mut t, _, _) = transport();
    // Before DRIVER: ignored.
    t.write_u32(DRIVER_FEATURES, 0xffff_ffff);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    t.write_u32(DRIVER_FEATURES_SEL, 1);
    t.write_u32(DRIVER_FEATURES, 1);
    t.write_u32(
        STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    // Only VERSION_1 was written (the earlier 0xffffffff was refused).
    assert_ne!(t.read_u32(STATUS) & STATUS_FEATURES_OK, 0);
    // After FEATURES_OK: ignored, and the accepted set stays valid.
    t.write_u32(DRIVER_FEATURES_SEL, 0);
    t.write_u32(DRIVER_FEATURES, 0xffff_ffff);
    setup_queue(&mut t);
    t.write_u32(STATUS, ALL_OK);
    assert_eq!(t.read_u32(STATUS), ALL_OK);
}

#[test]
fn status_steps_cannot_be_skipped_or_cleared() {
    let (mut t, _, _) = transport();
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
    assert_eq!(t.read_u32(STATUS), 0);
    t.write_u32(STATUS, STATUS_DRIVER);
    assert_eq!(t.read_u32(STATUS), 0);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE);
    assert_eq!(t.read_u32(STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    t.write_u32(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED);
    assert_ne!(t.read_u32(STATUS) & STATUS_FAILED, 0);
    t.write_u32(STATUS, 0);
    assert_eq!(t.read_u32(STATUS), 0);
}

#[test]
fn queue_size_must_be_a_power_of_two_within_max() {
    let (mut t, _, _) = transport();
    t.write_u32(QUEUE_SEL, 0);
    assert_eq!(t.read_u32(QUEUE_NUM_MAX), 64);
    for bad in [0, 3, 48, 128, 0x1_0000] {
        t.write_u32(QUEUE_NUM, bad);
        t.write_u32(QUEUE_DESC_LOW, 0x1000);
        t.write_u32(QUEUE_DRIVER_LOW, 0x2000);
        t.write_u32(QUEUE_DEVICE_LOW, 0x3000);
        assert_eq!(ready(&mut t), 0, "size {bad} accepted");
    }
    t.write_u32(QUEUE_SEL, 9);
    assert_eq!(t.read_u32(QUEUE_NUM_MAX), 0, "missing queue has a size");
    assert_eq!(ready(&mut t), 0);
}

#[test]
fn queue_ready_refused_before_addresses_or_outside_memory() {
    let (mut t, _, _) = transport();
    t.write_u32(QUEUE_SEL, 0);
    t.write_u32(QUEUE_NUM, 16);
    assert_eq!(ready(&mut t), 0, "ready without addresses");
    t.write_u32(QUEUE_DESC_LOW, 0x1000);
    t.write_u32(QUEUE_DRIVER_LOW, 0x2000);
    t.write_u32(QUEUE_DEVICE_LOW, 0x3000);
    t.write_u32(QUEUE_DEVICE_HIGH, 0x10);
    assert_eq!(ready(&mut t), 0, "ready with rings outside memory");
    t.write_u32(QUEUE_DEVICE_HIGH, 0);
    t.write_u32(QUEUE_DEVICE_LOW, 0x3002);
    assert_eq!(ready(&mut t), 0, "ready with misaligned used ring");
    t.write_u32(QUEUE_DEVICE_LOW, 0x3000);
    assert_eq!(ready(&mut t), 1);
    // A ready queue cannot be reconfigured.
    t.write_u32(QUEUE_NUM, 32);
    t.write_u32(QUEUE_DESC_LOW, 0x8000);
    t.write_u32(QUEUE_READY, 0);
    assert_eq!(ready(&mut t), 1);
}

#[test]
fn driver_ok_activates_and_notify_reaches_the_device_with_interrupt_status() {
    let (mut t, dev, mem) = transport();
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t);
    t.write_u32(STATUS, ALL_OK);
    assert!(t.is_activated());
    // One descriptor chain, head 0.
    mem.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
    mem.write_obj(16u32, GuestAddress(0x1008)).unwrap();
    mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
    mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
    let _ = t.irq_eventfd().read();
    t.write_u32(QUEUE_NOTIFY, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while dev.handled.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "kick not handled");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    while t.interrupt_status() & INTERRUPT_USED_BUFFER == 0 {
        assert!(std::time::Instant::now() < deadline, "no interrupt status");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(t.read_u32(INTERRUPT_STATUS) & INTERRUPT_USED_BUFFER, 1);
    assert!(t.irq_eventfd().read().is_ok(), "irq eventfd not signalled");
    assert_eq!(dev.started.load(Ordering::SeqCst), 1);
    let used_len: u32 = mem.read_obj(GuestAddress(0x3008)).unwrap();
    assert_eq!(used_len, 7);
    t.write_u32(INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
    assert_eq!(t.read_u32(INTERRUPT_STATUS), 0);
    // No reconfiguration after DRIVER_OK.
    t.write_u32(QUEUE_SEL, 1);
    t.write_u32(QUEUE_NUM, 16);
    assert_eq!(ready(&mut t), 0);
    // Reset returns to the initial state.
    t.write_u32(STATUS, 0);
    assert!(!t.is_activated());
    t.write_u32(QUEUE_SEL, 0);
    assert_eq!(t.read_u32(QUEUE_READY), 0);
    assert_eq!(t.read_u32(STATUS), 0);
}

#[test]
fn activation_failure_sets_device_needs_reset_with_config_interrupt() {
    let (mut t, dev, _) = transport();
    dev.fail_memory.store(true, Ordering::SeqCst);
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t);
    t.write_u32(STATUS, ALL_OK);
    assert!(!t.is_activated());
    assert_ne!(t.read_u32(STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_ne!(t.read_u32(INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0);
    t.write_u32(STATUS, 0);
    dev.fail_memory.store(false, Ordering::SeqCst);
    negotiate(&mut t, FEATURES);
    setup_queue(&mut t);
    t.write_u32(STATUS, ALL_OK);
    assert!(t.is_activated());
}

#[test]
fn config_space_and_generation() {
    let (mut t, dev, _) = transport();
    t.write(CONFIG_OFFSET + 2, &[0xab, 0xcd]);
    let mut b = [0u8; 4];
    t.read(CONFIG_OFFSET, &mut b);
    assert_eq!(b, [0, 0, 0xab, 0xcd]);
    let mut past = [0xffu8; 4];
    t.read(CONFIG_OFFSET + 6, &mut past);
    assert_eq!(
        past, [0; 4],
        "bytes past the config space must read as zero"
    );
    t.write(CONFIG_OFFSET + 6, &[1, 2, 3, 4]);
    let gen = t.read_u32(CONFIG_GENERATION);
    let notifier = dev.notifier.lock().unwrap().clone().unwrap();
    notifier.notify();
    assert_eq!(t.read_u32(CONFIG_GENERATION), gen + 1);
    assert_ne!(t.read_u32(INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0);
}

#[test]
fn unaligned_wrong_size_and_unknown_accesses_are_ignored() {
    let (mut t, _, _) = transport();
    let mut b2 = [0xffu8; 2];
    t.read(MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xffu8; 4];
    t.read(MAGIC_VALUE + 1, &mut b4);
    assert_eq!(b4, [0; 4]);
    assert_eq!(t.read_u32(0x0c8), 0);
    t.write(STATUS, &[1]);
    t.write(STATUS + 2, &[1, 0, 0, 0]);
    t.write_u32(0x0c8, 5);
    assert_eq!(t.read_u32(STATUS), 0);
    // Notifying a missing queue or before DRIVER_OK does nothing.
    t.write_u32(QUEUE_NOTIFY, 77);
    t.write_u32(QUEUE_NOTIFY, 0);
    assert!(t.queue_kicks()[0].1.read().is_err());
}
