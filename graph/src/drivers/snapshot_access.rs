//! The `snapshot-access` driver: the point-in-time view of its `file`
//! child, a copy-before-write node, through that node's snapshot API.
//! Reads never block; writes are not supported; discards drop clusters
//! from the snapshot (and from what is still copied).

use std::sync::Arc;

use serde::Deserialize;

use crate::buffer::IoBuffer;
use crate::driver::{
    unsupported, BlockDriver, BlockStatus, ChildRole, IoFuture, WriteFlags, ZeroFlags,
};
use crate::error::Error;
use crate::node::Child;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;
use crate::permission::Permission;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry {
    name: "snapshot-access",
    open,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

struct SnapshotAccess {
    file: Arc<Child>,
}

fn open(
    ctx: &mut OpenContext<'_, '_>,
    mut options: Options,
) -> Result<Box<dyn BlockDriver>, Error> {
    let file = ctx.required_child(&mut options, ChildRole::File)?;
    let _: NoOptions = options.parse("")?;
    Ok(Box::new(SnapshotAccess { file }))
}

impl BlockDriver for SnapshotAccess {
    fn size(&self) -> u64 {
        self.file.node().size()
    }

    /// The view goes through the snapshot API, not the normal one: it
    /// takes nothing and shares everything.
    fn child_perm(
        &self,
        _role: ChildRole,
        _perm: Permission,
        _shared: Permission,
    ) -> (Permission, Permission) {
        (Permission::NONE, Permission::ALL)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        let file = self.file.node();
        Box::pin(async move { file.snapshot_read(offset, buf).await })
    }

    fn write<'a>(&'a self, _: u64, _: &'a IoBuffer, _: WriteFlags) -> IoFuture<'a> {
        unsupported()
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        let file = self.file.node();
        Box::pin(async move { file.snapshot_discard(offset, len).await })
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_> {
        unsupported()
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        let file = self.file.node();
        Box::pin(async move { file.snapshot_block_status(offset, len).await })
    }
}
