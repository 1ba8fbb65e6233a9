//! I/O statistics of the exports (query-blockstats, the metrics endpoint).
//!
//! Each request source (a virtqueue, an NBD connection) counts in a
//! [`SourceStats`] of its own, written by its thread only: a counter is a
//! relaxed load and store of a value no other thread writes, so the hot
//! path takes no lock, does no atomic read-modify-write and shares no
//! written cache line. A query sums the sources of an export
//! ([`IoStats::add`]). Latency histograms (block-latency-histogram-set) are
//! off by default; while on, a source locks its own histogram per request,
//! a lock only a query takes besides.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;
use serde_json::{json, Value};

/// The operation kinds QEMU's BlockDeviceStats counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Reads.
    Read = 0,
    /// Writes, write-zeroes included.
    Write = 1,
    /// Flushes.
    Flush = 2,
    /// Discards.
    Unmap = 3,
}

const KINDS: usize = 4;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Done,
    /// The I/O failed.
    Failed,
    /// It was refused before any I/O (out of range, read-only, ...).
    Invalid,
}

/// One finished request, as a source accounts it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// The operation.
    pub kind: OpKind,
    /// Its offset in bytes (writes: for the highest offset written).
    pub offset: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// How long it took, in nanoseconds.
    pub ns: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A counter written by one thread only.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    fn add(&self, n: u64) {
        // One writer: a load and a store, not a locked read-modify-write.
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    fn max(&self, n: u64) {
        if n > self.0.load(Ordering::Relaxed) {
            self.0.store(n, Ordering::Relaxed);
        }
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct KindCounters {
    operations: Counter,
    bytes: Counter,
    total_time_ns: Counter,
    failed: Counter,
    invalid: Counter,
}

/// The monotonic clock in nanoseconds since the first call.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A latency histogram: bins between boundaries (in nanoseconds), QEMU's
/// BlockLatencyHistogramInfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Increasing boundaries; `bins` has one more entry.
    pub boundaries: Vec<u64>,
    /// Requests per bin.
    pub bins: Vec<u64>,
}

impl Histogram {
    /// An empty histogram with these boundaries.
    pub fn new(boundaries: Vec<u64>) -> Self {
        let bins = vec![0; boundaries.len() + 1];
        Histogram { boundaries, bins }
    }

    fn record(&mut self, ns: u64) {
        let bin = self.boundaries.partition_point(|&b| b <= ns);
        self.bins[bin] += 1;
    }

    fn add(&mut self, other: &Histogram) {
        if self.boundaries != other.boundaries {
            return;
        }
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
    }
}

/// The histograms of one source: one per kind, where set.
type Histograms = [Option<Histogram>; KINDS];

/// The counters of one request source.
#[derive(Default)]
pub struct SourceStats {
    kinds: [KindCounters; KINDS],
    wr_highest_offset: Counter,
    /// When the last request finished ([`now_ns`]), 0 if none did.
    last_done_ns: Counter,
    histograms_on: AtomicBool,
    histograms: Mutex<Histograms>,
}

impl SourceStats {
    /// Counts a request that finished at `now` ([`now_ns`]); called by the
    /// source's own thread.
    pub fn record(&self, s: &Sample, now: u64) {
        let k = &self.kinds[s.kind as usize];
        match s.outcome {
            Outcome::Invalid => return k.invalid.add(1),
            Outcome::Failed => k.failed.add(1),
            Outcome::Done => {
                k.operations.add(1);
                k.bytes.add(s.bytes);
                k.total_time_ns.add(s.ns);
                if s.kind == OpKind::Write {
                    self.wr_highest_offset.max(s.offset + s.bytes);
                }
            }
        }
        self.last_done_ns.max(now);
        if self.histograms_on.load(Ordering::Relaxed) {
            if let Some(h) = &mut self.histograms.lock()[s.kind as usize] {
                h.record(s.ns);
            }
        }
    }

    /// The counters now.
    fn snapshot(&self) -> IoStats {
        let kinds = self.kinds.each_ref().map(|k| KindStats {
            operations: k.operations.get(),
            bytes: k.bytes.get(),
            total_time_ns: k.total_time_ns.get(),
            failed: k.failed.get(),
            invalid: k.invalid.get(),
        });
        IoStats {
            kinds,
            wr_highest_offset: self.wr_highest_offset.get(),
            last_done_ns: self.last_done_ns.get(),
            histograms: self.histograms.lock().clone(),
        }
    }

    /// Sets (or with `None`, removes) the histogram of each kind; counts
    /// start again from zero.
    pub fn set_histograms(&self, boundaries: &Boundaries) {
        let mut h = self.histograms.lock();
        for (slot, b) in h.iter_mut().zip(boundaries) {
            *slot = b.clone().map(Histogram::new);
        }
        self.histograms_on
            .store(h.iter().any(Option::is_some), Ordering::Relaxed);
    }
}

/// Counters of one kind, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Requests that succeeded.
    pub operations: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Their time, in nanoseconds.
    pub total_time_ns: u64,
    /// Requests whose I/O failed.
    pub failed: u64,
    /// Requests refused before any I/O.
    pub invalid: u64,
}

/// An export's statistics: its sources summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Per kind, indexed by [`OpKind`].
    pub kinds: [KindStats; KINDS],
    /// The end of the highest write.
    pub wr_highest_offset: u64,
    /// When the last request finished ([`now_ns`]), 0 if none did.
    pub last_done_ns: u64,
    /// Latency histograms per kind, where set.
    pub histograms: [Option<Histogram>; KINDS],
}

impl IoStats {
    /// Adds a source's counters.
    pub fn add(&mut self, s: &SourceStats) {
        self.merge(&s.snapshot());
    }

    /// Adds another sum.
    pub fn merge(&mut self, other: &IoStats) {
        for (a, b) in self.kinds.iter_mut().zip(&other.kinds) {
            a.operations += b.operations;
            a.bytes += b.bytes;
            a.total_time_ns += b.total_time_ns;
            a.failed += b.failed;
            a.invalid += b.invalid;
        }
        self.wr_highest_offset = self.wr_highest_offset.max(other.wr_highest_offset);
        self.last_done_ns = self.last_done_ns.max(other.last_done_ns);
        for (a, b) in self.histograms.iter_mut().zip(&other.histograms) {
            match (a.as_mut(), b) {
                (Some(a), Some(b)) => a.add(b),
                (None, Some(b)) => *a = Some(b.clone()),
                _ => {}
            }
        }
    }

    /// The counters of `kind`.
    pub fn kind(&self, kind: OpKind) -> &KindStats {
        &self.kinds[kind as usize]
    }

    /// QEMU's BlockDeviceStats.
    pub fn to_qmp(&self) -> Value {
        let [rd, wr, fl, un] = &self.kinds;
        let mut v = json!({
            "rd_bytes": rd.bytes, "wr_bytes": wr.bytes, "unmap_bytes": un.bytes,
            "zone_append_bytes": 0,
            "rd_operations": rd.operations, "wr_operations": wr.operations,
            "flush_operations": fl.operations, "unmap_operations": un.operations,
            "zone_append_operations": 0,
            "rd_total_time_ns": rd.total_time_ns, "wr_total_time_ns": wr.total_time_ns,
            "flush_total_time_ns": fl.total_time_ns, "unmap_total_time_ns": un.total_time_ns,
            "zone_append_total_time_ns": 0,
            "wr_highest_offset": self.wr_highest_offset,
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0, "zone_append_merged": 0,
            "failed_rd_operations": rd.failed, "failed_wr_operations": wr.failed,
            "failed_flush_operations": fl.failed, "failed_unmap_operations": un.failed,
            "failed_zone_append_operations": 0,
            "invalid_rd_operations": rd.invalid, "invalid_wr_operations": wr.invalid,
            "invalid_flush_operations": fl.invalid, "invalid_unmap_operations": un.invalid,
            "invalid_zone_append_operations": 0,
            "account_invalid": true, "account_failed": true,
            "timed_stats": [],
        });
        if self.last_done_ns > 0 {
            v["idle_time_ns"] = json!(now_ns().saturating_sub(self.last_done_ns));
        }
        for (name, h) in ["rd", "wr", "flush", ""].iter().zip(&self.histograms) {
            if let (false, Some(h)) = (name.is_empty(), h) {
                v[format!("{name}_latency_histogram")] =
                    json!({"boundaries": h.boundaries, "bins": h.bins});
            }
        }
        v
    }
}

/// Histogram boundaries per kind, where set.
pub type Boundaries = [Option<Vec<u64>>; KINDS];

#[derive(Default)]
struct SourcesInner {
    live: Vec<Arc<SourceStats>>,
    /// What sources that are gone counted.
    retired: IoStats,
    boundaries: Boundaries,
}

/// The request sources of an export, and what the gone ones counted.
#[derive(Default)]
pub struct Sources {
    inner: Mutex<SourcesInner>,
}

impl Sources {
    /// A new source (a queue, a connection), with the export's histograms.
    pub fn add(&self) -> Arc<SourceStats> {
        let mut inner = self.inner.lock();
        let source = Arc::new(SourceStats::default());
        if inner.boundaries.iter().any(Option::is_some) {
            source.set_histograms(&inner.boundaries);
        }
        inner.live.push(source.clone());
        source
    }

    /// A source is gone: its counts stay in the export's.
    pub fn retire(&self, source: &Arc<SourceStats>) {
        let mut inner = self.inner.lock();
        inner.live.retain(|s| !Arc::ptr_eq(s, source));
        inner.retired.add(source);
    }

    /// Every source summed.
    pub fn sum(&self) -> IoStats {
        let inner = self.inner.lock();
        let mut sum = inner.retired.clone();
        for s in &inner.live {
            sum.add(s);
        }
        sum
    }

    /// Sets the latency histograms of every kind (block-latency-histogram-set);
    /// they count from zero.
    pub fn set_histograms(&self, boundaries: Boundaries) {
        let mut inner = self.inner.lock();
        for s in &inner.live {
            s.set_histograms(&boundaries);
        }
        inner.retired.histograms = Default::default();
        inner.boundaries = boundaries;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: OpKind, offset: u64, bytes: u64, ns: u64, outcome: Outcome) -> Sample {
        Sample {
            kind,
            offset,
            bytes,
            ns,
            outcome,
        }
    }

    #[test]
    fn sources_sum_up() {
        let (a, b) = (SourceStats::default(), SourceStats::default());
        a.record(&sample(OpKind::Read, 0, 4096, 10, Outcome::Done), now_ns());
        b.record(&sample(OpKind::Read, 0, 512, 30, Outcome::Done), now_ns());
        b.record(
            &sample(OpKind::Write, 8192, 4096, 5, Outcome::Done),
            now_ns(),
        );
        a.record(&sample(OpKind::Write, 0, 512, 5, Outcome::Failed), now_ns());
        a.record(&sample(OpKind::Flush, 0, 0, 5, Outcome::Invalid), now_ns());
        let mut sum = IoStats::default();
        sum.add(&a);
        sum.add(&b);
        let rd = sum.kind(OpKind::Read);
        assert_eq!((rd.operations, rd.bytes, rd.total_time_ns), (2, 4608, 40));
        assert_eq!(sum.kind(OpKind::Write).failed, 1);
        assert_eq!(sum.kind(OpKind::Flush).invalid, 1);
        assert_eq!(sum.wr_highest_offset, 12288);
        let q = sum.to_qmp();
        assert_eq!(q["rd_operations"], 2);
        assert_eq!(q["failed_wr_operations"], 1);
        assert!(q["idle_time_ns"].is_u64());
    }

    #[test]
    fn histograms_bin_latencies_and_give_percentiles() {
        let s = SourceStats::default();
        s.record(&sample(OpKind::Read, 0, 1, 5, Outcome::Done), now_ns());
        s.set_histograms(&[Some(vec![10, 100]), None, None, None]);
        for ns in [5, 10, 50, 500] {
            s.record(&sample(OpKind::Read, 0, 1, ns, Outcome::Done), now_ns());
        }
        let mut sum = IoStats::default();
        sum.add(&s);
        let h = sum.histograms[0].as_ref().unwrap();
        assert_eq!(h.bins, vec![1, 2, 1]);
        assert_eq!(
            sum.to_qmp()["rd_latency_histogram"]["bins"],
            json!([1, 2, 1])
        );
        assert!(sum.to_qmp().get("wr_latency_histogram").is_none());
    }
}
