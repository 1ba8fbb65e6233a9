//! The QMP commands: what the control socket can do with the graph and
//! the exports. Every command is an entry of the command table (`table`),
//! from which dispatch, `query-commands`, `query-qmp-schema` and the
//! `transaction` actions come; the handlers are grouped by area: nodes
//! (`graph`), exports, objects, dirty bitmaps, jobs, transactions and
//! queries.

mod args;
mod bitmaps;
mod exports;
mod graph;
mod jobs;
mod objects;
mod qapi;
mod queries;
mod schema;
mod table;
mod transaction;

use std::sync::Arc;

use blkgraph_ctl::{Dispatcher, Events, NamedFds, QmpError};
use blkgraph_graph::Graph;
use serde_json::{json, Map, Value};

use crate::exports::Exports;
use crate::state_file::StateFile;
pub use objects::OBJECT_TYPES;
pub(crate) use objects::{create as create_object, parse_object};
pub use queries::SNAPSHOT_INFO_MEMBER;

/// Checks a command's arguments exactly as executing it does first, without
/// running it: what a QMP client's bytes can reach before anything happens
/// (the fuzzers drive this).
pub fn check_arguments(command: &str, args: Map<String, Value>) -> Result<(), QmpError> {
    match table::find(command) {
        Some(entry) if !entry.is_protocol() => entry.check(args),
        _ => Err(QmpError::command_not_found(command)),
    }
}

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
    /// `--state-file`: written after every command that changed something.
    state: Option<Arc<StateFile>>,
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
            state: None,
        }
    }

    /// Writes `state` after every command that succeeds and changes the
    /// daemon's state, before the command's reply.
    pub(crate) fn with_state_file(mut self, state: Arc<StateFile>) -> Self {
        self.state = Some(state);
        self
    }
}

/// Whether a command changes the daemon's state (and is logged).
fn changes_state(command: &str) -> bool {
    !command.starts_with("query-") && !command.starts_with("x-debug-query-")
}

impl Dispatcher for Control {
    fn commands(&self) -> Vec<String> {
        table::TABLE
            .iter()
            .filter(|e| !e.is_protocol())
            .map(|e| e.name().to_string())
            .collect()
    }

    fn execute(
        &self,
        command: &str,
        args: Map<String, Value>,
        fds: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        let entry = match table::find(command) {
            Some(entry) if !entry.is_protocol() => entry,
            _ => return Err(QmpError::command_not_found(command)),
        };
        if !changes_state(command) {
            return entry.execute(self, args, fds);
        }
        // Who: the QMP client's thread, whose connection is logged with
        // the peer's pid and uid.
        let thread = std::thread::current();
        let who = thread.name().unwrap_or("qmp");
        let given = args.clone();
        let result = entry.execute(self, args, fds);
        if let (Ok(_), Some(state)) = (&result, &self.state) {
            // The change is made: a state file that cannot be written is
            // the operator's to fix, not the command's failure.
            if let Err(e) = state.committed(command, &given, &self.graph, &self.exports) {
                log::error!("{e}: the change is not kept across a restart");
            }
        }
        let what = Value::Object(given);
        match &result {
            Ok(_) => log::info!("{who}: {command} {what}: ok"),
            Err(e) => log::info!("{who}: {command} {what}: {e}"),
        }
        result
    }
}

/// Forwards export events to the QMP clients.
pub fn event_sink(events: Events) -> crate::exports::EventSink {
    Box::new(move |name, data| events.emit(name, data))
}
