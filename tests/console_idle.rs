// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An idle console with host input waiting costs nothing: the reference
//! console (vmm-example) fills its buffer, the guest posts no receive
//! buffer, the host keeps more input ready, and the device pauses its
//! input fd instead of being polled for ever. Its own test binary, so the
//! process CPU time measured is the console's alone.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_backend_kit::core::{Activation, DeviceControl, DeviceCore, QueueActivation};
use virtio_backend_kit::vm_memory::GuestAddress;
use virtio_backend_kit::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use virtio_backend_kit::vring::Notifier;
use virtio_backend_kit::GuestMemoryLog;
use vmm_example::devices::console::MAX_PENDING;
use vmm_example::devices::ConsoleDevice;

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe {
        (
            OwnedFd::from_raw_fd(fds[0]).into(),
            OwnedFd::from_raw_fd(fds[1]).into(),
        )
    }
}

/// CPU time (user + system) of this process.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writes for the duration of the call.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn an_idle_console_with_input_waiting_does_not_spin() {
    let (input, mut host_in) = pipe();
    let (_host_out, output) = pipe();
    let dev = Arc::new(ConsoleDevice::new(input, output, 64).unwrap());
    let mem = GuestMemoryLog::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
    let fd = || EventFd::new(EFD_NONBLOCK).unwrap();
    let queue = |index: u16| QueueActivation {
        index,
        size: 64,
        desc_table: 0x1000 + 0x4000 * u64::from(index),
        avail_ring: 0x2000 + 0x4000 * u64::from(index),
        used_ring: 0x3000 + 0x4000 * u64::from(index),
        kick: fd(),
        call: Notifier::new(fd()),
        err: Notifier::new(fd()),
    };
    let mut core = DeviceCore::new(dev.clone()).unwrap();
    DeviceControl::activate(
        &mut core,
        Activation {
            features: 1 << 32,
            memory: mem,
            queues: vec![queue(0), queue(1)],
        },
    )
    .unwrap();
    // The buffer's worth, then more that stays readable in the pipe.
    host_in.write_all(&vec![b'x'; MAX_PENDING + 4096]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.pending() < MAX_PENDING {
        assert!(Instant::now() < deadline, "pending {}", dev.pending());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (before, t0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - before;
    println!(
        "VBK-CONSOLE idle_with_input_waiting cpu_ms={} over_ms={}",
        used.as_millis(),
        t0.elapsed().as_millis()
    );
    assert!(
        used < Duration::from_millis(50),
        "an idle console used {used:?} of CPU in 1 s"
    );
}
