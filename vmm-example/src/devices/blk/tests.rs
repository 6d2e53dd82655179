// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests driving [`BlkDevice`] through a real [`Vring`] in real guest memory.

use std::sync::Arc;

use tempfile::NamedTempFile;
use virtio_backend_kit::testing::{RawDescriptor, SplitQueueDriver};
use virtio_backend_kit::vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use virtio_backend_kit::vmm_sys_util::eventfd::EventFd;
use virtio_backend_kit::vring::{Notifier, NotifierSlot};
use virtio_backend_kit::{GuestMemoryHandle, GuestMemoryLog, VringState};
use virtio_bindings::virtio_blk::virtio_blk_config;

use super::*;

const QSIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DATA_START: u64 = 0x1_0000;
const MEM_SIZE: usize = 0x40_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const IMAGE_SIZE: u64 = 1 << 20;

/// One descriptor to lay out: guest address, length, device-writable.
type D = (u64, u32, bool);

/// A [`Vring`] in real guest memory, driven by the kit's public
/// [`SplitQueueDriver`]: chains laid out by hand (including indirect and
/// malformed ones), one batch at a time.
struct Harness {
    mem: GuestMemoryHandle,
    vring: Vring,
    driver: SplitQueueDriver,
    call: EventFd,
    next_desc: u16,
    next_data: u64,
}

impl Harness {
    fn new() -> Self {
        Self::with_event_idx(false)
    }

    fn with_event_idx(event_idx: bool) -> Self {
        let guest = GuestMemoryLog::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let driver = SplitQueueDriver::new(&guest, 0, QSIZE, DESC_TABLE);
        assert_eq!(driver.rings(), (DESC_TABLE, AVAIL_RING, USED_RING));
        let mem = GuestMemoryAtomic::new(guest);
        let state = VringState {
            size: QSIZE,
            ready: true,
            enabled: true,
            desc_table: DESC_TABLE,
            avail_ring: AVAIL_RING,
            used_ring: USED_RING,
            event_idx,
            ..VringState::default()
        };
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call_slot = NotifierSlot::default();
        call_slot.store(Some(Arc::new(Notifier::new(call.try_clone().unwrap()))));
        let vring = Vring::new(
            0,
            QSIZE,
            &state,
            mem.clone(),
            call_slot,
            NotifierSlot::default(),
        )
        .unwrap();
        Harness {
            mem,
            vring,
            driver,
            call,
            next_desc: 0,
            next_data: DATA_START,
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .unwrap();
        v
    }

    /// Reserve `len` bytes of guest memory, filled with `fill`.
    fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let addr = self.next_data;
        self.next_data = (addr + len as u64 + 15) & !15;
        self.write(addr, &vec![fill; len]);
        addr
    }

    fn header(&mut self, req_type: u32, sector: u64) -> u64 {
        let addr = self.alloc(HEADER_LEN, 0);
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(addr, &h);
        addr
    }

    fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor {
            addr,
            len,
            flags,
            next,
        };
        self.driver.write_descriptor(table, index, d);
    }

    /// Lay out a chain in the descriptor table and make it available.
    fn push(&mut self, descs: &[D]) -> u16 {
        assert!(descs.len() <= usize::from(QSIZE));
        if usize::from(self.next_desc) + descs.len() > usize::from(QSIZE) {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, (addr, len, w)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let more = i + 1 < descs.len();
            let flags = if *w { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 };
            self.write_desc(DESC_TABLE, idx, *addr, *len, flags, idx + 1);
        }
        self.next_desc += descs.len() as u16;
        self.make_available(head);
        head
    }

    /// Lay out a chain as an indirect table referenced by one descriptor.
    fn push_indirect(&mut self, descs: &[D]) -> u16 {
        let table = self.alloc(16 * descs.len(), 0);
        for (i, (addr, len, w)) in descs.iter().enumerate() {
            let more = i + 1 < descs.len();
            let flags = if *w { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 };
            self.write_desc(table, i as u16, *addr, *len, flags, i as u16 + 1);
        }
        if self.next_desc + 1 > QSIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        self.write_desc(
            DESC_TABLE,
            head,
            table,
            16 * descs.len() as u32,
            F_INDIRECT,
            0,
        );
        self.next_desc += 1;
        self.make_available(head);
        head
    }

    fn make_available(&mut self, head: u16) {
        self.driver.publish(head);
    }

    fn run(&mut self, dev: &BlkDevice) {
        dev.process_vring(&mut self.vring).unwrap();
    }

    /// Run a batch that must stop the queue for a reset.
    fn run_expecting_reset(&mut self, dev: &BlkDevice) {
        match dev.process_vring(&mut self.vring) {
            Err(VringError::NeedsReset { .. }) => assert!(self.vring.needs_reset()),
            other => panic!("expected NeedsReset, got {other:?}"),
        }
    }

    fn used_idx(&self) -> u16 {
        self.driver.used_idx()
    }

    /// Used-ring entry `i`: (descriptor head, length).
    fn used(&self, i: u16) -> (u32, u32) {
        self.driver.used_entry(i)
    }

    /// The status byte at `addr`.
    fn status(&self, addr: u64) -> u8 {
        self.read(addr, 1)[0]
    }

    /// Submit one chain, run the device, return (used length, status byte
    /// at `status_addr`).
    fn submit(&mut self, dev: &BlkDevice, descs: &[D], status_addr: u64) -> (u32, u8) {
        let head = self.push(descs);
        self.complete(dev, head, status_addr)
    }

    /// Run the device on the chain `head` just made available, which must
    /// be its only work; return (used length, status byte at
    /// `status_addr`).
    fn complete(&mut self, dev: &BlkDevice, head: u16, status_addr: u64) -> (u32, u8) {
        let before = self.used_idx();
        self.run(dev);
        assert_eq!(self.used_idx(), before.wrapping_add(1), "one used entry");
        let (id, len) = self.used(before);
        assert_eq!(id, u32::from(head));
        (len, self.status(status_addr))
    }

    /// Make a request available without running the device: header, data
    /// descriptors, a separate 1-byte status descriptor. Returns (head,
    /// status address).
    fn queue_request(&mut self, req_type: u32, sector: u64, data: &[D]) -> (u16, u64) {
        let hdr = self.header(req_type, sector);
        let status = self.alloc(1, 0xff);
        let mut descs = vec![(hdr, HEADER_LEN as u32, false)];
        descs.extend_from_slice(data);
        descs.push((status, 1, true));
        (self.push(&descs), status)
    }

    /// Header + data descriptors + a separate 1-byte status descriptor,
    /// served on its own.
    fn request(&mut self, dev: &BlkDevice, req_type: u32, sector: u64, data: &[D]) -> (u32, u8) {
        let (head, status) = self.queue_request(req_type, sector, data);
        self.complete(dev, head, status)
    }

    fn dwz_segments(&mut self, segs: &[(u64, u32, u32)]) -> D {
        let addr = self.alloc(16 * segs.len(), 0);
        for (i, (sector, num, flags)) in segs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num.to_le_bytes());
            raw[12..16].copy_from_slice(&flags.to_le_bytes());
            self.write(addr + 16 * i as u64, &raw);
        }
        (addr, 16 * segs.len() as u32, false)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn image() -> NamedTempFile {
    let f = NamedTempFile::new().unwrap();
    f.as_file().set_len(IMAGE_SIZE).unwrap();
    f
}

fn image_device(img: &NamedTempFile, cfg: BlkConfig) -> BlkDevice {
    let ro = cfg.read_only;
    BlkDevice::new(Target::open_image(img.path(), ro).unwrap(), cfg).unwrap()
}

/// A fresh image, a device on it configured by `cfg`, and a harness.
fn on_image(cfg: BlkConfig) -> (NamedTempFile, BlkDevice, Harness) {
    let img = image();
    let dev = image_device(&img, cfg);
    (img, dev, Harness::new())
}

/// A null disk of `size` bytes configured by `cfg`.
fn null_disk(size: u64, cfg: BlkConfig) -> BlkDevice {
    BlkDevice::new(Target::null(size), cfg).unwrap()
}

/// A default 1 MiB null disk and a harness.
fn on_null() -> (BlkDevice, Harness) {
    (BlkDevice::null(1 << 20).unwrap(), Harness::new())
}

fn file_bytes(img: &NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    img.as_file().read_exact_at(&mut v, offset).unwrap();
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn config_space_layout_matches_the_spec() {
    use std::mem::offset_of;
    /// Each field's offset in the spec's layout, and the constant for it.
    macro_rules! offsets {
        ($($field:ident => $ours:expr),* $(,)?) => {
            [$((stringify!($field), offset_of!(virtio_blk_config, $field), $ours)),*]
        };
    }
    let fields = offsets!(
        capacity => CFG_CAPACITY,
        size_max => CFG_SIZE_MAX,
        seg_max => CFG_SEG_MAX,
        blk_size => CFG_BLK_SIZE,
        num_queues => CFG_NUM_QUEUES,
        max_discard_sectors => CFG_MAX_DISCARD_SECTORS,
        max_discard_seg => CFG_MAX_DISCARD_SEG,
        discard_sector_alignment => CFG_DISCARD_SECTOR_ALIGNMENT,
        max_write_zeroes_sectors => CFG_MAX_WRITE_ZEROES_SECTORS,
        max_write_zeroes_seg => CFG_MAX_WRITE_ZEROES_SEG,
        write_zeroes_may_unmap => CFG_WRITE_ZEROES_MAY_UNMAP,
        // The first field this device does not offer ends its space.
        max_secure_erase_sectors => CONFIG_SIZE,
    );
    for (field, spec, ours) in fields {
        assert_eq!(spec, ours, "{field}");
    }
}

#[test]
fn config_space_values() {
    let dev = null_disk(
        8 << 20,
        BlkConfig {
            queues: 4,
            blk_size: 4096,
            ..BlkConfig::default()
        },
    );
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.config_size(), CONFIG_SIZE);
    let mut cfg = [0xffu8; 64];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 16384);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 128);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(cfg[44..48].try_into().unwrap()), 8);
    assert_eq!(cfg[56], 1);
    assert!(cfg[CONFIG_SIZE..].iter().all(|b| *b == 0), "past the end");

    // Partial read at an offset, and a read entirely past the end.
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 4);
    let mut past = [0xffu8; 4];
    dev.read_config(1000, &mut past);
    assert_eq!(past, [0; 4]);

    assert!(dev.write_config(0, &[0]).is_err());
    assert_eq!(dev.save_state().unwrap(), Vec::<u8>::new());
    assert!(dev.restore_state(&[]).is_ok());
    assert!(dev.restore_state(&[1]).is_err());
}

#[test]
fn features_and_queue_groups() {
    let bit = |n: u32| 1u64 << n;
    let one = BlkDevice::null(1 << 20).unwrap();
    let f = one.features();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & bit(b), 0, "feature bit {b}");
    }
    assert_eq!(f & bit(VIRTIO_BLK_F_MQ), 0);
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(one.queue_groups(), vec![1]);
    assert_eq!(one.num_queues(), 1);
    assert_eq!(one.max_queue_size(), 256);

    let many = null_disk(
        1 << 20,
        BlkConfig {
            queues: 3,
            read_only: true,
            discard: false,
            ..BlkConfig::default()
        },
    );
    let f = many.features();
    assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(many.queue_groups(), vec![1, 2, 4]);
}

#[test]
fn invalid_configurations_are_refused() {
    let bad = [
        BlkConfig {
            queues: 0,
            ..BlkConfig::default()
        },
        BlkConfig {
            queues: 65,
            ..BlkConfig::default()
        },
        BlkConfig {
            queue_size: 100,
            ..BlkConfig::default()
        },
        BlkConfig {
            seg_max: MAX_SEG_MAX + 1,
            ..BlkConfig::default()
        },
        BlkConfig {
            blk_size: 1000,
            ..BlkConfig::default()
        },
        BlkConfig {
            serial: Some("x".repeat(21)),
            ..BlkConfig::default()
        },
    ];
    for cfg in bad {
        assert!(matches!(
            BlkDevice::new(Target::null(1 << 20), cfg.clone()),
            Err(BlkError::InvalidConfig(_))
        ));
    }
    assert!(matches!(BlkDevice::null(100), Err(BlkError::TooSmall)));
    assert!(matches!(
        BlkDevice::open_image("/nonexistent/vbk-image", false),
        Err(BlkError::Open { .. })
    ));
}

#[test]
fn write_then_read_round_trip_on_an_image() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    assert_eq!(dev.capacity_sectors(), IMAGE_SIZE / 512);

    // Write 3 sectors at sector 7, split over two descriptors.
    let data = pattern(1536, 3);
    let a = h.alloc(1024, 0);
    let b = h.alloc(512, 0);
    h.write(a, &data[..1024]);
    h.write(b, &data[1024..]);
    let (len, status) = h.request(
        &dev,
        VIRTIO_BLK_T_OUT,
        7,
        &[(a, 1024, false), (b, 512, false)],
    );
    assert_eq!((len, status), (1, OK));
    assert_eq!(file_bytes(&img, 7 * 512, 1536), data);

    // Read them back into three descriptors of different sizes.
    let r1 = h.alloc(512, 0xee);
    let r2 = h.alloc(512, 0xee);
    let r3 = h.alloc(512, 0xee);
    let (len, status) = h.request(
        &dev,
        VIRTIO_BLK_T_IN,
        7,
        &[(r1, 512, true), (r2, 512, true), (r3, 512, true)],
    );
    assert_eq!((len, status), (1536 + 1, OK));
    let mut back = h.read(r1, 512);
    back.extend(h.read(r2, 512));
    back.extend(h.read(r3, 512));
    assert_eq!(back, data);

    // The last sector of the disk is reachable.
    let r = h.alloc(512, 0);
    let (len, status) = h.request(
        &dev,
        VIRTIO_BLK_T_IN,
        IMAGE_SIZE / 512 - 1,
        &[(r, 512, true)],
    );
    assert_eq!((len, status), (513, OK));
}

#[test]
fn any_layout_header_split_and_status_sharing_a_data_descriptor() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    let data = pattern(512, 9);
    img.as_file().write_all_at(&data, 4 * 512).unwrap();

    // Header split 10 + 6 bytes; data and status in one writable buffer.
    let hdr = h.header(VIRTIO_BLK_T_IN, 4);
    let buf = h.alloc(513, 0xee);
    let (len, status) = h.submit(
        &dev,
        &[(hdr, 10, false), (hdr + 10, 6, false), (buf, 513, true)],
        buf + 512,
    );
    assert_eq!((len, status), (513, OK));
    assert_eq!(h.read(buf, 512), data);

    // Header and write data in one readable buffer.
    let new = pattern(512, 77);
    let both = h.alloc(16 + 512, 0);
    let hdr = h.header(VIRTIO_BLK_T_OUT, 5);
    let hdr_bytes = h.read(hdr, 16);
    h.write(both, &hdr_bytes);
    h.write(both + 16, &new);
    let st = h.alloc(1, 0xff);
    let (len, status) = h.submit(&dev, &[(both, 528, false), (st, 1, true)], st);
    assert_eq!((len, status), (1, OK));
    assert_eq!(file_bytes(&img, 5 * 512, 512), new);
}

#[test]
fn indirect_chains_work() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    let data = pattern(1024, 5);
    img.as_file().write_all_at(&data, 0).unwrap();
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let buf = h.alloc(1024, 0);
    let st = h.alloc(1, 0xff);
    let before = h.used_idx();
    h.push_indirect(&[(hdr, 16, false), (buf, 1024, true), (st, 1, true)]);
    h.run(&dev);
    assert_eq!(h.used_idx(), before + 1);
    assert_eq!(h.used(before).1, 1025);
    assert_eq!(h.status(st), OK);
    assert_eq!(h.read(buf, 1024), data);
}

#[test]
fn flush_succeeds() {
    let (_img, dev, mut h) = on_image(BlkConfig::default());
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));

    let null = BlkDevice::null(1 << 20).unwrap();
    assert_eq!(h.request(&null, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
}

#[test]
fn get_id_returns_the_serial() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    let buf = h.alloc(ID_LEN, 0xee);
    let (len, status) = h.request(&dev, VIRTIO_BLK_T_GET_ID, 0, &[(buf, 20, true)]);
    assert_eq!((len, status), (21, OK));
    let id = h.read(buf, ID_LEN);
    assert_eq!(&id[..], &dev.serial()[..]);
    assert!(id.starts_with(b"vbk-"));
    assert!(id[4..].iter().all(u8::is_ascii_hexdigit));

    let named = image_device(
        &img,
        BlkConfig {
            serial: Some("disk0".into()),
            ..BlkConfig::default()
        },
    );
    let buf = h.alloc(ID_LEN, 0xee);
    let (len, status) = h.request(&named, VIRTIO_BLK_T_GET_ID, 0, &[(buf, 20, true)]);
    assert_eq!((len, status), (21, OK));
    let mut want = [0u8; ID_LEN];
    want[..5].copy_from_slice(b"disk0");
    assert_eq!(h.read(buf, ID_LEN), want);

    let null = BlkDevice::null(1 << 20).unwrap();
    let buf = h.alloc(ID_LEN, 0xee);
    h.request(&null, VIRTIO_BLK_T_GET_ID, 0, &[(buf, 20, true)]);
    let mut want = [0u8; ID_LEN];
    want[..8].copy_from_slice(b"vbk-null");
    assert_eq!(h.read(buf, ID_LEN), want);

    // A short buffer gets a truncated ID; no buffer is an error.
    let buf = h.alloc(8, 0xee);
    let (len, status) = h.request(&dev, VIRTIO_BLK_T_GET_ID, 0, &[(buf, 8, true)]);
    assert_eq!((len, status), (9, OK));
    assert_eq!(h.read(buf, 8), dev.serial()[..8]);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_GET_ID, 0, &[]), (1, IOERR));

    // A read-only buffer for the ID is an error.
    let buf = h.alloc(ID_LEN, 0xee);
    let (len, status) = h.request(&dev, VIRTIO_BLK_T_GET_ID, 0, &[(buf, 20, false)]);
    assert_eq!((len, status), (1, IOERR));
}

#[test]
fn discard_validates_and_succeeds() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    img.as_file().write_all_at(&pattern(8192, 1), 0).unwrap();

    let seg = h.dwz_segments(&[(0, 8, 0), (8, 8, 0)]);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[seg]), (1, OK));

    // UNMAP is not a discard flag; unknown flags are unsupported.
    let seg = h.dwz_segments(&[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[seg]).1, UNSUPP);
    let seg = h.dwz_segments(&[(0, 8, 2)]);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[seg]).1, UNSUPP);

    // Out of range, overflowing, over the limits, malformed.
    let cap = IMAGE_SIZE / 512;
    for seg in [
        (cap - 1, 2, 0),
        (u64::MAX / 2, 1, 0),
        (u64::MAX, 1, 0),
        (0, (1 << 22) + 1, 0),
    ] {
        let seg = h.dwz_segments(&[seg]);
        assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[seg]).1, IOERR);
    }
    let too_many: Vec<_> = (0..33).map(|i| (i, 1, 0)).collect();
    let seg = h.dwz_segments(&too_many);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[seg]).1, IOERR);
    let odd = h.alloc(12, 0);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[(odd, 12, false)])
            .1,
        IOERR
    );
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[]).1, IOERR);

    // Without the feature the request type is unknown.
    let plain = image_device(
        &img,
        BlkConfig {
            discard: false,
            ..BlkConfig::default()
        },
    );
    let seg = h.dwz_segments(&[(0, 8, 0)]);
    assert_eq!(h.request(&plain, VIRTIO_BLK_T_DISCARD, 0, &[seg]).1, UNSUPP);
}

#[test]
fn write_zeroes_zeroes_with_and_without_unmap() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    let before = pattern(16 * 512, 200);
    img.as_file().write_all_at(&before, 0).unwrap();

    let seg = h.dwz_segments(&[(1, 2, 0), (8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]),
        (1, OK)
    );
    let after = file_bytes(&img, 0, 16 * 512);
    assert_eq!(after[..512], before[..512]);
    assert!(after[512..3 * 512].iter().all(|b| *b == 0));
    assert_eq!(after[3 * 512..8 * 512], before[3 * 512..8 * 512]);
    assert!(after[8 * 512..].iter().all(|b| *b == 0));

    // The slow path (writing zeroes) gives the same result.
    write_zeroes_slow(img.as_file(), 100, 40_000).unwrap();
    assert!(file_bytes(&img, 100, 40_000).iter().all(|b| *b == 0));

    let seg = h.dwz_segments(&[(IMAGE_SIZE / 512, 1, 0)]);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]).1,
        IOERR
    );
    let seg = h.dwz_segments(&[(0, 1, 4)]);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]).1,
        UNSUPP
    );
}

#[test]
fn read_only_refuses_writes() {
    let img = image();
    let original = pattern(1024, 42);
    img.as_file().write_all_at(&original, 0).unwrap();
    let dev = image_device(
        &img,
        BlkConfig {
            read_only: true,
            ..BlkConfig::default()
        },
    );
    assert!(dev.is_read_only());
    assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mut h = Harness::new();

    let buf = h.alloc(512, 0x55);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_OUT, 0, &[(buf, 512, false)]),
        (1, IOERR)
    );
    let seg = h.dwz_segments(&[(0, 1, 0)]);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_DISCARD, 0, &[seg]).1, IOERR);
    let seg = h.dwz_segments(&[(0, 1, 0)]);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]).1,
        IOERR
    );
    assert_eq!(file_bytes(&img, 0, 1024), original);

    // Reads and flushes still work.
    let buf = h.alloc(1024, 0);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_IN, 0, &[(buf, 1024, true)]),
        (1025, OK)
    );
    assert_eq!(h.read(buf, 1024), original);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));

    // A read-write configuration over a read-only open is still read-only.
    let forced = BlkDevice::new(
        Target::open_image(img.path(), true).unwrap(),
        BlkConfig::default(),
    )
    .unwrap();
    assert!(forced.is_read_only());
}

#[test]
fn unknown_type_is_unsupported() {
    let (dev, mut h) = on_null();
    assert_eq!(h.request(&dev, 0x1234, 0, &[]), (1, UNSUPP));
    // SCSI commands are not supported either.
    let buf = h.alloc(512, 0);
    assert_eq!(h.request(&dev, 2, 0, &[(buf, 512, true)]), (1, UNSUPP));
}

#[test]
fn bad_ranges_and_lengths_are_io_errors() {
    let (_img, dev, mut h) = on_image(BlkConfig::default());
    let cap = IMAGE_SIZE / 512;
    let buf = h.alloc(1024, 0);

    for (ty, w) in [(VIRTIO_BLK_T_IN, true), (VIRTIO_BLK_T_OUT, false)] {
        // Starts past the end, runs past the end, overflows.
        for sector in [cap, cap - 1, u64::MAX, u64::MAX / 512] {
            assert_eq!(
                h.request(&dev, ty, sector, &[(buf, 1024, w)]),
                (1, IOERR),
                "type {ty} sector {sector}"
            );
        }
        // Not a multiple of 512.
        assert_eq!(h.request(&dev, ty, 0, &[(buf, 100, w)]), (1, IOERR));
    }
    // Wrong direction: reading into a read-only buffer, writing from a
    // write-only one, or mixing.
    let wrong: [(u32, &[D]); 3] = [
        (VIRTIO_BLK_T_IN, &[(buf, 512, false)]),
        (VIRTIO_BLK_T_OUT, &[(buf, 512, true)]),
        (
            VIRTIO_BLK_T_IN,
            &[(buf, 512, true), (buf + 512, 512, false)],
        ),
    ];
    for (ty, data) in wrong {
        assert_eq!(h.request(&dev, ty, 0, data), (1, IOERR), "{data:?}");
    }
}

#[test]
fn guest_addresses_outside_memory_are_io_errors() {
    let (_img, dev, mut h) = on_image(BlkConfig::default());
    let outside = MEM_SIZE as u64 + 0x1000;
    let edge = MEM_SIZE as u64 - 256;
    // The request, and the used length it must get where that is known.
    let cases = [
        (VIRTIO_BLK_T_IN, (outside, 512, true), Some(1)),
        (VIRTIO_BLK_T_OUT, (outside, 512, false), Some(1)),
        // Straddling the end of memory.
        (VIRTIO_BLK_T_IN, (edge, 512, true), None),
        // Wrapping the address space.
        (VIRTIO_BLK_T_IN, (u64::MAX - 100, 512, true), Some(1)),
        (VIRTIO_BLK_T_DISCARD, (outside, 16, false), None),
    ];
    for (ty, desc, want_len) in cases {
        let (len, status) = h.request(&dev, ty, 0, &[desc]);
        assert_eq!(status, IOERR, "type {ty} {desc:?}");
        if let Some(want) = want_len {
            assert_eq!(len, want, "type {ty} {desc:?}");
        }
    }
}

#[test]
fn null_target_checks_buffer_addresses_too() {
    let (dev, mut h) = on_null();
    let outside = MEM_SIZE as u64 + 0x1000;
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let writable = t == VIRTIO_BLK_T_IN;
        assert_eq!(
            h.request(&dev, t, 0, &[(outside, 512, writable)]),
            (1, IOERR),
            "type {t}"
        );
        let edge = MEM_SIZE as u64 - 256;
        assert_eq!(h.request(&dev, t, 0, &[(edge, 512, writable)]).1, IOERR);
        // A good buffer still succeeds.
        let ok = h.alloc(512, 0);
        assert_eq!(h.request(&dev, t, 0, &[(ok, 512, writable)]).1, OK);
    }
}

#[test]
/// A chain without a readable header but with a reachable status byte is
/// answered VIRTIO_BLK_S_IOERR (it used to complete with the status byte
/// untouched, the guest reading whatever was there).
fn header_too_short_or_unreadable_gets_ioerr() {
    let (dev, mut h) = on_null();
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let st = h.alloc(1, 0xff);
    assert_eq!(
        h.submit(&dev, &[(hdr, 8, false), (st, 1, true)], st),
        (1, IOERR)
    );

    // Header readable bytes interrupted by a writable descriptor.
    let buf = h.alloc(512, 0);
    assert_eq!(
        h.submit(
            &dev,
            &[(hdr, 8, false), (buf, 512, true), (st, 1, true)],
            st
        ),
        (1, IOERR)
    );

    // Header outside guest memory.
    assert_eq!(
        h.submit(&dev, &[(MEM_SIZE as u64, 16, false), (st, 1, true)], st),
        (1, IOERR)
    );
}

#[test]
fn missing_status_descriptor_stops_the_queue_without_completing() {
    let dev = BlkDevice::null(1 << 20).unwrap();
    /// A chain laid out from (header, buffer) addresses.
    type Layout<'a> = &'a dyn Fn(u64, u64) -> Vec<(u64, u32, bool)>;
    let cases: [Layout; 4] = [
        // The last descriptor is readable.
        &|hdr, buf| vec![(hdr, 16, false), (buf, 512, false)],
        // Only a header.
        &|hdr, _| vec![(hdr, 16, false)],
        // Zero-length status descriptor.
        &|hdr, buf| vec![(hdr, 16, false), (buf, 0, true)],
        // Status outside guest memory.
        &|hdr, _| vec![(hdr, 16, false), (MEM_SIZE as u64, 1, true)],
    ];
    for chain in cases {
        let mut h = Harness::new();
        let hdr = h.header(VIRTIO_BLK_T_IN, 0);
        let buf = h.alloc(512, 0xab);
        h.push(&chain(hdr, buf));
        h.run_expecting_reset(&dev);
        assert_eq!(h.used_idx(), 0, "an unanswerable chain was completed");
        assert_eq!(h.read(buf, 512), vec![0xab; 512], "the buffer was touched");
        // The stopped ring takes nothing more.
        h.queue_request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        h.run(&dev);
        assert_eq!(h.used_idx(), 0);
    }
}

#[test]
fn too_many_segments_is_an_io_error() {
    let dev = null_disk(
        1 << 20,
        BlkConfig {
            seg_max: 2,
            ..BlkConfig::default()
        },
    );
    let mut h = Harness::new();
    let buf = h.alloc(512 * 3, 0);
    let data = [
        (buf, 512, true),
        (buf + 512, 512, true),
        (buf + 1024, 512, true),
    ];
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_IN, 0, &data), (1, IOERR));
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_IN, 0, &data[..2]), (1025, OK));
}

#[test]
fn oversized_request_is_an_io_error() {
    let dev = null_disk(
        64 << 20,
        BlkConfig {
            seg_max: 1,
            size_max: 4096,
            ..BlkConfig::default()
        },
    );
    let mut h = Harness::new();
    let buf = h.alloc(8192, 0);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_IN, 0, &[(buf, 8192, true)]),
        (1, IOERR)
    );
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_IN, 0, &[(buf, 4096, true)]),
        (4097, OK)
    );
}

#[test]
fn null_target_does_not_touch_data() {
    let (dev, mut h) = on_null();
    let buf = h.alloc(4096, 0x5a);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_IN, 8, &[(buf, 4096, true)]),
        (4097, OK)
    );
    assert!(h.read(buf, 4096).iter().all(|b| *b == 0x5a));
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_OUT, 8, &[(buf, 4096, false)]),
        (1, OK)
    );
    let seg = h.dwz_segments(&[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]),
        (1, OK)
    );
    // Range checks still apply.
    assert_eq!(
        h.request(&dev, VIRTIO_BLK_T_IN, 2048, &[(buf, 512, true)]),
        (1, IOERR)
    );
}

#[test]
fn a_batch_is_completed_and_notified_once() {
    let (_img, dev, mut h) = on_image(BlkConfig::default());
    let mut status = Vec::new();
    for i in 0..5u64 {
        let buf = h.alloc(512, 0);
        status.push(h.queue_request(VIRTIO_BLK_T_IN, i, &[(buf, 512, true)]).1);
    }
    h.run(&dev);
    assert_eq!(h.used_idx(), 5);
    for (i, st) in status.iter().enumerate() {
        assert_eq!(h.used(i as u16).1, 513);
        assert_eq!(h.status(*st), OK);
    }
    assert_eq!(h.call.read().unwrap(), 1, "exactly one notification");

    // Nothing new: no more notifications.
    h.run(&dev);
    assert!(h.call.read().is_err());
}

#[test]
fn completions_before_an_unanswerable_chain_are_notified() {
    let (dev, mut h) = on_null();
    let (_, st) = h.queue_request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    // No status byte: the batch stops here, this chain is not completed.
    let read = h.header(VIRTIO_BLK_T_IN, 0);
    h.push(&[(read, 16, false)]);
    h.run_expecting_reset(&dev);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(st), OK);
    assert_eq!(h.call.read().unwrap(), 1, "the completion was signalled");
}

#[test]
fn disabled_vring_is_left_alone() {
    let (dev, mut h) = on_null();
    h.queue_request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.vring.set_enabled(false);
    h.run(&dev);
    assert_eq!(h.used_idx(), 0);
    h.vring.set_enabled(true);
    h.run(&dev);
    assert_eq!(h.used_idx(), 1);
}

#[test]
fn a_looping_chain_is_bounded() {
    let (dev, mut h) = on_null();
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let buf = h.alloc(512, 0);
    // Descriptor 0 -> 1 -> 0 -> ...: virtio-queue stops after QSIZE
    // descriptors; the device must answer or drop it, not hang or panic.
    h.write_desc(DESC_TABLE, 0, hdr, 16, F_NEXT, 1);
    h.write_desc(DESC_TABLE, 1, buf, 512, F_NEXT | F_WRITE, 0);
    h.make_available(0);
    h.run(&dev);
    assert_eq!(h.used_idx(), 1);
}

#[test]
fn event_idx_suppresses_notifications_the_driver_did_not_ask_for() {
    let dev = BlkDevice::null(1 << 20).unwrap();
    let mut h = Harness::with_event_idx(true);

    // The driver wants an interrupt once used index passes 0.
    h.driver.set_used_event(0);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
    assert_eq!(h.call.read().unwrap(), 1);

    // Now only after entry 5: the next completion is silent.
    h.driver.set_used_event(5);
    assert_eq!(h.request(&dev, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
    assert!(h.call.read().is_err());
}

#[test]
fn injected_latency_holds_each_request_and_is_bounded() {
    let img = image();
    let latency = Duration::from_millis(20);
    let cfg = BlkConfig {
        injected_latency: Some(latency),
        ..BlkConfig::default()
    };
    let dev = image_device(&img, cfg);
    let mut h = Harness::new();
    let data = pattern(512, 5);
    let a = h.alloc(512, 0);
    h.write(a, &data);
    let t = std::time::Instant::now();
    let (len, status) = h.request(&dev, VIRTIO_BLK_T_OUT, 3, &[(a, 512, false)]);
    assert!(t.elapsed() >= latency);
    assert_eq!((len, status), (1, OK));
    assert_eq!(file_bytes(&img, 3 * 512, 512), data);

    let too_slow = BlkConfig {
        injected_latency: Some(MAX_INJECTED_LATENCY + Duration::from_micros(1)),
        ..BlkConfig::default()
    };
    assert!(matches!(
        BlkDevice::new(Target::null(1 << 20), too_slow),
        Err(BlkError::InvalidConfig(_))
    ));
}

#[test]
fn mixed_batch_of_writes_flush_and_reads() {
    let (img, dev, mut h) = on_image(BlkConfig::default());
    // One batch: two writes (one vectored), a flush, two reads.
    let data = pattern(2048, 5);
    let w1 = h.alloc(1024, 0);
    let w2 = h.alloc(1024, 0);
    h.write(w1, &data[..1024]);
    h.write(w2, &data[1024..]);
    let mut st = Vec::new();
    let mut chain = |h: &mut Harness, t: u32, sector: u64, data: &[D]| {
        st.push(h.queue_request(t, sector, data).1);
    };
    chain(
        &mut h,
        VIRTIO_BLK_T_OUT,
        4,
        &[(w1, 1024, false), (w2, 1024, false)],
    );
    chain(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let r1 = h.alloc(2048, 0xee);
    let r2 = h.alloc(512, 0xee);
    chain(&mut h, VIRTIO_BLK_T_IN, 4, &[(r1, 2048, true)]);
    // Beyond the end of the image: refused before any I/O.
    chain(
        &mut h,
        VIRTIO_BLK_T_IN,
        IMAGE_SIZE / 512,
        &[(r2, 512, true)],
    );
    h.run(&dev);
    assert_eq!(h.used_idx(), 4);
    let lens: Vec<u32> = (0..4).map(|i| h.used(i).1).collect();
    assert_eq!(lens, [1, 1, 2049, 1]);
    let status: Vec<u8> = st.iter().map(|s| h.status(*s)).collect();
    assert_eq!(status, [OK, OK, OK, IOERR]);
    assert_eq!(h.read(r1, 2048), data);
    assert_eq!(file_bytes(&img, 4 * 512, 2048), data);
}

#[test]
fn an_image_truncated_underneath_gives_io_errors() {
    let img = image();
    let dev = image_device(&img, BlkConfig::default());
    // Someone else shrinks the file after the device sized itself.
    img.as_file().set_len(IMAGE_SIZE / 2).unwrap();
    let mut h = Harness::new();
    let mut st = Vec::new();
    for sector in [0, IMAGE_SIZE / 512 - 8, IMAGE_SIZE / 512 - 16] {
        let buf = h.alloc(4096, 0);
        st.push(
            h.queue_request(VIRTIO_BLK_T_IN, sector, &[(buf, 4096, true)])
                .1,
        );
    }
    h.run(&dev);
    assert_eq!(h.used_idx(), 3);
    let status: Vec<u8> = st.iter().map(|s| h.status(*s)).collect();
    assert_eq!(status, [OK, IOERR, IOERR]);
}

/// With `--direct`, aligned transfers go through the `O_DIRECT` descriptor
/// and unaligned ones through the page cache; both land in the image.
#[test]
fn direct_image_serves_aligned_and_unaligned_transfers() {
    use virtio_backend_kit::vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};
    let img = image();
    let target = Target::open_image_with(
        img.path(),
        ImageOptions {
            direct: true,
            ..ImageOptions::default()
        },
    )
    .unwrap();
    let Target::Image(file) = &target else {
        unreachable!()
    };
    assert!(file.direct.is_some());
    // An aligned buffer (a page of an anonymous mapping) and an unaligned
    // one inside it.
    let mut page = vec![0u8; 5 * 4096];
    let aligned = page.as_ptr().align_offset(4096);
    let (data, rest) = page[aligned..].split_at_mut(8192);
    data.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    for (start, len, offset) in [(0usize, 4096usize, 0u64), (3, 1000, 70_001)] {
        let at = || FileAt {
            file: &file.file,
            direct: file.direct.as_ref(),
            offset,
        };
        let buf = &mut data[start..start + len];
        // SAFETY: `buf` is a live, exclusively borrowed byte slice.
        let slice = unsafe { VolatileSlice::new(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(at().write_volatile(&slice).unwrap(), len);
        assert_eq!(file_bytes(&img, offset, len), buf.to_vec());
        let back = &mut rest[..len];
        // SAFETY: as above.
        let mut slice = unsafe { VolatileSlice::new(back.as_mut_ptr(), back.len()) };
        assert_eq!(at().read_volatile(&mut slice).unwrap(), len);
        assert_eq!(back, &data[start..start + len]);
    }
}

/// A chain longer than the queue (here an indirect table of four queues'
/// worth of descriptors) is not walked to its end: it gets no status.
#[test]
fn chains_longer_than_the_queue_are_not_walked() {
    let cfg = BlkConfig {
        queue_size: QSIZE,
        ..BlkConfig::default()
    };
    let dev = null_disk(1 << 20, cfg);
    let mut h = Harness::new();
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![(hdr, 16, false)];
    let buf = h.alloc(512, 0);
    descs.extend((0..4 * u64::from(QSIZE) - 2).map(|i| (buf + i, 1, true)));
    let st = h.alloc(1, 0xff);
    descs.push((st, 1, true));
    let before = h.used_idx();
    h.push_indirect(&descs);
    // Where its status byte is cannot be known without the walk.
    h.run_expecting_reset(&dev);
    assert_eq!(h.used_idx(), before);
    assert_eq!(h.status(st), 0xff, "a status was written");
    // The same request within the queue size is served (after a reset).
    let mut h = Harness::new();
    let hdr = h.header(VIRTIO_BLK_T_IN, 0);
    let buf = h.alloc(512, 0);
    let st = h.alloc(1, 0xff);
    let short = [(hdr, 16, false), (buf, 512, true), (st, 1, true)];
    h.push_indirect(&short);
    h.run(&dev);
    assert_eq!(h.status(st), OK);
}
