//! One queue's worker: pops requests, runs them on the queue's executor and
//! puts completions on the used ring.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkgraph_graph::aio::Executor;
use blkgraph_graph::Node;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::request::{Completion, DeviceLimits, GuestMemory, Request};

/// A vring of this device.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// What a queue worker needs to start requests.
pub struct QueueContext<'a> {
    /// Guest memory of the current frontend; loaded again for every batch,
    /// since the frontend may add regions while the worker polls.
    pub memory: &'a GuestMemoryAtomic<GuestMemory>,
    /// The node requests go to.
    pub root: &'a Arc<Node>,
    /// Device limits for validation.
    pub limits: DeviceLimits,
    /// The GET_ID serial.
    pub serial: &'a [u8],
    /// Whether EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// How long to keep polling after the last request (0: never).
    pub poll: Duration,
    /// Non-zero while the device is quiesced: take no new request.
    pub pauses: &'a std::sync::atomic::AtomicUsize,
}

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
    /// completes those that finished at once. With EVENT_IDX, notifications
    /// stay off while the queue is drained and the queue is checked again
    /// after they are re-enabled. Then, for up to `poll` after the last
    /// request, the worker keeps polling the ring and the completions
    /// instead of going back to sleep, so a busy driver need not kick.
    pub fn process_queue(&mut self, vring: &Vring, queue: &QueueContext<'_>) -> io::Result<()> {
        loop {
            if queue.event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            self.pop_and_start(vring, queue)?;
            if !queue.poll.is_zero() {
                self.poll(vring, queue)?;
            }
            if !queue.event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    fn pop_and_start(&mut self, vring: &Vring, queue: &QueueContext<'_>) -> io::Result<()> {
        let memory = queue.memory.memory().into_inner();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            std::iter::from_fn(|| q.pop_descriptor_chain(memory.clone())).collect()
        };
        for chain in chains {
            let req = Request::parse(chain, &memory, &queue.limits, queue.serial);
            if req.is_done() {
                self.done.push(req.complete(0));
            } else {
                self.executor.spawn(req.execute(queue.root.clone()));
            }
        }
        self.run(vring)
    }

    /// Busy-polls the available ring and the executor until `queue.poll`
    /// passes without a new request.
    fn poll(&mut self, vring: &Vring, queue: &QueueContext<'_>) -> io::Result<()> {
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < queue.poll && queue.pauses.load(Ordering::SeqCst) == 0 {
            let available = {
                let memory = queue.memory.memory();
                let state = vring.get_ref();
                let q = state.get_queue();
                q.avail_idx(&*memory, Ordering::Acquire)
                    .map(|idx| idx.0 != q.next_avail())
                    .map_err(queue_error)?
            };
            if available {
                self.pop_and_start(vring, queue)?;
                idle_since = Instant::now();
            } else if self.executor.pending() > 0 {
                self.run(vring)?;
            }
        }
        Ok(())
    }

    /// Makes the queue's thread look at the queue and its completions.
    pub fn notify(&self) {
        self.executor.notify();
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
        self.executor.run_until_idle(|_| ());
        self.done.clear();
    }
}
