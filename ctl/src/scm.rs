//! Reading a client's byte stream together with the file descriptors it
//! sends alongside (`SCM_RIGHTS` ancillary data), as QEMU's socket chardev
//! does for `getfd`.

use std::io;
use std::mem;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr;

/// The most descriptors one `sendmsg` can carry (the kernel's
/// `SCM_MAX_FD`). Room for all of them is reserved, so the kernel never
/// has to drop some of a batch (it would close them, but the client could
/// not tell why a descriptor went missing).
const MAX_FDS: usize = 253;

/// Bytes of ancillary data for [`MAX_FDS`] descriptors, rounded up to whole
/// `u64`s (the buffer is a `u64` array, aligned for `cmsghdr`).
const CONTROL_WORDS: usize = control_len().div_ceil(mem::size_of::<u64>());

const fn control_len() -> usize {
    // SAFETY: CMSG_SPACE only computes an aligned length from its argument.
    unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as libc::c_uint) as usize }
}

/// Reads from `stream` into `buf` like `read`, and appends the descriptors
/// that arrived with those bytes to `fds`; they are close-on-exec.
///
/// Returns the number of bytes read (0 at end of file). A read returns
/// descriptors together with (at least the start of) the data of the
/// `sendmsg` that carried them, and the kernel ends the read after that
/// data: descriptors never come before bytes that were sent earlier.
pub(crate) fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all zeroes is a valid
    // value (no name, no iovecs, no control buffer).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at one iovec describing `buf` and at `control`,
    // both live and writable for the whole call; the descriptor is
    // `stream`'s, open while `stream` is borrowed.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let Ok(n) = usize::try_from(n) else {
        return Err(io::Error::last_os_error());
    };
    // SAFETY: recvmsg filled `control` with `msg.msg_controllen` bytes of
    // well-formed ancillary messages; CMSG_FIRSTHDR and CMSG_NXTHDR stay
    // within that length and return null at its end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a complete header
        // inside `control` (see above).
        let header = unsafe { ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: computing the start of the header's data and the
            // header length for zero bytes of data; no memory is read.
            let (data, empty) = unsafe { (libc::CMSG_DATA(cmsg), libc::CMSG_LEN(0) as usize) };
            let count = (header.cmsg_len as usize).saturating_sub(empty) / mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: the data holds `count` descriptors, inside
                // `control`; they may be unaligned.
                let fd = unsafe { ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel just installed `fd` in this process
                // for this read; nothing else knows it, so it is owned here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!(
            "QMP client sent more than {MAX_FDS} file descriptors at once: the kernel closed the rest"
        );
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Sends `data` with `fds` attached, as a client's `sendmsg` does.
    pub(crate) fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) {
        let space =
            // SAFETY: computes a length only.
            unsafe { libc::CMSG_SPACE(mem::size_of_val(fds) as libc::c_uint) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer has room for one header and the
            // descriptors (CMSG_SPACE above); the writes stay inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of_val(fds) as libc::c_uint) as _;
                ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: `msg` describes `data` and `control`, both live.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
        assert_eq!(n, data.len() as isize, "{}", io::Error::last_os_error());
    }

    /// A socket to store somewhere, and its peer, which tells whether every
    /// copy of it was closed (checking descriptor numbers would race with
    /// other tests opening files).
    pub(crate) fn probe() -> (OwnedFd, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (OwnedFd::from(a), b)
    }

    /// Whether every copy of the probe whose peer is `peer` was closed.
    pub(crate) fn closed(peer: &UnixStream) -> bool {
        match std::io::Read::read(&mut &*peer, &mut [0u8; 1]) {
            Ok(0) => true,
            Ok(_) => panic!("unexpected data"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn descriptors_arrive_with_their_bytes_and_close_on_exec() {
        let (client, server) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(&client, b"x", &[file.as_raw_fd(), a.as_raw_fd()]);
        (&client).write_all(b"yz").unwrap();
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(&server, &mut buf, &mut fds).unwrap(), 1);
        assert_eq!(&buf[..1], b"x");
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            // SAFETY: F_GETFD only queries the descriptor table.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            assert_ne!(fd.as_raw_fd(), file.as_raw_fd());
        }
        // They are the same files: what is written through the received
        // socket comes out at its peer.
        let received = UnixStream::from(fds.pop().unwrap());
        (&received).write_all(b"!").unwrap();
        let mut one = [0u8; 1];
        std::io::Read::read_exact(&mut &b, &mut one).unwrap();
        assert_eq!(&one, b"!");
        // The kernel ended the read after the bytes the descriptors came
        // with; the rest follows without descriptors.
        let mut more = Vec::new();
        assert_eq!(recv_with_fds(&server, &mut buf, &mut more).unwrap(), 2);
        assert_eq!(&buf[..2], b"yz");
        assert!(more.is_empty());
        // Received descriptors are closed by dropping them.
        let (probe, peer) = probe();
        send_with_fds(&client, b" ", &[probe.as_raw_fd()]);
        drop(probe);
        assert_eq!(recv_with_fds(&server, &mut buf, &mut fds).unwrap(), 1);
        assert!(!closed(&peer));
        drop(fds);
        assert!(closed(&peer));
        drop(client);
        assert_eq!(recv_with_fds(&server, &mut buf, &mut more).unwrap(), 0);
    }

    #[test]
    fn the_largest_batch_fits() {
        let (client, server) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let batch = vec![file.as_raw_fd(); MAX_FDS];
        send_with_fds(&client, b" ", &batch);
        let mut buf = [0u8; 4];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(&server, &mut buf, &mut fds).unwrap(), 1);
        assert_eq!(fds.len(), MAX_FDS);
    }
}
