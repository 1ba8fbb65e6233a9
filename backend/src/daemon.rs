//! The daemon: builds the graph and the exports, then runs until a
//! termination signal.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkgraph_ctl::{Dispatcher, Events, QmpServer};
use blkgraph_graph::Graph;

use crate::cli::{Arg, Config, QmpSocket};
use crate::control::{self, Control};
use crate::exports::Exports;
use crate::listen_fd::{self, Source};
use crate::nbd::NbdServerOptions;
use crate::pidfile::PidFile;
use crate::{daemonize, metrics, sd_notify, signals};

/// The image of the embedded default.
pub const DEFAULT_IMAGE: &str = "blkgraph-default.raw";
/// The vhost-user socket of the embedded default.
pub const DEFAULT_SOCKET: &str = "blkgraph-vub.sock";
/// The QMP socket of the embedded default.
pub const DEFAULT_QMP_SOCKET: &str = "blkgraph-qmp.sock";
const DEFAULT_SIZE: u64 = 1 << 30;
const DEFAULT_QUEUES: u16 = 2;

/// The embedded default: a 1 GiB sparse raw image in the current
/// directory, exported writable on `./blkgraph-vub.sock`.
fn embedded_default(config: &mut Config) -> Result<(), String> {
    let image = Path::new(DEFAULT_IMAGE);
    if !image.exists() {
        let f = std::fs::File::create(image)
            .map_err(|e| format!("cannot create {DEFAULT_IMAGE}: {e}"))?;
        f.set_len(DEFAULT_SIZE)
            .map_err(|e| format!("cannot size {DEFAULT_IMAGE}: {e}"))?;
    }
    config.blockdevs.push(Arg::json(
        "--blockdev",
        serde_json::json!({
            "driver": "file", "node-name": "file0", "filename": DEFAULT_IMAGE, "discard": "unmap"
        }),
    )?);
    config.blockdevs.push(Arg::json(
        "--blockdev",
        serde_json::json!({
            "driver": "raw", "node-name": "disk0", "file": "file0", "discard": "unmap"
        }),
    )?);
    config.exports.push(Arg::json(
        "--export",
        serde_json::json!({
            "type": "vhost-user-blk", "id": "vub0", "node-name": "disk0", "writable": true,
            "num-queues": DEFAULT_QUEUES, "addr": {"type": "unix", "path": DEFAULT_SOCKET}
        }),
    )?);
    config
        .qmp_sockets
        .push(QmpSocket::Path(DEFAULT_QMP_SOCKET.into()));
    Ok(())
}

fn attach_hint(socket: &Path) -> String {
    let socket = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    format!(
        "blkgraph: serving {DEFAULT_IMAGE} (1 GiB) on {sock}\n\
         attach QEMU with:\n  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id=vub0,path={sock} \
         -device vhost-user-blk-pci,chardev=vub0,num-queues={DEFAULT_QUEUES}\n\
         or cloud-hypervisor with:\n  cloud-hypervisor ... --memory size=1G,shared=on --disk vhost_user=true,socket={sock},num_queues={DEFAULT_QUEUES}\n\
         control it with:\n  blkgraph-ctl -s {DEFAULT_QMP_SOCKET} query-block-exports",
        sock = socket.display()
    )
}

/// What the daemon removes when it exits: its sockets, then its pid file
/// (the lock goes with it).
struct Cleanup {
    pidfile: Option<PidFile>,
    /// The sockets of the daemon's own servers (QMP, metrics).
    own_sockets: Vec<PathBuf>,
    /// The sockets of the exports and the NBD server, as last asked: those
    /// of exports deleted since they were created are not ours any more.
    export_sockets: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for s in self.own_sockets.iter().chain(&self.export_sockets) {
            let _ = std::fs::remove_file(s);
        }
        // The pid file is removed when the field drops, after this.
    }
}

/// Runs the daemon until SIGTERM, SIGINT or SIGHUP. Errors begin with the
/// option they come from, as qemu-storage-daemon's.
pub fn run(mut config: Config) -> Result<(), String> {
    // First of all, while the process has one thread.
    let daemonized = config
        .daemonize
        .then(daemonize::daemonize)
        .transpose()
        .map_err(|e| format!("--daemonize: {e}"))?;
    signals::block().map_err(|e| format!("cannot block signals: {e}"))?;
    signals::ignore().map_err(|e| format!("cannot ignore signals: {e}"))?;
    listen_fd::socket_activation();
    // Before anything else: a daemon refused here has touched nothing of
    // the one that holds the lock, neither its sockets nor its pid file.
    let pidfile = config
        .pidfile
        .as_deref()
        .map(PidFile::lock)
        .transpose()
        // QSD's pid file errors name no option: "cannot create PID file: ...".
        .map_err(|e| e.to_string())?;
    if config.embedded_default {
        embedded_default(&mut config)?;
    }
    // SAFETY: this is the only `Inherited`, and it claims every descriptor
    // number of the command line here, before the daemon opens descriptors
    // of its own (the embedded default's image file, if it was created just
    // now, is closed again).
    let mut inherited = unsafe { listen_fd::Inherited::new() };
    let nbd_servers = config
        .nbd_servers
        .drain(..)
        .map(|arg| {
            let at = |e: String| format!("{}: {e}", arg.context);
            let options = NbdServerOptions::from_cli(arg.options).map_err(at)?;
            let fd = listen_fd::for_nbd_server(&options.addr, Source::CommandLine(&mut inherited))
                .map_err(|e| at(e.to_string()))?;
            Ok((arg.context, options, fd))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let export_args = config
        .exports
        .drain(..)
        .map(|arg| {
            let fd = listen_fd::for_export(&arg.options.map, Source::CommandLine(&mut inherited))
                .map_err(|e| format!("{}: {e}", arg.context))?;
            Ok((arg, fd))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let qmp_listeners = config
        .qmp_sockets
        .iter()
        .map(|socket| match socket {
            QmpSocket::Path(path) => QmpServer::bind(path)
                .map(|server| (server, Some(path.clone())))
                .map_err(|e| format!("cannot listen on {}: {e}", path.display())),
            QmpSocket::Fd(fd) => listen_fd::for_monitor(fd, Source::CommandLine(&mut inherited))
                .map(|l| {
                    let listener = UnixListener::from(std::os::unix::io::OwnedFd::from(l));
                    (QmpServer::from_listener(listener), None)
                })
                .map_err(|e| format!("--chardev fd={fd}: {e}")),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut cleanup = Cleanup {
        pidfile,
        own_sockets: qmp_listeners
            .iter()
            .filter_map(|(_, p)| p.clone())
            .collect(),
        export_sockets: Vec::new(),
    };
    let graph = Graph::shared();
    let exports = Arc::new(Exports::new(graph.clone()));
    for arg in config.objects.drain(..) {
        let at = |e: blkgraph_ctl::QmpError| format!("{}: {}", arg.context, e.desc);
        let object = control::parse_object(arg.options).map_err(at)?;
        control::create_object(&graph, exports.iothreads(), object).map_err(at)?;
    }
    for arg in config.blockdevs.drain(..) {
        graph
            .add(arg.options)
            .map_err(|e| format!("{}: {e}", arg.context))?;
    }
    for (context, options, fd) in nbd_servers {
        exports
            .nbd_server_start(&options, fd)
            .map_err(|e| format!("{context}: {e}"))?;
        cleanup.export_sockets = exports.socket_paths();
    }
    for (arg, fd) in export_args {
        exports
            .add(arg.options, fd)
            .map_err(|e| format!("{}: {e}", arg.context))?;
        cleanup.export_sockets = exports.socket_paths();
    }
    if let Some(address) = &config.metrics {
        metrics::start(address, exports.clone()).map_err(|e| format!("--metrics: {e}"))?;
        if let crate::cli::MetricsAddress::Unix(path) = address {
            cleanup.own_sockets.push(path.clone());
        }
    }
    let events = Events::new();
    exports.set_event_sink(control::event_sink(events.clone()));
    let graph_events = events.clone();
    graph.set_event_sink(Arc::new(move |name, data| graph_events.emit(name, data)));
    let quit: Box<dyn Fn() + Send + Sync> = Box::new(|| {
        // Reply first, then exit as on SIGTERM.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: sends a signal to this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        });
    });
    let dispatcher: Arc<dyn Dispatcher> =
        Arc::new(Control::new(graph.clone(), exports.clone(), quit));
    for (server, _) in qmp_listeners {
        server
            .spawn(dispatcher.clone(), events.clone(), control::version())
            .map_err(|e| format!("cannot start the QMP server: {e}"))?;
    }
    if let Some(pidfile) = &mut cleanup.pidfile {
        pidfile.write_pid().map_err(|e| e.to_string())?;
    }
    if config.embedded_default {
        println!("{}", attach_hint(Path::new(DEFAULT_SOCKET)));
    }
    // Every socket exists and the pid file is written: ready.
    if let Some(d) = daemonized {
        d.ready().map_err(|e| format!("--daemonize: {e}"))?;
    }
    sd_notify::notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    log::info!("ready");
    let sig = signals::wait().map_err(|e| format!("sigwait: {e}"))?;
    sd_notify::notify("STOPPING=1");
    log::info!("signal {sig}: exiting");
    cleanup.export_sockets = exports.socket_paths();
    // No request runs from now on (those still queued stay queued); every
    // node is flushed and closed, as qemu-storage-daemon does at exit.
    graph.shut_down();
    drop(cleanup);
    Ok(())
}
