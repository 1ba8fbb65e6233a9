//! The state of a graph: its nodes by node-name, its exports' root edges,
//! its throttle groups; what a transaction copies, changes and commits.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::drain::DrainParent;
use crate::node::{Child, Node};
use crate::throttle_group::ThrottleGroup;

/// An export's root edge and the export itself, as a parent to drain.
#[derive(Clone)]
pub(crate) struct ExportEdge {
    pub(crate) edge: Arc<Child>,
    pub(crate) parent: Arc<dyn DrainParent>,
}

/// The edges of a block job to the nodes it uses, and the job itself, as a
/// parent to drain.
#[derive(Clone)]
pub(crate) struct JobEdges {
    pub(crate) edges: Vec<Arc<Child>>,
    pub(crate) parent: Arc<dyn DrainParent>,
}

/// The nodes and export edges of a graph.
#[derive(Clone, Default)]
pub(crate) struct State {
    pub(crate) nodes: BTreeMap<String, Arc<Node>>,
    pub(crate) exports: BTreeMap<String, ExportEdge>,
    pub(crate) jobs: BTreeMap<String, JobEdges>,
    pub(crate) groups: BTreeMap<String, Arc<ThrottleGroup>>,
    pub(crate) events: Option<crate::EventSink>,
    pub(crate) implicit_counter: u64,
}

impl State {
    /// The edges from parents outside the graph: exports' roots and the
    /// nodes of jobs.
    pub(crate) fn external_edges(&self) -> impl Iterator<Item = &Arc<Child>> {
        self.exports
            .values()
            .map(|e| &e.edge)
            .chain(self.jobs.values().flat_map(|j| j.edges.iter()))
    }

    /// The parents outside the graph that a drained section pauses, in
    /// the order it pauses them: jobs before exports, as a job may read or
    /// write through an export of this graph (an NBD client node connected
    /// to its own NBD server) and pauses only once that I/O is done.
    pub(crate) fn drain_parents(&self) -> Vec<Arc<dyn DrainParent>> {
        self.jobs
            .values()
            .map(|j| j.parent.clone())
            .chain(self.exports.values().map(|e| e.parent.clone()))
            .collect()
    }
}
