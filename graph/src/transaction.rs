//! Graph transactions: every action is prepared in order on a working copy
//! of the graph; permissions are checked once, over the result, when the
//! transaction commits; a failure anywhere leaves the graph exactly as it
//! was.
//!
//! Replacing an edge takes effect at once (requests load an edge's node
//! when they start), so transactions that change what requests see run in
//! a drained section ([`crate::Graph::drained_transaction`]). Dirty bitmap
//! changes are journaled (see the bitmap module), so a rollback never loses
//! a bit set by I/O, drained or not. Nodes that leave the graph (deleted,
//! or opened by a transaction that is rolled back) are closed.

mod reopen;

use std::sync::Arc;

use parking_lot::MutexGuard;

use crate::aio::block_on;
use crate::bitmap::{BitmapUnusable, DirtyBitmap, Saved};
use crate::check::check_permissions;
use crate::drain::{close_nodes, DrainParent, DrainedSection};
use crate::driver::BlockDriver;
use crate::driver::ChildRole;
use crate::drivers::DRIVERS;
use crate::error::Error;
use crate::graph::Graph;
use crate::job::{Job, JobDriver, JobOptions, JobTxn};
use crate::node::{Child, CommonOptions, Node, NodeFlags};
use crate::open::{check_node_name, valid_node_name, Staging};
use crate::options::Options;
use crate::permission::{Parent, Permission};
use crate::state::{ExportEdge, JobEdges, State};

/// What block-dirty-bitmap-add asks for besides the node and the name.
#[derive(Clone, Copy, Debug, Default)]
pub struct BitmapOptions {
    /// Bytes per bit; QEMU's default when absent.
    pub granularity: Option<u64>,
    /// Created not recording.
    pub disabled: bool,
    /// Stored in the node's image.
    pub persistent: bool,
}

/// QEMU's checks before a bitmap is used (and, if `modify`, changed).
fn usable(bitmap: &DirtyBitmap, modify: bool) -> Result<(), Error> {
    bitmap
        .usable(modify)
        .map_err(|e| Error::OpenFailed(e.to_string()))
}

/// The parent of an edge to replace (x-blockdev-replace's `parent-type`).
#[derive(Clone, Copy, Debug)]
pub enum ReplaceParent<'a> {
    /// The root edge of an export.
    Export(&'a str),
    /// The child edge `child` (a role) of node `node_name`.
    Node {
        /// The parent node.
        node_name: &'a str,
        /// The role of the edge.
        child: &'a str,
    },
}

/// A graph transaction. Dropping it without [`Transaction::commit`] rolls
/// it back.
pub struct Transaction<'g> {
    /// Ended (the exports resumed) before the nodes that leave the graph
    /// are closed, and before the graph is unlocked.
    drained: Option<DrainedSection>,
    /// The graph, for its jobs.
    owner: &'g Graph,
    /// Jobs made by the transaction, started when it commits.
    new_jobs: Vec<Arc<Job>>,
    graph: MutexGuard<'g, State>,
    working: State,
    undo: Vec<Undo>,
    /// Nodes the transaction opened (with inline children).
    opened: Vec<Arc<Node>>,
    /// Bitmaps to remove from their node at commit.
    removed_bitmaps: Vec<(Arc<Node>, Arc<DirtyBitmap>)>,
    /// Nodes a reopen made read-only (for QEMU's error text if a parent
    /// still writes them).
    made_read_only: Vec<Arc<Node>>,
    committed: bool,
}

/// How to take back a prepared action that changed something live.
enum Undo {
    /// Point the edge back at the node.
    Edge(Arc<Child>, Arc<Node>),
    /// Remove a bitmap the transaction added.
    BitmapAdded(Arc<Node>, Arc<DirtyBitmap>),
    /// Roll a bitmap back to its state when the transaction began, plus
    /// what I/O recorded since.
    BitmapChanged(Arc<DirtyBitmap>, Saved),
    /// Give a bitmap frozen for a job its bits back, and free it.
    Unfreeze(Arc<DirtyBitmap>, Vec<u64>),
    /// Give the node its backing child back.
    Backing(Arc<Node>, Option<Arc<Node>>),
    /// The node's driver prepared a reopen: it aborts it, or commits it
    /// with the transaction.
    Reopened(Arc<Node>),
    /// Give the node its options back (a reopen changed them).
    Flags(Arc<Node>, NodeFlags),
}

/// A dirty bitmap named in a merge: its node and name.
#[derive(Clone, Debug)]
pub struct BitmapRef {
    /// The node holding it.
    pub node: String,
    /// Its name.
    pub name: String,
}

impl<'g> Transaction<'g> {
    pub(crate) fn new(owner: &'g Graph, graph: MutexGuard<'g, State>, drained: bool) -> Self {
        let drained =
            drained.then(|| DrainedSection::begin(graph.drain_parents(), graph.nodes.values()));
        let working = graph.clone();
        Transaction {
            drained,
            owner,
            new_jobs: Vec::new(),
            graph,
            working,
            undo: Vec::new(),
            opened: Vec::new(),
            removed_bitmaps: Vec::new(),
            made_read_only: Vec::new(),
            committed: false,
        }
    }

    /// Opens a node (blockdev-add); it exists in the graph once the
    /// transaction commits, and its files are closed if it is rolled back.
    pub fn add(&mut self, options: Options) -> Result<Arc<Node>, Error> {
        self.open_node(options, false)
    }

    /// Opens a node from options of a [`Graph::blueprint`]: as
    /// [`Transaction::add`], except that a node the graph named
    /// (`#blockNNN`, shared by more than one user) keeps its name.
    pub fn add_restored(&mut self, options: Options) -> Result<Arc<Node>, Error> {
        self.open_node(options, true)
    }

    fn open_node(&mut self, options: Options, restoring: bool) -> Result<Arc<Node>, Error> {
        let State {
            nodes,
            implicit_counter,
            groups,
            events,
            ..
        } = &mut self.working;
        let mut staging = Staging {
            drivers: DRIVERS,
            existing: nodes,
            events: events.clone(),
            groups,
            created: Vec::new(),
            counter: implicit_counter,
            restoring,
            depth: 0,
        };
        let result = staging.open(options, None);
        let created = std::mem::take(&mut staging.created);
        for n in &created {
            if result.is_ok() {
                nodes.insert(n.name().to_string(), n.clone());
            }
        }
        // Nodes of a failed open are closed with the transaction's.
        self.opened.extend(created);
        result
    }

    /// The parents of `node` in the working graph.
    fn parents_of(&self, node: &Arc<Node>) -> Vec<Parent> {
        let mut parents: Vec<Parent> = self
            .working
            .nodes
            .values()
            .flat_map(|n| n.children().to_vec())
            .filter(|c| Arc::ptr_eq(&c.node(), node))
            .map(|c| c.parent().clone())
            .collect();
        parents.extend(
            self.working
                .external_edges()
                .filter(|e| Arc::ptr_eq(&e.node(), node))
                .map(|e| e.parent().clone()),
        );
        parents
    }

    /// Deletes a node that has no parent (blockdev-del), and the inline
    /// children only it used.
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        let node = self
            .working
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))?;
        if node.is_implicit() {
            return Err(Error::OpenFailed(format!(
                "Node '{name}' was created inline by its parent; delete the parent instead"
            )));
        }
        if let Some(parent) = self.parents_of(&node).first() {
            return Err(Error::InUse(format!("Node '{name}' is in use by {parent}")));
        }
        self.working.nodes.remove(name);
        self.remove_orphans(node.children().iter().map(|c| c.node()).collect());
        Ok(())
    }

    /// Deletes the inline children among `nodes` that no parent uses any
    /// more, and theirs.
    fn remove_orphans(&mut self, mut nodes: Vec<Arc<Node>>) {
        while let Some(child) = nodes.pop() {
            if child.is_implicit() && self.parents_of(&child).is_empty() {
                self.working.nodes.remove(child.name());
                nodes.extend(child.children().iter().map(|c| c.node()));
            }
        }
    }

    /// Points an edge at node `new_child` (x-blockdev-replace).
    pub fn replace(&mut self, parent: ReplaceParent<'_>, new_child: &str) -> Result<(), Error> {
        let new = self
            .working
            .nodes
            .get(new_child)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(new_child.to_string()))?;
        let edge = match parent {
            ReplaceParent::Export(id) => self
                .working
                .exports
                .get(id)
                .map(|e| e.edge.clone())
                .ok_or_else(|| Error::OpenFailed(format!("Export '{id}' not found")))?,
            ReplaceParent::Node { node_name, child } => self
                .working
                .nodes
                .get(node_name)
                .ok_or_else(|| Error::NodeNotFound(node_name.to_string()))?
                .children()
                .iter()
                .find(|c| c.role().as_str() == child)
                .cloned()
                .ok_or_else(|| {
                    Error::OpenFailed(format!("Node '{node_name}' has no child '{child}'"))
                })?,
        };
        let old = edge.node();
        if Arc::ptr_eq(&old, &new) {
            return Ok(());
        }
        if old.size() != new.size() {
            return Err(Error::OpenFailed(format!(
                "Cannot replace '{}' by '{new_child}': their sizes differ ({} and {} bytes)",
                old.name(),
                old.size(),
                new.size()
            )));
        }
        let previous = edge.replace(new);
        self.undo.push(Undo::Edge(edge, previous));
        Ok(())
    }

    fn node(&self, name: &str) -> Result<Arc<Node>, Error> {
        self.working
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))
    }

    fn bitmap(&self, node: &str, name: &str) -> Result<(Arc<Node>, Arc<DirtyBitmap>), Error> {
        let n = self.node(node)?;
        let b = n
            .bitmap(name)
            .ok_or_else(|| Error::OpenFailed(format!("Dirty bitmap '{name}' not found")))?;
        Ok((n, b))
    }

    /// block-dirty-bitmap-add: a clean bitmap on `node`, recording unless
    /// disabled, stored in the node's image if persistent. The granularity
    /// defaults to QEMU's: the image's cluster size within 4-64 KiB, or
    /// 64 KiB.
    pub fn bitmap_add(&mut self, node: &str, name: &str, o: BitmapOptions) -> Result<(), Error> {
        let n = self.node(node)?;
        let granularity = o.granularity.unwrap_or_else(|| {
            n.format_info()
                .and_then(|f| f.cluster_size)
                .map_or(65536, |cs| cs.clamp(4096, 65536))
        });
        if !granularity.is_power_of_two() || !(512..=(1u64 << 31)).contains(&granularity) {
            return Err(Error::InvalidOptions(
                "Granularity must be power of 2, and between 512 and 2147483648".into(),
            ));
        }
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::InvalidOptions(
                "Bitmap name must be 1 to 1023 characters long".into(),
            ));
        }
        if n.bitmap(name).is_some() {
            return Err(Error::OpenFailed(format!("Bitmap already exists: {name}")));
        }
        if o.persistent {
            n.can_store_bitmap(name, granularity)
                .map_err(Error::OpenFailed)?;
        }
        let bitmap = DirtyBitmap::new(name, n.size(), granularity, !o.disabled)
            .map_err(|e| Error::OpenFailed(format!("Cannot create dirty bitmap '{name}': {e}")))?;
        bitmap.set_persistent(o.persistent);
        let bitmap = Arc::new(bitmap);
        if !n.add_bitmap(bitmap.clone()) {
            return Err(Error::OpenFailed(format!("Bitmap already exists: {name}")));
        }
        self.undo.push(Undo::BitmapAdded(n, bitmap));
        Ok(())
    }

    /// Recreates a bitmap whose bits were lost with the process that had
    /// it (a daemon restarted from its state file): as
    /// [`Transaction::bitmap_add`], but inconsistent, as QEMU marks a
    /// bitmap of an image that was not closed cleanly, so that nothing
    /// reads it (an incremental backup, an NBD export) and it can only be
    /// removed.
    pub fn bitmap_add_lost(
        &mut self,
        node: &str,
        name: &str,
        o: BitmapOptions,
    ) -> Result<(), Error> {
        self.bitmap_add(node, name, o)?;
        let (_, bitmap) = self.bitmap(node, name)?;
        bitmap.mark_inconsistent();
        Ok(())
    }

    /// Opens the transaction's journal on a bitmap it is about to change.
    fn journal(&mut self, bitmap: &Arc<DirtyBitmap>) -> Result<(), Error> {
        let saved = bitmap.begin_journal().map_err(|e| {
            Error::OpenFailed(format!(
                "Cannot change dirty bitmap '{}': {e}",
                bitmap.name()
            ))
        })?;
        if let Some(saved) = saved {
            self.undo.push(Undo::BitmapChanged(bitmap.clone(), saved));
        }
        Ok(())
    }

    /// block-dirty-bitmap-remove: the bitmap is hidden at once and goes at
    /// commit.
    pub fn bitmap_remove(&mut self, node: &str, name: &str) -> Result<(), Error> {
        let (n, b) = self.bitmap(node, name)?;
        if b.busy() {
            return Err(Error::OpenFailed(
                BitmapUnusable::Busy(name.to_string()).to_string(),
            ));
        }
        self.journal(&b)?;
        b.hide();
        self.removed_bitmaps.push((n, b));
        Ok(())
    }

    /// block-dirty-bitmap-clear.
    pub fn bitmap_clear(&mut self, node: &str, name: &str) -> Result<(), Error> {
        let (_, b) = self.bitmap(node, name)?;
        usable(&b, true)?;
        self.journal(&b)?;
        b.clear();
        Ok(())
    }

    /// block-dirty-bitmap-enable / -disable.
    pub fn bitmap_set_recording(&mut self, node: &str, name: &str, on: bool) -> Result<(), Error> {
        let (_, b) = self.bitmap(node, name)?;
        usable(&b, false)?;
        self.journal(&b)?;
        b.set_recording(on);
        Ok(())
    }

    /// block-dirty-bitmap-merge: marks dirty in `target` (on `node`) what is
    /// dirty in any of `sources`.
    pub fn bitmap_merge(
        &mut self,
        node: &str,
        target: &str,
        sources: &[BitmapRef],
    ) -> Result<(), Error> {
        let (_, t) = self.bitmap(node, target)?;
        usable(&t, true)?;
        let sources = sources
            .iter()
            .map(|r| self.bitmap(&r.node, &r.name).map(|(_, b)| b))
            .collect::<Result<Vec<_>, _>>()?;
        for source in &sources {
            usable(source, false)?;
        }
        if let Some(bad) = sources.iter().find(|s| !t.compatible(s)) {
            return Err(Error::OpenFailed(format!(
                "Bitmap '{}' is incompatible with '{target}' (their sizes differ)",
                bad.name()
            )));
        }
        self.journal(&t)?;
        for s in &sources {
            t.merge(s);
        }
        Ok(())
    }

    /// Attaches export `id` (drained through `parent`) to node
    /// `node_name` with fixed permissions.
    pub fn attach_export(
        &mut self,
        id: &str,
        node_name: &str,
        perm: Permission,
        shared: Permission,
        parent: Arc<dyn DrainParent>,
    ) -> Result<Arc<Child>, Error> {
        if self.working.exports.contains_key(id) {
            return Err(Error::OpenFailed(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let node = self
            .working
            .nodes
            .get(node_name)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(node_name.to_string()))?;
        let edge = Child::new(Parent::Export(id.to_string()), ChildRole::Root, node);
        edge.set_permissions(perm, shared);
        let export = ExportEdge {
            edge: edge.clone(),
            parent,
        };
        self.working.exports.insert(id.to_string(), export);
        Ok(edge)
    }

    /// Makes job `options.id`, a parent of the nodes in `uses` (node-name,
    /// what it takes, what it shares); it starts when the transaction
    /// commits, in `txn` if its jobs complete together.
    pub fn create_job(
        &mut self,
        options: &JobOptions,
        driver: Box<dyn JobDriver>,
        uses: &[(&str, Permission, Permission)],
        txn: Option<Arc<JobTxn>>,
    ) -> Result<Arc<Job>, Error> {
        let id = options.id.as_str();
        if !valid_node_name(id) {
            return Err(Error::OpenFailed(format!("Invalid job ID '{id}'")));
        }
        if self.owner.job_exists(id) || self.working.jobs.contains_key(id) {
            return Err(Error::OpenFailed(format!("Job ID '{id}' already in use")));
        }
        let job = Job::new(
            options,
            driver,
            self.owner.me(),
            self.working.events.clone(),
            txn,
        );
        let mut edges = Vec::new();
        for (name, perm, shared) in uses {
            let node = self.node(name)?;
            let edge = Child::new(Parent::Job(id.to_string()), ChildRole::Root, node);
            edge.set_permissions(*perm, *shared);
            edges.push(edge);
        }
        let parent: Arc<dyn DrainParent> = job.clone();
        self.working
            .jobs
            .insert(id.to_string(), JobEdges { edges, parent });
        self.new_jobs.push(job.clone());
        Ok(job)
    }

    /// Adds a node the graph makes itself (a job's filter), named `name`
    /// or, without one, like an inline child (`#blockNNN`). `make` gets
    /// the name (its edges' parent) and returns the driver and its edges.
    pub(crate) fn insert_node(
        &mut self,
        name: Option<&str>,
        driver_name: &'static str,
        make: impl FnOnce(&str) -> Result<(Box<dyn BlockDriver>, Vec<Arc<Child>>), Error>,
    ) -> Result<Arc<Node>, Error> {
        let name = match name {
            Some(n) => {
                check_node_name(n, self.working.nodes.contains_key(n))?;
                n.to_string()
            }
            None => {
                self.working.implicit_counter += 1;
                format!("#block{:03}", self.working.implicit_counter)
            }
        };
        let (driver, children) = make(&name)?;
        let common = CommonOptions {
            driver: driver_name.to_string(),
            node_name: Some(name.clone()),
            ..CommonOptions::default()
        };
        let node = Arc::new(Node::new(
            name.clone(),
            driver_name,
            driver,
            &common,
            children,
            false,
            None,
        ));
        self.working.nodes.insert(name, node.clone());
        self.opened.push(node.clone());
        Ok(node)
    }

    /// Gives `node` a new backing child (or none), undone if the
    /// transaction fails; the old one goes if it was opened inline and
    /// nobody else uses it.
    pub(crate) fn set_backing(
        &mut self,
        node: &Arc<Node>,
        backing: Option<Arc<Node>>,
    ) -> Result<(), Error> {
        let previous = node.backing();
        node.set_backing(backing)?;
        self.undo
            .push(Undo::Backing(node.clone(), previous.clone()));
        // A backing file opened from the image's header goes with it.
        self.remove_orphans(previous.into_iter().collect());
        Ok(())
    }

    /// Makes `base` the backing file of `node` (or none) for good: its
    /// name (`name`, or the base's file name) and format are written in
    /// the node's image first, then the edge changes (block-stream,
    /// block-commit). Call it in a drained transaction.
    pub(crate) fn change_backing_file(
        &mut self,
        node: &Arc<Node>,
        base: Option<Arc<Node>>,
        name: Option<String>,
    ) -> Result<(), Error> {
        let name = name.or_else(|| base.as_ref().and_then(|b| b.filename()));
        let format = name
            .as_ref()
            .and(base.as_ref())
            .map(|b| b.driver_name().to_string());
        crate::aio::block_on(node.set_backing_file_name(name.as_deref(), format.as_deref()))
            .and_then(|r| r)
            .map_err(|e| {
                Error::OpenFailed(format!("Could not change the backing file name: {e}"))
            })?;
        self.set_backing(node, base)
    }

    /// blockdev-snapshot: `overlay` (opened without a backing file, and
    /// used by nobody) gets `node` as its backing file and takes its place
    /// under every parent, exports included: an external snapshot of a
    /// live node, as QEMU's bdrv_append. Done in a drained transaction.
    pub fn blockdev_snapshot(&mut self, node: &str, overlay: &str) -> Result<(), Error> {
        let old = self.find(node)?;
        let new = self.find(overlay)?;
        if !self.parents_of(&new).is_empty() {
            return Err(Error::OpenFailed("The overlay is already in use".into()));
        }
        if new.backing().is_some() {
            return Err(Error::OpenFailed(
                "The overlay already has a backing image".into(),
            ));
        }
        if Arc::ptr_eq(&old, &new) {
            return Err(Error::OpenFailed(
                "The overlay cannot be its own backing image".into(),
            ));
        }
        self.set_backing(&new, Some(old.clone()))?;
        self.replace_node(&old, &new);
        Ok(())
    }

    /// blockdev-snapshot-sync: makes a qcow2 overlay file for `node`
    /// (unless `existing`: the file is there already) with the node's
    /// file name and format as its backing file, opens it as node
    /// `overlay` and puts it in the node's place, as blockdev-snapshot.
    pub fn blockdev_snapshot_sync(
        &mut self,
        node: &str,
        file: &std::path::Path,
        overlay: &str,
        existing: bool,
    ) -> Result<(), Error> {
        let old = self.find(node)?;
        // A name the overlay cannot have is refused before its file is
        // made, so that a refused command leaves the file as it was (QEMU
        // checks only whether the name is taken before, with this text).
        if self.find(overlay).is_ok() {
            return Err(Error::OpenFailed(
                "New overlay node-name already in use".into(),
            ));
        }
        check_node_name(overlay, false)?;
        if !existing {
            let mut o = crate::drivers::qcow2::create::Qcow2CreateOptions::new(old.size());
            o.backing_file = old.filename();
            o.backing_fmt = o
                .backing_file
                .as_ref()
                .map(|_| old.driver_name().to_string());
            crate::drivers::qcow2::create::create_image_file(file, &o).map_err(|e| {
                Error::OpenFailed(format!("Could not create '{}': {e}", file.display()))
            })?;
        }
        let options = Options::from_json(serde_json::json!({
            "driver": "qcow2",
            "node-name": overlay,
            "file": {"driver": "file", "filename": file},
            "backing": null,
        }))?;
        self.add(options)?;
        self.blockdev_snapshot(node, overlay)
    }

    /// Points every edge to `old` (from nodes, exports and jobs) at `new`,
    /// except `new`'s own edges (QEMU's bdrv_replace_node, as a filter is
    /// put above a node or taken out).
    pub(crate) fn replace_node(&mut self, old: &Arc<Node>, new: &Arc<Node>) {
        // Edges of nodes below `new` stay: repointed, they would close a
        // loop (a fleecing target whose backing file is the source).
        let mut below: Vec<Arc<Node>> = vec![new.clone()];
        let mut i = 0;
        while i < below.len() {
            let children: Vec<Arc<Node>> = below[i].children().iter().map(|c| c.node()).collect();
            for n in children {
                if !below.iter().any(|b| Arc::ptr_eq(b, &n)) {
                    below.push(n);
                }
            }
            i += 1;
        }
        let from_below = |e: &Arc<Child>| match e.parent() {
            Parent::Node(p) => below.iter().any(|b| b.name() == p),
            _ => false,
        };
        let edges: Vec<Arc<Child>> = self
            .working
            .nodes
            .values()
            .flat_map(|n| n.children().to_vec())
            .chain(self.working.external_edges().cloned())
            .filter(|e| Arc::ptr_eq(&e.node(), old) && !from_below(e))
            .collect();
        for edge in edges {
            let previous = edge.replace(new.clone());
            self.undo.push(Undo::Edge(edge, previous));
        }
    }

    /// The node `name` of the graph being built.
    pub(crate) fn find(&self, name: &str) -> Result<Arc<Node>, Error> {
        self.node(name)
    }

    /// Gives a bitmap frozen for a job its bits back if the transaction is
    /// rolled back.
    pub(crate) fn on_rollback_unfreeze(&mut self, bitmap: Arc<DirtyBitmap>, bits: Vec<u64>) {
        self.undo.push(Undo::Unfreeze(bitmap, bits));
    }

    /// Takes job `id`'s edges out (it ended).
    pub fn detach_job(&mut self, id: &str) {
        self.working.jobs.remove(id);
    }

    /// Detaches export `id`.
    pub fn detach_export(&mut self, id: &str) -> Result<(), Error> {
        self.working
            .exports
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| Error::OpenFailed(format!("Export '{id}' not found")))
    }

    /// Checks the permissions of the resulting graph and makes it the
    /// graph; on error everything is rolled back.
    pub fn commit(mut self) -> Result<(), Error> {
        let checked = check_permissions(&self.working, &self.made_read_only)?;
        for (edge, perm, shared) in checked.edges {
            edge.set_permissions(perm, shared);
        }
        for (node, perm) in checked.granted {
            node.set_granted(perm);
        }
        let old = std::mem::replace(&mut *self.graph, std::mem::take(&mut self.working));
        self.committed = true;
        let mut reopened = Vec::new();
        for undo in self.undo.drain(..) {
            match undo {
                Undo::BitmapChanged(bitmap, _) => bitmap.commit_journal(),
                Undo::Reopened(node) if !reopened.iter().any(|n| Arc::ptr_eq(n, &node)) => {
                    reopened.push(node)
                }
                _ => {}
            }
        }
        self.commit_reopens(reopened);
        for (node, bitmap) in self.removed_bitmaps.drain(..) {
            node.remove_bitmap(&bitmap);
            if bitmap.persistent() {
                // The graph changed already: a failure here leaves the
                // bitmap in the image, marked in use, until the node closes
                // and stores its bitmaps without it.
                match block_on(node.remove_stored_bitmap(bitmap.name())) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) | Err(e) => log::error!(
                        "cannot remove bitmap '{}' from the image of '{}': {e}",
                        bitmap.name(),
                        node.name()
                    ),
                }
            }
        }
        // Deleted nodes, and opened ones deleted again, leave the graph.
        let now = &self.graph.nodes;
        let gone = old
            .nodes
            .into_values()
            .chain(std::mem::take(&mut self.opened))
            .filter(|n| !now.get(n.name()).is_some_and(|m| Arc::ptr_eq(m, n)));
        let mut left: Vec<Arc<Node>> = Vec::new();
        for n in gone {
            if !left.iter().any(|m| Arc::ptr_eq(m, &n)) {
                left.push(n);
            }
        }
        // The drained section ends first: closing flushes, and a node may
        // reach its storage through an export of this same graph (an NBD
        // client of our own server), which must take requests again.
        // Requests cannot reach these nodes any more: no edge leads to
        // them.
        drop(self.drained.take());
        close_nodes(left);
        for job in std::mem::take(&mut self.new_jobs) {
            self.owner.register_job(job.clone());
            if let Err(e) = job.start() {
                log::error!("{e}");
            }
        }
        Ok(())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for undo in self.undo.drain(..).rev() {
            match undo {
                Undo::Edge(edge, previous) => {
                    edge.replace(previous);
                }
                Undo::BitmapAdded(node, bitmap) => node.remove_bitmap(&bitmap),
                Undo::BitmapChanged(bitmap, saved) => bitmap.roll_back(&saved),
                Undo::Unfreeze(bitmap, bits) => {
                    bitmap.merge_words(&bits);
                    bitmap.set_busy(false);
                }
                Undo::Backing(node, previous) => {
                    if let Err(e) = node.set_backing(previous) {
                        log::error!(
                            "node '{}': cannot restore its backing child: {e}",
                            node.name()
                        );
                    }
                }
                Undo::Reopened(node) => node.driver().reopen_abort(),
                Undo::Flags(node, flags) => node.set_flags(flags),
            }
        }
        self.working = State::default();
        // As in commit: the exports take requests again before the nodes
        // the transaction opened are closed.
        drop(self.drained.take());
        close_nodes(std::mem::take(&mut self.opened));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Graph, IoBuffer, WriteFlags};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// An export that counts how often it was paused and resumed.
    #[derive(Default)]
    struct Export {
        paused: AtomicUsize,
        resumed: AtomicUsize,
    }

    impl DrainParent for Export {
        fn drained_begin(&self) {
            self.paused.fetch_add(1, Ordering::SeqCst);
        }

        fn drained_end(&self) {
            self.resumed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn opts(arg: &str) -> Options {
        Options::from_arg(arg, None).unwrap()
    }

    fn shape(graph: &Graph) -> Vec<String> {
        let view = graph.view();
        let mut out: Vec<String> = view
            .nodes
            .iter()
            .flat_map(|n| {
                n.children().to_vec().into_iter().map(move |c| {
                    let (p, s) = c.permissions();
                    format!(
                        "{} -{}-> {} [{p}] [{s}]",
                        n.name(),
                        c.role(),
                        c.node().name()
                    )
                })
            })
            .collect();
        out.extend(view.nodes.iter().map(|n| n.name().to_string()));
        out.extend(
            view.exports
                .iter()
                .map(|(id, c)| format!("{id} -> {}", c.node().name())),
        );
        out
    }

    fn base() -> Graph {
        base_with(Arc::new(Export::default()))
    }

    fn base_with(export: Arc<Export>) -> Graph {
        let g = Graph::new();
        g.add(opts("driver=null-co,node-name=n0,size=1M")).unwrap();
        g.add(opts("driver=raw,node-name=disk0,file=n0")).unwrap();
        g.attach_export(
            "vub0",
            "disk0",
            Permission::CONSISTENT_READ | Permission::WRITE,
            Permission::ALL,
            export,
        )
        .unwrap();
        g
    }

    #[test]
    fn a_drained_transaction_pauses_the_exports_until_it_ends() {
        let export = Arc::new(Export::default());
        let g = base_with(export.clone());
        let counts = || {
            (
                export.paused.load(Ordering::SeqCst),
                export.resumed.load(Ordering::SeqCst),
            )
        };
        g.transaction().commit().unwrap();
        assert_eq!(counts(), (0, 0));
        {
            let tx = g.drained_transaction();
            assert_eq!(counts(), (1, 0));
            tx.commit().unwrap();
        }
        assert_eq!(counts(), (1, 1));
        drop(g.drained_transaction());
        assert_eq!(counts(), (2, 2));
        g.remove("disk0").unwrap_err();
        assert_eq!(counts(), (3, 3));
    }

    /// Issue 7, defect 5: a quiesce resumed every export present when it
    /// ended, so an export added meanwhile got a resume without a pause,
    /// its counter wrapped and it never took a request again. A section
    /// ends only the parents it paused.
    #[test]
    fn an_export_added_during_a_drained_section_is_not_resumed_by_it() {
        let first = Arc::new(Export::default());
        let g = base_with(first.clone());
        let section = g.drained();
        let added = Arc::new(Export::default());
        g.attach_export(
            "vub1",
            "disk0",
            Permission::CONSISTENT_READ,
            Permission::ALL,
            added.clone(),
        )
        .unwrap();
        drop(section);
        let counts = |e: &Export| {
            (
                e.paused.load(Ordering::SeqCst),
                e.resumed.load(Ordering::SeqCst),
            )
        };
        assert_eq!(counts(&first), (1, 1));
        assert_eq!(counts(&added), (0, 0));
        // The next section pauses and resumes both.
        drop(g.drained());
        assert_eq!(counts(&first), (2, 2));
        assert_eq!(counts(&added), (1, 1));
    }

    #[test]
    fn a_lost_bitmap_is_inconsistent_and_unusable() {
        let g = base();
        let mut tx = g.transaction();
        let options = BitmapOptions {
            granularity: Some(4096),
            disabled: true,
            ..Default::default()
        };
        tx.bitmap_add_lost("disk0", "b0", options).unwrap();
        tx.commit().unwrap();
        let b = g.find("disk0").unwrap().bitmap("b0").unwrap();
        assert!(b.inconsistent());
        assert!(!b.recording());
        assert_eq!(b.granularity(), 4096);
        assert_eq!(
            b.usable(false),
            Err(BitmapUnusable::Inconsistent("b0".into()))
        );
        let mut tx = g.transaction();
        tx.bitmap_remove("disk0", "b0").unwrap();
        tx.commit().unwrap();
        assert!(g.find("disk0").unwrap().bitmap("b0").is_none());
    }

    #[test]
    fn rolling_back_bitmap_changes_keeps_every_bit_io_set() {
        let g = Arc::new(base());
        let mut tx = g.transaction();
        tx.bitmap_add(
            "disk0",
            "b0",
            BitmapOptions {
                granularity: Some(4096),
                ..Default::default()
            },
        )
        .unwrap();
        tx.commit().unwrap();
        let disk0 = g.find("disk0").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (disk0, stop) = (disk0.clone(), stop.clone());
            std::thread::spawn(move || {
                let buf = IoBuffer::from_vec(vec![1u8; 4096]);
                let mut written = 0u64;
                while !stop.load(Ordering::SeqCst) && written < (1 << 20) {
                    block_on(disk0.write(written, &buf, WriteFlags::default()))
                        .unwrap()
                        .unwrap();
                    written += 4096;
                }
                written
            })
        };
        let mut rounds = 0;
        while !writer.is_finished() && rounds < 20000 {
            let mut tx = g.transaction();
            match rounds % 3 {
                0 => tx.bitmap_clear("disk0", "b0").unwrap(),
                1 => tx.bitmap_set_recording("disk0", "b0", false).unwrap(),
                _ => tx.bitmap_remove("disk0", "b0").unwrap(),
            }
            drop(tx); // aborted
            rounds += 1;
        }
        stop.store(true, Ordering::SeqCst);
        let written = writer.join().unwrap();
        let b0 = disk0.bitmap("b0").unwrap();
        assert!(b0.recording());
        assert_eq!(
            b0.count(),
            written,
            "{rounds} aborted transactions lost bits of {written} written bytes"
        );
    }

    #[test]
    fn a_failing_action_rolls_back_every_earlier_one() {
        let g = base();
        let before = shape(&g);
        let export_edge = g.view().exports[0].1.clone();
        {
            let mut tx = g.transaction();
            tx.add(opts("driver=raw,node-name=f1,file=disk0")).unwrap();
            tx.replace(ReplaceParent::Export("vub0"), "f1").unwrap();
            // The replacement is live (requests would go to f1) until...
            assert_eq!(export_edge.node().name(), "f1");
            // ...an action fails and the transaction is dropped.
            assert!(tx.add(opts("driver=nope,node-name=x")).is_err());
        }
        assert_eq!(export_edge.node().name(), "disk0");
        assert_eq!(shape(&g), before);
    }

    #[test]
    fn insert_and_remove_a_filter_atomically() {
        let g = base();
        let mut tx = g.transaction();
        tx.add(opts("driver=raw,node-name=f1,file=disk0")).unwrap();
        tx.replace(ReplaceParent::Export("vub0"), "f1").unwrap();
        tx.commit().unwrap();
        assert_eq!(g.view().exports[0].1.node().name(), "f1");
        let mut tx = g.transaction();
        tx.replace(ReplaceParent::Export("vub0"), "disk0").unwrap();
        tx.remove("f1").unwrap();
        tx.commit().unwrap();
        assert_eq!(g.view().exports[0].1.node().name(), "disk0");
        assert!(g.find("f1").is_err());
    }

    #[test]
    fn permission_conflicts_are_refused_and_change_nothing() {
        let g = base();
        let before = shape(&g);
        // A copy-before-write filter on disk0 while vub0 still writes it
        // (the export's root must move to the filter in the same transaction).
        g.add(opts("driver=null-co,node-name=tmp,size=1M")).unwrap();
        let with_tmp = shape(&g);
        let e = g
            .add(opts(
                "driver=copy-before-write,node-name=cbw,file=disk0,target=tmp",
            ))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Permission conflict on node 'disk0': permissions 'write' are both required by export 'vub0' (uses node 'disk0' as 'root' child) and unshared by node 'cbw' (uses node 'disk0' as 'file' child)"
        );
        assert_eq!(shape(&g), with_tmp);
        g.remove("tmp").unwrap();
        assert_eq!(shape(&g), before);
        // Two raw windows writing one file are fine.
        g.add(opts("driver=raw,node-name=r2,file=n0")).unwrap();
        g.remove("r2").unwrap();
        // A writable export moved onto a read-only node.
        g.add(opts("driver=null-co,node-name=ro,size=1M,read-only=on"))
            .unwrap();
        let mut tx = g.transaction();
        tx.replace(ReplaceParent::Export("vub0"), "ro").unwrap();
        let e = tx.commit().unwrap_err();
        assert!(e.to_string().contains("is read-only"), "{e}");
        assert_eq!(g.view().exports[0].1.node().name(), "disk0");
    }

    #[test]
    fn bitmap_actions_roll_back_with_the_rest() {
        let g = base();
        let mut tx = g.transaction();
        tx.bitmap_add("disk0", "b0", BitmapOptions::default())
            .unwrap();
        tx.commit().unwrap();
        let disk0 = g.find("disk0").unwrap();
        disk0.bitmap("b0").unwrap().record(0, 4096);
        {
            let mut tx = g.transaction();
            tx.bitmap_add(
                "disk0",
                "b1",
                BitmapOptions {
                    granularity: Some(4096),
                    disabled: true,
                    ..Default::default()
                },
            )
            .unwrap();
            tx.bitmap_merge(
                "disk0",
                "b1",
                &[BitmapRef {
                    node: "disk0".into(),
                    name: "b0".into(),
                }],
            )
            .unwrap();
            tx.bitmap_clear("disk0", "b0").unwrap();
            tx.bitmap_set_recording("disk0", "b0", false).unwrap();
            assert!(tx
                .bitmap_add("disk0", "b1", BitmapOptions::default())
                .is_err());
        }
        let b0 = disk0.bitmap("b0").unwrap();
        assert!(disk0.bitmap("b1").is_none());
        assert_eq!(b0.count(), 65536);
        assert!(b0.recording());
    }

    #[test]
    fn loops_and_users_are_refused() {
        let g = Graph::new();
        g.add(opts("driver=null-co,node-name=n0,size=1M")).unwrap();
        g.add(opts("driver=raw,node-name=disk0,file=n0")).unwrap();
        g.add(opts("driver=raw,node-name=top,file=disk0")).unwrap();
        // disk0 -> top -> disk0 would be a loop.
        let mut tx = g.transaction();
        tx.replace(
            ReplaceParent::Node {
                node_name: "disk0",
                child: "file",
            },
            "top",
        )
        .unwrap();
        let e = tx.commit().unwrap_err();
        assert!(e.to_string().contains("loop"), "{e}");
        assert_eq!(g.find("disk0").unwrap().children()[0].node().name(), "n0");
        let e = g.remove("disk0").unwrap_err();
        assert!(e.to_string().contains("in use by"), "{e}");
    }

    #[test]
    fn snapshot_sync_checks_the_overlay_name_before_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("overlay.qcow2");
        let g = Graph::new();
        g.add(opts("driver=null-co,node-name=disk0,size=1M"))
            .unwrap();
        let long = "o".repeat(crate::MAX_NODE_NAME_LEN + 1);
        for (overlay, error) in [
            ("sn`p0", "Invalid node-name: 'sn`p0'"),
            ("disk0", "New overlay node-name already in use"),
            (long.as_str(), "Node name too long"),
        ] {
            std::fs::write(&file, b"what the file held").unwrap();
            let mut tx = g.transaction();
            let e = tx
                .blockdev_snapshot_sync("disk0", &file, overlay, false)
                .unwrap_err();
            assert_eq!(e.to_string(), error);
            drop(tx);
            let held = std::fs::read(&file).unwrap();
            assert!(
                held == b"what the file held",
                "{overlay}: the file was overwritten"
            );
        }
        let mut tx = g.transaction();
        tx.blockdev_snapshot_sync("disk0", &file, "ovl", false)
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(g.find("ovl").unwrap().driver_name(), "qcow2");
    }
}
