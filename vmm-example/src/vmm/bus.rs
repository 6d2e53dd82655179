// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Address-range buses (one for MMIO, one for port I/O) and the small
//! platform devices on them: power-off and reset.
//!
//! A vCPU exit names an address; the bus finds the device whose range
//! holds it and calls it with the offset into that range. Nothing matched:
//! reads see all ones (an absent device), writes vanish.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use log::{debug, info};
use virtio_backend_kit::mmio::MmioTransport;

use super::acpi::S5_SLEEP_TYPE;
use super::{ExitReason, ExitSignal};

/// A device on a bus.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// A device shared between the bus and whoever else needs it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// Non-overlapping address ranges, each with its device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.iter().map(|(base, (len, _))| (*base, *len));
        f.debug_struct("Bus")
            .field("ranges", &ranges.collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let overlap = |(&b, (l, _)): (&u64, &(u64, SharedDevice))| b < base + len && base < b + l;
        if len == 0 || self.ranges.iter().any(overlap) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (size, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + len as u64 <= *size).then_some((offset, dev))
    }

    /// Dispatch a read; `false` when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write; `false` when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a panicked holder (a device's state is
/// still the best we have; the VMM must not cascade the panic).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// ACPI's sleep control (offset 0) and sleep status (offset 1) registers of
/// a hardware-reduced platform. Entering S5 ends the VMM.
#[derive(Debug)]
pub struct PowerDevice {
    exit: Arc<ExitSignal>,
}

impl PowerDevice {
    /// `SLP_EN` in the sleep control register.
    const SLP_EN: u8 = 1 << 5;

    /// A power device that reports power-off on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        PowerDevice { exit }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken", nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        let sleep_type = (value >> 2) & 0x7;
        if value & Self::SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            info!("guest powered off (ACPI S5)");
            self.exit.signal(ExitReason::PowerOff);
        } else {
            debug!("ignored sleep control write {value:#x}");
        }
    }
}

/// A one-byte register that resets the machine when `value` is written:
/// the FADT reset register and the i8042 command port.
#[derive(Debug)]
pub struct ResetDevice {
    value: u8,
    exit: Arc<ExitSignal>,
}

impl ResetDevice {
    /// A reset register triggered by `value`.
    pub fn new(value: u8, exit: Arc<ExitSignal>) -> Self {
        ResetDevice { value, exit }
    }
}

impl BusDevice for ResetDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // For the i8042: status "output buffer empty, input buffer empty".
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&self.value) {
            info!("guest asked for a reset");
            self.exit.signal(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Echo(7))))
            .unwrap();
        assert!(bus.insert(0x10f, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b, [3]);
        assert!(bus.write(0x115, &[9]));
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b, [9]);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b, [0xff]);
        let mut wide = [0u8; 4];
        assert!(
            !bus.read(0x11e, &mut wide),
            "an access crossing the end is unclaimed"
        );
    }

    #[test]
    fn s5_write_signals_power_off() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut power = PowerDevice::new(exit.clone());
        power.write(0, &[(3 << 2) | PowerDevice::SLP_EN]);
        assert_eq!(exit.reason(), None);
        power.write(0, &[(S5_SLEEP_TYPE << 2) | PowerDevice::SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }
}
