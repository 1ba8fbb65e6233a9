//! The io_uring reactor owned by each executor.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, IoUring};
use vmm_sys_util::eventfd::EventFd;

thread_local! {
    /// The reactor of the executor running on this thread, if any.
    static CURRENT: Cell<*const Reactor> = const { Cell::new(std::ptr::null()) };
}

enum OpState {
    Free,
    Pending(Option<Waker>),
    Done(i32),
    /// The future was dropped; the slot is freed when the kernel completes.
    Abandoned,
}

struct Slot {
    state: OpState,
}

struct Inner {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

/// An io_uring whose completions post the executor's eventfd.
pub(crate) struct Reactor {
    inner: RefCell<Inner>,
}

impl Reactor {
    pub(crate) fn new(entries: u32, event: &EventFd) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Reactor {
            inner: RefCell::new(Inner {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    fn push(&self, entry: squeue::Entry) -> io::Result<u32> {
        let mut inner = self.inner.borrow_mut();
        let id = match inner.free.pop() {
            Some(id) => id,
            None => {
                inner.slots.push(Slot {
                    state: OpState::Free,
                });
                (inner.slots.len() - 1) as u32
            }
        };
        let entry = entry.user_data(u64::from(id));
        loop {
            // SAFETY: `submit`'s contract: the entry's buffers (and iovec
            // array) stay valid until the operation completes.
            if unsafe { inner.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            inner.ring.submit()?;
        }
        inner.slots[id as usize].state = OpState::Pending(None);
        Ok(id)
    }

    /// Submits queued entries and wakes the futures of completed ones;
    /// returns the number of completions.
    pub(crate) fn submit_and_reap(&self) -> usize {
        let mut inner = self.inner.borrow_mut();
        if !inner.ring.submission().is_empty() {
            if let Err(e) = inner.ring.submit() {
                log::error!("io_uring submit failed: {e}");
            }
        }
        let mut reaped = 0;
        let completions: Vec<(u32, i32)> = inner
            .ring
            .completion()
            .map(|c| (c.user_data() as u32, c.result()))
            .collect();
        for (id, result) in completions {
            reaped += 1;
            let slot = &mut inner.slots[id as usize];
            match std::mem::replace(&mut slot.state, OpState::Done(result)) {
                OpState::Pending(waker) => {
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                OpState::Abandoned => {
                    slot.state = OpState::Free;
                    inner.free.push(id);
                }
                OpState::Free | OpState::Done(_) => {
                    log::error!("io_uring completion for idle slot {id}")
                }
            }
        }
        reaped
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

    fn abandon(&self, id: u32) {
        let mut inner = self.inner.borrow_mut();
        let slot = &mut inner.slots[id as usize];
        if matches!(slot.state, OpState::Pending(_)) {
            slot.state = OpState::Abandoned;
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
    id: u32,
    finished: bool,
}

/// Queues `entry` on the io_uring of the executor running on this thread;
/// the returned future gives the completion's result (>= 0, or an error).
///
/// # Safety
///
/// Every buffer the entry points to, including an iovec array, must stay
/// valid until the returned future completes, and the future must not be
/// dropped before it completes (blkgraph's executors poll every task to
/// completion).
pub(crate) unsafe fn submit(entry: squeue::Entry) -> io::Result<UringOp> {
    let id = with_current(|r| r.push(entry)).ok_or_else(|| {
        io::Error::other("io_uring I/O outside of an executor (no reactor on this thread)")
    })??;
    Ok(UringOp {
        id,
        finished: false,
    })
}

impl Future for UringOp {
    type Output = io::Result<u32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        match with_current(|r| r.poll_op(id, cx)) {
            None => Poll::Ready(Err(io::Error::other("polled outside of its executor"))),
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
            // Without a current reactor the slot is leaked, which is safe.
            with_current(|r| r.abandon(self.id));
        }
    }
}
