//! The `copy-before-write` filter: before a guest write, write-zeroes or
//! discard changes a cluster of its `file` child for the first time, the
//! old data is copied to `target`; its snapshot API serves the
//! point-in-time view to a `snapshot-access` node.
//!
//! The copying and the snapshot's state are the block-copy engine's
//! ([`block_copy`]); this module adds what a failed copy does
//! (`on-cbw-error`), the copy timeout (`cbw-timeout`: a copy that outlives
//! its guest write goes on in the background, and the driver's drain
//! waits for it), the snapshot-broken event and the driver's operations.

pub(crate) mod block_copy;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use self::block_copy::{BlockCopy, Detached};
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

struct CopyBeforeWrite {
    engine: Arc<BlockCopy>,
    on_error: OnCbwError,
    timeout: Duration,
    events: Option<crate::EventSink>,
    node_name: String,
}

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
    let too_large = |e| {
        Error::OpenFailed(format!(
            "Cannot create block-copy-state for {clusters} clusters of {cluster} bytes: {e}"
        ))
    };
    let copy = match &opts.bitmap {
        None => Bitset::try_new(clusters, true).map_err(too_large)?,
        Some(r) => {
            let node = ctx.node(&r.node)?;
            let bitmap = node.bitmap(&r.name).ok_or_else(|| {
                Error::OpenFailed(format!(
                    "Dirty bitmap '{}' not found on node '{}'",
                    r.name, r.node
                ))
            })?;
            bitmap
                .usable(false)
                .map_err(|e| Error::OpenFailed(e.to_string()))?;
            if node.size() != size {
                return Err(Error::OpenFailed(format!(
                    "Bitmap '{}' has a size different from the source",
                    r.name
                )));
            }
            let mut copy = Bitset::try_new(clusters, false).map_err(too_large)?;
            for c in 0..clusters {
                // Only true bits are written: the rest stays untouched,
                // lazily zeroed memory.
                if bitmap.any_dirty(c as u64 * cluster, cluster) {
                    copy.set(c, true);
                }
            }
            copy
        }
    };
    let engine = BlockCopy::new(file, target, cluster, size, copy).map_err(too_large)?;
    Ok(Box::new(CopyBeforeWrite {
        engine: Arc::new(engine),
        on_error: opts.on_cbw_error,
        timeout: Duration::from_secs(u64::from(opts.cbw_timeout)),
        events: ctx.events(),
        node_name: ctx.node_name().to_string(),
    }))
}

/// A copy-before-write filter for a backup job: over `file`, copying to
/// `target` the clusters set in `copy` (`cluster` bytes each) before guest
/// writes change them; the job copies the rest through the same engine.
pub(crate) fn backup_filter(
    file: Arc<Child>,
    target: Arc<Child>,
    cluster: u64,
    copy: Bitset,
    node_name: &str,
) -> Result<(Box<dyn BlockDriver>, Arc<BlockCopy>), Error> {
    let size = file.node().size();
    let engine = BlockCopy::new(file, target, cluster, size, copy)
        .map_err(|e| Error::OpenFailed(format!("Cannot create block-copy-state: {e}")))?;
    let engine = Arc::new(engine);
    let driver = CopyBeforeWrite {
        engine: engine.clone(),
        on_error: OnCbwError::BreakGuestWrite,
        timeout: Duration::ZERO,
        events: None,
        node_name: node_name.to_string(),
    };
    Ok((Box::new(driver), engine))
}

/// The smallest cluster the block-copy engine copies.
pub(crate) const BLOCK_COPY_CLUSTER: u64 = MIN_CLUSTER;

impl CopyBeforeWrite {
    /// The copy-before-write operation for a guest change of the range.
    async fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let engine = &self.engine;
        if !engine.invalid() {
            let clusters = engine.clusters(offset, len);
            let result = if self.timeout.is_zero() {
                engine.copy_range(clusters).await.map_err(io::Error::from)
            } else {
                // The copy cannot be stopped halfway: on timeout it goes on
                // in the background and the guest request moves on.
                let running = Detached::start(engine);
                let copy = spawn_detached(async move {
                    running
                        .engine()
                        .copy_range(clusters)
                        .await
                        .map_err(io::Error::from)
                });
                match copy {
                    Ok(copy) => match race(copy, sleep(self.timeout)).await {
                        Either::Left(r) => r,
                        Either::Right(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                    },
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = result {
                match self.on_error {
                    OnCbwError::BreakGuestWrite => return Err(e),
                    OnCbwError::BreakSnapshot => self.break_snapshot(&e),
                }
            }
        }
        engine.wait_frozen(offset, len).await;
        Ok(())
    }

    fn break_snapshot(&self, error: &io::Error) {
        if !self.engine.invalidate(error) {
            return;
        }
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

impl BlockDriver for CopyBeforeWrite {
    fn size(&self) -> u64 {
        self.engine.size
    }

    fn filtered_child(&self) -> Option<&Arc<Child>> {
        Some(&self.engine.file)
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
            self.engine.file.node().write(offset, buf, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.engine.file.node().discard(offset, len).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.engine
                .file
                .node()
                .write_zeroes(offset, len, flags)
                .await
        })
    }

    fn snapshot_read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(async move {
            let engine = &self.engine;
            let end = offset + buf.len() as u64;
            let mut pos = offset;
            while pos < end {
                let (run, done, frozen) = engine.begin_snapshot_op(pos, end)?;
                let part = buf.slice((pos - offset) as usize, run as usize);
                let result = if done {
                    engine.target.node().read(pos, &part).await
                } else {
                    engine.file.node().read(pos, &part).await
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
            let engine = &self.engine;
            let (run, done, frozen) = engine.begin_snapshot_op(offset, offset + len)?;
            let result = if done {
                engine.target.node().block_status(offset, run).await
            } else {
                engine.file.node().block_status(offset, run).await
            };
            drop(frozen);
            result
        })
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            let engine = &self.engine;
            let cluster = engine.cluster;
            // Inward: only whole clusters leave the snapshot.
            let start = offset.div_ceil(cluster) * cluster;
            let end = ((offset + len) / cluster * cluster).max(start);
            if start == end {
                return Ok(());
            }
            engine.drop_from_snapshot((start / cluster) as usize..(end / cluster) as usize);
            engine
                .target
                .node()
                .discard(start, end.min(engine.size) - start)
                .await
        })
    }

    fn snapshot_info(&self) -> Option<serde_json::Value> {
        let p = self.engine.progress();
        Some(json!({
            "snapshot-valid": p.error.is_none(),
            "snapshot-error": p.error,
            "cluster-size": self.engine.cluster,
            "clusters-copied": p.clusters_copied,
            "clusters-to-copy": p.clusters_to_copy,
            "target-bytes": p.target_bytes,
        }))
    }

    /// Waits for the copies that outlived their guest writes.
    fn drain(&self) -> IoFuture<'_> {
        Box::pin(async move {
            self.engine.wait_detached().await;
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
