// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-mmio register offsets and values (virtio 1.x, section 4.2.2).

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported by the kit's devices ("VBK").
pub const MMIO_VENDOR_ID: u32 = 0x004b_4256;
/// Size of one device window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// MagicValue (R).
pub const MAGIC_VALUE: u64 = 0x000;
/// Version (R).
pub const VERSION: u64 = 0x004;
/// DeviceID (R).
pub const DEVICE_ID: u64 = 0x008;
/// VendorID (R).
pub const VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures (R).
pub const DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel (W).
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures (W).
pub const DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel (W).
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel (W).
pub const QUEUE_SEL: u64 = 0x030;
/// QueueNumMax (R).
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum (W).
pub const QUEUE_NUM: u64 = 0x038;
/// QueueReady (RW).
pub const QUEUE_READY: u64 = 0x044;
/// QueueNotify (W).
pub const QUEUE_NOTIFY: u64 = 0x050;
/// Offset of QueueNotify, where ioeventfds go.
pub const QUEUE_NOTIFY_OFFSET: u64 = QUEUE_NOTIFY;
/// InterruptStatus (R).
pub const INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK (W).
pub const INTERRUPT_ACK: u64 = 0x064;
/// Status (RW).
pub const STATUS: u64 = 0x070;
/// QueueDescLow (W).
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh (W).
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (W), the available ring.
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh (W).
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (W), the used ring.
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh (W).
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// SHMLenLow (R): no shared memory region is reported as all ones.
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// SHMLenHigh (R).
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// ConfigGeneration (R).
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device config space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Status: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Status: feature negotiation is done.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Status: the driver gave up.
pub const STATUS_FAILED: u32 = 0x80;

/// `VIRTIO_F_VERSION_1`, mandatory for register layout version 2.
pub use crate::features::VIRTIO_F_VERSION_1;
