//! The io_uring reactor owned by each executor.
//!
//! An operation in flight holds what its memory lives in (a buffer clone, a
//! boxed timespec) in its slot until the kernel posts its completion, not in
//! its future: dropping or forgetting the future cannot free memory the
//! kernel still uses. A reactor that is dropped with operations in flight
//! cancels them and waits for their completions before it closes the ring.
//!
//! Besides operations, a reactor keeps watches: multishot polls of a file
//! descriptor that call a function each time it becomes ready, for
//! completions that other code signals on a descriptor (an NBD client's
//! socket, an eventfd that a library writes) and that are best handled on
//! the thread that waits for them, without a thread of their own in
//! between.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use crate::buffer::IoBuffer;

thread_local! {
    /// The reactor of the executor running on this thread, if any.
    static CURRENT: Cell<*const Reactor> = const { Cell::new(std::ptr::null()) };
}

/// `user_data` of the cancel requests a closing reactor sends.
const CANCEL: u64 = u64::MAX;

/// What the memory an operation points to lives in; kept until the
/// operation's completion is reaped. (Held only to be dropped then: its
/// contents are never read.)
#[allow(dead_code)]
pub(crate) enum Keepalive {
    /// The operation points to no memory.
    Nothing,
    /// A buffer: its segments (the iovec array) and their memory.
    Buffer(IoBuffer),
    /// A timeout's duration.
    Timespec(Box<types::Timespec>),
    /// Anything else, e.g. a buffer and the socket it is written to.
    Other(Box<dyn std::any::Any + Send>),
}

/// The function of a watch (see [`watch`]). Called on the reactor's
/// thread with the poll events each time the descriptor is ready
/// (returning false ends the watch), and with `None` once, when the watch
/// has ended (it was ended, its reactor closed, or polling failed). It
/// runs while the reactor reaps: it must not block, and it must not poll
/// this reactor's operations (waking futures is what it is for).
pub(crate) type WatchFn = Arc<dyn Fn(Option<u32>) -> bool + Send + Sync>;

enum OpState {
    Free,
    /// A multishot poll: `call` at each readiness; `entry` arms it again
    /// when the kernel ends it on its own; `stopping` once it is being
    /// cancelled.
    Watch {
        call: WatchFn,
        entry: squeue::Entry,
        stopping: bool,
    },
    /// Submitted; the waker of the future that waits for it, once polled.
    Pending(Option<Waker>),
    /// Completed with this result; the future has not seen it yet.
    Done(i32),
    /// The future was dropped; the slot is freed at the completion.
    Abandoned,
}

struct Slot {
    state: OpState,
    keep: Keepalive,
    /// Counts the slot's uses, so that a watch's slot is not mistaken for
    /// its successor's.
    generation: u64,
}

/// A watch's function to call, with the event (see [`WatchFn`]), and its
/// slot and generation.
type WatchCall = (u32, u64, WatchFn, Option<u32>);

struct Inner {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

/// An io_uring whose completions post the executor's eventfd.
pub(crate) struct Reactor {
    /// Tells this reactor's operations from another's.
    id: u64,
    inner: RefCell<Inner>,
}

impl Reactor {
    pub(crate) fn new(entries: u32, event: &EventFd) -> io::Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Reactor {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            inner: RefCell::new(Inner {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    fn push(&self, entry: squeue::Entry, keep: Keepalive) -> io::Result<u32> {
        let mut inner = self.inner.borrow_mut();
        let id = match inner.free.pop() {
            Some(id) => id,
            None => {
                inner.slots.push(Slot {
                    state: OpState::Free,
                    keep: Keepalive::Nothing,
                    generation: 0,
                });
                (inner.slots.len() - 1) as u32
            }
        };
        let entry = entry.user_data(u64::from(id));
        loop {
            // SAFETY: `submit`'s contract: the entry points only into memory
            // that `keep` keeps valid, and `keep` stays in the slot until
            // the completion is reaped.
            if unsafe { inner.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            if let Err(e) = inner.ring.submit() {
                inner.free.push(id);
                return Err(e);
            }
        }
        let slot = &mut inner.slots[id as usize];
        slot.state = OpState::Pending(None);
        slot.keep = keep;
        slot.generation += 1;
        Ok(id)
    }

    /// Submits queued entries, wakes the futures of completed ones and
    /// calls the watches that fired; returns the number of completions.
    pub(crate) fn submit_and_reap(&self) -> usize {
        let mut reaped = 0;
        let mut calls = Vec::new();
        loop {
            let again = {
                let mut inner = self.inner.borrow_mut();
                // Completions that did not fit the completion queue wait in
                // the kernel until an io_uring_enter flushes them (the crate
                // asks for that when the overflow flag is up); they post no
                // eventfd on their own.
                let overflow = inner.ring.submission().cq_overflow();
                if !inner.ring.submission().is_empty() || overflow {
                    if let Err(e) = inner.ring.submit() {
                        log::error!("io_uring submit failed: {e}");
                    }
                }
                let (n, rearmed) = inner.reap(&mut calls);
                reaped += n;
                overflow || rearmed
            };
            if calls.is_empty() && !again {
                return reaped;
            }
            // Outside the borrow: a watch's function may start a watch.
            let stop: Vec<(u32, u64)> = calls
                .drain(..)
                .filter_map(|(id, generation, call, event)| {
                    (!call(event) && event.is_some()).then_some((id, generation))
                })
                .collect();
            let mut inner = self.inner.borrow_mut();
            for (id, generation) in stop {
                inner.stop_watch(id, generation);
            }
        }
    }

    /// Starts a watch of `fd` (see [`watch`]).
    fn watch(&self, fd: RawFd, events: u32, keep: Keepalive, call: WatchFn) -> io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build();
        let id = self.push(entry.clone(), keep)?;
        let mut inner = self.inner.borrow_mut();
        inner.slots[id as usize].state = OpState::Watch {
            call,
            entry: entry.user_data(u64::from(id)),
            stopping: false,
        };
        Ok(())
    }

    fn poll_op(&self, id: u32, cx: &mut Context<'_>) -> Poll<i32> {
        let mut inner = self.inner.borrow_mut();
        let slot = &mut inner.slots[id as usize];
        match &mut slot.state {
            OpState::Done(result) => {
                let result = *result;
                slot.state = OpState::Free;
                inner.free.push(id);
                Poll::Ready(result)
            }
            OpState::Pending(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            OpState::Free | OpState::Abandoned | OpState::Watch { .. } => {
                Poll::Ready(-libc::EINVAL)
            }
        }
    }

    /// The future of operation `id` is gone: its slot is freed now if the
    /// operation completed, or when it does. A timeout is cancelled, as
    /// nothing waits for it any more: it would otherwise hold its slot
    /// (and the kernel its timer) until it fires, minutes later for a
    /// throttled request let go in a drained section.
    fn abandon(&self, id: u32) {
        let mut inner = self.inner.borrow_mut();
        let slot = &mut inner.slots[id as usize];
        match slot.state {
            OpState::Pending(_) => {
                slot.state = OpState::Abandoned;
                if matches!(slot.keep, Keepalive::Timespec(_)) {
                    inner.push_cancel(id);
                }
            }
            OpState::Done(_) => {
                slot.state = OpState::Free;
                inner.free.push(id);
            }
            OpState::Free | OpState::Abandoned | OpState::Watch { .. } => {}
        }
    }
}

impl Inner {
    fn in_flight(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                matches!(
                    s.state,
                    OpState::Pending(_) | OpState::Abandoned | OpState::Watch { .. }
                )
            })
            .map(|(i, _)| i)
    }

    /// Asks the kernel to cancel operation `id`; it completes (with
    /// ECANCELED, or its own result if it was done first) as usual. If the
    /// ring refuses the request, the operation runs to its end.
    fn push_cancel(&mut self, id: u32) {
        let cancel = opcode::AsyncCancel::new(u64::from(id))
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancel request points to no memory.
        while unsafe { self.ring.submission().push(&cancel) }.is_err() {
            if self.ring.submit().is_err() {
                break;
            }
        }
    }

    /// Cancels watch `id` if it is still that of `generation`; its slot is
    /// freed at its last completion.
    fn stop_watch(&mut self, id: u32, generation: u64) {
        let slot = &mut self.slots[id as usize];
        if slot.generation != generation {
            return;
        }
        if let OpState::Watch { stopping, .. } = &mut slot.state {
            if !*stopping {
                *stopping = true;
                self.push_cancel(id);
            }
        }
    }

    /// Handles the completion of watch `id`; returns whether it was armed
    /// again.
    fn reap_watch(&mut self, id: u32, result: i32, flags: u32, calls: &mut Vec<WatchCall>) -> bool {
        let slot = &mut self.slots[id as usize];
        let OpState::Watch {
            call,
            entry,
            stopping,
        } = &slot.state
        else {
            return false;
        };
        if result >= 0 {
            calls.push((id, slot.generation, call.clone(), Some(result as u32)));
        }
        if cqueue::more(flags) {
            return false;
        }
        if result >= 0 && !*stopping {
            // The kernel ended the multishot poll (a full completion queue
            // does that): arm it again.
            let entry = entry.clone();
            // SAFETY: a poll points to no memory; the descriptor is kept
            // open by the slot's keepalive.
            while unsafe { self.ring.submission().push(&entry) }.is_err() {
                if self.ring.submit().is_err() {
                    break;
                }
            }
            return true;
        }
        // Cancelled, or polling failed: the watch has ended.
        if !*stopping && result != -libc::ECANCELED {
            log::error!(
                "io_uring: a watch failed: {}",
                io::Error::from_raw_os_error(-result)
            );
        }
        calls.push((id, slot.generation, call.clone(), None));
        slot.state = OpState::Free;
        slot.keep = Keepalive::Nothing;
        self.free.push(id);
        false
    }

    /// Reaps the completion queue: wakes the futures of completed
    /// operations and adds the calls of watches to `calls`. Returns the
    /// number of completions and whether a watch was armed again.
    fn reap(&mut self, calls: &mut Vec<WatchCall>) -> (usize, bool) {
        let completions: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        let mut reaped = 0;
        let mut rearmed = false;
        for (user_data, result, flags) in completions {
            let Some(slot) = self.slots.get_mut(user_data as usize) else {
                continue; // a cancel request's own completion
            };
            reaped += 1;
            if let OpState::Watch { .. } = slot.state {
                rearmed |= self.reap_watch(user_data as u32, result, flags, calls);
                continue;
            }
            // The kernel is done with the operation's memory.
            slot.keep = Keepalive::Nothing;
            match std::mem::replace(&mut slot.state, OpState::Done(result)) {
                OpState::Pending(waker) => {
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                OpState::Abandoned => {
                    slot.state = OpState::Free;
                    self.free.push(user_data as u32);
                }
                OpState::Free | OpState::Done(_) | OpState::Watch { .. } => {
                    log::error!("io_uring completion for idle slot {user_data}")
                }
            }
        }
        (reaped, rearmed)
    }
}

impl Drop for Reactor {
    /// Cancels the operations still in flight and waits until the kernel
    /// has completed them, so that the memory they point to is released
    /// only once nothing uses it.
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        let pending: Vec<usize> = inner.in_flight().collect();
        let mut calls = Vec::new();
        for id in pending {
            if let OpState::Watch { stopping, .. } = &mut inner.slots[id].state {
                *stopping = true;
            }
            inner.push_cancel(id as u32);
        }
        while inner.in_flight().next().is_some() {
            match inner.ring.submit_and_wait(1) {
                Ok(_) => {
                    inner.reap(&mut calls);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The memory cannot be proven unused: never free it.
                    log::error!("io_uring: cannot wait for operations in flight: {e}");
                    for slot in inner.slots.drain(..) {
                        if let OpState::Watch { call, .. } = &slot.state {
                            calls.push((0, 0, call.clone(), None));
                        }
                        std::mem::forget(slot.keep);
                    }
                    break;
                }
            }
        }
        // Whoever relies on a watch of this reactor learns that it ended.
        for (_, _, call, event) in calls {
            call(event);
        }
    }
}

/// Makes a reactor the current one of this thread until dropped.
pub(crate) struct ReactorGuard(*const Reactor);

impl ReactorGuard {
    pub(crate) fn enter(reactor: &Reactor) -> Self {
        ReactorGuard(CURRENT.with(|c| c.replace(reactor)))
    }
}

impl Drop for ReactorGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

fn with_current<R>(f: impl FnOnce(&Reactor) -> R) -> Option<R> {
    let ptr = CURRENT.with(|c| c.get());
    // SAFETY: CURRENT is only non-null between ReactorGuard::enter and its
    // drop, during which the reactor it points to is borrowed by the running
    // executor and so alive; it is only used from this thread.
    (!ptr.is_null()).then(|| f(unsafe { &*ptr }))
}

/// Watches `fd` on the io_uring of the executor running on this thread:
/// `call` runs on this thread each time `fd` has one of the poll `events`
/// (and also on errors and hang-ups), until it returns false or the
/// reactor closes, and then once more with `None` (see [`WatchFn`]).
/// `keep` keeps `fd` open meanwhile.
pub(crate) fn watch(fd: RawFd, events: u32, keep: Keepalive, call: WatchFn) -> io::Result<()> {
    with_current(|r| r.watch(fd, events, keep, call)).ok_or_else(|| {
        io::Error::other("a watch outside of an executor (no reactor on this thread)")
    })?
}

/// The id of the reactor of the executor running on this thread, if any.
pub(crate) fn current_reactor() -> Option<u64> {
    with_current(|r| r.id)
}

/// An operation submitted to the current thread's io_uring.
pub(crate) struct UringOp {
    reactor: u64,
    id: u32,
    finished: bool,
}

/// Queues `entry` on the io_uring of the executor running on this thread;
/// the returned future gives the completion's result (>= 0, or an error).
///
/// # Safety
///
/// Every address in `entry` (buffers, iovec arrays, a timespec) must point
/// into memory that `keep` keeps valid, or the entry must point to no
/// memory. The future may then be dropped or forgotten at any time.
pub(crate) unsafe fn submit(entry: squeue::Entry, keep: Keepalive) -> io::Result<UringOp> {
    let (reactor, id) =
        with_current(|r| r.push(entry, keep).map(|id| (r.id, id))).ok_or_else(|| {
            io::Error::other("io_uring I/O outside of an executor (no reactor on this thread)")
        })??;
    Ok(UringOp {
        reactor,
        id,
        finished: false,
    })
}

impl Future for UringOp {
    type Output = io::Result<u32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (reactor, id) = (self.reactor, self.id);
        let polled = with_current(|r| (r.id == reactor).then(|| r.poll_op(id, cx)));
        match polled.flatten() {
            None => Poll::Ready(Err(io::Error::other(
                "io_uring operation polled outside of its executor",
            ))),
            Some(Poll::Pending) => Poll::Pending,
            Some(Poll::Ready(res)) => {
                self.finished = true;
                Poll::Ready(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as u32)
                })
            }
        }
    }
}

impl Drop for UringOp {
    fn drop(&mut self) {
        if !self.finished {
            // Away from its reactor the slot is never reused, which is safe:
            // the reactor still releases the memory at the completion.
            with_current(|r| {
                if r.id == self.reactor {
                    r.abandon(self.id)
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::{block_on, sleep};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Polls a future once, then gives it back.
    fn poll_once<F: Future + Unpin>(mut f: F) -> F {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        f
    }

    /// More operations in flight than the completion queue holds (block_on's
    /// ring has 256 entries): the overflowed completions are still reaped.
    #[test]
    fn completions_past_the_queue_size_are_not_lost() {
        let n = 1000;
        let done = block_on(crate::aio::join_all(
            (0..n)
                .map(|_| {
                    Box::pin(async {
                        // SAFETY: a no-op points to no memory.
                        unsafe { submit(opcode::Nop::new().build(), Keepalive::Nothing) }?.await
                    }) as crate::aio::IoFuture<'static, u32>
                })
                .collect(),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(done.len(), n);
    }

    #[test]
    fn a_dropped_operation_keeps_its_memory_until_it_completes() {
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let buf = IoBuffer::from_vec(vec![0u8; 64]);
        let weak = {
            // The buffer's only strong holder after this block is the
            // operation in flight.
            let probe = Arc::new(());
            let owner = (buf.clone(), probe.clone());
            // SAFETY: the segment is inside `buf`, which `owner` keeps.
            let tracked =
                unsafe { IoBuffer::from_raw_segments(buf.segments().to_vec(), Arc::new(owner)) };
            drop(buf);
            let weak = Arc::downgrade(&probe);
            drop(probe);
            block_on(async {
                let iov = tracked.segments();
                let entry =
                    opcode::Readv::new(types::Fd(r.as_raw_fd()), iov.as_ptr(), iov.len() as u32)
                        .build();
                // SAFETY: the entry points into `tracked`, the keepalive.
                let op = unsafe { submit(entry, Keepalive::Buffer(tracked.clone())) }.unwrap();
                drop(tracked);
                let op = Box::pin(op);
                let op = poll_once(op);
                drop(op);
                assert!(weak.upgrade().is_some(), "memory freed while in flight");
                // The read completes once data arrives; the reactor then
                // releases the memory.
                std::io::Write::write_all(&mut &w, b"hello").unwrap();
                sleep(Duration::from_millis(20)).await.unwrap();
            })
            .unwrap();
            weak
        };
        assert!(weak.upgrade().is_none());
    }

    /// A timeout whose future was dropped is cancelled: its slot is free
    /// at once, not when it would have fired (an hour later here).
    #[test]
    fn a_dropped_timeout_is_cancelled() {
        block_on(async {
            drop(poll_once(Box::pin(sleep(Duration::from_secs(3600)))));
            sleep(Duration::from_millis(20)).await.unwrap();
            let abandoned = with_current(|r| {
                let inner = r.inner.borrow();
                inner
                    .slots
                    .iter()
                    .filter(|s| matches!(s.state, OpState::Abandoned))
                    .count()
            });
            assert_eq!(abandoned, Some(0));
        })
        .unwrap();
    }

    #[test]
    fn a_reactor_closing_with_operations_in_flight_cancels_and_waits() {
        let start = Instant::now();
        block_on(async {
            // Forgotten: neither its future nor its timespec is dropped.
            std::mem::forget(poll_once(Box::pin(sleep(Duration::from_secs(30)))));
            // Dropped after one poll.
            drop(poll_once(Box::pin(sleep(Duration::from_secs(30)))));
        })
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    /// Watches an eventfd; the watch's function reads it and logs what it
    /// read, and stops after reading 3.
    fn logged_watch(fd: &Arc<EventFd>, log: &Arc<parking_lot::Mutex<Vec<Option<u64>>>>) {
        let (theirs, log) = (fd.clone(), log.clone());
        watch(
            fd.as_raw_fd(),
            libc::POLLIN as u32,
            Keepalive::Other(Box::new(fd.clone())),
            Arc::new(move |event| {
                let value = event.map(|_| theirs.read().unwrap_or(0));
                log.lock().push(value);
                value != Some(3)
            }),
        )
        .unwrap();
    }

    #[test]
    fn a_watch_calls_at_each_readiness_until_it_stops() {
        let fd = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        block_on(async {
            logged_watch(&fd, &log);
            for value in [1, 3, 1] {
                // From another thread, as a library or a server would.
                let theirs = fd.clone();
                std::thread::spawn(move || theirs.write(value).unwrap())
                    .join()
                    .unwrap();
                sleep(Duration::from_millis(20)).await.unwrap();
            }
        })
        .unwrap();
        // The third write came after the watch had stopped.
        assert_eq!(*log.lock(), vec![Some(1), Some(3), None]);
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn a_closing_reactor_ends_its_watches() {
        let fd = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        block_on(async { logged_watch(&fd, &log) }).unwrap();
        assert_eq!(*log.lock(), vec![None]);
        // Nothing polls the descriptor any more.
        assert_eq!(Arc::strong_count(&fd), 1);
    }
}
