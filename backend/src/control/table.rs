//! The command table: every QMP command blkgraph has, with its argument
//! type, its return type, how its arguments are parsed, what runs it,
//! whether it runs in a drained graph and whether it is a transaction
//! action. Dispatch, `query-commands`, `query-qmp-schema` and the
//! `transaction` command's actions all come from here: adding a command is
//! one entry.

use blkgraph_ctl::{NamedFds, QmpError};
use serde_json::{Map, Value};

use super::args::{no_arguments, parse};
use super::bitmaps::{self, BitmapAction, BitmapName};
use super::qapi;
use super::schema::{CommandShape, Object, Ty, EMPTY};
use super::transaction::{Action, Actions, Step};
use super::{exports, graph, jobs, objects, queries, transaction, Control};

/// What runs a command.
pub(super) enum Handler<A> {
    /// Runs on the daemon and returns the command's value.
    Run(fn(&Control, A, &mut NamedFds) -> Result<Value, QmpError>),
    /// A transaction action: the command is a transaction of this action
    /// alone, and `transaction` takes it as an action.
    Action(fn(A) -> Action),
    /// Answered by the QMP session itself (capabilities, `query-commands`,
    /// descriptors): listed for introspection, never dispatched.
    Protocol,
}

/// One command: `A` is its parsed arguments.
pub(super) struct Def<A: 'static> {
    /// The command name.
    pub(super) name: &'static str,
    /// Its argument type.
    pub(super) args: &'static Object,
    /// Its return type.
    pub(super) returns: Ty,
    /// Whether it runs in a drained graph: no request runs while it does.
    pub(super) drains: bool,
    /// Checks and converts the arguments, before anything happens.
    pub(super) parse: fn(Map<String, Value>) -> Result<A, QmpError>,
    /// What runs it.
    pub(super) handler: Handler<A>,
}

impl<A: 'static> Def<A> {
    /// A command that runs on the daemon.
    const fn run(
        name: &'static str,
        args: &'static Object,
        returns: Ty,
        parse: fn(Map<String, Value>) -> Result<A, QmpError>,
        run: fn(&Control, A, &mut NamedFds) -> Result<Value, QmpError>,
    ) -> Self {
        Def {
            name,
            args,
            returns,
            drains: false,
            parse,
            handler: Handler::Run(run),
        }
    }

    /// A transaction action (returning nothing), drained if `drains`.
    const fn action(
        name: &'static str,
        args: &'static Object,
        drains: bool,
        parse: fn(Map<String, Value>) -> Result<A, QmpError>,
        action: fn(A) -> Action,
    ) -> Self {
        Def {
            name,
            args,
            returns: NOTHING,
            drains,
            parse,
            handler: Handler::Action(action),
        }
    }
}

impl Def<()> {
    /// A command the QMP session answers.
    const fn protocol(name: &'static str, args: &'static Object, returns: Ty) -> Self {
        Def {
            name,
            args,
            returns,
            drains: false,
            parse: none,
            handler: Handler::Protocol,
        }
    }
}

/// A table entry, whatever its argument type.
pub(super) trait Entry: Sync {
    /// The command name.
    fn name(&self) -> &'static str;
    /// Its types, for introspection.
    fn shape(&self) -> CommandShape;
    /// Whether `transaction` takes it as an action.
    fn is_action(&self) -> bool;
    /// Whether the QMP session answers it.
    fn is_protocol(&self) -> bool;
    /// Parses the arguments without running anything.
    fn check(&self, args: Map<String, Value>) -> Result<(), QmpError>;
    /// Parses the arguments of a transaction action (`None`: not one).
    fn step(&self, args: Map<String, Value>) -> Option<Result<Step, QmpError>>;
    /// Parses the arguments and runs the command.
    fn execute(
        &self,
        control: &Control,
        args: Map<String, Value>,
        fds: &mut NamedFds,
    ) -> Result<Value, QmpError>;
}

impl<A: 'static> Entry for Def<A> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn shape(&self) -> CommandShape {
        CommandShape {
            name: self.name,
            args: self.args,
            returns: self.returns,
        }
    }

    fn is_action(&self) -> bool {
        matches!(self.handler, Handler::Action(_))
    }

    fn is_protocol(&self) -> bool {
        matches!(self.handler, Handler::Protocol)
    }

    fn check(&self, args: Map<String, Value>) -> Result<(), QmpError> {
        (self.parse)(args).map(drop)
    }

    fn step(&self, args: Map<String, Value>) -> Option<Result<Step, QmpError>> {
        let Handler::Action(action) = self.handler else {
            return None;
        };
        Some((self.parse)(args).map(|a| Step {
            kind: self.name,
            action: action(a),
            drains: self.drains,
        }))
    }

    fn execute(
        &self,
        control: &Control,
        args: Map<String, Value>,
        fds: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        let args = (self.parse)(args)?;
        match self.handler {
            Handler::Run(run) if self.drains => {
                let _drained = control.graph.drained();
                run(control, args, fds)
            }
            Handler::Run(run) => run(control, args, fds),
            Handler::Action(action) => {
                let step = Step {
                    kind: self.name,
                    action: action(args),
                    drains: self.drains,
                };
                transaction::run(&control.graph, Actions::one(step))
                    .map(|()| Value::Object(Map::new()))
            }
            Handler::Protocol => Err(QmpError::command_not_found(self.name)),
        }
    }
}

/// A command without arguments.
fn none(args: Map<String, Value>) -> Result<(), QmpError> {
    no_arguments(args)
}

const NOTHING: Ty = Ty::Object(&EMPTY);

/// Every command, in `query-commands` order.
pub(super) static TABLE: &[&dyn Entry] = &[
    // The QMP session's own commands.
    &Def::protocol("qmp_capabilities", &qapi::QMP_CAPABILITIES_ARGS, NOTHING),
    &Def::protocol("query-commands", &EMPTY, qapi::COMMAND_INFO_LIST),
    &Def::protocol("getfd", &qapi::FDNAME_ARGS, NOTHING),
    &Def::protocol("closefd", &qapi::FDNAME_ARGS, NOTHING),
    // Queries.
    &Def::run("query-version", &EMPTY, qapi::VERSION, none, |_, (), _| {
        Ok(super::version())
    }),
    &Def::run(
        "query-qmp-schema",
        &EMPTY,
        qapi::SCHEMA_INFO_LIST,
        none,
        |_, (), _| Ok(queries::schema()),
    ),
    &Def::run(
        "query-named-block-nodes",
        &qapi::QUERY_NODES_ARGS,
        qapi::BLOCK_DEVICE_INFO_LIST,
        parse::<queries::QueryNodesArgs>,
        queries::named_block_nodes,
    ),
    &Def::run(
        "x-debug-query-block-graph",
        &EMPTY,
        qapi::BLOCK_GRAPH_INFO,
        none,
        |c, (), _| Ok(queries::block_graph(&c.graph)),
    ),
    &Def::run(
        "query-blockstats",
        &qapi::QUERY_BLOCKSTATS_ARGS,
        qapi::BLOCK_STATS_LIST,
        parse::<queries::QueryBlockstatsArgs>,
        queries::blockstats,
    ),
    &Def::run(
        "block-latency-histogram-set",
        &qapi::HISTOGRAM_SET_ARGS,
        NOTHING,
        parse::<queries::HistogramSetArgs>,
        queries::latency_histogram_set,
    ),
    // Nodes.
    &Def::action(
        "blockdev-add",
        &qapi::BLOCKDEV_OPTIONS,
        false,
        graph::parse_blockdev_options,
        Action::Add,
    ),
    &Def::action(
        "blockdev-del",
        &qapi::NODE_NAME_ARGS,
        true,
        graph::parse_node_name,
        Action::Del,
    ),
    &Def::run(
        "blockdev-reopen",
        &qapi::REOPEN_ARGS,
        NOTHING,
        graph::parse_reopen,
        graph::reopen,
    ),
    &Def::action(
        "x-blockdev-replace",
        &qapi::REPLACE_ARGS,
        true,
        graph::parse_replace,
        Action::Replace,
    ),
    &Def::action(
        "blockdev-snapshot",
        &qapi::BLOCKDEV_SNAPSHOT_ARGS,
        true,
        parse::<transaction::Snapshot>,
        Action::Snapshot,
    ),
    &Def::action(
        "blockdev-snapshot-sync",
        &qapi::BLOCKDEV_SNAPSHOT_SYNC_ARGS,
        true,
        transaction::parse_snapshot_sync,
        Action::SnapshotSync,
    ),
    &Def::run(
        "transaction",
        &qapi::TRANSACTION_ARGS,
        NOTHING,
        transaction::parse,
        |c, steps, _| transaction::run(&c.graph, steps).map(|()| Value::Object(Map::new())),
    ),
    &Def::run(
        "block_resize",
        &qapi::BLOCK_RESIZE_ARGS,
        NOTHING,
        graph::parse_block_resize,
        graph::block_resize,
    ),
    &Def::run(
        "block-set-write-threshold",
        &qapi::WRITE_THRESHOLD_ARGS,
        NOTHING,
        parse::<graph::WriteThresholdArgs>,
        graph::set_write_threshold,
    ),
    // Exports.
    &Def::run(
        "block-export-add",
        &qapi::EXPORT_OPTIONS,
        NOTHING,
        exports::parse_export_options,
        exports::add,
    ),
    &Def::run(
        "block-export-del",
        &qapi::EXPORT_DEL_ARGS,
        NOTHING,
        exports::parse_del,
        exports::del,
    ),
    &Def::run(
        "query-block-exports",
        &EMPTY,
        qapi::EXPORT_INFO_LIST,
        none,
        |c, (), _| Ok(c.exports.query()),
    ),
    &Def::run(
        "nbd-server-start",
        &qapi::NBD_SERVER_START_ARGS,
        NOTHING,
        exports::parse_nbd_server_start,
        exports::nbd_server_start,
    ),
    &Def::run(
        "nbd-server-stop",
        &EMPTY,
        NOTHING,
        none,
        exports::nbd_server_stop,
    ),
    &Def::run(
        "nbd-server-add",
        &qapi::NBD_SERVER_ADD_ARGS,
        NOTHING,
        parse::<exports::NbdServerAdd>,
        exports::nbd_server_add,
    ),
    &Def::run(
        "nbd-server-remove",
        &qapi::NBD_SERVER_REMOVE_ARGS,
        NOTHING,
        exports::parse_nbd_server_remove,
        exports::del,
    ),
    // Objects.
    &Def::run(
        "object-add",
        &qapi::OBJECT_OPTIONS,
        NOTHING,
        objects::parse,
        objects::add,
    ),
    &Def::run(
        "object-del",
        &qapi::OBJECT_DEL_ARGS,
        NOTHING,
        parse::<objects::ObjectDel>,
        objects::del,
    ),
    // Dirty bitmaps.
    &Def::action(
        "block-dirty-bitmap-add",
        &qapi::BITMAP_ADD_ARGS,
        false,
        parse::<bitmaps::BitmapAdd>,
        |a| Action::Bitmap(BitmapAction::Add(a)),
    ),
    &Def::action(
        "block-dirty-bitmap-remove",
        &qapi::BLOCK_DIRTY_BITMAP,
        true,
        parse::<BitmapName>,
        |b| Action::Bitmap(BitmapAction::Remove(b)),
    ),
    &Def::action(
        "block-dirty-bitmap-clear",
        &qapi::BLOCK_DIRTY_BITMAP,
        true,
        parse::<BitmapName>,
        |b| Action::Bitmap(BitmapAction::Clear(b)),
    ),
    &Def::action(
        "block-dirty-bitmap-enable",
        &qapi::BLOCK_DIRTY_BITMAP,
        true,
        parse::<BitmapName>,
        |b| Action::Bitmap(BitmapAction::Enable(b)),
    ),
    &Def::action(
        "block-dirty-bitmap-disable",
        &qapi::BLOCK_DIRTY_BITMAP,
        true,
        parse::<BitmapName>,
        |b| Action::Bitmap(BitmapAction::Disable(b)),
    ),
    &Def::action(
        "block-dirty-bitmap-merge",
        &qapi::BITMAP_MERGE_ARGS,
        true,
        parse::<bitmaps::BitmapMerge>,
        |m| Action::Bitmap(BitmapAction::Merge(m)),
    ),
    // Jobs.
    &Def::run(
        "query-jobs",
        &EMPTY,
        qapi::JOB_INFO_LIST,
        none,
        jobs::query_jobs,
    ),
    &Def::run(
        "query-block-jobs",
        &EMPTY,
        qapi::BLOCK_JOB_INFO_LIST,
        none,
        jobs::query_block_jobs,
    ),
    &Def::run(
        "job-pause",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_job,
        |c, j, _| jobs::verb(c, j, |job| job.pause()),
    ),
    &Def::run(
        "job-resume",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_job,
        |c, j, _| jobs::verb(c, j, |job| job.resume()),
    ),
    &Def::run(
        "job-cancel",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_job_cancel,
        jobs::cancel,
    ),
    &Def::run(
        "job-complete",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_job,
        |c, j, _| jobs::verb(c, j, |job| job.complete()),
    ),
    &Def::run(
        "job-finalize",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_job,
        |c, j, _| jobs::verb(c, j, |job| job.finalize()),
    ),
    &Def::run(
        "job-dismiss",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_job,
        |c, j, _| jobs::verb(c, j, |job| job.dismiss()),
    ),
    &Def::run(
        "block-job-pause",
        &qapi::BLOCK_JOB_ARGS,
        NOTHING,
        jobs::parse_block_job,
        |c, j, _| jobs::verb(c, j, |job| job.pause()),
    ),
    &Def::run(
        "block-job-resume",
        &qapi::BLOCK_JOB_ARGS,
        NOTHING,
        jobs::parse_block_job,
        |c, j, _| jobs::verb(c, j, |job| job.resume()),
    ),
    &Def::run(
        "block-job-cancel",
        &qapi::BLOCK_JOB_CANCEL_ARGS,
        NOTHING,
        jobs::parse_block_job_cancel,
        jobs::cancel,
    ),
    &Def::run(
        "block-job-complete",
        &qapi::BLOCK_JOB_ARGS,
        NOTHING,
        jobs::parse_block_job,
        |c, j, _| jobs::verb(c, j, |job| job.complete()),
    ),
    &Def::run(
        "block-job-finalize",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_block_job_id,
        |c, j, _| jobs::verb(c, j, |job| job.finalize()),
    ),
    &Def::run(
        "block-job-dismiss",
        &qapi::JOB_ID_ARGS,
        NOTHING,
        jobs::parse_block_job_id,
        |c, j, _| jobs::verb(c, j, |job| job.dismiss()),
    ),
    &Def::run(
        "block-job-set-speed",
        &qapi::BLOCK_JOB_SET_SPEED_ARGS,
        NOTHING,
        jobs::parse_set_speed,
        jobs::set_speed,
    ),
    &Def::run(
        "blockdev-mirror",
        &qapi::BLOCKDEV_MIRROR_ARGS,
        NOTHING,
        jobs::parse_mirror,
        jobs::mirror,
    ),
    &Def::run(
        "block-stream",
        &qapi::BLOCK_STREAM_ARGS,
        NOTHING,
        jobs::parse_stream,
        jobs::stream,
    ),
    &Def::run(
        "block-commit",
        &qapi::BLOCK_COMMIT_ARGS,
        NOTHING,
        jobs::parse_commit,
        jobs::commit,
    ),
    &Def::run(
        "blockdev-create",
        &qapi::BLOCKDEV_CREATE_ARGS,
        NOTHING,
        jobs::parse_create,
        jobs::create,
    ),
    &Def::action(
        "blockdev-backup",
        &qapi::BLOCKDEV_BACKUP_ARGS,
        true,
        jobs::parse_backup,
        Action::Backup,
    ),
    &Def::run("quit", &EMPTY, NOTHING, none, |c, (), _| {
        (c.quit)();
        Ok(Value::Object(Map::new()))
    }),
];

/// The entry of `name`.
pub(super) fn find(name: &str) -> Option<&'static dyn Entry> {
    TABLE.iter().copied().find(|e| e.name() == name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn names_are_unique_and_the_schema_lists_every_command() {
        let names: BTreeSet<&str> = TABLE.iter().map(|e| e.name()).collect();
        assert_eq!(names.len(), TABLE.len(), "a command is in the table twice");
        let schema = queries::schema();
        let commands: BTreeSet<&str> = schema
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["meta-type"] == "command")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(commands, names);
    }

    #[test]
    fn every_driver_of_the_driver_table_has_its_options() {
        for d in blkgraph_graph::drivers::DRIVERS {
            assert!(qapi::driver_options(d.name).is_some(), "{}", d.name);
        }
    }

    #[test]
    fn protocol_commands_are_not_dispatched() {
        for name in ["qmp_capabilities", "query-commands", "getfd", "closefd"] {
            let e = find(name).unwrap();
            assert!(e.is_protocol());
            assert_eq!(
                super::super::check_arguments(name, Map::new()).unwrap_err(),
                QmpError::command_not_found(name)
            );
        }
        assert!(find("blockdev-add").unwrap().is_action());
        assert!(find("transaction").unwrap().step(Map::new()).is_none());
    }
}
