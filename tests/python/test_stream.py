"""block-stream on qcow2 backing chains, with the unmodified qemu.qmp client;
against qemu-storage-daemon too when BLKGRAPH_TEST_QSD=1.

- Live merge under a guest: the guest runs fio randwrite with crc32c verify
  on a qcow2 disk whose backing file has data everywhere; block-stream pulls
  the backing file's data into the disk while fio writes (a copy must never
  overwrite what the guest wrote). fio verifies, the image ends without a
  backing file, qemu-img check is clean, and the image alone is what the
  guest saw.
- A three-layer chain of named nodes streamed down to a base: the top gets
  the middle layer's data, its backing file (graph and header) becomes the
  base, and the content is unchanged.
- The same on a chain opened from the images' headers (relative backing
  file names, auto-named layers), the base named as QEMU allows: by its file
  name (absolute, or as the header above it says) or by the lowest layer to
  copy (`bottom`); and QEMU's refusals of ambiguous or unknown bases.
"""

import json
import subprocess

import pytest

from guest import Guest, file_md5, fio_errors
from test_jobs import cmd, connect, ok, wait_event

MIB = 1 << 20
SIZE = 128 * MIB


def run(*cmd) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def pattern_image(path, size, seed):
    block = bytes((i * seed + (i >> 9)) & 0xFF for i in range(MIB))
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(block)


def info(path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", path))


def check_top_over(top, base, before, workdir):
    """After a live merge: `top` checks clean, its backing file is `base`,
    and it reads as the image `before` did."""
    run("qemu-img", "check", top)
    assert info(top)["backing-filename"] == str(base)
    after = workdir / "after.raw"
    run("qemu-img", "convert", "-O", "raw", top, after)
    assert after.read_bytes() == before.read_bytes()


def test_stream_under_a_guest(daemon_kind, start_daemon, workdir):
    base = workdir / "base.raw"
    pattern_image(base, SIZE, 7)
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    daemon = start_daemon(top, qmp=True, fmt="qcow2")
    q = connect(daemon)
    guest = Guest(daemon.socket, workdir, "fio-verify", params={"size": "48M"}, timeout=300)
    with guest:
        guest.start()
        guest.wait_console("== fio-verify", timeout=120)
        # Slow enough that the copy and the guest's writes overlap.
        ok(q, "block-stream", device="disk0", **{"job-id": "s0", "speed": 32 * MIB})
        done = wait_event(q, "BLOCK_JOB_COMPLETED", timeout=240, device="s0")
        assert "error" not in done["data"], done
        assert ok(q, "query-jobs") == []
        result = guest.wait()
    q.close()
    fio = result["fio-verify"]
    assert fio.rc == 0, result.console[-4000:]
    assert fio_errors(fio.json()) == 0
    assert "verify: bad" not in result.console
    assert daemon.stop() == 0
    run("qemu-img", "check", top)
    assert "backing-filename" not in info(top)
    flat = workdir / "flat.raw"
    run("qemu-img", "convert", "-O", "raw", top, flat)
    assert file_md5(flat, 48 * MIB) == result.md5
    # Past what fio wrote, the base's data was copied in.
    with open(flat, "rb") as got, open(base, "rb") as want:
        got.seek(64 * MIB)
        want.seek(64 * MIB)
        assert got.read() == want.read()


def test_stream_down_to_a_base(daemon_kind, start_daemon, workdir):
    base = workdir / "base.raw"
    pattern_image(base, SIZE, 3)
    mid = workdir / "mid.qcow2"
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", mid)
    run("qemu-io", "-f", "qcow2", mid, "-c", "write -P 0x61 8M 8M", "-c", "write -P 0x62 100M 1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", top, "-c", "write -P 0x71 12M 1M")
    before = workdir / "before.raw"
    run("qemu-img", "convert", "-O", "raw", top, before)
    blockdevs = [
        f"driver=raw,node-name=base,file.driver=file,file.filename={base}",
        f"driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename={mid}",
        f"driver=qcow2,node-name=disk0,backing=mid,file.driver=file,file.filename={top}",
    ]
    daemon = start_daemon(None, qmp=True, blockdevs=blockdevs)
    q = connect(daemon)
    ok(q, "block-stream", device="disk0", **{"job-id": "s1", "base-node": "base"})
    done = wait_event(q, "BLOCK_JOB_COMPLETED", device="s1")
    assert "error" not in done["data"], done
    nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
    assert nodes["disk0"]["backing_file"] == str(base), nodes["disk0"]
    ok(q, "blockdev-del", **{"node-name": "mid"})
    q.close()
    assert daemon.stop() == 0
    check_top_over(top, base, before, workdir)
    assert info(top)["backing-filename-format"] == "raw"
    # The middle layer's data is in the top now; the base's is not.
    out = run("qemu-img", "map", "--output=json", top)
    depth0 = [e for e in json.loads(out) if e["depth"] == 0 and e["data"]]
    covered = sum(e["length"] for e in depth0)
    assert covered == 8 * MIB + 1 * MIB, depth0


@pytest.mark.parametrize("how", ["base-absolute", "base-as-in-header", "bottom"])
def test_stream_base_by_file_or_bottom(daemon_kind, start_daemon, workdir, how):
    base = workdir / "base.raw"
    pattern_image(base, SIZE, 5)
    mid = workdir / "mid.qcow2"
    top = workdir / "top.qcow2"
    # Relative backing file names, as qemu-img writes them when told so.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    run("qemu-io", "-f", "qcow2", mid, "-c", "write -P 0x63 16M 4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", top, "-c", "write -P 0x73 17M 1M")
    before = workdir / "before.raw"
    run("qemu-img", "convert", "-O", "raw", top, before)
    daemon = start_daemon(top, qmp=True, fmt="qcow2")
    q = connect(daemon)
    r = cmd(q, "block-stream", device="disk0", base="base.raw", bottom="x")
    assert r["error"]["desc"] == "'base' and 'bottom' cannot be specified at the same time", r
    r = cmd(q, "block-stream", device="disk0", bottom="x", **{"base-node": "y"})
    assert r["error"]["desc"] == "'bottom' and 'base-node' cannot be specified at the same time"
    r = cmd(q, "block-stream", device="disk0", base=str(workdir / "nothere.raw"))
    assert r["error"]["desc"] == f"Can't find '{workdir / 'nothere.raw'}' in the backing chain"
    assert ok(q, "query-jobs") == []
    if how == "bottom":
        mid_node = next(
            n["node-name"]
            for n in ok(q, "query-named-block-nodes")
            if n["drv"] == "qcow2" and n["file"] == str(mid)
        )
        where = {"bottom": mid_node}
    else:
        where = {"base": str(base) if how == "base-absolute" else "base.raw"}
    ok(q, "block-stream", device="disk0", **{"job-id": "s2"}, **where)
    done = wait_event(q, "BLOCK_JOB_COMPLETED", device="s2")
    assert "error" not in done["data"], done
    q.close()
    assert daemon.stop() == 0
    check_top_over(top, base, before, workdir)
    out = run("qemu-img", "map", "--output=json", top)
    depth0 = [e for e in json.loads(out) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in depth0) == 4 * MIB, depth0
