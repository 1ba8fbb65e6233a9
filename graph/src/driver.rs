//! The table of operations every block driver implements.

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::buffer::IoBuffer;
use crate::permission::Permission;

/// The future of a block operation.
pub type IoFuture<'a, T = ()> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

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
    /// The range holds data (is allocated) in this node.
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
}

/// Operations of a block driver instance: the node's behaviour.
///
/// Offsets and lengths arrive checked against [`BlockDriver::size`] by the
/// node. Futures may complete in any order; a driver that waits on other
/// requests does so by awaiting, never by blocking its thread.
pub trait BlockDriver: Send + Sync {
    /// Size of the node in bytes.
    fn size(&self) -> u64;

    /// Alignment in bytes that offsets, lengths and memory of requests to
    /// this node should have to avoid bouncing (1 when anything goes).
    fn request_alignment(&self) -> u64 {
        1
    }

    /// The permissions this node takes (`perm`) and shares (`shared`) on
    /// its child in `role`, given the union of what its parents need
    /// (`perm`) and the intersection of what they share (`shared`). The
    /// default passes the parents' needs down, as a filter does.
    fn child_perm(
        &self,
        _role: &str,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        (perm, shared)
    }

    /// The host file behind this node, if the driver opened one.
    fn filename(&self) -> Option<String> {
        None
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a>;

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a>;

    /// Makes completed writes stable.
    fn flush(&self) -> IoFuture<'_>;

    /// Deallocates a range; its content becomes unspecified.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_>;

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_>;

    /// The state of the range starting at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus>;

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

    /// Driver-specific state for query-named-block-nodes, if any.
    fn info(&self) -> Option<serde_json::Value> {
        None
    }

    /// Waits until the work the driver started on its own (not on behalf
    /// of a request still running, e.g. a copy that outlived its guest
    /// write) has finished. Called in drained sections, when no parent
    /// starts requests.
    fn drain(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

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
