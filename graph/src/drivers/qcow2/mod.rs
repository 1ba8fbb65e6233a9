//! The `qcow2` format driver (QEMU's docs/interop/qcow2.txt is the
//! specification): an image over a `file` child, with an optional
//! `backing` child for what the image does not hold.
//!
//! - [`header`]: the header and its extensions;
//! - [`layout`]: geometry, L2 entries and refcount fields;
//! - [`cache`], [`meta`]: cached metadata tables, cluster allocation and
//!   ordered write-back;
//! - [`compress`]: reading compressed clusters;
//! - [`ranges`]: guest cluster ranges held by requests in flight;
//! - [`io`]: reads, writes, zeroing, discards and block status.
//!
//! Data moves between the request's buffer and the file without a copy;
//! metadata is looked up and changed under one asynchronous lock, never
//! held across data I/O.

mod bitmaps;
mod cache;
mod compress;
pub(crate) mod create;
#[cfg(test)]
mod faults;
mod header;
mod io;
mod layout;
mod meta;
mod repair;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use self::header::{
    Compression, Header, HeaderError, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use self::layout::{Geometry, MAX_REFTABLE_BYTES};
use self::meta::{read_table, CacheSizes, File, Meta, Policy, StoredBitmap};
use crate::aio::{block_on, AsyncMutex};
use crate::bitmap::DirtyBitmap;
use crate::buffer::IoBuffer;
use crate::driver::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, FormatInfo, IoFuture, Reopen, WriteFlags,
    ZeroFlags,
};
use crate::error::Error;
use crate::node::{Child, DiscardMode, Node};
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;
use crate::permission::Permission;
use crate::range_lock::RangeLocks;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry {
    name: "qcow2",
    open,
};

/// QEMU's limits on the tables it reads at open.
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's default ceiling of the L2 cache.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// The smallest caches, in tables.
const MIN_L2_CACHE_TABLES: u64 = 2;
const MIN_REFCOUNT_CACHE_TABLES: u64 = 4;

/// The driver's options (QEMU's BlockdevOptionsQcow2).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Qcow2Options {
    #[serde(default)]
    lazy_refcounts: Option<bool>,
    #[serde(default)]
    pass_discard_request: Option<bool>,
    #[serde(default)]
    pass_discard_snapshot: Option<bool>,
    #[serde(default)]
    pass_discard_other: Option<bool>,
    #[serde(default)]
    discard_no_unref: Option<bool>,
    #[serde(default)]
    overlap_check: Option<Value>,
    #[serde(default)]
    cache_size: Option<u64>,
    #[serde(default)]
    l2_cache_size: Option<u64>,
    #[serde(default)]
    l2_cache_entry_size: Option<u64>,
    #[serde(default)]
    refcount_cache_size: Option<u64>,
    #[serde(default)]
    cache_clean_interval: Option<u64>,
}

/// Why an image could not be opened.
#[derive(Debug)]
enum OpenError {
    /// The header was refused.
    Header(HeaderError),
    /// Reading the image failed.
    Read(&'static str, std::io::Error),
    /// A table the header points to is unusable; QEMU's text.
    Table(&'static str),
    /// The image's state forbids opening it writable; the text says why.
    NotWritable(&'static str),
    /// A cache option is out of range; QEMU's text.
    Cache(String),
    /// The image's clusters are smaller than the file's request alignment.
    ClusterBelowAlignment { cluster: u64, align: u64 },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Header(e) => write!(f, "{e}"),
            OpenError::Read(what, e) => write!(f, "Could not read {what}: {e}"),
            OpenError::Table(text) => f.write_str(text),
            OpenError::NotWritable(why) => f.write_str(why),
            OpenError::Cache(text) => f.write_str(text),
            OpenError::ClusterBelowAlignment { cluster, align } => write!(
                f,
                "qcow2: the cluster size ({cluster}) is smaller than the file's request alignment ({align}); open the file without cache.direct"
            ),
        }
    }
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Error {
        match e {
            OpenError::Cache(text) => Error::InvalidOptions(text),
            other => Error::OpenFailed(other.to_string()),
        }
    }
}

/// An open qcow2 image.
pub(crate) struct Qcow2 {
    file: Arc<Child>,
    /// The backing child; blockdev-snapshot, stream and commit change it.
    backing: ArcSwapOption<Child>,
    meta: AsyncMutex<Meta>,
    ranges: RangeLocks,
    g: Geometry,
    /// The virtual size, which block_resize grows (`g.size` is the size
    /// at open).
    size: AtomicU64,
    /// The file's request alignment.
    align: u64,
    /// Whether the image is open for writing; a reopen changes it.
    writable: AtomicBool,
    /// Lazy refcounts as the options and the header decide them, and
    /// `pass-discard-request` as given: a reopen derives the policy again.
    lazy_refcounts: bool,
    pass_discard_request: Option<bool>,
    /// What a prepared reopen changes.
    reopening: parking_lot::Mutex<Option<Reopening>>,
    /// The header as last written, for queries.
    header: Arc<parking_lot::Mutex<Header>>,
    /// The bitmap directory as last written, for queries.
    stored_bitmaps: Arc<parking_lot::Mutex<Vec<StoredBitmap>>>,
    /// One cluster of zeroes, the source of zero pieces of writes.
    zeroes: IoBuffer,
}

/// A prepared reopen (QEMU's qcow2_reopen_prepare).
struct Reopening {
    writable: bool,
    policy: Policy,
    /// The node's bitmaps: read-only or not once the reopen commits.
    bitmaps: Vec<Arc<DirtyBitmap>>,
    /// Going read-only, the prepare stored them (no longer in use).
    stored: bool,
}

/// What `open` read from the image.
struct Image {
    header: Header,
    l1: Vec<u64>,
    refcount_table: Vec<u64>,
}

fn open(
    ctx: &mut OpenContext<'_, '_>,
    mut options: Options,
) -> Result<Box<dyn BlockDriver>, Error> {
    for refused in ["data-file", "encrypt"] {
        if options.take(refused).is_some_and(|v| !v.is_null()) {
            return Err(Error::InvalidOptions(format!(
                "Parameter '{refused}' is not supported by blkgraph's qcow2 driver"
            )));
        }
    }
    let file = ctx.required_child(&mut options, ChildRole::File)?;
    let backing_option = options.take(ChildRole::Backing.as_str());
    let opts: Qcow2Options = options.parse("")?;
    // Accepted as QEMU users pass them; they change nothing here: there
    // are no internal snapshots to discard, every freed cluster follows
    // pass-discard-request, freed clusters are always unreferenced, the
    // metadata is never written over guest data, and the caches are only
    // emptied when the node closes.
    let _accepted = (
        &opts.pass_discard_snapshot,
        &opts.pass_discard_other,
        &opts.discard_no_unref,
        &opts.overlap_check,
        &opts.cache_clean_interval,
    );
    let writable = !ctx.common.is_read_only();
    let file_node = file.node();
    let align = file_node.limits().request_alignment.max(1);
    let image =
        block_on(read_image(&file_node, align)).map_err(|e| OpenError::Read("the image", e))??;
    let g = Geometry::new(&image.header);
    if g.cluster_size < align {
        return Err(OpenError::ClusterBelowAlignment {
            cluster: g.cluster_size,
            align,
        }
        .into());
    }
    if writable {
        check_writable(&image.header)?;
    }
    let lazy_refcounts = opts
        .lazy_refcounts
        .unwrap_or(image.header.compatible & COMPAT_LAZY_REFCOUNTS != 0);
    if lazy_refcounts && image.header.version < 3 {
        return Err(Error::InvalidOptions(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .into(),
        ));
    }
    let sizes = cache_sizes(&opts, &g)?;
    let policy = Policy {
        pass_discard: opts
            .pass_discard_request
            .unwrap_or(ctx.common.discard == Some(DiscardMode::Unmap)),
        lazy_refcounts: lazy_refcounts && writable,
    };
    let backing = open_backing(ctx, backing_option, &image.header, &file_node)?;
    let dirty = image.header.incompatible & INCOMPAT_DIRTY != 0;
    let mut meta = Meta::new(
        image.header,
        image.l1,
        image.refcount_table,
        file_node.size(),
        sizes,
        policy,
    );
    let f = File {
        node: &file_node,
        align,
    };
    // Also read-only: a reopen may make the node writable.
    block_on(meta.find_end(&f))
        .and_then(|r| r)
        .map_err(|e| OpenError::Read("refcount blocks", e))?;
    let (bitmaps, used) = block_on(meta.load_bitmaps(&f, writable))
        .and_then(|r| r)
        .map_err(|e| Error::OpenFailed(format!("Could not load bitmaps: {e}")))?;
    for bitmap in bitmaps {
        ctx.add_bitmap(bitmap);
    }
    if writable && dirty {
        let changed = block_on(meta.rebuild_refcounts(&f, &used))
            .and_then(|r| r)
            .map_err(|e| Error::OpenFailed(format!("Could not repair dirty image: {e}")))?;
        log::info!(
            "qcow2 node '{}': repaired the refcounts of a dirty image ({changed} changed)",
            ctx.node_name()
        );
    }
    Ok(Box::new(Qcow2 {
        file,
        backing: ArcSwapOption::new(backing),
        header: meta.published_header(),
        stored_bitmaps: meta.published_bitmaps(),
        meta: AsyncMutex::new(meta),
        ranges: RangeLocks::default(),
        size: AtomicU64::new(g.size),
        g,
        align,
        writable: AtomicBool::new(writable),
        lazy_refcounts,
        pass_discard_request: opts.pass_discard_request,
        reopening: parking_lot::Mutex::new(None),
        zeroes: IoBuffer::aligned(g.cluster_size as usize, align as usize)
            .map_err(|e| Error::OpenFailed(format!("qcow2: {e}")))?,
    }))
}

impl Qcow2 {
    /// Writes the metadata back, marks the image clean and stores the
    /// persistent ones of `bitmaps`, as the image becomes read-only.
    async fn store_for_read_only(&self, bitmaps: &[Arc<DirtyBitmap>]) -> std::io::Result<()> {
        let node = self.file.node();
        let f = File {
            node: &node,
            align: self.align,
        };
        let mut m = self.meta.lock().await;
        m.close(&f).await?;
        if bitmaps.iter().any(|b| b.persistent()) {
            m.store_bitmaps(&f, bitmaps).await?;
            f.flush().await?;
        }
        Ok(())
    }
}

/// Reads and checks the header, the L1 table and the refcount table.
async fn read_image(file: &Node, align: u64) -> Result<Image, OpenError> {
    let f = File { node: file, align };
    let size = file.size();
    let header_error = |e| OpenError::Read("qcow2 header", e);
    let first = f
        .read(0, size.min(512) as usize)
        .await
        .map_err(header_error)?;
    let cluster_bits = first
        .get(20..24)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(16)
        .clamp(9, 21);
    let head = if size > 512 {
        f.read(0, size.min(1 << cluster_bits) as usize)
            .await
            .map_err(header_error)?
    } else {
        first
    };
    let header = Header::parse(&head).map_err(OpenError::Header)?;
    let g = Geometry::new(&header);
    let cs = g.cluster_size;
    let l1_bytes = u64::from(header.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(OpenError::Table("Active L1 table too large"));
    }
    if u64::from(header.l1_size) < g.l1_entries_for(header.size) {
        return Err(OpenError::Table("L1 table is too small"));
    }
    if !valid_table(header.l1_table_offset, l1_bytes, cs, size) {
        return Err(OpenError::Table("Invalid L1 table offset"));
    }
    let reftable_bytes = u64::from(header.refcount_table_clusters) * cs;
    if reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(OpenError::Table("Reference count table too large"));
    }
    if reftable_bytes == 0 || !valid_table(header.refcount_table_offset, reftable_bytes, cs, size) {
        return Err(OpenError::Table("Invalid reference count table offset"));
    }
    let l1 = read_table(&f, header.l1_table_offset, u64::from(header.l1_size))
        .await
        .map_err(|e| OpenError::Read("L1 table", e))?;
    let refcount_table = read_table(&f, header.refcount_table_offset, reftable_bytes / 8)
        .await
        .map_err(|e| OpenError::Read("refcount table", e))?;
    Ok(Image {
        header,
        l1,
        refcount_table,
    })
}

/// Whether a table of `bytes` at `offset` is cluster aligned and inside a
/// file of `file_size` bytes.
fn valid_table(offset: u64, bytes: u64, cluster_size: u64, file_size: u64) -> bool {
    offset.is_multiple_of(cluster_size)
        && offset
            .checked_add(bytes)
            .is_some_and(|end| end <= file_size)
}

/// Refuses images that blkgraph must not write.
fn check_writable(h: &Header) -> Result<(), OpenError> {
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(OpenError::NotWritable(
            "qcow2: Image is corrupt; cannot be opened read/write",
        ));
    }
    if h.nb_snapshots > 0 {
        return Err(OpenError::NotWritable(
            "qcow2: images with internal snapshots can only be opened read-only by blkgraph",
        ));
    }
    Ok(())
}

/// The cache sizes, as QEMU's read_cache_sizes() derives them.
fn cache_sizes(o: &Qcow2Options, g: &Geometry) -> Result<CacheSizes, OpenError> {
    let cs = g.cluster_size;
    let max_l2 = (g.size.div_ceil(cs) * g.l2_entry_bytes).next_multiple_of(cs);
    let min_refcount = MIN_REFCOUNT_CACHE_TABLES * cs;
    let (mut l2, mut refcount) = (o.l2_cache_size, o.refcount_cache_size);
    match o.cache_size {
        Some(combined) => match (l2, refcount) {
            (Some(_), Some(_)) => return Err(OpenError::Cache(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            )),
            (Some(l), None) if l > combined => {
                return Err(OpenError::Cache(
                    "l2-cache-size may not exceed cache-size".into(),
                ))
            }
            (None, Some(r)) if r > combined => {
                return Err(OpenError::Cache(
                    "refcount-cache-size may not exceed cache-size".into(),
                ))
            }
            (Some(l), None) => refcount = Some(combined - l),
            (None, Some(r)) => l2 = Some(combined - r),
            (None, None) if combined >= max_l2 + min_refcount => {
                l2 = Some(max_l2);
                refcount = Some(combined - max_l2);
            }
            (None, None) => {
                let r = combined.min(min_refcount);
                refcount = Some(r);
                l2 = Some(combined - r);
            }
        },
        None => {
            l2 = l2.or(Some(max_l2.min(DEFAULT_L2_CACHE_MAX)));
            refcount = refcount.or(Some(min_refcount));
        }
    }
    let entry = o.l2_cache_entry_size.unwrap_or(cs);
    if !entry.is_power_of_two() || !(512..=cs).contains(&entry) {
        return Err(OpenError::Cache(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        )));
    }
    let l2_tables = (l2.unwrap_or(0) / entry).max(MIN_L2_CACHE_TABLES);
    let refcount_tables = (refcount.unwrap_or(0) / cs).max(MIN_REFCOUNT_CACHE_TABLES);
    let limit = i32::MAX as u64;
    if l2_tables > limit {
        return Err(OpenError::Cache("L2 cache size too big".into()));
    }
    if refcount_tables > limit {
        return Err(OpenError::Cache("Refcount cache size too big".into()));
    }
    Ok(CacheSizes {
        l2_entries: l2_tables as usize,
        l2_slice_size: entry as usize,
        refcount_entries: refcount_tables as usize,
    })
}

/// Opens the backing child: from the `backing` option (a node-name,
/// inline options, or `null` for none), or else from the header's backing
/// file name and format, read-only, relative to the image's directory.
fn open_backing(
    ctx: &mut OpenContext<'_, '_>,
    option: Option<Value>,
    header: &Header,
    file: &Node,
) -> Result<Option<Arc<Child>>, Error> {
    let key = ChildRole::Backing.as_str().to_string();
    let value = match option {
        Some(Value::Null) => return Ok(None),
        Some(v) => v,
        None => match &header.backing_file {
            None => return Ok(None),
            Some(name) => backing_from_header(name, header.backing_format.as_deref(), file)?,
        },
    };
    let mut map = Map::new();
    map.insert(key, value);
    let mut options = Options::from_json(Value::Object(map))?;
    ctx.child(&mut options, ChildRole::Backing)
}

/// Inline options for the backing file the header names.
fn backing_from_header(name: &str, format: Option<&str>, file: &Node) -> Result<Value, Error> {
    let path = Path::new(name);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match file.filename() {
            Some(image) => Path::new(&image)
                .parent()
                .map(|dir| dir.join(path))
                .unwrap_or_else(|| path.to_path_buf()),
            None => path.to_path_buf(),
        }
    };
    let filename = path.to_string_lossy().into_owned();
    let driver = match format {
        Some(f) => f.to_string(),
        None => probe_format(&path).map_err(|source| Error::Open {
            filename: filename.clone(),
            source,
        })?,
    };
    Ok(json!({
        "driver": driver,
        "read-only": true,
        "file": {"driver": "file", "filename": filename},
    }))
}

/// The format of a backing file without a format in the header: qcow2 if
/// it starts with qcow2's magic, raw otherwise.
fn probe_format(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && u32::from_be_bytes(magic) == header::MAGIC {
        "qcow2".into()
    } else {
        "raw".into()
    })
}

impl BlockDriver for Qcow2 {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the image, as QEMU's qcow2 does for block_resize; shrinking
    /// is refused (it would drop guest data and persistent bitmaps).
    fn resize(&self, size: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if size < self.size() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "qcow2 doesn't support shrinking images yet",
                ));
            }
            if !size.is_multiple_of(512) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "The new size must be a multiple of 512",
                ));
            }
            let node = self.file.node();
            let f = File {
                node: &node,
                align: self.align,
            };
            let mut m = self.meta.lock().await;
            m.grow(&f, size).await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    fn limits(&self) -> BlockLimits {
        BlockLimits {
            request_alignment: self.align,
            max_transfer: None,
            discard_alignment: self.g.cluster_size,
            optimal_alignment: self.g.cluster_size,
            remote: self.file.node().limits().remote,
        }
    }

    /// Like QEMU's format drivers: the file is read consistently and, when
    /// the image is writable, written and grown (metadata changes even if
    /// no parent writes; the node drops these for a read-only image);
    /// others may only write it without changing it. The backing file is
    /// only read, and shared with anyone.
    fn child_perm(
        &self,
        role: ChildRole,
        _perm: Permission,
        _shared: Permission,
    ) -> (Permission, Permission) {
        match role {
            ChildRole::Backing => (Permission::CONSISTENT_READ, Permission::ALL),
            _ => (
                Permission::CONSISTENT_READ | Permission::WRITE | Permission::RESIZE,
                Permission::CONSISTENT_READ | Permission::WRITE_UNCHANGED,
            ),
        }
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(self.read_guest(offset, buf))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.write_guest(offset, buf).await?;
            if flags.fua {
                self.flush_image().await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.flush_image())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(self.discard_guest(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            self.zero_guest(offset, len, flags.may_unmap).await?;
            if flags.fua {
                self.flush_image().await?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(self.status(offset, len))
    }

    /// The new backing child is only read, as the one given at open; the
    /// header keeps the backing file name it has (blockdev-snapshot's
    /// overlays are made with the right one).
    fn set_backing(&self, backing: Option<Arc<Child>>) -> Result<(), Error> {
        self.backing.store(backing);
        Ok(())
    }

    fn populate(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(self.populate(offset, len))
    }

    fn set_backing_file_name<'a>(
        &'a self,
        name: Option<&'a str>,
        format: Option<&'a str>,
    ) -> IoFuture<'a> {
        Box::pin(async move {
            let node = self.file.node();
            let f = File {
                node: &node,
                align: self.align,
            };
            let mut m = self.meta.lock().await;
            let mut header = m.header.clone();
            header.backing_file = name.map(str::to_string);
            header.backing_format = format.map(str::to_string);
            header.to_bytes().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?;
            m.write_header(&f, header).await?;
            f.flush().await
        })
    }

    fn can_store_bitmap(&self, node: &str, name: &str, granularity: u64) -> Result<(), String> {
        let version = self.header.lock().version;
        bitmaps::can_store(version, self.size(), self.g.cluster_size, name, granularity)
            .map_err(|e| format!("Can't make bitmap '{name}' persistent in '{node}': {e}"))
    }

    fn store_bitmaps<'a>(&'a self, bitmaps: &'a [Arc<DirtyBitmap>]) -> IoFuture<'a> {
        Box::pin(async move {
            let node = self.file.node();
            let f = File {
                node: &node,
                align: self.align,
            };
            let mut m = self.meta.lock().await;
            m.store_bitmaps(&f, bitmaps).await
        })
    }

    fn remove_bitmap<'a>(&'a self, name: &'a str) -> IoFuture<'a> {
        Box::pin(async move {
            let node = self.file.node();
            let f = File {
                node: &node,
                align: self.align,
            };
            let mut m = self.meta.lock().await;
            m.remove_bitmap(&f, name).await
        })
    }

    fn format_info(&self) -> Option<FormatInfo> {
        let h = self.header.lock().clone();
        let v3 = h.version >= 3;
        let compression = match h.compression {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        };
        let mut data = json!({
            "compat": if v3 { "1.1" } else { "0.10" },
            "compression-type": compression,
            "refcount-bits": 1u32 << h.refcount_order,
        });
        let stored = self.stored_bitmaps.lock().clone();
        if v3 && !stored.is_empty() {
            let list: Vec<Value> = stored
                .iter()
                .map(|b| {
                    let flags: Vec<&str> = [(b.in_use, "in-use"), (b.auto, "auto")]
                        .iter()
                        .filter(|(on, _)| *on)
                        .map(|(_, name)| *name)
                        .collect();
                    json!({"name": b.name, "granularity": b.granularity, "flags": flags})
                })
                .collect();
            data["bitmaps"] = json!(list);
        }
        if v3 {
            data["lazy-refcounts"] = json!(h.compatible & COMPAT_LAZY_REFCOUNTS != 0);
            data["corrupt"] = json!(h.incompatible & INCOMPAT_CORRUPT != 0);
            data["extended-l2"] = json!(h.extended_l2());
        }
        Some(FormatInfo {
            cluster_size: Some(h.cluster_size()),
            dirty_flag: Some(h.incompatible & INCOMPAT_DIRTY != 0),
            backing_filename: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            specific: Some(json!({"type": "qcow2", "data": data})),
        })
    }

    /// Going read-write: the image must allow it (as at open). Going
    /// read-only: the metadata is written back, the image marked clean and
    /// the persistent bitmaps stored (no longer in use), while the file is
    /// still writable.
    fn reopen_prepare(&self, reopen: &Reopen<'_>) -> Result<(), Error> {
        let writable = !reopen.read_only;
        let mut stored = false;
        if writable && reopen.was_read_only {
            let header = self.header.lock().clone();
            check_writable(&header)?;
            if header.incompatible & INCOMPAT_DIRTY != 0 {
                return Err(OpenError::NotWritable(
                    "qcow2: the image was not closed cleanly: open it read-write to repair it",
                )
                .into());
            }
        }
        if !writable && !reopen.was_read_only {
            stored = true;
            block_on(self.store_for_read_only(reopen.bitmaps))
                .and_then(|r| r)
                .map_err(|e| {
                    Error::OpenFailed(format!("Cannot reopen '{}' read-only: {e}", reopen.node))
                })?;
        }
        let policy = Policy {
            pass_discard: self
                .pass_discard_request
                .unwrap_or(reopen.discard == DiscardMode::Unmap),
            lazy_refcounts: self.lazy_refcounts && writable,
        };
        *self.reopening.lock() = Some(Reopening {
            writable,
            policy,
            bitmaps: reopen.bitmaps.to_vec(),
            stored,
        });
        Ok(())
    }

    /// Going read-write: the image's bitmaps are marked in use again
    /// (the file is writable by now) and may change. If they cannot be
    /// marked, they stay read-only, and so writes to the node fail, as
    /// QEMU's qcow2_reopen_commit_post leaves them: a bitmap that records
    /// writes while the image says it is not in use looks consistent after
    /// a crash, and misses them. Another reopen read-write tries again.
    fn reopen_commit(&self) {
        let Some(r) = self.reopening.lock().take() else {
            return;
        };
        let was_writable = self.writable.swap(r.writable, Ordering::AcqRel);
        let persistent = || r.bitmaps.iter().filter(|b| b.persistent());
        let unmarked = persistent().any(|b| b.readonly());
        let node = self.file.node();
        let f = File {
            node: &node,
            align: self.align,
        };
        let marked = block_on(async {
            let mut m = self.meta.lock().await;
            m.set_policy(r.policy);
            if r.writable && (!was_writable || unmarked) {
                m.mark_bitmaps_in_use(&f).await
            } else {
                Ok(())
            }
        });
        let marked = match marked {
            Ok(Ok(())) => true,
            Err(e) | Ok(Err(e)) => {
                log::error!(
                    "qcow2: cannot mark the bitmaps in use: {e}; they stay read-only, and \
                     writes to the node fail until they are removed or it is reopened"
                );
                false
            }
        };
        if r.writable != was_writable || (r.writable && unmarked) {
            for b in persistent() {
                b.set_readonly(!(r.writable && marked));
            }
        }
    }

    /// An aborted reopen to read-only gives the bitmaps it stored their
    /// in-use mark back: the image stays writable.
    fn reopen_abort(&self) {
        let Some(r) = self.reopening.lock().take() else {
            return;
        };
        if !r.stored {
            return;
        }
        let node = self.file.node();
        let f = File {
            node: &node,
            align: self.align,
        };
        let marked = block_on(async { self.meta.lock().await.mark_bitmaps_in_use(&f).await });
        if let Err(e) | Ok(Err(e)) = marked {
            log::error!("qcow2: cannot mark the bitmaps in use again: {e}");
        }
    }

    fn close(&self) -> IoFuture<'_> {
        Box::pin(async move {
            if self.writable.load(Ordering::Acquire) {
                self.close_image().await?;
            }
            Ok(())
        })
    }
}
