// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the vring: the kit's data path against virtio-queue.

use super::*;
use virtio_queue::desc::RawDescriptor;
use vm_memory::GuestMemoryMmap;

const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A vring of `SIZE` on the test layout (`DESC`, `AVAIL`, `USED`),
/// resuming at index `start`, without call or err notifiers.
fn test_vring(mem: &GuestMemoryHandle, start: u16, event_idx: bool) -> Vring {
    let state = VringState {
        size: SIZE,
        ready: true,
        enabled: true,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
        next_avail: start,
        next_used: start,
        event_idx,
        signalled_used: None,
    };
    let slot = || Arc::new(ArcSwapOption::empty());
    Vring::new(0, SIZE, &state, mem.clone(), slot(), slot()).unwrap()
}

/// `DescIter` yields exactly what virtio-queue's chain yields.
#[test]
fn desc_iter_matches_descriptor_chain() {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT as IND, VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as W,
    };
    let (ind, next, w) = (IND as u16, NEXT as u16, W as u16);
    let mem: GuestMemoryLog = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let table: [(u16, RawDescriptor); 11] = [
        // 0 -> 1 -> 2: a plain request.
        (0, desc(0x4000, 16, next, 1)),
        (1, desc(0x5000, 512, next | w, 2)),
        (2, desc(0x6000, 1, w, 0)),
        // 3 -> 4 -> 3: a loop.
        (3, desc(0x4000, 16, next, 4)),
        (4, desc(0x4000, 16, next, 3)),
        // 5: next index outside the table.
        (5, desc(0x4000, 16, next, SIZE + 3)),
        // 6: an indirect table of two descriptors.
        (6, desc(0x8000, 32, ind, 0)),
        // 7: a misaligned indirect table.
        (7, desc(0x8000, 20, ind, 0)),
        // 8: an indirect table outside memory.
        (8, desc(0xffff_0000, 32, ind, 0)),
        // 9 -> 10: more than 4 GiB.
        (9, desc(0x4000, u32::MAX, next, 10)),
        (10, desc(0x4000, 2, 0, 0)),
    ];
    for (i, d) in table {
        mem.write_obj(d, GuestAddress(DESC + u64::from(i) * 16))
            .unwrap();
    }
    mem.write_obj(desc(0x4000, 16, next, 1), GuestAddress(0x8000))
        .unwrap();
    mem.write_obj(desc(0x6000, 1, w, 0), GuestAddress(0x8010))
        .unwrap();
    let heads: Vec<u16> = (0..11).chain([SIZE + 1]).collect();
    for (slot, head) in heads.iter().enumerate() {
        mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * slot as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
        .unwrap();

    let mut queue = Queue::new(SIZE).unwrap();
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let descs = DescTable::new(&mem, &queue);
    let mut seen = 0;
    for chain in queue.iter(&mem).unwrap() {
        let head = chain.head_index();
        let key = |d: Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
        let ours: Vec<_> = descs.chain(head).map(key).collect();
        let theirs: Vec<_> = chain.map(key).collect();
        assert_eq!(ours, theirs, "chain {head}");
        seen += 1;
    }
    assert_eq!(seen, heads.len());
    // The table lookups fall back to plain reads when there is no slice.
    let mut unmapped = DescTable::new(&mem, &queue);
    unmapped.table.array = None;
    assert_eq!(unmapped.chain(0).count(), 3);
    assert_eq!(unmapped.chain(6).count(), 2);
}

/// The batch path (rings mapped once per batch) leaves the used ring,
/// the queue state and event_idx decisions exactly as `virtio-queue`'s
/// `add_used` path does, across the 16-bit index wrap.
#[test]
fn mapped_rings_match_virtio_queue() {
    let start = u16::MAX - 5;
    let setup = || {
        let mem: GuestMemoryLog =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for i in 0..SIZE {
            mem.write_obj(
                desc(0x4000, 16, 0, 0),
                GuestAddress(DESC + u64::from(i) * 16),
            )
            .unwrap();
        }
        let handle = GuestMemoryHandle::new(mem);
        let vring = test_vring(&handle, start, true);
        (handle, vring)
    };
    let offer = |mem: &GuestMemoryLog, from: u16, n: u16, used_event: u16| {
        for k in 0..n {
            let idx = from.wrapping_add(k);
            let slot = u64::from(idx % SIZE);
            mem.write_obj(idx % SIZE, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
        }
        mem.write_obj(from.wrapping_add(n), GuestAddress(AVAIL + 2))
            .unwrap();
        mem.write_obj(used_event, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
            .unwrap();
    };
    let (mem_a, mut fast) = setup();
    let (mem_b, mut slow) = setup();
    let mut next = start;
    let batches = [
        (3u16, start.wrapping_add(1), true),
        (5, 0, true),
        (4, 100, false),
        (2, 7, true),
    ];
    for (n, used_event, notify) in batches {
        offer(&mem_a.memory(), next, n, used_event);
        offer(&mem_b.memory(), next, n, used_event);
        let a = fast
            .process_available_descs(|c| u32::from(c.head_index()) + 7)
            .unwrap();
        let b = slow
            .process_available(|c| u32::from(c.head_index()) + 7)
            .unwrap();
        assert_eq!((a, b), (usize::from(n), usize::from(n)));
        assert_eq!(fast.state(), slow.state());
        // virtio-queue's own answer, from its `add_used` bookkeeping.
        let theirs = slow.queue.needs_notification(&*mem_b.memory()).unwrap();
        assert_eq!(theirs, notify);
        assert_eq!(fast.needs_notification().unwrap(), notify);
        assert_eq!(slow.needs_notification().unwrap(), notify);
        let ring = |m: &GuestMemoryLog| {
            let mut buf = [0u8; 4 + 8 * SIZE as usize];
            m.read_slice(&mut buf, GuestAddress(USED)).unwrap();
            buf
        };
        assert_eq!(ring(&mem_a.memory()), ring(&mem_b.memory()));
        next = next.wrapping_add(n);
    }
    assert_eq!(fast.state().next_used, start.wrapping_add(14));
    // An available index more than a queue size ahead is refused.
    offer(&mem_a.memory(), next, SIZE + 1, 0);
    let err = fast.process_available_descs(|_| 0).unwrap_err();
    assert!(matches!(
        err,
        VringError::Queue {
            source: virtio_queue::Error::InvalidAvailRingIndex,
            ..
        }
    ));
}

/// The mapped batch path: `DescIter::get_ref` takes only ranges inside
/// one region (whichever region the hint holds), and every write it and
/// the mapped used ring make is dirty-logged while logging is on.
#[test]
fn mapped_path_checks_ranges_and_logs_writes() {
    use crate::memory::{DirtyLog, LOG_PAGE_SIZE};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    const HALF: u64 = 0x10000;
    let log = DirtyLog::new();
    let log_file = tempfile::tempfile().unwrap();
    log_file.set_len(64).unwrap();
    log.set_area(&log_file, 64, 0).unwrap();
    let region = |base: u64| {
        let map = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            HALF as usize,
            DirtyLogBitmap::new(log.clone(), base),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .unwrap();
        GuestRegionLog::new(map, GuestAddress(base)).unwrap()
    };
    // Two adjacent regions: [0, HALF) and [HALF, 2 * HALF).
    let mem = GuestMemoryLog::from_regions(vec![region(0), region(HALF)]).unwrap();
    let (next, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    for head in (0..SIZE).step_by(2) {
        // A header in the first region, a status byte in the second.
        let base = DESC + u64::from(head) * 16;
        mem.write_obj(desc(0x4000, 16, next, head + 1), GuestAddress(base))
            .unwrap();
        mem.write_obj(desc(HALF + 0x5000, 1, w, 0), GuestAddress(base + 16))
            .unwrap();
    }
    let handle = GuestMemoryHandle::new(mem);
    let mut vring = test_vring(&handle, 0, false);
    let offer = |idx: u16| {
        let m = handle.memory();
        let head = (idx % (SIZE / 2)) * 2;
        m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % SIZE)))
            .unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    };
    let logged = || {
        let mut bytes = [0u8; 64];
        std::os::unix::fs::FileExt::read_at(&log_file, &mut bytes, 0).unwrap();
        let pages: Vec<u64> = (0..64 * 8)
            .filter(|p| bytes[p / 8] & (1 << (p % 8)) != 0)
            .map(|p| p as u64 * LOG_PAGE_SIZE)
            .collect();
        pages
    };
    let run = |vring: &mut Vring, status: u8| {
        vring
            .process_available_descs(|chain| {
                let at = GuestAddress;
                // Inside one region, the hint on either side.
                assert!(chain.get_ref::<[u64; 2]>(at(0x4000)).is_some());
                assert!(chain.get_ref::<u8>(at(HALF - 1)).is_some());
                assert!(chain.get_ref::<u16>(at(HALF)).is_some());
                assert!(chain.get_ref::<u8>(at(2 * HALF - 1)).is_some());
                // Across the boundary (whichever region the hint holds),
                // and beyond memory: refused.
                assert!(chain.get_ref::<u64>(at(HALF - 4)).is_none());
                assert!(chain.get_ref::<u8>(at(HALF - 1)).is_some());
                assert!(chain.get_ref::<u64>(at(HALF - 4)).is_none());
                assert!(chain.get_ref::<u8>(at(2 * HALF)).is_none());
                assert!(chain.get_ref::<u16>(at(2 * HALF - 1)).is_none());
                assert!(chain.get_ref::<u8>(at(u64::MAX)).is_none());
                let descs: Vec<Descriptor> = chain.collect();
                assert_eq!(descs.len(), 2);
                1
            })
            .unwrap();
        // The status byte, written as a device would.
        let guard = handle.memory();
        let table = DescTable::new(&guard, vring.queue_mut());
        let chain = table.chain(0);
        chain
            .get_ref::<u8>(GuestAddress(HALF + 0x5000))
            .unwrap()
            .store(status);
    };
    offer(0);
    run(&mut vring, 1);
    assert_eq!(logged(), Vec::<u64>::new(), "logged while logging is off");
    assert_eq!(vring.state().next_used, 1);

    offer(1);
    // (After the driver-side writes above, which would be logged too.)
    log.set_active(true);
    run(&mut vring, 2);
    // The used ring (element and index) and the status byte's page.
    assert_eq!(logged(), vec![USED, HALF + 0x5000]);
    let m = handle.memory();
    assert_eq!(m.read_obj::<u8>(GuestAddress(HALF + 0x5000)).unwrap(), 2);
    assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
    // Used element 1: head 2, length 1.
    assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 12)).unwrap(), 2);
    assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 16)).unwrap(), 1);
}

/// An in-flight area sized for a larger ring cannot make this ring
/// resubmit a head it cannot have.
#[test]
fn inflight_heads_beyond_the_ring_are_refused() {
    let mem: GuestMemoryLog = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let area = Arc::new(crate::inflight::InflightArea::create(1, 1024).unwrap());
    let mut q = area.queue(0).unwrap();
    q.recover(0);
    q.begin(SIZE + 100);
    let mut vring = test_vring(&GuestMemoryHandle::new(mem), 0, false);
    let err = vring.attach_inflight(area.queue(0).unwrap()).unwrap_err();
    assert!(
        matches!(err, VringError::InvalidState(m) if m.contains("beyond the queue")),
        "{err}"
    );
}
