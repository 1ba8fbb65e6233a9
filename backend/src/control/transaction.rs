//! Graph transactions over QMP: the `transaction` command's actions (and
//! the single-action commands that are transactions of their own), how they
//! are parsed, and how they run on the graph.

use blkgraph_ctl::QmpError;
use blkgraph_graph::job::{BackupOptions, JobTxn};
use blkgraph_graph::{BitmapOptions, BitmapRef, Graph, Options, ReplaceParent, Transaction};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::args::{generic, parse, NodeName};
use super::jobs::parse_backup;

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
pub(super) struct TransactionArgs {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BitmapName {
    node: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BitmapAdd {
    node: String,
    name: String,
    #[serde(default)]
    granularity: Option<u64>,
    #[serde(default)]
    persistent: Option<bool>,
    #[serde(default)]
    disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum MergeSource {
    Name(String),
    Ref(BitmapName),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BitmapMerge {
    node: String,
    target: String,
    bitmaps: Vec<MergeSource>,
}

/// A dirty bitmap action (command or transaction action).
pub(super) enum BitmapAction {
    Add(BitmapAdd),
    Remove(BitmapName),
    Clear(BitmapName),
    Enable(BitmapName),
    Disable(BitmapName),
    Merge(BitmapMerge),
}

impl BitmapAction {
    /// The action's type, as QMP names it.
    fn kind(&self) -> &'static str {
        match self {
            BitmapAction::Add(_) => "block-dirty-bitmap-add",
            BitmapAction::Remove(_) => "block-dirty-bitmap-remove",
            BitmapAction::Clear(_) => "block-dirty-bitmap-clear",
            BitmapAction::Enable(_) => "block-dirty-bitmap-enable",
            BitmapAction::Disable(_) => "block-dirty-bitmap-disable",
            BitmapAction::Merge(_) => "block-dirty-bitmap-merge",
        }
    }

    /// Parses the arguments of `kind` (block-dirty-bitmap-...), or `None`
    /// if `kind` is not a bitmap action.
    pub(super) fn parse(
        kind: &str,
        args: Map<String, Value>,
    ) -> Option<Result<BitmapAction, QmpError>> {
        let kind = kind.strip_prefix("block-dirty-bitmap-")?;
        Some(match kind {
            "add" => parse(args).map(BitmapAction::Add),
            "remove" => parse(args).map(BitmapAction::Remove),
            "clear" => parse(args).map(BitmapAction::Clear),
            "enable" => parse(args).map(BitmapAction::Enable),
            "disable" => parse(args).map(BitmapAction::Disable),
            "merge" => parse(args).map(BitmapAction::Merge),
            _ => return None,
        })
    }

    fn apply(&self, tx: &mut Transaction<'_>) -> Result<(), blkgraph_graph::Error> {
        match self {
            BitmapAction::Add(a) => {
                let options = BitmapOptions {
                    granularity: a.granularity,
                    disabled: a.disabled.unwrap_or(false),
                    persistent: a.persistent.unwrap_or(false),
                };
                tx.bitmap_add(&a.node, &a.name, options)
            }
            BitmapAction::Remove(b) => tx.bitmap_remove(&b.node, &b.name),
            BitmapAction::Clear(b) => tx.bitmap_clear(&b.node, &b.name),
            BitmapAction::Enable(b) => tx.bitmap_set_recording(&b.node, &b.name, true),
            BitmapAction::Disable(b) => tx.bitmap_set_recording(&b.node, &b.name, false),
            BitmapAction::Merge(m) => {
                let sources: Vec<BitmapRef> = m
                    .bitmaps
                    .iter()
                    .map(|s| match s {
                        MergeSource::Name(name) => BitmapRef {
                            node: m.node.clone(),
                            name: name.clone(),
                        },
                        MergeSource::Ref(r) => BitmapRef {
                            node: r.node.clone(),
                            name: r.name.clone(),
                        },
                    })
                    .collect();
                tx.bitmap_merge(&m.node, &m.target, &sources)
            }
        }
    }
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
            return Err(generic(
                "Parameter 'snapshot-node-name' is missing (blkgraph names every node)",
            ));
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

/// Parses blockdev-snapshot's arguments.
pub(super) fn parse_snapshot(args: Map<String, Value>) -> Result<Action, QmpError> {
    parse(args).map(Action::Snapshot)
}

/// Parses blockdev-snapshot-sync's arguments.
pub(super) fn parse_snapshot_sync(args: Map<String, Value>) -> Result<Action, QmpError> {
    let a: SnapshotSync = parse(args)?;
    a.check()?;
    Ok(Action::SnapshotSync(a))
}

/// A transaction: its actions, and whether the jobs they make complete
/// together (`completion-mode: grouped`).
pub(super) struct Actions {
    pub(super) list: Vec<Action>,
    pub(super) grouped: bool,
}

impl Actions {
    /// A transaction of one action (a command that is also an action).
    pub(super) fn one(action: Action) -> Self {
        Actions {
            list: vec![action],
            grouped: false,
        }
    }
}

impl Action {
    pub(super) fn parse(value: Value, index: usize) -> Result<Action, QmpError> {
        let at = |path: String| move |e: QmpError| generic(with_key_prefix(&e.desc, &path));
        let data_path = format!("actions[{index}].data.");
        let prefix = |e: QmpError| generic(with_key_prefix(&e.desc, &data_path));
        let ActionArgs { kind, data } = match value {
            Value::Object(m) => parse(m).map_err(at(format!("actions[{index}].")))?,
            _ => {
                return Err(generic(format!(
                    "Invalid parameter type for 'actions[{index}]', expected: object"
                )))
            }
        };
        match kind.as_str() {
            "blockdev-add" => Ok(Action::Add(
                Options::from_json(Value::Object(data)).map_err(generic)?,
            )),
            "blockdev-del" => Ok(Action::Del(
                parse::<NodeName>(data).map_err(prefix)?.node_name,
            )),
            "x-blockdev-replace" => {
                let r: Replace = parse(data).map_err(prefix)?;
                r.parent().map_err(prefix)?;
                Ok(Action::Replace(r))
            }
            "abort" => {
                parse::<Map<String, Value>>(data).map_err(prefix)?;
                Ok(Action::Abort)
            }
            "blockdev-backup" => parse_backup(data).map(Action::Backup).map_err(prefix),
            "blockdev-snapshot" => parse_snapshot(data).map_err(prefix),
            "blockdev-snapshot-sync" => parse_snapshot_sync(data).map_err(prefix),
            other => match BitmapAction::parse(other, data) {
                Some(action) => action.map(Action::Bitmap).map_err(prefix),
                None => Err(generic(format!(
                    "actions[{index}]: Parameter 'type' does not accept value '{other}'"
                ))),
            },
        }
    }

    /// The action's type, as QMP names it.
    fn kind(&self) -> &'static str {
        match self {
            Action::Add(_) => "blockdev-add",
            Action::Del(_) => "blockdev-del",
            Action::Replace(_) => "x-blockdev-replace",
            Action::Bitmap(b) => b.kind(),
            Action::Backup(_) => "blockdev-backup",
            Action::Snapshot(_) => "blockdev-snapshot",
            Action::SnapshotSync(_) => "blockdev-snapshot-sync",
            Action::Abort => "abort",
        }
    }

    /// Whether the action changes what requests see (edges, nodes that
    /// go, bitmaps I/O records in): only adding needs no drained graph.
    fn needs_drain(&self) -> bool {
        !matches!(self, Action::Add(_) | Action::Bitmap(BitmapAction::Add(_)))
    }
}

/// Parses the `transaction` command's arguments.
pub(super) fn parse_transaction(args: Map<String, Value>) -> Result<Actions, QmpError> {
    let args: TransactionArgs = parse(args)?;
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
    let list: Vec<Action> = args
        .actions
        .into_iter()
        .enumerate()
        .map(|(i, a)| Action::parse(a, i))
        .collect::<Result<_, _>>()?;
    if grouped {
        // As QEMU: only the actions that make jobs complete together.
        if let Some(other) = list.iter().find(|a| !matches!(a, Action::Backup(_))) {
            return Err(generic(format!(
                "Action '{}' does not support transaction property completion-mode = grouped",
                other.kind()
            )));
        }
    }
    Ok(Actions { list, grouped })
}

/// Runs actions as one transaction: all are prepared in order, the
/// permissions are checked once at the end, and a failure anywhere rolls
/// every action back. Actions that change what requests see run in a
/// drained graph.
pub(super) fn run(graph: &Graph, actions: Actions) -> Result<(), QmpError> {
    let Actions { list, grouped } = actions;
    let mut tx = if list.iter().any(Action::needs_drain) {
        graph.drained_transaction()
    } else {
        graph.transaction()
    };
    let txn = grouped.then(JobTxn::new);
    for action in list {
        match action {
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
