// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Postcopy live migration (`VHOST_USER_PROTOCOL_F_PAGEFAULT`), driven from
//! the frontend side over a real socket with memfd guest memory.
//!
//! The test plays the destination QEMU: it negotiates PAGEFAULT, receives
//! the backend's userfaultfd with `POSTCOPY_ADVISE`, sends `POSTCOPY_LISTEN`
//! and a memory table whose pages have never been touched, learns from the
//! reply where the backend mapped them, and acks. A virtio-blk write whose
//! data buffer is on a missing page then blocks the backend's worker on a
//! fault; the test reads the fault event from the userfaultfd, checks the
//! address, supplies the page with `UFFDIO_COPY` and checks that exactly
//! those bytes reach the disk image. The same flow runs against the daemon
//! in a thread and against the `vhost-user-blk` binary in its own process
//! (where the fault is resolved from another address space, as QEMU does).
//! Negative tests check that out-of-order or unnegotiated requests are
//! refused while the session keeps serving.

#![cfg(feature = "postcopy")]

mod common;
mod guest_vm;
mod process;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::blk::{self, S_OK, T_OUT};
use common::*;
use virtio_backend_kit::vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use virtio_backend_kit::vhost::VhostBackend;
use virtio_backend_kit::vhost_user::ServeMode;
use virtio_backend_kit::vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_example::devices::{BlkConfig, BlkDevice, Target};

const GUEST_GPA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 64;
const IMAGE_SIZE: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The data page of the write: far past the queue area, never touched.
const DATA_GPA: u64 = GUEST_GPA + GUEST_SIZE - 2 * PAGE;
const SECTOR: u64 = 24;

const STATUS_UNTOUCHED: u8 = 0xee;

// userfaultfd(2) ABI, as the frontend uses it.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFDIO_COPY` = _IOWR(0xAA, 0x03, struct uffdio_copy /* 40 bytes */).
const UFFDIO_COPY: u64 = (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

fn code(req: FrontendReq) -> u32 {
    req.into()
}

fn with_pagefault() -> VhostUserProtocolFeatures {
    Client::default_protocol() | VhostUserProtocolFeatures::PAGEFAULT
}

/// Receive one reply together with the fd attached to it, if any.
fn recv_with_fd(raw: &RawClient, request: u32) -> (Reply, Option<File>) {
    let mut hdr = [0u8; 12];
    let mut fds = [-1 as RawFd; 1];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec points at `hdr`, which outlives the call; `fds` has
    // room for one descriptor, wrapped in a `File` below exactly once.
    let (got, nfds) = unsafe { raw.sock.recv_with_fds(&mut iov, &mut fds) }.unwrap();
    assert_eq!(got, 12, "short reply header");
    // SAFETY: a descriptor just received through SCM_RIGHTS, owned by no one.
    let file = (nfds == 1).then(|| unsafe { File::from_raw_fd(fds[0]) });
    let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
    let mut payload = vec![0u8; word(8) as usize];
    std::io::Read::read_exact(&mut &raw.sock, &mut payload).unwrap();
    let reply = Reply {
        request: word(0),
        flags: word(4),
        payload,
    };
    assert_eq!(
        reply.request, request,
        "reply to the wrong request: {reply:?}"
    );
    assert_ne!(reply.flags & FLAG_REPLY, 0, "reply flag missing");
    (reply, file)
}

/// POSTCOPY_ADVISE: the reply must carry the backend's userfaultfd.
fn advise(raw: &RawClient) -> File {
    raw.send(code(FrontendReq::POSTCOPY_ADVISE), FLAG_VERSION_1, &[], &[]);
    let (reply, fd) = recv_with_fd(raw, code(FrontendReq::POSTCOPY_ADVISE));
    assert!(reply.payload.is_empty(), "ADVISE reply payload: {reply:?}");
    fd.expect("POSTCOPY_ADVISE reply carries no fd")
}

/// POSTCOPY_ADVISE that must be refused: a reply, but no fd.
fn advise_refused(raw: &RawClient) {
    raw.send(code(FrontendReq::POSTCOPY_ADVISE), FLAG_VERSION_1, &[], &[]);
    let (_, fd) = recv_with_fd(raw, code(FrontendReq::POSTCOPY_ADVISE));
    assert!(fd.is_none(), "refused ADVISE still sent an fd");
}

/// POSTCOPY_LISTEN, as QEMU sends it (NEED_REPLY): the REPLY_ACK value.
fn listen(raw: &RawClient) -> u64 {
    raw.ack(code(FrontendReq::POSTCOPY_LISTEN), &[], &[])
}

/// POSTCOPY_END: the u64 status of its reply (0 = success).
fn end(raw: &RawClient) -> u64 {
    raw.call(code(FrontendReq::POSTCOPY_END), &[], &[]).u64()
}

/// A one-region SET_MEM_TABLE payload for `guest`.
fn mem_table(guest: &GuestMem) -> Vec<u8> {
    let mut p = 1u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&u64s(&[
        guest.gpa,
        guest.size,
        guest.host_addr(guest.gpa),
        0,
    ]));
    p
}

/// The reply to a region sent while listening (SET_MEM_TABLE's or
/// ADD_MEM_REG's; both put the region at byte 8): checks it mirrors the
/// request `req` for `guest` and returns the backend's address of it.
fn backend_address(reply: &Reply, req: &[u8], guest: &GuestMem) -> u64 {
    assert_eq!(
        reply.payload.len(),
        req.len(),
        "reply size differs: {reply:?}"
    );
    let word = |i: usize| u64::from_le_bytes(reply.payload[i..i + 8].try_into().unwrap());
    assert_eq!(word(8), guest.gpa, "guest address");
    assert_eq!(word(16), guest.size, "size");
    assert_eq!(word(32), 0, "mmap offset");
    let base = word(24);
    assert_ne!(base, 0, "no backend address");
    assert_eq!(base % PAGE, 0, "backend address {base:#x} not page aligned");
    base
}

/// SET_MEM_TABLE while listening: returns where the backend mapped the
/// region, after checking the reply mirrors the request, then acks it.
fn postcopy_set_mem_table(raw: &RawClient, guest: &GuestMem) -> u64 {
    let set = code(FrontendReq::SET_MEM_TABLE);
    let req = mem_table(guest);
    // As QEMU: no NEED_REPLY; the reply is owed anyway.
    raw.send(set, FLAG_VERSION_1, &req, &[guest.file.as_raw_fd()]);
    let reply = raw.reply_to(set);
    let base = backend_address(&reply, &req, guest);
    assert_eq!(&reply.payload[..8], &req[..8], "region count changed");
    // The ack: same request, u64 0, no fds, no reply expected.
    raw.send(set, FLAG_VERSION_1, &u64s(&[0]), &[]);
    base
}

/// ADD_MEM_REG while listening (QEMU's way with CONFIGURE_MEM_SLOTS): the
/// reply is the region with the backend's address; then the u64 ack.
fn postcopy_add_mem_reg(raw: &RawClient, guest: &GuestMem) -> u64 {
    let add = code(FrontendReq::ADD_MEM_REG);
    let req = u64s(&[0, guest.gpa, guest.size, guest.host_addr(guest.gpa), 0]);
    raw.send(add, FLAG_VERSION_1, &req, &[guest.file.as_raw_fd()]);
    let base = backend_address(&raw.reply_to(add), &req, guest);
    raw.send(add, FLAG_VERSION_1, &u64s(&[0]), &[]);
    base
}

/// How the memory reaches the backend while listening.
#[derive(Clone, Copy)]
enum Table {
    SetMemTable,
    AddMemReg,
}

/// Whether the page at `addr` of our mapping is in the page cache.
fn resident(addr: u64) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: `addr` is page aligned inside a live mapping of ours and
    // `vec` has room for the one page asked about.
    let ret = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE as usize, vec.as_mut_ptr()) };
    assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
    vec[0] & 1 != 0
}

/// Wait for one page-fault event on `uffd` and return its address.
fn read_fault(uffd: &File, timeout: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd {
        fd: uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n <= 0 {
        return None;
    }
    let mut msg = [0u8; 32];
    let got = std::io::Read::read(&mut &*uffd, &mut msg);
    assert_eq!(got.unwrap(), 32, "short uffd_msg");
    assert_eq!(
        msg[0], UFFD_EVENT_PAGEFAULT,
        "unexpected uffd event {}",
        msg[0]
    );
    Some(u64::from_le_bytes(msg[16..24].try_into().unwrap()))
}

/// Resolve a missing page at `dst` (backend address) with `bytes`.
fn uffd_copy(uffd: &File, dst: u64, bytes: &[u8]) {
    assert_eq!(bytes.len() as u64, PAGE);
    let mut copy = UffdioCopy {
        dst,
        src: bytes.as_ptr() as u64,
        len: PAGE,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads one `struct uffdio_copy` and writes its
    // `copy` field; `src` points at PAGE readable bytes of ours.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
    assert_eq!(ret, 0, "UFFDIO_COPY: {}", std::io::Error::last_os_error());
    assert_eq!(copy.copy, PAGE as i64);
}

/// Queue a one-page write of the page at `data_gpa` to `sector`; returns
/// the status gpa.
fn queue_write_of(q: &mut SplitQueue, sector: u64, data_gpa: u64) -> u64 {
    let (hdr, status) = blk::header_and_status(q, T_OUT, sector, STATUS_UNTOUCHED);
    q.add_chain(&blk::chain(
        hdr,
        &[Buf::readable(data_gpa, PAGE as u32)],
        status,
    ));
    status
}

/// Queue a one-page write of `DATA_GPA` to `SECTOR`; returns the status gpa.
fn queue_write(q: &mut SplitQueue) -> u64 {
    queue_write_of(q, SECTOR, DATA_GPA)
}

fn new_image(dir: &Path) -> (PathBuf, File) {
    blk::image(dir, IMAGE_SIZE)
}

fn blk_device(image: &Path) -> Arc<BlkDevice> {
    let cfg = BlkConfig {
        queues: 1,
        queue_size: QSIZE,
        ..BlkConfig::default()
    };
    Arc::new(BlkDevice::new(Target::open_image(image, false).unwrap(), cfg).unwrap())
}

/// The blk device on a fresh image in a new directory, served once in a
/// thread: (directory, image, daemon).
fn blk_rig() -> (tempfile::TempDir, File, Daemon<BlkDevice>) {
    let dir = tempfile::tempdir().unwrap();
    let (path, image) = new_image(dir.path());
    let daemon = spawn_daemon(blk_device(&path), ServeMode::Once);
    (dir, image, daemon)
}

/// A session on `sock` (one queue) that negotiated `protocol`.
fn session(sock: UnixStream, protocol: VhostUserProtocolFeatures) -> Client {
    let mut client = Client::new(sock, 1);
    client.negotiate(VIRTIO_F_VERSION_1, protocol);
    client
}

/// A listening session whose worker is blocked on a fault of a write
/// nobody serves: (client, the frontend's userfaultfd, guest, queue).
fn worker_blocked_on_a_fault(daemon: &Daemon<BlkDevice>) -> (Client, File, GuestMem, SplitQueue) {
    let mut client = session(daemon.connect(), with_pagefault());
    let uffd = advise(&client.raw);
    assert_eq!(listen(&client.raw), 0);
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    postcopy_set_mem_table(&client.raw, &guest);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    queue_write(&mut q);
    q.kick();
    read_fault(&uffd, TIMEOUT).expect("no page fault");
    (client, uffd, guest, q)
}

/// What one postcopy write showed.
struct Outcome {
    backend_base: u64,
    fault: u64,
    blocked_ms: u128,
}

impl Outcome {
    /// The summary line of a run against the backend named by `how`.
    fn print(&self, how: &str) {
        eprintln!(
            "POSTCOPY {how} backend_base={:#x} fault={:#x} blocked_ms={}",
            self.backend_base, self.fault, self.blocked_ms
        );
    }
}

/// The whole flow against the daemon at `sock`; `image` is its disk.
fn postcopy_write(sock: UnixStream, image: &File, table: Table) -> Outcome {
    let mut client = session(sock, with_pagefault());
    let uffd = advise(&client.raw);
    assert_eq!(listen(&client.raw), 0, "POSTCOPY_LISTEN refused");

    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    let base = match table {
        Table::SetMemTable => postcopy_set_mem_table(&client.raw, &guest),
        Table::AddMemReg => postcopy_add_mem_reg(&client.raw, &guest),
    };
    // The ack got no reply: the next answer is GET_QUEUE_NUM's own.
    assert_eq!(client.raw.get_queue_num(), 1);

    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    let data_host = guest.host_addr(DATA_GPA);
    assert!(!resident(data_host), "data page present before the test");
    let status = queue_write(&mut q);
    q.kick();

    let kicked = Instant::now();
    let fault = read_fault(&uffd, TIMEOUT).expect("no page fault from the backend");
    // The worker is blocked on the fault: nothing completed, no bytes yet.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(q.used_idx(), 0, "request completed before its page arrived");
    assert!(
        fault >= base && fault < base + GUEST_SIZE,
        "fault {fault:#x} outside the reported region {base:#x}+{GUEST_SIZE:#x}"
    );
    let page = fault & !(PAGE - 1);
    assert_eq!(
        page,
        base + (DATA_GPA - GUEST_GPA),
        "fault on the wrong page"
    );
    let bytes = pattern(0x5a, PAGE as usize);
    uffd_copy(&uffd, page, &bytes);
    let blocked_ms = kicked.elapsed().as_millis();

    let used = q.wait_used(1);
    assert_eq!(used[0].1, 1, "used length");
    assert_eq!(q.read(status, 1)[0], S_OK, "write status");
    assert_eq!(
        blk::read_image(image, SECTOR * 512, PAGE as usize),
        bytes,
        "the image did not get the supplied page"
    );
    // The page is now in the shared page cache, seen by the driver too.
    assert_eq!(guest.read(DATA_GPA, PAGE as usize), bytes);

    assert_eq!(end(&client.raw), 0, "POSTCOPY_END status");
    // After END the backend no longer listens: a second END is refused,
    // and an untouched page is read normally (zeros), without a fault.
    assert_ne!(end(&client.raw), 0, "second POSTCOPY_END accepted");
    let zero_gpa = DATA_GPA + PAGE;
    let status2 = queue_write_of(&mut q, SECTOR + 8, zero_gpa);
    q.kick();
    q.wait_used(1);
    assert_eq!(q.read(status2, 1)[0], S_OK);
    assert!(read_fault(&uffd, Duration::from_millis(50)).is_none());
    Outcome {
        backend_base: base,
        fault,
        blocked_ms,
    }
}

/// [`postcopy_write`] against the daemon in a thread, on a fresh image.
fn postcopy_write_in_thread(table: Table) -> Outcome {
    let (_dir, image, daemon) = blk_rig();
    postcopy_write(daemon.connect(), &image, table)
}

#[test]
fn write_on_missing_page_faults_and_completes_with_the_supplied_bytes() {
    postcopy_write_in_thread(Table::SetMemTable).print("in-thread");
}

#[test]
fn add_mem_reg_while_listening_replies_with_the_backend_address() {
    postcopy_write_in_thread(Table::AddMemReg).print("add-mem-reg");
}

#[test]
fn fault_resolved_from_another_process_than_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (path, image) = new_image(dir.path());
    let sock = dir.path().join("blk.sock");
    let bin = process::binary("vhost-user-blk").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin);
    cmd.arg("--socket").arg(&sock).arg("--image").arg(&path);
    // One queue, as the in-process daemon of the other tests has.
    cmd.args(["--queue-size", &QSIZE.to_string(), "--queues", "1"]);
    cmd.env("RUST_LOG", "info");
    let mut backend = process::Backend::spawn("vhost-user-blk", cmd, dir.path().join("blk.log"));
    backend.wait_for_socket(&sock);
    let conn = UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(TIMEOUT)).unwrap();
    postcopy_write(conn, &image, Table::SetMemTable).print("cross-process");
    backend.stop(Duration::from_secs(5));
}

#[test]
fn postcopy_requests_without_pagefault_are_refused() {
    let (_dir, _image, daemon) = blk_rig();
    let client = session(daemon.connect(), Client::default_protocol());
    let raw = &client.raw;
    advise_refused(raw);
    assert_eq!(raw.get_queue_num(), 1);
    assert_ne!(listen(raw), 0, "LISTEN without PAGEFAULT accepted");
    assert_ne!(end(raw), 0, "END without PAGEFAULT accepted");
    assert_eq!(raw.get_queue_num(), 1);
}

#[test]
fn postcopy_requests_out_of_order_are_refused() {
    let (_dir, _image, daemon) = blk_rig();
    let client = session(daemon.connect(), with_pagefault());
    let raw = &client.raw;
    assert_ne!(listen(raw), 0, "LISTEN without ADVISE accepted");
    assert_ne!(end(raw), 0, "END without ADVISE accepted");
    let _uffd = advise(raw);
    advise_refused(raw);
    assert_ne!(end(raw), 0, "END without LISTEN accepted");
    assert_eq!(listen(raw), 0);
    assert_ne!(listen(raw), 0, "second LISTEN accepted");
    // The ack of a memory table is only an ack while listening...
    assert_eq!(end(raw), 0);
    assert_ne!(
        raw.ack(code(FrontendReq::SET_MEM_TABLE), &u64s(&[0]), &[]),
        0,
        "a memory-table ack outside postcopy accepted"
    );
    assert_ne!(listen(raw), 0, "LISTEN after END accepted");
    // ...and a new migration may start again.
    let _uffd = advise(raw);
    assert_eq!(listen(raw), 0);
    assert_eq!(end(raw), 0);
    assert_eq!(raw.get_queue_num(), 1);
}

#[test]
fn memory_mapped_before_listen_is_registered_at_listen() {
    let (_dir, image, daemon) = blk_rig();
    let mut client = session(daemon.connect(), with_pagefault());
    let guest = GuestMem::new(GUEST_GPA, GUEST_SIZE);
    client
        .frontend
        .set_mem_table(&[guest.region_info()])
        .unwrap();
    let uffd = advise(&client.raw);
    // Not yet listening: an ordinary table, acked as usual.
    assert_eq!(listen(&client.raw), 0);
    let mut q = SplitQueue::new(&guest, 0, QSIZE, GUEST_GPA);
    client.start_queue(&q, 0);
    let status = queue_write(&mut q);
    q.kick();
    let fault = read_fault(&uffd, TIMEOUT).expect("no fault on memory mapped before LISTEN");
    assert_eq!(fault % PAGE, DATA_GPA % PAGE);
    let bytes = pattern(0x33, PAGE as usize);
    uffd_copy(&uffd, fault & !(PAGE - 1), &bytes);
    q.wait_used(1);
    assert_eq!(q.read(status, 1)[0], S_OK);
    assert_eq!(blk::read_image(&image, SECTOR * 512, PAGE as usize), bytes);
    assert_eq!(end(&client.raw), 0);
}

#[test]
fn frontend_gone_while_a_worker_waits_on_a_fault_ends_the_session() {
    let (_dir, _image, mut daemon) = blk_rig();
    let (client, uffd, _guest, _q) = worker_blocked_on_a_fault(&daemon);
    // The frontend disappears without resolving the fault (its uffd copy
    // stays open, as a hung QEMU's would): the session must still end.
    drop(client);
    let result = daemon.join(TIMEOUT);
    assert!(
        matches!(result, Some(Ok(()))),
        "daemon did not end: {result:?}"
    );
    drop(uffd);
}

/// A frontend that listens, lets a worker block on a fault, never serves
/// it and then asks for a queue restart (found by the vhost_user_session
/// fuzz target): the stop cannot complete, so instead of waiting for ever
/// the daemon ends the session after its stop timeout (which releases the
/// fault) and serves the next frontend.
#[test]
fn a_fault_nobody_serves_ends_the_session_instead_of_wedging_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _image) = new_image(dir.path());
    let daemon = spawn_daemon_with(blk_device(&path), ServeMode::KeepServing, |d| {
        d.with_stop_timeout(Duration::from_millis(300))
    });
    let (client, uffd, _guest, q) = worker_blocked_on_a_fault(&daemon);
    // A new kick fd restarts the queue: its worker must stop it first.
    let asked = Instant::now();
    let refused = client.frontend.set_vring_kick(0, &q.kick);
    let waited = asked.elapsed();
    assert!(
        refused.is_err(),
        "restarting a queue blocked on a fault succeeded"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the session hung for {waited:?}"
    );
    drop(client);
    // The next frontend is served.
    let next = session(daemon.connect(), Client::default_protocol());
    assert_eq!(next.raw.get_queue_num(), 1);
    drop(uffd);
}

// ---------------------------------------------------------------------------
// QEMU: postcopy live migration of a writing guest between two QEMUs, each
// on its own `vhost-user-blk` daemon (see tests/qemu_migration.rs for the
// precopy variant and the guest's write loop).
// ---------------------------------------------------------------------------

const QEMU_TAG: &str = "postcopy";

fn set_postcopy_capability(qmp: &mut guest_vm::Qmp, side: &str) {
    use serde_json::json;
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
    )
    .unwrap_or_else(|e| panic!("{side}: postcopy-ram refused: {e}"));
}

#[test]
fn qemu_postcopy_migration_of_writing_guest_loses_no_request() {
    use guest_vm::progress;
    use guest_vm::{json_u64, lock_and_prepare, migration_records, parse_result, print_tail};
    use guest_vm::{verify_records, Migration};
    use serde_json::json;
    use std::thread::sleep;

    let Some(_lock) = lock_and_prepare() else {
        return;
    };
    let t_test = Instant::now();
    let mut m = Migration::start(QEMU_TAG, 16);
    let mut dq = m.dst.qmp();
    let mut sq = m.src.qmp();
    set_postcopy_capability(&mut dq, "destination");
    set_postcopy_capability(&mut sq, "source");
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 32u64 << 20}),
    )
    .expect("migrate-set-parameters");
    let before = progress(&m.src.console_text());
    let t_mig = Instant::now();
    m.migrate(&mut sq);
    // Let precopy run one pass at least, then switch to postcopy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, q) = sq.migration_status();
        if s == "active" && json_u64(&q, &["ram", "transferred"]).unwrap_or(0) > 64 << 20 {
            break;
        }
        assert!(
            !matches!(s.as_str(), "failed" | "cancelled" | "completed"),
            "migration {s} before postcopy: {q}\n---- src ----\n{}\n---- dst ----\n{}",
            m.src.qemu_log(),
            m.dst.qemu_log()
        );
        assert!(Instant::now() < deadline, "precopy never got going: {q}");
        sleep(Duration::from_millis(100));
    }
    let t_switch = Instant::now();
    sq.execute("migrate-start-postcopy", json!({}))
        .unwrap_or_else(|e| panic!("migrate-start-postcopy: {e}"));
    let mut seen_postcopy = false;
    let (status, last) = loop {
        let (s, q) = sq.migration_status();
        seen_postcopy |= s.starts_with("postcopy");
        if matches!(
            s.as_str(),
            "completed" | "failed" | "cancelled" | "postcopy-paused"
        ) {
            break (s, q);
        }
        assert!(
            t_mig.elapsed() < Duration::from_secs(120),
            "migration stuck: {q}"
        );
        sleep(Duration::from_millis(100));
    };
    let postcopy_ms = t_switch.elapsed().as_millis();
    m.assert_completed(&status, &last);
    assert!(seen_postcopy, "never saw a postcopy state: {last}");
    let during = progress(&m.src.console_text());
    m.quit_source(&mut sq);
    let (after, exited) = m.finish_on_destination(during, 24);
    let log_b = m.daemon_b.log_text();
    print_tail("daemon B log", &log_b, 15);
    let dst_console = m.dst.console_text();
    assert!(exited, "destination QEMU did not power off\n{dst_console}");
    let r = parse_result(&dst_console, QEMU_TAG)
        .unwrap_or_else(|| panic!("no VBK-RESULT {QEMU_TAG} line\n{dst_console}"));
    let verified = verify_records(&m.img, QEMU_TAG, &r.counts);
    let lost = r.records.saturating_sub(verified);
    let g = |p: &[&str]| json_u64(&last, p).map_or_else(|| "n/a".into(), |v| v.to_string());
    println!(
        "VBK-MIGRATION status={status} postcopy=1 total_ms={} downtime_ms={} postcopy_phase_ms={postcopy_ms} \
         transferred={} postcopy_requests={} {records} \
         lost={lost} records={} verified={verified} errors={} guest_maxgap_ms={} \
         daemon_b_warnings={} test_s={:.1}",
        g(&["total-time"]),
        g(&["downtime"]),
        g(&["ram", "transferred"]),
        g(&["ram", "postcopy-requests"]),
        r.records,
        r.errors,
        r.maxgap_ms,
        log_b.matches(" WARN ").count(),
        t_test.elapsed().as_secs_f64(),
        records = migration_records(before, during, after),
    );
    assert_eq!(r.errors, 0, "guest saw errors: {}", r.line);
    assert_eq!(lost, 0);
    assert!(dst_console.contains("VBK-DONE status=ok"));
}

/// Regions added while postcopy listens are parked until the ack; they
/// count against the memory-slot limit like installed ones.
#[test]
fn regions_parked_while_listening_count_against_the_slot_limit() {
    let (_dir, _image, daemon) = blk_rig();
    let client = session(daemon.connect(), with_pagefault());
    let _uffd = advise(&client.raw);
    assert_eq!(listen(&client.raw), 0, "POSTCOPY_LISTEN refused");
    let slots = client
        .raw
        .call(code(FrontendReq::GET_MAX_MEM_SLOTS), &[], &[])
        .u64();
    let regions: Vec<GuestMem> = (0..=slots)
        .map(|i| GuestMem::new(GUEST_GPA + i * PAGE, PAGE))
        .collect();
    for g in &regions[..slots as usize] {
        postcopy_add_mem_reg(&client.raw, g);
    }
    // One more: refused (the empty reply, no region), and the session goes
    // on.
    let extra = &regions[slots as usize];
    let add = code(FrontendReq::ADD_MEM_REG);
    let req = u64s(&[0, extra.gpa, extra.size, extra.host_addr(extra.gpa), 0]);
    client
        .raw
        .send(add, FLAG_VERSION_1, &req, &[extra.file.as_raw_fd()]);
    let reply = client.raw.reply_to(add);
    assert!(
        reply.payload.is_empty(),
        "a region beyond the slot limit was mapped: {reply:?}"
    );
    assert_eq!(client.raw.get_queue_num(), 1);
}
