"""block_resize under a running guest.

The guest waits for its disk to change size; block_resize grows the raw
node (and its file) over QMP; the vhost-user-blk export sends the
config-change message and the guest must see the new capacity in
/sys/block/vda/size without a reboot, then write and read back the last
MiB of the grown disk.  A new NBD connection sees the new size too.
Resizing a node whose parent does not share the resize permission, or a
fixed-size raw window, is refused and changes nothing.
"""

import asyncio
import json
import subprocess

import pytest
from qemu.qmp import ExecuteError, QMPClient

from guest import Guest

SIZE = 64 << 20
NEW_SIZE = 96 << 20


async def qmp_session(path, commands):
    """Run (command, arguments) pairs; return each result or ExecuteError."""
    qmp = QMPClient("resize")
    await qmp.connect(str(path))
    out = []
    try:
        for cmd, args in commands:
            try:
                out.append(await qmp.execute(cmd, args))
            except ExecuteError as e:
                out.append(e)
    finally:
        await qmp.disconnect()
    return out


def test_block_resize_reaches_the_guest(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(image, qmp=True)
    guest = Guest(daemon.socket, workdir, "resize-wait", timeout=120).start()
    try:
        guest.wait_console("== resize-wait")
        # f0 is the raw node's file: blkgraph's raw does not let others
        # resize it (QEMU's does).
        refused, resized = asyncio.run(
            qmp_session(
                daemon.qmp,
                [
                    ("block_resize", {"node-name": "f0", "size": NEW_SIZE}),
                    ("block_resize", {"node-name": "disk0", "size": NEW_SIZE}),
                ],
            )
        )
        if daemon_kind == "blkgraph":
            assert isinstance(refused, ExecuteError), refused
        assert resized == {}, resized
        result = guest.wait()
    finally:
        guest.kill()
    job = result["resize-wait"]
    assert result.pairs("resize-wait") == {"before": SIZE // 512, "after": NEW_SIZE // 512}
    assert job.rc == 0, result.console[-3000:]
    assert image.stat().st_size == NEW_SIZE


def test_nbd_clients_see_the_new_size(daemon_kind, start_daemon, workdir):
    if daemon_kind == "qsd":
        # Seen with 10.0.2: the daemon exits on block_resize of a node that
        # a vhost-user-blk export without a frontend serves.
        pytest.skip("qemu-storage-daemon exits on this block_resize")
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(image, qmp=True)
    nbd = workdir / "nbd.sock"
    other = workdir / "other.raw"
    with open(other, "wb") as f:
        f.truncate(SIZE)
    file1 = {"driver": "file", "node-name": "f1", "filename": str(other)}
    fixed = {"driver": "raw", "node-name": "win0", "file": "f1", "size": 1 << 20}
    export = ("block-export-add", {"type": "nbd", "id": "n0", "node-name": "disk0"})
    resize = ("block_resize", {"node-name": "disk0", "size": NEW_SIZE})
    # blkgraph's exports let other parents resize their node, and the NBD
    # export gives new connections the new size; QEMU's NBD export forbids
    # resizing its node, so QSD gets the export after the resize.
    first, second = (export, resize) if daemon_kind == "blkgraph" else (resize, export)
    results = asyncio.run(
        qmp_session(
            daemon.qmp,
            [
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}),
                first,
                second,
                ("blockdev-add", file1),
                ("blockdev-add", fixed),
                ("block_resize", {"node-name": "win0", "size": 2 << 20}),
                ("block_resize", {"node-name": "disk0", "size": -1}),
            ],
        )
    )
    assert results[:5] == [{}, {}, {}, {}, {}], results
    assert all(isinstance(r, ExecuteError) for r in results[5:]), results
    size = subprocess.run(
        ["nbdinfo", "--size", f"nbd+unix:///disk0?socket={nbd}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert int(size) == NEW_SIZE
    if daemon_kind == "blkgraph":
        assert "Cannot resize fixed-size raw disks" in str(results[5])
    assert image.stat().st_size == NEW_SIZE
    assert other.stat().st_size == SIZE


def test_qcow2_grows_under_nbd_clients(daemon_kind, start_daemon, workdir):
    """block_resize on a qcow2 node: a larger L1 table, data written past the
    old end through NBD, and an image that qemu-img checks clean and reads
    back. Shrinking is refused; so is resizing a node with a dirty bitmap,
    whose bits could not cover the new end (blkgraph only: QEMU grows them)."""
    if daemon_kind == "qsd":
        pytest.skip("qemu-storage-daemon exits on this block_resize")
    image = workdir / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, str(SIZE)],
        check=True,
    )
    daemon = start_daemon(image, qmp=True, fmt="qcow2")
    nbd = workdir / "nbd.sock"
    bitmap = {"node": "disk0", "name": "b0"}
    results = asyncio.run(
        qmp_session(
            daemon.qmp,
            [
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}),
                ("block_resize", {"node-name": "disk0", "size": 4 << 30}),
                ("block_resize", {"node-name": "disk0", "size": SIZE}),
                ("block-dirty-bitmap-add", bitmap),
                ("block_resize", {"node-name": "disk0", "size": (4 << 30) + (1 << 20)}),
                ("block-dirty-bitmap-remove", bitmap),
                (
                    "block-export-add",
                    {"type": "nbd", "id": "n0", "node-name": "disk0", "writable": True},
                ),
            ],
        )
    )
    assert [results[i] for i in (0, 1, 3, 5, 6)] == [{}] * 5, results
    assert "doesn't support shrinking" in str(results[2]), results
    assert "dirty bitmaps cannot change size" in str(results[4]), results
    new_size = 4 << 30
    uri = f"nbd+unix:///disk0?socket={nbd}"
    size = subprocess.run(
        ["nbdinfo", "--size", uri], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert int(size) == new_size
    end = new_size - (1 << 20)
    io = ["qemu-io", "-f", "raw", uri, "-c"]
    subprocess.run(io + [f"write -P 0x5a {end} 1M"], check=True, capture_output=True)
    subprocess.run(io + [f"write -P 0x33 {SIZE - 4096} 8k"], check=True, capture_output=True)
    daemon.stop()
    subprocess.run(["qemu-img", "check", image], check=True, capture_output=True)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", image], check=True, capture_output=True
        ).stdout
    )
    assert info["virtual-size"] == new_size
    for check in [f"read -P 0x5a {end} 1M", f"read -P 0x33 {SIZE - 4096} 8k"]:
        out = subprocess.run(
            ["qemu-io", "-f", "qcow2", image, "-c", check],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "Pattern verification failed" not in out, out
