"""The daemon's NBD server and exports, driven by real NBD clients.

Clients: qemu-img and qemu-io (QEMU's NBD client), nbdinfo, nbdcopy and nbdsh
(libnbd), fio's nbd engine (libnbd), and a raw socket for garbage. Every test
also runs against qemu-storage-daemon with BLKGRAPH_TEST_QSD=1; the few places
where QSD answers differently are marked.

nbdsh is a Python program that needs the system python (python3-libnbd), so
it runs with /usr/bin first on PATH.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

MIB = 1 << 20
SIZE = 64 * MIB
# Regions of the test image that hold data; everything else is a hole.
DATA = [(0, 64 * 1024), (1 * MIB, 192 * 1024), (32 * MIB + 4096, 8192), (SIZE - 64 * 1024, 64 * 1024)]
SYSTEM_PATH = "/usr/bin:/bin:" + os.environ.get("PATH", "")

NEEDED = ["qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "nbdsh", "fio"]


@pytest.fixture(autouse=True)
def clients_present():
    missing = [c for c in NEEDED if shutil.which(c, path=SYSTEM_PATH) is None]
    if missing:
        pytest.fail(f"NBD clients missing: {missing} (apt-get install qemu-utils libnbd-bin python3-libnbd fio)")


def pattern(offset, length):
    """Deterministic, position-dependent bytes for the data regions."""
    out = bytearray()
    for block in range(offset // 4096, (offset + length + 4095) // 4096):
        out += struct.pack(">Q", block) * 512
    start = offset % 4096
    return bytes(out[start:start + length])


def make_image(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, length in DATA:
            f.seek(off)
            f.write(pattern(off, length))


def run(*cmd, check=True, **kw):
    env = dict(os.environ, PATH=SYSTEM_PATH)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


class Nbd:
    """A started daemon with NBD exports 'disk0' (writable) and 'ro' (read-only) of one image."""

    def __init__(self, daemon, image, sock):
        self.daemon = daemon
        self.image = image
        self.sock = sock

    def uri(self, name="disk0"):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def nbdsh(self, script, name="disk0", meta=True, check=True):
        """Runs a Python snippet in nbdsh with `h` connected (base:allocation requested)."""
        prelude = "h.set_strict_mode(0)\n"
        if meta:
            prelude += "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
        prelude += f"h.connect_uri({self.uri(name)!r})\n"
        return run("nbdsh", "-c", prelude + script, check=check)

    def qmp(self):
        q = QEMUMonitorProtocol(str(self.daemon.qmp))
        q.connect()
        return q


@pytest.fixture
def nbd_daemon(start_daemon, workdir):
    image = workdir / "disk.raw"
    make_image(image)
    sock = workdir / "nbd.sock"
    extra = [
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=nbd0,node-name=disk0,name=disk0,writable=on,description=test disk",
        "--export", "type=nbd,id=nbd-ro,node-name=disk0,name=ro",
    ]
    daemon = start_daemon(image, qmp=True, extra_args=extra)
    assert sock.exists()
    return Nbd(daemon, image, sock)


def qmp_cmd(q, cmd, **args):
    r = q.cmd_obj({"execute": cmd, "arguments": args})
    return r


def test_qemu_img_info_map_compare(daemon_kind, nbd_daemon):
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", nbd_daemon.uri()).stdout)
    assert info["virtual-size"] == SIZE
    remote = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", nbd_daemon.uri()).stdout)
    local = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", str(nbd_daemon.image)).stdout)
    strip = [{k: e[k] for k in ("start", "length", "data", "zero")} for e in remote]
    assert strip == [{k: e[k] for k in ("start", "length", "data", "zero")} for e in local]
    data = [(e["start"], e["length"]) for e in remote if e["data"]]
    assert data == DATA
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", nbd_daemon.uri("ro"), str(nbd_daemon.image))
    # compare must notice a difference: it is a real check.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x01 40M 4k", nbd_daemon.uri())
    other = nbd_daemon.image.parent / "other.raw"
    make_image(other)
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", nbd_daemon.uri(), str(other), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Content mismatch at offset 41943040" in res.stdout


def test_qemu_io_patterns(daemon_kind, nbd_daemon):
    uri = nbd_daemon.uri()
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 0 64k",
        "-c", "read -P 0xab 0 64k",
        "-c", "read -P 0 128k 64k",
        "-c", "aio_write -P 0xcd 8M 1M",
        "-c", "aio_write -P 0xce 10M 512",
        "-c", "aio_flush",
        "-c", "read -P 0xcd 8M 1M",
        "-c", "read -P 0xce 10M 512",
        "-c", "write -z 1M 64k",
        "-c", "read -P 0 1M 64k",
        "-c", "write -P 0x5a -f 20M 4k",
        "-c", "discard 30M 1M",
        uri,
    ).stdout
    assert "Pattern verification failed" not in out
    with open(nbd_daemon.image, "rb") as f:
        f.seek(0)
        assert f.read(64 * 1024) == b"\xab" * 65536
        f.seek(8 * MIB)
        assert f.read(MIB) == b"\xcd" * MIB
        f.seek(1 * MIB)
        assert f.read(65536) == bytes(65536)
        f.seek(1 * MIB + 65536)
        assert f.read(4096) == pattern(1 * MIB + 65536, 4096)
        f.seek(20 * MIB)
        assert f.read(4096) == b"\x5a" * 4096
    # A wrong pattern is reported: the reads above were really checked.
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0xac 0 64k", uri, check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr
    # QEMU's client sees the read-only flag and refuses to open for writing.
    res = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", nbd_daemon.uri("ro"), check=False)
    assert "Permission denied" in res.stdout + res.stderr


def test_nbdinfo(daemon_kind, nbd_daemon):
    assert run("nbdinfo", "--size", nbd_daemon.uri()).stdout.strip() == str(SIZE)
    for cap in ("flush", "trim", "zero", "fua", "fast-zero", "cache", "df"):
        assert run("nbdinfo", "--can", cap, nbd_daemon.uri(), check=False).returncode == 0, cap
    # Every connection goes to the same node: flushes are global, so
    # multi-conn is safe on writable exports too (QSD 10 advertises it too).
    assert run("nbdinfo", "--can", "multi-conn", nbd_daemon.uri(), check=False).returncode == 0
    ro = nbd_daemon.uri("ro")
    assert run("nbdinfo", "--is", "read-only", ro, check=False).returncode == 0
    assert run("nbdinfo", "--is", "read-only", nbd_daemon.uri(), check=False).returncode == 2
    # As QSD 10: read-only exports take flush, FUA and multi-conn, not trim
    # or zeroing.
    for cap, rc in (("multi-conn", 0), ("flush", 0), ("fua", 0), ("trim", 2), ("zero", 2), ("fast-zero", 2)):
        assert run("nbdinfo", "--can", cap, ro, check=False).returncode == rc, cap

    lines = run("nbdinfo", "--map", nbd_daemon.uri()).stdout.strip().splitlines()
    extents = [tuple(int(x) for x in line.split()[:3]) for line in lines]
    assert sum(e[1] for e in extents) == SIZE
    data = [(start, length) for start, length, flags in extents if flags == 0]
    assert data == DATA
    assert all(flags == 3 for _, _, flags in extents if flags != 0)

    listing = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={nbd_daemon.sock}").stdout
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(exports) == {"disk0", "ro"}
    assert exports["disk0"]["description"] == "test disk"
    assert exports["ro"]["is_read_only"] is True
    one = json.loads(run("nbdinfo", "--json", nbd_daemon.uri()).stdout)
    e = one["exports"][0]
    assert one["protocol"] == "newstyle-fixed"
    assert e["export-size"] == SIZE
    assert e["block_size_maximum"] == 32 * MIB
    assert e["block_size_preferred"] == 4096
    assert e["block_size_minimum"] in (1, 512)
    assert "base:allocation" in e["contexts"]
    # An unknown export is refused.
    res = run("nbdinfo", nbd_daemon.uri("nope"), check=False)
    assert res.returncode != 0


def test_nbdcopy_both_ways(daemon_kind, nbd_daemon, workdir):
    out = workdir / "copy.raw"
    run("nbdcopy", nbd_daemon.uri("ro"), str(out))
    assert out.read_bytes() == nbd_daemon.image.read_bytes()
    # Into the writable export, with several connections.
    src = workdir / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, SIZE, 3 * MIB):
            f.seek(i)
            f.write(pattern(i + 7, 256 * 1024))
    run("nbdcopy", "--connections=2", "--requests=16", str(src), nbd_daemon.uri())
    assert nbd_daemon.image.read_bytes() == src.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", nbd_daemon.uri("ro"), str(src))


ODD_REQUESTS = """
import errno
def err(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno
    return 0
size = h.get_size()
print("oversize", err(lambda: h.pread(32 * 1024 * 1024 + 1, 0)))
print("max", len(h.pread(32 * 1024 * 1024, 0)))
print("past_end", err(lambda: h.pread(4096, size - 512)))
print("offset_overflow", err(lambda: h.pread(4096, 2**63)))
print("unaligned", h.pread(5, 4093) == expected)
print("write_past_end", err(lambda: h.pwrite(b"x" * 4096, size - 2048)))
print("zero_past_end", err(lambda: h.zero(4096, size)))
print("fast_zero", err(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)))
print("cache", err(lambda: h.cache(4096, 0)))
print("flush", err(lambda: h.flush()))
print("trim", err(lambda: h.trim(4096, 40 * 1024 * 1024)))
ext = []
h.block_status(2 * 1024 * 1024, 1024 * 1024 - 65536, lambda m, o, e, err: ext.append((m, e)) or 0)
print("extents", ext)
one = []
h.block_status(2 * 1024 * 1024, 1024 * 1024 - 65536, lambda m, o, e, err: one.append(e) or 0, nbd.CMD_FLAG_REQ_ONE)
print("req_one", one)
print("bs_zero_len", err(lambda: h.block_status(0, 0, lambda *a: 0)))
print("alive", len(h.pread(512, 0)))
"""


def parse_lines(out):
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def test_nbdsh_odd_requests(daemon_kind, nbd_daemon):
    expected = pattern(4093, 5)
    out = nbd_daemon.nbdsh(f"expected = {expected!r}\n" + ODD_REQUESTS).stdout
    r = parse_lines(out)
    assert r["oversize"] == "EINVAL", out
    assert r["max"] == str(32 * MIB)
    assert r["past_end"] == "EINVAL"
    assert r["offset_overflow"] == "EINVAL"
    assert r["unaligned"] == "True"
    # ENOSPC as the NBD spec asks (blkgraph); QSD answers EINVAL.
    assert r["write_past_end"] == ("ENOSPC" if daemon_kind == "blkgraph" else "EINVAL")
    assert r["zero_past_end"] == ("ENOSPC" if daemon_kind == "blkgraph" else "EINVAL")
    # blkgraph's graph has no "no fallback" zeroing yet, so fast zero always
    # fails fast; QSD zeroes with fallocate and succeeds.
    assert r["fast_zero"] == ("ENOTSUP" if daemon_kind == "blkgraph" else "0")
    assert r["cache"] == "0"
    assert r["flush"] == "0"
    assert r["trim"] == "0"
    # From 1M-64k: 64k hole (hole|zero = 3), the 192k of data, the rest a hole.
    assert r["extents"] == "[('base:allocation', [65536, 3, 196608, 0, 1835008, 3])]", out
    assert r["req_one"] == "[[65536, 3]]", out
    assert r["bs_zero_len"] == "EINVAL"
    assert r["alive"] == "512"


def test_nbdsh_read_only_export(daemon_kind, nbd_daemon):
    script = """
def err(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno
    return 0
print("ro", h.is_read_only())
print("write", err(lambda: h.pwrite(b"x" * 512, 0)))
print("zero", err(lambda: h.zero(512, 0)))
print("trim", err(lambda: h.trim(512, 0)))
print("read", len(h.pread(4096, 0)))
"""
    r = parse_lines(nbd_daemon.nbdsh(script, name="ro").stdout)
    assert r["ro"] == "True"
    expected = "EPERM" if daemon_kind == "blkgraph" else "EINVAL"  # QSD answers EINVAL
    assert (r["write"], r["zero"], r["trim"]) == (expected,) * 3, r
    assert r["read"] == "4096"
    with open(nbd_daemon.image, "rb") as f:
        assert f.read(512) == pattern(0, 512)


def test_multi_conn_read_only(daemon_kind, nbd_daemon):
    """Several connections on the read-only export at once, each reading all data regions."""
    script = """
import random
random.seed(SEED)
for _ in range(200):
    off, length = DATA[random.randrange(len(DATA))]
    o = off + random.randrange(length // 512) * 512
    n = min(off + length - o, 512 * random.randrange(1, 17))
    buf = h.pread(n, o)
    assert buf == pattern(o, n), (o, n)
print("ok")
"""
    import inspect

    src = inspect.getsource(pattern) + f"DATA = {DATA!r}\nimport struct\n"
    procs = []
    env = dict(os.environ, PATH=SYSTEM_PATH)
    for seed in range(6):
        code = f"SEED = {seed}\n" + src + f"h.connect_uri({nbd_daemon.uri('ro')!r})\n" + script
        procs.append(subprocess.Popen(["nbdsh", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err
    # nbdcopy uses multi-conn on its own when the server allows it.
    out = nbd_daemon.image.parent / "mc.raw"
    run("nbdcopy", "--connections=4", nbd_daemon.uri("ro"), str(out))
    assert out.read_bytes() == nbd_daemon.image.read_bytes()


def handshake(sock_path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock_path))
    greeting = s.recv(18, socket.MSG_WAITALL)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    return s


def closed(s):
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_garbage_clients(daemon_kind, nbd_daemon):
    good = subprocess.Popen(
        ["nbdsh", "-c", f"""
import sys, struct
{__import__('inspect').getsource(pattern)}
h.connect_uri({nbd_daemon.uri('ro')!r})
print("ready", flush=True)
for line in sys.stdin:
    assert h.pread(65536, 1024 * 1024) == pattern(1024 * 1024, 65536)
    print("ok", flush=True)
"""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PATH=SYSTEM_PATH),
    )
    assert good.stdout.readline().strip() == "ready", good.stderr.read()

    def good_reads():
        good.stdin.write("go\n")
        good.stdin.flush()
        assert good.stdout.readline().strip() == "ok"

    # Random bytes instead of the client flags.
    s = handshake(nbd_daemon.sock)
    s.sendall(os.urandom(4096))
    assert closed(s)
    good_reads()
    # Bad option magic.
    s = handshake(nbd_daemon.sock)
    s.sendall(struct.pack(">I", 1) + b"XXXXXXXX" + struct.pack(">II", 7, 0))
    assert closed(s)
    good_reads()
    # An option claiming 4 GiB of data, then a hang-up halfway.
    s = handshake(nbd_daemon.sock)
    s.sendall(struct.pack(">IQII", 1, 0x49484156454F5054, 7, 0xFFFFFFFF) + b"\0" * 10000)
    s.close()
    good_reads()
    # A valid GO, then garbage requests.
    s = handshake(nbd_daemon.sock)
    name = b"ro"
    s.sendall(struct.pack(">IQII", 1, 0x49484156454F5054, 7, 6 + len(name)) + struct.pack(">I", len(name)) + name + b"\0\0")
    buf = b""
    while not buf.endswith(struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)):
        chunk = s.recv(4096)
        assert chunk, "no ACK to NBD_OPT_GO"
        buf += chunk
    s.sendall(os.urandom(1 << 16))
    if daemon_kind == "blkgraph":
        assert closed(s)
    s.close()
    good_reads()
    # Half a request header, then silence and a hang-up.
    s = handshake(nbd_daemon.sock)
    s.sendall(b"\0\0\0\1")
    s.close()
    good_reads()
    good.stdin.close()
    assert good.wait(30) == 0, good.stderr.read()
    assert nbd_daemon.daemon.proc.poll() is None, "the daemon died"


def test_fio_verify_over_nbd(daemon_kind, nbd_daemon):
    """fio's nbd engine writes 32 MiB with deep pipelining and verifies every block."""
    res = run(
        "fio", "--name=nbd-verify", "--ioengine=nbd", f"--uri={nbd_daemon.uri()}",
        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32m", "--offset=16m",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
        "--output-format=json",
    )
    report = json.loads(res.stdout[res.stdout.index("{"):])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MIB
    assert job["read"]["io_bytes"] == 32 * MIB


def test_qmp_server_and_exports(daemon_kind, nbd_daemon, workdir):
    q = nbd_daemon.qmp()
    r = qmp_cmd(q, "nbd-server-start", addr={"type": "unix", "data": {"path": str(workdir / "x.sock")}})
    assert "already running" in r["error"]["desc"]
    r = qmp_cmd(q, "query-block-exports")
    assert {(e["id"], e["type"]) for e in r["return"]} >= {("nbd0", "nbd"), ("nbd-ro", "nbd")}
    # A connected client blocks safe deletion; hard deletion drops it.
    holder = subprocess.Popen(
        ["nbdsh", "-c", f"h.connect_uri({nbd_daemon.uri('ro')!r}); print('in', flush=True); import time; time.sleep(30)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PATH=SYSTEM_PATH),
    )
    assert holder.stdout.readline().strip() == "in"
    r = qmp_cmd(q, "block-export-del", id="nbd-ro")
    assert "export 'nbd-ro' still in use" in r["error"]["desc"]
    assert qmp_cmd(q, "block-export-del", id="nbd-ro", mode="hard") == {"return": {}}
    ev = q.pull_event(wait=10)
    assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "nbd-ro"}
    holder.kill()
    holder.wait()
    assert run("nbdinfo", nbd_daemon.uri("ro"), check=False).returncode != 0
    # Unknown bitmaps are refused.
    r = qmp_cmd(q, "block-export-add", type="nbd", id="bm", **{"node-name": "disk0"}, name="bm", bitmaps=["nope"])
    assert "error" in r and "nope" in r["error"]["desc"]
    # nbd-server-stop removes every NBD export, with an event each.
    assert qmp_cmd(q, "nbd-server-stop") == {"return": {}}
    deleted = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "nbd0" not in deleted:
        ev = q.pull_event(wait=1)
        if ev and ev["event"] == "BLOCK_EXPORT_DELETED":
            deleted.add(ev["data"]["id"])
    assert "nbd0" in deleted
    exports = qmp_cmd(q, "query-block-exports")["return"]
    assert [e for e in exports if e["type"] == "nbd" and e["id"] != "ad"] == []
    assert "not running" in qmp_cmd(q, "nbd-server-stop")["error"]["desc"]
    q.close()


def test_dirty_bitmap_context(daemon_kind, nbd_daemon):
    """An export publishes a dirty bitmap as qemu:dirty-bitmap:NAME (read with nbdinfo --map)."""
    q = nbd_daemon.qmp()
    assert qmp_cmd(q, "block-dirty-bitmap-add", node="disk0", name="b0", granularity=65536) == {"return": {}}
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 4k", "-c", "write -P 0x34 5M 128k", nbd_daemon.uri())
    # A recording bitmap of a written node cannot back a read-only export.
    r = qmp_cmd(q, "block-export-add", type="nbd", id="inc", **{"node-name": "disk0"}, name="inc", bitmaps=["b0"])
    assert "Enabled bitmap 'b0' incompatible with readonly export" in r["error"]["desc"], r
    assert qmp_cmd(q, "block-dirty-bitmap-disable", node="disk0", name="b0") == {"return": {}}
    r = qmp_cmd(q, "block-export-add", type="nbd", id="inc", **{"node-name": "disk0"}, name="inc",
                bitmaps=[{"node": "disk0", "name": "b0"}])
    assert r == {"return": {}}, r
    uri = nbd_daemon.uri("inc")
    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert set(info["contexts"]) >= {"base:allocation", "qemu:dirty-bitmap:b0"}
    lines = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri).stdout.strip().splitlines()
    dirty = [tuple(int(x) for x in line.split()[:2]) for line in lines if int(line.split()[2]) == 1]
    assert dirty == [(1 * MIB, 65536), (5 * MIB, 128 * 1024)], lines
    total = sum(int(line.split()[1]) for line in lines)
    assert total == SIZE
    # Later writes do not show: the bitmap is disabled.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x35 9M 4k", nbd_daemon.uri())
    lines2 = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri).stdout.strip().splitlines()
    assert lines2 == lines
    q.close()


def test_allocation_depth_context(daemon_kind, nbd_daemon):
    """allocation-depth: true publishes qemu:allocation-depth; a raw image over a file has all of
    its content in its own layer (depth 1), holes included, as QEMU reports it."""
    q = nbd_daemon.qmp()
    r = qmp_cmd(q, "block-export-add", type="nbd", id="depth", **{"node-name": "disk0"}, name="depth",
                **{"allocation-depth": True})
    assert r == {"return": {}}, r
    uri = nbd_daemon.uri("depth")
    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert "qemu:allocation-depth" in info["contexts"], info
    plain = json.loads(run("nbdinfo", "--json", nbd_daemon.uri()).stdout)["exports"][0]
    assert "qemu:allocation-depth" not in plain["contexts"], plain
    lines = run("nbdinfo", "--map=qemu:allocation-depth", uri).stdout.strip().splitlines()
    extents = [tuple(int(x) for x in line.split()[:3]) for line in lines]
    assert extents == [(0, SIZE, 1)], lines
    q.close()
