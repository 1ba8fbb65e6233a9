//! A thread pool for blocking system calls (`aio=threads`).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use parking_lot::{Condvar, Mutex};

/// Number of worker threads.
const WORKERS: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<VecDeque<Job>>,
    more: Condvar,
    /// Threads that could be started; jobs run inline without any.
    workers: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            jobs: Mutex::new(VecDeque::new()),
            more: Condvar::new(),
            workers: AtomicUsize::new(0),
        }));
        for i in 0..WORKERS {
            let spawned =
                std::thread::Builder::new()
                    .name(format!("aio-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let mut jobs = pool.jobs.lock();
                            loop {
                                match jobs.pop_front() {
                                    Some(job) => break job,
                                    None => pool.more.wait(&mut jobs),
                                }
                            }
                        };
                        job();
                    });
            match spawned {
                Ok(_) => {
                    pool.workers.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => log::error!("cannot start aio thread {i}: {e}"),
            }
        }
        pool
    })
}

struct Shared {
    result: Option<io::Result<u64>>,
    waker: Option<Waker>,
}

/// The result of a job run by [`run_blocking`].
pub(crate) struct BlockingOp(Arc<Mutex<Shared>>);

/// Runs `f` on the thread pool; the future completes with its result.
pub(crate) fn run_blocking(f: impl FnOnce() -> io::Result<u64> + Send + 'static) -> BlockingOp {
    let shared = Arc::new(Mutex::new(Shared {
        result: None,
        waker: None,
    }));
    let theirs = shared.clone();
    let pool = pool();
    if pool.workers.load(Ordering::Relaxed) == 0 {
        // No thread could be started: block this one rather than never
        // run the job.
        theirs.lock().result = Some(f());
        return BlockingOp(shared);
    }
    pool.jobs.lock().push_back(Box::new(move || {
        let result = f();
        let waker = {
            let mut s = theirs.lock();
            s.result = Some(result);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }));
    pool.more.notify_one();
    BlockingOp(shared)
}

impl Future for BlockingOp {
    type Output = io::Result<u64>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.lock();
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::block_on;

    #[test]
    fn runs_jobs_and_returns_results() {
        let ops: Vec<_> = (0..40u64).map(|i| run_blocking(move || Ok(i))).collect();
        let sum = block_on(async {
            let mut sum = 0;
            for op in ops {
                sum += op.await.unwrap();
            }
            sum
        })
        .unwrap();
        assert_eq!(sum, (0..40u64).sum::<u64>());
    }
}
