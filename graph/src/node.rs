//! A node of the graph: a driver instance with a name, options and child
//! edges, and the edges themselves (a node and the edges that lead from it
//! and to it refer to each other).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Deserialize;

use crate::bitmap::DirtyBitmap;
use crate::buffer::IoBuffer;
use crate::driver::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, FormatInfo, IoFuture, WriteFlags, ZeroFlags,
};
use crate::error::Error;
use crate::options::Options;
use crate::permission::{Parent, Permission};

/// The largest size of a node, in bytes: QEMU's `BDRV_MAX_LENGTH`, the
/// largest `i64` rounded down to its largest alignment (1 GiB). Offsets
/// and lengths within a node fit in an `i64`, so adding two never wraps.
pub const MAX_LENGTH: u64 = i64::MAX as u64 & !((1 << 30) - 1);

/// Options every node takes, whatever its driver (QEMU's BlockdevOptionsBase).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommonOptions {
    /// The driver name.
    pub driver: String,
    /// The node-name; generated for inline children when absent.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Open read-only.
    #[serde(default)]
    pub read_only: Option<bool>,
    /// Accepted for compatibility: blkgraph never falls back to read-only
    /// on its own (the option is kept, and reopen can change it).
    #[serde(default)]
    pub auto_read_only: Option<bool>,
    /// Whether discards reach the driver.
    #[serde(default)]
    pub discard: Option<DiscardMode>,
    /// Cache modes.
    #[serde(default)]
    pub cache: Option<CacheOptions>,
    /// Accepted for compatibility (image locking is not implemented).
    #[serde(default)]
    pub force_share: Option<bool>,
    /// Whether writes of zeroes become write-zeroes requests.
    #[serde(default)]
    pub detect_zeroes: Option<DetectZeroes>,
}

/// The `cache` options.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheOptions {
    /// Bypass the host page cache (O_DIRECT).
    #[serde(default)]
    pub direct: Option<bool>,
    /// Ignore flush requests.
    #[serde(default)]
    pub no_flush: Option<bool>,
}

/// The keys of [`CommonOptions`].
pub(crate) const COMMON_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "read-only",
    "auto-read-only",
    "discard",
    "cache",
    "force-share",
    "detect-zeroes",
];

impl CommonOptions {
    /// Whether O_DIRECT was asked for.
    pub fn direct(&self) -> bool {
        self.cache.and_then(|c| c.direct).unwrap_or(false)
    }

    /// Whether the node is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.unwrap_or(false)
    }

    /// Checks the options against each other, as QEMU does.
    pub(crate) fn check(&self) -> Result<(), Error> {
        if self.detect_zeroes == Some(DetectZeroes::Unmap)
            && self.discard != Some(DiscardMode::Unmap)
        {
            return Err(Error::InvalidOptions(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
            ));
        }
        Ok(())
    }

    /// Takes unset inheritable options from an inline child's parent.
    pub(crate) fn inherit(&mut self, parent: &CommonOptions) {
        self.read_only = self.read_only.or(parent.read_only);
        self.discard = self.discard.or(parent.discard);
        let mut cache = self.cache.unwrap_or_default();
        let pc = parent.cache.unwrap_or_default();
        cache.direct = cache.direct.or(pc.direct);
        cache.no_flush = cache.no_flush.or(pc.no_flush);
        self.cache = Some(cache);
    }
}

/// Whether discard requests reach the driver (QEMU's `discard` option).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiscardMode {
    /// Discards succeed without doing anything (the default).
    #[default]
    Ignore,
    /// Discards are passed to the driver.
    Unmap,
}

/// Whether writes of zeroes are detected (QEMU's `detect-zeroes`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetectZeroes {
    /// Writes go to the driver as they are (the default).
    #[default]
    Off,
    /// A write of zeroes becomes a write-zeroes request.
    On,
    /// ...that may deallocate (with `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// QMP's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }

    fn from_bits(bits: u8) -> Self {
        match bits {
            1 => DetectZeroes::On,
            2 => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }

    fn bits(self) -> u8 {
        match self {
            DetectZeroes::Off => 0,
            DetectZeroes::On => 1,
            DetectZeroes::Unmap => 2,
        }
    }
}

/// The options of a node that blockdev-reopen changes, as the node has
/// them now.
#[derive(Clone, Debug)]
pub(crate) struct NodeFlags {
    pub(crate) read_only: bool,
    pub(crate) discard: DiscardMode,
    pub(crate) no_flush: bool,
    pub(crate) detect_zeroes: DetectZeroes,
    pub(crate) given: Option<Options>,
}

/// A node of the block graph.
pub struct Node {
    name: String,
    driver_name: &'static str,
    driver: Box<dyn BlockDriver>,
    /// The options below change only in drained transactions (reopen).
    read_only: AtomicBool,
    /// 1 for [`DiscardMode::Unmap`].
    discard: AtomicU8,
    no_flush: AtomicBool,
    /// [`DetectZeroes`] bits.
    detect_zeroes: AtomicU8,
    direct: bool,
    children: ArcSwap<Vec<Arc<Child>>>,
    implicit: bool,
    /// The options the node was opened with (or reopened with last),
    /// without its children's.
    given: Mutex<Option<Options>>,
    bitmaps: ArcSwap<Vec<Arc<DirtyBitmap>>>,
    /// The union of what the node's parents hold, set when a graph change
    /// commits.
    granted: AtomicU8,
    /// block-set-write-threshold: the offset a write may not reach past
    /// without an event (0: none). Written by the control plane only.
    write_threshold: AtomicU64,
    /// Where the threshold's event goes.
    threshold_events: Mutex<Option<crate::EventSink>>,
}

/// QEMU's event for a write past a node's write threshold.
pub const WRITE_THRESHOLD_EVENT: &str = "BLOCK_WRITE_THRESHOLD";

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver_name)
            .finish_non_exhaustive()
    }
}

fn ready<'a, T: Send + 'a>(r: io::Result<T>) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

impl Node {
    /// Creates a node; `children` are the edges its driver holds, `given`
    /// the options it was opened with (without its children's), or `None`
    /// for a node a job made.
    pub(crate) fn new(
        name: String,
        driver_name: &'static str,
        driver: Box<dyn BlockDriver>,
        common: &CommonOptions,
        children: Vec<Arc<Child>>,
        implicit: bool,
        given: Option<Options>,
    ) -> Self {
        Node {
            name,
            driver_name,
            driver,
            read_only: AtomicBool::new(common.is_read_only()),
            discard: AtomicU8::new(u8::from(common.discard == Some(DiscardMode::Unmap))),
            no_flush: AtomicBool::new(common.cache.and_then(|c| c.no_flush).unwrap_or(false)),
            detect_zeroes: AtomicU8::new(common.detect_zeroes.unwrap_or_default().bits()),
            direct: common.direct(),
            children: ArcSwap::from_pointee(children),
            implicit,
            given: Mutex::new(given),
            bitmaps: ArcSwap::from_pointee(Vec::new()),
            granted: AtomicU8::new(0),
            write_threshold: AtomicU64::new(0),
            threshold_events: Mutex::new(None),
        }
    }

    /// Sets the write threshold (0 removes it); `events` gets
    /// [`WRITE_THRESHOLD_EVENT`] once a write reaches past it, which
    /// removes it, as in QEMU.
    pub fn set_write_threshold(&self, threshold: u64, events: Option<crate::EventSink>) {
        *self.threshold_events.lock() = events;
        self.write_threshold.store(threshold, Ordering::Release);
    }

    /// The write threshold, 0 if none.
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::Acquire)
    }

    /// A write reached `end`, past `threshold`: the first to see it sends
    /// the event.
    #[cold]
    fn threshold_exceeded(&self, end: u64, threshold: u64) {
        let won = self
            .write_threshold
            .compare_exchange(threshold, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        let sink = self.threshold_events.lock().clone();
        if let (true, Some(sink)) = (won, sink) {
            sink(
                WRITE_THRESHOLD_EVENT,
                serde_json::json!({
                    "node-name": self.name,
                    "amount-exceeded": end - threshold,
                    "write-threshold": threshold,
                }),
            );
        }
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        self.bitmaps
            .load()
            .iter()
            .filter(|b| !b.hidden())
            .cloned()
            .collect()
    }

    /// The dirty bitmap `name`.
    pub fn bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.bitmaps
            .load()
            .iter()
            .find(|b| b.name() == name && !b.hidden())
            .cloned()
    }

    /// Adds a dirty bitmap; the name must be new on this node.
    pub fn add_bitmap(&self, bitmap: Arc<DirtyBitmap>) -> bool {
        let mut ok = true;
        self.bitmaps.rcu(|list| {
            ok = !list
                .iter()
                .any(|b| b.name() == bitmap.name() && !b.hidden());
            let mut list = (**list).clone();
            if ok {
                list.push(bitmap.clone());
            }
            list
        });
        ok
    }

    /// Removes this very bitmap.
    pub(crate) fn remove_bitmap(&self, bitmap: &Arc<DirtyBitmap>) {
        self.bitmaps.rcu(|list| {
            list.iter()
                .filter(|b| !Arc::ptr_eq(b, bitmap))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Notes a write (or zeroing, or discard) of a range: in the dirty
    /// bitmaps, and against the write threshold (a load of a value only the
    /// control plane writes).
    fn record(&self, offset: u64, len: u64) {
        let threshold = self.write_threshold.load(Ordering::Relaxed);
        if threshold != 0 && offset + len > threshold {
            self.threshold_exceeded(offset + len, threshold);
        }
        let bitmaps = self.bitmaps.load();
        for b in bitmaps.iter() {
            b.record(offset, len);
        }
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver's name, e.g. `file`.
    pub fn driver_name(&self) -> &'static str {
        self.driver_name
    }

    /// Whether the node is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    /// Whether discards reach the driver.
    pub fn discard_mode(&self) -> DiscardMode {
        if self.discard.load(Ordering::Relaxed) == 1 {
            DiscardMode::Unmap
        } else {
            DiscardMode::Ignore
        }
    }

    /// Whether writes of zeroes are detected.
    pub fn detect_zeroes(&self) -> DetectZeroes {
        DetectZeroes::from_bits(self.detect_zeroes.load(Ordering::Relaxed))
    }

    /// The options blockdev-reopen changes, as they are now.
    pub(crate) fn flags(&self) -> NodeFlags {
        NodeFlags {
            read_only: self.read_only(),
            discard: self.discard_mode(),
            no_flush: self.no_flush(),
            detect_zeroes: self.detect_zeroes(),
            given: self.given_options(),
        }
    }

    /// Sets the options blockdev-reopen changes (in a drained
    /// transaction, which sets them back if it fails).
    pub(crate) fn set_flags(&self, f: NodeFlags) {
        self.read_only.store(f.read_only, Ordering::Release);
        self.discard
            .store(u8::from(f.discard == DiscardMode::Unmap), Ordering::Relaxed);
        self.no_flush.store(f.no_flush, Ordering::Relaxed);
        self.detect_zeroes
            .store(f.detect_zeroes.bits(), Ordering::Relaxed);
        *self.given.lock() = f.given;
    }

    /// The driver, for the reopen hooks.
    pub(crate) fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }

    /// The child edges.
    pub fn children(&self) -> Arc<Vec<Arc<Child>>> {
        self.children.load_full()
    }

    /// The node's backing child, if it has one.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.children
            .load()
            .iter()
            .find(|c| c.role() == ChildRole::Backing)
            .map(|c| c.node())
    }

    /// The node and its backing chain, nearest first.
    pub fn backing_chain(self: &Arc<Self>) -> Vec<Arc<Node>> {
        let mut chain = vec![self.clone()];
        while let Some(next) = chain.last().and_then(|n| n.backing()) {
            chain.push(next);
        }
        chain
    }

    /// Whether the node is a filter (passes requests to one child).
    pub fn is_filter(&self) -> bool {
        self.driver.filtered_child().is_some()
    }

    /// The layer below this node in its backing chain that `name` names as
    /// a file (QEMU's bdrv_find_backing_image): a layer's file name as
    /// given, or the same file by a path absolute or relative to the
    /// directory of the layer above it (as a backing file name in an
    /// image header is).
    pub fn find_backing_image(self: &Arc<Self>, name: &str) -> Option<Arc<Node>> {
        let canonical = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        let chain = self.backing_chain();
        chain.windows(2).find_map(|pair| {
            let (above, layer) = (&pair[0], &pair[1]);
            let file = layer.filename()?;
            if file == name {
                return Some(layer.clone());
            }
            let given = std::path::Path::new(name);
            let wanted = match above.filename() {
                Some(f) if given.is_relative() => std::path::Path::new(&f)
                    .parent()
                    .map_or_else(|| given.to_path_buf(), |dir| dir.join(given)),
                _ => given.to_path_buf(),
            };
            let same = canonical(&wanted)? == canonical(std::path::Path::new(&file))?;
            same.then(|| layer.clone())
        })
    }

    /// Gives the node a new backing child (or none): QEMU's
    /// bdrv_set_backing_hd, for drivers that have backing files. The
    /// caller (a transaction) checks the permissions and undoes it if
    /// they conflict.
    pub(crate) fn set_backing(&self, backing: Option<Arc<Node>>) -> Result<(), Error> {
        let child =
            backing.map(|b| Child::new(Parent::Node(self.name.clone()), ChildRole::Backing, b));
        self.driver.set_backing(child.clone())?;
        let mut children: Vec<Arc<Child>> = self
            .children
            .load()
            .iter()
            .filter(|c| c.role() != ChildRole::Backing)
            .cloned()
            .collect();
        children.extend(child);
        self.children.store(Arc::new(children));
        Ok(())
    }

    /// Whether the node was created inline in another node's options.
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The options the node was opened with (or last reopened with),
    /// without those of its children; `None` for a node that a job made
    /// (a job's filter).
    pub fn given_options(&self) -> Option<Options> {
        self.given.lock().clone()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// What the node takes and shares on its child in `role`, given what
    /// its parents need and share. A read-only node never writes or grows
    /// its `file` or `data-file` (as QEMU's storage children).
    pub fn child_perm(
        &self,
        role: ChildRole,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        let (perm, shared) = self.driver.child_perm(role, perm, shared);
        if self.read_only() && matches!(role, ChildRole::File | ChildRole::DataFile) {
            (perm & !(Permission::WRITE | Permission::RESIZE), shared)
        } else {
            (perm, shared)
        }
    }

    /// The host file behind this node: its own, or its first child's.
    pub fn filename(&self) -> Option<String> {
        self.driver.filename().or_else(|| {
            self.children
                .load()
                .first()
                .and_then(|c| c.node().filename())
        })
    }

    /// Whether the node bypasses the host page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether flushes are ignored.
    pub fn no_flush(&self) -> bool {
        self.no_flush.load(Ordering::Relaxed)
    }

    /// What requests to the node should look like.
    pub fn limits(&self) -> BlockLimits {
        self.driver.limits()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.check_bitmaps_writable()?;
        self.check(offset, len)
    }

    /// Writes to a node with a read-only dirty bitmap fail, as QEMU's
    /// (`bdrv_has_readonly_bitmaps`): the bitmap could not record them. A
    /// writable node has one when its image's bitmaps could not be marked
    /// in use as it became writable (see qcow2's `reopen_commit`).
    fn check_bitmaps_writable(&self) -> io::Result<()> {
        if self.bitmaps.load().iter().any(|b| b.readonly()) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    /// The union of the permissions the node's parents hold.
    pub fn granted(&self) -> Permission {
        Permission::from_bits(self.granted.load(Ordering::Acquire))
    }

    pub(crate) fn set_granted(&self, perm: Permission) {
        self.granted.store(perm.bits(), Ordering::Release);
    }

    /// Whether requests may reach past the end: the node grows on writes
    /// and a parent holds the resize permission (a format driver
    /// allocating clusters at the end of its file). Reads there see zeroes,
    /// as in QEMU.
    fn open_ended(&self, offset: u64, len: u64) -> bool {
        self.granted().contains(Permission::RESIZE)
            && self.driver.extends_on_write()
            && offset.checked_add(len).is_some_and(|end| end <= MAX_LENGTH)
    }

    /// Like [`Node::check_write`] for data writes, which may also extend an
    /// open-ended node.
    fn check_data_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.read_only() && self.open_ended(offset, len) {
            return self.check_bitmaps_writable();
        }
        self.check_write(offset, len)
    }

    /// Changes the size of the node (block_resize, or a format driver
    /// growing its file); a parent must hold the resize permission.
    pub fn resize(&self, size: u64) -> IoFuture<'_> {
        if self.read_only() {
            return ready(Err(io::Error::from_raw_os_error(libc::EPERM)));
        }
        if !self.granted().contains(Permission::RESIZE) || size > MAX_LENGTH {
            return ready(Err(io::Error::from_raw_os_error(libc::EPERM)));
        }
        // A dirty bitmap covers the size it was made for: writes past it
        // would go unrecorded, and an incremental backup would miss them.
        if size != self.size() && !self.bitmaps.load().is_empty() {
            return ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "Cannot resize node '{}': its dirty bitmaps cannot change size",
                    self.name()
                ),
            )));
        }
        self.driver.resize(size)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        let len = buf.len() as u64;
        match self.check(offset, len) {
            Ok(()) => self.driver.read(offset, buf),
            Err(_) if self.open_ended(offset, len) => Box::pin(async move {
                let inside = self.size().saturating_sub(offset).min(len) as usize;
                buf.fill_zero(inside, buf.len() - inside);
                if inside > 0 {
                    self.driver.read(offset, &buf.slice(0, inside)).await?;
                }
                Ok(())
            }),
            Err(e) => ready(Err(e)),
        }
    }

    /// Writes `buf` at `offset`.
    pub fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        match self.check_data_write(offset, buf.len() as u64) {
            Ok(()) => {
                let len = buf.len() as u64;
                self.record(offset, len);
                let detect = self.detect_zeroes();
                if detect != DetectZeroes::Off && buf.is_zero() {
                    let zero = ZeroFlags {
                        may_unmap: detect == DetectZeroes::Unmap
                            && self.discard_mode() == DiscardMode::Unmap,
                        fua: flags.fua,
                    };
                    return self.driver.write_zeroes(offset, len, zero);
                }
                self.driver.write(offset, buf, flags)
            }
            Err(e) => ready(Err(e)),
        }
    }

    /// Makes completed writes stable.
    pub fn flush(&self) -> IoFuture<'_> {
        if self.no_flush() {
            return ready(Ok(()));
        }
        self.driver.flush()
    }

    /// Copies into the node what its backing chain has for the parts of
    /// the range it lacks (block-stream); the guest sees no change, so no
    /// dirty bitmap records it.
    pub fn populate(&self, offset: u64, len: u64) -> IoFuture<'_> {
        if let Err(e) = self.check_write(offset, len) {
            return ready(Err(e));
        }
        self.driver.populate(offset, len)
    }

    /// Writes the backing file name (and format) in the node's image.
    pub fn set_backing_file_name<'a>(
        &'a self,
        name: Option<&'a str>,
        format: Option<&'a str>,
    ) -> IoFuture<'a> {
        if self.read_only() {
            return ready(Err(io::Error::from_raw_os_error(libc::EPERM)));
        }
        self.driver.set_backing_file_name(name, format)
    }

    /// Discards a range; a no-op unless the node has `discard=unmap`.
    pub fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        if let Err(e) = self.check_write(offset, len) {
            return ready(Err(e));
        }
        match self.discard_mode() {
            DiscardMode::Unmap => {
                self.record(offset, len);
                self.driver.discard(offset, len)
            }
            DiscardMode::Ignore => ready(Ok(())),
        }
    }

    /// Makes a range read as zeroes; it is only deallocated when the node has
    /// `discard=unmap` and the flags allow it.
    pub fn write_zeroes(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> IoFuture<'_> {
        if let Err(e) = self.check_write(offset, len) {
            return ready(Err(e));
        }
        flags.may_unmap &= self.discard_mode() == DiscardMode::Unmap;
        self.record(offset, len);
        self.driver.write_zeroes(offset, len, flags)
    }

    /// Reads the point-in-time view of a copy-before-write node.
    pub fn snapshot_read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        match self.check(offset, buf.len() as u64) {
            Ok(()) => self.driver.snapshot_read(offset, buf),
            Err(e) => ready(Err(e)),
        }
    }

    /// The state of the point-in-time view of a copy-before-write node.
    pub fn snapshot_block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        match self.check(offset, len) {
            Ok(()) => self.driver.snapshot_block_status(offset, len),
            Err(e) => ready(Err(e)),
        }
    }

    /// Drops a range from the point-in-time view of a copy-before-write node.
    pub fn snapshot_discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        match self.check(offset, len) {
            Ok(()) => self.driver.snapshot_discard(offset, len),
            Err(e) => ready(Err(e)),
        }
    }

    /// Whether a new persistent bitmap could be stored in the node's image;
    /// the error is QEMU's text.
    pub fn can_store_bitmap(&self, name: &str, granularity: u64) -> Result<(), String> {
        self.driver.can_store_bitmap(&self.name, name, granularity)
    }

    /// Removes persistent bitmap `name` from the node's image.
    pub fn remove_stored_bitmap<'a>(&'a self, name: &'a str) -> IoFuture<'a> {
        self.driver.remove_bitmap(name)
    }

    /// A drained section begins over the node (see
    /// [`BlockDriver::drained_begin`]).
    pub(crate) fn drained_begin(&self) {
        self.driver.drained_begin()
    }

    /// The drained section over the node has ended.
    pub(crate) fn drained_end(&self) {
        self.driver.drained_end()
    }

    /// Requests of the node and of the nodes below it that wait for
    /// something that may take long fail now (see
    /// [`BlockDriver::cancel_in_flight`]); below too, unlike QEMU's
    /// `bdrv_cancel_in_flight`, so that a format node over an NBD client
    /// node counts as the NBD node does.
    pub fn cancel_in_flight(&self) {
        self.driver.cancel_in_flight();
        for child in self.children().iter() {
            child.node().cancel_in_flight();
        }
    }

    /// Waits until the work the driver started on its own has finished.
    pub fn drain(&self) -> IoFuture<'_> {
        self.driver.drain()
    }

    /// Flushes the node, stores its persistent bitmaps and closes its
    /// driver, as it leaves the graph (QEMU's bdrv_close); each step runs
    /// even if one before failed.
    pub fn close(&self) -> IoFuture<'_> {
        Box::pin(async move {
            let (flushed, stored) = if self.read_only() {
                (Ok(()), Ok(()))
            } else {
                let flushed = self.flush().await;
                let bitmaps = self.bitmaps();
                let stored = if bitmaps.iter().any(|b| b.persistent()) {
                    self.driver.store_bitmaps(&bitmaps).await
                } else {
                    Ok(())
                };
                (flushed, stored)
            };
            let closed = self.driver.close().await;
            flushed.and(stored).and(closed)
        })
    }

    /// What the node's image format tells about the image, for queries.
    pub fn format_info(&self) -> Option<FormatInfo> {
        self.driver.format_info()
    }

    /// The state of a copy-before-write node's point-in-time view, for
    /// queries.
    pub fn snapshot_info(&self) -> Option<serde_json::Value> {
        self.driver.snapshot_info()
    }

    /// The state of the range starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        match self.check(offset, len) {
            Ok(()) => self.driver.block_status(offset, len),
            Err(e) => ready(Err(e)),
        }
    }
}

/// An edge from a parent (a node or an export) to a child node, under a
/// role such as `file`, with the permissions the parent holds on the child.
///
/// The child can be replaced while requests run: each request loads the
/// current child once and keeps it until it completes.
pub struct Child {
    role: ChildRole,
    parent: Parent,
    node: ArcSwap<Node>,
    perms: Mutex<(Permission, Permission)>,
}

impl Child {
    /// An edge from `parent` in `role` to `node`, with no permissions yet
    /// (they are set when the graph's permissions are refreshed).
    pub fn new(parent: Parent, role: ChildRole, node: Arc<Node>) -> Arc<Self> {
        Arc::new(Child {
            role,
            parent,
            node: ArcSwap::new(node),
            perms: Mutex::new((Permission::NONE, Permission::ALL)),
        })
    }

    /// What the parent uses the child for.
    pub fn role(&self) -> ChildRole {
        self.role
    }

    /// Who holds the edge.
    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The node the edge points to now.
    pub fn node(&self) -> Arc<Node> {
        self.node.load_full()
    }

    /// Points the edge at `node`; returns the node it pointed to. Callers
    /// quiesce I/O through the edge first.
    pub(crate) fn replace(&self, node: Arc<Node>) -> Arc<Node> {
        self.node.swap(node)
    }

    /// The permissions the parent holds (`perm`) and shares (`shared`).
    pub fn permissions(&self) -> (Permission, Permission) {
        *self.perms.lock()
    }

    pub(crate) fn set_permissions(&self, perm: Permission, shared: Permission) {
        *self.perms.lock() = (perm, shared);
    }
}
