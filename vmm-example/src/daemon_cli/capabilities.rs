// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a daemon tells management tools about itself, in the JSON of
//! QEMU's `docs/interop/vhost-user.json`: `--print-capabilities` prints a
//! `VHostUserBackendCapabilities` object, and `--install-descriptor DIR`
//! writes a `VhostUserBackend` descriptor (description, type, binary) that
//! tools such as libvirt find in `/usr/share/qemu/vhost-user/` or
//! `/etc/qemu/vhost-user/`.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::json;

/// A daemon's identity for management tools.
#[derive(Clone, Copy, Debug)]
pub struct DaemonKind {
    /// The program name (`vhost-user-blk`).
    pub name: &'static str,
    /// The `VHostUserBackendType` (`block`, `rng`, ...).
    pub backend_type: &'static str,
    /// Type-specific features (for `block`: `read-only`, `blk-file`).
    pub features: &'static [&'static str],
    /// One line for the descriptor.
    pub description: &'static str,
}

impl DaemonKind {
    /// The `--print-capabilities` JSON.
    pub fn capabilities_json(&self) -> String {
        let caps = json!({ "type": self.backend_type, "features": self.features });
        serde_json::to_string_pretty(&caps).unwrap_or_default()
    }

    /// The descriptor JSON for a daemon installed at `binary`.
    pub fn descriptor_json(&self, binary: &Path) -> String {
        let desc = json!({
            "description": self.description,
            "type": self.backend_type,
            "binary": binary,
        });
        serde_json::to_string_pretty(&desc).unwrap_or_default()
    }

    /// Write `DIR/50-NAME.json` naming this program's own path as the
    /// binary; returns the file written (or the file and the error).
    pub fn install_descriptor(&self, dir: &Path) -> Result<PathBuf, (PathBuf, io::Error)> {
        let file = dir.join(format!("50-{}.json", self.name));
        let binary = std::env::current_exe().map_err(|e| (file.clone(), e))?;
        std::fs::create_dir_all(dir).map_err(|e| (file.clone(), e))?;
        let text = self.descriptor_json(&binary) + "\n";
        std::fs::write(&file, text).map_err(|e| (file.clone(), e))?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLK: DaemonKind = DaemonKind {
        name: "vhost-user-blk",
        backend_type: "block",
        features: &["read-only", "blk-file"],
        description: "virtio-blk",
    };

    #[test]
    fn capabilities_follow_the_schema() {
        let v: serde_json::Value = serde_json::from_str(&BLK.capabilities_json()).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], json!(["read-only", "blk-file"]));
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn descriptor_names_the_binary() {
        let dir = tempfile::tempdir().unwrap();
        let file = BLK.install_descriptor(dir.path()).unwrap();
        assert_eq!(file, dir.path().join("50-vhost-user-blk.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["description"], "virtio-blk");
        let exe = std::env::current_exe().unwrap();
        assert_eq!(v["binary"], exe.to_str().unwrap());
    }
}
