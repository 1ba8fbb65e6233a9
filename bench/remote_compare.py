#!/usr/bin/env python3
"""Compare blkgraph's rbd and nbd drivers with qemu-storage-daemon's (QSD).

Same client (blkgraph-bench over vhost-user-blk), same backend storage, the
two daemons measured alternately (the order flips on every repetition):

  rbd-randread-qd32 / rbd-randwrite-qd32   4k, QD32, 1 queue, on an rbd image of
      a one-node Ceph cluster (tests/ceph/cluster.py: memstore OSD, 127.0.0.1)
  nbd-randread-qd32 / nbd-randwrite-qd32   4k, QD32, 1 queue, driver=nbd on a
      qemu-nbd server (unix socket) of a raw image in the run directory

The daemon's command line is `--blockdev <rbd or nbd> --blockdev raw
--export vhost-user-blk`. One JSON summary goes to stdout (medians per
scenario and peer, blkgraph/QSD ratios of IOPS, backend CPU per I/O and
backend context switches per I/O); progress to stderr. The CPU of the Ceph daemons or of qemu-nbd is not the
backend's and is not counted.

Environment: BLKGRAPH_BIN, QSD_BIN, BENCH_BIN as for compare.py.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ceph"))
import compare  # noqa: E402
import cluster  # noqa: E402

MIB = 1 << 20
SCENARIOS = {
    f"{kind}-{rw}-qd32": {"kind": kind, "rw": rw, "bs": 4096, "iodepth": 32, "queues": 1}
    for kind in ("rbd", "nbd")
    for rw in ("randread", "randwrite")
}


def daemon_args(node, socket, pidfile, export_extra=""):
    return [
        "--blockdev", node,
        "--blockdev", "driver=raw,node-name=disk0,file=n0",
        "--export",
        f"type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path={socket},"
        f"writable=on,num-queues=1,logical-block-size=512{export_extra}",
        "--pidfile", str(pidfile),
    ]  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--runtime", type=float, default=10.0)
    ap.add_argument("--ramp", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--image-size", type=compare.size_arg, default=256 * MIB)
    ap.add_argument("--workdir", type=Path, default=compare.REPO / "target")
    ap.add_argument("--skip-qsd", action="store_true")
    ap.add_argument("--skip-blkgraph", action="store_true")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--blkgraph-export", default="",
                    help="more export options for blkgraph only, e.g. x-poll-us=0")
    args = ap.parse_args()
    names = args.scenarios.split(",")
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"unknown scenario {n!r} (known: {', '.join(SCENARIOS)})")
    bench, peers = compare.find_binaries(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="blkgraph-remote-", dir=args.workdir))
    ceph = nbd_server = None
    summary = {
        "machine": compare.machine_info(),
        "client": {"binary": str(bench)},
        "peers": {p: {"binary": str(b), "version": compare.version_of(b)} for p, b in peers.items()},
        "runtime_s": args.runtime,
        "ramp_s": args.ramp,
        "repeat": args.repeat,
        "image_size": args.image_size,
        "blkgraph_export_extra": args.blkgraph_export,
    }
    nodes = {}
    try:
        data = rundir / "data.raw"
        compare.make_image(data, args.image_size)
        if any(SCENARIOS[n]["kind"] == "rbd" for n in names):
            if cluster.missing():
                raise compare.Fatal(f"Ceph is missing: {cluster.missing()}")
            compare.log("starting a one-node Ceph cluster")
            ceph = cluster.CephCluster(rundir / "ceph").start()
            ceph.import_(data, "bench")
            nodes["rbd"] = f"driver=rbd,node-name=n0,pool={ceph.pool},image=bench,conf={ceph.conf}"
        if any(SCENARIOS[n]["kind"] == "nbd" for n in names):
            sock = rundir / "qemu-nbd.sock"
            nbd_server = subprocess.Popen(
                ["qemu-nbd", "-f", "raw", "-x", "exp", "-k", str(sock), "--shared=4", "-t",
                 "--cache=writeback", "--aio=io_uring", str(data)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline or nbd_server.poll() is not None:
                    raise compare.Fatal("qemu-nbd did not start")
                time.sleep(0.05)
            nodes["nbd"] = f"driver=nbd,node-name=n0,server.type=unix,server.path={sock},export=exp"
        summary["nodes"] = nodes
        results = {}
        order = list(peers)
        for rep in range(args.repeat):
            rep_order = order if rep % 2 == 0 else order[::-1]
            for name in names:
                sc = SCENARIOS[name]
                for peer in rep_order:
                    socket, pidfile = rundir / "vub.sock", rundir / "daemon.pid"
                    extra = f",{args.blkgraph_export}" if peer == "blkgraph" and args.blkgraph_export else ""
                    d = compare.Daemon(peers[peer], daemon_args(nodes[sc["kind"]], socket, pidfile, extra),
                                       rundir, pidfile, socket, peer)  # fmt: skip
                    try:
                        r = compare.run_bench(bench, socket, d.proc.pid, sc, args.runtime, args.ramp)
                    finally:
                        d.stop()
                    compare.log(f"{name} {peer}: {r['iops']:.0f} IOPS, backend {r['backend_cpu_per_io_us']} us CPU/IO, "
                                f"{r.get('backend_ctxsw_per_io')} context switches/IO")
                    results.setdefault(name, []).append({"peer": peer, "rep": rep, "result": r})
        out = {}
        for name in names:
            entry = dict(SCENARIOS[name], runs=results.get(name, []))
            for peer in peers:
                entry[peer] = compare.median_summary([r["result"] for r in entry["runs"] if r["peer"] == peer])
            if "qsd" in peers and "blkgraph" in peers:
                b, q = entry["blkgraph"], entry["qsd"]
                entry["ratio_blkgraph_over_qsd"] = {
                    "iops": compare.ratio(b["iops"], q["iops"]),
                    "backend_cpu_per_io": compare.ratio(b["backend_cpu_per_io_us"], q["backend_cpu_per_io_us"]),
                    "backend_ctxsw_per_io": compare.ratio(b["backend_ctxsw_per_io"], q["backend_ctxsw_per_io"]),
                }
            out[name] = entry
        summary["scenarios"] = out
        summary["machine"]["loadavg_end"] = list(os.getloadavg())
    finally:
        if nbd_server is not None:
            nbd_server.kill()
            nbd_server.wait()
        if ceph is not None:
            ceph.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except compare.Fatal as e:
        print(f"remote_compare: {e}", file=sys.stderr)
        sys.exit(1)
