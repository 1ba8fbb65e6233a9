//! Exports: what serves a graph node to the outside (a vhost-user-blk
//! device, an NBD export), as the daemon manages them, and the pause gate
//! they share, through which the graph drains them.

mod gate;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use blkgraph_graph::{Child, Graph, Permission};

use crate::stats::Sources;

pub use gate::{InFlight, PauseGate, Requests, Source};

/// A running export of any type.
pub trait Export: Send + Sync {
    /// The export id.
    fn id(&self) -> &str;

    /// The export type, as in QMP's BlockExportType (`vhost-user-blk`).
    fn kind(&self) -> &'static str;

    /// The node the export serves now.
    fn node_name(&self) -> String;

    /// The gate the export's request sources check before starting
    /// requests; the graph drains the export through it.
    fn gate(&self) -> &Arc<PauseGate>;

    /// Stops serving for good; called with the gate closed (nothing runs).
    /// With `hard`, connected frontends and clients are disconnected, and
    /// what they submitted is completed or failed first; without it, a
    /// connected one is an error and nothing changes. Returns once the
    /// export's threads have ended.
    fn stop(&self, hard: bool) -> Result<(), ExportError>;

    /// The unix socket path to remove when the export goes, if any.
    fn socket_path(&self) -> Option<&Path>;

    /// A node was resized (block_resize): tell the connected frontends,
    /// where the protocol can (NBD clients see the size when they connect).
    fn resized(&self) {}

    /// The statistics of its request sources.
    fn stats(&self) -> &Sources;
}

/// Why an export could not start or stop.
#[derive(Debug)]
pub enum ExportError {
    /// The options are wrong; the text names the key in QMP's words.
    InvalidOptions(String),
    /// The graph refused (a missing node, a permission conflict, ...).
    Graph(blkgraph_graph::Error),
    /// A frontend or client is connected and the stop was not `hard`.
    InUse(String),
    /// No export (or NBD server) by that name.
    NotFound(String),
    /// The id is taken, or the NBD server is (not) running.
    Conflict(String),
    /// The export's socket or threads could not be set up.
    Setup(String),
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportError::InvalidOptions(t)
            | ExportError::InUse(t)
            | ExportError::NotFound(t)
            | ExportError::Conflict(t)
            | ExportError::Setup(t) => f.write_str(t),
            ExportError::Graph(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ExportError {}

impl From<blkgraph_graph::Error> for ExportError {
    fn from(e: blkgraph_graph::Error) -> Self {
        ExportError::Graph(e)
    }
}

/// Attaches export `id` to its node as a parent that reads it (and writes
/// it if `writable`) and lets every other parent do anything, as QEMU's
/// block exports do; the graph drains it through `gate`. Returns the
/// export's root edge.
pub fn attach(
    graph: &Graph,
    id: &str,
    node_name: &str,
    writable: bool,
    gate: &Arc<PauseGate>,
) -> Result<Arc<Child>, ExportError> {
    let perm = if writable {
        Permission::CONSISTENT_READ | Permission::WRITE
    } else {
        Permission::CONSISTENT_READ
    };
    Ok(graph.attach_export(id, node_name, perm, Permission::ALL, gate.clone())?)
}
