// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The kinds of device the VMM can attach: an open list. A kind knows its
//! virtio identity and how to build its device in process from options;
//! out of process it needs nothing but a socket. A VMM embedding this
//! crate adds its own kinds with [`DeviceRegistry::register`] and names
//! them in a [`DeviceSpec`](super::DeviceSpec); the VMM core is not
//! touched.

use std::collections::BTreeMap;
use std::sync::Arc;

use virtio_backend_kit::core::DeviceControl;

use super::builtin_kinds::{ConsoleKind, DiskKind, RngKind};
use super::device_spec::DeviceOptions;
use super::devices::{DeviceError, Subscribers};

/// What a [`DeviceKind`] is, wherever its device runs: the figures a kind
/// states once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// Its name in specs and on the command line (`disk`).
    pub name: &'static str,
    /// Its name in logs (`virtio-blk`).
    pub display_name: &'static str,
    /// The virtio device ID the guest sees, in every home.
    pub device_type: u32,
    /// Queues the VMM asks a vhost-user backend for.
    pub queues: usize,
    /// Whether the device keeps state of its own, which a snapshot must
    /// then carry (a vhost-user backend without DEVICE_STATE is refused).
    pub stateful: bool,
    /// The option keys [`DeviceKind::build`] understands.
    pub option_keys: &'static [&'static str],
}

impl KindInfo {
    /// A kind without state of its own and without options.
    pub const fn new(
        name: &'static str,
        display_name: &'static str,
        device_type: u32,
        queues: usize,
    ) -> Self {
        KindInfo {
            name,
            display_name,
            device_type,
            queues,
            stateful: false,
            option_keys: &[],
        }
    }

    /// The same kind, keeping state of its own.
    pub const fn stateful(self) -> Self {
        KindInfo {
            stateful: true,
            ..self
        }
    }

    /// The same kind, understanding the option keys `keys`.
    pub const fn with_options(self, keys: &'static [&'static str]) -> Self {
        KindInfo {
            option_keys: keys,
            ..self
        }
    }
}

/// One kind of device.
pub trait DeviceKind: Send + Sync {
    /// Its names, virtio identity, queues, state and option keys.
    fn info(&self) -> KindInfo;
    /// Build the device in process. Its data plane subscribers, if it
    /// runs on the VMM's event loop, go to `subscribers` (see
    /// [`super::devices::in_process`]). Returns the device and a short
    /// description for logs.
    fn build(&self, options: &DeviceOptions, subscribers: &mut Subscribers) -> BuildResult;
}

/// What [`DeviceKind::build`] returns: the device and a short description
/// of it for logs.
pub type BuildResult = Result<(Box<dyn DeviceControl>, String), DeviceError>;

/// The kinds known to a VMM, by name.
#[derive(Clone, Default)]
pub struct DeviceRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn DeviceKind>>,
}

impl std::fmt::Debug for DeviceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.kinds.keys()).finish()
    }
}

impl DeviceRegistry {
    /// No kinds.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The example's devices: `disk` (virtio-blk), `rng`, `console`.
    pub fn with_builtin_kinds() -> Self {
        let mut registry = Self::empty();
        registry.register(Arc::new(DiskKind));
        registry.register(Arc::new(RngKind));
        registry.register(Arc::new(ConsoleKind));
        registry
    }

    /// Add `kind` (replacing a kind of the same name).
    pub fn register(&mut self, kind: Arc<dyn DeviceKind>) {
        self.kinds.insert(kind.info().name, kind);
    }

    /// The kind called `name`.
    pub fn get(&self, name: &str) -> Result<&dyn DeviceKind, DeviceError> {
        self.kinds
            .get(name)
            .map(|k| k.as_ref())
            .ok_or_else(|| DeviceError::UnknownKind {
                kind: name.to_string(),
                known: self.names().join(", "),
            })
    }

    /// The names of every kind.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}

/// Refuse option keys `kind` does not know (a typo must not be ignored).
pub fn check_option_keys(
    kind: &dyn DeviceKind,
    options: &DeviceOptions,
) -> Result<(), DeviceError> {
    let info = kind.info();
    match options.keys().find(|k| !info.option_keys.contains(k)) {
        Some(key) => Err(DeviceError::Option {
            kind: info.name,
            reason: format!(
                "unknown option '{key}' (known: {})",
                info.option_keys.join(", ")
            ),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use virtio_backend_kit::{BackendError, DeviceBackend, Vring, VringOwned};

    use super::*;
    use crate::vmm::devices::in_process;
    use crate::vmm::DeviceSpec;

    /// A device kind the VMM core has never heard of.
    struct Thermometer;

    struct ThermometerDevice;

    impl DeviceBackend for ThermometerDevice {
        type Vring = VringOwned;
        fn device_type(&self) -> u32 {
            0x7d
        }
        fn process_queue(&self, _: u16, _: &mut Vring) -> Result<(), BackendError> {
            Ok(())
        }
    }

    impl DeviceKind for Thermometer {
        fn info(&self) -> KindInfo {
            KindInfo::new("thermometer", "virtio-thermometer", 0x7d, 1).with_options(&["unit"])
        }
        fn build(&self, options: &DeviceOptions, subscribers: &mut Subscribers) -> BuildResult {
            let unit = options.get("unit").unwrap_or("C").to_string();
            Ok((in_process(ThermometerDevice, subscribers)?, unit))
        }
    }

    #[test]
    fn a_kind_registered_from_outside_is_built_like_the_builtin_ones() {
        let mut registry = DeviceRegistry::with_builtin_kinds();
        registry.register(Arc::new(Thermometer));
        assert_eq!(registry.names(), ["console", "disk", "rng", "thermometer"]);
        let spec = DeviceSpec::in_process("thermometer", DeviceOptions::new().with("unit", "K"));
        let kind = registry.get(&spec.kind).unwrap();
        let crate::vmm::DeviceHome::InProcess(options) = &spec.home else {
            unreachable!("built in process above")
        };
        check_option_keys(kind, options).unwrap();
        let mut subscribers = Subscribers::new();
        let (control, detail) = kind.build(options, &mut subscribers).unwrap();
        assert_eq!(control.device_type(), 0x7d);
        assert_eq!(detail, "K");
        assert_eq!(subscribers.len(), 1, "its data plane joins the event loop");
    }

    #[test]
    fn unknown_kinds_and_options_are_refused_by_name() {
        let registry = DeviceRegistry::with_builtin_kinds();
        let e = registry.get("thermometer").err().unwrap();
        assert_eq!(
            e.to_string(),
            "unknown device kind 'thermometer' (known: console, disk, rng)"
        );
        let disk = registry.get("disk").unwrap();
        let e = check_option_keys(disk, &DeviceOptions::new().with("pth", "/x")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "disk: unknown option 'pth' (known: path, read-only)"
        );
        let e = disk
            .build(&DeviceOptions::new(), &mut Subscribers::new())
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "disk: 'path' is required");
    }
}
