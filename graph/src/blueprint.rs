//! The options that open a graph's nodes again as they are now: what a
//! daemon writes to its state file and opens at its next start.
//!
//! Each node keeps the options it was opened with, without its children's
//! ([`Node::given_options`]); its children are taken from its edges as
//! they are now, so a filter inserted or a child replaced since is part of
//! the blueprint. A node a job made (a backup's copy-before-write filter)
//! has no options: jobs do not survive a restart, so its parents point
//! to what it filters instead.

use std::collections::{BTreeMap, BTreeSet};
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
        let plan = Plan {
            shared: self.shared_implicit_nodes(&nodes),
        };
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for node in &nodes {
            plan.add_with_children(node, &mut done, &mut out);
        }
        out
    }

    /// The nodes the graph named (`#blockNNN`, a parent's inline child or
    /// a backing file from an image header) that are used by anything but
    /// one parent node: an export, a job, or a second parent (after an
    /// active commit into a backing file, say). Inline in one parent, they
    /// would be named anew at the next open, and whoever else used them
    /// would find another node under their name; they keep it instead.
    fn shared_implicit_nodes(&self, nodes: &[Arc<Node>]) -> BTreeSet<String> {
        let mut users: BTreeMap<String, usize> = BTreeMap::new();
        let mut count = |child: &Arc<crate::node::Child>, uses: usize| {
            let name = through_job_nodes(child.node()).name().to_string();
            *users.entry(name).or_default() += uses;
        };
        for node in nodes {
            node.children().iter().for_each(|c| count(c, 1));
        }
        // An edge from outside the graph is never inline: it counts twice.
        self.lock().external_edges().for_each(|c| count(c, 2));
        nodes
            .iter()
            .filter(|n| n.is_implicit() && users.get(n.name()).is_some_and(|&u| u > 1))
            .map(|n| n.name().to_string())
            .collect()
    }
}

/// How the blueprint writes each node: inline in its parent, or on its own
/// under its name.
struct Plan {
    /// Implicit nodes written on their own, under their `#blockNNN` name.
    shared: BTreeSet<String>,
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

impl Plan {
    /// Whether `node` is written inside its one parent's options.
    fn inline(&self, node: &Node) -> bool {
        node.is_implicit() && !self.shared.contains(node.name())
    }

    /// Appends the options of `node` after those of the nodes it
    /// references, unless it is inline in its parent's options, made by a
    /// job, or done.
    fn add_with_children(
        &self,
        node: &Arc<Node>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<Options>,
    ) {
        if self.inline(node) || node.given_options().is_none() || done.contains(node.name()) {
            return;
        }
        done.insert(node.name().to_string());
        for child in node.children().iter() {
            let child = through_job_nodes(child.node());
            self.add_with_children(&child, done, out);
        }
        if let Some(mut options) = self.options_with_children(node) {
            if node.is_implicit() {
                options
                    .map
                    .insert("node-name".into(), Value::String(node.name().to_string()));
            }
            out.push(options);
        }
    }

    /// The node's options with its children as they are now: inline
    /// children nested, the others by name.
    fn options_with_children(&self, node: &Node) -> Option<Options> {
        let mut options = node.given_options()?.clone();
        for edge in node.children().iter() {
            let child = through_job_nodes(edge.node());
            let value = if self.inline(&child) {
                match self.options_with_children(&child) {
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

    /// A graph with node `top`, a read-only raw node over an inline file
    /// child: a 1 MiB image in `dir`, whose path comes back too.
    fn graph_with_top(dir: &std::path::Path) -> (Graph, std::path::PathBuf) {
        let image = dir.join("a.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let graph = Graph::new();
        let top = json!({"driver": "raw", "node-name": "top", "read-only": true,
                         "file": {"driver": "file", "filename": image}});
        add(&graph, Options::from_json(top).unwrap());
        (graph, image)
    }

    #[test]
    fn children_come_first_and_inline_children_stay_inline() {
        let dir = tempfile::tempdir().unwrap();
        let (graph, image) = graph_with_top(dir.path());
        let json = |v: Value| Options::from_json(v).unwrap();
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

    #[test]
    fn a_shared_inline_child_keeps_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let (graph, image) = graph_with_top(dir.path());
        let json = |v: Value| Options::from_json(v).unwrap();
        let file = graph.nodes().into_iter().find(|n| n.is_implicit()).unwrap();
        let name = file.name().to_string();
        assert!(name.starts_with("#block"), "{name}");
        // A second user of the inline child, by its name.
        add(
            &graph,
            json(
                json!({"driver": "raw", "node-name": "other", "read-only": true,
                        "file": name}),
            ),
        );
        let blueprint = graph.blueprint();
        let first = Value::Object(blueprint[0].map.clone());
        assert_eq!(first["node-name"], json!(name));
        assert_eq!(first["driver"], json!("file"));
        for options in &blueprint[1..] {
            assert_eq!(options.map["file"], json!(name));
        }
        // Such a name is refused from a user, kept from a blueprint.
        assert!(Graph::new().add(blueprint[0].clone()).is_err());
        let again = Graph::new();
        for options in blueprint {
            again.add_restored(options).unwrap();
        }
        let edges = |g: &Graph| -> Vec<(String, String)> {
            let mut e: Vec<_> = g
                .nodes()
                .iter()
                .flat_map(|n| {
                    let parent = n.name().to_string();
                    n.children()
                        .iter()
                        .map(move |c| (parent.clone(), c.node().name().to_string()))
                        .collect::<Vec<_>>()
                })
                .collect();
            e.sort();
            e
        };
        assert_eq!(edges(&again), edges(&graph));
        // Names the graph gives later do not collide with the kept one.
        let mut tx = again.transaction();
        tx.add(json(json!({"driver": "raw", "node-name": "third",
                           "file": {"driver": "file", "filename": image}})))
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(again.nodes().iter().filter(|n| n.is_implicit()).count(), 2);
    }
}
