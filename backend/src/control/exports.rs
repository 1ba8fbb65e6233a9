//! Export commands: block exports of every type, and the NBD server with
//! its older export commands.

use blkgraph_ctl::{NamedFds, QmpError};
use blkgraph_graph::Options;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::{generic, parse};
use super::Control;
use crate::listen_fd::{self, Source};
use crate::nbd::NbdServerOptions;

/// block-export-add's arguments: its type-specific options are checked as
/// it starts.
pub(super) fn parse_export_options(args: Map<String, Value>) -> Result<Options, QmpError> {
    Options::from_json(Value::Object(args)).map_err(generic)
}

/// block-export-add.
pub(super) fn add(
    control: &Control,
    options: Options,
    fds: &mut NamedFds,
) -> Result<Value, QmpError> {
    let listener = listen_fd::for_export(&options.map, Source::Qmp(fds)).map_err(generic)?;
    control.exports.add(options, listener).map_err(generic)?;
    Ok(json!({}))
}

/// Which export to delete, and how.
pub(super) struct Delete {
    id: String,
    hard: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExportDel {
    id: String,
    #[serde(default)]
    mode: Option<String>,
}

fn hard(mode: Option<&str>) -> Result<bool, QmpError> {
    match mode {
        None | Some("safe") => Ok(false),
        Some("hard") => Ok(true),
        Some(other) => Err(generic(format!(
            "Parameter 'mode' does not accept value '{other}'"
        ))),
    }
}

/// block-export-del's arguments.
pub(super) fn parse_del(args: Map<String, Value>) -> Result<Delete, QmpError> {
    let ExportDel { id, mode } = parse(args)?;
    Ok(Delete {
        hard: hard(mode.as_deref())?,
        id,
    })
}

/// block-export-del, nbd-server-remove.
pub(super) fn del(control: &Control, d: Delete, _: &mut NamedFds) -> Result<Value, QmpError> {
    control.exports.delete(&d.id, d.hard).map_err(generic)?;
    Ok(json!({}))
}

/// nbd-server-start's arguments.
pub(super) fn parse_nbd_server_start(
    args: Map<String, Value>,
) -> Result<NbdServerOptions, QmpError> {
    NbdServerOptions::from_qmp(args).map_err(generic)
}

/// nbd-server-start.
pub(super) fn nbd_server_start(
    control: &Control,
    options: NbdServerOptions,
    fds: &mut NamedFds,
) -> Result<Value, QmpError> {
    let listener = listen_fd::for_nbd_server(&options.addr, Source::Qmp(fds)).map_err(generic)?;
    control
        .exports
        .nbd_server_start(&options, listener)
        .map_err(generic)?;
    Ok(json!({}))
}

/// nbd-server-stop.
pub(super) fn nbd_server_stop(
    control: &Control,
    (): (),
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    control.exports.nbd_server_stop().map_err(generic)?;
    Ok(json!({}))
}

/// nbd-server-add's arguments (QEMU's NbdServerAddOptions).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NbdServerAdd {
    device: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    writable: Option<bool>,
    #[serde(default)]
    bitmap: Option<String>,
}

/// nbd-server-add: an NBD export whose id is its export name (the name
/// defaults to the node-name), as QEMU's.
pub(super) fn nbd_server_add(
    control: &Control,
    a: NbdServerAdd,
    _: &mut NamedFds,
) -> Result<Value, QmpError> {
    let name = a.name.unwrap_or_else(|| a.device.clone());
    let mut options = json!({
        "type": "nbd", "id": name, "node-name": a.device, "name": name,
        "writable": a.writable.unwrap_or(false),
    });
    if let Some(d) = a.description {
        options["description"] = json!(d);
    }
    if let Some(b) = a.bitmap {
        options["bitmaps"] = json!([b]);
    }
    let options = Options::from_json(options).map_err(generic)?;
    control.exports.add(options, None).map_err(generic)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NbdServerRemove {
    name: String,
    #[serde(default)]
    mode: Option<String>,
}

/// nbd-server-remove's arguments: the export whose id is `name`.
pub(super) fn parse_nbd_server_remove(args: Map<String, Value>) -> Result<Delete, QmpError> {
    let NbdServerRemove { name, mode } = parse(args)?;
    Ok(Delete {
        hard: hard(mode.as_deref())?,
        id: name,
    })
}
