//! User-creatable objects (object-add, object-del, `--object`): throttle
//! groups, and iothreads, which name the queue threads exports run on.

use blkgraph_ctl::{NamedFds, QmpError};
use blkgraph_graph::Options;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::generic;
use super::Control;
use crate::iothreads::IothreadOptions;

/// An object to create.
pub(crate) enum NewObject {
    /// A throttle group.
    ThrottleGroup {
        /// Its id.
        id: String,
        /// Its limits.
        limits: blkgraph_graph::ThrottleLimits,
    },
    /// An iothread.
    Iothread {
        /// Its id.
        id: String,
        /// Its options.
        options: IothreadOptions,
    },
}

/// The object types blkgraph has, as `--object help` lists them.
pub const OBJECT_TYPES: &[&str] = &["iothread", "throttle-group"];

/// Parses object-add's arguments (or `--object`'s, as JSON): QEMU's errors
/// name the type when it is not one blkgraph has.
pub(crate) fn parse_object(mut options: Options) -> Result<NewObject, QmpError> {
    let mut take = |k: &str| match options.take(k) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(generic(format!(
            "Invalid parameter type for '{k}', expected: string"
        ))),
        None => Err(generic(format!("Parameter '{k}' is missing"))),
    };
    let kind = take("qom-type")?;
    if !OBJECT_TYPES.contains(&kind.as_str()) {
        return Err(generic(format!(
            "Parameter 'qom-type' does not accept value '{kind}'"
        )));
    }
    let id = take("id")?;
    match kind.as_str() {
        "throttle-group" => {
            let limits = match options.take("limits") {
                Some(Value::Object(map)) => Options {
                    map,
                    syntax: options.syntax,
                }
                .parse("limits")
                .map_err(generic)?,
                None => Default::default(),
                Some(_) => {
                    return Err(generic(
                        "Invalid parameter type for 'limits', expected: object",
                    ))
                }
            };
            if let Some(k) = options.map.keys().next() {
                return Err(generic(format!("Parameter '{k}' is unexpected")));
            }
            Ok(NewObject::ThrottleGroup { id, limits })
        }
        _ => Ok(NewObject::Iothread {
            id,
            options: options.parse("").map_err(generic)?,
        }),
    }
}

/// object-add's arguments.
pub(super) fn parse(args: Map<String, Value>) -> Result<NewObject, QmpError> {
    parse_object(Options::from_json(Value::Object(args)).map_err(generic)?)
}

/// Creates an object.
pub(crate) fn create(
    graph: &blkgraph_graph::Graph,
    iothreads: &crate::iothreads::Iothreads,
    object: NewObject,
) -> Result<(), QmpError> {
    match object {
        NewObject::ThrottleGroup { id, limits } => {
            graph.add_throttle_group(&id, limits).map_err(generic)
        }
        NewObject::Iothread { id, options } => {
            if graph.throttle_groups().iter().any(|g| g.id() == id) {
                return Err(generic(format!(
                    "attempt to add duplicate property '{id}' to object (type 'container')"
                )));
            }
            iothreads.add(&id, options).map_err(generic)
        }
    }
}

/// object-add.
pub(super) fn add(control: &Control, o: NewObject, _: &mut NamedFds) -> Result<Value, QmpError> {
    create(&control.graph, control.exports.iothreads(), o)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ObjectDel {
    id: String,
}

/// object-del.
pub(super) fn del(control: &Control, o: ObjectDel, _: &mut NamedFds) -> Result<Value, QmpError> {
    if control.exports.iothreads().contains(&o.id) {
        control.exports.iothreads().remove(&o.id).map_err(generic)?;
    } else {
        control
            .graph
            .remove_throttle_group(&o.id)
            .map_err(generic)?;
    }
    Ok(json!({}))
}
