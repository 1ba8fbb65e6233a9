//! Termination signals: blocked in every thread, awaited by the main one.
//! Other signals that would end the daemon without cleaning up are ignored.

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

/// Signals whose default action ends the process, which the daemon has no
/// use for: a stray one must not kill it and leave its sockets and pid
/// file behind. qemu-storage-daemon survives SIGPIPE (ignored) and
/// SIGUSR1, SIGALRM and SIGIO (blocked or read from a signalfd by its main
/// loop); these are ignored here together with the rest of the kind, and
/// the real-time signals from SIGRTMIN (above those glibc keeps for
/// itself). Left at their default: the faults (SIGSEGV, SIGBUS, SIGILL,
/// SIGFPE, SIGABRT, SIGSYS, SIGTRAP), SIGQUIT (a request for a core dump)
/// and SIGXCPU (the CPU time limit set for the process). SIGXFSZ is
/// ignored: a write past the file size limit then fails with EFBIG, an
/// I/O error for that request only.
const IGNORED: [libc::c_int; 10] = [
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPIPE,
    libc::SIGALRM,
    libc::SIGSTKFLT,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGPROF,
    libc::SIGVTALRM,
    libc::SIGXFSZ,
];

/// Ignores the signals that would otherwise kill the daemon uncleanly
/// (see [`IGNORED`]), for every thread.
pub fn ignore() -> io::Result<()> {
    for s in IGNORED
        .into_iter()
        .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
    {
        // SAFETY: sets the disposition of a signal that may be ignored; no
        // handler code is installed.
        if unsafe { libc::signal(s, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
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
