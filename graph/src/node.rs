//! A node of the graph: a driver instance with a name, options and children.

use std::io;
use std::sync::Arc;

use serde::Deserialize;

use arc_swap::ArcSwap;

use crate::bitmap::DirtyBitmap;
use crate::buffer::IoBuffer;
use crate::child::Child;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, WriteFlags, ZeroFlags};
use crate::drivers::CommonOptions;
use crate::permission::Permission;

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

/// A node of the block graph.
pub struct Node {
    name: String,
    driver_name: &'static str,
    driver: Box<dyn BlockDriver>,
    read_only: bool,
    discard: DiscardMode,
    no_flush: bool,
    direct: bool,
    children: Vec<Arc<Child>>,
    implicit: bool,
    bitmaps: ArcSwap<Vec<Arc<DirtyBitmap>>>,
}

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
    /// Creates a node; `children` are the edges its driver holds.
    pub(crate) fn new(
        name: String,
        driver_name: &'static str,
        driver: Box<dyn BlockDriver>,
        common: &CommonOptions,
        children: Vec<Arc<Child>>,
        implicit: bool,
    ) -> Self {
        Node {
            name,
            driver_name,
            driver,
            read_only: common.is_read_only(),
            discard: common.discard.unwrap_or_default(),
            no_flush: common.cache.and_then(|c| c.no_flush).unwrap_or(false),
            direct: common.direct(),
            children,
            implicit,
            bitmaps: ArcSwap::from_pointee(Vec::new()),
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

    fn record(&self, offset: u64, len: u64) {
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

    /// Whether the node was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether discards reach the driver.
    pub fn discard_mode(&self) -> DiscardMode {
        self.discard
    }

    /// The child edges.
    pub fn children(&self) -> &[Arc<Child>] {
        &self.children
    }

    /// Whether the node was created inline in another node's options.
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// What the node takes and shares on its child in `role`, given what
    /// its parents need and share.
    pub fn child_perm(
        &self,
        role: &str,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        self.driver.child_perm(role, perm, shared)
    }

    /// The host file behind this node: its own, or its first child's.
    pub fn filename(&self) -> Option<String> {
        self.driver
            .filename()
            .or_else(|| self.children.first().and_then(|c| c.node().filename()))
    }

    /// Whether the node bypasses the host page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether flushes are ignored.
    pub fn no_flush(&self) -> bool {
        self.no_flush
    }

    /// Alignment that avoids bouncing in the driver.
    pub fn request_alignment(&self) -> u64 {
        self.driver.request_alignment()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.check(offset, len)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        match self.check(offset, buf.len() as u64) {
            Ok(()) => self.driver.read(offset, buf),
            Err(e) => ready(Err(e)),
        }
    }

    /// Writes `buf` at `offset`.
    pub fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        match self.check_write(offset, buf.len() as u64) {
            Ok(()) => {
                self.record(offset, buf.len() as u64);
                self.driver.write(offset, buf, flags)
            }
            Err(e) => ready(Err(e)),
        }
    }

    /// Makes completed writes stable.
    pub fn flush(&self) -> IoFuture<'_> {
        if self.no_flush {
            return ready(Ok(()));
        }
        self.driver.flush()
    }

    /// Discards a range; a no-op unless the node has `discard=unmap`.
    pub fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        if let Err(e) = self.check_write(offset, len) {
            return ready(Err(e));
        }
        match self.discard {
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
        flags.may_unmap &= self.discard == DiscardMode::Unmap;
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

    /// Waits until the work the driver started on its own has finished.
    pub fn drain(&self) -> IoFuture<'_> {
        self.driver.drain()
    }

    /// Flushes the node and closes its driver, as it leaves the graph
    /// (QEMU's bdrv_close); both run even if the first fails.
    pub fn close(&self) -> IoFuture<'_> {
        Box::pin(async move {
            let flushed = if self.read_only {
                Ok(())
            } else {
                self.flush().await
            };
            let closed = self.driver.close().await;
            flushed.and(closed)
        })
    }

    /// Driver-specific state, for queries.
    pub fn driver_info(&self) -> Option<serde_json::Value> {
        self.driver.info()
    }

    /// The state of the range starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        match self.check(offset, len) {
            Ok(()) => self.driver.block_status(offset, len),
            Err(e) => ready(Err(e)),
        }
    }
}
