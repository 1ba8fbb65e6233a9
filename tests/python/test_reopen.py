"""blockdev-reopen (QEMU 6+), with the unmodified qemu.qmp client, qemu-io
over NBD and qemu-img; against qemu-storage-daemon too when
BLKGRAPH_TEST_QSD=1 (the same assertions hold for both).

- A read-only node becomes writable (its inline file follows), takes
  writes through an NBD export, and becomes read-only again: writes are
  refused, and a writer keeps it from becoming read-only meanwhile.
- A list is applied whole or not at all: an invalid second entry leaves
  the first one's node as it was.
- A qcow2 overlay's backing child switches to another node, and goes
  (`backing: null`); the overlay's content through NBD follows.
- A qcow2 image with a persistent bitmap: in use while writable, stored
  and no longer in use when read-only, what qemu-img sees after exit.
"""

import json
import subprocess

from test_jobs import cmd, connect, nbd_args, nbd_uri, ok, run, wait_event

MIB = 1 << 20
SIZE = 4 * MIB


def qemu_io(uri: str, *commands, read_only=False) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else []), uri]
    for c in commands:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True)


def nodes(q) -> dict:
    return {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}


def reopen(q, *entries) -> dict:
    return cmd(q, "blockdev-reopen", options=list(entries))


def export(q, node: str, writable: bool) -> None:
    ok(q, "block-export-add", type="nbd", id="n0", writable=writable, **{"node-name": node})


def unexport(q) -> None:
    ok(q, "block-export-del", id="n0")
    wait_event(q, "BLOCK_EXPORT_DELETED", id="n0")


def raw_node(workdir, name: str, data: bytes, read_only: bool) -> str:
    path = workdir / f"{name}.raw"
    path.write_bytes(data)
    ro = "on" if read_only else "off"
    return (
        f"driver=raw,node-name={name},read-only={ro},"
        f"file.driver=file,file.node-name={name}-file,file.filename={path}"
    )


def start(start_daemon, workdir, *blockdevs):
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    blockdevs = [f"driver=raw,node-name=disk0,file.driver=file,file.filename={disk}", *blockdevs]
    daemon = start_daemon(None, qmp=True, blockdevs=blockdevs, extra_args=nbd_args(workdir))
    return daemon, connect(daemon)


def test_read_only_to_read_write_and_back(daemon_kind, start_daemon, workdir):
    daemon, q = start(start_daemon, workdir, raw_node(workdir, "data", bytes(SIZE), True))
    uri = nbd_uri(workdir, "data")
    assert nodes(q)["data"]["ro"] and nodes(q)["data-file"]["ro"]
    assert "error" in cmd(
        q, "block-export-add", type="nbd", id="n0", writable=True, **{"node-name": "data"}
    )
    # Omitted, read-only goes back to its default (off), but the inline
    # file keeps its own: it follows only an explicit read-only.
    ok(q, "blockdev-reopen", options=[{"driver": "raw", "node-name": "data", "file": "data-file"}])
    assert not nodes(q)["data"]["ro"] and nodes(q)["data-file"]["ro"]
    writable = {"driver": "raw", "node-name": "data", "file": "data-file", "read-only": False}
    ok(q, "blockdev-reopen", options=[writable])
    assert not nodes(q)["data"]["ro"] and not nodes(q)["data-file"]["ro"]
    export(q, "data", writable=True)
    r = qemu_io(uri, "write -P 0x5a 64k 64k")
    assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
    # A writer holds the node: it cannot become read-only.
    r = reopen(q, {"driver": "raw", "node-name": "data", "file": "data-file", "read-only": True})
    assert r["error"]["desc"] == "Read-only block node 'data' cannot support read-write users", r
    assert not nodes(q)["data"]["ro"]
    unexport(q)
    ok(
        q,
        "blockdev-reopen",
        options=[{"driver": "raw", "node-name": "data", "file": "data-file", "read-only": True}],
    )
    assert nodes(q)["data"]["ro"] and nodes(q)["data-file"]["ro"]
    assert "error" in cmd(
        q, "block-export-add", type="nbd", id="n0", writable=True, **{"node-name": "data"}
    )
    export(q, "data", writable=False)
    r = qemu_io(uri, "write -P 0x66 0 64k")
    assert r.returncode != 0 and "wrote" not in r.stdout, r.stdout
    r = qemu_io(uri, "read -P 0x5a 64k 64k", "read -P 0 0 64k", read_only=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    q.close()
    assert daemon.stop() == 0
    data = (workdir / "data.raw").read_bytes()
    assert data[64 << 10 : 128 << 10] == b"\x5a" * (64 << 10)
    assert data[: 64 << 10] == bytes(64 << 10)


def test_a_list_is_applied_whole_or_not_at_all(daemon_kind, start_daemon, workdir):
    daemon, q = start(
        start_daemon,
        workdir,
        raw_node(workdir, "a", bytes(SIZE), True),
        raw_node(workdir, "b", bytes(SIZE), False),
    )
    before = nodes(q)
    r = reopen(
        q,
        {"driver": "raw", "node-name": "a", "file": "a-file", "read-only": False},
        {"driver": "file", "node-name": "b-file", "filename": str(workdir / "other.raw")},
    )
    assert r["error"]["desc"] == "Cannot change the option 'filename'", r
    r = reopen(
        q,
        {"driver": "raw", "node-name": "a", "file": "a-file", "discard": "unmap"},
        {"driver": "raw", "node-name": "nope", "file": "b-file"},
    )
    assert r["error"]["desc"] == "Failed to find node with node-name='nope'", r
    after = nodes(q)
    for name in ("a", "a-file", "b", "b-file"):
        assert after[name]["ro"] == before[name]["ro"], name
    # Both at once.
    ok(
        q,
        "blockdev-reopen",
        options=[
            {"driver": "raw", "node-name": "a", "file": "a-file", "read-only": False},
            {"driver": "raw", "node-name": "b", "file": "b-file", "read-only": True},
        ],
    )
    after = nodes(q)
    assert not after["a"]["ro"] and not after["a-file"]["ro"]
    assert after["b"]["ro"] and after["b-file"]["ro"]
    q.close()
    assert daemon.stop() == 0


def qcow2(workdir, name: str, pattern: int | None, *create) -> str:
    path = workdir / f"{name}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", *create, path, SIZE)
    if pattern is not None:
        run("qemu-io", "-f", "qcow2", path, "-c", f"write -P {pattern} 0 64k")
    return str(path)


def test_backing_switch_and_null(daemon_kind, start_daemon, workdir):
    base1 = qcow2(workdir, "base1", 0x11)
    base2 = qcow2(workdir, "base2", 0x22)
    top = qcow2(workdir, "top", None, "-b", base1, "-F", "qcow2")
    daemon, q = start(
        start_daemon,
        workdir,
        f"driver=qcow2,node-name=base1,read-only=on,file.driver=file,file.filename={base1}",
        f"driver=qcow2,node-name=base2,read-only=on,file.driver=file,file.filename={base2}",
        f"driver=qcow2,node-name=top,backing=base1,"
        f"file.driver=file,file.node-name=top-file,file.filename={top}",
    )
    export(q, "top", writable=False)
    uri = nbd_uri(workdir, "top")

    def content(pattern: int) -> None:
        r = qemu_io(uri, f"read -P {pattern} 0 64k", read_only=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout

    def top_options(**more) -> dict:
        return {"driver": "qcow2", "node-name": "top", "file": "top-file", **more}

    content(0x11)
    r = reopen(q, top_options())
    assert r["error"]["desc"] == "backing is missing for 'top'", r
    r = reopen(q, top_options(backing="top"))
    assert r["error"]["desc"] == "Making 'top' a backing child of 'top' would create a cycle", r
    ok(q, "blockdev-reopen", options=[top_options(backing="base2")])
    assert nodes(q)["top"]["image"]["backing-image"]["filename"] == base2
    content(0x22)
    ok(q, "blockdev-reopen", options=[top_options(backing=None)])
    assert "backing-image" not in nodes(q)["top"]["image"]
    content(0)
    # base1 lost its only parent, but was added on its own: it stays.
    assert "base1" in nodes(q)
    unexport(q)
    q.close()
    assert daemon.stop() == 0
    # The header keeps its backing file name: reopen changes the graph only.
    info = json.loads(run("qemu-img", "info", "--output=json", top).stdout)
    assert info["backing-filename"] == base1


def image_bitmaps(q, node: str) -> list:
    return nodes(q)[node]["image"]["format-specific"]["data"].get("bitmaps", [])


def bitmap_count(q, node: str, name: str) -> int:
    return next(b["count"] for b in nodes(q)[node]["dirty-bitmaps"] if b["name"] == name)


def test_qcow2_persistent_bitmap_across_reopens(daemon_kind, start_daemon, workdir):
    image = qcow2(workdir, "img", None)
    run("qemu-img", "bitmap", "--add", image, "bm0")
    blockdev = (
        f"driver=qcow2,node-name=img,read-only=on,"
        f"file.driver=file,file.node-name=img-file,file.filename={image}"
    )
    daemon, q = start(start_daemon, workdir, blockdev)
    writable = {"driver": "qcow2", "node-name": "img", "file": "img-file", "read-only": False}
    assert [b["flags"] for b in image_bitmaps(q, "img")] == [["auto"]]
    ok(q, "blockdev-reopen", options=[writable])
    assert [b["flags"] for b in image_bitmaps(q, "img")] == [["in-use", "auto"]]
    export(q, "img", writable=True)
    r = qemu_io(nbd_uri(workdir, "img"), "write -P 0x77 1M 64k")
    assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
    unexport(q)
    assert bitmap_count(q, "img", "bm0") == 64 << 10
    ok(q, "blockdev-reopen", options=[{**writable, "read-only": True}])
    assert [b["flags"] for b in image_bitmaps(q, "img")] == [["auto"]]
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", image).stdout)
    assert [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]] == [["auto"]]
    assert not info.get("dirty-flag", False)
    ok(q, "blockdev-reopen", options=[writable])
    assert [b["flags"] for b in image_bitmaps(q, "img")] == [["in-use", "auto"]]
    assert bitmap_count(q, "img", "bm0") == 64 << 10
    q.close()
    assert daemon.stop() == 0
    run("qemu-img", "check", image)
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]] == [["auto"]]
    # The bitmap's bits were stored: the next daemon reads them back.
    daemon, q = start(start_daemon, workdir, blockdev)
    assert bitmap_count(q, "img", "bm0") == 64 << 10
    q.close()
    assert daemon.stop() == 0
