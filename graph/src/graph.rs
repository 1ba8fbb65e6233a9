//! The graph: its state behind one lock, changed through transactions,
//! and the views and operations the control plane uses.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};

use crate::drain::{close_nodes, drain_nodes, DrainParent, DrainedSection};
use crate::error::Error;
use crate::job::Job;
use crate::node::{Child, Node};
use crate::open::valid_node_name;
use crate::options::Options;
use crate::permission::Permission;
use crate::state::State;
use crate::throttle_group::{ThrottleGroup, ThrottleLimits};
use crate::transaction::Transaction;

/// The block graph. Shared by the control plane and the exports; requests
/// never lock it (they hold their nodes directly). Changes go through
/// [`Transaction`]s, one at a time.
#[derive(Default)]
pub struct Graph {
    state: Mutex<State>,
    /// The jobs, by id (not part of [`State`]: a job outlives the
    /// transaction that made it, and is not rolled back with one).
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// The graph itself, for jobs that change it when they end; dangling
    /// for a graph made by [`Graph::new`], which cannot run jobs.
    me: Weak<Graph>,
}

/// A drained section in progress ([`Graph::drained`]).
pub struct Drained {
    _section: DrainedSection,
}

/// A consistent view of the graph for queries.
pub struct GraphView {
    /// Every node, by name.
    pub nodes: Vec<Arc<Node>>,
    /// Every export's root edge, by export id.
    pub exports: Vec<(String, Arc<Child>)>,
    /// Every job's edges, by job id.
    pub jobs: Vec<(String, Vec<Arc<Child>>)>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty graph that can run jobs.
    pub fn shared() -> Arc<Self> {
        Arc::new_cyclic(|me| Graph {
            me: me.clone(),
            ..Graph::default()
        })
    }

    pub(crate) fn me(&self) -> Weak<Graph> {
        self.me.clone()
    }

    /// Every job, by id.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().values().cloned().collect()
    }

    /// The job `id`.
    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().get(id).cloned()
    }

    pub(crate) fn job_exists(&self, id: &str) -> bool {
        self.jobs.lock().contains_key(id)
    }

    pub(crate) fn register_job(&self, job: Arc<Job>) {
        self.jobs.lock().insert(job.id().to_string(), job);
    }

    /// A dismissed job goes, if it is still the one under its id: once a
    /// job has been forgotten, a new job may take its id while it is still
    /// ending (it is forgotten once as it concludes and again as it is
    /// dismissed).
    pub(crate) fn forget_job(&self, job: &Job) {
        let mut jobs = self.jobs.lock();
        if jobs
            .get(job.id())
            .is_some_and(|known| std::ptr::eq(Arc::as_ptr(known), job))
        {
            jobs.remove(job.id());
        }
    }

    /// Takes job `id`'s edges out of the graph, as the job ends.
    pub fn release_job(&self, id: &str) -> Result<(), Error> {
        let mut tx = self.transaction();
        tx.detach_job(id);
        tx.commit()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Starts a transaction; the graph is locked until it is committed or
    /// dropped (which rolls it back). Requests keep running: for actions
    /// that only add.
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction::new(self, self.lock(), false)
    }

    /// Starts a transaction in a drained section: every export is paused
    /// and every driver's own work has finished before the first action,
    /// and the exports take requests again when the transaction ends.
    pub fn drained_transaction(&self) -> Transaction<'_> {
        Transaction::new(self, self.lock(), true)
    }

    /// Opens a node from `options` (blockdev-add) in a transaction of its
    /// own. On error nothing is added, not even inline children.
    pub fn add(&self, options: Options) -> Result<Arc<Node>, Error> {
        self.add_in_own_transaction(|tx| tx.add(options))
    }

    /// Opens a node from options of [`Graph::blueprint`] in a transaction
    /// of its own (see [`Transaction::add_restored`]).
    pub fn add_restored(&self, options: Options) -> Result<Arc<Node>, Error> {
        self.add_in_own_transaction(|tx| tx.add_restored(options))
    }

    fn add_in_own_transaction(
        &self,
        add: impl FnOnce(&mut Transaction<'_>) -> Result<Arc<Node>, Error>,
    ) -> Result<Arc<Node>, Error> {
        let mut tx = self.transaction();
        let node = add(&mut tx)?;
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

    /// Adds a node made outside the driver table (a test's driver that
    /// fails where the test says), under its name.
    #[cfg(test)]
    pub(crate) fn insert_node(&self, node: Arc<Node>) {
        self.lock().nodes.insert(node.name().to_string(), node);
    }

    /// blockdev-reopen: new options for existing nodes, all applied or
    /// none, in a drained transaction of its own.
    pub fn reopen(&self, entries: Vec<Options>) -> Result<(), Error> {
        let mut tx = self.drained_transaction();
        tx.reopen(entries)?;
        tx.commit()
    }

    /// Makes nodes read-only (or writable) again, as a job that reopened
    /// them ends; in a drained transaction of its own.
    pub(crate) fn set_read_only(&self, nodes: &[Arc<Node>], read_only: bool) -> Result<(), Error> {
        if nodes.is_empty() {
            return Ok(());
        }
        let mut tx = self.drained_transaction();
        for node in nodes {
            tx.set_read_only(node, read_only)?;
        }
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
            jobs: state
                .jobs
                .iter()
                .map(|(id, j)| (id.clone(), j.edges.clone()))
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

    /// At exit, as qemu-storage-daemon: drains the graph for good
    /// (exports stay paused, requests still queued stay where they are,
    /// throttles hold nothing back), cancels every job and waits for its
    /// end (its filter removed), then closes every node, parents first.
    /// The jobs are asked to cancel before the drain: their requests that
    /// wait for long (for an NBD target's reconnection) fail then, so that
    /// the drain does not wait for them; qemu-storage-daemon's drain waits
    /// them out (up to `reconnect-delay`).
    pub fn shut_down(&self) {
        let jobs = self.jobs();
        for job in &jobs {
            // A job that has concluded refuses; nothing to do for it.
            let _ = job.cancel(true);
        }
        {
            let state = self.lock();
            DrainedSection::begin(state.drain_parents(), state.nodes.values()).keep();
        }
        // Not with the graph locked: a job's end changes the graph.
        for job in jobs {
            job.cancel_and_wait();
        }
        let mut state = self.lock();
        // What the jobs' ends started.
        drain_nodes(state.nodes.values());
        close_nodes(std::mem::take(&mut state.nodes).into_values().collect());
    }

    /// Sets the write threshold of node `name` (block-set-write-threshold);
    /// its event goes where the graph's events go.
    pub fn set_write_threshold(&self, name: &str, threshold: u64) -> Result<(), Error> {
        let state = self.lock();
        let node = state
            .nodes
            .get(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        node.set_write_threshold(threshold, state.events.clone());
        Ok(())
    }

    /// A drained section on its own, for a change that is no transaction:
    /// every export is paused and every driver's own work has finished
    /// until the guard is dropped. The graph is not locked meanwhile.
    pub fn drained(&self) -> Drained {
        let state = self.lock();
        let parents = state.exports.values().map(|e| e.parent.clone()).collect();
        Drained {
            _section: DrainedSection::begin(parents, state.nodes.values()),
        }
    }

    /// Where events of nodes (e.g. a broken snapshot) go from now on.
    pub fn set_event_sink(&self, sink: crate::EventSink) {
        self.lock().events = Some(sink);
    }

    /// Adds a throttle group object (`--object throttle-group`, object-add).
    pub fn add_throttle_group(&self, id: &str, limits: ThrottleLimits) -> Result<(), Error> {
        limits.check()?;
        if !valid_node_name(id) {
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
