//! One queue's worker: pops requests, runs them on the queue's executor and
//! puts completions on the used ring.

use std::io;
use std::sync::Arc;

use blkgraph_graph::aio::Executor;
use blkgraph_graph::Node;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;

use super::request::{Completion, DeviceLimits, GuestMemory, Request};

/// A vring of this device.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// The state of one queue's worker, locked only by that queue's thread
/// (and by control paths that wait for its requests to drain).
pub struct QueueWorker {
    executor: Executor<Completion>,
    done: Vec<Completion>,
}

fn queue_error(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl QueueWorker {
    /// A worker with its own executor.
    pub fn new() -> io::Result<Self> {
        Ok(QueueWorker {
            executor: Executor::new()?,
            done: Vec::new(),
        })
    }

    /// The eventfd that signals completions; registered with the queue
    /// thread's epoll loop.
    pub fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.executor.event_fd()
    }

    /// Requests that have not completed.
    pub fn in_flight(&self) -> usize {
        self.executor.pending()
    }

    /// Handles a kick: pops every available chain, starts the requests and
    /// returns those that finished at once. With EVENT_IDX, notifications
    /// stay off while the queue is drained and the queue is checked again
    /// after they are re-enabled.
    pub fn process_queue(
        &mut self,
        vring: &Vring,
        memory: &Arc<GuestMemory>,
        root: &Arc<Node>,
        limits: &DeviceLimits,
        serial: &[u8],
        event_idx: bool,
    ) -> io::Result<()> {
        loop {
            if event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                std::iter::from_fn(|| queue.pop_descriptor_chain(memory.clone())).collect()
            };
            for chain in chains {
                let req = Request::parse(chain, memory, limits, serial);
                if req.is_done() {
                    self.done.push(req.complete(0));
                } else {
                    self.executor.spawn(req.execute(root.clone()));
                }
            }
            self.run(vring)?;
            if !event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    /// Handles the completion eventfd.
    pub fn process_completions(&mut self, vring: &Vring) -> io::Result<()> {
        self.executor.consume_event();
        self.run(vring)
    }

    /// Runs ready requests, puts finished ones on the used ring and
    /// notifies the driver once for the batch.
    fn run(&mut self, vring: &Vring) -> io::Result<()> {
        let done = &mut self.done;
        self.executor.run(|c| done.push(c));
        if self.done.is_empty() {
            return Ok(());
        }
        for c in self.done.drain(..) {
            vring.add_used(c.head, c.len).map_err(queue_error)?;
        }
        if vring.needs_notification().map_err(queue_error)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Completes every request in flight after the frontend went away; their
    /// results have nowhere to go.
    pub fn abandon_in_flight(&mut self) {
        while self.executor.pending() > 0 {
            let mut pfd = libc::pollfd {
                fd: self.executor.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is valid for the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.executor.consume_event();
            self.executor.run(|_| ());
        }
        self.done.clear();
    }
}
