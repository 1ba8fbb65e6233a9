"""block-commit on qcow2 backing chains (live merge of external snapshots),
with the unmodified qemu.qmp client; against qemu-storage-daemon too when
BLKGRAPH_TEST_QSD=1.

- Active commit under a guest: the guest runs fio randwrite with crc32c
  verify on the overlay of a snapshot; block-commit merges the overlay into
  its base, BLOCK_JOB_READY comes, job-complete moves the vhost-user export
  to the base while fio goes on; fio verifies, and the base image alone is
  what the guest saw.
- Intermediate commit: the middle layer of a three-layer chain goes into the
  base; the top's backing file (graph and header) becomes the base and the
  content is unchanged. Layers named by node-name, or by file name
  (`top`, `base`) as QEMU allows.
- A read-only base is refused with a clear error.
"""

import json
import subprocess

import pytest

from guest import Guest, file_md5, fio_errors
from test_jobs import cmd, connect, ok, wait_event

MIB = 1 << 20
SIZE = 96 * MIB


def run(*c) -> str:
    r = subprocess.run([str(x) for x in c], capture_output=True, text=True)
    assert r.returncode == 0, f"{c}: {r.stdout}{r.stderr}"
    return r.stdout


def info(path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", path))


def export_root(q) -> str:
    exports = ok(q, "query-block-exports")
    return next(e["node-name"] for e in exports if e["id"] == "vub0")


def test_active_commit_under_a_guest(daemon_kind, start_daemon, workdir):
    base = workdir / "base.qcow2"
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, SIZE)
    run("qemu-io", "-f", "qcow2", base, "-c", "write -P 0x21 0 96M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    blockdevs = [
        f"driver=qcow2,node-name=base,read-only=off,file.driver=file,file.filename={base}",
        f"driver=qcow2,node-name=disk0,backing=base,file.driver=file,file.filename={top}",
    ]
    daemon = start_daemon(None, qmp=True, blockdevs=blockdevs)
    q = connect(daemon)
    guest = Guest(daemon.socket, workdir, "fio-verify", params={"size": "48M"}, timeout=300)
    with guest:
        guest.start()
        guest.wait_console("== fio-verify", timeout=120)
        ok(q, "block-commit", device="disk0", **{"job-id": "c0", "base-node": "base"})
        wait_event(q, "BLOCK_JOB_READY", timeout=240, device="c0")
        jobs = ok(q, "query-jobs")
        assert [(j["id"], j["type"]) for j in jobs] == [("c0", "commit")], jobs
        ok(q, "job-complete", id="c0")
        done = wait_event(q, "BLOCK_JOB_COMPLETED", device="c0")
        assert "error" not in done["data"], done
        assert export_root(q) == "base"
        result = guest.wait()
    q.close()
    fio = result["fio-verify"]
    assert fio.rc == 0, result.console[-4000:]
    assert fio_errors(fio.json()) == 0
    assert "verify: bad" not in result.console
    assert daemon.stop() == 0
    run("qemu-img", "check", base)
    flat = workdir / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", base, flat)
    assert file_md5(flat, 48 * MIB) == result.md5


@pytest.mark.parametrize("naming", ["node", "file"])
def test_intermediate_commit(daemon_kind, start_daemon, workdir, naming):
    base = workdir / "base.raw"
    base.write_bytes(bytes([0x31]) * SIZE)
    mid = workdir / "mid.qcow2"
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid)
    run("qemu-io", "-f", "qcow2", mid, "-c", "write -P 0x41 4M 8M", "-c", "write -P 0x42 90M 1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", top, "-c", "write -P 0x51 6M 1M")
    before = workdir / "before.raw"
    run("qemu-img", "convert", "-O", "raw", top, before)
    blockdevs = [
        f"driver=raw,node-name=base,read-only=off,file.driver=file,file.filename={base}",
        f"driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename={mid}",
        f"driver=qcow2,node-name=disk0,backing=mid,file.driver=file,file.filename={top}",
    ]
    daemon = start_daemon(None, qmp=True, blockdevs=blockdevs)
    q = connect(daemon)
    if naming == "node":
        layers = {"top-node": "mid", "base-node": "base"}
    else:
        r = cmd(q, "block-commit", device="disk0", top=str(workdir / "nothere.qcow2"))
        assert r["error"]["desc"] == f"Top image file {workdir / 'nothere.qcow2'} not found", r
        layers = {"top": str(mid), "base": str(base)}
    ok(q, "block-commit", device="disk0", **{"job-id": "c1"}, **layers)
    done = wait_event(q, "BLOCK_JOB_COMPLETED", device="c1")
    assert "error" not in done["data"], done
    nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
    assert nodes["disk0"]["backing_file"] == str(base), nodes["disk0"]
    ok(q, "blockdev-del", **{"node-name": "mid"})
    q.close()
    assert daemon.stop() == 0
    run("qemu-img", "check", top)
    assert info(top)["backing-filename"] == str(base)
    after = workdir / "after.raw"
    run("qemu-img", "convert", "-O", "raw", top, after)
    assert after.read_bytes() == before.read_bytes()
    # The middle layer's data is in the base now.
    with open(base, "rb") as f:
        f.seek(4 * MIB)
        assert f.read(8 * MIB) == bytes([0x41]) * (8 * MIB)


def test_read_only_base_is_refused(daemon_kind, start_daemon, workdir):
    if daemon_kind == "qsd":
        # QEMU reopens the base read-write for the job.
        return
    base = workdir / "base.raw"
    base.write_bytes(bytes(SIZE))
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    daemon = start_daemon(top, qmp=True, fmt="qcow2")
    q = connect(daemon)
    r = cmd(q, "block-commit", device="disk0", **{"job-id": "c2"})
    assert "is read-only: open it with read-only=off" in r["error"]["desc"], r
    assert ok(q, "query-jobs") == []
    q.close()
    daemon.stop()
