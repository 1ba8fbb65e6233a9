//! A thread pool for blocking system calls (`aio=threads`).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

/// Number of worker threads.
const WORKERS: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<VecDeque<Job>>,
    more: Condvar,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            jobs: Mutex::new(VecDeque::new()),
            more: Condvar::new(),
        }));
        for i in 0..WORKERS {
            std::thread::Builder::new()
                .name(format!("aio-{i}"))
                .spawn(move || loop {
                    let job = {
                        let mut jobs = pool.jobs.lock().unwrap();
                        loop {
                            match jobs.pop_front() {
                                Some(job) => break job,
                                None => jobs = pool.more.wait(jobs).unwrap(),
                            }
                        }
                    };
                    job();
                })
                .expect("spawn aio thread");
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
    pool.jobs.lock().unwrap().push_back(Box::new(move || {
        let result = f();
        let waker = {
            let mut s = theirs.lock().unwrap();
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
        let mut s = self.0.lock().unwrap();
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
