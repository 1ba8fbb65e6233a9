//! Throttle groups: I/O limits shared by the throttle nodes that use them.
//!
//! Each limit is a generic cell rate algorithm (a leaky bucket in virtual
//! time): a request is given the earliest start time at which every limit
//! it counts against allows it, and reserves its cost. A limit allows a
//! burst of a tenth of a second of its rate, as QEMU's does by default.
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

/// The limits of a group, in QEMU's ThrottleLimits names (0: no limit).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ThrottleLimits {
    /// Requests per second, reads and writes together.
    #[serde(default)]
    pub iops_total: u64,
    /// Read requests per second.
    #[serde(default)]
    pub iops_read: u64,
    /// Write requests per second.
    #[serde(default)]
    pub iops_write: u64,
    /// Bytes per second, reads and writes together.
    #[serde(default)]
    pub bps_total: u64,
    /// Bytes read per second.
    #[serde(default)]
    pub bps_read: u64,
    /// Bytes written per second.
    #[serde(default)]
    pub bps_write: u64,
}

const BURST: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Default)]
struct Bucket {
    rate: u64,
    /// Theoretical arrival time: when the bucket is empty again.
    tat: Option<Instant>,
}

impl Bucket {
    fn earliest(&self, now: Instant) -> Instant {
        match self.tat {
            Some(tat) if self.rate > 0 => now.max(tat.checked_sub(BURST).unwrap_or(now)),
            _ => now,
        }
    }

    fn reserve(&mut self, start: Instant, cost: u64) {
        if self.rate > 0 {
            let t = Duration::from_secs_f64(cost as f64 / self.rate as f64);
            let tat = self.tat.map_or(start, |tat| tat.max(start));
            self.tat = Some(tat + t);
        }
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
    iops: [Bucket; 3],
    bps: [Bucket; 3],
}

/// A named set of limits shared by throttle nodes.
pub struct ThrottleGroup {
    id: String,
    buckets: Mutex<Buckets>,
}

impl ThrottleGroup {
    /// A group with these limits.
    pub fn new(id: &str, limits: ThrottleLimits) -> Self {
        let bucket = |rate| Bucket { rate, tat: None };
        ThrottleGroup {
            id: id.to_string(),
            buckets: Mutex::new(Buckets {
                limits,
                iops: [
                    bucket(limits.iops_total),
                    bucket(limits.iops_read),
                    bucket(limits.iops_write),
                ],
                bps: [
                    bucket(limits.bps_total),
                    bucket(limits.bps_read),
                    bucket(limits.bps_write),
                ],
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
        let start = [b.iops[0], b.iops[dir], b.bps[0], b.bps[dir]]
            .iter()
            .map(|bucket| bucket.earliest(now))
            .max()
            .unwrap_or(now);
        b.iops[0].reserve(start, 1);
        b.iops[dir].reserve(start, 1);
        b.bps[0].reserve(start, bytes);
        b.bps[dir].reserve(start, bytes);
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
    fn unlimited_never_waits() {
        let g = ThrottleGroup::new("tg", ThrottleLimits::default());
        assert!((0..1000).all(|_| g.reserve(Direction::Write, 1 << 30).is_zero()));
    }
}
