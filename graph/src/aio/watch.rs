//! A descriptor that signals completions (an NBD client's socket, an
//! eventfd that a library writes), watched from each executor that has
//! requests waiting for it: completions are handled on the thread that waits for them, woken
//! once per batch through its io_uring, with no thread of their own in
//! between.
//!
//! Every executor with a request in flight keeps a watch of the descriptor
//! on its reactor (see [`super::uring::watch`]); any of them may handle what
//! arrives, and wakes the requests it completes, on their own executors. A
//! watch whose executor has nothing in flight any more ends at its next
//! readiness. With several executors in flight at once, each readiness
//! wakes all of them and one finds the work: fine for the single queue that
//! usually serves a node.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use parking_lot::Mutex;

use super::uring::{self, Keepalive};

/// What handles a readiness of the descriptor: reaps completions and wakes
/// their requests. Returns false once the source is gone for good (the
/// image closed, the connection failed): the watches end then. It may run
/// on several threads at once.
pub(crate) type Handler = Box<dyn Fn() -> bool + Send + Sync>;

/// A descriptor and the watches of it, one per executor that waits.
pub(crate) struct SharedWatch {
    fd: RawFd,
    /// Keeps `fd` open.
    _keep: Box<dyn std::any::Any + Send + Sync>,
    handler: Handler,
    state: Mutex<State>,
}

struct State {
    /// The handler said the source is gone.
    closed: bool,
    executors: Vec<Local>,
    /// Tells the watches apart.
    next: u64,
}

/// One executor's requests and watch.
struct Local {
    reactor: u64,
    /// Requests in flight that entered on this executor.
    users: usize,
    /// The watch armed on this executor, if any.
    armed: Option<u64>,
}

/// A request's hold on the watch of its executor; released when dropped.
pub(crate) struct WatchUse {
    watch: Arc<SharedWatch>,
    reactor: u64,
}

impl SharedWatch {
    /// Watches `fd` (kept open by `keep`) for readability, and calls
    /// `handler` when it is readable.
    pub(crate) fn new(
        fd: RawFd,
        keep: Box<dyn std::any::Any + Send + Sync>,
        handler: Handler,
    ) -> Arc<Self> {
        Arc::new(SharedWatch {
            fd,
            _keep: keep,
            handler,
            state: Mutex::new(State {
                closed: false,
                executors: Vec::new(),
                next: 0,
            }),
        })
    }

    /// Counts a request in flight on this thread's executor, and starts a
    /// watch there unless one runs. Fails outside of an executor and once
    /// the source is gone.
    pub(crate) fn enter(self: &Arc<Self>) -> io::Result<WatchUse> {
        let reactor = uring::current_reactor()
            .ok_or_else(|| io::Error::other("waiting for completions outside of an executor"))?;
        let mut state = self.state.lock();
        if state.closed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let i = match state.executors.iter().position(|l| l.reactor == reactor) {
            Some(i) => i,
            None => {
                state.executors.push(Local {
                    reactor,
                    users: 0,
                    armed: None,
                });
                state.executors.len() - 1
            }
        };
        if state.executors[i].armed.is_none() {
            let id = state.next;
            state.next += 1;
            let theirs = self.clone();
            uring::watch(
                self.fd,
                libc::POLLIN as u32,
                Keepalive::Other(Box::new(self.clone())),
                Arc::new(move |event| theirs.fire(reactor, id, event)),
            )?;
            state.executors[i].armed = Some(id);
        }
        state.executors[i].users += 1;
        Ok(WatchUse {
            watch: self.clone(),
            reactor,
        })
    }

    /// Watch `id` of executor `reactor` saw `event` (see
    /// [`uring::WatchFn`]); returns whether it goes on.
    fn fire(&self, reactor: u64, id: u64, event: Option<u32>) -> bool {
        let alive = event.is_some() && (self.handler)();
        let mut state = self.state.lock();
        if event.is_some() && !alive {
            state.closed = true;
        }
        let closed = state.closed;
        let Some(i) = state.executors.iter().position(|l| l.reactor == reactor) else {
            return false;
        };
        let local = &mut state.executors[i];
        if local.armed != Some(id) {
            return false; // a watch that was replaced
        }
        if event.is_some() && !closed && local.users > 0 {
            return true;
        }
        // Ending (or ended): the next request on this executor starts
        // another watch.
        local.armed = None;
        if local.users == 0 {
            state.executors.swap_remove(i);
        }
        false
    }
}

impl Drop for WatchUse {
    fn drop(&mut self) {
        let mut state = self.watch.state.lock();
        if let Some(i) = state
            .executors
            .iter()
            .position(|l| l.reactor == self.reactor)
        {
            let local = &mut state.executors[i];
            local.users -= 1;
            if local.users == 0 && local.armed.is_none() {
                state.executors.swap_remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::{block_on, sleep};
    use std::os::unix::io::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn counting_watch() -> (Arc<EventFd>, Arc<AtomicUsize>, Arc<SharedWatch>) {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let (theirs, counted) = (fd.clone(), calls.clone());
        let watch = SharedWatch::new(
            fd.as_raw_fd(),
            Box::new(fd.clone()),
            Box::new(move || {
                let _ = theirs.read();
                counted.fetch_add(1, Ordering::SeqCst);
                true
            }),
        );
        (fd, calls, watch)
    }

    #[test]
    fn a_watch_runs_while_requests_wait_and_ends_after_them() {
        let (fd, calls, watch) = counting_watch();
        block_on(async {
            let first = watch.enter().unwrap();
            let second = watch.enter().unwrap();
            assert_eq!(watch.state.lock().executors.len(), 1);
            fd.write(1).unwrap();
            sleep(Duration::from_millis(20)).await.unwrap();
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            drop((first, second));
            // The watch ends at its next readiness.
            fd.write(1).unwrap();
            sleep(Duration::from_millis(20)).await.unwrap();
            assert!(watch.state.lock().executors.is_empty());
            fd.write(1).unwrap();
            sleep(Duration::from_millis(20)).await.unwrap();
            assert_eq!(calls.load(Ordering::SeqCst), 2);
            // A new request watches again.
            let _again = watch.enter().unwrap();
            sleep(Duration::from_millis(20)).await.unwrap();
            assert_eq!(calls.load(Ordering::SeqCst), 3);
        })
        .unwrap();
        // The reactor closed: no watch is left, only ours holds the fd.
        assert!(watch.state.lock().executors.is_empty());
    }

    #[test]
    fn each_executor_watches_for_its_own_requests() {
        let (fd, calls, watch) = counting_watch();
        let theirs = watch.clone();
        let other = std::thread::spawn(move || {
            block_on(async move {
                let _use = theirs.enter().unwrap();
                sleep(Duration::from_millis(100)).await.unwrap();
            })
            .unwrap()
        });
        block_on(async {
            let _use = watch.enter().unwrap();
            sleep(Duration::from_millis(30)).await.unwrap();
            assert_eq!(watch.state.lock().executors.len(), 2);
            fd.write(1).unwrap();
            sleep(Duration::from_millis(30)).await.unwrap();
        })
        .unwrap();
        other.join().unwrap();
        // Both watches woke; one or both found the event.
        assert!((1..=2).contains(&calls.load(Ordering::SeqCst)));
        assert!(watch.state.lock().executors.is_empty());
    }

    #[test]
    fn a_gone_source_ends_the_watches() {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let theirs = fd.clone();
        let watch = SharedWatch::new(
            fd.as_raw_fd(),
            Box::new(fd.clone()),
            Box::new(move || theirs.read().ok() != Some(9)),
        );
        block_on(async {
            let _use = watch.enter().unwrap();
            fd.write(9).unwrap();
            sleep(Duration::from_millis(20)).await.unwrap();
            assert!(watch.enter().is_err());
        })
        .unwrap();
        assert!(watch.state.lock().executors.is_empty());
    }
}
