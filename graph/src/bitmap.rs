//! Dirty bitmaps: which granules of a node were written since the bitmap
//! was created or cleared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A dirty bitmap of a node.
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    size: u64,
    words: Vec<AtomicU64>,
    recording: AtomicBool,
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes; `granularity` is a power of two
    /// of at least 512.
    pub fn new(name: &str, size: u64, granularity: u64, recording: bool) -> Self {
        let bits = size.div_ceil(granularity);
        DirtyBitmap {
            name: name.to_string(),
            granularity,
            size,
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            recording: AtomicBool::new(recording),
        }
    }

    /// The bitmap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Whether writes are being recorded.
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// Starts or stops recording writes.
    pub fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Release);
    }

    fn bits(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = (offset + len).min(self.size);
        let offset = offset.min(end);
        offset / self.granularity..end.div_ceil(self.granularity)
    }

    fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Marks `[offset, offset + len)` dirty if the bitmap is recording.
    pub fn record(&self, offset: u64, len: u64) {
        if self.recording() {
            self.set_range(offset, len);
        }
    }

    /// Marks `[offset, offset + len)` dirty.
    pub fn set_range(&self, offset: u64, len: u64) {
        for bit in self.bits(offset, len) {
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::AcqRel);
        }
    }

    /// Marks every granule clean.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Bytes marked dirty (QMP's `count`).
    pub fn count(&self) -> u64 {
        let bits: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        let last_partial = self.size % self.granularity;
        let last_bit = self.size.div_ceil(self.granularity).saturating_sub(1);
        let mut bytes = bits * self.granularity;
        if last_partial != 0 && self.get(last_bit) {
            bytes -= self.granularity - last_partial;
        }
        bytes
    }

    /// A copy of the bits, to restore with [`DirtyBitmap::restore`].
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Puts back bits taken with [`DirtyBitmap::snapshot`].
    pub fn restore(&self, words: &[u64]) {
        for (w, v) in self.words.iter().zip(words) {
            w.store(*v, Ordering::Release);
        }
    }

    /// Marks dirty everything dirty in `other` (of the same size, checked
    /// by the caller); granularities may differ.
    pub fn merge(&self, other: &DirtyBitmap) {
        if self.granularity == other.granularity {
            for (w, o) in self.words.iter().zip(&other.words) {
                w.fetch_or(o.load(Ordering::Acquire), Ordering::AcqRel);
            }
            return;
        }
        let mut pos = 0;
        for (len, dirty) in other.extents(0, other.size) {
            if dirty {
                self.set_range(pos, len);
            }
            pos += len;
        }
    }

    /// Whether `other` can be merged into this one (same size).
    pub fn compatible(&self, other: &DirtyBitmap) -> bool {
        self.size == other.size
    }

    /// Whether any byte of `[offset, offset + len)` is dirty.
    pub fn any_dirty(&self, offset: u64, len: u64) -> bool {
        self.bits(offset, len).any(|b| self.get(b))
    }

    /// The runs of `[offset, offset + len)`: (length, dirty), in order.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = (offset + len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let bit = pos / self.granularity;
            let next = ((bit + 1) * self.granularity).min(end);
            let dirty = self.get(bit);
            match out.last_mut() {
                Some((l, d)) if *d == dirty => *l += next - pos,
                _ => out.push((next - pos, dirty)),
            }
            pos = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_count_extents() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, true);
        b.record(1000, 10);
        b.record(65536 * 3, 65537);
        assert_eq!(b.count(), 65536 * 3);
        assert_eq!(
            b.extents(0, 1 << 20),
            vec![
                (65536, true),
                (131072, false),
                (131072, true),
                ((1 << 20) - 5 * 65536, false)
            ]
        );
        assert!(b.any_dirty(65536 * 4, 1));
        assert!(!b.any_dirty(65536, 65536));
        b.set_recording(false);
        b.record(65536 * 10, 1);
        assert_eq!(b.count(), 65536 * 3);
        let saved = b.snapshot();
        b.clear();
        assert_eq!(b.count(), 0);
        b.restore(&saved);
        assert_eq!(b.count(), 65536 * 3);
    }

    #[test]
    fn partial_last_granule_and_merge() {
        let a = DirtyBitmap::new("a", 100_000, 65536, true);
        a.record(99_000, 1000);
        assert_eq!(a.count(), 100_000 - 65536);
        let b = DirtyBitmap::new("b", 100_000, 65536, true);
        b.record(0, 1);
        assert!(a.compatible(&b));
        a.merge(&b);
        assert_eq!(a.count(), 100_000);
        let fine = DirtyBitmap::new("f", 100_000, 4096, true);
        fine.merge(&b);
        assert_eq!(fine.count(), 65536);
    }
}
