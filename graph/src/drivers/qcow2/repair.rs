//! Rebuilding refcounts from what the metadata references, for an image
//! left dirty by a crash with lazy refcounts (QEMU repairs such an image
//! when it opens it for writing, as `qemu-img check -r all` would).

use std::collections::HashMap;
use std::io;

use super::header::INCOMPAT_DIRTY;
use super::layout::{get_be64, COMPRESSED, OFFSET_MASK};
use super::meta::{File, Meta};

/// Counts references per host cluster.
struct References {
    cluster_size: u64,
    counts: HashMap<u64, u64>,
}

impl References {
    /// One reference to every cluster that `[offset, offset + len)` touches.
    fn add(&mut self, offset: u64, len: u64) {
        let cs = self.cluster_size;
        for c in offset / cs..(offset + len).div_ceil(cs) {
            *self.counts.entry(c).or_default() += 1;
        }
    }
}

impl Meta {
    /// Sets every refcount to the number of references the metadata holds
    /// (the header, the L1 and L2 tables and the data they point to, the
    /// refcount structures, and `extra` host ranges such as persistent
    /// bitmaps), then clears the dirty flag. Returns how many refcounts
    /// changed.
    pub async fn rebuild_refcounts(
        &mut self,
        f: &File<'_>,
        extra: &[(u64, u64)],
    ) -> io::Result<u64> {
        let g = self.g;
        let cs = g.cluster_size;
        let mut refs = References {
            cluster_size: cs,
            counts: HashMap::new(),
        };
        refs.add(0, cs);
        refs.add(self.header.l1_table_offset, self.l1.len() as u64 * 8);
        let tables: Vec<u64> = self
            .l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|t| *t != 0)
            .collect();
        for table in tables {
            refs.add(table, cs);
            let data = f.read(table, cs as usize).await?;
            for at in (0..cs as usize).step_by(g.l2_entry_bytes as usize) {
                let word = get_be64(&data, at);
                if word & COMPRESSED != 0 {
                    let (offset, len) = g.compressed(word);
                    refs.add(offset, len);
                } else if word & OFFSET_MASK != 0 {
                    refs.add(word & OFFSET_MASK, cs);
                }
            }
        }
        refs.add(
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        );
        for block in self.refcount_table.iter().map(|e| e & OFFSET_MASK) {
            if block != 0 {
                refs.add(block, cs);
            }
        }
        for &(offset, len) in extra {
            refs.add(offset, len);
        }
        // Every cluster up to the end (of the file, or of what the refcounts
        // count), and those referenced past it: their data was lost with
        // the file's growth, or a hostile image points anywhere, which costs
        // only a refcount each (or the error of a refcount table that would
        // grow too large), not a walk over every cluster up to them. New
        // refcount blocks go past every cluster counted here.
        let end = self.end;
        let mut beyond: Vec<u64> = refs.counts.keys().copied().filter(|&c| c >= end).collect();
        beyond.sort_unstable();
        self.end = self.end.max(beyond.last().map_or(0, |c| c + 1));
        let mut changed = 0;
        for c in (0..end).chain(beyond) {
            let want = refs.counts.get(&c).copied().unwrap_or(0);
            if self.refcount(f, c).await? != want {
                self.set_refcount(f, c, want).await?;
                changed += 1;
            }
        }
        self.flush(f).await?;
        let mut header = self.header.clone();
        header.incompatible &= !INCOMPAT_DIRTY;
        self.write_header(f, header).await?;
        f.flush().await?;
        Ok(changed)
    }
}
