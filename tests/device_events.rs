// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device-driven events on both worker flavours (a kit worker thread and
//! an `event-manager` loop): a device wakes its own worker from another
//! thread, adds an fd at run time, and pauses an fd it cannot serve so that
//! an idle device with input waiting costs a few calls, not a spinning core.
//!
//! The device holds "host input" on an eventfd it never reads (as a
//! console holds bytes while the guest has posted no receive buffer): the
//! fd stays readable, and level-triggered polling would call the device
//! for ever. It pauses the fd on the first call; the test counts the calls
//! over a second, then resumes the fd and sees it served again.

mod event_loop;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_loop::EventLoop;
use virtio_backend_kit::core::{
    Activation, DeviceControl, DeviceCore, QueueActivation, WorkerWaker,
};
use virtio_backend_kit::vm_memory::GuestAddress;
use virtio_backend_kit::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use virtio_backend_kit::vring::Notifier;
use virtio_backend_kit::{
    BackendError, DeviceBackend, DeviceEvent, GuestMemoryLog, QueueSet, VringOwned,
};

const INPUT: u64 = 1;
const LATE: u64 = 2;

/// Holds input it cannot deliver; counts what the worker calls it with.
struct Holder {
    input: EventFd,
    late: EventFd,
    waker: Mutex<Option<WorkerWaker>>,
    input_events: AtomicU64,
    late_events: AtomicU64,
    wakes: AtomicU64,
    pause_input: AtomicBool,
}

impl Holder {
    fn new() -> Arc<Self> {
        let input = EventFd::new(EFD_NONBLOCK).unwrap();
        input.write(1).unwrap();
        Arc::new(Holder {
            input,
            late: EventFd::new(EFD_NONBLOCK).unwrap(),
            waker: Mutex::new(None),
            input_events: AtomicU64::new(0),
            late_events: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            pause_input: AtomicBool::new(true),
        })
    }

    fn waker(&self) -> WorkerWaker {
        self.waker
            .lock()
            .unwrap()
            .clone()
            .expect("the core gave a waker")
    }
}

impl DeviceBackend for Holder {
    type Vring = VringOwned;
    fn device_type(&self) -> u32 {
        0x7d
    }
    fn worker_fds(&self, _worker: usize) -> Vec<(std::os::fd::RawFd, u64)> {
        vec![(self.input.as_raw_fd(), INPUT)]
    }
    fn set_waker(&self, worker: usize, waker: WorkerWaker) {
        assert_eq!(worker, 0);
        *self.waker.lock().unwrap() = Some(waker);
    }
    fn handle_event(
        &self,
        event: DeviceEvent,
        _: &QueueSet<VringOwned>,
        _: usize,
    ) -> Result<(), BackendError> {
        match event {
            DeviceEvent::Fd(INPUT) => {
                self.input_events.fetch_add(1, Ordering::SeqCst);
                // Nowhere to put the input: stop polling it (the fd stays
                // readable, the input stays where it is).
                if self.pause_input.load(Ordering::SeqCst) {
                    self.waker().pause_fd(INPUT);
                }
            }
            DeviceEvent::Fd(LATE) => {
                self.late_events.fetch_add(1, Ordering::SeqCst);
                let _ = self.late.read();
            }
            DeviceEvent::Wake => {
                self.wakes.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }
}

/// An activation of the one queue over zeroed memory (an empty ring).
fn activation(mem: &GuestMemoryLog) -> Activation {
    let fd = || EventFd::new(EFD_NONBLOCK).unwrap();
    Activation {
        features: 1 << 32,
        memory: mem.clone(),
        queues: vec![QueueActivation {
            index: 0,
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            kick: fd(),
            call: Notifier::new(fd()),
            err: Notifier::new(fd()),
        }],
    }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The scenario, once the core runs in `flavour` with its queue started.
fn scenario(flavour: &str, dev: &Holder) {
    wait_for("the first input event", || {
        dev.input_events.load(Ordering::SeqCst) >= 1
    });
    let before = dev.input_events.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let idle_calls = dev.input_events.load(Ordering::SeqCst) - before;
    println!("VBK-DEVICE-EVENTS flavour={flavour} idle_input_calls_per_s={idle_calls}");
    assert!(
        idle_calls <= 2,
        "{flavour}: the paused fd was polled {idle_calls} times in 1 s"
    );

    // Wake-ups from another thread arrive, coalesced.
    let waker = dev.waker();
    std::thread::spawn(move || {
        for _ in 0..100 {
            assert!(waker.wake());
        }
    })
    .join()
    .unwrap();
    wait_for("a wake-up", || dev.wakes.load(Ordering::SeqCst) >= 1);
    std::thread::sleep(Duration::from_millis(50));
    let wakes = dev.wakes.load(Ordering::SeqCst);
    assert!(
        (1..=100).contains(&wakes),
        "{flavour}: {wakes} wake events for 100 wakes"
    );

    // Resumed, the input is served again (and paused again).
    let before = dev.input_events.load(Ordering::SeqCst);
    dev.waker().resume_fd(INPUT);
    wait_for("input after resume", || {
        dev.input_events.load(Ordering::SeqCst) > before
    });

    // An fd added at run time is polled.
    dev.waker().add_fd(dev.late.as_raw_fd(), LATE);
    dev.late.write(1).unwrap();
    wait_for("the added fd", || {
        dev.late_events.load(Ordering::SeqCst) >= 1
    });
    // Removed, it is not.
    dev.waker().remove_fd(LATE);
    std::thread::sleep(Duration::from_millis(50));
    let late = dev.late_events.load(Ordering::SeqCst);
    dev.late.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        dev.late_events.load(Ordering::SeqCst),
        late,
        "{flavour}: a removed fd was polled"
    );

    // For contrast: the same device not pausing its fd is called for as
    // long as the input waits.
    dev.pause_input.store(false, Ordering::SeqCst);
    let before = dev.input_events.load(Ordering::SeqCst);
    dev.waker().resume_fd(INPUT);
    std::thread::sleep(Duration::from_millis(200));
    dev.pause_input.store(true, Ordering::SeqCst);
    let spinning = (dev.input_events.load(Ordering::SeqCst) - before) * 5;
    println!("VBK-DEVICE-EVENTS flavour={flavour} unpaused_input_calls_per_s={spinning}");
    assert!(
        spinning > 1000,
        "{flavour}: an unpaused readable fd should be polled again and again"
    );
}

fn memory() -> GuestMemoryLog {
    GuestMemoryLog::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap()
}

#[test]
fn device_events_on_a_worker_thread() {
    let dev = Holder::new();
    let mem = memory();
    let mut core = DeviceCore::new(dev.clone()).unwrap();
    DeviceControl::activate(&mut core, activation(&mem)).unwrap();
    scenario("worker-thread", &dev);
}

#[test]
fn device_events_on_an_event_manager_loop() {
    let dev = Holder::new();
    let mem = memory();
    let (mut core, subscribers) = DeviceCore::with_event_loop(dev.clone()).unwrap();
    let event_loop = EventLoop::spawn(subscribers);
    DeviceControl::activate(&mut core, activation(&mem)).unwrap();
    scenario("event-manager", &dev);
    event_loop.stop();
}
