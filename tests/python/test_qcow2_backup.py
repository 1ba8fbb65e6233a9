"""Backups with qcow2 images: image fleecing into a qcow2 temp image, after
QEMU's image-fleecing test (tests/qemu-iotests/tests/image-fleecing, its
copy-before-write + snapshot-access variant), and an incremental backup
chain whose persistent bitmap survives a daemon restart (docs/fleecing.md).

blkgraph only: qemu-storage-daemon cannot insert a filter under a running
export (no x-blockdev-replace, no graph actions in transactions).
"""

import json
import shutil
from pathlib import Path

import pytest
from test_qcow2_qmp import MIB, Qcow2Daemon, dirty_ranges, qemu_img, qmp_cmd, run

SIZE = 64 * MIB

# (pattern, offset, length) as in QEMU's image-fleecing test.
PATTERNS = [("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
            ("0xcd", "0x3ff0000", "64k")]  # fmt: skip
OVERWRITES = [("0xab", "0", "64k"), ("0xad", "0x00f8000", "64k"), ("0x1d", "0x2008000", "64k"),
              ("0xea", "0x3fe0000", "64k")]  # fmt: skip
ZEROES = [("0", "0x00f8000", "32k"), ("0", "0x201f000", "32k"), ("0", "0x3fe0000", "64k")]


@pytest.fixture(autouse=True)
def blkgraph_only(daemon_kind):
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon cannot insert a filter under a running export")


def fleece(q, temp: Path, bitmap=None) -> None:
    """Inserts copy-before-write above `img` (under export `rw`) into a
    qcow2 temp image, and exports the snapshot as `snap`."""
    cbw = {"driver": "copy-before-write", "node-name": "fl-cbw", "file": "img", "target": "fl-tmp"}
    if bitmap:
        cbw["bitmap"] = {"node": "img", "name": bitmap}
    actions = [
        {"type": "blockdev-add", "data": {
            "driver": "qcow2", "node-name": "fl-tmp", "discard": "unmap",
            "file": {"driver": "file", "node-name": "fl-tmp-file", "filename": str(temp),
                     "discard": "unmap"}}},
        {"type": "blockdev-add", "data": cbw},
        {"type": "x-blockdev-replace", "data": {
            "parent-type": "export", "export-id": "rw", "new-child": "fl-cbw"}},
        {"type": "blockdev-add", "data": {
            "driver": "snapshot-access", "node-name": "fl-access", "discard": "unmap",
            "file": "fl-cbw"}},
    ]  # fmt: skip
    r = qmp_cmd(q, "transaction", actions=actions)
    assert r == {"return": {}}, r
    export = {"type": "nbd", "id": "snap", "name": "snap", "node-name": "fl-access",
              "writable": True}  # fmt: skip
    if bitmap:
        export["bitmaps"] = [{"node": "img", "name": bitmap}]
    r = qmp_cmd(q, "block-export-add", **export)
    assert r == {"return": {}}, r


def unfleece(q) -> None:
    assert qmp_cmd(q, "block-export-del", id="snap", mode="hard") == {"return": {}}
    actions = [
        {"type": "blockdev-del", "data": {"node-name": "fl-access"}},
        {"type": "x-blockdev-replace", "data": {
            "parent-type": "export", "export-id": "rw", "new-child": "img"}},
        {"type": "blockdev-del", "data": {"node-name": "fl-cbw"}},
        {"type": "blockdev-del", "data": {"node-name": "fl-tmp"}},
    ]  # fmt: skip
    r = qmp_cmd(q, "transaction", actions=actions)
    assert r == {"return": {}}, r


def allocated(image: Path) -> int:
    """Bytes the host file system allocated for an image."""
    return image.stat().st_blocks * 512


def qemu_io(uri: str, *commands: str) -> str:
    args = [a for c in commands for a in ("-c", c)]
    out = run("qemu-io", "-f", "raw", *args, uri).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    return out


def events_within(q, seconds: float) -> list:
    """The events that arrive within `seconds` (at least one, or none)."""
    try:
        return q.get_events(wait=seconds)
    except TimeoutError:
        return []


def test_write_threshold_watches_the_temp_image_grow(start_daemon, workdir):
    """block-set-write-threshold on the temp image's file node: nothing
    while the guest writes what was copied already, then one
    BLOCK_WRITE_THRESHOLD when copying a new cluster makes the file grow
    past the threshold, which then reads 0, as in QEMU."""
    base = workdir / "base.qcow2"
    temp = workdir / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_img("create", "-q", "-f", "qcow2", temp, SIZE)
    d = Qcow2Daemon(start_daemon, workdir, base).start()
    q = d.qmp()
    try:
        fleece(q, temp)
        d.write("write -P 0x11 0 64k")
        size = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}["fl-tmp-file"]
        end = size["image"]["virtual-size"]
        threshold = end + 4096
        r = qmp_cmd(q, "block-set-write-threshold", **{"node-name": "fl-tmp-file",
                                                       "write-threshold": threshold})
        assert r == {"return": {}}, r
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["fl-tmp-file"]["write_threshold"] == threshold
        q.clear_events()
        # Copied before: no new cluster, no event.
        d.write("write -P 0x22 0 64k")
        assert events_within(q, 0.5) == []
        # A new cluster: the file grows past the threshold.
        d.write("write -P 0x33 32M 64k")
        events = events_within(q, 5.0)
        assert [e["event"] for e in events] == ["BLOCK_WRITE_THRESHOLD"], events
        data = events[0]["data"]
        assert data["node-name"] == "fl-tmp-file"
        assert data["write-threshold"] == threshold
        assert 0 < data["amount-exceeded"] <= 2 * MIB, data
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["fl-tmp-file"]["write_threshold"] == 0
        assert nodes["fl-tmp-file"]["image"]["actual-size"] >= threshold
        # It fired once: further growth sends nothing.
        d.write("write -P 0x44 48M 64k")
        assert events_within(q, 0.5) == []
        unfleece(q)
    finally:
        q.close()


def test_image_fleecing_into_qcow2(start_daemon, workdir):
    """The snapshot reads the patterns as they were while the source is
    overwritten and zeroed; the qcow2 temp image holds only the copied
    clusters, and discarding the snapshot frees them."""
    base = workdir / "base.qcow2"
    temp = workdir / "fleece.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_img("create", "-q", "-f", "qcow2", temp, SIZE)
    for p, off, length in PATTERNS:
        run("qemu-io", "-c", f"write -P {p} {off} {length}", base)
    d = Qcow2Daemon(start_daemon, workdir, base).start()
    empty = allocated(temp)
    q = d.qmp()
    try:
        fleece(q, temp)
        snap = d.uri("snap")
        for p, off, length in PATTERNS:
            qemu_io(snap, f"read -P {p} {off} {length}")
        d.write(*(f"write -P {p} {off} {length}" for p, off, length in OVERWRITES))
        d.write(*(f"write -z {off} {length}" for _, off, length in ZEROES))
        # The source changed; the snapshot did not.
        for p, off, length in PATTERNS:
            qemu_io(snap, f"read -P {p} {off} {length}")
        qemu_io(snap, "read -P 0 0x00f8000 32k", "read -P 0 0x2010000 64k")
        qemu_io(d.uri(), "read -P 0xab 0 64k", "read -P 0 0x3fe0000 64k")
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        copied = nodes["fl-cbw"]["__org.blkgraph_snapshot"]["clusters-copied"]
        assert copied > 0
        # The temp image grew by the copied clusters only.
        used = allocated(temp) - empty
        assert copied * 65536 <= used <= (copied + 4) * 65536, (used, copied)
        # The backup client gives the snapshot back: the clusters go.
        qemu_io(snap, f"discard 0 {SIZE}")
        unfleece(q)
    finally:
        q.close()
    assert allocated(temp) - empty < used, "discarded snapshot clusters are freed in the temp image"
    assert run("qemu-img", "check", temp).returncode == 0
    assert d.daemon.stop() == 0
    assert run("qemu-img", "check", base).returncode == 0
    for p, off, length in OVERWRITES[:1]:
        run("qemu-io", "-r", "-c", f"read -P {p} {off} {length}", base)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """Bytes of an NBD export, through qemu-io's hex dump."""
    out = run("qemu-io", "-f", "raw", "-c", f"read -v {offset} {length}", uri).stdout
    data = bytearray()
    for line in out.splitlines():
        addr, sep, rest = line.partition(":  ")
        if sep and len(addr) == 8:
            data += bytes.fromhex(rest[: 16 * 3])
    assert len(data) == length, (offset, length, len(data))
    return bytes(data)


def apply_dirty(backup: Path, uri: str, bitmap: str) -> None:
    """Copies the extents dirty in `bitmap` from the snapshot at `uri` into
    the raw `backup` (an incremental backup applied to the full one)."""
    with open(backup, "r+b") as f:
        for off, length in dirty_ranges(uri, bitmap):
            f.seek(off)
            f.write(read_range(uri, off, length))


def test_incremental_backup_survives_a_restart(start_daemon, workdir):
    """Full backup with a persistent bitmap added in the same transaction,
    writes, a daemon restart, more writes, then an incremental backup of
    exactly the dirty extents: applied to the full backup it gives the
    image as it was at the second snapshot."""
    image = workdir / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    run("qemu-io", "-c", "write -P 0x01 0 8M", "-c", "write -P 0x02 40M 1M", image)
    d = Qcow2Daemon(start_daemon, workdir, image).start()
    q = d.qmp()
    try:
        r = qmp_cmd(q, "block-dirty-bitmap-add", node="img", name="since-last", persistent=True)
        assert r == {"return": {}}, r
        qemu_img("create", "-q", "-f", "qcow2", workdir / "t1.qcow2", SIZE)
        fleece(q, workdir / "t1.qcow2")
        d.write("write -P 0x03 4M 64k")  # after the snapshot: not in the full backup
        full = workdir / "full.raw"
        run("nbdcopy", d.uri("snap"), full)
        unfleece(q)
    finally:
        q.close()
    expected_full = bytearray(SIZE)
    expected_full[0 : 8 * MIB] = b"\x01" * (8 * MIB)
    expected_full[40 * MIB : 41 * MIB] = b"\x02" * MIB
    assert full.read_bytes() == bytes(expected_full)

    d.write("write -P 0x04 20M 128k")
    assert d.daemon.stop() == 0
    d.start()
    d.write("write -P 0x05 50M 4k", "write -z 40M 64k")
    q = d.qmp()
    try:
        state = workdir / "state.raw"
        run("nbdcopy", d.uri(), state)  # the image at the coming snapshot
        qemu_img("create", "-q", "-f", "qcow2", workdir / "t2.qcow2", SIZE)
        r = qmp_cmd(q, "transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {
                "node": "img", "name": "next", "persistent": True}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "img", "name": "since-last"}},
        ])  # fmt: skip
        assert r == {"return": {}}, r
        fleece(q, workdir / "t2.qcow2", bitmap="since-last")
        d.write("write -P 0x06 20M 4k")  # after the snapshot
        dirty = dirty_ranges(d.uri("snap"), "since-last")
        assert dirty == [(4 * MIB, 65536), (20 * MIB, 131072), (40 * MIB, 65536),
                         (50 * MIB, 65536)], dirty  # fmt: skip
        incremental = workdir / "incremental.raw"
        shutil.copy(full, incremental)
        apply_dirty(incremental, d.uri("snap"), "since-last")
        unfleece(q)
        assert qmp_cmd(q, "block-dirty-bitmap-remove", node="img", name="since-last") == {
            "return": {}
        }
    finally:
        q.close()
    assert incremental.read_bytes() == state.read_bytes()
    assert d.daemon.stop() == 0
    info = json.loads(qemu_img("info", "--output=json", image))
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["next"]
    assert run("qemu-img", "check", image).returncode == 0
