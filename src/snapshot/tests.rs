// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Envelope and validation tests: every corruption refused, every old
//! version read, arbitrary valid snapshots round-tripped, random input never
//! panicking.

use proptest::prelude::*;

use super::*;

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;

fn queue(size: u16, base: u64) -> VringSnapshot {
    VringSnapshot {
        size,
        ready: true,
        enabled: true,
        desc_table: base,
        avail_ring: base + 0x1000,
        used_ring: base + 0x2000,
        next_avail: 10,
        next_used: 7,
        event_idx: true,
        signalled_used: Some(6),
    }
}

fn sample() -> DeviceSnapshot {
    DeviceSnapshot {
        device_type: 2,
        queues: vec![
            queue(256, 0x10_0000),
            queue(256, 0x20_0000),
            VringSnapshot::default(),
        ],
        acked_features: VERSION_1 | EVENT_IDX,
        acked_protocol_features: Some(0x8003),
        config: (0..60).collect(),
        device_state: b"blk state".to_vec(),
        in_flight: vec![
            InflightRecord {
                queue: 0,
                head: 17,
                order: 1,
            },
            InflightRecord {
                queue: 0,
                head: 4,
                order: 0,
            },
            InflightRecord {
                queue: 1,
                head: 255,
                order: 0,
            },
        ],
    }
}

fn limits() -> SnapshotLimits {
    SnapshotLimits {
        device_type: 2,
        num_queues: 4,
        max_queue_size: 256,
        offered_features: VERSION_1 | EVENT_IDX | (1 << 30) | 0xff,
        offered_protocol_features: 0xffff,
        config_size: 60,
        max_device_state: 4096,
    }
}

/// Build an envelope by hand, with a correct checksum.
fn seal_raw(version: u16, encoding: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&encoding.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Recompute the checksum of a (possibly edited) envelope.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return;
    }
    let end = bytes.len() - TRAILER_LEN;
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&bytes[..end]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn crc_is_crc64_xz() {
    // The standard check value of CRC-64/XZ, so other tools can verify files.
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
    assert_eq!(crc.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
}

#[test]
fn envelope_layout() {
    let s = sample();
    let bytes = encode(&s).unwrap();
    assert_eq!(&bytes[..8], b"\x89VBKSNP\n");
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        CURRENT_FORMAT_VERSION
    );
    assert_eq!(
        u16::from_le_bytes([bytes[10], bytes[11]]),
        Encoding::Json.id()
    );
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), HEADER_LEN + len + TRAILER_LEN);
    let payload = std::str::from_utf8(&bytes[HEADER_LEN..HEADER_LEN + len]).unwrap();
    assert!(
        payload.starts_with(r#"{"device_type":2,"queues":[{"size":256,"#),
        "{payload}"
    );
    assert!(
        payload.contains(r#""device_state":"626c6b207374617465""#),
        "{payload}"
    );
    assert_eq!(bytes, seal_raw(2, 1, payload.as_bytes()));
    let header = parse_header(&bytes).unwrap();
    assert_eq!(
        header,
        EnvelopeHeader {
            version: 2,
            encoding: 1,
            payload_len: len as u32
        }
    );
}

#[test]
fn round_trip_and_deterministic() {
    let s = sample();
    let a = encode(&s).unwrap();
    let b = encode(&s.clone()).unwrap();
    assert_eq!(a, b);
    assert_eq!(decode(&a).unwrap(), s);
    assert_eq!(encode(&decode(&a).unwrap()).unwrap(), a);
    assert_eq!(
        decode(&encode(&DeviceSnapshot::default()).unwrap()).unwrap(),
        DeviceSnapshot::default()
    );
}

#[test]
fn every_changed_byte_is_refused() {
    let bytes = encode(&sample()).unwrap();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[i] ^= mask;
            let err = decode(&bad).expect_err(&format!("byte {i} ^ {mask:#x} accepted"));
            let expected = match i {
                0..8 => matches!(err, SnapshotError::BadMagic { .. }),
                8..10 => matches!(
                    err,
                    SnapshotError::NewerVersion { .. }
                        | SnapshotError::UnsupportedVersion { .. }
                        | SnapshotError::Checksum { .. }
                ),
                12..16 => matches!(
                    err,
                    SnapshotError::TooLarge { .. }
                        | SnapshotError::Truncated { .. }
                        | SnapshotError::TrailingBytes { .. }
                ),
                _ => matches!(err, SnapshotError::Checksum { .. }),
            };
            assert!(expected, "byte {i} ^ {mask:#x}: unexpected error {err:?}");
            // The stream reader agrees.
            assert!(
                read_from(&mut bad.as_slice()).is_err(),
                "byte {i} ^ {mask:#x}"
            );
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let bytes = encode(&sample()).unwrap();
    for len in 0..bytes.len() {
        let err = decode(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Truncated { found, .. } if found == len as u64),
            "length {len}: {err:?}"
        );
        let err = read_from(&mut &bytes[..len]).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Truncated { found, .. } if found == len as u64),
            "stream length {len}: {err:?}"
        );
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = encode(&sample()).unwrap();
    bytes.push(0);
    assert!(matches!(
        decode(&bytes),
        Err(SnapshotError::TrailingBytes { extra: 1 })
    ));
}

#[test]
fn wrong_magic_is_refused() {
    let mut bytes = encode(&sample()).unwrap();
    bytes[..8].copy_from_slice(b"VBKSNAP\0");
    reseal(&mut bytes);
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, SnapshotError::BadMagic { found } if &found == b"VBKSNAP\0"));
    assert!(err.to_string().contains("not a device snapshot"), "{err}");
    // Plain text, an empty file.
    assert!(matches!(
        decode(b"{\"device_type\":2} and more text"),
        Err(SnapshotError::BadMagic { .. })
    ));
    assert!(matches!(
        decode(b""),
        Err(SnapshotError::Truncated {
            expected: 16,
            found: 0
        })
    ));
}

#[test]
fn future_and_unknown_versions_are_refused() {
    let payload = serde_json::to_vec(&sample()).unwrap();
    for version in [CURRENT_FORMAT_VERSION + 1, 100, u16::MAX] {
        let err = decode(&seal_raw(version, 1, &payload)).unwrap_err();
        assert!(
            matches!(err, SnapshotError::NewerVersion { found, newest } if found == version && newest == CURRENT_FORMAT_VERSION),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer"), "{err}");
    }
    let err = decode(&seal_raw(0, 1, &payload)).unwrap_err();
    assert!(
        matches!(err, SnapshotError::UnsupportedVersion { found: 0 }),
        "{err:?}"
    );
}

#[test]
fn unknown_encoding_is_refused() {
    let payload = serde_json::to_vec(&sample()).unwrap();
    for encoding in [0u16, 2, 0xffff] {
        let err = decode(&seal_raw(2, encoding, &payload)).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnknownEncoding(e) if e == encoding),
            "{err:?}"
        );
    }
}

#[test]
fn length_over_the_cap_is_refused_before_reading() {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&2u16.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
    let err = decode(&header).unwrap_err();
    assert!(
        matches!(err, SnapshotError::TooLarge { len, max } if len == u64::from(MAX_PAYLOAD_LEN) + 1 && max == MAX_PAYLOAD_LEN),
        "{err:?}"
    );
    // A stream that would go on forever is not read past the header.
    let mut endless = std::io::Read::chain(header.as_slice(), std::io::repeat(0));
    assert!(matches!(
        read_from(&mut endless),
        Err(SnapshotError::TooLarge { .. })
    ));
    // At the cap exactly, a short stream is truncated, not trusted.
    let mut at_cap = header.clone();
    at_cap[12..16].copy_from_slice(&MAX_PAYLOAD_LEN.to_le_bytes());
    at_cap.extend_from_slice(b"{}");
    assert!(matches!(
        decode(&at_cap),
        Err(SnapshotError::Truncated { .. })
    ));
    assert!(matches!(
        read_from(&mut at_cap.as_slice()),
        Err(SnapshotError::Truncated { .. })
    ));
}

#[test]
fn oversized_snapshot_is_not_written() {
    let mut s = sample();
    s.device_state = vec![0; MAX_PAYLOAD_LEN as usize / 2 + 1];
    assert!(matches!(encode(&s), Err(SnapshotError::TooLarge { .. })));
    assert!(matches!(
        write_to(&s, &mut Vec::new()),
        Err(SnapshotError::TooLarge { .. })
    ));
}

#[test]
fn payload_that_does_not_match_its_version_is_refused() {
    let v2_payload = serde_json::to_vec(&sample()).unwrap();
    // A version-2 payload (with in-flight records) labelled version 1.
    let err = decode(&seal_raw(1, 1, &v2_payload)).unwrap_err();
    assert!(
        matches!(err, SnapshotError::Payload { version: 1, .. }),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err)
        .unwrap()
        .to_string()
        .contains("in_flight"));
    for payload in [
        &b""[..],
        b"null",
        b"[]",
        b"{}",
        b"{\"device_type\":2}",
        b"not json",
        br#"{"device_type":2,"queues":[],"acked_features":0,"acked_protocol_features":null,"config":"0","device_state":"","in_flight":[]}"#,
        br#"{"device_type":2,"queues":[],"acked_features":0,"acked_protocol_features":null,"config":"AB","device_state":"","in_flight":[]}"#,
        br#"{"device_type":2,"queues":[],"acked_features":0,"acked_protocol_features":null,"config":"","device_state":"","in_flight":[],"extra":1}"#,
        br#"{"device_type":-1,"queues":[],"acked_features":0,"acked_protocol_features":null,"config":"","device_state":"","in_flight":[]}"#,
        br#"{"device_type":2,"queues":[],"acked_features":18446744073709551616,"acked_protocol_features":null,"config":"","device_state":"","in_flight":[]}"#,
    ] {
        let err = decode(&seal_raw(2, 1, payload)).unwrap_err();
        assert!(matches!(err, SnapshotError::Payload { version: 2, .. }), "{err:?}");
    }
    // The smallest well-formed version-2 payload: in_flight may be absent.
    let minimal = br#"{"device_type":2,"queues":[],"acked_features":0,"acked_protocol_features":null,"config":"","device_state":""}"#;
    let s = decode(&seal_raw(2, 1, minimal)).unwrap();
    assert_eq!(
        s,
        DeviceSnapshot {
            device_type: 2,
            ..Default::default()
        }
    );
}

#[test]
fn version_1_upgrades_to_the_current_model() {
    let mut s = sample();
    s.in_flight.clear();
    let old = encode_version(&s, 1).unwrap();
    assert_eq!(parse_header(&old).unwrap().version, 1);
    let payload = std::str::from_utf8(&old[HEADER_LEN..old.len() - TRAILER_LEN]).unwrap();
    assert!(!payload.contains("in_flight"), "{payload}");
    let upgraded = decode(&old).unwrap();
    assert_eq!(upgraded, s);
    // Re-encoded as the newest version, it still reads back the same.
    let newest = encode(&upgraded).unwrap();
    assert_eq!(
        parse_header(&newest).unwrap().version,
        CURRENT_FORMAT_VERSION
    );
    assert_eq!(decode(&newest).unwrap(), s);
}

#[test]
fn older_versions_are_written_only_when_they_can_carry_the_state() {
    let err = encode_version(&sample(), 1).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::NotRepresentable {
                version: 1,
                source: v1::HasInflight(3)
            }
        ),
        "{err:?}"
    );
    for version in [0, CURRENT_FORMAT_VERSION + 1] {
        assert!(matches!(
            encode_version(&sample(), version),
            Err(SnapshotError::UnsupportedVersion { found }) if found == version
        ));
    }
}

#[test]
fn streams_hold_several_snapshots() {
    let a = sample();
    let mut b = sample();
    b.device_type = 4;
    b.in_flight.clear();
    let mut stream = Vec::new();
    write_to(&a, &mut stream).unwrap();
    stream.extend_from_slice(&encode_version(&b, 1).unwrap());
    stream.extend_from_slice(b"tail");
    let mut r = stream.as_slice();
    assert_eq!(read_from(&mut r).unwrap(), a);
    assert_eq!(read_from(&mut r).unwrap(), b);
    assert_eq!(r, b"tail");
}

#[test]
fn io_errors_are_reported() {
    struct Broken;
    impl std::io::Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(read_from(&mut Broken), Err(SnapshotError::Io(_))));
    assert!(matches!(
        write_to(&sample(), &mut Broken),
        Err(SnapshotError::Io(_))
    ));
}

// ---- validation -------------------------------------------------------

#[test]
fn sample_is_valid_and_converts_to_vring_states() {
    let v = ValidatedSnapshot::new(sample(), &limits()).unwrap();
    let states: Vec<_> = v.queue_states().collect();
    assert_eq!(states.len(), 2, "the unconfigured queue is left out");
    assert_eq!(states[0].0, 0);
    assert_eq!(states[0].1.size, 256);
    assert_eq!(states[1].1.next_avail, 10);
    assert_eq!(VringSnapshot::from(states[1].1), sample().queues[1]);
    assert_eq!(v.in_flight_heads(0), vec![4, 17]);
    assert_eq!(v.in_flight_heads(1), vec![255]);
    assert!(v.in_flight_heads(2).is_empty());
    let v2 = ValidatedSnapshot::try_from((sample(), &limits())).unwrap();
    assert_eq!(v, v2);
    assert_eq!(v.snapshot(), &sample());
    assert_eq!(v.into_inner(), sample());
}

fn refused(edit: impl FnOnce(&mut DeviceSnapshot, &mut SnapshotLimits)) -> ValidationError {
    let mut s = sample();
    let mut l = limits();
    edit(&mut s, &mut l);
    ValidatedSnapshot::new(s, &l).unwrap_err()
}

#[test]
fn validation_refuses_what_does_not_fit_the_device() {
    use ValidationError as E;
    macro_rules! check {
        ($edit:expr, $pat:pat) => {{
            let err = refused($edit);
            assert!(matches!(err, $pat), "{err:?}");
            assert!(!err.to_string().is_empty());
        }};
    }
    check!(
        |s, _| s.device_type = 4,
        E::DeviceType {
            expected: 2,
            found: 4
        }
    );
    check!(
        |_, l| l.num_queues = 2,
        E::TooManyQueues { found: 3, max: 2 }
    );
    check!(
        |s, l| {
            l.num_queues = usize::MAX;
            s.queues = vec![VringSnapshot::default(); MAX_QUEUES + 1];
            s.in_flight.clear();
        },
        E::TooManyQueues {
            max: MAX_QUEUES,
            ..
        }
    );
    check!(
        |s, _| s.acked_features |= 1 << 40,
        E::UnofferedFeatures(0x100_0000_0000)
    );
    check!(
        |s, _| s.acked_protocol_features = Some(1 << 20),
        E::UnofferedProtocolFeatures(0x10_0000)
    );
    check!(
        |s, _| s.config.push(0),
        E::ConfigTooLong { len: 61, max: 60 }
    );
    check!(
        |s, l| {
            l.config_size = usize::MAX;
            s.config = vec![0; MAX_CONFIG_LEN + 1];
        },
        E::ConfigTooLong {
            max: MAX_CONFIG_LEN,
            ..
        }
    );
    check!(
        |s, l| {
            l.max_device_state = 4;
            s.device_state = vec![0; 5];
        },
        E::DeviceStateTooLong { len: 5, max: 4 }
    );
    check!(
        |s, _| s.queues[1].size = 512,
        E::QueueSize {
            queue: 1,
            size: 512,
            max: 256
        }
    );
    check!(
        |s, _| s.queues[1].size = 100,
        E::QueueSize {
            queue: 1,
            size: 100,
            ..
        }
    );
    check!(
        |s, l| {
            l.max_queue_size = u16::MAX;
            s.queues[1].size = 65535;
        },
        E::QueueSize {
            max: MAX_QUEUE_SIZE,
            ..
        }
    );
    check!(
        |s, _| s.queues[2].ready = true,
        E::UnconfiguredReady { queue: 2 }
    );
    check!(
        |s, _| s.queues[0].desc_table += 8,
        E::Alignment {
            queue: 0,
            ring: "descriptor table",
            ..
        }
    );
    check!(
        |s, _| s.queues[0].avail_ring += 1,
        E::Alignment {
            queue: 0,
            ring: "available ring",
            ..
        }
    );
    check!(
        |s, _| s.queues[0].used_ring += 2,
        E::Alignment {
            queue: 0,
            ring: "used ring",
            ..
        }
    );
    check!(
        |s, _| s.queues[0].used_ring = u64::MAX - 3,
        E::RingOverflow {
            queue: 0,
            ring: "used ring"
        }
    );
    check!(
        |s, _| s.queues[0].desc_table = u64::MAX - 15,
        E::RingOverflow {
            queue: 0,
            ring: "descriptor table"
        }
    );
    check!(
        |s, _| s.acked_features &= !EVENT_IDX,
        E::EventIdxNotNegotiated { queue: 0 }
    );
    check!(
        |s, _| s.queues[1].next_used = 11,
        E::Outstanding {
            queue: 1,
            outstanding: 65535,
            size: 256
        }
    );
    check!(
        |s, _| s.in_flight[0].queue = 2,
        E::InflightQueue { queue: 2 }
    );
    check!(
        |s, _| s.in_flight[0].queue = 9,
        E::InflightQueue { queue: 9 }
    );
    check!(
        |s, _| s.in_flight[2].head = 256,
        E::InflightHead {
            queue: 1,
            head: 256,
            size: 256
        }
    );
    check!(
        |s, _| s.in_flight[1].head = 17,
        E::InflightDuplicateHead { queue: 0, head: 17 }
    );
    check!(
        |s, _| s.in_flight[1].order = 1,
        E::InflightDuplicateOrder { queue: 0, order: 1 }
    );
    check!(
        |s, _| {
            s.queues[1].next_avail = s.queues[1].next_used;
        },
        E::InflightCount {
            queue: 1,
            count: 1,
            outstanding: 0
        }
    );
}

#[test]
fn validation_accepts_edge_cases() {
    let l = limits();
    // Wrapping ring indices, an outstanding count equal to the size.
    let mut s = sample();
    s.queues[0].next_used = 65530;
    s.queues[0].next_avail = 65530u16.wrapping_add(256);
    s.validate(&l).unwrap();
    // Size-1 queues, rings at the very top of the address space.
    let mut s = sample();
    s.in_flight.retain(|r| r.queue == 0 && r.head == 4);
    s.in_flight[0].head = 0;
    s.queues[0] = VringSnapshot {
        size: 1,
        desc_table: u64::MAX - 47,
        avail_ring: u64::MAX - 7,
        used_ring: u64::MAX - 31,
        next_avail: 1,
        next_used: 0,
        ..s.queues[0]
    };
    s.validate(&l).unwrap();
    // No protocol features checked in process; an enabled queue of size 0.
    let mut s = sample();
    s.acked_protocol_features = Some(u64::MAX);
    s.queues[2].enabled = true;
    let l2 = SnapshotLimits {
        offered_protocol_features: u64::MAX,
        ..l
    };
    s.validate(&l2).unwrap();
    // An empty snapshot of a device.
    DeviceSnapshot {
        device_type: 2,
        ..Default::default()
    }
    .validate(&l)
    .unwrap();
}

#[test]
fn limits_from_a_backend() {
    use crate::backend::{DeviceBackend, DeviceEvent, QueueSet};
    use crate::vring::VringOwned;
    struct Dev;
    impl DeviceBackend for Dev {
        type Vring = VringOwned;
        fn device_type(&self) -> u32 {
            2
        }
        fn num_queues(&self) -> usize {
            3
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            VERSION_1 | EVENT_IDX
        }
        fn config_size(&self) -> usize {
            60
        }
        fn handle_event(
            &self,
            _: DeviceEvent,
            _: &QueueSet<VringOwned>,
            _: usize,
        ) -> Result<(), crate::BackendError> {
            Ok(())
        }
    }
    let l = SnapshotLimits::for_backend(&Dev, 1 << 30, 0xffff);
    assert_eq!(l.offered_features, VERSION_1 | EVENT_IDX | 1 << 30);
    assert_eq!(
        (l.num_queues, l.max_queue_size, l.config_size),
        (3, 256, 60)
    );
    ValidatedSnapshot::new(sample(), &l).unwrap();
}

// ---- properties -------------------------------------------------------

const OFFERED: u64 = VERSION_1 | EVENT_IDX | 0xffff;

/// One configured queue with its in-flight records, consistent with each
/// other, or an unconfigured one.
fn arb_queue(
    index: u16,
    acked: u64,
) -> impl Strategy<Value = (VringSnapshot, Vec<InflightRecord>)> {
    let unconfigured =
        (any::<bool>(), any::<u64>(), any::<u16>()).prop_map(|(enabled, addr, idx)| {
            (
                VringSnapshot {
                    enabled,
                    desc_table: addr,
                    next_avail: idx,
                    ..Default::default()
                },
                Vec::new(),
            )
        });
    let configured = (0u32..=8, any::<u16>(), any::<bool>(), any::<bool>())
        .prop_flat_map(move |(log2, next_used, ready, enabled)| {
            let size = 1u16 << log2;
            (
                Just((size, next_used, ready, enabled)),
                0..=size,
                0u64..(1 << 44),
                0u64..(1 << 44),
                0u64..(1 << 44),
                any::<bool>(),
                any::<Option<u16>>(),
                any::<u64>(),
            )
        })
        .prop_flat_map(
            move |((size, next_used, ready, enabled), outstanding, d, a, u, ev, sig, base)| {
                let heads = proptest::sample::subsequence(
                    (0..size).collect::<Vec<u16>>(),
                    0..=usize::from(outstanding),
                )
                .prop_shuffle();
                let q = VringSnapshot {
                    size,
                    ready,
                    enabled,
                    desc_table: d * 16,
                    avail_ring: a * 2,
                    used_ring: u * 4,
                    next_avail: next_used.wrapping_add(outstanding),
                    next_used,
                    event_idx: ev && acked & EVENT_IDX != 0,
                    signalled_used: sig,
                };
                heads.prop_map(move |heads| {
                    let records = heads
                        .into_iter()
                        .enumerate()
                        .map(|(i, head)| InflightRecord {
                            queue: index,
                            head,
                            order: base.wrapping_add(i as u64),
                        })
                        .collect();
                    (q, records)
                })
            },
        );
    prop_oneof![1 => unconfigured, 3 => configured]
}

fn arb_valid_snapshot() -> impl Strategy<Value = DeviceSnapshot> {
    (any::<u64>(), 0usize..4)
        .prop_flat_map(|(features, nq)| {
            let acked = features & OFFERED;
            let queues: Vec<_> = (0..nq as u16).map(|i| arb_queue(i, acked)).collect();
            (
                Just(acked),
                queues,
                proptest::option::of(0u64..0x10000),
                proptest::collection::vec(any::<u8>(), 0..=64),
                proptest::collection::vec(any::<u8>(), 0..512),
            )
        })
        .prop_map(|(acked, queues, protocol, config, device_state)| {
            let mut in_flight: Vec<InflightRecord> =
                queues.iter().flat_map(|(_, r)| r.iter().copied()).collect();
            // Records of different queues interleave in a file.
            in_flight.sort_by_key(|r| (r.order, r.queue));
            DeviceSnapshot {
                device_type: 2,
                queues: queues.into_iter().map(|(q, _)| q).collect(),
                acked_features: acked,
                acked_protocol_features: protocol,
                config,
                device_state,
                in_flight,
            }
        })
}

fn prop_limits() -> SnapshotLimits {
    SnapshotLimits {
        device_type: 2,
        num_queues: 4,
        max_queue_size: 256,
        offered_features: OFFERED,
        offered_protocol_features: 0xffff,
        config_size: 64,
        max_device_state: 4096,
    }
}

fn arb_any_snapshot() -> impl Strategy<Value = DeviceSnapshot> {
    let vring = (
        any::<(u16, bool, bool, u64, u64, u64)>(),
        any::<(u16, u16, bool, Option<u16>)>(),
    )
        .prop_map(
            |((size, ready, enabled, d, a, u), (na, nu, ev, sig))| VringSnapshot {
                size,
                ready,
                enabled,
                desc_table: d,
                avail_ring: a,
                used_ring: u,
                next_avail: na,
                next_used: nu,
                event_idx: ev,
                signalled_used: sig,
            },
        );
    let record = any::<(u16, u16, u64)>().prop_map(|(queue, head, order)| InflightRecord {
        queue,
        head,
        order,
    });
    (
        any::<(u32, u64, Option<u64>)>(),
        proptest::collection::vec(vring, 0..5),
        proptest::collection::vec(any::<u8>(), 0..100),
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(record, 0..10),
    )
        .prop_map(
            |((device_type, acked, protocol), queues, config, device_state, in_flight)| {
                DeviceSnapshot {
                    device_type,
                    queues,
                    acked_features: acked,
                    acked_protocol_features: protocol,
                    config,
                    device_state,
                    in_flight,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_snapshots_round_trip(s in arb_valid_snapshot()) {
        let v = ValidatedSnapshot::new(s.clone(), &prop_limits());
        prop_assert!(v.is_ok(), "{:?}", v.unwrap_err());
        let bytes = encode(&s).unwrap();
        prop_assert_eq!(&encode(&s).unwrap(), &bytes);
        let back = decode(&bytes).unwrap();
        prop_assert_eq!(&back, &s);
        prop_assert!(back.validate(&prop_limits()).is_ok());
        let mut stream = Vec::new();
        write_to(&s, &mut stream).unwrap();
        prop_assert_eq!(read_from(&mut stream.as_slice()).unwrap(), s.clone());
        // Without in-flight records, version 1 carries it too.
        let mut no_inflight = s;
        no_inflight.in_flight.clear();
        let old = encode_version(&no_inflight, 1).unwrap();
        prop_assert_eq!(decode(&old).unwrap(), no_inflight);
    }

    #[test]
    fn any_snapshot_round_trips_and_validation_never_panics(s in arb_any_snapshot()) {
        let bytes = encode(&s).unwrap();
        prop_assert_eq!(decode(&bytes).unwrap(), s.clone());
        let _ = s.validate(&prop_limits());
        let _ = s.validate(&SnapshotLimits {
            num_queues: usize::MAX,
            max_queue_size: u16::MAX,
            offered_features: u64::MAX,
            config_size: usize::MAX,
            max_device_state: usize::MAX,
            ..prop_limits()
        });
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        prop_assert!(decode(&data).is_err());
        prop_assert!(read_from(&mut data.as_slice()).is_err());
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(
        version in 0u16..4,
        encoding in 0u16..3,
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let bytes = seal_raw(version, encoding, &payload);
        let _ = decode(&bytes);
        let _ = read_from(&mut bytes.as_slice());
    }

    /// Edits inside the payload with the checksum fixed up, so the JSON
    /// decoder and validation see hostile input.
    #[test]
    fn edited_payloads_never_panic(
        s in arb_valid_snapshot(),
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
        version in 1u16..=2,
    ) {
        let mut t = s;
        if version == 1 {
            t.in_flight.clear();
        }
        let mut bytes = encode_version(&t, version).unwrap();
        let payload_len = bytes.len() - HEADER_LEN - TRAILER_LEN;
        for (at, value) in edits {
            if payload_len > 0 {
                bytes[HEADER_LEN + at.index(payload_len)] = value;
            }
        }
        reseal(&mut bytes);
        if let Ok(d) = decode(&bytes) {
            let _ = d.validate(&prop_limits());
            // Whatever decoded re-encodes and decodes to the same value.
            prop_assert_eq!(decode(&encode(&d).unwrap()).unwrap(), d);
        }
    }
}
