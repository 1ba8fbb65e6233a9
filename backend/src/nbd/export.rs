//! An NBD export: a named view of a graph node that NBD clients select
//! during the handshake, with its clients and its quiesce state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use blkgraph_graph::options::Syntax;
use blkgraph_graph::{Child, Graph, Node, Options};
use serde::Deserialize;
use serde_json::Value;

use super::bitmap::{find_bitmap, BitmapRef, BitmapSource};
use super::client::Client;
use super::proto;
use super::server::NbdServer;

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
        if raw.allocation_depth {
            return Err(
                "allocation-depth is not supported: blkgraph has no backing chains to report"
                    .into(),
            );
        }
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
        })
    }
}

#[derive(Default)]
struct ExportState {
    clients: Vec<Arc<Client>>,
    deleted: bool,
}

/// A running NBD export.
pub struct NbdExport {
    options: NbdExportOptions,
    edge: Arc<Child>,
    bitmaps: Vec<Arc<dyn BitmapSource>>,
    /// Number of quiesce sections in progress (they may nest).
    paused: AtomicUsize,
    state: Mutex<ExportState>,
    changed: Condvar,
}

impl NbdExport {
    /// An export serving the node behind `edge`.
    pub fn new(
        options: NbdExportOptions,
        edge: Arc<Child>,
        bitmaps: Vec<Arc<dyn BitmapSource>>,
    ) -> Self {
        NbdExport {
            options,
            edge,
            bitmaps,
            paused: AtomicUsize::new(0),
            state: Mutex::new(ExportState::default()),
            changed: Condvar::new(),
        }
    }

    /// The export id.
    pub fn id(&self) -> &str {
        &self.options.id
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

    /// The minimum block size for clients that promise to honour it:
    /// the node's request alignment (QEMU's choice).
    pub fn min_block_size(&self) -> u32 {
        let align = self.node().request_alignment().clamp(1, 65536) as u32;
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

    /// Whether requests must not be started now (a quiesce is in progress).
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst) > 0
    }

    /// Stops every client from starting requests and waits until those in
    /// flight have completed; undone by [`NbdExport::resume`].
    pub fn quiesce(&self) {
        self.paused.fetch_add(1, Ordering::SeqCst);
        for c in self.clients() {
            c.kick();
            c.wait_drained();
        }
    }

    /// Lets clients start requests again after [`NbdExport::quiesce`].
    pub fn resume(&self) {
        self.paused.fetch_sub(1, Ordering::SeqCst);
        for c in self.clients() {
            c.kick();
        }
    }

    fn clients(&self) -> Vec<Arc<Client>> {
        self.state.lock().unwrap().clients.clone()
    }

    /// Number of connected clients (in transmission on this export).
    pub fn client_count(&self) -> usize {
        self.state.lock().unwrap().clients.len()
    }

    /// Registers a client entering transmission; false if the export is
    /// being deleted.
    pub fn attach(&self, client: Arc<Client>) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.deleted {
            return false;
        }
        s.clients.push(client);
        true
    }

    /// Removes a client whose connection ended.
    pub fn detach(&self, client: &Client) {
        let mut s = self.state.lock().unwrap();
        s.clients.retain(|c| c.id != client.id);
        self.changed.notify_all();
    }

    /// Whether the export was shut down.
    pub fn is_deleted(&self) -> bool {
        self.state.lock().unwrap().deleted
    }

    /// Refuses new clients and, with `hard`, disconnects the connected
    /// ones and waits until their requests have completed. Without `hard`,
    /// connected clients are an error and nothing changes.
    pub fn shut_down(&self, hard: bool) -> Result<(), String> {
        let clients = {
            let mut s = self.state.lock().unwrap();
            if !s.clients.is_empty() && !hard {
                return Err(format!(
                    "export '{}' still in use (use mode 'hard' to force client disconnect)",
                    self.id()
                ));
            }
            s.deleted = true;
            s.clients.clone()
        };
        for c in &clients {
            c.disconnect();
        }
        let s = self.state.lock().unwrap();
        drop(
            self.changed
                .wait_while(s, |s| !s.clients.is_empty())
                .unwrap(),
        );
        Ok(())
    }
}

/// Starts an NBD export on `server` from block-export-add options
/// (without `type`): attaches it to its node in `graph` and publishes its
/// name.
pub fn start(
    graph: &Graph,
    server: &NbdServer,
    options: Options,
) -> Result<Arc<NbdExport>, String> {
    let opts = NbdExportOptions::parse(options)?;
    let node = graph.find(&opts.node_name).map_err(|e| e.to_string())?;
    if opts.writable && node.read_only() {
        return Err("Cannot export read-only node as writable".into());
    }
    if server.has_export(&opts.name) {
        return Err(format!(
            "NBD server already has export named '{}'",
            opts.name
        ));
    }
    let mut bitmaps: Vec<Arc<dyn BitmapSource>> = Vec::new();
    for b in &opts.bitmaps {
        let source = find_bitmap(graph, &node, b, opts.writable)?;
        if bitmaps.iter().any(|s| s.name() == source.name()) {
            return Err(format!("Bitmap '{}' is listed twice", source.name()));
        }
        bitmaps.push(source);
    }
    let edge = crate::export::attach(graph, &opts.id, &opts.node_name, opts.writable)?;
    let id = opts.id.clone();
    let export = Arc::new(NbdExport::new(opts, edge, bitmaps));
    if let Err(e) = server.add_export(export.clone()) {
        let _ = graph.detach_export(&id);
        return Err(e);
    }
    Ok(export)
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
        let e = parse(json!({"id": "e", "node-name": "n", "allocation-depth": true})).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
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
