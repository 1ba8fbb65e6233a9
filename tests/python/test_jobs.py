"""Block jobs over QMP, as the tools that use them send the commands, with the
unmodified qemu.qmp client; against qemu-storage-daemon too when
BLKGRAPH_TEST_QSD=1 (the flows are QEMU's, so QSD must pass them as well).

- libvirt's pull-mode backup: a scratch qcow2 over the disk, a
  blockdev-backup sync=none in a grouped transaction, an NBD export of the
  scratch node, the backup read while a client writes to the vhost-user
  export, then block-job-cancel, job-dismiss and blockdev-del;
- a push backup: full, then incremental with the bitmap added in the full
  backup's transaction, each equal to the image at its start;
- job states and verbs: pause, resume, set-speed, finalize, dismiss, cancel
  in each state, and QEMU's errors for verbs a state refuses;
- error policies against a target that runs out of space;
- QEMU's image-fleecing test, its blockdev-backup sync=none variant, with
  qcow2 images (the copy-before-write + snapshot-access variant is in
  test_qcow2_backup.py).
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import REPO

MIB = 1 << 20
SIZE = 64 * MIB


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: {r.stdout}{r.stderr}")
    return r


def make_image(path: Path, size: int = SIZE) -> bytes:
    """A raw image of varied data; returns its content."""
    data = bytes((i * 7 + (i >> 12)) & 0xFF for i in range(4096)) * (size // 4096)
    path.write_bytes(data)
    return data


def connect(daemon) -> QEMUMonitorProtocol:
    q = QEMUMonitorProtocol(str(daemon.qmp))
    q.connect()
    return q


def cmd(q, command, **args) -> dict:
    return q.cmd_obj({"execute": command, "arguments": args})


def ok(q, command, **args) -> dict:
    r = cmd(q, command, **args)
    assert "return" in r, f"{command}: {r}"
    return r["return"]


def export_del(q, export_id: str, timeout=10) -> None:
    """block-export-del (mode safe) once the export's last client has gone:
    a client that closed its connection is gone for the server a moment
    later, and a safe delete refuses an export with a client (QEMU's too)."""
    deadline = time.monotonic() + timeout
    while True:
        r = cmd(q, "block-export-del", id=export_id)
        if "return" in r or "still in use" not in r["error"]["desc"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "return" in r, f"block-export-del {export_id}: {r}"


def wait_event(q, name, timeout=60, **match) -> dict:
    """The next event `name` whose data has `match`; other events are kept
    out of the way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = q.pull_event(wait=max(0.01, deadline - time.monotonic()))
        if ev:
            SEEN.setdefault(id(q), []).append(ev)
        if ev and ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
            return ev
    raise AssertionError(f"no {name} {match} within {timeout} s")


# Events wait_event pulled, by client.
SEEN: dict = {}


def job_statuses(q, job_id) -> list:
    """The JOB_STATUS_CHANGE statuses of a job, from the events seen so far."""
    return [
        e["data"]["status"]
        for e in SEEN.get(id(q), []) + q.get_events()
        if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id
    ]


def graph_shape(q) -> list:
    """The nodes and their drivers and children, to compare before and after."""
    nodes = ok(q, "query-named-block-nodes")
    return sorted((n["node-name"], n["drv"], n.get("backing_file")) for n in nodes)


class Writer:
    """blkgraph-bench writing random data to a vhost-user socket in the
    background (the guest)."""

    def __init__(self, socket: Path, seconds: float, size: int = SIZE):
        bench = Path(os.environ.get("BENCH_BIN", REPO / "target/release/blkgraph-bench"))
        self.proc = subprocess.Popen(
            [str(bench), "--socket", str(socket), "--rw", "randwrite", "--bs", "4k",
             "--iodepth", "8", "--runtime", str(seconds), "--size", str(size)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def wait(self) -> dict:
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        result = json.loads(out)
        assert result["write_ios"] > 0, result
        return result


@pytest.fixture
def disk(workdir) -> tuple:
    image = workdir / "disk.raw"
    return image, make_image(image)


def nbd_args(workdir) -> list:
    return ["--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}"]


def nbd_uri(workdir, name) -> str:
    return f"nbd+unix:///{name}?socket={workdir / 'nbd.sock'}"


def test_libvirt_pull_backup(start_daemon, workdir, disk):
    """The QMP sequence libvirt sends for a pull-mode backup, with writes
    during the backup: the NBD reader gets the point-in-time image; cancel
    and dismiss leave no job and the graph as before."""
    image, before = disk
    scratch = workdir / "scratch.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", scratch, SIZE)
    daemon = start_daemon(image, qmp=True, extra_args=nbd_args(workdir))
    q = connect(daemon)
    try:
        shape = graph_shape(q)
        ok(q, "blockdev-add", driver="file", filename=str(scratch),
           **{"node-name": "libvirt-2-storage", "auto-read-only": True, "discard": "unmap"})  # fmt: skip
        ok(q, "blockdev-add", driver="qcow2", file="libvirt-2-storage", backing="disk0",
           **{"node-name": "libvirt-2-format", "read-only": False, "discard": "unmap"})  # fmt: skip
        ok(q, "transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {
                "node": "disk0", "name": "backup-vda", "persistent": False}},
            {"type": "blockdev-backup", "data": {
                "device": "disk0", "job-id": "backup-vda-libvirt-1-format",
                "target": "libvirt-2-format", "sync": "none", "auto-finalize": True,
                "auto-dismiss": False}},
        ])  # fmt: skip
        # QEMU refuses other actions than backups with grouped completion.
        r = cmd(
            q,
            "transaction",
            properties={"completion-mode": "grouped"},
            actions=[{"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "x"}}],
        )
        assert r["error"]["desc"] == ("Action 'block-dirty-bitmap-add' does not support "
                                      "transaction property completion-mode = grouped")  # fmt: skip
        ok(q, "block-export-add", type="nbd", id="libvirt-nbd-libvirt-2-format", name="vda",
           writable=False, **{"node-name": "libvirt-2-format"})  # fmt: skip
        writer = Writer(daemon.socket, 4)
        time.sleep(0.5)  # let writes land before and while the backup is read
        backup = workdir / "backup.raw"
        run("nbdcopy", nbd_uri(workdir, "vda"), backup)
        writer.wait()
        assert backup.read_bytes() == before, "the backup is the image at the backup's start"
        assert image.read_bytes() != before, "the guest wrote during the backup"
        jobs = ok(q, "query-jobs")
        assert [(j["id"], j["type"], j["status"]) for j in jobs] == [
            ("backup-vda-libvirt-1-format", "backup", "running")
        ]
        export_del(q, "libvirt-nbd-libvirt-2-format")
        ok(q, "block-job-cancel", device="backup-vda-libvirt-1-format", force=True)
        wait_event(q, "BLOCK_JOB_CANCELLED", device="backup-vda-libvirt-1-format")
        wait_event(q, "JOB_STATUS_CHANGE", id="backup-vda-libvirt-1-format", status="concluded")
        ok(q, "job-dismiss", id="backup-vda-libvirt-1-format")
        assert ok(q, "query-jobs") == []
        ok(q, "blockdev-del", **{"node-name": "libvirt-2-format"})
        ok(q, "blockdev-del", **{"node-name": "libvirt-2-storage"})
        ok(q, "block-dirty-bitmap-remove", node="disk0", name="backup-vda")
        assert graph_shape(q) == shape
    finally:
        q.close()


def test_push_backup_full_then_incremental(start_daemon, workdir, disk):
    """A full backup while the guest writes equals the image at its start;
    an incremental one with the bitmap made in the full backup's transaction,
    laid over the full one, equals the image at its own start."""
    image, before = disk
    full = workdir / "full.raw"
    full.write_bytes(bytes(SIZE))
    inc = workdir / "inc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "raw", inc, SIZE)
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    try:
        ok(q, "blockdev-add", driver="raw", file={"driver": "file", "filename": str(full)},
           **{"node-name": "full"})  # fmt: skip
        ok(q, "transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b0"}},
            {"type": "blockdev-backup", "data": {
                "device": "disk0", "target": "full", "sync": "full", "job-id": "full0",
                "speed": 16 * MIB}},
        ])  # fmt: skip
        writer = Writer(daemon.socket, 3)
        wait_event(q, "BLOCK_JOB_COMPLETED", device="full0", timeout=60)
        writer.wait()
        ok(q, "blockdev-del", **{"node-name": "full"})
        assert full.read_bytes() == before

        # The incremental backup, while the guest writes again.
        at_start = image.read_bytes()
        assert at_start != before
        ok(q, "blockdev-add", driver="qcow2", backing=None,
           file={"driver": "file", "filename": str(inc)}, **{"node-name": "inc"})  # fmt: skip
        ok(q, "transaction", actions=[
            {"type": "blockdev-backup", "data": {
                "device": "disk0", "target": "inc", "sync": "incremental", "bitmap": "b0",
                "job-id": "inc0"}},
        ])  # fmt: skip
        writer = Writer(daemon.socket, 2, size=8 * MIB)
        wait_event(q, "BLOCK_JOB_COMPLETED", device="inc0", timeout=60)
        writer.wait()
        ok(q, "blockdev-del", **{"node-name": "inc"})
        # The bitmap now holds only what was written since the incremental.
        b0 = [b for n in ok(q, "query-named-block-nodes") if n["node-name"] == "disk0"
              for b in n["dirty-bitmaps"] if b["name"] == "b0"][0]  # fmt: skip
        assert 0 < b0["count"] <= 8 * MIB
    finally:
        q.close()
    restored = workdir / "restored.raw"
    run("qemu-img", "convert", "-O", "raw", inc, restored)
    assert restored.read_bytes() == at_start


def test_job_states_and_verbs(start_daemon, workdir, disk, daemon_kind):
    """Pause and resume (paused in query-block-jobs), set-speed, verbs a state
    refuses, a job waiting for job-finalize, cancel of a paused job."""
    image, _ = disk
    target = workdir / "target.raw"
    target.write_bytes(bytes(SIZE))
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    try:
        ok(q, "blockdev-add", driver="raw", file={"driver": "file", "filename": str(target)},
           **{"node-name": "tgt"})  # fmt: skip
        # Slow, waits for job-finalize, stays after it concludes.
        ok(q, "blockdev-backup", device="disk0", target="tgt", sync="full", speed=4 * MIB,
           **{"job-id": "j1", "auto-finalize": False, "auto-dismiss": False})  # fmt: skip
        r = cmd(q, "job-complete", id="j1")
        assert r["error"]["desc"] == (
            "Job 'j1' in state 'running' cannot accept command verb 'complete'"
        )
        r = cmd(q, "job-finalize", id="j1")
        assert r["error"]["desc"] == (
            "Job 'j1' in state 'running' cannot accept command verb 'finalize'"
        )
        r = cmd(q, "job-dismiss", id="nope")
        assert r["error"]["class"] == "GenericError" and r["error"]["desc"] == "Job not found"
        r = cmd(q, "block-job-pause", device="nope")
        assert r["error"]["class"] == "DeviceNotActive"
        ok(q, "job-pause", id="j1")
        wait_event(q, "JOB_STATUS_CHANGE", id="j1", status="paused", timeout=10)
        info = ok(q, "query-block-jobs")[0]
        assert info["paused"] is True and info["status"] == "paused" and info["device"] == "j1"
        offset = info["offset"]
        time.sleep(0.5)
        assert ok(q, "query-block-jobs")[0]["offset"] == offset, "no progress while paused"
        r = cmd(q, "block-job-set-speed", device="j1", speed=-1)
        assert "error" in r
        ok(q, "block-job-set-speed", device="j1", speed=0)
        ok(q, "job-resume", id="j1")
        r = cmd(q, "job-resume", id="j1")
        assert "error" in r
        wait_event(q, "BLOCK_JOB_PENDING", id="j1", timeout=60)
        jobs = ok(q, "query-jobs")
        assert jobs[0]["status"] == "pending"
        assert jobs[0]["current-progress"] == jobs[0]["total-progress"] == SIZE
        ok(q, "job-finalize", id="j1")
        wait_event(q, "BLOCK_JOB_COMPLETED", device="j1")
        wait_event(q, "JOB_STATUS_CHANGE", id="j1", status="concluded")
        ok(q, "job-dismiss", id="j1")
        assert ok(q, "query-jobs") == []
        # Drains pause and resume a job too (QEMU's do), hence the middle.
        statuses = job_statuses(q, "j1")
        assert statuses[:4] == ["created", "running", "paused", "running"], statuses
        assert statuses[-4:] == ["waiting", "pending", "concluded", "null"], statuses
        assert set(statuses[4:-4]) <= {"paused", "running"}, statuses

        # Cancel while paused.
        ok(q, "blockdev-backup", device="disk0", target="tgt", sync="full", speed=MIB,
           **{"job-id": "j2"})  # fmt: skip
        ok(q, "job-pause", id="j2")
        wait_event(q, "JOB_STATUS_CHANGE", id="j2", status="paused", timeout=10)
        ok(q, "job-cancel", id="j2")
        wait_event(q, "BLOCK_JOB_CANCELLED", device="j2")
        wait_event(q, "JOB_STATUS_CHANGE", id="j2", status="null")
        assert ok(q, "query-jobs") == []
        ok(q, "blockdev-del", **{"node-name": "tgt"})
    finally:
        q.close()


@pytest.fixture
def tiny_fs(workdir):
    """An 8 MiB tmpfs for a target that runs out of space."""
    mnt = workdir / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("policy", ["report", "stop", "enospc", "ignore"])
def test_error_policies_on_a_full_target(start_daemon, workdir, disk, tiny_fs, policy):
    """on-target-error with a target that runs out of space: report fails the
    job, stop and enospc pause it (io-status nospace) until it is resumed or
    cancelled, ignore reports and retries."""
    image, _ = disk
    target = tiny_fs / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    try:
        ok(q, "blockdev-add", driver="raw", file={"driver": "file", "filename": str(target)},
           **{"node-name": "tgt"})  # fmt: skip
        ok(q, "blockdev-backup", device="disk0", target="tgt", sync="full",
           **{"job-id": "j", "on-target-error": policy})  # fmt: skip
        if policy == "report":
            ev = wait_event(q, "BLOCK_JOB_ERROR", device="j")
            assert ev["data"] == {"device": "j", "operation": "write", "action": "report"}
            done = wait_event(q, "BLOCK_JOB_COMPLETED", device="j")
            assert "No space left on device" in done["data"]["error"]
        elif policy in ("stop", "enospc"):
            ev = wait_event(q, "BLOCK_JOB_ERROR", device="j")
            assert ev["data"]["action"] == "stop"
            wait_event(q, "JOB_STATUS_CHANGE", id="j", status="paused", timeout=10)
            info = ok(q, "query-block-jobs")[0]
            assert info["io-status"] == "nospace" and info["paused"] is True
            ok(q, "job-resume", id="j")
            wait_event(q, "BLOCK_JOB_ERROR", device="j")  # still full: stops again
            ok(q, "job-cancel", id="j")
            wait_event(q, "BLOCK_JOB_CANCELLED", device="j")
        else:
            # Ignored errors are retried later (QEMU's backup): the job
            # goes on reporting them until the target has room, or it is
            # cancelled.
            for _ in range(2):
                ev = wait_event(q, "BLOCK_JOB_ERROR", device="j")
                assert ev["data"]["action"] == "ignore"
            assert ok(q, "query-jobs")[0]["status"] == "running"
            ok(q, "job-cancel", id="j")
            wait_event(q, "BLOCK_JOB_CANCELLED", device="j")
        wait_event(q, "JOB_STATUS_CHANGE", id="j", status="null")
        ok(q, "blockdev-del", **{"node-name": "tgt"})
    finally:
        q.close()


# (pattern, offset, length) as in QEMU's image-fleecing test.
FLEECE_PATTERNS = [("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
                   ("0xcd", "0x3ff0000", "64k")]  # fmt: skip
FLEECE_OVERWRITES = [("0xab", "0", "64k"), ("0xad", "0x00f8000", "64k"),
                     ("0x1d", "0x2008000", "64k"), ("0xea", "0x3fe0000", "64k")]  # fmt: skip
FLEECE_ZEROES = [("0x00f8000", "32k"), ("0x201f000", "32k"), ("0x3fe0000", "64k")]


def qemu_io(uri, *commands, read_only=False) -> str:
    args = [a for c in commands for a in ("-c", c)] + (["-r"] if read_only else [])
    out = run("qemu-io", "-f", "raw", *args, uri).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    return out


def test_image_fleecing_sync_none_qcow2(start_daemon, workdir):
    """QEMU's image-fleecing test, its blockdev-backup sync=none variant, with
    qcow2 images: the temp image over the source is read over NBD while the
    source is overwritten and zeroed; the reader sees the patterns as they
    were, and cancelling leaves no job and the graph as before."""
    base = workdir / "base.qcow2"
    temp = workdir / "fleece.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, SIZE)
    run("qemu-img", "create", "-q", "-f", "qcow2", temp, SIZE)
    for p, off, length in FLEECE_PATTERNS:
        run("qemu-io", "-c", f"write -P {p} {off} {length}", base)
    daemon = start_daemon(base, qmp=True, fmt="qcow2", extra_args=nbd_args(workdir))
    q = connect(daemon)
    try:
        shape = graph_shape(q)
        ok(q, "blockdev-add", driver="qcow2", backing="disk0",
           file={"driver": "file", "filename": str(temp)}, **{"node-name": "tmp"})  # fmt: skip
        ok(q, "blockdev-backup", device="disk0", target="tmp", sync="none",
           **{"job-id": "fleecing", "filter-node-name": "fl-cbw"})  # fmt: skip
        ok(q, "block-export-add", type="nbd", id="fl", **{"node-name": "tmp"})
        # Writes go through the filter, as the guest's do.
        ok(q, "block-export-add", type="nbd", id="src", writable=True, **{"node-name": "fl-cbw"})
        snap, src = nbd_uri(workdir, "tmp"), nbd_uri(workdir, "fl-cbw")
        reads = [f"read -P {p} {off} {length}" for p, off, length in FLEECE_PATTERNS]
        qemu_io(snap, *reads, read_only=True)
        qemu_io(src, *(f"write -P {p} {off} {length}" for p, off, length in FLEECE_OVERWRITES))
        qemu_io(src, *(f"write -z {off} {length}" for off, length in FLEECE_ZEROES))
        # The source changed; the fleecing image did not.
        qemu_io(snap, *reads, read_only=True)
        qemu_io(snap, "read -P 0 0x00f8000 32k", "read -P 0 0x2010000 32k", read_only=True)
        qemu_io(src, "read -P 0xab 0 64k", "read -P 0 0x3fe0000 64k")
        export_del(q, "fl")
        export_del(q, "src")
        ok(q, "block-job-cancel", device="fleecing")
        wait_event(q, "BLOCK_JOB_CANCELLED", device="fleecing")
        assert ok(q, "query-jobs") == []
        ok(q, "blockdev-del", **{"node-name": "tmp"})
        assert graph_shape(q) == shape
    finally:
        q.close()
    assert daemon.stop() == 0
    run("qemu-img", "check", temp)
    run("qemu-img", "check", base)
