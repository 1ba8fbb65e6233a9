//! The interface between the protocol layer and the commands.

use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::fds::NamedFds;

/// Executes QMP commands: implemented by the daemon.
///
/// The server calls it from each client's own thread, possibly from several
/// clients at once, and only after capabilities negotiation. It handles
/// `qmp_capabilities`, `query-commands`, `getfd` and `closefd` itself.
pub trait Dispatcher: Send + Sync {
    /// Executes a command after negotiation. `arguments` is the "arguments"
    /// object (empty map if absent). `fds` are the file descriptors the
    /// client named with `getfd` on this connection: a command that takes
    /// a descriptor by name takes it from there. Returns the value for
    /// `{"return": ...}` (`{}` for commands that return nothing).
    ///
    /// Only names listed by [`Dispatcher::commands`] are passed here; others
    /// get `CommandNotFound` from the server. A panic is caught and reported
    /// to the client as a `GenericError`.
    fn execute(
        &self,
        command: &str,
        arguments: Map<String, Value>,
        fds: &mut NamedFds,
    ) -> Result<Value, QmpError>;

    /// Names of the commands `execute` knows (for `query-commands` and
    /// `CommandNotFound`).
    fn commands(&self) -> Vec<String>;
}
