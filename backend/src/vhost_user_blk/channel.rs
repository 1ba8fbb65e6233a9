//! The backend-request channel, for VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
//!
//! vhost 0.18's `Backend` (what `BackendReqHandler` makes of the channel
//! SET_BACKEND_REQ_FD carries) can send shared-object and shmem messages
//! but not CONFIG_CHANGE_MSG, and does not give its socket out. So the
//! session loop peeks at each message's header before the handler reads it,
//! and keeps a duplicate of the descriptor a SET_BACKEND_REQ_FD carries (a
//! peek on a unix socket installs duplicates of the passed descriptors).
//! Only control messages pay the extra system call.

use std::io::{self, Write};
use std::os::unix::io::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::BackendReq;

/// SET_BACKEND_REQ_FD's request code.
const SET_BACKEND_REQ_FD: u32 = 21;
/// Descriptors a message can carry (vhost's MAX_ATTACHED_FD_ENTRIES).
const MAX_FDS: usize = 32;

/// Waits for the next message on the frontend connection `conn` without
/// consuming it; if it is SET_BACKEND_REQ_FD with one descriptor, returns
/// a duplicate of that descriptor as a stream.
pub fn peek(conn: RawFd) -> io::Result<Option<UnixStream>> {
    let mut header = [0u8; 12];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    // u64 elements: aligned for cmsghdr.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() * 8;
    let n = loop {
        // SAFETY: msg points at live buffers of the given lengths.
        let n = unsafe { libc::recvmsg(conn, &mut msg, libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in,
    // within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // The peek installed each descriptor for us alone.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if n < header.len() || request != SET_BACKEND_REQ_FD || fds.len() != 1 {
        return Ok(None); // the duplicates close here
    }
    Ok(fds.pop().map(UnixStream::from))
}

/// Sends CONFIG_CHANGE_MSG on the channel, without asking for a reply: a
/// header (request, flags = protocol version 1, payload size 0) alone.
pub fn send_config_change(channel: &mut UnixStream) -> io::Result<()> {
    let mut header = [0u8; 12];
    header[..4].copy_from_slice(&(BackendReq::CONFIG_CHANGE_MSG as u32).to_le_bytes());
    header[4..8].copy_from_slice(&1u32.to_le_bytes());
    channel.write_all(&header)
}
