// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An `event-manager` loop on a thread of its own, serving the subscribers
//! of `DeviceCore::with_event_loop` as a VMM's event loop would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

/// The running loop; [`EventLoop::stop`] ends it.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EventLoop {
    /// Add `subscribers` to a new `EventManager` and run it (50 ms
    /// timeouts) on a new thread until stopped.
    pub fn spawn<S>(subscribers: Vec<S>) -> Self
    where
        S: MutEventSubscriber + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_loop = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
            for s in subscribers {
                em.add_subscriber(Box::new(s));
            }
            while !stop_loop.load(Ordering::SeqCst) {
                em.run_with_timeout(50).unwrap();
            }
        });
        EventLoop { stop, thread }
    }

    /// Stop the loop and wait for its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}
