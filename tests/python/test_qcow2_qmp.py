"""qcow2 nodes through QMP: what query-named-block-nodes tells about an image
and its backing chain (QAPI's ImageInfo), checked against images made by
qemu-img, against qemu-storage-daemon too when BLKGRAPH_TEST_QSD=1.
"""

import json
import subprocess
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

MIB = 1 << 20


def qemu_img(*args) -> str:
    """Run qemu-img; return its output."""
    return subprocess.run(
        ["qemu-img", *map(str, args)], check=True, capture_output=True, text=True
    ).stdout


def make_chain(workdir: Path) -> Path:
    """base.raw <- mid.qcow2 (compat 0.10) <- top.qcow2 (lazy refcounts); returns top."""
    base = workdir / "base.raw"
    base.write_bytes(b"\x11" * MIB + bytes(3 * MIB))
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw",
             workdir / "mid.qcow2", 4 * MIB)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
             "-b", "mid.qcow2", "-F", "qcow2", workdir / "top.qcow2", 8 * MIB)
    return workdir / "top.qcow2"


def named_nodes(qmp) -> dict:
    return {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}


def test_image_info_of_a_backing_chain(start_daemon, workdir):
    """image: format, sizes, cluster size, dirty flag, backing names and
    format-specific data, down the chain; backing_file and its depth."""
    top = make_chain(workdir)
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(MIB))
    blockdev = f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}"
    daemon = start_daemon(disk, qmp=True, extra_args=["--blockdev", blockdev])
    qmp = QEMUMonitorProtocol(str(daemon.qmp))
    qmp.connect()
    try:
        node = named_nodes(qmp)["top"]
    finally:
        qmp.close()
    assert node["drv"] == "qcow2" and node["file"] == str(top)
    assert node["backing_file"] == str(workdir / "mid.qcow2")
    assert node["backing_file_depth"] == 2
    image = node["image"]
    assert image["format"] == "qcow2" and image["filename"] == str(top)
    assert image["virtual-size"] == 8 * MIB and image["cluster-size"] == 4096
    assert image["dirty-flag"] is False
    assert isinstance(image["actual-size"], int) and image["actual-size"] > 0
    assert image["backing-filename"] == "mid.qcow2"
    assert image["backing-filename-format"] == "qcow2"
    assert image["full-backing-filename"] == str(workdir / "mid.qcow2")
    specific = image["format-specific"]
    assert specific["type"] == "qcow2"
    data = specific["data"]
    assert data["compat"] == "1.1" and data["lazy-refcounts"] is True
    assert data["refcount-bits"] == 16 and data["corrupt"] is False
    assert data["extended-l2"] is False and data["compression-type"] == "zlib"
    mid = image["backing-image"]
    assert mid["format"] == "qcow2" and mid["virtual-size"] == 4 * MIB
    assert mid["format-specific"]["data"]["compat"] == "0.10"
    assert mid["backing-filename"] == "base.raw"
    assert mid["backing-image"]["format"] == "raw"
    assert mid["backing-image"]["filename"] == str(workdir / "base.raw")
    assert mid["backing-image"]["dirty-flag"] is False
    assert "backing-image" not in mid["backing-image"]
    # qemu-img sees the same image the same way.
    info = json.loads(qemu_img("info", "-U", "--output=json", top))
    for key in ("virtual-size", "cluster-size", "backing-filename", "format-specific"):
        assert image[key] == info[key], key
