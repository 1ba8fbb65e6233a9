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
- A read-only base (from an image's header, as libvirt opens chains, or
  added read-only) is reopened read-write for the job and read-only again
  after it, unless an active commit completed (the base is then the
  active layer).
"""

import json
import subprocess

import pytest

from guest import Guest, file_md5, fio_errors
from test_jobs import cmd, connect, ok, wait_event
from test_stream import check_top_over

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


def commit_intermediate(q, job_id: str, top_node: str, base_node: str, by_file=False) -> dict:
    """Commits disk0's chain from `top_node` into `base_node` (or the files
    they are named by) and waits for the job; returns the nodes after it,
    by name."""
    if by_file:
        nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
        layers = {"top": nodes[top_node]["file"], "base": nodes[base_node]["file"]}
    else:
        layers = {"top-node": top_node, "base-node": base_node}
    ok(q, "block-commit", device="disk0", **{"job-id": job_id}, **layers)
    done = wait_event(q, "BLOCK_JOB_COMPLETED", device=job_id)
    assert "error" not in done["data"], done
    return {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}


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
    if naming == "file":
        r = cmd(q, "block-commit", device="disk0", top=str(workdir / "nothere.qcow2"))
        assert r["error"]["desc"] == f"Top image file {workdir / 'nothere.qcow2'} not found", r
    nodes = commit_intermediate(q, "c1", "mid", "base", by_file=naming == "file")
    assert nodes["disk0"]["backing_file"] == str(base), nodes["disk0"]
    ok(q, "blockdev-del", **{"node-name": "mid"})
    q.close()
    assert daemon.stop() == 0
    check_top_over(top, base, before, workdir)
    # The middle layer's data is in the base now.
    with open(base, "rb") as f:
        f.seek(4 * MIB)
        assert f.read(8 * MIB) == bytes([0x41]) * (8 * MIB)


def node_named(q, path) -> str:
    """The node-name of the format node of image `path`."""
    return next(
        n["node-name"]
        for n in ok(q, "query-named-block-nodes")
        if n["file"] == str(path) and n["drv"] == "qcow2"
    )


def chain(workdir) -> tuple:
    """base <- mid <- top, with data in each layer; the top's content."""
    base, mid, top = (workdir / f"{n}.qcow2" for n in ("base", "mid", "top"))
    run("qemu-img", "create", "-q", "-f", "qcow2", base, SIZE)
    run("qemu-io", "-f", "qcow2", base, "-c", "write -P 0x31 0 16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    run("qemu-io", "-f", "qcow2", mid, "-c", "write -P 0x41 4M 8M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", top, "-c", "write -P 0x51 6M 1M")
    before = workdir / "before.raw"
    run("qemu-img", "convert", "-O", "raw", top, before)
    return base, mid, top, before.read_bytes()


def flat(workdir, image) -> bytes:
    out = workdir / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", image, out)
    return out.read_bytes()


def test_commit_into_a_backing_file_from_the_header(daemon_kind, start_daemon, workdir):
    """libvirt's flow: the chain is opened from the images' headers, so
    the base is read-only; it is reopened read-write for the commit and is
    read-only again after it."""
    base, mid, top, before = chain(workdir)
    blockdevs = [f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={top}"]
    daemon = start_daemon(None, qmp=True, blockdevs=blockdevs)
    q = connect(daemon)
    base_node, mid_node = node_named(q, base), node_named(q, mid)
    nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
    assert nodes[base_node]["ro"] and nodes[mid_node]["ro"]
    nodes = commit_intermediate(q, "c2", mid_node, base_node)
    assert nodes[base_node]["ro"], "the base is read-only again"
    assert nodes["disk0"]["backing_file"] == str(base)
    q.close()
    assert daemon.stop() == 0
    run("qemu-img", "check", top)
    run("qemu-img", "check", base)
    assert flat(workdir, top) == before
    assert flat(workdir, base)[4 * MIB : 12 * MIB] == bytes([0x41]) * (8 * MIB)


def test_commit_into_an_explicit_read_only_base(daemon_kind, start_daemon, workdir):
    """The base added as a read-only node: an intermediate commit and an
    aborted active commit (a forced cancel) leave it read-only; an active
    commit that completes leaves it writable (QEMU's mirror: a plain cancel
    once ready completes too)."""
    base, mid, top, before = chain(workdir)
    blockdevs = [
        f"driver=qcow2,node-name=base,read-only=on,file.driver=file,file.filename={base}",
        f"driver=qcow2,node-name=mid,read-only=on,backing=base,"
        f"file.driver=file,file.filename={mid}",
        f"driver=qcow2,node-name=disk0,backing=mid,file.driver=file,file.filename={top}",
    ]
    daemon = start_daemon(None, qmp=True, blockdevs=blockdevs)
    q = connect(daemon)

    def read_only(name) -> bool:
        return next(n["ro"] for n in ok(q, "query-named-block-nodes") if n["node-name"] == name)

    assert commit_intermediate(q, "c3", "mid", "base")["base"]["ro"]
    ok(q, "blockdev-del", **{"node-name": "mid"})

    def active_commit(job_id: str, command: str, event: str, **args) -> None:
        """An active commit into the base, ended once ready by `command`."""
        ok(q, "block-commit", device="disk0", **{"job-id": job_id, "base-node": "base"})
        wait_event(q, "BLOCK_JOB_READY", device=job_id)
        assert not read_only("base"), "writable for the job"
        ok(q, command, **args)
        done = wait_event(q, event, device=job_id)
        assert "error" not in done["data"], done

    active_commit("c4", "block-job-cancel", "BLOCK_JOB_CANCELLED", device="c4", force=True)
    assert read_only("base"), "read-only again after an aborted commit"
    assert export_root(q) == "disk0"
    active_commit("c5", "block-job-cancel", "BLOCK_JOB_COMPLETED", device="c5")
    assert not read_only("base"), "a plain cancel once ready completes the job"
    assert export_root(q) == "disk0"
    active_commit("c6", "job-complete", "BLOCK_JOB_COMPLETED", id="c6")
    assert export_root(q) == "base"
    assert not read_only("base"), "the base took the active layer's place"
    q.close()
    assert daemon.stop() == 0
    run("qemu-img", "check", base)
    assert flat(workdir, base) == before
