//! The `throttle` filter: passes requests to its `file` child no faster
//! than the limits of its throttle group allow, except in drained
//! sections, where every request goes at once (QEMU's
//! `io_limits_disabled`): a section waits for the requests in flight, and
//! one waiting for its turn at a low limit would keep it waiting for hours
//! (a job-cancel, blockdev-del, shutdown).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::aio::{race, sleep, Either};
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, ChildRole, IoFuture, WriteFlags, ZeroFlags};
use crate::error::Error;
use crate::node::Child;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;
use crate::throttle_group::{Direction, ThrottleGroup, ThrottleLimits};

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry {
    name: "throttle",
    open,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ThrottleOptions {
    #[serde(default)]
    throttle_group: Option<String>,
    #[serde(default)]
    limits: Option<ThrottleLimits>,
}

struct Throttle {
    file: Arc<Child>,
    group: Arc<ThrottleGroup>,
    drained: Drained,
}

/// The drained sections over a throttle node, and the requests waiting
/// for their turn meanwhile, which a section lets go.
#[derive(Default)]
struct Drained(Mutex<DrainedState>);

#[derive(Default)]
struct DrainedState {
    /// Sections in progress.
    sections: u32,
    /// The wakers of the requests that wait for their turn, by ticket.
    waiting: HashMap<u64, Waker>,
    next_ticket: u64,
}

impl Drained {
    fn is_on(&self) -> bool {
        self.0.lock().sections > 0
    }

    fn begin(&self) {
        let waiting = {
            let mut s = self.0.lock();
            s.sections += 1;
            std::mem::take(&mut s.waiting)
        };
        for waker in waiting.into_values() {
            waker.wake();
        }
    }

    fn end(&self) {
        let mut s = self.0.lock();
        s.sections = s.sections.saturating_sub(1);
    }

    /// Resolves once a section is on.
    fn until_on(&self) -> UntilOn<'_> {
        UntilOn {
            drained: self,
            ticket: None,
        }
    }
}

/// A request's wait for a drained section; its waker leaves with it.
struct UntilOn<'a> {
    drained: &'a Drained,
    ticket: Option<u64>,
}

impl Future for UntilOn<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.drained.0.lock();
        if s.sections > 0 {
            return Poll::Ready(());
        }
        let ticket = match self.ticket {
            Some(t) => t,
            None => {
                s.next_ticket += 1;
                s.next_ticket
            }
        };
        s.waiting.insert(ticket, cx.waker().clone());
        drop(s);
        self.ticket = Some(ticket);
        Poll::Pending
    }
}

impl Drop for UntilOn<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            self.drained.0.lock().waiting.remove(&ticket);
        }
    }
}

fn open(
    ctx: &mut OpenContext<'_, '_>,
    mut options: Options,
) -> Result<Box<dyn BlockDriver>, Error> {
    let file = ctx.required_child(&mut options, ChildRole::File)?;
    let opts: ThrottleOptions = options.parse("")?;
    let group = match (opts.throttle_group, opts.limits) {
        (Some(id), None) => ctx.throttle_group(&id)?,
        (None, Some(limits)) => {
            limits.check().map_err(|e| match e {
                Error::InvalidOptions(t) => Error::InvalidOptions(format!("limits: {t}")),
                other => other,
            })?;
            Arc::new(ThrottleGroup::new("", limits))
        }
        (Some(_), Some(_)) => {
            return Err(Error::InvalidOptions(
                "Parameters 'throttle-group' and 'limits' cannot be used together".into(),
            ))
        }
        (None, None) => {
            return Err(Error::InvalidOptions(
                "Parameter 'throttle-group' is missing".into(),
            ))
        }
    };
    Ok(Box::new(Throttle {
        file,
        group,
        drained: Drained::default(),
    }))
}

impl Throttle {
    /// Waits for the request's turn, unless a drained section is on or
    /// begins meanwhile.
    async fn admit(&self, direction: Direction, bytes: u64) -> std::io::Result<()> {
        if self.drained.is_on() {
            return Ok(());
        }
        let wait = self.group.reserve(direction, bytes);
        if wait.is_zero() {
            return Ok(());
        }
        match race(sleep(wait), self.drained.until_on()).await {
            Either::Left(slept) => slept,
            Either::Right(()) => Ok(()),
        }
    }
}

impl BlockDriver for Throttle {
    fn size(&self) -> u64 {
        self.file.node().size()
    }

    fn drained_begin(&self) {
        self.drained.begin();
    }

    fn drained_end(&self) {
        self.drained.end();
    }

    fn filtered_child(&self) -> Option<&Arc<Child>> {
        Some(&self.file)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(async move {
            self.admit(Direction::Read, buf.len() as u64).await?;
            self.file.node().read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.admit(Direction::Write, buf.len() as u64).await?;
            self.file.node().write(offset, buf, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            self.admit(Direction::Write, 0).await?;
            self.file.node().discard(offset, len).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.admit(Direction::Write, 0).await?;
            self.file.node().write_zeroes(offset, len, flags).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::aio::block_on;
    use crate::{Graph, IoBuffer, Options, WriteFlags};

    #[test]
    fn reads_are_slowed_to_the_limit() {
        let graph = Graph::new();
        let arg =
            "driver=throttle,node-name=t,limits.iops-total=200,file.driver=null-co,file.size=1M";
        let node = graph.add(Options::from_arg(arg, None).unwrap()).unwrap();
        let start = Instant::now();
        block_on(async {
            let buf = IoBuffer::from_vec(vec![0u8; 512]);
            for _ in 0..40 {
                node.read(0, &buf).await.unwrap();
            }
        })
        .unwrap();
        // 20 requests of burst, then 20 more at 200/s.
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
    }

    /// Found by the qmp_commands fuzz target: a request waiting for its
    /// turn at a low limit kept waiting in a drained section, and the
    /// section with it: a job writing through a throttle node at 4 KiB/s
    /// held job-cancel, every drained transaction and shutdown for minutes
    /// (days at a few bytes per second). As QEMU's throttle, a drained
    /// section lets the waiting requests go, and holds none back.
    #[test]
    fn a_drained_section_lets_waiting_requests_go() {
        let graph = Graph::shared();
        let arg = "driver=throttle,node-name=t,limits.bps-total=4096,\
                   file.driver=null-co,file.size=1M";
        let node = graph.add(Options::from_arg(arg, None).unwrap()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let writer = node.clone();
        std::thread::spawn(move || {
            block_on(async {
                let buf = IoBuffer::from_vec(vec![1u8; 64 << 10]);
                // The first goes at once and takes 16 s of budget.
                for _ in 0..2 {
                    let written = writer.write(0, &buf, WriteFlags::default()).await;
                    written.unwrap();
                    let _ = done.send(Instant::now());
                }
            })
            .unwrap();
        });
        finished.recv_timeout(Duration::from_secs(5)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let section = graph.drained();
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("the drained section left the request waiting");
        // And none waits while the section lasts.
        block_on(node.write(
            0,
            &IoBuffer::from_vec(vec![2u8; 64 << 10]),
            WriteFlags::default(),
        ))
        .unwrap()
        .unwrap();
        drop(section);
    }

    #[test]
    fn needs_a_group_or_limits() {
        let graph = Graph::new();
        let e = graph
            .add(
                Options::from_arg("driver=throttle,node-name=t,file.driver=null-co", None).unwrap(),
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'throttle-group' is missing");
        let e = graph
            .add(
                Options::from_arg(
                    "driver=throttle,node-name=t,throttle-group=nope,file.driver=null-co",
                    None,
                )
                .unwrap(),
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "No throttle group 'nope'");
    }
}
