//! The driver table: every driver blkgraph has. Adding a driver is one new
//! module here plus one entry in [`DRIVERS`].

pub(crate) mod copy_before_write;
mod file;
mod nbd;
mod null;
pub(crate) mod qcow2;
mod raw;
mod rbd;
mod snapshot_access;
mod throttle;

use crate::open::DriverEntry;

/// Every driver blkgraph has.
pub const DRIVERS: &[DriverEntry] = &[
    file::ENTRY,
    raw::ENTRY,
    null::ENTRY,
    qcow2::ENTRY,
    throttle::ENTRY,
    copy_before_write::ENTRY,
    snapshot_access::ENTRY,
    rbd::ENTRY,
    nbd::ENTRY,
];
