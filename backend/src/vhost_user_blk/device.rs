//! The vhost-user-blk device: features, configuration space and the
//! vhost-user-backend callbacks.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use blkgraph_graph::{Child, Node};
use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;

use super::channel::send_config_change;
use super::config::{BlkConfig, WCE_OFFSET};
use super::export::DEFAULT_POLL_US;
use super::inflight::QueueInflight;
use super::request::{DeviceLimits, GuestMemory};
use super::worker::{QueueContext, QueueSource, QueueWorker, Vring};
use crate::export::{PauseGate, Source};
use crate::stats::Sources;

/// Largest queue a driver may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// What an export asks of its device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// The export id, also used as the serial (GET_ID).
    pub id: String,
    /// Whether the guest may write.
    pub writable: bool,
    /// Whether every write is made stable before it completes.
    pub writethrough: bool,
    /// Number of virtqueues, each served by its own thread.
    pub num_queues: usize,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
    /// How long a queue worker keeps polling its ring after the last
    /// request before it sleeps until the next kick; `None`: by the root
    /// node (see `poll_for`).
    pub poll: Option<Duration>,
}

/// How long a queue polls after its last request when the export did not
/// set `x-poll-us`: [`DEFAULT_POLL_US`] on local storage, where a
/// completion or the driver's next request is microseconds away, and not at
/// all on a remote node (rbd, nbd), whose requests take hundreds of
/// microseconds or milliseconds: polling through that burns a core that
/// librbd, the NBD socket or the guest need.
pub fn poll_for(node: &Node) -> Duration {
    if node.limits().remote {
        Duration::ZERO
    } else {
        Duration::from_micros(u64::from(DEFAULT_POLL_US))
    }
}

/// A vhost-user-blk device serving requests from a graph node.
pub struct VhostUserBlkDevice {
    options: DeviceOptions,
    root: Arc<Child>,
    /// Closed while the graph drains the export.
    gate: Arc<PauseGate>,
    config: Mutex<BlkConfig>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    memory: GuestMemoryAtomic<GuestMemory>,
    workers: Vec<Arc<QueueSource>>,
    /// The queues' statistics.
    stats: Sources,
    /// The frontend's backend-request channel, for config-change messages.
    channel: Mutex<Option<UnixStream>>,
}

impl VhostUserBlkDevice {
    /// A device serving requests through the export's root edge; its
    /// queues are the request sources of `gate`.
    pub fn new(root: Arc<Child>, gate: Arc<PauseGate>, options: DeviceOptions) -> io::Result<Self> {
        let config = BlkConfig::new(
            root.node().size(),
            options.logical_block_size,
            options.num_queues as u16,
        );
        let stats = Sources::default();
        let workers: Vec<Arc<QueueSource>> = (0..options.num_queues)
            .map(|_| QueueSource::new(stats.add()).map(Arc::new))
            .collect::<io::Result<_>>()?;
        for w in &workers {
            gate.add_source(w.clone() as Arc<dyn Source>);
        }
        Ok(VhostUserBlkDevice {
            options,
            root,
            gate,
            config: Mutex::new(config),
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            memory: GuestMemoryAtomic::new(GuestMemory::new()),
            workers,
            stats,
            channel: Mutex::new(None),
        })
    }

    /// The queues' statistics.
    pub fn stats(&self) -> &Sources {
        &self.stats
    }

    /// The guest memory shared with the vhost-user daemon.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemory> {
        self.memory.clone()
    }

    /// The number of queues.
    pub fn num_queues(&self) -> usize {
        self.options.num_queues
    }

    /// The completion eventfd of queue `queue`.
    pub fn completion_fd(&self, queue: usize) -> std::os::unix::io::RawFd {
        self.workers[queue].requests.lock().completion_fd()
    }

    /// The node requests go to.
    pub fn root(&self) -> Arc<Node> {
        self.root.node()
    }

    /// The export's gate.
    pub fn gate(&self) -> &Arc<PauseGate> {
        &self.gate
    }

    /// Fails every request still waiting in the rings (see
    /// `QueueWorker::fail_queued`); for a hard delete, with the gate closed.
    pub fn fail_queued(&self) {
        let limits = self.limits();
        for w in &self.workers {
            w.requests.lock().fail_queued(&self.memory, &limits);
        }
    }

    /// Installs a memory map in place of the frontend's.
    fn replace_memory(&self, memory: GuestMemory) {
        // vm-memory's lock poisons only if a thread panicked holding it;
        // the map itself is swapped whole, so it is consistent anyway.
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(memory);
    }

    /// Handles a kick or a completion event of one queue.
    fn serve(&self, worker: &mut QueueWorker, vring: &Vring, completion: bool) -> io::Result<()> {
        if completion {
            worker.process_completions(vring)?;
        }
        let ready = {
            let state = vring.get_ref();
            state.is_enabled() && state.get_queue().ready()
        };
        if ready && !self.gate.paused() {
            let root = self.root.node();
            let queue = QueueContext {
                memory: &self.memory,
                root: &root,
                limits: self.limits(),
                serial: self.options.id.as_bytes(),
                event_idx: self.event_idx.load(Ordering::Relaxed),
                // The root may have been replaced since the last kick.
                poll: self.options.poll.unwrap_or_else(|| poll_for(&root)),
                gate: &self.gate,
            };
            worker.process_queue(vring, &queue)?;
        }
        Ok(())
    }

    fn limits(&self) -> DeviceLimits {
        let wce = self.config.lock().0.wce;
        DeviceLimits {
            capacity: self.root.node().size(),
            block_size: u64::from(self.options.logical_block_size),
            read_only: !self.options.writable,
            writethrough: self.options.writethrough || wce == 0,
        }
    }

    /// Called when a frontend has gone: finishes its requests and forgets
    /// what it negotiated.
    pub fn disconnected(&self) {
        for w in &self.workers {
            let mut worker = w.requests.lock();
            worker.abandon_in_flight();
            w.requests.notify_if_idle(&worker);
        }
        // The next frontend maps its own memory; the regions of this one
        // would overlap them.
        self.replace_memory(GuestMemory::new());
        *self.channel.lock() = None;
        self.acked_features.store(0, Ordering::Relaxed);
        self.event_idx.store(false, Ordering::Relaxed);
        self.config.lock().0.wce = 1;
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.options.writable {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        } else {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// The features the frontend acked (SET_FEATURES).
    pub fn set_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.event_idx.store(event_idx, Ordering::Relaxed);
    }

    /// The vhost-user protocol features offered.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    /// `size` bytes of the configuration space from `offset`.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = *self.config.lock();
        config.0.capacity = (self.root.node().size() >> 9).to_le();
        config.read(offset, size)
    }

    /// Writes the configuration space: only the writeback flag is
    /// writable, and only with CONFIG_WCE.
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize != WCE_OFFSET || buf.len() != 1 || !wce_acked {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.config.lock().0.wce = buf[0];
        Ok(())
    }

    /// Keeps the frontend's backend-request channel.
    pub fn set_channel(&self, channel: UnixStream) {
        *self.channel.lock() = Some(channel);
    }

    /// Tells a connected frontend that the configuration space changed
    /// (the capacity, after a resize); without a backend-request channel the
    /// driver sees it at its next configuration read.
    pub fn config_changed(&self) {
        if let Some(channel) = self.channel.lock().as_mut() {
            if let Err(e) = send_config_change(channel) {
                log::warn!(
                    "export {}: cannot send the config-change message: {e}",
                    self.options.id
                );
            }
        }
    }

    /// Returns once queue `index` has no request in flight (the ring was
    /// stopped before).
    pub fn stop_queue(&self, index: usize) {
        if let Some(worker) = self.workers.get(index) {
            worker.requests.wait_idle();
        }
    }

    /// Sets up the inflight tracking of queue `index` as it starts, with
    /// the heads a previous backend left in flight.
    pub fn track_inflight(&self, index: usize, tracking: QueueInflight, resubmit: Vec<u16>) {
        if let Some(worker) = self.workers.get(index) {
            worker.requests.lock().track_inflight(tracking, resubmit);
        }
    }

    /// Handles a kick (or a wake-up) or a completion event of queue
    /// `queue`, on that queue's thread.
    pub fn handle_queue_event(
        &self,
        queue: usize,
        vring: &Vring,
        completion: bool,
    ) -> io::Result<()> {
        let source = &self.workers[queue];
        let mut worker = source.requests.lock();
        worker.set_vring(vring);
        let result = self.serve(&mut worker, vring, completion);
        source.requests.notify_if_idle(&worker);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkgraph_graph::{Graph, Options};

    #[test]
    fn queues_poll_on_local_nodes_only_by_default() {
        let graph = Graph::new();
        let add = |s: &str| graph.add(Options::from_arg(s, None).unwrap()).unwrap();
        add("driver=null-co,node-name=n0,size=1M");
        add("driver=raw,node-name=top,file=n0");
        let top = graph.find("top").unwrap();
        assert!(!top.limits().remote);
        assert_eq!(poll_for(&top), Duration::from_micros(50));
    }
}
