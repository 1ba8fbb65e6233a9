"""Listening sockets passed by file descriptor (`addr.type=fd`), as in QEMU.

Over QMP, `addr.str` is the name a client gave with `getfd` to a descriptor it
sent on the control socket (SCM_RIGHTS, here with qemu.qmp's send_fd_scm);
numbers are not names there, so a client cannot make the daemon adopt its own
descriptors. On the command line, `addr.str` (and `--fd`) is the number of an
inherited descriptor. Either way the descriptor must be a listening socket.

- getfd / closefd and their errors;
- block-export-add (vhost-user-blk) and nbd-server-start on a named socket,
  which then serve clients;
- descriptors that are not usable ("-1", "3", names never given, a regular
  file, sockets that do not listen) are each a clear error, after which the
  daemon keeps working and exits 0 on SIGTERM;
- descriptors sent with other commands are closed (the daemon's descriptor
  count stays flat);
- inherited sockets on the command line, and refusal of unusable ones at start.

With BLKGRAPH_TEST_QSD=1 every test also runs against QEMU: the command-line
tests against qemu-storage-daemon, the QMP tests against qemu-system-x86_64
without a machine (QEMU_BIN overrides it), since qemu-storage-daemon has no
getfd (its monitor_get_fd is a stub: "only QEMU supports file descriptor
passing"). Where QEMU answers with other words (it makes a socket listen
instead of requiring it to), both texts are given.
"""

import contextlib
import json
import os
import socket
import struct
import subprocess
import time

import pytest
from conftest import StorageDaemon, daemon_kinds
from qemu.qmp.legacy import QEMUMonitorProtocol

IMAGE_SIZE = 16 << 20

# vhost-user: GET_FEATURES, the message version, the reply flag, and two
# feature bits every vhost-user-blk backend offers.
GET_FEATURES = 1
VERSION = 0x1
REPLY = 0x4
VIRTIO_F_VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30


@pytest.fixture
def image(workdir):
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


def pytest_generate_tests(metafunc):
    """Parametrize the QMP tests by the monitor they talk to."""
    if "monitor_kind" in metafunc.fixturenames:
        kinds = ["blkgraph"] + (["qemu"] if "qsd" in daemon_kinds() else [])
        metafunc.parametrize("monitor_kind", kinds)


class QemuSystem(StorageDaemon):
    """qemu-system-x86_64 without a machine: QEMU's monitor with getfd, its exports and NBD
    server, and the same nodes and export vub0 as the standard test daemon."""

    def __init__(self, workdir, image):
        super().__init__(os.environ.get("QEMU_BIN", "qemu-system-x86_64"), workdir, image, qmp=True)
        # fmt: off
        self.args = [
            self.binary, "-machine", "none", "-nodefaults", "-display", "none",
            "-blockdev", f"driver=file,node-name=f0,filename={image}",
            "-blockdev", "driver=raw,node-name=disk0,file=f0",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-pidfile", str(self.pidfile),
        ]
        # fmt: on

    def _ready(self) -> bool:
        return self.pidfile.exists() and self.qmp.exists()

    def start(self, timeout: float = 30) -> "QemuSystem":
        super().start(timeout)
        with qmp_client(self) as qmp:
            vub0 = {"type": "unix", "path": str(self.socket)}
            ok(qmp, "block-export-add", {**vhost_user_export("vub0", "disk0", vub0), "writable": True})
        return self


@pytest.fixture
def daemon(monitor_kind, blkgraph_bin, workdir, image):
    """The standard test daemon (export vub0 of disk0 on a unix socket) with QMP, or QEMU."""
    if monitor_kind == "qemu":
        daemon = QemuSystem(workdir, image)
    else:
        daemon = StorageDaemon(str(blkgraph_bin), workdir, image, qmp=True)
    daemon.start()
    yield daemon
    try:
        daemon.stop()
    except RuntimeError:
        pass


@contextlib.contextmanager
def qmp_client(daemon):
    """A negotiated qemu.qmp (legacy sync) client."""
    qmp = QEMUMonitorProtocol(str(daemon.qmp))
    qmp.connect()
    qmp.settimeout(30)
    try:
        yield qmp
    finally:
        qmp.close()


def execute(qmp, command, arguments=None) -> dict:
    """The raw reply to a command: {"return": ...} or {"error": ...}."""
    message = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return qmp.cmd_obj(message)


def ok(qmp, command, arguments=None):
    reply = execute(qmp, command, arguments)
    assert "return" in reply, f"{command}: {reply}"
    return reply["return"]


def error(qmp, command, arguments=None) -> str:
    """The text of the GenericError a command must fail with."""
    reply = execute(qmp, command, arguments)
    assert "error" in reply, f"{command} should have failed: {reply}"
    assert reply["error"]["class"] == "GenericError", reply
    return reply["error"]["desc"]


def getfd(qmp, fd, name) -> dict:
    """Sends fd (SCM_RIGHTS) and names it with getfd; returns the raw reply."""
    qmp.send_fd_scm(fd)
    return execute(qmp, "getfd", {"fdname": name})


def listening_unix(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def recv_exact(sock, n) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the backend closed the connection"
        data += chunk
    return data


def vhost_user_features(path) -> int:
    """A frontend's first vhost-user exchange on the socket at path: GET_FEATURES."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.sendall(struct.pack("<III", GET_FEATURES, VERSION, 0))
        request, flags, size = struct.unpack("<III", recv_exact(sock, 12))
        assert (request, flags & (REPLY | 0x3), size) == (GET_FEATURES, REPLY | VERSION, 8)
        (features,) = struct.unpack("<Q", recv_exact(sock, 8))
    assert features & VIRTIO_F_VERSION_1 and features & PROTOCOL_FEATURES, hex(features)
    return features


def vhost_user_export(export_id, node, addr) -> dict:
    return {
        "type": "vhost-user-blk",
        "id": export_id,
        "node-name": node,
        "addr": addr,
        "writable": False,
    }


def export_ids(qmp) -> set:
    return {e["id"] for e in ok(qmp, "query-block-exports")}


def wait_for(what, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fd_count(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fd_count(pid) -> int:
    """fd_count once it stops changing (a client that just left may still be open)."""
    count = fd_count(pid)
    while True:
        time.sleep(0.2)
        count, last = fd_count(pid), count
        if count == last:
            return count


def add_null_node(qmp, name="null1"):
    ok(qmp, "blockdev-add", {"driver": "null-co", "node-name": name, "size": IMAGE_SIZE})


def exports_still_work(qmp, workdir):
    """A unix-socket export can be added, serves a frontend, and is deleted."""
    sock = workdir / "vub2.sock"
    ok(qmp, "block-export-add", vhost_user_export("vub2", "null1", {"type": "unix", "path": str(sock)}))
    assert export_ids(qmp) == {"vub0", "vub2"}
    vhost_user_features(sock)
    ok(qmp, "block-export-del", {"id": "vub2", "mode": "hard"})
    # qemu-storage-daemon deletes the export asynchronously.
    wait_for("vub2 to go", lambda: export_ids(qmp) == {"vub0"})


# ---------------------------------------------------------------- getfd, closefd


def test_getfd_and_closefd(daemon):
    """getfd names the descriptor sent with it; closefd closes it; the errors are QEMU's."""
    with qmp_client(daemon) as qmp:
        names = {c["name"] for c in ok(qmp, "query-commands")}
        assert {"getfd", "closefd"} <= names

        assert error(qmp, "getfd", {"fdname": "x"}) == "No file descriptor supplied via SCM_RIGHTS"
        with open("/dev/null", "rb") as null:
            reply = getfd(qmp, null.fileno(), "7up")
            assert reply["error"]["desc"] == (
                "Parameter 'fdname' expects a name not starting with a digit"
            ), reply
            assert "return" in getfd(qmp, null.fileno(), "null")
            # A name given again replaces the descriptor.
            assert "return" in getfd(qmp, null.fileno(), "null")
        ok(qmp, "closefd", {"fdname": "null"})
        assert error(qmp, "closefd", {"fdname": "null"}) == "File descriptor named 'null' not found"
        assert error(qmp, "closefd", {"fdname": "never"}) == "File descriptor named 'never' not found"
        assert error(qmp, "getfd", {}) == "Parameter 'fdname' is missing"


# ---------------------------------------------------------------- exports on named sockets


def test_vhost_user_export_on_named_socket(daemon, workdir):
    """getfd of a listening unix socket, then block-export-add with addr {type: fd, str: NAME}:
    the export serves a frontend on that socket; the name is used up."""
    path = workdir / "passed.sock"
    listener = listening_unix(path)
    with qmp_client(daemon) as qmp:
        add_null_node(qmp)
        assert "return" in getfd(qmp, listener.fileno(), "vub-sock")
        # The daemon has its own copy now.
        listener.close()
        ok(qmp, "block-export-add", vhost_user_export("vub1", "null1", {"type": "fd", "str": "vub-sock"}))
        exports = {e["id"]: e for e in ok(qmp, "query-block-exports")}
        assert exports["vub1"]["type"] == "vhost-user-blk"
        assert exports["vub1"]["node-name"] == "null1"
        vhost_user_features(path)
        # A frontend can come back.
        vhost_user_features(path)
        assert error(qmp, "closefd", {"fdname": "vub-sock"}) == (
            "File descriptor named 'vub-sock' not found"
        )
        ok(qmp, "block-export-del", {"id": "vub1", "mode": "hard"})
        wait_for("vub1 to go", lambda: export_ids(qmp) == {"vub0"})
        exports_still_work(qmp, workdir)
    assert daemon.stop() == 0


def unbound_socket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def connected_socket():
    # One end of a pair stays connected (to nothing) when the other closes.
    sock, _ = socket.socketpair()
    return sock


def tcp_listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


NOT_LISTENING = {
    "blkgraph": "File descriptor 'bad' is not a listening socket",
    # QEMU calls listen() on the descriptor.
    "qemu": "Failed to listen on fd socket: Invalid argument",
}

# case: (addr.str, a function making the descriptor to send as 'bad' or None,
#        the error text by daemon, blkgraph only)
BAD_DESCRIPTORS = {
    "minus-one": ("-1", None, "File descriptor named '-1' has not been found", False),
    "number-3": ("3", None, "File descriptor named '3' has not been found", False),
    "never-given": ("never", None, "File descriptor named 'never' has not been found", False),
    "regular-file": (
        "bad",
        lambda: open("/dev/null", "rb"),
        "File descriptor 'bad' is not a socket",
        False,
    ),
    "unbound-socket": ("bad", unbound_socket, NOT_LISTENING, False),
    "connected-socket": ("bad", connected_socket, NOT_LISTENING, False),
    # QEMU does not check the family: it would serve vhost-user over TCP.
    "tcp-socket": ("bad", tcp_listener, "File descriptor 'bad' is not a unix socket", True),
}


@pytest.mark.parametrize("case", list(BAD_DESCRIPTORS))
def test_unusable_descriptor(daemon, monitor_kind, workdir, case):
    """An addr.str that is a number, unknown, or names no listening unix socket: a clear
    error; the name is used up if it named something; the daemon keeps working."""
    name, make, expected, blkgraph_only = BAD_DESCRIPTORS[case]
    if blkgraph_only and monitor_kind != "blkgraph":
        pytest.skip("QEMU accepts this")
    if isinstance(expected, dict):
        expected = expected[monitor_kind]
    with qmp_client(daemon) as qmp:
        add_null_node(qmp)
        if make is not None:
            with make() as f:
                assert "return" in getfd(qmp, f.fileno(), name)
        desc = error(
            qmp, "block-export-add", vhost_user_export("vub1", "null1", {"type": "fd", "str": name})
        )
        assert desc == expected
        assert export_ids(qmp) == {"vub0"}
        if make is not None:
            # The failed command took (and closed) the named descriptor.
            assert error(qmp, "closefd", {"fdname": name}) == f"File descriptor named '{name}' not found"
        exports_still_work(qmp, workdir)
    assert daemon.stop() == 0


def test_descriptors_sent_with_other_commands_are_closed(daemon, monitor_kind):
    """Descriptors nobody names are closed: after ~200 of them, sent with other commands,
    with failing getfds and in a batch, the daemon has as many descriptors as before."""
    pid = daemon.proc.pid
    before = settled_fd_count(pid)
    with open("/dev/null", "rb") as null:
        with qmp_client(daemon) as qmp:
            connected = fd_count(pid)
            for i in range(100):
                qmp.send_fd_scm(null.fileno())
                if i % 4 == 0:
                    ok(qmp, "query-version")
                elif i % 4 == 1:
                    error(qmp, "getfd", {"fdname": f"{i}"})
                elif i % 4 == 2:
                    ok(qmp, "getfd", {"fdname": "same"})
                else:
                    error(qmp, "block-export-del", {"id": "nope"})
            ok(qmp, "closefd", {"fdname": "same"})
            if monitor_kind == "blkgraph":
                # QEMU keeps the last unclaimed batch until the next one arrives.
                assert fd_count(pid) == connected
        # 100 at once, with a command, on a plain socket.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(daemon.qmp))
            lines = sock.makefile("rb")
            assert "QMP" in json.loads(lines.readline())
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            assert json.loads(lines.readline()) == {"return": {}}
            socket.send_fds(sock, [b'{"execute": "query-version"}\n'], [null.fileno()] * 100)
            assert "return" in json.loads(lines.readline())
            lines.close()
    wait_for("the daemon's descriptor count to drop back", lambda: fd_count(pid) == before)
    assert daemon.stop() == 0


# ---------------------------------------------------------------- NBD


def test_nbd_server_on_named_socket(daemon, workdir):
    """nbd-server-start with addr {type: fd, data: {str: NAME}} serves NBD clients there."""
    path = workdir / "nbd-passed.sock"
    listener = listening_unix(path)
    with qmp_client(daemon) as qmp:
        for name in ("-1", "5", "nope"):
            assert error(qmp, "nbd-server-start", {"addr": {"type": "fd", "data": {"str": name}}}) == (
                f"File descriptor named '{name}' has not been found"
            )
        assert "return" in getfd(qmp, listener.fileno(), "nbd-sock")
        listener.close()
        ok(qmp, "nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nbd-sock"}}})
        ok(qmp, "block-export-add", {"type": "nbd", "id": "nbd0", "node-name": "disk0", "name": "disk0"})
        uri = f"nbd+unix:///disk0?socket={path}"
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "raw", uri],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(info.stdout)["virtual-size"] == IMAGE_SIZE
        ok(qmp, "nbd-server-stop")
        # Another server can start after it.
        nbd_sock = workdir / "nbd.sock"
        ok(qmp, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
        ok(qmp, "nbd-server-stop")
    assert daemon.stop() == 0


# ---------------------------------------------------------------- the command line


def base_args(daemon_bin, image, workdir):
    # fmt: off
    return [
        daemon_bin,
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk0,file=f0",
        "--pidfile", str(workdir / "cli.pid"),
    ]
    # fmt: on


def fd_export(fd) -> list:
    return ["--export", f"type=vhost-user-blk,id=vub1,node-name=disk0,addr.type=fd,addr.str={fd}"]


def test_inherited_socket_on_the_command_line(start_daemon, image, workdir):
    """--export ...,addr.type=fd,addr.str=N with an inherited listening socket serves on it."""
    path = workdir / "inherited.sock"
    listener = listening_unix(path)
    daemon = start_daemon(image, extra_args=fd_export(listener.fileno()), pass_fds=[listener.fileno()])
    listener.close()
    vhost_user_features(path)
    vhost_user_features(daemon.socket)
    assert daemon.stop() == 0


def test_fd_option_serves_an_inherited_socket(daemon_kind, daemon_bin, image, workdir):
    """The vhost-user backend convention: --fd N --blk-file IMAGE."""
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon has no --fd/--blk-file")
    path = workdir / "backend.sock"
    pidfile = workdir / "backend.pid"
    listener = listening_unix(path)
    args = [daemon_bin, "--fd", str(listener.fileno()), "--blk-file", str(image)]
    args += ["--pidfile", str(pidfile)]
    proc = subprocess.Popen(args, pass_fds=[listener.fileno()], stderr=subprocess.PIPE)
    listener.close()
    try:
        wait_for("the pidfile", pidfile.exists)
        vhost_user_features(path)
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def refused_at_start(args, pass_fds) -> str:
    """Runs a daemon that must refuse to start: exit status 1; returns its stderr."""
    proc = subprocess.Popen(args, pass_fds=pass_fds, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the daemon started:\n{out.decode(errors='replace')}")
    assert proc.returncode == 1, out
    return out.decode(errors="replace")


# case: (a function making the descriptor, the error text by daemon, blkgraph only)
BAD_INHERITED = {
    "regular-file": (
        lambda: open("/dev/null", "rb"),
        {"blkgraph": "File descriptor '{fd}' is not a socket", "qsd": "File descriptor '{fd}' is not a socket"},
        False,
    ),
    "connected-socket": (
        connected_socket,
        {
            "blkgraph": "File descriptor '{fd}' is not a listening socket",
            "qsd": "Failed to listen on fd socket: Invalid argument",
        },
        False,
    ),
    "unbound-socket": (
        unbound_socket,
        {
            "blkgraph": "File descriptor '{fd}' is not a listening socket",
            "qsd": "Failed to listen on fd socket: Invalid argument",
        },
        False,
    ),
    "tcp-socket": (tcp_listener, {"blkgraph": "File descriptor '{fd}' is not a unix socket"}, True),
}


@pytest.mark.parametrize("case", list(BAD_INHERITED))
def test_unusable_inherited_descriptor(daemon_kind, daemon_bin, image, workdir, case):
    """A command-line descriptor that is not a listening unix socket: exit 1 at start, with a
    clear message."""
    make, expected, blkgraph_only = BAD_INHERITED[case]
    if blkgraph_only and daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon accepts this")
    with make() as f:
        fd = f.fileno()
        out = refused_at_start(base_args(daemon_bin, image, workdir) + fd_export(fd), [fd])
    assert expected[daemon_kind].format(fd=fd) in out, out


def test_bad_command_line_numbers(daemon_kind, daemon_bin, image, workdir):
    """Numbers are parsed strictly, must be open, and may be used once; the
    error names the --export it comes from, as QSD's configuration errors."""
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon's texts differ (and it takes a number twice)")
    args = base_args(daemon_bin, image, workdir)

    def refused(export, text):
        return f"blkgraph: {export[0]} {export[1]}: {text}"

    for bad in ("-1", "3x", "+4"):
        out = refused_at_start(args + fd_export(bad), [])
        assert refused(fd_export(bad), f"Invalid file descriptor number '{bad}'") in out, out
    out = refused_at_start(args + fd_export(1000), [])
    assert refused(fd_export(1000), "File descriptor '1000' is not open") in out, out
    path = workdir / "twice.sock"
    with listening_unix(path) as listener:
        fd = listener.fileno()
        second = [
            "--export",
            f"type=vhost-user-blk,id=vub2,node-name=disk0,addr.type=fd,addr.str={fd}",
        ]
        out = refused_at_start(args + fd_export(fd) + second, [fd])
        assert refused(second, f"File descriptor '{fd}' is already in use") in out, out
        out = refused_at_start(
            args + ["--nbd-server", f"addr.type=fd,addr.str={fd}"] + fd_export(fd), [fd]
        )
        assert refused(fd_export(fd), f"File descriptor '{fd}' is already in use") in out, out
