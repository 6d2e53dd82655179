// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The versioned, checksummed envelope around a snapshot payload.

use std::io::{Read, Write};

use super::{v1, DeviceSnapshot, CURRENT_FORMAT_VERSION, OLDEST_FORMAT_VERSION};

/// The first eight bytes of every snapshot: a non-ASCII byte (so the file is
/// not taken for text), `VBKSNP`, and a line feed (so a text-mode transfer
/// that rewrites line ends is detected at once).
pub const MAGIC: [u8; 8] = *b"\x89VBKSNP\n";

/// Length of the fixed header: magic, format version, encoding, payload
/// length.
pub const HEADER_LEN: usize = 16;

/// Length of the trailer: the CRC-64/XZ of header and payload.
pub const TRAILER_LEN: usize = 8;

/// The largest payload [`decode`] and [`read_from`] accept, and [`encode`]
/// produces: 16 MiB.
pub const MAX_PAYLOAD_LEN: u32 = 16 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// How the payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Compact JSON (`serde_json`), fields in declaration order, byte
    /// strings as lowercase hex.
    Json,
}

impl Encoding {
    /// The id written in the header.
    pub fn id(self) -> u16 {
        match self {
            Encoding::Json => 1,
        }
    }

    /// The encoding with header id `id`, if known.
    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            1 => Some(Encoding::Json),
            _ => None,
        }
    }
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Fewer bytes than the header or its payload length announce.
    #[error("snapshot truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Bytes the envelope needs.
        expected: u64,
        /// Bytes there were.
        found: u64,
    },
    /// More bytes after the checksum.
    #[error("{extra} unexpected bytes after the snapshot")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// Not a snapshot: the magic bytes are wrong.
    #[error("not a device snapshot (magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The snapshot was written by a newer format version than this build
    /// knows.
    #[error("snapshot format version {found} is newer than this build reads (up to {newest})")]
    NewerVersion {
        /// Version in the header.
        found: u16,
        /// Newest version this build reads.
        newest: u16,
    },
    /// A format version that never existed, or one this build cannot write.
    #[error(
        "snapshot format version {found} is not supported (versions {OLDEST_FORMAT_VERSION} to {CURRENT_FORMAT_VERSION})"
    )]
    UnsupportedVersion {
        /// The version asked for or found.
        found: u16,
    },
    /// The payload encoding id is unknown.
    #[error("unknown snapshot payload encoding {0}")]
    UnknownEncoding(u16),
    /// The payload is longer than [`MAX_PAYLOAD_LEN`].
    #[error("snapshot payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Payload length (announced on read, actual on write).
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The checksum does not match: the snapshot is corrupt.
    #[error("snapshot checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    Checksum {
        /// Checksum in the trailer.
        stored: u64,
        /// Checksum of the bytes read.
        computed: u64,
    },
    /// The checksum matched but the payload does not decode as its version.
    #[error("snapshot payload does not match format version {version}")]
    Payload {
        /// Format version of the envelope.
        version: u16,
        /// What the decoder reported.
        #[source]
        source: serde_json::Error,
    },
    /// The payload could not be encoded.
    #[error("cannot encode the snapshot payload")]
    Encode(#[source] serde_json::Error),
    /// The snapshot holds state the requested older version cannot carry.
    #[error("cannot write format version {version}")]
    NotRepresentable {
        /// The version asked for.
        version: u16,
        /// What is missing from it.
        #[source]
        source: v1::HasInflight,
    },
    /// Reading or writing the stream failed.
    #[error("snapshot I/O failed")]
    Io(#[source] std::io::Error),
}

/// The fixed header of an envelope, as read by [`parse_header`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Format version of the payload.
    pub version: u16,
    /// Raw payload encoding id (see [`Encoding::from_id`]).
    pub encoding: u16,
    /// Payload length in bytes (at most [`MAX_PAYLOAD_LEN`]).
    pub payload_len: u32,
}

impl EnvelopeHeader {
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&self.version.to_le_bytes());
        h[10..12].copy_from_slice(&self.encoding.to_le_bytes());
        h[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        h
    }

    /// Bytes of the whole envelope this header announces.
    fn total_len(self) -> u64 {
        (HEADER_LEN + TRAILER_LEN) as u64 + u64::from(self.payload_len)
    }
}

/// Read and check the fixed header at the start of `data`: the magic, then
/// the format version (before anything else, since a newer version may lay
/// out the rest differently), then the payload length against the cap. The
/// checksum is not checked here.
pub fn parse_header(data: &[u8]) -> Result<EnvelopeHeader, SnapshotError> {
    let Some(h) = data.get(..HEADER_LEN) else {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found: data.len() as u64,
        });
    };
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[..8]);
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version > CURRENT_FORMAT_VERSION {
        return Err(SnapshotError::NewerVersion {
            found: version,
            newest: CURRENT_FORMAT_VERSION,
        });
    }
    if version < OLDEST_FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion { found: version });
    }
    let encoding = u16::from_le_bytes([h[10], h[11]]);
    let payload_len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(SnapshotError::TooLarge {
            len: payload_len.into(),
            max: MAX_PAYLOAD_LEN,
        });
    }
    Ok(EnvelopeHeader {
        version,
        encoding,
        payload_len,
    })
}

/// Encode `snapshot` in the current format version
/// ([`CURRENT_FORMAT_VERSION`]). The output is deterministic: the same
/// snapshot always gives the same bytes.
pub fn encode(snapshot: &DeviceSnapshot) -> Result<Vec<u8>, SnapshotError> {
    encode_version(snapshot, CURRENT_FORMAT_VERSION)
}

/// Encode `snapshot` in an older format `version`, for a destination that
/// reads only that one. Refused when the snapshot holds state the version
/// cannot carry (in-flight requests in version 1).
pub fn encode_version(snapshot: &DeviceSnapshot, version: u16) -> Result<Vec<u8>, SnapshotError> {
    let payload = match version {
        1 => {
            let old = v1::DeviceSnapshot::try_from(snapshot)
                .map_err(|source| SnapshotError::NotRepresentable { version, source })?;
            serde_json::to_vec(&old)
        }
        2 => serde_json::to_vec(snapshot),
        found => return Err(SnapshotError::UnsupportedVersion { found }),
    }
    .map_err(SnapshotError::Encode)?;
    seal(version, Encoding::Json, &payload)
}

fn seal(version: u16, encoding: Encoding, payload: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let payload_len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_PAYLOAD_LEN)
        .ok_or(SnapshotError::TooLarge {
            len: payload.len() as u64,
            max: MAX_PAYLOAD_LEN,
        })?;
    let header = EnvelopeHeader {
        version,
        encoding: encoding.id(),
        payload_len,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decode a snapshot of any format version this build reads, upgrading old
/// versions to the current model.
///
/// `data` must be exactly one envelope. The result is well-formed but
/// untrusted: check it with
/// [`ValidatedSnapshot::new`](super::ValidatedSnapshot::new).
pub fn decode(data: &[u8]) -> Result<DeviceSnapshot, SnapshotError> {
    let header = parse_header(data)?;
    let total = header.total_len();
    let found = data.len() as u64;
    if found < total {
        return Err(SnapshotError::Truncated {
            expected: total,
            found,
        });
    }
    if found > total {
        return Err(SnapshotError::TrailingBytes {
            extra: found - total,
        });
    }
    open(header, &data[..HEADER_LEN], &data[HEADER_LEN..])
}

/// Check the checksum of `body` (payload and trailer) and decode the payload.
fn open(
    header: EnvelopeHeader,
    header_bytes: &[u8],
    body: &[u8],
) -> Result<DeviceSnapshot, SnapshotError> {
    let (payload, trailer) = body.split_at(body.len() - TRAILER_LEN);
    let mut stored = [0u8; TRAILER_LEN];
    stored.copy_from_slice(trailer);
    let stored = u64::from_le_bytes(stored);
    let mut digest = CRC.digest();
    digest.update(header_bytes);
    digest.update(payload);
    let computed = digest.finalize();
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let Some(Encoding::Json) = Encoding::from_id(header.encoding) else {
        return Err(SnapshotError::UnknownEncoding(header.encoding));
    };
    let version = header.version;
    let payload_error = |source| SnapshotError::Payload { version, source };
    match version {
        1 => serde_json::from_slice::<v1::DeviceSnapshot>(payload)
            .map(Into::into)
            .map_err(payload_error),
        2 => serde_json::from_slice::<DeviceSnapshot>(payload).map_err(payload_error),
        found => Err(SnapshotError::UnsupportedVersion { found }),
    }
}

/// Write `snapshot` to `writer` in the current format version.
pub fn write_to<W: Write>(snapshot: &DeviceSnapshot, writer: &mut W) -> Result<(), SnapshotError> {
    let bytes = encode(snapshot)?;
    writer.write_all(&bytes).map_err(SnapshotError::Io)
}

/// Read one snapshot envelope from `reader` (of any format version this
/// build reads) and decode it.
///
/// Reads exactly the envelope's bytes and no more, so a snapshot can be
/// embedded in a larger stream. Memory use is bounded by what the stream
/// actually holds, never by the announced length alone.
pub fn read_from<R: Read>(reader: &mut R) -> Result<DeviceSnapshot, SnapshotError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    let got = read_up_to(reader, &mut header_bytes)?;
    let header = parse_header(&header_bytes[..got])?;
    let body_len = header.total_len() - HEADER_LEN as u64;
    let mut body = Vec::new();
    reader
        .take(body_len)
        .read_to_end(&mut body)
        .map_err(SnapshotError::Io)?;
    if (body.len() as u64) < body_len {
        return Err(SnapshotError::Truncated {
            expected: header.total_len(),
            found: (HEADER_LEN + body.len()) as u64,
        });
    }
    open(header, &header_bytes, &body)
}

/// Fill `buf` as far as the stream allows; returns the bytes read.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, SnapshotError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Io(e)),
        }
    }
    Ok(filled)
}
