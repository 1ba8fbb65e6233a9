//! One queue's worker: pops requests, runs them on the queue's executor and
//! puts completions on the used ring.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkgraph_graph::aio::{Executor, Notifier};
use blkgraph_graph::Node;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::device::MAX_QUEUE_SIZE;
use super::inflight::QueueInflight;
use super::request::{Completion, DeviceLimits, GuestMemory, Request};
use crate::export::{InFlight, PauseGate, Requests, Source};
use crate::stats::{now_ns, SourceStats};

/// A vring of this device.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// A descriptor chain popped from a vring.
type Chain = DescriptorChain<Arc<GuestMemory>>;

/// The longest one [`QueueWorker::process_queue`] keeps its thread while
/// the ring never runs dry: then the thread goes back to its epoll loop,
/// where it sees an exit event, and comes back at once (the worker
/// notifies its own completion eventfd). A driver can keep a ring busy for
/// ever, and a used ring laid over the available ring's index refills the
/// ring with every completion.
const MAX_BUSY: Duration = Duration::from_millis(10);

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
    /// Closed while the graph drains the export: take no new request.
    pub gate: &'a PauseGate,
}

/// The state of one queue's worker, locked only by that queue's thread
/// (and by control paths that wait for its requests to drain).
pub struct QueueWorker {
    executor: Executor<Completion>,
    done: Vec<Completion>,
    /// The queue's counters, written by its thread only.
    stats: Arc<SourceStats>,
    /// The queue's vring in the current frontend session, for the control
    /// paths that complete what a departing frontend left.
    vring: Option<Vring>,
    /// The queue's inflight tracking, when the frontend set it up.
    inflight: Option<QueueInflight>,
    /// Heads a previous backend left inflight, oldest first: started before
    /// any new chain.
    resubmit: Vec<u16>,
}

impl InFlight for QueueWorker {
    fn in_flight(&self) -> usize {
        self.executor.pending()
    }
}

/// One queue as a request source of the export.
pub struct QueueSource {
    /// The worker's state.
    pub requests: Requests<QueueWorker>,
    notifier: Notifier,
}

impl QueueSource {
    /// A queue with a new worker that counts in `stats`.
    pub fn new(stats: Arc<SourceStats>) -> io::Result<Self> {
        let worker = QueueWorker::new(stats)?;
        Ok(QueueSource {
            notifier: worker.executor.notifier(),
            requests: Requests::new(worker),
        })
    }
}

impl Source for QueueSource {
    fn kick(&self) {
        self.notifier.notify();
    }

    fn wait_idle(&self) {
        self.requests.wait_idle();
    }
}

fn queue_error(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl QueueWorker {
    /// A worker with its own executor.
    fn new(stats: Arc<SourceStats>) -> io::Result<Self> {
        Ok(QueueWorker {
            executor: Executor::new()?,
            done: Vec::new(),
            stats,
            vring: None,
            inflight: None,
            resubmit: Vec::new(),
        })
    }

    /// Sets up the inflight tracking of a queue that starts, and the heads
    /// to resubmit first.
    pub fn track_inflight(&mut self, inflight: QueueInflight, resubmit: Vec<u16>) {
        if !resubmit.is_empty() {
            log::info!("resubmitting {} requests left in flight", resubmit.len());
        }
        self.inflight = Some(inflight);
        self.resubmit = resubmit;
    }

    /// Remembers the queue's vring of the current session.
    pub fn set_vring(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
    }

    /// The eventfd that signals completions; registered with the queue
    /// thread's epoll loop.
    pub fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.executor.event_fd()
    }

    /// Handles a kick: pops every available chain, starts the requests and
    /// completes those that finished at once. With EVENT_IDX, notifications
    /// stay off while the queue is drained and the queue is checked again
    /// after they are re-enabled. Then, for up to `poll` after the last
    /// request, the worker keeps polling the ring and the completions
    /// instead of going back to sleep, so a busy driver need not kick.
    /// Returns after at most about [`MAX_BUSY`], asking to be called again
    /// if it stopped there.
    pub fn process_queue(&mut self, vring: &Vring, queue: &QueueContext<'_>) -> io::Result<()> {
        let deadline = Instant::now() + MAX_BUSY;
        loop {
            if queue.event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            self.pop_and_start(vring, queue)?;
            if !queue.poll.is_zero() {
                self.poll(vring, queue, deadline)?;
            }
            if Instant::now() >= deadline {
                // Through the epoll loop and back here at once.
                self.executor.notifier().notify();
                return Ok(());
            }
            if !queue.event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    fn pop_and_start(&mut self, vring: &Vring, queue: &QueueContext<'_>) -> io::Result<()> {
        let memory = queue.memory.memory().into_inner();
        if !self.resubmit.is_empty() {
            let heads = std::mem::take(&mut self.resubmit);
            let (desc_table, size) = {
                let state = vring.get_ref();
                let q = state.get_queue();
                (q.desc_table(), q.size())
            };
            match chains_at(&memory, desc_table, size, &heads) {
                // Still marked inflight, under their first counters.
                Ok((memory, chains)) => {
                    let now = now_ns();
                    for chain in chains {
                        self.start(chain, &memory, queue, now);
                    }
                }
                Err(e) => log::error!("cannot resubmit the requests left in flight: {e}"),
            }
        }
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            // At most a ring's worth: the driver may make chains available
            // as fast as they are popped.
            let size = usize::from(q.size());
            std::iter::from_fn(|| q.pop_descriptor_chain(memory.clone()))
                .take(size)
                .collect()
        };
        // One clock reading for the batch: the requests were all waiting.
        let now = if chains.is_empty() { 0 } else { now_ns() };
        for chain in chains {
            if let Some(inflight) = &mut self.inflight {
                inflight.mark(chain.head_index());
            }
            self.start(chain, &memory, queue, now);
        }
        self.run(vring)
    }

    /// Starts the request of `chain`, taken from the ring at `now`
    /// ([`now_ns`]).
    fn start(
        &mut self,
        chain: Chain,
        memory: &Arc<GuestMemory>,
        queue: &QueueContext<'_>,
        now: u64,
    ) {
        let req = Request::parse(chain, memory, &queue.limits, queue.serial);
        if req.is_done() {
            self.done.push(req.complete(0, now));
        } else {
            self.executor.spawn(req.execute(queue.root.clone(), now));
        }
    }

    /// Busy-polls the available ring and the executor until `queue.poll`
    /// passes without a new request, or until `deadline`.
    fn poll(
        &mut self,
        vring: &Vring,
        queue: &QueueContext<'_>,
        deadline: Instant,
    ) -> io::Result<()> {
        let mut idle_since = Instant::now();
        loop {
            let now = Instant::now();
            if now - idle_since >= queue.poll || now >= deadline || queue.gate.paused() {
                return Ok(());
            }
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
        // One clock reading for the batch, which finished together.
        let now = now_ns();
        let mut state = vring.get_mut();
        for c in self.done.drain(..) {
            if let Some(mut sample) = c.sample {
                sample.ns = now.saturating_sub(c.started_ns);
                self.stats.record(&sample, now);
            }
            if let Some(inflight) = &self.inflight {
                inflight.before_used(c.head);
            }
            state.add_used(c.head, c.len).map_err(queue_error)?;
            if let Some(inflight) = &self.inflight {
                inflight.after_used(c.head, state.get_queue().next_used());
            }
        }
        if state.needs_notification().map_err(queue_error)? {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Completes every request in flight after the frontend went away; their
    /// results have nowhere to go.
    pub fn abandon_in_flight(&mut self) {
        self.executor.run_until_idle(|_| ());
        self.done.clear();
        self.vring = None;
        // Still marked inflight in the region: the frontend resubmits them
        // to the next backend session, which sets up tracking anew.
        self.inflight = None;
        self.resubmit.clear();
    }

    /// Fails every request waiting in the ring with IOERR and puts it on
    /// the used ring, when the export goes away for good (a hard delete):
    /// the frontend gets an answer to everything it submitted. Requests in
    /// flight have completed before (the gate is closed and drained).
    pub fn fail_queued(&mut self, memory: &GuestMemoryAtomic<GuestMemory>, limits: &DeviceLimits) {
        let Some(vring) = self.vring.clone() else {
            return;
        };
        let ready = {
            let state = vring.get_ref();
            state.is_enabled() && state.get_queue().ready()
        };
        if !ready {
            return;
        }
        let memory = memory.memory().into_inner();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            let size = usize::from(q.size());
            std::iter::from_fn(|| q.pop_descriptor_chain(memory.clone()))
                .take(size)
                .collect()
        };
        if chains.is_empty() {
            return;
        }
        let now = now_ns();
        for chain in chains {
            let req = Request::parse(chain, &memory, limits, &[]);
            self.done.push(req.complete(VIRTIO_BLK_S_IOERR as u8, now));
        }
        if let Err(e) = self.run(&vring) {
            log::warn!("failing the requests left in a queue: {e}");
        }
    }
}

/// The descriptor chains that start at `heads` in the descriptor table at
/// `desc_table` of a queue of `size`, with the guest memory they use.
///
/// virtio-queue builds chains only from available-ring entries, and the
/// slots that once held these heads may hold others by now. So the heads go
/// into a private available ring, in a small anonymous region mapped above
/// the guest's memory, and a queue over the guest's descriptor table and
/// that ring pops them: the chains are walked and checked (indirect tables,
/// loops, lengths) by virtio-queue as any other. The returned memory holds
/// the extra region; the guest cannot reach it but through descriptors,
/// like any memory of its own.
fn chains_at(
    memory: &Arc<GuestMemory>,
    desc_table: u64,
    size: u16,
    heads: &[u16],
) -> io::Result<(Arc<GuestMemory>, Vec<Chain>)> {
    let other = |e: &dyn std::fmt::Display| io::Error::other(e.to_string());
    let count = u16::try_from(heads.len())
        .ok()
        .filter(|&n| n <= size)
        .ok_or_else(|| other(&format!("{} heads for a queue of {size}", heads.len())))?;
    let top = memory.iter().map(|r| r.last_addr().raw_value()).max();
    let ring = top
        .map_or(Some(0), |t| t.checked_add(1))
        .and_then(|a| a.checked_next_multiple_of(4096))
        .map(GuestAddress)
        .ok_or_else(|| other(&"no guest address is left above the guest's memory"))?;
    let ring_len = 4 + 2 * usize::from(size);
    let region = MmapRegion::new(ring_len).map_err(|e| other(&e))?;
    let region = GuestRegionMmap::new(region, ring)
        .ok_or_else(|| other(&"the private ring does not fit the address space"))?;
    let memory = Arc::new(
        memory
            .insert_region(Arc::new(region))
            .map_err(|e| other(&e))?,
    );
    let write = |value: u16, offset: u64| {
        memory
            .write_obj(value.to_le(), ring.unchecked_add(offset))
            .map_err(|e| other(&e))
    };
    write(count, 2)?;
    for (i, &head) in heads.iter().enumerate() {
        write(head, 4 + 2 * i as u64)?;
    }
    let mut queue = Queue::new(MAX_QUEUE_SIZE as u16).map_err(|e| other(&e))?;
    queue.try_set_size(size).map_err(|e| other(&e))?;
    queue
        .try_set_desc_table_address(GuestAddress(desc_table))
        .map_err(|e| other(&e))?;
    queue
        .try_set_avail_ring_address(ring)
        .map_err(|e| other(&e))?;
    queue.set_ready(true);
    let chains = std::iter::from_fn(|| queue.pop_descriptor_chain(memory.clone())).collect();
    Ok((memory, chains))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkgraph_graph::{Graph, Options};

    /// Found by the vhost_user fuzz target: a used ring laid over the
    /// available ring's index, with the used index ahead of the next chain
    /// to pop, makes every completion a new available chain. The worker
    /// kept popping and polling (and, with EVENT_IDX, looked again after
    /// each re-enabling of notifications) and never returned to its epoll
    /// loop, so it never saw the exit event: the end of the session (a
    /// disconnect, block-export-del, the next frontend) waited forever
    /// while a core spun.
    #[test]
    fn a_ring_that_refills_itself_lets_the_thread_go() {
        let memory = GuestMemoryAtomic::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let vring = Vring::new(memory.clone(), 16).unwrap();
        vring.set_queue_size(16);
        // Descriptors at 0 (all zero: chains the device fails at once),
        // the used ring where the available ring is: the used index is the
        // available index, one ahead of the next chain to pop.
        vring.set_queue_info(0, 0x1000, 0x1000).unwrap();
        memory
            .memory()
            .write_obj(1u16.to_le(), GuestAddress(0x1002))
            .unwrap();
        vring.set_queue_next_used(1);
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let graph = Graph::new();
        let root = graph
            .add(Options::from_arg("driver=null-co,node-name=n0,size=1M", None).unwrap())
            .unwrap();
        let gate = PauseGate::new();
        let (done, returned) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut worker = QueueWorker::new(Arc::default()).unwrap();
            let queue = QueueContext {
                memory: &memory,
                root: &root,
                limits: DeviceLimits {
                    capacity: 1 << 20,
                    block_size: 512,
                    read_only: false,
                    writethrough: false,
                },
                serial: b"vub0",
                event_idx: true,
                poll: Duration::from_micros(50),
                gate: &gate,
            };
            let result = worker.process_queue(&vring, &queue);
            let _ = done.send(result.map_err(|e| e.to_string()));
        });
        returned
            .recv_timeout(Duration::from_secs(5))
            .expect("the worker never went back to its epoll loop")
            .unwrap();
    }
}
