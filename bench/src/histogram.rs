//! A fixed-size log-linear latency histogram.
//!
//! Values (nanoseconds) below `2^SUB_BITS` get one bucket each; above that every power of two
//! is split into `2^SUB_BITS` equal buckets, so a bucket's width is at most `1 / 2^SUB_BITS`
//! (0.8 %) of its values. Memory is constant (about 60 KiB) however many samples are recorded.

/// Bits of sub-bucket resolution per power of two.
const SUB_BITS: u32 = 7;
/// Buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Total number of buckets: the linear range plus `SUB` buckets for each exponent up to 63.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * SUB as usize;

/// Histogram of `u64` samples with bounded relative error.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish()
    }
}

/// Bucket index of `v`.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) - SUB; // 0..SUB
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// Smallest value that falls into bucket `i`.
fn lower_bound(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let group = i / SUB; // >= 1
    let sub = i % SUB;
    let shift = group - 1;
    (SUB + sub) << shift
}

/// Largest value that falls into bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        u64::MAX
    } else {
        lower_bound(i + 1) - 1
    }
}

impl Histogram {
    /// Creates an empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one sample.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += v as u128;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds all samples of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Exact arithmetic mean, or 0 if empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Exact smallest sample, or 0 if empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Exact largest sample, or 0 if empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Value at percentile `p` (0..=100): the smallest sample value `v` such that at least
    /// `p` % of the samples are `<= v`, approximated by the midpoint of its bucket and clamped
    /// to the exact min and max. Returns 0 if empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = lower_bound(i);
                let hi = upper_bound(i);
                let mid = lo + (hi - lo) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_are_consistent() {
        // Every bucket's bounds map back to the bucket, and buckets tile the u64 range.
        for i in 0..BUCKETS {
            assert_eq!(index(lower_bound(i)), i, "lower bound of bucket {i}");
            assert_eq!(index(upper_bound(i)), i, "upper bound of bucket {i}");
            if i > 0 {
                assert_eq!(upper_bound(i - 1) + 1, lower_bound(i));
            }
        }
        assert_eq!(lower_bound(0), 0);
        assert_eq!(upper_bound(BUCKETS - 1), u64::MAX);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn relative_error_is_bounded() {
        let mut v = 1u64;
        while v < u64::MAX / 3 {
            let i = index(v);
            let width = upper_bound(i) - lower_bound(i) + 1;
            assert!(
                (width as f64) <= (v as f64) / (SUB as f64) + 1.0,
                "bucket of {v} is {width} wide"
            );
            v = v * 3 + 1;
        }
    }

    #[test]
    fn empty() {
        let h = Histogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.mean(), 0.0);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 0);
        assert_eq!(h.percentile(50.0), 0);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.mean(), 50.5);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 100);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.percentile(50.0), 50);
        assert_eq!(h.percentile(90.0), 90);
        assert_eq!(h.percentile(99.0), 99);
        assert_eq!(h.percentile(99.9), 100);
        assert_eq!(h.percentile(100.0), 100);
    }

    #[test]
    fn percentiles_of_uniform_large_values() {
        // 1..=1_000_000 ns: percentile p should be about p * 10_000 within 1 %.
        let mut h = Histogram::new();
        for v in 1..=1_000_000u64 {
            h.record(v);
        }
        for p in [1.0, 10.0, 50.0, 90.0, 99.0, 99.9] {
            let want = p * 10_000.0;
            let got = h.percentile(p) as f64;
            assert!(
                (got - want).abs() / want < 0.01,
                "p{p}: got {got}, want {want}"
            );
        }
        assert_eq!(h.percentile(100.0), 1_000_000);
        assert_eq!(h.mean(), 500_000.5);
    }

    #[test]
    fn tail_percentiles_see_outliers() {
        let mut h = Histogram::new();
        for _ in 0..990 {
            h.record(10_000);
        }
        for _ in 0..10 {
            h.record(5_000_000);
        }
        let p50 = h.percentile(50.0);
        assert!((9_900..=10_100).contains(&p50), "p50 {p50}");
        let p99 = h.percentile(99.0);
        assert!((9_900..=10_100).contains(&p99), "p99 {p99}");
        let p999 = h.percentile(99.9);
        assert!((4_950_000..=5_050_000).contains(&p999), "p99.9 {p999}");
        assert_eq!(h.max(), 5_000_000);
    }

    #[test]
    fn merge_equals_recording_together() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        let mut all = Histogram::new();
        for v in 0..5000u64 {
            let x = v * v % 100_003;
            if v % 2 == 0 {
                a.record(x);
            } else {
                b.record(x);
            }
            all.record(x);
        }
        a.merge(&b);
        assert_eq!(a.count(), all.count());
        assert_eq!(a.min(), all.min());
        assert_eq!(a.max(), all.max());
        assert_eq!(a.mean(), all.mean());
        for p in [1.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
            assert_eq!(a.percentile(p), all.percentile(p));
        }
        // Merging an empty histogram changes nothing, including min.
        let before = a.min();
        a.merge(&Histogram::new());
        assert_eq!(a.min(), before);
    }
}
