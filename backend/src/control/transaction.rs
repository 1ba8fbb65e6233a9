//! Graph transactions over QMP: the `transaction` command's actions (and
//! the single-action commands that are transactions of their own), how they
//! are parsed, and how they run on the graph.

use blkgraph_ctl::QmpError;
use blkgraph_graph::job::{BackupOptions, JobTxn};
use blkgraph_graph::{Graph, Options, ReplaceParent, Transaction};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::args::generic;
use super::args::parse as parse_args;
use super::bitmaps::BitmapAction;
use super::table;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct Replace {
    parent_type: String,
    #[serde(default)]
    export_id: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    child: Option<String>,
    new_child: String,
}

impl Replace {
    pub(super) fn parent(&self) -> Result<ReplaceParent<'_>, QmpError> {
        match (
            self.parent_type.as_str(),
            &self.export_id,
            &self.node_name,
            &self.child,
        ) {
            ("export", Some(id), None, None) => Ok(ReplaceParent::Export(id)),
            ("driver", None, Some(node_name), Some(child)) => {
                Ok(ReplaceParent::Node { node_name, child })
            }
            ("export", ..) => Err(generic(
                "parent-type 'export' takes 'export-id' (and no 'node-name' or 'child')",
            )),
            ("driver", ..) => Err(generic(
                "parent-type 'driver' takes 'node-name' and 'child' (and no 'export-id')",
            )),
            (other, ..) => Err(generic(format!(
                "Parameter 'parent-type' does not accept value '{other}'"
            ))),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransactionArgs {
    actions: Vec<Value>,
    #[serde(default)]
    properties: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionArgs {
    #[serde(rename = "type")]
    kind: String,
    data: Map<String, Value>,
}

/// Puts `path` before the key a QMP error text names ('x' becomes
/// 'PATHx'), or before the whole text if it names none.
fn with_key_prefix(desc: &str, path: &str) -> String {
    match desc.split_once('\'') {
        Some((head, rest)) => format!("{head}'{path}{rest}"),
        None => format!("{}: {desc}", path.trim_end_matches('.')),
    }
}

/// A transaction action, checked before anything happens.
pub(super) enum Action {
    Add(Options),
    Del(String),
    Replace(Replace),
    Bitmap(BitmapAction),
    Backup(BackupOptions),
    Snapshot(Snapshot),
    SnapshotSync(SnapshotSync),
    Abort,
}

/// blockdev-snapshot's arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Snapshot {
    node: String,
    overlay: String,
}

/// blockdev-snapshot-sync's arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct SnapshotSync {
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    snapshot_file: String,
    #[serde(default)]
    snapshot_node_name: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

impl SnapshotSync {
    /// Checks what blkgraph can do: a qcow2 overlay, made here or
    /// existing, with a node-name.
    fn check(&self) -> Result<(), QmpError> {
        if self.device.is_none() && self.node_name.is_none() {
            return Err(generic("Cannot find device= nor node-name="));
        }
        if self.format.as_deref().is_some_and(|f| f != "qcow2") {
            return Err(generic(
                "blkgraph makes qcow2 overlays only (format 'qcow2')",
            ));
        }
        if !matches!(
            self.mode.as_deref(),
            None | Some("absolute-paths") | Some("existing")
        ) {
            return Err(generic("Parameter 'mode' does not accept this value"));
        }
        if self.snapshot_node_name.is_none() {
            return Err(generic("New overlay node-name missing"));
        }
        Ok(())
    }

    fn apply(&self, tx: &mut Transaction<'_>) -> Result<(), blkgraph_graph::Error> {
        let node = self
            .node_name
            .as_deref()
            .or(self.device.as_deref())
            .unwrap_or_default();
        let overlay = self.snapshot_node_name.as_deref().unwrap_or_default();
        let existing = self.mode.as_deref() == Some("existing");
        tx.blockdev_snapshot_sync(node, self.snapshot_file.as_ref(), overlay, existing)
    }
}

/// Parses blockdev-snapshot-sync's arguments.
pub(super) fn parse_snapshot_sync(args: Map<String, Value>) -> Result<SnapshotSync, QmpError> {
    let a: SnapshotSync = parse_args(args)?;
    a.check()?;
    Ok(a)
}

/// An action, its type as QMP names it, and whether it needs a drained
/// graph (it changes what requests see: edges, nodes that go, bitmaps I/O
/// records in).
pub(super) struct Step {
    pub(super) kind: &'static str,
    pub(super) action: Action,
    pub(super) drains: bool,
}

/// A transaction: its steps, and whether the jobs they make complete
/// together (`completion-mode: grouped`).
pub(super) struct Actions {
    steps: Vec<Step>,
    grouped: bool,
}

impl Actions {
    /// A transaction of one action (a command that is also an action).
    pub(super) fn one(step: Step) -> Self {
        Actions {
            steps: vec![step],
            grouped: false,
        }
    }
}

/// Parses action `index` of a `transaction`: `abort`, or a command of the
/// table that is a transaction action.
fn parse_step(value: Value, index: usize) -> Result<Step, QmpError> {
    let at = |path: String| move |e: QmpError| generic(with_key_prefix(&e.desc, &path));
    let data_path = format!("actions[{index}].data.");
    let prefix = |e: QmpError| generic(with_key_prefix(&e.desc, &data_path));
    let ActionArgs { kind, data } = match value {
        Value::Object(m) => parse_args(m).map_err(at(format!("actions[{index}].")))?,
        _ => {
            return Err(generic(format!(
                "Invalid parameter type for 'actions[{index}]', expected: object"
            )))
        }
    };
    if kind == "abort" {
        parse_args::<Map<String, Value>>(data).map_err(prefix)?;
        return Ok(Step {
            kind: "abort",
            action: Action::Abort,
            drains: false,
        });
    }
    match table::find(&kind).and_then(|e| e.step(data)) {
        // blockdev-add's options name their keys without a prefix, as QEMU.
        Some(step) if kind == "blockdev-add" => step,
        Some(step) => step.map_err(prefix),
        None => Err(generic(format!(
            "actions[{index}]: Parameter 'type' does not accept value '{kind}'"
        ))),
    }
}

/// Parses the `transaction` command's arguments.
pub(super) fn parse(args: Map<String, Value>) -> Result<Actions, QmpError> {
    let args: TransactionArgs = parse_args(args)?;
    let mut grouped = false;
    if let Some(props) = args.properties {
        let ok = props.as_object().is_some_and(|p| {
            p.iter().all(|(k, v)| {
                grouped |= v.as_str() == Some("grouped");
                k == "completion-mode" && matches!(v.as_str(), Some("individual") | Some("grouped"))
            })
        });
        if !ok {
            return Err(generic("Invalid parameter 'properties'"));
        }
    }
    let steps: Vec<Step> = args
        .actions
        .into_iter()
        .enumerate()
        .map(|(i, a)| parse_step(a, i))
        .collect::<Result<_, _>>()?;
    if grouped {
        // As QEMU: only the actions that make jobs complete together.
        if let Some(other) = steps
            .iter()
            .find(|s| !matches!(s.action, Action::Backup(_)))
        {
            return Err(generic(format!(
                "Action '{}' does not support transaction property completion-mode = grouped",
                other.kind
            )));
        }
    }
    Ok(Actions { steps, grouped })
}

/// Runs actions as one transaction: all are prepared in order, the
/// permissions are checked once at the end, and a failure anywhere rolls
/// every action back. Actions that change what requests see run in a
/// drained graph.
pub(super) fn run(graph: &Graph, actions: Actions) -> Result<(), QmpError> {
    let Actions { steps, grouped } = actions;
    let mut tx = if steps.iter().any(|s| s.drains) {
        graph.drained_transaction()
    } else {
        graph.transaction()
    };
    let txn = grouped.then(JobTxn::new);
    for step in steps {
        match step.action {
            Action::Add(options) => tx.add(options).map(|_| ()),
            Action::Del(name) => tx.remove(&name),
            Action::Replace(r) => tx.replace(r.parent()?, &r.new_child),
            Action::Bitmap(b) => b.apply(&mut tx),
            Action::Backup(o) => tx.blockdev_backup(&o, txn.clone()).map(|_| ()),
            Action::Snapshot(a) => tx.blockdev_snapshot(&a.node, &a.overlay),
            Action::SnapshotSync(a) => a.apply(&mut tx),
            Action::Abort => return Err(generic("Transaction aborted using Abort action")),
        }
        .map_err(generic)?;
    }
    tx.commit().map_err(generic)
}
