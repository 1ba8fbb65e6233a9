//! The query commands: version, introspection, nodes, the graph's shape
//! and I/O statistics.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use blkgraph_ctl::{NamedFds, QmpError};
use blkgraph_graph::{ChildRole, Graph, Node, Parent};
use serde::Deserialize;
use serde_json::{json, Value};

use super::schema::{Introspection, Object};
use super::{qapi, table, Control};
use crate::stats::{Boundaries, IoStats};

/// query-qmp-schema: every command of the table, every event, and the
/// types they use, with the driver table's drivers.
pub(super) fn schema() -> Value {
    let drivers = blkgraph_graph::drivers::DRIVERS
        .iter()
        .filter_map(|d| qapi::driver_options(d.name).map(|o| (d.name, o)))
        .collect();
    let mut actions: Vec<(&'static str, &'static Object)> = vec![("abort", &super::schema::EMPTY)];
    actions.extend(
        table::TABLE
            .iter()
            .filter(|e| e.is_action())
            .map(|e| (e.name(), e.shape().args)),
    );
    let commands: Vec<_> = table::TABLE.iter().map(|e| e.shape()).collect();
    Introspection::new(drivers, actions).run(&commands, qapi::EVENTS)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QueryNodesArgs {
    /// Accepted for compatibility: every node is listed once.
    #[serde(default, rename = "flat")]
    _flat: Option<bool>,
}

/// query-named-block-nodes.
pub(super) fn named_block_nodes(
    control: &Control,
    _: QueryNodesArgs,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    Ok(Value::Array(
        control.graph.nodes().iter().map(|n| node_info(n)).collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct QueryBlockstatsArgs {
    #[serde(default)]
    query_nodes: Option<bool>,
}

/// query-blockstats: one entry per export (`qdev` is the export id), or
/// with `query-nodes`, one per node, whose counters are those of the
/// exports that serve it (QEMU's nodes count nothing themselves).
pub(super) fn blockstats(
    control: &Control,
    args: QueryBlockstatsArgs,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let exports = control.exports.stats();
    if !args.query_nodes.unwrap_or(false) {
        return Ok(Value::Array(
            exports
                .iter()
                .map(|e| {
                    json!({
                        "device": "", "qdev": e.id, "node-name": e.node_name,
                        "stats": e.stats.to_qmp(),
                    })
                })
                .collect(),
        ));
    }
    let mut by_node: BTreeMap<&str, IoStats> = BTreeMap::new();
    for e in &exports {
        by_node
            .entry(e.node_name.as_str())
            .or_default()
            .merge(&e.stats);
    }
    Ok(Value::Array(
        control
            .graph
            .nodes()
            .iter()
            .map(|n| node_stats(n, &by_node))
            .collect(),
    ))
}

/// A node's BlockStats, with its file child's as `parent`, as QEMU's.
fn node_stats(node: &Node, by_node: &BTreeMap<&str, IoStats>) -> Value {
    let stats = by_node.get(node.name()).cloned().unwrap_or_default();
    let mut entry = json!({"node-name": node.name(), "stats": stats.to_qmp()});
    let file = node
        .children()
        .iter()
        .find(|c| c.role() == ChildRole::File)
        .map(|c| c.node());
    if let Some(file) = file {
        entry["parent"] = node_stats(&file, by_node);
    }
    entry
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct HistogramSetArgs {
    id: String,
    #[serde(default)]
    boundaries: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_read: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_write: Option<Vec<u64>>,
    /// Zone appends: blkgraph has none to count.
    #[serde(default)]
    boundaries_zap: Option<Vec<u64>>,
    #[serde(default)]
    boundaries_flush: Option<Vec<u64>>,
}

/// block-latency-histogram-set: `boundaries` for every kind, the others
/// for one; none at all removes the histograms.
pub(super) fn latency_histogram_set(
    control: &Control,
    a: HistogramSetArgs,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let check = |b: Option<Vec<u64>>, name: &str| -> Result<Option<Vec<u64>>, QmpError> {
        match b {
            Some(b) if b.is_empty() || b.windows(2).any(|w| w[0] >= w[1]) => Err(
                QmpError::generic(format!("Device '{}' set {name} boundaries fail", a.id)),
            ),
            b => Ok(b),
        }
    };
    let all = check(a.boundaries.clone(), "default")?;
    check(a.boundaries_zap.clone(), "zap")?;
    let boundaries: Boundaries = [
        check(a.boundaries_read.clone(), "read")?.or_else(|| all.clone()),
        check(a.boundaries_write.clone(), "write")?.or_else(|| all.clone()),
        check(a.boundaries_flush.clone(), "flush")?.or_else(|| all.clone()),
        None,
    ];
    control
        .exports
        .set_histograms(&a.id, boundaries)
        .map_err(|e| QmpError::device_not_found(e.to_string()))?;
    Ok(json!({}))
}

/// The node-info member with a copy-before-write node's snapshot state (a
/// blkgraph extension).
pub const SNAPSHOT_INFO_MEMBER: &str = "__org.blkgraph_snapshot";

/// The graph node member with a driver node's driver (a blkgraph
/// extension of XDbgBlockGraphNode).
const DRIVER_MEMBER: &str = "__org.blkgraph_driver";

/// A node as query-named-block-nodes describes it (QAPI's BlockDeviceInfo).
pub(super) fn node_info(node: &Node) -> Value {
    let bitmaps: Vec<Value> = node
        .bitmaps()
        .iter()
        .map(|b| {
            let mut info = json!({
                "name": b.name(),
                "count": b.count(),
                "granularity": b.granularity(),
                "recording": b.recording(),
                "busy": false,
                "persistent": b.persistent(),
            });
            if b.inconsistent() {
                info["inconsistent"] = json!(true);
            }
            info
        })
        .collect();
    let mut info = json!({
        "node-name": node.name(),
        "drv": node.driver_name(),
        "ro": node.read_only(),
        "active": true,
        "file": node.filename().unwrap_or_default(),
        "encrypted": false,
        "detect_zeroes": node.detect_zeroes().as_str(),
        "backing_file_depth": 0,
        "write_threshold": node.write_threshold(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "cache": {"writeback": true, "direct": node.direct(), "no-flush": node.no_flush()},
    });
    // Moved in: json! would copy a Value through the serializer.
    info["image"] = image_info(node);
    info["dirty-bitmaps"] = Value::Array(bitmaps);
    let chain = std::iter::successors(backing(node), |n| backing(n));
    info["backing_file_depth"] = json!(chain.count());
    if let Some(b) = info["image"].get("full-backing-filename").cloned() {
        info["backing_file"] = b;
    }
    if let Some(extra) = node.snapshot_info() {
        info[SNAPSHOT_INFO_MEMBER] = extra;
    }
    info
}

/// The node's backing child's node, if it has one.
fn backing(node: &Node) -> Option<std::sync::Arc<Node>> {
    node.children()
        .iter()
        .find(|c| c.role() == ChildRole::Backing)
        .map(|c| c.node())
}

/// The image behind a node as QAPI's ImageInfo describes it, with its
/// backing chain.
fn image_info(node: &Node) -> Value {
    let filename = node.filename().unwrap_or_default();
    let mut image = json!({
        "filename": filename,
        "format": node.driver_name(),
        "virtual-size": node.size(),
        "dirty-flag": false,
    });
    // What the host file system allocated, as QEMU's file driver says.
    if let Ok(meta) = std::fs::metadata(&filename) {
        if meta.is_file() {
            image["actual-size"] = json!(meta.blocks() * 512);
        }
    }
    let below = backing(node);
    if let Some(f) = node.format_info() {
        if let Some(cs) = f.cluster_size {
            image["cluster-size"] = json!(cs);
        }
        if let Some(dirty) = f.dirty_flag {
            image["dirty-flag"] = json!(dirty);
        }
        if let Some(name) = f.backing_filename {
            image["backing-filename"] = json!(name);
        }
        if let Some(format) = f.backing_format {
            image["backing-filename-format"] = json!(format);
        }
        if let Some(specific) = f.specific {
            image["format-specific"] = specific;
        }
    }
    if let Some(b) = below {
        let full = b.filename().unwrap_or_default();
        if image.get("backing-filename").is_none() {
            image["backing-filename"] = json!(full);
        }
        image["full-backing-filename"] = json!(full);
        image["backing-image"] = image_info(&b);
    }
    image
}

/// x-debug-query-block-graph: exports, jobs and nodes with stable ids
/// (exports and jobs by id, then nodes by name), and every edge with its
/// permissions.
pub(super) fn block_graph(graph: &Graph) -> Value {
    let view = graph.view();
    let mut ids = std::collections::HashMap::new();
    let mut nodes = Vec::new();
    for (id, _) in &view.exports {
        ids.insert(format!("export:{id}"), nodes.len());
        nodes.push(json!({"id": nodes.len(), "type": "block-export", "name": id}));
    }
    for (id, _) in &view.jobs {
        ids.insert(format!("job:{id}"), nodes.len());
        nodes.push(json!({"id": nodes.len(), "type": "block-job", "name": id}));
    }
    for node in &view.nodes {
        ids.insert(format!("node:{}", node.name()), nodes.len());
        nodes.push(json!({"id": nodes.len(), "type": "block-driver", "name": node.name(), DRIVER_MEMBER: node.driver_name()}));
    }
    let key = |p: &Parent| match p {
        Parent::Node(n) => format!("node:{n}"),
        Parent::Export(e) => format!("export:{e}"),
        Parent::Job(j) => format!("job:{j}"),
    };
    let mut edges = Vec::new();
    let all = view
        .exports
        .iter()
        .map(|(_, c)| c.clone())
        .chain(view.jobs.iter().flat_map(|(_, edges)| edges.clone()))
        .chain(view.nodes.iter().flat_map(|n| n.children().to_vec()));
    for edge in all {
        let (perm, shared) = edge.permissions();
        edges.push(json!({
            "parent": ids.get(&key(edge.parent())),
            "child": ids.get(&format!("node:{}", edge.node().name())),
            "name": edge.role().as_str(),
            "perm": perm.names(),
            "shared-perm": shared.names(),
        }));
    }
    // Moved in: json! would copy the arrays through the serializer.
    let mut answer = json!({});
    answer["nodes"] = Value::Array(nodes);
    answer["edges"] = Value::Array(edges);
    answer
}
