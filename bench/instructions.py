#!/usr/bin/env python3
"""Instructions per request on blkgraph's vhost-user-blk request path.

Each binary given is started under valgrind's callgrind on a null-co node
(no data I/O) with ring polling off (x-poll-us=0, so no instruction is spent
waiting), and blkgraph-bench drives 4k random reads at QD32 for the run
time. Under callgrind the daemon is bound by its own instructions, so the
count divided by the requests served is the user-space cost of one request
(parsing the chain, the graph, the executor, the used ring, statistics),
whatever the load of the machine: a difference of a few percent between two
builds is real, where IOPS on a shared machine vary by ten. The kernel's
part (the page-cache copy, io_uring) is not counted: compare.py measures
the whole.

One JSON object goes to stdout: per binary, the requests, the instructions
and their ratio, and the functions with the most instructions of their own
per request (from callgrind_annotate). Progress goes to stderr.

Needs valgrind (callgrind_annotate comes with it). Environment: BENCH_BIN as
for compare.py.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

SCENARIO = {"rw": "randread", "bs": 4096, "queues": 1}


def top_functions(out_file, requests, count):
    """The `count` functions with the most own instructions, per request."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--auto=no", str(out_file)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    # The table after the "file:function" header, up to its blank line.
    table = text.split("file:function", 1)[-1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(?:.*?):(.+?)(?: \[.*\])?$", line)
        if m:
            rows.append((int(m.group(1).replace(",", "")), m.group(2)))
    rows.sort(reverse=True)
    return [{"function": f, "per_request": round(n / requests, 1)} for n, f in rows[:count]]


def measure(binary, bench, runtime, iodepth, top):
    with tempfile.TemporaryDirectory(prefix="blkgraph-instr-") as d:
        d = Path(d)
        socket, pidfile, out = d / "vub.sock", d / "daemon.pid", d / "callgrind.out"
        args = [
            "--tool=callgrind", f"--callgrind-out-file={out}", str(binary),
            "--blockdev", "driver=null-co,node-name=disk0,size=1073741824",
            "--export",
            f"type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,"
            f"addr.path={compare.qemu_escape(socket)},writable=on,num-queues=1,"
            "logical-block-size=512,x-poll-us=0",
            "--pidfile", str(pidfile),
        ]  # fmt: skip
        # valgrind runs the daemon in its own process: the pidfile names it.
        daemon = compare.Daemon("valgrind", args, d, pidfile, socket, "callgrind")
        try:
            sc = dict(SCENARIO, iodepth=iodepth)
            result = compare.run_bench(bench, socket, daemon.proc.pid, sc, runtime, 0)
        finally:
            daemon.stop()
        requests = result["ios"]
        instructions = None
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith("summary:") or line.startswith("totals:"):
                instructions = int(line.split()[1])
        if not instructions or not requests:
            raise compare.Fatal(f"no count for {binary}")
        return {
            "binary": str(binary),
            "requests": requests,
            "instructions": instructions,
            "instructions_per_request": round(instructions / requests, 1),
            "top_functions": top_functions(out, requests, top),
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="*", type=Path,
                    help="blkgraph binaries to measure (default target/release/blkgraph)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds of load per binary")
    ap.add_argument("--iodepth", type=int, default=32)
    ap.add_argument("--top", type=int, default=15, help="functions listed per binary")
    ap.add_argument("--output", type=Path, help="also write the JSON summary here")
    args = ap.parse_args()
    binaries = args.binaries or [compare.REPO / "target/release/blkgraph"]
    bench = Path(os.environ.get("BENCH_BIN", compare.REPO / "target/release/blkgraph-bench"))
    if not bench.exists():
        raise compare.Fatal(f"{bench} is missing: cargo build --release -p blkgraph-bench")
    results = []
    for b in binaries:
        compare.log(f"{b}: {args.runtime} s under callgrind")
        r = measure(b, bench, args.runtime, args.iodepth, args.top)
        compare.log(f"  {r['requests']} requests, {r['instructions_per_request']} instructions each")
        results.append(r)
    summary = {"runtime_s": args.runtime, "iodepth": args.iodepth, "results": results}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except compare.Fatal as e:
        print(f"instructions.py: {e}", file=sys.stderr)
        sys.exit(1)
