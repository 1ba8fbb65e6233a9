//! blockdev-mirror, as QEMU builds it: a filter goes above the source and
//! marks in a dirty bitmap what its parents change (once the change is
//! done); the job copies what is dirty to the target, over and over, and
//! is ready (BLOCK_JOB_READY) once what is left fits one final copy of
//! `buf-size` bytes. job-complete copies what is still dirty in a drained
//! section and points every parent of the source, exports included, to
//! the target in the same step: live storage migration. A plain cancel of
//! a ready job makes the same final copy without that switch (the target
//! is a point-in-time copy).
//!
//! In `write-blocking` copy mode the filter also writes each change to the
//! target before the guest's request completes, so the job converges
//! however fast the guest writes. A copy and a guest change of the same
//! range never overlap: each holds its range alone while it writes the
//! target.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Job, JobDriver, JobOptions, JobTxn, SyncMode};
use crate::aio::{block_on, InFlight, IoFuture};
use crate::bitmap::DirtyBitmap;
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, BlockStatus, ChildRole, WriteFlags, ZeroFlags};
use crate::drivers::copy_before_write::block_copy::CopyError;
use crate::error::Error;
use crate::graph::Graph;
use crate::node::{Child, Node};
use crate::permission::{Parent, Permission};
use crate::range_lock::RangeLocks;
use crate::transaction::Transaction;

use super::Side;

/// How guest changes reach the target (QAPI's MirrorCopyMode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// The job copies them later.
    #[default]
    Background,
    /// The filter writes them to the target too, before they complete.
    WriteBlocking,
}

/// blockdev-mirror's arguments.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// The job's options.
    pub job: JobOptions,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy first: everything, the source's top layer, or nothing
    /// (only what changes from now on).
    pub sync: SyncMode,
    /// Bytes per bit of the dirty bitmap.
    pub granularity: Option<u64>,
    /// Bytes the job copies at once, at most.
    pub buf_size: Option<u64>,
    /// How guest changes reach the target.
    pub copy_mode: CopyMode,
    /// The node-name of the filter.
    pub filter_node_name: Option<String>,
}

/// QEMU's defaults and limits.
const DEFAULT_GRANULARITY: u64 = 64 << 10;
const MAX_GRANULARITY: u64 = 64 << 20;
const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// The largest single copy.
const MAX_CHUNK: u64 = 1 << 20;
/// Copies in flight at once, at most.
const MAX_IN_FLIGHT: usize = 16;
/// How often a job in sync looks for new dirty data.
const IDLE_POLL: Duration = Duration::from_millis(10);
fn error(text: impl Into<String>) -> Error {
    Error::OpenFailed(text.into())
}

/// What the filter and the job share.
struct Shared {
    source: Arc<Child>,
    target: Arc<Child>,
    dirty: DirtyBitmap,
    /// Ranges whose target data is being written, by a copy or (in
    /// write-blocking mode) a guest change.
    locks: RangeLocks,
    copy_mode: CopyMode,
    size: u64,
}

/// A change a parent makes through the filter.
#[derive(Clone, Copy)]
enum Change<'a> {
    Write(&'a IoBuffer, WriteFlags),
    Zeroes(ZeroFlags),
    Discard,
}

impl Change<'_> {
    async fn apply(self, node: &Node, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Change::Write(buf, flags) => node.write(offset, buf, flags).await,
            Change::Zeroes(flags) => node.write_zeroes(offset, len, flags).await,
            Change::Discard => node.discard(offset, len).await,
        }
    }
}

impl Shared {
    /// A parent's change: made on the source, then written to the target
    /// (write-blocking) or marked dirty for the job.
    async fn change(&self, change: Change<'_>, offset: u64, len: u64) -> io::Result<()> {
        if self.copy_mode == CopyMode::Background {
            let result = change.apply(&self.source.node(), offset, len).await;
            // Even a failed change may have changed part of the range.
            self.dirty.set_range(offset, len);
            return result;
        }
        let _held = self.locks.lock(offset, offset + len, true).await;
        let result = change.apply(&self.source.node(), offset, len).await;
        if result.is_err() {
            self.dirty.set_range(offset, len);
            return result;
        }
        // Discards are not mirrored: what they leave is undefined, and
        // the target need not follow.
        let to_target = match change {
            Change::Discard => Ok(()),
            _ => change.apply(&self.target.node(), offset, len).await,
        };
        if let Err(e) = to_target {
            log::debug!("mirror: guest change not written to the target ({e}), left to the job");
            self.dirty.set_range(offset, len);
        }
        Ok(())
    }

    /// Copies `[offset, offset + len)` from the source to the target; the
    /// range is dirty again if this fails.
    async fn copy(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.dirty.reset_range(offset, len);
        self.copy_taken(offset, len).await
    }

    /// Copies a range whose dirty bits the caller cleared, before the
    /// source is read: a change that completes after the read sets them
    /// again. The range is dirty again if this fails.
    async fn copy_taken(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let _held = self.locks.lock(offset, offset + len, true).await;
        let result = self.copy_unlocked(offset, len).await;
        if result.is_err() {
            self.dirty.set_range(offset, len);
        }
        result
    }

    async fn copy_unlocked(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let source = self.source.node();
        let target = self.target.node();
        let from_source = |error| CopyError {
            side: Side::Source,
            error,
        };
        let to_target = |error| CopyError {
            side: Side::Target,
            error,
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let st: BlockStatus = source
                .block_status(pos, end - pos)
                .await
                .map_err(from_source)?;
            let run = st.len.clamp(1, end - pos);
            if st.zero {
                let flags = ZeroFlags {
                    may_unmap: !st.data,
                    fua: false,
                };
                target
                    .write_zeroes(pos, run, flags)
                    .await
                    .map_err(to_target)?;
            } else {
                let align = source
                    .limits()
                    .request_alignment
                    .max(target.limits().request_alignment)
                    .max(1);
                let buf = IoBuffer::aligned(run as usize, align as usize).map_err(from_source)?;
                source.read(pos, &buf).await.map_err(from_source)?;
                target
                    .write(pos, &buf, WriteFlags::default())
                    .await
                    .map_err(to_target)?;
            }
            pos += run;
        }
        Ok(())
    }

    /// Copies everything dirty, a run at a time (in a drained section,
    /// when the job completes).
    async fn copy_remaining(&self) -> io::Result<()> {
        while let Some((offset, len)) = self.dirty.next_dirty_run(0, MAX_CHUNK) {
            self.copy(offset, len).await.map_err(io::Error::from)?;
        }
        Ok(())
    }
}

/// The filter above the source (QEMU's mirror_top).
struct MirrorTop {
    shared: Arc<Shared>,
}

impl BlockDriver for MirrorTop {
    fn size(&self) -> u64 {
        self.shared.size
    }

    fn filtered_child(&self) -> Option<&Arc<Child>> {
        Some(&self.shared.source)
    }

    /// The source as the parents need it, and read consistently; the
    /// target written, with nobody else writing or resizing it.
    fn child_perm(
        &self,
        role: ChildRole,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        if role == ChildRole::Target {
            (
                Permission::WRITE,
                Permission::WRITE_UNCHANGED | Permission::CONSISTENT_READ,
            )
        } else {
            (
                perm | Permission::CONSISTENT_READ,
                shared & !Permission::RESIZE,
            )
        }
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        let len = buf.len() as u64;
        Box::pin(self.shared.change(Change::Write(buf, flags), offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(self.shared.change(Change::Zeroes(flags), offset, len))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(self.shared.change(Change::Discard, offset, len))
    }
}

/// What is dirty when the job starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Initial {
    /// Everything (sync full).
    All,
    /// Nothing (sync none).
    Nothing,
    /// What the source's layers above depth `n` have, as block status
    /// counts depth (sync top: 2; an active commit: its base's depth).
    Above(u32),
}

struct Mirror {
    shared: Arc<Shared>,
    initial: Initial,
    /// QAPI's JobType: `mirror`, or `commit` for an active commit.
    kind: &'static str,
    source: Arc<Node>,
    target: String,
    filter: String,
    buf_size: u64,
    /// Nodes reopened read-write for the job (an active commit's base):
    /// read-only again if the job is aborted, as QEMU's mirror_exit_common
    /// (a completed job leaves the base writable: it took the active
    /// layer's place, or is a copy of it after a plain cancel).
    read_only_again: Vec<Arc<Node>>,
    /// The job completed (its prepare succeeded).
    completed: AtomicBool,
}

impl Transaction<'_> {
    /// blockdev-mirror: checks the arguments as QEMU does, puts the
    /// filter above the source and makes the job (started when the
    /// transaction commits).
    pub fn blockdev_mirror(
        &mut self,
        o: &MirrorOptions,
        txn: Option<Arc<JobTxn>>,
    ) -> Result<Arc<Job>, Error> {
        let initial = match o.sync {
            SyncMode::Full => Initial::All,
            SyncMode::Top => Initial::Above(2),
            SyncMode::None => Initial::Nothing,
            other => {
                return Err(error(format!(
                    "Sync mode '{}' not supported",
                    other.as_str()
                )))
            }
        };
        self.start_mirror(o, initial, "mirror", txn, Vec::new())
    }

    /// Puts a mirror's filter above the source and makes the job: for
    /// blockdev-mirror and an active block-commit (whose base, if it was
    /// reopened read-write for the job, is in `read_only_again`).
    pub(super) fn start_mirror(
        &mut self,
        o: &MirrorOptions,
        initial: Initial,
        kind: &'static str,
        txn: Option<Arc<JobTxn>>,
        read_only_again: Vec<Arc<Node>>,
    ) -> Result<Arc<Job>, Error> {
        let granularity = o.granularity.unwrap_or(DEFAULT_GRANULARITY);
        if !(512..=MAX_GRANULARITY).contains(&granularity) {
            return Err(error(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if !granularity.is_power_of_two() {
            return Err(error("Parameter 'granularity' expects a power of 2"));
        }
        let buf_size = o.buf_size.unwrap_or(DEFAULT_BUF_SIZE);
        if buf_size == 0 {
            return Err(error("Parameter 'buf-size' expects a positive value"));
        }
        let source = self.find(&o.device)?;
        let target = self.find(&o.target)?;
        if Arc::ptr_eq(&source, &target) {
            return Err(error("Can't mirror node into itself"));
        }
        if source.size() != target.size() {
            return Err(error(format!(
                "Source and target image have different sizes ({} and {} bytes)",
                source.size(),
                target.size()
            )));
        }
        let size = source.size();
        let dirty = DirtyBitmap::new("mirror", size, granularity, true)
            .map_err(|e| error(format!("Cannot create the mirror's dirty bitmap: {e}")))?;
        if initial == Initial::All {
            dirty.set_range(0, size);
        }
        let mut shared = None;
        let filter = self.insert_node(o.filter_node_name.as_deref(), "mirror_top", |name| {
            let parent = Parent::Node(name.to_string());
            let file = Child::new(parent.clone(), ChildRole::File, source.clone());
            let target = Child::new(parent, ChildRole::Target, target.clone());
            let s = Arc::new(Shared {
                source: file.clone(),
                target: target.clone(),
                dirty,
                locks: RangeLocks::default(),
                copy_mode: o.copy_mode,
                size,
            });
            shared = Some(s.clone());
            Ok((Box::new(MirrorTop { shared: s }), vec![file, target]))
        })?;
        let shared = shared.ok_or_else(|| error("mirror filter without state"))?;
        self.replace_node(&source, &filter);
        let driver = Mirror {
            shared,
            initial,
            kind,
            source: source.clone(),
            target: target.name().to_string(),
            filter: filter.name().to_string(),
            buf_size,
            read_only_again,
            completed: AtomicBool::new(false),
        };
        self.create_job(
            &o.job,
            Box::new(driver),
            &[(filter.name(), Permission::NONE, Permission::ALL)],
            txn,
        )
    }
}

impl Mirror {
    /// What the source's layers above depth `depth` have is dirty.
    async fn mark_allocated(&self, job: &Job, depth: u32) -> io::Result<()> {
        let size = self.shared.size;
        let mut offset = 0;
        while offset < size {
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let st = self.source.block_status(offset, size - offset).await?;
            let len = st.len.max(1);
            if st.depth >= 1 && st.depth < depth {
                self.shared.dirty.set_range(offset, len);
            }
            offset += len;
        }
        Ok(())
    }

    /// Takes the next dirty run from `cursor` on, at most `max` bytes,
    /// looking again from 0 once the end is passed: its bits are cleared
    /// (the copy is on its way, and no other copy takes it meanwhile).
    fn take_next_run(&self, cursor: &mut u64, max: u64) -> Option<(u64, u64)> {
        let dirty = &self.shared.dirty;
        let (offset, len) = match dirty.next_dirty_run(*cursor, max) {
            Some(run) => run,
            None if *cursor > 0 => dirty.next_dirty_run(0, max)?,
            None => return None,
        };
        dirty.reset_range(offset, len);
        *cursor = offset + len;
        Some((offset, len))
    }

    /// Copies until the job is cancelled, or ready and asked to end. Up to
    /// MAX_IN_FLIGHT copies and `buf_size` bytes are in flight, a new one
    /// starting as soon as one ends (as QEMU's mirror): under a guest's
    /// writes the dirty runs are small and scattered, and waiting for a
    /// whole batch would leave the window mostly empty.
    async fn mirror(&self, job: &Job) -> io::Result<()> {
        if let Initial::Above(depth) = self.initial {
            self.mark_allocated(job, depth).await?;
        }
        let shared = &self.shared;
        let chunk = MAX_CHUNK.min(self.buf_size).max(shared.dirty.granularity());
        let mut window: InFlight<'_, (u64, Option<CopyError>)> = InFlight::default();
        let mut in_flight_bytes = 0u64;
        let mut copied = 0u64;
        let mut cursor = 0u64;
        let mut ready = false;
        loop {
            // A pause point with nothing in flight: a drained section
            // that pauses the job finds it quiet.
            if window.is_empty() || job.pause_requested() || job.cancel_requested() {
                self.finish(job, &mut window, &mut copied).await?;
                in_flight_bytes = 0;
                job.pause_point().await;
                if job.is_cancelled() {
                    return Ok(());
                }
            }
            let left = shared.dirty.count() + in_flight_bytes;
            job.set_progress(copied, copied + left);
            // Ready once what is left fits one final copy: guest requests
            // run on their own threads, so under a steady write load the
            // bitmap is rarely empty at any instant (QEMU's single thread
            // sees it empty between batches). job-complete and a plain
            // cancel copy the rest in a drained section.
            if !ready && left <= self.buf_size {
                job.transition_to_ready();
                ready = true;
            }
            // A plain cancel of a ready job, or job-complete: done (the
            // last copy, and the switch to the target, come when the job
            // finalizes).
            if ready && (job.cancel_requested() || job.should_complete()) {
                return self.finish(job, &mut window, &mut copied).await;
            }
            while window.len() < MAX_IN_FLIGHT && in_flight_bytes < self.buf_size {
                let max = chunk.min(self.buf_size - in_flight_bytes);
                let Some((offset, len)) = self.take_next_run(&mut cursor, max) else {
                    break;
                };
                in_flight_bytes += len;
                window.push(Box::pin(async move {
                    Ok((len, shared.copy_taken(offset, len).await.err()))
                }));
            }
            let Some(done) = window.next().await else {
                job.sleep(IDLE_POLL).await?;
                continue;
            };
            let (len, failure) = done?;
            in_flight_bytes -= len;
            match failure {
                None => {
                    copied += len;
                    job.rate_limit(len).await;
                }
                // The error policy may stop the job: with nothing in
                // flight, so that no copy holds its range meanwhile.
                Some(failure) => {
                    self.finish(job, &mut window, &mut copied).await?;
                    in_flight_bytes = 0;
                    job.retry_or_fail(failure.side, failure.error).await?;
                }
            }
        }
    }

    /// Waits for every copy in flight; their failures leave their ranges
    /// dirty for a later copy.
    async fn finish(
        &self,
        job: &Job,
        window: &mut InFlight<'_, (u64, Option<CopyError>)>,
        copied: &mut u64,
    ) -> io::Result<()> {
        while let Some(done) = window.next().await {
            if let (len, None) = done? {
                *copied += len;
                job.rate_limit(len).await;
            }
        }
        Ok(())
    }

    /// Takes the filter out, if it is still there, pointing its parents
    /// to `to`, in a drained section that first copies what is left when
    /// `final_copy`.
    fn take_filter_out(
        &self,
        graph: &Graph,
        job: &Job,
        to: Option<&str>,
        final_copy: bool,
    ) -> Result<(), Error> {
        let mut tx = graph.drained_transaction();
        tx.detach_job(job.id());
        let Ok(filter) = tx.find(&self.filter) else {
            return tx.commit();
        };
        if final_copy {
            block_on(self.shared.copy_remaining())
                .and_then(|r| r)
                .map_err(|e| error(format!("Could not copy the last changes: {e}")))?;
        }
        let to = match to {
            Some(name) => tx.find(name)?,
            None => self.source.clone(),
        };
        tx.replace_node(&filter, &to);
        tx.remove(&self.filter)?;
        tx.commit()
    }
}

impl JobDriver for Mirror {
    fn job_type(&self) -> &'static str {
        self.kind
    }

    fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a> {
        Box::pin(self.mirror(job))
    }

    fn completes_on_request(&self) -> bool {
        true
    }

    fn cancel_in_flight(&self) {
        self.shared.target.node().cancel_in_flight();
    }

    /// job-complete: the last changes are copied and every parent of the
    /// source moves to the target, in one drained section. A plain cancel
    /// of a ready job copies the last changes too (the target is a copy of
    /// the source at that moment) and leaves the parents where they are.
    fn prepare(&self, graph: &Graph, job: &Job) -> Result<(), Error> {
        let to = if job.cancel_requested() {
            None
        } else {
            Some(self.target.as_str())
        };
        self.take_filter_out(graph, job, to, true)?;
        self.completed.store(true, Ordering::Release);
        Ok(())
    }

    /// Afterwards, either way: the filter goes, if it is still there, and
    /// its parents go back to the source.
    fn clean(&self, graph: &Graph, job: &Job) {
        if let Err(e) = self.take_filter_out(graph, job, None, false) {
            log::error!("job '{}': cannot remove its filter: {e}", job.id());
        }
        if !self.completed.load(Ordering::Acquire) {
            if let Err(e) = graph.set_read_only(&self.read_only_again, true) {
                log::error!("job '{}': cannot reopen its nodes read-only: {e}", job.id());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::job::JobStatus;
    use crate::Options;

    const MIB: u64 = 1 << 20;

    fn opts(arg: &str) -> Options {
        Options::from_arg(arg, None).unwrap()
    }

    fn setup(dir: &std::path::Path, size: u64) -> Arc<Graph> {
        let source = dir.join("src.raw");
        let target = dir.join("tgt.raw");
        let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        std::fs::write(&source, data).unwrap();
        std::fs::write(&target, vec![0u8; size as usize]).unwrap();
        let graph = Graph::shared();
        for (name, path) in [("src", &source), ("tgt", &target)] {
            let arg = format!(
                "driver=raw,node-name={name},file.driver=file,file.filename={}",
                path.display()
            );
            graph.add(opts(&arg)).unwrap();
        }
        graph
    }

    fn mirror(copy_mode: CopyMode) -> MirrorOptions {
        MirrorOptions {
            job: JobOptions::new("m0"),
            device: "src".into(),
            target: "tgt".into(),
            sync: SyncMode::Full,
            granularity: None,
            buf_size: None,
            copy_mode,
            filter_node_name: Some("mt0".into()),
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn ready_then_complete_moves_the_parents_to_a_full_copy() {
        for mode in [CopyMode::Background, CopyMode::WriteBlocking] {
            let dir = tempfile::tempdir().unwrap();
            let graph = setup(dir.path(), 8 * MIB);
            let mut tx = graph.drained_transaction();
            let job = tx.blockdev_mirror(&mirror(mode), None).unwrap();
            tx.commit().unwrap();
            wait_for("ready", || job.status() == JobStatus::Ready);
            // Writes after ready go to the target too, by the job or the
            // filter.
            let top = graph.find("mt0").unwrap();
            block_on(top.write(
                3 * MIB + 512,
                &IoBuffer::from_vec(vec![0xabu8; 8192]),
                WriteFlags::default(),
            ))
            .unwrap()
            .unwrap();
            job.complete().unwrap();
            wait_for("job gone", || graph.job("m0").is_none());
            assert!(graph.find("mt0").is_err(), "the filter went");
            let source = std::fs::read(dir.path().join("src.raw")).unwrap();
            let target = std::fs::read(dir.path().join("tgt.raw")).unwrap();
            assert!(source == target, "{mode:?}: the target differs");
        }
    }

    #[test]
    fn qemu_checks_and_texts() {
        let dir = tempfile::tempdir().unwrap();
        let graph = setup(dir.path(), MIB);
        let mut tx = graph.transaction();
        let mut o = mirror(CopyMode::Background);
        o.granularity = Some(3 << 10);
        let e = tx.blockdev_mirror(&o, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'granularity' expects a power of 2"
        );
        o.granularity = Some(256);
        let e = tx.blockdev_mirror(&o, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'granularity' expects a value in range [512B, 64MB]"
        );
        o.granularity = None;
        o.target = "src".into();
        let e = tx.blockdev_mirror(&o, None).unwrap_err();
        assert_eq!(e.to_string(), "Can't mirror node into itself");
    }
}
