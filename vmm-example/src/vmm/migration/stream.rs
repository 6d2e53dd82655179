// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The live-migration stream: what the source sends and how the
//! destination reads it back, untrusted.
//!
//! Integers are little-endian. The stream opens with a header and goes on
//! with records until an END record:
//!
//! | bytes | header |
//! |---|---|
//! | 0..8 | magic `\x89VBKMIG\n` |
//! | 8..10 | format version ([`STREAM_VERSION`]) |
//! | 10..12 | reserved, zero |
//! | 12..16 | page size (4096) |
//! | 16..24 | guest RAM in bytes |
//! | 24..32 | CRC-64/XZ of bytes 0..24 |
//!
//! | bytes | record |
//! |---|---|
//! | 0 | kind: 1 RAM, 2 STATE, 3 END |
//! | 1..4 | reserved, zero |
//! | 4..8 | payload length |
//! | 8.. | payload |
//! | then 8 | CRC-64/XZ of the kind, reserved and length bytes and the payload |
//!
//! A RAM payload is the guest physical address of its first page and whole
//! pages (at most [`MAX_RAM_PAGES`]); a STATE payload is the VM state as
//! JSON (the snapshot file's [`VmState`](crate::vmm::snapshot::VmState),
//! at most [`MAX_STATE_LEN`] bytes); END has no payload and must come after
//! exactly one STATE. After END the destination answers with one
//! [`Reply`] byte.

use std::io::{self, Read, Write};

/// First bytes of a migration stream.
pub const STREAM_MAGIC: [u8; 8] = *b"\x89VBKMIG\n";
/// The stream format this code writes and reads.
pub const STREAM_VERSION: u16 = 1;
/// Bytes per page.
pub const PAGE_SIZE: u64 = 4096;
/// Most pages one RAM record carries.
pub const MAX_RAM_PAGES: usize = 256;
/// Largest STATE payload.
pub const MAX_STATE_LEN: u32 = super::super::snapshot::MAX_STATE_LEN;
const HEADER_LEN: usize = 32;
const RECORD_HEAD: usize = 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

const KIND_RAM: u8 = 1;
const KIND_STATE: u8 = 2;
const KIND_END: u8 = 3;

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the connection failed.
    #[error("migration connection: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The stream ended before its END record.
    #[error("the migration stream ended early ({what})")]
    Truncated {
        /// Where.
        what: &'static str,
    },
    /// Not a migration stream.
    #[error("not a vmm-example migration stream (bad magic)")]
    Magic,
    /// Another format version.
    #[error("migration stream version {0} is not supported (this build reads {STREAM_VERSION})")]
    Version(u16),
    /// A header field is out of range.
    #[error("corrupt migration header: {0}")]
    Header(&'static str),
    /// A checksum does not match.
    #[error("corrupt migration stream: {what} checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    Checksum {
        /// The header or a record kind.
        what: &'static str,
        /// From the stream.
        stored: u64,
        /// Of the bytes read.
        computed: u64,
    },
    /// A record is malformed.
    #[error("corrupt migration record: {0}")]
    Record(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> StreamError {
    move |source| match source.kind() {
        io::ErrorKind::UnexpectedEof => StreamError::Truncated { what },
        _ => StreamError::Io { what, source },
    }
}

/// One record, as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// Pages of guest RAM starting at guest physical address `gpa`.
    Ram {
        /// Address of the first page.
        gpa: u64,
        /// Whole pages.
        data: &'a [u8],
    },
    /// The VM state (JSON).
    State(&'a [u8]),
    /// The end of the stream.
    End,
}

/// The destination's answer after END.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Everything arrived intact: the source lets go of the VM.
    Accepted = 0x4b,
    /// The destination refused the stream: the source carries on.
    Refused = 0x52,
}

impl Reply {
    /// The reply byte `b`, if it is one.
    pub fn from_byte(b: u8) -> Option<Self> {
        [Reply::Accepted, Reply::Refused]
            .into_iter()
            .find(|r| *r as u8 == b)
    }
}

/// Writes a stream.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Start a stream for a VM with `ram_len` bytes of RAM.
    pub fn new(mut out: W, ram_len: u64) -> Result<Self, StreamError> {
        let mut head = Vec::with_capacity(HEADER_LEN);
        head.extend_from_slice(&STREAM_MAGIC);
        head.extend_from_slice(&STREAM_VERSION.to_le_bytes());
        head.extend_from_slice(&0u16.to_le_bytes());
        head.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        head.extend_from_slice(&ram_len.to_le_bytes());
        let crc = CRC.checksum(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&head).map_err(io_err("sending the header"))?;
        Ok(StreamWriter {
            out,
            bytes: HEADER_LEN as u64,
        })
    }

    fn record(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).map_err(|_| StreamError::Record(format!("{len} bytes")))?;
        let mut head = [0u8; RECORD_HEAD];
        head[0] = kind;
        head[4..].copy_from_slice(&len.to_le_bytes());
        let mut digest = CRC.digest();
        digest.update(&head);
        for p in parts {
            digest.update(p);
        }
        let crc = digest.finalize().to_le_bytes();
        let what = "sending a record";
        self.out.write_all(&head).map_err(io_err(what))?;
        for p in parts {
            self.out.write_all(p).map_err(io_err(what))?;
        }
        self.out.write_all(&crc).map_err(io_err(what))?;
        self.bytes += (RECORD_HEAD + 8) as u64 + u64::from(len);
        Ok(())
    }

    /// Pages of RAM from `gpa` (whole pages, at most [`MAX_RAM_PAGES`]).
    pub fn ram(&mut self, gpa: u64, pages: &[u8]) -> Result<(), StreamError> {
        self.record(KIND_RAM, &[&gpa.to_le_bytes(), pages])
    }

    /// The VM state.
    pub fn state(&mut self, json: &[u8]) -> Result<(), StreamError> {
        self.record(KIND_STATE, &[json])
    }

    /// The end of the stream; flushes.
    pub fn end(&mut self) -> Result<(), StreamError> {
        self.record(KIND_END, &[])?;
        self.out.flush().map_err(io_err("flushing the stream"))
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// Reads a stream, checking every field before it is used.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: R,
    ram_len: u64,
    buf: Vec<u8>,
    state_seen: bool,
    ended: bool,
}

impl<R: Read> StreamReader<R> {
    /// Read and check the header. `max_ram` is the most RAM this
    /// destination accepts.
    pub fn new(mut input: R, max_ram: u64) -> Result<Self, StreamError> {
        let mut head = [0u8; HEADER_LEN];
        input
            .read_exact(&mut head)
            .map_err(io_err("reading the header"))?;
        let word = |at: usize, n: usize| -> u64 {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&head[at..at + n]);
            u64::from_le_bytes(b)
        };
        if head[..8] != STREAM_MAGIC {
            return Err(StreamError::Magic);
        }
        let stored = word(24, 8);
        let computed = CRC.checksum(&head[..24]);
        if stored != computed {
            return Err(StreamError::Checksum {
                what: "header",
                stored,
                computed,
            });
        }
        let version = word(8, 2) as u16;
        if version != STREAM_VERSION {
            return Err(StreamError::Version(version));
        }
        if word(10, 2) != 0 {
            return Err(StreamError::Header("reserved field is not zero"));
        }
        if word(12, 4) != PAGE_SIZE {
            return Err(StreamError::Header("page size is not 4096"));
        }
        let ram_len = word(16, 8);
        if ram_len == 0 || ram_len % PAGE_SIZE != 0 || ram_len > max_ram {
            return Err(StreamError::Header("RAM size out of range"));
        }
        Ok(StreamReader {
            input,
            ram_len,
            buf: Vec::new(),
            state_seen: false,
            ended: false,
        })
    }

    /// Bytes of guest RAM the stream carries.
    pub fn ram_len(&self) -> u64 {
        self.ram_len
    }

    /// The next record. After [`Record::End`] the stream is over and this
    /// fails.
    pub fn next_record(&mut self) -> Result<Record<'_>, StreamError> {
        if self.ended {
            return Err(StreamError::Record("read past END".into()));
        }
        let mut head = [0u8; RECORD_HEAD];
        self.input
            .read_exact(&mut head)
            .map_err(io_err("reading a record"))?;
        let kind = head[0];
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let max = match kind {
            KIND_RAM => 8 + MAX_RAM_PAGES as u32 * PAGE_SIZE as u32,
            KIND_STATE => MAX_STATE_LEN,
            KIND_END => 0,
            other => return Err(StreamError::Record(format!("unknown kind {other}"))),
        };
        if head[1..4] != [0, 0, 0] {
            return Err(StreamError::Record("reserved bytes are not zero".into()));
        }
        if len > max {
            return Err(StreamError::Record(format!(
                "kind {kind}: {len} bytes (at most {max})"
            )));
        }
        self.buf.resize(len as usize + 8, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(io_err("reading a record's payload"))?;
        let (payload, crc) = self.buf.split_at(len as usize);
        let mut stored = [0u8; 8];
        stored.copy_from_slice(crc);
        let stored = u64::from_le_bytes(stored);
        let mut digest = CRC.digest();
        digest.update(&head);
        digest.update(payload);
        let computed = digest.finalize();
        if stored != computed {
            return Err(StreamError::Checksum {
                what: match kind {
                    KIND_RAM => "RAM record",
                    KIND_STATE => "state record",
                    _ => "end record",
                },
                stored,
                computed,
            });
        }
        match kind {
            KIND_RAM => {
                let (gpa, data) = payload.split_at(8.min(payload.len()));
                let gpa = u64::from_le_bytes(
                    gpa.try_into()
                        .map_err(|_| StreamError::Record("RAM record without address".into()))?,
                );
                let fits = gpa
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= self.ram_len);
                if !gpa.is_multiple_of(PAGE_SIZE)
                    || !(data.len() as u64).is_multiple_of(PAGE_SIZE)
                    || !fits
                {
                    return Err(StreamError::Record(format!(
                        "RAM record of {} bytes at {gpa:#x} (RAM is {:#x} bytes)",
                        data.len(),
                        self.ram_len
                    )));
                }
                Ok(Record::Ram { gpa, data })
            }
            KIND_STATE => {
                if self.state_seen {
                    return Err(StreamError::Record("a second state record".into()));
                }
                self.state_seen = true;
                Ok(Record::State(payload))
            }
            _ => {
                if !self.state_seen {
                    return Err(StreamError::Record("END before the state".into()));
                }
                self.ended = true;
                Ok(Record::End)
            }
        }
    }

    /// The connection.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), 4 * PAGE_SIZE).unwrap();
        w.ram(PAGE_SIZE, &[7u8; 2 * PAGE_SIZE as usize]).unwrap();
        w.state(b"{}").unwrap();
        w.end().unwrap();
        w.out
    }

    fn read_all(bytes: &[u8]) -> Result<usize, StreamError> {
        let mut r = StreamReader::new(bytes, 1 << 30)?;
        let mut n = 0;
        loop {
            n += 1;
            if r.next_record()? == Record::End {
                return Ok(n);
            }
        }
    }

    #[test]
    fn a_stream_reads_back() {
        let bytes = stream();
        let mut r = StreamReader::new(&bytes[..], 1 << 30).unwrap();
        assert_eq!(r.ram_len(), 4 * PAGE_SIZE);
        match r.next_record().unwrap() {
            Record::Ram { gpa, data } => {
                assert_eq!(gpa, PAGE_SIZE);
                assert_eq!(data.len(), 2 * PAGE_SIZE as usize);
                assert!(data.iter().all(|b| *b == 7));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next_record().unwrap(), Record::State(b"{}"));
        assert_eq!(r.next_record().unwrap(), Record::End);
        assert!(r.next_record().is_err());
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let bytes = stream();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            assert!(read_all(&bad).is_err(), "flip at {at} accepted");
        }
        for len in 0..bytes.len() {
            let e = read_all(&bytes[..len]).unwrap_err();
            assert!(matches!(e, StreamError::Truncated { .. }), "{len}: {e}");
        }
        assert_eq!(read_all(&bytes).unwrap(), 3);
    }

    #[test]
    fn records_outside_ram_or_out_of_order_are_refused() {
        let mut w = StreamWriter::new(Vec::new(), 2 * PAGE_SIZE).unwrap();
        w.ram(PAGE_SIZE, &[1u8; 2 * PAGE_SIZE as usize]).unwrap();
        assert!(matches!(read_all(&w.out), Err(StreamError::Record(_))));
        let mut w = StreamWriter::new(Vec::new(), 2 * PAGE_SIZE).unwrap();
        w.ram(1, &[1u8; PAGE_SIZE as usize]).unwrap();
        assert!(matches!(read_all(&w.out), Err(StreamError::Record(_))));
        let mut w = StreamWriter::new(Vec::new(), 2 * PAGE_SIZE).unwrap();
        w.end().unwrap();
        assert!(matches!(read_all(&w.out), Err(StreamError::Record(_))));
        let mut w = StreamWriter::new(Vec::new(), 2 * PAGE_SIZE).unwrap();
        w.state(b"{}").unwrap();
        w.state(b"{}").unwrap();
        assert!(matches!(read_all(&w.out), Err(StreamError::Record(_))));
        let w = StreamWriter::new(Vec::new(), 1 << 40).unwrap();
        assert!(matches!(
            StreamReader::new(&w.out[..], 1 << 30),
            Err(StreamError::Header(_))
        ));
    }
}
