// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Features, device status, the config space and the session itself.

use super::*;

impl<B: DeviceBackend> Session<'_, B> {
    /// What `GET_FEATURES` offers: the device's features and the vhost-user
    /// ones the kit implements.
    pub(super) fn offered_features(&self) -> u64 {
        self.core.device_features() | TRANSPORT_FEATURES
    }

    pub(super) fn set_features(&mut self, features: u64) -> RequestResult {
        self.core.set_features(features, TRANSPORT_FEATURES)?;
        self.core
            .dirty_log()
            .set_active(features & VHOST_F_LOG_ALL != 0);
        if !self.protocol_negotiated() {
            // Without protocol features, started rings are enabled.
            for q in 0..self.core.num_queues() as u32 {
                self.core.set_queue_enabled(q, true)?;
            }
        }
        Ok(Outcome::Ack)
    }

    pub(super) fn set_protocol_features(&mut self, features: u64) -> RequestResult {
        let unoffered = features & !self.protocol_offered();
        if unoffered != 0 {
            return Err(RequestError::UnofferedProtocolFeatures(unoffered));
        }
        self.acked_protocol = features;
        self.protocol_set = true;
        Ok(Outcome::Ack)
    }

    /// `RESET_OWNER` / `RESET_DEVICE`.
    pub(super) fn reset(&mut self) -> Outcome {
        self.core.reset();
        self.status = 0;
        Outcome::Ack
    }

    /// `SET_STATUS`: a driver writing 0 resets the device.
    pub(super) fn set_status(&mut self, status: u8) -> Outcome {
        if status == 0 && self.status != 0 {
            info!("driver reset the device (status 0)");
            self.core.reset();
        }
        self.status = status;
        Outcome::Ack
    }

    /// `GET_CONFIG`: the request's header, then the bytes it asked for.
    pub(super) fn get_config(&mut self, header: VhostUserConfig) -> RequestResult {
        let mut data = vec![0u8; header.size as usize];
        self.core.read_config(header.offset, &mut data)?;
        let mut reply = header.as_slice().to_vec();
        reply.extend_from_slice(&data);
        Ok(Outcome::Reply(reply))
    }

    pub(super) fn set_config(&mut self, offset: u32, data: &[u8]) -> RequestResult {
        self.core.write_config(offset, data)?;
        Ok(Outcome::Ack)
    }

    /// `SET_BACKEND_REQ_FD`: the channel for the backend's own requests.
    pub(super) fn set_backend_req_fd(&mut self, file: File) -> Outcome {
        self.channel
            .set(UnixStream::from(std::os::fd::OwnedFd::from(file)));
        Outcome::Ack
    }
}
