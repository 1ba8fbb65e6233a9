//! The graph: every node by node-name, the exports' root edges, and the
//! permission check over all edges.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::child::Child;
use crate::drain::{close_nodes, DrainParent, DrainedSection};
use crate::error::Error;
use crate::node::Node;
use crate::options::Options;
use crate::permission::{Parent, Permission};
use crate::throttle_group::{ThrottleGroup, ThrottleLimits};
use crate::transaction::Transaction;

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

/// The block graph. Shared by the control plane and the exports; requests
/// never lock it (they hold their nodes directly). Changes go through
/// [`Transaction`]s, one at a time.
#[derive(Default)]
pub struct Graph {
    state: Mutex<State>,
}

/// A consistent view of the graph for queries.
pub struct GraphView {
    /// Every node, by name.
    pub nodes: Vec<Arc<Node>>,
    /// Every export's root edge, by export id.
    pub exports: Vec<(String, Arc<Child>)>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Starts a transaction; the graph is locked until it is committed or
    /// dropped (which rolls it back). Requests keep running: for actions
    /// that only add.
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction::new(self.lock(), false)
    }

    /// Starts a transaction in a drained section: every export is paused
    /// and every driver's own work has finished before the first action,
    /// and the exports take requests again when the transaction ends.
    pub fn drained_transaction(&self) -> Transaction<'_> {
        Transaction::new(self.lock(), true)
    }

    /// Opens a node from `options` (blockdev-add) in a transaction of its
    /// own. On error nothing is added, not even inline children.
    pub fn add(&self, options: Options) -> Result<Arc<Node>, Error> {
        let mut tx = self.transaction();
        let node = tx.add(options)?;
        tx.commit()?;
        Ok(node)
    }

    /// Deletes a node nobody uses (blockdev-del), in a drained transaction
    /// of its own; the node is closed before this returns.
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let mut tx = self.drained_transaction();
        tx.remove(name)?;
        tx.commit()
    }

    /// The node named `name`.
    pub fn find(&self, name: &str) -> Result<Arc<Node>, Error> {
        self.lock()
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock().nodes.values().cloned().collect()
    }

    /// Nodes and export edges, taken at one instant.
    pub fn view(&self) -> GraphView {
        let state = self.lock();
        GraphView {
            nodes: state.nodes.values().cloned().collect(),
            exports: state
                .exports
                .iter()
                .map(|(id, e)| (id.clone(), e.edge.clone()))
                .collect(),
        }
    }

    /// Attaches export `id` to node `node_name` with the given permissions;
    /// `parent` is the export, paused whenever the graph is drained.
    /// Returns the export's root edge.
    pub fn attach_export(
        &self,
        id: &str,
        node_name: &str,
        perm: Permission,
        shared: Permission,
        parent: Arc<dyn DrainParent>,
    ) -> Result<Arc<Child>, Error> {
        let mut tx = self.transaction();
        let edge = tx.attach_export(id, node_name, perm, shared, parent)?;
        tx.commit()?;
        Ok(edge)
    }

    /// At exit: drains the graph for good (exports stay paused, requests
    /// still queued stay where they are), then closes every node, parents
    /// first.
    pub fn shut_down(&self) {
        let mut state = self.lock();
        let parents = state.exports.values().map(|e| e.parent.clone()).collect();
        DrainedSection::begin(parents, state.nodes.values()).keep();
        close_nodes(std::mem::take(&mut state.nodes).into_values().collect());
    }

    /// Where events of nodes (e.g. a broken snapshot) go from now on.
    pub fn set_event_sink(&self, sink: crate::EventSink) {
        self.lock().events = Some(sink);
    }

    /// Adds a throttle group object (`--object throttle-group`, object-add).
    pub fn add_throttle_group(&self, id: &str, limits: ThrottleLimits) -> Result<(), Error> {
        if !crate::drivers::valid_node_name(id) {
            return Err(Error::InvalidOptions(format!(
                "Parameter 'id' expects an identifier, got '{id}'"
            )));
        }
        let mut state = self.lock();
        if state.groups.contains_key(id) {
            return Err(Error::OpenFailed(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        state
            .groups
            .insert(id.to_string(), Arc::new(ThrottleGroup::new(id, limits)));
        Ok(())
    }

    /// Deletes a throttle group that no node uses.
    pub fn remove_throttle_group(&self, id: &str) -> Result<(), Error> {
        let mut state = self.lock();
        let group = state
            .groups
            .get(id)
            .ok_or_else(|| Error::OpenFailed(format!("object '{id}' not found")))?;
        if Arc::strong_count(group) > 1 {
            return Err(Error::InUse(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        state.groups.remove(id);
        Ok(())
    }

    /// Every throttle group.
    pub fn throttle_groups(&self) -> Vec<Arc<ThrottleGroup>> {
        self.lock().groups.values().cloned().collect()
    }

    /// Detaches export `id`.
    pub fn detach_export(&self, id: &str) -> Result<(), Error> {
        let mut tx = self.transaction();
        tx.detach_export(id)?;
        tx.commit()
    }
}

/// An edge into a node, for the permission check.
struct Incoming {
    edge: Arc<Child>,
    perm: Permission,
    shared: Permission,
}

/// Computes every edge's permissions over `state` and checks them: each
/// parent's `perm` must be inside every other parent's `shared`, and
/// nobody may write a read-only node. Returns the permissions to apply.
pub(crate) fn check_permissions(
    state: &State,
) -> Result<Vec<(Arc<Child>, Permission, Permission)>, Error> {
    let mut incoming: HashMap<&str, Vec<Incoming>> = HashMap::new();
    let mut pending: HashMap<&str, usize> = state.nodes.keys().map(|n| (n.as_str(), 0)).collect();
    for node in state.nodes.values() {
        for edge in node.children() {
            let child = edge.node();
            match pending.get_mut(child.name()) {
                Some(count) => *count += 1,
                None => {
                    return Err(Error::OpenFailed(format!(
                        "Node '{}' uses node '{}', which is not in the graph",
                        node.name(),
                        child.name()
                    )))
                }
            }
        }
    }
    for ExportEdge { edge, .. } in state.exports.values() {
        let (perm, shared) = edge.permissions();
        let name = edge.node().name().to_string();
        let key = state
            .nodes
            .get_key_value(&name)
            .map(|(k, _)| k.as_str())
            .ok_or_else(|| Error::NodeNotFound(name.clone()))?;
        incoming.entry(key).or_default().push(Incoming {
            edge: edge.clone(),
            perm,
            shared,
        });
    }
    let mut ready: Vec<&str> = pending
        .iter()
        .filter(|(_, c)| **c == 0)
        .map(|(n, _)| *n)
        .collect();
    let mut result = Vec::new();
    let mut done = 0;
    while let Some(name) = ready.pop() {
        done += 1;
        let node = &state.nodes[name];
        let parents = incoming.remove(name).unwrap_or_default();
        let (perm, shared) = check_node(node, &parents)?;
        for p in parents {
            if !matches!(p.edge.parent(), Parent::Export(_)) {
                result.push((p.edge, p.perm, p.shared));
            }
        }
        for edge in node.children() {
            let (cperm, cshared) = node.child_perm(edge.role(), perm, shared);
            let child = edge.node();
            // Every child is in the graph: the first loop checked it.
            let Some((key, _)) = state.nodes.get_key_value(child.name()) else {
                return Err(Error::NodeNotFound(child.name().to_string()));
            };
            incoming.entry(key.as_str()).or_default().push(Incoming {
                edge: edge.clone(),
                perm: cperm,
                shared: cshared,
            });
            let Some(count) = pending.get_mut(key.as_str()) else {
                return Err(Error::NodeNotFound(child.name().to_string()));
            };
            *count -= 1;
            if *count == 0 {
                ready.push(key.as_str());
            }
        }
    }
    if done != state.nodes.len() {
        return Err(Error::OpenFailed(
            "The change would create a loop in the graph".into(),
        ));
    }
    Ok(result)
}

/// Checks the parents of one node against each other; returns the union
/// of what they need and the intersection of what they share.
fn check_node(node: &Node, parents: &[Incoming]) -> Result<(Permission, Permission), Error> {
    let name = node.name();
    let mut perm = Permission::NONE;
    let mut shared = Permission::ALL;
    for a in parents {
        if node.read_only() && !(a.perm & (Permission::WRITE | Permission::RESIZE)).is_empty() {
            return Err(Error::Permission(format!(
                "Block node '{name}' is read-only, but {} (uses node '{name}' as '{}' child) needs '{}'",
                a.edge.parent(),
                a.edge.role(),
                a.perm & (Permission::WRITE | Permission::RESIZE)
            )));
        }
        for b in parents {
            if std::ptr::eq(a, b) {
                continue;
            }
            let conflict = a.perm & !b.shared;
            if !conflict.is_empty() {
                return Err(Error::Permission(format!(
                    "Permission conflict on node '{name}': permissions '{conflict}' are both required by {} (uses node '{name}' as '{}' child) and unshared by {} (uses node '{name}' as '{}' child)",
                    a.edge.parent(),
                    a.edge.role(),
                    b.edge.parent(),
                    b.edge.role()
                )));
            }
        }
        perm = perm | a.perm;
        shared = shared & a.shared;
    }
    Ok((perm, shared))
}
