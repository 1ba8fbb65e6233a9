//! The QMP commands blkgraph has, and the parsing of each one's
//! arguments into a [`Command`]: checked before anything happens, with no
//! effect on the daemon.

use blkgraph_ctl::QmpError;
use blkgraph_graph::{Options, ThrottleGroup, ThrottleLimits};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::{generic, no_arguments, parse, NodeName};
use super::jobs::{parse_backup, JobCommand};
use super::transaction::{
    parse_snapshot, parse_snapshot_sync, parse_transaction, Action, Actions, BitmapAction, Replace,
};
use crate::nbd::NbdServerOptions;

/// The commands, in query-commands order.
pub const COMMANDS: &[&str] = &[
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
    "block_resize",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "quit",
];

/// A command with checked arguments.
pub(crate) enum Command {
    /// query-version.
    QueryVersion,
    /// transaction, and the commands that are a transaction of one action
    /// (blockdev-add, blockdev-del, x-blockdev-replace, the bitmap ones,
    /// blockdev-backup, blockdev-snapshot and blockdev-snapshot-sync).
    Transaction(Actions),
    /// A job command.
    Job(JobCommand),
    /// query-named-block-nodes.
    QueryNamedBlockNodes,
    /// x-debug-query-block-graph.
    QueryBlockGraph,
    /// block-export-add (its type-specific options are checked as it
    /// starts).
    ExportAdd(Options),
    /// block-export-del.
    ExportDel {
        /// The export id.
        id: String,
        /// `mode: hard`.
        hard: bool,
    },
    /// query-block-exports.
    QueryBlockExports,
    /// nbd-server-start.
    NbdServerStart(NbdServerOptions),
    /// nbd-server-stop.
    NbdServerStop,
    /// object-add of a throttle group.
    ObjectAdd {
        /// The object id.
        id: String,
        /// The group's limits.
        limits: ThrottleLimits,
    },
    /// object-del.
    ObjectDel(String),
    /// block_resize.
    BlockResize {
        /// The node to resize.
        node_name: String,
        /// Its new size in bytes.
        size: u64,
    },
    /// quit.
    Quit,
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
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockResize {
    /// A BlockBackend name in QEMU; blkgraph has none.
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    size: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectDel {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryNodesArgs {
    /// Accepted for compatibility: blkgraph has no backing chains to
    /// flatten.
    #[serde(default, rename = "flat")]
    _flat: Option<bool>,
}

impl Command {
    /// Parses the arguments of `command`: `CommandNotFound` for a command
    /// blkgraph does not have, a GenericError naming the key for bad
    /// arguments.
    pub(crate) fn parse(command: &str, args: Map<String, Value>) -> Result<Command, QmpError> {
        Ok(match command {
            "query-version" => {
                no_arguments(args)?;
                Command::QueryVersion
            }
            "blockdev-add" => Command::Transaction(Actions::one(Action::Add(
                Options::from_json(Value::Object(args)).map_err(generic)?,
            ))),
            "blockdev-del" => {
                let NodeName { node_name } = parse(args)?;
                Command::Transaction(Actions::one(Action::Del(node_name)))
            }
            "x-blockdev-replace" => {
                let r: Replace = parse(args)?;
                r.parent()?;
                Command::Transaction(Actions::one(Action::Replace(r)))
            }
            "transaction" => Command::Transaction(parse_transaction(args)?),
            "query-named-block-nodes" => {
                parse::<QueryNodesArgs>(args)?;
                Command::QueryNamedBlockNodes
            }
            "x-debug-query-block-graph" => {
                no_arguments(args)?;
                Command::QueryBlockGraph
            }
            "block-export-add" => {
                Command::ExportAdd(Options::from_json(Value::Object(args)).map_err(generic)?)
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
                Command::ExportDel { id, hard }
            }
            "query-block-exports" => {
                no_arguments(args)?;
                Command::QueryBlockExports
            }
            "nbd-server-start" => {
                Command::NbdServerStart(NbdServerOptions::from_qmp(args).map_err(generic)?)
            }
            "nbd-server-stop" => {
                no_arguments(args)?;
                Command::NbdServerStop
            }
            "object-add" => {
                let args: ObjectAdd = parse(args)?;
                if args.qom_type != "throttle-group" {
                    return Err(generic(format!(
                        "Parameter 'qom-type' does not accept value '{}'",
                        args.qom_type
                    )));
                }
                let limits = ThrottleGroup::limits_from(args.limits.unwrap_or(json!({})))
                    .map_err(generic)?;
                Command::ObjectAdd {
                    id: args.id,
                    limits,
                }
            }
            "object-del" => {
                let ObjectDel { id } = parse(args)?;
                Command::ObjectDel(id)
            }
            "block_resize" => {
                let a: BlockResize = parse(args)?;
                let node_name = match (a.device, a.node_name) {
                    (None, Some(node)) => node,
                    (Some(device), None) => {
                        return Err(generic(format!(
                            "Cannot find device='{device}' nor node-name=''"
                        )))
                    }
                    (device, node) => {
                        return Err(generic(format!(
                            "Cannot find device='{}' nor node-name='{}'",
                            device.unwrap_or_default(),
                            node.unwrap_or_default()
                        )))
                    }
                };
                let size = u64::try_from(a.size)
                    .map_err(|_| generic("Parameter 'size' expects a >0 size"))?;
                Command::BlockResize { node_name, size }
            }
            bitmap if bitmap.starts_with("block-dirty-bitmap-") => {
                let action = BitmapAction::parse(bitmap, args)
                    .unwrap_or_else(|| Err(QmpError::command_not_found(bitmap)))?;
                Command::Transaction(Actions::one(Action::Bitmap(action)))
            }
            "quit" => {
                no_arguments(args)?;
                Command::Quit
            }
            "blockdev-backup" => {
                Command::Transaction(Actions::one(Action::Backup(parse_backup(args)?)))
            }
            "blockdev-snapshot" => Command::Transaction(Actions::one(parse_snapshot(args)?)),
            "blockdev-snapshot-sync" => {
                Command::Transaction(Actions::one(parse_snapshot_sync(args)?))
            }
            other => match JobCommand::parse(other, args) {
                Some(job) => Command::Job(job?),
                None => return Err(QmpError::command_not_found(other)),
            },
        })
    }
}
