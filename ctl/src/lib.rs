//! blkgraph's control socket, compatible with QEMU's QMP.
//!
//! [`QmpServer`] serves the QEMU Machine Protocol on a unix socket:
//! the greeting, capabilities negotiation, `query-commands`, request
//! checking and replies with QEMU's error texts, file descriptor passing
//! (`getfd`, `closefd`), and events, for several clients at once. The
//! commands themselves come from a [`Dispatcher`] (the daemon); events are
//! sent with an [`Events`] handle.
//!
//! ```no_run
//! use std::sync::Arc;
//! use blkgraph_ctl::{Dispatcher, Events, NamedFds, QmpError, QmpServer};
//! use serde_json::{json, Map, Value};
//!
//! struct Commands;
//!
//! impl Dispatcher for Commands {
//!     fn execute(
//!         &self,
//!         command: &str,
//!         arguments: Map<String, Value>,
//!         fds: &mut NamedFds,
//!     ) -> Result<Value, QmpError> {
//!         match command {
//!             "query-name" => Ok(json!({"name": "blkgraph"})),
//!             // Takes the descriptor the client named with getfd.
//!             "use-fd" => {
//!                 let name = arguments.get("fdname").and_then(Value::as_str).unwrap_or("");
//!                 let fd = fds.take(name)?;
//!                 drop(fd);
//!                 Ok(json!({}))
//!             }
//!             _ => Err(QmpError::command_not_found(command)),
//!         }
//!     }
//!
//!     fn commands(&self) -> Vec<String> {
//!         vec!["query-name".into(), "use-fd".into()]
//!     }
//! }
//!
//! let events = Events::new();
//! let server = QmpServer::bind("/run/blkgraph-qmp.sock".as_ref())?;
//! server.spawn(Arc::new(Commands), events.clone(),
//!              json!({"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "blkgraph"}))?;
//! events.emit("BLOCK_EXPORT_DELETED", json!({"id": "exp0"}));
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Protocol details
//!
//! * Greeting `{"QMP": {"version": VERSION, "capabilities": []}}`: no
//!   out-of-band execution. `qmp_capabilities` takes no `enable` or an
//!   empty one; before it, every command fails with `CommandNotFound` and
//!   no events are sent.
//! * Input is a stream of JSON objects, in any line layout, at most
//!   [`MAX_MESSAGE_SIZE`] bytes each (a longer one gets an error reply and
//!   the connection is closed). Malformed JSON gets an error reply without
//!   id and the rest of its line is discarded; a control character (as in
//!   QEMU) resets an unfinished message.
//! * The request's shape is checked before anything runs; `id` (any JSON
//!   value) is echoed in the reply. Output is ASCII, one object per line,
//!   ending in CRLF.
//! * A client's commands run in order on that client's own thread; events
//!   emitted while a command runs (also by that command) are sent before
//!   its reply.
//! * File descriptors sent as `SCM_RIGHTS` ancillary data go with the next
//!   message that completes from the bytes they came with on (Python's
//!   `qemu.qmp` sends them with a space just before the command; libvirt
//!   with the command itself). `getfd {"fdname": NAME}` keeps the first as
//!   NAME in the connection's [`NamedFds`]; every other descriptor is
//!   closed once its message is answered, and descriptors that arrive
//!   before an earlier batch went to a message replace it, as in QEMU. The
//!   named ones are closed with the connection.
//!
//! [`QmpClient`] is a small synchronous client for the same protocol.

#![deny(missing_docs)]

mod client;
mod decoder;
mod dispatcher;
mod error;
mod events;
mod fds;
#[cfg(fuzzing)]
mod fuzzing;
mod json;
mod request;
mod scm;
mod server;
mod session;
mod socket;

pub use client::{ClientError, QmpClient};
pub use dispatcher::Dispatcher;
pub use error::{ErrorClass, QmpError};
pub use events::Events;
pub use fds::NamedFds;
#[cfg(fuzzing)]
#[doc(hidden)]
pub use fuzzing::FuzzSession;
pub use server::{QmpServer, MAX_MESSAGE_SIZE};
pub use socket::bind_unix_socket;
