//! A cache of metadata tables (L2 table slices, refcount blocks) by their
//! offset in the image file, with dirty entries written back by the
//! metadata layer in dependency order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes table offsets with a multiply and a fold: a lookup per request
/// should not cost a SipHash. (Offsets are multiples of 512, so the fold
/// brings the product's well-mixed high bits down to the low ones.)
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        let h = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}

type Offsets<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// One cached table (or slice of one).
pub struct Entry {
    /// The table's bytes, as on disk.
    pub data: Vec<u8>,
    /// Changed since it was read or written.
    pub dirty: bool,
    last_use: u64,
}

/// Tables of one kind, at most `capacity` of `slice_size` bytes each.
pub struct TableCache {
    slice_size: usize,
    capacity: usize,
    entries: Offsets<Entry>,
    clock: u64,
}

impl TableCache {
    /// An empty cache.
    pub fn new(slice_size: usize, capacity: usize) -> Self {
        TableCache {
            slice_size,
            capacity: capacity.max(1),
            entries: Offsets::default(),
            clock: 0,
        }
    }

    /// Bytes of one entry.
    pub fn slice_size(&self) -> usize {
        self.slice_size
    }

    /// The cached table at `offset`, marked as just used.
    pub fn get(&mut self, offset: u64) -> Option<&mut Entry> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(&offset)?;
        entry.last_use = clock;
        Some(entry)
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// Whether an entry must go before another can come in.
    pub fn full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// The entry to evict: the least recently used, clean ones first.
    pub fn victim(&self) -> Option<(u64, bool)> {
        self.entries
            .iter()
            .min_by_key(|(_, e)| (e.dirty, e.last_use))
            .map(|(o, e)| (*o, e.dirty))
    }

    /// Adds a table (the caller made room).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.clock += 1;
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty,
                last_use: self.clock,
            },
        );
    }

    /// Drops a table (it was written back, or its cluster was freed).
    pub fn remove(&mut self, offset: u64) -> Option<Entry> {
        self.entries.remove(&offset)
    }

    /// Offsets of the dirty entries, in file order.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any entry is dirty.
    pub fn has_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_clean_least_recently_used_first() {
        let mut c = TableCache::new(512, 3);
        c.insert(0, vec![0; 512], false);
        c.insert(512, vec![0; 512], true);
        c.insert(1024, vec![0; 512], false);
        assert!(c.full());
        c.get(0);
        assert_eq!(c.victim(), Some((1024, false)));
        c.remove(1024);
        c.get(0).unwrap().dirty = true;
        // Only dirty ones left: the least recently used.
        assert_eq!(c.victim(), Some((512, true)));
        assert_eq!(c.dirty(), vec![0, 512]);
    }
}
