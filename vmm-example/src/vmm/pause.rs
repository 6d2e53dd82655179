// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stopping the vCPUs at a consistent point (a snapshot, the last step of
//! a migration) and letting them go on when the move did not happen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu::{VcpuError, VcpuState};

/// Stops running vCPUs at a consistent point and collects their state.
#[derive(Debug)]
pub struct PauseGate {
    requested: AtomicBool,
    states: Mutex<Vec<Result<VcpuState, VcpuError>>>,
    arrived: Condvar,
    reopened: Condvar,
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: interrupting KVM_RUN (EINTR) is the whole point.
}

impl PauseGate {
    /// A gate nobody has closed, with the kick signal's handler installed.
    pub fn new() -> Result<Arc<Self>, VcpuError> {
        register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::KickHandler)?;
        Ok(Arc::new(PauseGate {
            requested: AtomicBool::new(false),
            states: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            reopened: Condvar::new(),
        }))
    }

    pub(super) fn is_closed(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub(super) fn hand_over(&self, state: Result<VcpuState, VcpuError>) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.push(state);
        self.arrived.notify_all();
    }

    /// Stop every vCPU in `threads` and return their states by vCPU index.
    /// A vCPU can be between its check of the gate and `KVM_RUN` when the
    /// kick lands, so the kick is repeated until all have stopped.
    pub fn stop_all(
        &self,
        threads: &[JoinHandle<()>],
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, VcpuError> {
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        while states.len() < threads.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout {
                    stopped: states.len(),
                    expected: threads.len(),
                    timeout,
                });
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // A thread that already parked ignores the signal.
                let _ = t.kill(kick_signal());
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            states = self
                .arrived
                .wait_timeout(states, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut out = states.drain(..).collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Let the vCPUs stopped by [`PauseGate::stop_all`] run on from where
    /// they stopped.
    pub fn open(&self) {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        self.requested.store(false, Ordering::Release);
        drop(states);
        self.reopened.notify_all();
    }

    /// Block a stopped vCPU's thread until [`PauseGate::open`].
    pub(super) fn wait_until_open(&self) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        while self.is_closed() {
            states = self
                .reopened
                .wait(states)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}
