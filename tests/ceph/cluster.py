#!/usr/bin/env python3
"""A throw-away one-node Ceph cluster for blkgraph's rbd tests.

One monitor and one OSD (memstore) listening on 127.0.0.1 only, cephx off,
pools of size 1, everything (config, data, sockets, logs, pid files) under one
directory. It starts in about 8 seconds from Debian's ceph-mon and ceph-osd.

As a library::

    with CephCluster(Path("/tmp/x")) as c:
        c.create_image("img", 64 << 20)
        ...  # driver=rbd,pool=rbd,image=img,conf=<c.conf>

From the shell (the Rust tests use this)::

    cluster.py start DIR     # prints {"conf": ..., "pool": "rbd"}; daemons stay
    cluster.py rbd DIR ARGS  # runs the rbd tool against the cluster
    cluster.py stop DIR      # kills the daemons, removes DIR

Availability: ``missing()`` names what is not installed. The tests skip with
that text, except where ``required()`` is true (``BLKGRAPH_REQUIRE_CEPH=1``,
which .ci/run sets, or ``CI=true``): there a missing Ceph fails them.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd")
LIBS = ("librbd.so.1", "librados.so.2")
# Every ceph/rbd call gets a timeout: a monitor that never answers hangs them.
CALL_TIMEOUT = 60


def missing() -> list[str]:
    """What the rbd tests need and this machine lacks."""
    out = [t for t in TOOLS if shutil.which(t) is None]
    import ctypes

    for lib in LIBS:
        try:
            ctypes.CDLL(lib)
        except OSError:
            out.append(lib)
    return out


def required() -> bool:
    """Whether a missing Ceph is an error rather than a reason to skip."""
    return os.environ.get("BLKGRAPH_REQUIRE_CEPH") == "1" or os.environ.get("CI") == "true"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """Whether pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class CephCluster:
    """One mon and one OSD under ``dir``; see the module documentation."""

    def __init__(self, dir: Path, pool: str = "rbd"):
        self.dir = Path(dir).resolve()
        self.conf = self.dir / "ceph.conf"
        self.pool = pool
        self.osd_uuid = None

    # -- configuration -------------------------------------------------------

    def _write_conf(self) -> None:
        port, port_v1 = free_port(), free_port()
        addr = f"[v2:127.0.0.1:{port},v1:127.0.0.1:{port_v1}]"
        d = self.dir
        self.conf.write_text(
            f"""[global]
fsid = {uuid.uuid4()}
mon host = {addr}
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
run dir = {d}/run
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
mon data = {d}/mon/$name
osd data = {d}/osd/$name
ms async op threads = 2
osd op num shards = 2
osd memory target = 939524096
client mount timeout = 20

[mon.a]
public addrv = {addr}
# The monitor stores a few MiB; on a shared, nearly full disk its default
# (refuse to start below 5 % free) would fail every test.
mon data avail crit = 1
mon data avail warn = 2

[osd.0]
# A SIGTERM must unmount the store: memstore saves its data only then.
osd fast shutdown = false
osd objectstore = memstore
memstore page set = true
memstore device bytes = 4294967296
"""
        )

    # -- helpers ---------------------------------------------------------------

    def _run(self, *args, timeout=CALL_TIMEOUT, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def ceph(self, *args, **kw) -> subprocess.CompletedProcess:
        """Runs the ceph tool against this cluster."""
        return self._run("ceph", "-c", self.conf, "--connect-timeout", "20", *args, **kw)

    def rbd(self, *args, **kw) -> subprocess.CompletedProcess:
        """Runs the rbd tool against this cluster."""
        return self._run("rbd", "-c", self.conf, *args, **kw)

    def _pidfile(self, name: str) -> Path:
        return self.dir / "run" / f"{name}.pid"

    def _pid(self, name: str):
        try:
            return int(self._pidfile(name).read_text().strip())
        except (OSError, ValueError):
            return None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> "CephCluster":
        """Creates and starts the cluster, with pool ``self.pool`` ready for images."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("run", "log", "mon/mon.a", "osd/osd.0"):
            (self.dir / sub).mkdir(parents=True)
        self._write_conf()
        try:
            self._run("ceph-mon", "-c", self.conf, "-i", "a", "--mkfs", "--keyring", "/dev/null")
            self._run("ceph-mon", "-c", self.conf, "-i", "a")
            self.osd_uuid = str(uuid.uuid4())
            self.ceph("osd", "new", self.osd_uuid)
            self._run(
                "ceph-osd", "-c", self.conf, "-i", "0", "--mkfs",
                "--osd-uuid", self.osd_uuid, "--keyring", "/dev/null",
            )  # fmt: skip
            self.start_osd()
            self.ceph("osd", "pool", "create", self.pool, "8", "8")
            self.rbd("pool", "init", self.pool)
        except BaseException as e:
            log = self.logs()
            self.stop()
            if isinstance(e, subprocess.CalledProcessError):
                raise RuntimeError(f"{e.cmd} failed: {e.stderr}\n{log}") from None
            raise
        return self

    def start_osd(self, timeout: float = 60) -> None:
        """Starts osd.0 (again) and waits until the monitor sees it up."""
        self._run("ceph-osd", "-c", self.conf, "-i", "0")
        self.wait_osd(True, timeout)

    def stop_osd(self, timeout: float = 60) -> None:
        """Stops osd.0 and waits until it has exited and the monitor marks it
        down. SIGTERM, not SIGKILL: memstore keeps the data in memory and saves
        it to its directory only when the OSD shuts down cleanly."""
        pid = self._pid("osd.0")
        if pid is not None and _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid):
                if time.monotonic() > deadline:
                    raise RuntimeError("osd.0 ignored SIGTERM")
                time.sleep(0.1)
        self.ceph("osd", "down", "0", check=False)
        self.wait_osd(False, timeout)

    def wait_osd(self, up: bool, timeout: float = 60) -> None:
        """Waits until the osd map shows osd.0 up (or down)."""
        deadline = time.monotonic() + timeout
        want = "up" if up else "down"
        while True:
            out = self.ceph("osd", "dump", "--format", "json", check=False)
            if out.returncode == 0:
                osds = json.loads(out.stdout).get("osds", [])
                if osds and bool(osds[0].get("up")) == up:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"osd.0 not {want} after {timeout}s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Kills every daemon of the cluster and removes its directory."""
        for name in ("osd.0", "mon.a"):
            pid = self._pid(name)
            if pid is not None and _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self, tail: int = 30) -> str:
        """The last lines of each daemon log, for error messages."""
        out = []
        for log in sorted((self.dir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> "CephCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- images ----------------------------------------------------------------

    def create_image(self, name: str, size: int, features: str = None) -> None:
        """Creates image ``name`` of ``size`` bytes in the pool (default features:
        layering, exclusive-lock, object-map, fast-diff, deep-flatten)."""
        args = ["create", "--size", f"{size}B", f"{self.pool}/{name}"]
        if features:
            args += ["--image-feature", features]
        self.rbd(*args)

    def export(self, name: str, path: Path) -> None:
        """Copies image ``name`` (or ``name@snap``) into the file ``path``."""
        self.rbd("export", "--no-progress", f"{self.pool}/{name}", path)

    def import_(self, path: Path, name: str) -> None:
        """Creates image ``name`` from the file ``path``."""
        self.rbd("import", "--no-progress", path, f"{self.pool}/{name}")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("start", "stop", "rbd", "missing"):
        print(__doc__, file=sys.stderr)
        return 2
    c = CephCluster(Path(argv[2]))
    if argv[1] == "start":
        gone = missing()
        if gone:
            print(json.dumps({"missing": gone}))
            return 3
        c.start()
        print(json.dumps({"conf": str(c.conf), "pool": c.pool}))
    elif argv[1] == "stop":
        c.stop()
    elif argv[1] == "rbd":
        r = c.rbd(*argv[3:], check=False)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
