//! What a connection negotiated in the handshake and takes into the
//! transmission phase: the export, the reply mode and the metadata
//! contexts.

use std::sync::Arc;

use super::bitmap::BitmapSource;
use super::export::NbdExport;

/// Context id of `base:allocation`.
pub const ALLOCATION_ID: u32 = 0;
/// Context id of `qemu:allocation-depth`.
pub const DEPTH_ID: u32 = 1;
/// Context id of the export's first bitmap; the others follow.
pub const FIRST_BITMAP_ID: u32 = 2;

/// What a selected metadata context reports.
#[derive(Clone)]
pub enum MetaKind {
    /// `base:allocation`.
    Allocation,
    /// `qemu:allocation-depth`.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`.
    Bitmap(Arc<dyn BitmapSource>),
}

/// A metadata context selected with NBD_OPT_SET_META_CONTEXT.
#[derive(Clone)]
pub struct MetaContext {
    /// Its id in block status replies.
    pub id: u32,
    /// What it reports.
    pub kind: MetaKind,
}

/// The outcome of a successful handshake.
pub struct Session {
    /// The export the client selected (the client is attached to it).
    pub export: Arc<NbdExport>,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Selected metadata contexts, for NBD_CMD_BLOCK_STATUS.
    pub contexts: Vec<MetaContext>,
}
