//! The `throttle` filter: passes requests to its `file` child no faster
//! than the limits of its throttle group allow.

use std::sync::Arc;

use serde::Deserialize;

use crate::aio::sleep;
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
    Ok(Box::new(Throttle { file, group }))
}

impl Throttle {
    async fn admit(&self, direction: Direction, bytes: u64) -> std::io::Result<()> {
        let wait = self.group.reserve(direction, bytes);
        if !wait.is_zero() {
            sleep(wait).await?;
        }
        Ok(())
    }
}

impl BlockDriver for Throttle {
    fn size(&self) -> u64 {
        self.file.node().size()
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
    use crate::{Graph, IoBuffer, Options};

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
