#!/usr/bin/env python3
"""Compare blkgraph's NBD server with qemu-nbd, qemu-storage-daemon (QSD) and nbdkit.

Every peer serves the same raw image (1 GiB of random data by default, page-cached: no
O_DIRECT anywhere) on a unix socket, and fio's nbd engine (libnbd; Debian's fio 3.33 has it)
measures it. Peers run one at a time; for every repetition and scenario each peer is started,
measured and stopped in turn, and the order of the peers rotates on every repetition. One JSON
summary with all results (IOPS, completion latency percentiles, server CPU) and the ratios
blkgraph/peer is printed on stdout; progress goes to stderr.

Scenarios (select with --scenarios):
  randread-qd32   4k random reads, iodepth 32, 1 job (the headline number)
  randread-qd1    4k random reads, iodepth 1, 1 job
  randwrite-qd32  4k random writes, iodepth 32, 1 job
  read-1m         1 MiB sequential reads, iodepth 4, 1 job

Peers (select with --peers): blkgraph, nbdkit (file plugin), qemu-nbd (aio=threads, writeback
cache, shared connections), qsd (NBD export, aio=threads by default, see --qsd-aio).

Environment: BLKGRAPH_BIN (default <repo>/target/release/blkgraph), QSD_BIN, QEMU_NBD_BIN,
NBDKIT_BIN, FIO_BIN (defaults from PATH). Needs Python 3.9+ (standard library only).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
EXPORT = "disk0"

SCENARIOS = {
    "randread-qd32": {"rw": "randread", "bs": "4k", "iodepth": 32},
    "randread-qd1": {"rw": "randread", "bs": "4k", "iodepth": 1},
    "randwrite-qd32": {"rw": "randwrite", "bs": "4k", "iodepth": 32},
    "read-1m": {"rw": "read", "bs": "1m", "iodepth": 4},
}
PEERS = ["blkgraph", "nbdkit", "qemu-nbd", "qsd"]


def log(msg):
    print(f"[nbd-compare] {msg}", file=sys.stderr, flush=True)


class Fatal(Exception):
    """An error that ends the run with a message and exit code 1."""


def binary(env, default):
    path = os.environ.get(env, default)
    found = shutil.which(path) if "/" not in str(path) else (path if os.access(path, os.X_OK) else None)
    return found


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def make_image(path, size):
    log(f"writing {size >> 20} MiB of random data to {path}")
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(size // MIB):
            # Cheap variation so no two MiB are equal.
            f.write(i.to_bytes(8, "little") + chunk[8:])
    # Warm the page cache: every peer reads the same cached image.
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def cpu_seconds(pid):
    """CPU time (user + system) of a process and its threads so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def nbd_ready(sock):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(1)
        s.connect(str(sock))
        return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        s.close()


class Peer:
    """One NBD server process serving the image as export "disk0" on a unix socket."""

    def __init__(self, name, image, rundir, args):
        self.name = name
        self.sock = rundir / f"{name}.sock"
        self.log = rundir / f"{name}.log"
        self.image = image
        self.rundir = rundir
        self.args = args
        self.proc = None

    def command(self):
        img, sock = str(self.image), str(self.sock)
        if self.name == "blkgraph":
            return [
                self.args.blkgraph,
                "--blockdev", f"driver=file,node-name=f0,filename={img},cache.direct=off,aio=io_uring",
                "--blockdev", "driver=raw,node-name=d0,file=f0",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e0,node-name=d0,name={EXPORT},writable=on",
            ]
        if self.name == "qsd":
            return [
                self.args.qsd,
                "--blockdev",
                f"driver=file,node-name=f0,filename={img},cache.direct=off,aio={self.args.qsd_aio}",
                "--blockdev", "driver=raw,node-name=d0,file=f0",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e0,node-name=d0,name={EXPORT},writable=on",
            ]
        if self.name == "qemu-nbd":
            return [
                self.args.qemu_nbd, "-t", "-e", "8", "--cache=writeback", "--aio=threads",
                "-f", "raw", "-x", EXPORT, "-k", sock, img,
            ]
        if self.name == "nbdkit":
            return [self.args.nbdkit, "-f", "-U", sock, "--exportname", EXPORT, "file", img]
        raise Fatal(f"unknown peer {self.name}")

    def start(self):
        self.sock.unlink(missing_ok=True)
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while not (self.sock.exists() and nbd_ready(self.sock)):
            if self.proc.poll() is not None:
                raise Fatal(f"{self.name} exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise Fatal(f"{self.name} did not listen within 20 s: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.unlink(missing_ok=True)


def run_fio(args, uri, scenario, outdir, tag):
    sc = SCENARIOS[scenario]
    out = outdir / f"fio-{tag}.json"
    cmd = [
        args.fio, "--name=nbd", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={sc['rw']}", f"--bs={sc['bs']}", f"--iodepth={sc['iodepth']}",
        "--numjobs=1", "--time_based", f"--runtime={args.runtime}", f"--ramp_time={args.ramp}",
        f"--size={args.image_size}", "--randrepeat=0", "--norandommap",
        "--output-format=json", f"--output={out}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise Fatal(f"fio failed ({res.returncode}): {res.stderr.strip()}")
    data = json.loads(out.read_text())
    job = data["jobs"][0]
    side = job["write"] if sc["rw"].endswith("write") else job["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": round(side["iops"]),
        "bw_mib_s": round(side["bw_bytes"] / MIB, 1),
        "clat_mean_us": round(side["clat_ns"]["mean"] / 1000, 1),
        "clat_p50_us": round(pct.get("50.000000", 0) / 1000, 1),
        "clat_p99_us": round(pct.get("99.000000", 0) / 1000, 1),
        "fio_cpu_pct": round(job["usr_cpu"] + job["sys_cpu"], 1),
        "errors": job.get("error", 0),
    }


def measure(args, peer, scenario, outdir, rep):
    peer.start()
    try:
        uri = f"nbd+unix:///{EXPORT}?socket={peer.sock}"
        before = cpu_seconds(peer.proc.pid)
        t0 = time.monotonic()
        result = run_fio(args, uri, scenario, outdir, f"{peer.name}-{scenario}-{rep}")
        elapsed = time.monotonic() - t0
        after = cpu_seconds(peer.proc.pid)
        if before is not None and after is not None:
            result["server_cpu_pct"] = round(100 * (after - before) / elapsed, 1)
        return result
    finally:
        peer.stop()


def machine():
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg()[0],
    }


def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower()
    if s and s[-1] in units:
        return int(s[:-1]) * units[s[-1]]
    return int(s)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="randread-qd32,randread-qd1",
                   help=f"comma-separated, from {','.join(SCENARIOS)} (or 'all')")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers")
    p.add_argument("--runtime", type=int, default=10, help="measured seconds per run")
    p.add_argument("--ramp", type=int, default=1, help="unmeasured seconds before each run")
    p.add_argument("--repeat", type=int, default=1, help="repetitions (medians are reported)")
    p.add_argument("--image-size", default="1G", help="image size (default 1G)")
    p.add_argument("--qsd-aio", default="threads", choices=["threads", "io_uring", "native"])
    p.add_argument("--workdir", default=str(REPO / "target"), help="where the run directory is made")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--output", help="also write the JSON summary here")
    args = p.parse_args()

    scenarios = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    peers = args.peers.split(",")
    for s in scenarios:
        if s not in SCENARIOS:
            raise Fatal(f"unknown scenario {s}")
    for n in peers:
        if n not in PEERS:
            raise Fatal(f"unknown peer {n}")
    args.blkgraph = binary("BLKGRAPH_BIN", str(REPO / "target/release/blkgraph"))
    args.qsd = binary("QSD_BIN", "qemu-storage-daemon")
    args.qemu_nbd = binary("QEMU_NBD_BIN", "qemu-nbd")
    args.nbdkit = binary("NBDKIT_BIN", "nbdkit")
    args.fio = binary("FIO_BIN", "fio")
    if not args.fio:
        raise Fatal("fio not found (Debian: apt-get install fio)")
    wanted = {"blkgraph": args.blkgraph, "qsd": args.qsd, "qemu-nbd": args.qemu_nbd, "nbdkit": args.nbdkit}
    for n in peers:
        if not wanted[n]:
            hint = "cargo build --release" if n == "blkgraph" else "apt-get install " + (
                "qemu-utils" if n in ("qsd", "qemu-nbd") else "nbdkit")
            raise Fatal(f"{n} not found ({hint})")
    size = parse_size(args.image_size)

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="nbd-compare-", dir=args.workdir))
    try:
        image = rundir / "image.raw"
        make_image(image, size)
        results = {s: {n: [] for n in peers} for s in scenarios}
        for rep in range(args.repeat):
            order = peers[rep % len(peers):] + peers[:rep % len(peers)]
            for s in scenarios:
                for n in order:
                    r = measure(args, Peer(n, image, rundir, args), s, rundir, rep)
                    log(f"rep {rep} {s} {n}: {r['iops']} IOPS, p99 {r['clat_p99_us']} us, "
                        f"server cpu {r.get('server_cpu_pct')} %")
                    results[s][n].append(r)
        summary = {
            "machine": machine(),
            "versions": {
                "blkgraph": version([args.blkgraph, "--version"]) if args.blkgraph else None,
                "qemu-nbd": version([args.qemu_nbd, "--version"]) if args.qemu_nbd else None,
                "qsd": version([args.qsd, "--version"]) if args.qsd else None,
                "nbdkit": version([args.nbdkit, "--version"]) if args.nbdkit else None,
                "fio": version([args.fio, "--version"]),
            },
            "settings": {
                "runtime_s": args.runtime, "ramp_s": args.ramp, "repeat": args.repeat,
                "image_size": size, "qsd_aio": args.qsd_aio, "socket": "unix",
            },
            "scenarios": {},
            "ratios": {},
        }
        summary["machine"]["loadavg_end"] = os.getloadavg()[0]
        for s in scenarios:
            med = {}
            for n in peers:
                runs = results[s][n]
                med[n] = {
                    k: statistics.median(r[k] for r in runs if k in r)
                    for k in runs[0]
                }
                med[n]["runs_iops"] = [r["iops"] for r in runs]
            summary["scenarios"][s] = {"description": SCENARIOS[s], "median": med}
            if "blkgraph" in peers:
                summary["ratios"][s] = {
                    f"blkgraph/{n}": round(med["blkgraph"]["iops"] / med[n]["iops"], 3)
                    for n in peers if n != "blkgraph" and med[n]["iops"]
                }
        text = json.dumps(summary, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
    finally:
        if args.keep:
            log(f"kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except Fatal as e:
        print(f"nbd-compare: {e}", file=sys.stderr)
        sys.exit(1)
