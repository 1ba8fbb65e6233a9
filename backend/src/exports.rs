//! The set of running exports: added and deleted at run time, quiesced
//! together around graph changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use blkgraph_graph::{Graph, Options};
use serde_json::{json, Value};

use crate::export::{self, Export};

/// Called with an event name and its data (BLOCK_EXPORT_DELETED, ...).
pub type EventSink = Box<dyn Fn(&str, Value) + Send + Sync>;

/// The running exports.
pub struct Exports {
    graph: Arc<Graph>,
    exports: Mutex<BTreeMap<String, Export>>,
    events: Mutex<Option<EventSink>>,
}

/// Exports quiesced until this is dropped.
pub struct Quiesced<'a> {
    exports: &'a Exports,
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        for e in self.exports.exports.lock().unwrap().values() {
            e.device.resume();
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
        }
    }

    /// Where events go from now on.
    pub fn set_event_sink(&self, sink: EventSink) {
        *self.events.lock().unwrap() = Some(sink);
    }

    /// Starts an export (`--export`, block-export-add).
    pub fn add(&self, options: Options) -> Result<(), String> {
        let mut exports = self.exports.lock().unwrap();
        let export = export::start(&self.graph, options)?;
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
        export
            .server
            .stop(hard)
            .map_err(|e| format!("export '{id}' is in use: {e}"))?;
        let export = exports.remove(id).expect("present");
        drop(exports);
        self.graph.detach_export(id).map_err(|e| e.to_string())?;
        if let Some(path) = &export.socket_path {
            let _ = std::fs::remove_file(path);
        }
        if let Some(sink) = self.events.lock().unwrap().as_ref() {
            sink("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        }
        Ok(())
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
            e.device.quiesce();
        }
        Quiesced { exports: self }
    }

    /// The socket paths to remove at exit.
    pub fn socket_paths(&self) -> Vec<std::path::PathBuf> {
        let exports = self.exports.lock().unwrap();
        exports
            .values()
            .filter_map(|e| e.socket_path.clone())
            .collect()
    }
}
