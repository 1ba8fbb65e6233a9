//! Child edges: a parent's link to the node it uses in some role.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::node::Node;

/// An edge from a parent node to a child node, under a role such as `file`.
///
/// The child can be replaced while requests run: each request loads the
/// current child once and keeps it until it completes.
pub struct Child {
    role: String,
    node: ArcSwap<Node>,
}

impl Child {
    /// An edge in `role` to `node`.
    pub fn new(role: &str, node: Arc<Node>) -> Arc<Self> {
        Arc::new(Child {
            role: role.to_string(),
            node: ArcSwap::new(node),
        })
    }

    /// The role of the child, e.g. `file`.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The node the edge points to now.
    pub fn node(&self) -> Arc<Node> {
        self.node.load_full()
    }
}
