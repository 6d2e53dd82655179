// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attaching virtio devices: each gets a virtio-mmio window, an interrupt
//! line, a [`MmioTransport`] and its KVM wiring (an ioeventfd per queue, an
//! irqfd for the interrupt). Behind the transport sits either the kit's
//! [`DeviceCore`] running the device in this process, its data plane on
//! the VMM's event loop, or a [`VhostUserFrontendDevice`] talking to a
//! backend in another process. The transport cannot tell the difference.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;
use virtio_backend_kit::core::{CoreError, DeviceControl, DeviceCore};
use virtio_backend_kit::kvm::{KvmError, KvmWiring};
use virtio_backend_kit::mmio::{MmioError, MmioTransport};
use virtio_backend_kit::vhost_user::{FrontendError, FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::{DeviceBackend, GuestMemoryLog};

use super::acpi::MmioWindow;
use super::layout;
use crate::devices::blk::VIRTIO_ID_BLOCK;
use crate::devices::rng::VIRTIO_ID_RNG;
use crate::devices::{
    BlkConfig, BlkDevice, BlkError, ConsoleDevice, ConsoleError, RngDevice, RngError, Target,
    VIRTIO_ID_CONSOLE,
};

/// Request queues of a disk (the guest spreads them over its vCPUs).
const DISK_QUEUES: u16 = 2;
/// Queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;

/// A device the user asked for, in command-line order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceSpec {
    /// virtio-blk in this process, on a raw image.
    Disk {
        /// The image.
        path: PathBuf,
        /// Refuse writes.
        read_only: bool,
    },
    /// virtio-blk served by a vhost-user backend on this socket.
    DiskVhostUser(PathBuf),
    /// virtio-rng in this process.
    Rng,
    /// virtio-rng served by a vhost-user backend on this socket.
    RngVhostUser(PathBuf),
    /// A one-port virtio-console in this process: guest output appended to
    /// `output`, host input read from `input` (none: no input).
    Console {
        /// Where the guest's console output goes.
        output: PathBuf,
        /// What is typed into the guest (a file or a FIFO).
        input: Option<PathBuf>,
    },
    /// virtio-console served by a vhost-user backend on this socket.
    ConsoleVhostUser(PathBuf),
}

impl DeviceSpec {
    /// The virtio device ID the guest sees, whichever home serves it.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceSpec::Disk { .. } | DeviceSpec::DiskVhostUser(_) => VIRTIO_ID_BLOCK,
            DeviceSpec::Rng | DeviceSpec::RngVhostUser(_) => VIRTIO_ID_RNG,
            DeviceSpec::Console { .. } | DeviceSpec::ConsoleVhostUser(_) => VIRTIO_ID_CONSOLE,
        }
    }
}

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The disk image could not be used.
    #[error("disk {}", .0.display())]
    Disk(PathBuf, #[source] BlkError),
    /// The rng device could not be built.
    #[error("rng device")]
    Rng(#[source] RngError),
    /// A console file could not be opened.
    #[error("console file {}", .0.display())]
    ConsoleFile(PathBuf, #[source] std::io::Error),
    /// The console device could not be built.
    #[error("console device")]
    Console(#[source] ConsoleError),
    /// The vhost-user backend could not be reached or refused to negotiate.
    #[error("vhost-user backend at {}", .0.display())]
    VhostUser(PathBuf, #[source] FrontendError),
    /// The control core could not be created.
    #[error("device core")]
    Core(#[source] CoreError),
    /// The transport could not be created.
    #[error("virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// KVM refused the ioeventfd/irqfd wiring.
    #[error("KVM wiring")]
    Kvm(#[source] KvmError),
    /// More devices than interrupt lines.
    #[error("too many devices (at most {})", layout::DEVICE_GSIS.len())]
    TooMany,
}

/// Data-plane subscribers for the VMM's event loop.
pub type Subscribers = Vec<Box<dyn MutEventSubscriber + Send>>;

/// A device on the guest's MMIO bus.
pub struct AttachedDevice {
    /// Where the guest finds it.
    pub window: MmioWindow,
    /// The transport, shared with the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// What the device is (for logs).
    pub description: String,
    /// Kept alive for as long as the device is: dropping unregisters.
    _wiring: KvmWiring,
}

fn in_process<B: DeviceBackend>(
    backend: B,
    subscribers: &mut Subscribers,
) -> Result<Box<dyn DeviceControl>, DeviceError> {
    let (core, subs) = DeviceCore::with_event_loop(Arc::new(backend)).map_err(DeviceError::Core)?;
    subscribers.extend(
        subs.into_iter()
            .map(|s| Box::new(s) as Box<dyn MutEventSubscriber + Send>),
    );
    Ok(Box::new(core))
}

fn vhost_user(
    socket: &PathBuf,
    device_type: u32,
    queues: usize,
) -> Result<Box<dyn DeviceControl>, DeviceError> {
    let options = FrontendOptions {
        // A console's pending host bytes must travel with a snapshot.
        stateful: device_type == VIRTIO_ID_CONSOLE,
        ..FrontendOptions::new(device_type, queues, QUEUE_SIZE)
    };
    let device = VhostUserFrontendDevice::connect(socket, options)
        .map_err(|e| DeviceError::VhostUser(socket.clone(), e))?;
    Ok(Box::new(device))
}

/// Build device number `index` of `spec`, put it in its window and wire it
/// to KVM. In-process data planes are added to `subscribers`.
pub fn attach(
    spec: &DeviceSpec,
    index: usize,
    memory: &GuestMemoryLog,
    vm: &Arc<VmFd>,
    subscribers: &mut Subscribers,
) -> Result<AttachedDevice, DeviceError> {
    let gsi = *layout::DEVICE_GSIS.get(index).ok_or(DeviceError::TooMany)?;
    let window = MmioWindow {
        base: layout::MMIO_START + index as u64 * layout::MMIO_WINDOW,
        size: layout::MMIO_WINDOW,
        gsi,
    };
    let (control, description) = match spec {
        DeviceSpec::Disk { path, read_only } => {
            let disk_err = |e| DeviceError::Disk(path.clone(), e);
            let target = Target::open_image(path, *read_only).map_err(disk_err)?;
            let config = BlkConfig {
                queues: DISK_QUEUES,
                queue_size: QUEUE_SIZE,
                read_only: *read_only,
                ..BlkConfig::default()
            };
            let device = BlkDevice::new(target, config).map_err(disk_err)?;
            let what = format!("virtio-blk {} (in-process)", path.display());
            (in_process(device, subscribers)?, what)
        }
        DeviceSpec::DiskVhostUser(socket) => (
            vhost_user(socket, VIRTIO_ID_BLOCK, DISK_QUEUES.into())?,
            format!("virtio-blk via vhost-user {}", socket.display()),
        ),
        DeviceSpec::Rng => {
            let device = RngDevice::new(QUEUE_SIZE).map_err(DeviceError::Rng)?;
            (
                in_process(device, subscribers)?,
                "virtio-rng (in-process)".to_string(),
            )
        }
        DeviceSpec::RngVhostUser(socket) => (
            vhost_user(socket, VIRTIO_ID_RNG, 1)?,
            format!("virtio-rng via vhost-user {}", socket.display()),
        ),
        DeviceSpec::Console { output, input } => {
            let input_path = input.clone().unwrap_or_else(|| "/dev/null".into());
            let input = std::fs::File::open(&input_path)
                .map_err(|e| DeviceError::ConsoleFile(input_path, e))?;
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(output)
                .map_err(|e| DeviceError::ConsoleFile(output.clone(), e))?;
            let device =
                ConsoleDevice::new(input, out, QUEUE_SIZE).map_err(DeviceError::Console)?;
            let what = format!("virtio-console -> {} (in-process)", output.display());
            (in_process(device, subscribers)?, what)
        }
        DeviceSpec::ConsoleVhostUser(socket) => (
            vhost_user(socket, VIRTIO_ID_CONSOLE, 2)?,
            format!("virtio-console via vhost-user {}", socket.display()),
        ),
    };
    let transport = MmioTransport::new(control, memory.clone()).map_err(DeviceError::Transport)?;
    let wiring = KvmWiring::register(
        vm.clone(),
        window.base,
        transport.queue_kicks(),
        transport.irq_eventfd(),
        gsi,
    )
    .map_err(DeviceError::Kvm)?;
    Ok(AttachedDevice {
        window,
        transport: Arc::new(Mutex::new(transport)),
        description,
        _wiring: wiring,
    })
}
