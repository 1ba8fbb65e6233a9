//! The set of running exports: added and deleted at run time, quiesced
//! together around graph changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use blkgraph_graph::{Graph, Options};
use serde_json::{json, Value};

use crate::export::{self, Backend, Export};
use crate::nbd::{NbdServer, NbdServerOptions};

/// Called with an event name and its data (BLOCK_EXPORT_DELETED, ...).
pub type EventSink = Box<dyn Fn(&str, Value) + Send + Sync>;

/// The running exports.
pub struct Exports {
    graph: Arc<Graph>,
    exports: Mutex<BTreeMap<String, Export>>,
    events: Mutex<Option<EventSink>>,
    /// The NBD server, while it runs. Lock order: `exports`, then `nbd`.
    nbd: Mutex<Option<Arc<NbdServer>>>,
}

/// Exports quiesced until this is dropped.
pub struct Quiesced<'a> {
    exports: &'a Exports,
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        for e in self.exports.exports.lock().unwrap().values() {
            e.resume();
        }
    }
}

impl Exports {
    /// No exports yet, on `graph`.
    pub fn new(graph: Arc<Graph>) -> Self {
        Exports {
            graph,
            exports: Mutex::new(BTreeMap::new()),
            events: Mutex::new(None),
            nbd: Mutex::new(None),
        }
    }

    /// Where events go from now on.
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.events.lock().unwrap() = Some(sink);
    }

    /// Starts an export (`--export`, block-export-add).
    pub fn add(&self, options: Options) -> Result<(), String> {
        let mut exports = self.exports.lock().unwrap();
        if let Some(serde_json::Value::String(id)) = options.map.get("id") {
            if exports.contains_key(id) {
                return Err(format!("Block export id '{id}' is already in use"));
            }
        }
        let nbd = self.nbd.lock().unwrap().clone();
        let export = export::start(&self.graph, options, nbd.as_deref())?;
        exports.insert(export.id.clone(), export);
        Ok(())
    }

    /// Deletes an export (block-export-del). `hard` disconnects a connected
    /// frontend; otherwise that is an error. Sends BLOCK_EXPORT_DELETED.
    pub fn delete(&self, id: &str, hard: bool) -> Result<(), String> {
        let mut exports = self.exports.lock().unwrap();
        let export = exports
            .get_mut(id)
            .ok_or_else(|| format!("Export '{id}' is not found"))?;
        export.stop(hard)?;
        let export = exports.remove(id).expect("present");
        if let Backend::Nbd(e) = &export.backend {
            if let Some(server) = self.nbd.lock().unwrap().as_ref() {
                server.remove_export(e);
            }
        }
        drop(exports);
        self.finish_delete(&export)
    }

    /// Detaches a stopped export from the graph and announces it.
    fn finish_delete(&self, export: &Export) -> Result<(), String> {
        self.graph
            .detach_export(&export.id)
            .map_err(|e| e.to_string())?;
        if let Some(path) = &export.socket_path {
            let _ = std::fs::remove_file(path);
        }
        if let Some(sink) = self.events.lock().unwrap().as_ref() {
            sink("BLOCK_EXPORT_DELETED", json!({ "id": export.id }));
        }
        Ok(())
    }

    /// Starts the NBD server (`--nbd-server`, nbd-server-start).
    pub fn nbd_server_start(&self, options: &NbdServerOptions) -> Result<(), String> {
        let mut nbd = self.nbd.lock().unwrap();
        if nbd.is_some() {
            return Err("NBD server already running".into());
        }
        *nbd = Some(Arc::new(NbdServer::start(options)?));
        Ok(())
    }

    /// Stops the NBD server (nbd-server-stop): every NBD export is deleted
    /// (its clients disconnected, BLOCK_EXPORT_DELETED sent), then the
    /// server stops listening and drops the clients still negotiating.
    pub fn nbd_server_stop(&self) -> Result<(), String> {
        let mut exports = self.exports.lock().unwrap();
        let Some(server) = self.nbd.lock().unwrap().take() else {
            return Err("NBD server not running".into());
        };
        let ids: Vec<String> = exports
            .values()
            .filter(|e| matches!(e.backend, Backend::Nbd(_)))
            .map(|e| e.id.clone())
            .collect();
        let mut removed = Vec::new();
        for id in ids {
            let mut export = exports.remove(&id).expect("present");
            export.stop(true)?;
            if let Backend::Nbd(e) = &export.backend {
                server.remove_export(e);
            }
            removed.push(export);
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
        let exports = self.exports.lock().unwrap();
        Value::Array(
            exports
                .values()
                .map(|e| {
                    json!({
                        "id": e.id,
                        "type": e.kind,
                        "node-name": e.node_name(),
                        "shutting-down": false,
                    })
                })
                .collect(),
        )
    }

    /// Stops every export from taking new requests and waits for those in
    /// flight, until the returned guard is dropped.
    pub fn quiesce(&self) -> Quiesced<'_> {
        for e in self.exports.lock().unwrap().values() {
            e.quiesce();
        }
        Quiesced { exports: self }
    }

    /// The socket paths to remove at exit.
    pub fn socket_paths(&self) -> Vec<std::path::PathBuf> {
        let exports = self.exports.lock().unwrap();
        let mut paths: Vec<_> = exports
            .values()
            .filter_map(|e| e.socket_path.clone())
            .collect();
        if let Some(server) = self.nbd.lock().unwrap().as_ref() {
            paths.extend(server.socket_path().cloned());
        }
        paths
    }
}
