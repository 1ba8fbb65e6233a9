//! `--daemonize`, as qemu-storage-daemon does it: the process forks, the
//! parent waits, and the child goes on in a session of its own. Once the
//! child is ready (every socket exists, the pid file is written) it tells
//! the parent, which exits 0; if the child fails first, it reports the
//! error on the stderr it shares with the parent and exits 1, and so does
//! the parent.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

/// The child's end of the pipe to the waiting parent.
pub struct Daemonized {
    parent: File,
}

/// What the child writes when it is ready.
const READY: u8 = b'R';

/// Forks. In the parent this never returns: it exits 0 once the child is
/// ready, 1 once the child has exited without being ready. Must be called
/// before the process starts a thread.
pub fn daemonize() -> io::Result<Daemonized> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process has a single thread (the caller's contract), so
    // the child is a complete copy of it.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(read);
            // SAFETY: plain system call; the child is no group leader.
            if unsafe { libc::setsid() } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Daemonized {
                parent: File::from(write),
            })
        }
        child => {
            drop(write);
            let mut byte = [0u8; 1];
            let ready = matches!(File::from(read).read(&mut byte), Ok(1) if byte[0] == READY);
            if !ready {
                // The child has reported its error: wait for it to end.
                let mut status = 0;
                // SAFETY: waits for our own child; `status` outlives the call.
                unsafe { libc::waitpid(child, &mut status, 0) };
            }
            std::process::exit(if ready { 0 } else { 1 })
        }
    }
}

impl Daemonized {
    /// Everything is set up: the parent exits 0, and standard input,
    /// output and error go to /dev/null from now on.
    pub fn ready(mut self) -> io::Result<()> {
        self.parent.write_all(&[READY])?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which the process
            // keeps open; `null` is open.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
