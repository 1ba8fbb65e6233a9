//! A small synchronous QMP client (used by `blkgraph-ctl` and by tests).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::{ErrorClass, QmpError};

/// Why a client operation failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be connected.
    Connect(io::Error),
    /// Reading or writing the connection failed.
    Io(io::Error),
    /// The server closed the connection.
    Closed,
    /// The server sent something that is not QMP.
    Protocol(String),
    /// The command failed: the server's error reply.
    Qmp(QmpError),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "cannot connect: {e}"),
            ClientError::Io(e) => write!(f, "connection failed: {e}"),
            ClientError::Closed => f.write_str("the server closed the connection"),
            ClientError::Protocol(what) => write!(f, "protocol error: {what}"),
            ClientError::Qmp(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(e) | ClientError::Io(e) => Some(e),
            ClientError::Qmp(e) => Some(e),
            _ => None,
        }
    }
}

/// A negotiated QMP connection.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Value,
    next_id: u64,
    events: VecDeque<Value>,
}

impl QmpClient {
    /// Connects to the socket at `path`, reads the greeting and negotiates
    /// capabilities.
    pub fn connect(path: &Path) -> Result<QmpClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(ClientError::Connect)?;
        let writer = stream.try_clone().map_err(ClientError::Connect)?;
        let mut client = QmpClient {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            next_id: 0,
            events: VecDeque::new(),
        };
        let greeting = client.read_message()?;
        if !greeting.get("QMP").is_some_and(Value::is_object) {
            return Err(ClientError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        client.execute("qmp_capabilities", Map::new())?;
        Ok(client)
    }

    /// The server's greeting, `{"QMP": {"version": ..., "capabilities": [...]}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Limits how long a read or write may block (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.writer.set_read_timeout(timeout)?;
        self.writer.set_write_timeout(timeout)
    }

    /// Executes `command` and returns its `return` value. Events that
    /// arrive meanwhile are kept for [`QmpClient::next_event`].
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"execute": command, "id": id});
        if !arguments.is_empty() {
            request["arguments"] = Value::Object(arguments);
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.writer.write_all(&line).map_err(ClientError::Io)?;
        loop {
            let mut message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            let Some(reply) = message.as_object_mut() else {
                continue;
            };
            match reply.get("id") {
                Some(v) if v == &json!(id) => {}
                // A reply to a message the server could not read.
                None if reply.contains_key("error") => {}
                _ => continue,
            }
            if let Some(value) = reply.remove("return") {
                return Ok(value);
            }
            return Err(match reply.get("error") {
                Some(error) => ClientError::Qmp(parse_error(error)?),
                None => ClientError::Protocol(format!("unexpected reply {message}")),
            });
        }
    }

    /// The next event, `{"event": ..., "data": ..., "timestamp": ...}`,
    /// waiting for it if none is pending.
    pub fn next_event(&mut self) -> Result<Value, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                return Ok(message);
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut line = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut line)
            .map_err(ClientError::Io)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(ClientError::Closed);
        }
        serde_json::from_slice(&line).map_err(|e| {
            ClientError::Protocol(format!(
                "invalid JSON from the server ({e}): {}",
                String::from_utf8_lossy(&line).trim_end()
            ))
        })
    }
}

/// Reads an `error` member; an unknown class becomes `GenericError`.
fn parse_error(error: &Value) -> Result<QmpError, ClientError> {
    let class = error.get("class").and_then(Value::as_str);
    let desc = error.get("desc").and_then(Value::as_str);
    match (class, desc) {
        (Some(class), Some(desc)) => Ok(QmpError::new(
            ErrorClass::from_name(class).unwrap_or(ErrorClass::GenericError),
            desc,
        )),
        _ => Err(ClientError::Protocol(format!("malformed error {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_members() {
        let e = parse_error(&json!({"class": "DeviceNotFound", "desc": "d"})).unwrap();
        assert_eq!(e, QmpError::device_not_found("d"));
        let e = parse_error(&json!({"class": "KVMMissingCap", "desc": "k"})).unwrap();
        assert_eq!(e, QmpError::generic("k"));
        assert!(parse_error(&json!({"class": "GenericError"})).is_err());
    }

    #[test]
    fn talks_over_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut out = b.try_clone().unwrap();
            let mut lines = BufReader::new(b).lines();
            out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let req: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(req["execute"], "qmp_capabilities");
            assert!(req.get("arguments").is_none());
            let reply = json!({"return": {}, "id": req["id"]});
            out.write_all(format!("{reply}\r\n").as_bytes()).unwrap();
            let req: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(req["arguments"], json!({"a": 1}));
            let event = json!({"event": "E", "timestamp": {"seconds": 1, "microseconds": 2}});
            let stale = json!({"return": 0, "id": "other"});
            let reply = json!({"error": {"class": "GenericError", "desc": "no"}, "id": req["id"]});
            out.write_all(format!("{event}\r\n{stale}\r\n{reply}\r\n").as_bytes())
                .unwrap();
        });
        let writer = a.try_clone().unwrap();
        let mut client = QmpClient {
            reader: BufReader::new(a),
            writer,
            greeting: Value::Null,
            next_id: 0,
            events: VecDeque::new(),
        };
        client.greeting = client.read_message().unwrap();
        client.execute("qmp_capabilities", Map::new()).unwrap();
        let mut args = Map::new();
        args.insert("a".into(), json!(1));
        match client.execute("x", args) {
            Err(ClientError::Qmp(e)) => assert_eq!(e, QmpError::generic("no")),
            other => panic!("{other:?}"),
        }
        assert_eq!(client.next_event().unwrap()["event"], "E");
        server.join().unwrap();
        assert!(matches!(client.next_event(), Err(ClientError::Closed)));
    }
}
