#!/usr/bin/env python3
"""Block jobs: blkgraph and qemu-storage-daemon side by side, same client.

- backup: blockdev-backup sync=full of an image of random data to a raw
  target on the same file system, with no guest load; throughput (image
  bytes / time from the command to BLOCK_JOB_COMPLETED) and daemon CPU
  seconds.
- mirror: blockdev-mirror sync=full of the image under a steady guest
  write load (blkgraph-bench, 4k random writes QD8 at a fixed rate that both
  daemons sustain, --rate-iops; 0 writes as fast as each daemon completes,
  which is a heavier load on the faster one); convergence time (the command
  to BLOCK_JOB_READY), then the job stays in sync until the load ends. The
  client's write latency with the job, against a run of the same load with
  no job.

Each repetition starts a fresh daemon per peer and flips the peers' order.
Prints one JSON object: every run, medians and blkgraph/QSD ratios.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as c  # noqa: E402

SCENARIO = {"rw": "randwrite", "bs": 4096, "iodepth": 8, "queues": 1,
            "cache_direct": False, "aio": "io_uring"}


def cpu_s(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def wait_event(q, name, job, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = q.pull_event(wait=max(0.01, deadline - time.monotonic()))
        if ev and ev["event"] == name and ev["data"].get("device") == job:
            return ev
    raise c.Fatal(f"no {name} for {job} within {timeout} s")


def start(peer, binary, image, rundir):
    socket, pidfile, qmp = rundir / "vub.sock", rundir / "daemon.pid", rundir / "qmp.sock"
    qmp.unlink(missing_ok=True)
    c.warm_cache(image)
    args = c.daemon_args(image, socket, pidfile, SCENARIO) + [
        "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off", "--monitor", "chardev=m0"]
    d = c.Daemon(binary, args, rundir, pidfile, socket, peer)
    q = QEMUMonitorProtocol(str(qmp))
    q.connect()
    return d, q


def add_target(q, rundir, size):
    target = rundir / "target.raw"
    with open(target, "wb") as f:
        f.truncate(size)
    r = q.cmd_obj({"execute": "blockdev-add", "arguments": {
        "driver": "raw", "node-name": "tgt",
        "file": {"driver": "file", "filename": str(target)}}})
    if "error" in r:
        raise c.Fatal(f"blockdev-add: {r}")


def backup(peer, binary, image, rundir, size):
    d, q = start(peer, binary, image, rundir)
    try:
        add_target(q, rundir, size)
        cpu0, t0 = cpu_s(d.proc.pid), time.monotonic()
        r = q.cmd_obj({"execute": "blockdev-backup", "arguments": {
            "job-id": "b0", "device": "disk0", "target": "tgt", "sync": "full"}})
        if "error" in r:
            raise c.Fatal(f"blockdev-backup: {r}")
        ev = wait_event(q, "BLOCK_JOB_COMPLETED", "b0")
        seconds = time.monotonic() - t0
        if "error" in ev["data"]:
            raise c.Fatal(f"backup failed: {ev}")
        return {"seconds": round(seconds, 3), "bytes_per_s": size / seconds,
                "daemon_cpu_s": round(cpu_s(d.proc.pid) - cpu0, 3)}
    finally:
        q.close()
        d.stop()
        (rundir / "target.raw").unlink(missing_ok=True)


def mirror(peer, binary, bench, image, rundir, size, runtime, rate_iops, with_job):
    d, q = start(peer, binary, image, rundir)
    try:
        add_target(q, rundir, size)
        result = {}
        load = {}

        def run_load():
            sc = dict(SCENARIO, rate_iops=rate_iops)
            load["r"] = c.run_bench(bench, d.socket, d.proc.pid, sc, runtime, 0)

        t = threading.Thread(target=run_load)
        t.start()
        if with_job:
            time.sleep(min(1.0, runtime / 4))
            t0 = time.monotonic()
            r = q.cmd_obj({"execute": "blockdev-mirror", "arguments": {
                "job-id": "m0", "device": "disk0", "target": "tgt", "sync": "full"}})
            if "error" in r:
                raise c.Fatal(f"blockdev-mirror: {r}")
            wait_event(q, "BLOCK_JOB_READY", "m0", timeout=runtime * 4 + 60)
            result["converge_s"] = round(time.monotonic() - t0, 3)
        t.join()
        if with_job:
            q.cmd_obj({"execute": "block-job-cancel", "arguments": {"device": "m0"}})
            wait_event(q, "BLOCK_JOB_COMPLETED", "m0")
        r = load["r"]
        result.update(iops=r["iops"], lat_us=r["lat_us"])
        return result
    finally:
        q.close()
        d.stop()
        (rundir / "target.raw").unlink(missing_ok=True)


def median(runs, peer, kind, key):
    vals = [r["result"][key] for r in runs if r["peer"] == peer and r["kind"] == kind]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=c.size_arg, default=1024 * c.MIB)
    ap.add_argument("--runtime", type=float, default=10.0, help="mirror load seconds")
    ap.add_argument("--rate-iops", type=int, default=4000,
                    help="the mirror's guest load in writes per second (0: unlimited)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default="-")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    release = repo / "target" / "release"
    for b in ("blkgraph", "blkgraph-bench"):
        if not (release / b).exists():
            subprocess.run(["cargo", "build", "--release", "--bins"], cwd=repo, check=True)
    peers = {"blkgraph": release / "blkgraph", "qsd": "qemu-storage-daemon"}
    bench = release / "blkgraph-bench"
    runs = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rundir = Path(tmp)
        image = rundir / "disk.raw"
        c.make_image(image, args.image_size)
        for rep in range(args.repeat):
            order = list(peers) if rep % 2 == 0 else list(reversed(peers))
            for peer in order:
                c.log(f"rep {rep}: {peer} backup")
                r = backup(peer, peers[peer], image, rundir, args.image_size)
                runs.append({"peer": peer, "kind": "backup", "rep": rep, "result": r})
                for kind, with_job in (("load", False), ("mirror", True)):
                    c.log(f"rep {rep}: {peer} {kind}")
                    r = mirror(peer, peers[peer], bench, image, rundir, args.image_size,
                               args.runtime, args.rate_iops, with_job)
                    runs.append({"peer": peer, "kind": kind, "rep": rep, "result": r})
    med = {}
    for peer in peers:
        med[peer] = {
            "backup_mib_per_s": median(runs, peer, "backup", "bytes_per_s") / c.MIB,
            "backup_cpu_s": median(runs, peer, "backup", "daemon_cpu_s"),
            "mirror_converge_s": median(runs, peer, "mirror", "converge_s"),
            "load_iops_no_job": median(runs, peer, "load", "iops"),
            "load_iops_mirror": median(runs, peer, "mirror", "iops"),
            "lat_mean_us_no_job": statistics.median(
                r["result"]["lat_us"]["mean"] for r in runs
                if r["peer"] == peer and r["kind"] == "load"),
            "lat_mean_us_mirror": statistics.median(
                r["result"]["lat_us"]["mean"] for r in runs
                if r["peer"] == peer and r["kind"] == "mirror"),
            "lat_p99_us_no_job": statistics.median(
                r["result"]["lat_us"]["p99"] for r in runs
                if r["peer"] == peer and r["kind"] == "load"),
            "lat_p99_us_mirror": statistics.median(
                r["result"]["lat_us"]["p99"] for r in runs
                if r["peer"] == peer and r["kind"] == "mirror"),
        }
    b, q = med["blkgraph"], med["qsd"]
    out = {
        "machine": c.machine_info(),
        "scenario": dict(SCENARIO, image_bytes=args.image_size, load_runtime_s=args.runtime,
                         rate_iops=args.rate_iops),
        "runs": runs,
        "median": med,
        "ratios": {
            "backup_throughput_blkgraph_over_qsd": c.ratio(b["backup_mib_per_s"],
                                                           q["backup_mib_per_s"]),
            "mirror_converge_qsd_over_blkgraph": c.ratio(q["mirror_converge_s"],
                                                         b["mirror_converge_s"]),
        },
    }
    text = json.dumps(out, indent=1)
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except c.Fatal as e:
        print(f"jobs_compare: {e}", file=sys.stderr)
        sys.exit(1)
