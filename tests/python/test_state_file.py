"""--state-file: a daemon started again with the same command line comes back
with what was changed over QMP since it started (qemu.qmp's client throughout).

- A throttle group object, a throttle filter inserted over the vhost-user
  export's root (x-blockdev-replace), a qcow2 node with a persistent bitmap,
  an NBD server and export, and bitmaps that live in memory: after SIGTERM and
  a start with the same command line, query-named-block-nodes,
  query-block-exports and the graph's edges are what they were. The qcow2
  bitmap comes back from the image with its bits; those that lived in memory
  come back inconsistent (QEMU's error when an NBD export or a backup uses
  them), each announced by __org.blkgraph_BLOCK_DIRTY_BITMAP_LOST; data
  written over NBD before is read back after.
- A stream job that ends on its own (no QMP command after it) has its new
  graph in the file, and a restart after kill -9 has it.
- A node the daemon named (`#blockNNN`: the backing file a qcow2 header
  names) exported over NBD by that name: after a restart the export serves
  the same image, not whichever node got the name this time.
- kill -9 during a stream of changes never leaves a partial file: the file
  parses, is one of the committed states, and the daemon starts from it.
- A corrupt, unreadable or newer file, or one whose nodes cannot open: exit 1
  with an error naming the file, and nothing started.

blkgraph only: qemu-storage-daemon has no state file.
"""

import asyncio
import json
import random
import subprocess
import threading
import time

import pytest

from test_jobs import cmd, connect, ok, wait_event

MIB = 1 << 20
SIZE = 16 * MIB
LOST = "__org.blkgraph_BLOCK_DIRTY_BITMAP_LOST"
INCONSISTENT = "Bitmap '{}' is inconsistent and cannot be used"


@pytest.fixture(autouse=True)
def blkgraph_only(daemon_kind):
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon has no --state-file")


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert not check or r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


def raw_image(path, size=SIZE):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def error(q, command, **args) -> str:
    r = cmd(q, command, **args)
    assert "error" in r, f"{command}: {r}"
    return r["error"]["desc"]


def shape(q) -> dict:
    """What must come back: the nodes (without their images' data, which
    changes: a qcow2 image stores its bitmaps at exit and grows; and their
    bitmaps, compared apart), the exports and the graph's edges."""
    nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
    for n in nodes.values():
        n.pop("image")
        n.pop("dirty-bitmaps")
    graph = ok(q, "x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    edges = sorted((names[e["parent"]], e["name"], names[e["child"]]) for e in graph["edges"])
    exports = sorted(ok(q, "query-block-exports"), key=lambda e: e["id"])
    return {"nodes": nodes, "exports": exports, "edges": edges}


def insert_throttle(q, limits: dict) -> None:
    """Inserts a throttle node thr0 of a new group tg0 over disk0, the root of
    export vub0, over QMP."""
    ok(q, "object-add", **{"qom-type": "throttle-group", "id": "tg0", "limits": limits})
    ok(q, "blockdev-add", driver="throttle", file="disk0",
       **{"node-name": "thr0", "throttle-group": "tg0"})  # fmt: skip
    ok(q, "x-blockdev-replace",
       **{"parent-type": "export", "export-id": "vub0", "new-child": "thr0"})  # fmt: skip


def bitmaps(q) -> dict:
    return {
        (n["node-name"], b["name"]): b
        for n in ok(q, "query-named-block-nodes")
        for b in n["dirty-bitmaps"]
    }


def events(q, wait=1.0) -> list:
    """The events that came, until none comes for `wait` seconds."""
    got = []
    while True:
        try:
            got.append(q.pull_event(wait=wait))
        except (TimeoutError, asyncio.TimeoutError):
            return got


def node_names(state: dict) -> set:
    return {b["options"]["node-name"] for b in state["blockdevs"]}


def test_a_restart_comes_back_with_what_qmp_changed(start_daemon, workdir):
    image = raw_image(workdir / "disk.raw")
    qcow2 = workdir / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", qcow2, SIZE)
    state = workdir / "state.json"
    nbd = workdir / "nbd.sock"
    # An object on the command line: it comes back from the file too.
    object_arg = ["--object", "throttle-group,id=tgc,limits.iops-total=1000"]
    daemon = start_daemon(image, qmp=True, extra_args=["--state-file", str(state), *object_arg])
    # The command line's graph is in the file from the start.
    assert node_names(json.loads(state.read_text())) == {"f0", "disk0"}
    q = connect(daemon)
    insert_throttle(q, {"iops-total": 100000})
    ok(
        q,
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "q0"},
        file={"driver": "file", "filename": str(qcow2)},
    )
    ok(q, "block-dirty-bitmap-add", node="q0", name="p0", persistent=True, granularity=65536)
    ok(q, "block-dirty-bitmap-add", node="disk0", name="b0", granularity=65536)
    ok(q, "block-dirty-bitmap-add", node="disk0", name="b1", granularity=4096, disabled=True)
    ok(q, "nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
    ok(q, "block-export-add", type="nbd", id="n0", name="q0", writable=True, **{"node-name": "q0"})
    uri = f"nbd+unix:///q0?socket={nbd}"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", uri)
    before = shape(q)
    # An export of a bitmap that will lose its bits: not started again.
    ok(q, "block-export-add", type="nbd", id="n2", name="d0", bitmaps=["b1"],
       **{"node-name": "disk0"})  # fmt: skip
    bitmaps_before = bitmaps(q)
    q.close()
    assert bitmaps_before[("q0", "p0")]["count"] == 65536
    assert daemon.stop() == 0

    saved = json.loads(state.read_text())
    assert saved["version"] == 1
    assert {"thr0", "q0"} <= node_names(saved)
    assert {e["options"]["id"]: e["options"]["node-name"] for e in saved["exports"]} == {
        "vub0": "thr0",
        "n0": "q0",
        "n2": "disk0",
    }
    assert set(saved["objects"]) == {"tg0", "tgc"}

    # The same command line: its graph options are ignored for the file's.
    daemon.start()
    assert "--export options are ignored" in daemon.log.read_text()
    q = connect(daemon)
    came = events(q)
    lost = sorted((e["data"]["node"], e["data"]["name"]) for e in came if e["event"] == LOST)
    assert lost == [("disk0", "b0"), ("disk0", "b1")]
    deleted = [e["data"] for e in came if e["event"] == "BLOCK_EXPORT_DELETED"]
    assert deleted == [{"id": "n2"}]
    assert "export 'n2': not started" in daemon.log.read_text()
    assert shape(q) == before
    after = bitmaps(q)
    assert set(after) == set(bitmaps_before)
    # The persistent one came back from the image, bits and all.
    assert after[("q0", "p0")] == bitmaps_before[("q0", "p0")]
    for key in [("disk0", "b0"), ("disk0", "b1")]:
        b = dict(after[key])
        assert b.pop("inconsistent") is True and b.pop("count") == 0
        expected = dict(bitmaps_before[key])
        expected.pop("count")
        assert b == expected
    assert after[("disk0", "b1")]["recording"] is False
    # Lost bits cannot be exported or backed up from.
    desc = error(
        q, "block-export-add", type="nbd", id="n1", bitmaps=["b0"], **{"node-name": "disk0"}
    )
    assert desc == INCONSISTENT.format("b0")
    ok(q, "blockdev-add", driver="null-co", **{"node-name": "null0"}, size=SIZE)
    ok(q, "blockdev-add", driver="throttle", file="null0",
       **{"node-name": "thr1", "throttle-group": "tgc"})  # fmt: skip
    desc = error(q, "blockdev-backup", device="disk0", target="null0", sync="incremental",
                 bitmap="b0", **{"job-id": "bk0"})  # fmt: skip
    assert desc == INCONSISTENT.format("b0")
    ok(q, "block-dirty-bitmap-remove", node="disk0", name="b0")
    q.close()
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k", uri).stdout
    assert "read 65536/65536" in out and "Pattern verification failed" not in out, out
    assert daemon.stop() == 0
    # What changed after the restart is kept too.
    saved = json.loads(state.read_text())
    assert {(b["node"], b["name"]) for b in saved["bitmaps"]} == {("q0", "p0"), ("disk0", "b1")}
    assert {"null0", "thr1"} <= node_names(saved)


def test_a_job_that_ends_writes_the_file(start_daemon, workdir):
    """block-stream ends on its own: its new graph (no backing file) is in the
    file without a QMP command after it, and a restart after kill -9 has it."""
    base = workdir / "base.raw"
    base.write_bytes(bytes(range(256)) * (8 * MIB // 256))
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    state = workdir / "state.json"
    # fmt: off
    blockdevs = [
        f"driver=file,node-name=bf,filename={base}",
        "driver=raw,node-name=base,file=bf",
        f"driver=file,node-name=f0,filename={top}",
        "driver=qcow2,node-name=disk0,file=f0,backing=base",
    ]
    # fmt: on
    daemon = start_daemon(
        top, qmp=True, blockdevs=blockdevs, extra_args=["--state-file", str(state)]
    )

    def disk0() -> dict:
        saved = json.loads(state.read_text())
        return next(b for b in saved["blockdevs"] if b["options"]["node-name"] == "disk0")

    q = connect(daemon)
    # About two seconds: it ends well after block-stream's reply.
    ok(q, "block-stream", device="disk0", speed=4 * MIB, **{"job-id": "s0"})
    assert disk0()["options"]["backing"] == "base"
    done = wait_event(q, "BLOCK_JOB_COMPLETED", device="s0")
    assert "error" not in done["data"], done
    deadline = time.monotonic() + 10
    while "backing" in disk0()["options"]:
        assert time.monotonic() < deadline, disk0()
        time.sleep(0.1)
    q.close()
    daemon.kill()
    daemon.start()
    q = connect(daemon)
    nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
    q.close()
    assert "backing_file" not in nodes["disk0"]
    assert {"base", "bf"} <= set(nodes)


def test_an_export_of_a_named_by_the_daemon_node_survives(start_daemon, workdir):
    chains = {}
    for name, byte in (("disk", 0x11), ("other", 0x42)):
        base = workdir / f"{name}-base.raw"
        base.write_bytes(bytes([byte]) * (4 * MIB))
        top = workdir / f"{name}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x7a 0 1M", top)
        chains[name] = (base, top)
    state = workdir / "state.json"
    nbd = workdir / "nbd.sock"
    daemon = start_daemon(
        chains["disk"][1], qmp=True, fmt="qcow2", extra_args=["--state-file", str(state)]
    )
    q = connect(daemon)
    # Added after the command line's nodes, first by name: opened first at
    # the next start, where its backing file would get another name.
    ok(q, "blockdev-add", driver="qcow2", **{"node-name": "a2"},
       file={"driver": "file", "filename": str(chains["other"][1])})  # fmt: skip
    backing = next(
        n["node-name"]
        for n in ok(q, "query-named-block-nodes")
        if n["drv"] == "raw" and n["file"] == str(chains["other"][0])
    )
    assert backing.startswith("#block"), backing
    ok(q, "nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
    ok(q, "block-export-add", type="nbd", id="b0", name="base", **{"node-name": backing})
    q.close()
    assert daemon.stop() == 0
    daemon.start()
    q = connect(daemon)
    # The unshared names the daemon gives may change; the export's does not.
    export = next(e for e in ok(q, "query-block-exports") if e["id"] == "b0")
    assert export["node-name"] == backing, export
    node = next(n for n in ok(q, "query-named-block-nodes") if n["node-name"] == backing)
    assert node["file"] == str(chains["other"][0]), node
    q.close()
    uri = f"nbd+unix:///base?socket={nbd}"
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 4M", uri)
    assert daemon.stop() == 0


def test_kill_during_changes_leaves_a_committed_state(start_daemon, workdir):
    image = raw_image(workdir / "disk.raw")
    state = workdir / "state.json"
    daemon = start_daemon(image, qmp=True, extra_args=["--state-file", str(state)])
    for rnd in range(4):
        q = connect(daemon)
        acked = []

        def add_nodes():
            try:
                for i in range(100000):
                    r = cmd(q, "blockdev-add", driver="null-co", size=SIZE,
                            **{"node-name": f"r{rnd}n{i}"})  # fmt: skip
                    assert "return" in r, r
                    acked.append(i)
            except Exception:  # the connection goes with the daemon
                return

        writer = threading.Thread(target=add_nodes)
        writer.start()
        time.sleep(random.uniform(0.3, 1.0))
        daemon.kill()
        writer.join(30)
        assert not writer.is_alive()
        try:
            q.close()
        except Exception:  # the daemon closed it first
            pass
        assert acked, "no change was made before the kill"
        saved = json.loads(state.read_text())
        assert saved["version"] == 1
        mine = {n for n in node_names(saved) if n.startswith(f"r{rnd}n")}
        k = len(mine)
        # Every acknowledged change is there, and at most the one in flight.
        assert mine == {f"r{rnd}n{i}" for i in range(k)}
        assert len(acked) <= k <= len(acked) + 1, (len(acked), k)
        daemon.start()
        q = connect(daemon)
        names = {n["node-name"] for n in ok(q, "query-named-block-nodes")}
        q.close()
        assert names == node_names(saved)


@pytest.mark.parametrize("case", ["truncated", "newer", "directory", "missing-image"])
def test_a_bad_state_file_is_an_error(blkgraph_bin, workdir, case):
    image = raw_image(workdir / "disk.raw")
    state = workdir / "state.json"
    pidfile = workdir / "pid"
    good = {
        "version": 1,
        "objects": {},
        "blockdevs": [
            {
                "keyval": True,
                "options": {"driver": "file", "node-name": "f0", "filename": str(image)},
            },
            {"keyval": True, "options": {"driver": "raw", "node-name": "disk0", "file": "f0"}},
        ],
        "nbd_server": None,
        "exports": [],
        "bitmaps": [],
    }
    if case == "truncated":
        state.write_text(json.dumps(good)[:100])
    elif case == "newer":
        state.write_text(json.dumps(dict(good, version=2)))
    elif case == "directory":
        state.mkdir()
    else:
        good["blockdevs"][0]["options"]["filename"] = str(workdir / "gone.raw")
        state.write_text(json.dumps(good))
    # fmt: off
    r = run(
        blkgraph_bin,
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk0,file=f0",
        "--pidfile", pidfile, "--state-file", state,
        check=False,
    )
    # fmt: on
    assert r.returncode == 1, r
    assert f"state file '{state}'" in r.stderr, r.stderr
    assert not pidfile.exists()
    if case == "missing-image":
        assert "node 'f0'" in r.stderr, r.stderr
