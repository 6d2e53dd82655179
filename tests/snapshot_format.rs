// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The snapshot format against the golden files in `snapshots/`.
//!
//! - every file of every version folder still decodes, and round-trips
//!   through the newest format (decode old, encode newest, decode, equal);
//! - the reference state below encodes to `snapshots/v<N>/reference.snap`
//!   byte for byte, for the newest version and every older one this build
//!   still writes;
//! - the folders are append-only: one per version from 1 to the current one,
//!   none beyond.
//!
//! `VBK_BLESS=1 cargo test --test snapshot_format` writes the folder of a
//! version that has none yet (after a format version bump). It never touches
//! an existing folder: an old version's files are frozen forever.

use std::path::{Path, PathBuf};

use virtio_backend_kit::snapshot::{
    decode, encode, encode_version, parse_header, DeviceSnapshot, InflightRecord, SnapshotLimits,
    ValidatedSnapshot, VringSnapshot, CURRENT_FORMAT_VERSION, OLDEST_FORMAT_VERSION,
};

const REFERENCE: &str = "reference.snap";

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// The reference state, documented in `snapshots/README.md`: a virtio-blk
/// device (type 2) with three queues over vhost-user, caught mid-I/O.
///
/// - queue 0: 256 entries, event_idx, 65538 requests popped and 65535
///   completed (`next_avail` 2 has wrapped, `next_used` 65535 not yet),
///   last signalled at 65534; heads 12, 40 and 7 in flight, popped in that
///   order;
/// - queue 1: 128 entries, idle, never signalled;
/// - queue 2: never set up by the driver (size 0);
/// - features VERSION_1, EVENT_IDX, PROTOCOL_FEATURES, SEG_MAX, BLK_SIZE,
///   FLUSH, MQ; protocol features MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD;
/// - config: the first 36 bytes of `virtio_blk_config` (capacity 2048
///   sectors, size_max 0, seg_max 126, geometry 0, blk_size 512, topology 0,
///   writeback 0, unused, num_queues 3, all little endian);
/// - device state: the 12 bytes `blk:v1:image`.
fn reference() -> DeviceSnapshot {
    let mut config = Vec::new();
    config.extend_from_slice(&2048u64.to_le_bytes()); // capacity
    config.extend_from_slice(&0u32.to_le_bytes()); // size_max
    config.extend_from_slice(&126u32.to_le_bytes()); // seg_max
    config.extend_from_slice(&[0; 4]); // geometry
    config.extend_from_slice(&512u32.to_le_bytes()); // blk_size
    config.extend_from_slice(&[0; 8]); // topology
    config.extend_from_slice(&[0, 0]); // writeback, unused
    config.extend_from_slice(&3u16.to_le_bytes()); // num_queues
    DeviceSnapshot {
        device_type: 2,
        queues: vec![
            VringSnapshot {
                size: 256,
                ready: true,
                enabled: true,
                desc_table: 0x7ff0_0000,
                avail_ring: 0x7ff0_1000,
                used_ring: 0x7ff0_2000,
                // 65538 popped and 65535 completed: the indices wrapped.
                next_avail: 2,
                next_used: 65535,
                event_idx: true,
                signalled_used: Some(65534),
            },
            VringSnapshot {
                size: 128,
                ready: true,
                enabled: true,
                desc_table: 0x7ff1_0000,
                avail_ring: 0x7ff1_0800,
                used_ring: 0x7ff1_0a00,
                next_avail: 0,
                next_used: 0,
                event_idx: true,
                signalled_used: None,
            },
            VringSnapshot::default(),
        ],
        acked_features: VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ,
        // MQ (0), REPLY_ACK (3), CONFIG (9), INFLIGHT_SHMFD (12).
        acked_protocol_features: Some(1 << 0 | 1 << 3 | 1 << 9 | 1 << 12),
        config,
        device_state: b"blk:v1:image".to_vec(),
        in_flight: vec![
            InflightRecord {
                queue: 0,
                head: 12,
                order: 0,
            },
            InflightRecord {
                queue: 0,
                head: 40,
                order: 1,
            },
            InflightRecord {
                queue: 0,
                head: 7,
                order: 2,
            },
        ],
    }
}

/// What the reference file of format `version` holds, in the current model:
/// the reference state less what that version cannot carry.
fn expected(version: u16) -> DeviceSnapshot {
    let mut s = reference();
    if version < 2 {
        s.in_flight.clear();
    }
    s
}

/// The limits of the device the reference state was taken from.
fn reference_limits() -> SnapshotLimits {
    SnapshotLimits {
        device_type: 2,
        num_queues: 3,
        max_queue_size: 256,
        offered_features: reference().acked_features | 1 << 5, // and RO, not acked
        offered_protocol_features: 0xffff,
        config_size: 60,
        max_device_state: 1 << 20,
    }
}

fn snapshots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots")
}

fn version_dir(version: u16) -> PathBuf {
    snapshots_dir().join(format!("v{version}"))
}

fn bless() -> bool {
    std::env::var_os("VBK_BLESS").is_some_and(|v| v == "1")
}

/// Write the folder of `version` if it does not exist and blessing was
/// asked for. Existing folders are never written.
fn bless_missing(version: u16) {
    let dir = version_dir(version);
    if dir.exists() || !bless() {
        return;
    }
    let bytes = encode_version(&expected(version), version).expect("encode reference");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(REFERENCE), bytes).unwrap();
    eprintln!("blessed new golden folder {}", dir.display());
}

/// Every `.snap` file of a version folder.
fn golden_files(version: u16) -> Vec<PathBuf> {
    let dir = version_dir(version);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "snap"))
        .collect();
    files.sort();
    files
}

#[test]
fn reference_state_is_valid() {
    let v = ValidatedSnapshot::new(reference(), &reference_limits()).unwrap();
    assert_eq!(v.in_flight_heads(0), vec![12, 40, 7]);
    assert_eq!(v.queue_states().count(), 2);
}

#[test]
fn folders_are_one_per_version_and_append_only() {
    for version in OLDEST_FORMAT_VERSION..=CURRENT_FORMAT_VERSION {
        bless_missing(version);
        let dir = version_dir(version);
        assert!(
            dir.join(REFERENCE).is_file(),
            "{} is missing: every format version keeps its golden folder \
             (after a version bump, create the new one with VBK_BLESS=1)",
            dir.join(REFERENCE).display()
        );
    }
    for entry in std::fs::read_dir(snapshots_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(v) = name.strip_prefix('v').and_then(|v| v.parse::<u16>().ok()) {
            assert!(
                (OLDEST_FORMAT_VERSION..=CURRENT_FORMAT_VERSION).contains(&v),
                "snapshots/{name} is a version this build does not know"
            );
        }
    }
}

#[test]
fn every_golden_file_decodes_and_round_trips_through_the_newest_version() {
    for version in OLDEST_FORMAT_VERSION..=CURRENT_FORMAT_VERSION {
        bless_missing(version);
        let files = golden_files(version);
        assert!(!files.is_empty(), "no golden file for version {version}");
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            let header = parse_header(&bytes).unwrap();
            assert_eq!(header.version, version, "{}", path.display());
            let old = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let newest = encode(&old).unwrap();
            assert_eq!(
                parse_header(&newest).unwrap().version,
                CURRENT_FORMAT_VERSION
            );
            let again = decode(&newest).unwrap();
            assert_eq!(again, old, "{}", path.display());
            // Old state still restores: it passes validation.
            if path.file_name().unwrap() == REFERENCE {
                assert_eq!(old, expected(version), "{}", path.display());
                ValidatedSnapshot::new(old, &reference_limits()).unwrap();
            }
        }
    }
}

#[test]
fn version_1_reference_upgrades_without_in_flight_records() {
    bless_missing(1);
    let bytes = std::fs::read(version_dir(1).join(REFERENCE)).unwrap();
    let upgraded = decode(&bytes).unwrap();
    assert!(upgraded.in_flight.is_empty());
    let mut newest = reference();
    newest.in_flight.clear();
    assert_eq!(upgraded, newest);
}

#[test]
fn reference_state_reproduces_the_golden_files_byte_for_byte() {
    for version in OLDEST_FORMAT_VERSION..=CURRENT_FORMAT_VERSION {
        bless_missing(version);
        let path = version_dir(version).join(REFERENCE);
        let golden = std::fs::read(&path).unwrap();
        let bytes = encode_version(&expected(version), version).unwrap();
        assert!(
            bytes == golden,
            "{} no longer matches what this build writes for format version {version}.\n\
             Golden files are frozen: if the payload schema changed on purpose, keep the \
             old structs in a frozen module, bump CURRENT_FORMAT_VERSION and bless the new \
             folder; never rewrite an existing one.",
            path.display()
        );
    }
    assert_eq!(
        encode(&reference()).unwrap(),
        std::fs::read(version_dir(CURRENT_FORMAT_VERSION).join(REFERENCE)).unwrap()
    );
}
