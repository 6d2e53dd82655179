//! Reference virtio device backends.
//!
//! - [`blk`]: a virtio-blk device (device ID 2) serving a raw image file or a
//!   null target, see [`BlkDevice`].

pub mod blk;

pub use blk::{BlkConfig, BlkDevice, BlkError, Target};
