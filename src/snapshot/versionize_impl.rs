// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `versionize::Versionize` for [`DeviceSnapshot`], behind the `versionize`
//! cargo feature, for VMMs that still embed device state in versionize
//! snapshots.
//!
//! The versionize stream carries this module's own envelope verbatim
//! (magic, format version, payload, CRC-64): the snapshot keeps its own
//! versioning, every format version stays readable through `versionize`
//! exactly as through [`read_from`], and no field is laid out by bincode.
//! The `VersionMap` and the versionize app version are therefore not
//! consulted, and [`Versionize::version`] stays 1.

use std::io::{Read, Write};

use versionize::{VersionMap, Versionize, VersionizeError, VersionizeResult};

use super::{read_from, write_to, DeviceSnapshot};

impl Versionize for DeviceSnapshot {
    fn serialize<W: Write>(
        &self,
        writer: &mut W,
        _version_map: &VersionMap,
        _target_version: u16,
    ) -> VersionizeResult<()> {
        write_to(self, writer).map_err(|e| VersionizeError::Serialize(crate::error_chain(&e)))
    }

    fn deserialize<R: Read>(
        reader: &mut R,
        _version_map: &VersionMap,
        _source_version: u16,
    ) -> VersionizeResult<Self> {
        read_from(reader).map_err(|e| VersionizeError::Deserialize(crate::error_chain(&e)))
    }

    fn version() -> u16 {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{InflightRecord, VringSnapshot};

    fn sample() -> DeviceSnapshot {
        DeviceSnapshot {
            device_type: 2,
            queues: vec![VringSnapshot {
                size: 128,
                ready: true,
                enabled: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
                next_avail: 7,
                next_used: 5,
                event_idx: false,
                signalled_used: Some(5),
            }],
            acked_features: 1 << 32,
            acked_protocol_features: Some(0x3),
            config: vec![1, 2, 3, 4],
            device_state: b"state".to_vec(),
            in_flight: vec![
                InflightRecord {
                    queue: 0,
                    head: 9,
                    order: 0,
                },
                InflightRecord {
                    queue: 0,
                    head: 3,
                    order: 1,
                },
            ],
        }
    }

    #[test]
    fn versionize_round_trip() {
        let map = VersionMap::new();
        let s = sample();
        let mut buf = Vec::new();
        Versionize::serialize(&s, &mut buf, &map, 1).unwrap();
        // The stream is exactly our envelope.
        assert_eq!(buf, crate::snapshot::encode(&s).unwrap());
        // Embedded between other versionize fields, it reads back exactly.
        let mut stream = Vec::new();
        Versionize::serialize(&0xdead_beef_u32, &mut stream, &map, 1).unwrap();
        Versionize::serialize(&s, &mut stream, &map, 1).unwrap();
        Versionize::serialize(&42u64, &mut stream, &map, 1).unwrap();
        let mut r = stream.as_slice();
        let a = <u32 as Versionize>::deserialize(&mut r, &map, 1).unwrap();
        let back = <DeviceSnapshot as Versionize>::deserialize(&mut r, &map, 1).unwrap();
        let b = <u64 as Versionize>::deserialize(&mut r, &map, 1).unwrap();
        assert_eq!((a, b), (0xdead_beef, 42));
        assert_eq!(back, s);
        assert!(r.is_empty());
    }

    #[test]
    fn versionize_reads_version_1_and_refuses_corruption() {
        let map = VersionMap::new();
        let mut s = sample();
        s.in_flight.clear();
        let old = crate::snapshot::encode_version(&s, 1).unwrap();
        let back = <DeviceSnapshot as Versionize>::deserialize(&mut old.as_slice(), &map, 1);
        assert_eq!(back.unwrap(), s);

        let mut bad = old.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let err =
            <DeviceSnapshot as Versionize>::deserialize(&mut bad.as_slice(), &map, 1).unwrap_err();
        assert!(
            matches!(&err, VersionizeError::Deserialize(m) if m.contains("checksum")),
            "{err}"
        );
    }
}
