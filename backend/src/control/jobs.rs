//! The job commands: query-jobs and query-block-jobs, the job-* and
//! block-job-* verbs, blockdev-mirror, blockdev-create, block-stream,
//! block-commit, and the arguments of blockdev-backup, which is also a
//! transaction action.

use std::sync::Arc;

use blkgraph_ctl::{ErrorClass, NamedFds, QmpError};
use blkgraph_graph::job::{
    BackupOptions, BitmapMode, ChainLayer, CommitOptions, Compression, CopyMode, CreateOptions,
    Job, JobOptions, MirrorOptions, OnError, Qcow2CreateOptions, StreamBase, StreamOptions,
    SyncMode,
};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::args::{generic, parse};
use super::Control;

/// The job a verb acts on.
pub(super) struct JobRef {
    id: String,
    /// Named as a block job (`device` of a block-job-* command), whose
    /// "not found" error QEMU words differently.
    block: bool,
}

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

/// The arguments of job-*: the job's `id`.
pub(super) fn parse_job(args: Map<String, Value>) -> Result<JobRef, QmpError> {
    parse::<JobId>(args).map(|a| JobRef {
        id: a.id,
        block: false,
    })
}

/// The arguments of block-job-*: the job's `device`.
pub(super) fn parse_block_job(args: Map<String, Value>) -> Result<JobRef, QmpError> {
    parse::<Device>(args).map(|a| JobRef {
        id: a.device,
        block: true,
    })
}

/// The arguments of block-job-finalize and block-job-dismiss, which name
/// the job by `id` as the job-* commands do.
pub(super) fn parse_block_job_id(args: Map<String, Value>) -> Result<JobRef, QmpError> {
    parse::<JobId>(args).map(|a| JobRef {
        id: a.id,
        block: true,
    })
}

/// The job `r` names.
fn find(control: &Control, r: &JobRef) -> Result<Arc<Job>, QmpError> {
    control.graph.job(&r.id).ok_or_else(|| {
        if r.block {
            QmpError {
                class: ErrorClass::DeviceNotActive,
                desc: format!("Block job '{}' not found", r.id),
            }
        } else {
            generic("Job not found")
        }
    })
}

/// Runs `verb` on the job `r` names.
pub(super) fn verb(
    control: &Control,
    r: JobRef,
    verb: fn(&Arc<Job>) -> Result<(), blkgraph_graph::Error>,
) -> Result<Value, QmpError> {
    verb(&find(control, &r)?).map_err(generic)?;
    Ok(Value::Object(Map::new()))
}

/// query-jobs.
pub(super) fn query_jobs(control: &Control, (): (), _: &mut NamedFds) -> Result<Value, QmpError> {
    Ok(Value::Array(
        control.graph.jobs().iter().map(|j| j.info()).collect(),
    ))
}

/// query-block-jobs: the jobs that are block jobs (not blockdev-create's).
pub(super) fn query_block_jobs(
    control: &Control,
    (): (),
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    Ok(Value::Array(
        control
            .graph
            .jobs()
            .iter()
            .filter(|j| j.is_block_job())
            .map(|j| j.block_info())
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockJobCancelArgs {
    device: String,
    #[serde(default)]
    force: Option<bool>,
}

/// job-cancel's and block-job-cancel's arguments: the job, and whether a
/// job that is ready is cancelled rather than completed.
pub(super) struct Cancel {
    job: JobRef,
    force: bool,
}

/// job-cancel's arguments: a job-* cancel always cancels.
pub(super) fn parse_job_cancel(args: Map<String, Value>) -> Result<Cancel, QmpError> {
    parse_job(args).map(|job| Cancel { job, force: true })
}

/// block-job-cancel's arguments.
pub(super) fn parse_block_job_cancel(args: Map<String, Value>) -> Result<Cancel, QmpError> {
    parse::<BlockJobCancelArgs>(args).map(|a| Cancel {
        job: JobRef {
            id: a.device,
            block: true,
        },
        force: a.force.unwrap_or(false),
    })
}

/// job-cancel, block-job-cancel.
pub(super) fn cancel(control: &Control, c: Cancel, _: &mut NamedFds) -> Result<Value, QmpError> {
    find(control, &c.job)?.cancel(c.force).map_err(generic)?;
    Ok(Value::Object(Map::new()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetSpeedArgs {
    device: String,
    speed: i64,
}

/// block-job-set-speed's arguments.
pub(super) struct SetSpeed {
    job: JobRef,
    speed: u64,
}

/// Parses block-job-set-speed's arguments.
pub(super) fn parse_set_speed(args: Map<String, Value>) -> Result<SetSpeed, QmpError> {
    let a: SetSpeedArgs = parse(args)?;
    Ok(SetSpeed {
        job: JobRef {
            id: a.device,
            block: true,
        },
        speed: speed(a.speed)?,
    })
}

/// block-job-set-speed.
pub(super) fn set_speed(
    control: &Control,
    s: SetSpeed,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    find(control, &s.job)?.set_speed(s.speed).map_err(generic)?;
    Ok(Value::Object(Map::new()))
}

/// A rate limit in bytes per second (0: none).
fn speed(speed: i64) -> Result<u64, QmpError> {
    u64::try_from(speed).map_err(|_| generic("Parameter 'speed' expects a non-negative value"))
}

/// The job options of a block job command; the id defaults to the
/// device's name, as QEMU's.
fn job_options(
    job_id: Option<String>,
    device: &str,
    speed_limit: Option<i64>,
    on_source_error: Option<OnError>,
    on_target_error: Option<OnError>,
    auto_finalize: Option<bool>,
    auto_dismiss: Option<bool>,
) -> Result<JobOptions, QmpError> {
    Ok(JobOptions {
        id: job_id.unwrap_or_else(|| device.to_string()),
        speed: speed(speed_limit.unwrap_or(0))?,
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
pub(super) fn parse_backup(args: Map<String, Value>) -> Result<BackupOptions, QmpError> {
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
pub(super) fn parse_mirror(args: Map<String, Value>) -> Result<MirrorOptions, QmpError> {
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

/// blockdev-mirror: starts the job in a drained graph (its filter goes
/// above the source).
pub(super) fn mirror(
    control: &Control,
    options: MirrorOptions,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let mut tx = control.graph.drained_transaction();
    tx.blockdev_mirror(&options, None).map_err(generic)?;
    tx.commit().map_err(generic)?;
    Ok(Value::Object(Map::new()))
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

/// blockdev-create's arguments, checked.
pub(super) struct Create {
    job: JobOptions,
    options: CreateOptions,
}

/// Parses blockdev-create's arguments: the job is not a block job and
/// must be dismissed, as QEMU's.
pub(super) fn parse_create(args: Map<String, Value>) -> Result<Create, QmpError> {
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
    Ok(Create { job, options })
}

/// blockdev-create: starts the job that makes the image.
pub(super) fn create(control: &Control, c: Create, _: &mut NamedFds) -> Result<Value, QmpError> {
    let mut tx = control.graph.transaction();
    tx.blockdev_create(&c.job, c.options).map_err(generic)?;
    tx.commit().map_err(generic)?;
    Ok(Value::Object(Map::new()))
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

/// QEMU's error for two of `given` arguments (name, whether given) that
/// exclude each other, the first two given named in the order listed.
fn exclusive(given: &[(&str, bool)]) -> Result<(), QmpError> {
    let mut named = given.iter().filter(|g| g.1).map(|g| g.0);
    match (named.next(), named.next()) {
        (Some(first), Some(second)) => Err(generic(format!(
            "'{first}' and '{second}' cannot be specified at the same time"
        ))),
        _ => Ok(()),
    }
}

/// Parses block-stream's arguments.
pub(super) fn parse_stream(args: Map<String, Value>) -> Result<StreamOptions, QmpError> {
    let a: BlockStream = parse(args)?;
    // QEMU's order of names in its texts.
    exclusive(&[
        ("base", a.base.is_some()),
        ("bottom", a.bottom.is_some()),
        ("base-node", a.base_node.is_some()),
    ])?;
    if a.filter_node_name.is_some() {
        return Err(generic(
            "Parameter 'filter-node-name' is not supported by blkgraph's block-stream",
        ));
    }
    let base = match (a.base_node, a.base, a.bottom) {
        (Some(node), _, _) => Some(StreamBase::Node(node)),
        (_, Some(file), _) => Some(StreamBase::File(file)),
        (_, _, Some(bottom)) => Some(StreamBase::Bottom(bottom)),
        _ => None,
    };
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
        base,
        backing_file: a.backing_file,
    })
}

/// block-stream: starts the job that copies the backing chain's data
/// (down to `base-node`) into the top image.
pub(super) fn stream(
    control: &Control,
    options: StreamOptions,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let mut tx = control.graph.transaction();
    tx.block_stream(&options).map_err(generic)?;
    tx.commit().map_err(generic)?;
    Ok(Value::Object(Map::new()))
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
pub(super) fn parse_commit(args: Map<String, Value>) -> Result<CommitOptions, QmpError> {
    let a: BlockCommit = parse(args)?;
    exclusive(&[
        ("base", a.base.is_some()),
        ("base-node", a.base_node.is_some()),
    ])?;
    exclusive(&[("top", a.top.is_some()), ("top-node", a.top_node.is_some())])?;
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
        top: layer(a.top_node, a.top),
        base: layer(a.base_node, a.base),
        backing_file: a.backing_file,
        filter_node_name: a.filter_node_name,
    })
}

/// A chain layer named by node-name or by file name (at most one given).
fn layer(node: Option<String>, file: Option<String>) -> Option<ChainLayer> {
    node.map(ChainLayer::Node).or(file.map(ChainLayer::File))
}

/// block-commit: starts the job in a drained graph (an active commit puts
/// its filter above the top image).
pub(super) fn commit(
    control: &Control,
    options: CommitOptions,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let mut tx = control.graph.drained_transaction();
    tx.block_commit(&options).map_err(generic)?;
    tx.commit().map_err(generic)?;
    Ok(Value::Object(Map::new()))
}
