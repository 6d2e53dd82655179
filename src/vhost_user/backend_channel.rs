// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backend-to-frontend request channel (`SET_BACKEND_REQ_FD`), used to
//! tell the frontend the device config space changed.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::warn;
use vhost::vhost_user::message::BackendReq;

use super::connection::Connection;

/// A shared handle to the channel; empty until the frontend provides it.
#[derive(Clone, Debug, Default)]
pub struct BackendChannel {
    conn: Arc<Mutex<Option<Connection>>>,
}

impl BackendChannel {
    /// Install the socket the frontend sent.
    pub fn set(&self, sock: UnixStream) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(Connection::new(sock));
    }

    /// Drop the socket.
    pub fn clear(&self) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Send `CONFIG_CHANGE_MSG`. Failures are logged: the device keeps
    /// running, the frontend just misses the notice.
    pub fn notify_config_change(&self) {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = guard.as_mut() else {
            warn!("config changed but the frontend gave no backend channel");
            return;
        };
        // The notice carries no payload: the frontend re-reads the config.
        let code: u32 = BackendReq::CONFIG_CHANGE_MSG.into();
        if let Err(e) = conn.send_request(code, 0, &[], &[]) {
            warn!("cannot send config-change notice: {e}");
            *guard = None;
        }
    }
}
