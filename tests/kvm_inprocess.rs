// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-process home on a real KVM VM.
//!
//! A VM with 1 MiB of memfd-backed RAM (the same `GuestMemoryLog` the device
//! uses, registered as a KVM memory slot), an in-kernel PIC/IOAPIC and one
//! vCPU runs a few bytes of 32-bit guest code. The guest drives a
//! virtio-mmio device at 0xd000_0000 whose data plane runs in this process
//! ([`DeviceCore`] on worker threads) behind [`MmioTransport`]. The test's
//! vCPU loop is the VMM's MMIO bus: it hands register accesses that exit to
//! user space to the transport and counts them.
//!
//! What is shown, on the machine's `/dev/kvm` (skipped only without it):
//! - a QueueNotify write reaches the device through the ioeventfd with no
//!   exit to user space, and the device completes the request;
//! - the device's used-buffer interrupt travels through the irqfd into the
//!   in-kernel PIC (its IRR, read with `KVM_GET_IRQCHIP`);
//! - after unregistering, QueueNotify exits to user space again (and still
//!   works, through the transport) and KVM no longer consumes the interrupt
//!   eventfd.
//!
//! `roundtrip_through_ioeventfd_and_irqfd` also prints what one request
//! costs (`VBK-KVM ...` lines); it asserts nothing about time.

mod kvm_support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_support::*;
use virtio_backend_kit::core::{Activation, DeviceControl, DeviceCore, QueueActivation};
use virtio_backend_kit::kvm::{pic_irr, KvmError, KvmWiring};
use virtio_backend_kit::mmio::{self, MmioTransport, QUEUE_NOTIFY_OFFSET};
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::vring::{Notifier, INTERRUPT_USED_BUFFER};

macro_rules! vm_or_skip {
    () => {
        match TestVm::new() {
            Some(vm) => vm,
            None => {
                println!("SKIPPED: no /dev/kvm");
                eprintln!("SKIPPED: no /dev/kvm");
                return;
            }
        }
    };
}

/// The guest's driver initialisation of the device (virtio 1.x, section
/// 3.1.1), storing what it reads in mailbox slots 0–6.
fn driver_setup(p: &mut Asm) {
    use mmio::*;
    let ack = STATUS_ACKNOWLEDGE;
    let drv = ack | STATUS_DRIVER;
    let fok = drv | STATUS_FEATURES_OK;
    p.mmio_read(MAGIC_VALUE, 0)
        .mmio_read(VERSION, 1)
        .mmio_read(DEVICE_ID, 2)
        .mmio_write(STATUS, 0)
        .mmio_write(STATUS, ack)
        .mmio_write(STATUS, drv)
        .mmio_write(DEVICE_FEATURES_SEL, 1)
        .mmio_read(DEVICE_FEATURES, 3)
        .mmio_write(DRIVER_FEATURES_SEL, 1)
        .mmio_write(DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32)
        .mmio_write(DRIVER_FEATURES_SEL, 0)
        .mmio_write(DRIVER_FEATURES, 0)
        .mmio_write(STATUS, fok)
        .mmio_read(STATUS, 4)
        .mmio_write(QUEUE_SEL, 0)
        .mmio_read(QUEUE_NUM_MAX, 5)
        .mmio_write(QUEUE_NUM, u32::from(QSIZE))
        .mmio_write(QUEUE_DESC_LOW, DESC_ADDR as u32)
        .mmio_write(QUEUE_DESC_HIGH, 0)
        .mmio_write(QUEUE_DRIVER_LOW, AVAIL_ADDR as u32)
        .mmio_write(QUEUE_DRIVER_HIGH, 0)
        .mmio_write(QUEUE_DEVICE_LOW, USED_ADDR as u32)
        .mmio_write(QUEUE_DEVICE_HIGH, 0)
        .mmio_write(QUEUE_READY, 1)
        .mmio_write(STATUS, fok | STATUS_DRIVER_OK)
        .mmio_read(STATUS, 6);
}

/// Publish one more request (the available ring's slots all name
/// descriptor 0) and notify queue 0.
fn publish_and_notify(p: &mut Asm) {
    p.inc_word(AVAIL_ADDR + 2)
        .mmio_write(QUEUE_NOTIFY_OFFSET, 0);
}

/// The MMIO bus: the transport gets every access that exits.
fn bus(transport: &mut MmioTransport, access: Access) {
    match access {
        Access::Read(off, data) => transport.read(off, data),
        Access::Write(off, data) => transport.write(off, data),
    }
}

fn mailbox(t: &TestVm, slot: u64) -> u32 {
    t.read_obj(MAILBOX + 4 * slot)
}

fn pic_pending(t: &TestVm) -> bool {
    pic_irr(&t.vm).expect("KVM_GET_IRQCHIP") & (1 << GSI) != 0
}

fn expect_buffer(t: &TestVm, n: u64) {
    let buf = t.read(BUF_ADDR, BUF_LEN as usize);
    let want: Vec<u8> = (0..BUF_LEN as usize).map(|i| pattern(n, i)).collect();
    assert_eq!(buf, want, "request {n}: buffer contents");
}

fn would_block(fd: &EventFd) -> bool {
    matches!(fd.read(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `t`'s queue laid out, and a [`PatternDevice`] behind an MMIO transport
/// at [`MMIO_BASE`] whose queue kicks and interrupt are wired into `t`'s VM
/// (ioeventfd, irqfd on [`GSI`]).
fn wired_pattern_device(t: &TestVm) -> (Arc<PatternDevice>, MmioTransport, KvmWiring) {
    t.setup_queue();
    let device = Arc::new(PatternDevice::default());
    let core = DeviceCore::new(device.clone()).unwrap();
    let transport = MmioTransport::new(Box::new(core), t.memory.clone()).unwrap();
    let wiring = wire(t, &transport).unwrap();
    (device, transport, wiring)
}

/// Wire `transport`'s queue kicks and interrupt into `t`'s VM.
fn wire(t: &TestVm, transport: &MmioTransport) -> Result<KvmWiring, KvmError> {
    KvmWiring::register(
        t.vm.clone(),
        MMIO_BASE,
        transport.queue_kicks(),
        transport.irq_eventfd(),
        GSI,
    )
}

/// Run `t`'s vCPU to the end of phase `phase`, `transport` serving the
/// MMIO exits, of which `notify_exits` must be QueueNotify writes (`what`
/// says what is wrong if not). Returns the exits.
fn run_notify_phase(
    t: &mut TestVm,
    transport: &mut MmioTransport,
    phase: u8,
    notify_exits: usize,
    what: &str,
) -> ExitLog {
    let mut log = ExitLog::default();
    assert_eq!(
        run_phase(&mut t.vcpu, &mut log, |a| bus(transport, a)),
        phase
    );
    assert_eq!(log.writes_at(QUEUE_NOTIFY_OFFSET), notify_exits, "{what}");
    log
}

/// Run `t`'s vCPU to the end of its next phase with no transport behind
/// the MMIO window: the writes that exit are collected in `writes` as
/// (offset, bytes). Returns the phase number.
fn run_unserved(t: &mut TestVm, log: &mut ExitLog, writes: &mut Vec<(u64, Vec<u8>)>) -> u8 {
    run_phase(&mut t.vcpu, log, |a| {
        if let Access::Write(off, d) = a {
            writes.push((off, d.to_vec()))
        }
    })
}

#[test]
fn guest_drives_device_through_ioeventfd_and_irqfd() {
    let mut t = vm_or_skip!();
    let _dog = Watchdog::arm(
        "guest_drives_device_through_ioeventfd_and_irqfd",
        Duration::from_secs(60),
    );
    let (device, mut transport, mut wiring) = wired_pattern_device(&t);
    assert_eq!(wiring.wired_queues(), vec![0]);
    assert_eq!(wiring.gsi(), Some(GSI));
    assert_eq!(wiring.notify_address(), MMIO_BASE + 0x50);

    let mut p = Asm::new(CODE_ADDR);
    driver_setup(&mut p);
    p.done(1);
    publish_and_notify(&mut p);
    p.done(2);
    publish_and_notify(&mut p);
    p.done(3);
    t.load(&p);

    // Phase 1: the guest programs the transport; every access exits.
    let mut setup = ExitLog::default();
    let phase = run_phase(&mut t.vcpu, &mut setup, |a| bus(&mut transport, a));
    assert_eq!(phase, 1);
    assert_eq!(mailbox(&t, 0), mmio::MMIO_MAGIC);
    assert_eq!(mailbox(&t, 1), mmio::MMIO_VERSION);
    assert_eq!(mailbox(&t, 2), PATTERN_DEVICE_ID);
    assert_eq!(mailbox(&t, 3), 1, "DeviceFeatures[63:32] offers VERSION_1");
    assert_ne!(
        mailbox(&t, 4) & mmio::STATUS_FEATURES_OK,
        0,
        "FEATURES_OK kept"
    );
    assert_eq!(mailbox(&t, 5), u32::from(QSIZE));
    assert_ne!(mailbox(&t, 6) & mmio::STATUS_DRIVER_OK, 0, "DRIVER_OK kept");
    assert_eq!(mailbox(&t, 6) & mmio::STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(transport.is_activated());
    assert!(setup.mmio_writes.len() > 5 && setup.mmio_reads.len() == 6);
    // The queue's worker takes the vring and looks at it once by itself.
    wait_until("queue start", || {
        device.starts.load(Ordering::SeqCst) == 1 && device.queue_events.load(Ordering::SeqCst) == 1
    });
    assert!(!pic_pending(&t), "no interrupt before any request");

    // Phase 2: one request, notified through the ioeventfd.
    let notify = run_notify_phase(
        &mut t,
        &mut transport,
        2,
        0,
        "QueueNotify exited to user space",
    );
    assert_eq!(notify.exits, 1, "only the end-of-phase exit: {notify:?}");
    wait_until("request 1 completed", || t.used_idx() == 1);
    assert_eq!(device.chains.load(Ordering::SeqCst), 1);
    assert_eq!(
        device.queue_events.load(Ordering::SeqCst),
        2,
        "the device saw the kick"
    );
    assert_eq!(t.used_elem(0), (0, BUF_LEN));
    expect_buffer(&t, 1);

    // The used-buffer interrupt: status bit for the driver, edge on GSI 5
    // through the irqfd into the master PIC's IRR; KVM consumed the eventfd.
    wait_until("IRR bit of the device's GSI", || pic_pending(&t));
    assert_eq!(
        transport.interrupt_status() & INTERRUPT_USED_BUFFER,
        INTERRUPT_USED_BUFFER
    );
    assert!(
        would_block(transport.irq_eventfd()),
        "KVM should have consumed the irqfd"
    );

    // Phase 3: after unregistering, QueueNotify exits to user space; the
    // transport forwards it to the same kick eventfd and the request is
    // still served; the interrupt eventfd is no longer KVM's.
    wiring.unregister().unwrap();
    assert!(!wiring.is_registered());
    run_notify_phase(&mut t, &mut transport, 3, 1, "QueueNotify must exit now");
    wait_until("request 2 completed", || t.used_idx() == 2);
    assert_eq!(device.chains.load(Ordering::SeqCst), 2);
    expect_buffer(&t, 2);
    wait_until("interrupt eventfd left to user space", || {
        transport.irq_eventfd().read().is_ok()
    });
    // Registering again works: nothing stale was left behind in KVM.
    let again = wire(&t, &transport).expect("re-register after unregister");
    drop(again); // unregisters on drop
    let _ = wire(&t, &transport).expect("re-register after drop");
}

/// The wiring alone, before any transport: the test activates the device by
/// hand (rings laid out by the test) and the guest only writes QueueNotify.
#[test]
fn wiring_with_hand_built_activation() {
    let mut t = vm_or_skip!();
    let _dog = Watchdog::arm("wiring_with_hand_built_activation", Duration::from_secs(60));
    t.setup_queue();
    let device = Arc::new(PatternDevice::default());
    let mut core = DeviceCore::new(device.clone()).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let status = Arc::new(AtomicU32::new(0));
    let wiring = KvmWiring::register(t.vm.clone(), MMIO_BASE, [(0, &kick)], &irq, GSI).unwrap();
    // A second registration of the same queue is refused, not duplicated.
    let mut twice = KvmWiring::new(t.vm.clone(), MMIO_BASE);
    twice.register_queue(7, &kick).unwrap();
    assert!(twice.register_queue(7, &kick).is_err());
    drop(twice);

    core.activate(Activation {
        features: VIRTIO_F_VERSION_1,
        memory: t.memory.clone(),
        queues: vec![QueueActivation {
            index: 0,
            size: QSIZE,
            desc_table: DESC_ADDR,
            avail_ring: AVAIL_ADDR,
            used_ring: USED_ADDR,
            kick: kick.try_clone().unwrap(),
            call: Notifier::with_status(
                irq.try_clone().unwrap(),
                status.clone(),
                INTERRUPT_USED_BUFFER,
            ),
            err: Notifier::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }],
    })
    .unwrap();
    wait_until("queue start", || {
        device.queue_events.load(Ordering::SeqCst) == 1
    });

    let mut p = Asm::new(CODE_ADDR);
    publish_and_notify(&mut p);
    p.done(1);
    // A notification for another queue index does not match the datamatch
    // and exits to user space.
    p.mmio_write(QUEUE_NOTIFY_OFFSET, 1).done(2);
    t.load(&p);

    let mut log = ExitLog::default();
    let mut unexpected = Vec::new();
    assert_eq!(run_unserved(&mut t, &mut log, &mut unexpected), 1);
    assert!(
        unexpected.is_empty() && log.exits == 1,
        "{log:?} {unexpected:?}"
    );
    wait_until("request completed", || t.used_idx() == 1);
    assert_eq!(device.queue_events.load(Ordering::SeqCst), 2);
    expect_buffer(&t, 1);
    wait_until("IRR bit of the device's GSI", || pic_pending(&t));
    assert_eq!(status.load(Ordering::SeqCst), INTERRUPT_USED_BUFFER);

    assert_eq!(run_unserved(&mut t, &mut log, &mut unexpected), 2);
    assert_eq!(
        unexpected,
        vec![(QUEUE_NOTIFY_OFFSET, 1u32.to_le_bytes().to_vec())]
    );
    drop(wiring);
    DeviceControl::reset(&mut core).unwrap();
}

/// One request's round trip, timed over many: the guest publishes a request
/// and writes QueueNotify (ioeventfd), the worker completes it and signals
/// the interrupt eventfd (irqfd), the guest wakes from `hlt` in its
/// interrupt handler, sees the used index move and goes again. Also the
/// same loop with the guest polling the used ring instead of waiting for
/// the interrupt, and polling with QueueNotify exiting to user space.
#[test]
fn roundtrip_through_ioeventfd_and_irqfd() {
    const N: u32 = 1000;
    const BATCHES: u32 = 5;
    let mut t = vm_or_skip!();
    let _dog = Watchdog::arm(
        "roundtrip_through_ioeventfd_and_irqfd",
        Duration::from_secs(120),
    );
    let (device, mut transport, mut wiring) = wired_pattern_device(&t);

    let avail_idx = AVAIL_ADDR + 2;
    let used_idx = USED_ADDR + 2;
    let mut p = Asm::new(CODE_ADDR);
    driver_setup(&mut p);
    // Initialise the master PIC (in-kernel: no exits): vectors from 0x20,
    // only the device's line unmasked.
    for (port, value) in [
        (0x20, 0x11),
        (0x21, PIC_VECTOR_BASE),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, !(1u8 << GSI)),
    ] {
        p.out(port, value);
    }
    p.done(1);

    // Interrupt-driven loop: esi counts completed requests.
    let interrupt_loop = |p: &mut Asm, n: u32| {
        let resume = p.set_resume();
        p.raw(&[0x31, 0xf6]); // xor esi, esi
        let top = p.here();
        publish_and_notify(p);
        let wait = p.here();
        p.patch_resume(resume, wait);
        p.raw(&[0xfa]); // cli
        p.raw(&[0x66, 0xa1]).raw(&(used_idx as u32).to_le_bytes()); // mov ax, [used.idx]
        p.raw(&[0x66, 0x3b, 0x05])
            .raw(&(avail_idx as u32).to_le_bytes()); // cmp ax, [avail.idx]
        p.raw(&[0x74, 0x04]); // je +4 (past sti; hlt; jmp)
        p.raw(&[0xfb, 0xf4]); // sti; hlt (the handler resumes at `wait`)
        p.jump_back(0xeb, wait);
        p.raw(&[0x46]); // inc esi
        p.raw(&[0x81, 0xfe]).raw(&n.to_le_bytes()); // cmp esi, n
        p.jne_near_back(top);
    };
    // Polling loop: spin on the used index with interrupts off.
    let polling_loop = |p: &mut Asm, n: u32| {
        p.raw(&[0xfa, 0x31, 0xf6]); // cli; xor esi, esi
        let top = p.here();
        publish_and_notify(p);
        let wait = p.here();
        p.raw(&[0xf3, 0x90]); // pause
        p.raw(&[0x66, 0xa1]).raw(&(used_idx as u32).to_le_bytes());
        p.raw(&[0x66, 0x3b, 0x05])
            .raw(&(avail_idx as u32).to_le_bytes());
        p.jump_back(0x75, wait); // jne wait
        p.raw(&[0x46]);
        p.raw(&[0x81, 0xfe]).raw(&n.to_le_bytes());
        p.jne_near_back(top);
    };
    // Phases: 2 warm-up, then BATCHES batches of each loop; the last
    // polling batches run with QueueNotify exiting to user space.
    interrupt_loop(&mut p, 50);
    p.done(2);
    let mut phase = 2u8;
    type Emit<'a> = &'a dyn Fn(&mut Asm, u32);
    let loops: [Emit; 3] = [&interrupt_loop, &polling_loop, &polling_loop];
    for lp in loops {
        for _ in 0..BATCHES {
            lp(&mut p, N);
            phase += 1;
            p.done(phase);
        }
    }
    t.load(&p);

    let mut log = ExitLog::default();
    assert_eq!(
        run_phase(&mut t.vcpu, &mut log, |a| bus(&mut transport, a)),
        1
    );
    assert!(transport.is_activated());
    wait_until("queue start", || {
        device.queue_events.load(Ordering::SeqCst) >= 1
    });

    let mut phase = 1u8;
    // Run the next phase; microseconds per request and the exit log.
    let mut batch = |requests: u32, transport: &mut MmioTransport| {
        phase += 1;
        let mut log = ExitLog::default();
        let start = Instant::now();
        assert_eq!(
            run_phase(&mut t.vcpu, &mut log, |a| bus(transport, a)),
            phase
        );
        (
            start.elapsed().as_secs_f64() * 1e6 / f64::from(requests),
            log,
        )
    };
    let (_, warm) = batch(50, &mut transport);
    assert_eq!(warm.exits, 1, "warm-up left the kernel: {warm:?}");
    let mut irq = Vec::new();
    for _ in 0..BATCHES {
        let (us, log) = batch(N, &mut transport);
        assert_eq!(log.exits, 1, "interrupt loop left the kernel: {log:?}");
        irq.push(us);
    }
    let mut poll = Vec::new();
    for _ in 0..BATCHES {
        let (us, log) = batch(N, &mut transport);
        assert_eq!(log.exits, 1, "polling loop left the kernel: {log:?}");
        poll.push(us);
    }
    // Without the ioeventfd every QueueNotify is a trip through this loop
    // and the transport.
    wiring.unregister().unwrap();
    let mut user = Vec::new();
    for _ in 0..BATCHES {
        let (us, log) = batch(N, &mut transport);
        assert_eq!(log.writes_at(QUEUE_NOTIFY_OFFSET), N as usize);
        user.push(us);
    }

    let total = u64::from(50 + 3 * BATCHES * N);
    wait_until("all requests", || {
        device.chains.load(Ordering::SeqCst) == total
    });
    assert_eq!(t.used_idx(), total as u16);
    let summary = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!(
            "{:.2} (median of {BATCHES} batches of {N}; min {:.2}, max {:.2})",
            v[v.len() / 2],
            v[0],
            v[v.len() - 1]
        )
    };
    println!(
        "VBK-KVM roundtrip_us={} ioeventfd -> worker -> irqfd -> guest interrupt",
        summary(&mut irq)
    );
    println!(
        "VBK-KVM roundtrip_poll_us={} ioeventfd -> worker -> used ring, guest polling",
        summary(&mut poll)
    );
    println!(
        "VBK-KVM roundtrip_userspace_notify_poll_us={} QueueNotify exits to user space, guest polling",
        summary(&mut user)
    );
}

/// KVM's dirty-page log of the guest's own writes, as a live migration
/// reads it: pages the vCPU stored to are reported once (and cleared),
/// pages the host wrote through its own mapping are not KVM's to report,
/// and nothing is reported once logging is off again.
#[test]
fn kvm_reports_the_pages_the_guest_wrote_once() {
    let mut t = vm_or_skip!();
    let _dog = Watchdog::arm(
        "kvm_reports_the_pages_the_guest_wrote_once",
        Duration::from_secs(60),
    );
    const A: u64 = 0x5_0000;
    const B: u64 = 0x5_2ffc;
    const C: u64 = 0x6_1000;
    let mut p = Asm::new(CODE_ADDR);
    p.mov_eax(0x1234_5678).store_eax(A).store_eax(B).done(1);
    p.mov_eax(0x9abc_def0).store_eax(C).done(2);
    p.store_eax(A).done(3);
    t.load(&p);
    t.slots
        .set_dirty_logging(true)
        .expect("KVM_MEM_LOG_DIRTY_PAGES");
    assert!(t.slots.is_dirty_logging());
    // Loading the program and the host's writes went through the host
    // mapping: KVM starts with every page clean and never sees those.
    t.write(0x7_0000, &[1; 16]);
    let mut log = ExitLog::default();
    assert_eq!(run_phase(&mut t.vcpu, &mut log, |_| ()), 1);
    let pages = t.slots.take_dirty_pages().expect("KVM_GET_DIRTY_LOG");
    assert!(
        pages.contains(&(A >> 12)) && pages.contains(&(B >> 12)),
        "{pages:x?}"
    );
    assert!(
        !pages.contains(&0x70),
        "a host write reported by KVM: {pages:x?}"
    );
    assert!(!pages.contains(&(C >> 12)), "{pages:x?}");
    assert_eq!(t.read_obj::<u32>(A), 0x1234_5678);
    assert_eq!(run_phase(&mut t.vcpu, &mut log, |_| ()), 2);
    let pages = t.slots.take_dirty_pages().expect("KVM_GET_DIRTY_LOG");
    assert!(pages.contains(&(C >> 12)), "{pages:x?}");
    assert!(
        !pages.contains(&(A >> 12)),
        "not cleared by the first read: {pages:x?}"
    );
    t.slots.set_dirty_logging(false).expect("logging off");
    assert_eq!(run_phase(&mut t.vcpu, &mut log, |_| ()), 3);
    assert_eq!(
        t.slots.take_dirty_pages().expect("read while off"),
        Vec::<u64>::new()
    );
}
