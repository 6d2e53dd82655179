// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A virtio-blk device (virtio 1.x, device ID 2).
//!
//! [`BlkDevice`] serves a [`Target`], either a raw image file (or block
//! device node) or a null target that completes every request without
//! touching data, for benchmarks. It implements
//! [`DeviceBackend`], so the same device
//! runs behind the vhost-user daemon or inside a VMM.
//!
//! # Building a device
//!
//! ```no_run
//! use vmm_example::devices::blk::{BlkConfig, BlkDevice};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A read-write image with the default configuration (one queue of 256).
//! let dev = BlkDevice::open_image("disk.raw", false)?;
//!
//! // Four queues, each served by its own worker thread.
//! let cfg = BlkConfig { queues: 4, ..BlkConfig::default() };
//! let dev = BlkDevice::new(vmm_example::devices::Target::open_image("disk.raw", false)?, cfg)?;
//!
//! // A 1 GiB null disk for benchmarks.
//! let dev = BlkDevice::null(1 << 30)?;
//! # let _ = dev;
//! # Ok(())
//! # }
//! ```
//!
//! # Requests
//!
//! Supported: `IN`, `OUT`, `FLUSH`, `GET_ID`, `DISCARD` and `WRITE_ZEROES`.
//! Any other type completes with `VIRTIO_BLK_S_UNSUPP`. The device makes no
//! assumption about framing: the 16-byte header is the first 16 readable
//! bytes of the chain (it may span descriptors), the status byte is the last
//! byte of the last descriptor (which must be device-writable), and the data
//! is everything in between.
//!
//! A chain whose status byte cannot be found or written is not completed:
//! a used entry would make the driver read a status nobody wrote. The
//! device logs it and stops the queue ([`Completion::NeedsReset`]); the
//! kit then signals the queue's err notifier, which an in-process
//! virtio-mmio transport turns into DEVICE_NEEDS_RESET and a vhost-user
//! frontend sees on the vring's err fd. A request whose status byte is
//! reachable but whose header is not, and every other malformed request,
//! completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for unknown types and
//! flags); guest data never causes a panic.
//!
//! # Hot path
//!
//! Each worker drains its queue in batches: notifications are disabled while
//! chains are popped and processed, re-enabled when the ring looks empty
//! (looping if more arrived meanwhile), and the driver is notified once per
//! batch. Descriptors are collected into a stack scratch array that lives for
//! the whole batch; no heap allocation happens per request, and file I/O goes
//! straight between the image and guest memory with `pread`/`pwrite`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::warn;
use virtio_backend_kit::virtio_queue::desc::split::Descriptor;
use virtio_backend_kit::virtio_queue::DescriptorChain;
use virtio_backend_kit::vm_memory::bitmap::BitmapSlice;
use virtio_backend_kit::vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, Permissions,
    ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};
use virtio_backend_kit::{
    BackendError, Completion, DescIter, DeviceBackend, DeviceEvent, QueueSet, Vring, VringError,
    VringOwned, VringT,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Size of a virtio-blk sector; capacity and request sectors use this unit
/// whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;

/// Length of the `GET_ID` serial string.
pub const ID_LEN: usize = 20;

/// Bytes of `struct virtio_blk_config` the device exposes: everything up to
/// and including `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SIZE: usize = 60;

/// Largest `seg_max` the device accepts; it bounds the per-batch descriptor
/// scratch array (two more slots for header and status).
pub const MAX_SEG_MAX: u32 = 254;

/// Largest [`BlkConfig::injected_latency`] accepted.
pub const MAX_INJECTED_LATENCY: Duration = Duration::from_secs(1);

const SCRATCH_DESCS: usize = MAX_SEG_MAX as usize + 2;
const HEADER_LEN: usize = 16;
const DWZ_SEGMENT_LEN: u64 = 16;
const NULL_SERIAL: &[u8] = b"vbk-null";

// Offsets in `struct virtio_blk_config` (virtio 1.2, 5.2.4).
const CFG_CAPACITY: usize = 0;
const CFG_SIZE_MAX: usize = 8;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;
const CFG_NUM_QUEUES: usize = 34;
const CFG_MAX_DISCARD_SECTORS: usize = 36;
const CFG_MAX_DISCARD_SEG: usize = 40;
const CFG_DISCARD_SECTOR_ALIGNMENT: usize = 44;
const CFG_MAX_WRITE_ZEROES_SECTORS: usize = 48;
const CFG_MAX_WRITE_ZEROES_SEG: usize = 52;
const CFG_WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// Zeroes written when the storage cannot zero a range by itself.
static ZEROES: [u8; 32 * 1024] = [0; 32 * 1024];

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image could not be opened.
    #[error("cannot open image {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image size could not be determined.
    #[error("cannot determine the size of image {path}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("image {path} is in use by another process (locked); --no-lock overrides")]
    Locked {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The target is smaller than one sector.
    #[error("the target is smaller than one {SECTOR_SIZE}-byte sector")]
    TooSmall,
    /// A configuration value is out of range.
    #[error("invalid block device configuration: {0}")]
    InvalidConfig(&'static str),
}

/// An open raw image file or block device node.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    /// The same image opened with `O_DIRECT` (`--direct`): aligned
    /// requests bypass the host page cache through it.
    direct: Option<File>,
    path: PathBuf,
    read_only: bool,
}

impl ImageFile {
    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// How a daemon opens its image ([`Target::open_image_with`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageOptions {
    /// Open it read-only.
    pub read_only: bool,
    /// Take an OFD lock over the whole file: shared when read-only,
    /// exclusive when read-write (as QEMU locks its images), so that two
    /// writers, or a writer and a reader, never share an image. The lock
    /// lives as long as the target.
    pub lock: bool,
    /// Also open it with `O_DIRECT`: requests whose buffers, lengths and
    /// offsets are 512-byte aligned (what a guest's page cache and its own
    /// O_DIRECT produce) bypass the host page cache; others, and any the
    /// kernel refuses with EINVAL, go through the page cache.
    pub direct: bool,
}

/// What the device stores its data in.
#[derive(Debug)]
pub enum Target {
    /// A raw image file or block device node, accessed with `pread`/`pwrite`.
    Image(ImageFile),
    /// A disk of `size` bytes that completes every request successfully
    /// without moving any data (reads leave guest memory untouched).
    Null {
        /// Size in bytes.
        size: u64,
    },
}

impl Target {
    /// Open a raw image file or block device node, read-only if asked.
    pub fn open_image(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlkError> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| BlkError::Open {
                path: path.clone(),
                source,
            })?;
        // Seeking to the end also works for block devices, whose metadata
        // reports a length of 0.
        file.seek(SeekFrom::End(0))
            .map_err(|source| BlkError::Size {
                path: path.clone(),
                source,
            })?;
        Ok(Target::Image(ImageFile {
            file,
            direct: None,
            path,
            read_only,
        }))
    }

    /// Open a raw image as a daemon does: [`Target::open_image`], then
    /// what `opts` asks for (see [`ImageOptions`]).
    pub fn open_image_with(path: impl AsRef<Path>, opts: ImageOptions) -> Result<Self, BlkError> {
        let mut target = Self::open_image(path, opts.read_only)?;
        if let Target::Image(img) = &mut target {
            if opts.lock {
                super::image_lock::lock(&img.file, opts.read_only).map_err(|source| {
                    BlkError::Locked {
                        path: img.path.clone(),
                        source,
                    }
                })?;
            }
            if opts.direct {
                use std::os::unix::fs::OpenOptionsExt;
                let direct = OpenOptions::new()
                    .read(true)
                    .write(!opts.read_only)
                    .custom_flags(libc::O_DIRECT)
                    .open(&img.path)
                    .map_err(|source| BlkError::Open {
                        path: img.path.clone(),
                        source,
                    })?;
                img.direct = Some(direct);
            }
        }
        Ok(target)
    }

    /// A null target of `size` bytes.
    pub fn null(size: u64) -> Self {
        Target::Null { size }
    }

    /// Size of the target in bytes (the device exposes whole sectors).
    pub fn size(&self) -> io::Result<u64> {
        match self {
            Target::Image(img) => {
                let mut f = &img.file;
                f.seek(SeekFrom::End(0))
            }
            Target::Null { size } => Ok(*size),
        }
    }

    /// Whether the target can only be read.
    pub fn is_read_only(&self) -> bool {
        match self {
            Target::Image(img) => img.read_only,
            Target::Null { .. } => false,
        }
    }

    /// The default `GET_ID` serial: `vbk-` and a hash of the canonical image
    /// path for images, `vbk-null` for the null target.
    pub fn default_serial(&self) -> [u8; ID_LEN] {
        let mut id = [0u8; ID_LEN];
        match self {
            Target::Image(img) => {
                let path = img.path.canonicalize().unwrap_or_else(|_| img.path.clone());
                let hash = fnv1a(path.as_os_str().as_encoded_bytes());
                let text = format!("vbk-{hash:016x}");
                id.copy_from_slice(&text.as_bytes()[..ID_LEN]);
            }
            Target::Null { .. } => id[..NULL_SERIAL.len()].copy_from_slice(NULL_SERIAL),
        }
        id
    }
}

/// 64-bit FNV-1a, good enough to turn a path into a stable serial.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Device configuration. Start from [`BlkConfig::default`] and override
/// what you need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Number of request queues (1..=64). More than one offers
    /// `VIRTIO_BLK_F_MQ` and gives every queue its own worker thread.
    pub queues: u16,
    /// Maximum queue size (a power of two, at most 32768).
    pub queue_size: u16,
    /// Refuse writes and offer `VIRTIO_BLK_F_RO`. Forced on for images
    /// opened read-only.
    pub read_only: bool,
    /// Maximum number of data segments per request (1..=[`MAX_SEG_MAX`]).
    pub seg_max: u32,
    /// Maximum size of one data segment in bytes (at least 4096). Together
    /// with `seg_max` it bounds the data length of a request.
    pub size_max: u32,
    /// Logical block size advertised to the driver (a power of two from 512
    /// to 65536). Capacity is still counted in 512-byte sectors.
    pub blk_size: u32,
    /// Offer `DISCARD`.
    pub discard: bool,
    /// Offer `WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum discard segments in one request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments in one request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: bool,
    /// `GET_ID` serial (at most 20 bytes); `None` derives one from the
    /// target, see [`Target::default_serial`].
    pub serial: Option<String>,
    /// Fault injection for tests, simulating a slow disk: hold every request
    /// this long after it was taken from the ring (and so marked in the
    /// in-flight area) before it is completed, half before it is performed
    /// and half after, so that a backend killed meanwhile leaves requests in
    /// flight, both not yet performed and performed but not completed. The
    /// worker thread sleeps; its queue makes no progress meanwhile. `None`
    /// (the default) injects nothing.
    pub injected_latency: Option<Duration>,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            queues: 1,
            queue_size: 256,
            read_only: false,
            seg_max: 128,
            size_max: 1 << 20,
            blk_size: 512,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            write_zeroes_may_unmap: true,
            serial: None,
            injected_latency: None,
        }
    }
}

impl BlkConfig {
    fn validate(&self) -> Result<(), BlkError> {
        if self.queues == 0 || self.queues > 64 {
            return Err(BlkError::InvalidConfig("queues must be 1..=64"));
        }
        if self.queue_size == 0 || !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return Err(BlkError::InvalidConfig(
                "queue_size must be a power of two up to 32768",
            ));
        }
        if self.seg_max == 0 || self.seg_max > MAX_SEG_MAX {
            return Err(BlkError::InvalidConfig("seg_max must be 1..=254"));
        }
        if self.size_max < 4096 {
            return Err(BlkError::InvalidConfig("size_max must be at least 4096"));
        }
        if !self.blk_size.is_power_of_two() || !(512..=65536).contains(&self.blk_size) {
            return Err(BlkError::InvalidConfig(
                "blk_size must be a power of two from 512 to 65536",
            ));
        }
        if (self.discard && (self.max_discard_sectors == 0 || self.max_discard_seg == 0))
            || (self.write_zeroes
                && (self.max_write_zeroes_sectors == 0 || self.max_write_zeroes_seg == 0))
        {
            return Err(BlkError::InvalidConfig(
                "discard and write-zeroes limits must be non-zero",
            ));
        }
        if self.serial.as_ref().is_some_and(|s| s.len() > ID_LEN) {
            return Err(BlkError::InvalidConfig("serial is longer than 20 bytes"));
        }
        if self
            .injected_latency
            .is_some_and(|d| d > MAX_INJECTED_LATENCY)
        {
            return Err(BlkError::InvalidConfig(
                "injected latency must be at most one second",
            ));
        }
        Ok(())
    }
}

/// Request status as written into the status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// Descriptor scratch space, reused by every request of a batch so that
/// processing a chain allocates nothing.
pub struct ChainScratch {
    descs: [Descriptor; SCRATCH_DESCS],
}

impl ChainScratch {
    /// Fresh scratch space (about 4 KiB; fine on the stack).
    pub fn new() -> Self {
        ChainScratch {
            descs: [Descriptor::default(); SCRATCH_DESCS],
        }
    }
}

impl Default for ChainScratch {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ChainScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainScratch")
    }
}

/// The data part of a request: the descriptors between the header and the
/// status byte, minus `skip` bytes of the first one (header bytes) and the
/// status byte at the end of the last one.
#[derive(Clone, Copy)]
struct DataSpan<'a> {
    descs: &'a [Descriptor],
    skip: u32,
}

/// One contiguous piece of request data in guest memory.
#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Summary of a [`DataSpan`], computed before any I/O.
struct SpanInfo {
    len: u64,
    all_writable: bool,
    all_readable: bool,
}

impl<'a> DataSpan<'a> {
    fn segments(self) -> impl Iterator<Item = Segment> + 'a {
        let last = self.descs.len().saturating_sub(1);
        let skip = self.skip;
        self.descs.iter().enumerate().filter_map(move |(i, d)| {
            let start = if i == 0 { skip } else { 0 };
            // The status byte ends the last descriptor (its length is >= 1).
            let end = if i == last {
                d.len().saturating_sub(1)
            } else {
                d.len()
            };
            (end > start).then(|| Segment {
                addr: GuestAddress(d.addr().0.wrapping_add(u64::from(start))),
                len: end - start,
            })
        })
    }

    /// Check that no segment wraps the address space and sum it up.
    fn info(self) -> Option<SpanInfo> {
        let mut info = SpanInfo {
            len: 0,
            all_writable: true,
            all_readable: true,
        };
        let last = self.descs.len().saturating_sub(1);
        for (i, d) in self.descs.iter().enumerate() {
            let start = if i == 0 { self.skip } else { 0 };
            let end = if i == last {
                d.len().saturating_sub(1)
            } else {
                d.len()
            };
            if end <= start {
                continue;
            }
            d.addr().0.checked_add(u64::from(end))?;
            info.len += u64::from(end - start);
            if d.is_write_only() {
                info.all_readable = false;
            } else {
                info.all_writable = false;
            }
        }
        Some(info)
    }

    /// Copy `buf.len()` bytes starting `offset` bytes into the data.
    fn read_at<M: GuestMemory + ?Sized>(self, mem: &M, offset: u64, buf: &mut [u8]) -> bool {
        let mut pos = 0u64;
        let mut done = 0usize;
        for seg in self.segments() {
            if done == buf.len() {
                break;
            }
            let seg_end = pos + u64::from(seg.len);
            let want = offset + done as u64;
            if want < seg_end {
                let in_seg = want - pos;
                let take = ((seg_end - want) as usize).min(buf.len() - done);
                let addr = GuestAddress(seg.addr.0 + in_seg);
                if mem.read_slice(&mut buf[done..done + take], addr).is_err() {
                    return false;
                }
                done += take;
            }
            pos = seg_end;
        }
        done == buf.len()
    }
}

/// `pread`/`pwrite` at a moving file offset, straight into or out of guest
/// memory.
struct FileAt<'a> {
    file: &'a File,
    /// The `O_DIRECT` descriptor of the same image, if any.
    direct: Option<&'a File>,
    offset: u64,
}

/// The alignment `O_DIRECT` requests need here (buffer, length, offset).
const DIRECT_ALIGN: usize = 512;

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EINVAL)))
    }

    /// The descriptor for a transfer of `len` bytes at `addr`: the direct
    /// one when everything is aligned for it.
    fn fd_for(&self, addr: *const u8, len: usize) -> (libc::c_int, bool) {
        match self.direct {
            Some(d)
                if (addr as usize).is_multiple_of(DIRECT_ALIGN)
                    && len.is_multiple_of(DIRECT_ALIGN)
                    && self.offset.is_multiple_of(DIRECT_ALIGN as u64) =>
            {
                (d.as_raw_fd(), true)
            }
            _ => (self.file.as_raw_fd(), false),
        }
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let off = self.off()?;
            let (fd, direct) = self.fd_for(base.wrapping_add(done).cast_const(), len - done);
            // SAFETY: `base` points to `len` bytes of guest memory that stay
            // mapped while `guard` lives (VolatileSlice invariant), so the
            // kernel may write `len - done` bytes at `base + done`; the fd is
            // open for as long as `self.file` (and `self.direct`) is borrowed.
            let n = unsafe { libc::pread(fd, base.add(done).cast(), len - done, off) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if direct && err.raw_os_error() == Some(libc::EINVAL) {
                    // The file system wants a larger alignment.
                    self.direct = None;
                    continue;
                }
                // The kernel may have written part of the range.
                buf.bitmap().mark_dirty(0, len);
                return Err(VolatileMemoryError::IOError(err));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let off = self.off()?;
            let (fd, direct) = self.fd_for(base.wrapping_add(done), len - done);
            // SAFETY: `base` points to `len` readable bytes of guest memory
            // that stay mapped while `guard` lives (VolatileSlice invariant);
            // the fd is open for as long as `self.file` is borrowed.
            let n = unsafe { libc::pwrite(fd, base.add(done).cast(), len - done, off) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if direct && err.raw_os_error() == Some(libc::EINVAL) {
                    // The file system wants a larger alignment.
                    self.direct = None;
                    continue;
                }
                return Err(VolatileMemoryError::IOError(err));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.offset += n as u64;
        }
        Ok(done)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let inval = || io::Error::from_raw_os_error(libc::EINVAL);
    let off = libc::off_t::try_from(offset).map_err(|_| inval())?;
    let len = libc::off_t::try_from(len).map_err(|_| inval())?;
    loop {
        // SAFETY: fallocate takes only integers and an fd we hold open; it
        // touches no memory of ours.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether an fallocate error means "this file or mode cannot do that"
/// rather than a real I/O failure (EINVAL covers block devices refusing
/// ranges not aligned to their logical block size).
fn fallocate_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

fn write_zeroes_slow(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
        file.write_all_at(&ZEROES[..chunk], offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

/// A virtio-blk device backend.
///
/// Stateless apart from its immutable configuration, so every method takes
/// `&self` and workers never contend on a lock.
#[derive(Debug)]
pub struct BlkDevice {
    target: Target,
    cfg: BlkConfig,
    read_only: bool,
    capacity_bytes: u64,
    max_data_len: u64,
    features: u64,
    serial: [u8; ID_LEN],
    config_space: [u8; CONFIG_SIZE],
}

impl BlkDevice {
    /// Build a device serving `target` with configuration `cfg`.
    pub fn new(target: Target, cfg: BlkConfig) -> Result<Self, BlkError> {
        cfg.validate()?;
        let size = target.size().map_err(|source| BlkError::Size {
            path: match &target {
                Target::Image(img) => img.path.clone(),
                Target::Null { .. } => PathBuf::new(),
            },
            source,
        })?;
        let sectors = size / SECTOR_SIZE;
        if sectors == 0 {
            return Err(BlkError::TooSmall);
        }
        let read_only = cfg.read_only || target.is_read_only();

        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if cfg.queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if cfg.discard {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if cfg.write_zeroes {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        let serial = match &cfg.serial {
            Some(s) => {
                let mut id = [0u8; ID_LEN];
                id[..s.len()].copy_from_slice(s.as_bytes());
                id
            }
            None => target.default_serial(),
        };

        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(CFG_CAPACITY, &sectors.to_le_bytes());
        put(CFG_SIZE_MAX, &cfg.size_max.to_le_bytes());
        put(CFG_SEG_MAX, &cfg.seg_max.to_le_bytes());
        put(CFG_BLK_SIZE, &cfg.blk_size.to_le_bytes());
        put(CFG_NUM_QUEUES, &cfg.queues.to_le_bytes());
        if cfg.discard {
            let align = cfg.blk_size / SECTOR_SIZE as u32;
            put(
                CFG_MAX_DISCARD_SECTORS,
                &cfg.max_discard_sectors.to_le_bytes(),
            );
            put(CFG_MAX_DISCARD_SEG, &cfg.max_discard_seg.to_le_bytes());
            put(CFG_DISCARD_SECTOR_ALIGNMENT, &align.to_le_bytes());
        }
        if cfg.write_zeroes {
            put(
                CFG_MAX_WRITE_ZEROES_SECTORS,
                &cfg.max_write_zeroes_sectors.to_le_bytes(),
            );
            put(
                CFG_MAX_WRITE_ZEROES_SEG,
                &cfg.max_write_zeroes_seg.to_le_bytes(),
            );
            put(
                CFG_WRITE_ZEROES_MAY_UNMAP,
                &[u8::from(cfg.write_zeroes_may_unmap)],
            );
        }

        Ok(BlkDevice {
            target,
            read_only,
            capacity_bytes: sectors * SECTOR_SIZE,
            max_data_len: u64::from(cfg.seg_max) * u64::from(cfg.size_max),
            features,
            serial,
            config_space: c,
            cfg,
        })
    }

    /// Open `path` as a raw image with the default configuration.
    pub fn open_image(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlkError> {
        let cfg = BlkConfig {
            read_only,
            ..BlkConfig::default()
        };
        Self::new(Target::open_image(path, read_only)?, cfg)
    }

    /// A null device of `size_bytes` with the default configuration.
    pub fn null(size_bytes: u64) -> Result<Self, BlkError> {
        Self::new(Target::null(size_bytes), BlkConfig::default())
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &BlkConfig {
        &self.cfg
    }

    /// The storage target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_bytes / SECTOR_SIZE
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The `GET_ID` serial.
    pub fn serial(&self) -> &[u8; ID_LEN] {
        &self.serial
    }

    /// Drain one vring: process every available chain, put each on the
    /// used ring, and notify the driver once at the end if anything
    /// completed and the driver wants it (`EVENT_IDX` aware).
    ///
    /// This is what [`DeviceBackend::handle_event`] runs for a queue event;
    /// it is public so a VMM or a test can drive a [`Vring`] directly.
    pub fn process_vring(&self, vr: &mut Vring) -> Result<(), VringError> {
        if !vr.is_enabled() {
            return Ok(());
        }
        thread_local! {
            // One per worker thread: zeroing 4 KiB per batch showed up in
            // profiles at queue depth 1.
            static SCRATCH: std::cell::RefCell<ChainScratch> =
                std::cell::RefCell::new(ChainScratch::new());
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => self.drain_vring(vr, &mut scratch),
            Err(_) => self.drain_vring(vr, &mut ChainScratch::new()),
        })
    }

    fn drain_vring(&self, vr: &mut Vring, scratch: &mut ChainScratch) -> Result<(), VringError> {
        let hold = self.cfg.injected_latency;
        let limit = vr.batch_limit();
        let first_used = vr.next_used();
        let mut completed = 0usize;
        let result = loop {
            if let Err(e) = vr.disable_notification() {
                break Err(e);
            }
            let batch = vr.process_available_descs(|mut chain| {
                let (head, mem) = (chain.head_index(), chain.memory());
                if let Some(d) = hold {
                    // Test knob: the request is marked in flight, not yet
                    // performed.
                    std::thread::sleep(d / 2);
                }
                let len = self.process_descs(head, mem, &mut chain, scratch);
                if let Some(d) = hold {
                    // Performed (data moved, status written), not completed.
                    std::thread::sleep(d - d / 2);
                }
                len
            });
            match batch {
                Ok(n) => completed += n,
                Err(e) => break Err(e),
            }
            if completed >= limit {
                // A ring's worth in one event and maybe more waiting (a
                // driver that keeps republishing): let the worker serve its
                // other queues and any stop request first, then come back.
                vr.defer();
                break Ok(());
            }
            match vr.enable_notification() {
                Ok(false) => break Ok(()),
                Ok(true) => {}
                Err(e) => break Err(e),
            }
        };
        // Completions already in the used ring are signalled even when the
        // batch ended on an error (whose partial count is not returned, so
        // the used index tells); a spurious kick completes nothing and must
        // not interrupt the guest.
        if completed > 0 || vr.next_used() != first_used {
            let notified = vr.notify_if_needed();
            return result.and(notified.map(|_| ()));
        }
        result
    }

    /// Process one request chain and return its completion: the used
    /// length to report (the bytes written into the chain, status byte
    /// included), or [`Completion::NeedsReset`] when the chain has no
    /// status byte the device can write (a used entry would make the driver
    /// read a status nobody wrote).
    ///
    /// This is a plain function of the chain, its memory and the target, so
    /// it can be tested without a worker.
    pub fn process_chain<M>(
        &self,
        mut chain: DescriptorChain<M>,
        scratch: &mut ChainScratch,
    ) -> Completion
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let (n, overflow, last) = self.collect_descs(&mut chain, scratch);
        self.finish_chain(head, chain.memory(), &(), scratch, n, overflow, last)
    }

    /// [`BlkDevice::process_chain`] for a chain given as its head index, its
    /// memory and an iterator over its descriptors (which may also offer a
    /// shortcut to the header and status byte).
    fn process_descs<M, I>(
        &self,
        head: u16,
        mem: &M,
        mut descs: I,
        scratch: &mut ChainScratch,
    ) -> Completion
    where
        M: GuestMemory + ?Sized,
        I: Iterator<Item = Descriptor> + HeaderStatusAccess,
    {
        let (n, overflow, last) = self.collect_descs(&mut descs, scratch);
        self.finish_chain(head, mem, &descs, scratch, n, overflow, last)
    }

    /// Copy up to `seg_max + 2` descriptors into the scratch array; returns
    /// how many, whether there were more, and the chain's last descriptor.
    fn collect_descs<I: Iterator<Item = Descriptor>>(
        &self,
        descs: I,
        scratch: &mut ChainScratch,
    ) -> (usize, bool, Option<Descriptor>) {
        let cap = (self.cfg.seg_max as usize + 2).min(SCRATCH_DESCS);
        let mut n = 0usize;
        let mut overflow = false;
        let mut last = None;
        let mut descs = descs;
        // No chain is longer than the queue (virtio 2.7.5.2): an indirect
        // table can claim 65535 entries, and walking them all for the status
        // byte at the end would let one request cost that much.
        for desc in descs.by_ref().take(usize::from(self.cfg.queue_size)) {
            if n < cap {
                scratch.descs[n] = desc;
                n += 1;
            } else {
                overflow = true;
            }
            last = Some(desc);
        }
        if descs.next().is_some() {
            // Where its status byte is cannot be known without the walk.
            return (n, true, None);
        }
        (n, overflow, last)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_chain<M: GuestMemory + ?Sized, A: HeaderStatusAccess + ?Sized>(
        &self,
        head: u16,
        mem: &M,
        fast: &A,
        scratch: &ChainScratch,
        n: usize,
        overflow: bool,
        last: Option<Descriptor>,
    ) -> Completion {
        let cap = (self.cfg.seg_max as usize + 2).min(SCRATCH_DESCS);

        let Some(status_addr) = last.and_then(status_address) else {
            warn!(
                "virtio-blk: chain {head} has no writable status byte; the queue stops until reset"
            );
            return Completion::NeedsReset;
        };
        if overflow {
            warn!("virtio-blk: chain {head} has more than {cap} descriptors");
            return write_status(mem, fast, status_addr, Status::IoErr, 0, head);
        }

        let descs = &scratch.descs[..n];
        let Some((header, first, skip)) = read_header(mem, fast, descs) else {
            // The status byte is reachable: the guest is told, rather than
            // left to read whatever its status buffer held.
            warn!("virtio-blk: chain {head} has no readable 16-byte header");
            return write_status(mem, fast, status_addr, Status::IoErr, 0, head);
        };
        let span = DataSpan {
            descs: &descs[first..],
            skip,
        };
        let (status, written) = self.execute(mem, &header, span);
        write_status(mem, fast, status_addr, status, written, head)
    }

    fn execute<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        header: &[u8; HEADER_LEN],
        span: DataSpan<'_>,
    ) -> (Status, u32) {
        let mut word = [0u8; 4];
        word.copy_from_slice(&header[0..4]);
        let req_type = u32::from_le_bytes(word);
        let mut quad = [0u8; 8];
        quad.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(quad);

        let Some(info) = span.info() else {
            return (Status::IoErr, 0);
        };
        match req_type {
            VIRTIO_BLK_T_IN => self.read(mem, sector, span, &info),
            VIRTIO_BLK_T_OUT => (self.write(mem, sector, span, &info), 0),
            VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, span, &info),
            VIRTIO_BLK_T_DISCARD if self.cfg.discard => {
                (self.discard_or_zero(mem, span, &info, false), 0)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.cfg.write_zeroes => {
                (self.discard_or_zero(mem, span, &info, true), 0)
            }
            _ => (Status::Unsupp, 0),
        }
    }

    /// The byte range of a data transfer, if it is well formed and inside
    /// the disk.
    fn rw_range(&self, sector: u64, info: &SpanInfo) -> Option<u64> {
        if info.len & (SECTOR_SIZE - 1) != 0 || info.len > self.max_data_len {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(info.len)?;
        (end <= self.capacity_bytes).then_some(start)
    }

    fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sector: u64,
        span: DataSpan<'_>,
        info: &SpanInfo,
    ) -> (Status, u32) {
        if !info.all_writable {
            return (Status::IoErr, 0);
        }
        let Some(offset) = self.rw_range(sector, info) else {
            return (Status::IoErr, 0);
        };
        match &self.target {
            Target::Null { .. } => {
                // Nothing is copied, but the buffers must still be guest
                // memory: a bad address fails here as it would on an image.
                if !buffers_in_memory(mem, &span, Permissions::Write) {
                    warn!("virtio-blk: read at sector {sector}: buffer outside guest memory");
                    return (Status::IoErr, 0);
                }
            }
            Target::Image(img) => {
                let mut src = FileAt {
                    file: &img.file,
                    direct: img.direct.as_ref(),
                    offset,
                };
                let mut done = 0u32;
                for seg in span.segments() {
                    let r = mem.read_exact_volatile_from(seg.addr, &mut src, seg.len as usize);
                    if let Err(e) = r {
                        warn!("virtio-blk: read at sector {sector} failed: {e}");
                        return (Status::IoErr, done);
                    }
                    done += seg.len;
                }
            }
        }
        // A chain carries less than 4 GiB (virtio-queue stops iterating
        // beyond that), so this never saturates.
        (Status::Ok, u32::try_from(info.len).unwrap_or(u32::MAX))
    }

    fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sector: u64,
        span: DataSpan<'_>,
        info: &SpanInfo,
    ) -> Status {
        if self.read_only || !info.all_readable {
            return Status::IoErr;
        }
        let Some(offset) = self.rw_range(sector, info) else {
            return Status::IoErr;
        };
        match &self.target {
            Target::Image(img) => {
                let mut dst = FileAt {
                    file: &img.file,
                    direct: img.direct.as_ref(),
                    offset,
                };
                for seg in span.segments() {
                    if let Err(e) = mem.write_all_volatile_to(seg.addr, &mut dst, seg.len as usize)
                    {
                        warn!("virtio-blk: write at sector {sector} failed: {e}");
                        return Status::IoErr;
                    }
                }
            }
            Target::Null { .. } => {
                if !buffers_in_memory(mem, &span, Permissions::Read) {
                    warn!("virtio-blk: write at sector {sector}: buffer outside guest memory");
                    return Status::IoErr;
                }
            }
        }
        Status::Ok
    }

    fn flush(&self) -> Status {
        match &self.target {
            Target::Image(img) if !self.read_only => match img.file.sync_data() {
                Ok(()) => Status::Ok,
                Err(e) => {
                    warn!("virtio-blk: flush failed: {e}");
                    Status::IoErr
                }
            },
            _ => Status::Ok,
        }
    }

    fn get_id<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        span: DataSpan<'_>,
        info: &SpanInfo,
    ) -> (Status, u32) {
        // The driver must leave room for the ID (normally all 20 bytes; a
        // shorter buffer gets a truncated ID).
        if !info.all_writable || info.len == 0 {
            return (Status::IoErr, 0);
        }
        let mut done = 0usize;
        for seg in span.segments() {
            if done == ID_LEN {
                break;
            }
            let take = (seg.len as usize).min(ID_LEN - done);
            if mem
                .write_slice(&self.serial[done..done + take], seg.addr)
                .is_err()
            {
                return (Status::IoErr, done as u32);
            }
            done += take;
        }
        (Status::Ok, done as u32)
    }

    fn discard_or_zero<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        span: DataSpan<'_>,
        info: &SpanInfo,
        zero: bool,
    ) -> Status {
        if self.read_only || !info.all_readable {
            return Status::IoErr;
        }
        let (max_seg, max_sectors) = if zero {
            (
                self.cfg.max_write_zeroes_seg,
                self.cfg.max_write_zeroes_sectors,
            )
        } else {
            (self.cfg.max_discard_seg, self.cfg.max_discard_sectors)
        };
        if info.len == 0
            || info.len & (DWZ_SEGMENT_LEN - 1) != 0
            || info.len / DWZ_SEGMENT_LEN > u64::from(max_seg)
        {
            return Status::IoErr;
        }
        for i in 0..info.len / DWZ_SEGMENT_LEN {
            let mut raw = [0u8; DWZ_SEGMENT_LEN as usize];
            if !span.read_at(mem, i * DWZ_SEGMENT_LEN, &mut raw) {
                return Status::IoErr;
            }
            let mut quad = [0u8; 8];
            quad.copy_from_slice(&raw[0..8]);
            let sector = u64::from_le_bytes(quad);
            let mut word = [0u8; 4];
            word.copy_from_slice(&raw[8..12]);
            let num_sectors = u32::from_le_bytes(word);
            word.copy_from_slice(&raw[12..16]);
            let flags = u32::from_le_bytes(word);

            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zero) {
                return Status::Unsupp;
            }
            if num_sectors > max_sectors {
                return Status::IoErr;
            }
            let range = sector.checked_mul(SECTOR_SIZE).and_then(|start| {
                let len = u64::from(num_sectors) * SECTOR_SIZE;
                start
                    .checked_add(len)
                    .filter(|end| *end <= self.capacity_bytes)
                    .map(|_| (start, len))
            });
            let Some((start, len)) = range else {
                return Status::IoErr;
            };
            if len == 0 {
                continue;
            }
            let Target::Image(img) = &self.target else {
                continue;
            };
            let result = if zero {
                self.zero_range(
                    &img.file,
                    start,
                    len,
                    unmap && self.cfg.write_zeroes_may_unmap,
                )
            } else {
                discard_range(&img.file, start, len)
            };
            if let Err(e) = result {
                warn!("virtio-blk: discard/write-zeroes at sector {sector} failed: {e}");
                return Status::IoErr;
            }
        }
        Status::Ok
    }

    fn zero_range(&self, file: &File, start: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if fallocate_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match fallocate(
            file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            start,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if fallocate_unsupported(&e) => write_zeroes_slow(file, start, len),
            Err(e) => Err(e),
        }
    }
}

/// Discard is a hint: storage that cannot punch holes simply keeps the data.
fn discard_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        start,
        len,
    ) {
        Err(e) if !fallocate_unsupported(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Where the status byte goes: the last byte of the last descriptor, which
/// must be device-writable.
fn status_address(last: Descriptor) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    last.addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
}

/// Read the 16-byte request header from the leading readable descriptors.
/// Returns it with the position right after it: index of the descriptor
/// and bytes of it the header used.
fn read_header<M: GuestMemory + ?Sized, A: HeaderStatusAccess + ?Sized>(
    mem: &M,
    fast: &A,
    descs: &[Descriptor],
) -> Option<([u8; HEADER_LEN], usize, u32)> {
    let mut header = [0u8; HEADER_LEN];
    // Fast path: the whole header in the first descriptor.
    if let Some(d) = descs.first() {
        if !d.is_write_only() && d.len() as usize >= HEADER_LEN {
            if let Some(h) = fast.read_header(d.addr()) {
                header = h;
            } else if !read_guest(mem, &mut header, d.addr()) {
                return None;
            }
            return Some(if d.len() as usize == HEADER_LEN {
                (header, 1, 0)
            } else {
                (header, 0, HEADER_LEN as u32)
            });
        }
    }
    let mut got = 0usize;
    for (i, d) in descs.iter().enumerate() {
        if d.is_write_only() {
            return None;
        }
        let take = (d.len() as usize).min(HEADER_LEN - got);
        if !read_guest(mem, &mut header[got..got + take], d.addr()) {
            return None;
        }
        got += take;
        if got == HEADER_LEN {
            return Some(if take == d.len() as usize {
                (header, i + 1, 0)
            } else {
                (header, i, take as u32)
            });
        }
    }
    None
}

/// Copy `buf.len()` bytes of guest memory at `addr` into `buf`. A range
/// inside one region of plain guest memory is read through a single
/// `VolatileSlice` (one region lookup); anything else (a range crossing
/// regions, IOMMU-translated memory) takes vm-memory's general path.
fn read_guest<M: GuestMemory + ?Sized>(mem: &M, buf: &mut [u8], addr: GuestAddress) -> bool {
    if let Some(phys) = mem.physical_memory() {
        if let Ok(slice) = phys.get_slice(addr, buf.len()) {
            return slice.read_slice(buf, 0).is_ok();
        }
    }
    mem.read_slice(buf, addr).is_ok()
}

/// A shortcut to a request's header and status byte in guest memory, tried
/// before the generic `GuestMemory` paths (which also handle what the
/// shortcut declines, such as a header spanning two regions).
trait HeaderStatusAccess {
    /// The 16-byte request header at `addr`, or `None` to take the
    /// generic path.
    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_LEN]>;
    /// Store the status byte at `addr`; false to take the generic path.
    fn write_status(&self, addr: GuestAddress, byte: u8) -> bool;
}

/// No shortcut (chains from `virtio-queue`).
impl HeaderStatusAccess for () {
    fn read_header(&self, _addr: GuestAddress) -> Option<[u8; HEADER_LEN]> {
        None
    }

    fn write_status(&self, _addr: GuestAddress, _byte: u8) -> bool {
        false
    }
}

/// Through the batch's region hint ([`DescIter::get_ref`]): bounds-checked
/// against the region, dirty-logged, without a memory-map lookup when the
/// request's buffers share a region with the previous request's.
impl HeaderStatusAccess for &mut DescIter<'_> {
    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_LEN]> {
        // Two 8-byte volatile loads (a byte array would be read byte by
        // byte), put back in memory order.
        let [a, b] = self.get_ref::<[u64; 2]>(addr)?.load();
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&a.to_ne_bytes());
        header[8..].copy_from_slice(&b.to_ne_bytes());
        Some(header)
    }

    fn write_status(&self, addr: GuestAddress, byte: u8) -> bool {
        self.get_ref::<u8>(addr).map(|r| r.store(byte)).is_some()
    }
}

/// Write the status byte and return the completion: the used length, or
/// [`Completion::NeedsReset`] when the byte cannot be written.
fn write_status<M: GuestMemory + ?Sized, A: HeaderStatusAccess + ?Sized>(
    mem: &M,
    fast: &A,
    addr: GuestAddress,
    status: Status,
    data_written: u32,
    head: u16,
) -> Completion {
    if fast.write_status(addr, status.byte()) {
        return Completion::Used(data_written.saturating_add(1));
    }
    let written = match mem.physical_memory().map(|m| m.get_slice(addr, 1)) {
        // One region lookup and a volatile store (dirty-logged through the
        // slice's bitmap) instead of vm-memory's generic slice iterator.
        Some(Ok(slice)) => slice
            .write_obj(status.byte(), 0)
            .map_err(GuestMemoryError::from),
        _ => mem.write_obj(status.byte(), addr),
    };
    match written {
        Ok(()) => Completion::Used(data_written.saturating_add(1)),
        Err(e) => {
            warn!("virtio-blk: chain {head}: cannot write the status byte: {e}; the queue stops until reset");
            Completion::NeedsReset
        }
    }
}

/// Whether every data buffer of `span` lies in guest memory the device may
/// access as `access` says.
fn buffers_in_memory<M: GuestMemory + ?Sized>(
    mem: &M,
    span: &DataSpan<'_>,
    access: Permissions,
) -> bool {
    span.segments()
        .all(|seg| mem.check_range(seg.addr, seg.len as usize, access))
}

impl DeviceBackend for BlkDevice {
    type Vring = VringOwned;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        let start = offset as usize;
        if start < CONFIG_SIZE {
            let n = data.len().min(CONFIG_SIZE - start);
            data[..n].copy_from_slice(&self.config_space[start..start + n]);
        }
    }

    fn write_config(&self, _offset: u32, _data: &[u8]) -> Result<(), BackendError> {
        Err("virtio-blk config space is read-only".into())
    }

    /// One worker per queue: requests are served synchronously, so a worker
    /// blocked in `pread` must not hold up the other queues. The Linux
    /// driver maps queues to CPUs, so this spreads guest I/O over host
    /// threads the way the guest spreads it over vCPUs.
    fn queue_groups(&self) -> Vec<u64> {
        (0..self.cfg.queues.min(64)).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        event: DeviceEvent,
        queues: &QueueSet<Self::Vring>,
        _worker: usize,
    ) -> Result<(), BackendError> {
        let DeviceEvent::Queue(index) = event else {
            return Ok(());
        };
        let Some(vring) = queues.get(index) else {
            return Ok(());
        };
        let mut vr = vring.lock();
        self.process_vring(&mut vr)?;
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, BackendError> {
        Ok(Vec::new())
    }

    fn restore_state(&self, data: &[u8]) -> Result<(), BackendError> {
        if data.is_empty() {
            Ok(())
        } else {
            Err("virtio-blk keeps no state to restore".into())
        }
    }
}

#[cfg(test)]
mod tests;
