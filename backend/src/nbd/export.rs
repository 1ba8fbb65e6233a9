//! An NBD export: a named view of a graph node that NBD clients select
//! during the handshake, with its clients (the request sources of its
//! pause gate), and the table of exports a server publishes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};

use blkgraph_graph::options::Syntax;
use blkgraph_graph::{Child, Node, Options};
use parking_lot::{Condvar, Mutex};
use serde::Deserialize;
use serde_json::Value;

use super::bitmap::{BitmapRef, BitmapSource};
use super::client::Client;
use super::proto;
use crate::export::{Export, ExportError, PauseGate, Source};
use crate::stats::{SourceStats, Sources};

/// block-export-add options of an export of type `nbd` (QAPI's
/// BlockExportOptions with BlockExportOptionsNbd), `type` removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdExportOptions {
    /// The export id.
    pub id: String,
    /// The exported node.
    pub node_name: String,
    /// The name clients ask for (default: the node-name).
    pub name: String,
    /// A description for NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Whether every write is made stable before it completes.
    pub writethrough: bool,
    /// Dirty bitmaps published as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<BitmapRef>,
    /// Whether `qemu:allocation-depth` is published.
    pub allocation_depth: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOptions {
    id: String,
    node_name: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    writable: bool,
    #[serde(default)]
    writethrough: bool,
    #[serde(default)]
    allocation_depth: bool,
    /// Accepted for compatibility: NBD exports never need an active image
    /// in blkgraph, which has no inactive images.
    #[serde(default, rename = "allow-inactive")]
    _allow_inactive: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExternalBitmap {
    node: String,
    name: String,
}

/// A list in JSON, or `{"0": .., "1": ..}` from `bitmaps.0=..` in key=value form.
fn list(value: Value, syntax: Syntax, key: &str) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(items) => Ok(items),
        Value::Object(map) if syntax == Syntax::Keyval => {
            let mut items: Vec<(usize, Value)> = Vec::new();
            for (k, v) in map {
                let i = k
                    .parse()
                    .map_err(|_| format!("Parameter '{key}.{k}' is unexpected"))?;
                items.push((i, v));
            }
            items.sort_by_key(|(i, _)| *i);
            if items.iter().enumerate().any(|(n, (i, _))| n != *i) {
                return Err(format!(
                    "Parameter '{key}': list indices must be 0, 1, 2, ..."
                ));
            }
            Ok(items.into_iter().map(|(_, v)| v).collect())
        }
        _ => Err(format!(
            "Invalid parameter type for '{key}', expected: array"
        )),
    }
}

fn bitmap_ref(value: Value, syntax: Syntax, i: usize) -> Result<BitmapRef, String> {
    match value {
        Value::String(name) => Ok(BitmapRef::Local(name)),
        Value::Object(map) => {
            let e: ExternalBitmap = Options { map, syntax }
                .parse(&format!("bitmaps[{i}]"))
                .map_err(|e| e.to_string())?;
            Ok(BitmapRef::External {
                node: e.node,
                name: e.name,
            })
        }
        _ => Err(format!(
            "Invalid parameter type for 'bitmaps[{i}]', expected: string or object"
        )),
    }
}

impl NbdExportOptions {
    /// Parses the options (without `type`).
    pub fn parse(mut options: Options) -> Result<Self, String> {
        let syntax = options.syntax;
        let bitmaps = match options.take("bitmaps") {
            None => Vec::new(),
            Some(v) => list(v, syntax, "bitmaps")?
                .into_iter()
                .enumerate()
                .map(|(i, v)| bitmap_ref(v, syntax, i))
                .collect::<Result<_, _>>()?,
        };
        let raw: RawOptions = options.parse("").map_err(|e| e.to_string())?;
        let name = raw.name.unwrap_or_else(|| raw.node_name.clone());
        if name.len() > proto::MAX_STRING {
            return Err(format!("export name '{name}' too long"));
        }
        if let Some(d) = &raw.description {
            if d.len() > proto::MAX_STRING {
                return Err(format!("description '{d}' too long"));
            }
        }
        Ok(NbdExportOptions {
            id: raw.id,
            node_name: raw.node_name,
            name,
            description: raw.description,
            writable: raw.writable,
            writethrough: raw.writethrough,
            bitmaps,
            allocation_depth: raw.allocation_depth,
        })
    }
}

#[derive(Default)]
struct ExportState {
    clients: Vec<Arc<Client>>,
    deleted: bool,
}

/// The exports a server publishes, by name.
#[derive(Default)]
pub struct ExportTable {
    exports: Mutex<BTreeMap<String, Arc<NbdExport>>>,
}

impl ExportTable {
    /// The export named `name`.
    pub fn find(&self, name: &str) -> Option<Arc<NbdExport>> {
        self.exports.lock().get(name).cloned()
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<NbdExport>> {
        self.exports.lock().values().cloned().collect()
    }

    /// Publishes an export under its name, which must be free.
    pub fn publish(&self, export: Arc<NbdExport>) -> Result<(), String> {
        let mut exports = self.exports.lock();
        if exports.contains_key(export.name()) {
            return Err(format!(
                "NBD server already has export named '{}'",
                export.name()
            ));
        }
        exports.insert(export.name().to_string(), export);
        Ok(())
    }

    /// Unpublishes an export: new clients cannot select it.
    pub fn unpublish(&self, export: &NbdExport) {
        let mut exports = self.exports.lock();
        if exports
            .get(export.name())
            .is_some_and(|e| std::ptr::eq(e.as_ref(), export))
        {
            exports.remove(export.name());
        }
    }
}

/// A running NBD export.
pub struct NbdExport {
    options: NbdExportOptions,
    edge: Arc<Child>,
    bitmaps: Vec<Arc<dyn BitmapSource>>,
    gate: Arc<PauseGate>,
    /// The table the export is published in.
    table: Weak<ExportTable>,
    state: Mutex<ExportState>,
    changed: Condvar,
    /// The connections' statistics.
    stats: Sources,
}

impl NbdExport {
    /// An export serving the node behind `edge`, drained through `gate`,
    /// to be published in `table`.
    pub fn new(
        options: NbdExportOptions,
        edge: Arc<Child>,
        bitmaps: Vec<Arc<dyn BitmapSource>>,
        gate: Arc<PauseGate>,
        table: &Arc<ExportTable>,
    ) -> Self {
        NbdExport {
            options,
            edge,
            bitmaps,
            gate,
            table: Arc::downgrade(table),
            state: Mutex::new(ExportState::default()),
            changed: Condvar::new(),
            stats: Sources::default(),
        }
    }

    /// The NBD export name.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The description, if any.
    pub fn description(&self) -> Option<&str> {
        self.options.description.as_deref()
    }

    /// Whether clients may write.
    pub fn writable(&self) -> bool {
        self.options.writable
    }

    /// Whether every write is made stable before it completes.
    pub fn writethrough(&self) -> bool {
        self.options.writethrough
    }

    /// The node requests go to now.
    pub fn node(&self) -> Arc<Node> {
        self.edge.node()
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.edge.node().size()
    }

    /// The published dirty bitmaps.
    pub fn bitmaps(&self) -> &[Arc<dyn BitmapSource>] {
        &self.bitmaps
    }

    /// Whether `qemu:allocation-depth` is published.
    pub fn allocation_depth(&self) -> bool {
        self.options.allocation_depth
    }

    /// The minimum block size for clients that promise to honour it:
    /// the node's request alignment (QEMU's choice).
    pub fn min_block_size(&self) -> u32 {
        let align = self.node().limits().request_alignment.clamp(1, 65536) as u32;
        if align.is_power_of_two() {
            align
        } else {
            1
        }
    }

    /// Transmission flags, as qemu-storage-daemon 10.0 sets them: flush,
    /// FUA, cache and multi-conn on every export (every connection reaches
    /// the same node, and a flush is a flush of that node), trim and
    /// (fast) zeroing on writable ones.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = proto::FLAG_HAS_FLAGS
            | proto::FLAG_SEND_FLUSH
            | proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_CACHE
            | proto::FLAG_CAN_MULTI_CONN;
        if self.writable() {
            f |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES | proto::FLAG_SEND_FAST_ZERO;
        } else {
            f |= proto::FLAG_READ_ONLY;
        }
        if structured {
            f |= proto::FLAG_SEND_DF;
        }
        f
    }

    /// Whether requests must not be started now (the export is drained).
    pub fn paused(&self) -> bool {
        self.gate.paused()
    }

    /// Number of connected clients (in transmission on this export).
    pub fn client_count(&self) -> usize {
        self.state.lock().clients.len()
    }

    /// Registers a client entering transmission as a request source; false
    /// if the export is being deleted.
    pub fn attach(&self, client: Arc<Client>) -> bool {
        let mut s = self.state.lock();
        if s.deleted {
            return false;
        }
        self.gate.add_source(client.clone() as Arc<dyn Source>);
        s.clients.push(client);
        true
    }

    /// Removes a client whose connection ended.
    pub fn detach(&self, client: &Arc<Client>) {
        let mut s = self.state.lock();
        s.clients.retain(|c| c.id != client.id);
        self.gate
            .remove_source(&(client.clone() as Arc<dyn Source>));
        self.changed.notify_all();
    }

    /// Counters for a new connection.
    pub fn stats_source(&self) -> Arc<SourceStats> {
        self.stats.add()
    }

    /// A connection ended: its counts stay the export's.
    pub fn retire_stats_source(&self, source: &Arc<SourceStats>) {
        self.stats.retire(source)
    }

    /// Whether the export was shut down.
    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }
}

impl Export for NbdExport {
    fn id(&self) -> &str {
        &self.options.id
    }

    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn node_name(&self) -> String {
        self.node().name().to_string()
    }

    fn gate(&self) -> &Arc<PauseGate> {
        &self.gate
    }

    fn stats(&self) -> &Sources {
        &self.stats
    }

    /// Refuses new clients and, with `hard`, disconnects the connected
    /// ones and waits until their connections have ended.
    fn stop(&self, hard: bool) -> Result<(), ExportError> {
        let clients = {
            let mut s = self.state.lock();
            if !s.clients.is_empty() && !hard {
                return Err(ExportError::InUse(format!(
                    "export '{}' still in use (use mode 'hard' to force client disconnect)",
                    self.id()
                )));
            }
            s.deleted = true;
            s.clients.clone()
        };
        if let Some(table) = self.table.upgrade() {
            table.unpublish(self);
        }
        for c in &clients {
            c.disconnect();
        }
        let mut s = self.state.lock();
        self.changed.wait_while(&mut s, |s| !s.clients.is_empty());
        Ok(())
    }

    fn socket_path(&self) -> Option<&Path> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NbdExportOptions, String> {
        NbdExportOptions::parse(Options::from_json(v).unwrap())
    }

    #[test]
    fn options_and_defaults() {
        let o = parse(json!({"id": "e", "node-name": "n"})).unwrap();
        assert_eq!(o.name, "n");
        assert!(!o.writable);
        assert!(o.bitmaps.is_empty());
        let o = parse(
            json!({"id": "e", "node-name": "n", "name": "x", "description": "d",
            "writable": true, "allocation-depth": false,
            "bitmaps": ["b0", {"node": "n2", "name": "b1"}]}),
        )
        .unwrap();
        assert_eq!(o.name, "x");
        assert_eq!(
            o.bitmaps,
            vec![
                BitmapRef::Local("b0".into()),
                BitmapRef::External {
                    node: "n2".into(),
                    name: "b1".into()
                }
            ]
        );
        let o = parse(json!({"id": "e", "node-name": "n", "allocation-depth": true})).unwrap();
        assert!(o.allocation_depth);
        let e = parse(json!({"id": "e", "node-name": "n", "bogus": 1})).unwrap_err();
        assert_eq!(e, "Parameter 'bogus' is unexpected");
        let e = parse(json!({"id": "e", "node-name": "n", "bitmaps": [1]})).unwrap_err();
        assert!(e.contains("bitmaps[0]"), "{e}");
        let e = parse(json!({"id": "e", "node-name": "n", "name": "x".repeat(4097)})).unwrap_err();
        assert!(e.ends_with("too long"), "{e}");
    }

    #[test]
    fn keyval_lists() {
        let o = NbdExportOptions::parse(
            Options::from_arg(
                "id=e,node-name=n,writable=on,bitmaps.0=a,bitmaps.1.node=m,bitmaps.1.name=b",
                None,
            )
            .unwrap(),
        )
        .unwrap();
        assert!(o.writable);
        assert_eq!(o.bitmaps.len(), 2);
        let e = NbdExportOptions::parse(
            Options::from_arg("id=e,node-name=n,bitmaps.1=a", None).unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("indices"), "{e}");
    }
}
