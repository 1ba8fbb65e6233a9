//! Termination signals: blocked in every thread, awaited by the main one.

use std::io;

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the termination signals in this thread and in threads it starts
/// later; call before starting any thread.
pub fn block() -> io::Result<()> {
    let set = set();
    // SAFETY: set is initialised; the old mask is not needed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for SIGTERM, SIGINT or SIGHUP and returns its number.
pub fn wait() -> io::Result<libc::c_int> {
    let set = set();
    let mut sig = 0;
    // SAFETY: set is initialised and sig is a valid out pointer.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}
