// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a request sends back, and decoding its fixed-size payloads.

use super::*;

/// What a successful request sends back.
pub(super) enum Outcome {
    /// Nothing beyond an optional REPLY_ACK.
    Ack,
    /// An explicit reply payload.
    Reply(Vec<u8>),
    /// An explicit reply payload with a file descriptor.
    ReplyWithFile(Vec<u8>, std::sync::Arc<InflightArea>),
    /// An explicit reply payload with a file descriptor of our own, closed
    /// once sent.
    #[cfg(feature = "postcopy")]
    ReplyWithFd(Vec<u8>, std::os::fd::OwnedFd),
}

pub(super) type RequestResult = Result<Outcome, RequestError>;

pub(super) fn parse<T: ByteValued + Default>(
    request: FrontendReq,
    payload: &[u8],
) -> Result<T, RequestError> {
    let mut value = T::default();
    if payload.len() != std::mem::size_of::<T>() {
        return Err(RequestError::BadPayload {
            request,
            len: payload.len(),
        });
    }
    value.as_mut_slice().copy_from_slice(payload);
    Ok(value)
}

pub(super) fn u64_reply(v: u64) -> Outcome {
    Outcome::Reply(VhostUserU64::new(v).as_slice().to_vec())
}

/// Whether a request carries an explicit reply (so an error reply is owed).
pub(super) fn has_reply(req: FrontendReq) -> bool {
    matches!(
        req,
        FrontendReq::GET_FEATURES
            | FrontendReq::GET_PROTOCOL_FEATURES
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::GET_QUEUE_NUM
            | FrontendReq::GET_CONFIG
            | FrontendReq::GET_MAX_MEM_SLOTS
            | FrontendReq::GET_STATUS
            | FrontendReq::GET_INFLIGHT_FD
            | FrontendReq::GET_SHARED_OBJECT
            | FrontendReq::CHECK_DEVICE_STATE
            | FrontendReq::SET_DEVICE_STATE_FD
            | FrontendReq::GET_SHMEM_CONFIG
            | FrontendReq::POSTCOPY_ADVISE
            | FrontendReq::POSTCOPY_END
    )
}
