//! Guest requests on an open qcow2 image.
//!
//! Every request first holds its guest clusters in [`super::ranges`]:
//! reads and writes into clusters the image owns alone share them; writes
//! that allocate, zeroing and discards hold them alone. So two requests
//! never allocate the same cluster, and no cluster is freed, moved or
//! copied while another request reads or writes it. Metadata is looked up
//! and changed under the metadata lock; data moves without it:
//!
//! - a write into owned clusters goes straight to their host clusters;
//! - an allocating write plans each cluster under the lock (allocating new
//!   host clusters in one run), writes the data and the copied-on-write
//!   head and tail without it, one vectored write per contiguous host run,
//!   then points the L2 entries at the new clusters and frees the old ones
//!   once the L2 tables are on disk (see [`super::meta`]).

use std::io;

use super::compress::decompress_cluster;
use super::layout::{
    Extent, Geometry, L2Entry, ALL_ALLOCATED, ALL_ZERO, COMPRESSED, COPIED, OFFSET_MASK, ZERO,
};
use super::meta::File;
use super::Qcow2;
use crate::aio::{join_all, IoFuture};
use crate::buffer::IoBuffer;
use crate::driver::{BlockStatus, WriteFlags};
use crate::node::Node;

/// The most memory segments one vectored write of the file may have (the
/// kernel's UIO_MAXIOV).
const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize;

/// Frees queued by discards and zeroing before the metadata is written
/// back on its own, so a guest that never flushes still reuses space.
const MAX_PENDING_FREES: usize = 4096;

/// What an allocating write does to one guest cluster.
struct ClusterWrite {
    /// The guest cluster's index.
    cluster: u64,
    /// Its entry before the write.
    old: L2Entry,
    /// The host cluster written.
    host: u64,
    /// The bytes of the cluster written: `[lo, hi)`, of which the request's
    /// own are `[ws, we)` and the rest is copied from the old content.
    lo: u64,
    ws: u64,
    we: u64,
    hi: u64,
    /// Its entry after the write.
    new: L2Entry,
    /// Host bytes the old entry held that the new one drops.
    free: Option<(u64, u64)>,
    /// The host cluster was past the end of the file: it reads as zeroes
    /// without being written.
    fresh: bool,
}

impl Qcow2 {
    fn meta_file<'a>(&self, node: &'a Node) -> File<'a> {
        File {
            node,
            align: self.align,
        }
    }

    /// The cluster-aligned guest range around `[offset, offset + len)`.
    fn cluster_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.g.cluster_size;
        (offset / cs * cs, (offset + len).div_ceil(cs) * cs)
    }

    /// Reads guest data.
    pub(super) async fn read_guest(&self, offset: u64, buf: &IoBuffer) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (start, end) = self.cluster_range(offset, buf.len() as u64);
        let _held = self.ranges.lock(start, end, false).await;
        let node = self.file.node();
        let f = self.meta_file(&node);
        let extents = {
            let mut m = self.meta.lock().await;
            let mut out = Vec::new();
            let mut done = 0;
            let len = buf.len() as u64;
            while done < len {
                let (n, x) = m.extent(&f, offset + done, len - done).await?;
                out.push((done, n, x));
                done += n;
            }
            out
        };
        let reads: Vec<IoFuture<'_>> = extents
            .into_iter()
            .map(|(at, n, x)| {
                let part = buf.slice(at as usize, n as usize);
                let node = &node;
                Box::pin(async move { self.read_extent(node, offset + at, x, &part).await })
                    as IoFuture<'_>
            })
            .collect();
        join_all(reads).await.map(|_| ())
    }

    /// Reads guest bytes at `guest` into `part`, which extent `x` covers.
    async fn read_extent(
        &self,
        file: &Node,
        guest: u64,
        x: Extent,
        part: &IoBuffer,
    ) -> io::Result<()> {
        match x {
            Extent::Data(host) => file.read(host, part).await,
            Extent::Zero => {
                part.fill_zero(0, part.len());
                Ok(())
            }
            Extent::Unallocated => self.read_backing(guest, part).await,
            Extent::Compressed(host, len) => {
                let cluster = self.read_compressed(file, host, len).await?;
                let at = self.g.in_cluster(guest) as usize;
                part.copy_from(0, &cluster[at..at + part.len()]);
                Ok(())
            }
        }
    }

    /// Reads what the backing chain has at `guest`: zeroes where there is
    /// no backing file or it is shorter.
    async fn read_backing(&self, guest: u64, part: &IoBuffer) -> io::Result<()> {
        let len = part.len() as u64;
        let inside = match &*self.backing.load() {
            Some(b) => {
                let node = b.node();
                let inside = node.size().saturating_sub(guest).min(len);
                if inside > 0 {
                    node.read(guest, &part.slice(0, inside as usize)).await?;
                }
                inside
            }
            None => 0,
        };
        part.fill_zero(inside as usize, (len - inside) as usize);
        Ok(())
    }

    /// Decompresses the compressed cluster stored at `host` (`len` bytes,
    /// of which those past the end of the file are not there).
    async fn read_compressed(&self, file: &Node, host: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = len.min(file.size().saturating_sub(host));
        let buf = IoBuffer::from_vec(vec![0u8; len as usize]);
        file.read(host, &buf).await?;
        let data = buf.into_vec();
        decompress_cluster(self.g.compression, &data, self.g.cluster_size as usize)
    }

    /// Copies into this image what its backing chain has for the parts of
    /// `[offset, offset + len)` the image does not have (block-stream).
    /// Holds the range alone, so a guest write in between is never
    /// overwritten with older data from below.
    pub(super) async fn populate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = (offset + len).min(self.size.load(std::sync::atomic::Ordering::Acquire));
        if offset >= end {
            return Ok(());
        }
        let (start, held_end) = self.cluster_range(offset, end - offset);
        let _held = self.ranges.lock(start, held_end, true).await;
        let node = self.file.node();
        let f = self.meta_file(&node);
        let mut pos = offset;
        while pos < end {
            let (n, x) = {
                let mut m = self.meta.lock().await;
                m.extent(&f, pos, end - pos).await?
            };
            if x == Extent::Unallocated {
                let buf = IoBuffer::aligned(n as usize, self.align as usize)?;
                self.read_backing(pos, &buf).await?;
                self.write_allocating(pos, n, Some(&buf)).await?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes guest data.
    pub(super) async fn write_guest(&self, offset: u64, buf: &IoBuffer) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let (start, end) = self.cluster_range(offset, len);
        {
            let _held = self.ranges.lock(start, end, false).await;
            if self.write_in_place(offset, buf).await? {
                return Ok(());
            }
        }
        let _held = self.ranges.lock(start, end, true).await;
        self.write_allocating(offset, len, Some(buf)).await
    }

    /// Writes `buf` at `offset` if every cluster it touches is one the
    /// image owns alone and fully allocated; false if it is not so.
    async fn write_in_place(&self, offset: u64, buf: &IoBuffer) -> io::Result<bool> {
        let g = self.g;
        let len = buf.len() as u64;
        let node = self.file.node();
        let f = self.meta_file(&node);
        // (offset in buf, host offset, length) of each host run.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        {
            let mut m = self.meta.lock().await;
            let first = g.cluster_of(offset);
            let last = g.cluster_of(offset + len - 1);
            let mut c = first;
            while c <= last {
                let entries = m.entries(&f, c, last - c + 1).await?;
                for e in entries {
                    if !e.writable_in_place(&g) {
                        return Ok(false);
                    }
                    let cstart = c * g.cluster_size;
                    let from = offset.max(cstart);
                    let to = (offset + len).min(cstart + g.cluster_size);
                    let host = (e.word & OFFSET_MASK) + (from - cstart);
                    match runs.last_mut() {
                        Some((at, h, n)) if *h + *n == host && *at + *n == from - offset => {
                            *n += to - from
                        }
                        _ => runs.push((from - offset, host, to - from)),
                    }
                    c += 1;
                }
            }
        }
        let writes: Vec<IoFuture<'_>> = runs
            .into_iter()
            .map(|(at, host, n)| {
                let part = buf.slice(at as usize, n as usize);
                let node = &node;
                Box::pin(async move { node.write(host, &part, WriteFlags::default()).await })
                    as IoFuture<'_>
            })
            .collect();
        join_all(writes).await?;
        Ok(true)
    }

    /// Writes `len` bytes at `offset` (from `data`, or zeroes), allocating
    /// clusters as needed; the caller holds the range alone.
    async fn write_allocating(
        &self,
        offset: u64,
        len: u64,
        data: Option<&IoBuffer>,
    ) -> io::Result<()> {
        let g = self.g;
        let node = self.file.node();
        let f = self.meta_file(&node);
        let mut plans = Vec::new();
        {
            let mut m = self.meta.lock().await;
            let first = g.cluster_of(offset);
            let last = g.cluster_of(offset + len - 1);
            let mut c = first;
            while c <= last {
                for old in m.entries(&f, c, last - c + 1).await? {
                    plans.push(self.plan(c, old, offset, len));
                    c += 1;
                }
            }
            let needed = plans.iter().filter(|p| p.host == 0).count() as u64;
            if needed > 0 {
                let file_end = m.end_offset();
                let mut next = m.alloc_clusters(&f, needed).await?;
                for p in plans.iter_mut().filter(|p| p.host == 0) {
                    p.host = next;
                    p.new.word |= next;
                    p.fresh = next >= file_end;
                    next += g.cluster_size;
                }
            }
        }
        let written = self.write_planned(&node, &plans, offset, data).await;
        let mut m = self.meta.lock().await;
        if let Err(e) = written {
            // The new clusters go back; the old entries stay.
            for p in plans.iter().filter(|p| p.old.host() != Some(p.host)) {
                m.free_later(p.host, g.cluster_size);
            }
            return Err(e);
        }
        for p in &plans {
            m.set_entry(&f, p.cluster, p.new).await?;
            if let Some((at, n)) = p.free {
                m.free_later(at, n);
            }
        }
        Ok(())
    }

    /// Plans the write of `[offset, offset + len)`'s part in guest cluster
    /// `c`; a host of 0 means a new cluster must be allocated.
    fn plan(&self, c: u64, old: L2Entry, offset: u64, len: u64) -> ClusterWrite {
        let g = self.g;
        let cs = g.cluster_size;
        let cstart = c * cs;
        let ws = offset.max(cstart) - cstart;
        let we = (offset + len).min(cstart + cs) - cstart;
        let owned = old.word & COPIED != 0 && old.word & COMPRESSED == 0 && old.host().is_some();
        let compressed = old.word & COMPRESSED != 0;
        if g.extended && !compressed && (owned || old.host().is_none()) {
            // Only the touched subclusters; those not allocated yet get the
            // rest of their bytes from the old content.
            let unit = g.subcluster_size;
            let (su, eu) = (ws / unit, (we - 1) / unit);
            let allocated = |s: u64| old.bitmap & (1 << s) != 0;
            let lo = if allocated(su) { ws } else { su * unit };
            let hi = if allocated(eu) { we } else { (eu + 1) * unit };
            let mask = ((1u64 << (eu + 1)) - 1) & !((1u64 << su) - 1);
            let bitmap = (old.bitmap | mask) & !(mask << 32);
            let host = if owned { old.word & OFFSET_MASK } else { 0 };
            return ClusterWrite {
                cluster: c,
                old,
                host,
                lo,
                ws,
                we,
                hi,
                new: L2Entry {
                    word: COPIED | host,
                    bitmap,
                },
                free: None,
                fresh: false,
            };
        }
        if owned {
            // A v3 zero cluster that kept its allocation: the rest of it
            // must read as zeroes from now on. (An owned cluster without
            // the flag is here because another cluster of the request
            // needed allocating.)
            let (lo, hi) = if old.word & ZERO != 0 {
                (0, cs)
            } else {
                (ws, we)
            };
            return ClusterWrite {
                cluster: c,
                old,
                host: old.word & OFFSET_MASK,
                lo,
                ws,
                we,
                hi,
                new: L2Entry {
                    word: old.word & !ZERO,
                    bitmap: old.bitmap,
                },
                free: None,
                fresh: false,
            };
        }
        // A new cluster with all of the old content around the write.
        let free = if compressed {
            Some(g.compressed(old.word))
        } else {
            old.host().map(|h| (h, cs))
        };
        ClusterWrite {
            cluster: c,
            old,
            host: 0,
            lo: 0,
            ws,
            we,
            hi: cs,
            new: L2Entry {
                word: COPIED,
                bitmap: if g.extended { ALL_ALLOCATED } else { 0 },
            },
            free,
            fresh: false,
        }
    }

    /// Writes the planned clusters: one vectored write per run of clusters
    /// contiguous on the host.
    async fn write_planned(
        &self,
        file: &Node,
        plans: &[ClusterWrite],
        offset: u64,
        data: Option<&IoBuffer>,
    ) -> io::Result<()> {
        let cs = self.g.cluster_size;
        // (host offset, pieces, their memory segments) of each run.
        let mut runs: Vec<(u64, Vec<IoBuffer>, usize)> = Vec::new();
        let mut run_end = u64::MAX;
        for p in plans {
            // Zeroes around the data of a cluster past the end of the file
            // need not be written.
            let lo = if p.fresh && self.reads_zero(p, p.lo, p.ws)? {
                p.ws
            } else {
                p.lo
            };
            let hi = if p.fresh && self.reads_zero(p, p.we, p.hi)? {
                p.we
            } else {
                p.hi
            };
            let head = self.old_content(file, p, lo, p.ws).await?;
            let tail = self.old_content(file, p, p.we, hi).await?;
            let n = (p.we - p.ws) as usize;
            let own = match data {
                Some(buf) => buf.slice((p.cluster * cs + p.ws - offset) as usize, n),
                None => self.zeroes.slice(0, n),
            };
            let at = p.host + lo;
            let segments = [&head, &own, &tail]
                .iter()
                .map(|b| b.segments().len())
                .sum::<usize>();
            // A vectored write takes at most UIO_MAXIOV segments (more is
            // EINVAL): a run that would have more is cut in two.
            match runs.last_mut() {
                Some((_, pieces, count)) if run_end == at && *count + segments <= MAX_SEGMENTS => {
                    pieces.extend([head, own, tail]);
                    *count += segments;
                }
                _ => runs.push((at, vec![head, own, tail], segments)),
            }
            run_end = p.host + hi;
        }
        let writes: Vec<IoFuture<'_>> = runs
            .into_iter()
            .map(|(at, pieces, _)| {
                let buf = IoBuffer::concat(&pieces);
                Box::pin(async move { file.write(at, &buf, WriteFlags::default()).await })
                    as IoFuture<'_>
            })
            .collect();
        join_all(writes).await.map(|_| ())
    }

    /// Whether bytes `[from, to)` of a planned cluster read as zeroes.
    fn reads_zero(&self, p: &ClusterWrite, from: u64, to: u64) -> io::Result<bool> {
        let unit = self.g.subcluster_size;
        let mut at = from;
        while at < to {
            match old_extent(&self.g, p, at)? {
                Extent::Zero => {}
                Extent::Unallocated if self.backing.load().is_none() => {}
                _ => return Ok(false),
            }
            at = (at / unit + 1) * unit;
        }
        Ok(true)
    }

    /// The old content of bytes `[from, to)` of a planned cluster.
    async fn old_content(
        &self,
        file: &Node,
        p: &ClusterWrite,
        from: u64,
        to: u64,
    ) -> io::Result<IoBuffer> {
        let g = self.g;
        if from == to {
            return Ok(self.zeroes.slice(0, 0));
        }
        if self.reads_zero(p, from, to)? {
            return Ok(self.zeroes.slice(0, (to - from) as usize));
        }
        let guest = p.cluster * g.cluster_size;
        let unit = g.subcluster_size;
        let buf = IoBuffer::from_vec(vec![0u8; (to - from) as usize]);
        let mut at = from;
        while at < to {
            let next = ((at / unit + 1) * unit).min(to);
            let part = buf.slice((at - from) as usize, (next - at) as usize);
            let x = match old_extent(&self.g, p, at)? {
                Extent::Data(h) => Extent::Data(h + at % unit),
                other => other,
            };
            self.read_extent(file, guest + at, x, &part).await?;
            at = next;
        }
        Ok(buf)
    }

    /// Makes `[offset, offset + len)` read as zeroes.
    pub(super) async fn zero_guest(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let g = self.g;
        let (start, end) = self.cluster_range(offset, len);
        let _held = self.ranges.lock(start, end, true).await;
        let unit = if g.version >= 3 {
            g.subcluster_size
        } else {
            g.cluster_size
        };
        // Whole units are zeroed in the metadata, the bytes around them
        // are written.
        let first = offset.div_ceil(unit) * unit;
        let last = (offset + len) / unit * unit;
        if first >= last {
            return self.write_allocating(offset, len, None).await;
        }
        if first > offset {
            self.write_allocating(offset, first - offset, None).await?;
        }
        if offset + len > last {
            self.write_allocating(last, offset + len - last, None)
                .await?;
        }
        if g.version >= 3 {
            self.zero_units(first, last - first, may_unmap).await
        } else if self.backing.load().is_none() && may_unmap {
            self.unmap_clusters(first, last - first, false).await
        } else {
            self.write_allocating(first, last - first, None).await
        }
    }

    /// Sets the zero flag (or bits) of the whole units in
    /// `[offset, offset + len)`, keeping owned clusters allocated unless
    /// `may_unmap`.
    /// Compressed or shared clusters that are only partly zeroed are
    /// rewritten instead.
    async fn zero_units(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let node = self.file.node();
        let f = self.meta_file(&node);
        let mut rewrite: Vec<(u64, u64)> = Vec::new();
        {
            let mut m = self.meta.lock().await;
            let first = g.cluster_of(offset);
            let last = g.cluster_of(offset + len - 1);
            let mut c = first;
            while c <= last {
                for old in m.entries(&f, c, last - c + 1).await? {
                    let cstart = c * cs;
                    let from = offset.max(cstart) - cstart;
                    let to = (offset + len).min(cstart + cs) - cstart;
                    c += 1;
                    match self.zeroed_entry(old, from, to, may_unmap) {
                        Some((new, free)) => {
                            if new != old {
                                m.set_entry(&f, c - 1, new).await?;
                            }
                            if let Some((at, n)) = free {
                                m.free_later(at, n);
                            }
                        }
                        None => rewrite.push((cstart + from, to - from)),
                    }
                }
            }
            self.flush_if_many_frees(&f, &mut m).await?;
        }
        for (at, n) in rewrite {
            self.write_allocating(at, n, None).await?;
        }
        Ok(())
    }

    /// The entry of a (v3) cluster whose whole units `[from, to)` now read
    /// as zeroes, and the host bytes it drops; `None` if the cluster must
    /// be rewritten instead (compressed or shared, and only partly zeroed).
    fn zeroed_entry(
        &self,
        old: L2Entry,
        from: u64,
        to: u64,
        may_unmap: bool,
    ) -> Option<(L2Entry, Option<(u64, u64)>)> {
        let g = self.g;
        let cs = g.cluster_size;
        let whole = from == 0 && to == cs;
        let compressed = old.word & COMPRESSED != 0;
        let host = old.host();
        let owned = old.word & COPIED != 0 && host.is_some();
        let dropped = if compressed {
            Some(g.compressed(old.word))
        } else {
            host.map(|h| (h, cs))
        };
        if compressed || (host.is_some() && !owned) {
            // Nothing of the cluster may stay: zero all of it or rewrite.
            let zero = if g.extended {
                L2Entry {
                    word: 0,
                    bitmap: ALL_ZERO,
                }
            } else {
                L2Entry {
                    word: ZERO,
                    bitmap: 0,
                }
            };
            return whole.then_some((zero, dropped));
        }
        if g.extended {
            let unit = g.subcluster_size;
            let (su, eu) = (from / unit, to / unit);
            let mask = if eu >= 64 { u64::MAX } else { (1u64 << eu) - 1 } & !((1u64 << su) - 1);
            let bitmap = (old.bitmap & !mask) | (mask << 32);
            if bitmap == ALL_ZERO && may_unmap {
                return Some((
                    L2Entry {
                        word: 0,
                        bitmap: ALL_ZERO,
                    },
                    dropped,
                ));
            }
            return Some((
                L2Entry {
                    word: old.word,
                    bitmap,
                },
                None,
            ));
        }
        if owned && !may_unmap {
            return Some((
                L2Entry {
                    word: old.word | ZERO,
                    bitmap: 0,
                },
                None,
            ));
        }
        Some((
            L2Entry {
                word: ZERO,
                bitmap: 0,
            },
            dropped,
        ))
    }

    /// Unreferences the whole clusters in `[offset, offset + len)`: they
    /// read as zeroes (v3 with a backing file, so the backing file stays
    /// hidden, when `zero`) or from the backing chain.
    async fn unmap_clusters(&self, offset: u64, len: u64, zero: bool) -> io::Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let node = self.file.node();
        let f = self.meta_file(&node);
        let mut m = self.meta.lock().await;
        let first = offset.div_ceil(cs);
        let end = (offset + len) / cs;
        let mut c = first;
        while c < end {
            for old in m.entries(&f, c, end - c).await? {
                let new = match (zero, g.extended) {
                    (true, true) => L2Entry {
                        word: 0,
                        bitmap: ALL_ZERO,
                    },
                    (true, false) => L2Entry {
                        word: ZERO,
                        bitmap: 0,
                    },
                    (false, _) => L2Entry { word: 0, bitmap: 0 },
                };
                if new != old {
                    m.set_entry(&f, c, new).await?;
                    if old.word & COMPRESSED != 0 {
                        let (at, n) = g.compressed(old.word);
                        m.free_later(at, n);
                    } else if let Some(h) = old.host() {
                        m.free_later(h, cs);
                    }
                }
                c += 1;
            }
        }
        self.flush_if_many_frees(&f, &mut m).await
    }

    async fn flush_if_many_frees(&self, f: &File<'_>, m: &mut super::meta::Meta) -> io::Result<()> {
        if m.pending_frees() > MAX_PENDING_FREES {
            m.flush(f).await?;
        }
        Ok(())
    }

    /// Deallocates the whole clusters in `[offset, offset + len)`; the
    /// bytes around them are left as they are (a discard is advisory).
    pub(super) async fn discard_guest(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = self.cluster_range(offset, len);
        let _held = self.ranges.lock(start, end, true).await;
        // With a backing file, a discarded cluster must not show the
        // backing file's data where v3 can say "zeroes".
        let zero = self.backing.load().is_some() && self.g.version >= 3;
        self.unmap_clusters(offset, len, zero).await
    }

    /// Writes the metadata back and marks the image clean, as it closes.
    pub(super) async fn close_image(&self) -> io::Result<()> {
        let node = self.file.node();
        let f = self.meta_file(&node);
        let mut m = self.meta.lock().await;
        m.close(&f).await
    }

    /// Writes the metadata back and flushes the file.
    pub(super) async fn flush_image(&self) -> io::Result<()> {
        let node = self.file.node();
        let f = self.meta_file(&node);
        self.meta.lock().await.write_back(&f).await?;
        // Requests go on while the file is flushed: what they change
        // after the write-back is for the next flush.
        f.flush().await
    }

    /// The state of the guest range starting at `offset`.
    pub(super) async fn status(&self, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let node = self.file.node();
        let f = self.meta_file(&node);
        let (n, x) = {
            let mut m = self.meta.lock().await;
            m.extent(&f, offset, len).await?
        };
        let own = |data: bool| BlockStatus {
            len: n,
            data,
            zero: !data,
            depth: 1,
        };
        Ok(match x {
            Extent::Data(_) | Extent::Compressed(..) => own(true),
            Extent::Zero => own(false),
            Extent::Unallocated => {
                let below = match &*self.backing.load() {
                    Some(b) => {
                        let node = b.node();
                        let size = node.size();
                        if offset < size {
                            let st = node.block_status(offset, n.min(size - offset)).await?;
                            Some(BlockStatus {
                                depth: if st.depth == 0 { 0 } else { st.depth + 1 },
                                ..st
                            })
                        } else {
                            // Past the end of a shorter backing file: zeroes,
                            // which QEMU counts as allocated in the backing
                            // layer (bdrv_co_common_block_status_above).
                            Some(BlockStatus {
                                len: n,
                                data: false,
                                zero: true,
                                depth: 2,
                            })
                        }
                    }
                    None => None,
                };
                below.unwrap_or(BlockStatus {
                    len: n,
                    data: false,
                    zero: true,
                    depth: 0,
                })
            }
        })
    }
}

/// What byte `at` of a planned cluster read before the write.
fn old_extent(g: &Geometry, p: &ClusterWrite, at: u64) -> io::Result<Extent> {
    let sub = if g.extended {
        at / g.subcluster_size
    } else {
        0
    };
    p.old.extent(g, sub).map_err(|e| io::Error::other(e.0))
}
