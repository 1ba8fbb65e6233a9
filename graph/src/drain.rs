//! Drained sections: while the graph changes under its users, no request
//! runs anywhere in it and none starts (QEMU's `bdrv_drained_begin`).
//!
//! Requests come from parents outside the graph (exports, jobs), which
//! the graph pauses through [`DrainParent`], and from work drivers do on
//! their own (a copy that outlived its guest write), which each driver's
//! `drain` hook waits for. A driver that holds requests back (a throttle)
//! lets them go when the section begins (its `drained_begin` hook), so
//! that the section never waits for a limit.

use std::sync::Arc;

use crate::aio::block_on;
use crate::node::Node;

/// A parent outside the graph that issues requests: an export.
pub trait DrainParent: Send + Sync {
    /// Stops starting requests and returns once every request in flight
    /// has completed. Sections may nest: each begin has its own end.
    fn drained_begin(&self);

    /// Takes requests again after [`DrainParent::drained_begin`].
    fn drained_end(&self);
}

/// A drained section in progress: it ends the parents and nodes it
/// began when it is dropped, and only those.
pub(crate) struct DrainedSection {
    parents: Vec<Arc<dyn DrainParent>>,
    nodes: Vec<Arc<Node>>,
}

impl DrainedSection {
    /// Lets the nodes' held-back requests go (a throttle's), pauses
    /// `parents`, then waits for every node's own work. The nodes begin
    /// first: a parent's pause waits for its requests in flight, and one
    /// that waits for its turn in a throttle could wait for hours.
    pub(crate) fn begin<'a>(
        parents: Vec<Arc<dyn DrainParent>>,
        nodes: impl Iterator<Item = &'a Arc<Node>>,
    ) -> Self {
        let nodes: Vec<Arc<Node>> = nodes.cloned().collect();
        for n in &nodes {
            n.drained_begin();
        }
        for p in &parents {
            p.drained_begin();
        }
        drain_nodes(nodes.iter());
        DrainedSection { parents, nodes }
    }

    /// Ends nothing when dropped: the parents and nodes stay drained
    /// (shutdown).
    pub(crate) fn keep(mut self) {
        self.parents.clear();
        self.nodes.clear();
    }
}

impl Drop for DrainedSection {
    /// Resumes the parents in the reverse order of their pause, then ends
    /// the nodes' sections.
    fn drop(&mut self) {
        for p in self.parents.drain(..).rev() {
            p.drained_end();
        }
        for n in self.nodes.drain(..) {
            n.drained_end();
        }
    }
}

/// Waits until the drivers of `nodes` have no work of their own running.
pub(crate) fn drain_nodes<'a>(nodes: impl Iterator<Item = &'a Arc<Node>>) {
    for node in nodes {
        match block_on(node.drain()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("draining node '{}': {e}", node.name()),
            Err(e) => log::error!("draining node '{}': no executor: {e}", node.name()),
        }
    }
}

/// Closes nodes that left the graph, parents before children, so a
/// parent's last writes reach children still open.
pub(crate) fn close_nodes(mut nodes: Vec<Arc<Node>>) {
    while !nodes.is_empty() {
        // A node no other node of the list uses goes first.
        let i = nodes
            .iter()
            .position(|n| {
                !nodes
                    .iter()
                    .any(|p| p.children().iter().any(|c| Arc::ptr_eq(&c.node(), n)))
            })
            .unwrap_or(0);
        let node = nodes.swap_remove(i);
        match block_on(node.close()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("closing node '{}': {e}", node.name()),
            Err(e) => log::error!("closing node '{}': no executor: {e}", node.name()),
        }
    }
}
