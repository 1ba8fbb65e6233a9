//! Dirty bitmaps: which granules of a node were written since the bitmap
//! was created or cleared.
//!
//! A transaction that changes a bitmap (clear, merge, enable, disable,
//! remove) first opens a journal on it: while it is open, every write
//! records in the journal what the bitmap would have recorded had the
//! transaction never started. Rolling back restores the saved bits plus the
//! journal, so a rollback never loses a bit set by I/O, whatever I/O ran
//! during the transaction.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::bitset::{zeroed_vec, OutOfMemory};

/// Bits recorded while a transaction holds the bitmap.
struct Journal {
    words: Vec<AtomicU64>,
    /// Whether the bitmap recorded when the transaction began.
    recording: bool,
}

/// The state of a bitmap when a transaction began, to roll back to.
pub(crate) struct Saved {
    words: Vec<u64>,
    recording: bool,
}

/// A dirty bitmap of a node.
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    size: u64,
    words: Vec<AtomicU64>,
    recording: AtomicBool,
    journal: ArcSwapOption<Journal>,
    /// Counts journals opened and closed, for [`DirtyBitmap::record`].
    journal_seq: AtomicU64,
    /// Removed by a transaction that has not committed yet: invisible, but
    /// still recording in case it is rolled back.
    hidden: AtomicBool,
    /// Stored in the node's image when the node closes.
    persistent: AtomicBool,
    /// Loaded from an image that was not closed cleanly: its bits are
    /// unknown, it can only be removed.
    inconsistent: AtomicBool,
    /// Loaded from a read-only image: it cannot change.
    readonly: AtomicBool,
    /// Used by a job (a backup's sync bitmap): no one else may use it.
    busy: AtomicBool,
}

/// Why a bitmap cannot be used for an operation (QEMU's texts).
#[derive(Debug, PartialEq, Eq)]
pub enum BitmapUnusable {
    /// Used by a job.
    Busy(String),
    /// Loaded from an image not closed cleanly.
    Inconsistent(String),
    /// Loaded from a read-only image.
    Readonly(String),
}

impl std::fmt::Display for BitmapUnusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BitmapUnusable::Busy(n) => write!(
                f,
                "Bitmap '{n}' is currently in use by another operation and cannot be used"
            ),
            BitmapUnusable::Inconsistent(n) => {
                write!(f, "Bitmap '{n}' is inconsistent and cannot be used")
            }
            BitmapUnusable::Readonly(n) => {
                write!(f, "Bitmap '{n}' is readonly and cannot be modified")
            }
        }
    }
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes; `granularity` is a power of two
    /// of at least 512. Fails if its memory cannot be had (a huge node).
    pub fn new(
        name: &str,
        size: u64,
        granularity: u64,
        recording: bool,
    ) -> Result<Self, OutOfMemory> {
        let bits = size.div_ceil(granularity);
        Ok(DirtyBitmap {
            name: name.to_string(),
            granularity,
            size,
            words: zeroed_words(bits.div_ceil(64))?,
            recording: AtomicBool::new(recording),
            journal: ArcSwapOption::empty(),
            journal_seq: AtomicU64::new(0),
            hidden: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            inconsistent: AtomicBool::new(false),
            readonly: AtomicBool::new(false),
            busy: AtomicBool::new(false),
        })
    }

    /// Whether the bitmap is stored in its node's image.
    pub fn persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    /// Makes the bitmap persistent (or not).
    pub fn set_persistent(&self, on: bool) {
        self.persistent.store(on, Ordering::Release);
    }

    /// Whether the bitmap's bits are unknown (its image was not closed
    /// cleanly).
    pub fn inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    /// Marks the bitmap as loaded from an image not closed cleanly.
    pub(crate) fn mark_inconsistent(&self) {
        self.inconsistent.store(true, Ordering::Release);
    }

    /// Whether the bitmap was loaded from a read-only image.
    pub fn readonly(&self) -> bool {
        self.readonly.load(Ordering::Acquire)
    }

    /// Marks the bitmap as one of a read-only image (loaded from it, or
    /// the image was reopened read-only), or no longer.
    pub(crate) fn set_readonly(&self, readonly: bool) {
        self.readonly.store(readonly, Ordering::Release);
    }

    /// Whether the bitmap may be read (not inconsistent) and, if
    /// `modify`, changed (not read-only either).
    pub fn usable(&self, modify: bool) -> Result<(), BitmapUnusable> {
        if self.busy() {
            return Err(BitmapUnusable::Busy(self.name.clone()));
        }
        if self.inconsistent() {
            return Err(BitmapUnusable::Inconsistent(self.name.clone()));
        }
        if modify && self.readonly() {
            return Err(BitmapUnusable::Readonly(self.name.clone()));
        }
        Ok(())
    }

    /// Whether a job uses the bitmap.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub(crate) fn set_busy(&self, on: bool) {
        self.busy.store(on, Ordering::Release);
    }

    /// Takes the bits out: returns them and leaves the bitmap clean,
    /// recording on (QEMU's successor, for a backup's sync bitmap). Fails,
    /// changing nothing, if the memory cannot be had.
    pub(crate) fn take_words(&self) -> Result<Vec<u64>, OutOfMemory> {
        let mut words = zeroed_vec::<u64>(self.words.len())?;
        for (o, w) in words.iter_mut().zip(&self.words) {
            *o = w.swap(0, Ordering::AcqRel);
        }
        Ok(words)
    }

    /// Sets the bits set in `words` (as [`DirtyBitmap::take_words`] gave
    /// them).
    pub(crate) fn merge_words(&self, words: &[u64]) {
        for (w, o) in self.words.iter().zip(words) {
            w.fetch_or(*o, Ordering::AcqRel);
        }
    }

    /// Size in bytes of the node the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes the bits from `first_bit` (a multiple of 64) on into `out`,
    /// as QEMU stores bitmaps: bit `i` is bit `i % 8` of byte `i / 8`.
    /// Bits past the end of the bitmap are zero.
    pub(crate) fn serialize(&self, first_bit: u64, out: &mut [u8]) {
        let first = (first_bit / 64) as usize;
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let w = self
                .words
                .get(first + i)
                .map_or(0, |w| w.load(Ordering::Acquire));
            chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
        }
    }

    /// Sets the bits that `bytes` (as [`DirtyBitmap::serialize`] wrote
    /// them, from `first_bit`, a multiple of 64) has set; bits past the end
    /// of the bitmap are ignored.
    pub(crate) fn deserialize(&self, first_bit: u64, bytes: &[u8]) {
        let first = (first_bit / 64) as usize;
        let last_bits = self.size.div_ceil(self.granularity) % 64;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let Some(w) = self.words.get(first + i) else {
                break;
            };
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(le);
            if first + i == self.words.len() - 1 && last_bits != 0 {
                v &= (1 << last_bits) - 1;
            }
            w.fetch_or(v, Ordering::AcqRel);
        }
    }

    /// Whether any bit in `[first_bit, first_bit + bits)` is set (both
    /// multiples of 64).
    pub(crate) fn any_bit(&self, first_bit: u64, bits: u64) -> bool {
        let first = (first_bit / 64) as usize;
        let n = bits.div_ceil(64) as usize;
        self.words
            .iter()
            .skip(first)
            .take(n)
            .any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Sets every bit in `[first_bit, first_bit + bits)`.
    pub(crate) fn set_bits(&self, first_bit: u64, bits: u64) {
        let end = (first_bit + bits).min(self.size.div_ceil(self.granularity));
        set_bits(&self.words, first_bit..end);
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
        loop {
            // A transaction that opens or closes a journal meanwhile may
            // have saved or restored the words around this write: then
            // it is recorded again (setting bits twice is harmless).
            let seq = self.journal_seq.load(Ordering::SeqCst);
            // The journal first: a rollback that reads it before this
            // write sets the bitmap also overwrites the bitmap before
            // this write.
            if let Some(journal) = &*self.journal.load() {
                if journal.recording {
                    set_bits(&journal.words, self.bits(offset, len));
                }
            }
            if self.recording() {
                self.set_range(offset, len);
            }
            if self.journal_seq.load(Ordering::SeqCst) == seq {
                break;
            }
        }
    }

    /// Marks `[offset, offset + len)` dirty.
    pub fn set_range(&self, offset: u64, len: u64) {
        set_bits(&self.words, self.bits(offset, len));
    }

    /// Marks the granules of `[offset, offset + len)` clean.
    pub(crate) fn reset_range(&self, offset: u64, len: u64) {
        for bit in self.bits(offset, len) {
            self.words[(bit / 64) as usize].fetch_and(!(1 << (bit % 64)), Ordering::SeqCst);
        }
    }

    /// The first dirty granule at or after `offset` and the dirty run from
    /// its start, at most `max` bytes: (offset, length).
    pub(crate) fn next_dirty_run(&self, offset: u64, max: u64) -> Option<(u64, u64)> {
        let bits = self.size.div_ceil(self.granularity);
        let mut bit = offset / self.granularity;
        while bit < bits {
            let word = self.words[(bit / 64) as usize].load(Ordering::Acquire) >> (bit % 64);
            if word == 0 {
                bit = (bit / 64 + 1) * 64;
                continue;
            }
            bit += u64::from(word.trailing_zeros());
            break;
        }
        if bit >= bits {
            return None;
        }
        let start = bit * self.granularity;
        let limit = start
            .saturating_add(max.max(self.granularity))
            .min(self.size);
        let mut end = start;
        while end < limit && self.get(end / self.granularity) {
            end = ((end / self.granularity + 1) * self.granularity).min(self.size);
        }
        Some((start, end.min(limit) - start))
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

    /// Opens a journal and saves the bitmap's state, before a transaction
    /// changes it; `None` if a journal is open already (the first save of
    /// the transaction is the one to roll back to). Fails, changing
    /// nothing, if the memory for both cannot be had.
    pub(crate) fn begin_journal(&self) -> Result<Option<Saved>, OutOfMemory> {
        if self.journal.load().is_some() {
            return Ok(None);
        }
        let journal = zeroed_words(self.words.len() as u64)?;
        let mut words = zeroed_vec::<u64>(self.words.len())?;
        let recording = self.recording();
        self.journal.store(Some(Arc::new(Journal {
            words: journal,
            recording,
        })));
        self.journal_seq.fetch_add(1, Ordering::SeqCst);
        // Saved after the journal is open: a write in between is in both.
        for (s, w) in words.iter_mut().zip(&self.words) {
            *s = w.load(Ordering::SeqCst);
        }
        Ok(Some(Saved { words, recording }))
    }

    /// Ends the transaction's journal: its changes stay.
    pub(crate) fn commit_journal(&self) {
        self.journal.store(None);
        self.journal_seq.fetch_add(1, Ordering::SeqCst);
    }

    /// Puts back the state saved by [`DirtyBitmap::begin_journal`], plus
    /// everything I/O recorded in the journal since, and closes it.
    pub(crate) fn roll_back(&self, saved: &Saved) {
        self.recording.store(saved.recording, Ordering::SeqCst);
        if let Some(journal) = &*self.journal.load() {
            for ((w, s), j) in self.words.iter().zip(&saved.words).zip(&journal.words) {
                // A write that sets a bit between the journal's read and
                // the store is in the journal by then (it sets the journal
                // first): try again rather than store over it.
                let mut current = w.load(Ordering::SeqCst);
                loop {
                    let want = s | j.load(Ordering::SeqCst);
                    match w.compare_exchange(current, want, Ordering::SeqCst, Ordering::SeqCst) {
                        Ok(_) => break,
                        Err(now) => current = now,
                    }
                }
            }
        }
        self.journal.store(None);
        self.journal_seq.fetch_add(1, Ordering::SeqCst);
        self.hidden.store(false, Ordering::SeqCst);
    }

    /// Whether a transaction removed the bitmap and has not committed yet.
    pub(crate) fn hidden(&self) -> bool {
        self.hidden.load(Ordering::Acquire)
    }

    /// Hides the bitmap until the transaction that removed it commits (it
    /// goes) or rolls back (it is back, with what was recorded meanwhile).
    pub(crate) fn hide(&self) {
        self.hidden.store(true, Ordering::Release);
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

fn zeroed_words(n: u64) -> Result<Vec<AtomicU64>, OutOfMemory> {
    zeroed_vec(usize::try_from(n).unwrap_or(usize::MAX))
}

fn set_bits(words: &[AtomicU64], bits: std::ops::Range<u64>) {
    for bit in bits {
        words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_count_extents() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, true).unwrap();
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
        let saved = b.begin_journal().unwrap().unwrap();
        assert!(b.begin_journal().unwrap().is_none());
        b.clear();
        assert_eq!(b.count(), 0);
        b.roll_back(&saved);
        assert_eq!(b.count(), 65536 * 3);
    }

    #[test]
    fn dirty_runs_and_resets() {
        let g = 65536;
        let b = DirtyBitmap::new("b", 200 * g + 100, g, true).unwrap();
        assert_eq!(b.next_dirty_run(0, u64::MAX), None);
        b.set_range(70 * g, 3 * g);
        b.set_range(200 * g, 1);
        assert_eq!(b.next_dirty_run(0, u64::MAX), Some((70 * g, 3 * g)));
        assert_eq!(
            b.next_dirty_run(71 * g + 5, u64::MAX),
            Some((71 * g, 2 * g))
        );
        assert_eq!(b.next_dirty_run(0, 2 * g), Some((70 * g, 2 * g)));
        assert_eq!(b.next_dirty_run(73 * g, u64::MAX), Some((200 * g, 100)));
        b.reset_range(70 * g, 2 * g);
        assert_eq!(b.next_dirty_run(0, u64::MAX), Some((72 * g, g)));
        b.reset_range(72 * g, g);
        b.reset_range(200 * g, 100);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn a_rollback_keeps_what_io_recorded_during_the_transaction() {
        let b = DirtyBitmap::new("b", 1 << 20, 65536, true).unwrap();
        b.record(0, 1);
        // Clear, a write, roll back: both bits.
        let saved = b.begin_journal().unwrap().unwrap();
        b.clear();
        b.record(65536 * 5, 1);
        b.roll_back(&saved);
        assert_eq!(b.extents(0, 65536 * 6)[0], (65536, true));
        assert_eq!(b.count(), 2 * 65536);
        // Disable, a write, roll back: recording again, and the write in.
        let saved = b.begin_journal().unwrap().unwrap();
        b.set_recording(false);
        b.record(65536 * 7, 1);
        b.roll_back(&saved);
        assert!(b.recording());
        assert!(b.any_dirty(65536 * 7, 1));
        // Enable a disabled bitmap, a write, roll back: not recorded, as
        // if the transaction had not been.
        b.set_recording(false);
        let saved = b.begin_journal().unwrap().unwrap();
        b.set_recording(true);
        b.record(65536 * 9, 1);
        b.roll_back(&saved);
        assert!(!b.recording());
        assert!(!b.any_dirty(65536 * 9, 1));
        // A committed clear stays clear; later writes record.
        b.set_recording(true);
        let _ = b.begin_journal().unwrap().unwrap();
        b.clear();
        b.commit_journal();
        b.record(0, 1);
        assert_eq!(b.count(), 65536);
    }

    #[test]
    fn partial_last_granule_and_merge() {
        let a = DirtyBitmap::new("a", 100_000, 65536, true).unwrap();
        a.record(99_000, 1000);
        assert_eq!(a.count(), 100_000 - 65536);
        let b = DirtyBitmap::new("b", 100_000, 65536, true).unwrap();
        b.record(0, 1);
        assert!(a.compatible(&b));
        a.merge(&b);
        assert_eq!(a.count(), 100_000);
        let fine = DirtyBitmap::new("f", 100_000, 4096, true).unwrap();
        fine.merge(&b);
        assert_eq!(fine.count(), 65536);
    }
}
