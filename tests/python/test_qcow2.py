"""qcow2 images served by the daemon, judged with QEMU's own tools.

- Interop out: a random qemu-io script (writes of patterns, aligned and
  byte-granular; write-zeroes with and without may-unmap; cluster-aligned
  discards; batches of concurrent non-overlapping writes that share
  clusters; flushes) runs against the NBD export of a qcow2 image, with and
  without a backing file, and the same script against a raw model (a
  discard zeroes the model: on qcow2 a discarded cluster reads as zeroes,
  also over a backing file). The export must read as the model midway,
  and after the daemon stopped `qemu-img check` must find the image clean
  and `qemu-img compare` identical to the model; clusters whose last
  change was a whole-cluster zeroing or discard must hold no data
  (`qemu-img map`), as QEMU leaves them.
- allocation-depth: `nbdinfo --map=qemu:allocation-depth` of an NBD export
  with `allocation-depth=on` of the top of a backing chain of three (and of
  one whose backing files are shorter than the image) reports the depth of
  each range exactly as qemu-storage-daemon serving the same images does,
  and the depths of known ranges are the expected ones.
- A guest runs fio with verify on a qcow2 disk over a backing file full of
  data: strided 4k writes inside clusters (each copies the rest of its
  cluster from the backing file), random 4k writes and random 24k writes
  straddling clusters; then the md5 of the whole disk in the guest must be
  the md5 of `qemu-img convert` of the image on the host, the parts fio did
  not write must hold the backing file's data, and `qemu-img check` must
  find the image clean.

The interop-out and guest tests run against qemu-storage-daemon too with
BLKGRAPH_TEST_QSD=1; the allocation-depth test always runs both daemons.
BLKGRAPH_QCOW2_OPS sets the length of the interop-out script (300), and
BLKGRAPH_QCOW2_SEED repeats a script (the seed is printed).
"""

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import StorageDaemon
from guest import Guest, fio_errors, file_md5

KIB = 1024
MIB = 1 << 20
SYSTEM_PATH = "/usr/bin:/bin:" + os.environ.get("PATH", "")


@pytest.fixture(autouse=True)
def tools_present():
    missing = [
        c for c in ("qemu-img", "qemu-io", "nbdinfo") if shutil.which(c, path=SYSTEM_PATH) is None
    ]
    if missing:
        pytest.fail(f"tools missing: {missing} (apt-get install qemu-utils libnbd-bin)")


def run(*cmd, check=True, timeout=300):
    env = dict(os.environ, PATH=SYSTEM_PATH)
    res = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def qemu_io(fmt, image, cmds):
    """Run qemu-io commands on an image; fail if one of them failed."""
    args = ["qemu-io", "-f", fmt, "-d", "unmap"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, image).stdout
    assert "failed" not in out, out
    return out


def assert_check_clean(image):
    res = run("qemu-img", "check", "--output=json", "-f", "qcow2", image, check=False)
    assert res.returncode == 0, f"qemu-img check {image}: {res.stdout}{res.stderr}"
    report = json.loads(res.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report


def compare(fmt_a, a, fmt_b, b, force_share=False):
    """qemu-img compare; returns its output, fails unless the images are identical.

    force_share: open the images although a running daemon holds them (-U)."""
    share = ["-U"] if force_share else []
    res = run("qemu-img", "compare", *share, "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert res.returncode == 0, f"{a} vs {b}: {res.stdout}{res.stderr}"
    return res.stdout


def nbd_uri(sock, name="disk0"):
    return f"nbd+unix:///{name}?socket={sock}"


def nbd_args(sock, writable=True, depth=False):
    export = "type=nbd,id=nbd0,node-name=disk0,name=disk0"
    export += f",writable={'on' if writable else 'off'}"
    if depth:
        export += ",allocation-depth=on"
    return ["--nbd-server", f"addr.type=unix,addr.path={sock}", "--export", export]


def random_bytes(seed, length):
    return random.Random(seed).randbytes(length)


def make_base(workdir, size, data_regions, seed=0xBA5E):
    """A raw file with random data in data_regions, and a qcow2 copy of it (64k clusters).

    Returns (base.qcow2, base.raw)."""
    raw = workdir / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for i, (off, length) in enumerate(data_regions):
            f.seek(off)
            f.write(random_bytes(seed + i, length))
    base = workdir / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
    return base, raw


# ---------------------------------------------------------------------------------------------
# Interop out
# ---------------------------------------------------------------------------------------------

OUT_SIZE = 32 * MIB
# name: (qemu-img create options, cluster size)
SHAPES = {
    "64k": ("cluster_size=64k", 64 * KIB),
    "16k-extended-l2": ("cluster_size=16k,extended_l2=on", 16 * KIB),
    "512": ("cluster_size=512", 512),
    "4k-compat-0.10": ("cluster_size=4k,compat=0.10", 4 * KIB),
}
OPS = int(os.environ.get("BLKGRAPH_QCOW2_OPS", "300"))


def random_script(rng, size, cluster, count, discards=True):
    """Random operations as (qemu-io command for the export, command for the raw model,
    kind, offset, length); kind is data, zero, discard or flush.

    It starts with writes and write-zeroes of 5 MiB, more than 1024 clusters of 4k, partly
    unaligned. Without discards, none is sent (a discarded cluster of a compat 0.10 image over a
    backing file shows the backing file again, which no raw model can follow)."""
    ops = []
    for c, kind in (
        (f"write -P 0x42 {MIB + 512} {5 * MIB}", "data"),
        (f"write -z {8 * MIB} {5 * MIB}", "zero"),
        (f"write -P 0x43 {16 * MIB} {5 * MIB}", "data"),
        (f"write -z -u {18 * MIB + 4 * KIB} {5 * MIB}", "zero"),
    ):
        off, n = (int(x) for x in c.split()[-2:])
        ops.append((c, c, kind, off, n))

    def length(small=512):
        kind = rng.random()
        if kind < 0.4:
            n = rng.randrange(1, 9) * small
        elif kind < 0.8:
            n = rng.randrange(1, 4 * max(cluster, 64 * KIB) // 512 + 1) * 512
        else:
            n = rng.randrange(1, 2 * MIB // 512 + 1) * 512
        return n

    def place(n, align=512):
        off = rng.randrange(0, (size - n) // align + 1) * align
        return off

    while len(ops) < count:
        r = rng.random()
        byte = rng.randrange(1, 256)
        if r < 0.35:
            n = length()
            off = place(n)
            c = f"write -P {byte:#x} {off} {n}"
            ops.append((c, c, "data", off, n))
        elif r < 0.45:
            # Byte-granular: the export reads, modifies and writes sectors.
            n = rng.randrange(1, 70000)
            off = rng.randrange(0, size - n)
            c = f"write -P {byte:#x} {off} {n}"
            ops.append((c, c, "data", off, n))
        elif r < 0.55:
            n = length()
            off = place(n)
            c = f"write -z {off} {n}"
            ops.append((c, c, "zero", off, n))
        elif r < 0.65:
            n = length()
            off = place(n)
            c = f"write -z -u {off} {n}"
            ops.append((c, c, "zero", off, n))
        elif r < 0.75 and discards:
            n = rng.randrange(1, 9) * cluster
            off = place(n, cluster)
            ops.append((f"discard {off} {n}", f"write -z {off} {n}", "discard", off, n))
        elif r < 0.8:
            ops.append(("flush", "flush", "flush", 0, 0))
        else:
            # Concurrent writes to disjoint ranges close together, sharing
            # clusters, submitted in random order.
            k = rng.randrange(2, 9)
            span = k * (cluster + 1024)
            pos = place(span)
            batch = []
            for _ in range(k):
                pos += rng.randrange(0, 2) * 512
                n = rng.randrange(1, max(2, cluster // 512) + 1) * 512
                if pos + n > size:
                    break
                batch.append((pos, n, rng.randrange(1, 256)))
                pos += n
            rng.shuffle(batch)
            for off, n, b in batch:
                c = f"aio_write -P {b:#x} {off} {n}"
                ops.append((c, c, "data", off, n))
            ops.append(("aio_flush", "aio_flush", "flush", 0, 0))
    return ops


def zeroed_clusters(ops, cluster, size, kinds):
    """Clusters whose last change was an operation of kinds on the whole cluster."""
    state = {}
    for _, _, kind, off, n in ops:
        if kind == "flush":
            continue
        for c in range(off // cluster, (off + n - 1) // cluster + 1):
            whole = off <= c * cluster and (c + 1) * cluster <= off + n
            state[c] = kind in kinds and whole
    return {c for c, z in state.items() if z and (c + 1) * cluster <= size}


def data_clusters(image, cluster):
    """Clusters of the image (not of its backing files) that qemu-img map reports as data."""
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", image).stdout)
    out = set()
    for e in extents:
        if e["data"] and e["depth"] == 0:
            out.update(range(e["start"] // cluster, (e["start"] + e["length"] - 1) // cluster + 1))
    return out


@pytest.mark.parametrize("backing", [False, True], ids=["no-backing", "backing"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_interop_out(daemon_kind, start_daemon, workdir, shape, backing):
    opts, cluster = SHAPES[shape]
    model = workdir / "model.raw"
    top = workdir / "top.qcow2"
    if backing:
        regions = [(0, 12 * MIB), (16 * MIB + 4 * KIB, 3 * MIB), (24 * MIB, 8 * MIB)]
        base, raw = make_base(workdir, OUT_SIZE, regions)
        shutil.copy(raw, model)
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, "-b", base.name, "-F", "qcow2", top)
    else:
        with open(model, "wb") as f:
            f.truncate(OUT_SIZE)
        run("qemu-img", "create", "-f", "qcow2", "-o", opts, top, str(OUT_SIZE))

    seed = int(os.environ.get("BLKGRAPH_QCOW2_SEED", random.randrange(1 << 32)))
    print(f"script seed: BLKGRAPH_QCOW2_SEED={seed}")
    v2 = "compat=0.10" in opts
    ops = random_script(random.Random(seed), OUT_SIZE, cluster, OPS, discards=not (v2 and backing))
    halves = [ops[: len(ops) // 2], ops[len(ops) // 2 :]]

    sock = workdir / "nbd.sock"
    daemon = start_daemon(
        top,
        fmt="qcow2",
        file_opts=",discard=unmap",
        format_opts=",discard=unmap",
        extra_args=nbd_args(sock),
    )
    uri = nbd_uri(sock)
    for i, half in enumerate(halves):
        qemu_io("raw", uri, [export for export, _, _, _, _ in half])
        qemu_io("raw", model, [raw for _, raw, _, _, _ in half])
        assert "identical" in compare("raw", uri, "raw", model), f"after part {i + 1}"
    assert daemon.stop() == 0

    assert_check_clean(top)
    compare("qcow2", top, "raw", model)
    # Zeroed or discarded whole, a cluster holds no data as QEMU leaves it: a zero cluster or
    # none. compat 0.10 has no zero clusters: QEMU writes zeroes there, and only a discard
    # (without a backing file) frees a cluster.
    kinds = {"discard"} if v2 else {"zero", "discard"}
    zeroed = zeroed_clusters(ops, cluster, OUT_SIZE, kinds)
    assert zeroed or (v2 and backing), "the script zeroed no whole cluster"
    still = zeroed & data_clusters(top, cluster)
    assert not still, f"clusters zeroed or discarded whole still hold data: {sorted(still)[:20]}"


# ---------------------------------------------------------------------------------------------
# allocation-depth
# ---------------------------------------------------------------------------------------------


def chain_of_three(workdir):
    """base <- mid <- top (16 MiB; 64k, 64k and 16k clusters); returns (top, expected) where
    expected maps offsets to the depth QEMU's semantics give them."""
    base, _ = make_base(workdir, 16 * MIB, [(0, 4 * MIB), (8 * MIB, 4 * MIB)])
    mid = workdir / "mid.qcow2"
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io(
        "qcow2",
        mid,
        ["write -P 0x11 2M 1M", "write -z 9M 512k", "discard 10M 512k", "write -P 0x12 13M 64k"],
    )
    run(
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        "-b",
        mid.name,
        "-F",
        "qcow2",
        top,
    )
    qemu_io(
        "qcow2",
        top,
        [
            "write -P 0x21 2560k 256k",
            "write -P 0x22 5M 48k",
            "write -z -u 3M 256k",
            "discard 11M 64k",
            "write -z 13M 16k",
        ],
    )
    expected = {
        0: 3,  # base data
        2 * MIB: 2,  # mid data over base data
        2560 * KIB: 1,  # top data over mid data
        3 * MIB: 1,  # top zero cluster over base data
        4 * MIB: 0,  # nowhere
        5 * MIB: 1,  # top data over nothing
        9 * MIB: 2,  # mid zero cluster over base data
        10 * MIB: 2,  # mid discard over base data: a zero cluster
        11 * MIB: 1,  # top discard over base data
        13 * MIB: 1,  # top zero over mid data
        13 * MIB + 16 * KIB: 2,  # the rest of mid's data cluster
        15 * MIB: 0,
    }
    return top, expected


def short_chain(workdir):
    """base (4 MiB) <- mid (8 MiB) <- top (16 MiB): ranges past the end of a backing file read
    as zeroes; QEMU counts them as allocated in the layer whose backing file is short."""
    base = workdir / "sbase.qcow2"
    mid = workdir / "smid.qcow2"
    top = workdir / "stop.qcow2"
    run("qemu-img", "create", "-f", "qcow2", base, "4M")
    qemu_io("qcow2", base, ["write -P 1 0 4M"])
    run("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid, "8M")
    qemu_io("qcow2", mid, ["write -P 2 6M 64k"])
    run("qemu-img", "create", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top, "16M")
    qemu_io("qcow2", top, ["write -P 3 1M 64k", "write -P 3 12M 64k"])
    expected = {
        0: 3,
        1 * MIB: 1,
        5 * MIB: 3,  # past base's end, inside mid: zeroes "allocated" in base
        6 * MIB: 2,
        9 * MIB: 2,  # past mid's end: zeroes "allocated" in mid
        12 * MIB: 1,
        15 * MIB: 2,
    }
    return top, expected


def parse_map(text):
    """nbdinfo --map lines as (start, length, value)."""
    out = []
    for line in text.strip().splitlines():
        start, length, value = line.split()[:3]
        out.append((int(start), int(length), int(value)))
    return out


def value_at(extents, offset):
    for start, length, value in extents:
        if start <= offset < start + length:
            return value
    raise AssertionError(f"no extent covers {offset}: {extents}")


def served_maps(binary, workdir, image):
    """Both maps of an NBD export of image (allocation-depth=on) served by binary."""
    sock = workdir / "depth.sock"
    daemon = StorageDaemon(
        binary,
        workdir,
        image,
        name=f"depth-{Path(binary).name}",
        fmt="qcow2",
        extra_args=nbd_args(sock, writable=False, depth=True),
    ).start()
    try:
        uri = nbd_uri(sock)
        depth = run("nbdinfo", "--map=qemu:allocation-depth", uri).stdout
        alloc = run("nbdinfo", "--map", uri).stdout
        compare("raw", uri, "qcow2", image, force_share=True)
    finally:
        assert daemon.stop() == 0
    return depth, alloc


@pytest.mark.parametrize("chain", [chain_of_three, short_chain], ids=["three", "short-backing"])
def test_allocation_depth_as_qsd(blkgraph_bin, workdir, chain):
    if not os.access(blkgraph_bin, os.X_OK):
        pytest.fail(f"{blkgraph_bin} is missing: run cargo build --release, or set BLKGRAPH_BIN")
    top, expected = chain(workdir)
    qsd = os.environ.get("QSD_BIN", "qemu-storage-daemon")
    maps = {
        kind: served_maps(b, workdir, top)
        for kind, b in (("qsd", qsd), ("blkgraph", str(blkgraph_bin)))
    }
    for kind, (depth, _) in maps.items():
        extents = parse_map(depth)
        assert sum(length for _, length, _ in extents) == 16 * MIB, (kind, depth)
        got = {off: value_at(extents, off) for off in expected}
        assert got == expected, f"{kind}:\n{depth}"
    assert (
        maps["blkgraph"][0] == maps["qsd"][0]
    ), f"qemu:allocation-depth differs\nblkgraph:\n{maps['blkgraph'][0]}\nqsd:\n{maps['qsd'][0]}"
    assert (
        maps["blkgraph"][1] == maps["qsd"][1]
    ), f"base:allocation differs\nblkgraph:\n{maps['blkgraph'][1]}\nqsd:\n{maps['qsd'][1]}"


# ---------------------------------------------------------------------------------------------
# A guest
# ---------------------------------------------------------------------------------------------

GUEST_SIZE = 64 * MIB
REGION = 16 * MIB
CLUSTER = 64 * KIB
STRIDED = (0, REGION)
STRIDE_OFFSET = 20 * KIB
UNTOUCHED = (3 * REGION, REGION)
GUEST_JOB = f"""
[global]
filename=${{DISK}}
direct=1
ioengine=libaio
iodepth=16
verify=crc32c
verify_fatal=1
[cow-strided]
rw=write:{CLUSTER - 4 * KIB}
bs=4k
offset={STRIDED[0] + STRIDE_OFFSET}
size={STRIDED[1]}
io_size={STRIDED[1] // (CLUSTER // (4 * KIB))}
[random-4k]
rw=randwrite
bs=4k
offset={REGION}
size={REGION}
[random-24k]
rw=randwrite
bs=24k
offset={2 * REGION}
size={REGION}
"""


def test_guest_fio_verify_qcow2_over_backing(daemon_kind, start_daemon, workdir):
    base, raw = make_base(workdir, GUEST_SIZE, [(0, GUEST_SIZE)])
    top = workdir / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    daemon = start_daemon(top, fmt="qcow2")

    result = Guest(
        daemon.socket,
        workdir,
        "fio,md5",
        params={"size": GUEST_SIZE},
        fio_job=GUEST_JOB,
        timeout=300,
    ).run()

    assert result.disk["sectors"] == GUEST_SIZE // 512
    fio = result["fio"]
    assert fio.rc == 0, result.console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0
    written = {job["jobname"]: job["write"]["io_bytes"] for job in report["jobs"]}
    assert written == {
        "cow-strided": STRIDED[1] // (CLUSTER // (4 * KIB)),
        "random-4k": REGION,
        "random-24k": REGION // (24 * KIB) * 24 * KIB,
    }, written
    verified = {job["jobname"]: job["read"]["io_bytes"] for job in report["jobs"]}
    assert verified == written, verified

    assert daemon.stop() == 0
    assert_check_clean(top)
    out = workdir / "top.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, out)
    assert file_md5(out, GUEST_SIZE) == result.md5
    with open(out, "rb") as got, open(raw, "rb") as want:
        # What fio did not write is the backing file's: the rest of each
        # strided cluster (copied on write) and the untouched region.
        for off in range(STRIDED[0], STRIDED[0] + STRIDED[1], CLUSTER):
            for start, end in ((0, STRIDE_OFFSET), (STRIDE_OFFSET + 4 * KIB, CLUSTER)):
                got.seek(off + start)
                want.seek(off + start)
                assert got.read(end - start) == want.read(end - start), f"cluster at {off}"
        got.seek(UNTOUCHED[0])
        want.seek(UNTOUCHED[0])
        assert got.read(UNTOUCHED[1]) == want.read(UNTOUCHED[1]), "untouched region"
