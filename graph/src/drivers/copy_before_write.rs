//! The `copy-before-write` filter: before a guest write, write-zeroes or
//! discard changes a cluster of its `file` child for the first time, the
//! old data is copied to `target`; its snapshot API serves the
//! point-in-time view to a `snapshot-access` node.
//!
//! State, as in QEMU (one lock over all of it): a copy bitmap (clusters
//! still to copy), an access bitmap (clusters the snapshot may read), a done
//! bitmap (clusters copied to the target, read from there), clusters being
//! copied, and the list of snapshot reads in progress from `file` (frozen
//! reads). A cluster is copied at most once; guest writes wait for their
//! copy and for frozen reads of their range; snapshot reads never wait.
//! A copy that outlives its guest write (`cbw-timeout`) is counted, and the
//! driver's drain waits for it. Claims on clusters and frozen reads are
//! released even when the request that took them is dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;

use crate::aio::{race, sleep, spawn_detached, Either};
use crate::bitset::Bitset;
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, BlockStatus, ChildRole, IoFuture, WriteFlags, ZeroFlags};
use crate::error::Error;
use crate::node::Child;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;
use crate::permission::Permission;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry {
    name: "copy-before-write",
    open,
};

/// Smallest cluster: QEMU's block-copy default.
const MIN_CLUSTER: u64 = 64 << 10;
/// Largest single copy, as QEMU's block-copy tasks.
const MAX_COPY: u64 = 1 << 20;

/// What a failed copy does.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum OnCbwError {
    /// The guest write fails; the snapshot stays valid.
    #[default]
    BreakGuestWrite,
    /// The guest write goes on; the snapshot becomes invalid.
    BreakSnapshot,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BitmapRef {
    node: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CbwOptions {
    #[serde(default)]
    bitmap: Option<BitmapRef>,
    #[serde(default)]
    on_cbw_error: OnCbwError,
    #[serde(default)]
    cbw_timeout: u32,
    #[serde(default)]
    min_cluster_size: u64,
}

struct State {
    copy: Bitset,
    access: Bitset,
    done: Bitset,
    copying: Bitset,
    /// Snapshot reads from `file` in progress: (id, start, end).
    frozen: Vec<(u64, u64, u64)>,
    next_frozen: u64,
    error: Option<io::Error>,
    waiters: Vec<Waker>,
    clusters_copied: u64,
    /// Copies running on after their guest write moved on.
    detached: usize,
}

impl State {
    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }
}

struct Inner {
    file: Arc<Child>,
    target: Arc<Child>,
    cluster: u64,
    size: u64,
    on_error: OnCbwError,
    timeout: Duration,
    state: Mutex<State>,
    events: Option<crate::EventSink>,
    node_name: String,
}

struct CopyBeforeWrite(Arc<Inner>);

fn open(
    ctx: &mut OpenContext<'_, '_>,
    mut options: Options,
) -> Result<Box<dyn BlockDriver>, Error> {
    let file = ctx.required_child(&mut options, ChildRole::File)?;
    let target = ctx.required_child(&mut options, ChildRole::Target)?;
    let opts: CbwOptions = options.parse("")?;
    if opts.min_cluster_size != 0 && !opts.min_cluster_size.is_power_of_two() {
        return Err(Error::InvalidOptions(
            "min-cluster-size needs to be a power of 2".into(),
        ));
    }
    let size = file.node().size();
    if target.node().size() < size {
        return Err(Error::OpenFailed(format!(
            "Cannot create block-copy-state: the target ({} bytes) is smaller than the source ({size} bytes)",
            target.node().size()
        )));
    }
    let cluster = MIN_CLUSTER.max(opts.min_cluster_size);
    let clusters = usize::try_from(size.div_ceil(cluster)).unwrap_or(usize::MAX);
    // One bit per cluster in each of four sets: a huge source is an error,
    // not an abort.
    let bits = |value: bool| {
        Bitset::try_new(clusters, value).map_err(|e| {
            Error::OpenFailed(format!(
                "Cannot create block-copy-state for {clusters} clusters of {cluster} bytes: {e}"
            ))
        })
    };
    let copy = match &opts.bitmap {
        None => bits(true)?,
        Some(r) => {
            let node = ctx.node(&r.node)?;
            let bitmap = node.bitmap(&r.name).ok_or_else(|| {
                Error::OpenFailed(format!(
                    "Dirty bitmap '{}' not found on node '{}'",
                    r.name, r.node
                ))
            })?;
            if node.size() != size {
                return Err(Error::OpenFailed(format!(
                    "Bitmap '{}' has a size different from the source",
                    r.name
                )));
            }
            let mut copy = bits(false)?;
            for c in 0..clusters {
                copy.set(c, bitmap.any_dirty(c as u64 * cluster, cluster));
            }
            copy
        }
    };
    let state = State {
        access: copy.clone(),
        done: bits(false)?,
        copying: bits(false)?,
        copy,
        frozen: Vec::new(),
        next_frozen: 0,
        error: None,
        waiters: Vec::new(),
        clusters_copied: 0,
        detached: 0,
    };
    let inner = Inner {
        file,
        target,
        cluster,
        size,
        on_error: opts.on_cbw_error,
        timeout: Duration::from_secs(u64::from(opts.cbw_timeout)),
        state: Mutex::new(state),
        events: ctx.events(),
        node_name: ctx.node_name().to_string(),
    };
    Ok(Box::new(CopyBeforeWrite(Arc::new(inner))))
}

/// A future that completes when `ready` holds for the state.
struct WaitUntil<'a, F: Fn(&State) -> bool> {
    inner: &'a Inner,
    ready: F,
}

impl<F: Fn(&State) -> bool> Future for WaitUntil<'_, F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.inner.state.lock();
        if (self.ready)(&s) {
            Poll::Ready(())
        } else {
            s.waiters.push(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Clusters claimed for copying: released (back to be copied) if the copy
/// does not finish, e.g. because its future was dropped.
struct Claim<'a> {
    inner: &'a Inner,
    run: std::ops::Range<usize>,
    copied: Option<bool>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.inner.state.lock();
        for i in self.run.clone() {
            s.copying.set(i, false);
            if self.copied == Some(true) {
                s.done.set(i, true);
                s.clusters_copied += 1;
            } else {
                s.copy.set(i, true);
            }
        }
        s.wake_all();
    }
}

/// A snapshot read from `file` in progress; it ends when dropped.
struct Frozen<'a> {
    inner: &'a Inner,
    id: Option<u64>,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut s = self.inner.state.lock();
            s.frozen.retain(|f| f.0 != id);
            s.wake_all();
        }
    }
}

/// A copy running on its own: counted until it ends.
struct Detached(Arc<Inner>);

impl Detached {
    fn start(inner: &Arc<Inner>) -> Self {
        inner.state.lock().detached += 1;
        Detached(inner.clone())
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.detached -= 1;
        s.wake_all();
    }
}

impl Inner {
    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = (offset + len).min(self.size);
        (offset / self.cluster) as usize..end.div_ceil(self.cluster) as usize
    }

    /// Copies clusters `run` from `file` to `target` in one read and one
    /// write.
    async fn copy_clusters(&self, run: std::ops::Range<usize>) -> io::Result<()> {
        let start = run.start as u64 * self.cluster;
        let end = (run.end as u64 * self.cluster).min(self.size);
        let len = (end - start) as usize;
        let buf = IoBuffer::aligned(len, 4096)?;
        self.file.node().read(start, &buf).await?;
        self.target
            .node()
            .write(start, &buf, WriteFlags::default())
            .await
    }

    /// Copies every cluster of the range still to copy, in runs of up to
    /// 1 MiB; a cluster being copied by another request is waited for (and
    /// copied again here if that copy failed).
    async fn copy_range(&self, clusters: std::ops::Range<usize>) -> io::Result<()> {
        let max_run = (MAX_COPY / self.cluster).max(1) as usize;
        let mut c = clusters.start;
        while c < clusters.end {
            let run = {
                let mut s = self.state.lock();
                if s.copying.get(c) {
                    None
                } else if !s.copy.get(c) {
                    c += 1;
                    continue;
                } else {
                    let mut e = c;
                    while e < clusters.end && e - c < max_run && s.copy.get(e) && !s.copying.get(e)
                    {
                        s.copy.set(e, false);
                        s.copying.set(e, true);
                        e += 1;
                    }
                    Some(c..e)
                }
            };
            let Some(run) = run else {
                WaitUntil {
                    inner: self,
                    ready: |s: &State| !s.copying.get(c),
                }
                .await;
                continue;
            };
            let mut claim = Claim {
                inner: self,
                run: run.clone(),
                copied: None,
            };
            let result = self.copy_clusters(run.clone()).await;
            claim.copied = Some(result.is_ok());
            drop(claim);
            result?;
            c = run.end;
        }
        Ok(())
    }

    fn broken(&self) -> bool {
        self.state.lock().error.is_some()
    }

    fn break_snapshot(&self, error: &io::Error) {
        let mut s = self.state.lock();
        if s.error.is_none() {
            s.error = Some(io::Error::new(error.kind(), error.to_string()));
            drop(s);
            log::warn!(
                "copy-before-write '{}': snapshot broken: {error}",
                self.node_name
            );
            if let Some(events) = &self.events {
                events(
                    crate::SNAPSHOT_BROKEN_EVENT,
                    json!({"node-name": self.node_name, "error": error.to_string()}),
                );
            }
        }
    }

    /// Waits until no snapshot read from `file` overlaps the range.
    async fn wait_frozen(&self, offset: u64, len: u64) {
        let end = offset + len;
        WaitUntil {
            inner: self,
            ready: |s: &State| !s.frozen.iter().any(|&(_, a, b)| a < end && offset < b),
        }
        .await
    }

    fn status_info(&self) -> serde_json::Value {
        let s = self.state.lock();
        json!({
            "snapshot-valid": s.error.is_none(),
            "snapshot-error": s.error.as_ref().map(|e| e.to_string()),
            "cluster-size": self.cluster,
            "clusters-copied": s.clusters_copied,
            "clusters-to-copy": s.copy.count_ones(),
            "target-bytes": s.done.count_both(&s.access) as u64 * self.cluster,
        })
    }

    /// Checks access and takes the run of `[offset, end)` with one done
    /// state; registers a frozen read when it is read from `file`.
    fn begin_snapshot_op(&self, offset: u64, end: u64) -> io::Result<(u64, bool, Frozen<'_>)> {
        let mut s = self.state.lock();
        let eacces = || io::Error::from_raw_os_error(libc::EACCES);
        if s.error.is_some() {
            return Err(eacces());
        }
        if self
            .clusters(offset, end - offset)
            .any(|c| !s.access.get(c))
        {
            return Err(eacces());
        }
        let first = (offset / self.cluster) as usize;
        let done = s.done.get(first);
        let mut run_end = offset;
        for c in self.clusters(offset, end - offset) {
            if s.done.get(c) != done {
                break;
            }
            run_end = ((c as u64 + 1) * self.cluster).min(end);
        }
        let frozen = if done {
            None
        } else {
            let id = s.next_frozen;
            s.next_frozen += 1;
            s.frozen.push((id, offset, end));
            Some(id)
        };
        let frozen = Frozen {
            inner: self,
            id: frozen,
        };
        Ok((run_end - offset, done, frozen))
    }
}

impl CopyBeforeWrite {
    /// The copy-before-write operation for a guest change of the range.
    async fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let inner = &self.0;
        if !inner.broken() {
            let clusters = inner.clusters(offset, len);
            let result = if inner.timeout.is_zero() {
                inner.copy_range(clusters).await
            } else {
                // The copy cannot be stopped halfway: on timeout it goes on
                // in the background and the guest request moves on.
                let running = Detached::start(inner);
                let copy = spawn_detached(async move {
                    let inner = &running.0;
                    inner.copy_range(clusters).await
                });
                match copy {
                    Ok(copy) => match race(copy, sleep(inner.timeout)).await {
                        Either::Left(r) => r,
                        Either::Right(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                    },
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = result {
                match inner.on_error {
                    OnCbwError::BreakGuestWrite => return Err(e),
                    OnCbwError::BreakSnapshot => inner.break_snapshot(&e),
                }
            }
        }
        inner.wait_frozen(offset, len).await;
        Ok(())
    }
}

impl BlockDriver for CopyBeforeWrite {
    fn size(&self) -> u64 {
        self.0.size
    }

    fn filtered_child(&self) -> Option<&Arc<Child>> {
        Some(&self.0.file)
    }

    /// Nobody may write the source past the filter; the target is written
    /// and read by the filter and may not be resized.
    fn child_perm(
        &self,
        role: ChildRole,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        if role == ChildRole::Target {
            (
                Permission::CONSISTENT_READ | Permission::WRITE,
                Permission::ALL & !Permission::RESIZE,
            )
        } else {
            (
                perm | Permission::CONSISTENT_READ,
                shared & !(Permission::WRITE | Permission::RESIZE),
            )
        }
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.before_write(offset, buf.len() as u64).await?;
            self.0.file.node().write(offset, buf, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.0.file.node().discard(offset, len).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.0.file.node().write_zeroes(offset, len, flags).await
        })
    }

    fn snapshot_read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(async move {
            let inner = &self.0;
            let end = offset + buf.len() as u64;
            let mut pos = offset;
            while pos < end {
                let (run, done, frozen) = inner.begin_snapshot_op(pos, end)?;
                let part = buf.slice((pos - offset) as usize, run as usize);
                let result = if done {
                    inner.target.node().read(pos, &part).await
                } else {
                    inner.file.node().read(pos, &part).await
                };
                drop(frozen);
                result?;
                pos += run;
            }
            Ok(())
        })
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let inner = &self.0;
            let (run, done, frozen) = inner.begin_snapshot_op(offset, offset + len)?;
            let result = if done {
                inner.target.node().block_status(offset, run).await
            } else {
                inner.file.node().block_status(offset, run).await
            };
            drop(frozen);
            result
        })
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            let inner = &self.0;
            // Inward: only whole clusters leave the snapshot.
            let start = offset.div_ceil(inner.cluster) * inner.cluster;
            let end = ((offset + len) / inner.cluster * inner.cluster).max(start);
            if start == end {
                return Ok(());
            }
            {
                let mut s = inner.state.lock();
                for c in (start / inner.cluster) as usize..(end / inner.cluster) as usize {
                    s.access.set(c, false);
                    s.copy.set(c, false);
                }
            }
            inner
                .target
                .node()
                .discard(start, end.min(inner.size) - start)
                .await
        })
    }

    fn snapshot_info(&self) -> Option<serde_json::Value> {
        Some(self.0.status_info())
    }

    /// Waits for the copies that outlived their guest writes.
    fn drain(&self) -> IoFuture<'_> {
        Box::pin(async move {
            WaitUntil {
                inner: &self.0,
                ready: |s: &State| s.detached == 0,
            }
            .await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use crate::aio::block_on;
    use crate::{DirtyBitmap, Graph, IoBuffer, Options, WriteFlags};

    const MIB: u64 = 1 << 20;

    fn opts(v: serde_json::Value) -> Options {
        Options::from_json(v).unwrap()
    }

    /// source (64 MiB, patterns of image-fleecing), temp (raw), CBW, access.
    fn fleecing(dir: &Path, cbw_extra: serde_json::Value, bitmap: bool) -> Graph {
        let src = dir.join("src.raw");
        let tmp = dir.join("tmp.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 * MIB).unwrap();
        std::fs::File::create(&tmp)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let g = Graph::new();
        g.add(opts(
            serde_json::json!({"driver": "raw", "node-name": "source", "discard": "unmap",
            "file": {"driver": "file", "filename": src, "discard": "unmap"}}),
        ))
        .unwrap();
        let source = g.find("source").unwrap();
        if bitmap {
            source.add_bitmap(std::sync::Arc::new(
                DirtyBitmap::new("b0", 64 * MIB, 65536, true).unwrap(),
            ));
        }
        for (byte, off) in [
            (0x5d, 0),
            (0xd5, MIB),
            (0xdc, 32 * MIB),
            (0xcd, 64 * MIB - 65536),
        ] {
            write(&g, "source", off, 65536, byte).unwrap();
        }
        g.add(opts(
            serde_json::json!({"driver": "raw", "node-name": "temp", "discard": "unmap",
            "file": {"driver": "file", "filename": tmp, "discard": "unmap"}}),
        ))
        .unwrap();
        let mut cbw = serde_json::json!({"driver": "copy-before-write", "node-name": "cbw",
            "file": "source", "target": "temp"});
        cbw.as_object_mut()
            .unwrap()
            .extend(cbw_extra.as_object().unwrap().clone());
        if bitmap {
            cbw["bitmap"] = serde_json::json!({"node": "source", "name": "b0"});
        }
        g.add(opts(cbw)).unwrap();
        g.add(opts(
            serde_json::json!({"driver": "snapshot-access", "node-name": "access",
            "discard": "unmap", "file": "cbw"}),
        ))
        .unwrap();
        g
    }

    fn write(g: &Graph, node: &str, off: u64, len: usize, byte: u8) -> std::io::Result<()> {
        let n = g.find(node).unwrap();
        let buf = IoBuffer::from_vec(vec![byte; len]);
        block_on(n.write(off, &buf, WriteFlags::default())).unwrap()
    }

    fn read(g: &Graph, node: &str, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let n = g.find(node).unwrap();
        let buf = IoBuffer::from_vec(vec![0xeeu8; len]);
        block_on(n.read(off, &buf)).unwrap()?;
        Ok(buf.into_vec())
    }

    fn is(v: &[u8], byte: u8) -> bool {
        v.iter().all(|&b| b == byte)
    }

    fn overwrite_and_check_snapshot(g: &Graph, bitmap: bool) {
        // Overwrites through the filter, straddling cluster boundaries.
        for (byte, off) in [
            (0xab, 0),
            (0xad, MIB - 32768),
            (0x1d, 32 * MIB + 32768),
            (0xea, 64 * MIB - 131072),
        ] {
            write(g, "cbw", off, 65536, byte).unwrap();
        }
        for (byte, off) in [
            (0x5d, 0),
            (0xd5, MIB),
            (0xdc, 32 * MIB),
            (0xcd, 64 * MIB - 65536),
        ] {
            assert!(
                is(&read(g, "access", off, 65536).unwrap(), byte),
                "pattern {byte:#x}"
            );
        }
        for (off, len) in [
            (MIB - 32768, 32768),
            (32 * MIB + 65536, 32768),
            (64 * MIB - 131072, 65536),
        ] {
            let r = read(g, "access", off, len);
            if bitmap {
                assert_eq!(
                    r.unwrap_err().raw_os_error(),
                    Some(libc::EACCES),
                    "zero area at {off}"
                );
            } else {
                assert!(is(&r.unwrap(), 0));
            }
        }
        // The source has the guest's data.
        assert!(is(&read(g, "source", 0, 65536).unwrap(), 0xab));
        assert!(is(&read(g, "source", MIB + 32768, 32768).unwrap(), 0xd5));
        assert!(is(&read(g, "source", 32 * MIB, 32768).unwrap(), 0xdc));
    }

    #[test]
    fn state_too_large_for_memory_is_an_error() {
        let g = Graph::new();
        for n in ["big", "big2"] {
            g.add(opts(
                serde_json::json!({"driver": "null-co", "node-name": n, "size": 1u64 << 60}),
            ))
            .unwrap();
        }
        let e = g
            .add(opts(serde_json::json!({"driver": "copy-before-write",
                "node-name": "cbw", "file": "big", "target": "big2"})))
            .err()
            .unwrap();
        assert!(
            e.to_string().starts_with(
                "Cannot create block-copy-state for 17592186044416 clusters of 65536 bytes: Cannot allocate"
            ),
            "{e}"
        );
        let mut tx = g.transaction();
        let e = tx
            .bitmap_add(
                "big",
                "b0",
                crate::BitmapOptions {
                    granularity: Some(512),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Cannot create dirty bitmap 'b0': Cannot allocate"),
            "{e}"
        );
    }

    #[test]
    fn image_fleecing() {
        let dir = tempfile::tempdir().unwrap();
        let g = fleecing(dir.path(), serde_json::json!({}), false);
        overwrite_and_check_snapshot(&g, false);
        let info = g.find("cbw").unwrap().snapshot_info().unwrap();
        assert_eq!(info["snapshot-valid"], true);
        // Clusters: 0; 15,16; 512,513; 1022 (1023 holds P4, untouched).
        assert_eq!(info["clusters-copied"], 6);
    }

    #[test]
    fn image_fleecing_with_a_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let g = fleecing(dir.path(), serde_json::json!({}), true);
        overwrite_and_check_snapshot(&g, true);
        // Only the clusters of P1..P4 were in the bitmap; the overwrites hit
        // three of them (0, 16, 512).
        let info = g.find("cbw").unwrap().snapshot_info().unwrap();
        assert_eq!(info["clusters-copied"], 3);
    }

    #[test]
    fn snapshot_discard_gives_space_back_and_stops_copies() {
        let dir = tempfile::tempdir().unwrap();
        let g = fleecing(dir.path(), serde_json::json!({}), false);
        write(&g, "cbw", 0, 4 * MIB as usize, 0x11).unwrap();
        let blocks = || {
            std::fs::metadata(dir.path().join("tmp.raw"))
                .unwrap()
                .blocks()
        };
        let before = blocks();
        assert!(before >= 4 * MIB / 512);
        let access = g.find("access").unwrap();
        // Unaligned: only the whole clusters inside go.
        block_on(access.discard(1000, 4 * MIB)).unwrap().unwrap();
        assert!(
            blocks() <= before - (4 * MIB - 65536) / 512,
            "{} -> {}",
            before,
            blocks()
        );
        assert_eq!(
            read(&g, "access", 65536, 4096).unwrap_err().raw_os_error(),
            Some(libc::EACCES)
        );
        assert!(read(&g, "access", 0, 4096).is_ok());
        // A discarded, never copied cluster is not copied by a later write.
        block_on(access.discard(8 * MIB, MIB)).unwrap().unwrap();
        let copied =
            |g: &Graph| g.find("cbw").unwrap().snapshot_info().unwrap()["clusters-copied"].as_u64();
        let n = copied(&g);
        write(&g, "cbw", 8 * MIB, MIB as usize, 0x22).unwrap();
        assert_eq!(copied(&g), n);
    }

    #[test]
    fn overlapping_snapshot_reads_status_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let g = std::sync::Arc::new(fleecing(dir.path(), serde_json::json!({}), false));
        // 1 MiB at 2 MiB holds a known pattern before the snapshot... of zeroes.
        let mut threads = Vec::new();
        for t in 0..6u64 {
            let g = g.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0..40u64 {
                    let off = 2 * MIB + ((i * 7 + t * 3) % 16) * 65536 + (i % 3) * 4096;
                    match t % 3 {
                        0 => write(&g, "cbw", off, 8192, (t * 40 + i) as u8 | 1).unwrap(),
                        1 => assert!(is(&read(&g, "access", off, 100 * 1024).unwrap(), 0)),
                        _ => {
                            let a = g.find("access").unwrap();
                            let st = block_on(a.block_status(off, 65536)).unwrap().unwrap();
                            assert!(st.len > 0);
                        }
                    }
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert!(is(&read(&g, "access", 2 * MIB, MIB as usize).unwrap(), 0));
        assert!(!is(&read(&g, "source", 2 * MIB, MIB as usize).unwrap(), 0));
    }

    #[test]
    fn cbw_timeout_with_a_slow_target() {
        for (mode, guest_ok) in [("break-guest-write", false), ("break-snapshot", true)] {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src.raw");
            let tmp = dir.path().join("tmp.raw");
            std::fs::write(&src, vec![7u8; 4 * MIB as usize]).unwrap();
            std::fs::File::create(&tmp)
                .unwrap()
                .set_len(4 * MIB)
                .unwrap();
            let g = Graph::new();
            g.add(opts(
                serde_json::json!({"driver": "raw", "node-name": "source",
                "file": {"driver": "file", "filename": src}}),
            ))
            .unwrap();
            // 300 KiB/s: the second 512 KiB write waits more than a second.
            g.add(opts(
                serde_json::json!({"driver": "throttle", "node-name": "slow",
                "limits": {"bps-write": 300 * 1024},
                "file": {"driver": "file", "filename": tmp}}),
            ))
            .unwrap();
            g.add(opts(
                serde_json::json!({"driver": "copy-before-write", "node-name": "cbw",
                "file": "source", "target": "slow", "on-cbw-error": mode, "cbw-timeout": 1}),
            ))
            .unwrap();
            g.add(opts(serde_json::json!({"driver": "snapshot-access", "node-name": "access", "file": "cbw"}))).unwrap();
            write(&g, "cbw", 0, 512 * 1024, 1).unwrap();
            let second = write(&g, "cbw", 512 * 1024, 512 * 1024, 2);
            assert_eq!(second.is_ok(), guest_ok, "{mode}: {second:?}");
            if !guest_ok {
                assert_eq!(second.unwrap_err().raw_os_error(), Some(libc::ETIMEDOUT));
            }
            let snap = read(&g, "access", 0, MIB as usize);
            if guest_ok {
                assert_eq!(snap.unwrap_err().raw_os_error(), Some(libc::EACCES));
                let info = g.find("cbw").unwrap().snapshot_info().unwrap();
                assert_eq!(info["snapshot-valid"], false);
            } else {
                assert!(
                    is(&snap.unwrap(), 7),
                    "{mode}: the snapshot keeps the old data"
                );
            }
            // The copy that timed out is still running; deleting the
            // filter drains it: once deleted, nothing writes the target
            // any more, and the copy is complete there.
            g.remove("access").unwrap();
            g.remove("cbw").unwrap();
            let copied = std::fs::read(&tmp).unwrap();
            assert!(
                is(&copied[512 * 1024..MIB as usize], 7),
                "{mode}: the detached copy outlived the filter"
            );
        }
    }
}
