//! Errors of graph operations (opening, adding and deleting nodes).

use std::fmt;
use std::io;

/// An error of a graph operation, with QEMU-compatible message texts.
#[derive(Debug)]
pub enum Error {
    /// Options did not match the driver's schema; the text names the key.
    InvalidOptions(String),
    /// No driver with this name.
    UnknownDriver(String),
    /// No node with this node-name.
    NodeNotFound(String),
    /// No node for a child reference (QEMU looks it up as a device name
    /// and as a node-name).
    ReferenceNotFound(String),
    /// A node with this node-name already exists.
    DuplicateNodeName(String),
    /// The node-name is not a valid identifier.
    InvalidNodeName(String),
    /// The node-name is longer than [`crate::MAX_NODE_NAME_LEN`].
    NodeNameTooLong,
    /// The node would be larger than [`crate::MAX_LENGTH`].
    TooLarge,
    /// A file could not be opened.
    Open {
        /// The file name as given.
        filename: String,
        /// The system error.
        source: io::Error,
    },
    /// Another error while opening a node.
    OpenFailed(String),
    /// The node is still used by a parent; the text names it.
    InUse(String),
    /// A change would break the permission rules; the text names the node
    /// and the parents involved.
    Permission(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidOptions(text) => f.write_str(text),
            // QEMU's text for a value its BlockdevDriver enum lacks.
            Error::UnknownDriver(d) => {
                write!(f, "Parameter 'driver' does not accept value '{d}'")
            }
            Error::NodeNotFound(n) => write!(f, "Cannot find device='' nor node-name='{n}'"),
            Error::ReferenceNotFound(n) => {
                write!(f, "Cannot find device='{n}' nor node-name='{n}'")
            }
            Error::DuplicateNodeName(n) => write!(f, "Duplicate nodes with node-name='{n}'"),
            Error::InvalidNodeName(n) => write!(f, "Invalid node-name: '{n}'"),
            Error::NodeNameTooLong => f.write_str("Node name too long"),
            // QEMU's words: the open fails refreshing the size, with EFBIG.
            Error::TooLarge => f.write_str("Could not refresh total sector count: File too large"),
            Error::Open { filename, source } => write!(f, "Could not open '{filename}': {source}"),
            Error::OpenFailed(text) => f.write_str(text),
            Error::InUse(text) | Error::Permission(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open { source, .. } => Some(source),
            _ => None,
        }
    }
}
