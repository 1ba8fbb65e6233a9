//! Parsing QMP arguments into typed values, with QEMU's error texts.

use blkgraph_ctl::QmpError;
use blkgraph_graph::Options;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Parses an arguments object into `T`, with errors that name the key.
pub(super) fn parse<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    Options::from_json(Value::Object(args))
        .and_then(|o| o.parse(""))
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// A GenericError with the text of `e`.
pub(super) fn generic(e: impl ToString) -> QmpError {
    QmpError::generic(e.to_string())
}

/// Checks that a command without arguments got none.
pub(super) fn no_arguments(args: Map<String, Value>) -> Result<(), QmpError> {
    match parse::<Map<String, Value>>(args)?.keys().next() {
        Some(k) => Err(generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct NodeName {
    /// The node-name.
    pub(super) node_name: String,
}
