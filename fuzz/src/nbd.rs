//! The `nbd` harness: bytes as what an NBD client sends, from the
//! handshake's client flags through option haggling into transmission.
//!
//! One NBD server is started once per process (on a unix socket in a
//! temporary directory, which no client ever connects to) with two
//! exports: `null`, a read-only `null-co` node of 1 MiB with
//! `read-zeroes=on` and a disabled dirty bitmap published as
//! `qemu:dirty-bitmap:bm0`, and `disk`, a writable raw node over a 1 MiB
//! unlinked file, with `qemu:allocation-depth`. Each input is written to
//! one end of a socket pair whose other end `NbdServer::serve_connection`
//! serves on another thread, exactly as the accept loop's connection
//! threads do; the harness reads everything the server sends until it
//! closes the connection.
//!
//! What must hold: no panic; the server ends the connection by itself
//! once the client's bytes end (within [`DEADLINE`]), and is left with no
//! client; no descriptor stays open and no thread running; and what it
//! sent is well-formed: the greeting, then option replies (magic, a known
//! reply type, a payload of the length given, within the protocol's
//! limits), then the `NBD_OPT_EXPORT_NAME` answer or transmission replies
//! (simple replies, or structured chunks of a known type whose lengths
//! fit), as far as they can be followed without the client's side.

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::{read_until_closed, Leftovers, Worker};
use blkgraph_backend::nbd::{proto, ListenAddress, NbdServer, NbdServerOptions};
use blkgraph_graph::{BitmapOptions, Graph, Options};

/// The longest a connection may take once the client's bytes have ended.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The size of both exports.
pub const EXPORT_SIZE: u64 = 1 << 20;

struct Server {
    server: NbdServer,
    _graph: Arc<Graph>,
    _dir: tempfile::TempDir,
    _image: File,
}

fn server() -> &'static NbdServer {
    static SERVER: OnceLock<Server> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temporary directory");
            let mut image = tempfile::tempfile().expect("image file");
            image
                .write_all(&[0x5a; 65536])
                .and_then(|()| image.set_len(EXPORT_SIZE))
                .expect("image size");
            let graph = Arc::new(Graph::new());
            let add = |arg: String| {
                graph
                    .add(Options::from_arg(&arg, None).expect("node options"))
                    .expect("node")
            };
            add(format!(
                "driver=null-co,node-name=n0,size={EXPORT_SIZE},read-zeroes=on"
            ));
            add(format!(
                "driver=file,node-name=f0,filename=/proc/self/fd/{}",
                image.as_raw_fd()
            ));
            add("driver=raw,node-name=disk0,file=f0".into());
            let mut tx = graph.transaction();
            // Disabled: an enabled bitmap cannot go with a read-only export.
            let disabled = BitmapOptions {
                disabled: true,
                ..BitmapOptions::default()
            };
            tx.bitmap_add("n0", "bm0", disabled).expect("bitmap");
            tx.commit().expect("bitmap commit");
            let server = NbdServer::start(
                &NbdServerOptions {
                    addr: ListenAddress::Unix {
                        path: dir.path().join("nbd.sock"),
                    },
                    max_connections: 0,
                    handshake_max_seconds: 0,
                },
                None,
            )
            .expect("NBD server");
            for arg in [
                "id=e0,node-name=n0,name=null,description=zeroes,bitmaps.0=bm0",
                "id=e1,node-name=disk0,name=disk,writable=on,allocation-depth=on",
            ] {
                server
                    .start_export(&graph, Options::from_arg(arg, None).expect("export"))
                    .expect("export");
            }
            Server {
                server,
                _graph: graph,
                _dir: dir,
                _image: image,
            }
        })
        .server
}

/// The threads that serve the connection and read its replies, the same
/// for every input (the `nbd_client` harness's too: a server and a reader
/// of what its client sends).
pub(crate) struct Workers {
    pub(crate) serving: Worker,
    pub(crate) reading: Worker,
}

pub(crate) fn workers() -> &'static Workers {
    static WORKERS: OnceLock<Workers> = OnceLock::new();
    WORKERS.get_or_init(|| Workers {
        serving: Worker::new("nbd-serving"),
        reading: Worker::new("nbd-reading"),
    })
}

/// What the harness sets up once per process: the fuzz target runs it
/// before libFuzzer's first input, so that the per-input timeout counts
/// none of it; [`run`] calls it too, a no-op by then, for callers that
/// replay inputs without the target.
pub fn init() {
    crate::daemon_signals();
    crate::log_if_verbose();
    server();
    workers();
}

/// The harness.
pub fn run(data: &[u8]) {
    init();
    let server = server();
    let left = Leftovers::now();
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let serving = workers()
        .serving
        .run(move || server.serve_connection(theirs));
    // Read while writing: the server may answer more than a socket holds.
    let reader = ours.try_clone().expect("clone");
    let reading = workers()
        .reading
        .run(move || read_until_closed(reader, DEADLINE));
    let mut writer = &ours;
    let _ = writer.write_all(data);
    let _ = ours.shutdown(Shutdown::Write);
    let replies = reading.recv().expect("reader thread");
    serving
        .recv()
        .expect("server thread")
        .expect("serve_connection");
    drop(ours);
    assert_eq!(server.client_count(), 0, "the client is still registered");
    left.check_none_left(DEADLINE);
    check_replies(data, &replies);
}

/// A cursor over the server's bytes.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.data.len() - self.at
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.data.get(self.at..self.at + n)?;
        self.at += n;
        Some(out)
    }

    fn peek(&self, n: usize) -> Option<&'a [u8]> {
        self.data.get(self.at..self.at + n)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Checks the server's bytes (see the module's documentation). A stream
/// may end anywhere: the server closes when the client's bytes end.
pub fn check_replies(client: &[u8], replies: &[u8]) {
    let mut c = Cursor {
        data: replies,
        at: 0,
    };
    // The greeting is sent before anything is read.
    assert_eq!(c.u64(), Some(proto::INIT_MAGIC), "greeting");
    assert_eq!(c.u64(), Some(proto::OPTS_MAGIC), "greeting");
    let flags = c.u16().expect("greeting flags");
    assert_eq!(
        flags & !(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES),
        0,
        "greeting flags {flags:#x}"
    );
    let no_zeroes = client.len() >= 4
        && u32::from_be_bytes(client[..4].try_into().expect("4 bytes")) & proto::FLAG_C_NO_ZEROES
            != 0;
    let mut structured = false;
    // Option haggling.
    while c.peek(8).map(|m| m == proto::REP_MAGIC.to_be_bytes()) == Some(true) {
        let at = c.at;
        c.u64();
        let (Some(option), Some(kind), Some(len)) = (c.u32(), c.u32(), c.u32()) else {
            return;
        };
        assert!(
            matches!(
                kind,
                proto::REP_ACK
                    | proto::REP_SERVER
                    | proto::REP_INFO
                    | proto::REP_META_CONTEXT
                    | proto::REP_ERR_UNSUP
                    | proto::REP_ERR_POLICY
                    | proto::REP_ERR_INVALID
                    | proto::REP_ERR_UNKNOWN
                    | proto::REP_ERR_SHUTDOWN
                    | proto::REP_ERR_BLOCK_SIZE_REQD
                    | proto::REP_ERR_TOO_BIG
            ),
            "option reply at {at}: type {kind:#x}"
        );
        assert!(
            len as usize <= 2 * proto::MAX_STRING + 64,
            "option reply at {at}: {len} bytes"
        );
        if kind == proto::REP_ACK {
            assert_eq!(len, 0, "option reply at {at}: ACK with a payload");
        }
        let Some(payload) = c.take(len as usize) else {
            return;
        };
        match kind {
            proto::REP_SERVER => {
                let name = u32::from_be_bytes(payload[..4].try_into().expect("name length"));
                assert!(4 + name as usize <= payload.len(), "REP_SERVER at {at}");
            }
            proto::REP_INFO => assert!(payload.len() >= 2, "REP_INFO at {at}"),
            proto::REP_META_CONTEXT => assert!(payload.len() > 4, "REP_META_CONTEXT at {at}"),
            _ => {}
        }
        if option == proto::OPT_STRUCTURED_REPLY && kind == proto::REP_ACK {
            structured = true;
        }
    }
    if c.left() == 0 {
        return;
    }
    // NBD_OPT_EXPORT_NAME's answer has no magic: the export's size.
    if c.peek(8) == Some(&EXPORT_SIZE.to_be_bytes()[..]) {
        c.u64();
        let Some(flags) = c.u16() else { return };
        assert_ne!(flags & proto::FLAG_HAS_FLAGS, 0, "export flags {flags:#x}");
        if !no_zeroes && c.take(124).map(|z| z.iter().all(|&b| b == 0)) == Some(false) {
            panic!("NBD_OPT_EXPORT_NAME's padding is not zero");
        }
    }
    // Transmission.
    while c.left() > 0 {
        let at = c.at;
        let Some(magic) = c.u32() else {
            panic!("a partial reply magic at {at}")
        };
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let (Some(error), Some(_handle)) = (c.u32(), c.u64()) else {
                    return;
                };
                if error == 0 && !structured {
                    // A read's data follows, of the length the client
                    // asked: the rest cannot be followed from here.
                    return;
                }
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                let (Some(_flags), Some(kind), Some(_handle), Some(len)) =
                    (c.u16(), c.u16(), c.u64(), c.u32())
                else {
                    return;
                };
                let min = match kind {
                    proto::REPLY_TYPE_NONE => 0,
                    proto::REPLY_TYPE_OFFSET_DATA => 8,
                    proto::REPLY_TYPE_OFFSET_HOLE => 12,
                    proto::REPLY_TYPE_BLOCK_STATUS => 4,
                    proto::REPLY_TYPE_ERROR => 6,
                    _ => panic!("structured reply at {at}: type {kind:#x}"),
                };
                assert!(len >= min, "structured reply at {at}: {len} bytes");
                assert!(
                    len <= proto::MAX_PAYLOAD + 8,
                    "structured reply at {at}: {len} bytes"
                );
                if kind == proto::REPLY_TYPE_NONE {
                    assert_eq!(len, 0, "structured reply at {at}: NONE with a payload");
                }
                let Some(payload) = c.take(len as usize) else {
                    return;
                };
                if kind == proto::REPLY_TYPE_ERROR {
                    let msg = u16::from_be_bytes(payload[4..6].try_into().expect("2 bytes"));
                    assert!(
                        6 + msg as usize <= payload.len(),
                        "structured error at {at}: message of {msg} bytes"
                    );
                }
            }
            _ => panic!("reply at {at}: magic {magic:#x}"),
        }
    }
}
