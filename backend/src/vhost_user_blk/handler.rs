//! blkgraph's vhost-user request handler: the frontend's messages for one
//! connection, served by the `vhost` crate's `BackendReqHandler`.
//!
//! It does what vhost-user-backend's `VhostUserHandler` does with the same
//! parts (its `VringRwLock`s, vm-memory's `GuestMemoryAtomic`, one epoll
//! thread per queue), and what that handler cannot: inflight tracking
//! (GET/SET_INFLIGHT_FD, see [`super::inflight`]), resubmitting what a
//! previous backend left in flight when a queue starts, and checking memory
//! regions before mapping them. Why it is ours is in docs/architecture.md.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::device::{VhostUserBlkDevice, MAX_QUEUE_SIZE};
use super::inflight::InflightRegion;
use super::request::GuestMemory;
use super::worker::Vring;

/// Memory regions a frontend may map (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 509;

/// Epoll data of a queue thread's events.
const KICK: u64 = 0;
const COMPLETION: u64 = 1;
const WAKE: u64 = 2;
const EXIT: u64 = 3;

fn handler_error(e: io::Error) -> Error {
    Error::ReqHandlerError(e)
}

fn invalid(text: String) -> Error {
    handler_error(io::Error::new(io::ErrorKind::InvalidInput, text))
}

/// Where a region of the frontend's address space is in guest memory.
struct Mapping {
    frontend_addr: u64,
    size: u64,
    guest_addr: u64,
}

/// A queue's thread: waits on the queue's kick, its completion eventfd and
/// its wake-up and exit eventfds.
struct QueueThread {
    epoll: Arc<Epoll>,
    wake: EventFd,
    exit: EventFd,
    /// The kick descriptor registered with the epoll, if any.
    kick: Option<RawFd>,
    thread: Option<JoinHandle<()>>,
}

impl QueueThread {
    fn spawn(device: &Arc<VhostUserBlkDevice>, queue: usize, vring: Vring) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let exit = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let add = |fd: RawFd, data: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
        };
        add(device.completion_fd(queue), COMPLETION)?;
        add(wake.as_raw_fd(), WAKE)?;
        add(exit.as_raw_fd(), EXIT)?;
        let (device, theirs, their_wake) = (device.clone(), epoll.clone(), wake.try_clone()?);
        let thread = std::thread::Builder::new()
            .name(format!("vub-queue{queue}"))
            .spawn(move || run_queue(&device, queue, &vring, &theirs, &their_wake))?;
        Ok(QueueThread {
            epoll,
            wake,
            exit,
            kick: None,
            thread: Some(thread),
        })
    }

    /// Makes the thread wait on `kick` (or on no kick), and look at the
    /// queue once when it starts waiting on one: a kick sent before the
    /// registration is not lost.
    fn watch_kick(&mut self, kick: Option<RawFd>) -> io::Result<()> {
        if kick == self.kick {
            return Ok(());
        }
        if let Some(old) = self.kick.take() {
            let event = EpollEvent::new(EventSet::IN, KICK);
            let _ = self.epoll.ctl(ControlOperation::Delete, old, event);
        }
        if let Some(fd) = kick {
            let event = EpollEvent::new(EventSet::IN, KICK);
            self.epoll.ctl(ControlOperation::Add, fd, event)?;
            self.kick = Some(fd);
            self.wake.write(1)?;
        }
        Ok(())
    }
}

impl Drop for QueueThread {
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_queue(
    device: &VhostUserBlkDevice,
    queue: usize,
    vring: &Vring,
    epoll: &Epoll,
    wake: &EventFd,
) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("queue {queue}: epoll: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let result = match event.data() {
                EXIT => return,
                KICK => match vring.read_kick() {
                    Ok(true) => device.handle_queue_event(queue, vring, false),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
                WAKE => {
                    let _ = wake.read();
                    device.handle_queue_event(queue, vring, false)
                }
                _ => device.handle_queue_event(queue, vring, true),
            };
            if let Err(e) = result {
                log::warn!("queue {queue}: {e}");
            }
        }
    }
}

/// The state of one frontend connection.
pub struct Handler {
    device: Arc<VhostUserBlkDevice>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    vrings: Vec<Vring>,
    mappings: Vec<Mapping>,
    inflight: Option<Arc<InflightRegion>>,
    threads: Vec<QueueThread>,
}

impl Handler {
    /// A handler for a new connection, with a thread per queue.
    pub fn new(device: Arc<VhostUserBlkDevice>) -> io::Result<Self> {
        let num_queues = device.num_queues();
        let vrings = (0..num_queues)
            .map(|_| Vring::new(device.memory(), MAX_QUEUE_SIZE as u16))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let threads = vrings
            .iter()
            .enumerate()
            .map(|(i, vring)| QueueThread::spawn(&device, i, vring.clone()))
            .collect::<io::Result<_>>()?;
        Ok(Handler {
            device,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            vrings,
            mappings: Vec::new(),
            inflight: None,
            threads,
        })
    }

    fn vring(&self, index: u32) -> Result<&Vring> {
        self.vrings.get(index as usize).ok_or(Error::InvalidParam)
    }

    /// Registers the queue's kick with its thread while the queue is both
    /// started and enabled, and only then.
    fn update_registration(&mut self, index: usize) -> Result<()> {
        let kick = {
            let state = self.vrings[index].get_ref();
            let run = state.get_queue().ready() && state.is_enabled();
            state
                .get_kick()
                .as_ref()
                .filter(|_| run)
                .map(|k| k.as_raw_fd())
        };
        self.threads[index].watch_kick(kick).map_err(handler_error)
    }

    /// Starts a queue once it has a kick: with inflight tracking, first
    /// takes over what the previous backend left in flight.
    fn start_queue_if_ready(&mut self, index: usize) -> Result<()> {
        let vring = &self.vrings[index];
        {
            let state = vring.get_ref();
            if state.get_queue().ready() || state.get_kick().is_none() {
                return Ok(());
            }
        }
        if let Some(region) = &self.inflight {
            let size = vring.get_ref().get_queue().size();
            let mut tracking = region.queue(index, size).map_err(handler_error)?;
            let used = vring
                .queue_used_idx()
                .map_err(|e| invalid(format!("queue {index}: used ring: {e}")))?;
            let resubmit = tracking.recover(used).map_err(handler_error)?;
            // Every chain popped before is used or still inflight.
            vring.set_queue_next_avail(used.wrapping_add(resubmit.len() as u16));
            log::info!(
                "queue {index} starts at used index {used}, {} requests in flight",
                resubmit.len()
            );
            self.device.track_inflight(index, tracking, resubmit);
        }
        vring.set_queue_ready(true);
        self.update_registration(index)
    }

    fn guest_addr(&self, frontend_addr: u64) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| frontend_addr >= m.frontend_addr && frontend_addr - m.frontend_addr < m.size)
            .map(|m| frontend_addr - m.frontend_addr + m.guest_addr)
            .ok_or_else(|| invalid(format!("address {frontend_addr:#x} is in no memory region")))
    }

    fn install_memory(&mut self, memory: GuestMemory) -> Result<()> {
        self.device
            .memory()
            .lock()
            .map_err(|_| Error::BackendInternalError)?
            .replace(memory);
        Ok(())
    }
}

/// Maps a region after checking that it lies inside its file (a descriptor
/// past the file's end would fault the daemon).
fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<Arc<GuestRegionMmap>> {
    let (gpa, size, offset) = (
        region.guest_phys_addr,
        region.memory_size,
        region.mmap_offset,
    );
    let file_len = file.metadata().map_err(handler_error)?.len();
    if offset.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(invalid(format!(
            "the region at {gpa:#x} of {size:#x} bytes reaches past the end of its file \
             ({file_len} bytes, from offset {offset})"
        )));
    }
    let mapped = region.mmap_region(file)?;
    GuestRegionMmap::new(mapped, GuestAddress(gpa))
        .map(Arc::new)
        .ok_or_else(|| invalid(format!("the region at {gpa:#x} overflows")))
}

fn mapping(region: &VhostUserMemoryRegion) -> Mapping {
    Mapping {
        frontend_addr: region.user_addr,
        size: region.memory_size,
        guest_addr: region.guest_phys_addr,
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(Error::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        self.inflight = None;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        for index in 0..self.vrings.len() {
            self.vrings[index].set_enabled(false);
            self.update_registration(index)?;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.device.features() != 0 {
            return Err(Error::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES, rings are enabled from the start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.vrings.len() {
                self.vrings[index].set_enabled(true);
                self.update_registration(index)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.device.set_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(Error::InvalidOperation("postcopy is not supported"));
        }
        if ctx.len() > MAX_MEM_SLOTS || ctx.len() != files.len() {
            return Err(Error::InvalidParam);
        }
        let regions = ctx
            .iter()
            .zip(files)
            .map(|(region, file)| map_region(region, file))
            .collect::<Result<Vec<_>>>()?;
        let memory = GuestMemory::from_arc_regions(regions)
            .map_err(|e| invalid(format!("memory table: {e}")))?;
        self.install_memory(memory)?;
        self.mappings = ctx.iter().map(mapping).collect();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let vring = self.vring(index)?;
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            return Err(Error::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let desc = self.guest_addr(descriptor)?;
        let avail = self.guest_addr(available)?;
        let used = self.guest_addr(used)?;
        let vring = self.vring(index)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| Error::InvalidParam)?;
        // A new driver (after a guest reboot) starts its used ring anew.
        let idx = vring
            .queue_used_idx()
            .map_err(|_| Error::BackendInternalError)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // Stop the ring: no new request, and those in flight finish.
        vring.set_queue_ready(false);
        self.update_registration(index as usize)?;
        self.device.stop_queue(index as usize);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let index = usize::from(index);
        let vring = self.vring(index as u32)?.clone();
        // Unregistered while the old descriptor is still open.
        self.threads[index]
            .watch_kick(None)
            .map_err(handler_error)?;
        vring.set_kick(fd);
        self.update_registration(index)?;
        self.start_queue_if_ready(index)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?.set_call(fd);
        self.start_queue_if_ready(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(Error::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_registration(index as usize)
    }

    fn get_config(&mut self, offset: u32, size: u32, _: VhostUserConfigFlags) -> Result<Vec<u8>> {
        Ok(self.device.get_config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _: VhostUserConfigFlags) -> Result<()> {
        self.device.set_config(offset, buf).map_err(handler_error)
    }

    fn set_gpu_socket(&mut self, _: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        let (region, reply, file) = InflightRegion::create(
            msg.num_queues,
            msg.queue_size,
            self.vrings.len(),
            MAX_QUEUE_SIZE,
        )
        .map_err(handler_error)?;
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        let region = InflightRegion::open(msg, &file, self.vrings.len(), MAX_QUEUE_SIZE)
            .map_err(handler_error)?;
        log::info!(
            "inflight region of {} queues of {} set",
            msg.num_queues,
            msg.queue_size
        );
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(Error::InvalidOperation("postcopy is not supported"));
        }
        if self.mappings.len() >= MAX_MEM_SLOTS {
            return Err(invalid(format!(
                "no memory slot is left of {MAX_MEM_SLOTS}"
            )));
        }
        let mapped = map_region(region, file)?;
        let memory = self
            .device
            .memory()
            .memory()
            .insert_region(mapped)
            .map_err(|e| invalid(format!("memory region: {e}")))?;
        self.install_memory(memory)?;
        self.mappings.push(mapping(region));
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (memory, _) = self
            .device
            .memory()
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| invalid(format!("memory region: {e}")))?;
        self.install_memory(memory)?;
        let gpa = region.guest_phys_addr;
        self.mappings.retain(|m| m.guest_addr != gpa);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation("no device state"))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation("no device state"))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> Result<()> {
        Err(Error::InvalidOperation("no dirty logging"))
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // The queue threads end first: nothing serves the rings after this.
        self.threads.clear();
        self.device.disconnected();
    }
}
