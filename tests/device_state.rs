// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device state over vhost-user (`DEVICE_STATE`: SET_DEVICE_STATE_FD and
//! CHECK_DEVICE_STATE), as a migration carries it: the source backend
//! writes a versioned snapshot into a pipe, the destination reads it,
//! validates it and restores the device's own state. A corrupt stream is
//! refused by CHECK_DEVICE_STATE and the session goes on.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{pipe, spawn_daemon, Client};
use virtio_backend_kit::snapshot;
use virtio_backend_kit::vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
};
use virtio_backend_kit::vhost::vhost_user::VhostUserFrontend;
use virtio_backend_kit::vhost::VhostBackend;
use virtio_backend_kit::vhost_user::ServeMode;
use virtio_backend_kit::{BackendError, DeviceBackend, Vring, VringOwned};

/// A device whose whole state is a counter.
#[derive(Default)]
struct Counter {
    value: AtomicU64,
}

impl DeviceBackend for Counter {
    type Vring = VringOwned;
    fn device_type(&self) -> u32 {
        4
    }
    fn process_queue(&self, _: u16, _: &mut Vring) -> Result<(), BackendError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, BackendError> {
        Ok(self.value.load(Ordering::SeqCst).to_le_bytes().to_vec())
    }
    fn restore_state(&self, data: &[u8]) -> Result<(), BackendError> {
        let bytes: [u8; 8] = data.try_into().map_err(|_| "state is not 8 bytes")?;
        self.value
            .store(u64::from_le_bytes(bytes), Ordering::SeqCst);
        Ok(())
    }
}

fn protocol() -> VhostUserProtocolFeatures {
    Client::default_protocol() | VhostUserProtocolFeatures::DEVICE_STATE
}

/// SET_DEVICE_STATE_FD: a transfer in `direction` at the STOPPED phase
/// over `fd`; the backend must use it, not return an fd of its own.
fn set_state_fd(c: &Client, direction: VhostTransferStateDirection, fd: File) {
    let own = c
        .frontend
        .set_device_state_fd(
            direction,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(fd),
        )
        .unwrap();
    assert!(own.is_none(), "backend returned its own fd");
}

/// A LOAD transfer of `bytes`: sent through a pipe, which is then closed.
fn load(c: &Client, bytes: &[u8]) {
    let (rd, mut wr) = pipe();
    set_state_fd(c, VhostTransferStateDirection::LOAD, rd);
    wr.write_all(bytes).unwrap();
}

#[test]
fn device_state_travels_from_source_to_destination() {
    let source_dev = Arc::new(Counter::default());
    source_dev.value.store(0xdead_beef, Ordering::SeqCst);
    let source = spawn_daemon(source_dev, ServeMode::Once);
    let mut src = source.frontend(1);
    src.negotiate(1 << 32, protocol());
    let (mut rd, wr) = pipe();
    set_state_fd(&src, VhostTransferStateDirection::SAVE, wr);
    let mut bytes = Vec::new();
    rd.read_to_end(&mut bytes).unwrap();
    src.frontend.check_device_state().unwrap();
    let snap = snapshot::decode(&bytes).expect("a versioned snapshot");
    assert_eq!(snap.device_type, 4);
    assert_eq!(snap.device_state, 0xdead_beefu64.to_le_bytes());
    println!("VBK-DEVICE-STATE bytes={}", bytes.len());

    // The destination: a fresh backend process.
    let dest_dev = Arc::new(Counter::default());
    let dest = spawn_daemon(dest_dev.clone(), ServeMode::Once);
    let mut dst = dest.frontend(1);
    dst.negotiate(1 << 32, protocol());
    load(&dst, &bytes);
    dst.frontend.check_device_state().unwrap();
    assert_eq!(dest_dev.value.load(Ordering::SeqCst), 0xdead_beef);

    // A corrupt stream is refused; the session goes on.
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    load(&dst, &bad);
    assert!(dst.frontend.check_device_state().is_err());
    assert_eq!(dest_dev.value.load(Ordering::SeqCst), 0xdead_beef);
    assert!(
        dst.frontend.check_device_state().is_err(),
        "no transfer pending"
    );
    assert_eq!(dst.frontend.get_features().unwrap() & (1 << 32), 1 << 32);
}

#[test]
fn state_file_brings_device_state_back_after_a_restart() {
    use virtio_backend_kit::vhost_user::VhostUserDaemon;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("device.state");
    let sock = dir.path().join("sock");

    let dev = Arc::new(Counter::default());
    dev.value.store(41, Ordering::SeqCst);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut daemon = VhostUserDaemon::new(dev)
        .unwrap()
        .with_state_file(state.clone())
        .unwrap();
    let server = std::thread::spawn(move || daemon.serve_listener(&listener, ServeMode::Once));
    {
        let mut c = Client::new(std::os::unix::net::UnixStream::connect(&sock).unwrap(), 1);
        c.negotiate(1 << 32, protocol());
    }
    server.join().unwrap().unwrap();
    let snap = snapshot::decode(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(snap.device_state, 41u64.to_le_bytes());

    // A new process (here: a new daemon) with the same file.
    let dev = Arc::new(Counter::default());
    let _daemon = VhostUserDaemon::new(dev.clone())
        .unwrap()
        .with_state_file(state.clone())
        .unwrap();
    assert_eq!(dev.value.load(Ordering::SeqCst), 41);

    // A corrupt state file is a clear error, not a panic.
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let err = VhostUserDaemon::new(Arc::new(Counter::default()))
        .unwrap()
        .with_state_file(state)
        .expect_err("corrupt state file accepted");
    assert!(err.to_string().contains("state file"), "{err}");
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

/// Fill a pipe so that the next write to it would block.
fn fill(w: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let fd = w.as_raw_fd();
    // SAFETY: fcntl and write on our own fd, a valid buffer.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        let buf = [0u8; 4096];
        while libc::write(fd, buf.as_ptr().cast(), buf.len()) > 0 {}
        libc::fcntl(fd, libc::F_SETFL, 0);
    }
}

#[test]
fn unread_state_pipes_leave_no_thread_behind_and_check_still_answers() {
    let d = spawn_daemon(Arc::new(Counter::default()), ServeMode::KeepServing);
    let mut c = d.frontend(1);
    c.negotiate(1 << 32, protocol());
    let mut readers = Vec::new();
    for _ in 0..50 {
        let (rd, wr) = pipe();
        fill(&wr);
        set_state_fd(&c, VhostTransferStateDirection::SAVE, wr);
        readers.push(rd); // kept open, never read
    }
    let left = threads_named("vbk-device-state");
    println!("VBK-HOSTILE device_state_threads_after_50={left}");
    assert!(left <= 1, "{left} transfer threads after 50 unread pipes");
    let fe = c.frontend.clone();
    let checked = common::within_timeout("CHECK_DEVICE_STATE", move || fe.check_device_state());
    assert!(checked.is_err(), "an unread transfer reported success");
    assert_eq!(threads_named("vbk-device-state"), 0);

    // Load from a pipe the frontend never closes: CHECK answers too.
    let (rd, wr) = pipe();
    set_state_fd(&c, VhostTransferStateDirection::LOAD, rd);
    let fe = c.frontend.clone();
    let checked = common::within_timeout("CHECK_DEVICE_STATE", move || fe.check_device_state());
    assert!(checked.is_err(), "a load that never ended reported success");
    drop(wr);
    // The session goes on.
    c.frontend.get_features().unwrap();
}
