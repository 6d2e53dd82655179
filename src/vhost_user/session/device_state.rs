// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DEVICE_STATE: the device's own state saved to or loaded from a pipe
//! the frontend gives (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`).

use super::*;
use crate::vhost_user::TransferError;

impl<B: DeviceBackend> Session<'_, B> {
    /// `SET_DEVICE_STATE_FD`: start saving the device's state into `file`
    /// or loading it from there. Only the STOPPED phase exists: the rings
    /// were stopped with GET_VRING_BASE before this.
    pub(super) fn set_device_state_fd(
        &mut self,
        direction: StateDirection,
        file: File,
    ) -> RequestResult {
        // A transfer still running is cancelled (its thread ends) first.
        self.transfer = None;
        let transfer = if direction == StateDirection::Save {
            let snap = self.core.snapshot(Some(self.acked_protocol))?;
            // The rings were already stopped; a frontend that cancels the
            // migration restarts them with SET_VRING_KICK as usual.
            self.core.resume();
            let bytes = crate::snapshot::encode(&snap).map_err(RequestError::StateEncode)?;
            StateTransfer::save(file, bytes)
        } else {
            let cap = crate::snapshot::MAX_PAYLOAD_LEN as u64 + 64;
            StateTransfer::load(file, cap)
        };
        self.transfer = Some(transfer.map_err(RequestError::StateTransfer)?);
        // Success, and no fd of our own: the frontend's fd is used.
        Ok(u64_reply(0x100))
    }

    /// Finish the transfer started by SET_DEVICE_STATE_FD; true on success.
    pub(super) fn check_device_state(&mut self) -> bool {
        let loading = self.transfer.as_ref().is_some_and(StateTransfer::is_load);
        let result = match self.transfer.take() {
            None => Err(CheckError::NotStarted),
            Some(t) => t.finish(self.check_grace).map_err(CheckError::Transfer),
        };
        let result = result.and_then(|bytes| {
            if loading {
                self.load_device_state(&bytes)
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => true,
            Err(e) => {
                warn!("device state transfer failed: {}", crate::error_chain(&e));
                false
            }
        }
    }

    /// The frontend sets up features and rings itself; what travels here
    /// is what only the backend knows.
    pub(super) fn load_device_state(&mut self, bytes: &[u8]) -> Result<(), CheckError> {
        let offered = self.protocol_offered();
        self.core
            .load_device_state(bytes, TRANSPORT_FEATURES, offered)
            .map_err(CheckError::Load)
    }
}

/// Why `CHECK_DEVICE_STATE` reports failure (logged; the frontend sees 1).
#[derive(Debug, thiserror::Error)]
pub(super) enum CheckError {
    /// No `SET_DEVICE_STATE_FD` came first.
    #[error("no state transfer was started")]
    NotStarted,
    /// The pipe transfer failed or was cancelled.
    #[error("the state transfer failed")]
    Transfer(#[source] TransferError),
    /// The bytes loaded are not a state this device takes.
    #[error("the loaded state was refused")]
    Load(#[source] crate::core::LoadStateError),
}
