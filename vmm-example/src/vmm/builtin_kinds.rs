// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The example's own device kinds, registered like any other
//! ([`super::registry::DeviceRegistry::with_builtin_kinds`]).

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use super::device_spec::DeviceOptions;
use super::devices::{in_process, DeviceError, Subscribers};
use super::registry::{BuildResult, DeviceKind, KindInfo};
use crate::devices::blk::VIRTIO_ID_BLOCK;
use crate::devices::rng::VIRTIO_ID_RNG;
use crate::devices::{BlkConfig, BlkDevice, ConsoleDevice, RngDevice, Target, VIRTIO_ID_CONSOLE};

/// Request queues of a disk (the guest spreads them over its vCPUs).
const DISK_QUEUES: u16 = 2;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

fn required(
    kind: &'static str,
    options: &DeviceOptions,
    key: &str,
) -> Result<PathBuf, DeviceError> {
    match options.get(key) {
        Some(v) if !v.is_empty() => Ok(v.into()),
        _ => Err(DeviceError::Option {
            kind,
            reason: format!("'{key}' is required"),
        }),
    }
}

/// virtio-blk on a raw image: `path=FILE`, `read-only=true`.
pub struct DiskKind;

impl DeviceKind for DiskKind {
    fn info(&self) -> KindInfo {
        KindInfo::new("disk", "virtio-blk", VIRTIO_ID_BLOCK, DISK_QUEUES.into())
            .with_options(&["path", "read-only"])
    }
    fn build(&self, options: &DeviceOptions, subscribers: &mut Subscribers) -> BuildResult {
        let path = required(self.info().name, options, "path")?;
        let read_only = options.flag("read-only");
        let disk_err = |e| DeviceError::Disk(path.clone(), e);
        let target = Target::open_image(&path, read_only).map_err(disk_err)?;
        let config = BlkConfig {
            queues: DISK_QUEUES,
            queue_size: QUEUE_SIZE,
            read_only,
            ..BlkConfig::default()
        };
        let device = BlkDevice::new(target, config).map_err(disk_err)?;
        Ok((in_process(device, subscribers)?, path.display().to_string()))
    }
}

/// virtio-rng from the host's getrandom; no options.
pub struct RngKind;

impl DeviceKind for RngKind {
    fn info(&self) -> KindInfo {
        KindInfo::new("rng", "virtio-rng", VIRTIO_ID_RNG, 1)
    }
    fn build(&self, _options: &DeviceOptions, subscribers: &mut Subscribers) -> BuildResult {
        let device = RngDevice::new(QUEUE_SIZE).map_err(DeviceError::Rng)?;
        Ok((in_process(device, subscribers)?, String::new()))
    }
}

/// A one-port virtio-console: guest output appended to `output=FILE`,
/// host input read from `input=FILE` (a file or a FIFO; none: no input).
/// Host input the guest has not taken yet is its state.
pub struct ConsoleKind;

impl DeviceKind for ConsoleKind {
    fn info(&self) -> KindInfo {
        KindInfo::new("console", "virtio-console", VIRTIO_ID_CONSOLE, 2)
            .stateful()
            .with_options(&["output", "input"])
    }
    fn build(&self, options: &DeviceOptions, subscribers: &mut Subscribers) -> BuildResult {
        let output = required(self.info().name, options, "output")?;
        let input_path: PathBuf = options.get("input").unwrap_or("/dev/null").into();
        let input = File::open(&input_path).map_err(|e| DeviceError::ConsoleFile(input_path, e))?;
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&output)
            .map_err(|e| DeviceError::ConsoleFile(output.clone(), e))?;
        let device = ConsoleDevice::new(input, out, QUEUE_SIZE).map_err(DeviceError::Console)?;
        Ok((
            in_process(device, subscribers)?,
            format!("-> {}", output.display()),
        ))
    }
}
