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
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        workdir / "mid.qcow2",
        4 * MIB,
    )
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        workdir / "top.qcow2",
        8 * MIB,
    )
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


# ------------------------------------------------------- persistent bitmaps


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: {r.stdout}{r.stderr}")
    return r


def qmp_cmd(qmp, cmd, **args) -> dict:
    return qmp.cmd_obj({"execute": cmd, "arguments": args})


def dirty_ranges(uri: str, name: str) -> list:
    """The dirty extents an NBD export publishes for bitmap `name`."""
    lines = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri).stdout.strip().splitlines()
    return [(int(f[0]), int(f[1])) for f in (line.split() for line in lines) if int(f[2]) == 1]


def image_bitmaps(image: Path) -> dict:
    """qemu-img info's bitmaps of an image, by name: (granularity, flags)."""
    info = json.loads(qemu_img("info", "-U", "--output=json", image))
    data = info["format-specific"]["data"]
    return {b["name"]: (b["granularity"], b["flags"]) for b in data.get("bitmaps", [])}


class Qcow2Daemon:
    """A daemon serving one qcow2 image as node `img`, writable over NBD."""

    def __init__(self, start_daemon, workdir: Path, image: Path):
        self.start_daemon, self.workdir, self.image = start_daemon, workdir, image
        self.sock = workdir / "nbd.sock"
        self.daemon = None

    def start(self) -> "Qcow2Daemon":
        disk = self.workdir / "disk.raw"
        if not disk.exists():
            disk.write_bytes(bytes(MIB))
        extra = [
            "--blockdev", f"driver=qcow2,node-name=img,file.driver=file,file.filename={self.image}",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=rw,node-name=img,name=rw,writable=on",
        ]  # fmt: skip
        self.daemon = self.start_daemon(disk, qmp=True, extra_args=extra)
        return self

    def uri(self, name="rw") -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def write(self, *commands) -> None:
        args = [a for c in commands for a in ("-c", c)]
        run("qemu-io", "-f", "raw", *args, self.uri())

    def qmp(self) -> QEMUMonitorProtocol:
        q = QEMUMonitorProtocol(str(self.daemon.qmp))
        q.connect()
        return q

    def bitmaps(self) -> dict:
        q = self.qmp()
        try:
            node = named_nodes(q)["img"]
        finally:
            q.close()
        return {b["name"]: b for b in node["dirty-bitmaps"]}


def test_persistent_bitmaps_survive_a_restart(start_daemon, workdir):
    """block-dirty-bitmap-add persistent: stored at exit, in use while open,
    loaded again (enabled or not) with their bits; qemu-img sees them."""
    image = workdir / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, 64 * MIB)
    d = Qcow2Daemon(start_daemon, workdir, image).start()
    q = d.qmp()
    try:
        assert qmp_cmd(q, "block-dirty-bitmap-add", node="img", name="b0", persistent=True) == {
            "return": {}
        }
        r = qmp_cmd(q, "block-dirty-bitmap-add", node="img", name="off", persistent=True,
                    granularity=4096, disabled=True)  # fmt: skip
        assert r == {"return": {}}, r
        assert qmp_cmd(q, "block-dirty-bitmap-add", node="img", name="mem") == {"return": {}}
        r = qmp_cmd(q, "block-dirty-bitmap-add", node="disk0", name="x", persistent=True)
        assert (
            r["error"]["desc"] == "Can't store persistent bitmaps to disk0: Operation not supported"
        )
        r = qmp_cmd(q, "block-dirty-bitmap-add", node="img", name="y", persistent=True,
                    granularity=256)  # fmt: skip
        assert "error" in r
    finally:
        q.close()
    d.write("write -P 0x11 1M 4k", "write -P 0x22 10M 200k")
    bitmaps = d.bitmaps()
    assert bitmaps["b0"]["persistent"] is True and bitmaps["mem"]["persistent"] is False
    assert bitmaps["b0"]["granularity"] == 65536 and bitmaps["b0"]["count"] == 5 * 65536
    assert d.daemon.stop() == 0
    assert image_bitmaps(image) == {"b0": (65536, ["auto"]), "off": (4096, [])}
    assert run("qemu-img", "check", image).returncode == 0

    d.start()
    bitmaps = d.bitmaps()
    assert set(bitmaps) == {"b0", "off"}
    assert bitmaps["b0"]["recording"] is True and bitmaps["off"]["recording"] is False
    assert bitmaps["b0"]["count"] == 5 * 65536 and bitmaps["off"]["count"] == 0
    assert "inconsistent" not in bitmaps["b0"]
    # While open for writing, the image marks them in use.
    assert image_bitmaps(image) == {"b0": (65536, ["in-use", "auto"]), "off": (4096, ["in-use"])}
    d.write("write -P 0x33 30M 64k")
    q = d.qmp()
    try:
        assert qmp_cmd(q, "block-dirty-bitmap-disable", node="img", name="b0") == {"return": {}}
        r = qmp_cmd(q, "block-export-add", type="nbd", id="inc", name="inc", bitmaps=["b0"],
                    **{"node-name": "img"})  # fmt: skip
        assert r == {"return": {}}, r
    finally:
        q.close()
    assert dirty_ranges(d.uri("inc"), "b0") == [
        (MIB, 65536),
        (10 * MIB, 4 * 65536),
        (30 * MIB, 65536),
    ]
    assert d.daemon.stop() == 0
    assert image_bitmaps(image) == {"b0": (65536, []), "off": (4096, [])}
    assert run("qemu-img", "check", image).returncode == 0


def test_bitmaps_interoperate_with_qemu_img(start_daemon, workdir):
    """Bitmaps made, merged and removed by qemu-img bitmap load in blkgraph,
    and blkgraph's in qemu-img."""
    image = workdir / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, 16 * MIB)
    run("qemu-img", "bitmap", "--add", "-g", "65536", image, "a")
    run("qemu-io", "-c", "write -P 0x44 2M 64k", image)  # QEMU records it in "a"
    run("qemu-img", "bitmap", "--add", "--disable", image, "d")
    d = Qcow2Daemon(start_daemon, workdir, image).start()
    bitmaps = d.bitmaps()
    assert bitmaps["a"]["granularity"] == 65536 and bitmaps["a"]["recording"] is True
    assert bitmaps["a"]["count"] == 65536
    assert bitmaps["d"]["granularity"] == 4096 and bitmaps["d"]["recording"] is False
    d.write("write -P 0x55 5M 8k")
    assert d.daemon.stop() == 0
    # qemu-img merges blkgraph's bits into a new bitmap, then removes one.
    run("qemu-img", "bitmap", "--add", image, "m")
    run("qemu-img", "bitmap", "--merge", "a", image, "m")
    run("qemu-img", "bitmap", "--remove", image, "d")
    run("qemu-img", "bitmap", "--disable", image, "a")
    assert set(image_bitmaps(image)) == {"a", "m"}
    d.start()
    bitmaps = d.bitmaps()
    assert set(bitmaps) == {"a", "m"}
    assert bitmaps["m"]["count"] == 2 * 65536 and bitmaps["a"]["recording"] is False
    q = d.qmp()
    try:
        assert qmp_cmd(q, "block-dirty-bitmap-remove", node="img", name="m") == {"return": {}}
    finally:
        q.close()
    # Removed from the image at once, not only at exit.
    assert set(image_bitmaps(image)) == {"a"}
    assert d.daemon.stop() == 0
    assert set(image_bitmaps(image)) == {"a"}
    assert run("qemu-img", "check", image).returncode == 0


def test_a_crash_leaves_bitmaps_inconsistent(start_daemon, workdir):
    """After kill -9, bitmaps are marked in use in the image: they load as
    inconsistent, cannot be used, and can be removed."""
    image = workdir / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, 16 * MIB)
    run("qemu-img", "bitmap", "--add", image, "b0")
    d = Qcow2Daemon(start_daemon, workdir, image).start()
    d.write("write -P 0x66 1M 64k")
    d.daemon.kill()
    assert image_bitmaps(image) == {"b0": (65536, ["in-use", "auto"])}
    d.start()
    b0 = d.bitmaps()["b0"]
    assert b0["inconsistent"] is True and b0["persistent"] is True
    q = d.qmp()
    try:
        r = qmp_cmd(q, "block-dirty-bitmap-clear", node="img", name="b0")
        assert r["error"]["desc"] == "Bitmap 'b0' is inconsistent and cannot be used", r
        r = qmp_cmd(q, "block-export-add", type="nbd", id="inc", name="inc", bitmaps=["b0"],
                    **{"node-name": "img"})  # fmt: skip
        assert r["error"]["desc"] == "Bitmap 'b0' is inconsistent and cannot be used", r
        assert qmp_cmd(q, "block-dirty-bitmap-remove", node="img", name="b0") == {"return": {}}
    finally:
        q.close()
    assert image_bitmaps(image) == {}
    assert d.daemon.stop() == 0
    assert run("qemu-img", "check", image).returncode == 0
