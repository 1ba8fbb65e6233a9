//! The NBD server: a listening socket, the exports by name, and one
//! thread per client connection.

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use blkgraph_graph::{Graph, Options};
use parking_lot::{Condvar, Mutex};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::bitmap::{find_bitmap, BitmapSource};
use super::client::Client;
use super::export::{ExportTable, NbdExport, NbdExportOptions};
use super::socket::{ListenAddress, Listener, Stream};
use super::{handshake, transmission};
use crate::export::{self, ExportError, PauseGate};
use crate::listen_fd::ListenFd;

/// Default limit of a client's handshake, as QEMU 10.0's
/// `handshake-max-seconds`.
pub const DEFAULT_HANDSHAKE_SECONDS: u32 = 10;

/// Options of nbd-server-start / `--nbd-server`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdServerOptions {
    /// Where to listen.
    pub addr: ListenAddress,
    /// Most clients connected at once; 0 is no limit.
    pub max_connections: u32,
    /// Longest handshake in seconds; 0 is no limit.
    pub handshake_max_seconds: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOptions {
    #[serde(default)]
    tls_creds: Option<String>,
    #[serde(default)]
    tls_authz: Option<String>,
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    handshake_max_seconds: Option<u32>,
}

impl NbdServerOptions {
    fn finish(addr: ListenAddress, mut options: Options) -> Result<Self, String> {
        options.take("addr");
        let raw: RawOptions = options.parse("").map_err(|e| e.to_string())?;
        if raw.tls_creds.is_some() {
            return Err("tls-creds: TLS is not supported by blkgraph's NBD server".into());
        }
        if raw.tls_authz.is_some() {
            return Err("tls-authz: TLS is not supported by blkgraph's NBD server".into());
        }
        Ok(NbdServerOptions {
            addr,
            max_connections: raw.max_connections.unwrap_or(0),
            handshake_max_seconds: raw
                .handshake_max_seconds
                .unwrap_or(DEFAULT_HANDSHAKE_SECONDS),
        })
    }

    /// nbd-server-start's arguments: `addr` in QAPI's legacy form
    /// (`{"type": "unix", "data": {"path": P}}`).
    pub fn from_qmp(args: Map<String, Value>) -> Result<Self, String> {
        let options = Options::from_json(Value::Object(args)).map_err(|e| e.to_string())?;
        let addr = match options.map.get("addr") {
            Some(a) => ListenAddress::from_legacy(a.clone())?,
            None => return Err("Parameter 'addr' is missing".into()),
        };
        Self::finish(addr, options)
    }

    /// `--nbd-server addr.type=unix,addr.path=P,...`: `addr` in the flat form.
    pub fn from_cli(options: Options) -> Result<Self, String> {
        let addr = match options.map.get("addr") {
            Some(Value::Object(m)) => ListenAddress::from_flat(m.clone(), options.syntax, "addr")?,
            Some(_) => return Err("Invalid parameter type for 'addr', expected: object".into()),
            None => return Err("Parameter 'addr' is missing".into()),
        };
        Self::finish(addr, options)
    }
}

/// State shared by the server, its accept thread and its clients.
struct Shared {
    exports: Arc<ExportTable>,
    clients: Mutex<Vec<Arc<Client>>>,
    clients_changed: Condvar,
    stopping: AtomicBool,
    max_connections: u32,
    handshake_timeout: Option<Duration>,
    next_id: AtomicU64,
}

impl Shared {
    /// Whether the server is stopping.
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn remove_client(&self, id: u64) {
        self.clients.lock().retain(|c| c.id != id);
        self.clients_changed.notify_all();
    }
}

/// A running NBD server.
pub struct NbdServer {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    thread: Mutex<Option<JoinHandle<()>>>,
    socket_path: Option<PathBuf>,
    local_addr: Option<SocketAddr>,
}

impl NbdServer {
    /// Listens at `options.addr` and starts accepting clients; `listener`
    /// is the socket of an `fd` address, already taken and checked by
    /// [`crate::listen_fd`].
    pub fn start(
        options: &NbdServerOptions,
        listener: Option<ListenFd>,
    ) -> Result<NbdServer, String> {
        let listener = Arc::new(Listener::bind(&options.addr, listener)?);
        let shared = Arc::new(Shared {
            exports: Arc::default(),
            clients: Mutex::new(Vec::new()),
            clients_changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            max_connections: options.max_connections,
            handshake_timeout: (options.handshake_max_seconds > 0)
                .then(|| Duration::from_secs(u64::from(options.handshake_max_seconds))),
            next_id: AtomicU64::new(1),
        });
        let (s, l) = (shared.clone(), listener.clone());
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(&s, &l))
            .map_err(|e| format!("cannot start the NBD server thread: {e}"))?;
        Ok(NbdServer {
            local_addr: listener.local_addr(),
            shared,
            listener,
            thread: Mutex::new(Some(thread)),
            socket_path: options.addr.socket_path().cloned(),
        })
    }

    /// The unix socket path the server listens on, if any.
    pub fn socket_path(&self) -> Option<&PathBuf> {
        self.socket_path.as_ref()
    }

    /// The TCP address the server listens on, if it is an inet server.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Starts an export from block-export-add options (without `type`):
    /// attaches it to its node in `graph` and publishes its name.
    pub fn start_export(
        &self,
        graph: &Graph,
        options: Options,
    ) -> Result<Arc<NbdExport>, ExportError> {
        let opts = NbdExportOptions::parse(options).map_err(ExportError::InvalidOptions)?;
        let node = graph.find(&opts.node_name)?;
        if opts.writable && node.read_only() {
            return Err(ExportError::InvalidOptions(
                "Cannot export read-only node as writable".into(),
            ));
        }
        if self.shared.exports.find(&opts.name).is_some() {
            return Err(ExportError::InvalidOptions(format!(
                "NBD server already has export named '{}'",
                opts.name
            )));
        }
        let mut bitmaps: Vec<Arc<dyn BitmapSource>> = Vec::new();
        for b in &opts.bitmaps {
            let source =
                find_bitmap(graph, &node, b, opts.writable).map_err(ExportError::InvalidOptions)?;
            if bitmaps.iter().any(|s| s.name() == source.name()) {
                return Err(ExportError::InvalidOptions(format!(
                    "Bitmap '{}' is listed twice",
                    source.name()
                )));
            }
            bitmaps.push(source);
        }
        let gate = PauseGate::new();
        let edge = export::attach(graph, &opts.id, &opts.node_name, opts.writable, &gate)?;
        let id = opts.id.clone();
        let export = Arc::new(NbdExport::new(
            opts,
            edge,
            bitmaps,
            gate,
            &self.shared.exports,
        ));
        if let Err(e) = self.shared.exports.publish(export.clone()) {
            let _ = graph.detach_export(&id);
            return Err(ExportError::InvalidOptions(e));
        }
        Ok(export)
    }

    /// Serves one connection on the calling thread, from the greeting to its
    /// end, as the accept thread's connection threads do (the fuzzers drive
    /// the protocol through this).
    pub fn serve_connection(&self, stream: UnixStream) -> std::io::Result<()> {
        let stream = Stream::Unix(stream);
        if let Some(client) = add_client(&self.shared, &stream)? {
            serve_client(&self.shared, &client, stream);
        }
        Ok(())
    }

    /// Number of connected clients, in handshake or transmission.
    pub fn client_count(&self) -> usize {
        self.shared.clients.lock().len()
    }

    /// Stops listening and disconnects every client (the exports must have
    /// been shut down first); returns once every connection has ended.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on the listening socket this server owns (kept
        // open by the Arc); it makes a blocked accept return.
        unsafe {
            libc::shutdown(
                std::os::unix::io::AsRawFd::as_raw_fd(&*self.listener),
                libc::SHUT_RDWR,
            )
        };
        self.shared.clients_changed.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        for c in self.shared.clients.lock().iter() {
            c.disconnect();
        }
        let mut clients = self.shared.clients.lock();
        self.shared
            .clients_changed
            .wait_while(&mut clients, |c| !c.is_empty());
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &Listener) {
    loop {
        {
            let mut clients = shared.clients.lock();
            let max = shared.max_connections as usize;
            // Like QEMU, stop accepting while the limit is reached; new
            // clients wait in the listen backlog.
            shared.clients_changed.wait_while(&mut clients, |c| {
                max > 0 && c.len() >= max && !shared.stopping()
            });
        }
        if shared.stopping() {
            return;
        }
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.stopping() {
                    return;
                }
                log::warn!("NBD server: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(e) = spawn_client(shared, stream) {
            log::warn!("NBD server: cannot serve a client: {e}");
        }
    }
}

/// Registers a client on `stream`; `None` if the server is stopping.
fn add_client(shared: &Shared, stream: &Stream) -> std::io::Result<Option<Arc<Client>>> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let client = Arc::new(Client::new(id, stream.try_clone()?)?);
    let mut clients = shared.clients.lock();
    if shared.stopping() {
        return Ok(None);
    }
    clients.push(client.clone());
    Ok(Some(client))
}

fn spawn_client(shared: &Arc<Shared>, stream: Stream) -> std::io::Result<()> {
    let Some(client) = add_client(shared, &stream)? else {
        return Ok(());
    };
    let id = client.id;
    let theirs = shared.clone();
    let c = client.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-client-{id}"))
        .spawn(move || serve_client(&theirs, &c, stream));
    if let Err(e) = spawned {
        shared.remove_client(id);
        return Err(e);
    }
    Ok(())
}

fn serve_client(shared: &Shared, client: &Arc<Client>, mut stream: Stream) {
    log::debug!("NBD client {}: connected", client.id);
    match handshake::negotiate(
        &shared.exports,
        shared.handshake_timeout,
        client,
        &mut stream,
    ) {
        Ok(Some(session)) => {
            let export = session.export.clone();
            log::debug!(
                "NBD client {}: serving export '{}'",
                client.id,
                export.name()
            );
            if let Err(e) = transmission::serve(client, session, stream) {
                log::debug!("NBD client {}: {e}", client.id);
            }
            export.detach(client);
        }
        Ok(None) => {}
        Err(e) => log::debug!("NBD client {}: handshake ended: {e}", client.id),
    }
    log::debug!("NBD client {}: disconnected", client.id);
    shared.remove_client(client.id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn qmp_and_cli_options() {
        let o = NbdServerOptions::from_qmp(args(json!({
            "addr": {"type": "unix", "data": {"path": "/s"}}, "max-connections": 4
        })))
        .unwrap();
        assert_eq!(o.max_connections, 4);
        assert_eq!(o.handshake_max_seconds, DEFAULT_HANDSHAKE_SECONDS);
        let e = NbdServerOptions::from_qmp(args(json!({
            "addr": {"type": "unix", "data": {"path": "/s"}}, "tls-creds": "t"
        })))
        .unwrap_err();
        assert!(e.contains("TLS is not supported"), "{e}");
        let e = NbdServerOptions::from_qmp(args(json!({}))).unwrap_err();
        assert_eq!(e, "Parameter 'addr' is missing");
        let e = NbdServerOptions::from_qmp(args(json!({
            "addr": {"type": "unix", "data": {"path": "/s"}}, "bogus": 1
        })))
        .unwrap_err();
        assert_eq!(e, "Parameter 'bogus' is unexpected");
        let o = NbdServerOptions::from_cli(
            Options::from_arg(
                "addr.type=inet,addr.host=127.0.0.1,addr.port=10809,max-connections=2",
                None,
            )
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(o.addr, ListenAddress::Inet { .. }));
        assert_eq!(o.max_connections, 2);
    }
}
