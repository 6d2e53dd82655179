// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reference virtio device backends.
//!
//! - [`blk`]: a virtio-blk device (device ID 2) serving a raw image file or a
//!   null target, see [`BlkDevice`].
//! - [`rng`]: a virtio-rng device (device ID 4) fed by the host's
//!   `getrandom`, see [`RngDevice`].

pub mod blk;
pub mod console;
mod image_lock;
pub mod rng;

pub use blk::{BlkConfig, BlkDevice, BlkError, ImageOptions, Target};
pub use console::{ConsoleDevice, ConsoleError, VIRTIO_ID_CONSOLE};
pub use rng::{RngDevice, RngError};

/// Largest virtqueue size the split-ring layout allows.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Whether `size` is a queue size a device may offer: a power of two up to
/// [`MAX_QUEUE_SIZE`].
fn valid_queue_size(size: u16) -> bool {
    size.is_power_of_two() && size <= MAX_QUEUE_SIZE
}
