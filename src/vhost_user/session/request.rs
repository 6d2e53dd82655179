// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Frontend messages decoded into typed requests.
//!
//! [`decode`] is the one place where a request's payload size, its fields'
//! ranges and its fd count are checked. It looks at nothing but the message,
//! so it is unit-tested on bytes alone; what depends on the session (the
//! number of queues, the memory table, the negotiated features) is checked
//! by the handlers.

use std::fs::File;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserLog, VhostUserMemory,
    VhostUserMemoryRegion, VhostUserSingleMemoryRegion, VhostUserTransferDeviceState, VhostUserU64,
    VhostUserVringAddr, VhostUserVringState, MAX_ATTACHED_FD_ENTRIES, VHOST_USER_CONFIG_SIZE,
};

use super::outcome::parse;
use super::RequestError;
use crate::core::CoreError;

const VRING_IDX_MASK: u64 = 0xff;
const VRING_NOFD_MASK: u64 = 0x100;

/// Which of a vring's three eventfds a `SET_VRING_*` request sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum VringFdKind {
    /// `SET_VRING_KICK`: driver → device.
    Kick,
    /// `SET_VRING_CALL`: device → driver.
    Call,
    /// `SET_VRING_ERR`: device errors.
    Err,
}

/// The direction of a `SET_DEVICE_STATE_FD` transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StateDirection {
    /// The backend writes its state into the fd.
    Save,
    /// The backend reads its state from the fd.
    Load,
}

/// One frontend request, its payload decoded and its fds taken. (Not
/// `Debug`: the `vhost` crate's payload types are not.)
pub(super) enum Request {
    /// `GET_FEATURES`.
    GetFeatures,
    /// `SET_FEATURES`.
    SetFeatures(u64),
    /// `GET_PROTOCOL_FEATURES`.
    GetProtocolFeatures,
    /// `SET_PROTOCOL_FEATURES`.
    SetProtocolFeatures(u64),
    /// `SET_OWNER`.
    SetOwner,
    /// `RESET_OWNER` or `RESET_DEVICE`.
    Reset,
    /// `GET_QUEUE_NUM`.
    GetQueueNum,
    /// `GET_MAX_MEM_SLOTS`.
    GetMaxMemSlots,
    /// `SET_MEM_TABLE`: the table's header and each region with its fd.
    SetMemTable {
        /// The header, echoed in a postcopy reply.
        header: VhostUserMemory,
        /// The regions, in the order of the message.
        regions: Vec<(VhostUserMemoryRegion, File)>,
    },
    /// `ADD_MEM_REG`.
    AddMemReg(VhostUserSingleMemoryRegion, File),
    /// `REM_MEM_REG`.
    RemMemReg(VhostUserSingleMemoryRegion),
    /// `SET_LOG_BASE`.
    SetLogBase(VhostUserLog, File),
    /// `SET_LOG_FD` (accepted and ignored: the kit logs through shared memory).
    SetLogFd,
    /// `SET_VRING_NUM`.
    SetVringNum {
        /// Queue index.
        index: u32,
        /// Queue size.
        size: u32,
    },
    /// `SET_VRING_ADDR` (frontend virtual addresses).
    SetVringAddr(VhostUserVringAddr),
    /// `SET_VRING_BASE`.
    SetVringBase {
        /// Queue index.
        index: u32,
        /// The next available index.
        base: u16,
    },
    /// `GET_VRING_BASE`.
    GetVringBase {
        /// Queue index.
        index: u32,
    },
    /// `SET_VRING_KICK`, `SET_VRING_CALL` or `SET_VRING_ERR`.
    SetVringFd {
        /// Which fd.
        kind: VringFdKind,
        /// Queue index (below 256; the session checks the queue count).
        index: u32,
        /// The fd, or none with the no-fd flag.
        file: Option<File>,
    },
    /// `SET_VRING_ENABLE`.
    SetVringEnable {
        /// Queue index.
        index: u32,
        /// Enable or disable.
        enable: bool,
    },
    /// `GET_CONFIG`.
    GetConfig {
        /// The request's header, echoed in the reply.
        header: VhostUserConfig,
    },
    /// `SET_CONFIG`.
    SetConfig {
        /// Offset into the config space.
        offset: u32,
        /// The bytes to write there.
        data: Vec<u8>,
    },
    /// `SET_BACKEND_REQ_FD`.
    SetBackendReqFd(File),
    /// `SET_STATUS`.
    SetStatus(u8),
    /// `GET_STATUS`.
    GetStatus,
    /// `SET_DEVICE_STATE_FD` (the STOPPED phase, the only one there is).
    SetDeviceStateFd(StateDirection, File),
    /// `CHECK_DEVICE_STATE`.
    CheckDeviceState,
    /// `GET_INFLIGHT_FD`.
    GetInflightFd(VhostUserInflight),
    /// `SET_INFLIGHT_FD`.
    SetInflightFd(VhostUserInflight, File),
    /// `POSTCOPY_ADVISE`.
    PostcopyAdvise,
    /// `POSTCOPY_LISTEN`.
    PostcopyListen,
    /// `POSTCOPY_END`.
    PostcopyEnd,
}

/// Decode request `req` from its payload `p` and the fds that came with it.
pub(super) fn decode(
    req: FrontendReq,
    p: &[u8],
    files: Vec<File>,
) -> Result<Request, RequestError> {
    let bad = || RequestError::BadPayload {
        request: req,
        len: p.len(),
    };
    let state = || parse::<VhostUserVringState>(req, p);
    Ok(match req {
        FrontendReq::GET_FEATURES => Request::GetFeatures,
        FrontendReq::SET_FEATURES => Request::SetFeatures(parse::<VhostUserU64>(req, p)?.value),
        FrontendReq::GET_PROTOCOL_FEATURES => Request::GetProtocolFeatures,
        FrontendReq::SET_PROTOCOL_FEATURES => {
            Request::SetProtocolFeatures(parse::<VhostUserU64>(req, p)?.value)
        }
        FrontendReq::SET_OWNER => Request::SetOwner,
        FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE => Request::Reset,
        FrontendReq::GET_QUEUE_NUM => Request::GetQueueNum,
        FrontendReq::GET_MAX_MEM_SLOTS => Request::GetMaxMemSlots,
        FrontendReq::SET_MEM_TABLE => mem_table(req, p, files)?,
        FrontendReq::ADD_MEM_REG => {
            let region = parse(req, p)?;
            Request::AddMemReg(region, one_file(req, files)?)
        }
        FrontendReq::REM_MEM_REG => Request::RemMemReg(parse(req, p)?),
        FrontendReq::SET_LOG_BASE => {
            let log = parse(req, p)?;
            Request::SetLogBase(log, one_file(req, files)?)
        }
        FrontendReq::SET_LOG_FD => Request::SetLogFd,
        FrontendReq::SET_VRING_NUM => {
            let s = state()?;
            Request::SetVringNum {
                index: s.index,
                size: s.num,
            }
        }
        FrontendReq::SET_VRING_ADDR => Request::SetVringAddr(parse(req, p)?),
        FrontendReq::SET_VRING_BASE => {
            let s = state()?;
            let base = u16::try_from(s.num).map_err(|_| bad())?;
            Request::SetVringBase {
                index: s.index,
                base,
            }
        }
        FrontendReq::GET_VRING_BASE => Request::GetVringBase {
            index: state()?.index,
        },
        FrontendReq::SET_VRING_KICK => vring_fd(req, VringFdKind::Kick, p, files)?,
        FrontendReq::SET_VRING_CALL => vring_fd(req, VringFdKind::Call, p, files)?,
        FrontendReq::SET_VRING_ERR => vring_fd(req, VringFdKind::Err, p, files)?,
        FrontendReq::SET_VRING_ENABLE => match state()? {
            s if s.num <= 1 => Request::SetVringEnable {
                index: s.index,
                enable: s.num == 1,
            },
            _ => return Err(bad()),
        },
        FrontendReq::GET_CONFIG => Request::GetConfig {
            header: config(req, p)?.0,
        },
        FrontendReq::SET_CONFIG => {
            let (header, data) = config(req, p)?;
            Request::SetConfig {
                offset: header.offset,
                data: data.to_vec(),
            }
        }
        FrontendReq::SET_BACKEND_REQ_FD => Request::SetBackendReqFd(one_file(req, files)?),
        FrontendReq::SET_STATUS => {
            let status = parse::<VhostUserU64>(req, p)?.value;
            Request::SetStatus(u8::try_from(status).map_err(|_| bad())?)
        }
        FrontendReq::GET_STATUS => Request::GetStatus,
        FrontendReq::SET_DEVICE_STATE_FD => device_state_fd(req, p, files)?,
        FrontendReq::CHECK_DEVICE_STATE => Request::CheckDeviceState,
        FrontendReq::GET_INFLIGHT_FD => Request::GetInflightFd(parse(req, p)?),
        FrontendReq::SET_INFLIGHT_FD => {
            let info = parse(req, p)?;
            Request::SetInflightFd(info, one_file(req, files)?)
        }
        FrontendReq::POSTCOPY_ADVISE => Request::PostcopyAdvise,
        FrontendReq::POSTCOPY_LISTEN => Request::PostcopyListen,
        FrontendReq::POSTCOPY_END => Request::PostcopyEnd,
        other => return Err(RequestError::Unsupported(other.into())),
    })
}

/// Exactly one fd, as most fd-carrying requests need.
fn one_file(req: FrontendReq, mut files: Vec<File>) -> Result<File, RequestError> {
    match files.len() {
        1 => Ok(files.remove(0)),
        got => Err(RequestError::BadFds {
            request: req,
            expected: 1,
            got,
        }),
    }
}

/// `SET_MEM_TABLE`: a header, 1 to [`MAX_ATTACHED_FD_ENTRIES`] regions, one
/// fd per region.
fn mem_table(req: FrontendReq, p: &[u8], files: Vec<File>) -> Result<Request, RequestError> {
    let hdr_len = std::mem::size_of::<VhostUserMemory>();
    let reg_len = std::mem::size_of::<VhostUserMemoryRegion>();
    let bad = || RequestError::BadPayload {
        request: req,
        len: p.len(),
    };
    let header = parse::<VhostUserMemory>(req, p.get(..hdr_len).ok_or_else(bad)?)?;
    let n = header.num_regions as usize;
    if n == 0 || n > MAX_ATTACHED_FD_ENTRIES || p.len() != hdr_len + n * reg_len {
        return Err(bad());
    }
    if files.len() != n {
        return Err(RequestError::BadFds {
            request: req,
            expected: n,
            got: files.len(),
        });
    }
    let regions = p[hdr_len..]
        .chunks_exact(reg_len)
        .map(|r| parse::<VhostUserMemoryRegion>(req, r))
        .zip(files)
        .map(|(r, file)| r.map(|r| (r, file)))
        .collect::<Result<_, _>>()?;
    Ok(Request::SetMemTable { header, regions })
}

/// `SET_VRING_KICK`/`CALL`/`ERR`: a u64 of queue index and no-fd flag, and
/// the fd unless the flag is set.
fn vring_fd(
    req: FrontendReq,
    kind: VringFdKind,
    p: &[u8],
    files: Vec<File>,
) -> Result<Request, RequestError> {
    let v = parse::<VhostUserU64>(req, p)?.value;
    let index = (v & VRING_IDX_MASK) as u32;
    if v & !(VRING_IDX_MASK | VRING_NOFD_MASK) != 0 {
        return Err(RequestError::Core(CoreError::QueueIndex(index)));
    }
    let file = if v & VRING_NOFD_MASK != 0 {
        None
    } else {
        Some(one_file(req, files)?)
    };
    Ok(Request::SetVringFd { kind, index, file })
}

/// `SET_DEVICE_STATE_FD`: a save or a load in the STOPPED phase (the only
/// phase there is), and its pipe.
fn device_state_fd(req: FrontendReq, p: &[u8], files: Vec<File>) -> Result<Request, RequestError> {
    let t = parse::<VhostUserTransferDeviceState>(req, p)?;
    let file = one_file(req, files)?;
    let direction = match (t.phase, t.direction) {
        (0, 0) => StateDirection::Save,
        (0, 1) => StateDirection::Load,
        _ => {
            return Err(RequestError::BadPayload {
                request: req,
                len: p.len(),
            })
        }
    };
    Ok(Request::SetDeviceStateFd(direction, file))
}

/// `GET_CONFIG`/`SET_CONFIG`: a header and `size` bytes, inside the
/// protocol's config space.
fn config(req: FrontendReq, p: &[u8]) -> Result<(VhostUserConfig, &[u8]), RequestError> {
    let hdr_len = std::mem::size_of::<VhostUserConfig>();
    let bad = || RequestError::BadPayload {
        request: req,
        len: p.len(),
    };
    let header = parse::<VhostUserConfig>(req, p.get(..hdr_len).ok_or_else(bad)?)?;
    let data = &p[hdr_len..];
    let fits = header
        .offset
        .checked_add(header.size)
        .is_some_and(|end| end <= VHOST_USER_CONFIG_SIZE);
    if header.size as usize != data.len() || !fits {
        return Err(bad());
    }
    Ok((header, data))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
