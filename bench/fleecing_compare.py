#!/usr/bin/env python3
"""Copy-before-write cost: blkgraph and qemu-storage-daemon side by side.

For each peer, 4k random writes (QD32, one queue, page-cached raw image)
are measured twice, on a fresh daemon each time: plain, and right after a
copy-before-write filter was inserted (so the first writes to every cluster
copy it to a temp image first). The same client (blkgraph-bench) drives both.

blkgraph inserts the filter above the export's root in one transaction.
qemu-storage-daemon 10.0 cannot change an export's root, so the filter goes
below the raw node with blockdev-reopen (the route the reference notes give).

Prints one JSON object: every run, medians, and the ratios
cbw/plain for each peer and blkgraph/QSD with the filter.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as c  # noqa: E402

SCENARIO = {"rw": "randwrite", "bs": 4096, "iodepth": 32, "queues": 1,
            "cache_direct": False, "aio": "io_uring"}


def ctl(binary, sock, *args):
    """Runs one QMP command with blkgraph-ctl (it speaks plain QMP to QSD too)."""
    p = subprocess.run([str(binary), "-s", str(sock), *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise c.Fatal(f"blkgraph-ctl {' '.join(args)}: {p.stderr.strip()}")


def insert_cbw(peer, ctl_bin, qmp, temp, size):
    with open(temp, "wb") as f:
        f.truncate(size)
    if peer == "blkgraph":
        actions = [
            {"type": "blockdev-add", "data": {"driver": "raw", "node-name": "tmp",
                                              "file": {"driver": "file", "filename": str(temp)}}},
            {"type": "blockdev-add", "data": {"driver": "copy-before-write", "node-name": "cbw",
                                              "file": "disk0", "target": "tmp"}},
            {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "vub0",
                                                    "new-child": "cbw"}},
        ]
        ctl(ctl_bin, qmp, "transaction", json.dumps({"actions": actions}))
    else:
        ctl(ctl_bin, qmp, "blockdev-add", json.dumps(
            {"driver": "raw", "node-name": "tmp",
             "file": {"driver": "file", "filename": str(temp)}}))
        ctl(ctl_bin, qmp, "blockdev-add", json.dumps(
            {"driver": "copy-before-write", "node-name": "cbw", "file": "f0", "target": "tmp"}))
        ctl(ctl_bin, qmp, "blockdev-reopen", json.dumps(
            {"options": [{"driver": "raw", "node-name": "disk0", "file": "cbw"}]}))


def measure(peer, binary, ctl_bin, bench, image, rundir, mode, runtime, size):
    socket, pidfile, qmp = rundir / "vub.sock", rundir / "daemon.pid", rundir / "qmp.sock"
    qmp.unlink(missing_ok=True)
    c.warm_cache(image)
    args = c.daemon_args(image, socket, pidfile, SCENARIO) + [
        "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off", "--monitor", "chardev=m0"]
    d = c.Daemon(binary, args, rundir, pidfile, socket, peer)
    try:
        if mode == "cbw":
            insert_cbw(peer, ctl_bin, qmp, rundir / "temp.raw", size)
        return c.run_bench(bench, socket, d.proc.pid, SCENARIO, runtime, 0)
    finally:
        d.stop()
        (rundir / "temp.raw").unlink(missing_ok=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--image-size", type=c.size_arg, default=512 * c.MIB)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default="-")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    release = repo / "target" / "release"
    for b in ("blkgraph", "blkgraph-ctl", "blkgraph-bench"):
        if not (release / b).exists():
            subprocess.run(["cargo", "build", "--release", "--bins"], cwd=repo, check=True)
    peers = {"blkgraph": release / "blkgraph", "qsd": "qemu-storage-daemon"}
    import tempfile
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rundir = Path(tmp)
        image = rundir / "disk.raw"
        c.make_image(image, args.image_size)
        runs = []
        for rep in range(args.repeat):
            order = list(peers) if rep % 2 == 0 else list(reversed(peers))
            for peer in order:
                for mode in ("plain", "cbw"):
                    c.log(f"rep {rep}: {peer} {mode}")
                    r = measure(peer, peers[peer], release / "blkgraph-ctl",
                                release / "blkgraph-bench", image, rundir, mode,
                                args.runtime, args.image_size)
                    runs.append({"peer": peer, "mode": mode, "rep": rep, "result": r})
        med = {}
        for peer in peers:
            for mode in ("plain", "cbw"):
                iops = [r["result"]["iops"] for r in runs if r["peer"] == peer and r["mode"] == mode]
                med[f"{peer}_{mode}_iops"] = statistics.median(iops)
        out = {
            "machine": c.machine_info(),
            "scenario": dict(SCENARIO, runtime_s=args.runtime, image_bytes=args.image_size),
            "runs": runs,
            "median": med,
            "ratios": {
                "blkgraph_cbw_over_plain": round(med["blkgraph_cbw_iops"] / med["blkgraph_plain_iops"], 3),
                "qsd_cbw_over_plain": round(med["qsd_cbw_iops"] / med["qsd_plain_iops"], 3),
                "blkgraph_cbw_over_qsd_cbw": round(med["blkgraph_cbw_iops"] / med["qsd_cbw_iops"], 3),
            },
        }
    text = json.dumps(out, indent=1)
    if args.output == "-":
        print(text)
    else:
        Path(args.output).write_text(text + "\n")
        print(json.dumps(out["ratios"]))


if __name__ == "__main__":
    try:
        main()
    except c.Fatal as e:
        print(f"fleecing_compare: {e}", file=sys.stderr)
        sys.exit(1)
