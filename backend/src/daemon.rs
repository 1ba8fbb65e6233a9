//! The daemon: builds the graph and the exports, then runs until a
//! termination signal.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use blkgraph_graph::{Graph, Options};

use blkgraph_ctl::{Dispatcher, Events, QmpServer};

use crate::cli::Config;
use crate::control::{self, Control};
use crate::exports::Exports;
use crate::listen_fd::{self, Source};
use crate::nbd::NbdServerOptions;
use crate::pidfile::PidFile;
use crate::signals;

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
    let json = |v| Options::from_json(v).map_err(|e| e.to_string());
    config.blockdevs.push(json(serde_json::json!({
        "driver": "file", "node-name": "file0", "filename": DEFAULT_IMAGE, "discard": "unmap"
    }))?);
    config.blockdevs.push(json(serde_json::json!({
        "driver": "raw", "node-name": "disk0", "file": "file0", "discard": "unmap"
    }))?);
    config.exports.push(json(serde_json::json!({
        "type": "vhost-user-blk", "id": "vub0", "node-name": "disk0", "writable": true,
        "num-queues": DEFAULT_QUEUES, "addr": {"type": "unix", "path": DEFAULT_SOCKET}
    }))?);
    config.qmp_sockets.push(DEFAULT_QMP_SOCKET.into());
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

/// Adds a `--object` (a throttle group).
fn add_object(graph: &Graph, options: &mut Options) -> Result<(), String> {
    let take = |o: &mut Options, k: &str| match o.take(k) {
        Some(serde_json::Value::String(s)) => Ok(s),
        _ => Err(format!("--object: Parameter '{k}' is missing")),
    };
    let kind = take(options, "qom-type")?;
    if kind != "throttle-group" {
        return Err(format!(
            "--object: type '{kind}' is not supported (only throttle-group)"
        ));
    }
    let id = take(options, "id")?;
    let limits = match options.take("limits") {
        Some(serde_json::Value::Object(map)) => Options {
            map,
            syntax: options.syntax,
        }
        .parse("limits")
        .map_err(|e| e.to_string())?,
        None => Default::default(),
        Some(_) => {
            return Err("--object: Invalid parameter type for 'limits', expected: object".into())
        }
    };
    if let Some(k) = options.map.keys().next() {
        return Err(format!("--object: Parameter '{k}' is unexpected"));
    }
    graph
        .add_throttle_group(&id, limits)
        .map_err(|e| e.to_string())
}

/// What the daemon removes when it exits: its sockets, then its pid file
/// (the lock goes with it).
struct Cleanup {
    pidfile: Option<PidFile>,
    sockets: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        // The pid file is removed when the field drops, after this.
    }
}

/// Runs the daemon until SIGTERM, SIGINT or SIGHUP.
pub fn run(mut config: Config) -> Result<(), String> {
    signals::block().map_err(|e| format!("cannot block signals: {e}"))?;
    signals::ignore().map_err(|e| format!("cannot ignore signals: {e}"))?;
    // Before anything else: a daemon refused here has touched nothing of
    // the one that holds the lock, neither its sockets nor its pid file.
    let pidfile = config
        .pidfile
        .as_deref()
        .map(PidFile::lock)
        .transpose()
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
        .map(|options| {
            let options = NbdServerOptions::from_cli(options)?;
            let fd = listen_fd::for_nbd_server(&options.addr, Source::CommandLine(&mut inherited))
                .map_err(|e| e.to_string())?;
            Ok((options, fd))
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| format!("--nbd-server: {e}"))?;
    let export_options = config
        .exports
        .drain(..)
        .map(|options| {
            let fd = listen_fd::for_export(&options.map, Source::CommandLine(&mut inherited))
                .map_err(|e| format!("--export: {e}"))?;
            Ok((options, fd))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let graph = Graph::shared();
    for mut options in config.objects.drain(..) {
        add_object(&graph, &mut options)?;
    }
    for options in config.blockdevs.drain(..) {
        graph.add(options).map_err(|e| e.to_string())?;
    }
    let mut cleanup = Cleanup {
        pidfile,
        sockets: Vec::new(),
    };
    let exports = Arc::new(Exports::new(graph.clone()));
    for (options, fd) in nbd_servers {
        exports
            .nbd_server_start(&options, fd)
            .map_err(|e| format!("--nbd-server: {e}"))?;
        cleanup.sockets = exports.socket_paths();
    }
    for (options, fd) in export_options {
        exports
            .add(options, fd)
            .map_err(|e| format!("--export: {e}"))?;
        cleanup.sockets = exports.socket_paths();
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
    for path in &config.qmp_sockets {
        let server = QmpServer::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        cleanup.sockets.push(path.clone());
        server
            .spawn(dispatcher.clone(), events.clone(), control::version())
            .map_err(|e| format!("cannot start the QMP server: {e}"))?;
    }
    let qmp_sockets = config.qmp_sockets.clone();
    if let Some(pidfile) = &mut cleanup.pidfile {
        pidfile.write_pid().map_err(|e| e.to_string())?;
    }
    if config.embedded_default {
        println!("{}", attach_hint(Path::new(DEFAULT_SOCKET)));
    }
    let sig = signals::wait().map_err(|e| format!("sigwait: {e}"))?;
    log::info!("signal {sig}: exiting");
    cleanup.sockets = exports.socket_paths();
    cleanup.sockets.extend(qmp_sockets);
    // No request runs from now on (those still queued stay queued); every
    // node is flushed and closed, as qemu-storage-daemon does at exit.
    graph.shut_down();
    drop(cleanup);
    Ok(())
}
