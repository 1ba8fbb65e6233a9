//! Child edges: a parent's link to the node it uses in some role.

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::node::Node;
use crate::permission::{Parent, Permission};

/// An edge from a parent (a node or an export) to a child node, under a
/// role such as `file`, with the permissions the parent holds on the child.
///
/// The child can be replaced while requests run: each request loads the
/// current child once and keeps it until it completes.
pub struct Child {
    role: String,
    parent: Parent,
    node: ArcSwap<Node>,
    perms: Mutex<(Permission, Permission)>,
}

impl Child {
    /// An edge from `parent` in `role` to `node`, with no permissions yet
    /// (they are set when the graph's permissions are refreshed).
    pub fn new(parent: Parent, role: &str, node: Arc<Node>) -> Arc<Self> {
        Arc::new(Child {
            role: role.to_string(),
            parent,
            node: ArcSwap::new(node),
            perms: Mutex::new((Permission::NONE, Permission::ALL)),
        })
    }

    /// The role of the child, e.g. `file`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Who holds the edge.
    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The node the edge points to now.
    pub fn node(&self) -> Arc<Node> {
        self.node.load_full()
    }

    /// Points the edge at `node`; returns the node it pointed to. Callers
    /// quiesce I/O through the edge first.
    pub(crate) fn replace(&self, node: Arc<Node>) -> Arc<Node> {
        self.node.swap(node)
    }

    /// The permissions the parent holds (`perm`) and shares (`shared`).
    pub fn permissions(&self) -> (Permission, Permission) {
        *self.perms.lock()
    }

    pub(crate) fn set_permissions(&self, perm: Permission, shared: Permission) {
        *self.perms.lock() = (perm, shared);
    }
}
