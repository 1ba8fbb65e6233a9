//! Byte ranges held by requests in flight, shared or alone. qcow2's
//! writes in place share guest clusters while allocating writes, zeroing
//! and discards hold them alone (two requests never allocate the same
//! cluster, a cluster is never freed under a write that uses it); a
//! mirror's copies hold what they copy alone, and so do the guest writes
//! that a write-blocking mirror passes to its target.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

#[derive(Default)]
struct State {
    held: Vec<(u64, u64, u64, bool)>,
    next: u64,
    waiters: Vec<Waker>,
}

/// The ranges held now.
#[derive(Default)]
pub struct RangeLocks {
    state: Mutex<State>,
}

/// A held range; released when dropped.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until `[start, end)` can be held (alone if `exclusive`), and
    /// holds it.
    pub fn lock(&self, start: u64, end: u64, exclusive: bool) -> Acquire<'_> {
        Acquire {
            locks: self,
            start,
            end,
            exclusive,
        }
    }
}

/// The future of [`RangeLocks::lock`].
pub struct Acquire<'a> {
    locks: &'a RangeLocks,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl<'a> Future for Acquire<'a> {
    type Output = RangeGuard<'a>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard<'a>> {
        let mut s = self.locks.state.lock();
        let conflict = s
            .held
            .iter()
            .any(|&(_, a, b, x)| a < self.end && self.start < b && (x || self.exclusive));
        if conflict {
            s.waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        let id = s.next;
        s.next += 1;
        s.held.push((id, self.start, self.end, self.exclusive));
        Poll::Ready(RangeGuard {
            locks: self.locks,
            id,
        })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.locks.state.lock();
        s.held.retain(|h| h.0 != self.id);
        for w in s.waiters.drain(..) {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_ranges_coexist_exclusive_ones_wait() {
        let locks = RangeLocks::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        fn poll<'a>(f: &mut Pin<Box<Acquire<'a>>>, cx: &mut Context<'_>) -> Poll<RangeGuard<'a>> {
            f.as_mut().poll(cx)
        }
        let mut a = Box::pin(locks.lock(0, 10, false));
        let Poll::Ready(ga) = poll(&mut a, &mut cx) else {
            panic!()
        };
        let mut b = Box::pin(locks.lock(5, 15, false));
        let Poll::Ready(gb) = poll(&mut b, &mut cx) else {
            panic!()
        };
        let mut c = Box::pin(locks.lock(9, 12, true));
        assert!(poll(&mut c, &mut cx).is_pending());
        let mut d = Box::pin(locks.lock(15, 20, true));
        assert!(poll(&mut d, &mut cx).is_ready());
        drop(ga);
        assert!(poll(&mut c, &mut cx).is_pending());
        drop(gb);
        assert!(poll(&mut c, &mut cx).is_ready());
    }
}
