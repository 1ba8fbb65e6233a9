//! The vhost-user-blk device: features, configuration space and the
//! vhost-user-backend callbacks.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use blkgraph_graph::{Child, Node};
use parking_lot::Mutex;
use std::os::unix::io::{AsRawFd, FromRawFd, IntoRawFd};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::config::{BlkConfig, WCE_OFFSET};
use super::request::{DeviceLimits, GuestMemory};
use super::worker::{QueueContext, QueueSource, QueueWorker, Vring};
use crate::export::{PauseGate, Source};

/// Largest queue a driver may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Memory regions a frontend may map: what vhost-user-backend answers to
/// GET_MAX_MEM_SLOTS (its own limit is not public).
const MAX_MEM_SLOTS: usize = 509;

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
    /// request before it sleeps until the next kick.
    pub poll: std::time::Duration,
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
    /// The memory map last accepted, to put back over a refused one.
    accepted_memory: Mutex<Arc<GuestMemory>>,
    workers: Vec<Arc<QueueSource>>,
    /// Per queue thread, the eventfd that ends it, kept across sessions.
    exit_events: Vec<EventFd>,
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
        let workers: Vec<Arc<QueueSource>> = (0..options.num_queues)
            .map(|_| QueueSource::new().map(Arc::new))
            .collect::<io::Result<_>>()?;
        for w in &workers {
            gate.add_source(w.clone() as Arc<dyn Source>);
        }
        let exit_events = (0..options.num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC))
            .collect::<io::Result<_>>()?;
        Ok(VhostUserBlkDevice {
            options,
            root,
            gate,
            config: Mutex::new(config),
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            memory: GuestMemoryAtomic::new(GuestMemory::new()),
            accepted_memory: Mutex::new(Arc::new(GuestMemory::new())),
            workers,
            exit_events,
        })
    }

    /// The guest memory shared with the vhost-user daemon.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemory> {
        self.memory.clone()
    }

    /// The id of the epoll event for queue `thread`'s completions.
    pub fn completion_event(&self) -> u64 {
        self.options.num_queues as u64 + 1
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
    fn serve(&self, worker: &mut QueueWorker, vring: &Vring, device_event: u16) -> io::Result<()> {
        if u64::from(device_event) == self.completion_event() {
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
                poll: self.options.poll,
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
        *self.accepted_memory.lock() = Arc::new(GuestMemory::new());
        self.acked_features.store(0, Ordering::Relaxed);
        self.event_idx.store(false, Ordering::Relaxed);
        self.config.lock().0.wce = 1;
    }
}

impl VhostUserBackend for VhostUserBlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.options.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
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

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut config = *self.config.lock();
        config.0.capacity = (self.root.node().size() >> 9).to_le();
        config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback flag is writable, and only with CONFIG_WCE.
        let wce_acked =
            self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize != WCE_OFFSET || buf.len() != 1 || !wce_acked {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.config.lock().0.wce = buf[0];
        Ok(())
    }

    /// The daemon has installed a new map in the GuestMemoryAtomic this
    /// device shares: it is checked, and put back to the last accepted one
    /// if a region reaches past the end of its file (a descriptor there
    /// would fault the daemon) or there are more regions than slots. (The
    /// new map is visible to the queues between its installation and this
    /// check: vhost-user-backend offers no earlier hook.)
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        let new = mem.memory().into_inner();
        let mut accepted = self.accepted_memory.lock();
        match check_memory(&new) {
            Ok(()) => {
                *accepted = new;
                Ok(())
            }
            Err(e) => {
                log::warn!("export {}: memory map refused: {e}", self.options.id);
                self.replace_memory((**accepted).clone());
                Err(e)
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.options.num_queues).map(|i| 1 << i).collect()
    }

    /// The thread's persistent eventfd: vhost-user-backend 0.24 turns the
    /// consumer into a raw descriptor for its epoll and never closes it, so
    /// a new eventfd per session leaked one descriptor per queue and
    /// connection. The notifier is a duplicate, which the session closes.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let event = self.exit_events.get(thread_index)?;
        // An exit request of the previous session must not end this one.
        let _ = event.read();
        let notifier = event.try_clone().ok()?;
        // SAFETY: the descriptor stays open for the device's lifetime; the
        // crate (pinned to 0.24.0) converts this consumer into a raw
        // descriptor without closing it, so it is never closed twice.
        let consumer = unsafe { EventConsumer::from_raw_fd(event.as_raw_fd()) };
        // SAFETY: `notifier` is a duplicate owned by nothing else.
        let notifier = unsafe { EventNotifier::from_raw_fd(notifier.into_raw_fd()) };
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let worker = self
            .workers
            .get(queue_index as usize)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        worker.requests.wait_idle();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let vring = &vrings[0];
        let source = &self.workers[thread_id];
        let mut worker = source.requests.lock();
        worker.set_vring(vring);
        let result = self.serve(&mut worker, vring, device_event);
        source.requests.notify_if_idle(&worker);
        result
    }
}

/// Checks a frontend's memory map: at most [`MAX_MEM_SLOTS`] regions, each
/// inside the file that backs it.
fn check_memory(memory: &GuestMemory) -> io::Result<()> {
    let invalid = |text: String| io::Error::new(io::ErrorKind::InvalidInput, text);
    let regions = memory.num_regions();
    if regions > MAX_MEM_SLOTS {
        return Err(invalid(format!(
            "{regions} memory regions, more than the {MAX_MEM_SLOTS} slots"
        )));
    }
    for region in memory.iter() {
        let Some(backing) = region.file_offset() else {
            continue;
        };
        let file_len = backing.file().metadata()?.len();
        let end = backing.start().checked_add(region.len());
        if end.is_none_or(|end| end > file_len) {
            return Err(invalid(format!(
                "the region at {:#x} of {:#x} bytes reaches past the end of its file ({file_len} bytes, from offset {})",
                region.start_addr().0,
                region.len(),
                backing.start()
            )));
        }
    }
    Ok(())
}
