//! Sleeping without blocking the executor: an io_uring timeout.

use std::io;
use std::time::Duration;

use io_uring::{opcode, types};

use super::uring::{submit, Keepalive};

/// Completes after `duration`, on the executor polling it.
pub async fn sleep(duration: Duration) -> io::Result<()> {
    let ts = Box::new(types::Timespec::from(duration));
    let entry = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    // SAFETY: the entry points to the boxed timespec, which the reactor
    // keeps until the timeout completes.
    let op = unsafe { submit(entry, Keepalive::Timespec(ts)) }?;
    match op.await {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::block_on;
    use std::time::Instant;

    #[test]
    fn sleeps_at_least_the_duration() {
        let start = Instant::now();
        block_on(sleep(Duration::from_millis(30))).unwrap().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
