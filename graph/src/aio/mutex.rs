//! A mutex whose lock is awaited, not blocked on, and may be held across
//! awaits: for state that a driver updates with I/O in between (a format
//! driver's metadata), shared by requests on several executors.

use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

struct LockState {
    locked: bool,
    /// Tasks waiting for the lock, first come first woken.
    waiters: VecDeque<(u64, Waker)>,
    next_waiter: u64,
}

/// An asynchronous mutex.
pub struct AsyncMutex<T> {
    state: Mutex<LockState>,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through a guard, and at most one guard
// exists at a time (`locked`); T is sent between the threads holding it.
unsafe impl<T: Send> Send for AsyncMutex<T> {}
// SAFETY: as above: shared access hands out one guard at a time.
unsafe impl<T: Send> Sync for AsyncMutex<T> {}

impl<T> AsyncMutex<T> {
    /// A mutex over `data`.
    pub fn new(data: T) -> Self {
        AsyncMutex {
            state: Mutex::new(LockState {
                locked: false,
                waiters: VecDeque::new(),
                next_waiter: 0,
            }),
            data: UnsafeCell::new(data),
        }
    }

    /// Waits for the lock.
    pub fn lock(&self) -> Lock<'_, T> {
        Lock {
            mutex: self,
            waiter: None,
        }
    }

    /// Mutable access without locking, through exclusive ownership.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }

    fn unlock(&self) {
        let mut s = self.state.lock();
        s.locked = false;
        // The first waiter takes it from here (it leaves the queue when it
        // gets the lock, or when it is dropped, which wakes the next).
        if let Some((_, w)) = s.waiters.front() {
            w.wake_by_ref();
        }
    }
}

/// The future of [`AsyncMutex::lock`].
pub struct Lock<'a, T> {
    mutex: &'a AsyncMutex<T>,
    waiter: Option<u64>,
}

impl<'a, T> Future for Lock<'a, T> {
    type Output = Guard<'a, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Guard<'a, T>> {
        let mutex = self.mutex;
        let mut s = mutex.state.lock();
        if !s.locked {
            s.locked = true;
            if let Some(id) = self.waiter.take() {
                s.waiters.retain(|(w, _)| *w != id);
            }
            return Poll::Ready(Guard { mutex });
        }
        match self.waiter {
            Some(id) => {
                if let Some(entry) = s.waiters.iter_mut().find(|(w, _)| *w == id) {
                    entry.1.clone_from(cx.waker());
                }
            }
            None => {
                let id = s.next_waiter;
                s.next_waiter += 1;
                s.waiters.push_back((id, cx.waker().clone()));
                self.waiter = Some(id);
            }
        }
        Poll::Pending
    }
}

impl<T> Drop for Lock<'_, T> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter {
            let mut s = self.mutex.state.lock();
            s.waiters.retain(|(w, _)| *w != id);
            // This waiter may have been woken for a free lock: pass it on.
            if !s.locked {
                if let Some((_, w)) = s.waiters.front() {
                    w.wake_by_ref();
                }
            }
        }
    }
}

/// Access to the data of a locked [`AsyncMutex`]; unlocks when dropped.
pub struct Guard<'a, T> {
    mutex: &'a AsyncMutex<T>,
}

// SAFETY: a guard gives access to T only; sharing it shares &T.
unsafe impl<T: Sync> Sync for Guard<'_, T> {}
// SAFETY: a guard may move with its task to another thread if T may.
unsafe impl<T: Send> Send for Guard<'_, T> {}

impl<T> Deref for Guard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the guard is the only way to the data while it lives.
        unsafe { &*self.mutex.data.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref, and the guard is borrowed mutably.
        unsafe { &mut *self.mutex.data.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::{block_on, sleep, Executor};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn holders_across_awaits_exclude_each_other_on_several_threads() {
        let m = Arc::new(AsyncMutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut ex = Executor::new().unwrap();
                    for i in 0..10 {
                        let m = m.clone();
                        ex.spawn(async move {
                            let mut g = m.lock().await;
                            let n = g.len();
                            sleep(Duration::from_micros(200)).await.unwrap();
                            // Nobody pushed while this task slept.
                            assert_eq!(g.len(), n);
                            g.push((t, i));
                        });
                    }
                    ex.run_until_idle(|()| ());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(block_on(async { m.lock().await.len() }).unwrap(), 40);
    }

    #[test]
    fn a_dropped_waiter_passes_the_lock_on() {
        let m = AsyncMutex::new(0);
        block_on(async {
            let g = m.lock().await;
            let mut first = Box::pin(m.lock());
            let waker = Waker::noop();
            let mut cx = Context::from_waker(waker);
            assert!(first.as_mut().poll(&mut cx).is_pending());
            drop(g);
            // Woken, then dropped before it took the lock.
            drop(first);
            *m.lock().await += 1;
        })
        .unwrap();
        assert_eq!(*block_on(m.lock()).unwrap(), 1);
    }
}
