//! Broadcasting events to the negotiated clients.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::json::to_line;

/// One encoded message, shared by the queues of all clients.
pub(crate) type Line = Arc<[u8]>;

/// A client that receives events.
struct Subscriber {
    id: u64,
    queue: SyncSender<Line>,
    conn: UnixStream,
}

#[derive(Default)]
struct Subscribers {
    next_id: u64,
    list: Vec<Subscriber>,
    /// Events sent with [`Events::emit_or_hold`] while no client was
    /// negotiated: for the first one that is.
    held: Vec<Line>,
}

/// A handle that sends events to every negotiated client of the servers
/// it was given to. Cloning it gives another handle to the same clients.
///
/// Sending never blocks: a client whose outgoing queue is full (it does not
/// read, or not fast enough) is disconnected.
#[derive(Clone, Default)]
pub struct Events {
    inner: Arc<Mutex<Subscribers>>,
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct Event<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    timestamp: Timestamp,
}

impl Events {
    /// A handle with no clients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `{"event": EVENT, "data": DATA, "timestamp": {"seconds": S,
    /// "microseconds": US}}` to every negotiated client. `data` is
    /// normally an object; `Value::Null` leaves the member out, as QEMU does
    /// for events without data.
    pub fn emit(&self, event: &str, data: Value) {
        send(&mut self.lock(), encode(event, &data));
    }

    /// Sends an event as [`Events::emit`] does or, while no client is
    /// negotiated (the daemon is starting), keeps it for the first client
    /// that negotiates, which gets it right after the reply that completes
    /// negotiation: what a daemon found as it started is not lost on the
    /// client that connects once it is ready.
    pub fn emit_or_hold(&self, event: &str, data: Value) {
        let line = encode(event, &data);
        let mut subs = self.lock();
        if subs.list.is_empty() {
            subs.held.push(line);
        } else {
            send(&mut subs, line);
        }
    }

    /// The number of clients that receive events.
    pub fn subscribers(&self) -> usize {
        self.lock().list.len()
    }

    /// Queues `first` (the reply that completes negotiation) and adds the
    /// client, atomically with respect to [`Events::emit`]: the client gets
    /// every event emitted after the reply, and none before it (but those
    /// held for the first client, if it is). Returns the
    /// subscription id, or `None` if the queue was full (the client is then
    /// disconnected).
    pub(crate) fn subscribe(
        &self,
        first: Line,
        queue: SyncSender<Line>,
        conn: UnixStream,
    ) -> Option<u64> {
        let mut subs = self.lock();
        if queue.try_send(first).is_err() {
            let _ = conn.shutdown(Shutdown::Both);
            return None;
        }
        for line in std::mem::take(&mut subs.held) {
            if queue.try_send(line).is_err() {
                let _ = conn.shutdown(Shutdown::Both);
                return None;
            }
        }
        let id = subs.next_id;
        subs.next_id += 1;
        subs.list.push(Subscriber { id, queue, conn });
        Some(id)
    }

    /// Removes a client added by [`Events::subscribe`].
    pub(crate) fn unsubscribe(&self, id: u64) {
        self.lock().list.retain(|s| s.id != id);
    }

    fn lock(&self) -> MutexGuard<'_, Subscribers> {
        // The list stays consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Encodes `{"event": EVENT, "data": DATA, "timestamp": ...}`, stamped now.
fn encode(event: &str, data: &Value) -> Line {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    to_line(&Event {
        event,
        data: (!data.is_null()).then_some(data),
        timestamp: Timestamp {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        },
    })
    .into()
}

/// Queues `line` for every client; a client whose queue is full is
/// disconnected.
fn send(subs: &mut Subscribers, line: Line) {
    subs.list.retain(|s| match s.queue.try_send(line.clone()) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            log::warn!("QMP client cannot keep up with events: disconnecting it");
            let _ = s.conn.shutdown(Shutdown::Both);
            false
        }
        Err(TrySendError::Disconnected(_)) => false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::mpsc::sync_channel;

    fn parse(line: &[u8]) -> Value {
        assert!(line.ends_with(b"\r\n"));
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn emit_reaches_subscribers_after_first_line() {
        let events = Events::new();
        events.emit("EARLY", json!({}));
        let (tx, rx) = sync_channel(4);
        let (conn, _peer) = UnixStream::pair().unwrap();
        let id = events
            .subscribe(Arc::from(&b"first\r\n"[..]), tx, conn)
            .unwrap();
        assert_eq!(events.subscribers(), 1);
        events.emit("E1", json!({"id": "x"}));
        events.emit("E2", Value::Null);
        assert_eq!(&*rx.recv().unwrap(), b"first\r\n");
        let e1 = parse(&rx.recv().unwrap());
        assert_eq!(e1["event"], "E1");
        assert_eq!(e1["data"], json!({"id": "x"}));
        assert!(e1["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e1["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        let e2 = parse(&rx.recv().unwrap());
        assert_eq!(e2["event"], "E2");
        assert!(e2.get("data").is_none());
        events.unsubscribe(id);
        assert_eq!(events.subscribers(), 0);
    }

    #[test]
    fn held_events_go_to_the_first_client_only() {
        let events = Events::new();
        events.emit_or_hold("HELD", json!({"n": 1}));
        events.emit("DROPPED", json!({}));
        let (tx, rx) = sync_channel(4);
        let (conn, _peer) = UnixStream::pair().unwrap();
        events
            .subscribe(Arc::from(&b"first\r\n"[..]), tx, conn)
            .unwrap();
        events.emit_or_hold("LATER", json!({}));
        assert_eq!(&*rx.recv().unwrap(), b"first\r\n");
        assert_eq!(parse(&rx.recv().unwrap())["event"], "HELD");
        assert_eq!(parse(&rx.recv().unwrap())["event"], "LATER");
        assert!(rx.try_recv().is_err());
        let (tx2, rx2) = sync_channel(4);
        let (conn2, _peer2) = UnixStream::pair().unwrap();
        events
            .subscribe(Arc::from(&b"first\r\n"[..]), tx2, conn2)
            .unwrap();
        assert_eq!(&*rx2.recv().unwrap(), b"first\r\n");
        assert!(rx2.try_recv().is_err());
    }

    #[test]
    fn full_queue_disconnects_the_client() {
        let events = Events::new();
        let (tx, _rx) = sync_channel(2);
        let (conn, mut peer) = UnixStream::pair().unwrap();
        events
            .subscribe(Arc::from(&b"first\r\n"[..]), tx, conn)
            .unwrap();
        events.emit("A", json!({}));
        assert_eq!(events.subscribers(), 1);
        events.emit("B", json!({}));
        assert_eq!(events.subscribers(), 0);
        // The connection was shut down: the peer sees end of file.
        let mut buf = [0u8; 8];
        assert_eq!(std::io::Read::read(&mut peer, &mut buf).unwrap(), 0);
    }

    #[test]
    fn closed_queue_is_forgotten() {
        let events = Events::new();
        let (tx, rx) = sync_channel(2);
        let (conn, _peer) = UnixStream::pair().unwrap();
        events
            .subscribe(Arc::from(&b"first\r\n"[..]), tx, conn)
            .unwrap();
        drop(rx);
        events.emit("A", json!({}));
        assert_eq!(events.subscribers(), 0);
    }
}
