//! The graph: every node by node-name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::drivers::Staging;
use crate::error::Error;
use crate::node::Node;
use crate::options::Options;

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Arc<Node>>,
    implicit_counter: u64,
}

/// The block graph. Shared by the control plane and the exports; requests
/// never lock it (they hold their nodes directly).
#[derive(Default)]
pub struct Graph {
    state: Mutex<State>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a node from `options` (blockdev-add). On error nothing is added,
    /// not even inline children that were opened already.
    pub fn add(&self, options: Options) -> Result<Arc<Node>, Error> {
        let mut state = self.state.lock().unwrap();
        let State {
            nodes,
            implicit_counter,
        } = &mut *state;
        let mut staging = Staging {
            existing: nodes,
            created: Vec::new(),
            counter: implicit_counter,
        };
        let node = staging.open(options, None)?;
        let created = std::mem::take(&mut staging.created);
        for n in created {
            nodes.insert(n.name().to_string(), n);
        }
        Ok(node)
    }

    /// The node named `name`.
    pub fn find(&self, name: &str) -> Result<Arc<Node>, Error> {
        self.state
            .lock()
            .unwrap()
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.state.lock().unwrap().nodes.values().cloned().collect()
    }

    /// Deletes a node that nobody uses (blockdev-del), with the inline
    /// children only it used.
    pub fn remove(&self, name: &str) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        let node = state
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        if node.is_implicit() {
            return Err(Error::OpenFailed(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        let used_as_child = state
            .nodes
            .values()
            .any(|n| n.children().iter().any(|c| Arc::ptr_eq(&c.node(), &node)));
        // The map and `node` hold two references; anything else (an export,
        // a parent) is a user.
        if used_as_child || Arc::strong_count(&node) > 2 {
            return Err(Error::InUse(name.to_string()));
        }
        state.nodes.remove(name);
        let mut orphans: Vec<Arc<Node>> = node.children().iter().map(|c| c.node()).collect();
        drop(node);
        while let Some(child) = orphans.pop() {
            // The map, the orphans list entry: nobody else.
            if child.is_implicit() && Arc::strong_count(&child) == 2 {
                state.nodes.remove(child.name());
                orphans.extend(child.children().iter().map(|c| c.node()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(graph: &Graph, arg: &str) -> Result<Arc<Node>, Error> {
        graph.add(Options::from_arg(arg, None).unwrap())
    }

    #[test]
    fn add_find_remove() {
        let graph = Graph::new();
        add(&graph, "driver=null-co,node-name=n0").unwrap();
        add(&graph, "driver=raw,node-name=r0,file=n0").unwrap();
        assert_eq!(graph.find("r0").unwrap().children()[0].role(), "file");
        assert!(matches!(
            add(&graph, "driver=null-co,node-name=n0"),
            Err(Error::DuplicateNodeName(_))
        ));
        assert!(matches!(graph.remove("n0"), Err(Error::InUse(_))));
        graph.remove("r0").unwrap();
        graph.remove("n0").unwrap();
        assert!(graph.nodes().is_empty());
    }

    #[test]
    fn inline_children_go_with_their_parent() {
        let graph = Graph::new();
        add(&graph, "driver=raw,node-name=r0,file.driver=null-co").unwrap();
        assert_eq!(graph.nodes().len(), 2);
        let child = graph.find("r0").unwrap().children()[0].node();
        assert!(child.is_implicit());
        assert!(graph.remove(child.name()).is_err());
        drop(child);
        graph.remove("r0").unwrap();
        assert!(graph.nodes().is_empty());
    }

    #[test]
    fn rejects_bad_names_and_drivers() {
        let graph = Graph::new();
        assert!(matches!(
            add(&graph, "driver=null-co,node-name=1x"),
            Err(Error::InvalidNodeName(_))
        ));
        assert!(matches!(
            add(&graph, "driver=nope,node-name=x"),
            Err(Error::UnknownDriver(_))
        ));
        assert!(matches!(
            add(&graph, "driver=null-co"),
            Err(Error::InvalidOptions(_))
        ));
    }
}
