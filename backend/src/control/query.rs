//! The query commands' answers: nodes and the graph's shape.

use std::os::unix::fs::MetadataExt;

use blkgraph_graph::{ChildRole, Graph, Node, Parent};
use serde_json::{json, Value};

/// The node-info member with a copy-before-write node's snapshot state (a
/// blkgraph extension).
pub const SNAPSHOT_INFO_MEMBER: &str = "__org.blkgraph_snapshot";

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
        "detect_zeroes": "off",
        "backing_file_depth": 0,
        "write_threshold": 0,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "cache": {"writeback": true, "direct": node.direct(), "no-flush": node.no_flush()},
        "image": image_info(node),
        "dirty-bitmaps": bitmaps,
    });
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
        nodes.push(json!({"id": nodes.len(), "type": "block-driver", "name": node.name(), "driver": node.driver_name()}));
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
    json!({"nodes": nodes, "edges": edges})
}
