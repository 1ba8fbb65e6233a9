//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split
//! virtqueues, in the shared-memory layout of the vhost-user specification.
//!
//! The backend allocates the region (GET_INFLIGHT_FD), the frontend keeps
//! its descriptor and hands it to the next backend process after a
//! reconnect (SET_INFLIGHT_FD). Per queue, the region holds
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//!
//! A queue worker marks a descriptor head inflight when it pops the chain
//! (with a counter that orders the requests), and when it puts the chain on
//! the used ring it first records the head as `last_batch_head`, publishes
//! the used entry, then clears the head and records the used index. After
//! a crash between the last two steps, the guest's used index differs from
//! the recorded one, which tells that `last_batch_head` was completed. The
//! process that starts the queue next resubmits the inflight heads in
//! counter order, and starts popping at `used_idx + inflight`, since every
//! popped chain is either used or inflight.
//!
//! The memory is shared with the frontend, which may be hostile: every field
//! is accessed through atomics, only descriptor indexes below the queue size
//! are ever looked at, and a resubmitted head is parsed and checked like any
//! chain the guest makes available.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

/// Bytes of a queue region's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC: usize = 16;
/// Queue regions start at multiples of this.
const ALIGN: usize = 64;
/// The layout version written into a new queue region.
const VERSION: u16 = 1;

/// Offsets of the header fields.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;

/// Bytes of one queue's region for `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(ALIGN)
}

fn invalid(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, text)
}

/// A mapped inflight region: every queue's tracking state.
pub struct InflightRegion {
    addr: *mut u8,
    len: usize,
    queue_size: u16,
    num_queues: u16,
}

// SAFETY: the mapping is only accessed through atomics (see `QueueInflight`)
// and unmapped once, when the last reference goes.
unsafe impl Send for InflightRegion {}
// SAFETY: as above: shared access is atomic.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping made in `map`, unmapped only
        // here; nothing refers to it any more (queues hold an Arc).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

impl InflightRegion {
    /// Creates a zeroed region for `num_queues` queues of `queue_size`
    /// descriptors in a new sealed memfd (GET_INFLIGHT_FD); returns it with
    /// the message that describes it and the file to send.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
        max_queue_size: usize,
    ) -> io::Result<(Arc<InflightRegion>, VhostUserInflight, File)> {
        check_shape(num_queues, queue_size, max_queues, max_queue_size)?;
        let len = usize::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: a plain memfd_create with a NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(
                c"blkgraph-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // The frontend may pass the file to the next backend: neither side
        // can then shrink it under the other's mapping.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let region = Self::map(&file, 0, len, num_queues, queue_size)?;
        let msg = VhostUserInflight::new(len as u64, 0, num_queues, queue_size);
        Ok((Arc::new(region), msg, file))
    }

    /// Maps the region a frontend passes back (SET_INFLIGHT_FD), after
    /// checking that it is as large as its queues need, lies inside its
    /// file, and that the file cannot shrink under the mapping.
    pub fn open(
        msg: &VhostUserInflight,
        file: &File,
        max_queues: usize,
        max_queue_size: usize,
    ) -> io::Result<Arc<InflightRegion>> {
        check_shape(msg.num_queues, msg.queue_size, max_queues, max_queue_size)?;
        let need = usize::from(msg.num_queues) * queue_region_size(msg.queue_size);
        if msg.mmap_size < need as u64 {
            return Err(invalid(format!(
                "inflight region of {} bytes, {need} needed for {} queues of {}",
                msg.mmap_size, msg.num_queues, msg.queue_size
            )));
        }
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        if !msg.mmap_offset.is_multiple_of(page) {
            return Err(invalid(format!(
                "inflight region offset {:#x} is not page aligned",
                msg.mmap_offset
            )));
        }
        let file_len = file.metadata()?.len();
        if msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(invalid(format!(
                "inflight region at {:#x} reaches past the end of its file ({file_len} bytes)",
                msg.mmap_offset
            )));
        }
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid(
                "the inflight file can shrink (no F_SEAL_SHRINK)".into(),
            ));
        }
        let region = Self::map(file, msg.mmap_offset, need, msg.num_queues, msg.queue_size)?;
        Ok(Arc::new(region))
    }

    fn map(
        file: &File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightRegion> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| invalid(format!("inflight offset {offset:#x} is too large")))?;
        // SAFETY: a new shared mapping of a file range checked to exist; the
        // kernel picks the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightRegion {
            addr: addr.cast(),
            len,
            queue_size,
            num_queues,
        })
    }

    /// The tracking state of queue `index` with `size` descriptors, if the
    /// region has that queue at that size.
    pub fn queue(self: &Arc<Self>, index: usize, size: u16) -> io::Result<QueueInflight> {
        if index >= usize::from(self.num_queues) || size != self.queue_size {
            return Err(invalid(format!(
                "the inflight region has {} queues of {}, not queue {index} of {size}",
                self.num_queues, self.queue_size
            )));
        }
        Ok(QueueInflight {
            region: self.clone(),
            offset: index * queue_region_size(size),
            size,
            counter: 0,
        })
    }
}

fn check_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
    max_queue_size: usize,
) -> io::Result<()> {
    if num_queues == 0
        || usize::from(num_queues) > max_queues
        || queue_size == 0
        || usize::from(queue_size) > max_queue_size
    {
        return Err(invalid(format!(
            "inflight region for {num_queues} queues of {queue_size}: \
             1 to {max_queues} queues of 1 to {max_queue_size} are possible"
        )));
    }
    Ok(())
}

/// One queue's part of an inflight region, owned by the queue's worker.
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    offset: usize,
    size: u16,
    counter: u64,
}

impl QueueInflight {
    fn at<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + std::mem::size_of::<T>() <= queue_region_size(self.size));
        // SAFETY: the offset lies in this queue's part of the mapping (the
        // callers use header offsets and descriptor indexes below `size`),
        // which lives as long as `region`; queue regions are 64-byte aligned
        // in a page-aligned mapping and every field sits at a multiple of
        // its size; the frontend may change the memory at any time, which
        // atomics allow.
        unsafe { &*self.region.addr.add(self.offset + offset).cast::<T>() }
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.at(HEADER + DESC * usize::from(head))
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        self.at(HEADER + DESC * usize::from(head) + 8)
    }

    fn field(&self, offset: usize) -> &AtomicU16 {
        self.at(offset)
    }

    /// Marks chain `head` as popped and not yet used.
    pub fn mark(&mut self, head: u16) {
        if head >= self.size {
            return; // not a descriptor of this queue; virtio-queue refuses it
        }
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Call before putting chain `head` on the used ring.
    pub fn before_used(&self, head: u16) {
        self.field(LAST_BATCH_HEAD_AT)
            .store(head, Ordering::Release);
    }

    /// Call after putting chain `head` on the used ring, which made the used
    /// index `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if head < self.size {
            self.inflight(head).store(0, Ordering::Release);
        }
        self.field(USED_IDX_AT).store(used_idx, Ordering::Release);
    }

    /// Brings the region in line with the guest's used index `used_idx`
    /// when the queue starts, and returns the heads to resubmit, oldest
    /// first. A region never used before is initialised.
    pub fn recover(&mut self, used_idx: u16) -> io::Result<Vec<u16>> {
        let version = self.field(VERSION_AT).load(Ordering::Acquire);
        if version == 0 {
            self.field(DESC_NUM_AT).store(self.size, Ordering::Relaxed);
            self.field(LAST_BATCH_HEAD_AT).store(0, Ordering::Relaxed);
            self.field(USED_IDX_AT).store(used_idx, Ordering::Relaxed);
            for head in 0..self.size {
                self.inflight(head).store(0, Ordering::Relaxed);
            }
            self.field(VERSION_AT).store(VERSION, Ordering::Release);
            self.counter = 0;
            return Ok(Vec::new());
        }
        let desc_num = self.field(DESC_NUM_AT).load(Ordering::Acquire);
        if version != VERSION || desc_num != self.size {
            return Err(invalid(format!(
                "inflight queue region of version {version} for {desc_num} descriptors, \
                 expected version {VERSION} for {}",
                self.size
            )));
        }
        if self.field(USED_IDX_AT).load(Ordering::Acquire) != used_idx {
            // Died after publishing a used entry and before clearing it.
            let head = self.field(LAST_BATCH_HEAD_AT).load(Ordering::Acquire);
            if head < self.size {
                self.inflight(head).store(0, Ordering::Release);
            }
            self.field(USED_IDX_AT).store(used_idx, Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter_of(h).load(Ordering::Acquire), h))
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(heads.into_iter().map(|(_, h)| h).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (Arc<InflightRegion>, VhostUserInflight, File) {
        InflightRegion::create(queues, size, 8, 1024).unwrap()
    }

    #[test]
    fn sizes_follow_the_layout() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(256), 16 + 4096 + 48);
        let (_, msg, file) = region(2, 128);
        assert_eq!(msg.mmap_size, 2 * queue_region_size(128) as u64);
        assert_eq!(file.metadata().unwrap().len(), msg.mmap_size);
    }

    #[test]
    fn a_new_region_has_nothing_to_resubmit() {
        let (r, _, _) = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        assert_eq!(q.recover(5).unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn inflight_heads_come_back_in_pop_order() {
        let (r, msg, file) = region(2, 8);
        let mut q = r.queue(1, 8).unwrap();
        q.recover(0).unwrap();
        for head in [5, 2, 7, 0] {
            q.mark(head);
        }
        q.before_used(2);
        q.after_used(2, 1);
        // Another process maps the same file.
        let r2 = InflightRegion::open(&msg, &file, 8, 1024).unwrap();
        let mut q2 = r2.queue(1, 8).unwrap();
        assert_eq!(q2.recover(1).unwrap(), vec![5, 7, 0]);
        // Queue 0 is untouched.
        assert!(r2.queue(0, 8).unwrap().recover(0).unwrap().is_empty());
        // New marks come after the resubmitted ones.
        q2.mark(3);
        let mut q3 = r2.queue(1, 8).unwrap();
        assert_eq!(q3.recover(1).unwrap(), vec![5, 7, 0, 3]);
    }

    #[test]
    fn a_used_entry_published_before_a_crash_is_not_resubmitted() {
        let (r, _, _) = region(1, 8);
        let mut q = r.queue(0, 8).unwrap();
        q.recover(10).unwrap();
        q.mark(4);
        q.mark(6);
        q.before_used(6);
        // The used entry went out (the guest's used index is 11), the
        // process died before clearing the head.
        let mut q2 = r.queue(0, 8).unwrap();
        assert_eq!(q2.recover(11).unwrap(), vec![4]);
        // Died before publishing: still inflight.
        q2.before_used(4);
        let mut q3 = r.queue(0, 8).unwrap();
        assert_eq!(q3.recover(11).unwrap(), vec![4]);
    }

    #[test]
    fn bad_regions_are_refused() {
        let (_, msg, file) = region(2, 8);
        let open = |m: VhostUserInflight| InflightRegion::open(&m, &file, 8, 1024).map(|_| ());
        let with = |f: &dyn Fn(&mut VhostUserInflight)| {
            let mut m = msg;
            f(&mut m);
            m
        };
        assert!(open(with(&|m| m.mmap_size = 10)).is_err());
        assert!(open(with(&|m| m.mmap_offset = 4096)).is_err());
        assert!(open(with(&|m| m.mmap_offset = 1)).is_err());
        assert!(open(with(&|m| m.num_queues = 0)).is_err());
        assert!(open(with(&|m| m.num_queues = 9)).is_err());
        assert!(open(with(&|m| m.queue_size = 0)).is_err());
        assert!(open(with(&|m| m.queue_size = 2048)).is_err());
        assert!(open(with(&|m| m.queue_size = 16)).is_err()); // too small a region
        assert!(open(with(&|m| m.mmap_offset = !4095)).is_err());
        assert!(open(msg).is_ok());
        // A file that can shrink under the mapping is refused: a memfd
        // without seals, and a file that cannot have any.
        // SAFETY: a plain memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nothing else.
        let unsealed = unsafe { File::from_raw_fd(fd) };
        unsealed.set_len(msg.mmap_size).unwrap();
        assert!(InflightRegion::open(&msg, &unsealed, 8, 1024).is_err());
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(msg.mmap_size).unwrap();
        assert!(InflightRegion::open(&msg, &plain, 8, 1024).is_err());
        // A queue outside the region, or of another size.
        let r = InflightRegion::open(&msg, &file, 8, 1024).unwrap();
        assert!(r.queue(2, 8).is_err());
        assert!(r.queue(0, 16).is_err());
    }

    #[test]
    fn a_region_of_another_layout_is_refused() {
        let (r, _, _) = region(1, 8);
        let q = r.queue(0, 8).unwrap();
        q.field(VERSION_AT).store(1, Ordering::Relaxed);
        q.field(DESC_NUM_AT).store(4, Ordering::Relaxed);
        assert!(r.queue(0, 8).unwrap().recover(0).is_err());
        q.field(VERSION_AT).store(7, Ordering::Relaxed);
        q.field(DESC_NUM_AT).store(8, Ordering::Relaxed);
        assert!(r.queue(0, 8).unwrap().recover(0).is_err());
    }
}
