//! What the control plane holds of one client connection: how to wake,
//! pause-check and disconnect its thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::socket::Stream;

/// The shared part of one connection.
pub struct Client {
    /// A number for logs.
    pub id: u64,
    stream: Stream,
    wake: EventFd,
    stop: AtomicBool,
    /// Requests of this connection that run in the graph. The connection
    /// thread holds the lock while it takes and starts requests, so a
    /// quiescer that waits here sees every request it could start.
    gate: Mutex<usize>,
    drained: Condvar,
}

impl Client {
    /// A client on `stream` (a second handle on the connection's socket).
    pub fn new(id: u64, stream: Stream) -> std::io::Result<Client> {
        Ok(Client {
            id,
            stream,
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            gate: Mutex::new(0),
            drained: Condvar::new(),
        })
    }

    /// The eventfd the connection thread polls for control changes.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Makes the connection thread look at its state again.
    pub fn kick(&self) {
        let _ = self.wake.write(1);
    }

    /// Clears the wake eventfd.
    pub fn consume_kick(&self) {
        let _ = self.wake.read();
    }

    /// Whether the connection must end.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Ends the connection: the socket is shut down (a blocked handshake
    /// read returns) and the thread finishes its requests and exits.
    pub fn disconnect(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stream.shutdown();
        self.kick();
    }

    /// Locks the gate; the guard holds the number of requests in flight.
    pub fn gate(&self) -> MutexGuard<'_, usize> {
        self.gate.lock().unwrap()
    }

    /// Updates the count of requests in flight under `gate` and, when none
    /// is left and the export is `paused`, wakes quiescers. (Only a
    /// quiescer waits, and it pauses the export before it takes the gate,
    /// so without a pause there is nobody to wake.)
    pub fn set_in_flight(&self, gate: &mut MutexGuard<'_, usize>, n: usize, paused: bool) {
        **gate = n;
        if n == 0 && paused {
            self.drained.notify_all();
        }
    }

    /// Waits until the connection has no request in flight. Callers make
    /// sure first that it starts no new one (the export is paused).
    pub fn wait_drained(&self) {
        let gate = self.gate();
        drop(self.drained.wait_while(gate, |n| *n > 0).unwrap());
    }
}
