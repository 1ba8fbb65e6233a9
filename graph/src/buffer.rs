//! Scatter-gather buffers that block operations read into and write from.
//!
//! A request's data usually lives in guest memory, which the guest may touch
//! at any moment: it is never turned into a Rust reference. An [`IoBuffer`]
//! is a list of raw segments that is only handed to system calls or copied
//! with raw pointer copies.

use std::alloc::{self, Layout};
use std::io;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

/// One contiguous memory segment, laid out as the kernel's `struct iovec`.
pub type IoSegment = libc::iovec;

/// A scatter-gather list of memory segments, valid for the lifetime `'a`.
pub struct IoBuffer<'a> {
    segments: Vec<IoSegment>,
    len: usize,
    _memory: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoBuffer only carries addresses of memory that its creator
// guarantees to stay valid for 'a (see `from_raw_segments`); the memory is
// accessed through raw copies and system calls only, never through references,
// so sharing or sending the list between threads creates no aliasing.
unsafe impl Send for IoBuffer<'_> {}
// SAFETY: see the `Send` implementation above.
unsafe impl Sync for IoBuffer<'_> {}

impl<'a> IoBuffer<'a> {
    /// A buffer over one mutable byte slice.
    pub fn from_slice(slice: &'a mut [u8]) -> Self {
        let len = slice.len();
        IoBuffer {
            segments: vec![IoSegment {
                iov_base: slice.as_mut_ptr().cast(),
                iov_len: len,
            }],
            len,
            _memory: PhantomData,
        }
    }

    /// A buffer over raw memory segments.
    ///
    /// # Safety
    ///
    /// Every segment must point to memory that is valid for reads and writes
    /// of `iov_len` bytes for the whole lifetime `'a`, and that is not
    /// accessed through Rust references while the buffer is in use.
    pub unsafe fn from_raw_segments(segments: Vec<IoSegment>) -> Self {
        let len = segments.iter().map(|s| s.iov_len).sum();
        IoBuffer {
            segments,
            len,
            _memory: PhantomData,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no byte at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, for vectored system calls.
    pub fn segments(&self) -> &[IoSegment] {
        &self.segments
    }

    /// Whether every segment starts and ends on a multiple of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.segments
            .iter()
            .all(|s| (s.iov_base as usize).is_multiple_of(align) && s.iov_len % align == 0)
    }

    /// The part of the buffer from `offset`, `len` bytes long.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn slice(&self, offset: usize, len: usize) -> IoBuffer<'_> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        let mut segments = Vec::new();
        let mut skip = offset;
        let mut left = len;
        for s in &self.segments {
            if left == 0 {
                break;
            }
            if skip >= s.iov_len {
                skip -= s.iov_len;
                continue;
            }
            let take = (s.iov_len - skip).min(left);
            segments.push(IoSegment {
                // SAFETY: skip < iov_len, so the pointer stays inside the segment.
                iov_base: unsafe { s.iov_base.cast::<u8>().add(skip) }.cast(),
                iov_len: take,
            });
            left -= take;
            skip = 0;
        }
        IoBuffer {
            segments,
            len,
            _memory: PhantomData,
        }
    }

    /// Copies `src` into the buffer at `offset`.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn copy_from(&self, offset: usize, src: &[u8]) {
        let mut done = 0;
        self.for_each_range(offset, src.len(), |ptr, len| {
            // SAFETY: for_each_range yields ranges inside segments that are
            // valid for writes (from_raw_segments' contract); `src` is a
            // distinct Rust slice, so the ranges do not overlap.
            unsafe { ptr::copy_nonoverlapping(src[done..].as_ptr(), ptr, len) };
            done += len;
        });
    }

    /// Copies bytes of the buffer from `offset` into `dst`.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) {
        let mut done = 0;
        self.for_each_range(offset, dst.len(), |ptr, len| {
            // SAFETY: as in copy_from, with reads instead of writes.
            unsafe { ptr::copy_nonoverlapping(ptr, dst[done..].as_mut_ptr(), len) };
            done += len;
        });
    }

    /// Sets `len` bytes from `offset` to zero.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        self.for_each_range(offset, len, |ptr, n| {
            // SAFETY: the range is inside a segment valid for writes.
            unsafe { ptr::write_bytes(ptr, 0, n) };
        });
    }

    fn for_each_range(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize)) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        let mut skip = offset;
        let mut left = len;
        for s in &self.segments {
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

/// An aligned, zeroed heap buffer, for O_DIRECT bounce I/O and copies.
pub(crate) struct AlignedBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned heap memory.
unsafe impl Send for AlignedBuffer {}

impl AlignedBuffer {
    /// `len` zeroed bytes (at least `align`) aligned to `align`.
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(align), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr)
            .map(|ptr| AlignedBuffer { ptr, layout })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
    }

    /// The first `len` bytes as an I/O buffer.
    pub(crate) fn as_io_buffer(&mut self, len: usize) -> IoBuffer<'_> {
        assert!(len <= self.layout.size());
        let seg = IoSegment {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: the segment lies inside this buffer, which is borrowed
        // mutably for the IoBuffer's lifetime.
        unsafe { IoBuffer::from_raw_segments(vec![seg]) }
    }
}

impl AlignedBuffer {
    /// The start of the buffer.
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

    fn two_segments<'a>(a: &'a mut [u8], b: &'a mut [u8]) -> IoBuffer<'a> {
        let segs = vec![
            IoSegment {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            IoSegment {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: both slices are borrowed mutably for 'a and not used otherwise.
        unsafe { IoBuffer::from_raw_segments(segs) }
    }

    #[test]
    fn copies_across_segments() {
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        let buf = two_segments(&mut a, &mut b);
        assert_eq!(buf.len(), 8);
        buf.copy_from(2, &[1, 2, 3, 4]);
        let mut out = [0u8; 6];
        buf.copy_to(1, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 0]);
        buf.fill_zero(3, 2);
        buf.copy_to(1, &mut out);
        assert_eq!(out, [0, 1, 0, 0, 4, 0]);
        drop(buf);
        assert_eq!(a, [0, 0, 1, 0]);
        assert_eq!(b, [0, 4, 0, 0]);
    }

    #[test]
    fn slice_and_alignment() {
        let (mut a, mut b) = ([7u8; 4], [9u8; 4]);
        let buf = two_segments(&mut a, &mut b);
        let s = buf.slice(3, 3);
        assert_eq!(s.len(), 3);
        assert_eq!(s.segments().len(), 2);
        let mut out = [0u8; 3];
        s.copy_to(0, &mut out);
        assert_eq!(out, [7, 9, 9]);
        assert!(buf.is_aligned(1));
        assert!(!s.is_aligned(2));
    }

    #[test]
    #[should_panic]
    fn out_of_range_copy_panics() {
        let mut a = [0u8; 4];
        IoBuffer::from_slice(&mut a).copy_from(2, &[0; 3]);
    }
}
