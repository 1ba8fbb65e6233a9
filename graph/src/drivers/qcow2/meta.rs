//! The metadata of an open qcow2 image, behind the driver's metadata lock:
//! the L1 table, cached L2 slices and refcount blocks, allocating and
//! freeing host clusters, and writing it all back in an order that keeps
//! the image consistent whenever the process dies:
//!
//! - refcount blocks are written before the L2 tables that point to the
//!   clusters they count (a crash leaks clusters, never shares them);
//! - a new L2 table, and its refcount, are written before the L1 entry
//!   that points to it; a new refcount block, and a flush, before its
//!   table entry (a table entry that could not be written is taken back:
//!   the new table or block is leaked, never used);
//! - a cluster an L2 entry stopped pointing to is unreferenced only after
//!   that L2 table was written.
//!
//! Between the refcount blocks and the L2 tables the file is flushed, so
//! the order also holds across a power loss: once refcount blocks were
//! written, the next L2 table waits for a flush made under the metadata
//! lock (a guest flush's own flush runs without it and may not be done).

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::cache::TableCache;
use super::header::{Header, INCOMPAT_DIRTY};
use super::layout::{
    get_be64, get_refcount, put_be64, set_refcount, Corrupt, Extent, Geometry, L2Entry, COPIED,
    MAX_L1_ENTRIES, MAX_REFTABLE_BYTES, OFFSET_MASK,
};
use crate::buffer::IoBuffer;
use crate::driver::WriteFlags;
use crate::node::Node;

/// I/O on the image file for the metadata layer.
pub struct File<'a> {
    /// The image file's node.
    pub node: &'a Node,
    /// Its request alignment: metadata writes cover whole aligned blocks.
    pub align: u64,
}

impl File<'_> {
    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let buf = IoBuffer::from_vec(vec![0u8; len]);
        self.node.read(offset, &buf).await?;
        Ok(buf.into_vec())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let buf = IoBuffer::from_vec(data);
        self.node.write(offset, &buf, WriteFlags::default()).await
    }

    /// Makes what was written stable.
    pub async fn flush(&self) -> io::Result<()> {
        self.node.flush().await
    }
}

fn corrupt(e: Corrupt) -> io::Error {
    log::error!("qcow2: corrupt image: {}", e.0);
    io::Error::other(format!("qcow2 image is corrupt: {}", e.0))
}

/// A bitmap of the image's directory, for queries (QAPI's
/// Qcow2BitmapInfo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBitmap {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Marked in use (by this process, or by one that did not close it).
    pub in_use: bool,
    /// Recording when stored.
    pub auto: bool,
}

/// Cache sizes, in entries.
#[derive(Clone, Copy, Debug)]
pub struct CacheSizes {
    /// L2 slices.
    pub l2_entries: usize,
    /// Bytes per L2 slice.
    pub l2_slice_size: usize,
    /// Refcount blocks.
    pub refcount_entries: usize,
}

/// The metadata state.
pub struct Meta {
    /// The header as it is on disk.
    pub header: Header,
    /// A copy of it for queries, which do not take the metadata lock.
    published: Arc<Mutex<Header>>,
    /// The bitmaps of the directory as last written, for queries.
    pub(super) published_bitmaps: Arc<Mutex<Vec<StoredBitmap>>>,
    /// Derived sizes.
    pub g: Geometry,
    /// The active L1 table.
    pub(super) l1: Vec<u64>,
    l2: TableCache,
    /// The refcount table.
    pub(super) refcount_table: Vec<u64>,
    refblocks: TableCache,
    /// The first host cluster that may be free.
    free_hint: u64,
    /// One past the last host cluster the image uses or the file holds.
    pub(super) end: u64,
    /// Host ranges to unreference once the L2 tables that pointed to them
    /// are written: (offset, bytes).
    pending_frees: Vec<(u64, u64)>,
    /// Refcount blocks were written since the last flush made under the
    /// metadata lock: an L2 table written next needs a flush first. (A
    /// flush made without the lock, as `flush_image`'s, may still be
    /// running when the next L2 table is written: it does not count.)
    refcounts_unstable: bool,
    policy: Policy,
}

/// How the metadata is written.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// Freed clusters are discarded in the file (pass-discard-request).
    pub pass_discard: bool,
    /// Lazy refcounts: the image is marked dirty while open for writing,
    /// and refcount blocks are not made stable before the L2 tables that
    /// use them (a crash leaves refcounts to repair at the next open).
    pub lazy_refcounts: bool,
}

/// The L2 entries of a run of guest clusters in one L2 table.
pub type Entries = Vec<L2Entry>;

impl Meta {
    /// The metadata of an image whose header, L1 table and refcount table
    /// were read; `file_size` is the image file's size.
    pub fn new(
        header: Header,
        l1: Vec<u64>,
        refcount_table: Vec<u64>,
        file_size: u64,
        sizes: CacheSizes,
        policy: Policy,
    ) -> Meta {
        let g = Geometry::new(&header);
        Meta {
            end: file_size.div_ceil(g.cluster_size),
            refblocks: TableCache::new(g.cluster_size as usize, sizes.refcount_entries),
            l2: TableCache::new(sizes.l2_slice_size, sizes.l2_entries),
            published: Arc::new(Mutex::new(header.clone())),
            published_bitmaps: Arc::default(),
            header,
            g,
            l1,
            refcount_table,
            free_hint: 0,
            pending_frees: Vec::new(),
            refcounts_unstable: false,
            policy,
        }
    }

    /// Moves the end past the last host cluster that has a refcount. The
    /// file may end before clusters the image uses: a crash that kept an
    /// L2 entry and its refcount but lost the growth of the file, a
    /// truncated copy. Allocating from the file's end would hand such a
    /// cluster out a second time (QEMU's allocator reads every refcount).
    /// Reads the refcount blocks whose range reaches past the end, from the
    /// last, until one counts something: usually one.
    pub async fn find_end(&mut self, f: &File<'_>) -> io::Result<()> {
        let cs = self.g.cluster_size;
        let entries = self.g.refcount_block_entries;
        let blocks: Vec<(u64, u64)> = self
            .refcount_table
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u64, e & OFFSET_MASK))
            .filter(|&(_, block)| block != 0)
            .collect();
        // The refcount blocks themselves, wherever they lie.
        if let Some(last) = blocks.iter().map(|&(_, b)| b / cs + 1).max() {
            self.end = self.end.max(last);
        }
        for &(i, block) in blocks.iter().rev() {
            if (i + 1) * entries <= self.end {
                break;
            }
            let data = f.read(block, cs as usize).await?;
            let counted =
                (0..entries).rfind(|&j| get_refcount(&data, self.g.refcount_bits, j) != 0);
            if let Some(j) = counted {
                self.end = self.end.max(i * entries + j + 1);
                break;
            }
        }
        Ok(())
    }

    /// Writes the metadata from now on with `policy` (a reopen changed
    /// it).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The header as last written, shared with queries.
    pub fn published_header(&self) -> Arc<Mutex<Header>> {
        self.published.clone()
    }

    /// The directory's bitmaps as last written, shared with queries.
    pub fn published_bitmaps(&self) -> Arc<Mutex<Vec<StoredBitmap>>> {
        self.published_bitmaps.clone()
    }

    fn slice_entries(&self) -> u64 {
        self.l2.slice_size() as u64 / self.g.l2_entry_bytes
    }

    /// The offset of the L2 slice holding guest cluster `cluster`, if its
    /// L2 table exists; loads it into the cache.
    async fn l2_slice(&mut self, f: &File<'_>, cluster: u64) -> io::Result<Option<u64>> {
        let l1_index = self.g.l1_index(cluster) as usize;
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Ok(None);
        };
        let table = l1_entry & OFFSET_MASK;
        if table == 0 {
            return Ok(None);
        }
        if table & (self.g.cluster_size - 1) != 0 {
            return Err(corrupt(Corrupt(format!(
                "L1 entry {l1_index} points to unaligned offset {table:#x}"
            ))));
        }
        let slice = self.g.l2_index(cluster) / self.slice_entries();
        let offset = table + slice * self.l2.slice_size() as u64;
        if !self.l2.contains(offset) {
            self.make_room_l2(f).await?;
            let data = f.read(offset, self.l2.slice_size()).await?;
            self.l2.insert(offset, data, false);
        }
        Ok(Some(offset))
    }

    /// Evicts an L2 slice if the cache is full; a dirty one is written
    /// after the refcounts it depends on.
    async fn make_room_l2(&mut self, f: &File<'_>) -> io::Result<()> {
        if !self.l2.full() {
            return Ok(());
        }
        if let Some((offset, dirty)) = self.l2.victim() {
            if dirty {
                self.refcounts_before_l2(f).await?;
                self.write_l2(f, offset).await?;
            }
            self.l2.remove(offset);
        }
        Ok(())
    }

    fn entry_at(&mut self, slice: u64, index: u64) -> L2Entry {
        let bytes = self.g.l2_entry_bytes as usize;
        let e = self.l2.get(slice).expect("the slice was just loaded");
        let at = index as usize * bytes;
        L2Entry {
            word: get_be64(&e.data, at),
            bitmap: if bytes == 16 {
                get_be64(&e.data, at + 8)
            } else {
                0
            },
        }
    }

    /// The entries of guest clusters from `cluster` on, at most `count` and
    /// within one L2 slice.
    pub async fn entries(&mut self, f: &File<'_>, cluster: u64, count: u64) -> io::Result<Entries> {
        let slice_entries = self.slice_entries();
        let index = self.g.l2_index(cluster) % slice_entries;
        let n = count.min(slice_entries - index);
        match self.l2_slice(f, cluster).await? {
            None => Ok(vec![L2Entry { word: 0, bitmap: 0 }; n as usize]),
            Some(slice) => Ok((0..n).map(|i| self.entry_at(slice, index + i)).collect()),
        }
    }

    /// What guest `offset` reads from, and for how many bytes (at most
    /// `len`) the same kind of extent continues (data contiguous on the
    /// host, or a whole compressed cluster).
    pub async fn extent(
        &mut self,
        f: &File<'_>,
        offset: u64,
        len: u64,
    ) -> io::Result<(u64, Extent)> {
        let g = self.g;
        let cluster = g.cluster_of(offset);
        let count = (g.in_cluster(offset) + len).div_ceil(g.cluster_size);
        let entries = self.entries(f, cluster, count).await?;
        let mut pos = offset;
        let end = offset + len;
        let mut first: Option<Extent> = None;
        'clusters: for (i, e) in entries.iter().enumerate() {
            let cluster_start = (cluster + i as u64) * g.cluster_size;
            while pos < end && pos < cluster_start + g.cluster_size {
                let sub = (pos - cluster_start) / g.subcluster_size;
                let sub_end = (cluster_start + (sub + 1) * g.subcluster_size).min(end);
                let x = e
                    .extent(&g, if g.extended { sub } else { 0 })
                    .map_err(corrupt)?;
                let x = match x {
                    Extent::Data(h) => Extent::Data(h + (pos - cluster_start) % g.subcluster_size),
                    other => other,
                };
                match first {
                    None => first = Some(x),
                    Some(f) if continues(f, x, pos - offset) => {}
                    Some(_) => break 'clusters,
                }
                if matches!(x, Extent::Compressed(..)) {
                    // One compressed cluster at a time.
                    pos = (cluster_start + g.cluster_size).min(end);
                    break 'clusters;
                }
                pos = sub_end;
            }
        }
        Ok((pos - offset, first.unwrap_or(Extent::Unallocated)))
    }

    /// Sets the L2 entry of guest cluster `cluster`, allocating its L2
    /// table if there is none.
    pub async fn set_entry(&mut self, f: &File<'_>, cluster: u64, e: L2Entry) -> io::Result<()> {
        self.mark_dirty(f).await?;
        let slice = match self.l2_slice(f, cluster).await? {
            Some(s) => s,
            None => {
                self.alloc_l2_table(f, cluster).await?;
                self.l2_slice(f, cluster)
                    .await?
                    .ok_or_else(|| io::Error::other("qcow2: new L2 table not found"))?
            }
        };
        let index = (self.g.l2_index(cluster) % self.slice_entries()) as usize;
        let bytes = self.g.l2_entry_bytes as usize;
        let entry = self.l2.get(slice).expect("the slice was just loaded");
        put_be64(&mut entry.data, index * bytes, e.word);
        if bytes == 16 {
            put_be64(&mut entry.data, index * bytes + 8, e.bitmap);
        }
        entry.dirty = true;
        Ok(())
    }

    /// Allocates the L2 table of guest cluster `cluster`: a zeroed cluster,
    /// written with its refcount before the L1 entry points to it.
    async fn alloc_l2_table(&mut self, f: &File<'_>, cluster: u64) -> io::Result<()> {
        let l1_index = self.g.l1_index(cluster) as usize;
        if l1_index >= self.l1.len() {
            return Err(io::Error::other(format!(
                "qcow2: guest cluster {cluster} is beyond the L1 table"
            )));
        }
        let cs = self.g.cluster_size;
        let table = self.alloc_clusters(f, 1).await?;
        f.write(table, vec![0u8; cs as usize]).await?;
        if self.write_refblocks(f).await? {
            self.flush_file(f).await?;
        }
        let old = std::mem::replace(&mut self.l1[l1_index], table | COPIED);
        if let Err(e) = self.write_l1_entry(f, l1_index).await {
            // Else later writes would go on filling a table the image
            // never points to. The new table is leaked.
            self.l1[l1_index] = old;
            return Err(e);
        }
        Ok(())
    }

    /// Writes the aligned block of the L1 table holding entry `index`.
    async fn write_l1_entry(&mut self, f: &File<'_>, index: usize) -> io::Result<()> {
        let block = f.align.max(8) as usize;
        let per_block = block / 8;
        let first = index / per_block * per_block;
        let mut data = vec![0u8; block];
        for (i, e) in self.l1.iter().skip(first).take(per_block).enumerate() {
            put_be64(&mut data, i * 8, *e);
        }
        f.write(self.header.l1_table_offset + first as u64 * 8, data)
            .await
    }

    async fn write_l2(&mut self, f: &File<'_>, offset: u64) -> io::Result<()> {
        if let Some(e) = self.l2.get(offset) {
            let data = e.data.clone();
            f.write(offset, data).await?;
            if let Some(e) = self.l2.get(offset) {
                e.dirty = false;
            }
        }
        Ok(())
    }

    /// Writes the dirty refcount blocks, stable before any L2 table written
    /// next (unless refcounts are lazy).
    async fn refcounts_before_l2(&mut self, f: &File<'_>) -> io::Result<()> {
        self.write_refblocks(f).await?;
        if self.refcounts_unstable && !self.policy.lazy_refcounts {
            self.flush_file(f).await?;
        }
        Ok(())
    }

    /// Flushes the image file: every refcount block written so far is
    /// stable (they are written under the metadata lock, which the caller
    /// holds, and were waited for).
    async fn flush_file(&mut self, f: &File<'_>) -> io::Result<()> {
        f.flush().await?;
        self.refcounts_unstable = false;
        Ok(())
    }

    /// With lazy refcounts, marks the image dirty (stable) before its
    /// metadata first changes.
    async fn mark_dirty(&mut self, f: &File<'_>) -> io::Result<()> {
        if !self.policy.lazy_refcounts || self.header.incompatible & INCOMPAT_DIRTY != 0 {
            return Ok(());
        }
        self.flush_file(f).await?;
        let mut header = self.header.clone();
        header.incompatible |= INCOMPAT_DIRTY;
        self.write_header(f, header).await?;
        self.flush_file(f).await
    }

    /// Writes everything back and clears the dirty mark, as the image
    /// closes.
    pub async fn close(&mut self, f: &File<'_>) -> io::Result<()> {
        self.flush(f).await?;
        if self.header.incompatible & INCOMPAT_DIRTY != 0 {
            let mut header = self.header.clone();
            header.incompatible &= !INCOMPAT_DIRTY;
            self.write_header(f, header).await?;
            self.flush_file(f).await?;
        }
        Ok(())
    }

    /// Writes every dirty refcount block; whether there was any.
    async fn write_refblocks(&mut self, f: &File<'_>) -> io::Result<bool> {
        let dirty = self.refblocks.dirty();
        for offset in &dirty {
            if let Some(e) = self.refblocks.get(*offset) {
                let data = e.data.clone();
                self.refcounts_unstable = true;
                f.write(*offset, data).await?;
                if let Some(e) = self.refblocks.get(*offset) {
                    e.dirty = false;
                }
            }
        }
        Ok(!dirty.is_empty())
    }

    /// The refcount block covering host cluster `index`, loaded; `None`
    /// if it does not exist (every refcount it would hold is 0).
    async fn refblock(&mut self, f: &File<'_>, index: u64) -> io::Result<Option<u64>> {
        let table_index = (index / self.g.refcount_block_entries) as usize;
        let Some(&entry) = self.refcount_table.get(table_index) else {
            return Ok(None);
        };
        let block = entry & OFFSET_MASK;
        if block == 0 {
            return Ok(None);
        }
        if !self.refblocks.contains(block) {
            if self.refblocks.full() {
                if let Some((victim, dirty)) = self.refblocks.victim() {
                    if dirty {
                        self.write_refblocks(f).await?;
                    }
                    self.refblocks.remove(victim);
                }
            }
            let data = f.read(block, self.g.cluster_size as usize).await?;
            self.refblocks.insert(block, data, false);
        }
        Ok(Some(block))
    }

    /// The refcount of host cluster `index`.
    pub async fn refcount(&mut self, f: &File<'_>, index: u64) -> io::Result<u64> {
        match self.refblock(f, index).await? {
            None => Ok(0),
            Some(block) => {
                let bits = self.g.refcount_bits;
                let i = index % self.g.refcount_block_entries;
                let e = self
                    .refblocks
                    .get(block)
                    .expect("the block was just loaded");
                Ok(get_refcount(&e.data, bits, i))
            }
        }
    }

    /// Sets the refcount of host cluster `index`, creating its refcount
    /// block (and growing the refcount table) if needed.
    pub(super) async fn set_refcount(
        &mut self,
        f: &File<'_>,
        index: u64,
        value: u64,
    ) -> io::Result<()> {
        let max = if self.g.refcount_bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.g.refcount_bits) - 1
        };
        if value > max {
            return Err(io::Error::other(
                "qcow2: refcount overflow (the cluster is referenced too often)",
            ));
        }
        let block = match self.refblock(f, index).await? {
            Some(b) => b,
            None if value == 0 => return Ok(()),
            None => {
                self.new_refblock(f, index).await?;
                self.refblock(f, index)
                    .await?
                    .ok_or_else(|| io::Error::other("qcow2: new refcount block not found"))?
            }
        };
        let bits = self.g.refcount_bits;
        let i = index % self.g.refcount_block_entries;
        let e = self
            .refblocks
            .get(block)
            .expect("the block was just loaded");
        set_refcount(&mut e.data, bits, i, value);
        e.dirty = true;
        if value == 0 {
            self.free_hint = self.free_hint.min(index);
        }
        Ok(())
    }

    /// Creates the refcount block that covers host cluster `index`: a
    /// cluster at the end of the image, counting itself if it lies in its
    /// own range, written before the refcount table points to it.
    async fn new_refblock(&mut self, f: &File<'_>, index: u64) -> io::Result<()> {
        let entries = self.g.refcount_block_entries;
        let table_index = index / entries;
        if table_index as usize >= self.refcount_table.len() {
            self.grow_refcount_table(f, table_index + 1).await?;
            // The growth may have created this very block.
            if self.refcount_table[table_index as usize] & OFFSET_MASK != 0 {
                return Ok(());
            }
        }
        let at = self.end;
        self.end += 1;
        let cs = self.g.cluster_size;
        let mut data = vec![0u8; cs as usize];
        if at / entries == table_index {
            set_refcount(&mut data, self.g.refcount_bits, at % entries, 1);
        }
        self.refcounts_unstable = true;
        f.write(at * cs, data.clone()).await?;
        // The block is stable before the table points to it: a table
        // entry over a block lost in a power cut would count its range
        // (and the block itself) as free.
        self.flush_file(f).await?;
        let t = table_index as usize;
        let old = std::mem::replace(&mut self.refcount_table[t], at * cs);
        if let Err(e) = self.write_refcount_table_entry(f, t).await {
            // Else the range would be counted in a block the image never
            // points to, and read as free once reopened. The new block is
            // leaked.
            self.refcount_table[t] = old;
            return Err(e);
        }
        if self.refblocks.full() {
            if let Some((victim, dirty)) = self.refblocks.victim() {
                if dirty {
                    self.write_refblocks(f).await?;
                }
                self.refblocks.remove(victim);
            }
        }
        self.refblocks.insert(at * cs, data, false);
        if at / entries != table_index {
            // Counted by another block (which may itself be new).
            Box::pin(self.set_refcount(f, at, 1)).await?;
        }
        Ok(())
    }

    async fn write_refcount_table_entry(&mut self, f: &File<'_>, index: usize) -> io::Result<()> {
        let block = f.align.max(8) as usize;
        let per_block = block / 8;
        let first = index / per_block * per_block;
        let mut data = vec![0u8; block];
        for (i, e) in self
            .refcount_table
            .iter()
            .skip(first)
            .take(per_block)
            .enumerate()
        {
            put_be64(&mut data, i * 8, *e);
        }
        f.write(self.header.refcount_table_offset + first as u64 * 8, data)
            .await
    }

    /// Moves the refcount table to a larger area at the end of the image,
    /// with at least `entries` entries, and refcount blocks for that area:
    /// written before the header points to the new table.
    async fn grow_refcount_table(&mut self, f: &File<'_>, entries: u64) -> io::Result<()> {
        let cs = self.g.cluster_size;
        let per_block = self.g.refcount_block_entries;
        let start = self.end;
        // The new table and the blocks that count it (and themselves) lie
        // at [start, start + table + blocks): find sizes that fit.
        let (mut table_clusters, mut blocks) = (0u64, 0u64);
        loop {
            let end = start + table_clusters + blocks;
            let need_entries = entries.max(end.div_ceil(per_block) + 1);
            let t = (need_entries * 8).div_ceil(cs);
            let first_block = start / per_block;
            let last_block = (start + t + blocks).div_ceil(per_block);
            let missing = (first_block..last_block)
                .filter(|b| {
                    self.refcount_table
                        .get(*b as usize)
                        .is_none_or(|e| e & OFFSET_MASK == 0)
                })
                .count() as u64;
            if t == table_clusters && missing == blocks {
                break;
            }
            table_clusters = t;
            blocks = missing;
        }
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            // QEMU's error too: the image could not be opened again.
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let new_len = (table_clusters * cs / 8) as usize;
        let mut table = self.refcount_table.clone();
        table.resize(new_len, 0);
        // Nothing else may be allocated in the new area.
        let area = start..start + table_clusters + blocks;
        self.end = self.end.max(area.end);
        // Lay the missing blocks out after the table, each counting every
        // cluster of the new area that it covers.
        let mut next = start + table_clusters;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for b in (start / per_block)..(area.end.div_ceil(per_block)) {
            if table[b as usize] & OFFSET_MASK != 0 {
                continue;
            }
            table[b as usize] = next * cs;
            new_blocks.push((b, vec![0u8; cs as usize]));
            next += 1;
        }
        for c in area.clone() {
            let b = c / per_block;
            if let Some((_, data)) = new_blocks.iter_mut().find(|(nb, _)| *nb == b) {
                set_refcount(data, self.g.refcount_bits, c % per_block, 1);
            }
        }
        for (b, data) in &new_blocks {
            let at = table[*b as usize];
            self.refcounts_unstable = true;
            f.write(at, data.clone()).await?;
            self.refblocks.insert(at, data.clone(), false);
        }
        // Clusters of the area that existing blocks count.
        for c in area.clone() {
            if !new_blocks.iter().any(|(nb, _)| *nb == c / per_block) {
                Box::pin(self.set_refcount(f, c, 1)).await?;
            }
        }
        self.write_refblocks(f).await?;
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            put_be64(&mut bytes, i * 8, *e);
        }
        f.write(start * cs, bytes).await?;
        self.flush_file(f).await?;
        let old = (
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        );
        let mut header = self.header.clone();
        header.refcount_table_offset = start * cs;
        header.refcount_table_clusters = table_clusters as u32;
        self.write_header(f, header).await?;
        self.refcount_table = table;
        self.pending_frees.push(old);
        Ok(())
    }

    /// Grows the virtual size to `size` (block_resize): a larger L1 table,
    /// if one is needed, is written and stable (with its refcounts) before
    /// the header points to it with the new size; the old table is freed
    /// at the next flush.
    pub async fn grow(&mut self, f: &File<'_>, size: u64) -> io::Result<()> {
        let entries = self.g.l1_entries_for(size);
        if entries > MAX_L1_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The new size is too big for this image's cluster size",
            ));
        }
        let cs = self.g.cluster_size;
        let mut header = self.header.clone();
        let mut grown = None;
        if entries > self.l1.len() as u64 {
            let bytes = (entries * 8).next_multiple_of(cs);
            let at = self.alloc_clusters(f, bytes / cs).await?;
            self.write_refblocks(f).await?;
            let mut l1 = self.l1.clone();
            l1.resize(entries as usize, 0);
            let mut data = vec![0u8; bytes as usize];
            for (i, e) in l1.iter().enumerate() {
                put_be64(&mut data, i * 8, *e);
            }
            f.write(at, data).await?;
            self.flush_file(f).await?;
            let old_bytes = (u64::from(header.l1_size) * 8).next_multiple_of(cs);
            grown = Some((l1, (header.l1_table_offset, old_bytes)));
            header.l1_table_offset = at;
            header.l1_size = entries as u32;
        }
        header.size = size;
        self.write_header(f, header).await?;
        self.flush_file(f).await?;
        if let Some((l1, (old, old_bytes))) = grown {
            self.l1 = l1;
            self.free_later(old, old_bytes);
        }
        self.g = Geometry::new(&self.header);
        Ok(())
    }

    /// Writes a new header over the first cluster's start.
    pub async fn write_header(&mut self, f: &File<'_>, header: Header) -> io::Result<()> {
        let mut bytes = header
            .to_bytes()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let align = f.align.max(1) as usize;
        bytes.resize(bytes.len().div_ceil(align) * align, 0);
        f.write(0, bytes).await?;
        *self.published.lock() = header.clone();
        self.header = header;
        Ok(())
    }

    /// The offset from which no cluster was ever allocated: the file
    /// holds nothing there (it reads as zeroes).
    pub fn end_offset(&self) -> u64 {
        self.end * self.g.cluster_size
    }

    /// Allocates `n` contiguous host clusters (refcount 1); returns the
    /// offset of the first.
    pub async fn alloc_clusters(&mut self, f: &File<'_>, n: u64) -> io::Result<u64> {
        self.mark_dirty(f).await?;
        let mut start = self.free_hint.max(1);
        let mut run = 0;
        let mut i = start;
        // The first free cluster seen: where the next search starts.
        let mut first_free = None;
        // `run` counts the free clusters from `start`.
        while run < n {
            if i >= self.end {
                // Everything from the end on is free.
                break;
            }
            if self.refcount(f, i).await? == 0 {
                first_free.get_or_insert(i);
                run += 1;
            } else {
                run = 0;
                start = i + 1;
            }
            i += 1;
        }
        // Before the refcounts: a new refcount block goes past them.
        self.end = self.end.max(start + n);
        for c in start..start + n {
            self.set_refcount(f, c, 1).await?;
        }
        self.free_hint = match first_free {
            Some(free) if free != start => free,
            _ => start + n,
        };
        Ok(start * self.g.cluster_size)
    }

    /// How many host ranges wait to be unreferenced at the next flush.
    pub fn pending_frees(&self) -> usize {
        self.pending_frees.len()
    }

    /// Unreferences the host range `[offset, offset + len)` once the L2
    /// tables written so far no longer point to it (at the next flush).
    pub fn free_later(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.pending_frees.push((offset, len));
        }
    }

    /// Writes everything back: refcount blocks, then (after a file flush)
    /// L2 tables, then the refcounts of clusters freed meanwhile; ends
    /// with a file flush.
    pub async fn flush(&mut self, f: &File<'_>) -> io::Result<()> {
        self.write_back(f).await?;
        self.flush_file(f).await
    }

    /// [`Meta::flush`] without its final file flush, which the caller
    /// makes (without holding the metadata lock meanwhile).
    pub async fn write_back(&mut self, f: &File<'_>) -> io::Result<()> {
        if self.l2.has_dirty() {
            self.refcounts_before_l2(f).await?;
        } else {
            self.write_refblocks(f).await?;
        }
        for offset in self.l2.dirty() {
            self.write_l2(f, offset).await?;
        }
        if !self.pending_frees.is_empty() {
            // The L2 tables that dropped the clusters are stable before the
            // clusters can be reused (or discarded).
            self.flush_file(f).await?;
        }
        let frees = std::mem::take(&mut self.pending_frees);
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for (offset, len) in frees {
            let cs = self.g.cluster_size;
            let first = offset / cs;
            let last = (offset + len).div_ceil(cs);
            for c in first..last {
                let rc = self.refcount(f, c).await?;
                if rc == 0 {
                    log::warn!("qcow2: freeing cluster {c}, whose refcount is already 0");
                    continue;
                }
                self.set_refcount(f, c, rc - 1).await?;
                if rc == 1 {
                    match freed.last_mut() {
                        Some((o, l)) if *o + *l == c * cs => *l += cs,
                        _ => freed.push((c * cs, cs)),
                    }
                }
            }
        }
        self.write_refblocks(f).await?;
        if self.policy.pass_discard {
            for (offset, len) in freed {
                // Advisory: the clusters are free whatever this does.
                if let Err(e) = f.node.discard(offset, len).await {
                    log::debug!("qcow2: discarding freed clusters: {e}");
                }
            }
        }
        Ok(())
    }
}

/// Whether extent `x`, met `at` bytes after the start of a run that began
/// with `first`, continues that run.
fn continues(first: Extent, x: Extent, at: u64) -> bool {
    match (first, x) {
        (Extent::Data(a), Extent::Data(b)) => a + at == b,
        (Extent::Zero, Extent::Zero) | (Extent::Unallocated, Extent::Unallocated) => true,
        _ => false,
    }
}

/// The L1 table of `entries` entries at `offset`.
pub async fn read_table(f: &File<'_>, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let bytes = f.read(offset, (entries * 8) as usize).await?;
    Ok(bytes.chunks_exact(8).map(|c| get_be64(c, 0)).collect())
}
