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
