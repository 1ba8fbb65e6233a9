"""The daemon's QMP control socket, driven by the real qemu.qmp client and by raw sockets.

- protocol: greeting, negotiation, query-version / query-commands, through
  both qemu.qmp's asyncio QMPClient and its legacy sync QEMUMonitorProtocol;
- graph edits: blockdev-add, transactions that insert a throttle filter above
  the export's root (and between two nodes) and take it out again, the graph
  as query-named-block-nodes and x-debug-query-block-graph show it, rollback
  of failed transactions;
- events: BLOCK_EXPORT_DELETED after block-export-add + block-export-del,
  received through qemu.qmp's event API;
- misbehaving clients on a raw socket (bad JSON, a 10 MiB line, random bytes,
  hang-ups mid-command, commands before negotiation, ...): each gets an error
  or loses its own connection, while another client keeps working and the
  graph stays as it was;
- argument checking: an unexpected, missing or mistyped key is a GenericError
  naming the key, with no side effect;
- the socket's mode, quit.

Tests that need blkgraph's transactional graph edits skip themselves for
qemu-storage-daemon (BLKGRAPH_TEST_QSD=1), which lacks them.
"""

import asyncio
import json
import os
import random
import re
import select
import socket
import stat
import threading
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import IMAGE_SIZE

COMMANDS = {
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "blockdev-add",
    "blockdev-del",
    "x-blockdev-replace",
    "transaction",
    "query-named-block-nodes",
    "x-debug-query-block-graph",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "object-add",
    "object-del",
    "quit",
}
# What qemu-storage-daemon lacks of the above.
NOT_IN_QSD = {"x-blockdev-replace"}

PERMISSIONS = {"consistent-read", "write", "write-unchanged", "resize"}


# ---------------------------------------------------------------- helpers


@pytest.fixture
def daemon(qmp_daemon):
    """The standard test daemon (f0 <- disk0 <- export vub0) with a QMP socket."""
    return qmp_daemon


def blkgraph_only(daemon_kind):
    if daemon_kind != "blkgraph":
        pytest.skip(
            "qemu-storage-daemon has no transactional blockdev-add/-del or x-blockdev-replace"
        )


def multi_client(daemon_kind) -> bool:
    """Whether the daemon serves several QMP clients at once on one socket.

    QEMU's socket chardev (so qemu-storage-daemon's monitor) takes one client
    at a time; blkgraph serves any number.
    """
    return daemon_kind == "blkgraph"


async def connect(path, name="test") -> QMPClient:
    """A negotiated qemu.qmp asyncio client."""
    qmp = QMPClient(name)
    await qmp.connect(str(path))
    return qmp


async def state(qmp: QMPClient) -> dict:
    """Everything that must not change when a command fails or a client misbehaves."""
    return {
        cmd: await qmp.execute(cmd)
        for cmd in ("x-debug-query-block-graph", "query-named-block-nodes", "query-block-exports")
    }


def fresh_state(path) -> dict:
    """state() through a new connection."""

    async def run():
        qmp = await connect(path, "fresh")
        try:
            return await state(qmp)
        finally:
            await qmp.disconnect()

    return asyncio.run(run())


def sync_state(qmp: QEMUMonitorProtocol) -> dict:
    """state() through the legacy sync client."""
    return {
        cmd: qmp.cmd(cmd)
        for cmd in ("x-debug-query-block-graph", "query-named-block-nodes", "query-block-exports")
    }


def graph_edges(graph: dict) -> dict:
    """x-debug-query-block-graph's edges by (parent name, child role, child name)."""
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {(names[e["parent"]], e["name"], names[e["child"]]): e for e in graph["edges"]}


def graph_nodes(graph: dict) -> dict:
    """x-debug-query-block-graph's nodes by name."""
    return {n["name"]: n for n in graph["nodes"]}


async def export_root(qmp: QMPClient, export_id="vub0") -> str:
    exports = {e["id"]: e for e in await qmp.execute("query-block-exports")}
    return exports[export_id]["node-name"]


async def node_names(qmp: QMPClient) -> set:
    return {n["node-name"] for n in await qmp.execute("query-named-block-nodes")}


def replace_export(new_child: str, export_id="vub0") -> dict:
    return {
        "type": "x-blockdev-replace",
        "data": {"parent-type": "export", "export-id": export_id, "new-child": new_child},
    }


def replace_child(node: str, child: str, new_child: str) -> dict:
    return {
        "type": "x-blockdev-replace",
        "data": {
            "parent-type": "driver",
            "node-name": node,
            "child": child,
            "new-child": new_child,
        },
    }


def is_error(msg) -> bool:
    """A well-formed QMP error reply (what qemu.qmp requires of one)."""
    return (
        isinstance(msg, dict)
        and isinstance(msg.get("error"), dict)
        and isinstance(msg["error"].get("class"), str)
        and isinstance(msg["error"].get("desc"), str)
    )


class RawClient:
    """A QMP client on a plain socket, for sending what a real client never would."""

    EOF = "EOF"

    def __init__(self, path, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = b""
        self.closed = False
        greeting = self.recv()
        assert isinstance(greeting, dict) and "QMP" in greeting, greeting
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}\n')
            assert self.recv() == {"return": {}}

    def send(self, data: bytes) -> bool:
        """Send data; False if the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False

    def send_and_hang_up(self, data: bytes) -> None:
        """Send what the socket takes without blocking, then close it."""
        self.sock.setblocking(False)
        try:
            while data:
                data = data[self.sock.send(data) :]
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        self.close()

    def recv(self, timeout: float = 10):
        """The next message (a dict), EOF if the server closed, None on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.closed:
                return self.EOF
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return self.EOF
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        # QMP's wire format: one JSON object per line, CRLF, ASCII only.
        assert line.endswith(b"\r") and line.isascii(), line[:200]
        return json.loads(line)

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------- protocol


def test_greeting_negotiation_and_commands(daemon, daemon_kind):
    """qemu.qmp's asyncio client connects and negotiates; query-commands lists the commands."""

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            greeting = qmp.greeting.QMP
            version = greeting.version
            for key in ("major", "minor", "micro"):
                assert isinstance(version["qemu"][key], int), version
            assert isinstance(version["package"], str)
            assert isinstance(greeting.capabilities, list)
            assert await qmp.execute("query-version") == version

            names = {c["name"] for c in await qmp.execute("query-commands")}
            expected = COMMANDS - (NOT_IN_QSD if daemon_kind == "qsd" else set())
            assert expected <= names, expected - names

            # Negotiation happens once per connection.
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("qmp_capabilities")
            assert err.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("no-such-command")
            assert err.value.error_class == "CommandNotFound"
        finally:
            await qmp.disconnect()

    asyncio.run(run())


def test_legacy_sync_client(daemon):
    """qemu.qmp's legacy QEMUMonitorProtocol: greeting, commands with and without an id."""
    qmp = QEMUMonitorProtocol(str(daemon.qmp))
    greeting = qmp.connect()
    try:
        assert isinstance(greeting["QMP"]["version"]["qemu"]["major"], int)
        # cmd_obj sends no id: the reply has none either.
        reply = qmp.cmd_obj({"execute": "query-version"})
        assert "id" not in reply and reply["return"] == greeting["QMP"]["version"]
        reply = qmp.cmd_obj({"execute": "query-version", "id": "legacy-1"})
        assert reply["id"] == "legacy-1" and reply["return"] == greeting["QMP"]["version"]
        reply = qmp.cmd_raw("no-such-command")
        assert is_error(reply) and reply["error"]["class"] == "CommandNotFound"
        exports = qmp.cmd("query-block-exports")
        assert [(e["id"], e["node-name"], e["type"]) for e in exports] == [
            ("vub0", "disk0", "vhost-user-blk")
        ]
    finally:
        qmp.close()


def test_initial_graph(daemon, daemon_kind):
    """The standard daemon's graph: export vub0 -> disk0 (raw) -> f0 (file), with permissions."""

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            named = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            assert named["disk0"]["drv"] == "raw" and named["f0"]["drv"] == "file"
            assert named["disk0"]["image"]["virtual-size"] == IMAGE_SIZE
            if daemon_kind != "blkgraph":
                return  # QSD shows the export as an unnamed block-backend, nodes without driver
            graph = await qmp.execute("x-debug-query-block-graph")
            nodes = graph_nodes(graph)
            assert nodes["vub0"]["type"] == "block-export"
            assert (
                nodes["disk0"]["type"] == "block-driver"
                and nodes["disk0"]["__org.blkgraph_driver"] == "raw"
            )
            assert (
                nodes["f0"]["type"] == "block-driver"
                and nodes["f0"]["__org.blkgraph_driver"] == "file"
            )
            edges = graph_edges(graph)
            assert set(edges) == {("vub0", "root", "disk0"), ("disk0", "file", "f0")}
            for edge in edges.values():
                assert set(edge["perm"]) <= PERMISSIONS and set(edge["shared-perm"]) <= PERMISSIONS
                assert {"consistent-read", "write"} <= set(edge["perm"]), edge
        finally:
            await qmp.disconnect()

    asyncio.run(run())


# ---------------------------------------------------------------- graph edits


def test_throttle_insert_and_remove(daemon, daemon_kind):
    """blockdev-add null-co; transactions put a throttle node above the export's root
    and between disk0 and f0, and take them out again."""
    blkgraph_only(daemon_kind)

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            initial = await state(qmp)

            await qmp.execute(
                "blockdev-add",
                {"driver": "null-co", "node-name": "null0", "size": 1 << 30, "read-zeroes": True},
            )
            named = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            assert named["null0"]["drv"] == "null-co"
            graph = await qmp.execute("x-debug-query-block-graph")
            assert graph_nodes(graph)["null0"]["__org.blkgraph_driver"] == "null-co"

            await qmp.execute(
                "object-add",
                {"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 20000}},
            )
            thr0 = {
                "driver": "throttle",
                "node-name": "thr0",
                "file": "disk0",
                "throttle-group": "tg0",
            }
            result = await qmp.execute(
                "transaction",
                {"actions": [{"type": "blockdev-add", "data": thr0}, replace_export("thr0")]},
            )
            assert result == {}
            assert await export_root(qmp) == "thr0"
            named = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            assert named["thr0"]["drv"] == "throttle"
            graph = await qmp.execute("x-debug-query-block-graph")
            assert graph_nodes(graph)["thr0"]["__org.blkgraph_driver"] == "throttle"
            edges = graph_edges(graph)
            assert set(edges) == {
                ("vub0", "root", "thr0"),
                ("thr0", "file", "disk0"),
                ("disk0", "file", "f0"),
            }, graph
            for edge in edges.values():
                assert isinstance(edge["perm"], list) and isinstance(edge["shared-perm"], list)
                assert set(edge["perm"]) <= PERMISSIONS and set(edge["shared-perm"]) <= PERMISSIONS
            # The writable export needs write through the filter, down to the file.
            for key in edges:
                assert {"consistent-read", "write"} <= set(edges[key]["perm"]), edges[key]

            # A second filter, inline limits, between a driver node and its child.
            thr1 = {
                "driver": "throttle",
                "node-name": "thr1",
                "file": "f0",
                "limits": {"bps-total": 1 << 30},
            }
            await qmp.execute(
                "transaction",
                {
                    "actions": [
                        {"type": "blockdev-add", "data": thr1},
                        replace_child("disk0", "file", "thr1"),
                    ]
                },
            )
            edges = graph_edges(await qmp.execute("x-debug-query-block-graph"))
            assert set(edges) == {
                ("vub0", "root", "thr0"),
                ("thr0", "file", "disk0"),
                ("disk0", "file", "thr1"),
                ("thr1", "file", "f0"),
            }
            await qmp.execute(
                "transaction",
                {
                    "actions": [
                        replace_child("disk0", "file", "f0"),
                        {"type": "blockdev-del", "data": {"node-name": "thr1"}},
                    ]
                },
            )

            # And back, in one transaction.
            await qmp.execute(
                "transaction",
                {
                    "actions": [
                        replace_export("disk0"),
                        {"type": "blockdev-del", "data": {"node-name": "thr0"}},
                    ]
                },
            )
            assert await export_root(qmp) == "disk0"
            assert not {"thr0", "thr1"} & await node_names(qmp)
            await qmp.execute("object-del", {"id": "tg0"})
            await qmp.execute("blockdev-del", {"node-name": "null0"})
            assert await state(qmp) == initial
        finally:
            await qmp.disconnect()

    asyncio.run(run())


RO_NULL = {"driver": "null-co", "node-name": "ro0", "size": IMAGE_SIZE, "read-only": True}


@pytest.mark.parametrize(
    "failing",
    [
        pytest.param([{"type": "abort", "data": {}}], id="abort"),
        pytest.param(
            [{"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "disk0"}}],
            id="duplicate-node-name",
        ),
        pytest.param([{"type": "blockdev-del", "data": {"node-name": "f0"}}], id="del-node-in-use"),
        pytest.param([replace_export("no-such-node")], id="replace-with-missing-node"),
        pytest.param([replace_child("disk0", "file", "thr0")], id="loop"),
        pytest.param([replace_child("disk0", "backing", "f0")], id="no-such-child"),
        pytest.param([replace_export("null0")], id="size-differs"),
        pytest.param(
            [{"type": "blockdev-add", "data": RO_NULL}, replace_export("ro0")],
            id="read-only-root-of-writable-export",
        ),
    ],
)
def test_failed_transaction_changes_nothing(daemon, daemon_kind, failing):
    """A transaction whose last actions fail leaves the graph as it was."""
    blkgraph_only(daemon_kind)

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            initial = await state(qmp)
            thr0 = {
                "driver": "throttle",
                "node-name": "thr0",
                "file": "disk0",
                "limits": {"iops-total": 1000},
            }
            prefix = [
                {"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "null0"}},
                {"type": "blockdev-add", "data": thr0},
                replace_export("thr0"),
            ]
            actions = prefix + failing
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("transaction", {"actions": actions})
            assert err.value.error_class == "GenericError"
            assert await state(qmp) == initial
            # The names the failed transaction used are free.
            await qmp.execute("transaction", {"actions": prefix})
            assert await export_root(qmp) == "thr0"
        finally:
            await qmp.disconnect()

    asyncio.run(run())


# ---------------------------------------------------------------- events


@pytest.mark.parametrize("mode", ["safe", "hard"])
def test_block_export_deleted_event(daemon, daemon_kind, workdir, mode):
    """block-export-add of a second export on a null-co node, block-export-del:
    every negotiated client gets BLOCK_EXPORT_DELETED, an unnegotiated one nothing."""
    sock = workdir / "vub1.sock"

    async def run():
        qmp = await connect(daemon.qmp, "events")
        try:
            initial = await state(qmp)
            await qmp.execute(
                "blockdev-add", {"driver": "null-co", "node-name": "null1", "size": 64 << 20}
            )
            await qmp.execute(
                "block-export-add",
                {
                    "type": "vhost-user-blk",
                    "id": "vub1",
                    "node-name": "null1",
                    "addr": {"type": "unix", "path": str(sock)},
                    "writable": False,
                    "num-queues": 1,
                    "logical-block-size": 512,
                },
            )
            exports = {e["id"]: e for e in await qmp.execute("query-block-exports")}
            assert exports["vub1"]["node-name"] == "null1"
            assert exports["vub1"]["type"] == "vhost-user-blk"
            assert exports["vub0"]["node-name"] == "disk0"
            assert stat.S_ISSOCK(os.stat(sock).st_mode)
            if daemon_kind == "blkgraph":
                edges = graph_edges(await qmp.execute("x-debug-query-block-graph"))
                assert ("vub1", "root", "null1") in edges
                # A read-only export takes no write permission.
                assert "write" not in edges[("vub1", "root", "null1")]["perm"]

            with qmp.listener("BLOCK_EXPORT_DELETED") as listener:
                await qmp.execute("block-export-del", {"id": "vub1", "mode": mode})
                event = await asyncio.wait_for(listener.get(), 10)
            assert event["event"] == "BLOCK_EXPORT_DELETED"
            assert event["data"] == {"id": "vub1"}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}

            assert [e["id"] for e in await qmp.execute("query-block-exports")] == ["vub0"]
            await qmp.execute("blockdev-del", {"node-name": "null1"})
            assert await state(qmp) == initial
        finally:
            await qmp.disconnect()

    if not multi_client(daemon_kind):
        asyncio.run(run())
        return
    # The legacy client runs its own event loop, so it is used outside run().
    legacy = QEMUMonitorProtocol(str(daemon.qmp))
    legacy.connect()
    quiet = RawClient(daemon.qmp, negotiate=False)
    try:
        asyncio.run(run())
        # The legacy client's event API got the event too.
        event = legacy.pull_event(wait=10.0)
        assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"] == {"id": "vub1"}
        assert legacy.get_events() == []
        # Before negotiation there are no events: the first reply is the negotiation's.
        quiet.send(b'{"execute": "qmp_capabilities", "id": "neg"}\n')
        assert quiet.recv() == {"return": {}, "id": "neg"}
    finally:
        quiet.close()
        legacy.close()


# ---------------------------------------------------------------- misbehaving clients


def random_bytes() -> bytes:
    return random.Random(20240611).randbytes(64 << 10)


# Each case: (what the bad client sends, whether it negotiates first, whether
# it then hangs up at once instead of waiting for an error).
BAD_CLIENTS = {
    "invalid-json": (b'{"execute": nope}\n', True, False),
    "unterminated-then-close": (
        b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "half0", "si',
        True,
        True,
    ),
    "unknown-command": (b'{"execute": "no-such-command", "id": "u1"}\n', True, False),
    "random-bytes": (random_bytes(), True, False),
    "random-bytes-unnegotiated": (random_bytes(), False, False),
    "before-negotiation": (
        b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "early0"}}\n',
        False,
        False,
    ),
    "non-object": (b'[{"execute": "query-version"}]\n', True, False),
    "no-execute": (b'{"arguments": {}, "id": 1}\n', True, False),
    "execute-not-a-string": (b'{"execute": ["blockdev-del"], "id": 1}\n', True, False),
    "deep-nesting": (b"[" * 100000 + b"\n", True, False),
    "invalid-utf8": (b'{"execute": "query-version", "id": "\xff\xfe"}\n', True, False),
    "huge-line": (
        b'{"execute": "query-version", "arguments": {"x": "' + b"A" * (10 << 20) + b'"}}\n',
        True,
        False,
    ),
    "flood-then-close": (b'{"execute": "query-named-block-nodes"}\n' * 20000, True, True),
}


@pytest.mark.parametrize("case", list(BAD_CLIENTS))
def test_bad_client(daemon, daemon_kind, case):
    """A misbehaving client gets a QMP error or loses its connection, and nothing else
    happens: a client connected before it still works and the graph is unchanged."""
    data, negotiate, hang_up = BAD_CLIENTS[case]
    keeper = None
    if multi_client(daemon_kind):
        keeper = QEMUMonitorProtocol(str(daemon.qmp))
        keeper.connect()
        keeper.settimeout(30)
    try:
        before = sync_state(keeper) if keeper else fresh_state(daemon.qmp)
        bad = RawClient(daemon.qmp, negotiate=negotiate)
        try:
            if hang_up:
                bad.send_and_hang_up(data)
            else:
                # The server may answer (and hang up) before it has read all of
                # a big message: send from a thread while reading here.
                sender = threading.Thread(target=bad.send, args=(data,))
                sender.start()
                # (qemu-storage-daemon needs about 30 s for the 10 MiB line.)
                first = bad.recv(timeout=120)
                assert first is not None, "no error and no hang-up within 120 s"
                assert first == RawClient.EOF or is_error(first), first
                if case == "unknown-command":
                    assert first["error"]["class"] == "CommandNotFound" and first["id"] == "u1"
                if case == "before-negotiation":
                    assert first["error"]["class"] == "CommandNotFound"
                # Whatever else comes for the bad input must be errors too.
                while (msg := bad.recv(timeout=0.5)) not in (None, RawClient.EOF):
                    assert is_error(msg), msg
                sender.join(120)
                assert not sender.is_alive()
        finally:
            bad.close()

        if keeper:
            assert keeper.cmd("query-version")["qemu"]["major"] >= 0
            assert sync_state(keeper) == before
        if case == "flood-then-close":
            # The daemon has to notice the hang-up while it writes replies.
            time.sleep(0.5)
        assert fresh_state(daemon.qmp) == before
        assert daemon.proc.poll() is None, "the daemon died"
    finally:
        if keeper:
            keeper.close()


def test_bad_client_can_recover(daemon):
    """After errors that leave the connection open, the same client can go on."""
    client = RawClient(daemon.qmp, negotiate=False)
    try:
        client.send(b'{"execute": "query-version", "id": 1}\n')
        reply = client.recv()
        assert is_error(reply) and reply["error"]["class"] == "CommandNotFound" and reply["id"] == 1
        client.send(b'{"execute": "qmp_capabilities", "id": 2}\n')
        assert client.recv() == {"return": {}, "id": 2}
        for bad in (
            b'{"execute": "no-such-command", "id": 3}\n',
            b'{"execute": "query-version", "id": 4, "x": 1}\n',
        ):
            client.send(bad)
            reply = client.recv()
            assert is_error(reply), reply
        client.send(b'{"execute": "query-version", "id": 5}\n')
        reply = client.recv()
        assert reply["id"] == 5 and "qemu" in reply["return"]
    finally:
        client.close()


def test_wire_format(daemon):
    """Any JSON id comes back as sent; non-ASCII text goes out \\u-escaped, as QEMU does it."""
    client = RawClient(daemon.qmp)
    try:
        for id_ in (7, "x", None, [1, {"a": True}], {"k": 1.5}, "\u00e9\u2603"):
            message = {"execute": "query-version", "id": id_}
            client.send(json.dumps(message, ensure_ascii=False).encode() + b"\n")
            reply = client.recv()  # RawClient checks CRLF and ASCII
            assert reply["id"] == id_ and "qemu" in reply["return"], reply
        # A command split over several lines and two commands on one line.
        client.send(b'{"execute":\n "query-version",\n "id": "split"}\n')
        assert client.recv()["id"] == "split"
        client.send(b'{"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2}\n')
        assert [client.recv()["id"], client.recv()["id"]] == [1, 2]
    finally:
        client.close()


def test_concurrent_clients(daemon, daemon_kind):
    """Several clients at once: each gets its own replies, with ids matching."""
    if not multi_client(daemon_kind):
        pytest.skip("qemu-storage-daemon's monitor serves one client at a time")

    async def reader(n):
        qmp = await connect(daemon.qmp, f"reader{n}")
        try:
            for _ in range(50):
                await qmp.execute("query-named-block-nodes")
                assert (await qmp.execute("query-version"))["qemu"]["major"] >= 0
        finally:
            await qmp.disconnect()

    async def writer():
        qmp = await connect(daemon.qmp, "writer")
        try:
            for i in range(50):
                await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": f"n{i}"})
            assert {f"n{i}" for i in range(50)} <= await node_names(qmp)
            for i in range(50):
                await qmp.execute("blockdev-del", {"node-name": f"n{i}"})
        finally:
            await qmp.disconnect()

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            before = await state(qmp)
            await asyncio.gather(writer(), *(reader(n) for n in range(4)))
            assert await state(qmp) == before
        finally:
            await qmp.disconnect()

    asyncio.run(run())


# ---------------------------------------------------------------- arguments


def key_named(desc: str, key: str) -> bool:
    """Whether an error text names the key, quoted, possibly with a path before it."""
    return re.search(r"'([^']*\.)?" + re.escape(key) + r"'", desc) is not None


NULL = {"driver": "null-co", "node-name": "null0"}
EXPORT = {
    "type": "vhost-user-blk",
    "id": "vub9",
    "node-name": "disk0",
    "addr": {"type": "unix", "path": "/nonexistent/never-created.sock"},
    "writable": False,
}
THROTTLE_GROUP = {"qom-type": "throttle-group", "id": "tg9", "limits": {"iops-total": 100}}

# (command, arguments, the key the error must name, blkgraph only)
BAD_ARGUMENTS = {
    # unexpected keys
    "query-version-extra": ("query-version", {"verbose": True}, "verbose", False),
    "blockdev-add-extra": ("blockdev-add", {**NULL, "bogus": 1}, "bogus", False),
    "blockdev-del-extra": ("blockdev-del", {"node-name": "disk0", "force": True}, "force", False),
    "export-addr-extra": (
        "block-export-add",
        {**EXPORT, "addr": {**EXPORT["addr"], "mode": "0600"}},
        "mode",
        False,
    ),
    "object-add-limits-typo": (
        "object-add",
        {**THROTTLE_GROUP, "limits": {"iops-totl": 100}},
        "iops-totl",
        False,
    ),
    "transaction-data-extra": (
        "transaction",
        {"actions": [{"type": "blockdev-add", "data": {**NULL, "bogus": 1}}]},
        "bogus",
        True,
    ),
    # missing keys
    "blockdev-add-no-driver": ("blockdev-add", {"node-name": "null0"}, "driver", False),
    "blockdev-del-no-name": ("blockdev-del", {}, "node-name", False),
    "export-del-no-id": ("block-export-del", {"mode": "hard"}, "id", False),
    "export-add-no-addr": (
        "block-export-add",
        {k: v for k, v in EXPORT.items() if k != "addr"},
        "addr",
        False,
    ),
    "replace-no-new-child": (
        "x-blockdev-replace",
        {"parent-type": "export", "export-id": "vub0"},
        "new-child",
        True,
    ),
    "transaction-no-actions": ("transaction", {}, "actions", True),
    "transaction-action-no-data": (
        "transaction",
        {"actions": [{"type": "blockdev-del"}]},
        "data",
        True,
    ),
    "transaction-del-no-name": (
        "transaction",
        {"actions": [{"type": "blockdev-del", "data": {}}]},
        "node-name",
        True,
    ),
    # wrong types
    "blockdev-add-name-int": ("blockdev-add", {**NULL, "node-name": 5}, "node-name", False),
    "blockdev-add-size-string": ("blockdev-add", {**NULL, "size": "1G"}, "size", False),
    "blockdev-add-read-only-string": (
        "blockdev-add",
        {**NULL, "read-only": "yes"},
        "read-only",
        False,
    ),
    "blockdev-del-name-list": ("blockdev-del", {"node-name": ["disk0"]}, "node-name", False),
    "export-del-mode-value": ("block-export-del", {"id": "vub0", "mode": "now"}, "mode", False),
    "export-add-queues-string": (
        "block-export-add",
        {**EXPORT, "num-queues": "2"},
        "num-queues",
        False,
    ),
    "object-add-limit-string": (
        "object-add",
        {**THROTTLE_GROUP, "limits": {"iops-total": "many"}},
        "iops-total",
        False,
    ),
    "replace-new-child-int": (
        "x-blockdev-replace",
        {"parent-type": "export", "export-id": "vub0", "new-child": 0},
        "new-child",
        True,
    ),
    "transaction-actions-object": ("transaction", {"actions": {"type": "abort"}}, "actions", True),
}


async def refused(qmp: QMPClient, command: str, arguments: dict) -> str:
    """Runs a command that must fail with GenericError and change nothing; returns the text."""
    before = await state(qmp)
    with pytest.raises(ExecuteError) as err:
        await qmp.execute(command, arguments)
    assert err.value.error_class == "GenericError"
    assert await state(qmp) == before
    return str(err.value)


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments(daemon, daemon_kind, case):
    """An unexpected, missing or wrongly typed key: GenericError naming the key, no change."""
    command, arguments, key, needs_blkgraph = BAD_ARGUMENTS[case]
    if needs_blkgraph:
        blkgraph_only(daemon_kind)

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            desc = await refused(qmp, command, arguments)
            assert key_named(desc, key), f"{desc!r} does not name {key!r}"
            if command == "object-add":
                # The object was not half-created: its id is still free.
                await qmp.execute("object-add", THROTTLE_GROUP)
                await qmp.execute("object-del", {"id": THROTTLE_GROUP["id"]})
            if command == "block-export-add":
                assert not os.path.exists(EXPORT["addr"]["path"])
        finally:
            await qmp.disconnect()

    asyncio.run(run())


# QEMU's BDRV_MAX_LENGTH: the largest int64 rounded down to 1 GiB.
MAX_LENGTH = (2**63 - 1) & ~(2**30 - 1)
TOO_LARGE = "Could not refresh total sector count: File too large"
MIB_FILE = {"driver": "null-co", "size": 1 << 20}


def raw_window(**window) -> dict:
    return {"driver": "raw", "node-name": "raw9", "file": MIB_FILE, **window}


# blockdev-add arguments, QEMU's exact error text, and whether only blkgraph
# gives that text (QSD refuses integers above INT64_MAX as the wrong type).
BAD_VALUES = {
    "node-name-32-bytes": ({**NULL, "node-name": "n" * 32}, "Node name too long", False),
    "node-name-200-bytes": ({**NULL, "node-name": "n" * 200}, "Node name too long", False),
    "null-size-above-max": ({**NULL, "size": MAX_LENGTH + 1}, TOO_LARGE, False),
    "null-size-int64-max": ({**NULL, "size": 2**63 - 1}, TOO_LARGE, False),
    "null-size-uint64-max": ({**NULL, "size": 2**64 - 1}, TOO_LARGE, True),
    "raw-offset-past-the-file": (
        raw_window(offset=2**63 - 1),
        "Offset (9223372036854775807) cannot be greater than size of the containing file "
        "(1048576)",
        False,
    ),
    "raw-offset-uint64-max": (
        raw_window(offset=2**64 - 1),
        "Offset (18446744073709551615) cannot be greater than size of the containing file "
        "(1048576)",
        True,
    ),
    # (sic: two spaces before "actual", as QEMU writes it)
    "raw-window-past-the-file": (
        raw_window(offset=512, size=2**63 - 1),
        "The sum of offset (512) and size (9223372036854775807) has to be smaller or equal "
        "to the  actual size of the containing file (1048576)",
        False,
    ),
    "raw-window-end-wraps": (
        raw_window(offset=512, size=2**64 - 512),
        "The sum of offset (512) and size (18446744073709551104) has to be smaller or equal "
        "to the  actual size of the containing file (1048576)",
        True,
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values(daemon, daemon_kind, case):
    """Node names and sizes beyond QEMU's limits: its texts, no change."""
    arguments, text, needs_blkgraph = BAD_VALUES[case]
    if needs_blkgraph:
        blkgraph_only(daemon_kind)

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            assert await refused(qmp, "blockdev-add", arguments) == text
        finally:
            await qmp.disconnect()

    asyncio.run(run())


def test_largest_values(daemon, daemon_kind):
    """A 31-byte node-name and a node of QEMU's largest size are fine."""

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            name = "n" * 31
            await qmp.execute("blockdev-add", {**NULL, "node-name": name, "size": MAX_LENGTH})
            nodes = await qmp.execute("query-named-block-nodes")
            node = next(n for n in nodes if n["node-name"] == name)
            assert node["image"]["virtual-size"] == MAX_LENGTH
            await qmp.execute("blockdev-del", {"node-name": name})
        finally:
            await qmp.disconnect()

    asyncio.run(run())


# ---------------------------------------------------------------- socket, quit


def test_socket_mode(daemon, daemon_kind):
    """The QMP socket is a socket that only its owner may use (0600)."""
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon leaves the socket's mode to the umask")
    mode = os.stat(daemon.qmp).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(stat.S_IMODE(mode))


def test_quit(daemon):
    """quit replies, then the daemon exits with status 0."""

    async def run():
        qmp = await connect(daemon.qmp)
        try:
            assert await qmp.execute("quit") == {}
        finally:
            await qmp.disconnect()

    asyncio.run(run())
    assert daemon.proc.wait(10) == 0
