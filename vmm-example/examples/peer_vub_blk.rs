// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `peer_vub_blk`: a virtio-blk vhost-user backend written on rust-vmm's
//! `vhost-user-backend` crate, as a user of that crate writes one.
//!
//! It exists as the comparison point for `benches/blk_vs_peers/`: the same
//! device (null or raw image, same features and config space) served by the
//! framework that rust-vmm users run today, so the benchmark measures the
//! data plane and not a difference in what the device does.
//!
//! ```text
//! peer_vub_blk --socket /tmp/peer.sock --null --size 1073741824 [--queues 2]
//! peer_vub_blk --socket /tmp/peer.sock --image disk.raw [--read-only]
//! ```
//!
//! Shape of the data plane, following the framework's conventions:
//!
//! - [`VhostUserBackend`] (interior mutability, so queue threads never
//!   serialize on a backend-wide lock) with [`VringRwLock`] vrings and one
//!   worker thread per queue (`queues_per_thread`).
//! - On a kick, the vring's write lock is taken once for the whole batch;
//!   chains are popped with `pop_descriptor_chain`, each one parsed (header in
//!   the first descriptor, data descriptors collected into a per-thread
//!   reusable `Vec`, status byte in the last descriptor), executed with
//!   `pread`/`pwrite` straight into guest memory, completed with `add_used`.
//! - With `EVENT_IDX`, notifications are disabled while draining and the
//!   loop re-checks after re-enabling them; the frontend is signalled once
//!   per batch when `needs_notification` says it wants it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::{ArgGroup, Parser};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_backend_kit::vhost::vhost_user::message::{
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use virtio_backend_kit::virtio_queue::desc::split::Descriptor;
use virtio_backend_kit::virtio_queue::{DescriptorChain, QueueT};
use virtio_backend_kit::vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use virtio_backend_kit::vmm_sys_util::epoll::EventSet;
use virtio_backend_kit::vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_example::daemon_cli::print_exit_code;

const SECTOR: u64 = 512;
const SEG_MAX: u32 = 128;
const SIZE_MAX: u32 = 1 << 20;
const BLK_SIZE: u32 = 512;
const CONFIG_LEN: usize = 60;
const SERIAL: &[u8; 20] = b"peer-vub-blk\0\0\0\0\0\0\0\0";

/// Serve a virtio-blk device over vhost-user with rust-vmm's
/// `vhost-user-backend` (benchmark peer).
#[derive(Debug, Parser)]
#[command(about)]
#[command(group(ArgGroup::new("target").required(true).args(["image", "null"])))]
struct Args {
    /// Unix socket path to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Raw disk image to serve.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Serve a null device that completes requests without touching data.
    #[arg(long, requires = "size")]
    null: bool,
    /// Size in bytes of the --null device.
    #[arg(long)]
    size: Option<u64>,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Maximum queue size.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Serve the next frontend after one disconnects.
    #[arg(long)]
    keep_serving: bool,
}

enum Disk {
    Null,
    File(File),
}

struct PeerBlk {
    disk: Arc<Disk>,
    capacity: u64,
    read_only: bool,
    queues: usize,
    queue_size: usize,
    config: [u8; CONFIG_LEN],
    event_idx: AtomicBool,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Per worker thread: the data descriptors of the request being served,
    /// reused so steady-state requests do not allocate.
    scratch: Vec<Mutex<Vec<Descriptor>>>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl PeerBlk {
    fn new(
        disk: Arc<Disk>,
        capacity: u64,
        args: &Args,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Self {
        let sectors = capacity / SECTOR;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&BLK_SIZE.to_le_bytes());
        config[34..36].copy_from_slice(&args.queues.to_le_bytes());
        PeerBlk {
            disk,
            capacity: sectors * SECTOR,
            read_only: args.read_only,
            queues: usize::from(args.queues),
            queue_size: usize::from(args.queue_size),
            config,
            event_idx: AtomicBool::new(false),
            mem,
            scratch: (0..args.queues)
                .map(|_| Mutex::new(Vec::with_capacity(SEG_MAX as usize + 2)))
                .collect(),
        }
    }

    /// Serve every available chain of one vring; returns whether any
    /// completed.
    fn process_queue(
        &self,
        vring: &mut vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        mem: &GuestMemoryMmap,
        descs: &mut Vec<Descriptor>,
    ) -> io::Result<bool> {
        let mut any = false;
        while let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.process_request(mem, chain, descs);
            vring
                .get_queue_mut()
                .add_used(mem, head, len)
                .map_err(other)?;
            any = true;
        }
        Ok(any)
    }

    /// Execute one request and return the used length.
    fn process_request(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        descs: &mut Vec<Descriptor>,
    ) -> u32 {
        descs.clear();
        descs.extend(chain);
        if descs.len() < 2 {
            return 0;
        }
        let header = descs[0];
        let status = descs[descs.len() - 1];
        if status.len() == 0 || !status.is_write_only() {
            return 0;
        }
        let status_addr = GuestAddress(status.addr().0 + u64::from(status.len()) - 1);
        if header.is_write_only() || header.len() < 16 {
            return self.finish(mem, status_addr, VIRTIO_BLK_S_IOERR, 0);
        }
        let (Ok(req_type), Ok(sector)) = (
            mem.read_obj::<u32>(header.addr()),
            mem.read_obj::<u64>(GuestAddress(header.addr().0 + 8)),
        ) else {
            return self.finish(mem, status_addr, VIRTIO_BLK_S_IOERR, 0);
        };
        let last = descs.len() - 1;
        // The status byte may share the last descriptor with data.
        let mut data_len = 0u64;
        for (i, d) in descs.iter().enumerate().skip(1) {
            data_len += u64::from(d.len()) - u64::from(i == last);
        }
        let data = &descs[1..];
        let (st, written) = match req_type {
            VIRTIO_BLK_T_IN => match self.rw(mem, sector, data, data_len, true) {
                Ok(()) => (VIRTIO_BLK_S_OK, data_len as u32),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT if !self.read_only => {
                match self.rw(mem, sector, data, data_len, false) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => match &*self.disk {
                Disk::File(f) if !self.read_only => match f.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                },
                _ => (VIRTIO_BLK_S_OK, 0),
            },
            VIRTIO_BLK_T_GET_ID => {
                let d = descs[1];
                let n = (d.len() as usize).min(SERIAL.len());
                if d.is_write_only() && mem.write_slice(&SERIAL[..n], d.addr()).is_ok() {
                    (VIRTIO_BLK_S_OK, n as u32)
                } else {
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_OUT => (VIRTIO_BLK_S_IOERR, 0),
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        self.finish(mem, status_addr, st, written)
    }

    fn finish(&self, mem: &GuestMemoryMmap, addr: GuestAddress, status: u32, written: u32) -> u32 {
        match mem.write_obj(status as u8, addr) {
            Ok(()) => written + 1,
            Err(_) => 0,
        }
    }

    /// Read (`to_guest`) or write the data descriptors at `sector`.
    fn rw(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Descriptor],
        len: u64,
        to_guest: bool,
    ) -> io::Result<()> {
        let mut offset = sector
            .checked_mul(SECTOR)
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= self.capacity))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let file = match &*self.disk {
            Disk::Null => return Ok(()),
            Disk::File(f) => f,
        };
        let last = data.len() - 1;
        for (i, d) in data.iter().enumerate() {
            let n = d.len() as usize - usize::from(i == last);
            if n == 0 {
                continue;
            }
            if d.is_write_only() != to_guest {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let slice = mem.get_slice(d.addr(), n).map_err(other)?;
            let mut done = 0usize;
            while done < n {
                let (fd, left, at) = (file.as_raw_fd(), n - done, offset as libc::off_t);
                let r = if to_guest {
                    let guard = slice.ptr_guard_mut();
                    // SAFETY: `slice` covers `n` bytes of mapped guest memory
                    // that stay mapped while the memory guard the caller holds
                    // lives; the kernel writes at most `n - done` bytes there.
                    unsafe { libc::pread(fd, guard.as_ptr().add(done).cast(), left, at) }
                } else {
                    let guard = slice.ptr_guard();
                    // SAFETY: as above; the kernel only reads `n - done` bytes.
                    unsafe { libc::pwrite(fd, guard.as_ptr().add(done).cast(), left, at) }
                };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if r == 0 {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                done += r as usize;
                offset += r as u64;
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for PeerBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let n = (CONFIG_LEN - start).min(out.len());
        out[..n].copy_from_slice(&self.config[start..start + n]);
        out
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // `self.mem` is a clone of the same atomic handle the daemon
        // updates, so the new table is already visible to the workers.
        Ok(())
    }

    /// The daemon keeps the notifier and fires it when the connection ends,
    /// so the worker threads stop and the process can serve again or exit.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| other(format!("no queue for event {device_event}")))?;
        let mut descs = self.scratch[thread_id]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let mut completed = false;
        loop {
            if event_idx {
                state.disable_notification().map_err(other)?;
            }
            completed |= self.process_queue(&mut state, &mem, &mut descs)?;
            if !event_idx || !state.enable_notification().map_err(other)? {
                break;
            }
        }
        if completed && state.needs_notification().map_err(other)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (disk, capacity) = match (&args.image, args.null, args.size) {
        (Some(path), _, _) => {
            let f = OpenOptions::new()
                .read(true)
                .write(!args.read_only)
                .open(path)?;
            let len = f.metadata()?.len();
            (Disk::File(f), len)
        }
        (None, true, Some(size)) => (Disk::Null, size),
        _ => return Err("give --image FILE or --null --size BYTES".into()),
    };
    if capacity < SECTOR {
        return Err("the disk is smaller than one sector".into());
    }
    let disk = Arc::new(disk);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(PeerBlk::new(disk.clone(), capacity, &args, mem.clone()));
        let mut daemon = VhostUserDaemon::new("peer-vub-blk".to_string(), backend, mem)
            .map_err(|e| format!("{e}"))?;
        daemon.serve(&args.socket).map_err(|e| format!("{e}"))?;
        if !args.keep_serving {
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    print_exit_code("peer_vub_blk", run(Args::parse()))
}
