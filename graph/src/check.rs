//! The permission check over a graph's state: every edge's permissions,
//! computed parents before children, and QEMU's rules between the parents
//! of each node.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Error;
use crate::node::{Child, Node};
use crate::permission::{Parent, Permission};
use crate::state::State;

/// An edge into a node, for the permission check.
struct Incoming {
    edge: Arc<Child>,
    perm: Permission,
    shared: Permission,
}

/// The permissions a check computed, to apply when the change commits.
#[derive(Default)]
pub(crate) struct Checked {
    /// Each edge between nodes, with what its parent takes and shares.
    pub(crate) edges: Vec<(Arc<Child>, Permission, Permission)>,
    /// Each node, with the union of what its parents take.
    pub(crate) granted: Vec<(Arc<Node>, Permission)>,
}

/// Computes every edge's permissions over `state` and checks them: each
/// parent's `perm` must be inside every other parent's `shared`, and
/// nobody may write a read-only node (`made_read_only`: the nodes a reopen
/// made read-only, for QEMU's text). Returns the permissions to apply.
pub(crate) fn check_permissions(
    state: &State,
    made_read_only: &[Arc<Node>],
) -> Result<Checked, Error> {
    let mut incoming: HashMap<&str, Vec<Incoming>> = HashMap::new();
    let mut pending: HashMap<&str, usize> = state.nodes.keys().map(|n| (n.as_str(), 0)).collect();
    for node in state.nodes.values() {
        for edge in node.children().iter() {
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
    for edge in state.external_edges() {
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
    let mut result = Checked::default();
    let mut done = 0;
    while let Some(name) = ready.pop() {
        done += 1;
        let node = &state.nodes[name];
        let parents = incoming.remove(name).unwrap_or_default();
        let reopened = made_read_only.iter().any(|n| Arc::ptr_eq(n, node));
        let (perm, shared) = check_node(node, &parents, reopened)?;
        result.granted.push((node.clone(), perm));
        for p in parents {
            if matches!(p.edge.parent(), Parent::Node(_)) {
                result.edges.push((p.edge, p.perm, p.shared));
            }
        }
        for edge in node.children().iter() {
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
fn check_node(
    node: &Node,
    parents: &[Incoming],
    reopened: bool,
) -> Result<(Permission, Permission), Error> {
    let name = node.name();
    let mut perm = Permission::NONE;
    let mut shared = Permission::ALL;
    for a in parents {
        if node.read_only() && !(a.perm & (Permission::WRITE | Permission::RESIZE)).is_empty() {
            if reopened {
                return Err(Error::Permission(format!(
                    "Read-only block node '{name}' cannot support read-write users"
                )));
            }
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
