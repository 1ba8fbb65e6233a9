#!/usr/bin/env python3
"""Soak blkgraph with mixed vhost-user, NBD and QMP traffic and check that it does not leak.

A soak script, not a test of the CI (which runs only its short form, --seconds 20).

One blkgraph serves a page-cached raw image through a vhost-user-blk export (2 queues), the NBD
server with an export of the same node, and a QMP socket. For --minutes N (default 10; CI runs
the short form, --seconds 20) these clients run concurrently, each reconnecting all the time:

  vhost-user  blkgraph-bench in a loop (random queue count, depth, block size and run time,
              randrw over region A); every run is a new vhost-user connection
  nbd-writer  qemu-io writes a fresh byte pattern to a random extent of region B, then reads it
              back with pattern verification, each over a new NBD connection; every few
              iterations nbdcopy (two connections) copies the whole export and all of
              regions B and C are compared with what they must hold
  nbd-reader  nbdinfo (size, --map), qemu-io reads verified against the fixed content of
              region C, and nbdcopy copies checked the same way
  qmp         random graph changes: a throttle filter inserted above the root of the
              vhost-user export or of the NBD export (blockdev-add and x-blockdev-replace in
              one transaction) and removed again; dirty bitmaps added, cleared, disabled,
              enabled and removed; extra NBD exports added (some with a disabled bitmap),
              read with nbdinfo and deleted; throttle groups added and deleted; query-*
              commands; reconnects

Image: region A (64 MiB at 0) belongs to blkgraph-bench, whose data is not checked; region B
(32 MiB) to the NBD writer; region C (32 MiB) holds fixed content written before the start.

Every --interval seconds the daemon's open descriptors (entries of /proc/PID/fd), threads
(Threads in /proc/PID/status) and resident memory (VmRSS) are sampled. The run has a warm-up
(--warmup, default a tenth of the run, 5 to 60 s) and the rest; after each, the clients stop,
the QMP client puts the graph back as it was, and once the daemon is idle (figures unchanged
for longer than io_uring keeps idle io-wq workers) its figures are taken: "warm" and "end".
Printed at the end: a table and a JSON summary (start, warm, max and end of each figure, and
the iteration counts). The exit code is 1 if an end figure exceeds its warm figure by more than
the tolerance (descriptors and threads: none; RSS: the larger of --rss-mib, 20 MiB, and
--rss-pct, 10 %), if any client saw an error or a data mismatch, or if the daemon died or did
not exit cleanly on SIGTERM.

The daemon runs with MIMALLOC_PURGE_DELAY=0 (see ALLOCATOR_ENV), so its idle RSS is what it
holds rather than what its allocator has not yet given back.

Environment: BLKGRAPH_BIN (default <repo>/target/release/blkgraph), BENCH_BIN (default
<repo>/target/release/blkgraph-bench; `cargo build --release -p blkgraph-backend -p
blkgraph-bench` builds both). Needs qemu-io, nbdinfo and nbdcopy (qemu-utils, libnbd-bin) and
Python's qemu.qmp.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[2]
KIB = 1 << 10
MIB = 1 << 20

REGION_A = (0, 64 * MIB)  # blkgraph-bench
REGION_B = (64 * MIB, 32 * MIB)  # the NBD writer
REGION_C = (96 * MIB, 32 * MIB)  # fixed content
IMAGE_SIZE = 128 * MIB
BLOCK = 4 * KIB  # granularity of the NBD writer's extents and of its model of region B

# How long the figures must stay unchanged before the daemon counts as idle: longer than the
# 5 s after which an idle io_uring io-wq worker thread exits.
SETTLE_STABLE = 6.0
SETTLE_TIMEOUT = 40.0

TOOLS = ["qemu-io", "nbdinfo", "nbdcopy"]

# The daemon's allocator (mimalloc) gives a freed page back to the system only after a delay
# (10 ms), and only when the thread that owns it next allocates or frees: a queue or NBD thread
# that goes idle keeps what it freed last. That made the idle RSS vary by up to 25 MiB from one
# run to the next (a 20 s run once ended 23 MiB above its warm figure with no leak). Purging at
# once makes the idle RSS follow what the daemon holds (a few MiB of spread), so a leak stands
# out. The environment wins if it sets the option itself.
ALLOCATOR_ENV = {"MIMALLOC_PURGE_DELAY": "0"}

# nbdcopy's connections and requests in flight on each: the daemon holds the data of every
# request in flight, and what its allocator keeps of that once the clients are gone shows in
# the idle RSS. nbdcopy's defaults (4 x 64 requests of 256 KiB) make that vary by about
# 20 MiB from one idle moment to the next, the whole RSS tolerance; these keep it to a few MiB.
NBDCOPY_CONNECTIONS = 2
NBDCOPY_REQUESTS = 16


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """A client saw something wrong: a failed command, an error reply, a data mismatch."""


def run(cmd: list, timeout: float = 120, binary: bool = False) -> subprocess.CompletedProcess:
    """Run a client command; raise Failure unless it exits with 0."""
    try:
        res = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            text=not binary,
        )
    except subprocess.TimeoutExpired:
        raise Failure(f"{Path(str(cmd[0])).name} timed out after {timeout}s: {cmd}") from None
    if res.returncode != 0:
        err = res.stderr if isinstance(res.stderr, str) else res.stderr.decode(errors="replace")
        out = res.stdout if isinstance(res.stdout, str) else ""
        raise Failure(
            f"{Path(str(cmd[0])).name} exited with {res.returncode}: {cmd}\n"
            f"{(out + err).strip()[-1500:]}"
        )
    return res


def region_c_byte(offset: int) -> int:
    """The fixed byte of region C at absolute image offset `offset` (one value per MiB)."""
    mib = (offset - REGION_C[0]) // MIB
    return (mib * 37 + 11) % 255 + 1


def make_image(path: Path) -> None:
    """A sparse image whose region C holds its fixed content."""
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        start, length = REGION_C
        for off in range(start, start + length, MIB):
            f.seek(off)
            f.write(bytes([region_c_byte(off)]) * MIB)
        f.flush()
        os.fsync(f.fileno())


def check_region_c(data: bytes, what: str) -> None:
    """Raise Failure unless `data`, a copy of the whole image, has region C's content."""
    start, length = REGION_C
    for off in range(start, start + length, MIB):
        want = bytes([region_c_byte(off)]) * MIB
        got = data[off : off + MIB]
        if got != want:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            raise Failure(
                f"{what}: region C mismatch at offset {off + first}: "
                f"{got[first]:#04x}, expected {want[first]:#04x}"
            )


# ---------------------------------------------------------------------------------------------
# The daemon and its figures
# ---------------------------------------------------------------------------------------------


class Daemon:
    """blkgraph with the vhost-user-blk export, the NBD server and export, and QMP."""

    def __init__(self, binary: Path, workdir: Path, image: Path):
        self.workdir = workdir
        self.vub = workdir / "vub.sock"
        self.nbd = workdir / "nbd.sock"
        self.qmp = workdir / "qmp.sock"
        self.pidfile = workdir / "blkgraph.pid"
        self.log = workdir / "blkgraph.log"
        file_node = f"driver=file,node-name=f0,filename={image},cache.direct=off,aio=io_uring"
        vub = (
            "type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,"
            f"addr.path={self.vub},writable=on,num-queues=2"
        )
        # fmt: off
        self.args = [
            str(binary),
            "--blockdev", file_node,
            "--blockdev", "driver=raw,node-name=disk0,file=f0",
            "--export", vub,
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
            "--export", "type=nbd,id=nbd0,node-name=disk0,name=disk0,writable=on",
            "--qmp", str(self.qmp),
            "--pidfile", str(self.pidfile),
        ]
        # fmt: on
        self.proc = None

    def start(self, timeout: float = 30) -> None:
        with open(self.log, "w") as log_file:
            log_file.write(" ".join(self.args) + "\n")
            log_file.flush()
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(ALLOCATOR_ENV, **os.environ),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise Failure(f"blkgraph exited with {self.proc.returncode}:\n{self.log_tail()}")
            pid = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
            if pid == str(self.proc.pid) and all(
                s.exists() for s in (self.vub, self.nbd, self.qmp)
            ):
                return
            if time.monotonic() > deadline:
                self.proc.kill()
                raise Failure(f"blkgraph not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM; return the exit code (killing it if it ignores SIGTERM)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure(f"blkgraph ignored SIGTERM for {timeout}s") from None
        return self.proc.returncode

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def figures(self) -> dict:
        """Open descriptors, threads (and io_uring io-wq workers among them), RSS in KiB."""
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        status = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.strip()
        iou = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/comm") as f:
                    iou += f.read().startswith("iou-")
            except OSError:
                pass
        return {
            "fds": fds,
            "threads": int(status["Threads"]),
            "rss_kib": int(status["VmRSS"].split()[0]),
            "iou_workers": iou,
        }


class Sampler(threading.Thread):
    """Samples the daemon's figures every `interval` seconds until stopped."""

    def __init__(self, daemon: Daemon, interval: float):
        super().__init__(name="sampler", daemon=True)
        self.d = daemon
        self.interval = interval
        self.samples = []
        self.phase = "start"
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict | None:
        if not self.d.alive():
            return None
        try:
            s = self.d.figures()
        except (OSError, KeyError, ValueError):
            return None
        s["t"] = round(time.monotonic() - self.t0, 1)
        s["phase"] = self.phase
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()


def settle(daemon: Daemon, sampler: Sampler, target: dict | None = None) -> dict:
    """Wait until the daemon is idle: descriptors and threads unchanged for SETTLE_STABLE
    seconds (and, given a target, no higher than its), at most SETTLE_TIMEOUT; return the
    last figures."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last, since = None, time.monotonic()
    while True:
        if not daemon.alive():
            raise Failure(f"blkgraph died (exit {daemon.proc.returncode}):\n{daemon.log_tail()}")
        s = daemon.figures()
        key = (s["fds"], s["threads"])
        now = time.monotonic()
        if key != last:
            last, since = key, now
        low = target is None or (s["fds"] <= target["fds"] and s["threads"] <= target["threads"])
        if (now - since >= SETTLE_STABLE and low) or now > deadline:
            sampler.sample()
            return s
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


class Client(threading.Thread):
    """A client looping on step() until `stop` is set, counting iterations and errors."""

    kind = "client"

    def __init__(self, ctx: "Context", stop: threading.Event, seed: int):
        super().__init__(name=self.kind, daemon=True)
        self.ctx = ctx
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.counts = Counter()
        self.errors = []

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Runs once the loop ended (in the client's thread)."""

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        self.counts["errors"] += 1
        log(f"{self.kind}: ERROR {msg}")

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
                self.counts["iterations"] += 1
            except Failure as e:
                self.error(str(e))
                time.sleep(0.5)
            except Exception:  # a bug, or a broken connection: report it and go on
                self.error(traceback.format_exc(limit=3))
                time.sleep(0.5)
        try:
            self.finish()
        except Exception:
            self.error("cleanup: " + traceback.format_exc(limit=3))


class Context:
    """What the clients share: the daemon, the tools and the model of region B."""

    def __init__(self, daemon: Daemon, bench: Path):
        self.daemon = daemon
        self.bench = bench
        # The NBD writer's model of region B: the byte of every BLOCK (written by it only).
        self.model_b = bytearray(REGION_B[1] // BLOCK)

    def uri(self, name: str = "disk0") -> str:
        return f"nbd+unix:///{name}?socket={self.daemon.nbd}"

    def nbdcopy_image(self, name: str = "disk0") -> bytes:
        """The whole export, copied by nbdcopy (over several connections) to a pipe."""
        cmd = ["nbdcopy", f"--connections={NBDCOPY_CONNECTIONS}", f"--requests={NBDCOPY_REQUESTS}"]
        data = run([*cmd, self.uri(name), "-"], binary=True).stdout
        if len(data) != IMAGE_SIZE:
            raise Failure(f"nbdcopy gave {len(data)} bytes, expected {IMAGE_SIZE}")
        return data


class VhostUserClient(Client):
    """blkgraph-bench runs: a new vhost-user connection each."""

    kind = "vhost-user"

    def step(self) -> None:
        r = self.rng
        queues = r.choice([1, 2])
        # fmt: off
        cmd = [
            self.ctx.bench,
            "--socket", self.ctx.daemon.vub,
            "--rw", "randrw",
            "--bs", r.choice(["4k", "16k", "64k"]),
            "--iodepth", r.choice([1, 4, 16, 32]),
            "--queues", queues,
            "--runtime", r.choice([0.2, 0.5, 1.0]),
            "--size", REGION_A[1],
            "--seed", r.randrange(1 << 32),
        ]
        # fmt: on
        report = json.loads(run(cmd, timeout=60).stdout)
        if report["ios"] <= 0:
            raise Failure(f"blkgraph-bench did no I/O: {report}")
        self.counts["runs"] += 1
        self.counts[f"runs_{queues}q"] += 1
        self.counts["ios"] += report["ios"]


class NbdWriter(Client):
    """Verified writes to region B with qemu-io, and nbdcopy checks of regions B and C."""

    kind = "nbd-writer"

    def step(self) -> None:
        r = self.rng
        blocks = len(self.ctx.model_b)
        first = r.randrange(blocks)
        count = min(r.randint(1, 256), blocks - first)
        pattern = r.randrange(1, 256)
        off, length = REGION_B[0] + first * BLOCK, count * BLOCK
        uri = self.ctx.uri()
        run(["qemu-io", "-f", "raw", uri, "-c", f"write -P {pattern} {off} {length}"])
        self.ctx.model_b[first : first + count] = bytes([pattern]) * count
        self.counts["writes"] += 1
        # Read back over a new connection; qemu-io exits with 1 on a pattern mismatch.
        res = run(["qemu-io", "-r", "-f", "raw", uri, "-c", f"read -P {pattern} {off} {length}"])
        if "verification failed" in res.stdout + res.stderr:
            raise Failure(f"qemu-io read-back of {off}+{length}: {res.stdout.strip()}")
        self.counts["verified_reads"] += 1
        if self.counts["writes"] % 10 == 0:
            self.full_check()

    def full_check(self) -> None:
        data = self.ctx.nbdcopy_image()
        start = REGION_B[0]
        for i, want in enumerate(self.ctx.model_b):
            block = data[start + i * BLOCK : start + (i + 1) * BLOCK]
            if block != bytes([want]) * BLOCK:
                bad = next(j for j in range(BLOCK) if block[j] != want)
                raise Failure(
                    f"nbdcopy: region B mismatch at offset {start + i * BLOCK + bad}: "
                    f"{block[bad]:#04x}, expected {want:#04x}"
                )
        check_region_c(data, "nbdcopy (writer)")
        self.counts["full_checks"] += 1


class NbdReader(Client):
    """nbdinfo, and qemu-io and nbdcopy reads of region C verified against its content."""

    kind = "nbd-reader"

    def step(self) -> None:
        r = self.rng
        uri = self.ctx.uri()
        what = r.choices(["info", "map", "qemu-io", "nbdcopy"], weights=[3, 3, 6, 1])[0]
        if what == "info":
            info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
            size = info["exports"][0]["export-size"]
            if size != IMAGE_SIZE:
                raise Failure(f"nbdinfo: export size {size}, expected {IMAGE_SIZE}")
        elif what == "map":
            run(["nbdinfo", "--map", uri])
        elif what == "qemu-io":
            cmds = []
            for _ in range(r.randint(1, 8)):
                mib = REGION_C[0] + r.randrange(REGION_C[1] // MIB) * MIB
                off = mib + r.randrange(MIB // 512) * 512
                length = r.randint(1, (mib + MIB - off) // 512) * 512
                cmds += ["-c", f"read -P {region_c_byte(off)} {off} {length}"]
            res = run(["qemu-io", "-r", "-f", "raw", uri, *cmds])
            if "verification failed" in res.stdout + res.stderr:
                raise Failure(f"qemu-io reads of region C: {res.stdout.strip()[-1000:]}")
        else:
            check_region_c(self.ctx.nbdcopy_image(), "nbdcopy (reader)")
        self.counts[what] += 1


class QmpClient(Client):
    """Random graph changes and queries; at the end, the graph as it was."""

    kind = "qmp"
    EXPORT_ROOTS = {"vub0": "disk0", "nbd0": "disk0"}

    def __init__(self, ctx, stop, seed):
        super().__init__(ctx, stop, seed)
        self.qmp = None
        self.n = 0
        self.throttled = {}  # export id -> throttle node
        self.node_group = {}  # throttle node -> group id or None
        self.bitmaps = {}  # name -> enabled
        self.groups = set()
        self.initial = None

    # --- plumbing ---

    def connect(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        self.qmp = QEMUMonitorProtocol(str(self.ctx.daemon.qmp))
        self.qmp.connect()
        self.qmp.settimeout(60)

    def cmd(self, command: str, /, **args):
        resp = self.qmp.cmd_raw(command, args or None)
        self.counts["commands"] += 1
        if "error" in resp:
            raise Failure(f"{command} {json.dumps(args)}: {resp['error'].get('desc', resp)}")
        return resp["return"]

    def state(self) -> tuple:
        nodes = sorted(n["node-name"] for n in self.cmd("query-named-block-nodes"))
        exports = sorted((e["id"], e["node-name"]) for e in self.cmd("query-block-exports"))
        return nodes, exports

    def export_root(self, export_id: str) -> str:
        return {e["id"]: e["node-name"] for e in self.cmd("query-block-exports")}[export_id]

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    # --- actions ---

    def insert(self) -> None:
        free = [e for e in self.EXPORT_ROOTS if e not in self.throttled]
        if not free:
            return self.remove()
        export = self.rng.choice(free)
        node_name = self.fresh("thr")
        node = {"driver": "throttle", "node-name": node_name, "file": "disk0"}
        group = None
        if self.groups and self.rng.random() < 0.5:
            group = self.rng.choice(sorted(self.groups))
            node["throttle-group"] = group
        else:
            node["limits"] = self.rng.choice(
                [{"iops-total": 500}, {"iops-total": 5000}, {"bps-total": 200 * MIB}]
            )
        replace = {"parent-type": "export", "export-id": export, "new-child": node_name}
        actions = [
            {"type": "blockdev-add", "data": node},
            {"type": "x-blockdev-replace", "data": replace},
        ]
        self.cmd("transaction", actions=actions)
        self.throttled[export] = node_name
        self.node_group[node_name] = group
        if self.export_root(export) != node_name:
            raise Failure(f"{export}: root is not {node_name} after the insertion")
        self.counts[f"insert_{export}"] += 1

    def remove(self) -> None:
        if not self.throttled:
            return self.insert()
        export = self.rng.choice(sorted(self.throttled))
        node_name = self.throttled.pop(export)
        replace = {"parent-type": "export", "export-id": export, "new-child": "disk0"}
        actions = [
            {"type": "x-blockdev-replace", "data": replace},
            {"type": "blockdev-del", "data": {"node-name": node_name}},
        ]
        self.cmd("transaction", actions=actions)
        self.node_group.pop(node_name)
        if self.export_root(export) != "disk0":
            raise Failure(f"{export}: root is not disk0 after the removal")
        self.counts[f"remove_{export}"] += 1

    def bitmap(self) -> None:
        r = self.rng
        if not self.bitmaps or (len(self.bitmaps) < 4 and r.random() < 0.5):
            name = self.fresh("bm")
            args = {"node": "disk0", "name": name}
            if r.random() < 0.5:
                args["granularity"] = r.choice([64 * KIB, 256 * KIB, MIB])
            if r.random() < 0.5:
                args["disabled"] = True
            self.cmd("block-dirty-bitmap-add", **args)
            self.bitmaps[name] = not args.get("disabled", False)
            self.counts["bitmap_add"] += 1
            return
        name = r.choice(sorted(self.bitmaps))
        op = r.choice(["clear", "disable", "enable", "remove", "remove"])
        self.cmd(f"block-dirty-bitmap-{op}", node="disk0", name=name)
        if op == "remove":
            del self.bitmaps[name]
        elif op in ("enable", "disable"):
            self.bitmaps[name] = op == "enable"
        self.counts[f"bitmap_{op}"] += 1

    def extra_export(self) -> None:
        """Add a read-only NBD export, read it with nbdinfo, delete it. A read-only export can
        only carry a disabled bitmap, as in QEMU."""
        name = self.fresh("extra")
        args = {"type": "nbd", "id": name, "node-name": "disk0", "name": name}
        bitmap = None
        disabled = sorted(b for b, enabled in self.bitmaps.items() if not enabled)
        if disabled and self.rng.random() < 0.7:
            bitmap = self.rng.choice(disabled)
            args["bitmaps"] = [bitmap]
        self.cmd("block-export-add", **args)
        try:
            info = json.loads(run(["nbdinfo", "--json", self.ctx.uri(name)]).stdout)
            if info["exports"][0]["export-size"] != IMAGE_SIZE:
                raise Failure(f"nbdinfo {name}: {info}")
            if bitmap:
                ctx_name = f"qemu:dirty-bitmap:{bitmap}"
                run(["nbdinfo", f"--map={ctx_name}", self.ctx.uri(name)])
                self.counts["bitmap_maps"] += 1
        finally:
            self.delete_export(name)
        self.counts["extra_exports"] += 1

    def delete_export(self, export_id: str) -> None:
        """block-export-del in safe mode (the client may not be gone yet), then wait until
        the export is no longer listed."""
        deadline = time.monotonic() + 10
        while True:
            resp = self.qmp.cmd_raw("block-export-del", {"id": export_id})
            self.counts["commands"] += 1
            if "error" not in resp:
                break
            desc = resp["error"].get("desc", "")
            if "in use" not in desc or time.monotonic() > deadline:
                raise Failure(f"block-export-del {export_id}: {desc}")
            self.counts["export_del_in_use"] += 1
            time.sleep(0.05)
        while any(e["id"] == export_id for e in self.cmd("query-block-exports")):
            if time.monotonic() > deadline:
                raise Failure(f"export {export_id} still listed after block-export-del")
            time.sleep(0.05)

    def group(self) -> None:
        unused = sorted(self.groups - set(self.node_group.values()))
        if len(self.groups) < 2 and (not unused or self.rng.random() < 0.5):
            gid = self.fresh("tg")
            limits = {"iops-total": self.rng.choice([1000, 20000])}
            self.cmd("object-add", **{"qom-type": "throttle-group", "id": gid, "limits": limits})
            self.groups.add(gid)
            self.counts["group_add"] += 1
        elif unused:
            gid = self.rng.choice(unused)
            self.cmd("object-del", id=gid)
            self.groups.discard(gid)
            self.counts["group_del"] += 1

    def query(self) -> None:
        name = self.rng.choice(
            [
                "query-version",
                "query-commands",
                "query-block-exports",
                "query-named-block-nodes",
                "x-debug-query-block-graph",
            ]
        )
        self.cmd(name)
        self.counts["queries"] += 1

    def reconnect(self) -> None:
        self.connect()
        self.counts["reconnects"] += 1

    # --- loop ---

    def step(self) -> None:
        if self.qmp is None:
            self.connect()
            if self.initial is None:
                self.initial = self.state()
        action = self.rng.choices(
            [
                self.insert,
                self.remove,
                self.bitmap,
                self.extra_export,
                self.group,
                self.query,
                self.reconnect,
            ],
            weights=[4, 4, 3, 2, 1, 3, 1],
        )[0]
        action()
        self.qmp.clear_events()
        time.sleep(self.rng.uniform(0.02, 0.3))

    def finish(self) -> None:
        """Remove what the changes added; the graph must be as it was."""
        if self.initial is None:
            return
        self.connect()
        while self.throttled:
            self.remove()
        for name in sorted(self.bitmaps):
            self.cmd("block-dirty-bitmap-remove", node="disk0", name=name)
        self.bitmaps.clear()
        for gid in sorted(self.groups):
            self.cmd("object-del", id=gid)
        self.groups.clear()
        now = self.state()
        if now != self.initial:
            raise Failure(f"the graph differs from the initial one: {now} != {self.initial}")
        self.qmp.close()
        self.qmp = None


CLIENTS = [VhostUserClient, NbdWriter, NbdReader, QmpClient]


def run_phase(ctx: Context, name: str, seconds: float, seed: int, totals: dict) -> list:
    """Run every client for `seconds`; add their counts to `totals`; return their errors."""
    log(f"{name}: {seconds:.0f} s of traffic")
    stop = threading.Event()
    clients = [cls(ctx, stop, seed * 7919 + i) for i, cls in enumerate(CLIENTS)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and ctx.daemon.alive():
        time.sleep(0.2)
    stop.set()
    errors = []
    for c in clients:
        c.join(180)
        if c.is_alive():
            c.error("did not stop within 180 s")
        totals.setdefault(c.kind, Counter()).update(c.counts)
        errors += [f"{name}/{c.kind}: {e}" for e in c.errors]
    if not ctx.daemon.alive():
        errors.append(f"{name}: blkgraph died (exit {ctx.daemon.proc.returncode})")
    return errors


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def find_binary(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env, default))
    if not os.access(path, os.X_OK):
        sys.exit(
            f"soak: {path} is missing: cargo build --release -p blkgraph-backend -p "
            f"blkgraph-bench, or set {env}"
        )
    return path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="traffic time in minutes [10]")
    length.add_argument("--seconds", type=float, help="traffic time in seconds (short form)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds [a tenth, 5 to 60]")
    ap.add_argument("--interval", type=float, help="seconds between samples [5, 1 if short]")
    ap.add_argument("--rss-mib", type=float, default=20, help="RSS growth allowed, MiB [20]")
    ap.add_argument("--rss-pct", type=float, default=10, help="RSS growth allowed, %% [10]")
    ap.add_argument("--seed", type=int, help="seed of the clients' choices [from the time]")
    ap.add_argument("--workdir", type=Path, help="directory for the image and sockets [new]")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", type=Path, help="also write the summary, with samples, here")
    args = ap.parse_args()
    args.duration = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    if args.warmup is None:
        args.warmup = min(60.0, max(5.0, args.duration / 10))
    if args.warmup >= args.duration:
        ap.error("the warm-up must be shorter than the run")
    if args.interval is None:
        args.interval = 1.0 if args.duration < 120 else 5.0
    if args.seed is None:
        args.seed = int(time.time())
    return args


def table(rows: list, header: list, left: tuple = (0,)) -> str:
    """Columns aligned: those in `left` to the left, the others to the right."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def main() -> int:
    args = parse_args()
    blkgraph = find_binary("BLKGRAPH_BIN", REPO / "target/release/blkgraph")
    bench = find_binary("BENCH_BIN", REPO / "target/release/blkgraph-bench")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(f"soak: missing {', '.join(missing)} (apt-get install qemu-utils libnbd-bin)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="blkgraph-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.raw"
    make_image(image)
    daemon = Daemon(blkgraph, workdir, image)
    daemon.start()
    log(f"blkgraph pid {daemon.pid} in {workdir}; seed {args.seed}; {args.duration:.0f} s")
    ctx = Context(daemon, bench)
    sampler = Sampler(daemon, args.interval)
    totals = {}
    errors = []
    figures = {}
    exit_code = None
    try:
        figures["start"] = settle(daemon, sampler)
        sampler.start()
        sampler.phase = "warm-up"
        errors += run_phase(ctx, "warm-up", args.warmup, args.seed, totals)
        sampler.phase = "idle"
        figures["warm"] = settle(daemon, sampler)
        sampler.phase = "soak"
        errors += run_phase(ctx, "soak", args.duration - args.warmup, args.seed + 1, totals)
        sampler.phase = "idle"
        figures["end"] = settle(daemon, sampler, target=figures["warm"])
    except (Failure, OSError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        sampler.done.set()
        if sampler.is_alive():
            sampler.join()
        try:
            exit_code = daemon.stop()
        except Failure as e:
            errors.append(str(e))
    if exit_code not in (0, None):
        errors.append(f"blkgraph exited with {exit_code} on SIGTERM:\n{daemon.log_tail()}")

    # Figures: start, warm, max, end, the limit for end, and the verdict.
    rows, summary, leaks = [], {}, []
    for key in ("fds", "threads", "rss_kib", "iou_workers"):
        seen = [s[key] for s in sampler.samples] + [f[key] for f in figures.values()]
        entry = {p: figures[p][key] for p in ("start", "warm", "end") if p in figures}
        entry["max"] = max(seen) if seen else None
        if key == "iou_workers" or "warm" not in entry or "end" not in entry:
            limit = None
        elif key == "rss_kib":
            warm = entry["warm"]
            limit = warm + int(max(args.rss_mib * KIB, warm * args.rss_pct / 100))
        else:
            limit = entry["warm"]
        entry["limit"] = limit
        ok = limit is None or entry["end"] <= limit
        if not ok:
            leaks.append(f"{key}: {entry['end']} at the end, more than {limit}")
        summary[key] = entry
        cols = [entry.get(p, "-") for p in ("start", "warm", "max", "end")]
        verdict = "-" if limit is None else ("ok" if ok else "LEAK")
        rows.append([key, *cols, "-" if limit is None else limit, verdict])
    print(table(rows, ["figure", "start", "warm", "max", "end", "allowed", "verdict"]))
    print()
    count_rows = []
    for kind, counts in totals.items():
        detail = ", ".join(
            f"{k} {v}" for k, v in sorted(counts.items()) if k not in ("iterations", "errors")
        )
        count_rows.append([kind, counts["iterations"], counts["errors"], detail])
    print(table(count_rows, ["client", "iterations", "errors", "detail"], left=(0, 3)))
    print()

    result = {
        "ok": not errors and not leaks,
        "seconds": args.duration,
        "warmup_seconds": args.warmup,
        "seed": args.seed,
        "pid": daemon.pid,
        "daemon_exit": exit_code,
        "figures": summary,
        "iterations": {k: dict(v) for k, v in totals.items()},
        "leaks": leaks,
        "errors": errors[:50],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(dict(result, samples=sampler.samples), indent=1) + "\n")
    if result["ok"] and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"work directory kept: {workdir}")
    if not result["ok"]:
        for e in errors[:10]:
            log(f"error: {e}")
        for leak in leaks:
            log(f"leak: {leak}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
