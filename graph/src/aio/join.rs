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
}
