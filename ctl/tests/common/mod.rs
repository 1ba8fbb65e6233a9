//! An in-process QMP server with a small test dispatcher, and a raw client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkgraph_ctl::{Dispatcher, Events, NamedFds, QmpError, QmpServer};
use serde_json::{json, Map, Value};

/// The greeting's version object.
pub fn version() -> Value {
    json!({"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "blkgraph-test"})
}

/// Commands for testing the protocol layer.
pub struct TestDispatcher {
    /// Emits events for the `emit` command.
    pub events: Events,
    /// How many times `execute` ran.
    pub calls: AtomicUsize,
    /// How many `sleep` commands finished.
    pub slept: AtomicUsize,
}

impl Dispatcher for TestDispatcher {
    fn execute(
        &self,
        command: &str,
        arguments: Map<String, Value>,
        _: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match command {
            "echo" => Ok(Value::Object(arguments)),
            "nothing" => Ok(json!({})),
            "fail" => Err(QmpError::generic("Parameter 'x' is missing")),
            "find" => Err(QmpError::device_not_found(format!(
                "Cannot find device='{}' nor node-name=''",
                arguments.get("id").and_then(Value::as_str).unwrap_or("")
            ))),
            "sleep" => {
                let ms = arguments.get("ms").and_then(Value::as_u64).unwrap_or(100);
                std::thread::sleep(Duration::from_millis(ms));
                self.slept.fetch_add(1, Ordering::SeqCst);
                Ok(json!({}))
            }
            "emit" => {
                let name = arguments
                    .get("event")
                    .and_then(Value::as_str)
                    .unwrap_or("TEST");
                let data = arguments.get("data").cloned().unwrap_or(Value::Null);
                self.events.emit(name, data);
                Ok(json!({}))
            }
            "panic" => panic!("test dispatcher panics on purpose"),
            "x-debug-query-block-graph" => Ok(json!({
                "nodes": [
                    {"id": 1, "type": "block-export", "name": "vub0"},
                    {"id": 2, "type": "block-driver", "name": "raw disk0"},
                    {"id": 3, "type": "block-driver", "name": "file f0"}
                ],
                "edges": [
                    {"parent": 1, "child": 2, "name": "root",
                     "perm": ["consistent-read", "write"],
                     "shared-perm": ["consistent-read", "write"]},
                    {"parent": 2, "child": 3, "name": "file",
                     "perm": ["consistent-read", "write"],
                     "shared-perm": ["consistent-read", "write-unchanged"]}
                ]
            })),
            _ => Err(QmpError::generic(format!("unexpected command {command}"))),
        }
    }

    fn commands(&self) -> Vec<String> {
        [
            "echo",
            "nothing",
            "fail",
            "find",
            "sleep",
            "emit",
            "panic",
            "x-debug-query-block-graph",
        ]
        .map(String::from)
        .into()
    }
}

/// A running server in a temporary directory.
pub struct TestServer {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The socket.
    pub path: PathBuf,
    /// The server's event handle.
    pub events: Events,
    /// The dispatcher (for its counters).
    pub dispatcher: Arc<TestDispatcher>,
}

/// Starts a server on a fresh socket.
pub fn start() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let events = Events::new();
    let dispatcher = Arc::new(TestDispatcher {
        events: events.clone(),
        calls: AtomicUsize::new(0),
        slept: AtomicUsize::new(0),
    });
    let server = QmpServer::bind(&path).unwrap();
    server
        .spawn(dispatcher.clone(), events.clone(), version())
        .unwrap();
    TestServer {
        dir,
        path,
        events,
        dispatcher,
    }
}

/// Waits until `cond` holds, for at most 10 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client that sends raw bytes and reads raw lines.
pub struct RawClient {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

impl RawClient {
    /// Connects (and reads nothing yet).
    pub fn connect(path: &Path) -> RawClient {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        RawClient {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Connects and reads the greeting.
    pub fn greeted(path: &Path) -> RawClient {
        let mut c = Self::connect(path);
        let greeting = c.recv();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        c
    }

    /// Connects, reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> RawClient {
        let mut c = Self::greeted(path);
        assert_eq!(
            c.call(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    /// Sends bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Sends one message and a newline.
    pub fn send_json(&mut self, message: &Value) {
        self.send(format!("{message}\n").as_bytes());
    }

    /// Reads one raw line (with its CRLF); empty at end of file.
    pub fn recv_line(&mut self) -> String {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).unwrap();
        let line = String::from_utf8(line).expect("server output is UTF-8");
        assert!(line.is_ascii(), "server output is not ASCII: {line}");
        assert!(
            line.is_empty() || line.ends_with("\r\n"),
            "line without CRLF: {line:?}"
        );
        line
    }

    /// Reads one message.
    pub fn recv(&mut self) -> Value {
        let line = self.recv_line();
        assert!(!line.is_empty(), "connection closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Sends a message and reads the next message.
    pub fn call(&mut self, message: Value) -> Value {
        self.send_json(&message);
        self.recv()
    }

    /// True if the server closed the connection (reads until end of file).
    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok()
    }
}

/// `{"error": {"class": CLASS, "desc": DESC}}`, plus `id` if given.
pub fn error(class: &str, desc: &str, id: Option<Value>) -> Value {
    let mut e = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        e["id"] = id;
    }
    e
}
