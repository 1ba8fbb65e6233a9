//! The `vhost-user-blk` export type: its `--export` / block-export-add
//! options, and starting and stopping it.

use std::os::unix::io::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkgraph_graph::{Graph, Options};
use parking_lot::Mutex;
use serde::Deserialize;
use vhost::vhost_user::Listener;

use super::device::{DeviceOptions, VhostUserBlkDevice};
use super::server::{self, Server};
use crate::export::{self, Export, ExportError, PauseGate};
use crate::listen_fd::ListenFd;
use crate::stats::Sources;

/// Default of `x-poll-us` for a root node on local storage; 0 for a
/// node whose requests are served remotely (see `BlockLimits::remote`).
pub const DEFAULT_POLL_US: u32 = 50;

/// A listening socket address in QAPI's flat SocketAddress form.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SocketAddress {
    /// A unix socket path.
    Unix {
        /// The path.
        path: PathBuf,
    },
    /// A listening socket passed by descriptor: by the name given with
    /// `getfd` over QMP, by its number on the command line (see
    /// [`crate::listen_fd`]).
    Fd {
        /// The descriptor's name or number.
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
    /// last request (0 disables; default 50, or 0 on a remote node).
    #[serde(default, rename = "x-poll-us")]
    poll_us: Option<u32>,
    /// Accepted for compatibility: blkgraph has no inactive images.
    #[serde(default, rename = "allow-inactive")]
    _allow_inactive: Option<bool>,
}

/// A running vhost-user-blk export.
pub struct VhostUserBlkExport {
    id: String,
    device: Arc<VhostUserBlkDevice>,
    server: Mutex<Server>,
    socket_path: Option<PathBuf>,
}

impl Export for VhostUserBlkExport {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn node_name(&self) -> String {
        self.device.root().name().to_string()
    }

    fn gate(&self) -> &Arc<PauseGate> {
        self.device.gate()
    }

    fn stop(&self, hard: bool) -> Result<(), ExportError> {
        let mut server = self.server.lock();
        if server.is_connected() {
            if !hard {
                return Err(ExportError::InUse(format!(
                    "export '{}' is in use: a frontend is connected (use mode 'hard' to disconnect it)",
                    self.id
                )));
            }
            // Whatever the frontend submitted gets an answer before it is
            // disconnected: the requests in flight have completed (the
            // gate is drained), the ones still queued fail.
            self.device.fail_queued();
        }
        server.stop();
        Ok(())
    }

    fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    /// Sends the config-change message: the guest reads the new capacity.
    fn resized(&self) {
        self.device.config_changed();
    }

    fn stats(&self) -> &Sources {
        self.device.stats()
    }
}

fn invalid(text: impl Into<String>) -> ExportError {
    ExportError::InvalidOptions(text.into())
}

/// Starts a vhost-user-blk export from block-export-add options (without
/// `type`) on a node of `graph`; `listener` is the socket of an `fd`
/// address, already taken and checked by [`crate::listen_fd`].
pub fn start(
    graph: &Graph,
    options: Options,
    listener: Option<ListenFd>,
) -> Result<Arc<VhostUserBlkExport>, ExportError> {
    let syntax = options.syntax;
    let opts: VhostUserBlkOptions = options.parse("").map_err(|e| invalid(e.to_string()))?;
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
    .map_err(|e| invalid(e.to_string()))?;
    let node = graph.find(&opts.node_name)?;
    let num_queues = opts.num_queues.unwrap_or(1);
    if num_queues == 0 || num_queues > 64 {
        return Err(invalid("num-queues must be between 1 and 64"));
    }
    let block_size = opts.logical_block_size.unwrap_or(512);
    if !block_size.is_power_of_two() || !(512..=32768).contains(&block_size) {
        return Err(invalid(format!(
            "Logical block size {block_size} is not a power of 2 between 512 and 32768"
        )));
    }
    let alignment = node.limits().request_alignment;
    if u64::from(block_size) < alignment {
        return Err(invalid(format!(
            "logical-block-size {block_size} is below the node's alignment {alignment}; use at least that"
        )));
    }
    if opts.writable && node.read_only() {
        return Err(invalid("Cannot export read-only node as writable"));
    }
    let gate = PauseGate::new();
    let edge = export::attach(graph, &opts.id, &opts.node_name, opts.writable, &gate)?;
    let detach = |e: ExportError| {
        let _ = graph.detach_export(&opts.id);
        e
    };
    let (listener, socket_path) = match addr {
        SocketAddress::Unix { path } => (
            server::bind(&path).map_err(|e| {
                detach(ExportError::Setup(format!(
                    "cannot listen on {}: {e}",
                    path.display()
                )))
            })?,
            Some(path),
        ),
        SocketAddress::Fd { str } => {
            let fd = listener.ok_or_else(|| {
                detach(invalid(format!(
                    "File descriptor '{str}' was not taken for the export"
                )))
            })?;
            (Listener::from(UnixListener::from(OwnedFd::from(fd))), None)
        }
    };
    let device_options = DeviceOptions {
        id: opts.id.clone(),
        writable: opts.writable,
        writethrough: opts.writethrough,
        num_queues: usize::from(num_queues),
        logical_block_size: block_size,
        poll: opts
            .poll_us
            .map(|us| std::time::Duration::from_micros(u64::from(us))),
    };
    // The listener leaves its socket file behind: remove it on failure.
    let unbind = |e: ExportError| {
        if let Some(path) = &socket_path {
            let _ = std::fs::remove_file(path);
        }
        detach(e)
    };
    let device = Arc::new(
        VhostUserBlkDevice::new(edge, gate, device_options)
            .map_err(|e| unbind(ExportError::Setup(format!("cannot create the device: {e}"))))?,
    );
    let server = server::spawn(device.clone(), listener, opts.id.clone()).map_err(|e| {
        unbind(ExportError::Setup(format!(
            "cannot start the export thread: {e}"
        )))
    })?;
    Ok(Arc::new(VhostUserBlkExport {
        id: opts.id,
        device,
        server: Mutex::new(server),
        socket_path,
    }))
}
