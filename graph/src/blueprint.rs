//! The options that open a graph's nodes again as they are now: what a
//! daemon writes to its state file and opens at its next start.
//!
//! Each node keeps the options it was opened with, without its children's
//! ([`Node::given_options`]); its children are taken from its edges as
//! they are now, so a filter inserted or a child replaced since is part of
//! the blueprint. A node a job made (a backup's copy-before-write filter)
//! has no options: jobs do not survive a restart, so its parents point
//! to what it filters instead.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

use crate::driver::ChildRole;
use crate::graph::Graph;
use crate::node::Node;
use crate::options::Options;

impl Graph {
    /// `blockdev-add` options that recreate every node not inline in
    /// another one, children before parents.
    pub fn blueprint(&self) -> Vec<Options> {
        let nodes = self.nodes();
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for node in &nodes {
            add_with_children(node, &mut done, &mut out);
        }
        out
    }
}

/// What an edge to `node` stands for in a blueprint: past the nodes that
/// jobs made, to the node they filter.
fn through_job_nodes(node: Arc<Node>) -> Arc<Node> {
    let mut node = node;
    while node.given_options().is_none() {
        let filtered = node
            .children()
            .iter()
            .find(|c| c.role() == ChildRole::File)
            .map(|c| c.node());
        match filtered {
            Some(child) => node = child,
            None => break,
        }
    }
    node
}

/// Appends the options of `node` after those of the nodes it references,
/// unless it is inline in its parent's options, made by a job, or done.
fn add_with_children(node: &Arc<Node>, done: &mut BTreeSet<String>, out: &mut Vec<Options>) {
    if node.is_implicit() || node.given_options().is_none() || done.contains(node.name()) {
        return;
    }
    done.insert(node.name().to_string());
    for child in node.children().iter() {
        let child = through_job_nodes(child.node());
        add_with_children(&child, done, out);
    }
    if let Some(options) = options_with_children(node) {
        out.push(options);
    }
}

/// The node's options with its children as they are now: inline children
/// nested, the others by name.
fn options_with_children(node: &Node) -> Option<Options> {
    let mut options = node.given_options()?.clone();
    for edge in node.children().iter() {
        let child = through_job_nodes(edge.node());
        let value = if child.is_implicit() {
            match options_with_children(&child) {
                Some(nested) => Value::Object(nested.map),
                None => continue,
            }
        } else {
            Value::String(child.name().to_string())
        };
        options.map.insert(edge.role().as_str().to_string(), value);
    }
    Some(options)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn add(graph: &Graph, options: Options) {
        let mut txn = graph.transaction();
        txn.add(options).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn children_come_first_and_inline_children_stay_inline() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let graph = Graph::new();
        let json = |v: Value| Options::from_json(v).unwrap();
        add(
            &graph,
            json(
                json!({"driver": "raw", "node-name": "top", "read-only": true,
                   "file": {"driver": "file", "filename": image}}),
            ),
        );
        add(
            &graph,
            json(json!({"driver": "raw", "node-name": "zzz", "file": "top"})),
        );
        let blueprint: Vec<Value> = graph
            .blueprint()
            .into_iter()
            .map(|o| Value::Object(o.map))
            .collect();
        assert_eq!(
            blueprint,
            vec![
                json!({"driver": "raw", "node-name": "top", "read-only": true,
                       "file": {"driver": "file", "filename": image}}),
                json!({"driver": "raw", "node-name": "zzz", "file": "top"}),
            ]
        );
        // Opened again, the blueprint makes the same graph.
        let again = Graph::new();
        for options in graph.blueprint() {
            add(&again, options);
        }
        let names =
            |g: &Graph| -> Vec<String> { g.nodes().iter().map(|n| n.name().to_string()).collect() };
        assert_eq!(names(&again), names(&graph));
    }
}
