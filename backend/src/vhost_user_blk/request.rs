//! Turning a descriptor chain into a block request, with the validation
//! qemu-storage-daemon's virtio-blk handler does.
//!
//! The chain is read as two byte streams, like QEMU does: the readable one
//! (header, then data for writes) and the writable one (data for reads, then
//! the status byte, which is its last byte). Data is never copied: the
//! request holds the guest memory segments.

use std::sync::Arc;

use blkgraph_graph::{IoBuffer, IoSegment, Node, WriteFlags, ZeroFlags};
use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SEG_MAX};
use crate::stats::{OpKind, Outcome, Sample};

/// Guest memory as the device sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The largest request in bytes (QEMU's BDRV_REQUEST_MAX_BYTES).
const MAX_REQUEST_BYTES: u64 = (i32::MAX as u64) & !511;

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct OutHeader {
    type_: u32,
    ioprio: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for OutHeader {}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for DiscardSegment {}

/// What the device knows when it validates a request.
#[derive(Clone, Copy)]
pub struct DeviceLimits {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Whether writes and write-zeroes must be stable when they complete
    /// (`writethrough=on`, or the guest set `wce` = 0).
    pub writethrough: bool,
}

/// The operation a request asks for.
enum Op {
    Read {
        offset: u64,
        data: IoBuffer,
    },
    Write {
        offset: u64,
        data: IoBuffer,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    },
    /// Nothing to do but report this status.
    Done(u8),
}

/// Where the status byte goes.
struct StatusByte(*mut u8);

// SAFETY: the pointer is into guest memory kept mapped by the request's
// `memory` Arc; it is written once, with a volatile write.
unsafe impl Send for StatusByte {}

/// A request popped from a virtqueue.
pub struct Request {
    head: u16,
    used_len: u32,
    /// What the statistics count it as, once its type is known.
    kind: Option<OpKind>,
    status: Option<StatusByte>,
    op: Op,
    /// Keeps the guest memory the buffers point to mapped.
    _memory: Arc<GuestMemory>,
}

/// A finished request, to put on the used ring.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// Head descriptor index.
    pub head: u16,
    /// Bytes written to the chain.
    pub len: u32,
    /// What the statistics count, if anything; its `ns` is left for the
    /// worker to fill in from `started_ns`.
    pub sample: Option<Sample>,
    /// When the request was taken from the ring ([`crate::stats::now_ns`]).
    pub started_ns: u64,
}

/// A byte stream over guest memory segments.
struct Stream {
    segments: SmallVec<[(GuestAddress, u32); 4]>,
    len: u64,
    /// A segment ends past the last guest address: the stream is not used
    /// (offsets into it would overflow).
    wraps: bool,
}

impl Stream {
    fn new() -> Self {
        Stream {
            segments: SmallVec::new(),
            len: 0,
            wraps: false,
        }
    }

    fn push(&mut self, addr: GuestAddress, len: u32) {
        if addr.0.checked_add(u64::from(len)).is_none() {
            self.wraps = true;
        }
        self.segments.push((addr, len));
        self.len += u64::from(len);
    }

    /// The (address, length) pieces of `[offset, offset + len)`.
    fn range(
        &self,
        mut offset: u64,
        mut len: u64,
    ) -> impl Iterator<Item = (GuestAddress, u64)> + '_ {
        self.segments.iter().filter_map(move |&(addr, seg_len)| {
            let seg_len = u64::from(seg_len);
            if len == 0 {
                return None;
            }
            if offset >= seg_len {
                offset -= seg_len;
                return None;
            }
            let take = (seg_len - offset).min(len);
            let piece = (GuestAddress(addr.0 + offset), take);
            len -= take;
            offset = 0;
            Some(piece)
        })
    }

    /// The host address of the byte at `offset`.
    fn host_byte(&self, mem: &GuestMemory, offset: u64) -> Option<*mut u8> {
        let (addr, _) = self.range(offset, 1).next()?;
        let slice = GuestMemoryBackend::get_slice(mem, addr, 1).ok()?;
        Some(slice.ptr_guard_mut().as_ptr())
    }

    fn read_bytes(&self, mem: &GuestMemory, offset: u64, out: &mut [u8]) -> Option<()> {
        let mut done = 0;
        for (addr, len) in self.range(offset, out.len() as u64) {
            vm_memory::Bytes::read_slice(mem, &mut out[done..done + len as usize], addr).ok()?;
            done += len as usize;
        }
        (done == out.len()).then_some(())
    }

    /// Host segments of a range, or None if guest memory does not hold it.
    fn host_segments(&self, mem: &GuestMemory, offset: u64, len: u64) -> Option<Vec<IoSegment>> {
        let mut segs = Vec::with_capacity(self.segments.len());
        for (addr, len) in self.range(offset, len) {
            for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
                let slice = slice.ok()?;
                segs.push(IoSegment {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Some(segs)
    }
}

/// A buffer over guest memory segments of a request.
fn guest_buffer(segments: Vec<IoSegment>, memory: &Arc<GuestMemory>) -> IoBuffer {
    // SAFETY: the segments come from `Stream::host_segments` and lie in the
    // regions of `memory`, which stay mapped while the buffer holds it;
    // guest memory is only accessed by volatile copies and system calls.
    unsafe { IoBuffer::from_raw_segments(segments, memory.clone()) }
}

/// Whether `[sector, sector + bytes)` is a valid request range (QEMU's
/// virtio_blk_sect_range_ok).
fn range_ok(limits: &DeviceLimits, sector: u64, bytes: u64) -> bool {
    if !bytes.is_multiple_of(512) || bytes > MAX_REQUEST_BYTES {
        return false;
    }
    let Some(offset) = sector.checked_mul(512) else {
        return false;
    };
    offset % limits.block_size == 0
        && offset <= limits.capacity
        && bytes <= limits.capacity - offset
}

impl Request {
    /// Parses a chain. Malformed requests become a request that only reports
    /// IOERR or UNSUPP; a chain without a single writable byte cannot take a
    /// status and is returned with a used length of 0.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        memory: &Arc<GuestMemory>,
        limits: &DeviceLimits,
        serial: &[u8],
    ) -> Request
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        let head = chain.head_index();
        let mem: &GuestMemory = memory;
        let mut readable = Stream::new();
        let mut writable = Stream::new();
        let mut malformed = false;
        let mut descriptors = 0u32;
        for desc in chain {
            descriptors += 1;
            if desc.len() == 0 {
                malformed = true;
            }
            if desc.is_write_only() {
                writable.push(desc.addr(), desc.len());
            } else {
                if !writable.segments.is_empty() {
                    malformed = true; // readable after writable
                }
                readable.push(desc.addr(), desc.len());
            }
        }
        let mut req = Request {
            head,
            used_len: writable.len.min(u64::from(u32::MAX)) as u32,
            kind: None,
            status: None,
            op: Op::Done(VIRTIO_BLK_S_IOERR as u8),
            _memory: memory.clone(),
        };
        if writable.len == 0 || writable.wraps {
            log::warn!("request {head}: no writable byte in guest memory for the status");
            req.used_len = 0;
            return req;
        }
        let status_at = writable.len - 1;
        match writable.host_byte(mem, status_at) {
            Some(ptr) => req.status = Some(StatusByte(ptr)),
            None => {
                req.used_len = 0;
                return req;
            }
        }
        let mut header = OutHeader::default();
        if malformed
            || readable.wraps
            || descriptors > SEG_MAX + 2
            || readable.read_bytes(mem, 0, header.as_mut_slice()).is_none()
        {
            return req;
        }
        let type_ = u32::from_le(header.type_);
        let sector = u64::from_le(header.sector);
        let in_data = status_at; // writable bytes before the status
        let out_data = readable.len - std::mem::size_of::<OutHeader>() as u64;
        // From here on, a request refused is counted as invalid.
        req.kind = match type_ {
            VIRTIO_BLK_T_IN => Some(OpKind::Read),
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES => Some(OpKind::Write),
            VIRTIO_BLK_T_FLUSH => Some(OpKind::Flush),
            VIRTIO_BLK_T_DISCARD => Some(OpKind::Unmap),
            _ => None,
        };
        req.op = match type_ {
            VIRTIO_BLK_T_IN => {
                if !range_ok(limits, sector, in_data) {
                    return req;
                }
                match writable.host_segments(mem, 0, in_data) {
                    Some(segs) => Op::Read {
                        offset: sector * 512,
                        data: guest_buffer(segs, memory),
                    },
                    None => return req,
                }
            }
            VIRTIO_BLK_T_OUT => {
                if limits.read_only || !range_ok(limits, sector, out_data) {
                    return req;
                }
                match readable.host_segments(mem, 16, out_data) {
                    Some(segs) => Op::Write {
                        offset: sector * 512,
                        data: guest_buffer(segs, memory),
                        fua: limits.writethrough,
                    },
                    None => return req,
                }
            }
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => {
                let n = (serial.len() + 1)
                    .min(VIRTIO_BLK_ID_BYTES as usize)
                    .min(in_data as usize);
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let copied = serial.len().min(id.len());
                id[..copied].copy_from_slice(&serial[..copied]);
                let mut done = 0;
                for (addr, len) in writable.range(0, n as u64) {
                    if vm_memory::Bytes::write_slice(mem, &id[done..done + len as usize], addr)
                        .is_err()
                    {
                        return req;
                    }
                    done += len as usize;
                }
                Op::Done(VIRTIO_BLK_S_OK as u8)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                Self::parse_discard(type_, &readable, mem, limits)
            }
            _ => Op::Done(VIRTIO_BLK_S_UNSUPP as u8),
        };
        req
    }

    fn parse_discard(
        type_: u32,
        readable: &Stream,
        mem: &GuestMemory,
        limits: &DeviceLimits,
    ) -> Op {
        let ioerr = Op::Done(VIRTIO_BLK_S_IOERR as u8);
        let unsupp = Op::Done(VIRTIO_BLK_S_UNSUPP as u8);
        let seg_len = std::mem::size_of::<DiscardSegment>() as u64;
        // Only one segment is supported.
        if readable.len - 16 > seg_len {
            return unsupp;
        }
        let mut seg = DiscardSegment::default();
        if readable.read_bytes(mem, 16, seg.as_mut_slice()).is_none() {
            return ioerr;
        }
        let is_zeroes = type_ == VIRTIO_BLK_T_WRITE_ZEROES;
        let sector = u64::from_le(seg.sector);
        let num_sectors = u32::from_le(seg.num_sectors);
        let flags = u32::from_le(seg.flags);
        let max = if is_zeroes {
            MAX_WRITE_ZEROES_SECTORS
        } else {
            MAX_DISCARD_SECTORS
        };
        let bytes = u64::from(num_sectors) * 512;
        if limits.read_only || num_sectors > max || !range_ok(limits, sector, bytes) {
            return ioerr;
        }
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!is_zeroes && unmap) {
            return unsupp;
        }
        let offset = sector * 512;
        if is_zeroes {
            // As QEMU's block backend: without a write cache, every write,
            // zeroes included, is FUA (discards are not writes).
            Op::WriteZeroes {
                offset,
                len: bytes,
                unmap,
                fua: limits.writethrough,
            }
        } else {
            Op::Discard { offset, len: bytes }
        }
    }

    /// Whether the request is finished without doing any I/O.
    pub fn is_done(&self) -> bool {
        matches!(self.op, Op::Done(_))
    }

    /// Runs the request on `root` and writes its status; `started_ns` is
    /// when it was taken from the ring ([`crate::stats::now_ns`]).
    pub async fn execute(self, root: Arc<Node>, started_ns: u64) -> Completion {
        let ok = |r: std::io::Result<()>| match r {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                log::debug!("request failed: {e}");
                VIRTIO_BLK_S_IOERR as u8
            }
        };
        let status = match &self.op {
            Op::Read { offset, data } => ok(root.read(*offset, data).await),
            Op::Write { offset, data, fua } => {
                ok(root.write(*offset, data, WriteFlags { fua: *fua }).await)
            }
            Op::Flush => ok(root.flush().await),
            Op::Discard { offset, len } => ok(root.discard(*offset, *len).await),
            Op::WriteZeroes {
                offset,
                len,
                unmap,
                fua,
            } => {
                let flags = ZeroFlags {
                    may_unmap: *unmap,
                    fua: *fua,
                };
                ok(root.write_zeroes(*offset, *len, flags).await)
            }
            Op::Done(status) => *status,
        };
        self.complete(status, started_ns)
    }

    /// Writes `status` (or the status of a request that needs no I/O) and
    /// gives the used-ring entry of a request taken from the ring at
    /// `started_ns`.
    pub fn complete(self, status: u8, started_ns: u64) -> Completion {
        let (status, outcome) = match self.op {
            Op::Done(s) => (s, Outcome::Invalid),
            _ if status == VIRTIO_BLK_S_OK as u8 => (status, Outcome::Done),
            _ => (status, Outcome::Failed),
        };
        let (offset, bytes) = match &self.op {
            Op::Read { offset, data } | Op::Write { offset, data, .. } => {
                (*offset, data.len() as u64)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => (*offset, *len),
            Op::Flush | Op::Done(_) => (0, 0),
        };
        let sample = self.kind.map(|kind| Sample {
            kind,
            offset,
            bytes,
            ns: 0,
            outcome,
        });
        if let Some(StatusByte(ptr)) = self.status {
            // SAFETY: ptr is the last writable byte of the chain, in guest
            // memory kept mapped by `_memory`.
            unsafe { ptr.write_volatile(status) };
        }
        Completion {
            head: self.head,
            len: self.used_len,
            sample,
            started_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const LIMITS: DeviceLimits = DeviceLimits {
        capacity: 1 << 20,
        block_size: 512,
        read_only: false,
        writethrough: false,
    };

    /// 64 KiB of guest memory with a queue of 4 whose one available chain
    /// is `descs` (address, length, flags; NEXT is added), and that chain.
    fn chain(descs: &[(u64, u32, u16)]) -> (Arc<GuestMemory>, DescriptorChain<Arc<GuestMemory>>) {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let more = i + 1 < descs.len();
            let mut raw = Vec::with_capacity(16);
            raw.extend_from_slice(&addr.to_le_bytes());
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&(flags | if more { NEXT } else { 0 }).to_le_bytes());
            raw.extend_from_slice(&(i as u16 + 1).to_le_bytes());
            mem.write_slice(&raw, GuestAddress(16 * i as u64)).unwrap();
        }
        // The available ring: no flags, idx 1, head 0.
        mem.write_slice(&[0, 0, 1, 0, 0, 0], GuestAddress(0x100))
            .unwrap();
        let mut queue = Queue::new(4).unwrap();
        queue.set_desc_table_address(Some(0), Some(0));
        queue.set_avail_ring_address(Some(0x100), Some(0));
        queue.set_used_ring_address(Some(0x200), Some(0));
        queue.set_ready(true);
        let chain = queue.pop_descriptor_chain(mem.clone()).unwrap();
        (mem, chain)
    }

    fn header(mem: &GuestMemory, at: u64, type_: u32) {
        let header = OutHeader {
            type_: type_.to_le(),
            ioprio: 0,
            sector: 0,
        };
        mem.write_slice(header.as_slice(), GuestAddress(at))
            .unwrap();
    }

    /// Found by the virtio_blk fuzz target: a descriptor whose end lies
    /// past the last guest address (address + length overflows u64). The
    /// byte streams added an offset to its address, which overflowed: a
    /// panic in debug builds, and in release builds a wrapped address, so
    /// the status byte or the data went to the guest memory at the start of
    /// the address space. Such a descriptor is now like one outside guest
    /// memory: no status if it holds the status byte, IOERR otherwise.
    #[test]
    fn descriptors_that_wrap_around_the_address_space() {
        let end = u64::MAX - 7;
        // The status byte in a wrapping descriptor: no status, nothing used.
        let (mem, c) = chain(&[(0x1000, 16, 0), (end, 16, WRITE)]);
        header(&mem, 0x1000, VIRTIO_BLK_T_IN);
        let req = Request::parse(c, &mem, &LIMITS, &[]);
        assert!(req.is_done());
        assert_eq!(req.complete(VIRTIO_BLK_S_OK as u8, 0).len, 0);
        // Write data in a wrapping descriptor: IOERR in the status byte.
        let (mem, c) = chain(&[(0x1000, 16, 0), (end, 512, 0), (0x2000, 1, WRITE)]);
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT);
        let req = Request::parse(c, &mem, &LIMITS, &[]);
        assert!(req.is_done());
        assert_eq!(req.complete(VIRTIO_BLK_S_OK as u8, 0).len, 1);
        let mut status = [0xffu8];
        mem.read_slice(&mut status, GuestAddress(0x2000)).unwrap();
        assert_eq!(u32::from(status[0]), VIRTIO_BLK_S_IOERR);
        // A header split so that its second half wraps.
        let (mem, c) = chain(&[(0x1000, 8, 0), (end, 8, 0), (0x2000, 1, WRITE)]);
        header(&mem, 0x1000, VIRTIO_BLK_T_FLUSH);
        let req = Request::parse(c, &mem, &LIMITS, &[]);
        assert!(req.is_done());
        assert_eq!(req.complete(VIRTIO_BLK_S_OK as u8, 0).len, 1);
    }
}
