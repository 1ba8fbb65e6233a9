"""blkgraph-ctl top and graph --stats, as a person sees them: top runs in a
tmux pane while qemu-io reads and writes through NBD, and the pane's text is
checked; graph --stats puts the figures on the edges."""

import shutil
import subprocess
import threading
import time

import pytest

from conftest import running

MIB = 1 << 20


@pytest.fixture
def busy_daemon(blkgraph_bin, workdir):
    """A daemon with an NBD export and a client that keeps it busy."""
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)
    nbd, qmp = workdir / "nbd.sock", workdir / "qmp.sock"
    # fmt: off
    args = [
        str(blkgraph_bin),
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "nbd,id=e0,node-name=disk0,name=d0,writable=on",
        "--qmp", str(qmp),
    ]
    # fmt: on
    stop = threading.Event()
    uri = f"nbd+unix:///d0?socket={nbd}"
    commands = [a for i in range(400) for a in ("-c", f"write {i % 64 * 4}k 4k", "-c", "read 0 4k")]

    def load():
        # Bounded: at most 60 s of traffic, stopped by the test.
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:
            subprocess.run(["qemu-io", "-f", "raw", *commands, uri], capture_output=True, timeout=60)

    with running(args, qmp, stderr=subprocess.DEVNULL):
        thread = threading.Thread(target=load)
        thread.start()
        try:
            yield qmp
        finally:
            stop.set()
            thread.join()


def ctl(blkgraph_bin):
    return str(blkgraph_bin.parent / "blkgraph-ctl")


def test_top_in_a_terminal(blkgraph_bin, busy_daemon, workdir):
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is missing (apt-get install tmux)")
    session = f"blkgraph-top-{workdir.name}"[:60]
    env_sock = ["-L", session]  # a tmux server of the test's own
    cmd = f"{ctl(blkgraph_bin)} -s {busy_daemon} top --interval 0.5"
    subprocess.run([tmux, *env_sock, "new-session", "-d", "-s", session, "-x", "160", "-y", "30", cmd], check=True)
    try:
        screen = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)
            screen = subprocess.run(
                [tmux, *env_sock, "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            rows = [line.split() for line in screen.splitlines()]
            e0 = [r for r in rows if r and r[0] == "e0"]
            if e0 and float(e0[0][2]) > 0 and float(e0[0][3]) > 0 and e0[0][8] != "-":
                break
        assert "blkgraph-ctl top" in screen, screen
        header = next(r for r in rows if r and r[0] == "EXPORT")
        assert header[:5] == ["EXPORT", "NODE", "READ/s", "WRITE/s", "FLUSH/s"], screen
        (row,) = e0
        assert row[1] == "disk0", screen
        assert float(row[2]) > 0 and float(row[3]) > 0, screen  # reads and writes per second
        assert row[8] != "-" and row[10] != "-", screen  # read and write p50
        # The nodes: disk0 carries the export's traffic.
        disk0 = [r for r in rows if r and r[0] == "disk0" and len(r) == 9]
        assert disk0 and float(disk0[0][1]) > 0, screen
    finally:
        subprocess.run([tmux, *env_sock, "kill-server"], capture_output=True)


def test_graph_with_figures_on_the_edges(blkgraph_bin, busy_daemon):
    out = subprocess.run(
        [ctl(blkgraph_bin), "-s", str(busy_daemon), "graph", "--stats", "--interval", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    root = next(line for line in out.splitlines() if '"root' in line)
    assert "r/s" in root and "w/s" in root and "latency" in root, out
    plain = subprocess.run(
        [ctl(blkgraph_bin), "-s", str(busy_daemon), "graph"], capture_output=True, text=True, check=True
    ).stdout
    assert "r/s" not in plain
