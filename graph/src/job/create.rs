//! blockdev-create: a job that makes a new image (QEMU's `create` job,
//! which is not a block job and must be dismissed). A `file` image is a
//! host file made (or emptied) at the given size; a `raw` image is its file
//! node resized; a `qcow2` image is written on its file node: header,
//! refcounts and an empty L1 table. The options are checked when the job
//! runs, so a bad one fails the job with QEMU's text, as in QEMU.

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Job, JobDriver, JobOptions};
use crate::aio::{run_blocking, IoFuture};
use crate::buffer::IoBuffer;
use crate::driver::WriteFlags;
use crate::drivers::qcow2::create::{layout, Qcow2CreateOptions};
use crate::error::Error;
use crate::graph::Graph;
use crate::node::Node;
use crate::permission::Permission;
use crate::transaction::Transaction;

/// What blockdev-create makes (QAPI's BlockdevCreateOptions, for the
/// drivers that can).
#[derive(Clone, Debug)]
pub enum CreateOptions {
    /// A host file of `size` bytes.
    File {
        /// Its path.
        filename: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A raw image of `size` bytes on node `file`.
    Raw {
        /// The node that holds the image.
        file: String,
        /// The size.
        size: u64,
    },
    /// A qcow2 image on node `file`.
    Qcow2 {
        /// The node that holds the image.
        file: String,
        /// The image's options.
        options: Qcow2CreateOptions,
    },
}

impl CreateOptions {
    /// The node the image is written on, if any.
    fn file(&self) -> Option<&str> {
        match self {
            CreateOptions::File { .. } => None,
            CreateOptions::Raw { file, .. } | CreateOptions::Qcow2 { file, .. } => Some(file),
        }
    }
}

struct Create {
    options: CreateOptions,
    file: Option<Arc<Node>>,
}

impl Transaction<'_> {
    /// blockdev-create: makes the job (started when the transaction
    /// commits); it holds the image's file node, written and resized.
    pub fn blockdev_create(
        &mut self,
        job: &JobOptions,
        options: CreateOptions,
    ) -> Result<Arc<Job>, Error> {
        let file = options.file().map(|name| self.find(name)).transpose()?;
        let all = Permission::CONSISTENT_READ | Permission::WRITE | Permission::RESIZE;
        let uses: Vec<(&str, Permission, Permission)> = file
            .iter()
            .map(|f| (f.name(), all, Permission::ALL))
            .collect();
        let driver = Create {
            file: file.clone(),
            options,
        };
        self.create_job(job, Box::new(driver), &uses, None)
    }
}

impl Create {
    async fn create(&self) -> io::Result<()> {
        match (&self.options, &self.file) {
            (CreateOptions::File { filename, size }, _) => {
                let (path, size) = (filename.clone(), *size);
                run_blocking(move || {
                    let f = OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("Could not create '{}': {e}", path.display()),
                            )
                        })?;
                    f.set_len(size)?;
                    Ok(0)
                })
                .await?;
                Ok(())
            }
            (CreateOptions::Raw { size, .. }, Some(file)) => file.resize(*size).await,
            (CreateOptions::Qcow2 { options, .. }, Some(file)) => {
                let image = layout(options)
                    .map_err(|text| io::Error::new(io::ErrorKind::InvalidInput, text))?;
                file.resize(image.file_size).await?;
                let align = file.limits().request_alignment.max(1) as usize;
                for (offset, data) in image.writes {
                    let buf = IoBuffer::aligned(data.len(), align)?;
                    buf.copy_from(0, &data);
                    file.write(offset, &buf, WriteFlags::default()).await?;
                }
                file.flush().await
            }
            _ => Err(io::Error::other(
                "blockdev-create: the image's file node is gone",
            )),
        }
    }
}

impl JobDriver for Create {
    fn job_type(&self) -> &'static str {
        "create"
    }

    fn is_block_job(&self) -> bool {
        false
    }

    fn run<'a>(&'a self, _job: &'a Job) -> IoFuture<'a> {
        Box::pin(self.create())
    }

    /// The image's node is free again once the job ends.
    fn clean(&self, graph: &Graph, job: &Job) {
        if let Err(e) = graph.release_job(job.id()) {
            log::error!("job '{}': cannot release its node: {e}", job.id());
        }
    }
}
