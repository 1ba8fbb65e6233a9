//! A minimal virtio-blk driver over the rust-vmm vhost `Frontend`: memfd
//! guest memory, split virtqueues driven by hand, and chains of any shape
//! (including malformed ones) for the device to judge.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::virtio_blk_config;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Entries of each virtqueue.
pub const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: u64 = 64 << 20;
const RING_AREA: u64 = 0x4000;
const DATA_START: u64 = 1 << 20;
const DATA_PER_QUEUE: u64 = 15 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One descriptor of a chain to submit.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes the device wrote.
    pub len: u32,
}

/// One split virtqueue.
pub struct Queue {
    index: usize,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
    data_next: u64,
    data_end: u64,
    in_flight: usize,
}

impl Queue {
    /// Allocates `len` bytes of data memory for a request (16-byte aligned;
    /// reused once no request is in flight).
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let addr = self.data_next;
        self.data_next = (addr + len + 15) & !15;
        assert!(self.data_next <= self.data_end, "test data area exhausted");
        GuestAddress(addr)
    }

    fn take_desc(&mut self) -> u16 {
        self.free.pop().expect("out of descriptors")
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail.0 + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.in_flight += 1;
    }

    /// Puts a chain on the available ring (without kicking); returns its head.
    pub fn submit(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let ids: Vec<u16> = descs.iter().map(|_| self.take_desc()).collect();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write { F_WRITE } else { 0 };
            let next = if i + 1 < descs.len() {
                flags |= F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            write_desc(mem, self.desc, ids[i], d, flags, next);
        }
        let head = ids[0];
        self.chains[head as usize] = ids;
        self.publish(mem, head);
        head
    }

    /// Puts a chain on the ring as one indirect descriptor table.
    pub fn submit_indirect(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let table = self.alloc(16 * descs.len() as u64);
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write { F_WRITE } else { 0 };
            let next = if i + 1 < descs.len() {
                flags |= F_NEXT;
                (i + 1) as u16
            } else {
                0
            };
            write_desc(mem, table, i as u16, d, flags, next);
        }
        let head = self.take_desc();
        let d = Desc {
            addr: table,
            len: 16 * descs.len() as u32,
            write: false,
        };
        write_desc(mem, self.desc, head, &d, F_INDIRECT, 0);
        self.chains[head as usize] = vec![head];
        self.publish(mem, head);
        head
    }

    /// Notifies the device.
    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Waits until `count` chains are used; returns their entries in order.
    pub fn wait(&mut self, mem: &GuestMemoryMmap, count: usize) -> Vec<Used> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        loop {
            out.extend(self.reap(mem));
            if out.len() >= count {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "queue {}: timed out waiting for completions",
                self.index
            );
            self.wait_call(left.min(Duration::from_millis(100)));
        }
        out
    }

    /// Returns the entries the device put on the used ring since the last
    /// call, in order, without waiting (with EVENT_IDX, first asks to be
    /// notified at the next used entry).
    pub fn reap(&mut self, mem: &GuestMemoryMmap) -> Vec<Used> {
        if self.event_idx {
            let used_event = self.avail.0 + 4 + 2 * u64::from(QUEUE_SIZE);
            mem.write_obj(self.last_used.to_le(), GuestAddress(used_event))
                .unwrap();
            fence(Ordering::SeqCst);
        }
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap());
        fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.last_used != idx {
            let elem = self.used.0 + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
            let id: u32 = u32::from_le(mem.read_obj(GuestAddress(elem)).unwrap());
            let len: u32 = u32::from_le(mem.read_obj(GuestAddress(elem + 4)).unwrap());
            let head = id as u16;
            let ids = std::mem::take(&mut self.chains[head as usize]);
            assert!(!ids.is_empty(), "device used unknown head {head}");
            self.free.extend(ids);
            self.last_used = self.last_used.wrapping_add(1);
            self.in_flight -= 1;
            out.push(Used { head, len });
        }
        if self.in_flight == 0 {
            // Every buffer was returned: reuse the data area.
            self.data_next = self.data_end - DATA_PER_QUEUE;
        }
        out
    }

    /// Waits up to `timeout` for the device to signal the queue's call
    /// eventfd, and clears it.
    pub fn wait_call(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is valid for the call.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        let _ = self.call.read();
    }

    /// Chains on the ring that the device has not used yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// Shared guest memory backed by a new memfd.
fn memfd_memory(gpa: u64, size: usize) -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid C string.
    let fd = unsafe { libc::memfd_create(c"blkgraph-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(gpa),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn write_desc(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    id: u16,
    d: &Desc,
    flags: u16,
    next: u16,
) {
    let at = table.0 + 16 * u64::from(id);
    mem.write_obj(d.addr.0.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(d.len.to_le(), GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
}

/// A connected driver: the vhost-user frontend, guest memory and queues.
pub struct Driver {
    /// The vhost-user connection; dropping it disconnects.
    frontend: Frontend,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, set up and enabled.
    pub queues: Vec<Queue>,
    /// Negotiated virtio features.
    pub features: u64,
    /// The device's configuration space.
    pub config: Vec<u8>,
}

impl Driver {
    /// Connects to `socket`, negotiates (with EVENT_IDX if `event_idx`) and
    /// sets up `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize, event_idx: bool) -> Driver {
        let mut frontend = Frontend::connect(socket, num_queues as u64).expect("connect");
        let offered = frontend.get_features().expect("get_features");
        assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        frontend.set_owner().expect("set_owner");
        let proto = frontend
            .get_protocol_features()
            .expect("get_protocol_features");
        let needed = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        assert!(proto.contains(needed), "protocol features {proto:?}");
        frontend
            .set_protocol_features(needed)
            .expect("set_protocol_features");
        frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        assert!(frontend.get_queue_num().expect("get_queue_num") >= num_queues as u64);
        let (_, config) = frontend
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("get_config");
        let mut wanted = offered & !(1u64 << VIRTIO_RING_F_EVENT_IDX);
        if event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let features = wanted & offered;
        frontend.set_features(features).expect("set_features");
        assert!(features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0);

        let mem = memfd_memory(0, MEM_SIZE as usize);
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        frontend.set_mem_table(&[info]).expect("set_mem_table");
        let hva = region.as_ptr() as u64;

        let mut queues = Vec::new();
        for index in 0..num_queues {
            let base = RING_AREA * index as u64;
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            let q = Queue {
                index,
                desc: GuestAddress(desc),
                avail: GuestAddress(avail),
                used: GuestAddress(used),
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
                free: (0..QUEUE_SIZE).rev().collect(),
                chains: vec![Vec::new(); QUEUE_SIZE as usize],
                avail_idx: 0,
                last_used: 0,
                event_idx,
                data_next: DATA_START + DATA_PER_QUEUE * index as u64,
                data_end: DATA_START + DATA_PER_QUEUE * (index as u64 + 1),
                in_flight: 0,
            };
            frontend.set_vring_num(index, QUEUE_SIZE).unwrap();
            frontend.set_vring_base(index, 0).unwrap();
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: hva + desc,
                used_ring_addr: hva + used,
                avail_ring_addr: hva + avail,
                log_addr: None,
            };
            frontend.set_vring_addr(index, &config).unwrap();
            frontend.set_vring_call(index, &q.call).unwrap();
            frontend.set_vring_kick(index, &q.kick).unwrap();
            frontend.set_vring_enable(index, true).unwrap();
            queues.push(q);
        }
        Driver {
            frontend,
            mem,
            queues,
            features,
            config,
        }
    }

    /// Adds a memfd region of `size` bytes at guest address `gpa` with
    /// ADD_MEM_REG, as libblkio does for its I/O buffers; returns it mapped.
    pub fn add_region(&mut self, gpa: u64, size: usize) -> GuestMemoryMmap {
        let mem = memfd_memory(gpa, size);
        let region = mem.find_region(GuestAddress(gpa)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        self.frontend.add_mem_region(&info).expect("add_mem_region");
        mem
    }

    /// Offers a region of `claimed` bytes at `gpa` backed by a memfd of
    /// only `file_len` bytes, with ADD_MEM_REG; returns the device's
    /// answer (the mapping is the device's only).
    pub fn try_add_region(
        &mut self,
        gpa: u64,
        claimed: u64,
        file_len: u64,
    ) -> Result<(), vhost::Error> {
        let mem = memfd_memory(gpa, file_len as usize);
        let region = mem.find_region(GuestAddress(gpa)).unwrap();
        let mut info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        info.memory_size = claimed;
        self.frontend.add_mem_region(&info).map(|_| ())
    }

    /// Turns the device's write cache on or off, as a guest does by writing
    /// the `wce` byte of the configuration space (CONFIG_WCE).
    pub fn set_wce(&mut self, on: bool) {
        let offset = std::mem::offset_of!(virtio_blk_config, wce) as u32;
        self.frontend
            .set_config(offset, VhostUserConfigFlags::empty(), &[u8::from(on)])
            .expect("set_config");
    }

    /// The capacity in 512-byte sectors, from the configuration space.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[..8].try_into().unwrap())
    }
}
