//! The `options` harness: bytes as node options, in both syntaxes, opened
//! in a fresh graph.
//!
//! The input is taken as a `--blockdev` argument (`Options::from_arg`: QEMU's
//! dotted `key=value` form, or JSON if it starts with `{`) and as the JSON
//! arguments of QMP's `blockdev-add` (`Options::from_json`). Whatever parses
//! is opened with `Graph::add` in a graph that already holds a few nodes to
//! refer to by name ([`BASE_NODES`]), a dirty bitmap `bm0` on `null0` and a
//! throttle group `tg0`. Every driver but `rbd` can be opened, after
//! [`sandbox`] replaced what would reach outside the process: `driver=file`
//! only ever sees [`scratch_file`], the `nbd` client only a socket path in a
//! temporary directory or 127.0.0.1 (the harness never opens or creates a
//! path that came from the input, and resolves no host name).
//!
//! What must hold: a refused input is an `Err` with a text, and the graph
//! keeps exactly its nodes; an accepted node can be queried and deleted,
//! which gives the graph back as it was; no file descriptor is left open
//! and no thread running.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use crate::Leftovers;
use blkgraph_graph::{BitmapOptions, Graph, Options, ThrottleLimits};
use serde_json::{Map, Value};

/// The nodes every input's graph starts with (`--blockdev` syntax).
pub const BASE_NODES: &[&str] = &[
    "driver=null-co,node-name=null0,size=1M",
    "driver=null-co,node-name=null1,size=1M,read-zeroes=on",
    "driver=null-co,node-name=tgt0,size=2M",
    "driver=copy-before-write,node-name=cbw0,file=null1,target=tgt0",
];

/// The only file `driver=file` may open: 1 MiB, created in the temporary
/// directory and unlinked at once (it is opened again through
/// `/proc/self/fd`), so it needs no cleanup and nothing else is touched.
pub fn scratch_file() -> &'static str {
    &scratch().1
}

fn scratch() -> &'static (File, String) {
    static SCRATCH: OnceLock<(File, String)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let file = tempfile::tempfile().expect("cannot create the scratch file");
        fill_scratch(&file);
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        (file, path)
    })
}

fn fill_scratch(file: &File) {
    file.set_len(0)
        .and_then(|()| file.write_all_at(&[0x5a; 4096], 0))
        .and_then(|()| file.set_len(1 << 20))
        .expect("cannot fill the scratch file");
}

/// Gives the scratch file its first content and size again, for harnesses
/// whose inputs may write or resize it (a backup job's target,
/// `block_resize`), so that each input starts from the same file.
pub fn reset_scratch_file() {
    fill_scratch(&scratch().0);
}

/// The temporary directory of the sockets `path` members become.
fn socket_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"))
        .path()
}

/// The socket path of NBD servers and clients, and the one every `path`
/// member becomes (but a vhost-user-blk export's, see [`vhost_socket_path`]):
/// nothing listens there unless a QMP command of the same input started an
/// NBD server, to which an NBD client node may then connect.
pub fn socket_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| socket_dir().join("nbd").to_str().expect("UTF-8").into())
}

/// The socket path of vhost-user-blk exports: apart, so that an NBD client
/// never connects to a server that does not speak NBD (its handshake would
/// wait for a greeting that never comes).
pub fn vhost_socket_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| socket_dir().join("vub").to_str().expect("UTF-8").into())
}

/// Replaces, at any depth, what would reach outside the process: every
/// string `filename`, `snapshot-file` (an overlay blockdev-snapshot-sync
/// makes) and `backing-file` (a name written into an image's header,
/// which opening the image follows) becomes [`scratch_file`], every string
/// `path` [`socket_path`] ([`vhost_socket_path`] inside the options of a
/// vhost-user-blk export), every string `host` 127.0.0.1 and every string
/// `port` 0 (so nothing is resolved, and connections are refused at once);
/// the `nbd` client's `open-timeout` and `reconnect-delay` become 0 when
/// they are numbers (or strings of digits), so that no open waits. Values
/// of other types stay, so that type errors are still exercised.
///
/// Returns false if the options use the `rbd` driver, which the harnesses
/// do not open: librados would read the host's Ceph configuration and try
/// to reach a cluster, and it keeps process-wide state of its own.
pub fn sandbox(map: &mut Map<String, Value>) -> bool {
    sandbox_in(map, false)
}

fn sandbox_in(map: &mut Map<String, Value>, vhost: bool) -> bool {
    let mut openable = map.get("driver").and_then(Value::as_str) != Some("rbd");
    let vhost = vhost || map.get("type").and_then(Value::as_str) == Some("vhost-user-blk");
    for (key, value) in map.iter_mut() {
        match value {
            Value::String(s) => match key.as_str() {
                "filename" | "snapshot-file" | "backing-file" => *s = scratch_file().to_string(),
                "path" if vhost => *s = vhost_socket_path().to_string(),
                "path" => *s = socket_path().to_string(),
                "host" => *s = "127.0.0.1".into(),
                "port" => *s = "0".into(),
                "open-timeout" | "reconnect-delay"
                    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    *s = "0".into()
                }
                _ => {}
            },
            Value::Number(n) if matches!(key.as_str(), "open-timeout" | "reconnect-delay") => {
                *n = 0.into()
            }
            Value::Object(inner) => openable &= sandbox_in(inner, vhost),
            Value::Array(items) => {
                for item in items {
                    if let Value::Object(inner) = item {
                        openable &= sandbox_in(inner, vhost);
                    }
                }
            }
            _ => {}
        }
    }
    openable
}

/// The options of [`BASE_NODES`], parsed once.
fn base_options() -> &'static [Options] {
    static BASE: OnceLock<Vec<Options>> = OnceLock::new();
    BASE.get_or_init(|| {
        BASE_NODES
            .iter()
            .map(|s| Options::from_arg(s, None).expect("base node options"))
            .collect()
    })
}

/// A graph with [`BASE_NODES`], bitmap `bm0` on `null0`, throttle group
/// `tg0`; made as the daemon makes its graph, so that it can run jobs.
pub fn base_graph() -> Arc<Graph> {
    let graph = Graph::shared();
    graph
        .add_throttle_group("tg0", ThrottleLimits::default())
        .expect("throttle group tg0");
    for options in base_options() {
        graph.add(options.clone()).expect("base node");
    }
    let mut tx = graph.transaction();
    tx.bitmap_add("null0", "bm0", BitmapOptions::default())
        .expect("bitmap bm0");
    tx.commit().expect("bitmap bm0 commit");
    graph
}

/// Whether `BLKGRAPH_FUZZ_VERBOSE` is set: then each outcome is printed.
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("BLKGRAPH_FUZZ_VERBOSE").is_some())
}

fn node_names(graph: &Graph) -> Vec<String> {
    graph.nodes().iter().map(|n| n.name().to_string()).collect()
}

/// Opens `options` in a fresh base graph and checks the outcome.
pub fn open(mut options: Options) {
    if !sandbox(&mut options.map) {
        if verbose() {
            eprintln!("not opened: rbd");
        }
        return;
    }
    let graph = base_graph();
    let before = node_names(&graph);
    match graph.add(options) {
        Ok(node) => {
            let name = node.name().to_string();
            if verbose() {
                eprintln!("opened {} node '{name}'", node.driver_name());
            }
            // What query-named-block-nodes and x-debug-query-block-graph read.
            let _ = (node.size(), node.limits(), node.format_info());
            let _ = (node.filename(), node.read_only(), node.direct());
            let _ = (node.snapshot_info(), node.no_flush(), node.granted());
            for child in node.children().iter() {
                let _ = (child.role(), child.node().name().len(), child.permissions());
            }
            drop(node);
            if let Err(e) = graph.remove(&name) {
                panic!("node '{name}' was added but cannot be deleted: {e}");
            }
            assert_eq!(node_names(&graph), before, "blockdev-del left nodes behind");
        }
        Err(e) => {
            if verbose() {
                eprintln!("refused: {e}");
            }
            assert!(!e.to_string().is_empty(), "an error without text: {e:?}");
            assert_eq!(
                node_names(&graph),
                before,
                "a refused node changed the graph"
            );
        }
    }
}

/// The harness: `data` as `--blockdev` argument and as QMP arguments.
pub fn run(data: &[u8]) {
    crate::log_if_verbose();
    scratch_file();
    let left = Leftovers::now();
    if let Ok(text) = std::str::from_utf8(data) {
        match Options::from_arg(text, None) {
            Ok(options) => open(options),
            Err(e) => assert!(!e.to_string().is_empty(), "an error without text: {e:?}"),
        }
    }
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        match Options::from_json(value) {
            Ok(options) => open(options),
            Err(e) => assert!(!e.to_string().is_empty(), "an error without text: {e:?}"),
        }
    }
    // A thread an opened node started may still be ending once the node
    // is deleted.
    left.check_none_left(std::time::Duration::from_secs(5));
}
