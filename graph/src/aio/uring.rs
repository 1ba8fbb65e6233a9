//! The io_uring reactor owned by each executor.
//!
//! An operation in flight holds what its memory lives in (a buffer clone, a
//! boxed timespec) in its slot until the kernel posts its completion, not in
//! its future: dropping or forgetting the future cannot free memory the
//! kernel still uses. A reactor that is dropped with operations in flight
//! cancels them and waits for their completions before it closes the ring.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue, types, IoUring};
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

enum OpState {
    Free,
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
}

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
        inner.slots[id as usize] = Slot {
            state: OpState::Pending(None),
            keep,
        };
        Ok(id)
    }

    /// Submits queued entries and wakes the futures of completed ones;
    /// returns the number of completions.
    pub(crate) fn submit_and_reap(&self) -> usize {
        let mut inner = self.inner.borrow_mut();
        let mut reaped = 0;
        loop {
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
            reaped += inner.reap();
            if !overflow {
                return reaped;
            }
        }
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
            OpState::Free | OpState::Abandoned => Poll::Ready(-libc::EINVAL),
        }
    }

    /// The future of operation `id` is gone: its slot is freed now if the
    /// operation completed, or when it does.
    fn abandon(&self, id: u32) {
        let mut inner = self.inner.borrow_mut();
        let slot = &mut inner.slots[id as usize];
        match slot.state {
            OpState::Pending(_) => slot.state = OpState::Abandoned,
            OpState::Done(_) => {
                slot.state = OpState::Free;
                inner.free.push(id);
            }
            OpState::Free | OpState::Abandoned => {}
        }
    }
}

impl Inner {
    fn in_flight(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, OpState::Pending(_) | OpState::Abandoned))
            .map(|(i, _)| i)
    }

    fn reap(&mut self) -> usize {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut reaped = 0;
        for (user_data, result) in completions {
            let Some(slot) = self.slots.get_mut(user_data as usize) else {
                continue; // a cancel request's own completion
            };
            reaped += 1;
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
                OpState::Free | OpState::Done(_) => {
                    log::error!("io_uring completion for idle slot {user_data}")
                }
            }
        }
        reaped
    }
}

impl Drop for Reactor {
    /// Cancels the operations still in flight and waits until the kernel
    /// has completed them, so that the memory they point to is released
    /// only once nothing uses it.
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        let pending: Vec<usize> = inner.in_flight().collect();
        for id in pending {
            let cancel = opcode::AsyncCancel::new(id as u64)
                .build()
                .user_data(CANCEL);
            // SAFETY: a cancel request points to no memory.
            while unsafe { inner.ring.submission().push(&cancel) }.is_err() {
                if inner.ring.submit().is_err() {
                    break;
                }
            }
        }
        while inner.in_flight().next().is_some() {
            match inner.ring.submit_and_wait(1) {
                Ok(_) => {
                    inner.reap();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The memory cannot be proven unused: never free it.
                    log::error!("io_uring: cannot wait for operations in flight: {e}");
                    for slot in inner.slots.drain(..) {
                        std::mem::forget(slot.keep);
                    }
                    return;
                }
            }
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
}
