//! The harnesses behind blkgraph's fuzz targets (`fuzz_targets/`), kept in a
//! library so that the targets stay one line each and the same code can
//! replay inputs without libFuzzer (`cargo test` here, or under valgrind).
//!
//! Each harness takes the raw bytes an outsider controls, feeds them through
//! the same entry points the daemon uses, and checks what must hold for any
//! input: errors are `Err` values with a text, never panics, and a refused
//! input changes nothing. A violated check panics, which libFuzzer reports
//! as a crash.
//!
//! The QMP harness needs `blkgraph_ctl::FuzzSession`, which exists only when
//! the crates are built with `--cfg fuzzing` (cargo-fuzz sets it; `run.py`
//! sets it for clippy and tests).

pub mod nbd;
pub mod nbd_client;
pub mod options;
pub mod qmp;
pub mod qmp_commands;
pub mod vhost_user;
pub mod virtio_blk;
pub mod watchdog;

use std::collections::BTreeSet;

/// Ignores SIGPIPE and SIGXFSZ, as the daemon does (`backend/src/signals.rs`),
/// once per process: a write to a socket whose peer has gone (an NBD client
/// node's last message to a server that stopped) then fails with EPIPE
/// instead of killing the process. A Rust `main` ignores SIGPIPE before it
/// runs; libFuzzer's `main` is C++'s and does not.
pub fn daemon_signals() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        for signal in [libc::SIGPIPE, libc::SIGXFSZ] {
            // SAFETY: installs the ignore disposition; no handler runs.
            unsafe { libc::signal(signal, libc::SIG_IGN) };
        }
    });
}

/// What an input could leave behind in this process: its open file
/// descriptors and its threads, by number (`/proc/self/fd`,
/// `/proc/self/task`). Taken before an input, it checks that the input
/// leaves none behind ([`Leftovers::check_none_left`]).
///
/// The descriptor listing has its own descriptor in it: the lowest free
/// number when the listing is taken, so one taken after an input that
/// left nothing behind has it at a number the one before had too.
///
/// A thread still running after the input is a leak of its own, so the
/// check waits until every thread the input started has ended.
pub struct Leftovers {
    fds: BTreeSet<i32>,
    threads: BTreeSet<i32>,
}

/// The numbered entries of a `/proc/self` directory.
fn listing(dir: &str) -> BTreeSet<i32> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

impl Leftovers {
    /// The descriptors open and the threads running now.
    pub fn now() -> Self {
        Leftovers {
            fds: listing("/proc/self/fd"),
            threads: listing("/proc/self/task"),
        }
    }

    /// Panics unless, within `grace`, every descriptor open and every
    /// thread running is one of `self`'s: an input leaves none behind.
    /// Descriptors and threads that were there and are gone meanwhile are
    /// no fault of the input's (another thread letting go of what an
    /// earlier input used, after a grace of its own), so this compares the
    /// sets rather than the lowest free number, which such a close lowers.
    /// `grace` is for the threads that end just after the input has let go
    /// of them.
    pub fn check_none_left(&self, grace: std::time::Duration) {
        let start = std::time::Instant::now();
        loop {
            let fds: Vec<i32> = listing("/proc/self/fd")
                .difference(&self.fds)
                .copied()
                .collect();
            let threads = new_threads(&self.threads);
            if fds.is_empty() && threads.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < grace,
                "left behind: file descriptors {fds:?}, threads {:?}; open before: {:?}; \
                 open now:\n{:#?}",
                describe_threads(&threads),
                self.fds,
                describe_fds()
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// The threads of this process that are not in `before`, but those the
/// kernel or the daemon start for good on first use: io_uring's kernel
/// workers (`iou-wrk-*`, `iou-sqp-*`, started and ended by the kernel for a
/// ring's blocking requests) and the 16 threads of `aio=threads` (`aio-*`,
/// started by the first request that needs them, kept for the process).
/// Only the new threads' names are read: reading every thread's took most
/// of an `options` input's time.
fn new_threads(before: &BTreeSet<i32>) -> Vec<i32> {
    listing("/proc/self/task")
        .difference(before)
        .copied()
        .filter(|&tid| {
            !thread_name(tid)
                .is_some_and(|name| name.starts_with("iou-") || name.starts_with("aio-"))
        })
        .collect()
}

/// The name of thread `tid` of this process, unless it has ended.
fn thread_name(tid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
    Some(comm.trim_end().to_string())
}

/// The names of threads (`1234 nbd-conn`), for a failure's message.
fn describe_threads(tids: &[i32]) -> Vec<String> {
    tids.iter()
        .map(|&tid| format!("{tid} {}", thread_name(tid).unwrap_or_default()))
        .collect()
}

/// What each open descriptor is (`7 -> socket:[1234]`), for a failure's
/// message.
pub fn describe_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    fds.sort();
    fds
}

/// Everything the daemon's side of `stream` sends until it closes, or
/// resets the connection (as it may when it closes with client bytes it
/// has not read); panics if it neither answers nor closes within
/// `deadline`, or sends 1 GiB or more (the replies to one input are
/// bounded: an NBD read asks for at most 32 MiB).
pub fn read_until_closed(
    mut stream: std::os::unix::net::UnixStream,
    deadline: std::time::Duration,
) -> Vec<u8> {
    use std::io::{ErrorKind, Read};
    stream
        .set_read_timeout(Some(deadline))
        .expect("read timeout");
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => panic!(
                "the daemon neither answered nor closed in {:?}: {e}",
                start.elapsed()
            ),
        }
        assert!(out.len() < 1 << 30, "unbounded replies");
    }
}

/// A thread that lives as long as the process and runs one job after
/// another: the helper threads of a harness (the server's side of a
/// connection, a reader of the replies), so that an input starts no
/// thread of its own. LeakSanitizer keeps what it knows of every thread
/// started and makes starting one slow (see docs/robustness.md, How leaks
/// are detected): with its two threads kept, the `nbd` harness runs about
/// 2.5 times as many inputs a second. A job that panics aborts the
/// process, as any panic in a fuzz target does.
pub struct Worker(std::sync::mpsc::Sender<Job>);

type Job = Box<dyn FnOnce() + Send>;

impl Worker {
    /// Starts the thread.
    pub fn new(name: &str) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("worker thread");
        Worker(tx)
    }

    /// Runs `f` on the thread; its result comes on the receiver.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::sync::mpsc::Receiver<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.0.send(job).expect("the worker thread ended");
        rx
    }
}

/// With `BLKGRAPH_FUZZ_VERBOSE` set, prints the daemon's log messages (all
/// levels) to stderr, once set up per process; without it, logs nothing.
pub fn log_if_verbose() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            eprintln!("[{} {}] {}", record.level(), record.target(), record.args());
        }
        fn flush(&self) {}
    }
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        if std::env::var_os("BLKGRAPH_FUZZ_VERBOSE").is_some() && log::set_logger(&Stderr).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}
