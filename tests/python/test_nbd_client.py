"""The nbd driver (NBD client node) against real servers: qemu-nbd, nbdkit
and a second blkgraph.

The daemon under test opens `driver=nbd` on the server's socket and serves
the node on its own NBD export, which qemu-io, nbdinfo and a libnbd load
generator (nbd_load.py) use. With BLKGRAPH_TEST_QSD=1 everything also runs
with qemu-storage-daemon as the client, whose nbd driver is the reference.
"""

import ctypes
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

import nbd_scripted_server as scripted
from test_jobs import connect, make_image, ok, wait_event

MIB = 1 << 20
SIZE = 32 * MIB
SYSTEM_PATH = "/usr/bin:/bin:" + os.environ.get("PATH", "")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run(*cmd, timeout=120, check=True):
    env = dict(os.environ, PATH=SYSTEM_PATH)
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


class Server:
    """An NBD server of one kind serving export 'exp' of a raw image on a
    UNIX socket; it can be killed and started again on the same socket.
    nbdkit takes `extra`: "filter=NAME" items, then the plugin's parameters."""

    def __init__(self, kind, workdir: Path, image: Path, blkgraph_bin, extra=()):
        self.kind, self.workdir, self.image = kind, workdir, image
        self.sock = workdir / f"{kind}.sock"
        self.log = workdir / f"{kind}.server.log"
        self.blkgraph_bin = str(blkgraph_bin)
        self.extra = list(extra)
        self.proc = None

    def command(self):
        if self.kind == "qemu-nbd":
            return ["qemu-nbd", "-f", "raw", "-x", "exp", "-k", self.sock, "--shared=8", "-t", self.image]
        if self.kind == "nbdkit":
            filters = [f"--filter={x.split('=', 1)[1]}" for x in self.extra if x.startswith("filter=")]
            params = [x for x in self.extra if not x.startswith("filter=")]
            return ["nbdkit", "-f", "-U", self.sock, "-e", "exp", *filters, "file", self.image, *params]
        # fmt: off
        return [
            self.blkgraph_bin,
            "--blockdev", f"driver=file,node-name=f0,filename={self.image}",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=e0,node-name=f0,name=exp,writable=on",
        ]
        # fmt: on

    def start(self) -> "Server":
        self.sock.unlink(missing_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [str(c) for c in self.command()], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, f"{self.kind} exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"{self.kind} did not listen"
            time.sleep(0.05)
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def uri(self):
        return f"nbd+unix:///exp?socket={self.sock}"


SERVERS = ["qemu-nbd", "nbdkit", "blkgraph"]


@pytest.fixture
def server_factory(workdir, blkgraph_bin):
    servers = []

    def make(kind, image=None, extra=()):
        if image is None:
            image = workdir / f"{kind}.img"
            with open(image, "wb") as f:
                f.truncate(SIZE)
        s = Server(kind, workdir, image, blkgraph_bin, extra)
        servers.append(s)
        return s.start()

    yield make
    for s in servers:
        s.kill()


def start_client(start_daemon, workdir, server_sock, export="exp", **opts):
    """The daemon under test with node disk0 = driver=nbd on server_sock,
    served on its own NBD export 'disk0'."""
    blockdev = f"driver=nbd,node-name=disk0,server.type=unix,server.path={server_sock},export={export}"
    for k, v in opts.items():
        blockdev += f",{k.replace('_', '-')}={v}"
    csock = workdir / "client.sock"
    daemon = start_daemon(
        None,
        blockdevs=[blockdev],
        extra_args=[
            "--nbd-server", f"addr.type=unix,addr.path={csock}",
            "--export", "type=nbd,id=c0,node-name=disk0,name=disk0,writable=on",
        ],  # fmt: skip
    )
    daemon.uri = f"nbd+unix:///disk0?socket={csock}"
    return daemon


def nbd_map(uri):
    """The base:allocation map, adjacent extents of one type merged."""
    out = []
    for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout):
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["offset"], e["length"], e["type"]])
    return out


def load(uri, **kw):
    args = ["/usr/bin/python3", HERE / "nbd_load.py", uri]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    return subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, text=True)


def load_result(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("server", SERVERS)
def test_io_and_block_status(daemon_kind, start_daemon, server_factory, workdir, server):
    """Reads, writes, write-zeroes, trim and flush reach the server's image;
    block status through the client equals the server's own map."""
    srv = server_factory(server)
    client = start_client(start_daemon, workdir, srv.sock)
    cmds = ["write -P 0x61 0 1M", "write -P 0x62 3M 5M",
            "write -z 4M 64k", "write -P 0x63 20M 4k", "discard 20M 4k", "flush"]  # fmt: skip
    args = []
    for c in cmds:
        args += ["-c", c]
    run("qemu-io", "-f", "raw", *args, client.uri)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x61 0 1M", "-c", "read -P 0 4M 64k",
        "-c", "read -P 0x62 3M 1M", "-c", "read -P 0x62 4160k 3M", client.uri)  # fmt: skip
    data = srv.image.read_bytes()
    assert data[:MIB] == b"\x61" * MIB
    assert data[4 * MIB:4 * MIB + 65536] == bytes(65536)
    assert data[5 * MIB:8 * MIB] == b"\x62" * (3 * MIB)
    direct = nbd_map(srv.uri())
    through = nbd_map(client.uri)
    assert through == direct, f"client {through} != server {direct}"
    assert any(t & 1 for _, _, t in direct) and any(t == 0 for _, _, t in direct)
    assert client.stop() == 0


def test_requests_split_at_the_server_maximum(daemon_kind, start_daemon, server_factory, workdir):
    """nbdkit advertises a 64 KiB maximum and fails larger requests: a 1 MiB
    write and read through the client are split, and none is larger."""
    log = workdir / "nbdkit-requests.log"
    srv = server_factory(
        "nbdkit",
        extra=["filter=log", "filter=blocksize-policy", f"logfile={log}",
               "blocksize-maximum=65536", "blocksize-error-policy=error"],  # fmt: skip
    )
    client = start_client(start_daemon, workdir, srv.sock)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x71 1M 1M", "-c", "read -P 0x71 1M 1M", client.uri)
    counts = [int(c, 16) for c in re.findall(r"(?:Read|Write) id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)", log.read_text())]
    assert counts and max(counts) <= 65536, counts
    assert sum(counts) >= 2 * MIB
    assert client.stop() == 0


def test_many_requests_in_flight_on_one_connection(daemon_kind, start_daemon, server_factory, workdir):
    """Concurrent reads from the client's users reach the server together on
    one connection (nbdkit delays each read, its log shows the overlap)."""
    log = workdir / "nbdkit-requests.log"
    # Data, not holes: a QEMU NBD server answers reads of holes from block
    # status, without reading.
    image = workdir / "data.img"
    image.write_bytes(os.urandom(SIZE))
    srv = server_factory("nbdkit", image=image, extra=["filter=log", "filter=delay", f"logfile={log}", "delay-read=200ms"])
    client = start_client(start_daemon, workdir, srv.sock)
    run("fio", "--name=r", "--ioengine=nbd", f"--uri={client.uri}", "--rw=randread", "--bs=4k",
        "--iodepth=32", "--size=8M", "--io_size=1M", "--output-format=json")  # fmt: skip
    assert client.stop() == 0
    depth = worst = 0
    connections = set()
    for line in log.read_text().splitlines():
        m = re.search(r"connection=(\d+) (\.\.\.)?Read id=", line)
        if not m:
            continue
        connections.add(m.group(1))
        depth += -1 if m.group(2) else 1
        worst = max(worst, depth)
    assert len(connections) == 1, connections
    assert worst >= 8, f"at most {worst} reads were in flight at once"


@pytest.mark.parametrize("server", SERVERS)
def test_server_restart_during_verifying_write_load(daemon_kind, start_daemon, server_factory, workdir, server):
    """The server is killed during a verifying write load with many requests
    in flight and started again 2 s later: the client reconnects, sends the
    waiting requests again, and the load ends without an error or a
    mismatch."""
    srv = server_factory(server)
    client = start_client(start_daemon, workdir, srv.sock, reconnect_delay=30)
    proc = load(client.uri, size="32M", bs="64k", qd=16, ops=3000)
    for line in proc.stdout:
        if line.startswith("progress") and int(line.split()[1]) >= 600:
            break
    srv.kill()
    time.sleep(2)
    srv.start()
    result = load_result(proc)
    assert result["errors"] == [] and result["mismatches"] == [], result
    assert result["writes"] > 1000
    assert client.proc.poll() is None
    assert client.stop() == 0


def qemu_io_read(uri, timeout=120):
    return run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri, check=False, timeout=timeout)


def test_requests_fail_after_reconnect_delay(daemon_kind, start_daemon, server_factory, workdir):
    """With the server gone, a request waits reconnect-delay and then fails;
    once the server is back, requests succeed again without a restart."""
    srv = server_factory("qemu-nbd")
    client = start_client(start_daemon, workdir, srv.sock, reconnect_delay=2)
    assert qemu_io_read(client.uri).returncode == 0
    srv.kill()
    res = qemu_io_read(client.uri)
    assert res.returncode != 0 or "error" in (res.stdout + res.stderr).lower(), res
    assert "Input/output error" in res.stdout + res.stderr, res
    srv.start()
    deadline = time.monotonic() + 30
    while True:
        res = qemu_io_read(client.uri)
        if "Input/output error" not in res.stdout + res.stderr:
            break
        assert time.monotonic() < deadline, "no reconnect within 30 s"
        time.sleep(0.5)
    assert res.returncode == 0, res
    assert client.stop() == 0


def test_without_delay_requests_fail_until_the_server_is_back(daemon_kind, start_daemon, server_factory, workdir):
    """reconnect-delay=0 (the default): while the server is gone requests fail
    at once; once it is back the node reconnects (blkgraph on the first
    request, QSD in the background) and requests succeed again."""
    srv = server_factory("qemu-nbd")
    client = start_client(start_daemon, workdir, srv.sock)
    assert qemu_io_read(client.uri).returncode == 0
    srv.kill()
    for _ in range(2):
        res = qemu_io_read(client.uri)
        assert "Input/output error" in res.stdout + res.stderr, res
    srv.start()
    deadline = time.monotonic() + 30
    while "Input/output error" in (res := qemu_io_read(client.uri)).stdout:
        assert time.monotonic() < deadline, "no reconnect within 30 s"
        time.sleep(0.5)
    assert res.returncode == 0, res
    if daemon_kind == "blkgraph":
        assert "Input/output error" not in qemu_io_read(client.uri).stdout
    assert client.stop() == 0


def test_open_errors(daemon_kind, daemon_bin, server_factory, workdir):
    """A missing export, a server that never listens (open-timeout) and TLS
    options fail the open with clear errors."""
    srv = server_factory("qemu-nbd")

    def fails(opts, timeout=60):
        start = time.monotonic()
        res = subprocess.run([daemon_bin, "--blockdev", f"driver=nbd,node-name=n0,{opts}"],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
        assert res.returncode != 0, res
        return res.stdout + res.stderr, time.monotonic() - start

    out, _ = fails(f"server.type=unix,server.path={srv.sock},export=nope")
    assert "nope" in out and "not available" in out, out
    missing = workdir / "nobody.sock"
    out, took = fails(f"server.type=unix,server.path={missing},open-timeout=2")
    assert str(missing) in out, out
    assert took >= 1.5, f"gave up after {took:.1f} s"
    out, _ = fails(f"server.type=inet,server.host=127.0.0.1,server.port=1,export=exp")
    assert "127.0.0.1:1" in out or "Connection refused" in out, out
    if daemon_kind == "blkgraph":
        out, _ = fails(f"server.type=unix,server.path={srv.sock},tls-creds=tls0")
        assert "TLS is not supported" in out, out


# Where a server puts read data that is not the read's: 16 bytes at an
# offset whose end is past 2^64, and no bytes at all 1 GiB past the read's
# end (an empty chunk is an error wherever it lies; one past the end made
# the client slice its buffer out of range).
OUTSIDE = {"past-2^64": lambda req: ((1 << 64) - 8, 16), "empty-past-end": lambda req: (req.offset + (1 << 30), 0)}


@pytest.mark.parametrize("where", sorted(OUTSIDE))
@pytest.mark.parametrize("delay", [0, 2])
def test_a_reply_outside_the_read_fails_the_read(daemon_kind, start_daemon, workdir, delay, where):
    """A server whose read data lies outside the read breaks the protocol:
    the read fails, at once also with a reconnect-delay (sent again, it
    would meet the same server), and the daemon goes on serving and stops
    cleanly."""
    sock = workdir / "scripted.sock"

    def outside(req):
        if req.kind == scripted.CMD_READ:
            at, length = OUTSIDE[where](req)
            data = struct.pack(">Q", at) + bytes(length)
            return scripted.chunk(req.cookie, scripted.REPLY_TYPE_OFFSET_DATA, data)
        if req.kind == scripted.CMD_BLOCK_STATUS:
            # All data: QSD's export asks before it reads, and reads no hole.
            extent = struct.pack(">III", req.context, req.length, 0)
            return scripted.chunk(req.cookie, scripted.REPLY_TYPE_BLOCK_STATUS, extent)
        return scripted.well_behaved(req)

    srv = scripted.ScriptedServer(sock, SIZE, reply=outside)
    try:
        client = start_client(start_daemon, workdir, sock, reconnect_delay=delay)
        for _ in range(2):
            res = qemu_io_read(client.uri, timeout=60)
            assert "Input/output error" in res.stdout + res.stderr, res
        # Each read failed once: no resending to the same server.
        assert srv.connections <= 3, srv.connections
        assert client.proc.poll() is None
        assert client.stop() == 0
    finally:
        srv.close()


def test_a_reconnection_may_number_base_allocation_anew(daemon_kind, start_daemon, workdir):
    """A server that comes back may give base:allocation another id: block
    status goes on working on the new connection."""
    sock = workdir / "scripted.sock"
    srv = scripted.ScriptedServer(sock, SIZE, context=lambda n: 1 + 6 * n)
    try:
        client = start_client(start_daemon, workdir, sock, reconnect_delay=5)
        assert nbd_map(client.uri) == [[0, SIZE, 3]]
        srv.drop_connections()
        deadline = time.monotonic() + 30
        while srv.connections < 2:
            # The first request after the drop finds the connection gone
            # (QSD reconnects on its own).
            res = run("nbdinfo", "--map", "--json", client.uri, check=False)
            if srv.connections >= 2:
                break
            assert time.monotonic() < deadline, f"no reconnect: {res}"
            time.sleep(0.2)
        assert nbd_map(client.uri) == [[0, SIZE, 3]]
        assert client.stop() == 0
    finally:
        srv.close()


def test_requests_wait_no_longer_than_reconnect_delay(daemon_kind, start_daemon, workdir):
    """A server that stopped accepting connections (its backlog full): the
    requests waiting for a reconnection fail once reconnect-delay is over,
    later ones after an attempt of their own, and the daemon stops. Before,
    an attempt's connect or handshake had no end of its own, so requests
    hung and the daemon could not stop."""
    sock = workdir / "scripted.sock"
    srv = scripted.ScriptedServer(sock, SIZE)
    try:
        client = start_client(start_daemon, workdir, sock, reconnect_delay=3)
        assert qemu_io_read(client.uri).returncode == 0
        srv.stop_accepting()
        srv.drop_connections()
        start = time.monotonic()
        # Read-only: qemu-io flushes a writable export when it closes, a
        # second request.
        res = run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", client.uri, check=False, timeout=60)
        took = time.monotonic() - start
        assert "Input/output error" in res.stdout + res.stderr, res
        # reconnect-delay is 3 s: nothing waits for a 10 s attempt after it.
        assert took < 8, f"the read failed after {took:.1f} s"
        res = qemu_io_read(client.uri, timeout=60)
        assert "Input/output error" in res.stdout + res.stderr, res
        assert client.stop() == 0
    finally:
        srv.close()


def take_socket(pid, peer):
    """A duplicate (pidfd_getfd) of process pid's UNIX socket connected to
    the address `peer`."""
    pidfd_getfd = 438
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(pidfd_getfd, pidfd, int(name), 0)
            assert fd >= 0, f"pidfd_getfd: {os.strerror(ctypes.get_errno())}"
            s = socket.socket(fileno=fd)
            try:
                if s.family == socket.AF_UNIX and s.getpeername() == peer:
                    return s
            except OSError:
                pass
            s.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"process {pid} has no socket connected to {peer}")


def test_blockdev_del_does_not_wait_for_a_server_that_stopped_reading(daemon_kind, start_daemon, workdir):
    """A server that reads nothing more, the connection's send buffer
    full (filled here through a duplicate of the daemon's socket; a
    server gets there by replying to requests it has not read):
    blockdev-del of a read-only node, which sends no flush, ends at once.
    Before, the node's polite NBD_CMD_DISC was a blocking write, with the
    node's state locked, that never ended, and neither did blockdev-del
    or the daemon's stop. (A writable node's closing flush waits for its
    reply as any request does, in QEMU too.)"""
    if daemon_kind == "qsd":
        pytest.skip("qemu-storage-daemon's blockdev-del does not end: its NBD client writes NBD_CMD_DISC until the socket takes it")
    sock = workdir / "scripted.sock"
    srv = scripted.ScriptedServer(sock, SIZE, reads=False)
    source = workdir / "source.raw"
    make_image(source, SIZE)
    daemon = start_daemon(source, qmp=True)
    q = connect(daemon)
    done = threading.Event()

    def delete():
        ok(q, "blockdev-del", **{"node-name": "remote"})
        done.set()

    deleter = threading.Thread(target=delete, daemon=True)
    try:
        ok(q, "blockdev-add", driver="nbd", export="exp", **{"node-name": "remote", "read-only": True},
           server={"type": "unix", "path": str(sock)})  # fmt: skip
        dup = take_socket(daemon.proc.pid, str(sock))
        filled = 0
        try:
            while True:
                filled += dup.send(bytes(65536), socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        assert filled > 0
        deleter.start()
        assert done.wait(30), "blockdev-del hung on a server that stopped reading"
        dup.close()
        assert "remote" not in [n["node-name"] for n in ok(q, "query-named-block-nodes", flat=True)]
    finally:
        # Closing the server's end also ends a blocked write.
        srv.close()
        if deleter.is_alive():
            deleter.join(30)
        q.close()
    assert daemon.stop() == 0


@pytest.mark.parametrize("how", ["job-cancel", "shutdown"])
@pytest.mark.parametrize("job", ["blockdev-backup", "blockdev-mirror"])
def test_a_cancelled_job_does_not_wait_for_a_reconnection(daemon_kind, start_daemon, server_factory, workdir, job, how):
    """A backup or mirror to an NBD client node whose server was killed:
    the job's writes wait for a reconnection (reconnect-delay 300 s).
    job-cancel, and the shutdown that cancels every job, fail those writes
    at once, as QEMU's bdrv_cancel_in_flight, rather than wait out the
    delay."""
    if how == "shutdown" and daemon_kind == "qsd":
        pytest.skip("qemu-storage-daemon drains before it cancels its jobs at exit: it waits out the delay")
    srv = server_factory("qemu-nbd")
    source = workdir / "source.raw"
    make_image(source, SIZE)
    daemon = start_daemon(source, qmp=True)
    q = connect(daemon)
    try:
        ok(q, "blockdev-add", driver="nbd", export="exp", **{"node-name": "tgt", "reconnect-delay": 300},
           server={"type": "unix", "path": str(srv.sock)})  # fmt: skip
        ok(q, job, device="disk0", target="tgt", sync="full", speed=MIB, **{"job-id": "j0"})
        deadline = time.monotonic() + 30
        while not any(j["offset"] > 0 for j in ok(q, "query-block-jobs")):
            assert time.monotonic() < deadline, f"{job} copied nothing"
            time.sleep(0.1)
        srv.kill()
        # Without a speed limit the job writes at once, finds the server
        # gone and waits for it: its offset stops, short of the end.
        ok(q, "block-job-set-speed", device="j0", speed=0)
        seen, since = None, time.monotonic()
        while time.monotonic() - since < 3:
            (info,) = ok(q, "query-block-jobs")
            assert info["status"] == "running" and time.monotonic() < deadline + 60, info
            if info["offset"] != seen:
                seen, since = info["offset"], time.monotonic()
            time.sleep(0.1)
        start = time.monotonic()
        if how == "job-cancel":
            ok(q, "job-cancel", id="j0")
            wait_event(q, "BLOCK_JOB_CANCELLED", device="j0", timeout=120)
            took = time.monotonic() - start
            ok(q, "blockdev-del", **{"node-name": "tgt"})
        else:
            q.close()
            assert daemon.stop(timeout=120) == 0
            took = time.monotonic() - start
    finally:
        q.close()
    # Far below the delay: nothing waited for it.
    assert took < 30, f"{how} took {took:.1f} s"
    if how == "job-cancel":
        assert daemon.stop() == 0
