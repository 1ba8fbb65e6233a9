//! What the control plane holds of one client connection: how to wake
//! and disconnect its thread, and its requests as a request source of the
//! export's pause gate.

use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::socket::Stream;
use crate::export::{Requests, Source};

/// The shared part of one connection.
pub struct Client {
    /// A number for logs.
    pub id: u64,
    stream: Stream,
    wake: EventFd,
    stop: AtomicBool,
    /// Requests of this connection that run in the graph. The connection
    /// thread holds the lock while it takes and starts requests, so a
    /// drained section that waits here sees every request it could start.
    pub requests: Requests<usize>,
}

impl Client {
    /// A client on `stream` (a second handle on the connection's socket).
    pub fn new(id: u64, stream: Stream) -> std::io::Result<Client> {
        Ok(Client {
            id,
            stream,
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            requests: Requests::new(0),
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
}

impl Source for Client {
    fn kick(&self) {
        Client::kick(self);
    }

    fn wait_idle(&self) {
        self.requests.wait_idle();
    }
}
