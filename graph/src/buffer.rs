//! Scatter-gather buffers that block operations read into and write from.
//!
//! A request's data usually lives in guest memory, which the guest may touch
//! at any moment, and the kernel reads and writes it after the operation was
//! submitted. So memory is never turned into a Rust reference: an
//! [`IoBuffer`] is a shared list of raw segments together with what keeps
//! their memory alive (an owned allocation, or the guest memory mapping).
//! Its bytes are only accessed with volatile copies, as vm-memory's
//! `VolatileSlice` does, and by system calls. Every operation in flight on a
//! buffer holds a clone of it, so the memory stays valid until the kernel is
//! done with it, even if the operation's future is dropped or forgotten.

use std::alloc::{self, Layout};
use std::any::Any;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::VolatileSlice;

/// One contiguous memory segment, laid out as the kernel's `struct iovec`.
pub type IoSegment = libc::iovec;

/// What keeps the memory of a buffer's segments valid.
enum Owner {
    /// A vector that can be handed back by [`IoBuffer::into_vec`].
    Vec(Vec<u8>),
    /// An aligned heap allocation.
    Aligned { _memory: AlignedBuffer },
    /// Memory owned elsewhere (e.g. a guest memory mapping).
    Shared { _memory: Arc<dyn Any + Send + Sync> },
    /// The buffer this one is a part of.
    Parent { _buffer: IoBuffer },
    /// The buffers this one strings together.
    Parts { _buffers: Vec<IoBuffer> },
}

struct Inner {
    segments: Vec<IoSegment>,
    len: usize,
    /// Dropped after `segments`: the memory outlives every use of it.
    owner: Owner,
}

// SAFETY: the segments point to memory kept valid by `owner` for as long as
// `Inner` lives; that memory is only accessed with volatile copies and by
// system calls, never through Rust references, so sending or sharing the
// list between threads creates no aliasing of Rust data.
unsafe impl Send for Inner {}
// SAFETY: see the `Send` implementation above.
unsafe impl Sync for Inner {}

/// A scatter-gather list of memory segments and what keeps them valid.
///
/// Cloning is cheap and shares the memory.
#[derive(Clone)]
pub struct IoBuffer {
    inner: Arc<Inner>,
}

impl IoBuffer {
    fn new(segments: Vec<IoSegment>, owner: Owner) -> Self {
        let len = segments.iter().map(|s| s.iov_len).sum();
        IoBuffer {
            inner: Arc::new(Inner {
                segments,
                len,
                owner,
            }),
        }
    }

    /// A buffer over a vector's bytes.
    pub fn from_vec(mut data: Vec<u8>) -> Self {
        let segment = IoSegment {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // Moving the vector does not move its heap allocation.
        IoBuffer::new(vec![segment], Owner::Vec(data))
    }

    /// `len` zeroed bytes whose address is a multiple of `align` (a power
    /// of two), for O_DIRECT I/O.
    pub fn aligned(len: usize, align: usize) -> io::Result<Self> {
        let mut buffer = AlignedBuffer::new(len, align)?;
        let segment = IoSegment {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: len,
        };
        Ok(IoBuffer::new(
            vec![segment],
            Owner::Aligned { _memory: buffer },
        ))
    }

    /// A buffer over raw memory segments kept valid by `owner`.
    ///
    /// # Safety
    ///
    /// Every segment must point to memory that is valid for reads and writes
    /// of `iov_len` bytes for as long as `owner` is alive, and that is never
    /// accessed through Rust references while it is.
    pub unsafe fn from_raw_segments(
        segments: Vec<IoSegment>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        IoBuffer::new(segments, Owner::Shared { _memory: owner })
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the buffer holds no byte at all.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The segments, for vectored system calls. They stay valid while this
    /// buffer (or a clone of it) lives.
    pub fn segments(&self) -> &[IoSegment] {
        &self.inner.segments
    }

    /// Whether every segment starts and ends on a multiple of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.segments()
            .iter()
            .all(|s| (s.iov_base as usize).is_multiple_of(align) && s.iov_len % align == 0)
    }

    /// The part of the buffer from `offset`, `len` bytes long; it keeps
    /// this buffer's memory alive.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn slice(&self, offset: usize, len: usize) -> IoBuffer {
        let mut segments = Vec::new();
        self.for_each_range(offset, len, |ptr, n| {
            segments.push(IoSegment {
                iov_base: ptr.cast(),
                iov_len: n,
            })
        });
        IoBuffer::new(
            segments,
            Owner::Parent {
                _buffer: self.clone(),
            },
        )
    }

    /// The bytes of `parts` one after the other, as one buffer (for one
    /// vectored write of pieces from several places); it keeps every
    /// part's memory alive.
    pub fn concat(parts: &[IoBuffer]) -> IoBuffer {
        let segments = parts
            .iter()
            .flat_map(|p| p.segments().iter().copied())
            .filter(|s| s.iov_len > 0)
            .collect();
        IoBuffer::new(
            segments,
            Owner::Parts {
                _buffers: parts.to_vec(),
            },
        )
    }

    /// Copies `src` into the buffer at `offset`.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn copy_from(&self, offset: usize, src: &[u8]) {
        let mut done = 0;
        self.for_each_range(offset, src.len(), |ptr, n| {
            // SAFETY: for_each_range yields ranges inside segments, which are
            // valid for writes while `self` lives.
            let dst = unsafe { VolatileSlice::new(ptr, n) };
            dst.copy_from(&src[done..done + n]);
            done += n;
        });
    }

    /// Copies bytes of the buffer from `offset` into `dst`.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) {
        let mut done = 0;
        self.for_each_range(offset, dst.len(), |ptr, n| {
            // SAFETY: as in copy_from, with reads instead of writes.
            let src = unsafe { VolatileSlice::new(ptr, n) };
            src.copy_to(&mut dst[done..done + n]);
            done += n;
        });
    }

    /// Copies `len` bytes of `src` from `src_offset` into this buffer at
    /// `offset`.
    ///
    /// # Panics
    ///
    /// If a range is outside its buffer.
    pub fn copy_from_buffer(&self, offset: usize, src: &IoBuffer, src_offset: usize, len: usize) {
        let mut chunk = [0u8; 4096];
        let mut done = 0;
        while done < len {
            let n = chunk.len().min(len - done);
            src.copy_to(src_offset + done, &mut chunk[..n]);
            self.copy_from(offset + done, &chunk[..n]);
            done += n;
        }
    }

    /// Sets `len` bytes from `offset` to zero.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        const ZEROES: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = ZEROES.len().min(len - done);
            self.copy_from(offset + done, &ZEROES[..n]);
            done += n;
        }
    }

    /// Whether every byte is zero (detect-zeroes).
    pub fn is_zero(&self) -> bool {
        let mut chunk = [0u8; 4096];
        let mut done = 0;
        while done < self.len() {
            let n = chunk.len().min(self.len() - done);
            self.copy_to(done, &mut chunk[..n]);
            if chunk[..n].iter().any(|b| *b != 0) {
                return false;
            }
            done += n;
        }
        true
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        self.copy_to(0, &mut out);
        out
    }

    /// The bytes as a vector: without a copy if this buffer was made by
    /// [`IoBuffer::from_vec`] and nothing else holds it any more.
    pub fn into_vec(self) -> Vec<u8> {
        match Arc::try_unwrap(self.inner) {
            Ok(Inner {
                owner: Owner::Vec(data),
                ..
            }) => data,
            Ok(inner) => IoBuffer {
                inner: Arc::new(inner),
            }
            .to_vec(),
            Err(inner) => IoBuffer { inner }.to_vec(),
        }
    }

    fn for_each_range(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize)) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len()),
            "range {offset}+{len} outside a buffer of {} bytes",
            self.len()
        );
        let mut skip = offset;
        let mut left = len;
        for s in self.segments() {
            if left == 0 {
                break;
            }
            if skip >= s.iov_len {
                skip -= s.iov_len;
                continue;
            }
            let take = (s.iov_len - skip).min(left);
            // SAFETY: skip < iov_len, so the pointer stays inside the segment.
            f(unsafe { s.iov_base.cast::<u8>().add(skip) }, take);
            left -= take;
            skip = 0;
        }
    }
}

/// An aligned, zeroed heap allocation.
pub(crate) struct AlignedBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the allocation is exclusively owned.
unsafe impl Send for AlignedBuffer {}
// SAFETY: the allocation is only reached through raw pointers handed out by
// `as_mut_ptr`, whose users follow IoBuffer's rules.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// `len` zeroed bytes (at least `align`) aligned to `align`.
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(align).max(1), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr)
            .map(|ptr| AlignedBuffer { ptr, layout })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
    }

    /// The start of the allocation.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_segments(a: Vec<u8>, b: Vec<u8>) -> IoBuffer {
        let (a, b) = (IoBuffer::from_vec(a), IoBuffer::from_vec(b));
        let segments = [a.segments()[0], b.segments()[0]].to_vec();
        // SAFETY: the segments point into `a` and `b`, which the owner keeps.
        unsafe { IoBuffer::from_raw_segments(segments, Arc::new((a, b))) }
    }

    #[test]
    fn concat_strings_parts_together_and_keeps_them_alive() {
        let whole = {
            let a = IoBuffer::from_vec(vec![1, 2, 3]);
            let b = two_segments(vec![4], vec![5, 6]).slice(1, 2);
            IoBuffer::concat(&[a, IoBuffer::from_vec(Vec::new()), b])
        };
        assert_eq!(whole.segments().len(), 2, "empty parts add no segment");
        assert_eq!(whole.to_vec(), [1, 2, 3, 5, 6]);
    }

    #[test]
    fn copies_across_segments() {
        let buf = two_segments(vec![0u8; 4], vec![0u8; 4]);
        assert_eq!(buf.len(), 8);
        buf.copy_from(2, &[1, 2, 3, 4]);
        let mut out = [0u8; 6];
        buf.copy_to(1, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 0]);
        buf.fill_zero(3, 2);
        buf.copy_to(1, &mut out);
        assert_eq!(out, [0, 1, 0, 0, 4, 0]);
        assert_eq!(buf.to_vec(), [0, 0, 1, 0, 0, 4, 0, 0]);
    }

    #[test]
    fn slice_and_alignment() {
        let buf = two_segments(vec![7u8; 4], vec![9u8; 4]);
        let s = buf.slice(3, 3);
        drop(buf);
        assert_eq!(s.len(), 3);
        assert_eq!(s.segments().len(), 2);
        assert_eq!(s.to_vec(), [7, 9, 9]);
        assert!(s.slice(0, 0).is_empty());
        assert!(!s.is_aligned(2));
        let a = IoBuffer::aligned(8192, 4096).unwrap();
        assert!(a.is_aligned(4096));
        assert!(a.slice(4096, 4096).is_aligned(4096));
        assert_eq!(a.to_vec(), vec![0; 8192]);
    }

    #[test]
    fn vectors_come_back_without_a_copy() {
        let data = vec![5u8; 100];
        let ptr = data.as_ptr();
        let buf = IoBuffer::from_vec(data);
        buf.copy_from(0, &[1]);
        let back = buf.into_vec();
        assert_eq!(back.as_ptr(), ptr);
        assert_eq!(back[..2], [1, 5]);
        // A shared buffer is copied.
        let buf = IoBuffer::from_vec(vec![3u8; 10]);
        let part = buf.slice(2, 3);
        assert_eq!(buf.into_vec(), vec![3u8; 10]);
        assert_eq!(part.into_vec(), vec![3u8; 3]);
        let mut src = IoBuffer::from_vec((0..10).collect());
        let dst = IoBuffer::aligned(10, 512).unwrap();
        dst.copy_from_buffer(1, &src, 2, 8);
        assert_eq!(dst.to_vec(), [0, 2, 3, 4, 5, 6, 7, 8, 9, 0]);
        src = dst.slice(0, 0);
        assert!(src.is_empty());
    }

    #[test]
    #[should_panic(expected = "outside a buffer")]
    fn out_of_range_copy_panics() {
        IoBuffer::from_vec(vec![0; 4]).copy_from(2, &[0; 3]);
    }
}
