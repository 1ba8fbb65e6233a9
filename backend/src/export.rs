//! `--export` / block-export-add options and starting an export.

use std::os::unix::io::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use blkgraph_graph::{Graph, Options, Permission};
use serde::Deserialize;
use vhost::vhost_user::Listener;

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

/// A running export.
pub struct Export {
    /// The export id.
    pub id: String,
    /// The export type, e.g. `vhost-user-blk`.
    pub kind: &'static str,
    /// The vhost-user-blk device, for that type.
    pub device: Arc<VhostUserBlkDevice>,
    /// The server accepting frontends.
    pub server: vhost_user_blk::Server,
    /// The unix socket path to remove when the export goes, if any.
    pub socket_path: Option<PathBuf>,
}

impl Export {
    /// The node the export serves now.
    pub fn node_name(&self) -> String {
        self.device.root().name().to_string()
    }
}

/// Default of `x-poll-us`.
pub const DEFAULT_POLL_US: u32 = 50;

fn invalid(text: impl Into<String>) -> String {
    text.into()
}

/// Starts the export described by `options` on a node of `graph`.
pub fn start(graph: &Graph, mut options: Options) -> Result<Export, String> {
    let kind = match options.take("type") {
        Some(serde_json::Value::String(t)) => t,
        Some(_) => {
            return Err(invalid(
                "Invalid parameter type for 'type', expected: string",
            ))
        }
        None => return Err(invalid("Parameter 'type' is missing")),
    };
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
    let perm = if opts.writable {
        Permission::CONSISTENT_READ | Permission::WRITE
    } else {
        Permission::CONSISTENT_READ
    };
    let edge = graph
        .attach_export(&opts.id, &opts.node_name, perm, Permission::ALL)
        .map_err(|e| e.to_string())?;
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
        device,
        server,
        socket_path,
    })
}
