//! block-commit, as QEMU's: the data of the layers from `top` down to just
//! above `base` is written into `base`, then those layers leave the
//! chain. An intermediate commit copies once and points the overlay above
//! `top` to `base` (graph edge and image header). An active commit (`top`
//! is the layer the guest writes) is a mirror from the active layer into
//! `base` that copies only what lies above `base`: ready once in sync,
//! job-complete moves every parent of the active layer to `base`.
//!
//! A read-only `base` (a backing file opened from an image's header, say)
//! is reopened read-write for the job's duration, as QEMU's commit_start,
//! and so is the overlay above an intermediate commit's top (its image's
//! backing file name changes); both are read-only again when the job ends.
//! An active commit that completes (with job-complete, or a plain cancel
//! once ready) leaves the base writable, as QEMU's mirror does: it took the
//! active layer's place, or is a copy of it; an aborted one makes it
//! read-only again.

use std::io;
use std::sync::Arc;

use super::mirror::Initial;
use super::{CopyMode, Job, JobDriver, JobOptions, MirrorOptions, Side, SyncMode};
use crate::aio::IoFuture;
use crate::buffer::IoBuffer;
use crate::driver::WriteFlags;
use crate::error::Error;
use crate::graph::Graph;
use crate::node::Node;
use crate::permission::Permission;
use crate::transaction::Transaction;

/// block-commit's arguments.
#[derive(Clone, Debug)]
pub struct CommitOptions {
    /// The job's options (`on-error` is both error policies).
    pub job: JobOptions,
    /// The active layer of the chain.
    pub device: String,
    /// The highest layer to commit; the active layer if none.
    pub top: Option<ChainLayer>,
    /// The layer to commit into; the bottom of the chain if none.
    pub base: Option<ChainLayer>,
    /// The backing file name to write in the overlay instead of the base's.
    pub backing_file: Option<String>,
    /// The node-name of an active commit's filter.
    pub filter_node_name: Option<String>,
}

/// A layer of a backing chain as block-commit names it: `top-node` and
/// `base-node`, or `top` and `base`.
#[derive(Clone, Debug)]
pub enum ChainLayer {
    /// By node-name.
    Node(String),
    /// By file name, as in the backing chain.
    File(String),
}

/// Bytes copied at once, at most.
const CHUNK: u64 = 1 << 20;
fn error(text: impl Into<String>) -> Error {
    Error::OpenFailed(text.into())
}

/// An intermediate commit.
struct Commit {
    top: Arc<Node>,
    base: Arc<Node>,
    overlay: Arc<Node>,
    /// The base's depth below `top`, as block status counts it.
    base_depth: u32,
    backing_file: Option<String>,
    /// The nodes reopened read-write for the job.
    read_only_again: Vec<Arc<Node>>,
}

impl Transaction<'_> {
    /// block-commit: checks the arguments as QEMU does and makes the job
    /// (started when the transaction commits).
    pub fn block_commit(&mut self, o: &CommitOptions) -> Result<Arc<Job>, Error> {
        let active = self.find(&o.device)?;
        let layers = active.backing_chain();
        let top = match &o.top {
            Some(ChainLayer::Node(name)) => self.find(name)?,
            Some(ChainLayer::File(name)) if active.filename().as_deref() == Some(name) => {
                active.clone()
            }
            Some(ChainLayer::File(name)) => active
                .find_backing_image(name)
                .ok_or_else(|| error(format!("Top image file {name} not found")))?,
            None => active.clone(),
        };
        let top_at = layers
            .iter()
            .position(|n| Arc::ptr_eq(n, &top))
            .ok_or_else(|| {
                error(format!(
                    "Top image '{}' is not in this backing file chain",
                    top.name()
                ))
            })?;
        let base = match &o.base {
            Some(ChainLayer::Node(name)) => self.find(name)?,
            Some(ChainLayer::File(name)) => top
                .find_backing_image(name)
                .ok_or_else(|| error(format!("Can't find '{name}' in the backing chain")))?,
            None => layers
                .last()
                .cloned()
                .ok_or_else(|| error("The chain has no layers"))?,
        };
        let base_at = layers
            .iter()
            .position(|n| Arc::ptr_eq(n, &base))
            .ok_or_else(|| {
                error(format!(
                    "Node '{}' is not a backing image of '{}'",
                    base.name(),
                    o.device
                ))
            })?;
        if base_at == top_at {
            return Err(error("cannot commit an image into itself"));
        }
        if base_at < top_at {
            return Err(error(format!(
                "Node '{}' is not a backing image of '{}'",
                base.name(),
                top.name()
            )));
        }
        if base.size() < top.size() {
            return Err(error(format!(
                "Base '{}' is smaller than the top image: resize it first",
                base.name()
            )));
        }
        let base_depth = (base_at - top_at) as u32 + 1;
        let mut read_only_again = Vec::new();
        let overlay = top_at.checked_sub(1).map(|i| layers[i].clone());
        for node in [Some(base.clone()), overlay].into_iter().flatten() {
            if node.read_only() {
                self.set_read_only(&node, false)?;
                read_only_again.push(node);
            }
        }
        if top_at == 0 {
            let mirror = MirrorOptions {
                job: o.job.clone(),
                device: top.name().to_string(),
                target: base.name().to_string(),
                sync: SyncMode::Full,
                granularity: None,
                buf_size: None,
                copy_mode: CopyMode::Background,
                filter_node_name: o.filter_node_name.clone(),
            };
            let initial = Initial::Above(base_depth);
            return self.start_mirror(&mirror, initial, "commit", None, read_only_again);
        }
        let driver = Commit {
            top: top.clone(),
            base: base.clone(),
            overlay: layers[top_at - 1].clone(),
            base_depth,
            backing_file: o.backing_file.clone(),
            read_only_again,
        };
        let uses = [
            (top.name(), Permission::CONSISTENT_READ, Permission::ALL),
            (
                base.name(),
                Permission::CONSISTENT_READ | Permission::WRITE,
                Permission::ALL,
            ),
        ];
        self.create_job(&o.job, Box::new(driver), &uses, None)
    }
}

impl Commit {
    async fn commit(&self, job: &Job) -> io::Result<()> {
        let size = self.top.size();
        let align = self
            .top
            .limits()
            .request_alignment
            .max(self.base.limits().request_alignment)
            .max(1) as usize;
        let mut offset = 0;
        while offset < size {
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let st = self
                .top
                .block_status(offset, (size - offset).min(CHUNK))
                .await?;
            let len = st.len.clamp(1, size - offset);
            if st.depth >= 1 && st.depth < self.base_depth {
                let buf = IoBuffer::aligned(len as usize, align)?;
                let copied = match self.top.read(offset, &buf).await {
                    Err(e) => Err((Side::Source, e)),
                    Ok(()) => self
                        .base
                        .write(offset, &buf, WriteFlags::default())
                        .await
                        .map_err(|e| (Side::Target, e)),
                };
                if let Err((side, e)) = copied {
                    job.retry_or_fail(side, e).await?;
                    continue;
                }
                job.rate_limit(len).await;
            }
            offset += len;
            job.set_progress(offset, size);
        }
        self.base.flush().await
    }
}

impl JobDriver for Commit {
    fn job_type(&self) -> &'static str {
        "commit"
    }

    fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a> {
        Box::pin(self.commit(job))
    }

    /// The overlay's backing file becomes the base, in the graph and in
    /// its image, in one drained step; the layers in between leave.
    fn prepare(&self, graph: &Graph, job: &Job) -> Result<(), Error> {
        let mut tx = graph.drained_transaction();
        tx.detach_job(job.id());
        tx.change_backing_file(
            &self.overlay,
            Some(self.base.clone()),
            self.backing_file.clone(),
        )?;
        tx.commit()
    }

    /// The job lets its nodes go; those it reopened read-write are
    /// read-only again (QEMU's commit_clean).
    fn clean(&self, graph: &Graph, job: &Job) {
        if let Err(e) = graph.release_job(job.id()) {
            log::error!("job '{}': cannot release its nodes: {e}", job.id());
        }
        if let Err(e) = graph.set_read_only(&self.read_only_again, true) {
            log::error!("job '{}': cannot reopen its nodes read-only: {e}", job.id());
        }
    }
}
