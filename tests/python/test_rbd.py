"""Disks on Ceph: the rbd driver against a real one-node cluster.

The cluster (one mon, one memstore OSD on 127.0.0.1, cephx off) is started
by tests/ceph/cluster.py once for this module. Without Ceph installed the
tests skip, saying what is missing, unless BLKGRAPH_REQUIRE_CEPH=1 or CI=true
(set in CI), where they fail. With BLKGRAPH_TEST_QSD=1 the tests that QSD
can run also run against qemu-storage-daemon's rbd driver.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from guest import Guest, fio_errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ceph"))
import cluster  # noqa: E402

MIB = 1 << 20
SYSTEM_PATH = "/usr/bin:/bin:" + os.environ.get("PATH", "")


@pytest.fixture(scope="module")
def ceph(tmp_path_factory):
    """The module's cluster; images are created per test."""
    gone = cluster.missing()
    if gone:
        text = f"Ceph is not installed ({', '.join(gone)}): apt-get install ceph-mon ceph-osd ceph-common librbd1"
        if cluster.required():
            pytest.fail(text + " (required: BLKGRAPH_REQUIRE_CEPH=1 or CI=true)")
        pytest.skip(text)
    c = cluster.CephCluster(tmp_path_factory.mktemp("ceph") / "c")
    c.start()
    yield c
    c.stop()


def rbd_blockdev(ceph, image, node="rbd0", **extra) -> str:
    opts = f"driver=rbd,node-name={node},pool={ceph.pool},image={image},conf={ceph.conf}"
    for k, v in extra.items():
        opts += f",{k.replace('_', '-')}={v}"
    return opts


def disk_blockdevs(ceph, image) -> list[str]:
    return [rbd_blockdev(ceph, image, discard="unmap"), "driver=raw,node-name=disk0,file=rbd0,discard=unmap"]


def md5_of(path: Path, size: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, MIB))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def run(*cmd, timeout=120, check=True):
    env = dict(os.environ, PATH=SYSTEM_PATH)
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def daemon_error(daemon_bin, args, timeout=60) -> tuple[str, float]:
    """Runs a daemon that must fail to start; its message and how long it took."""
    start = time.monotonic()
    res = subprocess.run([daemon_bin, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    took = time.monotonic() - start
    assert res.returncode != 0, f"{args} started:\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr, took


def test_open_errors_name_the_missing_part(daemon_kind, daemon_bin, ceph, workdir):
    """A missing pool, image, snapshot or conf file fails the open with QEMU's texts."""
    image = f"errs-{daemon_kind}"
    ceph.create_image(image, 8 * MIB)
    cases = {
        "error opening pool nopool: No such file or directory": dict(pool="nopool"),
        "error reading header from noimg: No such file or directory": dict(image="noimg"),
        "error reading conf file /nonexistent.conf: No such file or directory": dict(conf="/nonexistent.conf"),
    }
    for text, change in cases.items():
        opts = dict(pool=ceph.pool, image=image, conf=ceph.conf)
        opts.update(change)
        arg = "driver=rbd,node-name=r0," + ",".join(f"{k}={v}" for k, v in opts.items())
        out, _ = daemon_error(daemon_bin, ["--blockdev", arg])
        assert text in out, out
    arg = rbd_blockdev(ceph, image, snapshot="nosnap", read_only="on")
    out, _ = daemon_error(daemon_bin, ["--blockdev", arg])
    assert f"error reading header from {image}: No such file or directory" in out, out
    if daemon_kind == "blkgraph":
        out, _ = daemon_error(daemon_bin, ["--blockdev", rbd_blockdev(ceph, image, snapshot="s")])
        assert "rbd snapshots are always read-only" in out, out
        out, _ = daemon_error(daemon_bin, ["--blockdev", rbd_blockdev(ceph, image, key_secret="sec0")])
        assert "No secret with id 'sec0'" in out, out


def test_unreachable_cluster_times_out(daemon_bin, daemon_kind, ceph, workdir):
    """A cluster whose monitors do not answer fails the open after the
    connect timeout instead of hanging it."""
    if daemon_kind == "qsd":
        pytest.skip("QSD waits client_mount_timeout's default, 300 s")
    port = cluster.free_port()
    conf = workdir / "dead.conf"
    conf.write_text(
        f"[global]\nmon host = [v2:127.0.0.1:{port},v1:127.0.0.1:{port}]\n"
        "auth client required = none\n"
        f"log file = {workdir}/client.log\nadmin socket = {workdir}/client.asok\n"
    )
    arg = f"driver=rbd,node-name=r0,pool=rbd,image=x,conf={conf}"
    out, took = daemon_error(daemon_bin, ["--blockdev", arg], timeout=60)
    assert "error connecting: Connection timed out" in out, out
    assert took < 50, f"the open took {took:.0f} s"


def test_guest_fio_verify_on_rbd(daemon_kind, start_daemon, ceph, workdir):
    """A guest's fio randwrite + crc32c verify on an rbd disk; the image then
    holds what the guest wrote."""
    size = 64 * MIB
    image = f"guest-{daemon_kind}"
    ceph.create_image(image, 2 * size)
    daemon = start_daemon(None, num_queues=2, blockdevs=disk_blockdevs(ceph, image))
    result = Guest(daemon.socket, workdir, "fio-verify", num_queues=2, params={"size": size}, timeout=600).run()
    fio = result["fio-verify"]
    assert fio.rc == 0, result.console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0
    assert sum(job["write"]["io_bytes"] for job in report["jobs"]) == size
    assert all(result.interrupts), f"a queue was not used: {result.interrupts}"
    assert daemon.stop() == 0
    # A clean stop closes the image: no watcher and no exclusive lock stay
    # behind for the next client to wait out.
    status = json.loads(ceph.rbd("status", "--format", "json", f"{ceph.pool}/{image}").stdout)
    assert status["watchers"] == [], status
    out = workdir / "export.raw"
    ceph.export(image, out)
    assert md5_of(out, size) == result.md5


def test_osd_restart_during_guest_io(daemon_kind, start_daemon, ceph, workdir):
    """The OSD stops for a few seconds while the guest runs fio with verify:
    the guest's requests wait (no error reaches it), I/O goes on once the OSD
    is back, and the daemon serves on without a restart."""
    size = 32 * MIB
    image = f"osd-{daemon_kind}"
    ceph.create_image(image, size)
    daemon = start_daemon(None, num_queues=1, blockdevs=disk_blockdevs(ceph, image))
    fio_job = f"""[global]
filename=/dev/vda
direct=1
ioengine=libaio
iodepth=16
bs=4k
size={size}
verify=crc32c
verify_fatal=1
[write-verify]
rw=randwrite
[write-verify-again]
stonewall
rw=randwrite
"""
    guest = Guest(daemon.socket, workdir, "fio,md5", params={"size": size}, fio_job=fio_job, timeout=900).start()
    try:
        guest.wait_console("== fio", timeout=300)
        time.sleep(2)
        down_at = time.monotonic()
        ceph.stop_osd()
        time.sleep(4)
        ceph.start_osd()
        outage = time.monotonic() - down_at
        result = guest.wait()
    finally:
        guest.kill()
    fio = result["fio"]
    assert fio.rc == 0, result.console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0
    worst = max(job["write"]["clat_ns"]["max"] for job in report["jobs"]) / 1e9
    print(f"OSD down for {outage:.1f} s; slowest guest write {worst:.1f} s")
    # The outage really hit requests in flight: some write waited for it.
    assert worst > 2, f"no write waited for the OSD (slowest {worst:.2f} s)"
    assert daemon.proc.poll() is None, "the daemon exited"
    assert "I/O error" not in result.console, result.console[-4000:]
    # The daemon serves on: a new guest reads what the first one wrote.
    second = Guest(daemon.socket, workdir, "md5", params={"size": size}, name="guest2", timeout=300).run()
    assert second.md5 == result.md5
    assert daemon.stop() == 0


def test_fleecing_rbd_source_local_temp(daemon_kind, start_daemon, ceph, workdir):
    """Fleecing with the source disk on rbd and the temporary image on a local
    file: after the guest-side export overwrote the disk, the snapshot read
    over NBD is the point-in-time image, and the rbd image holds the new data."""
    if daemon_kind == "qsd":
        pytest.skip("QSD cannot insert copy-before-write under a running export (no x-blockdev-replace)")
    size = 32 * MIB
    before, after = workdir / "before.raw", workdir / "after.raw"
    before.write_bytes(os.urandom(size))
    after.write_bytes(os.urandom(size))
    ceph.import_(before, f"fleece-{daemon_kind}")
    temp = workdir / "fleece-temp.raw"
    with open(temp, "wb") as f:
        f.truncate(size)
    nbd_sock = workdir / "nbd.sock"
    daemon = start_daemon(
        None,
        qmp=True,
        blockdevs=disk_blockdevs(ceph, f"fleece-{daemon_kind}"),
        extra_args=[
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--export", "type=nbd,id=live,node-name=disk0,name=live,writable=on",
        ],  # fmt: skip
    )
    qmp = QEMUMonitorProtocol(str(daemon.qmp))
    qmp.connect()
    try:
        actions = [
            {"type": "blockdev-add", "data": {"driver": "raw", "node-name": "fl-tmp", "discard": "unmap",
                "file": {"driver": "file", "filename": str(temp), "discard": "unmap"}}},
            {"type": "blockdev-add", "data": {"driver": "copy-before-write", "node-name": "fl-cbw",
                "file": "disk0", "target": "fl-tmp"}},
            {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "live",
                "new-child": "fl-cbw"}},
            {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "vub0",
                "new-child": "fl-cbw"}},
            {"type": "blockdev-add", "data": {"driver": "snapshot-access", "node-name": "fl-access",
                "file": "fl-cbw"}},
        ]  # fmt: skip
        r = qmp.cmd_raw("transaction", {"actions": actions})
        assert "return" in r, r
        r = qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "fl", "node-name": "fl-access", "name": "snap"})
        assert "return" in r, r
        live = f"nbd+unix:///live?socket={nbd_sock}"
        snap = f"nbd+unix:///snap?socket={nbd_sock}"
        # The "guest" overwrites the whole disk while the snapshot exists.
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", after, live)
        run("qemu-io", "-f", "raw", "-c", "flush", live)
        got = workdir / "snapshot.raw"
        run("nbdcopy", snap, got)
        assert md5_of(got, size) == md5_of(before, size), "the snapshot is not the point-in-time image"
        assert os.stat(temp).st_blocks * 512 >= size // 2, "the old data was not copied to the local temp"
    finally:
        qmp.close()
    assert daemon.stop() == 0
    out = workdir / "rbd-now.raw"
    ceph.export(f"fleece-{daemon_kind}", out)
    assert md5_of(out, size) == md5_of(after, size)


def test_block_status_and_snapshot(daemon_kind, start_daemon, ceph, workdir):
    """Block status follows the object map, and a read-only node on an rbd
    snapshot reads the snapshot's data. (Resizing is tested in
    tests/tests/rbd.rs: blkgraph has no block_resize command yet.)"""
    image = f"misc-{daemon_kind}"
    obj = 4 * MIB
    ceph.create_image(image, 16 * obj)
    data = workdir / "data"
    data.write_bytes(os.urandom(obj))
    nbd_sock = workdir / "nbd.sock"
    daemon = start_daemon(
        None,
        qmp=True,
        blockdevs=disk_blockdevs(ceph, image),
        extra_args=[
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
            "--export", "type=nbd,id=n0,node-name=disk0,name=disk0,writable=on",
        ],  # fmt: skip
    )
    uri = f"nbd+unix:///disk0?socket={nbd_sock}"
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {2 * obj} {obj}", "-c", f"write -P 0x6b {5 * obj + 4096} 4096", uri)
    extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    allocated = [(e["offset"], e["length"]) for e in extents if e["type"] & 1 == 0]
    assert allocated == [(2 * obj, obj), (5 * obj, obj)], extents
    ceph.rbd("snap", "create", f"{ceph.pool}/{image}@s1")
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x7c {2 * obj} {obj}", uri)
    qmp = QEMUMonitorProtocol(str(daemon.qmp))
    qmp.connect()
    try:
        snap = {
            "driver": "rbd", "node-name": "snap", "pool": ceph.pool, "image": image,
            "snapshot": "s1", "conf": str(ceph.conf), "read-only": True,
        }  # fmt: skip
        r = qmp.cmd_raw("blockdev-add", snap)
        assert "return" in r, r
        r = qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "s", "node-name": "snap", "name": "snap"})
        assert "return" in r, r
    finally:
        qmp.close()
    snap_uri = f"nbd+unix:///snap?socket={nbd_sock}"
    run("qemu-io", "-r", "-f", "raw", "-c", f"read -P 0x5a {2 * obj} {obj}", snap_uri)
    run("qemu-io", "-f", "raw", "-c", f"read -P 0x7c {2 * obj} {obj}", uri)
    res = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", snap_uri, check=False)
    assert res.returncode != 0 and "Permission denied" in res.stdout + res.stderr, res
    assert daemon.stop() == 0
