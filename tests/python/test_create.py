"""blockdev-create as libvirt drives it (create the file, add it, create the
qcow2 image on it, add the image), with the unmodified qemu.qmp client;
against qemu-storage-daemon too when BLKGRAPH_TEST_QSD=1.

The images made are checked with qemu-img (check, info) for each option
(compat, cluster sizes, extended L2, lazy refcounts, refcount widths, a
backing file), written through an NBD export and read back by qemu-img.
A bad option fails the job with QEMU's text; the job is not a block job and
waits for job-dismiss.
"""

import json
import subprocess

import pytest

from test_jobs import connect, ok, wait_event

MIB = 1 << 20


def run(*cmd) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def create(q, job_id, options) -> dict:
    """Runs blockdev-create to its end; returns the concluded job's info."""
    ok(q, "blockdev-create", **{"job-id": job_id, "options": options})
    wait_event(q, "JOB_STATUS_CHANGE", id=job_id, status="concluded")
    job = next(j for j in ok(q, "query-jobs") if j["id"] == job_id)
    assert ok(q, "query-block-jobs") == [], "a create job is not a block job"
    ok(q, "job-dismiss", id=job_id)
    assert ok(q, "query-jobs") == []
    return job


IMAGES = {
    "default": {},
    "compat-0.10": {"version": "v2"},
    "512-clusters": {"cluster-size": 512},
    "2M-clusters": {"cluster-size": 2 * MIB},
    "extended-l2": {"cluster-size": 32768, "extended-l2": True},
    "lazy-refcounts": {"lazy-refcounts": True},
    "refcount-bits-1": {"refcount-bits": 1},
    "zstd": {"compression-type": "zstd"},
}


@pytest.mark.parametrize("variant", sorted(IMAGES))
def test_libvirt_creates_a_qcow2_image(daemon_kind, start_daemon, workdir, variant):
    daemon = start_daemon(None, qmp=True, blockdevs=["driver=null-co,node-name=disk0"])
    q = connect(daemon)
    path = workdir / "new.qcow2"
    base = workdir / "base.raw"
    base.write_bytes(b"\x11" * (4 * MIB))
    size = 1 << 30
    job = create(q, "c0", {"driver": "file", "filename": str(path), "size": 0})
    assert "error" not in job, job
    ok(q, "blockdev-add", **{"driver": "file", "node-name": "f1", "filename": str(path)})
    options = {
        "driver": "qcow2",
        "file": "f1",
        "size": size,
        "backing-file": str(base),
        "backing-fmt": "raw",
        **IMAGES[variant],
    }
    job = create(q, "c1", options)
    assert "error" not in job, job
    assert job["type"] == "create"
    ok(q, "blockdev-add", **{"driver": "qcow2", "node-name": "img", "file": "f1"})
    nbd = workdir / "nbd.sock"
    ok(q, "nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd)}})
    ok(q, "block-export-add", type="nbd", id="n0", **{"node-name": "img", "writable": True})
    uri = f"nbd+unix:///img?socket={nbd}"
    run(
        "qemu-io",
        "-f",
        "raw",
        uri,
        "-c",
        f"write -P 0x5a {size - MIB} 64k",
        "-c",
        "write -P 0x33 0 4k",
    )
    q.close()
    daemon.stop()

    run("qemu-img", "check", path)
    info = json.loads(run("qemu-img", "info", "--output=json", path))
    assert info["virtual-size"] == size
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"
    data = info["format-specific"]["data"]
    assert data["compat"] == ("0.10" if variant == "compat-0.10" else "1.1")
    assert info["cluster-size"] == IMAGES[variant].get("cluster-size", 65536)
    if variant == "extended-l2":
        assert data["extended-l2"] is True
    if variant == "lazy-refcounts":
        assert data["lazy-refcounts"] is True
    if variant == "refcount-bits-1":
        assert data["refcount-bits"] == 1
    if variant == "zstd":
        assert data["compression-type"] == "zstd"
    for check in [f"read -P 0x5a {size - MIB} 64k", "read -P 0x33 0 4k", "read -P 0x11 4k 60k"]:
        out = run("qemu-io", "-f", "qcow2", path, "-c", check)
        assert "verification failed" not in out, out


def test_bad_options_fail_the_job(daemon_kind, start_daemon, workdir):
    daemon = start_daemon(None, qmp=True, blockdevs=["driver=null-co,node-name=disk0"])
    q = connect(daemon)
    path = workdir / "new.qcow2"
    create(q, "c0", {"driver": "file", "filename": str(path), "size": 0})
    ok(q, "blockdev-add", **{"driver": "file", "node-name": "f1", "filename": str(path)})
    cases = [
        ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
        ({"size": MIB, "cluster-size": 3000}, "Cluster size must be a power of two between 512 and 2048k"),
        ({"size": MIB, "version": "v2", "lazy-refcounts": True}, "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
        ({"size": MIB, "backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ]  # fmt: skip
    for i, (options, text) in enumerate(cases):
        job = create(q, f"bad{i}", {"driver": "qcow2", "file": "f1", **options})
        assert job["status"] == "concluded"
        assert text in job.get("error", ""), (options, job)
    q.close()
    daemon.stop()


def test_raw_images_are_files_resized(daemon_kind, start_daemon, workdir):
    if daemon_kind == "qsd":
        pytest.skip("QEMU's raw driver cannot blockdev-create")
    daemon = start_daemon(None, qmp=True, blockdevs=["driver=null-co,node-name=disk0"])
    q = connect(daemon)
    path = workdir / "new.raw"
    path.write_bytes(b"x" * 4096)
    ok(q, "blockdev-add", **{"driver": "file", "node-name": "f1", "filename": str(path)})
    job = create(q, "c0", {"driver": "raw", "file": "f1", "size": 16 * MIB})
    assert "error" not in job, job
    assert path.stat().st_size == 16 * MIB
    q.close()
    daemon.stop()
