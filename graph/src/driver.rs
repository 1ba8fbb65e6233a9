//! The table of operations every block driver implements.

use std::fmt;
use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
use crate::buffer::IoBuffer;
use crate::error::Error;
use crate::node::{Child, DiscardMode};
use crate::permission::Permission;

pub use crate::aio::IoFuture;

/// Flags of a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the write completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated, as long as it reads back as zeroes.
    pub may_unmap: bool,
    /// Force unit access.
    pub fua: bool,
}

/// The state of a range of a node, from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run of bytes with this state.
    pub len: u64,
    /// The range reads stored data (it is not known to read as zeroes
    /// without being read).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Where the range's content comes from, as QEMU's allocation depth: 0
    /// when no layer of the node's backing chain has it (it reads as
    /// zeroes), 1 when the node itself has it, n + 1 when its nth backing
    /// layer does. Filters report their child's depth; protocol nodes 1.
    pub depth: u32,
}

/// What a parent uses a child for (QEMU's child roles, by option name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// `file`: where a format driver keeps its image, or what a filter
    /// filters.
    File,
    /// `backing`: where unallocated ranges of an image are read from.
    Backing,
    /// `data-file`: an image's guest data, apart from its metadata.
    DataFile,
    /// `target`: where copy-before-write copies old data to.
    Target,
    /// `root`: the node an export serves.
    Root,
}

impl ChildRole {
    /// The option name, e.g. `file`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::DataFile => "data-file",
            ChildRole::Target => "target",
            ChildRole::Root => "root",
        }
    }
}

impl fmt::Display for ChildRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What requests to a node should look like (QEMU's BlockLimits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// Alignment in bytes of offsets, lengths and memory that avoids
    /// bouncing (1 when anything goes).
    pub request_alignment: u64,
    /// The largest request the node takes at once, in bytes, if limited.
    pub max_transfer: Option<u64>,
    /// Alignment of discards that have an effect (a qcow2 cluster, say).
    pub discard_alignment: u64,
    /// Alignment of requests that performs best (a qcow2 cluster, say).
    pub optimal_alignment: u64,
    /// Requests are served by another host or process (rbd, an NBD
    /// server) and complete after hundreds of microseconds or more:
    /// busy-polling for their completions costs CPU and gains nothing.
    pub remote: bool,
}

impl Default for BlockLimits {
    fn default() -> Self {
        BlockLimits {
            request_alignment: 1,
            max_transfer: None,
            discard_alignment: 1,
            optimal_alignment: 1,
            remote: false,
        }
    }
}

/// What an image format tells about an image (QEMU's ImageInfo members
/// that come from the format driver).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FormatInfo {
    /// The cluster size, for formats that have clusters.
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty (not closed cleanly).
    pub dirty_flag: Option<bool>,
    /// The backing file name as the image stores it.
    pub backing_filename: Option<String>,
    /// The backing file's format as the image stores it.
    pub backing_format: Option<String>,
    /// QEMU's ImageInfoSpecific: `{"type": format, "data": {...}}`.
    pub specific: Option<serde_json::Value>,
}

/// What blockdev-reopen changes of a node, as its driver sees it (QEMU's
/// BDRVReopenState).
#[derive(Clone, Copy)]
pub struct Reopen<'a> {
    /// The node-name.
    pub node: &'a str,
    /// Whether the node is read-only now.
    pub was_read_only: bool,
    /// Whether it will be.
    pub read_only: bool,
    /// Its discard mode from now on.
    pub discard: DiscardMode,
    /// The node's dirty bitmaps (a format stores its persistent ones as
    /// the image becomes read-only).
    pub bitmaps: &'a [Arc<DirtyBitmap>],
}

impl Reopen<'_> {
    /// Refuses a change of read-only, with QEMU's text for a driver
    /// (`driver`) that cannot reopen its node.
    pub(crate) fn same_read_only(&self, driver: &str) -> Result<(), Error> {
        if self.read_only == self.was_read_only {
            return Ok(());
        }
        Err(Error::OpenFailed(format!(
            "Block format '{driver}' used by node '{}' does not support reopening files",
            self.node
        )))
    }
}

/// Operations of a block driver instance: the node's behaviour.
///
/// Offsets and lengths arrive checked against [`BlockDriver::size`] by the
/// node. Futures may complete in any order; a driver that waits on other
/// requests does so by awaiting, never by blocking its thread.
///
/// A filter (a driver that passes requests to one child unchanged, or
/// delays them) names that child in [`BlockDriver::filtered_child`] and
/// gets the I/O operations, block status and limits forwarded to it by
/// default, implementing only what it changes.
pub trait BlockDriver: Send + Sync {
    /// Size of the node in bytes.
    fn size(&self) -> u64;

    /// What requests to this node should look like; a filter's are its
    /// child's.
    fn limits(&self) -> BlockLimits {
        self.filtered_child()
            .map(|c| c.node().limits())
            .unwrap_or_default()
    }

    /// The permissions this node takes (`perm`) and shares (`shared`) on
    /// its child in `role`, given the union of what its parents need
    /// (`perm`) and the intersection of what they share (`shared`). The
    /// default passes the parents' needs down, as a filter does.
    fn child_perm(
        &self,
        _role: ChildRole,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        (perm, shared)
    }

    /// The host file behind this node, if the driver opened one.
    fn filename(&self) -> Option<String> {
        None
    }

    /// The child this driver passes requests to unchanged, if it is a
    /// filter.
    fn filtered_child(&self) -> Option<&Arc<Child>> {
        None
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        match self.filtered_child() {
            Some(c) => {
                let node = c.node();
                Box::pin(async move { node.read(offset, buf).await })
            }
            None => unsupported(),
        }
    }

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        match self.filtered_child() {
            Some(c) => {
                let node = c.node();
                Box::pin(async move { node.write(offset, buf, flags).await })
            }
            None => unsupported(),
        }
    }

    /// Makes completed writes stable.
    fn flush(&self) -> IoFuture<'_> {
        match self.filtered_child() {
            Some(c) => {
                let node = c.node();
                Box::pin(async move { node.flush().await })
            }
            None => unsupported(),
        }
    }

    /// Deallocates a range; its content becomes unspecified.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        match self.filtered_child() {
            Some(c) => {
                let node = c.node();
                Box::pin(async move { node.discard(offset, len).await })
            }
            None => unsupported(),
        }
    }

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        match self.filtered_child() {
            Some(c) => {
                let node = c.node();
                Box::pin(async move { node.write_zeroes(offset, len, flags).await })
            }
            None => unsupported(),
        }
    }

    /// The state of the range starting at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        match self.filtered_child() {
            Some(c) => {
                let node = c.node();
                Box::pin(async move { node.block_status(offset, len).await })
            }
            None => unsupported(),
        }
    }

    /// Changes the size of the node (block_resize); the graph has checked
    /// that the parents allow it.
    fn resize(&self, _size: u64) -> IoFuture<'_> {
        unsupported()
    }

    /// Takes `backing` as the node's backing child (blockdev-snapshot,
    /// stream and commit change it); only format drivers with backing
    /// files can.
    fn set_backing(&self, _backing: Option<Arc<Child>>) -> Result<(), Error> {
        Err(Error::OpenFailed(
            "The node does not support backing images".into(),
        ))
    }

    /// Copies into the node what its backing chain has for the parts of
    /// the range it does not have itself (block-stream's copy).
    fn populate(&self, _offset: u64, _len: u64) -> IoFuture<'_> {
        unsupported()
    }

    /// Writes `name` (and its format) as the backing file name in the
    /// image, or none (block-stream, block-commit).
    fn set_backing_file_name<'a>(
        &'a self,
        _name: Option<&'a str>,
        _format: Option<&'a str>,
    ) -> IoFuture<'a> {
        unsupported()
    }

    /// Whether a write past the end extends the node (a host file does),
    /// for parents that hold the resize permission.
    fn extends_on_write(&self) -> bool {
        false
    }

    /// Snapshot API (copy-before-write): reads the point-in-time view.
    fn snapshot_read<'a>(&'a self, _offset: u64, _buf: &'a IoBuffer) -> IoFuture<'a> {
        unsupported()
    }

    /// Snapshot API: the state of the point-in-time view.
    fn snapshot_block_status(&self, _offset: u64, _len: u64) -> IoFuture<'_, BlockStatus> {
        unsupported()
    }

    /// Snapshot API: the range is no longer needed in the view.
    fn snapshot_discard(&self, _offset: u64, _len: u64) -> IoFuture<'_> {
        unsupported()
    }

    /// The state of the point-in-time view a copy-before-write node keeps,
    /// for queries.
    fn snapshot_info(&self) -> Option<serde_json::Value> {
        None
    }

    /// Whether a new persistent bitmap `name` of `granularity` bytes per
    /// bit could be stored in the image of node `node`
    /// (block-dirty-bitmap-add with persistent); the error is QEMU's text.
    fn can_store_bitmap(&self, node: &str, _name: &str, _granularity: u64) -> Result<(), String> {
        Err(format!(
            "Can't store persistent bitmaps to {node}: Operation not supported"
        ))
    }

    /// Stores the persistent ones of `bitmaps` (the node's) in the image,
    /// as the node closes.
    fn store_bitmaps<'a>(&'a self, _bitmaps: &'a [Arc<DirtyBitmap>]) -> IoFuture<'a> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Removes persistent bitmap `name` from the image (a no-op if it is
    /// not there).
    fn remove_bitmap<'a>(&'a self, _name: &'a str) -> IoFuture<'a> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// What an image format driver tells about its image, for queries.
    fn format_info(&self) -> Option<FormatInfo> {
        None
    }

    /// A drained section begins: requests the driver holds back on its
    /// own (a throttle's, waiting for their turn) go at once, and none is
    /// held back until [`BlockDriver::drained_end`], as QEMU's
    /// `bdrv_drain_begin`: the section waits for every request in flight,
    /// and must not wait for a limit. Called before the section waits for
    /// anything; must not block.
    fn drained_begin(&self) {}

    /// The drained section that [`BlockDriver::drained_begin`] began has
    /// ended.
    fn drained_end(&self) {}

    /// Requests that wait for something that may take long (an NBD
    /// client's reconnection) fail now. A job calls it on its target when
    /// it is cancelled by force, so that the cancel does not wait for
    /// them (QEMU's `bdrv_cancel_in_flight`). Must not block.
    fn cancel_in_flight(&self) {}

    /// Waits until the work the driver started on its own (not on behalf
    /// of a request still running, e.g. a copy that outlived its guest
    /// write) has finished. Called in drained sections, when no parent
    /// starts requests.
    fn drain(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Prepares a reopen (blockdev-reopen, or a job that needs its node
    /// writable for a while): gets what the new state needs (a file
    /// opened again) or fails, changing nothing either way. Exactly one of
    /// [`BlockDriver::reopen_commit`] and [`BlockDriver::reopen_abort`]
    /// follows. Called in a drained section, before the node's own options
    /// change. The default has nothing to prepare.
    fn reopen_prepare(&self, _reopen: &Reopen<'_>) -> Result<(), Error> {
        Ok(())
    }

    /// Makes the prepared state the driver's; the reopens of the node's
    /// children have committed already. It cannot fail: what goes wrong is
    /// logged, as QEMU does.
    fn reopen_commit(&self) {}

    /// Drops the prepared state: the reopen did not happen.
    fn reopen_abort(&self) {}

    /// Writes what the driver keeps in memory; called once, after the node
    /// was flushed, when it leaves the graph. Requests never follow.
    fn close(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A future that fails at once with ENOTSUP.
pub(crate) fn unsupported<'a, T: Send + 'a>() -> IoFuture<'a, T> {
    Box::pin(std::future::ready(Err(std::io::Error::from_raw_os_error(
        libc::ENOTSUP,
    ))))
}
