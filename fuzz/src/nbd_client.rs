//! The `nbd_client` harness: bytes as what an NBD server sends to
//! blkgraph's NBD client node (`driver=nbd`), from the greeting through
//! option replies into transmission replies.
//!
//! Each input is served on a UNIX socket bound for it in a temporary
//! directory (made once per process): a worker thread accepts one
//! connection, removes the socket's name (so that the node's reconnection
//! attempts fail at once), writes the input, ends its sending side and
//! reads what the client sends until the client closes. The node is
//! opened on that socket with `reconnect-delay=0`; if the handshake
//! succeeds, requests of every kind go to it at once (reads, one of
//! 20 KiB, large enough to be received straight into its buffer, a FUA
//! write, write-zeroes, discard, flush and block status), in a
//! fixed order, so that their cookies are 1, 2, ... and an input can
//! answer them. Then the node is removed.
//!
//! What must hold: no panic; the open and every request end, with a
//! result or an error, within libFuzzer's timeout (a server whose bytes
//! end closes its side, which ends the connection for the client); the
//! node's removal ends; no descriptor stays open and no thread running.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::nbd::workers;
use crate::Leftovers;
use blkgraph_graph::aio::{block_on, join_all, IoFuture};
use blkgraph_graph::{Graph, IoBuffer, Options, WriteFlags, ZeroFlags};

/// The longest the client may take once the server's bytes have ended.
pub const DEADLINE: Duration = Duration::from_secs(5);

struct Place {
    dir: tempfile::TempDir,
}

fn place() -> &'static Place {
    static PLACE: OnceLock<Place> = OnceLock::new();
    PLACE.get_or_init(|| Place {
        dir: tempfile::tempdir().expect("temporary directory"),
    })
}

fn socket_path() -> PathBuf {
    place().dir.path().join("server.sock")
}

/// What the harness sets up once per process (see `nbd::init`).
pub fn init() {
    crate::daemon_signals();
    crate::log_if_verbose();
    place();
    workers();
}

/// Serves `data` to the first client of `listener`, reading what the
/// client sends until it closes.
fn serve(listener: UnixListener, data: Vec<u8>) {
    let accepted = listener.accept();
    // No second connection: reconnection attempts fail at once.
    let _ = std::fs::remove_file(socket_path());
    drop(listener);
    let Ok((mut stream, _)) = accepted else {
        return;
    };
    // Read while writing: the client sends options and requests whatever
    // the input holds.
    let reader = stream.try_clone().expect("clone");
    let reading = workers()
        .reading
        .run(move || crate::read_until_closed(reader, DEADLINE * 4));
    let _ = stream.write_all(&data);
    let _ = stream.shutdown(Shutdown::Write);
    reading.recv().expect("reader thread");
}

/// The harness.
pub fn run(data: &[u8]) {
    init();
    let left = Leftovers::now();
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    // Accepts when the open below connects.
    let served = workers().serving.run({
        let data = data.to_vec();
        move || serve(listener, data)
    });
    let graph = Graph::new();
    let arg = format!(
        "driver=nbd,node-name=c,server.type=unix,server.path={},export=exp",
        path.display()
    );
    if let Ok(node) = graph.add(Options::from_arg(&arg, None).expect("options")) {
        let size = node.size();
        let reads: Vec<IoBuffer> = [4096usize, 20480, 512]
            .iter()
            .map(|&n| IoBuffer::from_vec(vec![0; n]))
            .collect();
        let data = IoBuffer::from_vec(vec![0x11; 4096]);
        let at = |offset: u64, len: u64| offset.min(size.saturating_sub(len));
        let ops: Vec<IoFuture<'_>> = vec![
            node.read(at(0, 4096), &reads[0]),
            node.read(at(1 << 20, 20480), &reads[1]),
            node.write(at(8192, 4096), &data, WriteFlags { fua: true }),
            node.write_zeroes(at(16384, 4096), 4096, ZeroFlags::default()),
            node.discard(at(0, 4096), 4096),
            node.flush(),
            Box::pin(async { node.block_status(0, size.min(1 << 20)).await.map(|_| ()) }),
            node.read(at(size / 2, 512), &reads[2]),
        ];
        // Errors are what a broken server earns; only their end matters.
        let _ = block_on(join_all(ops)).expect("executor");
        drop(node);
        graph.remove("c").expect("remove the node");
    }
    served
        .recv_timeout(DEADLINE * 6)
        .expect("the server's side ends");
    left.check_none_left(DEADLINE);
}
