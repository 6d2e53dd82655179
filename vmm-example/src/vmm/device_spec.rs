// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the user asked for: a device kind (a name in the
//! [`DeviceRegistry`](super::registry::DeviceRegistry)) and its home, in
//! process with the kind's options or behind a vhost-user socket.
//!
//! Specs are recorded in VM snapshots. Snapshots written before kinds were
//! open (format version 1) recorded a closed list of variants; they still
//! read, as the same kinds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A device's options in process (`key=value`, meaning up to the kind).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOptions(BTreeMap<String, String>);

impl DeviceOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `key` to `value`.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.insert(key.to_string(), value.into());
        self
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Whether `key` is set to `true`.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key) == Some("true")
    }

    /// The keys given, for checking them against what a kind knows.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// Where a device runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceHome {
    /// In the VMM, built by its kind from these options.
    InProcess(DeviceOptions),
    /// In a vhost-user backend listening on this socket.
    VhostUser(PathBuf),
}

/// A device the user asked for, in command-line order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SpecRecord")]
pub struct DeviceSpec {
    /// The kind's name in the registry (`disk`, `rng`, `console`, ...).
    pub kind: String,
    /// Where it runs.
    pub home: DeviceHome,
}

impl DeviceSpec {
    /// `kind` in process with `options`.
    pub fn in_process(kind: &str, options: DeviceOptions) -> Self {
        DeviceSpec {
            kind: kind.to_string(),
            home: DeviceHome::InProcess(options),
        }
    }

    /// `kind` served by the vhost-user backend on `socket`.
    pub fn vhost_user(kind: &str, socket: impl Into<PathBuf>) -> Self {
        DeviceSpec {
            kind: kind.to_string(),
            home: DeviceHome::VhostUser(socket.into()),
        }
    }
}

/// A spec as a snapshot file may hold it.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecRecord {
    Current { kind: String, home: DeviceHome },
    Legacy(LegacySpec),
}

/// The closed list of format version 1.
#[derive(Deserialize)]
enum LegacySpec {
    Disk {
        path: PathBuf,
        read_only: bool,
    },
    DiskVhostUser(PathBuf),
    Rng,
    RngVhostUser(PathBuf),
    Console {
        output: PathBuf,
        input: Option<PathBuf>,
    },
    ConsoleVhostUser(PathBuf),
}

impl From<SpecRecord> for DeviceSpec {
    fn from(record: SpecRecord) -> Self {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        match record {
            SpecRecord::Current { kind, home } => DeviceSpec { kind, home },
            SpecRecord::Legacy(legacy) => match legacy {
                LegacySpec::Disk { path: p, read_only } => {
                    let mut options = DeviceOptions::new().with("path", path(p));
                    if read_only {
                        options = options.with("read-only", "true");
                    }
                    DeviceSpec::in_process("disk", options)
                }
                LegacySpec::DiskVhostUser(s) => DeviceSpec::vhost_user("disk", s),
                LegacySpec::Rng => DeviceSpec::in_process("rng", DeviceOptions::new()),
                LegacySpec::RngVhostUser(s) => DeviceSpec::vhost_user("rng", s),
                LegacySpec::Console { output, input } => {
                    let mut options = DeviceOptions::new().with("output", path(output));
                    if let Some(input) = input {
                        options = options.with("input", path(input));
                    }
                    DeviceSpec::in_process("console", options)
                }
                LegacySpec::ConsoleVhostUser(s) => DeviceSpec::vhost_user("console", s),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_records_read_as_the_same_kinds() {
        let old = r#"[{"Disk":{"path":"/d.img","read_only":true}},"Rng",
            {"ConsoleVhostUser":"/c.sock"},{"Console":{"output":"/o","input":null}}]"#;
        let specs: Vec<DeviceSpec> = serde_json::from_str(old).unwrap();
        assert_eq!(
            specs,
            [
                DeviceSpec::in_process(
                    "disk",
                    DeviceOptions::new()
                        .with("path", "/d.img")
                        .with("read-only", "true")
                ),
                DeviceSpec::in_process("rng", DeviceOptions::new()),
                DeviceSpec::vhost_user("console", "/c.sock"),
                DeviceSpec::in_process("console", DeviceOptions::new().with("output", "/o")),
            ]
        );
    }

    #[test]
    fn current_records_round_trip() {
        let spec = DeviceSpec::in_process("disk", DeviceOptions::new().with("path", "/x"));
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<DeviceSpec>(&json).unwrap(), spec);
        let spec = DeviceSpec::vhost_user("thermometer", "/t.sock");
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<DeviceSpec>(&json).unwrap(), spec);
    }
}
