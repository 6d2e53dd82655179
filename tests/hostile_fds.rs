// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A frontend's fds are its choice: a call fd that blocks when written (a
//! full eventfd, a pipe nobody reads) and a kick fd that is readable
//! forever (a pipe at end of file) must neither wedge nor spin the daemon.
//! Every wait is bounded: a regression fails a test, it never hangs it.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use virtio_backend_kit::vhost::VhostBackend;
use virtio_backend_kit::vhost_user::ServeMode;
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x10_0000;
const QSIZE: u16 = 16;
const NUM_QUEUES: usize = 2;

fn rig() -> (Daemon<TestDevice>, Client, GuestMem) {
    let daemon = spawn_daemon(TestDevice::new(NUM_QUEUES), ServeMode::KeepServing);
    let (client, guest) =
        daemon.ready_frontend(NUM_QUEUES as u64, TEST_FEATURES, GUEST_GPA, GUEST_SIZE);
    (daemon, client, guest)
}

fn as_eventfd(fd: impl std::os::fd::IntoRawFd) -> EventFd {
    // SAFETY: ownership of a valid fd moves into the EventFd.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writes.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn roundtrip(q: &mut SplitQueue, seed: u8) {
    let data = pattern(seed, 64);
    let (head, out) = q.add_request(&data, 64);
    q.kick();
    assert_eq!(q.wait_used(1), vec![(u32::from(head), 64)]);
    assert_eq!(q.read(out, 64), transform(&data));
}

#[test]
fn a_call_fd_that_cannot_be_written_wedges_nothing() {
    let (daemon, mut client, guest) = rig();
    for blocking in ["full eventfd", "pipe nobody reads"] {
        let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
        let _keep; // the pipe's read end, kept open and never read
        if blocking == "full eventfd" {
            // SAFETY: eventfd(2) with no pointer arguments; a blocking one,
            // as a hostile frontend would send it.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: just created, owned by nobody else.
            let full = as_eventfd(unsafe { OwnedFd::from_raw_fd(fd) });
            full.write(u64::MAX - 1).unwrap(); // the next write would block
            q.call = full;
            _keep = None;
        } else {
            let (r, w) = pipe();
            // Fill the pipe so the next write would block.
            // SAFETY: fcntl on our own fd.
            unsafe {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&w),
                    libc::F_SETFL,
                    libc::O_NONBLOCK,
                )
            };
            let we = as_eventfd(w);
            while we.write(1).is_ok() {}
            // SAFETY: back to blocking, as the frontend sent it.
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&we), libc::F_SETFL, 0) };
            q.call = we;
            _keep = Some(r);
        }
        client.start_queue(&q, 0);
        within_timeout(blocking, {
            let mut q2 = q;
            move || {
                for seed in 0..40 {
                    roundtrip(&mut q2, seed);
                }
                q2
            }
        });
        // The control path still answers, and so does a second queue.
        let base = within_timeout("GET_VRING_BASE", {
            let fe = client.frontend.clone();
            move || fe.get_vring_base(0).unwrap()
        });
        assert_eq!(base, 40, "{blocking}");
        let mut q1 = SplitQueue::new(&guest, 1, QSIZE, GUEST_GPA + QUEUE_AREA);
        client.start_queue(&q1, 0);
        within_timeout("second queue", move || roundtrip(&mut q1, 99));
        client.frontend.get_vring_base(1).unwrap();
    }
    drop(daemon);
}

#[test]
fn a_kick_fd_at_end_of_file_does_not_spin_the_worker() {
    let (daemon, mut client, guest) = rig();
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    let (r, w) = pipe();
    drop(w); // EOF: readable forever
    q.kick = as_eventfd(r);
    client.start_queue(&q, 0);
    assert!(
        q.wait_err(Duration::from_secs(5)),
        "the queue was not reported broken on its err fd"
    );
    let (t0, c0) = (Instant::now(), cpu_time());
    std::thread::sleep(Duration::from_secs(1));
    let (wall, cpu) = (t0.elapsed(), cpu_time() - c0);
    println!(
        "VBK-HOSTILE kick_eof cpu_ms={} wall_ms={}",
        cpu.as_millis(),
        wall.as_millis()
    );
    assert!(
        cpu < wall / 5,
        "the daemon burnt {cpu:?} of CPU in {wall:?} on a kick fd at EOF"
    );
    // The session goes on: the queue stops, and restarts with a real kick.
    let base = within_timeout("GET_VRING_BASE", {
        let fe = client.frontend.clone();
        move || fe.get_vring_base(0).unwrap()
    });
    assert_eq!(base, 0);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    within_timeout("restarted queue", move || roundtrip(&mut q, 5));
    drop(daemon);
}

/// The frontend truncates its guest-memory file under the daemon's live
/// mapping: the access that faults is survived (SIGBUS handled, the page
/// replaced), the session ends, and the daemon serves the next frontend.
#[test]
fn guest_memory_shrunk_under_a_live_mapping_is_survived() {
    let (daemon, mut client, guest) = rig();
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    roundtrip(&mut q, 1);
    let before = virtio_backend_kit::fault_guard::faults_survived();
    // A request in the ring, then the memory file shrinks to nothing; from
    // now on this process must not touch `guest` either.
    let _ = q.add_request(&pattern(2, 64), 64);
    guest.file.set_len(0).unwrap();
    q.kick();
    // The session ends: the daemon shut its socket down.
    let fe = client.frontend.clone();
    within_timeout("the session to end", move || {
        let deadline = Instant::now() + Duration::from_secs(4);
        while fe.get_features().is_ok() {
            assert!(Instant::now() < deadline, "the session goes on");
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let survived = virtio_backend_kit::fault_guard::faults_survived() - before;
    println!("VBK-HOSTILE shrunk_memory faults_survived={survived}");
    assert!(survived >= 1);
    drop(q);
    drop(guest);
    // The next frontend is served.
    let (mut client, guest) =
        daemon.ready_frontend(NUM_QUEUES as u64, TEST_FEATURES, GUEST_GPA, GUEST_SIZE);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    within_timeout("a new session", move || roundtrip(&mut q, 3));
}

/// The in-flight area is the daemon's own memfd: the frontend that gets it
/// cannot shrink it under the daemon's mapping (sealed).
#[test]
fn the_inflight_area_cannot_be_shrunk_by_the_frontend() {
    use virtio_backend_kit::vhost::vhost_user::message::VhostUserInflight;
    use virtio_backend_kit::vhost::vhost_user::VhostUserFrontend;
    let (_daemon, mut client, _guest) = rig();
    let (info, memfd) = client
        .frontend
        .get_inflight_fd(&VhostUserInflight::new(0, 0, NUM_QUEUES as u16, QSIZE))
        .unwrap();
    let e = memfd.set_len(0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert_eq!(memfd.metadata().unwrap().len(), info.mmap_size);
}

/// A dirty log fd shorter than the log it announces is refused at
/// SET_LOG_BASE (it was mapped, and the first mark faulted). With LOG_SHMFD
/// the refusal is the empty reply.
#[test]
fn a_dirty_log_larger_than_its_file_is_refused() {
    use virtio_backend_kit::vhost::vhost_user::message::FrontendReq;
    let (_daemon, client, _guest) = rig();
    let log = LogArea::new(4096);
    let fd = [std::os::fd::AsRawFd::as_raw_fd(&log.file)];
    let set = FrontendReq::SET_LOG_BASE.into();
    let r = client.raw.call(set, &u64s(&[1 << 20, 0]), &fd);
    assert!(
        r.payload.is_empty(),
        "a log past the end of its file was accepted"
    );
    let r = client.raw.call(set, &u64s(&[4096, 0]), &fd);
    assert!(!r.payload.is_empty(), "a log that fits was refused");
    assert_eq!(client.raw.get_queue_num(), NUM_QUEUES as u64);
}
