// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a disk is backed by: a raw image file, or nothing (a null disk).

use super::*;

/// An open raw image file or block device node.
#[derive(Debug)]
pub struct ImageFile {
    pub(super) file: File,
    /// The same image opened with `O_DIRECT` (`--direct`): aligned
    /// requests bypass the host page cache through it.
    pub(super) direct: Option<File>,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
}

impl ImageFile {
    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// How a daemon opens its image ([`Target::open_image_with`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageOptions {
    /// Open it read-only.
    pub read_only: bool,
    /// Take an OFD lock over the whole file: shared when read-only,
    /// exclusive when read-write (as QEMU locks its images), so that two
    /// writers, or a writer and a reader, never share an image. The lock
    /// lives as long as the target.
    pub lock: bool,
    /// Also open it with `O_DIRECT`: requests whose buffers, lengths and
    /// offsets are 512-byte aligned (what a guest's page cache and its own
    /// O_DIRECT produce) bypass the host page cache; others, and any the
    /// kernel refuses with EINVAL, go through the page cache.
    pub direct: bool,
}

/// What the device stores its data in.
#[derive(Debug)]
pub enum Target {
    /// A raw image file or block device node, accessed with `pread`/`pwrite`.
    Image(ImageFile),
    /// A disk of `size` bytes that completes every request successfully
    /// without moving any data (reads leave guest memory untouched).
    Null {
        /// Size in bytes.
        size: u64,
    },
}

impl Target {
    /// Open a raw image file or block device node, read-only if asked.
    pub fn open_image(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlkError> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| BlkError::Open {
                path: path.clone(),
                source,
            })?;
        // Seeking to the end also works for block devices, whose metadata
        // reports a length of 0.
        file.seek(SeekFrom::End(0))
            .map_err(|source| BlkError::Size {
                path: path.clone(),
                source,
            })?;
        Ok(Target::Image(ImageFile {
            file,
            direct: None,
            path,
            read_only,
        }))
    }

    /// Open a raw image as a daemon does: [`Target::open_image`], then
    /// what `opts` asks for (see [`ImageOptions`]).
    pub fn open_image_with(path: impl AsRef<Path>, opts: ImageOptions) -> Result<Self, BlkError> {
        let mut target = Self::open_image(path, opts.read_only)?;
        if let Target::Image(img) = &mut target {
            if opts.lock {
                crate::devices::image_lock::lock(&img.file, opts.read_only).map_err(|source| {
                    BlkError::Locked {
                        path: img.path.clone(),
                        source,
                    }
                })?;
            }
            if opts.direct {
                use std::os::unix::fs::OpenOptionsExt;
                let direct = OpenOptions::new()
                    .read(true)
                    .write(!opts.read_only)
                    .custom_flags(libc::O_DIRECT)
                    .open(&img.path)
                    .map_err(|source| BlkError::Open {
                        path: img.path.clone(),
                        source,
                    })?;
                img.direct = Some(direct);
            }
        }
        Ok(target)
    }

    /// A null target of `size` bytes.
    pub fn null(size: u64) -> Self {
        Target::Null { size }
    }

    /// Size of the target in bytes (the device exposes whole sectors).
    pub fn size(&self) -> io::Result<u64> {
        match self {
            Target::Image(img) => {
                let mut f = &img.file;
                f.seek(SeekFrom::End(0))
            }
            Target::Null { size } => Ok(*size),
        }
    }

    /// Whether the target can only be read.
    pub fn is_read_only(&self) -> bool {
        match self {
            Target::Image(img) => img.read_only,
            Target::Null { .. } => false,
        }
    }

    /// The default `GET_ID` serial: `vbk-` and a hash of the canonical image
    /// path for images, `vbk-null` for the null target.
    pub fn default_serial(&self) -> [u8; ID_LEN] {
        let mut id = [0u8; ID_LEN];
        match self {
            Target::Image(img) => {
                let path = img.path.canonicalize().unwrap_or_else(|_| img.path.clone());
                let hash = fnv1a(path.as_os_str().as_encoded_bytes());
                let text = format!("vbk-{hash:016x}");
                id.copy_from_slice(&text.as_bytes()[..ID_LEN]);
            }
            Target::Null { .. } => id[..NULL_SERIAL.len()].copy_from_slice(NULL_SERIAL),
        }
        id
    }
}

/// 64-bit FNV-1a, good enough to turn a path into a stable serial.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
