//! Commands on the graph's nodes: adding, deleting and replacing them (as
//! transaction actions), reopening them with new options, resizing them
//! and their write thresholds.

use blkgraph_ctl::{NamedFds, QmpError};
use blkgraph_graph::{aio, Options, Permission};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::args::{generic, parse, NodeName};
use super::transaction::Replace;
use super::Control;

/// blockdev-add's arguments: the node's options, checked as it opens.
pub(super) fn parse_blockdev_options(args: Map<String, Value>) -> Result<Options, QmpError> {
    Options::from_json(Value::Object(args)).map_err(generic)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReopenArgs {
    options: Vec<Value>,
}

/// blockdev-reopen's arguments: a list of BlockdevOptions, each checked
/// against its node as the reopen runs.
pub(super) fn parse_reopen(args: Map<String, Value>) -> Result<Vec<Options>, QmpError> {
    let a: ReopenArgs = parse(args)?;
    a.options
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(_) => Options::from_json(v).map_err(generic),
            _ => Err(generic(format!(
                "Invalid parameter type for 'options[{i}]', expected: object"
            ))),
        })
        .collect()
}

/// blockdev-reopen: every entry applies, or none (QEMU 6's
/// blockdev-reopen), in a drained graph.
pub(super) fn reopen(
    control: &Control,
    entries: Vec<Options>,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    control.graph.reopen(entries).map_err(generic)?;
    Ok(Value::Object(Map::new()))
}

/// blockdev-del's arguments.
pub(super) fn parse_node_name(args: Map<String, Value>) -> Result<String, QmpError> {
    parse::<NodeName>(args).map(|n| n.node_name)
}

/// x-blockdev-replace's arguments, with the parent checked.
pub(super) fn parse_replace(args: Map<String, Value>) -> Result<Replace, QmpError> {
    let r: Replace = parse(args)?;
    r.parent()?;
    Ok(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct WriteThresholdArgs {
    node_name: String,
    write_threshold: u64,
}

/// block-set-write-threshold: BLOCK_WRITE_THRESHOLD is sent once a write
/// reaches past the threshold (0 turns it off).
pub(super) fn set_write_threshold(
    control: &Control,
    args: WriteThresholdArgs,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    control
        .graph
        .set_write_threshold(&args.node_name, args.write_threshold)
        .map_err(generic)?;
    Ok(Value::Object(Map::new()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockResizeArgs {
    /// A BlockBackend name in QEMU; blkgraph has none.
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    size: i64,
}

/// block_resize's arguments, checked.
pub(super) struct BlockResize {
    /// The node to resize.
    node_name: String,
    /// Its new size in bytes.
    size: u64,
}

/// Parses block_resize's arguments: the node by `node-name` (there is no
/// `device` to name), and a size that is not negative.
pub(super) fn parse_block_resize(args: Map<String, Value>) -> Result<BlockResize, QmpError> {
    let a: BlockResizeArgs = parse(args)?;
    let node_name = match (a.device, a.node_name) {
        (None, Some(node)) => node,
        (device, node) => {
            return Err(generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or_default(),
                node.unwrap_or_default()
            )))
        }
    };
    let size = u64::try_from(a.size).map_err(|_| generic("Parameter 'size' expects a >0 size"))?;
    Ok(BlockResize { node_name, size })
}

/// The graph export id under which block_resize holds its node; not an
/// identifier, so no export can have it.
const RESIZE_PARENT: &str = "#block_resize";

/// block_resize: resizes a node through a temporary parent that takes the
/// resize permission (refused if another parent does not share it), then
/// tells the exports, whose frontends may learn the new size.
pub(super) fn block_resize(
    control: &Control,
    args: BlockResize,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let graph = &control.graph;
    let gate = crate::export::PauseGate::new();
    let edge = graph
        .attach_export(
            RESIZE_PARENT,
            &args.node_name,
            Permission::RESIZE,
            Permission::ALL,
            gate,
        )
        .map_err(generic)?;
    let node = edge.node();
    let result = aio::block_on(node.resize(args.size));
    drop(node);
    drop(edge);
    if let Err(e) = graph.detach_export(RESIZE_PARENT) {
        log::error!("block_resize: cannot detach its parent: {e}");
    }
    result.and_then(|r| r).map_err(generic)?;
    control.exports.resized();
    Ok(Value::Object(Map::new()))
}
