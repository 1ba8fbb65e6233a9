//! The job commands: query-jobs and query-block-jobs, the job-* and
//! block-job-* verbs, blockdev-mirror, blockdev-create, and the arguments
//! of blockdev-backup, which is also a transaction action.

use blkgraph_ctl::{ErrorClass, QmpError};
use blkgraph_graph::job::{
    BackupOptions, BitmapMode, CommitOptions, Compression, CopyMode, CreateOptions, Job,
    JobOptions, MirrorOptions, OnError, Qcow2CreateOptions, StreamOptions, SyncMode,
};
use blkgraph_graph::Graph;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::{generic, no_arguments, parse};

/// A job command with checked arguments.
pub(crate) enum JobCommand {
    QueryJobs,
    QueryBlockJobs,
    /// job-pause, block-job-pause.
    Pause {
        id: String,
        block: bool,
    },
    /// job-resume, block-job-resume.
    Resume {
        id: String,
        block: bool,
    },
    /// job-cancel, block-job-cancel (with `force`).
    Cancel {
        id: String,
        block: bool,
        force: bool,
    },
    /// job-complete, block-job-complete.
    Complete {
        id: String,
        block: bool,
    },
    /// job-finalize, block-job-finalize.
    Finalize {
        id: String,
        block: bool,
    },
    /// job-dismiss, block-job-dismiss.
    Dismiss {
        id: String,
        block: bool,
    },
    /// block-job-set-speed.
    SetSpeed {
        id: String,
        speed: u64,
    },
    /// blockdev-mirror.
    Mirror(Box<MirrorOptions>),
    /// block-stream.
    Stream(StreamOptions),
    /// block-commit.
    Commit(CommitOptions),
    /// blockdev-create.
    Create {
        job: JobOptions,
        options: CreateOptions,
    },
}

/// The job commands, for query-commands.
pub(crate) const JOB_COMMANDS: &[&str] = &[
    "query-jobs",
    "query-block-jobs",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "block-job-set-speed",
    "blockdev-backup",
    "blockdev-mirror",
    "blockdev-create",
    "block-stream",
    "block-commit",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobId {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Device {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockJobCancel {
    device: String,
    #[serde(default)]
    force: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpeed {
    device: String,
    speed: i64,
}

impl JobCommand {
    /// Parses job command `name`; `None` if it is not one.
    pub(crate) fn parse(name: &str, args: Map<String, Value>) -> Option<Result<Self, QmpError>> {
        let job = |args| parse::<JobId>(args).map(|a| a.id);
        let block = |args| parse::<Device>(args).map(|a| a.device);
        Some(match name {
            "query-jobs" => no_arguments(args).map(|()| JobCommand::QueryJobs),
            "query-block-jobs" => no_arguments(args).map(|()| JobCommand::QueryBlockJobs),
            "job-pause" => job(args).map(|id| JobCommand::Pause { id, block: false }),
            "job-resume" => job(args).map(|id| JobCommand::Resume { id, block: false }),
            "job-cancel" => job(args).map(|id| JobCommand::Cancel {
                id,
                block: false,
                force: true,
            }),
            "job-complete" => job(args).map(|id| JobCommand::Complete { id, block: false }),
            "job-finalize" => job(args).map(|id| JobCommand::Finalize { id, block: false }),
            "job-dismiss" => job(args).map(|id| JobCommand::Dismiss { id, block: false }),
            "block-job-pause" => block(args).map(|id| JobCommand::Pause { id, block: true }),
            "block-job-resume" => block(args).map(|id| JobCommand::Resume { id, block: true }),
            "block-job-cancel" => parse::<BlockJobCancel>(args).map(|a| JobCommand::Cancel {
                id: a.device,
                block: true,
                force: a.force.unwrap_or(false),
            }),
            "block-job-complete" => block(args).map(|id| JobCommand::Complete { id, block: true }),
            "block-job-finalize" => parse::<JobId>(args).map(|a| JobCommand::Finalize {
                id: a.id,
                block: true,
            }),
            "block-job-dismiss" => parse::<JobId>(args).map(|a| JobCommand::Dismiss {
                id: a.id,
                block: true,
            }),
            "block-job-set-speed" => parse::<SetSpeed>(args).and_then(|a| {
                let speed = u64::try_from(a.speed)
                    .map_err(|_| generic("Parameter 'speed' expects a non-negative value"))?;
                Ok(JobCommand::SetSpeed {
                    id: a.device,
                    speed,
                })
            }),
            "blockdev-mirror" => parse_mirror(args).map(|o| JobCommand::Mirror(Box::new(o))),
            "blockdev-create" => parse_create(args),
            "block-stream" => parse_stream(args).map(JobCommand::Stream),
            "block-commit" => parse_commit(args).map(JobCommand::Commit),
            _ => return None,
        })
    }

    /// Runs the command.
    pub(crate) fn run(self, graph: &Graph) -> Result<Value, QmpError> {
        let find = |id: &str, block: bool| -> Result<std::sync::Arc<Job>, QmpError> {
            graph.job(id).ok_or_else(|| {
                if block {
                    QmpError {
                        class: ErrorClass::DeviceNotActive,
                        desc: format!("Block job '{id}' not found"),
                    }
                } else {
                    generic("Job not found")
                }
            })
        };
        let done = |r: Result<(), blkgraph_graph::Error>| r.map(|()| json!({})).map_err(generic);
        match self {
            JobCommand::QueryJobs => Ok(Value::Array(
                graph.jobs().iter().map(|j| j.info()).collect(),
            )),
            JobCommand::QueryBlockJobs => Ok(Value::Array(
                graph
                    .jobs()
                    .iter()
                    .filter(|j| j.is_block_job())
                    .map(|j| j.block_info())
                    .collect(),
            )),
            JobCommand::Pause { id, block } => done(find(&id, block)?.pause()),
            JobCommand::Resume { id, block } => done(find(&id, block)?.resume()),
            JobCommand::Cancel { id, block, force } => done(find(&id, block)?.cancel(force)),
            JobCommand::Complete { id, block } => done(find(&id, block)?.complete()),
            JobCommand::Finalize { id, block } => done(find(&id, block)?.finalize()),
            JobCommand::Dismiss { id, block } => done(find(&id, block)?.dismiss()),
            JobCommand::SetSpeed { id, speed } => done(find(&id, true)?.set_speed(speed)),
            JobCommand::Mirror(o) => {
                let mut tx = graph.drained_transaction();
                tx.blockdev_mirror(&o, None).map_err(generic)?;
                done(tx.commit())
            }
            JobCommand::Stream(o) => {
                let mut tx = graph.transaction();
                tx.block_stream(&o).map_err(generic)?;
                done(tx.commit())
            }
            JobCommand::Commit(o) => {
                let mut tx = graph.drained_transaction();
                tx.block_commit(&o).map_err(generic)?;
                done(tx.commit())
            }
            JobCommand::Create { job, options } => {
                let mut tx = graph.transaction();
                tx.blockdev_create(&job, options).map_err(generic)?;
                done(tx.commit())
            }
        }
    }
}

/// The job options of a block job command; the id defaults to the
/// device's name, as QEMU's.
fn job_options(
    job_id: Option<String>,
    device: &str,
    speed: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
) -> Result<JobOptions, QmpError> {
    let speed = u64::try_from(speed.unwrap_or(0))
        .map_err(|_| generic("Parameter 'speed' expects a non-negative value"))?;
    Ok(JobOptions {
        id: job_id.unwrap_or_else(|| device.to_string()),
        speed,
        auto_finalize: auto_finalize.unwrap_or(true),
        auto_dismiss: auto_dismiss.unwrap_or(true),
        on_source_error: on_source_error.unwrap_or_default(),
        on_target_error: on_target_error.unwrap_or_default(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockdevBackup {
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    on_source_error: Option<OnError>,
    #[serde(default)]
    on_target_error: Option<OnError>,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
    device: String,
    target: String,
    sync: SyncMode,
    #[serde(default)]
    bitmap: Option<String>,
    #[serde(default)]
    bitmap_mode: Option<BitmapMode>,
    #[serde(default)]
    compress: Option<bool>,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    x_perf: Option<Value>,
    #[serde(default)]
    discard_source: Option<bool>,
}

/// Parses blockdev-backup's arguments.
pub(crate) fn parse_backup(args: Map<String, Value>) -> Result<BackupOptions, QmpError> {
    let a: BlockdevBackup = parse(args)?;
    if a.compress == Some(true) {
        return Err(generic(
            "Compression is not supported for this drive's target",
        ));
    }
    if a.discard_source == Some(true) {
        return Err(generic("Parameter 'discard-source' is not supported"));
    }
    let _tuning = a.x_perf;
    Ok(BackupOptions {
        job: job_options(
            a.job_id,
            &a.device,
            a.speed,
            a.on_source_error,
            a.on_target_error,
            a.auto_finalize,
            a.auto_dismiss,
        )?,
        device: a.device,
        target: a.target,
        sync: a.sync,
        bitmap: a.bitmap,
        bitmap_mode: a.bitmap_mode,
        filter_node_name: a.filter_node_name,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockdevMirror {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    target: String,
    #[serde(default)]
    replaces: Option<String>,
    sync: SyncMode,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    granularity: Option<u64>,
    #[serde(default)]
    buf_size: Option<i64>,
    #[serde(default)]
    on_source_error: Option<OnError>,
    #[serde(default)]
    on_target_error: Option<OnError>,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    copy_mode: Option<CopyMode>,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// Parses blockdev-mirror's arguments.
fn parse_mirror(args: Map<String, Value>) -> Result<MirrorOptions, QmpError> {
    let a: BlockdevMirror = parse(args)?;
    if a.replaces.is_some() {
        return Err(generic("Parameter 'replaces' is not supported"));
    }
    let buf_size = match a.buf_size {
        Some(n) => Some(
            u64::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| generic("Parameter 'buf-size' expects a positive value"))?,
        ),
        None => None,
    };
    Ok(MirrorOptions {
        job: job_options(
            a.job_id,
            &a.device,
            a.speed,
            a.on_source_error,
            a.on_target_error,
            a.auto_finalize,
            a.auto_dismiss,
        )?,
        device: a.device,
        target: a.target,
        sync: a.sync,
        granularity: a.granularity,
        buf_size,
        copy_mode: a.copy_mode.unwrap_or_default(),
        filter_node_name: a.filter_node_name,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockdevCreate {
    job_id: String,
    options: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CreateFile {
    filename: String,
    size: u64,
    #[serde(default)]
    preallocation: Option<String>,
    #[serde(default)]
    nocow: Option<bool>,
    #[serde(default)]
    extent_size_hint: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CreateRaw {
    file: String,
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CreateQcow2 {
    file: Value,
    size: u64,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    backing_file: Option<String>,
    #[serde(default)]
    backing_fmt: Option<String>,
    #[serde(default)]
    encrypt: Option<Value>,
    #[serde(default)]
    cluster_size: Option<u64>,
    #[serde(default)]
    preallocation: Option<String>,
    #[serde(default)]
    lazy_refcounts: Option<bool>,
    #[serde(default)]
    refcount_bits: Option<u32>,
    #[serde(default)]
    compression_type: Option<String>,
    #[serde(default)]
    extended_l2: Option<bool>,
    #[serde(default)]
    data_file: Option<Value>,
    #[serde(default)]
    data_file_raw: Option<bool>,
}

fn preallocation_off(mode: Option<String>) -> Result<(), QmpError> {
    match mode.as_deref() {
        None | Some("off") => Ok(()),
        Some(other) => Err(generic(format!("Unsupported preallocation mode '{other}'"))),
    }
}

/// Parses blockdev-create's arguments: the job is not a block job and
/// must be dismissed, as QEMU's.
fn parse_create(args: Map<String, Value>) -> Result<JobCommand, QmpError> {
    let a: BlockdevCreate = parse(args)?;
    let mut options = a.options;
    let driver = match options.remove("driver") {
        Some(Value::String(d)) => d,
        _ => return Err(generic("Parameter 'driver' is missing")),
    };
    let options = match driver.as_str() {
        "file" => {
            let o: CreateFile = parse(options)?;
            preallocation_off(o.preallocation)?;
            let _accepted = (o.nocow, o.extent_size_hint);
            CreateOptions::File {
                filename: o.filename.into(),
                size: o.size,
            }
        }
        "raw" => {
            let o: CreateRaw = parse(options)?;
            CreateOptions::Raw {
                file: o.file,
                size: o.size,
            }
        }
        "qcow2" => {
            let o: CreateQcow2 = parse(options)?;
            preallocation_off(o.preallocation)?;
            if o.encrypt.is_some() {
                return Err(generic(
                    "Encryption is not supported by blkgraph's qcow2 driver",
                ));
            }
            if o.data_file.is_some() || o.data_file_raw.is_some() {
                return Err(generic(
                    "External data files are not supported by blkgraph's qcow2 driver",
                ));
            }
            let Value::String(file) = o.file else {
                return Err(generic(
                    "Parameter 'file' must be the node-name of an open file node",
                ));
            };
            let mut image = Qcow2CreateOptions::new(o.size);
            image.version = match o.version.as_deref() {
                None | Some("v3") => 3,
                Some("v2") => 2,
                Some(other) => {
                    return Err(generic(format!(
                        "Parameter 'version' does not accept value '{other}'"
                    )))
                }
            };
            image.compression = match o.compression_type.as_deref() {
                None | Some("zlib") => Compression::Zlib,
                Some("zstd") => Compression::Zstd,
                Some(other) => {
                    return Err(generic(format!(
                        "Parameter 'compression-type' does not accept value '{other}'"
                    )))
                }
            };
            image.cluster_size = o.cluster_size.unwrap_or(image.cluster_size);
            image.refcount_bits = o.refcount_bits.unwrap_or(image.refcount_bits);
            image.lazy_refcounts = o.lazy_refcounts.unwrap_or(false);
            image.extended_l2 = o.extended_l2.unwrap_or(false);
            image.backing_file = o.backing_file;
            image.backing_fmt = o.backing_fmt;
            CreateOptions::Qcow2 {
                file,
                options: image,
            }
        }
        other => {
            return Err(generic(format!(
                "Driver '{other}' does not support blockdev-create"
            )))
        }
    };
    let mut job = JobOptions::new(&a.job_id);
    job.auto_dismiss = false;
    Ok(JobCommand::Create { job, options })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockStream {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    base_node: Option<String>,
    #[serde(default)]
    backing_file: Option<String>,
    #[serde(default)]
    backing_mask_protocol: Option<bool>,
    #[serde(default)]
    bottom: Option<String>,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    on_error: Option<OnError>,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// Parses block-stream's arguments.
fn parse_stream(args: Map<String, Value>) -> Result<StreamOptions, QmpError> {
    let a: BlockStream = parse(args)?;
    if a.base.is_some() && a.base_node.is_some() {
        return Err(generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    for (given, name) in [
        (a.base.is_some(), "base"),
        (a.bottom.is_some(), "bottom"),
        (a.filter_node_name.is_some(), "filter-node-name"),
    ] {
        if given {
            return Err(generic(format!(
                "Parameter '{name}' is not supported by blkgraph's block-stream (use 'base-node')"
            )));
        }
    }
    let _accepted = a.backing_mask_protocol;
    Ok(StreamOptions {
        job: job_options(
            a.job_id,
            &a.device,
            a.speed,
            a.on_error,
            a.on_error,
            a.auto_finalize,
            a.auto_dismiss,
        )?,
        device: a.device,
        base_node: a.base_node,
        backing_file: a.backing_file,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockCommit {
    #[serde(default)]
    job_id: Option<String>,
    device: String,
    #[serde(default)]
    base_node: Option<String>,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    top_node: Option<String>,
    #[serde(default)]
    top: Option<String>,
    #[serde(default)]
    backing_file: Option<String>,
    #[serde(default)]
    backing_mask_protocol: Option<bool>,
    #[serde(default)]
    speed: Option<i64>,
    #[serde(default)]
    on_error: Option<OnError>,
    #[serde(default)]
    filter_node_name: Option<String>,
    #[serde(default)]
    auto_finalize: Option<bool>,
    #[serde(default)]
    auto_dismiss: Option<bool>,
}

/// Parses block-commit's arguments.
fn parse_commit(args: Map<String, Value>) -> Result<CommitOptions, QmpError> {
    let a: BlockCommit = parse(args)?;
    if a.base.is_some() && a.base_node.is_some() {
        return Err(generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if a.top.is_some() && a.top_node.is_some() {
        return Err(generic(
            "'top' and 'top-node' cannot be specified at the same time",
        ));
    }
    for (given, name, instead) in [
        (a.base.is_some(), "base", "base-node"),
        (a.top.is_some(), "top", "top-node"),
    ] {
        if given {
            return Err(generic(format!(
                "Parameter '{name}' is not supported by blkgraph's block-commit (use '{instead}')"
            )));
        }
    }
    let _accepted = a.backing_mask_protocol;
    Ok(CommitOptions {
        job: job_options(
            a.job_id,
            &a.device,
            a.speed,
            a.on_error,
            a.on_error,
            a.auto_finalize,
            a.auto_dismiss,
        )?,
        device: a.device,
        top_node: a.top_node,
        base_node: a.base_node,
        backing_file: a.backing_file,
        filter_node_name: a.filter_node_name,
    })
}
