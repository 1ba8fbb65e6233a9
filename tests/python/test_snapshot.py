"""External snapshots of a live disk, with the unmodified qemu.qmp client;
against qemu-storage-daemon too when BLKGRAPH_TEST_QSD=1.

- blockdev-snapshot as libvirt sends it: an overlay made with
  blockdev-create (backing file named in its header), added with
  `backing: null`, then put above the disk under the live vhost-user export
  while a client writes: the base image keeps exactly what it had at the
  snapshot, the client's later writes land in the overlay, and the overlay
  read through an NBD export is the guest's view;
- blockdev-snapshot-sync in a transaction with a bitmap: the overlay file is
  made by the daemon, with the disk as its backing file; as in QEMU, an
  overlay of a node named by node-name needs a snapshot-node-name;
- QEMU's refusals: an overlay in use, or with a backing file already, and
  an overlay name taken or invalid, which blkgraph refuses before it makes
  the file (QEMU overwrites the file, then refuses an invalid name).
"""

import json
import time

from test_jobs import SIZE, Writer, cmd, connect, make_image, nbd_args, nbd_uri, ok, run


def export_root(q) -> str:
    exports = ok(q, "query-block-exports")
    return next(e["node-name"] for e in exports if e["id"] == "vub0")


def test_blockdev_snapshot_under_writes(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    make_image(image)
    overlay = workdir / "overlay.qcow2"
    daemon = start_daemon(image, qmp=True, extra_args=nbd_args(workdir))
    q = connect(daemon)
    Writer(daemon.socket, 1).wait()
    ok(q, "blockdev-create", **{"job-id": "c0"}, options={
        "driver": "file", "filename": str(overlay), "size": 0})  # fmt: skip
    time.sleep(0.5)
    ok(q, "job-dismiss", id="c0")
    ok(q, "blockdev-add", driver="file", filename=str(overlay), **{"node-name": "ovl-file"})
    ok(q, "blockdev-create", **{"job-id": "c1"}, options={
        "driver": "qcow2", "file": "ovl-file", "size": SIZE,
        "backing-file": str(image), "backing-fmt": "raw"})  # fmt: skip
    time.sleep(0.5)
    ok(q, "job-dismiss", id="c1")
    ok(q, "blockdev-add", driver="qcow2", file="ovl-file", backing=None, **{"node-name": "ovl"})
    base = image.read_bytes()
    ok(q, "blockdev-snapshot", node="disk0", overlay="ovl")
    assert export_root(q) == "ovl"
    # Refused: the overlay is in use now, and has a backing file.
    r = cmd(q, "blockdev-snapshot", node="disk0", overlay="ovl")
    assert "error" in r, r
    Writer(daemon.socket, 2).wait()
    assert image.read_bytes() == base, "the base changed after the snapshot"
    ok(q, "block-export-add", type="nbd", id="n0", **{"node-name": "ovl"})
    view = workdir / "view.raw"
    run("nbdcopy", nbd_uri(workdir, "ovl"), view)
    q.close()
    daemon.stop()
    run("qemu-img", "check", overlay)
    flat = workdir / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", overlay, flat)
    assert flat.read_bytes() == view.read_bytes(), "the overlay is not the guest's view"
    assert view.read_bytes() != base, "the writes after the snapshot went nowhere"


def test_snapshot_sync_in_a_transaction(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    data = make_image(image)
    overlay = workdir / "sync.qcow2"
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    ok(q, "transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "since-snap"}},
        {"type": "blockdev-snapshot-sync", "data": {
            "node-name": "disk0", "snapshot-file": str(overlay),
            "snapshot-node-name": "snap0", "format": "qcow2"}},
    ])  # fmt: skip
    assert export_root(q) == "snap0"
    Writer(daemon.socket, 1).wait()
    q.close()
    daemon.stop()
    assert image.read_bytes() == data
    info = json.loads(run("qemu-img", "info", "--output=json", overlay).stdout)
    assert info["backing-filename"] == str(image)
    assert info["virtual-size"] == SIZE
    run("qemu-img", "check", overlay)


def test_snapshot_sync_needs_the_overlay_name(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    make_image(image)
    overlay = workdir / "unnamed.qcow2"
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    r = cmd(q, "blockdev-snapshot-sync", **{"node-name": "disk0", "snapshot-file": str(overlay)})
    assert r["error"]["desc"] == "New overlay node-name missing", r
    assert export_root(q) == "disk0"
    assert not overlay.exists()
    q.close()
    daemon.stop()


def test_snapshot_sync_refuses_a_name_before_making_the_file(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    make_image(image)
    overlay = workdir / "held.qcow2"
    overlay.write_bytes(b"what the file held")
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    args = {"node-name": "disk0", "snapshot-file": str(overlay)}
    r = cmd(q, "blockdev-snapshot-sync", **args, **{"snapshot-node-name": "disk0"})
    assert r["error"]["desc"] == "New overlay node-name already in use", r
    assert overlay.read_bytes() == b"what the file held"
    r = cmd(q, "blockdev-snapshot-sync", **args, **{"snapshot-node-name": "sn`p0"})
    assert r["error"]["desc"] == "Invalid node-name: 'sn`p0'", r
    if daemon_kind == "blkgraph":
        # QEMU makes the overlay file first, and then refuses the name:
        # the file it overwrote may have been another disk.
        assert overlay.read_bytes() == b"what the file held"
    assert export_root(q) == "disk0"
    q.close()
    daemon.stop()


def test_overlay_with_a_backing_file_is_refused(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    make_image(image)
    other = workdir / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", other, SIZE)
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    shape = ok(q, "query-named-block-nodes")
    ok(q, "blockdev-add", driver="qcow2", file={"driver": "file", "filename": str(other)},
       **{"node-name": "ovl", "read-only": True})  # fmt: skip
    r = cmd(q, "blockdev-snapshot", node="disk0", overlay="ovl")
    assert r["error"]["desc"] == "The overlay already has a backing image", r
    assert export_root(q) == "disk0"
    ok(q, "blockdev-del", **{"node-name": "ovl"})
    assert len(ok(q, "query-named-block-nodes")) == len(shape)
    q.close()
    daemon.stop()
