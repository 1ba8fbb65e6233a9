"""blockdev-mirror over QMP with the unmodified qemu.qmp client; against
qemu-storage-daemon too when BLKGRAPH_TEST_QSD=1.

- Live storage migration: a guest runs fio randwrite with crc32c verify on
  the vhost-user export of a raw disk; blockdev-mirror copies the disk to a
  new image, BLOCK_JOB_READY comes, job-complete switches the export to the
  target in one drained step while fio goes on; fio verifies everything it
  wrote (before the switch, from the mirrored copy), and the md5 the guest
  computes at the end is the target image's. In both copy modes.
- A plain cancel of a ready mirror completes it without the switch: the
  export stays on the source and the target is a copy of it; a forced cancel
  (job-cancel) before ready ends the job as cancelled. Both leave the graph
  as it was.
"""

import time

import pytest

from guest import Guest, file_md5, fio_errors
from test_jobs import connect, graph_shape, ok, wait_event

MIB = 1 << 20
SIZE = 64 * MIB
VERIFY_FAILURES = ("verify: bad", "bad magic header", "crc32c: verify failed")


def make_image(path, size=SIZE) -> bytes:
    data = bytes((i * 13 + (i >> 12)) & 0xFF for i in range(4096)) * (size // 4096)
    path.write_bytes(data)
    return data


def add_raw(q, name, path):
    ok(
        q,
        "blockdev-add",
        **{"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}},
    )


def export_root(q) -> str:
    exports = ok(q, "query-block-exports")
    return next(e["node-name"] for e in exports if e["id"] == "vub0")


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_live_storage_migration_under_fio_verify(daemon_kind, start_daemon, workdir, copy_mode):
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    target = workdir / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    add_raw(q, "tgt", target)
    guest = Guest(daemon.socket, workdir, "fio-verify", params={"bs": "4k"}, timeout=300)
    with guest:
        guest.start()
        guest.wait_console("== fio-verify", timeout=120)
        # fio has opened the disk and writes.
        time.sleep(2)
        ok(
            q,
            "blockdev-mirror",
            **{"job-id": "m0", "device": "disk0", "target": "tgt", "sync": "full"},
            **{"copy-mode": copy_mode, "filter-node-name": "mirror-top"},
        )
        wait_event(q, "BLOCK_JOB_READY", device="m0")
        assert guest.running(), "fio ended before the switch"
        ok(q, "job-complete", id="m0")
        done = wait_event(q, "BLOCK_JOB_COMPLETED", device="m0")
        assert "error" not in done["data"], done
        assert export_root(q) == "tgt"
        names = {n["node-name"] for n in ok(q, "query-named-block-nodes")}
        assert "mirror-top" not in names
        assert ok(q, "query-jobs") == []
        result = guest.wait()
    q.close()
    fio = result["fio-verify"]
    assert fio.rc == 0, result.console[-4000:]
    assert fio_errors(fio.json()) == 0
    for needle in VERIFY_FAILURES:
        assert needle not in result.console, result.console[-4000:]
    # What the guest sees at the end is the target.
    assert file_md5(target, SIZE) == result.md5
    assert daemon.stop() == 0


def test_cancels_leave_the_graph_as_it_was(daemon_kind, start_daemon, workdir):
    image = workdir / "disk.raw"
    data = make_image(image)
    target = workdir / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(image, qmp=True)
    q = connect(daemon)
    add_raw(q, "tgt", target)
    before = graph_shape(q)

    # A forced cancel while the job copies (a speed limit keeps it busy).
    ok(
        q,
        "blockdev-mirror",
        **{"job-id": "m0", "device": "disk0", "target": "tgt", "sync": "full", "speed": MIB},
    )
    ok(q, "job-cancel", id="m0")
    wait_event(q, "BLOCK_JOB_CANCELLED", device="m0")
    assert ok(q, "query-jobs") == []
    assert graph_shape(q) == before
    assert export_root(q) == "disk0"

    # A plain cancel once ready: completed, no switch, a full copy.
    ok(q, "blockdev-mirror", **{"job-id": "m1", "device": "disk0", "target": "tgt", "sync": "full"})
    wait_event(q, "BLOCK_JOB_READY", device="m1")
    ok(q, "block-job-cancel", device="m1")
    done = wait_event(q, "BLOCK_JOB_COMPLETED", device="m1")
    assert "error" not in done["data"], done
    assert ok(q, "query-jobs") == []
    assert graph_shape(q) == before
    assert export_root(q) == "disk0"
    assert target.read_bytes() == data

    # QEMU's checks.
    bad = q.cmd_obj(
        {
            "execute": "blockdev-mirror",
            "arguments": {"device": "disk0", "target": "tgt", "sync": "full", "granularity": 1000},
        }
    )
    assert bad["error"]["desc"] == "Parameter 'granularity' expects a power of 2", bad
    q.close()
    assert daemon.stop() == 0
