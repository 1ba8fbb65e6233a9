//! blockdev-backup, as QEMU builds it: a copy-before-write filter goes
//! above the source, so that a guest write first copies the old data of
//! its clusters to the target; the job copies every other cluster to copy
//! through the same block-copy engine, so each is copied once, by
//! whichever comes first. With `sync: none` the job copies nothing itself
//! and runs until it is cancelled (fleecing: the target is read, e.g. over
//! NBD, with the source as its backing file).
//!
//! A sync bitmap is frozen when the job is made (in its transaction's
//! drained section): its bits go to the job, and the bitmap records only
//! what the guest writes from then on (QEMU's successor). When the job
//! ends, `bitmap-mode` decides what of the frozen bits comes back.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Job, JobDriver, JobOptions, JobTxn};
use crate::aio::{join_all, IoFuture};
use crate::bitmap::DirtyBitmap;
use crate::bitset::Bitset;
use crate::driver::ChildRole;
use crate::drivers::copy_before_write::block_copy::{BlockCopy, CopyError};
use crate::drivers::copy_before_write::{backup_filter, BLOCK_COPY_CLUSTER};
use crate::error::Error;
use crate::graph::Graph;
use crate::node::{Child, Node};
use crate::permission::{Parent, Permission};
use crate::transaction::Transaction;

/// What a backup copies (QAPI's MirrorSyncMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// What the top layer of the source has.
    Top,
    /// Everything.
    Full,
    /// Nothing, but the old data of what the guest writes.
    None,
    /// What the bitmap marks (with bitmap-mode on-success).
    Incremental,
    /// What the bitmap marks.
    Bitmap,
}

impl SyncMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SyncMode::Top => "top",
            SyncMode::Full => "full",
            SyncMode::None => "none",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// What happens to the sync bitmap when the job ends (QAPI's
/// BitmapSyncMode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    /// Cleared of what was copied if the job succeeds, as it was if not.
    OnSuccess,
    /// Never cleared.
    Never,
    /// Cleared of what was copied, whatever the outcome.
    Always,
}

/// blockdev-backup's arguments.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The job's options.
    pub job: JobOptions,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: SyncMode,
    /// The sync bitmap, on the source.
    pub bitmap: Option<String>,
    /// What becomes of the sync bitmap.
    pub bitmap_mode: Option<BitmapMode>,
    /// The node-name of the copy-before-write filter.
    pub filter_node_name: Option<String>,
}

/// The frozen sync bitmap.
struct Frozen {
    bitmap: Arc<DirtyBitmap>,
    /// Its bits when the job was made.
    bits: Vec<u64>,
    mode: BitmapMode,
}

struct Backup {
    sync: SyncMode,
    source: Arc<Node>,
    filter: String,
    engine: Arc<BlockCopy>,
    frozen: Mutex<Option<Frozen>>,
}

/// Clusters copied at once by the job.
const PARALLEL: usize = 8;
/// Bytes per copy operation of the job.
const CHUNK: u64 = 1 << 20;
fn error(text: impl Into<String>) -> Error {
    Error::OpenFailed(text.into())
}

/// The clusters of `cluster` bytes a bitmap's frozen `bits` mark dirty.
fn clusters_of(
    bits: &[u64],
    granularity: u64,
    cluster: u64,
    count: usize,
) -> Result<Bitset, Error> {
    let mut set = Bitset::try_new(count, false)
        .map_err(|e| error(format!("Cannot create block-copy-state: {e}")))?;
    let bit = |i: u64| {
        bits.get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    };
    for c in 0..count as u64 {
        let first = c * cluster / granularity;
        let last = ((c + 1) * cluster).div_ceil(granularity);
        set.set(c as usize, (first..last).any(bit));
    }
    Ok(set)
}

impl Transaction<'_> {
    /// blockdev-backup: checks the arguments as QEMU does, freezes the sync
    /// bitmap, puts a copy-before-write filter above the source and makes
    /// the job (started when the transaction commits).
    pub fn blockdev_backup(
        &mut self,
        o: &BackupOptions,
        txn: Option<Arc<JobTxn>>,
    ) -> Result<Arc<Job>, Error> {
        let mut sync = o.sync;
        let mut mode = o.bitmap_mode;
        if sync == SyncMode::Incremental {
            if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
                return Err(error(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
                ));
            }
            sync = SyncMode::Bitmap;
            mode = Some(BitmapMode::OnSuccess);
        }
        let source = self.find(&o.device)?;
        let target = self.find(&o.target)?;
        let bitmap = match &o.bitmap {
            Some(name) => {
                let b = source
                    .bitmap(name)
                    .ok_or_else(|| error(format!("Bitmap '{name}' could not be found")))?;
                let Some(m) = mode else {
                    return Err(error(
                        "Bitmap sync mode must be given when providing a bitmap",
                    ));
                };
                b.usable(false).map_err(|e| error(e.to_string()))?;
                if sync == SyncMode::None {
                    return Err(error(
                        "sync mode 'none' does not produce meaningful bitmap outputs",
                    ));
                }
                if m == BitmapMode::Never && sync != SyncMode::Bitmap {
                    return Err(error(format!(
                        "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'",
                        sync.as_str()
                    )));
                }
                if m != BitmapMode::Never {
                    b.usable(true).map_err(|e| error(e.to_string()))?;
                }
                Some((b, m))
            }
            None if mode.is_some() => {
                return Err(error("Cannot specify bitmap sync mode without a bitmap"))
            }
            None => None,
        };
        if sync == SyncMode::Bitmap && bitmap.is_none() {
            return Err(error(
                "must provide a valid bitmap name for 'bitmap' sync mode",
            ));
        }
        if Arc::ptr_eq(&source, &target) {
            return Err(error("Source and target cannot be the same"));
        }
        if source.size() != target.size() {
            return Err(error(format!(
                "Source and target image have different sizes ({} and {} bytes)",
                source.size(),
                target.size()
            )));
        }
        let cluster = BLOCK_COPY_CLUSTER.max(target.limits().optimal_alignment);
        let count = usize::try_from(source.size().div_ceil(cluster)).unwrap_or(usize::MAX);
        let frozen = match bitmap {
            Some((b, m)) => {
                let bits = b
                    .take_words()
                    .map_err(|e| error(format!("Cannot freeze bitmap '{}': {e}", b.name())))?;
                b.set_busy(true);
                self.on_rollback_unfreeze(b.clone(), bits.clone());
                Some(Frozen {
                    bitmap: b,
                    bits,
                    mode: m,
                })
            }
            None => None,
        };
        let copy = match (&frozen, sync) {
            (Some(f), SyncMode::Bitmap) => {
                clusters_of(&f.bits, f.bitmap.granularity(), cluster, count)?
            }
            _ => Bitset::try_new(count, true)
                .map_err(|e| error(format!("Cannot create block-copy-state: {e}")))?,
        };
        let mut engine = None;
        let filter =
            self.insert_node(o.filter_node_name.as_deref(), "copy-before-write", |name| {
                let parent = Parent::Node(name.to_string());
                let file = Child::new(parent.clone(), ChildRole::File, source.clone());
                let target = Child::new(parent, ChildRole::Target, target.clone());
                let (driver, e) = backup_filter(file.clone(), target.clone(), cluster, copy, name)?;
                engine = Some(e);
                Ok((driver, vec![file, target]))
            })?;
        let engine = engine.ok_or_else(|| error("copy-before-write filter without state"))?;
        self.replace_node(&source, &filter);
        let driver = Backup {
            sync,
            source: source.clone(),
            filter: filter.name().to_string(),
            engine,
            frozen: Mutex::new(frozen),
        };
        self.create_job(
            &o.job,
            Box::new(driver),
            &[(filter.name(), Permission::NONE, Permission::ALL)],
            txn,
        )
    }
}

impl Backup {
    /// For `sync: top`: only what the source's top layer has is copied.
    async fn skip_unallocated(&self, job: &Job) -> io::Result<()> {
        let cluster = self.engine.cluster;
        let size = self.source.size();
        let mut offset = 0;
        while offset < size {
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let st = self.source.block_status(offset, size - offset).await?;
            let end = offset + st.len.max(1);
            if st.depth != 1 {
                // Whole clusters only: a partly allocated one is copied.
                let first = offset.div_ceil(cluster);
                let last = if end >= size {
                    size.div_ceil(cluster)
                } else {
                    end / cluster
                };
                if first < last {
                    self.engine.skip(first as usize..last as usize);
                }
            }
            offset = end;
        }
        Ok(())
    }

    async fn copy_all(&self, job: &Job) -> io::Result<()> {
        let engine = &self.engine;
        let cluster = engine.cluster;
        let count = engine.cluster_count();
        // Progress counts the clusters copied, by the job or by guest
        // writes' copies, of those copied or still to copy.
        let progress = || {
            let copied = engine.copied();
            let total = ((copied + engine.to_copy() as u64) * cluster).min(engine.size);
            job.set_progress((copied * cluster).min(total), total);
        };
        progress();
        let per_chunk = (CHUNK / cluster).max(1) as usize;
        let mut c = 0;
        while c < count {
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let end = (c + per_chunk * PARALLEL).min(count);
            let chunks: Vec<IoFuture<'_, Option<CopyError>>> = (c..end)
                .step_by(per_chunk)
                .map(|first| {
                    let run = first..(first + per_chunk).min(end);
                    Box::pin(async move { Ok(engine.copy_range(run).await.err()) })
                        as IoFuture<'_, Option<CopyError>>
                })
                .collect();
            let failures: Vec<CopyError> = join_all(chunks).await?.into_iter().flatten().collect();
            if let Some(failure) = failures.into_iter().next() {
                job.retry_or_fail(failure.side, failure.error).await?;
                continue;
            }
            progress();
            job.rate_limit((end - c) as u64 * cluster).await;
            c = end;
        }
        Ok(())
    }

    /// Gives the frozen bits back as `bitmap-mode` says for this outcome.
    fn thaw(&self, success: bool) {
        let Some(f) = self.frozen.lock().take() else {
            return;
        };
        let copied_only = |bits: &[u64]| {
            // Keep the bits of what was not copied.
            let granularity = f.bitmap.granularity();
            let cluster = self.engine.cluster;
            let mut left = bits.to_vec();
            for (i, w) in left.iter_mut().enumerate() {
                for b in 0..64 {
                    let byte = (i as u64 * 64 + b) * granularity;
                    let c = (byte / cluster) as usize;
                    if c < self.engine.cluster_count() && self.engine.is_copied(c) {
                        *w &= !(1 << b);
                    }
                }
            }
            left
        };
        match (f.mode, success) {
            (BitmapMode::OnSuccess, true) => {}
            (BitmapMode::Always, true) => {}
            (BitmapMode::Always, false) => f.bitmap.merge_words(&copied_only(&f.bits)),
            (BitmapMode::OnSuccess, false) | (BitmapMode::Never, _) => {
                f.bitmap.merge_words(&f.bits)
            }
        }
        f.bitmap.set_busy(false);
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a> {
        Box::pin(async move {
            if self.sync == SyncMode::None {
                // The filter does the copying; the job lasts until it is
                // cancelled.
                while !job.cancel_requested() {
                    job.wait_kick().await;
                }
                return Ok(());
            }
            if self.sync == SyncMode::Top {
                self.skip_unallocated(job).await?;
            }
            self.copy_all(job).await
        })
    }

    fn cancel_in_flight(&self) {
        self.engine.target().cancel_in_flight();
    }

    fn commit(&self, _graph: &Graph, _job: &Job) {
        self.thaw(true);
    }

    fn abort(&self, _graph: &Graph, _job: &Job) {
        self.thaw(false);
    }

    /// Takes the filter out: its parents go back to the source.
    fn clean(&self, graph: &Graph, job: &Job) {
        let mut tx = graph.drained_transaction();
        tx.detach_job(job.id());
        let result = tx.find(&self.filter).and_then(|filter| {
            tx.replace_node(&filter, &self.source);
            tx.remove(&self.filter)
        });
        if let Err(e) = result.and_then(|()| tx.commit()) {
            log::error!("job '{}': cannot remove its filter: {e}", job.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::aio::block_on;
    use crate::job::JobStatus;
    use crate::{IoBuffer, Options, WriteFlags};

    const MIB: u64 = 1 << 20;

    fn opts(arg: &str) -> Options {
        Options::from_arg(arg, None).unwrap()
    }

    struct Setup {
        _dir: tempfile::TempDir,
        graph: Arc<Graph>,
        source: std::path::PathBuf,
        target: std::path::PathBuf,
        events: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    }

    fn setup(size: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src.raw");
        let target = dir.path().join("tgt.raw");
        let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        std::fs::write(&source, data).unwrap();
        std::fs::write(&target, vec![0u8; size as usize]).unwrap();
        let graph = Graph::shared();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        graph.set_event_sink(Arc::new(move |name: &str, data| {
            sink.lock().push((name.to_string(), data))
        }));
        for (name, path) in [("src", &source), ("tgt", &target)] {
            let arg = format!(
                "driver=raw,node-name={name},file.driver=file,file.filename={}",
                path.display()
            );
            graph.add(opts(&arg)).unwrap();
        }
        Setup {
            _dir: dir,
            graph,
            source,
            target,
            events,
        }
    }

    /// Waits until job `id` is gone and has sent its last event: it
    /// leaves the registry just before its end events (as in QEMU, a
    /// client that sees them no longer finds the job), and its status
    /// goes to `null` last.
    fn wait_gone(s: &Setup, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let last_event_sent = || {
            s.events
                .lock()
                .iter()
                .any(|(n, d)| n == "JOB_STATUS_CHANGE" && d["id"] == id && d["status"] == "null")
        };
        while s.graph.job(id).is_some() || !last_event_sent() {
            assert!(Instant::now() < deadline, "job {id} did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn backup(sync: SyncMode) -> BackupOptions {
        BackupOptions {
            job: JobOptions::new("job0"),
            device: "src".into(),
            target: "tgt".into(),
            sync,
            bitmap: None,
            bitmap_mode: None,
            filter_node_name: Some("cbw0".into()),
        }
    }

    #[test]
    fn full_backup_copies_the_point_in_time_and_goes() {
        let s = setup(16 * MIB);
        let before = std::fs::read(&s.source).unwrap();
        let mut tx = s.graph.drained_transaction();
        tx.blockdev_backup(&backup(SyncMode::Full), None).unwrap();
        tx.commit().unwrap();
        // A guest write after the start: the target keeps the old data.
        let src = s.graph.find("cbw0").unwrap();
        block_on(src.write(
            5 * MIB,
            &IoBuffer::from_vec(vec![0xeeu8; 4096]),
            WriteFlags::default(),
        ))
        .unwrap()
        .unwrap();
        wait_gone(&s, "job0");
        assert_eq!(std::fs::read(&s.target).unwrap(), before);
        assert!(s.graph.find("cbw0").is_err(), "the filter went");
        let statuses: Vec<String> = s
            .events
            .lock()
            .iter()
            .filter(|(n, _)| n == "JOB_STATUS_CHANGE")
            .map(|(_, d)| d["status"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            statuses,
            [
                "created",
                "running",
                "waiting",
                "pending",
                "concluded",
                "null"
            ]
        );
        let completed: Vec<_> = s
            .events
            .lock()
            .iter()
            .filter(|(n, _)| n == "BLOCK_JOB_COMPLETED")
            .map(|(_, d)| d.clone())
            .collect();
        assert_eq!(completed.len(), 1);
        assert_eq!(completed[0]["len"], 16 * MIB);
        assert_eq!(completed[0]["offset"], 16 * MIB);
        assert!(completed[0].get("error").is_none());
    }

    /// Found by the qmp_commands fuzz target: a job over its speed limit
    /// slept its whole debt at once (17 minutes for 4 MiB at 4 KiB/s, days
    /// at a few bytes per second), so a cancel, a pause, and every drained
    /// transaction, which pauses the job and waits for it, waited as long,
    /// holding the graph's lock.
    #[test]
    fn a_rate_limited_job_stops_and_pauses_at_once() {
        let s = setup(4 * MIB);
        let mut options = backup(SyncMode::Full);
        options.job.speed = 4096;
        let mut tx = s.graph.drained_transaction();
        tx.blockdev_backup(&options, None).unwrap();
        tx.commit().unwrap();
        let job = s.graph.job("job0").unwrap();
        // Let it copy its first chunks and fall behind its quota.
        std::thread::sleep(Duration::from_millis(300));
        let graph = s.graph.clone();
        let (done, drained) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(graph.drained_transaction());
            let _ = done.send(());
        });
        drained
            .recv_timeout(Duration::from_secs(2))
            .expect("a drained section waited for the job's speed limit");
        let start = Instant::now();
        job.cancel(true).unwrap();
        wait_gone(&s, "job0");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the cancel took {:?}",
            start.elapsed()
        );
    }

    /// Found by the qmp_commands fuzz target: a job whose work had
    /// returned stayed busy until the job control thread took note of it;
    /// if that thread was itself waiting in a drained section (another
    /// job ending, which takes its filter out in a drained transaction),
    /// it waited for that job for ever, with the graph locked.
    #[test]
    fn a_drain_on_the_control_thread_does_not_wait_for_a_job_that_is_done() {
        let s = setup(MIB);
        let mut tx = s.graph.drained_transaction();
        tx.blockdev_backup(&backup(SyncMode::None), None).unwrap();
        tx.commit().unwrap();
        let job = s.graph.job("job0").unwrap();
        let graph = s.graph.clone();
        let (done, drained) = std::sync::mpsc::channel();
        super::super::control::submit(Box::new(move || {
            // The job's work returns, and its end waits behind this step.
            job.cancel(true).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop(graph.drained_transaction());
            let _ = done.send(());
        }));
        drained
            .recv_timeout(Duration::from_secs(5))
            .expect("the drained section waited for a job whose work was over");
        wait_gone(&s, "job0");
    }

    /// Found by the qmp_commands fuzz target, under load: a backup whose
    /// writes waited for their turn in a throttle node (at 4 KiB/s) held
    /// shutdown, which cancelled the jobs and waited for their ends before
    /// it drained the graph, for as long as the throttle made them wait.
    /// As qemu-storage-daemon, shutdown drains first: the throttle lets
    /// the job's writes go, and the cancelled job ends at once.
    #[test]
    fn shutdown_does_not_wait_for_a_throttled_job() {
        let s = setup(4 * MIB);
        let arg = "driver=throttle,node-name=thr,limits.bps-total=65536,file=tgt";
        s.graph.add(opts(arg)).unwrap();
        let mut options = backup(SyncMode::Full);
        options.target = "thr".into();
        let mut tx = s.graph.drained_transaction();
        tx.blockdev_backup(&options, None).unwrap();
        tx.commit().unwrap();
        // Its first chunks go, the next ones wait for a minute.
        std::thread::sleep(Duration::from_millis(300));
        assert!(s.graph.job("job0").is_some(), "the job ended already");
        let graph = s.graph.clone();
        let (done, shut) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            graph.shut_down();
            let _ = done.send(());
        });
        shut.recv_timeout(Duration::from_secs(5))
            .expect("shutdown waited for the job's throttled writes");
        assert!(s.graph.job("job0").is_none());
    }

    #[test]
    fn cancelled_sync_none_backup_takes_its_filter_out() {
        let s = setup(4 * MIB);
        let mut tx = s.graph.drained_transaction();
        let job = tx.blockdev_backup(&backup(SyncMode::None), None).unwrap();
        tx.commit().unwrap();
        assert_eq!(job.status(), JobStatus::Running);
        assert!(s.graph.remove("src").is_err(), "in use by the filter");
        job.cancel(false).unwrap();
        wait_gone(&s, "job0");
        assert!(s.graph.find("cbw0").is_err());
        assert!(s
            .events
            .lock()
            .iter()
            .any(|(n, d)| n == "BLOCK_JOB_CANCELLED" && d["device"] == "job0"));
    }

    #[test]
    fn qemu_checks_and_texts() {
        let s = setup(MIB);
        let mut tx = s.graph.transaction();
        let mut o = backup(SyncMode::Incremental);
        let e = tx.blockdev_backup(&o, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Cannot specify bitmap sync mode without a bitmap"
        );
        o.sync = SyncMode::Bitmap;
        let e = tx.blockdev_backup(&o, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "must provide a valid bitmap name for 'bitmap' sync mode"
        );
        o.bitmap = Some("nope".into());
        let e = tx.blockdev_backup(&o, None).unwrap_err();
        assert_eq!(e.to_string(), "Bitmap 'nope' could not be found");
        o.target = "src".into();
        o.bitmap = None;
        o.sync = SyncMode::Full;
        let e = tx.blockdev_backup(&o, None).unwrap_err();
        assert_eq!(e.to_string(), "Source and target cannot be the same");
    }
}
