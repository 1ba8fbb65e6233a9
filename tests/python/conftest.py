"""Fixtures for blkgraph's integration tests.

The storage daemon under test is selected per test through the ``daemon_kind``
parameter: "blkgraph" always, "qsd" (qemu-storage-daemon, the reference) as
well when BLKGRAPH_TEST_QSD=1.  Both get the same QSD-style command line.

Environment:
    BLKGRAPH_BIN       blkgraph binary (default target/release/blkgraph,
                       relative to the repository root)
    QSD_BIN            qemu-storage-daemon binary (default from PATH)
    BLKGRAPH_TEST_QSD  1: run the daemon tests against QSD too
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The size of qmp_daemon's image.
IMAGE_SIZE = 16 << 20
sys.path.insert(0, str(REPO / "tests" / "guest"))


def daemon_kinds() -> list[str]:
    """The daemons the tests run against."""
    kinds = ["blkgraph"]
    if os.environ.get("BLKGRAPH_TEST_QSD") == "1":
        kinds.append("qsd")
    return kinds


def pytest_generate_tests(metafunc):
    """Parametrize every test that takes daemon_kind by daemon_kinds()."""
    if "daemon_kind" in metafunc.fixturenames:
        metafunc.parametrize("daemon_kind", daemon_kinds())


class StorageDaemon:
    """A storage daemon exporting one image as a vhost-user-blk socket.

    The image is a file node "f0" under a format node "disk0" of driver fmt
    (raw by default); file_opts and format_opts are appended to their
    --blockdev options (e.g. ",discard=unmap").
    """

    def __init__(
        self,
        binary: str,
        workdir: Path,
        image: Path,
        num_queues: int = 1,
        name: str = "vub0",
        qmp: bool = False,
        extra_args=(),
        pass_fds=(),
        fmt="raw",
        file_opts="",
        format_opts="",
        throttle_iops=None,
        blockdevs=None,
    ):
        self.binary = binary
        self.pass_fds = tuple(pass_fds)
        self.socket = workdir / f"{name}.sock"
        self.pidfile = workdir / f"{name}.pid"
        self.log = workdir / f"{name}.daemon.log"
        self.qmp = workdir / f"{name}.qmp" if qmp else None
        root = "disk0" if throttle_iops is None else "thr0"
        export = (
            f"type=vhost-user-blk,id=vub0,node-name={root},addr.type=unix,"
            f"addr.path={self.socket},writable=on,num-queues={num_queues},logical-block-size=512"
        )
        if blockdevs is None:
            blockdevs = [
                f"driver=file,node-name=f0,filename={image}{file_opts}",
                f"driver={fmt},node-name=disk0,file=f0{format_opts}",
            ]
        self.args = [binary]
        for blockdev in blockdevs:
            self.args += ["--blockdev", blockdev]
        if throttle_iops is not None:
            # fmt: off
            self.args += [
                "--object", f"throttle-group,id=tg0,limits.iops-write={throttle_iops}",
                "--blockdev", "driver=throttle,node-name=thr0,throttle-group=tg0,file=disk0",
            ]
            # fmt: on
        self.args += ["--export", export, "--pidfile", str(self.pidfile)]
        if qmp:
            chardev = f"socket,id=qmp0,path={self.qmp},server=on,wait=off"
            self.args += ["--chardev", chardev, "--monitor", "chardev=qmp0"]
        self.args += list(extra_args)
        self.proc = None

    def start(self, timeout: float = 30) -> "StorageDaemon":
        """Start the daemon; return once its pidfile and socket exist."""
        self.pidfile.unlink(missing_ok=True)
        with open(self.log, "w") as log:
            log.write(" ".join(self.args) + "\n")
            log.flush()
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=self.pass_fds,
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.binary} exited with {self.proc.returncode}:\n{self._log()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.binary} not ready after {timeout}s:\n{self._log()}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        sockets = [self.socket] + ([self.qmp] if self.qmp else [])
        pid = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
        return bool(pid) and all(s.exists() for s in sockets)

    def _log(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """Stop the daemon with SIGTERM and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"{self.binary} ignored SIGTERM for {timeout}s") from None
        return self.proc.returncode

    def kill(self) -> None:
        """Kill the daemon if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def blkgraph_bin() -> Path:
    """Path of the blkgraph binary (BLKGRAPH_BIN, default target/release/blkgraph)."""
    path = Path(os.environ.get("BLKGRAPH_BIN", "target/release/blkgraph"))
    return path if path.is_absolute() else REPO / path


@pytest.fixture
def daemon_bin(daemon_kind, blkgraph_bin) -> str:
    """The binary of the daemon under test."""
    if daemon_kind == "qsd":
        return os.environ.get("QSD_BIN", "qemu-storage-daemon")
    if not os.access(blkgraph_bin, os.X_OK):
        pytest.fail(f"{blkgraph_bin} is missing: run cargo build --release, or set BLKGRAPH_BIN")
    return str(blkgraph_bin)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A temporary directory whose path is safe in QEMU options and socket addresses."""
    if "," in str(tmp_path) or "=" in str(tmp_path) or len(str(tmp_path)) > 80:
        pytest.fail(f"temporary directory {tmp_path} is unusable: set TMPDIR to a short plain path")
    return tmp_path


@pytest.fixture
def start_daemon(daemon_bin, workdir):
    """Return a function that starts the daemon under test on an image.

    start_daemon(image, num_queues=1, name="vub0", qmp=False, extra_args=(), pass_fds=(),
                 fmt="raw", file_opts="", format_opts="", throttle_iops=None, blockdevs=None)
    returns a started StorageDaemon, which inherits the descriptors pass_fds
    and, with throttle_iops, exports a throttle node over the disk that
    limits writes (not reads) to that rate; blockdevs replaces the default
    --blockdev options (file f0, FMT disk0) and must define the node disk0;
    daemons still running at teardown are stopped with SIGTERM.
    """
    daemons = []

    def start(image, **kwargs) -> StorageDaemon:
        daemon = StorageDaemon(daemon_bin, workdir, image and Path(image), **kwargs)
        daemons.append(daemon)
        return daemon.start()

    yield start
    for daemon in daemons:
        if daemon.proc is not None:
            try:
                daemon.stop()
            except RuntimeError:
                pass


@pytest.fixture
def qmp_daemon(daemon_kind, start_daemon, workdir):
    """The standard test daemon (f0 <- disk0 <- export vub0, a raw image of
    IMAGE_SIZE) with a QMP socket."""
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return start_daemon(image, qmp=True)


@contextlib.contextmanager
def running(args, ready: Path, timeout: float = 20, **popen):
    """Runs a command (a daemon) for the block's duration, from the moment
    `ready` exists; it is sent SIGTERM at the end."""
    proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL, **popen)
    try:
        deadline = time.monotonic() + timeout
        while not Path(ready).exists():
            assert proc.poll() is None, f"{args[0]} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{ready} did not appear"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
