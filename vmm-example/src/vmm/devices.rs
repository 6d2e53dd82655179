// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Attaching virtio devices: each gets a virtio-mmio window, an interrupt
//! line, a [`MmioTransport`] and its KVM wiring (an ioeventfd per queue, an
//! irqfd for the interrupt). Behind the transport sits either the kit's
//! [`DeviceCore`] running the device in this process, its data plane on
//! the VMM's event loop, or a [`VhostUserFrontendDevice`] talking to a
//! backend in another process. The transport cannot tell the difference.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;
use virtio_backend_kit::core::{CoreError, DeviceControl, DeviceCore};
use virtio_backend_kit::frontend::{FrontendError, FrontendOptions, VhostUserFrontendDevice};
use virtio_backend_kit::kvm::{KvmError, KvmWiring};
use virtio_backend_kit::mmio::{MmioError, MmioTransport};
use virtio_backend_kit::{DeviceBackend, GuestMemoryLog};

use super::acpi::MmioWindow;
use super::builtin_kinds::QUEUE_SIZE;
use super::device_spec::{DeviceHome, DeviceSpec};
use super::layout;
use super::registry::{check_option_keys, DeviceKind, DeviceRegistry};
use crate::devices::{BlkError, ConsoleError, RngError};

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
    /// No kind of this name is registered.
    #[error("unknown device kind '{kind}' (known: {known})")]
    UnknownKind {
        /// The name asked for.
        kind: String,
        /// The registered names.
        known: String,
    },
    /// The options do not suit the kind.
    #[error("{kind}: {reason}")]
    Option {
        /// The kind.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// More devices than interrupt lines.
    #[error("too many devices (at most {})", layout::DEVICE_GSIS.len())]
    TooMany,
}

/// Data-plane subscribers for the VMM's event loop.
pub type Subscribers = Vec<Box<dyn MutEventSubscriber + Send>>;

/// A device on the guest's MMIO bus.
#[derive(Debug)]
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

/// Put `backend` in process, its data plane on the VMM's event loop (its
/// subscribers go to `subscribers`): what a [`DeviceKind::build`] returns.
pub fn in_process<B: DeviceBackend>(
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

fn vhost_user(socket: &Path, kind: &dyn DeviceKind) -> Result<Box<dyn DeviceControl>, DeviceError> {
    let info = kind.info();
    let options = FrontendOptions {
        // A device with state of its own must not lose it in a snapshot.
        stateful: info.stateful,
        ..FrontendOptions::new(info.device_type, info.queues, QUEUE_SIZE)
    };
    let device = VhostUserFrontendDevice::connect(socket, options)
        .map_err(|e| DeviceError::VhostUser(socket.to_path_buf(), e))?;
    Ok(Box::new(device))
}

/// Build device number `index` of `spec` (its kind from `registry`), put
/// it in its window and wire it to KVM. In-process data planes are added
/// to `subscribers`.
pub fn attach(
    spec: &DeviceSpec,
    registry: &DeviceRegistry,
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
    let kind = registry.get(&spec.kind)?;
    let (control, description) = match &spec.home {
        DeviceHome::InProcess(options) => {
            check_option_keys(kind, options)?;
            let (control, detail) = kind.build(options, subscribers)?;
            let what = format!("{} {detail} (in-process)", kind.info().display_name);
            (control, what.replace("  ", " "))
        }
        DeviceHome::VhostUser(socket) => (
            vhost_user(socket, kind)?,
            format!(
                "{} via vhost-user {}",
                kind.info().display_name,
                socket.display()
            ),
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
