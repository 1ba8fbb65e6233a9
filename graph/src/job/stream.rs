//! block-stream, as QEMU's: the data the layers between a node and its
//! base hold is copied into the node (where the node has nothing of its
//! own), then the node's backing file becomes the base, in its graph
//! edge and in its image's header; the layers in between go, if nothing
//! else uses them. Without a base the whole chain is copied and the node
//! ends with no backing file. The guest keeps writing meanwhile: a copy
//! never overwrites what the guest wrote (the node's driver holds the
//! range while it copies).

use std::io;
use std::sync::Arc;

use super::{Job, JobDriver, JobOptions, Side};
use crate::aio::IoFuture;
use crate::error::Error;
use crate::graph::Graph;
use crate::node::Node;
use crate::permission::Permission;
use crate::transaction::Transaction;

/// block-stream's arguments.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The job's options (`on-error` is both error policies).
    pub job: JobOptions,
    /// The node to stream into.
    pub device: String,
    /// The layer that stays below it, or none.
    pub base: Option<StreamBase>,
    /// The backing file name to write in the image instead of the base's.
    pub backing_file: Option<String>,
}

/// How block-stream names the layer that stays (QEMU's `base-node`,
/// `base` and `bottom`).
#[derive(Clone, Debug)]
pub enum StreamBase {
    /// The base by node-name.
    Node(String),
    /// The base by file name, as in the backing chain.
    File(String),
    /// The lowest layer to copy, by node-name: the base is its backing.
    Bottom(String),
}

/// Bytes copied at once, at most.
const CHUNK: u64 = 4 << 20;
fn error(text: impl Into<String>) -> Error {
    Error::OpenFailed(text.into())
}

struct Stream {
    top: Arc<Node>,
    base: Option<Arc<Node>>,
    /// Where the base is in the chain, as block status counts depth (the
    /// node itself is 1); past the end without a base.
    base_depth: u32,
    backing_file: Option<String>,
}

impl Transaction<'_> {
    /// block-stream: checks the arguments as QEMU does and makes the job
    /// (started when the transaction commits).
    pub fn block_stream(&mut self, o: &StreamOptions) -> Result<Arc<Job>, Error> {
        let top = self.find(&o.device)?;
        let layers = top.backing_chain();
        let base = match &o.base {
            None => None,
            Some(StreamBase::Node(name)) => Some(self.find(name)?),
            Some(StreamBase::File(name)) => Some(
                top.find_backing_image(name)
                    .ok_or_else(|| error(format!("Can't find '{name}' in the backing chain")))?,
            ),
            Some(StreamBase::Bottom(name)) => {
                let bottom = self.find(name)?;
                if bottom.is_filter() {
                    return Err(error(format!(
                        "Node '{name}' is a filter, use a non-filter node as 'bottom'"
                    )));
                }
                if !layers.iter().any(|n| Arc::ptr_eq(n, &bottom)) {
                    return Err(error(format!(
                        "Node '{name}' is not in a chain starting from '{}'",
                        o.device
                    )));
                }
                bottom.backing()
            }
        };
        let base_depth = match &base {
            Some(base) => {
                let at = layers
                    .iter()
                    .skip(1)
                    .position(|n| Arc::ptr_eq(n, base))
                    .ok_or_else(|| {
                        error(format!(
                            "Node '{}' is not a backing image of '{}'",
                            base.name(),
                            o.device
                        ))
                    })?;
                at as u32 + 2
            }
            None => u32::MAX,
        };
        if o.backing_file.is_some() && base.is_none() {
            return Err(error(
                "backing file specified, but streaming the entire chain",
            ));
        }
        if top.read_only() {
            return Err(error(format!("Node '{}' is read-only", o.device)));
        }
        let driver = Stream {
            top: top.clone(),
            base,
            base_depth,
            backing_file: o.backing_file.clone(),
        };
        let uses = [(
            top.name(),
            Permission::CONSISTENT_READ | Permission::WRITE_UNCHANGED,
            Permission::ALL,
        )];
        self.create_job(&o.job, Box::new(driver), &uses, None)
    }
}

impl Stream {
    async fn stream(&self, job: &Job) -> io::Result<()> {
        let size = self.top.size();
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
            if st.depth > 1 && st.depth < self.base_depth {
                if let Err(e) = self.top.populate(offset, len).await {
                    job.retry_or_fail(Side::Target, e).await?;
                    continue;
                }
                job.rate_limit(len).await;
            }
            offset += len;
            job.set_progress(offset, size);
        }
        Ok(())
    }
}

impl JobDriver for Stream {
    fn job_type(&self) -> &'static str {
        "stream"
    }

    fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a> {
        Box::pin(self.stream(job))
    }

    /// The node's backing file becomes the base (or none), in the graph
    /// and in the image, in one drained step.
    fn prepare(&self, graph: &Graph, job: &Job) -> Result<(), Error> {
        let mut tx = graph.drained_transaction();
        tx.detach_job(job.id());
        tx.change_backing_file(&self.top, self.base.clone(), self.backing_file.clone())?;
        tx.commit()
    }

    fn clean(&self, graph: &Graph, job: &Job) {
        if let Err(e) = graph.release_job(job.id()) {
            log::error!("job '{}': cannot release its node: {e}", job.id());
        }
    }
}
