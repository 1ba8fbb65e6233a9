//! Replies of the transmission phase, and the queue that writes them to
//! the socket without copying read data.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::unix::io::RawFd;

use smallvec::SmallVec;

use super::proto::{self, put_chunk_header, put_simple_reply};

/// A piece of a reply on the wire: bytes of `head` or of `data`.
#[derive(Clone, Copy, Debug)]
struct Part {
    in_data: bool,
    start: usize,
    end: usize,
}

/// One complete reply (a simple reply, or every chunk of a structured
/// one): headers and small payloads in `head`, read data in `data`.
#[derive(Debug, Default)]
pub struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
    parts: SmallVec<[Part; 4]>,
    /// Whether it reports an error (for the statistics).
    failed: bool,
}

impl Reply {
    fn with_data(data: Vec<u8>) -> Reply {
        Reply {
            head: Vec::with_capacity(64),
            data,
            ..Reply::default()
        }
    }

    /// Appends bytes written by `f` to the head.
    fn head(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.head.len();
        f(&mut self.head);
        let end = self.head.len();
        match self.parts.last_mut() {
            Some(p) if !p.in_data && p.end == start => p.end = end,
            _ => self.parts.push(Part {
                in_data: false,
                start,
                end,
            }),
        }
    }

    /// Appends read data. An empty range adds nothing: the writer never
    /// sees a part of zero bytes, which no `sendmsg` would get past.
    fn data_part(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.parts.push(Part {
            in_data: true,
            start: range.start,
            end: range.end,
        });
    }

    /// A simple reply without data (success or error).
    pub fn simple(handle: u64, error: u32) -> Reply {
        let mut r = Reply {
            failed: error != 0,
            ..Reply::default()
        };
        r.head(|h| put_simple_reply(h, error, handle));
        r
    }

    /// Whether the reply reports an error.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// A successful simple reply to a read.
    pub fn simple_data(handle: u64, data: Vec<u8>) -> Reply {
        let len = data.len();
        let mut r = Reply::with_data(data);
        r.head(|h| put_simple_reply(h, 0, handle));
        r.data_part(0..len);
        r
    }

    /// A structured reply whose chunks refer to `data` (the read buffer).
    pub fn structured(data: Vec<u8>) -> Reply {
        Reply::with_data(data)
    }

    /// A structured reply made of one error chunk.
    pub fn structured_error(handle: u64, error: u32, message: &str) -> Reply {
        let mut r = Reply::default();
        r.error_chunk(handle, error, message, true);
        r
    }

    /// An error as the negotiated mode wants it.
    pub fn error(structured: bool, handle: u64, error: u32, message: &str) -> Reply {
        if structured {
            Reply::structured_error(handle, error, message)
        } else {
            Reply::simple(handle, error)
        }
    }

    fn flags(done: bool) -> u16 {
        if done {
            proto::REPLY_FLAG_DONE
        } else {
            0
        }
    }

    /// Adds an OFFSET_DATA chunk for `range` of the data buffer, which holds
    /// the export's bytes from `offset`.
    pub fn data_chunk(&mut self, handle: u64, offset: u64, range: Range<usize>, done: bool) {
        let len = (8 + range.len()) as u32;
        self.head(|h| {
            put_chunk_header(
                h,
                Self::flags(done),
                proto::REPLY_TYPE_OFFSET_DATA,
                handle,
                len,
            );
            h.extend_from_slice(&offset.to_be_bytes());
        });
        self.data_part(range);
    }

    /// Adds an OFFSET_HOLE chunk.
    pub fn hole_chunk(&mut self, handle: u64, offset: u64, len: u32, done: bool) {
        self.head(|h| {
            put_chunk_header(
                h,
                Self::flags(done),
                proto::REPLY_TYPE_OFFSET_HOLE,
                handle,
                12,
            );
            h.extend_from_slice(&offset.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
        });
    }

    /// Adds an ERROR chunk.
    pub fn error_chunk(&mut self, handle: u64, error: u32, message: &str, done: bool) {
        self.failed = true;
        let msg = proto::clip_message(message).as_bytes();
        self.head(|h| {
            put_chunk_header(
                h,
                Self::flags(done),
                proto::REPLY_TYPE_ERROR,
                handle,
                (6 + msg.len()) as u32,
            );
            h.extend_from_slice(&error.to_be_bytes());
            h.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            h.extend_from_slice(msg);
        });
    }

    /// Adds a BLOCK_STATUS chunk: `(length, flags)` extents of context `id`.
    pub fn block_status_chunk(&mut self, handle: u64, id: u32, extents: &[(u32, u32)], done: bool) {
        self.head(|h| {
            put_chunk_header(
                h,
                Self::flags(done),
                proto::REPLY_TYPE_BLOCK_STATUS,
                handle,
                (4 + 8 * extents.len()) as u32,
            );
            h.extend_from_slice(&id.to_be_bytes());
            for (len, flags) in extents {
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&flags.to_be_bytes());
            }
        });
    }

    /// Adds a final NONE chunk.
    pub fn none_chunk(&mut self, handle: u64) {
        self.head(|h| {
            put_chunk_header(h, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, handle, 0)
        });
    }

    /// Bytes of memory the reply holds (its buffers' capacity), which can
    /// be far more than it sends.
    pub fn held(&self) -> usize {
        self.head.capacity() + self.data.capacity()
    }

    /// The bytes of part `i` from byte `skip` of it.
    fn part(&self, i: usize, skip: usize) -> &[u8] {
        let p = self.parts[i];
        let buf = if p.in_data { &self.data } else { &self.head };
        &buf[p.start + skip..p.end]
    }

    /// The whole reply as one byte vector (for tests).
    #[cfg(test)]
    pub fn to_bytes(&self) -> Vec<u8> {
        (0..self.parts.len())
            .flat_map(|i| self.part(i, 0).to_vec())
            .collect()
    }
}

/// At most this many iovecs per sendmsg.
const MAX_IOV: usize = 64;

/// Replies waiting to be written, in completion order.
#[derive(Default)]
pub struct OutQueue {
    replies: VecDeque<Reply>,
    /// Position in the front reply: part index and bytes of it written.
    part: usize,
    skip: usize,
    held: usize,
}

impl OutQueue {
    /// Queues a reply.
    pub fn push(&mut self, reply: Reply) {
        self.held += reply.held();
        self.replies.push_back(reply);
    }

    /// Whether everything was written.
    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    /// Bytes of memory the queued replies hold.
    pub fn held(&self) -> usize {
        self.held
    }

    fn pop_front(&mut self) {
        if let Some(reply) = self.replies.pop_front() {
            self.held -= reply.held();
        }
        self.part = 0;
    }

    /// Writes as much as the socket takes without blocking; returns whether
    /// the queue is now empty.
    pub fn write_to(&mut self, fd: RawFd) -> io::Result<bool> {
        while !self.replies.is_empty() {
            let mut iov: SmallVec<[libc::iovec; MAX_IOV]> = SmallVec::new();
            let (mut part, mut skip) = (self.part, self.skip);
            'fill: for r in &self.replies {
                while part < r.parts.len() {
                    let bytes = r.part(part, skip);
                    iov.push(libc::iovec {
                        iov_base: bytes.as_ptr() as *mut libc::c_void,
                        iov_len: bytes.len(),
                    });
                    part += 1;
                    skip = 0;
                    if iov.len() == MAX_IOV {
                        break 'fill;
                    }
                }
                part = 0;
            }
            // SAFETY: an all-zero msghdr is valid; its iovec array points into
            // `iov`, whose entries point into replies that outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: sendmsg reads the iovecs described above.
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            self.advance(n as usize);
        }
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let front = &self.replies[0];
            let left = front.part(self.part, self.skip).len();
            if n < left {
                self.skip += n;
                return;
            }
            n -= left;
            self.part += 1;
            self.skip = 0;
            if self.part == front.parts.len() {
                self.pop_front();
            }
        }
        // Drop replies made only of empty parts (none are built: head parts
        // are headers and `data_part` skips empty ranges; but the loop
        // above must not stop in front of one).
        while self
            .replies
            .front()
            .is_some_and(|r| self.part >= r.parts.len())
        {
            self.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn chunk_layouts() {
        let r = Reply::simple(9, proto::EPERM);
        assert_eq!(r.to_bytes().len(), 16);
        let mut r = Reply::structured(vec![1, 2, 3, 4]);
        r.hole_chunk(9, 100, 512, false);
        r.data_chunk(9, 612, 1..3, true);
        let b = r.to_bytes();
        assert_eq!(b.len(), 20 + 12 + 20 + 8 + 2);
        assert_eq!(&b[4..6], &0u16.to_be_bytes());
        assert_eq!(&b[6..8], &proto::REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&b[36..38], &proto::REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&b[48..52], &10u32.to_be_bytes());
        assert_eq!(&b[60..], &[2, 3]);
        let e = Reply::structured_error(1, proto::EINVAL, "bad");
        let b = e.to_bytes();
        assert_eq!(b.len(), 20 + 6 + 3);
        assert_eq!(&b[20..24], &proto::EINVAL.to_be_bytes());
        let mut s = Reply::default();
        s.block_status_chunk(1, 2, &[(512, 3), (1024, 0)], true);
        assert_eq!(s.to_bytes().len(), 20 + 4 + 16);
    }

    #[test]
    fn queue_writes_everything_in_order_across_partial_writes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // A small send buffer forces partial writes.
        let size: libc::c_int = 4096;
        // SAFETY: setsockopt with a valid int on an open socket.
        unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
        let mut q = OutQueue::default();
        let mut expected = Vec::new();
        for i in 0..50u64 {
            let data: Vec<u8> = (0..3000).map(|j| (i as u8).wrapping_add(j as u8)).collect();
            let r = Reply::simple_data(i, data);
            expected.extend(r.to_bytes());
            q.push(r);
        }
        assert!(q.held() >= expected.len());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        while !q.write_to(a.as_raw_fd()).unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(q.held(), 0);
        drop(a);
        assert_eq!(reader.join().unwrap(), expected);
    }
}
