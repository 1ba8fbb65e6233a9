//! The pause gate of an export: the graph drains the export by closing
//! it, which waits until every request source of the export (a virtqueue
//! of a vhost-user device, an NBD connection) has no request in flight.
//!
//! A source runs on its own thread and starts requests only while holding
//! its [`Requests`] lock and after checking [`PauseGate::paused`]; so once
//! the gate is closed and the source's lock has been seen with nothing in
//! flight, the source starts nothing until the gate opens. The only shared
//! state a source reads per batch is the gate's counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blkgraph_graph::DrainParent;
use parking_lot::{Condvar, Mutex, MutexGuard};

/// A thread that starts requests of an export.
pub trait Source: Send + Sync {
    /// Makes the source's thread look at the gate again.
    fn kick(&self);

    /// Returns once the source has no request in flight.
    fn wait_idle(&self);
}

/// How many requests a source's state has in flight.
pub trait InFlight {
    /// Requests started and not completed.
    fn in_flight(&self) -> usize;
}

impl InFlight for usize {
    fn in_flight(&self) -> usize {
        *self
    }
}

/// A source's state, locked by its thread while it starts and completes
/// requests, with a condition that says when nothing is in flight.
pub struct Requests<T> {
    state: Mutex<T>,
    idle: Condvar,
    /// Threads in [`Requests::wait_idle`]; changed under the lock, so the
    /// source thread wakes them only when there are any.
    waiters: AtomicUsize,
}

impl<T: InFlight> Requests<T> {
    /// Wraps a source's state.
    pub fn new(state: T) -> Self {
        Requests {
            state: Mutex::new(state),
            idle: Condvar::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.state.lock()
    }

    /// Wakes the waiters of [`Requests::wait_idle`] if `state` (the locked
    /// state) has nothing in flight; call after completing requests.
    pub fn notify_if_idle(&self, state: &T) {
        if state.in_flight() == 0 && self.waiters.load(Ordering::SeqCst) > 0 {
            self.idle.notify_all();
        }
    }

    /// Returns once nothing is in flight.
    pub fn wait_idle(&self) {
        let mut state = self.lock();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        self.idle.wait_while(&mut state, |s| s.in_flight() > 0);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gate: closed while any drained section is in progress.
#[derive(Default)]
pub struct PauseGate {
    pauses: AtomicUsize,
    sources: Mutex<Vec<Arc<dyn Source>>>,
}

impl PauseGate {
    /// An open gate without sources.
    pub fn new() -> Arc<Self> {
        Arc::new(PauseGate::default())
    }

    /// Whether sources must not start requests now.
    pub fn paused(&self) -> bool {
        self.pauses.load(Ordering::SeqCst) > 0
    }

    /// Adds a source; it must check the gate before its first request.
    pub fn add_source(&self, source: Arc<dyn Source>) {
        self.sources.lock().push(source);
    }

    /// Removes a source (by identity) that starts no more requests.
    pub fn remove_source(&self, source: &Arc<dyn Source>) {
        self.sources.lock().retain(|s| !Arc::ptr_eq(s, source));
    }

    fn sources(&self) -> Vec<Arc<dyn Source>> {
        self.sources.lock().clone()
    }
}

impl DrainParent for PauseGate {
    fn drained_begin(&self) {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        for s in self.sources() {
            s.kick();
            s.wait_idle();
        }
    }

    fn drained_end(&self) {
        let ended = self
            .pauses
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match ended {
            Ok(1) => {
                for s in self.sources() {
                    s.kick();
                }
            }
            Ok(_) => {} // another drained section is still in progress
            Err(_) => log::error!("export gate opened more often than it was closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// A source whose thread runs "requests" that take a while.
    struct Worker {
        requests: Requests<usize>,
        kicks: AtomicUsize,
    }

    impl Source for Worker {
        fn kick(&self) {
            self.kicks.fetch_add(1, Ordering::SeqCst);
        }

        fn wait_idle(&self) {
            self.requests.wait_idle()
        }
    }

    #[test]
    fn a_closed_gate_waits_for_requests_in_flight_and_sources_start_none() {
        let gate = PauseGate::new();
        let worker = Arc::new(Worker {
            requests: Requests::new(0),
            kicks: AtomicUsize::new(0),
        });
        gate.add_source(worker.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (gate, worker, stop) = (gate.clone(), worker.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut n = worker.requests.lock();
                    if !gate.paused() {
                        *n += 1; // starts one
                    }
                    drop(n);
                    std::thread::sleep(Duration::from_micros(200));
                    let mut n = worker.requests.lock();
                    *n = n.saturating_sub(1); // completes one
                    worker.requests.notify_if_idle(&n);
                }
            })
        };
        for _ in 0..50 {
            gate.drained_begin();
            assert_eq!(*worker.requests.lock(), 0);
            std::thread::sleep(Duration::from_micros(500));
            assert_eq!(*worker.requests.lock(), 0, "a request started while paused");
            gate.drained_end();
            std::thread::sleep(Duration::from_micros(500));
        }
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap();
        assert_eq!(worker.kicks.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn sections_nest_and_an_extra_end_does_not_open_a_closed_gate() {
        let gate = PauseGate::new();
        gate.drained_begin();
        gate.drained_begin();
        gate.drained_end();
        assert!(gate.paused());
        gate.drained_end();
        assert!(!gate.paused());
        // Unbalanced: refused, the counter does not wrap.
        gate.drained_end();
        assert!(!gate.paused());
        gate.drained_begin();
        assert!(gate.paused());
    }
}
