#!/usr/bin/python3
"""A verifying random write load over NBD, many requests in flight (libnbd).

Runs with the system python (python3-libnbd). Writes blocks at random, each
with a pattern naming the block and its generation, mixes in reads of
blocks not being written and checks them against the model, and at the end
reads every block back and checks it. The disk must start as zeroes. Prints
"progress N" lines while it runs and one JSON summary line at the end:
{"writes": N, "reads": N, "errors": [...], "mismatches": [...]}.

    nbd_load.py URI --size 32M --bs 64k --qd 16 --ops 3000
"""

import argparse
import json
import random
import struct
import sys

import nbd


def size_arg(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if text[-1].lower() in units:
        return int(text[:-1]) * units[text[-1].lower()]
    return int(text)


def pattern(block: int, gen: int, bs: int) -> bytes:
    if gen == 0:
        return bytes(bs)
    return struct.pack(">QQ", block, gen) * (bs // 16)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("--size", type=size_arg, default=32 << 20)
    p.add_argument("--bs", type=size_arg, default=64 << 10)
    p.add_argument("--qd", type=int, default=16)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    blocks = args.size // args.bs
    gen = [0] * blocks
    unknown = set()  # blocks whose last write failed: old or new content
    busy = set()
    inflight = {}
    errors, mismatches = [], []
    writes = reads = issued = 0

    h = nbd.NBD()
    h.connect_uri(args.uri)

    def issue():
        nonlocal issued
        free = [b for b in (rng.randrange(blocks) for _ in range(8)) if b not in busy]
        if not free:
            return False
        b = free[0]
        busy.add(b)
        if rng.random() < 0.75:
            g = gen[b] + 1
            buf = nbd.Buffer.from_bytearray(bytearray(pattern(b, g, args.bs)))
            cookie = h.aio_pwrite(buf, b * args.bs)
            inflight[cookie] = ("w", b, g, buf)
        else:
            buf = nbd.Buffer(args.bs)
            cookie = h.aio_pread(buf, b * args.bs)
            inflight[cookie] = ("r", b, gen[b], buf)
        issued += 1
        return True

    last = 0
    while issued < args.ops or inflight:
        while issued < args.ops and len(inflight) < args.qd and issue():
            pass
        h.poll(-1)
        for cookie in list(inflight):
            kind, b, g, buf = inflight[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                errors.append(f"{kind} block {b}: {e}")
                if kind == "w":
                    unknown.add(b)
                    gen[b] = g
                del inflight[cookie]
                busy.discard(b)
                continue
            del inflight[cookie]
            busy.discard(b)
            if kind == "w":
                writes += 1
                gen[b] = g
                unknown.discard(b)
            else:
                reads += 1
                if b not in unknown and buf.to_bytearray() != pattern(b, g, args.bs):
                    mismatches.append(f"read of block {b} (gen {g}) during the load")
        done = writes + reads + len(errors)
        if done - last >= 100:
            last = done
            print(f"progress {done}", flush=True)

    for b in range(blocks):
        if b in unknown:
            continue
        data = h.pread(args.bs, b * args.bs)
        if data != pattern(b, gen[b], args.bs):
            mismatches.append(f"block {b} (gen {gen[b]}) at the end")
    h.shutdown()
    print(json.dumps({"writes": writes, "reads": reads, "errors": errors[:20], "mismatches": mismatches[:20]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
