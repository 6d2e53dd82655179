// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How a device holds its vrings: owned by one worker, or shared behind
//! a mutex or a read-write lock.

use super::*;

/// Exclusive access to a [`Vring`], whatever the sharing model.
pub trait VringT: Send + 'static {
    /// The guard [`VringT::lock`] returns.
    type Guard<'a>: DerefMut<Target = Vring>
    where
        Self: 'a;

    /// Wrap a live vring.
    fn from_vring(vring: Vring) -> Self;

    /// Get exclusive access for a batch of operations.
    fn lock(&self) -> Self::Guard<'_>;

    /// Convenience: export the state.
    fn state(&self) -> VringState {
        self.lock().state()
    }

    /// Convenience: put a chain on the used ring.
    fn add_used(&self, head: u16, len: u32) -> Result<(), VringError> {
        self.lock().add_used(head, len)
    }

    /// Convenience: signal the driver if it wants it.
    fn notify_if_needed(&self) -> Result<bool, VringError> {
        self.lock().notify_if_needed()
    }

    /// Convenience: signal the driver unconditionally.
    fn signal_used_queue(&self) -> Result<(), VringError> {
        self.lock().signal_used_queue()
    }
}

/// A vring owned by a single worker thread: no lock, only a borrow flag.
#[derive(Debug)]
pub struct VringOwned(RefCell<Vring>);

impl VringT for VringOwned {
    type Guard<'a> = RefMut<'a, Vring>;

    fn from_vring(vring: Vring) -> Self {
        VringOwned(RefCell::new(vring))
    }

    fn lock(&self) -> RefMut<'_, Vring> {
        self.0.borrow_mut()
    }
}

/// A vring shareable between threads behind a mutex.
#[derive(Clone, Debug)]
pub struct VringMutex(Arc<Mutex<Vring>>);

impl VringT for VringMutex {
    type Guard<'a> = MutexGuard<'a, Vring>;

    fn from_vring(vring: Vring) -> Self {
        VringMutex(Arc::new(Mutex::new(vring)))
    }

    fn lock(&self) -> MutexGuard<'_, Vring> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A vring shareable between threads behind a read-write lock.
#[derive(Clone, Debug)]
pub struct VringRwLock(Arc<RwLock<Vring>>);

impl VringRwLock {
    /// Shared read access, e.g. to export state while workers run.
    pub fn read_state(&self) -> VringState {
        self.0.read().unwrap_or_else(|e| e.into_inner()).state()
    }
}

impl VringT for VringRwLock {
    type Guard<'a> = RwLockWriteGuard<'a, Vring>;

    fn from_vring(vring: Vring) -> Self {
        VringRwLock(Arc::new(RwLock::new(vring)))
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Vring> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}
