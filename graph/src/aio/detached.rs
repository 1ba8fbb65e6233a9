//! Tasks that outlive the request that started them, such as a copy that
//! timed out but must finish: they run on one background thread with its
//! own executor.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use super::executor::{Executor, Notifier};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Background {
    incoming: Mutex<Vec<Task>>,
    notifier: Notifier,
}

/// The background thread, started on first use; an error if it could not
/// be started.
fn background() -> io::Result<&'static Background> {
    static BACKGROUND: OnceLock<Option<Background>> = OnceLock::new();
    BACKGROUND
        .get_or_init(|| match start_background() {
            Ok(b) => Some(b),
            Err(e) => {
                log::error!("cannot start the thread for detached I/O: {e}");
                None
            }
        })
        .as_ref()
        .ok_or_else(|| io::Error::other("no thread for detached I/O"))
}

fn start_background() -> io::Result<Background> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("detached-io".into())
        .spawn(move || {
            let mut executor = match Executor::<()>::new() {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(executor.notifier()));
            // Returns once the first caller has published the Background.
            let Ok(background) = background() else {
                return;
            };
            loop {
                let tasks = std::mem::take(&mut *background.incoming.lock());
                for t in tasks {
                    executor.spawn(t);
                }
                executor.run(|()| ());
                let mut pfd = libc::pollfd {
                    fd: executor.event_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: pfd is valid for the call.
                unsafe { libc::poll(&mut pfd, 1, -1) };
                executor.consume_event();
            }
        })?;
    let notifier = rx
        .recv()
        .map_err(|_| io::Error::other("the detached I/O thread ended"))??;
    Ok(Background {
        incoming: Mutex::new(Vec::new()),
        notifier,
    })
}

/// Runs `future` to completion on the background thread; the returned
/// handle gives its output and may be dropped without stopping it.
pub fn spawn_detached<T: Send + 'static>(
    future: impl Future<Output = T> + Send + 'static,
) -> io::Result<Detached<T>> {
    let slot = Arc::new(Mutex::new((None, None::<Waker>)));
    let theirs = slot.clone();
    let b = background()?;
    b.incoming.lock().push(Box::pin(async move {
        let out = future.await;
        let waker = {
            let mut s = theirs.lock();
            s.0 = Some(out);
            s.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }));
    b.notifier.notify();
    Ok(Detached(slot))
}

/// The output of a detached task.
pub struct Detached<T>(Arc<Mutex<(Option<T>, Option<Waker>)>>);

impl<T> Future for Detached<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.lock();
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Which of two futures finished first.
pub enum Either<A, B> {
    /// The first.
    Left(A),
    /// The second.
    Right(B),
}

/// Polls both futures and returns the output of the first to finish; the
/// other is dropped unfinished (block operations may be: see `IoBuffer`).
pub async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::{block_on, sleep};
    use std::time::Duration;

    #[test]
    fn detached_tasks_finish_after_their_handle_is_dropped() {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let out = block_on(async move {
            let slow = spawn_detached(async move {
                sleep(Duration::from_millis(50)).await.unwrap();
                d.store(true, std::sync::atomic::Ordering::SeqCst);
                7
            })
            .unwrap();
            match race(slow, sleep(Duration::from_millis(5))).await {
                Either::Left(_) => "copy",
                Either::Right(_) => "timeout",
            }
        })
        .unwrap();
        assert_eq!(out, "timeout");
        std::thread::sleep(Duration::from_millis(200));
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(block_on(spawn_detached(async { 3 }).unwrap()).unwrap(), 3);
    }
}
