// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A virtio-blk device (virtio 1.x, device ID 2).
//!
//! [`BlkDevice`] serves a [`Target`], either a raw image file (or block
//! device node) or a null target that completes every request without
//! touching data, for benchmarks. It implements
//! [`DeviceBackend`], so the same device
//! runs behind the vhost-user daemon or inside a VMM.
//!
//! The parts: this file holds the device, its configuration and its
//! config space; `target` what the disk is backed by; `request` a request
//! from its descriptor chain (header, status byte, the batch loop, the
//! completion); `data_io` moving its data between guest memory and the
//! file (reads, writes, discard, write-zeroes, flush).
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

mod data_io;
mod request;
mod target;

use data_io::*;
pub use request::ChainScratch;
use request::*;
pub use target::{ImageFile, ImageOptions, Target};

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
    BackendError, Completion, DescIter, DeviceBackend, Vring, VringError, VringOwned,
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
        if !super::valid_queue_size(self.queue_size) {
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

    fn process_queue(&self, _index: u16, vr: &mut Vring) -> Result<(), BackendError> {
        self.process_vring(vr)?;
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
