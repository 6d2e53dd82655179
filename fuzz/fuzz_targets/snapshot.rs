// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Snapshot bytes from a file or a migration stream, untrusted: the
//! envelope (every format version), validation against a device's limits,
//! and the restore into a `DeviceCore`. Nothing may panic, and what decodes
//! must encode and decode back to the same snapshot.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;

use common::{FuzzDevice, Shape};
use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::core::DeviceCore;
use virtio_backend_kit::snapshot::{self, SnapshotLimits, ValidatedSnapshot};

/// The device of the golden files in `snapshots/` (a virtio-blk shape:
/// type 2, 3 queues of up to 256, 60 bytes of config), keeping whatever
/// private state it is given.
const SHAPE: Shape = Shape {
    device_type: 2,
    queues: 3,
    max_queue_size: 256,
    features: u64::MAX >> 2,
    config_size: 60,
    max_state: usize::MAX,
};

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = snapshot::decode(data) else {
        return;
    };
    // What decodes, encodes; and decodes back to the same thing.
    let bytes = snapshot::encode(&snap).expect("a decoded snapshot encodes");
    let again = snapshot::decode(&bytes).expect("an encoded snapshot decodes");
    assert_eq!(snap, again, "decode(encode(s)) != s");

    let backend = Arc::new(FuzzDevice::new(SHAPE));
    let limits = SnapshotLimits::for_backend(&*backend, u64::MAX, u64::MAX);
    let Ok(valid) = ValidatedSnapshot::new(snap, &limits) else {
        return;
    };
    let _ = valid.queue_states().count();
    let Ok(mut core) = DeviceCore::new(backend) else {
        return;
    };
    let _ = core.restore_device_state(&valid);
});
