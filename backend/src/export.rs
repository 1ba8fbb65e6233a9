//! `--export` / block-export-add options and starting an export.

use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use blkgraph_graph::{Child, Graph, Options, Permission};
use serde::Deserialize;
use vhost::vhost_user::Listener;

use crate::nbd::{self, NbdExport, NbdServer};
use crate::vhost_user_blk::{self, DeviceOptions, VhostUserBlkDevice};

/// A listening socket address in QAPI's flat SocketAddress form.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SocketAddress {
    /// A unix socket path.
    Unix {
        /// The path.
        path: PathBuf,
    },
    /// An inherited listening socket, by descriptor number.
    Fd {
        /// The descriptor number.
        str: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VhostUserBlkOptions {
    id: String,
    node_name: String,
    addr: serde_json::Value,
    #[serde(default)]
    writable: bool,
    #[serde(default)]
    writethrough: bool,
    #[serde(default)]
    num_queues: Option<u16>,
    #[serde(default)]
    logical_block_size: Option<u32>,
    /// blkgraph extension: microseconds a queue keeps polling after its
    /// last request (default 50, 0 disables).
    #[serde(default, rename = "x-poll-us")]
    poll_us: Option<u32>,
}

/// What serves an export, by type.
pub enum Backend {
    /// A vhost-user-blk device and the server accepting its frontends.
    VhostUserBlk {
        /// The device.
        device: Arc<VhostUserBlkDevice>,
        /// The server accepting frontends.
        server: vhost_user_blk::Server,
    },
    /// An export of the NBD server.
    Nbd(Arc<NbdExport>),
}

/// A running export.
pub struct Export {
    /// The export id.
    pub id: String,
    /// The export type, e.g. `vhost-user-blk`.
    pub kind: &'static str,
    /// What serves it.
    pub backend: Backend,
    /// The unix socket path to remove when the export goes, if any.
    pub socket_path: Option<PathBuf>,
}

impl Export {
    /// The node the export serves now.
    pub fn node_name(&self) -> String {
        match &self.backend {
            Backend::VhostUserBlk { device, .. } => device.root().name().to_string(),
            Backend::Nbd(e) => e.node().name().to_string(),
        }
    }

    /// Stops taking new requests and waits for those in flight.
    pub fn quiesce(&self) {
        match &self.backend {
            Backend::VhostUserBlk { device, .. } => device.quiesce(),
            Backend::Nbd(e) => e.quiesce(),
        }
    }

    /// Takes requests again after [`Export::quiesce`].
    pub fn resume(&self) {
        match &self.backend {
            Backend::VhostUserBlk { device, .. } => device.resume(),
            Backend::Nbd(e) => e.resume(),
        }
    }

    /// Stops serving: connected clients are disconnected if `hard`, an
    /// error otherwise (and then nothing changes).
    pub fn stop(&mut self, hard: bool) -> Result<(), String> {
        let id = &self.id;
        match &mut self.backend {
            Backend::VhostUserBlk { server, .. } => server
                .stop(hard)
                .map_err(|e| format!("export '{id}' is in use: {e}")),
            Backend::Nbd(e) => e.shut_down(hard),
        }
    }
}

/// Attaches export `id` to its node as a parent that reads it (and writes
/// it if `writable`) and lets every other parent do anything, as QEMU's
/// block exports do; returns the export's root edge.
pub fn attach(
    graph: &Graph,
    id: &str,
    node_name: &str,
    writable: bool,
) -> Result<Arc<Child>, String> {
    let perm = if writable {
        Permission::CONSISTENT_READ | Permission::WRITE
    } else {
        Permission::CONSISTENT_READ
    };
    graph
        .attach_export(id, node_name, perm, Permission::ALL)
        .map_err(|e| e.to_string())
}

/// Default of `x-poll-us`.
pub const DEFAULT_POLL_US: u32 = 50;

fn invalid(text: impl Into<String>) -> String {
    text.into()
}

/// Starts the export described by `options` on a node of `graph`; NBD
/// exports need the running NBD server.
pub fn start(
    graph: &Graph,
    mut options: Options,
    nbd: Option<&NbdServer>,
) -> Result<Export, String> {
    let kind = match options.take("type") {
        Some(serde_json::Value::String(t)) => t,
        Some(_) => {
            return Err(invalid(
                "Invalid parameter type for 'type', expected: string",
            ))
        }
        None => return Err(invalid("Parameter 'type' is missing")),
    };
    if kind == "nbd" {
        let server = nbd.ok_or("NBD server not running")?;
        let export = nbd::start_export(graph, server, options)?;
        return Ok(Export {
            id: export.id().to_string(),
            kind: "nbd",
            backend: Backend::Nbd(export),
            socket_path: None,
        });
    }
    if kind != "vhost-user-blk" {
        return Err(format!("Parameter 'type' does not accept value '{kind}'"));
    }
    let syntax = options.syntax;
    let opts: VhostUserBlkOptions = options.parse("").map_err(|e| e.to_string())?;
    let addr: SocketAddress = Options {
        map: match opts.addr {
            serde_json::Value::Object(m) => m,
            _ => {
                return Err(invalid(
                    "Invalid parameter type for 'addr', expected: object",
                ))
            }
        },
        syntax,
    }
    .parse("addr")
    .map_err(|e| e.to_string())?;
    let node = graph.find(&opts.node_name).map_err(|e| e.to_string())?;
    let num_queues = opts.num_queues.unwrap_or(1);
    if num_queues == 0 || num_queues > 64 {
        return Err(invalid("num-queues must be between 1 and 64"));
    }
    let block_size = opts.logical_block_size.unwrap_or(512);
    if !block_size.is_power_of_two() || !(512..=32768).contains(&block_size) {
        return Err(format!(
            "Logical block size {block_size} is not a power of 2 between 512 and 32768"
        ));
    }
    if u64::from(block_size) < node.request_alignment() {
        return Err(format!(
            "logical-block-size {block_size} is below the node's alignment {}; use at least that",
            node.request_alignment()
        ));
    }
    if opts.writable && node.read_only() {
        return Err(invalid("Cannot export read-only node as writable"));
    }
    let edge = attach(graph, &opts.id, &opts.node_name, opts.writable)?;
    let detach = |e: String| {
        let _ = graph.detach_export(&opts.id);
        e
    };
    let (listener, socket_path) = match addr {
        SocketAddress::Unix { path } => (
            vhost_user_blk::bind(&path)
                .map_err(|e| detach(format!("cannot listen on {}: {e}", path.display())))?,
            Some(path),
        ),
        SocketAddress::Fd { str } => {
            let fd: i32 = str
                .parse()
                .map_err(|_| detach(format!("'{str}' is not a file descriptor")))?;
            // SAFETY: the user passed this descriptor as a listening socket
            // owned by this process; it is used by nothing else.
            (unsafe { Listener::from_raw_fd(fd) }, None)
        }
    };
    let device_options = DeviceOptions {
        id: opts.id.clone(),
        writable: opts.writable,
        writethrough: opts.writethrough,
        num_queues: usize::from(num_queues),
        logical_block_size: block_size,
        poll: std::time::Duration::from_micros(u64::from(opts.poll_us.unwrap_or(DEFAULT_POLL_US))),
    };
    let device = Arc::new(
        VhostUserBlkDevice::new(edge, device_options)
            .map_err(|e| detach(format!("cannot create the device: {e}")))?,
    );
    let server = vhost_user_blk::spawn(device.clone(), listener, opts.id.clone())
        .map_err(|e| detach(format!("cannot start the export thread: {e}")))?;
    Ok(Export {
        id: opts.id,
        kind: "vhost-user-blk",
        backend: Backend::VhostUserBlk { device, server },
        socket_path,
    })
}
