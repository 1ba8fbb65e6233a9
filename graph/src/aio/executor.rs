//! A single-threaded executor for block requests, driven by an event loop.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::uring::{Reactor, ReactorGuard};

/// Number of submission queue entries of each executor's io_uring.
const RING_ENTRIES: u32 = 512;

thread_local! {
    /// The wake queue of the executor running on this thread, if any.
    static RUNNING: Cell<*const WakeQueue> = const { Cell::new(std::ptr::null()) };
}

/// Tasks that were woken and wait to be polled.
struct WakeQueue {
    ready: Mutex<Vec<usize>>,
    event: EventFd,
}

impl WakeQueue {
    fn push(self: &Arc<Self>, id: usize) {
        let first = {
            let mut ready = self.ready.lock();
            ready.push(id);
            ready.len() == 1
        };
        // The running executor looks at its queue again before it sleeps, so
        // only a wake from elsewhere needs the eventfd, and only the first
        // into an empty list: the executor takes the whole list at once, and
        // the write of that first wake makes it do so (or it is running and
        // will). Completions that arrive while the queue thread is busy then
        // cost no system call and no extra wake-up.
        if first && RUNNING.with(|r| r.get()) != Arc::as_ptr(self) {
            let _ = self.event.write(1);
        }
    }

    fn take(&self, into: &mut Vec<usize>) {
        std::mem::swap(&mut *self.ready.lock(), into);
    }
}

struct TaskWaker {
    id: usize,
    queue: Arc<WakeQueue>,
    /// The task is on the ready list: a task is polled once per wake-up,
    /// however many times it was woken.
    queued: AtomicBool,
}

impl TaskWaker {
    fn new(id: usize, queue: Arc<WakeQueue>) -> Arc<Self> {
        Arc::new(TaskWaker {
            id,
            queue,
            queued: AtomicBool::new(false),
        })
    }
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.queue.push(self.id);
        }
    }
}

struct Task<T> {
    future: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    /// Made once per slot and kept when the slot is reused.
    state: Arc<TaskWaker>,
    waker: Waker,
}

/// Wakes an executor's event loop from any thread.
pub struct Notifier(Arc<WakeQueue>);

impl Notifier {
    /// Makes the executor's eventfd readable.
    pub fn notify(&self) {
        let _ = self.0.event.write(1);
    }
}

/// Marks this thread as running an executor until dropped.
struct RunningGuard(*const WakeQueue);

impl RunningGuard {
    fn enter(queue: &Arc<WakeQueue>) -> Self {
        RunningGuard(RUNNING.with(|r| r.replace(Arc::as_ptr(queue))))
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.0));
    }
}

/// An executor of tasks that each produce a `T`, with its own io_uring.
///
/// It never blocks: an event loop calls [`Executor::run`] when the
/// [`Executor::event_fd`] is readable or after it spawned tasks, and gets the
/// output of each task that finished.
pub struct Executor<T> {
    tasks: Vec<Task<T>>,
    free: Vec<usize>,
    live: usize,
    queue: Arc<WakeQueue>,
    reactor: Reactor,
    scratch: Vec<usize>,
}

impl<T> Executor<T> {
    /// Creates an executor with a new io_uring and eventfd.
    pub fn new() -> io::Result<Self> {
        let event = EventFd::new(EFD_NONBLOCK)?;
        let reactor = Reactor::new(RING_ENTRIES, &event)?;
        Ok(Executor {
            tasks: Vec::new(),
            free: Vec::new(),
            live: 0,
            queue: Arc::new(WakeQueue {
                ready: Mutex::new(Vec::new()),
                event,
            }),
            reactor,
            scratch: Vec::new(),
        })
    }

    /// The eventfd that becomes readable when [`Executor::run`] has work.
    pub fn event_fd(&self) -> RawFd {
        self.queue.event.as_raw_fd()
    }

    /// A handle that makes the eventfd readable from any thread.
    pub fn notifier(&self) -> Notifier {
        Notifier(self.queue.clone())
    }

    /// Makes the eventfd readable, so the event loop calls
    /// [`Executor::run`] (and looks at whatever else it serves).
    pub fn notify(&self) {
        let _ = self.queue.event.write(1);
    }

    /// Clears the eventfd; call before [`Executor::run`] when it fired.
    pub fn consume_event(&self) {
        let _ = self.queue.event.read();
    }

    /// Number of tasks that have not finished.
    pub fn pending(&self) -> usize {
        self.live
    }

    /// Adds a task; it is first polled by the next [`Executor::run`], which
    /// the caller runs soon: until then, the ready list is not empty and
    /// wakes from other threads do not post the eventfd.
    pub fn spawn(&mut self, future: impl Future<Output = T> + Send + 'static) {
        let id = self.free.pop().unwrap_or_else(|| {
            let id = self.tasks.len();
            let state = TaskWaker::new(id, self.queue.clone());
            self.tasks.push(Task {
                future: None,
                waker: Waker::from(state.clone()),
                state,
            });
            id
        });
        let task = &mut self.tasks[id];
        task.future = Some(Box::pin(future));
        self.live += 1;
        // A stale wake of the slot's previous task may have queued it.
        if !task.state.queued.swap(true, Ordering::AcqRel) {
            self.queue.ready.lock().push(id);
        }
    }

    /// Polls every woken task, submits and reaps I/O, and repeats until no
    /// task is ready; `done` gets the output of each finished task.
    pub fn run(&mut self, mut done: impl FnMut(T)) {
        let _running = RunningGuard::enter(&self.queue);
        let _reactor = ReactorGuard::enter(&self.reactor);
        loop {
            let mut ready = std::mem::take(&mut self.scratch);
            self.queue.take(&mut ready);
            let idle = ready.is_empty();
            for id in ready.drain(..) {
                let task = &mut self.tasks[id];
                task.state.queued.store(false, Ordering::Release);
                let Some(future) = task.future.as_mut() else {
                    continue; // a stale wake of a finished task
                };
                let mut cx = Context::from_waker(&task.waker);
                if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                    task.future = None;
                    self.free.push(id);
                    self.live -= 1;
                    done(out);
                }
            }
            self.scratch = ready;
            let reaped = self.reactor.submit_and_reap();
            if idle && reaped == 0 {
                break;
            }
        }
    }
}

impl<T> Executor<T> {
    /// Blocks the calling thread until every task has finished, running
    /// them as their I/O completes; `done` gets each output. For shutting a
    /// queue or connection down when no event loop runs it any more.
    pub fn run_until_idle(&mut self, mut done: impl FnMut(T)) {
        self.run(&mut done);
        while self.pending() > 0 {
            let mut pfd = libc::pollfd {
                fd: self.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is valid for the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.consume_event();
            self.run(&mut done);
        }
    }
}

/// Runs a future to completion on the calling thread, with a temporary
/// reactor; for control-plane threads and tests.
pub fn block_on<F: Future>(future: F) -> io::Result<F::Output> {
    let event = EventFd::new(0)?;
    let reactor = Reactor::new(64, &event)?;
    let queue = Arc::new(WakeQueue {
        ready: Mutex::new(Vec::new()),
        event,
    });
    let task = TaskWaker::new(0, queue.clone());
    let waker = Waker::from(task.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    let _running = RunningGuard::enter(&queue);
    let _reactor = ReactorGuard::enter(&reactor);
    loop {
        task.queued.store(false, Ordering::Release);
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return Ok(out);
        }
        loop {
            reactor.submit_and_reap();
            let mut ready = Vec::new();
            queue.take(&mut ready);
            if !ready.is_empty() {
                break;
            }
            // Blocks until io_uring posts a completion or another thread
            // wakes the future.
            queue.event.read()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A future that is woken from another thread after a delay.
    struct Remote {
        started: bool,
        flag: Arc<AtomicBool>,
    }

    impl Future for Remote {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            if self.flag.load(Ordering::Acquire) {
                return Poll::Ready(7);
            }
            if !self.started {
                self.started = true;
                let (flag, waker) = (self.flag.clone(), cx.waker().clone());
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    flag.store(true, Ordering::Release);
                    waker.wake();
                });
            }
            Poll::Pending
        }
    }

    #[test]
    fn block_on_is_woken_from_another_thread() {
        let f = Remote {
            started: false,
            flag: Arc::new(AtomicBool::new(false)),
        };
        assert_eq!(block_on(f).unwrap(), 7);
    }

    /// Wakes itself three times per poll until it was polled five times.
    struct Noisy(Arc<std::sync::atomic::AtomicUsize>);

    impl Future for Noisy {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0.fetch_add(1, Ordering::SeqCst) + 1 == 5 {
                return Poll::Ready(());
            }
            for _ in 0..3 {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    #[test]
    fn a_task_woken_many_times_is_polled_once_per_wake_up() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut ex = Executor::new().unwrap();
        ex.spawn(Noisy(polls.clone()));
        ex.run(|()| ());
        assert_eq!(ex.pending(), 0);
        assert_eq!(polls.load(Ordering::SeqCst), 5);
        polls.store(0, Ordering::SeqCst);
        block_on(Noisy(polls.clone())).unwrap();
        assert_eq!(polls.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn executor_runs_tasks_and_reports_outputs() {
        let mut ex = Executor::new().unwrap();
        for i in 0..10u32 {
            ex.spawn(async move { i * 2 });
        }
        ex.spawn(async {
            Remote {
                started: false,
                flag: Arc::new(AtomicBool::new(false)),
            }
            .await
                + 100
        });
        let mut out = Vec::new();
        ex.run(|v| out.push(v));
        assert_eq!(out.len(), 10);
        assert_eq!(ex.pending(), 1);
        // The remote wake arrives through the eventfd.
        let mut pfd = libc::pollfd {
            fd: ex.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
        ex.consume_event();
        ex.run(|v| out.push(v));
        assert_eq!(ex.pending(), 0);
        out.sort();
        assert_eq!(out.last(), Some(&107));
    }

    /// Pending until its flag is set; keeps its latest waker for others.
    struct Parked(Arc<(AtomicBool, Mutex<Option<Waker>>)>);

    impl Future for Parked {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 .0.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            *self.0 .1.lock() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn wakes_from_another_thread_post_the_eventfd_once_per_batch() {
        let mut ex = Executor::new().unwrap();
        let parked: Vec<_> = (0..8)
            .map(|_| Arc::new((AtomicBool::new(false), Mutex::new(None))))
            .collect();
        for p in &parked {
            ex.spawn(Parked(p.clone()));
        }
        ex.run(|()| ());
        assert_eq!(ex.pending(), 8);
        let theirs = parked.clone();
        std::thread::spawn(move || {
            for p in theirs {
                p.0.store(true, Ordering::Release);
                p.1.lock().take().unwrap().wake();
            }
        })
        .join()
        .unwrap();
        // Eight wakes, one write: the count the eventfd gives is 1.
        assert_eq!(ex.queue.event.read().unwrap(), 1);
        ex.run(|()| ());
        assert_eq!(ex.pending(), 0);
    }
}
