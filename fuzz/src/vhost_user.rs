//! The `vhost_user` harness: bytes as the messages a vhost-user frontend
//! sends to a vhost-user-blk export, over a real connection.
//!
//! One export is started once per process, through the same
//! `vhost_user_blk::start_export` as `block-export-add` (two queues,
//! writable, on a 1 MiB `null-co` node with `read-zeroes=on`), on a unix
//! socket in a temporary directory. Each input is one connection to it:
//! the input is cut into messages, each a 12-byte header (`request`,
//! `flags`, `size`, little-endian) and then `size` bytes of payload (fewer
//! if the input ends first), sent as they are. A message whose request
//! carries descriptors gets them as ancillary data, as a frontend sends
//! them: for `SET_MEM_TABLE` one per region it declares (at most 8), for
//! `ADD_MEM_REG`, `SET_LOG_BASE` and `SET_DEVICE_STATE_FD` one 1 MiB
//! memfd holding the input (so guest memory, and the rings and
//! requests in it, are the fuzzer's bytes), for `SET_INFLIGHT_FD` a 1 MiB
//! memfd sealed against shrinking and growing, as QEMU passes back the
//! region `GET_INFLIGHT_FD` gave it, that starts with the input's last
//! [`INFLIGHT_TAIL`] bytes (so the inflight state a new backend resubmits
//! from is the fuzzer's bytes too: a seed puts it after its last message),
//! for
//! `SET_BACKEND_REQ_FD` one end of a socket pair, for `SET_VRING_KICK`,
//! `SET_VRING_CALL`, `SET_VRING_ERR` and `SET_LOG_FD` an eventfd, already
//! signalled (a kick the queue's thread sees at once). Then the harness
//! stops writing and reads what the backend sends until it closes the
//! connection. The export is served by blkgraph's own handler
//! (`vhost_user_blk/handler.rs`, with inflight tracking), through the
//! same server loop as any frontend's connection.
//!
//! What must hold: no panic or abort in any of the daemon's threads; the
//! backend ends the session within [`DEADLINE`] once the frontend's bytes
//! end; every reply is a well-formed vhost-user message (a request number
//! the protocol has, the REPLY flag and version 1, a payload of the size
//! it gives, at most [`MAX_REPLY`] bytes); and once the session is over
//! the process has at most [`FD_SLACK`] descriptors more open than after
//! the first session.

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::{describe_fds, read_until_closed};
use blkgraph_backend::vhost_user_blk::{start_export, VhostUserBlkExport};
use blkgraph_graph::{Graph, Options};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The longest a session may take to end once the frontend's bytes have
/// ended, and to give its descriptors back.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The largest reply payload (GET_CONFIG's is at most 256 bytes, the
/// largest message vhost allows is 4 KiB).
pub const MAX_REPLY: u32 = 4096;
/// The header's REPLY flag and version bits.
const REPLY_FLAG: u32 = 0x4;
const VERSION: u32 = 0x1;

// The requests that carry descriptors (vhost-user's numbering).
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_LOG_FD: u32 = 7;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const SET_BACKEND_REQ_FD: u32 = 21;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
const SET_DEVICE_STATE_FD: u32 = 42;
/// The last request number vhost 0.18 knows.
const LAST_REQUEST: u32 = 44;

struct Export {
    socket: PathBuf,
    _export: Arc<VhostUserBlkExport>,
    _graph: Graph,
    _dir: tempfile::TempDir,
}

fn export() -> &'static Export {
    static EXPORT: OnceLock<Export> = OnceLock::new();
    EXPORT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("vub.sock");
        let graph = Graph::new();
        graph
            .add(
                Options::from_arg("driver=null-co,node-name=n0,size=1M,read-zeroes=on", None)
                    .expect("node options"),
            )
            .expect("node");
        let options = serde_json::json!({
            "id": "vub0",
            "node-name": "n0",
            "writable": true,
            "num-queues": 2,
            "addr": {"type": "unix", "path": socket},
        });
        let options = Options::from_json(options).expect("export options");
        let export = start_export(&graph, options, None).expect("vhost-user-blk export");
        Export {
            socket,
            _export: export,
            _graph: graph,
            _dir: dir,
        }
    })
}

/// How many more descriptors than after the first session the process
/// may have once a session is over. The server makes the daemon for the
/// next frontend while the last one's is still going away, and the first
/// session starts state kept for the process (the I/O threads' rings), so
/// the count is not exact; a descriptor leaked per session still passes
/// this bound within a few inputs.
pub const FD_SLACK: usize = 16;

/// Waits until the process has at most [`FD_SLACK`] descriptors more
/// open than after the first session (the first call sets that).
fn check_fds() {
    static BASELINE: OnceLock<Vec<String>> = OnceLock::new();
    let start = Instant::now();
    let Some(baseline) = BASELINE.get() else {
        // Give the first session's threads a moment to end.
        std::thread::sleep(Duration::from_millis(100));
        let _ = BASELINE.set(describe_fds());
        return;
    };
    loop {
        let now = describe_fds();
        if now.len() <= baseline.len() + FD_SLACK {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{} descriptors open after the session, {} after the first:\n{now:#?}\nafter the first:\n{baseline:#?}",
            now.len(),
            baseline.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A 1 MiB memfd that starts with `data`, sealed against shrinking and
/// growing if `sealed`. A memfd rather than a file, as QEMU's
/// `memory-backend-memfd` passes guest memory: a file system's inode
/// allocation took a tenth of the harness's time.
fn memfd(name: &std::ffi::CStr, data: &[u8], sealed: bool) -> File {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor it
    // returns is owned by the File alone.
    let file = unsafe {
        let fd = libc::memfd_create(name.as_ptr(), flags);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        File::from_raw_fd(fd)
    };
    (&file)
        .write_all(data)
        .and_then(|()| file.set_len(1 << 20))
        .expect("memfd size");
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: fcntl on a descriptor the File owns.
        let done = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert!(
            done == 0,
            "F_ADD_SEALS: {}",
            std::io::Error::last_os_error()
        );
    }
    file
}

/// A memory region holding the input (unsealed: the backend's size
/// check is what is fuzzed).
fn memory_file(data: &[u8]) -> File {
    memfd(c"fuzz-memory", data, false)
}

/// How many of the input's last bytes an inflight region starts with.
pub const INFLIGHT_TAIL: usize = 1024;

/// An inflight region that starts with the input's last
/// [`INFLIGHT_TAIL`] bytes, sealed, as a frontend passes back the region
/// GET_INFLIGHT_FD gave it (SET_INFLIGHT_FD).
fn inflight_file(input: &[u8]) -> File {
    memfd(
        c"fuzz-inflight",
        &input[input.len().saturating_sub(INFLIGHT_TAIL)..],
        true,
    )
}

/// The descriptors a frontend would send with `request`.
enum Fds {
    Files(Vec<File>),
    Events(Vec<EventFd>),
    /// The end of a socket pair that is sent (the other one is kept
    /// until the session is over).
    Channel(UnixStream, UnixStream),
}

impl Fds {
    fn raw(&self) -> Vec<RawFd> {
        match self {
            Fds::Files(f) => f.iter().map(AsRawFd::as_raw_fd).collect(),
            Fds::Events(e) => e.iter().map(AsRawFd::as_raw_fd).collect(),
            Fds::Channel(sent, _) => vec![sent.as_raw_fd()],
        }
    }
}

fn fds_for(request: u32, payload: &[u8], input: &[u8]) -> Fds {
    match request {
        SET_MEM_TABLE => {
            let regions = payload
                .get(..4)
                .map_or(0, |n| u32::from_le_bytes(n.try_into().expect("4 bytes")));
            Fds::Files((0..regions.min(8)).map(|_| memory_file(input)).collect())
        }
        ADD_MEM_REG | SET_LOG_BASE | SET_DEVICE_STATE_FD => Fds::Files(vec![memory_file(input)]),
        SET_INFLIGHT_FD => Fds::Files(vec![inflight_file(input)]),
        SET_BACKEND_REQ_FD => {
            let (sent, kept) = UnixStream::pair().expect("socket pair");
            Fds::Channel(sent, kept)
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR | SET_LOG_FD => {
            let event = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            event.write(1).expect("eventfd write");
            Fds::Events(vec![event])
        }
        _ => Fds::Events(Vec::new()),
    }
}

/// What the harness sets up once per process: the fuzz target runs it
/// before libFuzzer's first input, so that the per-input timeout counts
/// none of it; [`run`] calls it too, a no-op by then, for callers that
/// replay inputs without the target.
pub fn init() {
    crate::daemon_signals();
    crate::log_if_verbose();
    export();
}

/// The harness.
pub fn run(data: &[u8]) {
    init();
    let export = export();
    let stream = UnixStream::connect(&export.socket).expect("connect to the export");
    let reader = stream.try_clone().expect("clone");
    let reading = std::thread::spawn(move || read_until_closed(reader, DEADLINE));
    let mut rest = data;
    // Our ends of the backend-request channels sent, open until the end.
    let mut channels = Vec::new();
    while rest.len() >= 12 {
        let request = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        let len = (12 + size).min(rest.len());
        let (message, tail) = rest.split_at(len);
        rest = tail;
        let attached = fds_for(request, &message[12..], data);
        // A failed send means the backend closed the connection: what it
        // sent until then is still checked.
        let sent = stream.send_with_fds(&[message], &attached.raw());
        if let Fds::Channel(_, ours) = attached {
            channels.push(ours);
        }
        if sent.is_err() {
            break;
        }
    }
    if !rest.is_empty() {
        let _ = (&stream).write_all(rest);
    }
    let _ = stream.shutdown(Shutdown::Write);
    let replies = reading.join().expect("reader thread");
    drop((stream, channels));
    check_replies(&replies);
    check_fds();
}

/// Checks the backend's replies (see the module's documentation).
pub fn check_replies(replies: &[u8]) {
    let mut rest = replies;
    while !rest.is_empty() {
        let at = replies.len() - rest.len();
        assert!(rest.len() >= 12, "a partial reply header at {at}");
        let word = |i: usize| u32::from_le_bytes(rest[4 * i..4 * i + 4].try_into().expect("4"));
        let (request, flags, size) = (word(0), word(1), word(2));
        assert!(
            (1..=LAST_REQUEST).contains(&request),
            "reply at {at}: request {request}"
        );
        assert_eq!(
            flags & (REPLY_FLAG | 0x3),
            REPLY_FLAG | VERSION,
            "reply at {at}: flags {flags:#x}"
        );
        assert!(size <= MAX_REPLY, "reply at {at}: {size} bytes");
        assert!(
            rest.len() >= 12 + size as usize,
            "reply at {at}: {size} bytes announced, {} sent",
            rest.len() - 12
        );
        rest = &rest[12 + size as usize..];
    }
}
