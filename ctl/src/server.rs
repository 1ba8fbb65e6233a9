//! The control socket: accepting clients and moving bytes.
//!
//! Each client has a reader thread, which receives its input (with the
//! file descriptors sent alongside), decodes it and runs its commands (so
//! a long command delays only that client), and a writer thread fed by a
//! bounded queue, which is shared with [`Events`]: a client that stops
//! reading fills its queue and is disconnected by the next event, or by
//! the write timeout, without blocking anybody else.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;

use crate::decoder::{Decoder, Item};
use crate::dispatcher::Dispatcher;
use crate::events::{Events, Line};
use crate::scm::recv_with_fds;
use crate::session::{error_line, greeting_line, Session};
use crate::socket::bind_unix_socket;

/// The longest message a client may send, in bytes (10 MiB, the same as the
/// line limit of Python's `qemu.qmp`).
pub const MAX_MESSAGE_SIZE: usize = 10 << 20;

/// Messages waiting to be written to one client before it counts as stuck.
const QUEUE_LEN: usize = 1024;

/// How long a write may make no progress before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes read from a client at a time.
const READ_CHUNK: usize = 64 << 10;

/// A bound QMP control socket, not serving yet.
#[derive(Debug)]
pub struct QmpServer {
    listener: UnixListener,
    path: Option<PathBuf>,
}

impl QmpServer {
    /// Binds a unix socket at `path` with [`bind_unix_socket`]: mode
    /// 0600, replacing a stale socket file, refusing a live socket
    /// (`AddrInUse`) or a file that is not a socket (`AlreadyExists`).
    pub fn bind(path: &Path) -> io::Result<QmpServer> {
        Ok(QmpServer {
            listener: bind_unix_socket(path)?,
            path: Some(path.to_path_buf()),
        })
    }

    /// Serves an already listening socket (for example one passed by file
    /// descriptor, as with QEMU's `--chardev socket,fd=N`).
    pub fn from_listener(listener: UnixListener) -> QmpServer {
        QmpServer {
            listener,
            path: None,
        }
    }

    /// The socket's path, if it was bound by [`QmpServer::bind`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Serves clients (each on its own thread, several at once) until the
    /// process exits.
    ///
    /// `version` is the greeting's version object, e.g.
    /// `{"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "blkgraph 0.1.0"}`.
    /// It must be an object (clients such as `qemu.qmp` refuse anything
    /// else): other values fail with `InvalidInput`. Events emitted through
    /// `events` go to every negotiated client.
    pub fn spawn(
        self,
        dispatcher: Arc<dyn Dispatcher>,
        events: Events,
        version: Value,
    ) -> io::Result<JoinHandle<()>> {
        if !version.is_object() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the QMP greeting's version must be a JSON object",
            ));
        }
        let greeting: Line = greeting_line(&version).into();
        thread::Builder::new()
            .name("qmp-listen".into())
            .spawn(move || self.accept_loop(dispatcher, events, greeting))
    }

    fn accept_loop(self, dispatcher: Arc<dyn Dispatcher>, events: Events, greeting: Line) {
        let mut clients: u64 = 0;
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if e.kind() != io::ErrorKind::Interrupted {
                        log::warn!("QMP socket: accept: {e}");
                        // Out of file descriptors, most likely: let other
                        // work release some.
                        thread::sleep(Duration::from_millis(100));
                    }
                    continue;
                }
            };
            clients += 1;
            log::info!("QMP client {clients} connected ({})", peer(&stream));
            let client = Client {
                stream,
                dispatcher: dispatcher.clone(),
                events: events.clone(),
                greeting: greeting.clone(),
                number: clients,
            };
            let spawned = thread::Builder::new()
                .name(format!("qmp-client-{clients}"))
                .spawn(move || client.run());
            if let Err(e) = spawned {
                log::warn!("QMP client {clients}: cannot start a thread: {e}");
            }
        }
    }
}

/// Who is at the other end of a unix socket: its process and user ids.
fn peer(stream: &UnixStream) -> String {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives
    // across the call; the descriptor is open while `stream` is borrowed.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        format!("pid {}, uid {}", cred.pid, cred.uid)
    } else {
        format!("peer unknown: {}", io::Error::last_os_error())
    }
}

/// One connected client.
struct Client {
    stream: UnixStream,
    dispatcher: Arc<dyn Dispatcher>,
    events: Events,
    greeting: Line,
    number: u64,
}

impl Client {
    fn run(self) {
        log::debug!("QMP client {}: connected", self.number);
        let (tx, rx) = sync_channel::<Line>(QUEUE_LEN);
        let started = self
            .stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .and_then(|()| self.stream.try_clone())
            .and_then(|writer| {
                thread::Builder::new()
                    .name(format!("qmp-writer-{}", self.number))
                    .spawn(move || write_loop(writer, rx))
            });
        if let Err(e) = started {
            log::warn!("QMP client {}: cannot start: {e}", self.number);
            return;
        }
        if tx.send(self.greeting.clone()).is_ok() {
            let subscription = self.read_loop(&tx);
            if let Some(id) = subscription {
                self.events.unsubscribe(id);
            }
        }
        // Dropping the last sender lets the writer flush what is queued
        // (say, the reply to an oversized message) and close.
        drop(tx);
        log::debug!("QMP client {}: done", self.number);
    }

    /// Reads and answers messages until the client goes away; returns the
    /// event subscription, if the client negotiated.
    fn read_loop(&self, tx: &SyncSender<Line>) -> Option<u64> {
        let mut session = Session::new(self.dispatcher.clone());
        let mut decoder = Decoder::new(MAX_MESSAGE_SIZE);
        let mut subscription = None;
        let mut buf = vec![0u8; READ_CHUNK];
        // Descriptors received and not yet given to a message.
        let mut pending = Vec::new();
        loop {
            let mut received = Vec::new();
            let n = match recv_with_fds(&self.stream, &mut buf, &mut received) {
                Ok(0) => return subscription,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return subscription,
            };
            if !received.is_empty() {
                // As in QEMU, newer descriptors replace (and close) those
                // that no message took.
                pending = received;
            }
            decoder.feed(&buf[..n]);
            while let Some(item) = decoder.next_item() {
                // The descriptors go with the next message to complete:
                // the one they were sent with, or, as `qemu.qmp` sends them
                // just before it, the command that uses them. The session
                // closes those the message does not take.
                let fds = std::mem::take(&mut pending);
                let line = match item {
                    Item::Value(message) => {
                        let was_negotiated = session.negotiated();
                        let line = session.handle(message, fds);
                        if !was_negotiated && session.negotiated() {
                            // From this reply on the client gets events;
                            // if that fails, it is gone (`None`).
                            let conn = self.stream.try_clone().ok()?;
                            subscription =
                                Some(self.events.subscribe(line.into(), tx.clone(), conn)?);
                            continue;
                        }
                        line
                    }
                    Item::Error(desc) => error_line(desc),
                    Item::TooLarge => {
                        log::warn!(
                            "QMP client {}: message over {MAX_MESSAGE_SIZE} bytes: disconnecting",
                            self.number
                        );
                        let line = error_line(format!(
                            "JSON parse error, message exceeds the limit of {MAX_MESSAGE_SIZE} bytes"
                        ));
                        let _ = tx.send(line.into());
                        let _ = self.stream.shutdown(Shutdown::Read);
                        return subscription;
                    }
                };
                if tx.send(line.into()).is_err() {
                    return subscription;
                }
            }
        }
    }
}

/// Writes queued lines until the queue closes or the client fails.
fn write_loop(stream: UnixStream, rx: Receiver<Line>) {
    for line in rx.iter() {
        if send_all(&stream, &line).is_err() {
            break;
        }
    }
    // Also wakes the reader thread if the client failed.
    let _ = stream.shutdown(Shutdown::Both);
}

/// Writes all of `buf`, without raising SIGPIPE if the client is gone.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: the pointer and length describe `buf`, a live byte slice
        // that `send` only reads, and the descriptor belongs to `stream`,
        // which outlives the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n.min(buf.len())..],
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("blkgraph-ctl-unit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bind_creates_an_owner_only_socket() {
        let dir = temp_dir("bind");
        let path = dir.join("qmp.sock");
        let server = QmpServer::bind(&path).unwrap();
        assert_eq!(server.path(), Some(path.as_path()));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = QmpServer::bind(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        fs::remove_dir_all(&dir).unwrap();
    }

    struct NoCommands;

    impl Dispatcher for NoCommands {
        fn execute(
            &self,
            command: &str,
            _: serde_json::Map<String, Value>,
            _: &mut crate::NamedFds,
        ) -> Result<Value, crate::QmpError> {
            Err(crate::QmpError::command_not_found(command))
        }

        fn commands(&self) -> Vec<String> {
            Vec::new()
        }
    }

    #[test]
    fn serves_a_given_listener_and_checks_the_version() {
        let dir = temp_dir("listener");
        let path = dir.join("s");
        let server = QmpServer::from_listener(UnixListener::bind(&path).unwrap());
        assert_eq!(server.path(), None);
        let err = server
            .spawn(Arc::new(NoCommands), Events::new(), Value::Null)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let server = QmpServer::from_listener(UnixListener::bind(dir.join("t")).unwrap());
        server
            .spawn(
                Arc::new(NoCommands),
                Events::new(),
                serde_json::json!({"qemu": {}}),
            )
            .unwrap();
        let mut line = String::new();
        let stream = UnixStream::connect(dir.join("t")).unwrap();
        io::BufRead::read_line(&mut io::BufReader::new(stream), &mut line).unwrap();
        assert_eq!(
            line,
            "{\"QMP\": {\"version\": {\"qemu\": {}}, \"capabilities\": []}}\r\n"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Takes named descriptors with `use-fd`, closing them.
    struct UsesFds;

    impl Dispatcher for UsesFds {
        fn execute(
            &self,
            command: &str,
            arguments: serde_json::Map<String, Value>,
            fds: &mut crate::NamedFds,
        ) -> Result<Value, crate::QmpError> {
            match command {
                "use-fd" => {
                    let name = arguments["fdname"].as_str().unwrap_or_default();
                    fds.take(name).map(|_| serde_json::json!({}))
                }
                _ => Ok(serde_json::json!({})),
            }
        }

        fn commands(&self) -> Vec<String> {
            vec!["use-fd".into(), "query-status".into()]
        }
    }

    #[test]
    fn descriptors_sent_with_messages() {
        use crate::scm::tests::{closed, probe, send_with_fds};
        use serde_json::json;
        use std::io::BufRead;

        let dir = temp_dir("fds");
        let path = dir.join("qmp.sock");
        let server = QmpServer::bind(&path).unwrap();
        server
            .spawn(Arc::new(UsesFds), Events::new(), json!({"qemu": {}}))
            .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        let mut lines = io::BufReader::new(stream.try_clone().unwrap());
        let mut recv = || {
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            serde_json::from_str::<Value>(&line).unwrap()
        };
        let call = |msg: Value, fds: &[std::os::fd::RawFd]| {
            send_with_fds(&stream, format!("{msg}\n").as_bytes(), fds);
        };
        recv();
        call(json!({"execute": "qmp_capabilities"}), &[]);
        assert_eq!(recv(), json!({"return": {}}));
        let getfd = |name: &str| json!({"execute": "getfd", "arguments": {"fdname": name}});
        let use_fd = |name: &str| json!({"execute": "use-fd", "arguments": {"fdname": name}});

        // qemu.qmp sends the descriptor with a space, then the command.
        let (a, peer_a) = probe();
        send_with_fds(&stream, b" ", &[a.as_raw_fd()]);
        drop(a);
        call(getfd("a"), &[]);
        assert_eq!(recv(), json!({"return": {}}));
        assert!(!closed(&peer_a));
        call(use_fd("a"), &[]);
        assert_eq!(recv(), json!({"return": {}}));
        assert!(closed(&peer_a));

        // libvirt sends it with the command; a later getfd has none.
        let (b, peer_b) = probe();
        call(getfd("b"), &[b.as_raw_fd()]);
        drop(b);
        assert_eq!(recv(), json!({"return": {}}));
        call(getfd("c"), &[]);
        assert_eq!(
            recv()["error"]["desc"],
            "No file descriptor supplied via SCM_RIGHTS"
        );

        // Descriptors sent with other commands, or with nothing but a
        // space before the next batch, are closed.
        let mut peers = Vec::new();
        for i in 0..100 {
            let (fd, peer) = probe();
            let (fd2, peer2) = probe();
            if i % 2 == 0 {
                call(json!({"execute": "query-status"}), &[fd.as_raw_fd()]);
                assert_eq!(recv(), json!({"return": {}}));
            } else {
                send_with_fds(&stream, b" ", &[fd.as_raw_fd()]);
                call(json!({"execute": "query-status"}), &[fd2.as_raw_fd()]);
                assert_eq!(recv(), json!({"return": {}}));
            }
            peers.extend([peer, peer2]);
        }
        let batch: Vec<_> = (0..100).map(|_| probe()).collect();
        let raw: Vec<_> = batch.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        call(json!({"execute": "no-such-command"}), &raw);
        assert_eq!(recv()["error"]["class"], "CommandNotFound");
        peers.extend(batch.into_iter().map(|(_, peer)| peer));
        assert!(peers.iter().all(closed));
        assert!(!closed(&peer_b));

        // The named ones are closed with the connection.
        stream.shutdown(Shutdown::Both).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !closed(&peer_b) {
            assert!(std::time::Instant::now() < deadline, "'b' stays open");
            thread::sleep(Duration::from_millis(5));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn send_all_reports_a_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        send_all(&a, b"hello").unwrap();
        drop(b);
        assert!(send_all(&a, b"again").is_err());
    }
}
