//! The `nbd` protocol driver: a client of an NBD server (qemu-nbd, nbdkit,
//! qemu-storage-daemon, blkgraph), QEMU's `driver=nbd`.
//!
//! One connection per node carries many requests at once. A request is
//! sent by the task that makes it, on its own executor's io_uring, under an
//! async lock that keeps messages whole. Replies (structured or simple) are
//! read on the executors that wait for them, as QEMU reads them in the
//! requesting coroutine's thread: every executor with a request in flight
//! watches the socket on its io_uring, and the one that sees it readable
//! reads every reply that arrived, copies read data straight into the
//! requests' buffers and wakes them (see [`Receiver`]). The table of
//! requests in flight holds a clone of each read's buffer, so a dropped
//! future leaves its memory valid until the reply was read.
//!
//! When the connection fails, every request in flight is put back to wait
//! for a new connection, and the node's connection thread, which does
//! nothing else, reconnects (first after 100 ms, then
//! backing off to 2 s between attempts). Requests wait at most
//! `reconnect-delay` seconds from the failure and are sent again on the new
//! connection, so a server restart within the delay is a pause for the
//! node's users. After the delay (at once with `reconnect-delay=0`, the
//! default, where requests in flight fail too) a request asks for one
//! immediate attempt and fails with EIO if it does not connect; this is
//! QEMU's behaviour. A job writing to the node that is cancelled by force
//! ends the delay at once (`cancel_in_flight`), so that `job-cancel` and
//! shutdown do not wait for it. An attempt (connect and handshake) ends
//! within 10 s, and within the delay while there is one, whatever the
//! server does (a server that stopped accepting, or answers slowly).
//!
//! A reply that breaks the protocol (data outside its read, an unknown
//! cookie, a bad chunk) ends the connection and fails the requests in
//! flight at once, whatever the delay: sent again, they would meet the
//! same server. A new connection must serve the export as the first did
//! (size, commands, block sizes: `ExportInfo::incompatible_with`).

mod proto;

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use parking_lot::{Condvar, Mutex};
use serde::Deserialize;
use socket2::{Domain, SockAddr, Socket, Type};

use self::proto::ExportInfo;
use crate::aio::{run_blocking, sleep, submit, AsyncMutex, Keepalive, SharedWatch, WatchUse};
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, BlockLimits, BlockStatus, IoFuture, WriteFlags, ZeroFlags};
use crate::error::Error;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry { name: "nbd", open };

/// Longest a connect or a handshake may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause between reconnect attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Largest discard or write-zeroes request sent at once.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Largest structured reply payload that is not read data.
const MAX_CHUNK: u32 = 1 << 20;

#[derive(Deserialize, Clone, Debug)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Server {
    Unix { path: String },
    Inet { host: String, port: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NbdOptions {
    server: Server,
    #[serde(default)]
    export: Option<String>,
    #[serde(default)]
    reconnect_delay: Option<u32>,
    #[serde(default)]
    open_timeout: Option<u32>,
    #[serde(default)]
    tls_creds: Option<String>,
    #[serde(default)]
    tls_hostname: Option<String>,
    #[serde(default)]
    x_dirty_bitmap: Option<String>,
}

/// A connected stream socket.
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// The time left until `deadline`, or a timeout error.
fn time_left(deadline: Instant) -> io::Result<Duration> {
    match deadline.saturating_duration_since(Instant::now()) {
        Duration::ZERO => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the connection attempt timed out",
        )),
        left => Ok(left),
    }
}

/// Connects to a UNIX socket, waiting until `deadline` at most: a
/// listener whose backlog is full (a server that stopped accepting) makes
/// a plain connect wait for ever. The socket's send timeout bounds it.
fn connect_unix(path: &str, deadline: Instant) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_write_timeout(Some(time_left(deadline)?))?;
    match socket.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(UnixStream::from(OwnedFd::from(socket))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the server does not accept connections",
        )),
        Err(e) => Err(e),
    }
}

impl Sock {
    fn connect(server: &Server, deadline: Instant) -> io::Result<Sock> {
        match server {
            Server::Unix { path } => Ok(Sock::Unix(connect_unix(path, deadline)?)),
            Server::Inet { host, port } => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad port"))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in (host.as_str(), port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, time_left(deadline)?) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Sock::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Sock::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket whose reads and writes fail once `deadline` is past: it
/// bounds a whole handshake (a server may send slowly, or without end),
/// not only each call.
struct DeadlineSock<'a> {
    sock: &'a mut Sock,
    deadline: Instant,
}

impl Read for DeadlineSock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.set_timeout(Some(time_left(self.deadline)?))?;
        self.sock.read(buf)
    }
}

impl Write for DeadlineSock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.set_timeout(Some(time_left(self.deadline)?))?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects and negotiates, by `deadline` (at most [`CONNECT_TIMEOUT`]
/// from now); the socket is then blocking, without timeouts.
fn connect(server: &Server, export: &str, deadline: Instant) -> io::Result<(Sock, ExportInfo)> {
    let deadline = deadline.min(Instant::now() + CONNECT_TIMEOUT);
    let mut sock = Sock::connect(server, deadline)?;
    let info = proto::handshake(
        &mut DeadlineSock {
            sock: &mut sock,
            deadline,
        },
        export,
    )?;
    sock.set_timeout(None)?;
    Ok((sock, info))
}

/// What a request waits for.
enum Outcome {
    Pending(Option<Waker>),
    /// The reply: a block status for NBD_CMD_BLOCK_STATUS.
    Done(Result<Option<BlockStatus>, i32>),
    /// The connection failed first: send again on the next one.
    Retry,
}

/// A request whose reply has not been read.
struct Inflight {
    kind: u16,
    offset: u64,
    len: u32,
    /// Where a read's data goes.
    buf: Option<IoBuffer>,
    outcome: Arc<Mutex<Outcome>>,
    /// The first error chunk of a structured reply.
    error: Option<i32>,
    status: Option<BlockStatus>,
    /// Keeps the socket watched on the executor that sent the request
    /// until its reply was read, also when its future was dropped.
    _watch: WatchUse,
}

enum Conn {
    /// Connected: the socket requests are written to.
    Up(Link),
    /// Reconnecting; requests wait until the deadline.
    Reconnecting(Instant),
    /// Requests fail (reconnect-delay is over, or 0).
    Down,
    Closed,
}

struct State {
    conn: Conn,
    inflight: HashMap<u64, Inflight>,
    /// Requests waiting for a connection.
    waiters: Vec<Waker>,
    /// Reconnect attempts made so far, and waits for a reconnection
    /// cancelled (`cancel_in_flight`): a request that began waiting at an
    /// earlier epoch fails once the node is `Down`.
    epoch: u64,
    /// A request in state `Down` asks for an attempt now.
    attempt_wanted: bool,
}

struct Shared {
    node: String,
    server: Server,
    export: String,
    reconnect_delay: Duration,
    info: ExportInfo,
    state: Mutex<State>,
    /// Wakes the connection thread's pauses on close.
    closing: Condvar,
    cookie: AtomicU64,
    send_lock: AsyncMutex<()>,
}

/// A node's connection to its NBD server.
pub struct Nbd {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn open(ctx: &mut OpenContext<'_, '_>, options: Options) -> Result<Box<dyn BlockDriver>, Error> {
    let opts: NbdOptions = options.parse("")?;
    if opts.tls_creds.is_some() || opts.tls_hostname.is_some() {
        return Err(Error::OpenFailed(
            "TLS is not supported by blkgraph's NBD client (tls-creds, tls-hostname)".into(),
        ));
    }
    if opts.x_dirty_bitmap.is_some() {
        return Err(Error::InvalidOptions(
            "Parameter 'x-dirty-bitmap' is not supported".into(),
        ));
    }
    let export = opts.export.clone().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(opts.open_timeout.unwrap_or(0).into());
    let describe = match &opts.server {
        Server::Unix { path } => format!("unix:{path}"),
        Server::Inet { host, port } => format!("{host}:{port}"),
    };
    let mut pause = RECONNECT_MIN;
    let (sock, info) = loop {
        match connect(&opts.server, &export, Instant::now() + CONNECT_TIMEOUT) {
            Ok(c) => break c,
            // A refusal by a server that answered is final.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(Error::OpenFailed(format!(
                    "Could not open NBD export '{export}' at {describe}: {e}"
                )))
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::OpenFailed(format!(
                    "Failed to connect to '{describe}': {e}"
                )))
            }
            Err(_) => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(RECONNECT_MAX);
            }
        }
    };
    if info.flags & proto::FLAG_READ_ONLY != 0 && !ctx.common.is_read_only() {
        return Err(Error::OpenFailed("NBD export is read-only".into()));
    }
    let shared = Arc::new(Shared {
        node: ctx.node_name().to_string(),
        server: opts.server,
        export,
        reconnect_delay: Duration::from_secs(opts.reconnect_delay.unwrap_or(0).into()),
        info,
        state: Mutex::new(State {
            conn: Conn::Down,
            inflight: HashMap::new(),
            waiters: Vec::new(),
            epoch: 0,
            attempt_wanted: false,
        }),
        closing: Condvar::new(),
        cookie: AtomicU64::new(1),
        send_lock: AsyncMutex::new(()),
    });
    shared.state.lock().conn = Conn::Up(Link::new(&shared, sock, &shared.info));
    let theirs = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("nbd-{}", shared.node))
        .spawn(move || connection_thread(theirs))
        .map_err(|e| Error::OpenFailed(format!("cannot start the NBD thread: {e}")))?;
    Ok(Box::new(Nbd {
        shared,
        thread: Mutex::new(Some(thread)),
    }))
}

/// Completes a request with `result` and forgets it; returns the waker of
/// its future, to be woken with the batch.
fn complete(
    state: &mut State,
    cookie: u64,
    result: Result<Option<BlockStatus>, i32>,
) -> Option<Waker> {
    let req = state.inflight.remove(&cookie)?;
    let old = std::mem::replace(&mut *req.outcome.lock(), Outcome::Done(result));
    match old {
        Outcome::Pending(w) => w,
        _ => None,
    }
}

fn protocol_error(text: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text.to_string())
}

/// Bytes read from the socket at once.
const RECV_BUFFER: usize = 64 << 10;
/// Read data at least this large goes from the socket straight into the
/// request's buffer.
const DIRECT_READ: usize = 16 << 10;
/// Longest part of a server's error message that is logged.
const MAX_MESSAGE: usize = 4096;

/// What the receiver expects next on the stream.
enum Step {
    /// A reply header (and the fixed fields of its chunk).
    Header,
    /// The data of a read, into `into` from `done`; then `end`.
    Data {
        into: IoBuffer,
        done: usize,
        end: ChunkEnd,
    },
    /// `left` bytes of no interest; then `end`.
    Skip { left: u64, end: ChunkEnd },
}

/// What a reply, or a chunk of a structured reply, tells its request once
/// it was read whole.
struct ChunkEnd {
    cookie: u64,
    kind: u16,
    /// A simple reply: the request is done, with `error`.
    simple: bool,
    /// NBD_REPLY_FLAG_DONE of a structured chunk.
    done: bool,
    error: Option<i32>,
    status: Option<BlockStatus>,
}

/// The reading half of a connection, run by the watches of its socket on
/// the executors whose requests wait for replies (see `aio::SharedWatch`).
/// When the socket is readable, the executor that sees it reads what the
/// socket holds, as much as fits a buffer, without blocking, and parses it
/// from there, across as many replies as arrived: a batch of replies costs
/// one or two system calls and no thread switch. Read data is copied into
/// the request's buffer (received straight into it when large); the
/// requests completed are woken together at the end of the batch (those of
/// the executor's own thread without a system call). A reply cut off by the
/// end of what arrived is taken up where it stopped at the next readiness.
struct Receiver {
    sock: Arc<Sock>,
    /// The id of `base:allocation` on this connection.
    base_allocation: Option<u32>,
    buf: Box<[u8]>,
    /// The unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    step: Step,
    /// Requests completed in this batch.
    wakers: Vec<Waker>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Reads from `fd` into `buf`'s segments without blocking: the bytes
/// read, or `None` if nothing is there.
fn recv_into(fd: RawFd, buf: &IoBuffer) -> io::Result<Option<usize>> {
    let segs = buf.segments();
    // SAFETY: msghdr is plain data for which zero bytes are valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = segs.as_ptr().cast_mut();
    msg.msg_iovlen = segs.len().min(libc::UIO_MAXIOV as usize) as _;
    loop {
        // SAFETY: the iovecs point to memory that `buf` keeps valid and
        // that is only written through system calls; msg is valid.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => return Ok(Some(n as usize)),
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(e),
                }
            }
        }
    }
}

impl Receiver {
    fn new(sock: Arc<Sock>, base_allocation: Option<u32>) -> Self {
        Receiver {
            sock,
            base_allocation,
            buf: vec![0; RECV_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            step: Step::Header,
            wakers: Vec::new(),
        }
    }

    /// Reads and handles every reply the socket holds; an error means the
    /// connection failed. Wakes the requests completed either way.
    fn pump(&mut self, shared: &Shared) -> io::Result<()> {
        let result = (|| loop {
            while self.advance(shared)? {}
            if !self.read_more()? {
                return Ok(());
            }
        })();
        self.wakers.drain(..).for_each(Waker::wake);
        result
    }

    /// Reads what the socket holds without blocking; false if nothing.
    fn read_more(&mut self) -> io::Result<bool> {
        if let Step::Data { into, done, .. } = &mut self.step {
            let left = into.len() - *done;
            if self.start == self.end && left >= DIRECT_READ {
                let rest = into.slice(*done, left);
                return Ok(match recv_into(self.sock.as_raw_fd(), &rest)? {
                    Some(n) => {
                        *done += n;
                        true
                    }
                    None => false,
                });
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // The current step needs less than the buffer holds: there is room.
        debug_assert!(self.end < self.buf.len());
        loop {
            let free = &mut self.buf[self.end..];
            // SAFETY: recv writes at most free.len() bytes into free.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    free.as_mut_ptr().cast(),
                    free.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => {
                    self.end += n as usize;
                    return Ok(true);
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => {}
                        io::ErrorKind::WouldBlock => return Ok(false),
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    /// Handles what the buffer holds for the current step; false when it
    /// needs more bytes.
    fn advance(&mut self, shared: &Shared) -> io::Result<bool> {
        let avail = self.end - self.start;
        match std::mem::replace(&mut self.step, Step::Header) {
            Step::Header => self.header(shared),
            Step::Data {
                into,
                mut done,
                end,
            } => {
                let n = avail.min(into.len() - done);
                into.copy_from(done, &self.buf[self.start..self.start + n]);
                self.start += n;
                done += n;
                if done == into.len() {
                    self.chunk_end(shared, end);
                    Ok(true)
                } else {
                    self.step = Step::Data { into, done, end };
                    Ok(false)
                }
            }
            Step::Skip { left, end } => {
                let n = (avail as u64).min(left);
                self.start += n as usize;
                if n == left {
                    self.chunk_end(shared, end);
                    Ok(true)
                } else {
                    self.step = Step::Skip {
                        left: left - n,
                        end,
                    };
                    Ok(false)
                }
            }
        }
    }

    /// Parses a reply header and its chunk's fixed fields once they are all
    /// in the buffer; false until then.
    fn header(&mut self, shared: &Shared) -> io::Result<bool> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 4 {
            return Ok(false);
        }
        match be32(b) {
            proto::SIMPLE_REPLY_MAGIC => {
                if b.len() < 16 {
                    return Ok(false);
                }
                let (error, cookie) = (be32(&b[4..]), be64(&b[8..]));
                self.start += 16;
                let (kind, _, _, buf) = lookup(shared, cookie)?;
                if kind == proto::CMD_BLOCK_STATUS
                    || (kind == proto::CMD_READ && shared.info.structured)
                {
                    return Err(protocol_error("the server sent a simple reply to a read"));
                }
                let end = ChunkEnd {
                    cookie,
                    kind,
                    simple: true,
                    done: true,
                    error: (error != 0).then(|| proto::errno(error)),
                    status: None,
                };
                match buf {
                    Some(into) if kind == proto::CMD_READ && error == 0 => {
                        self.step = Step::Data { into, done: 0, end };
                    }
                    _ => self.chunk_end(shared, end),
                }
                Ok(true)
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                if b.len() < 20 {
                    return Ok(false);
                }
                let (flags, chunk) = (be16(&b[4..]), be16(&b[6..]));
                let (cookie, length) = (be64(&b[8..]), be32(&b[16..]));
                let fixed = match chunk {
                    proto::REPLY_TYPE_OFFSET_DATA => 8,
                    proto::REPLY_TYPE_OFFSET_HOLE | proto::REPLY_TYPE_BLOCK_STATUS => 12,
                    t if t & proto::REPLY_TYPE_ERROR_BIT != 0 && length >= 6 => {
                        if b.len() < 26 {
                            return Ok(false);
                        }
                        6 + usize::from(be16(&b[24..])).min(MAX_MESSAGE)
                    }
                    _ => 0,
                }
                .min(length as usize);
                if b.len() < 20 + fixed {
                    return Ok(false);
                }
                let body = b[20..20 + fixed].to_vec();
                self.start += 20 + fixed;
                let (kind, offset, len, buf) = lookup(shared, cookie)?;
                let mut end = ChunkEnd {
                    cookie,
                    kind,
                    simple: false,
                    done: flags & proto::REPLY_FLAG_DONE != 0,
                    error: None,
                    status: None,
                };
                // What follows the fixed fields.
                let left = u64::from(length) - fixed as u64;
                match chunk {
                    proto::REPLY_TYPE_NONE if length == 0 => {}
                    proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE
                        if kind == proto::CMD_READ && length >= 8 =>
                    {
                        let at = be64(&body);
                        let n = if chunk == proto::REPLY_TYPE_OFFSET_DATA {
                            u64::from(length - 8)
                        } else if length == 12 {
                            u64::from(be32(&body[8..]))
                        } else {
                            return Err(protocol_error("bad hole chunk"));
                        };
                        // As QEMU: an empty chunk is an error too, wherever it
                        // claims to lie.
                        let inside = n > 0
                            && at.checked_sub(offset).is_some_and(|skip| {
                                skip <= u64::from(len) && n <= u64::from(len) - skip
                            });
                        if !inside {
                            return Err(protocol_error("the server sent data outside the read"));
                        }
                        let buf = buf.ok_or_else(|| protocol_error("read without a buffer"))?;
                        let part = buf.slice((at - offset) as usize, n as usize);
                        if chunk == proto::REPLY_TYPE_OFFSET_DATA {
                            self.step = Step::Data {
                                into: part,
                                done: 0,
                                end,
                            };
                            return Ok(true);
                        }
                        part.fill_zero(0, part.len());
                    }
                    proto::REPLY_TYPE_BLOCK_STATUS
                        if kind == proto::CMD_BLOCK_STATUS
                            && (12..=MAX_CHUNK).contains(&length) =>
                    {
                        let (id, ext_len, ext_flags) =
                            (be32(&body), be32(&body[4..]), be32(&body[8..]));
                        if Some(id) == self.base_allocation {
                            if ext_len == 0 {
                                end.error = Some(libc::EIO);
                            } else {
                                end.status = Some(BlockStatus {
                                    len: u64::from(ext_len.min(len)),
                                    data: ext_flags & proto::STATE_HOLE == 0,
                                    zero: ext_flags & proto::STATE_ZERO != 0,
                                    depth: 1,
                                });
                            }
                        }
                    }
                    t if t & proto::REPLY_TYPE_ERROR_BIT != 0
                        && (6..=MAX_CHUNK).contains(&length) =>
                    {
                        let (code, msg_len) = (be32(&body), be16(&body[4..]));
                        if u32::from(msg_len) > length - 6 {
                            return Err(protocol_error("bad error chunk"));
                        }
                        log::debug!(
                            "nbd node {}: server error {code}: {}",
                            shared.node,
                            String::from_utf8_lossy(&body[6..])
                        );
                        end.error = Some(if code == 0 {
                            libc::EINVAL
                        } else {
                            proto::errno(code)
                        });
                    }
                    _ => return Err(protocol_error("the server sent an unexpected reply chunk")),
                }
                if left == 0 {
                    self.chunk_end(shared, end);
                } else {
                    self.step = Step::Skip { left, end };
                }
                Ok(true)
            }
            _ => Err(protocol_error("the server sent a bad reply magic")),
        }
    }

    /// A reply or chunk was read whole: record it, and complete its request
    /// if it was the last.
    fn chunk_end(&mut self, shared: &Shared, end: ChunkEnd) {
        let mut state = shared.state.lock();
        let waker = if end.simple {
            complete(&mut state, end.cookie, end.error.map_or(Ok(None), Err))
        } else {
            let Some(req) = state.inflight.get_mut(&end.cookie) else {
                return;
            };
            if req.error.is_none() {
                req.error = end.error;
            }
            if req.status.is_none() {
                req.status = end.status;
            }
            if !end.done {
                return;
            }
            let result = match (req.error, req.status) {
                (Some(e), _) => Err(e),
                (None, None) if end.kind == proto::CMD_BLOCK_STATUS => Err(libc::EIO),
                (None, status) => Ok(status),
            };
            complete(&mut state, end.cookie, result)
        };
        drop(state);
        self.wakers.extend(waker);
    }
}

/// Looks a request up: its kind, offset, length and buffer.
fn lookup(shared: &Shared, cookie: u64) -> io::Result<(u16, u64, u32, Option<IoBuffer>)> {
    let state = shared.state.lock();
    let req = state
        .inflight
        .get(&cookie)
        .ok_or_else(|| protocol_error("the server replied to an unknown request"))?;
    Ok((req.kind, req.offset, req.len, req.buf.clone()))
}

/// A connection to the server: its socket, and the watches that read its
/// replies on the executors waiting for them (see [`Receiver`]).
struct Link {
    sock: Arc<Sock>,
    watch: Arc<SharedWatch>,
}

impl Link {
    /// Starts reading replies from `sock`, negotiated as `info`, for
    /// `shared`'s requests.
    fn new(shared: &Arc<Shared>, sock: Sock, info: &ExportInfo) -> Link {
        let sock = Arc::new(sock);
        let rx = Mutex::new(Receiver::new(sock.clone(), info.base_allocation));
        let (weak, theirs) = (Arc::downgrade(shared), sock.clone());
        let watch = SharedWatch::new(
            sock.as_raw_fd(),
            Box::new(sock.clone()),
            Box::new(move || {
                let Some(shared) = weak.upgrade() else {
                    return false;
                };
                let result = rx.lock().pump(&shared);
                match result {
                    Ok(()) => true,
                    Err(why) => {
                        connection_lost(&shared, &theirs, &why);
                        false
                    }
                }
            }),
        );
        Link { sock, watch }
    }
}

/// The connection on `sock` failed (or the node closed): requests in flight
/// wait for the next connection (or fail at once with
/// `reconnect-delay=0`), and the connection thread reconnects. A server
/// that broke the protocol (`InvalidData`) would likely break it again
/// with the same requests: they fail at once, as with a delay of 0, and
/// the next request asks for a new connection (QEMU's client gives the
/// node up for good then). Nothing happens for a connection that was
/// replaced already.
fn connection_lost(shared: &Shared, sock: &Arc<Sock>, why: &io::Error) {
    let mut state = shared.state.lock();
    let current = matches!(&state.conn, Conn::Up(link) if Arc::ptr_eq(&link.sock, sock));
    let closed = matches!(state.conn, Conn::Closed);
    if !current && !closed {
        return;
    }
    sock.shutdown();
    let broken = why.kind() == io::ErrorKind::InvalidData;
    let wait = current && !broken && !shared.reconnect_delay.is_zero();
    if current {
        log::warn!(
            "nbd node {}: connection lost ({why}); {}",
            shared.node,
            if broken {
                "requests in flight fail"
            } else {
                "reconnecting"
            }
        );
        state.conn = if wait {
            Conn::Reconnecting(Instant::now() + shared.reconnect_delay)
        } else {
            Conn::Down
        };
    }
    let mut wakers: Vec<Waker> = state.waiters.drain(..).collect();
    let inflight: Vec<Inflight> = state.inflight.drain().map(|(_, req)| req).collect();
    drop(state);
    shared.closing.notify_all();
    for req in inflight {
        let new = if wait {
            Outcome::Retry
        } else {
            Outcome::Done(Err(libc::EIO))
        };
        if let Outcome::Pending(Some(w)) = std::mem::replace(&mut *req.outcome.lock(), new) {
            wakers.push(w);
        }
    }
    wakers.into_iter().for_each(Waker::wake);
}

/// Reconnects whenever the connection was lost, until the node closes.
fn connection_thread(shared: Arc<Shared>) {
    loop {
        {
            let mut state = shared.state.lock();
            while matches!(state.conn, Conn::Up(_)) {
                shared.closing.wait(&mut state);
            }
            if matches!(state.conn, Conn::Closed) {
                return;
            }
        }
        if !reconnect(&shared) {
            return;
        }
    }
}

/// Reconnects until it succeeds (true) or the node is closed (false).
/// Once reconnect-delay is over, waiting requests fail; from then on a new
/// request asks for an attempt at once and fails if it does not connect
/// (QEMU's behaviour, also with a delay of 0).
fn reconnect(shared: &Arc<Shared>) -> bool {
    let mut pause = RECONNECT_MIN;
    loop {
        let deadline = {
            let mut state = shared.state.lock();
            let deadline = match state.conn {
                Conn::Closed => return false,
                Conn::Reconnecting(deadline) => Some(deadline),
                _ => None,
            };
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                state.conn = Conn::Down;
                let wakers: Vec<Waker> = state.waiters.drain(..).collect();
                drop(state);
                log::warn!(
                    "nbd node {}: reconnect-delay expired; requests fail until the server is back",
                    shared.node
                );
                wakers.into_iter().for_each(Waker::wake);
                continue;
            }
            if !state.attempt_wanted {
                let wait = left.map_or(pause, |l| l.min(pause));
                shared.closing.wait_for(&mut state, wait);
            }
            if matches!(state.conn, Conn::Closed) {
                return false;
            }
            state.attempt_wanted = false;
            deadline
        };
        pause = (pause * 2).min(RECONNECT_MAX);
        // Within reconnect-delay, an attempt ends with it: requests wait
        // no longer than the delay, whatever the server does.
        let by = deadline.unwrap_or_else(|| Instant::now() + CONNECT_TIMEOUT);
        let attempt =
            connect(&shared.server, &shared.export, by).and_then(|(sock, info)| {
                match info.incompatible_with(&shared.info) {
                    Some(why) => Err(io::Error::other(format!(
                        "the server's export changed: {why}"
                    ))),
                    None => Ok((sock, info)),
                }
            });
        let mut state = shared.state.lock();
        state.epoch += 1;
        let wakers: Vec<Waker> = state.waiters.drain(..).collect();
        let connected = match attempt {
            Err(e) => {
                log::debug!("nbd node {}: reconnect failed: {e}", shared.node);
                false
            }
            Ok(_) if matches!(state.conn, Conn::Closed) => return false,
            Ok((sock, info)) => {
                state.conn = Conn::Up(Link::new(shared, sock, &info));
                log::warn!("nbd node {}: reconnected", shared.node);
                true
            }
        };
        drop(state);
        wakers.into_iter().for_each(Waker::wake);
        if connected {
            return true;
        }
    }
}

/// Shuts the socket down if a send stopped half-way (its future was
/// dropped): the stream would be out of step.
struct SendGuard(Option<Arc<Sock>>);

impl Drop for SendGuard {
    fn drop(&mut self) {
        if let Some(sock) = self.0.take() {
            sock.shutdown();
        }
    }
}

/// A request registered but not yet being sent: if its future is dropped
/// (waiting for the send lock), the request is taken out of the table, as
/// nothing will ever answer it and `drain` would wait for it for ever.
struct Unsent<'a> {
    shared: &'a Shared,
    cookie: u64,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.shared.state.lock().inflight.remove(&self.cookie);
    }
}

/// A request registered on a connection: the socket to send it on, its
/// cookie and where its outcome arrives.
type Started = (Arc<Sock>, u64, Arc<Mutex<Outcome>>);

/// Waits for the outcome of a request.
struct Reply(Arc<Mutex<Outcome>>);

impl Future for Reply {
    type Output = Option<Result<Option<BlockStatus>, i32>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut outcome = self.0.lock();
        match &mut *outcome {
            Outcome::Pending(w) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            Outcome::Done(r) => Poll::Ready(Some(*r)),
            Outcome::Retry => Poll::Ready(None),
        }
    }
}

impl Nbd {
    /// Waits for a connection; registers the request in its table.
    fn start(
        &self,
        cx: &mut Context<'_>,
        asked: &mut Option<u64>,
        kind: u16,
        offset: u64,
        len: u32,
        buf: Option<&IoBuffer>,
    ) -> Poll<io::Result<Started>> {
        let mut state = self.shared.state.lock();
        match &state.conn {
            // Registered under the lock that `connection_lost` empties the
            // table under: a request is either in the table when its
            // connection fails (and is sent again) or sees the new state.
            Conn::Up(link) => {
                let watch = match link.watch.enter() {
                    Ok(w) => w,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                let sock = link.sock.clone();
                let cookie = self.shared.cookie.fetch_add(1, Ordering::Relaxed);
                let outcome = Arc::new(Mutex::new(Outcome::Pending(None)));
                state.inflight.insert(
                    cookie,
                    Inflight {
                        kind,
                        offset,
                        len,
                        buf: buf.cloned(),
                        outcome: outcome.clone(),
                        error: None,
                        status: None,
                        _watch: watch,
                    },
                );
                Poll::Ready(Ok((sock, cookie, outcome)))
            }
            // Waits for the reconnection; if the delay ends first, the
            // attempts made meanwhile count as this request's: it fails
            // then, as QEMU's do, rather than wait for one more. So it
            // does when the wait is cancelled.
            Conn::Reconnecting(_) => {
                asked.get_or_insert(state.epoch);
                state.waiters.push(cx.waker().clone());
                Poll::Pending
            }
            // Not connected and not waiting: one attempt, now, for this
            // request; it fails if that does not connect.
            Conn::Down => match *asked {
                Some(n) if state.epoch > n => Poll::Ready(Err(errno(libc::EIO))),
                Some(_) => {
                    state.waiters.push(cx.waker().clone());
                    Poll::Pending
                }
                None => {
                    *asked = Some(state.epoch);
                    state.attempt_wanted = true;
                    state.waiters.push(cx.waker().clone());
                    self.shared.closing.notify_all();
                    Poll::Pending
                }
            },
            Conn::Closed => Poll::Ready(Err(errno(libc::EIO))),
        }
    }

    /// Writes `msg` to the socket on this executor's io_uring.
    async fn send(&self, sock: &Arc<Sock>, msg: IoBuffer, unsent: Unsent<'_>) -> io::Result<()> {
        let _lock = self.shared.send_lock.lock().await;
        // From here a dropped future is SendGuard's.
        std::mem::forget(unsent);
        let mut guard = SendGuard(Some(sock.clone()));
        let mut done = 0;
        while done < msg.len() {
            let rest = msg.slice(done, msg.len() - done);
            let segs = rest.segments();
            let n = segs.len().min(libc::UIO_MAXIOV as usize) as u32;
            let entry = opcode::Writev::new(types::Fd(sock.as_raw_fd()), segs.as_ptr(), n).build();
            let keep = Keepalive::Other(Box::new((rest.clone(), sock.clone())));
            // SAFETY: the entry points to `rest`'s iovec array and memory
            // and to the socket, all kept in the reactor until completion.
            let written = unsafe { submit(entry, keep) }?.await?;
            if written == 0 {
                return Err(errno(libc::EPIPE));
            }
            done += written as usize;
        }
        guard.0 = None;
        Ok(())
    }

    /// One request, sent again after reconnects; at most `max_block`
    /// bytes for reads and writes.
    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&IoBuffer>,
    ) -> io::Result<Option<BlockStatus>> {
        loop {
            let read_buf = if kind == proto::CMD_READ { data } else { None };
            let mut asked = None;
            let (sock, cookie, outcome) =
                std::future::poll_fn(|cx| self.start(cx, &mut asked, kind, offset, len, read_buf))
                    .await?;
            let header =
                IoBuffer::from_vec(proto::request(flags, kind, cookie, offset, len).to_vec());
            let msg = match data {
                Some(d) if kind == proto::CMD_WRITE => IoBuffer::concat(&[header, d.clone()]),
                _ => header,
            };
            let unsent = Unsent {
                shared: &self.shared,
                cookie,
            };
            if let Err(e) = self.send(&sock, msg, unsent).await {
                log::debug!("nbd node {}: send failed: {e}", self.shared.node);
                // The connection thread sees the failure and retries or
                // fails the request.
                sock.shutdown();
            }
            match Reply(outcome).await {
                Some(Ok(status)) => return Ok(status),
                Some(Err(e)) => return Err(errno(e)),
                None => continue,
            }
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.shared.info.flags & flag != 0
    }

    fn max_block(&self) -> u64 {
        u64::from(self.shared.info.max_block)
    }

    /// Splits `[offset, offset + len)` into pieces of at most `max` bytes
    /// and runs `f` on each, in order.
    async fn split<'a, F, Fut>(
        &'a self,
        offset: u64,
        len: u64,
        max: u64,
        mut f: F,
    ) -> io::Result<()>
    where
        F: FnMut(u64, u64) -> Fut,
        Fut: Future<Output = io::Result<()>> + 'a,
    {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            f(offset + done, n).await?;
            done += n;
        }
        Ok(())
    }

    async fn rw(&self, offset: u64, buf: &IoBuffer, write: bool, fua: bool) -> io::Result<()> {
        let max = self.max_block();
        let fua_flag = if fua && self.has(proto::FLAG_SEND_FUA) {
            proto::CMD_FLAG_FUA
        } else {
            0
        };
        let kind = if write {
            proto::CMD_WRITE
        } else {
            proto::CMD_READ
        };
        let mut done = 0u64;
        let len = buf.len() as u64;
        while done < len {
            let n = (len - done).min(max);
            let part = buf.slice(done as usize, n as usize);
            self.request(kind, fua_flag, offset + done, n as u32, Some(&part))
                .await?;
            done += n;
        }
        if fua && fua_flag == 0 {
            self.flush_now().await?;
        }
        Ok(())
    }

    async fn flush_now(&self) -> io::Result<()> {
        if !self.has(proto::FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(proto::CMD_FLUSH, 0, 0, 0, None)
            .await
            .map(|_| ())
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let chunk = self.max_block().min(len).min(1 << 20) as usize;
        let zeroes = IoBuffer::from_vec(vec![0; chunk]);
        self.split(offset, len, chunk as u64, |off, n| {
            let part = zeroes.slice(0, n as usize);
            async move { self.rw(off, &part, true, fua).await }
        })
        .await
    }
}

impl BlockDriver for Nbd {
    /// The connection was opened for reading or for writing; blkgraph does
    /// not open it again.
    fn reopen_prepare(&self, reopen: &crate::driver::Reopen<'_>) -> Result<(), Error> {
        reopen.same_read_only("nbd")
    }

    fn size(&self) -> u64 {
        self.shared.info.size
    }

    fn limits(&self) -> BlockLimits {
        BlockLimits {
            request_alignment: u64::from(self.shared.info.min_block),
            max_transfer: Some(self.max_block()),
            remote: true,
            ..BlockLimits::default()
        }
    }

    fn filename(&self) -> Option<String> {
        let export = &self.shared.export;
        Some(match &self.shared.server {
            Server::Unix { path } => format!("nbd+unix:///{export}?socket={path}"),
            Server::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
        })
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(self.rw(offset, buf, false, false))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(self.rw(offset, buf, true, flags.fua))
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.flush_now())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if !self.has(proto::FLAG_SEND_TRIM) {
                return Ok(()); // advisory
            }
            self.split(offset, len, MAX_ZERO_REQUEST, |off, n| async move {
                self.request(proto::CMD_TRIM, 0, off, n as u32, None)
                    .await
                    .map(|_| ())
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            if !self.has(proto::FLAG_SEND_WRITE_ZEROES) {
                return self.write_zero_buffers(offset, len, flags.fua).await;
            }
            let mut f = 0;
            if !flags.may_unmap {
                f |= proto::CMD_FLAG_NO_HOLE;
            }
            if flags.fua && self.has(proto::FLAG_SEND_FUA) {
                f |= proto::CMD_FLAG_FUA;
            }
            self.split(offset, len, MAX_ZERO_REQUEST, |off, n| async move {
                self.request(proto::CMD_WRITE_ZEROES, f, off, n as u32, None)
                    .await
                    .map(|_| ())
            })
            .await?;
            if flags.fua && !self.has(proto::FLAG_SEND_FUA) {
                self.flush_now().await?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let len = len.min(self.size().saturating_sub(offset));
            if self.shared.info.base_allocation.is_none() || len == 0 {
                return Ok(BlockStatus {
                    len,
                    data: true,
                    zero: false,
                    depth: 1,
                });
            }
            let min = u64::from(self.shared.info.min_block);
            let n = len.min(MAX_ZERO_REQUEST).max(len.min(min));
            let status = self
                .request(
                    proto::CMD_BLOCK_STATUS,
                    proto::CMD_FLAG_REQ_ONE,
                    offset,
                    n as u32,
                    None,
                )
                .await?;
            status.ok_or_else(|| errno(libc::EIO))
        })
    }

    fn drain(&self) -> IoFuture<'_> {
        Box::pin(async move {
            // Replies to requests whose futures were dropped. Their
            // executors may be gone: this one watches the socket meanwhile.
            let mut watching = None;
            loop {
                {
                    let state = self.shared.state.lock();
                    let Conn::Up(link) = &state.conn else {
                        return Ok(());
                    };
                    if state.inflight.is_empty() {
                        return Ok(());
                    }
                    if watching.is_none() {
                        watching = Some(link.watch.enter()?);
                    }
                }
                sleep(Duration::from_millis(1)).await?;
            }
        })
    }

    /// A job that writes to the node was cancelled by force: requests
    /// waiting for a reconnection fail now rather than at the end of
    /// `reconnect-delay`, and later ones as after it (one attempt each),
    /// as QEMU's `nbd_cancel_in_flight`.
    fn cancel_in_flight(&self) {
        let mut state = self.shared.state.lock();
        if !matches!(state.conn, Conn::Reconnecting(_)) {
            return;
        }
        state.conn = Conn::Down;
        state.epoch += 1;
        let wakers: Vec<Waker> = state.waiters.drain(..).collect();
        drop(state);
        log::warn!(
            "nbd node {}: requests waiting for a reconnection cancelled",
            self.shared.node
        );
        wakers.into_iter().for_each(Waker::wake);
    }

    fn close(&self) -> IoFuture<'_> {
        Box::pin(async move {
            self.stop(true);
            let thread = self.thread.lock().take();
            if let Some(thread) = thread {
                run_blocking(move || {
                    let _ = thread.join();
                    Ok(0)
                })
                .await?;
            }
            Ok(())
        })
    }
}

impl Nbd {
    /// Ends the connection (with NBD_CMD_DISC if `polite`) and stops the
    /// connection thread.
    fn stop(&self, polite: bool) {
        let mut state = self.shared.state.lock();
        if let Conn::Up(Link { sock, .. }) = &state.conn {
            if polite {
                let cookie = self.shared.cookie.fetch_add(1, Ordering::Relaxed);
                send_disconnect(sock, cookie);
            }
            sock.shutdown();
        }
        state.conn = Conn::Closed;
        let wakers: Vec<Waker> = state.waiters.drain(..).collect();
        drop(state);
        self.shared.closing.notify_all();
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Sends NBD_CMD_DISC if the socket takes it at once. The socket is shut
/// down right after, so the request is a courtesy: a server that stopped
/// reading, its socket's send buffer full, must not hold up the close
/// (and the node's state with it) for ever.
fn send_disconnect(sock: &Sock, cookie: u64) {
    let msg = proto::request(0, proto::CMD_DISC, cookie, 0, 0);
    // SAFETY: send reads at most msg.len() bytes of msg, which lives
    // across the call.
    let _ = unsafe {
        libc::send(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

impl Drop for Nbd {
    fn drop(&mut self) {
        self.stop(false);
        if let Some(thread) = self.thread.get_mut().take() {
            let _ = thread.join();
        }
    }
}
