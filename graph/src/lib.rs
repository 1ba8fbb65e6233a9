//! blkgraph's block graph.
//!
//! A graph of nodes, each an instance of a driver (`file`, `raw`, `null-co`,
//! ...), joined by child edges with roles. Block operations are asynchronous
//! futures (see [`aio`]), so a queue worker keeps many requests in flight and a
//! node can wait on another request without blocking its thread.
//!
//! This crate depends on none of blkgraph's other crates.

#![deny(missing_docs)]

pub mod aio;
mod bitmap;
mod bitset;
mod blueprint;
mod buffer;
mod check;
mod drain;
mod driver;
pub mod drivers;
mod error;
mod graph;
pub mod job;
mod node;
mod open;
pub mod options;
mod permission;
mod range_lock;
mod state;
mod throttle_group;
mod transaction;

/// The event sent when a copy-before-write snapshot breaks (a blkgraph
/// extension, named by QMP's convention for downstream extensions).
pub const SNAPSHOT_BROKEN_EVENT: &str = "__org.blkgraph_SNAPSHOT_BROKEN";

/// Receives events with a name and data (e.g. a snapshot that broke).
pub type EventSink = std::sync::Arc<dyn Fn(&str, serde_json::Value) + Send + Sync>;

pub use bitmap::{BitmapUnusable, DirtyBitmap};
pub use bitset::OutOfMemory;
pub use buffer::{IoBuffer, IoSegment};
pub use drain::DrainParent;
pub use driver::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, FormatInfo, IoFuture, Reopen, WriteFlags,
    ZeroFlags,
};
pub use error::Error;
pub use graph::{Drained, Graph, GraphView};
pub use node::{
    CacheOptions, Child, CommonOptions, DetectZeroes, DiscardMode, Node, MAX_LENGTH,
    WRITE_THRESHOLD_EVENT,
};
pub use open::{DriverEntry, OpenContext, OpenFn, MAX_NODE_NAME_LEN, MAX_OPEN_DEPTH};
pub use options::Options;
pub use permission::{Parent, Permission};
pub use throttle_group::{Direction, ThrottleGroup, ThrottleLimits};
pub use transaction::{BitmapOptions, BitmapRef, ReplaceParent, Transaction};
