//! Throttle groups: I/O limits shared by the throttle nodes that use them.
//!
//! QEMU's leaky buckets (util/throttle.c's model): each limit has a level
//! that requests fill by their cost and that leaks at the limit's rate. A
//! request waits while the level is above the bucket's size: a tenth of a
//! second of the rate, or with a burst rate (`*-max`), that rate for
//! `*-max-length` seconds, while a second bucket leaking at the burst rate
//! keeps bursts themselves to a tenth of a second of it. With `iops-size`,
//! a larger request counts as several operations. A request is given the
//! earliest start at which every limit it counts against allows it, and
//! its cost is accounted at that start.
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::error::Error;

fn one() -> u64 {
    1
}

/// The limits of a group, in QEMU's ThrottleLimits names (0: no limit).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ThrottleLimits {
    /// Requests per second, reads and writes together.
    #[serde(default)]
    pub iops_total: u64,
    /// Burst rate of `iops_total`.
    #[serde(default)]
    pub iops_total_max: u64,
    /// Seconds the burst rate may last.
    #[serde(default = "one")]
    pub iops_total_max_length: u64,
    /// Read requests per second.
    #[serde(default)]
    pub iops_read: u64,
    /// Burst rate of `iops_read`.
    #[serde(default)]
    pub iops_read_max: u64,
    /// Seconds the burst rate may last.
    #[serde(default = "one")]
    pub iops_read_max_length: u64,
    /// Write requests per second.
    #[serde(default)]
    pub iops_write: u64,
    /// Burst rate of `iops_write`.
    #[serde(default)]
    pub iops_write_max: u64,
    /// Seconds the burst rate may last.
    #[serde(default = "one")]
    pub iops_write_max_length: u64,
    /// Bytes per second, reads and writes together.
    #[serde(default)]
    pub bps_total: u64,
    /// Burst rate of `bps_total`.
    #[serde(default)]
    pub bps_total_max: u64,
    /// Seconds the burst rate may last.
    #[serde(default = "one")]
    pub bps_total_max_length: u64,
    /// Bytes read per second.
    #[serde(default)]
    pub bps_read: u64,
    /// Burst rate of `bps_read`.
    #[serde(default)]
    pub bps_read_max: u64,
    /// Seconds the burst rate may last.
    #[serde(default = "one")]
    pub bps_read_max_length: u64,
    /// Bytes written per second.
    #[serde(default)]
    pub bps_write: u64,
    /// Burst rate of `bps_write`.
    #[serde(default)]
    pub bps_write_max: u64,
    /// Seconds the burst rate may last.
    #[serde(default = "one")]
    pub bps_write_max_length: u64,
    /// A request larger than this counts as size / iops-size operations.
    #[serde(default)]
    pub iops_size: u64,
}

impl Default for ThrottleLimits {
    fn default() -> Self {
        ThrottleLimits {
            iops_total: 0,
            iops_total_max: 0,
            iops_total_max_length: 1,
            iops_read: 0,
            iops_read_max: 0,
            iops_read_max_length: 1,
            iops_write: 0,
            iops_write_max: 0,
            iops_write_max_length: 1,
            bps_total: 0,
            bps_total_max: 0,
            bps_total_max_length: 1,
            bps_read: 0,
            bps_read_max: 0,
            bps_read_max_length: 1,
            bps_write: 0,
            bps_write_max: 0,
            bps_write_max_length: 1,
            iops_size: 0,
        }
    }
}

/// QEMU's largest rate and burst length product.
const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One limit: its rate, burst rate and burst length.
#[derive(Clone, Copy, Debug)]
struct Limit {
    avg: u64,
    max: u64,
    max_length: u64,
}

impl ThrottleLimits {
    /// The six limits: iops total, read, write, then bps total, read, write.
    fn limits(&self) -> [Limit; 6] {
        let l = |avg, max, max_length| Limit {
            avg,
            max,
            max_length,
        };
        [
            l(
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            l(
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            l(
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
            l(
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            l(self.bps_read, self.bps_read_max, self.bps_read_max_length),
            l(
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
        ]
    }

    /// Checks the limits as QEMU does, with its texts.
    pub fn check(&self) -> Result<(), Error> {
        let invalid = |t: &str| Err(Error::InvalidOptions(t.into()));
        let l = self.limits();
        let set = |x: &Limit| x.avg != 0 || x.max != 0;
        let conflict = |t: usize| set(&l[t]) && (set(&l[t + 1]) || set(&l[t + 2]));
        if conflict(0) || conflict(3) {
            return invalid(
                "bps/iops/max total values and read/write values cannot be used at the same time",
            );
        }
        if self.iops_size != 0 && !l[..3].iter().any(set) {
            return invalid("iops size requires an iops value to be set");
        }
        for x in &l {
            if x.avg > VALUE_MAX || x.max > VALUE_MAX {
                return invalid("bps/iops/max values must be within [0, 1000000000000000]");
            }
            if x.max_length == 0 {
                return invalid("the burst length cannot be 0");
            }
            if x.max_length > 1 && x.max == 0 {
                return invalid("burst length set without burst rate");
            }
            if x.max != 0 && x.max_length > VALUE_MAX / x.max {
                return invalid("burst length too high for this burst rate");
            }
            if x.max != 0 && x.avg == 0 {
                return invalid("bps_max/iops_max require corresponding bps/iops values");
            }
            if x.max != 0 && x.max < x.avg {
                return invalid("bps_max/iops_max cannot be lower than bps/iops");
            }
        }
        Ok(())
    }
}

/// A leaky bucket, with the levels as of `at` (which may lie ahead of
/// now: the start of the last request reserved).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    limit: Limit,
    level: f64,
    burst_level: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn new(limit: Limit) -> Self {
        Bucket {
            limit,
            level: 0.0,
            burst_level: 0.0,
            at: None,
        }
    }

    /// The levels at `t` (not before `at`).
    fn leaked(&self, t: Instant) -> (f64, f64) {
        let dt = self
            .at
            .map_or(0.0, |at| t.saturating_duration_since(at).as_secs_f64());
        let l = &self.limit;
        (
            (self.level - l.avg as f64 * dt).max(0.0),
            (self.burst_level - l.max as f64 * dt).max(0.0),
        )
    }

    /// How long after `t` a request may start.
    fn wait(&self, t: Instant) -> Duration {
        let l = &self.limit;
        if l.avg == 0 {
            return Duration::ZERO;
        }
        let (level, burst_level) = self.leaked(t);
        let (size, burst_size) = if l.max == 0 {
            (l.avg as f64 / 10.0, 0.0)
        } else {
            ((l.max * l.max_length) as f64, l.max as f64 / 10.0)
        };
        let mut wait = ((level - size) / l.avg as f64).max(0.0);
        if burst_size > 0.0 {
            wait = wait.max((burst_level - burst_size) / l.max as f64);
        }
        Duration::from_secs_f64(wait.max(0.0))
    }

    /// Accounts `cost` at `start`.
    fn account(&mut self, start: Instant, cost: f64) {
        if self.limit.avg == 0 {
            return;
        }
        let (level, burst_level) = self.leaked(start);
        self.level = level + cost;
        self.burst_level = burst_level + cost;
        self.at = Some(self.at.map_or(start, |at| at.max(start)));
    }
}

/// The direction of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read,
    /// Writes, write-zeroes and discards.
    Write,
}

struct Buckets {
    limits: ThrottleLimits,
    /// As [`ThrottleLimits::limits`] orders them.
    buckets: [Bucket; 6],
}

/// A named set of limits shared by throttle nodes.
pub struct ThrottleGroup {
    id: String,
    buckets: Mutex<Buckets>,
}

impl ThrottleGroup {
    /// A group with these limits (checked with [`ThrottleLimits::check`]).
    pub fn new(id: &str, limits: ThrottleLimits) -> Self {
        ThrottleGroup {
            id: id.to_string(),
            buckets: Mutex::new(Buckets {
                limits,
                buckets: limits.limits().map(Bucket::new),
            }),
        }
    }

    /// The group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The limits.
    pub fn limits(&self) -> ThrottleLimits {
        self.buckets.lock().limits
    }

    /// Reserves a request of `bytes` bytes; returns how long it must wait.
    pub fn reserve(&self, direction: Direction, bytes: u64) -> Duration {
        let now = Instant::now();
        let mut b = self.buckets.lock();
        let dir = match direction {
            Direction::Read => 1,
            Direction::Write => 2,
        };
        let size = b.limits.iops_size;
        let ops = if size != 0 && bytes > size {
            bytes as f64 / size as f64
        } else {
            1.0
        };
        let used = [0, dir, 3, 3 + dir];
        // Requests start in order: not before the last one reserved.
        let from = used
            .iter()
            .filter_map(|&i| b.buckets[i].at)
            .fold(now, Instant::max);
        let start = from
            + used
                .iter()
                .map(|&i| b.buckets[i].wait(from))
                .max()
                .unwrap_or_default();
        for i in used {
            let cost = if i < 3 { ops } else { bytes as f64 };
            b.buckets[i].account(start, cost);
        }
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iops_limit_spaces_requests_after_the_burst() {
        let g = ThrottleGroup::new(
            "tg",
            ThrottleLimits {
                iops_total: 100,
                ..Default::default()
            },
        );
        // A tenth of a second of burst: about 10 requests go at once.
        let waits: Vec<Duration> = (0..30).map(|_| g.reserve(Direction::Read, 4096)).collect();
        assert!(waits[..10].iter().all(|w| w.is_zero()), "{waits:?}");
        assert!(waits[29] >= Duration::from_millis(150), "{waits:?}");
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn directions_have_their_own_limits() {
        let g = ThrottleGroup::new(
            "tg",
            ThrottleLimits {
                bps_write: 1 << 20,
                ..Default::default()
            },
        );
        for _ in 0..10 {
            assert!(g.reserve(Direction::Read, 1 << 20).is_zero());
        }
        assert!(g.reserve(Direction::Write, 1 << 20).is_zero());
        assert!(g.reserve(Direction::Write, 1 << 20) >= Duration::from_millis(800));
    }

    #[test]
    fn a_burst_rate_allows_a_longer_burst() {
        let g = ThrottleGroup::new(
            "tg",
            ThrottleLimits {
                iops_total: 100,
                iops_total_max: 1000,
                iops_total_max_length: 2,
                ..Default::default()
            },
        );
        // A tenth of a second at the burst rate goes at once, then the
        // burst rate spaces them, up to 2 s of it (2000 operations).
        let waits: Vec<Duration> = (0..300).map(|_| g.reserve(Direction::Read, 512)).collect();
        assert!(waits[..100].iter().all(|w| w.is_zero()), "{waits:?}");
        let w = waits[299].as_secs_f64();
        assert!((0.15..0.25).contains(&w), "{w}");
    }

    #[test]
    fn large_requests_count_as_several_with_iops_size() {
        let g = ThrottleGroup::new(
            "tg",
            ThrottleLimits {
                iops_total: 10,
                iops_size: 4096,
                ..Default::default()
            },
        );
        // Each 64 KiB request counts as 16: the second waits.
        assert!(g.reserve(Direction::Write, 65536).is_zero());
        assert!(g.reserve(Direction::Write, 65536) >= Duration::from_millis(500));
    }

    #[test]
    fn limits_are_checked_with_qemus_texts() {
        let check = |f: fn(&mut ThrottleLimits)| {
            let mut l = ThrottleLimits::default();
            f(&mut l);
            l.check().map_err(|e| e.to_string())
        };
        assert_eq!(check(|_| {}), Ok(()));
        assert_eq!(
            check(|l| {
                l.iops_total = 10;
                l.iops_total_max = 5
            }),
            Err("bps_max/iops_max cannot be lower than bps/iops".into())
        );
        assert_eq!(
            check(|l| l.bps_write_max = 5),
            Err("bps_max/iops_max require corresponding bps/iops values".into())
        );
        assert_eq!(
            check(|l| {
                l.iops_total = 10;
                l.iops_total_max_length = 5
            }),
            Err("burst length set without burst rate".into())
        );
        assert_eq!(
            check(|l| {
                l.iops_total = 10;
                l.iops_read = 5
            }),
            Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into()
            )
        );
        assert_eq!(
            check(|l| l.bps_read_max_length = 0),
            Err("the burst length cannot be 0".into())
        );
        assert_eq!(
            check(|l| l.iops_total = 1 << 60),
            Err("bps/iops/max values must be within [0, 1000000000000000]".into())
        );
        assert_eq!(
            check(|l| l.iops_size = 4096),
            Err("iops size requires an iops value to be set".into())
        );
        assert_eq!(
            check(|l| {
                l.bps_write = 10;
                l.bps_write_max = 100_000_000_000_000;
                l.bps_write_max_length = 100_000_000
            }),
            Err("burst length too high for this burst rate".into())
        );
    }

    #[test]
    fn unlimited_never_waits() {
        let g = ThrottleGroup::new("tg", ThrottleLimits::default());
        assert!((0..1000).all(|_| g.reserve(Direction::Write, 1 << 30).is_zero()));
    }
}
