//! The transmission phase of one connection: a single thread parses the
//! client's pipelined requests, runs them concurrently on its own graph
//! executor and writes each reply as soon as it is complete.
//!
//! The socket is non-blocking; one `poll` waits for the socket, the
//! executor's eventfd (I/O completions) and the client's wake eventfd
//! (quiesce, resume, disconnect). Reading stops while the export is
//! quiesced and while too much is in flight or waiting to be sent, so a
//! client that does not read its replies cannot make the server buffer
//! without bound.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use blkgraph_graph::aio::Executor;
use blkgraph_graph::ZeroFlags;

use super::client::Client;
use super::export::NbdExport;
use super::proto::{self, Request, REQUEST_SIZE};
use super::reply::{OutQueue, Reply};
use super::request::{self, Done, ReadMode, Timed};
use super::session::{MetaContext, Session};
use super::socket::Stream;
use crate::stats::{now_ns, OpKind, Outcome, Sample, SourceStats};

/// Size of the receive buffer.
const INBUF_SIZE: usize = 256 << 10;
/// Most requests running at once per connection.
const MAX_IN_FLIGHT: usize = 1024;
/// Most bytes of memory held by running requests and unsent replies before
/// the connection stops reading (one request, however large, is allowed
/// when nothing is held).
const MAX_BUFFERED: usize = 256 << 20;
/// Most receive calls in a row before completions are looked at.
const MAX_RECVS: usize = 16;

/// Where the receiver is in the request stream.
enum RxState {
    /// Expecting a request header.
    Header,
    /// Reading the payload of a write.
    Payload {
        req: Request,
        buf: Vec<u8>,
        filled: usize,
    },
    /// Dropping the payload of a write that is refused (too large).
    Discard { req: Request, left: u64 },
}

struct Connection<'a> {
    client: &'a Client,
    export: Arc<NbdExport>,
    structured: bool,
    contexts: Arc<[MetaContext]>,
    fd: RawFd,
    exec: Executor<Timed>,
    /// This connection's counters, written by its thread only.
    stats: Arc<SourceStats>,
    out: OutQueue,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    state: RxState,
    /// Bytes held by running requests.
    held: usize,
    /// The client closed its side of the socket: nothing more to read.
    eof: bool,
    /// The client sent NBD_CMD_DISC or broke the protocol: nothing more to
    /// parse either.
    closing: bool,
}

/// Serves requests until the client disconnects or is disconnected; every
/// request started has completed when this returns.
pub fn serve(client: &Client, session: Session, stream: Stream) -> io::Result<()> {
    // Blocking socket: every call but the idle wait passes MSG_DONTWAIT.
    stream.set_timeouts(None)?;
    stream.set_nonblocking(false)?;
    let stats = session.export.stats_source();
    let mut conn = Connection {
        client,
        stats: stats.clone(),
        export: session.export,
        structured: session.structured,
        contexts: session.contexts.into(),
        fd: stream.as_raw_fd(),
        exec: Executor::new()?,
        out: OutQueue::default(),
        inbuf: vec![0u8; INBUF_SIZE],
        start: 0,
        end: 0,
        state: RxState::Header,
        held: 0,
        eof: false,
        closing: false,
    };
    let result = conn.run();
    conn.drain();
    conn.export.retire_stats_source(&stats);
    drop(stream);
    result
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT)
}

fn recv_flags(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Connection<'_> {
    /// Whether more requests may start (flow control).
    fn can_take_requests(&self) -> bool {
        let held = self.held + self.out.held();
        held == 0 || (self.exec.pending() < MAX_IN_FLIGHT && held < MAX_BUFFERED)
    }

    /// Whether the socket should be read.
    fn wants_input(&self) -> bool {
        !self.eof && !self.closing && !self.export.paused() && self.can_take_requests()
    }

    fn run(&mut self) -> io::Result<()> {
        let mut readable = true;
        loop {
            if self.client.stopping() {
                return Ok(());
            }
            {
                let mut in_flight = self.client.requests.lock();
                let paused = self.export.paused();
                if !paused {
                    self.process_buffered();
                    if readable {
                        self.receive()?;
                    }
                }
                if self.run_executor() && self.exec.pending() > 0 {
                    // The completions just reaped posted the executor's
                    // eventfd: clear it now rather than wake up for it, and
                    // reap what completed meanwhile. (With nothing in flight
                    // the thread waits in recv, not poll: a stale count then
                    // costs at most one early wake-up later, as does a
                    // completion that woke a request that is not done.)
                    self.exec.consume_event();
                    self.run_executor();
                }
                *in_flight = self.exec.pending();
                self.client.requests.notify_if_idle(&in_flight);
            }
            if !self.out.is_empty() {
                self.out.write_to(self.fd)?;
            }
            let finished = self.closing || (self.eof && !self.export.paused());
            if finished && self.exec.pending() == 0 && self.out.is_empty() {
                return Ok(());
            }
            readable = self.wait()?;
        }
    }

    /// Whether a request header waits in the receive buffer that flow
    /// control would now let through: completions freed room after it was
    /// held back, and no socket event will come for it.
    fn header_ready(&self) -> bool {
        matches!(self.state, RxState::Header)
            && self.end - self.start >= REQUEST_SIZE
            && !self.closing
            && !self.export.paused()
            && self.can_take_requests()
    }

    /// Waits for something to do; returns whether the socket is readable.
    fn wait(&mut self) -> io::Result<bool> {
        if self.header_ready() {
            return Ok(false);
        }
        if self.exec.pending() == 0 && self.out.is_empty() && self.wants_input() {
            return self.wait_idle();
        }
        let mut events = 0;
        if self.wants_input() {
            events |= libc::POLLIN;
        }
        if !self.out.is_empty() {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                // A socket that is not waited on is left out: a hung-up
                // peer would otherwise wake poll again and again.
                fd: if events == 0 { -1 } else { self.fd },
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.exec.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.client.wake_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of pollfd for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        if fds[1].revents != 0 {
            self.exec.consume_event();
        }
        let kicked = fds[2].revents != 0;
        if kicked {
            self.client.consume_kick();
        }
        Ok(kicked || fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
    }

    /// Waits for the next request with nothing in flight: one blocking
    /// receive instead of poll and receive. Nothing but the socket can need
    /// this thread now: a quiescer finds no request in flight, one that
    /// arrives meanwhile is held because the export is paused, and a
    /// disconnect shuts the socket down, which ends the receive.
    fn wait_idle(&mut self) -> io::Result<bool> {
        self.compact();
        let room = self.inbuf.len() - self.end;
        match recv_flags(self.fd, &mut self.inbuf[self.end..], 0) {
            Ok(0) => {
                self.eof = true;
                Ok(false)
            }
            Ok(n) => {
                self.end += n;
                Ok(n == room)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Makes room at the end of the receive buffer.
    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.inbuf.len() {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Runs the executor; returns whether a request completed.
    fn run_executor(&mut self) -> bool {
        let (out, held, stats) = (&mut self.out, &mut self.held, &self.stats);
        let mut done_any = false;
        // One clock reading for the requests that finished together.
        let mut now = None;
        self.exec.run(|t| {
            if let Some(sample) = &t.sample {
                stats.record(sample, *now.get_or_insert_with(now_ns));
            }
            *held -= t.done.cost;
            out.push(t.done.reply);
            done_any = true;
        });
        done_any
    }

    /// Reads from the socket until it would block, the client closed it,
    /// or enough is in flight; parses and starts what arrived.
    fn receive(&mut self) -> io::Result<()> {
        for _ in 0..MAX_RECVS {
            if !self.wants_input() {
                return Ok(());
            }
            let room;
            let result = match &mut self.state {
                // Large payloads go straight into their buffer.
                RxState::Payload { buf, filled, .. }
                    if self.start == self.end && buf.len() - *filled >= INBUF_SIZE / 2 =>
                {
                    room = buf.len() - *filled;
                    match recv(self.fd, &mut buf[*filled..]) {
                        Ok(n) => {
                            *filled += n;
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                }
                _ => {
                    self.compact();
                    room = self.inbuf.len() - self.end;
                    match recv(self.fd, &mut self.inbuf[self.end..]) {
                        Ok(n) => {
                            self.end += n;
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.process_buffered();
                    // A short read drained the socket; poll says when more
                    // arrives, without a recv that would fail.
                    if n < room {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Parses what the receive buffer holds and starts the requests.
    fn process_buffered(&mut self) {
        while !self.closing {
            match &mut self.state {
                RxState::Header => {
                    if self.end - self.start < REQUEST_SIZE || !self.can_take_requests() {
                        return;
                    }
                    let mut h = [0u8; REQUEST_SIZE];
                    h.copy_from_slice(&self.inbuf[self.start..self.start + REQUEST_SIZE]);
                    self.start += REQUEST_SIZE;
                    match Request::parse(&h) {
                        Ok(req) => self.header(req),
                        Err(bad) => {
                            log::debug!(
                                "NBD client {}: bad request magic {:#x}, disconnecting",
                                self.client.id,
                                bad.0
                            );
                            self.protocol_error();
                            return;
                        }
                    }
                }
                RxState::Payload { req, buf, filled } => {
                    let n = (buf.len() - *filled).min(self.end - self.start);
                    buf[*filled..*filled + n]
                        .copy_from_slice(&self.inbuf[self.start..self.start + n]);
                    *filled += n;
                    self.start += n;
                    if *filled < buf.len() {
                        return;
                    }
                    let req = *req;
                    let RxState::Payload { buf, .. } =
                        std::mem::replace(&mut self.state, RxState::Header)
                    else {
                        unreachable!()
                    };
                    self.dispatch(req, buf);
                }
                RxState::Discard { req, left } => {
                    let n = (*left).min((self.end - self.start) as u64);
                    *left -= n;
                    self.start += n as usize;
                    if *left > 0 {
                        return;
                    }
                    let req = *req;
                    self.state = RxState::Header;
                    let msg = format!(
                        "len ({}) is larger than max len ({})",
                        req.length,
                        proto::MAX_PAYLOAD
                    );
                    self.fail(&req, proto::EINVAL, &msg);
                }
            }
        }
    }

    /// The stream cannot be trusted any more: stop reading, finish what
    /// runs, and close.
    fn protocol_error(&mut self) {
        self.closing = true;
        self.start = self.end;
    }

    fn fail(&mut self, req: &Request, error: u32, msg: &str) {
        if let Some(kind) = op_kind(req.command) {
            let sample = Sample {
                kind,
                offset: req.offset,
                bytes: u64::from(req.length),
                ns: 0,
                outcome: Outcome::Invalid,
            };
            self.stats.record(&sample, now_ns());
        }
        log::debug!(
            "NBD client {}: command {} failed: {msg}",
            self.client.id,
            req.command
        );
        self.out
            .push(Reply::error(self.structured, req.handle, error, msg));
    }

    /// A request header arrived: a write goes on to read its payload,
    /// anything else is dispatched.
    fn header(&mut self, req: Request) {
        if req.command != proto::CMD_WRITE {
            self.dispatch(req, Vec::new());
            return;
        }
        if req.length > proto::MAX_PAYLOAD {
            self.state = RxState::Discard {
                req,
                left: u64::from(req.length),
            };
        } else if req.length == 0 {
            self.dispatch(req, Vec::new());
        } else {
            self.state = RxState::Payload {
                req,
                buf: vec![0u8; req.length as usize],
                filled: 0,
            };
        }
    }

    /// Starts request `req`, which holds `cost` bytes while it runs.
    fn spawn(
        &mut self,
        req: &Request,
        cost: usize,
        future: impl std::future::Future<Output = Done> + Send + 'static,
    ) {
        self.held += cost;
        let kind = op_kind(req.command);
        let bytes = u64::from(req.length);
        self.exec
            .spawn(request::timed(kind, req.offset, bytes, future));
    }

    /// Validates a complete request, as QEMU's server does, and starts it.
    fn dispatch(&mut self, req: Request, payload: Vec<u8>) {
        use proto::*;
        let (h, s) = (req.handle, self.structured);
        let fua = req.flags & CMD_FLAG_FUA != 0;
        match req.command {
            CMD_DISC => {
                self.closing = true;
                self.start = self.end;
                return;
            }
            CMD_READ | CMD_CACHE if req.length > MAX_PAYLOAD => {
                let msg = format!(
                    "len ({}) is larger than max len ({MAX_PAYLOAD})",
                    req.length
                );
                return self.fail(&req, EINVAL, &msg);
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM if !self.export.writable() => {
                return self.fail(&req, EPERM, "Export is read-only");
            }
            _ => {}
        }
        let size = self.export.size();
        if req.command != CMD_FLUSH
            && (req.offset > size || u64::from(req.length) > size - req.offset)
        {
            let error = match req.command {
                CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
                _ => EINVAL,
            };
            let msg = format!(
                "operation past EOF; From: {}, Len: {}, Size: {size}",
                req.offset, req.length
            );
            return self.fail(&req, error, &msg);
        }
        let valid = CMD_FLAG_FUA
            | match req.command {
                CMD_READ if s => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if req.flags & !valid != 0 {
            let msg = format!(
                "unsupported flags for command {} (got {:#x})",
                req.command, req.flags
            );
            return self.fail(&req, EINVAL, &msg);
        }
        let node = self.export.node();
        let len = req.length;
        match req.command {
            CMD_READ => {
                let mode = if !s {
                    ReadMode::Simple
                } else if req.flags & CMD_FLAG_DF != 0 || len < request::SPARSE_READ_MIN {
                    ReadMode::Whole
                } else {
                    ReadMode::Sparse
                };
                self.spawn(
                    &req,
                    len as usize,
                    request::read(node, h, req.offset, len, mode),
                );
            }
            CMD_WRITE => {
                let fua = fua || self.export.writethrough();
                self.spawn(
                    &req,
                    payload.len(),
                    request::write(node, h, req.offset, payload, fua, s),
                );
            }
            CMD_FLUSH => self.spawn(&req, 0, request::flush(node, h, s)),
            CMD_TRIM => self.spawn(&req, 0, request::trim(node, h, req.offset, len, fua, s)),
            // A prefetch hint: nothing to gain from the page cache twice.
            CMD_CACHE => self.out.push(Reply::simple(h, 0)),
            CMD_WRITE_ZEROES => {
                if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                    return self.fail(&req, ENOTSUP, "fast zeroing is not supported");
                }
                let flags = ZeroFlags {
                    may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                    fua: fua || self.export.writethrough(),
                };
                self.spawn(
                    &req,
                    0,
                    request::write_zeroes(node, h, req.offset, len, flags, s),
                );
            }
            CMD_BLOCK_STATUS => {
                if self.contexts.is_empty() {
                    return self.fail(&req, EINVAL, "CMD_BLOCK_STATUS not negotiated");
                }
                if len == 0 {
                    return self.fail(&req, EINVAL, "need non-zero length");
                }
                let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
                let contexts = self.contexts.clone();
                self.spawn(
                    &req,
                    0,
                    request::block_status(node, h, req.offset, len, req_one, contexts),
                );
            }
            other => {
                let msg = format!("invalid request type ({other}) received");
                self.fail(&req, EINVAL, &msg);
            }
        }
    }

    /// Waits until every started request has completed; their replies are
    /// dropped.
    fn drain(&mut self) {
        let (out, held) = (&mut self.out, &mut self.held);
        let stats = &self.stats;
        self.exec.run_until_idle(|t| {
            if let Some(sample) = &t.sample {
                stats.record(sample, now_ns());
            }
            *held -= t.done.cost;
            out.push(t.done.reply);
        });
        let mut in_flight = self.client.requests.lock();
        *in_flight = 0;
        self.client.requests.notify_if_idle(&in_flight);
    }
}

/// What the statistics count a command as.
fn op_kind(command: u16) -> Option<OpKind> {
    match command {
        proto::CMD_READ => Some(OpKind::Read),
        proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => Some(OpKind::Write),
        proto::CMD_FLUSH => Some(OpKind::Flush),
        proto::CMD_TRIM => Some(OpKind::Unmap),
        _ => None,
    }
}
