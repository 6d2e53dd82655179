// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stall reports: on SIGUSR2 the VMM logs, per device, what its transport
//! and guest memory say about every queue (see
//! [`MmioTransport::diagnostics`]). The nested test's watchdog sends it
//! before it gives up on a guest, so a stalled disk leaves evidence: which
//! device, whether the device completed the request (used index), whether
//! an interrupt was raised for it, and whether a vhost-user backend's call
//! reached the relay.

use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use signal_hook::consts::SIGUSR2;
use signal_hook::iterator::Signals;
use virtio_backend_kit::mmio::MmioTransport;

/// How long a report waits for a transport that a vCPU is using.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// A device to report on.
#[derive(Debug)]
pub struct Reported {
    /// Its description (kind and home).
    pub description: String,
    /// Its MMIO window base (how the guest names it).
    pub base: u64,
    /// The transport.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The report of one device, or why there is none.
pub fn report(device: &Reported) -> String {
    let started = Instant::now();
    loop {
        match device.transport.try_lock() {
            Ok(t) => return t.diagnostics().to_string(),
            Err(TryLockError::Poisoned(p)) => return p.into_inner().diagnostics().to_string(),
            Err(TryLockError::WouldBlock) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(TryLockError::WouldBlock) => {
                return format!(
                    "transport busy for {} ms (a vCPU is inside a register access)",
                    LOCK_WAIT.as_millis()
                )
            }
        }
    }
}

/// Log a report of every device each time the process gets SIGUSR2.
pub fn report_on_signal(devices: Vec<Reported>) {
    let mut signals = match Signals::new([SIGUSR2]) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot watch SIGUSR2 for stall reports: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("vmm-diagnostics".into())
        .spawn(move || {
            for _ in signals.forever() {
                info!("SIGUSR2: stall report of {} devices", devices.len());
                for d in &devices {
                    info!(
                        "VBK-STALL-REPORT dev@{:#x} {}: {}",
                        d.base,
                        d.description,
                        report(d)
                    );
                }
            }
        });
    if let Err(e) = spawned {
        error!("cannot start the stall-report thread: {e}");
    }
}
