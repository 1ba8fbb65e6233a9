//! The QMP commands: what the control socket can do with the graph and
//! the exports. Each command's arguments are parsed first (into a
//! `Command`, see [`check_arguments`]), then the command runs.

mod args;
mod command;
mod jobs;
mod query;
mod transaction;

use std::sync::Arc;

use blkgraph_ctl::{Dispatcher, Events, NamedFds, QmpError};
use blkgraph_graph::{aio, Graph, Permission};
use serde_json::{json, Map, Value};

use crate::exports::Exports;
use crate::listen_fd::{self, Source};
use args::generic;
use command::Command;
pub use command::COMMANDS;
pub use query::SNAPSHOT_INFO_MEMBER;

/// Checks a command's arguments exactly as executing it does first, without
/// running it: what a QMP client's bytes can reach before anything happens
/// (the fuzzers drive this).
pub fn check_arguments(command: &str, args: Map<String, Value>) -> Result<(), QmpError> {
    Command::parse(command, args).map(|_| ())
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

    /// Runs a parsed command; `fds` are the connection's named descriptors.
    fn run(&self, command: Command, fds: &mut NamedFds) -> Result<Value, QmpError> {
        match command {
            Command::QueryVersion => return Ok(version()),
            Command::Transaction(actions) => transaction::run(&self.graph, actions)?,
            Command::Job(job) => return job.run(&self.graph),
            Command::QueryNamedBlockNodes => {
                return Ok(Value::Array(
                    self.graph
                        .nodes()
                        .iter()
                        .map(|n| query::node_info(n))
                        .collect(),
                ))
            }
            Command::QueryBlockGraph => return Ok(query::block_graph(&self.graph)),
            Command::ExportAdd(options) => {
                let listener =
                    listen_fd::for_export(&options.map, Source::Qmp(fds)).map_err(generic)?;
                self.exports.add(options, listener).map_err(generic)?;
            }
            Command::ExportDel { id, hard } => self.exports.delete(&id, hard).map_err(generic)?,
            Command::QueryBlockExports => return Ok(self.exports.query()),
            Command::NbdServerStart(options) => {
                let listener =
                    listen_fd::for_nbd_server(&options.addr, Source::Qmp(fds)).map_err(generic)?;
                self.exports
                    .nbd_server_start(&options, listener)
                    .map_err(generic)?;
            }
            Command::NbdServerStop => self.exports.nbd_server_stop().map_err(generic)?,
            Command::ObjectAdd { id, limits } => self
                .graph
                .add_throttle_group(&id, limits)
                .map_err(generic)?,
            Command::ObjectDel(id) => self.graph.remove_throttle_group(&id).map_err(generic)?,
            Command::BlockResize { node_name, size } => {
                resize(&self.graph, &node_name, size)?;
                self.exports.resized();
            }
            Command::Quit => (self.quit)(),
        }
        Ok(json!({}))
    }
}

impl Dispatcher for Control {
    fn commands(&self) -> Vec<String> {
        COMMANDS
            .iter()
            .chain(jobs::JOB_COMMANDS)
            .map(|c| c.to_string())
            .collect()
    }

    fn execute(
        &self,
        command: &str,
        args: Map<String, Value>,
        fds: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        let command = Command::parse(command, args)?;
        self.run(command, fds)
    }
}

/// The graph export id under which block_resize holds its node; not an
/// identifier, so no export can have it.
const RESIZE_PARENT: &str = "#block_resize";

/// block_resize: resizes a node through a temporary parent that takes the
/// resize permission (refused if another parent does not share it).
fn resize(graph: &Graph, node_name: &str, size: u64) -> Result<(), QmpError> {
    let gate = crate::export::PauseGate::new();
    let edge = graph
        .attach_export(
            RESIZE_PARENT,
            node_name,
            Permission::RESIZE,
            Permission::ALL,
            gate,
        )
        .map_err(generic)?;
    let node = edge.node();
    let result = aio::block_on(node.resize(size));
    drop(node);
    drop(edge);
    if let Err(e) = graph.detach_export(RESIZE_PARENT) {
        log::error!("block_resize: cannot detach its parent: {e}");
    }
    result.and_then(|r| r).map_err(generic)
}

/// Forwards export events to the QMP clients.
pub fn event_sink(events: Events) -> crate::exports::EventSink {
    Box::new(move |name, data| events.emit(name, data))
}
