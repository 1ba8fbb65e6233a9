#!/usr/bin/env python3
"""Compare blkgraph with qemu-storage-daemon (QSD) as vhost-user-blk backends.

Both daemons get the same QSD-compatible command line, the same image and the same client
(blkgraph-bench, built on the blkio crate). They run alternately, never both at once: for every
repetition and scenario each peer is started, measured and stopped in turn, and the order of the
peers flips on every repetition. One JSON summary with all results and the blkgraph/QSD ratios
is printed on stdout; progress goes to stderr.

Scenarios (select with --scenarios, by name or by group a, b, c):
  cached-qd32       (a) 4k randread, QD32, 1 queue; page-cached image (cache.direct=off,aio=io_uring)
  direct-qd1        (b) 4k randread, QD1, 1 queue; O_DIRECT image on ext4 (cache.direct=on,aio=io_uring)
  direct-qd32       (b) 4k randread, QD32, 1 queue; O_DIRECT image on ext4 (cache.direct=on,aio=io_uring)
  qcow2-read-qd32   (c) 4k randread, QD32, 1 queue; fully allocated qcow2 (the random data
                        converted), page-cached
  qcow2-alloc-qd32  (c) 4k randwrite, QD32, 1 queue; a new, empty 64 GiB qcow2 for each
                        measurement, so that nearly every write allocates a cluster
  qcow2-seq64k      (c) 64k sequential write, QD8, 1 queue; a new, empty 8 GiB qcow2 for each
                        measurement
The qcow2 images have QEMU's defaults (64 KiB clusters) and are made by qemu-img.

The image (1 GiB of random data by default, written with O_DIRECT) lives on ext4: the work
directory itself if it is ext4, else a loop-mounted ext4 file system made in it (needs root);
if that fails the work directory is used as it is and its file-system type is recorded.

Environment: BLKGRAPH_BIN (default <repo>/target/release/blkgraph), QSD_BIN (default
qemu-storage-daemon), BENCH_BIN (default <repo>/target/release/blkgraph-bench, built with
`cargo build --release -p blkgraph-bench` when missing).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
MIB = 1 << 20

SCENARIOS = {
    "cached-qd32": {
        "group": "a",
        "description": "4k randread QD32, 1 queue, page-cached raw image",
        "cache_direct": False,
        "aio": "io_uring",
        "rw": "randread",
        "bs": 4096,
        "iodepth": 32,
        "queues": 1,
    },
    "direct-qd1": {
        "group": "b",
        "description": "4k randread QD1, 1 queue, O_DIRECT raw image on ext4",
        "cache_direct": True,
        "aio": "io_uring",
        "rw": "randread",
        "bs": 4096,
        "iodepth": 1,
        "queues": 1,
    },
    "direct-qd32": {
        "group": "b",
        "description": "4k randread QD32, 1 queue, O_DIRECT raw image on ext4",
        "cache_direct": True,
        "aio": "io_uring",
        "rw": "randread",
        "bs": 4096,
        "iodepth": 32,
        "queues": 1,
    },
    "qcow2-read-qd32": {
        "group": "c",
        "description": "4k randread QD32, 1 queue, fully allocated page-cached qcow2",
        "cache_direct": False,
        "aio": "io_uring",
        "rw": "randread",
        "bs": 4096,
        "iodepth": 32,
        "queues": 1,
        "qcow2": "full",
    },
    "qcow2-alloc-qd32": {
        "group": "c",
        "description": "4k randwrite QD32, 1 queue, empty 64 GiB qcow2 (allocating writes)",
        "cache_direct": False,
        "aio": "io_uring",
        "rw": "randwrite",
        "bs": 4096,
        "iodepth": 32,
        "queues": 1,
        "qcow2": "empty",
        "virtual_size": 64 * GIB,
    },
    "qcow2-seq64k": {
        "group": "c",
        "description": "64k sequential write QD8, 1 queue, empty 8 GiB qcow2",
        "cache_direct": False,
        "aio": "io_uring",
        "rw": "write",
        "bs": 65536,
        "iodepth": 8,
        "queues": 1,
        "qcow2": "empty",
        "virtual_size": 8 * GIB,
    },
}


def log(msg):
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


class Fatal(Exception):
    """An error that ends the run with a message and exit code 1."""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def fs_type(path):
    out = subprocess.run(
        ["df", "--output=fstype", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[-1] if out else "unknown"


def machine_info():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
    }


def size_arg(s):
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": MIB, "g": GIB}.get(s[-1:], 1)
    if s[-1:] in "kmg":
        s = s[:-1]
    return int(s) * mult


# ---------------------------------------------------------------------------------------------
# Storage: an ext4 directory for the image
# ---------------------------------------------------------------------------------------------


class Storage:
    """Provides an ext4 directory for the image; loop-mounts one if needed. Cleans up."""

    def __init__(self, workdir, image_size, force_loop):
        self.workdir = workdir
        self.mountpoint = None
        self.backing = None
        self.note = None
        self.loop_mounted = False
        self.loopdev = None
        self.loop_direct_io = False
        wtype = fs_type(workdir)
        if wtype == "ext4" and not force_loop:
            self.dir = workdir
            self.fs_type = wtype
            return
        self.backing = workdir / "ext4.img"
        self.mountpoint = workdir / "ext4"
        self.mountpoint.mkdir()
        fs_size = image_size + image_size // 8 + 128 * MIB
        try:
            with open(self.backing, "wb") as f:
                f.truncate(fs_size)
            run(["mkfs.ext4", "-q", "-F", str(self.backing)], capture_output=True)
            # With --direct-io=on the loop device bypasses the backing file's page cache, so
            # that cache.direct=on measures real I/O; fall back to a plain loop mount.
            p = subprocess.run(["losetup", "--find", "--show", "--direct-io=on",
                                str(self.backing)], capture_output=True, text=True)
            if p.returncode == 0:
                self.loopdev = p.stdout.strip()
                self.loop_direct_io = True
                run(["mount", self.loopdev, str(self.mountpoint)], capture_output=True)
            else:
                run(["mount", "-o", "loop", str(self.backing), str(self.mountpoint)],
                    capture_output=True)
            self.loop_mounted = True
            self.dir = self.mountpoint
            self.fs_type = fs_type(self.mountpoint)
            self.note = (f"work directory is {wtype}; image on a loop-mounted ext4 file system "
                         f"(loop direct-io {'on' if self.loop_direct_io else 'off'})")
            log(self.note)
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", b"") or b""
            if isinstance(err, bytes):
                err = err.decode(errors="replace")
            self.note = (f"work directory is {wtype} and a loop-mounted ext4 could not be "
                         f"made ({e} {err.strip()}); using the work directory as it is")
            log("WARNING: " + self.note)
            self.backing.unlink(missing_ok=True)
            self.dir = workdir
            self.fs_type = wtype

    def cleanup(self, keep=False):
        if self.loop_mounted:
            subprocess.run(["umount", str(self.mountpoint)], check=False)
            self.loop_mounted = False
        if self.loopdev is not None:
            subprocess.run(["losetup", "-d", self.loopdev], check=False)
            self.loopdev = None
        if self.backing is not None and not keep:
            self.backing.unlink(missing_ok=True)


def make_image(path, size):
    """Fills `path` with `size` bytes of random data written with O_DIRECT, then syncs."""
    log(f"writing {size // MIB} MiB of random data to {path}")
    count = size // MIB
    try:
        run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={count}",
             "oflag=direct", "status=none"])
    except subprocess.CalledProcessError:
        log("dd oflag=direct failed (file system without O_DIRECT?), writing buffered + fsync")
        run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={count}",
             "conv=fsync", "status=none"])
    os.sync()


def warm_cache(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MIB):
            pass


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


def qemu_escape(p):
    return str(p).replace(",", ",,")


def daemon_args(image, socket, pidfile, sc):
    onoff = "on" if sc["cache_direct"] else "off"
    fmt = "qcow2" if "qcow2" in sc else "raw"
    return [
        "--blockdev",
        f"driver=file,node-name=f0,filename={qemu_escape(image)},cache.direct={onoff},aio={sc['aio']}",
        "--blockdev", f"driver={fmt},node-name=disk0,file=f0",
        "--export",
        f"type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,"
        f"addr.path={qemu_escape(socket)},writable=on,num-queues={sc['queues']},"
        f"logical-block-size=512",
        "--pidfile", str(pidfile),
    ]


class Daemon:
    def __init__(self, binary, args, rundir, pidfile, socket, name):
        self.pidfile = pidfile
        self.socket = socket
        self.logpath = rundir / f"{name}.log"
        for p in (pidfile, socket):
            p.unlink(missing_ok=True)
        self.logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen([str(binary)] + args, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise Fatal(f"{name} exited with {self.proc.returncode} before it was ready; "
                            f"log {self.logpath}:\n{self.log_tail()}")
            try:
                if (int(pidfile.read_text().strip()) == self.proc.pid
                        and socket.is_socket()):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise Fatal(f"{name} not ready after 30 s; log:\n{self.log_tail()}")
            time.sleep(0.01)

    def log_tail(self):
        try:
            return self.logpath.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                # A daemon writes back what it cached (qcow2 metadata, a page
                # cache full of allocating writes) before it exits.
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        for p in (self.pidfile, self.socket):
            p.unlink(missing_ok=True)


def run_bench(bench, socket, pid, sc, runtime, ramp):
    cmd = [str(bench), "--socket", str(socket), "--rw", sc["rw"], "--bs", str(sc["bs"]),
           "--iodepth", str(sc["iodepth"]), "--queues", str(sc["queues"]),
           "--runtime", str(runtime), "--ramp", str(ramp), "--pid", str(pid)]
    if sc.get("rate_iops"):
        cmd += ["--rate-iops", str(sc["rate_iops"])]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise Fatal(f"blkgraph-bench failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout)


def scenario_image(raw, sc):
    """The image a scenario runs on: the raw image, its qcow2 conversion (made
    once), or a new empty qcow2."""
    if sc.get("qcow2") == "full":
        image = raw.with_suffix(".qcow2")
        if not image.exists():
            log(f"converting {raw} to {image}")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
        return image
    if sc.get("qcow2") == "empty":
        image = raw.with_name("empty.qcow2")
        image.unlink(missing_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(sc["virtual_size"])])
        return image
    return raw


def measure(peer, binary, raw, rundir, sc, bench, runtime, ramp):
    socket = rundir / "vub.sock"
    pidfile = rundir / "daemon.pid"
    image = scenario_image(raw, sc)
    if sc["cache_direct"]:
        drop_cache(image)
    else:
        warm_cache(image)
    d = Daemon(binary, daemon_args(image, socket, pidfile, sc), rundir, pidfile, socket, peer)
    try:
        result = run_bench(bench, socket, d.proc.pid, sc, runtime, ramp)
    finally:
        d.stop()
        if sc.get("qcow2") == "empty":
            result_check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True,
                                          text=True)
            image.unlink(missing_ok=True)
            if result_check.returncode != 0:
                raise Fatal(f"qemu-img check failed after {sc['description']}: "
                            f"{result_check.stdout}{result_check.stderr}")
    return result


def median_summary(results):
    def med(key, sub=None):
        vals = [r[key][sub] if sub else r.get(key) for r in results]
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 3) if vals else None

    return {
        "runs": len(results),
        "iops": med("iops"),
        "lat_mean_us": med("lat_us", "mean"),
        "lat_p50_us": med("lat_us", "p50"),
        "lat_p99_us": med("lat_us", "p99"),
        "backend_cpu_s": med("backend_cpu_s"),
        "backend_cpu_per_io_us": med("backend_cpu_per_io_us"),
        "backend_ctxsw_per_io": med("backend_ctxsw_per_io"),
        "client_cpu_per_io_us": med("client_cpu_per_io_us"),
    }


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="a,b,c",
                    help="comma-separated scenario names or groups a, b, c (default: all)")
    ap.add_argument("--runtime", type=float, default=10.0,
                    help="measured seconds per scenario and peer (default 10)")
    ap.add_argument("--ramp", type=float, default=1.0,
                    help="unmeasured warm-up seconds before each measurement (default 1)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repetitions; the peer order alternates (default 1)")
    ap.add_argument("--skip-blkgraph", action="store_true",
                    help="measure QSD only (until blkgraph exists)")
    ap.add_argument("--skip-qsd", action="store_true", help="measure blkgraph only")
    ap.add_argument("--image-size", type=size_arg, default=GIB,
                    help="image size, multiple of 1 MiB (default 1G)")
    ap.add_argument("--workdir", type=Path, default=REPO / "target",
                    help="where the temporary run directory is made (default <repo>/target)")
    ap.add_argument("--force-loop", action="store_true",
                    help="use a loop-mounted ext4 even if the work directory is ext4")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (image, logs)")
    ap.add_argument("--output", type=Path, help="also write the JSON summary to this file")
    args = ap.parse_args()
    names = []
    for item in args.scenarios.split(","):
        item = item.strip()
        if item in ("a", "b", "c"):
            names += [n for n, s in SCENARIOS.items() if s["group"] == item]
        elif item in SCENARIOS:
            names.append(item)
        elif item:
            ap.error(f"unknown scenario {item!r} (known: a, b, c, {', '.join(SCENARIOS)})")
    args.scenario_names = list(dict.fromkeys(names))
    if not args.scenario_names:
        ap.error("no scenario selected")
    if args.skip_blkgraph and args.skip_qsd:
        ap.error("--skip-blkgraph and --skip-qsd leave nothing to measure")
    if args.image_size < MIB or args.image_size % MIB:
        ap.error("--image-size must be a positive multiple of 1 MiB")
    if args.runtime <= 0 or args.repeat < 1 or args.ramp < 0:
        ap.error("--runtime must be > 0, --repeat >= 1, --ramp >= 0")
    return args


def find_binaries(args):
    bench = Path(os.environ.get("BENCH_BIN", REPO / "target/release/blkgraph-bench"))
    if not bench.is_file():
        if "BENCH_BIN" in os.environ:
            raise Fatal(f"BENCH_BIN={bench} does not exist")
        log("building blkgraph-bench (cargo build --release -p blkgraph-bench)")
        run(["cargo", "build", "--release", "-p", "blkgraph-bench"], cwd=REPO)
    peers = {}
    if not args.skip_qsd:
        qsd = os.environ.get("QSD_BIN", "qemu-storage-daemon")
        qsd_path = shutil.which(qsd)
        if qsd_path is None:
            raise Fatal(f"{qsd} not found (set QSD_BIN or use --skip-qsd)")
        peers["qsd"] = Path(qsd_path)
    if not args.skip_blkgraph:
        bg = Path(os.environ.get("BLKGRAPH_BIN", REPO / "target/release/blkgraph"))
        if not bg.is_file():
            raise Fatal(f"blkgraph binary {bg} not found: build it (release), set "
                        f"BLKGRAPH_BIN, or pass --skip-blkgraph")
        peers["blkgraph"] = bg
    return bench, peers


def version_of(binary):
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main():
    args = parse_args()
    bench, peers = find_binaries(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="blkgraph-compare-", dir=args.workdir))
    storage = None
    summary = {
        "machine": machine_info(),
        "client": {"binary": str(bench), "library": "blkio crate 0.5.1 (virtio-blk-vhost-user)"},
        "peers": {name: {"binary": str(b), "version": version_of(b)} for name, b in peers.items()},
        "runtime_s": args.runtime,
        "ramp_s": args.ramp,
        "repeat": args.repeat,
    }
    # Turn SIGTERM into an exception so that the finally block cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        storage = Storage(rundir, args.image_size, args.force_loop)
        image = storage.dir / "disk.raw"
        make_image(image, args.image_size)
        summary["image"] = {
            "path": str(image),
            "size": args.image_size,
            "fs_type": storage.fs_type,
            "loop_mounted": storage.loop_mounted,
            "loop_direct_io": storage.loop_direct_io,
            "note": storage.note,
        }
        summary["command_line"] = " ".join(
            ["<daemon>"] + daemon_args(image, rundir / "vub.sock", rundir / "daemon.pid",
                                       SCENARIOS[args.scenario_names[0]]))
        results = {}
        order = list(peers)
        for rep in range(args.repeat):
            rep_order = order if rep % 2 == 0 else order[::-1]
            for name in args.scenario_names:
                sc = SCENARIOS[name]
                for peer in rep_order:
                    log(f"rep {rep + 1}/{args.repeat} {name} {peer}: "
                        f"{args.ramp:g} s ramp + {args.runtime:g} s")
                    r = measure(peer, peers[peer], image, rundir, sc, bench, args.runtime,
                                args.ramp)
                    log(f"  {r['iops']:.0f} IOPS, p99 {r['lat_us']['p99']} us, backend "
                        f"{r['backend_cpu_per_io_us']} us CPU/IO")
                    results.setdefault(name, []).append({"peer": peer, "rep": rep, "result": r})

        out = {}
        for name in args.scenario_names:
            sc = SCENARIOS[name]
            entry = {
                "description": sc["description"],
                "format": "qcow2" if "qcow2" in sc else "raw",
                "file_options": {"cache.direct": "on" if sc["cache_direct"] else "off",
                                 "aio": sc["aio"]},
                "rw": sc["rw"], "bs": sc["bs"], "iodepth": sc["iodepth"], "queues": sc["queues"],
                "runs": results.get(name, []),
            }
            for peer in peers:
                entry[peer] = median_summary(
                    [r["result"] for r in results.get(name, []) if r["peer"] == peer])
            if "qsd" in peers and "blkgraph" in peers:
                b, q = entry["blkgraph"], entry["qsd"]
                entry["ratio_blkgraph_over_qsd"] = {
                    "iops": ratio(b["iops"], q["iops"]),
                    "backend_cpu_per_io": ratio(b["backend_cpu_per_io_us"],
                                                q["backend_cpu_per_io_us"]),
                    "lat_p99": ratio(b["lat_p99_us"], q["lat_p99_us"]),
                }
            out[name] = entry
        summary["scenarios"] = out
        summary["machine"]["loadavg_end"] = list(os.getloadavg())
    finally:
        if storage is not None:
            storage.cleanup(keep=args.keep)
        if args.keep:
            log(f"kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)

    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    for name, e in summary["scenarios"].items():
        parts = [f"{p}: {e[p]['iops']:.0f} IOPS, {e[p]['backend_cpu_per_io_us']} us CPU/IO"
                 for p in peers]
        r = e.get("ratio_blkgraph_over_qsd")
        if r:
            parts.append(f"ratio IOPS {r['iops']}, CPU/IO {r['backend_cpu_per_io']}")
        log(f"{name}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fatal as e:
        print(f"compare: {e}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as e:
        print(f"compare: command failed: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
