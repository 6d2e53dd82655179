// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Example devices, daemons and a small VMM built on `virtio-backend-kit`.
//!
//! The [`devices`] module holds reference device backends. Each implements
//! [`virtio_backend_kit::DeviceBackend`] once and can therefore run either as
//! a vhost-user daemon or inside a VMM process; [`vmm`] is that VMM.

#![warn(missing_debug_implementations)]

pub mod blkio_client;
pub mod daemon_cli;
pub mod devices;
pub mod vmm;
