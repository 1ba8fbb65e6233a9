//! The QMP commands: what the control socket can do with the graph and
//! the exports.

use std::sync::Arc;

use blkgraph_ctl::{Dispatcher, Events, NamedFds, QmpError};
use blkgraph_graph::{
    BitmapRef, Graph, Node, Options, Parent, ReplaceParent, ThrottleGroup, Transaction,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::exports::Exports;
use crate::listen_fd::{self, Source};
use crate::nbd::NbdServerOptions;

/// The commands, in query-commands order.
const COMMANDS: &[&str] = &[
    "query-version",
    "blockdev-add",
    "blockdev-del",
    "x-blockdev-replace",
    "transaction",
    "query-named-block-nodes",
    "x-debug-query-block-graph",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "nbd-server-start",
    "nbd-server-stop",
    "object-add",
    "object-del",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "quit",
];

/// The node-info member with a copy-before-write node's snapshot state (a
/// blkgraph extension).
pub const SNAPSHOT_INFO_MEMBER: &str = "__org.blkgraph_snapshot";

/// The QEMU version whose QMP semantics blkgraph follows.
pub fn version() -> Value {
    json!({
        "qemu": {"major": 10, "minor": 0, "micro": 0},
        "package": format!("blkgraph {}", env!("CARGO_PKG_VERSION")),
    })
}

/// Executes QMP commands on a graph and its exports.
pub struct Control {
    graph: Arc<Graph>,
    exports: Arc<Exports>,
    quit: Box<dyn Fn() + Send + Sync>,
}

fn parse<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    Options::from_json(Value::Object(args))
        .and_then(|o| o.parse(""))
        .map_err(|e| QmpError::generic(e.to_string()))
}

fn generic(e: impl ToString) -> QmpError {
    QmpError::generic(e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NodeName {
    node_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Replace {
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
    fn parent(&self) -> Result<ReplaceParent<'_>, QmpError> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BitmapName {
    node: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BitmapAdd {
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
enum MergeSource {
    Name(String),
    Ref(BitmapName),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BitmapMerge {
    node: String,
    target: String,
    bitmaps: Vec<MergeSource>,
}

/// A dirty bitmap action (command or transaction action).
enum BitmapAction {
    Add(BitmapAdd),
    Remove(BitmapName),
    Clear(BitmapName),
    Enable(BitmapName),
    Disable(BitmapName),
    Merge(BitmapMerge),
}

impl BitmapAction {
    /// Parses the arguments of `kind` (block-dirty-bitmap-...), or `None`
    /// if `kind` is not a bitmap action.
    fn parse(kind: &str, args: Map<String, Value>) -> Option<Result<BitmapAction, QmpError>> {
        let kind = kind.strip_prefix("block-dirty-bitmap-")?;
        Some(match kind {
            "add" => parse::<BitmapAdd>(args).and_then(|a| {
                if a.persistent == Some(true) {
                    Err(generic("Persistent bitmaps are not supported"))
                } else {
                    Ok(BitmapAction::Add(a))
                }
            }),
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
                tx.bitmap_add(&a.node, &a.name, a.granularity, a.disabled.unwrap_or(false))
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
enum Action {
    Add(Options),
    Del(String),
    Replace(Replace),
    Bitmap(BitmapAction),
    Abort,
}

impl Action {
    fn parse(value: Value, index: usize) -> Result<Action, QmpError> {
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
            other => match BitmapAction::parse(other, data) {
                Some(action) => action.map(Action::Bitmap).map_err(prefix),
                None => Err(generic(format!(
                    "actions[{index}]: Parameter 'type' does not accept value '{other}'"
                ))),
            },
        }
    }

    /// Whether the action changes what requests see (edges, nodes that
    /// go, bitmaps I/O records in): only adding needs no drained graph.
    fn needs_drain(&self) -> bool {
        !matches!(self, Action::Add(_) | Action::Bitmap(BitmapAction::Add(_)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportDel {
    id: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ObjectAdd {
    qom_type: String,
    id: String,
    #[serde(default)]
    limits: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectDel {
    id: String,
}

impl Control {
    /// Commands on `graph` and `exports`; `quit` calls `quit`.
    pub fn new(
        graph: Arc<Graph>,
        exports: Arc<Exports>,
        quit: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Control {
            graph,
            exports,
            quit,
        }
    }

    /// Runs actions as one transaction: all are prepared in order, the
    /// permissions are checked once at the end, and a failure anywhere rolls
    /// every action back. Actions that change what requests see run in a
    /// drained graph.
    fn run_transaction(&self, actions: Vec<Action>) -> Result<(), QmpError> {
        let mut tx = if actions.iter().any(Action::needs_drain) {
            self.graph.drained_transaction()
        } else {
            self.graph.transaction()
        };
        for action in actions {
            match action {
                Action::Add(options) => tx.add(options).map(|_| ()),
                Action::Del(name) => tx.remove(&name),
                Action::Replace(r) => tx.replace(r.parent()?, &r.new_child),
                Action::Bitmap(b) => b.apply(&mut tx),
                Action::Abort => return Err(generic("Transaction aborted using Abort action")),
            }
            .map_err(generic)?;
        }
        tx.commit().map_err(generic)
    }

    fn transaction(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let args: TransactionArgs = parse(args)?;
        if let Some(props) = args.properties {
            let ok = props.as_object().is_some_and(|p| {
                p.iter().all(|(k, v)| {
                    k == "completion-mode"
                        && matches!(v.as_str(), Some("individual") | Some("grouped"))
                })
            });
            if !ok {
                return Err(generic("Invalid parameter 'properties'"));
            }
        }
        let actions = args
            .actions
            .into_iter()
            .enumerate()
            .map(|(i, a)| Action::parse(a, i))
            .collect::<Result<Vec<_>, _>>()?;
        self.run_transaction(actions)?;
        Ok(json!({}))
    }

    fn node_info(node: &Node) -> Value {
        let bitmaps: Vec<Value> = node
            .bitmaps()
            .iter()
            .map(|b| {
                json!({
                    "name": b.name(),
                    "count": b.count(),
                    "granularity": b.granularity(),
                    "recording": b.recording(),
                    "busy": false,
                    "persistent": false,
                })
            })
            .collect();
        let mut info = json!({
            "node-name": node.name(),
            "drv": node.driver_name(),
            "ro": node.read_only(),
            "file": node.filename().unwrap_or_default(),
            "encrypted": false,
            "detect_zeroes": "off",
            "backing_file_depth": 0,
            "write_threshold": 0,
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "cache": {"writeback": true, "direct": node.direct(), "no-flush": node.no_flush()},
            "image": {
                "filename": node.filename().unwrap_or_default(),
                "format": node.driver_name(),
                "virtual-size": node.size(),
            },
            "dirty-bitmaps": bitmaps,
        });
        if let Some(extra) = node.driver_info() {
            info[SNAPSHOT_INFO_MEMBER] = extra;
        }
        info
    }

    /// x-debug-query-block-graph: exports and nodes with stable ids (exports
    /// by id, then nodes by name), and every edge with its permissions.
    fn block_graph(&self) -> Value {
        let view = self.graph.view();
        let mut ids = std::collections::HashMap::new();
        let mut nodes = Vec::new();
        for (id, _) in &view.exports {
            ids.insert(format!("export:{id}"), nodes.len());
            nodes.push(json!({"id": nodes.len(), "type": "block-export", "name": id}));
        }
        for node in &view.nodes {
            ids.insert(format!("node:{}", node.name()), nodes.len());
            nodes.push(json!({"id": nodes.len(), "type": "block-driver", "name": node.name(), "driver": node.driver_name()}));
        }
        let key = |p: &Parent| match p {
            Parent::Node(n) => format!("node:{n}"),
            Parent::Export(e) => format!("export:{e}"),
        };
        let mut edges = Vec::new();
        let all = view
            .exports
            .iter()
            .map(|(_, c)| c.clone())
            .chain(view.nodes.iter().flat_map(|n| n.children().to_vec()));
        for edge in all {
            let (perm, shared) = edge.permissions();
            edges.push(json!({
                "parent": ids.get(&key(edge.parent())),
                "child": ids.get(&format!("node:{}", edge.node().name())),
                "name": edge.role(),
                "perm": perm.names(),
                "shared-perm": shared.names(),
            }));
        }
        json!({"nodes": nodes, "edges": edges})
    }

    fn object_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let args: ObjectAdd = parse(args)?;
        if args.qom_type != "throttle-group" {
            return Err(generic(format!(
                "Parameter 'qom-type' does not accept value '{}'",
                args.qom_type
            )));
        }
        let limits =
            ThrottleGroup::limits_from(args.limits.unwrap_or(json!({}))).map_err(generic)?;
        self.graph
            .add_throttle_group(&args.id, limits)
            .map_err(generic)?;
        Ok(json!({}))
    }
}

impl Dispatcher for Control {
    fn commands(&self) -> Vec<String> {
        COMMANDS.iter().map(|c| c.to_string()).collect()
    }

    fn execute(
        &self,
        command: &str,
        args: Map<String, Value>,
        fds: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        let empty = |args: Map<String, Value>| {
            parse::<Map<String, Value>>(args).and_then(|m| match m.keys().next() {
                Some(k) => Err(generic(format!("Parameter '{k}' is unexpected"))),
                None => Ok(()),
            })
        };
        match command {
            "query-version" => {
                empty(args)?;
                Ok(version())
            }
            "blockdev-add" => {
                let options = Options::from_json(Value::Object(args)).map_err(generic)?;
                self.run_transaction(vec![Action::Add(options)])?;
                Ok(json!({}))
            }
            "blockdev-del" => {
                let NodeName { node_name } = parse(args)?;
                self.run_transaction(vec![Action::Del(node_name)])?;
                Ok(json!({}))
            }
            "x-blockdev-replace" => {
                let r: Replace = parse(args)?;
                r.parent()?;
                self.run_transaction(vec![Action::Replace(r)])?;
                Ok(json!({}))
            }
            "transaction" => self.transaction(args),
            "query-named-block-nodes" => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Args {
                    /// Accepted for compatibility: blkgraph has no backing
                    /// chains to flatten.
                    #[serde(default, rename = "flat")]
                    _flat: Option<bool>,
                }
                parse::<Args>(args)?;
                Ok(Value::Array(
                    self.graph
                        .nodes()
                        .iter()
                        .map(|n| Self::node_info(n))
                        .collect(),
                ))
            }
            "x-debug-query-block-graph" => {
                empty(args)?;
                Ok(self.block_graph())
            }
            "block-export-add" => {
                let listener = listen_fd::for_export(&args, Source::Qmp(fds)).map_err(generic)?;
                let options = Options::from_json(Value::Object(args)).map_err(generic)?;
                self.exports.add(options, listener).map_err(generic)?;
                Ok(json!({}))
            }
            "block-export-del" => {
                let ExportDel { id, mode } = parse(args)?;
                let hard = match mode.as_deref() {
                    None | Some("safe") => false,
                    Some("hard") => true,
                    Some(other) => {
                        return Err(generic(format!(
                            "Parameter 'mode' does not accept value '{other}'"
                        )))
                    }
                };
                self.exports.delete(&id, hard).map_err(generic)?;
                Ok(json!({}))
            }
            "query-block-exports" => {
                empty(args)?;
                Ok(self.exports.query())
            }
            "nbd-server-start" => {
                let options = NbdServerOptions::from_qmp(args).map_err(generic)?;
                let listener =
                    listen_fd::for_nbd_server(&options.addr, Source::Qmp(fds)).map_err(generic)?;
                self.exports
                    .nbd_server_start(&options, listener)
                    .map_err(generic)?;
                Ok(json!({}))
            }
            "nbd-server-stop" => {
                empty(args)?;
                self.exports.nbd_server_stop().map_err(generic)?;
                Ok(json!({}))
            }
            "object-add" => self.object_add(args),
            "object-del" => {
                let ObjectDel { id } = parse(args)?;
                self.graph.remove_throttle_group(&id).map_err(generic)?;
                Ok(json!({}))
            }
            bitmap if bitmap.starts_with("block-dirty-bitmap-") => {
                let action = BitmapAction::parse(bitmap, args)
                    .unwrap_or_else(|| Err(QmpError::command_not_found(bitmap)))?;
                self.run_transaction(vec![Action::Bitmap(action)])?;
                Ok(json!({}))
            }
            "quit" => {
                empty(args)?;
                (self.quit)();
                Ok(json!({}))
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }
}

/// Forwards export events to the QMP clients.
pub fn event_sink(events: Events) -> crate::exports::EventSink {
    Box::new(move |name, data| events.emit(name, data))
}
