// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device the mmio, vhost-user session and snapshot targets run: its
//! identity is a [`Shape`]; its queues write one byte (the last one they
//! read) into every writable buffer, 64 chains a batch before deferring the
//! rest; it has a writable config space and keeps the state it is given.

use std::sync::Mutex;

use virtio_backend_kit::vm_memory::Bytes;
use virtio_backend_kit::{BackendError, DeviceBackend, Vring, VringOwned};

/// What the device says it is.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub device_type: u32,
    pub queues: usize,
    pub max_queue_size: u16,
    pub features: u64,
    pub config_size: usize,
    /// Largest own state `restore_state` accepts.
    pub max_state: usize,
}

/// See the module documentation.
pub struct FuzzDevice {
    shape: Shape,
    config: Mutex<Vec<u8>>,
    state: Mutex<Vec<u8>>,
}

impl FuzzDevice {
    pub fn new(shape: Shape) -> Self {
        FuzzDevice {
            shape,
            config: Mutex::new(vec![0; shape.config_size]),
            state: Mutex::new(Vec::new()),
        }
    }
}

impl DeviceBackend for FuzzDevice {
    type Vring = VringOwned;
    fn device_type(&self) -> u32 {
        self.shape.device_type
    }
    fn num_queues(&self) -> usize {
        self.shape.queues
    }
    fn max_queue_size(&self) -> u16 {
        self.shape.max_queue_size
    }
    fn features(&self) -> u64 {
        self.shape.features
    }
    fn config_size(&self) -> usize {
        self.shape.config_size
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let config = self.config.lock().map(|c| c.clone()).unwrap_or_default();
        let start = (offset as usize).min(config.len());
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), BackendError> {
        let mut config = self.config.lock().map_err(|_| "poisoned")?;
        let start = (offset as usize).min(config.len());
        let n = data.len().min(config.len() - start);
        config[start..start + n].copy_from_slice(&data[..n]);
        Ok(())
    }
    fn process_queue(&self, _index: u16, vring: &mut Vring) -> Result<(), BackendError> {
        let mem = vring.memory();
        let mut served = 0;
        while let Some(chain) = vring.pop_chain()? {
            let head = chain.head_index();
            let mut byte = [0u8; 1];
            let mut written = 0u32;
            for desc in chain {
                if desc.is_write_only() {
                    if mem.write_slice(&byte, desc.addr()).is_ok() {
                        written += 1;
                    }
                } else {
                    let _ = mem.read_slice(&mut byte, desc.addr());
                }
            }
            vring.add_used(head, written)?;
            served += 1;
            if served == 64 {
                vring.defer();
                break;
            }
        }
        vring.notify_if_needed()?;
        Ok(())
    }
    fn save_state(&self) -> Result<Vec<u8>, BackendError> {
        Ok(self.state.lock().map(|s| s.clone()).unwrap_or_default())
    }
    fn restore_state(&self, data: &[u8]) -> Result<(), BackendError> {
        if data.len() > self.shape.max_state {
            return Err("device state too large".into());
        }
        *self.state.lock().map_err(|_| "poisoned")? = data.to_vec();
        Ok(())
    }
}
