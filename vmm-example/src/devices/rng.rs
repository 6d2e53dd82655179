// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A virtio-rng device (device ID 4): one request queue whose
//! device-writable buffers are filled with entropy from the host's
//! `getrandom(2)`.
//!
//! It exists to show that the kit's [`DeviceBackend`] trait is not shaped
//! after block devices: the same type runs in-process in `vmm-example` and
//! out of process in the `vhost-user-rng` daemon.

use log::warn;
use virtio_backend_kit::vm_memory::Bytes;
use virtio_backend_kit::{BackendError, DeviceBackend, Vring, VringOwned};

/// Virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Entropy handed out per descriptor at most; larger buffers get a short
/// fill, which the driver accepts (the used length says how much).
const MAX_FILL: usize = 4096;

/// Errors of the rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// The host's entropy source failed.
    #[error("getrandom failed: {0}")]
    Entropy(getrandom::Error),
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct RngDevice {
    queue_size: u16,
}

impl RngDevice {
    /// A device offering queues of up to `queue_size` entries.
    pub fn new(queue_size: u16) -> Result<Self, RngError> {
        if !super::valid_queue_size(queue_size) {
            return Err(RngError::QueueSize(queue_size));
        }
        Ok(RngDevice { queue_size })
    }
}

impl Default for RngDevice {
    fn default() -> Self {
        RngDevice { queue_size: 256 }
    }
}

impl DeviceBackend for RngDevice {
    type Vring = VringOwned;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn process_queue(&self, _index: u16, vring: &mut Vring) -> Result<(), BackendError> {
        let mem = vring.memory();
        let mut buf = [0u8; MAX_FILL];
        while let Some(chain) = vring.pop_chain()? {
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                // The guest picks the length: bound it, never allocate by it.
                let len = (desc.len() as usize).min(MAX_FILL);
                getrandom::fill(&mut buf[..len]).map_err(RngError::Entropy)?;
                if let Err(e) = mem.write_slice(&buf[..len], desc.addr()) {
                    warn!("virtio-rng: chain {head}: bad buffer: {e}");
                    break;
                }
                written = written.saturating_add(len as u32);
            }
            vring.add_used(head, written)?;
        }
        vring.notify_if_needed()?;
        Ok(())
    }
}
