// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination side: read the stream into fresh RAM, check it, answer,
//! wait for the source to let go, and build the VM.

use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use log::{error, info};

use super::stream::{Record, Reply, StreamReader};
use super::{Connection, MigrationAddress, MigrationError};
use crate::vmm::memory::{self, layout, GuestRam};
use crate::vmm::restore::device_snapshots;
use crate::vmm::snapshot::VmState;
use crate::vmm::{error_chain, DeviceRegistry, DeviceSpec, Vmm, VmmError};

/// How long the source gets to close the connection (and with it let go
/// of its backends and images) once the destination has accepted.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream read to its end: the state and the RAM it filled.
struct Received {
    state: VmState,
    ram: GuestRam,
    pages: u64,
    bytes: u64,
}

/// Wait on `address` for a source, take the VM it sends and build it here,
/// each device in the home `devices` gives (or the one the source had, when
/// empty). A corrupt, truncated or unsuitable stream is refused (the source
/// is told, and carries on) and returned as the error.
pub fn receive(
    address: &MigrationAddress,
    devices: Vec<DeviceSpec>,
    registry: &DeviceRegistry,
) -> Result<Vmm, VmmError> {
    let listener = address.listen()?;
    info!("waiting for a migration on {address}");
    let conn = listener
        .accept()
        .map_err(|source| MigrationError::Connect {
            what: "accept on",
            address: address.to_string(),
            source,
        })?;
    drop(listener);
    let started = Instant::now();
    let mut reader = BufReader::with_capacity(1 << 20, conn);
    let received = match read_stream(&mut reader, &devices, registry) {
        Ok(r) => r,
        Err(e) => {
            error!("refusing the migration: {}", error_chain(&e));
            // Best effort: a source that went away needs no answer.
            let _ = reader.get_mut().write_all(&[Reply::Refused as u8]);
            return Err(e);
        }
    };
    let conn = reader.get_mut();
    conn.write_all(&[Reply::Accepted as u8])
        .and_then(|()| conn.flush())
        .map_err(|source| {
            MigrationError::Stream(super::StreamError::Io {
                what: "answering",
                source,
            })
        })?;
    let accepted = Instant::now();
    wait_for_release(conn)?;
    info!(
        "migration received from {address}: {} MiB RAM, {} pages ({} MiB) in {:.0} ms; the source \
         let go {:.1} ms after the answer",
        received.state.mem_mib,
        received.pages,
        received.bytes >> 20,
        accepted.duration_since(started).as_secs_f64() * 1e3,
        accepted.elapsed().as_secs_f64() * 1e3,
    );
    Vmm::from_state(
        &received.state,
        received.ram,
        devices,
        registry,
        &format!("migration from {address}"),
        accepted,
    )
}

/// The source closes the connection when it has ended; nothing else may
/// come.
fn wait_for_release(conn: &mut Connection) -> Result<(), VmmError> {
    let io = |source| {
        MigrationError::Stream(super::StreamError::Io {
            what: "waiting for the source to let go",
            source,
        })
    };
    conn.set_read_timeout(Some(RELEASE_TIMEOUT)).map_err(io)?;
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => Ok(()),
        Ok(_) => Err(MigrationError::Stream(super::StreamError::Record(
            "data after the end of the stream".into(),
        ))
        .into()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(MigrationError::SourceHeld(RELEASE_TIMEOUT).into())
        }
        // A reset is the source ending too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(io(e).into()),
    }
}

fn read_stream(
    input: &mut BufReader<Connection>,
    devices: &[DeviceSpec],
    registry: &DeviceRegistry,
) -> Result<Received, VmmError> {
    let mut reader =
        StreamReader::new(input, layout::MAX_MEM_MIB << 20).map_err(MigrationError::Stream)?;
    let ram_len = reader.ram_len();
    if ram_len % (1 << 20) != 0 {
        return Err(MigrationError::Stream(super::StreamError::Header(
            "RAM is not a whole number of MiB",
        ))
        .into());
    }
    let ram = memory::create(ram_len >> 20)?;
    let file = memory::ram_file(&ram.memory).ok_or(VmmError::NoRamFile)?;
    let (mut pages, mut bytes) = (0u64, 0u64);
    let mut state = None;
    loop {
        match reader.next_record().map_err(MigrationError::Stream)? {
            Record::Ram { gpa, data } => {
                file.write_all_at(data, gpa)
                    .map_err(|source| MigrationError::Ram {
                        what: "writing a page",
                        source,
                    })?;
                pages += data.len() as u64 / super::stream::PAGE_SIZE;
                bytes += data.len() as u64;
            }
            Record::State(json) => {
                state =
                    Some(serde_json::from_slice::<VmState>(json).map_err(MigrationError::State)?);
            }
            Record::End => break,
        }
    }
    // The reader refuses END before STATE.
    let state = state.ok_or(MigrationError::Stream(super::StreamError::Record(
        "no state".into(),
    )))?;
    if state.mem_mib.checked_shl(20) != Some(ram_len) {
        return Err(VmmError::RamSize(state.mem_mib));
    }
    // What can be checked before the source lets go: the devices given
    // here must fit the ones it sends.
    let specs: Vec<DeviceSpec> = if devices.is_empty() {
        state.devices.iter().map(|d| d.spec.clone()).collect()
    } else {
        devices.to_vec()
    };
    device_snapshots(&specs, &state.devices, registry)?;
    Ok(Received {
        state,
        ram,
        pages,
        bytes,
    })
}
