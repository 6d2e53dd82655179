// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Snapshot bytes from a file or a migration stream, untrusted: the
//! envelope (every format version), validation against a device's limits,
//! and the restore into a `DeviceCore`. Nothing may panic, and what decodes
//! must encode and decode back to the same snapshot.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_backend_kit::core::DeviceCore;
use virtio_backend_kit::snapshot::{self, SnapshotLimits, ValidatedSnapshot};
use virtio_backend_kit::{BackendError, DeviceBackend, DeviceEvent, QueueSet, VringOwned};

/// The device of the golden files in `snapshots/` (a virtio-blk shape:
/// type 2, 3 queues of up to 256, 60 bytes of config), keeping whatever
/// private state it is given.
#[derive(Default)]
struct Device {
    state: Mutex<Vec<u8>>,
}

impl DeviceBackend for Device {
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
        u64::MAX >> 2
    }
    fn config_size(&self) -> usize {
        60
    }
    fn handle_event(
        &self,
        _event: DeviceEvent,
        _queues: &QueueSet<VringOwned>,
        _worker: usize,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, BackendError> {
        Ok(self.state.lock().map(|s| s.clone()).unwrap_or_default())
    }
    fn restore_state(&self, data: &[u8]) -> Result<(), BackendError> {
        if let Ok(mut s) = self.state.lock() {
            *s = data.to_vec();
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = snapshot::decode(data) else {
        return;
    };
    // What decodes, encodes; and decodes back to the same thing.
    let bytes = snapshot::encode(&snap).expect("a decoded snapshot encodes");
    let again = snapshot::decode(&bytes).expect("an encoded snapshot decodes");
    assert_eq!(snap, again, "decode(encode(s)) != s");

    let backend = Arc::new(Device::default());
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
