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
use crate::state_file::{self, SavedOptions, State, StateFile};
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

/// Replaces the command line's objects, nodes, NBD server and exports by
/// those of the state file `path` (the monitors, pid file and the rest of
/// the command line still apply); returns its dirty bitmaps, recreated
/// once the nodes are open.
fn from_state_file(config: &mut Config, path: &Path, state: State) -> Vec<state_file::SavedBitmap> {
    let ignored = config.objects.len()
        + config.blockdevs.len()
        + config.nbd_servers.len()
        + config.exports.len();
    log::info!(
        "state file '{}': building {} objects, {} nodes, {} NBD server and {} exports from it{}",
        path.display(),
        state.objects.len(),
        state.blockdevs.len(),
        usize::from(state.nbd_server.is_some()),
        state.exports.len(),
        if ignored > 0 {
            format!(
                "; the command line's {ignored} --object, --blockdev, --nbd-server and \
                 --export options are ignored"
            )
        } else {
            String::new()
        }
    );
    let at = |what: String, saved: &SavedOptions| Arg {
        context: format!("state file '{}': {what}", path.display()),
        options: saved.to_options(),
    };
    let name = |saved: &SavedOptions, key: &str| {
        saved
            .options
            .get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    config.objects = state
        .objects
        .iter()
        .map(|(id, o)| at(format!("object '{id}'"), o))
        .collect();
    config.blockdevs = state
        .blockdevs
        .iter()
        .map(|o| at(format!("node '{}'", name(o, "node-name")), o))
        .collect();
    config.nbd_servers = state
        .nbd_server
        .iter()
        .map(|o| at("NBD server".into(), o))
        .collect();
    config.exports = state
        .exports
        .iter()
        .map(|o| at(format!("export '{}'", name(o, "id")), o))
        .collect();
    state.bitmaps
}

/// Whether a graph event ends a job, which may have changed the graph
/// (a mirror's or a commit's pivot, a stream's new backing).
fn ends_job(name: &str, data: &serde_json::Value) -> bool {
    name == "JOB_STATUS_CHANGE" && data["status"] == "concluded"
}

/// A thread that writes the state file each time a job ends: a job ends
/// on its own thread, with locks held, where the file cannot be written.
fn state_writer(
    state: Arc<StateFile>,
    graph: Arc<Graph>,
    exports: Arc<Exports>,
) -> Result<std::sync::mpsc::Sender<()>, String> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("state-file".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Jobs that ended meanwhile are in this one write.
                while rx.try_recv().is_ok() {}
                if let Err(e) = state.write(&graph, &exports) {
                    log::error!("{e}: the change is not kept across a restart");
                }
            }
        })
        .map_err(|e| format!("cannot start the state file's thread: {e}"))?;
    Ok(tx)
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
    let restored = match &config.state_file {
        Some(path) => StateFile::read(path).map_err(|e| e.to_string())?,
        None => None,
    };
    let from_state = restored.is_some();
    let bitmaps = match (config.state_file.clone(), restored) {
        (Some(path), Some(state)) => from_state_file(&mut config, &path, state),
        _ => Vec::new(),
    };
    // What the state file records of the objects and the NBD server from
    // now on: what the daemon is built with.
    let state = config.state_file.as_ref().map(|path| {
        let objects = config
            .objects
            .iter()
            .filter_map(|arg| {
                let id = arg.options.map.get("id")?.as_str()?.to_string();
                Some((id, SavedOptions::of(&arg.options)))
            })
            .collect();
        let nbd_server = config
            .nbd_servers
            .first()
            .map(|a| SavedOptions::of(&a.options));
        Arc::new(StateFile::new(path.clone(), objects, nbd_server))
    });
    // SAFETY: this is the only `Inherited`, and it claims every descriptor
    // number of the command line (or of the state file) here, before the
    // daemon opens descriptors of its own (the embedded default's image
    // file, if it was created just now, and the state file are closed
    // again).
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
    let events = Events::new();
    let graph = Graph::shared();
    let exports = Arc::new(Exports::new(graph.clone()));
    for arg in config.objects.drain(..) {
        let at = |e: blkgraph_ctl::QmpError| format!("{}: {}", arg.context, e.desc);
        let object = control::parse_object(arg.options).map_err(at)?;
        control::create_object(&graph, exports.iothreads(), object).map_err(at)?;
    }
    for arg in config.blockdevs.drain(..) {
        // A state file's nodes are a blueprint: the nodes the graph named
        // that more than one user shares keep their names.
        let added = if from_state {
            graph.add_restored(arg.options)
        } else {
            graph.add(arg.options)
        };
        added.map_err(|e| format!("{}: {e}", arg.context))?;
    }
    let lost = match &state {
        Some(state) => state_file::restore_bitmaps(state.path(), &graph, &bitmaps, &events)?,
        None => Vec::new(),
    };
    for (context, options, fd) in nbd_servers {
        exports
            .nbd_server_start(&options, fd)
            .map_err(|e| format!("{context}: {e}"))?;
        cleanup.export_sockets = exports.socket_paths();
    }
    for (arg, fd) in export_args {
        if state_file::exports_lost_bitmap(&arg.options.map, &lost) {
            log::warn!(
                "{}: not started: it exports a bitmap whose bits were lost",
                arg.context
            );
            let id = arg.options.map.get("id").cloned().unwrap_or_default();
            events.emit_or_hold("BLOCK_EXPORT_DELETED", serde_json::json!({ "id": id }));
            continue;
        }
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
    exports.set_event_sink(control::event_sink(events.clone()));
    let graph_events = events.clone();
    let job_ended = match &state {
        Some(state) => {
            // What the command line or the state file built, at once: a
            // state file that cannot be written is an error now rather
            // than a restart without the changes made from now on.
            state.write(&graph, &exports).map_err(|e| e.to_string())?;
            Some(state_writer(state.clone(), graph.clone(), exports.clone())?)
        }
        None => None,
    };
    graph.set_event_sink(Arc::new(move |name, data| {
        if let Some(job_ended) = &job_ended {
            if ends_job(name, &data) {
                let _ = job_ended.send(());
            }
        }
        graph_events.emit(name, data)
    }));
    let quit: Box<dyn Fn() + Send + Sync> = Box::new(|| {
        // Reply first, then exit as on SIGTERM.
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: sends a signal to this process.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        });
    });
    let mut control = Control::new(graph.clone(), exports.clone(), quit);
    if let Some(state) = &state {
        control = control.with_state_file(state.clone());
    }
    let dispatcher: Arc<dyn Dispatcher> = Arc::new(control);
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
    // The state file keeps what ran, not what the shutdown takes down.
    if let Some(state) = &state {
        state.freeze();
    }
    // No request runs from now on (those still queued stay queued); every
    // node is flushed and closed, as qemu-storage-daemon does at exit.
    graph.shut_down();
    drop(cleanup);
    Ok(())
}
