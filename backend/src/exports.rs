//! The set of running exports, of every type, added and deleted at run
//! time, and the NBD server their NBD exports are published on.

use std::collections::BTreeMap;
use std::sync::Arc;

use blkgraph_graph::{DrainParent, Graph, Options};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::export::{Export, ExportError};
use crate::iothreads::Iothreads;
use crate::listen_fd::ListenFd;
use crate::nbd::{NbdServer, NbdServerOptions};
use crate::stats::{Boundaries, IoStats};
use crate::vhost_user_blk;

/// An export's statistics.
pub struct ExportStats {
    /// The export id.
    pub id: String,
    /// Its type.
    pub kind: &'static str,
    /// The node it serves.
    pub node_name: String,
    /// Its request sources summed.
    pub stats: IoStats,
}

/// Called with an event name and its data (BLOCK_EXPORT_DELETED, ...).
pub type EventSink = Box<dyn Fn(&str, Value) + Send + Sync>;

/// A running export and the options it was started with.
struct Running {
    export: Arc<dyn Export>,
    /// `--export` / block-export-add options as given, for the state file.
    given: Options,
}

/// The running exports.
pub struct Exports {
    graph: Arc<Graph>,
    exports: Mutex<BTreeMap<String, Running>>,
    events: Mutex<Option<EventSink>>,
    /// The NBD server, while it runs. Lock order: `exports`, then `nbd`.
    nbd: Mutex<Option<Arc<NbdServer>>>,
    /// The iothread objects exports may name.
    iothreads: Iothreads,
}

impl Exports {
    /// No exports yet, on `graph`.
    pub fn new(graph: Arc<Graph>) -> Self {
        Exports {
            graph,
            exports: Mutex::new(BTreeMap::new()),
            events: Mutex::new(None),
            nbd: Mutex::new(None),
            iothreads: Iothreads::default(),
        }
    }

    /// The iothread objects.
    pub fn iothreads(&self) -> &Iothreads {
        &self.iothreads
    }

    /// Where events go from now on.
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.events.lock() = Some(sink);
    }

    /// Starts an export (`--export`, block-export-add); `listener` is the
    /// socket of an `fd` address, already taken and checked by
    /// [`crate::listen_fd`].
    pub fn add(&self, mut options: Options, listener: Option<ListenFd>) -> Result<(), ExportError> {
        let given = options.clone();
        let kind = match options.take("type") {
            Some(Value::String(t)) => t,
            Some(_) => {
                return Err(ExportError::InvalidOptions(
                    "Invalid parameter type for 'type', expected: string".into(),
                ))
            }
            None => {
                return Err(ExportError::InvalidOptions(
                    "Parameter 'type' is missing".into(),
                ))
            }
        };
        let mut exports = self.exports.lock();
        let id = match options.map.get("id") {
            Some(Value::String(id)) => id.clone(),
            _ => String::new(),
        };
        if exports.contains_key(&id) {
            return Err(ExportError::Conflict(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        self.take_iothread(&mut options, &kind)?;
        let export = self.start(kind, options, listener)?;
        exports.insert(export.id().to_string(), Running { export, given });
        Ok(())
    }

    /// Takes `iothread` and `fixed-iothread` from an export's options: the
    /// iothread's `poll-max-ns` becomes a vhost-user-blk export's polling
    /// time unless it sets `x-poll-us` (see [`crate::iothreads`]).
    fn take_iothread(&self, options: &mut Options, kind: &str) -> Result<(), ExportError> {
        match options.take("fixed-iothread") {
            None | Some(Value::Bool(_)) => {}
            Some(Value::String(s)) if matches!(s.as_str(), "on" | "off" | "true" | "false") => {}
            Some(_) => {
                return Err(ExportError::InvalidOptions(
                    "Invalid parameter type for 'fixed-iothread', expected: boolean".into(),
                ))
            }
        }
        let name = match options.take("iothread") {
            None => return Ok(()),
            Some(Value::String(name)) => name,
            Some(_) => {
                return Err(ExportError::InvalidOptions(
                    "Invalid parameter type for 'iothread', expected: string".into(),
                ))
            }
        };
        let props = self
            .iothreads
            .options(&name)
            .map_err(|e| ExportError::InvalidOptions(e.to_string()))?;
        if let (Some(ns), "vhost-user-blk") = (props.poll_max_ns, kind) {
            if !options.map.contains_key("x-poll-us") {
                options
                    .map
                    .insert("x-poll-us".into(), json!(ns.div_ceil(1000)));
            }
        }
        Ok(())
    }

    /// Starts an export of type `kind`.
    fn start(
        &self,
        kind: String,
        options: Options,
        listener: Option<ListenFd>,
    ) -> Result<Arc<dyn Export>, ExportError> {
        Ok(match kind.as_str() {
            "nbd" => {
                let server = self.nbd.lock().clone();
                let server =
                    server.ok_or_else(|| ExportError::Conflict("NBD server not running".into()))?;
                server.start_export(&self.graph, options)?
            }
            "vhost-user-blk" => vhost_user_blk::start_export(&self.graph, options, listener)?,
            other => {
                return Err(ExportError::InvalidOptions(format!(
                    "Parameter 'type' does not accept value '{other}'"
                )))
            }
        })
    }

    /// Deletes an export (block-export-del): drains it, stops it (`hard`
    /// disconnects a connected frontend or client; otherwise that is an
    /// error and nothing changes), detaches it from the graph and sends
    /// BLOCK_EXPORT_DELETED.
    pub fn delete(&self, id: &str, hard: bool) -> Result<(), ExportError> {
        let mut exports = self.exports.lock();
        let export = exports
            .get(id)
            .map(|r| r.export.clone())
            .ok_or_else(|| ExportError::NotFound(format!("Export '{id}' is not found")))?;
        stop_drained(&export, hard)?;
        exports.remove(id);
        drop(exports);
        self.finish_delete(&export)
    }

    /// Detaches a stopped export from the graph and announces it.
    fn finish_delete(&self, export: &Arc<dyn Export>) -> Result<(), ExportError> {
        self.graph.detach_export(export.id())?;
        if let Some(path) = export.socket_path() {
            let _ = std::fs::remove_file(path);
        }
        if let Some(sink) = self.events.lock().as_ref() {
            sink("BLOCK_EXPORT_DELETED", json!({ "id": export.id() }));
        }
        Ok(())
    }

    /// Starts the NBD server (`--nbd-server`, nbd-server-start); `listener`
    /// is the socket of an `fd` address (see [`NbdServer::start`]).
    pub fn nbd_server_start(
        &self,
        options: &NbdServerOptions,
        listener: Option<ListenFd>,
    ) -> Result<(), ExportError> {
        let mut nbd = self.nbd.lock();
        if nbd.is_some() {
            return Err(ExportError::Conflict("NBD server already running".into()));
        }
        let server = NbdServer::start(options, listener).map_err(ExportError::Setup)?;
        *nbd = Some(Arc::new(server));
        Ok(())
    }

    /// Stops the NBD server (nbd-server-stop): every NBD export is deleted
    /// (its clients disconnected, BLOCK_EXPORT_DELETED sent), then the
    /// server stops listening and drops the clients still negotiating.
    pub fn nbd_server_stop(&self) -> Result<(), ExportError> {
        let mut exports = self.exports.lock();
        let Some(server) = self.nbd.lock().take() else {
            return Err(ExportError::Conflict("NBD server not running".into()));
        };
        let ids: Vec<String> = exports
            .values()
            .map(|r| &r.export)
            .filter(|e| e.kind() == "nbd")
            .map(|e| e.id().to_string())
            .collect();
        let mut removed = Vec::new();
        for id in ids {
            if let Some(Running { export, .. }) = exports.remove(&id) {
                stop_drained(&export, true)?;
                removed.push(export);
            }
        }
        drop(exports);
        server.stop();
        let mut result = Ok(());
        for export in &removed {
            if let Err(e) = self.finish_delete(export) {
                result = Err(e);
            }
        }
        result
    }

    /// query-block-exports.
    pub fn query(&self) -> Value {
        let exports = self.exports.lock();
        Value::Array(
            exports
                .values()
                .map(|r| &r.export)
                .map(|e| {
                    json!({
                        "id": e.id(),
                        "type": e.kind(),
                        "node-name": e.node_name(),
                        "shutting-down": false,
                    })
                })
                .collect(),
        )
    }

    /// Tells every export that a node was resized.
    pub fn resized(&self) {
        let exports: Vec<_> = self
            .exports
            .lock()
            .values()
            .map(|r| r.export.clone())
            .collect();
        for export in exports {
            export.resized();
        }
    }

    /// Every export's id, type, node and statistics.
    pub fn stats(&self) -> Vec<ExportStats> {
        let exports = self.exports.lock();
        exports
            .values()
            .map(|r| &r.export)
            .map(|e| ExportStats {
                id: e.id().to_string(),
                kind: e.kind(),
                node_name: e.node_name(),
                stats: e.stats().sum(),
            })
            .collect()
    }

    /// Sets the latency histograms of export `id`.
    pub fn set_histograms(&self, id: &str, boundaries: Boundaries) -> Result<(), ExportError> {
        let exports = self.exports.lock();
        let export = exports
            .get(id)
            .ok_or_else(|| ExportError::NotFound(format!("Device '{id}' not found")))?;
        export.export.stats().set_histograms(boundaries);
        Ok(())
    }

    /// Every export's options as given, with the node it serves now (a
    /// filter may have been inserted over its root since): what starts it
    /// again, for the state file.
    pub fn saved(&self) -> Vec<Options> {
        let exports = self.exports.lock();
        exports
            .values()
            .map(|r| {
                let mut options = r.given.clone();
                options
                    .map
                    .insert("node-name".into(), Value::String(r.export.node_name()));
                options
            })
            .collect()
    }

    /// The socket paths to remove at exit.
    pub fn socket_paths(&self) -> Vec<std::path::PathBuf> {
        let exports = self.exports.lock();
        let mut paths: Vec<_> = exports
            .values()
            .filter_map(|r| r.export.socket_path().map(|p| p.to_path_buf()))
            .collect();
        if let Some(server) = self.nbd.lock().as_ref() {
            paths.extend(server.socket_path().cloned());
        }
        paths
    }
}

/// Stops an export in a drained section that never ends (the export goes)
/// unless the stop fails.
fn stop_drained(export: &Arc<dyn Export>, hard: bool) -> Result<(), ExportError> {
    let gate = export.gate();
    gate.drained_begin();
    export.stop(hard).inspect_err(|_| gate.drained_end())
}
