"""An NBD server whose replies a test scripts: for a client's answer to a
server that breaks the protocol or changes between connections.

It speaks fixed newstyle with structured replies and `base:allocation`
(doc/proto.md of the NBD project), serves one export of SIZE bytes of
zeroes on a UNIX socket, and answers each request through a function the
test gives, which gets the connection's number and the request and returns
the bytes to send.
"""

import os
import socket
import struct
import threading

INIT_MAGIC = 0x4E42444D41474943
OPTS_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 6, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT, REP_ERR_UNSUP = 1, 3, 4, (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_BLOCK_STATUS = 0, 1, 2, 7
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_BLOCK_STATUS = 0, 1, 5
# HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES
TRANSMISSION_FLAGS = 1 | 4 | 8 | 32 | 64


def chunk(cookie, kind, payload, done=True):
    """A structured reply chunk."""
    flags = REPLY_FLAG_DONE if done else 0
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, kind, cookie, len(payload)) + payload


def done(cookie):
    """The end of a structured reply without data (writes, flushes)."""
    return chunk(cookie, REPLY_TYPE_NONE, b"")


class Request:
    def __init__(self, conn, flags, kind, cookie, offset, length, context):
        self.conn, self.flags, self.kind = conn, flags, kind
        self.cookie, self.offset, self.length = cookie, offset, length
        # The id this connection gave base:allocation.
        self.context = context


def well_behaved(req):
    """Zeroes for reads, all of it a hole for block status, success else."""
    if req.kind == CMD_READ:
        return chunk(req.cookie, REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", req.offset) + bytes(req.length))
    if req.kind == CMD_BLOCK_STATUS:
        return chunk(req.cookie, REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", req.context, req.length, 3))
    return done(req.cookie)


class ScriptedServer:
    """Listens on `path`; `reply(req)` gives each request's answer, and
    `context(n)` the id of base:allocation on connection n (0, 1, ...).
    With `reads=False` it reads nothing after the handshake, as a server
    that hangs, until it is closed."""

    def __init__(self, path, size, reply=well_behaved, context=lambda n: 1, reads=True):
        self.path, self.size, self.reply, self.context = str(path), size, reply, context
        self.reads = reads
        self.closed = threading.Event()
        self.connections = 0
        self.lock = threading.Lock()
        self.open = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                n = self.connections
                self.connections += 1
                self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def drop_connections(self):
        """Ends every connection, as a server restart would."""
        with self.lock:
            for conn in self.open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open.clear()

    def stop_accepting(self):
        """Listens anew with a backlog of 0 and never accepts, as a server
        that stopped does: one connection waits in the backlog, the next
        connect cannot complete."""
        self.listener.close()
        os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(0)

    def close(self):
        self.closed.set()
        self.listener.close()
        self.drop_connections()

    def _serve(self, conn, n):
        try:
            with conn:
                self._handshake(conn, n)
                if not self.reads:
                    self.closed.wait()
                    return
                while True:
                    magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv(conn, 28))
                    assert magic == REQUEST_MAGIC
                    if kind == CMD_WRITE:
                        recv(conn, length)
                    if kind == CMD_DISC:
                        return
                    conn.sendall(self.reply(Request(n, flags, kind, cookie, offset, length, self.context(n))))
        except (OSError, EOFError):
            pass

    def _handshake(self, conn, n):
        conn.sendall(struct.pack(">QQH", INIT_MAGIC, OPTS_MAGIC, 1 | 2))
        recv(conn, 4)
        while True:
            magic, option, length = struct.unpack(">QII", recv(conn, 16))
            assert magic == OPTS_MAGIC
            data = recv(conn, length)

            def answer(kind, payload=b""):
                conn.sendall(struct.pack(">QIII", REP_MAGIC, option, kind, len(payload)) + payload)

            if option == OPT_STRUCTURED_REPLY:
                answer(REP_ACK)
            elif option == OPT_SET_META_CONTEXT:
                if b"base:allocation" in data:
                    answer(REP_META_CONTEXT, struct.pack(">I", self.context(n)) + b"base:allocation")
                answer(REP_ACK)
            elif option in (OPT_GO, OPT_INFO):
                answer(REP_INFO, struct.pack(">HQH", 0, self.size, TRANSMISSION_FLAGS))
                answer(REP_ACK)
                if option == OPT_GO:
                    return
            else:
                answer(REP_ERR_UNSUP)


def recv(conn, n):
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise EOFError
        data += part
    return data
