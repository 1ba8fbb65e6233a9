//! Waiting for several I/O futures at once, on the task that polls them
//! (no spawning): a format driver issuing the pieces of one request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future of a block operation, as drivers return them.
pub type IoFuture<'a, T = ()> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// The future of [`join_all`].
pub struct JoinAll<'a, T> {
    pending: Vec<Option<IoFuture<'a, T>>>,
    done: Vec<Option<io::Result<T>>>,
}

/// Runs every future to completion, concurrently, and returns their
/// outputs in order, or the first error once all of them have finished
/// (so no memory they use is released while the kernel may still touch it).
pub fn join_all<T>(futures: Vec<IoFuture<'_, T>>) -> JoinAll<'_, T> {
    let done = futures.iter().map(|_| None).collect();
    JoinAll {
        pending: futures.into_iter().map(Some).collect(),
        done,
    }
}

// Nothing of the join is pinned in place: the futures are boxed and the
// outputs are only moved out at the end.
impl<T> Unpin for JoinAll<'_, T> {}

impl<T> Future for JoinAll<'_, T> {
    type Output = io::Result<Vec<T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut all_done = true;
        for (slot, out) in this.pending.iter_mut().zip(this.done.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        *out = Some(r);
                        *slot = None;
                    }
                    Poll::Pending => all_done = false,
                }
            }
        }
        if !all_done {
            return Poll::Pending;
        }
        let mut outputs = Vec::with_capacity(this.done.len());
        let mut error = None;
        for r in this.done.drain(..).flatten() {
            match r {
                Ok(v) => outputs.push(v),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        Poll::Ready(match error {
            Some(e) => Err(e),
            None => Ok(outputs),
        })
    }
}

/// Futures that run concurrently on the task that polls them, each taken
/// out as it finishes: a window of work that is refilled as it drains
/// (a job's copies), where [`join_all`] would wait for the slowest.
pub struct InFlight<'a, T> {
    futures: Vec<IoFuture<'a, T>>,
}

impl<T> Default for InFlight<'_, T> {
    fn default() -> Self {
        InFlight {
            futures: Vec::new(),
        }
    }
}

impl<'a, T> InFlight<'a, T> {
    /// How many futures have not finished.
    pub fn len(&self) -> usize {
        self.futures.len()
    }

    /// Whether every future has finished.
    pub fn is_empty(&self) -> bool {
        self.futures.is_empty()
    }

    /// Adds a future; it first runs when [`InFlight::next`] is polled.
    pub fn push(&mut self, future: IoFuture<'a, T>) {
        self.futures.push(future);
    }

    /// The output of the next future to finish; `None` once none is left.
    pub async fn next(&mut self) -> Option<io::Result<T>> {
        if self.futures.is_empty() {
            return None;
        }
        std::future::poll_fn(|cx| {
            for i in 0..self.futures.len() {
                if let Poll::Ready(out) = self.futures[i].as_mut().poll(cx) {
                    drop(self.futures.swap_remove(i));
                    return Poll::Ready(Some(out));
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::{block_on, sleep};
    use std::time::Duration;

    #[test]
    fn waits_for_all_and_keeps_order_and_the_first_error() {
        let out = block_on(join_all(vec![
            Box::pin(async {
                sleep(Duration::from_millis(20)).await?;
                Ok(1)
            }) as IoFuture<'_, i32>,
            Box::pin(async { Ok(2) }),
        ]))
        .unwrap();
        assert_eq!(out.unwrap(), vec![1, 2]);
        let finished = std::sync::atomic::AtomicBool::new(false);
        let out = block_on(join_all(vec![
            Box::pin(async { Err(io::Error::from_raw_os_error(libc::EIO)) }) as IoFuture<'_, ()>,
            Box::pin(async {
                sleep(Duration::from_millis(20)).await?;
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            }),
        ]))
        .unwrap();
        assert_eq!(out.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(finished.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn in_flight_gives_outputs_as_they_finish() {
        let order = block_on(async {
            let mut window = InFlight::default();
            for (value, ms) in [(1, 40), (2, 0), (3, 15)] {
                window.push(Box::pin(async move {
                    sleep(Duration::from_millis(ms)).await?;
                    Ok(value)
                }) as IoFuture<'_, i32>);
            }
            assert_eq!(window.len(), 3);
            let mut order = Vec::new();
            while let Some(out) = window.next().await {
                order.push(out.unwrap());
            }
            assert!(window.is_empty());
            order
        })
        .unwrap();
        assert_eq!(order, vec![2, 3, 1]);
    }
}
