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

/// The nodes and export edges of a graph.
#[derive(Clone, Default)]
pub(crate) struct State {
    pub(crate) nodes: BTreeMap<String, Arc<Node>>,
    pub(crate) exports: BTreeMap<String, ExportEdge>,
    pub(crate) groups: BTreeMap<String, Arc<ThrottleGroup>>,
    pub(crate) events: Option<crate::EventSink>,
    pub(crate) implicit_counter: u64,
}
