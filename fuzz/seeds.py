#!/usr/bin/env python3
"""Write the hand-made seed inputs of the fuzz targets.

The seeds are real inputs: the `--blockdev` strings of README.md, docs/ and
the tests, their QMP `blockdev-add` forms, and QMP transcripts like those of
tests/python/test_qmp.py (good clients and the misbehaving ones). The
committed corpora (fuzz/corpus/<target>/) started from these and were
minimised with libFuzzer's -merge=1 (`fuzz/run.py merge`).

    python3 fuzz/seeds.py DIR      # writes DIR/<target>/* for every target

virtio_blk seeds are guest queues in the harness's layout (fuzz/src/virtio_blk.rs),
nbd seeds client byte streams (newstyle handshakes, then requests), and
qmp_commands seeds command sequences as one JSON object per line.
"""

import json
import struct
import sys
from pathlib import Path

# --blockdev arguments: key=value, as on the command line.
BLOCKDEV_ARGS = [
    "driver=file,node-name=f0,filename=disk.raw,cache.direct=on,aio=io_uring,discard=unmap",
    "driver=file,node-name=f0,filename=/t/a,,b.raw,cache.direct=off,aio=io_uring,discard=unmap",
    "driver=file,node-name=f0,filename=x.raw,aio=threads,locking=off,read-only=on,aio-max-batch=8",
    "driver=file,node-name=f0,filename=x,aio=native,cache.no-flush=on,auto-read-only=on,force-share=on",
    "driver=raw,node-name=disk0,file=null0,discard=unmap",
    "driver=raw,node-name=disk0,file.driver=file,file.filename=disk.raw,offset=4096,size=64k",
    "driver=raw,node-name=top,file.driver=null-co,file.size=8M,detect-zeroes=off",
    "driver=null-co,node-name=n0,size=1M",
    "driver=null-co,node-name=n0,size=8M,read-zeroes=on",
    "driver=throttle,node-name=slow,file=null0,limits.iops-total=20",
    "driver=throttle,node-name=thr0,file=null0,throttle-group=tg0",
    "driver=throttle,node-name=thr1,file=null0,limits.bps-read=1G,limits.iops-write=100",
    "driver=copy-before-write,node-name=cbw,file=null0,target=tgt0",
    "driver=copy-before-write,node-name=cbw,file=null0,target=tgt0,on-cbw-error=break-snapshot,cbw-timeout=60",
    "driver=copy-before-write,node-name=cbw,file=null0,target=tgt0,bitmap.node=null0,bitmap.name=bm0,min-cluster-size=128k",
    "driver=copy-before-write,node-name=big,file.driver=null-co,file.size=64G,target.driver=null-co,target.size=64G",
    "driver=snapshot-access,node-name=acc,file=cbw0",
    "driver=snapshot-access,node-name=acc,file.driver=copy-before-write,file.file=null0,file.target=tgt0",
    "driver=qcow2,node-name=q0,file.driver=file,file.filename=disk.qcow2,lazy-refcounts=on",
    "driver=qcow2,node-name=q0,file=null0,backing=null1,read-only=on",
    "driver=nbd,node-name=nb0,server.type=unix,server.path=/tmp/nbd.sock,export=exp,open-timeout=5",
    "driver=nbd,node-name=nb0,server.type=inet,server.host=localhost,server.port=10809,reconnect-delay=2",
    "driver=rbd,node-name=r0,pool=rbd,image=vm0,conf=/etc/ceph/ceph.conf,user=admin",
]

# blockdev-add arguments: JSON, as QMP sends them (and --blockdev '{...}').
BLOCKDEV_JSON = [
    {"driver": "null-co", "node-name": "null9", "size": 1 << 30, "read-zeroes": True},
    {"driver": "file", "node-name": "f1", "filename": "vm1.raw", "cache": {"direct": True}},
    {"driver": "raw", "node-name": "d1", "file": {"driver": "file", "filename": "x.raw"}},
    {"driver": "throttle", "node-name": "thr0", "file": "null0", "throttle-group": "tg0"},
    {"driver": "throttle", "node-name": "thr1", "file": "null1", "limits": {"bps-total": 1 << 30}},
    {
        "driver": "copy-before-write",
        "node-name": "cbw",
        "file": "null0",
        "target": {"driver": "null-co", "size": 1 << 21},
        "bitmap": {"node": "null0", "name": "bm0"},
        "on-cbw-error": "break-guest-write",
    },
    {"driver": "snapshot-access", "node-name": "acc", "file": "cbw0", "read-only": True},
    {"driver": "raw", "node-name": "w", "file": "null0", "offset": 512, "size": 1024},
    {"driver": "qcow2", "node-name": "q1", "file": {"driver": "file", "filename": "a.qcow2"}, "data-file": "null0"},
    {"driver": "nbd", "node-name": "nb1", "server": {"type": "unix", "path": "/tmp/nbd.sock"}, "export": "exp"},
    {"driver": "rbd", "node-name": "r1", "pool": "rbd", "image": "vm1", "snapshot": "s", "read-only": True},
]


def qmp(execute, arguments=None, id_=None) -> bytes:
    msg = {"execute": execute}
    if arguments is not None:
        msg["arguments"] = arguments
    if id_ is not None:
        msg["id"] = id_
    return json.dumps(msg).encode() + b"\n"


NEGOTIATE = qmp("qmp_capabilities")

# QMP client transcripts: what a client writes on the socket.
QMP_STREAMS = {
    "session": NEGOTIATE
    + qmp("query-version")
    + qmp("query-commands", id_=1)
    + qmp("qmp_capabilities")
    + qmp("no-such-command", id_="x"),
    "blockdev-add": NEGOTIATE + qmp("blockdev-add", BLOCKDEV_JSON[0]),
    "transaction": NEGOTIATE
    + qmp(
        "transaction",
        {
            "actions": [
                {"type": "blockdev-add", "data": BLOCKDEV_JSON[3]},
                {
                    "type": "x-blockdev-replace",
                    "data": {"parent-type": "export", "export-id": "vub0", "new-child": "thr0"},
                },
            ],
            "properties": {"completion-mode": "grouped"},
        },
    ),
    "objects-and-bitmaps": NEGOTIATE
    + qmp("object-add", {"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 2000}})
    + qmp("object-del", {"id": "tg0"})
    + qmp("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 65536})
    + qmp("block-export-del", {"id": "vub0", "mode": "hard"})
    + qmp("blockdev-del", {"node-name": "thr0"})
    + qmp("query-named-block-nodes", {"flat": True})
    + qmp("quit"),
    "negotiation-args": qmp("qmp_capabilities", {"enable": ["oob"]})
    + qmp("qmp_capabilities", {"enable": []}, id_="n"),
    "bad-clients": NEGOTIATE
    + b'{"execute": nope}\n'
    + b'[{"execute": "query-version"}]\n'
    + b'{"arguments": {}, "id": 1}\n'
    + b'{"execute": ["blockdev-del"], "id": 1}\n'
    + b'{"execute": "query-version", "id": 4, "x": 1}\n'
    + b'{"execute": "query-version", "id": "\xff\xff\xfe"}\n'
    + b"[[[[[[[[[[\n",
    "before-negotiation": qmp("blockdev-add", {"driver": "null-co", "node-name": "early0"}, 1)
    + NEGOTIATE,
    "unterminated": NEGOTIATE
    + b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "half0", "si',
    "wire-format": NEGOTIATE
    + json.dumps({"execute": "x-echo", "arguments": {"s": "\u00e9\u2603\U0001f600"}, "id": [1, {"a": True}]}, ensure_ascii=False).encode()
    + b"\n"
    + qmp("query-version", id_={"k": 1.5e300})
    + qmp("x-echo", {"n": -0.0, "big": 18446744073709551615, "neg": -9223372036854775808}, None)
    + b'{"execute":\n "query-version",\n "id": "split"}\n'
    + b'{"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2}\n'
    + b'{"execute": "x-echo", "arguments": {"esc": "\\u0000\\ud83d\\ude00\\"\\\\\\/\\b\\f\\n\\r\\t"}}\r\n'
    + b"\x01\n"
    + qmp("query-version"),
    # 0xFF ends a read: the same commands arriving in pieces.
    "split-reads": NEGOTIATE[:5]
    + b"\xff"
    + NEGOTIATE[5:]
    + b'{"execute": "query-ver\xffsion", "id": 12\xff3}\xff\n',
    "too-large": NEGOTIATE + qmp("x-echo", {"x": "A" * 1100}) + qmp("query-version"),
}

# The seeds of the protocol targets, by target: each section adds its own.
SEEDS = {}


# qmp_commands: command sequences, one per line.
def lines(*commands) -> bytes:
    return b"".join(qmp(c, a) for c, a in commands)


VUB_ADDR = {"type": "unix", "path": "/tmp/vub.sock"}
QMP_COMMANDS = {
    "queries": lines(("query-version", None), ("query-named-block-nodes", {"flat": True}),
                     ("x-debug-query-block-graph", None), ("query-block-exports", None)),
    "blockdev": b"".join(qmp("blockdev-add", a) for a in BLOCKDEV_JSON)
    + lines(("blockdev-del", {"node-name": "w"}), ("blockdev-del", {"node-name": "null0"}),
            ("blockdev-del", {"node-name": "nope"})),
    "replace": lines(("blockdev-add", BLOCKDEV_JSON[3]),
                     ("x-blockdev-replace", {"parent-type": "driver", "node-name": "thr0", "child": "file", "new-child": "null1"}),
                     ("x-blockdev-replace", {"parent-type": "export", "export-id": "e0", "new-child": "null1"})),
    "bitmaps": lines(
        ("block-dirty-bitmap-add", {"node": "null1", "name": "b1", "granularity": 65536}),
        ("block-dirty-bitmap-add", {"node": "null1", "name": "b2", "disabled": True}),
        ("block-dirty-bitmap-merge", {"node": "null1", "target": "b1", "bitmaps": ["b2", {"node": "null0", "name": "bm0"}]}),
        ("block-dirty-bitmap-clear", {"node": "null0", "name": "bm0"}),
        ("block-dirty-bitmap-enable", {"node": "null1", "name": "b2"}),
        ("block-dirty-bitmap-disable", {"node": "null1", "name": "b1"}),
        ("block-dirty-bitmap-remove", {"node": "null1", "name": "b1"}),
        ("block-dirty-bitmap-add", {"node": "null1", "name": "p", "persistent": True}),
    ),
    "transaction": lines(("transaction", {
        "actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "null1", "name": "t1"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "null0", "name": "bm0"}},
            {"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "t2", "size": 4096}},
            {"type": "blockdev-del", "data": {"node-name": "nope"}},
        ],
        "properties": {"completion-mode": "grouped"},
    })),
    "exports": lines(
        ("block-export-add", {"type": "vhost-user-blk", "id": "vub0", "node-name": "null0", "addr": VUB_ADDR, "writable": True, "num-queues": 2}),
        ("block-export-add", {"type": "vhost-user-blk", "id": "vub1", "node-name": "null1", "addr": {"type": "fd", "str": "myfd"}}),
        ("query-block-exports", None),
        ("x-blockdev-replace", {"parent-type": "export", "export-id": "vub0", "new-child": "null1"}),
        ("blockdev-del", {"node-name": "null0"}),
        ("block-export-del", {"id": "vub0"}),
    ),
    "nbd": lines(
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}, "max-connections": 4}),
        ("block-export-add", {"type": "nbd", "id": "n0", "node-name": "null0", "name": "exp", "bitmaps": ["bm0"], "allocation-depth": True}),
        ("nbd-server-start", {"addr": {"type": "inet", "host": "localhost", "port": "10809"}}),
        ("block-export-del", {"id": "n0", "mode": "hard"}),
        ("nbd-server-stop", None),
        ("nbd-server-stop", None),
    ),
    "objects": lines(
        ("object-add", {"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total": 100, "bps-read": 1 << 20}}),
        ("object-add", {"qom-type": "throttle-group", "id": "tg0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "t", "file": "null0", "throttle-group": "tg1"}),
        ("object-del", {"id": "tg1"}),
        ("object-del", {"id": "tg0"}),
        ("object-add", {"qom-type": "memory-backend-ram", "id": "m"}),
    ),
    "jobs": lines(
        ("blockdev-add", {"driver": "null-co", "node-name": "t1", "size": 1 << 20}),
        ("blockdev-backup", {"device": "null1", "target": "t1", "sync": "full", "job-id": "j0",
                             "auto-finalize": False, "auto-dismiss": False}),
        ("query-jobs", None),
        ("job-pause", {"id": "j0"}),
        ("block-job-set-speed", {"device": "j0", "speed": 1 << 20}),
        ("job-resume", {"id": "j0"}),
        ("query-block-jobs", None),
        ("job-finalize", {"id": "j0"}),
        ("job-dismiss", {"id": "j0"}),
        ("blockdev-backup", {"device": "null0", "target": "t1", "sync": "bitmap", "bitmap": "bm0",
                             "bitmap-mode": "on-success", "on-target-error": "stop"}),
        ("block-job-cancel", {"device": "null0", "force": True}),
    ),
    "job-transaction": lines(
        ("blockdev-add", {"driver": "null-co", "node-name": "t3", "size": 1 << 20}),
        ("blockdev-add", {"driver": "null-co", "node-name": "t4", "size": 1 << 20}),
        ("transaction", {
            "actions": [
                {"type": "blockdev-backup", "data": {"device": "null1", "target": "t3", "sync": "none",
                                                     "job-id": "fleece", "filter-node-name": "f0"}},
                {"type": "blockdev-backup", "data": {"device": "null0", "target": "t4", "sync": "full",
                                                     "job-id": "b2", "speed": 4096}},
            ],
            "properties": {"completion-mode": "grouped"},
        }), ("x-debug-query-block-graph", None), ("block-job-cancel", {"device": "fleece"}),
        ("job-cancel", {"id": "b2"}), ("job-dismiss", {"id": "b2"})),
    "resize": lines(
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "x.raw"}}),
        ("block_resize", {"node-name": "r0", "size": 4 << 20}),
        ("block_resize", {"node-name": "null0", "size": 1 << 40}),
        ("block_resize", {"device": "null1", "size": 512}),
        ("block_resize", {"node-name": "cbw0", "size": -1}),
    ),
    "nbd-client": lines(
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}}),
        ("block-export-add", {"type": "nbd", "id": "n1", "node-name": "null1", "name": "exp"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "nb", "server": {"type": "unix", "path": "/tmp/nbd.sock"},
                          "export": "exp", "read-only": True}),
        ("blockdev-add", {"driver": "null-co", "node-name": "t1", "size": 1 << 20}),
        ("blockdev-backup", {"device": "nb", "target": "t1", "sync": "full", "job-id": "j1"}),
        ("blockdev-del", {"node-name": "nb"}),
    ),
    "create-and-snapshot": lines(
        ("blockdev-create", {"job-id": "c0", "options": {"driver": "file", "filename": "ovl.qcow2", "size": 0}}),
        ("job-dismiss", {"id": "c0"}),
        ("blockdev-add", {"driver": "file", "filename": "ovl.qcow2", "node-name": "ovl-file"}),
        ("blockdev-create", {"job-id": "c1", "options": {"driver": "qcow2", "file": "ovl-file", "size": 1 << 20,
                                                         "backing-file": "base.raw", "backing-fmt": "raw",
                                                         "cluster-size": 4096, "lazy-refcounts": True}}),
        ("job-dismiss", {"id": "c1"}),
        ("blockdev-add", {"driver": "qcow2", "file": "ovl-file", "backing": None, "node-name": "ovl"}),
        ("blockdev-snapshot", {"node": "null0", "overlay": "ovl"}),
        ("query-named-block-nodes", None),
        ("block-stream", {"device": "ovl", "job-id": "s0"}),
        ("blockdev-snapshot-sync", {"node-name": "null1", "snapshot-file": "sync.qcow2",
                                    "snapshot-node-name": "snap0", "format": "qcow2"}),
    ),
    "mirror": lines(
        ("blockdev-add", {"driver": "null-co", "node-name": "m1", "size": 1 << 20}),
        ("blockdev-mirror", {"job-id": "m0", "device": "null0", "target": "m1", "sync": "full",
                             "copy-mode": "write-blocking", "filter-node-name": "mirror-top"}),
        ("query-block-jobs", None),
        ("job-complete", {"id": "m0"}),
        ("block-job-cancel", {"device": "m0"}),
    ),
    "stats-threshold-iothread": lines(
        ("object-add", {"qom-type": "iothread", "id": "io0", "poll-max-ns": 32768}),
        ("block-export-add", {"type": "vhost-user-blk", "id": "v0", "node-name": "null0", "addr": VUB_ADDR,
                              "iothread": "io0"}),
        ("query-blockstats", {"query-nodes": True}),
        ("block-latency-histogram-set", {"id": "v0", "boundaries": [10, 100, 1000]}),
        ("block-set-write-threshold", {"node-name": "null0", "write-threshold": 4096}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}}),
        ("nbd-server-add", {"device": "null1", "name": "n1"}),
        ("nbd-server-remove", {"name": "n1", "mode": "hard"}),
        ("object-del", {"id": "io0"}),
    ),
    "commit": lines(
        ("blockdev-create", {"job-id": "c0", "options": {"driver": "file", "filename": "ovl.qcow2", "size": 0}}),
        ("blockdev-add", {"driver": "file", "filename": "ovl.qcow2", "node-name": "ovl-file"}),
        ("blockdev-create", {"job-id": "c1", "options": {"driver": "qcow2", "file": "ovl-file", "size": 1 << 20}}),
        ("blockdev-add", {"driver": "qcow2", "file": "ovl-file", "backing": "null0", "node-name": "ovl"}),
        ("block-commit", {"job-id": "k0", "device": "ovl", "top-node": "ovl", "base-node": "null0"}),
        ("query-block-jobs", None),
        ("job-complete", {"id": "k0"}),
    ),
    "block-job-verbs": lines(
        ("blockdev-add", {"driver": "null-co", "node-name": "t5", "size": 1 << 20}),
        ("blockdev-add", {"driver": "null-co", "node-name": "t6", "size": 1 << 20}),
        ("blockdev-add", {"driver": "null-co", "node-name": "t7", "size": 1 << 20}),
        ("blockdev-backup", {"device": "null0", "target": "t6", "sync": "full", "job-id": "j6",
                             "auto-finalize": False, "auto-dismiss": False}),
        ("block-job-finalize", {"id": "j6"}),
        ("block-job-dismiss", {"id": "j6"}),
        ("blockdev-mirror", {"job-id": "m5", "device": "null0", "target": "t7", "sync": "full"}),
        ("block-job-complete", {"device": "m5"}),
        ("blockdev-backup", {"device": "null1", "target": "t5", "sync": "full", "job-id": "j5",
                             "speed": 4096}),
        ("block-job-pause", {"device": "j5"}),
        ("block-job-resume", {"device": "j5"}),
        ("block-job-cancel", {"device": "j5", "force": True}),
        ("query-qmp-schema", None),
    ),
    "reopen": lines(
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "null1"}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "null1",
                                          "read-only": True}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "null1",
                                          "detect-zeroes": "on"}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "null0"}]}),
        ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "null1", "size": 4096}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "nope", "file": "null1"}]}),
        ("blockdev-reopen", {"options": []}),
    ),
    "bad-arguments": lines(("blockdev-del", {"node-name": 1}), ("query-version", {"x": 1}),
                           ("block-export-del", {"id": "x", "mode": "soft"}), ("quit", None),
                           ("no-such-command", {}), ("transaction", {"actions": [{"type": "quit", "data": {}}]})),
}

SEEDS["qmp_commands"] = QMP_COMMANDS


# virtio_blk: the harness's guest memory layout.
VQ_DATA = 0x3000
VQ_REGION1 = 0x20000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def vq(chains, config=4 | (0 << 5), capacity=2, data=None, size_log2=4) -> bytes:
    """A virtio_blk input: `chains` is a list of (head, descriptors) where
    descriptors are (index, addr, len, flags, next); `data` maps guest
    addresses (from VQ_DATA on) to bytes."""
    size = 1 << size_log2
    config = (config & ~7) | size_log2
    table = bytearray(16 * size)
    heads = []
    for head, descs in chains:
        heads.append(head)
        for index, addr, length, flags, nxt in descs:
            struct.pack_into("<QIHH", table, 16 * index, addr, length, flags, nxt)
    avail = b"".join(struct.pack("<H", h) for h in heads).ljust(2 * size, b"\0")
    memory = bytearray()
    for addr, blob in sorted((data or {}).items()):
        if addr >= VQ_REGION1:
            # The second region follows the first region's data.
            offset = 0x10000 - VQ_DATA + (addr - VQ_REGION1)
        else:
            offset = addr - VQ_DATA
        if len(memory) < offset + len(blob):
            memory.extend(b"\xa5" * (offset + len(blob) - len(memory)))
        memory[offset : offset + len(blob)] = blob
    return bytes([config, capacity, len(heads)]) + avail + bytes(table) + bytes(memory)


def blk_header(kind, sector=0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def simple_chain(kind, data_len=512, sector=0, writable_data=None, head=0, extra=b""):
    """header (readable), data, status (writable)."""
    descs = [(head, 0x3000 + 0x100 * head, 16 + len(extra), F_NEXT, head + 1)]
    if writable_data is None:
        writable_data = kind in (T_IN, T_GET_ID)
    if data_len:
        flags = F_NEXT | (F_WRITE if writable_data else 0)
        descs.append((head + 1, 0x8000, data_len, flags, head + 2))
        descs.append((head + 2, 0x3f00, 1, F_WRITE, 0))
    else:
        descs.append((head + 1, 0x3f00, 1, F_WRITE, 0))
    return (head, descs), {0x3000 + 0x100 * head: blk_header(kind, sector) + extra}


def virtio_blk_seeds():
    seeds = {}
    for name, kind, n, extra in [
        ("read", T_IN, 4096, b""),
        ("write", T_OUT, 4096, b""),
        ("flush", T_FLUSH, 0, b""),
        ("get-id", T_GET_ID, 20, b""),
        ("discard", T_DISCARD, 0, struct.pack("<QII", 8, 8, 0)),
        ("write-zeroes", T_WRITE_ZEROES, 0, struct.pack("<QII", 0, 16, 1)),
        ("unsupported", 99, 0, b""),
        ("read-past-end", T_IN, 512, b""),
    ]:
        chain, data = simple_chain(kind, n, sector=2048 if name == "read-past-end" else 1, extra=extra)
        seeds[name] = vq([chain], data=data)
    # Several chains at once, the used ring must see each.
    chains, data = [], {}
    for i, kind in enumerate([T_IN, T_OUT, T_FLUSH]):
        chain, d = simple_chain(kind, 512 if kind != T_FLUSH else 0, head=3 * i)
        chains.append(chain)
        data.update(d)
    seeds["three"] = vq(chains, data=data)
    # An indirect table at 0x6000 with header, data and status.
    table = struct.pack("<QIHH", 0x3000, 16, F_NEXT, 1)
    table += struct.pack("<QIHH", 0x20000, 8192, F_NEXT | F_WRITE, 2)
    table += struct.pack("<QIHH", 0x3f00, 1, F_WRITE, 0)
    seeds["indirect"] = vq(
        [(0, [(0, 0x6000, len(table), F_INDIRECT, 0)])],
        data={0x3000: blk_header(T_IN, 4), 0x6000: table},
    )
    # Data across the two regions, and into the hole between them.
    seeds["across-regions"] = vq(
        [(0, [(0, 0x3000, 16, F_NEXT, 1), (1, 0xf000, 0x2000, F_NEXT, 2), (2, 0x20000, 1, F_WRITE, 0)])],
        data={0x3000: blk_header(T_OUT, 0)},
    )
    seeds["into-the-hole"] = vq(
        [(0, [(0, 0x3000, 16, F_NEXT, 1), (1, 0xff00, 0x200, F_NEXT | F_WRITE, 2), (2, 0x3f00, 1, F_WRITE, 0)])],
        data={0x3000: blk_header(T_IN, 0)},
    )
    # A loop, a header split over two descriptors, readable after writable.
    seeds["loop"] = vq([(0, [(0, 0x3000, 16, F_NEXT, 1), (1, 0x3f00, 1, F_WRITE | F_NEXT, 0)])],
                       data={0x3000: blk_header(T_IN, 0)})
    seeds["split-header"] = vq(
        [(0, [(0, 0x3000, 4, F_NEXT, 1), (1, 0x3004, 12, F_NEXT, 2), (2, 0x3f00, 1, F_WRITE, 0)])],
        data={0x3000: blk_header(T_FLUSH, 0)},
    )
    seeds["readable-after-writable"] = vq(
        [(0, [(0, 0x3000, 16, F_NEXT, 1), (1, 0x3f00, 1, F_WRITE | F_NEXT, 2), (2, 0x8000, 512, 0, 0)])],
        data={0x3000: blk_header(T_OUT, 0)},
    )
    seeds["read-only-write"] = vq([simple_chain(T_OUT, 512)[0]], config=8,
                                  data=simple_chain(T_OUT, 512)[1])
    seeds["4k-blocks"] = vq([simple_chain(T_IN, 4096, sector=8)[0]], config=1 << 5,
                            data=simple_chain(T_IN, 4096, sector=8)[1])
    return seeds

SEEDS["virtio_blk"] = virtio_blk_seeds()


# nbd: client byte streams.
NBD_IHAVEOPT = 0x49484156454F5054
NBD_REQUEST = 0x25609513
(OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY,
 OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT) = (1, 2, 3, 6, 7, 8, 9, 10)
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)


def nbd_opt(option, data=b"") -> bytes:
    return struct.pack(">QII", NBD_IHAVEOPT, option, len(data)) + data


def nbd_name(name: bytes, infos=()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def nbd_meta(export: bytes, queries) -> bytes:
    body = struct.pack(">I", len(export)) + export + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def nbd_req(cmd, offset=0, length=0, flags=0, handle=1, payload=b"") -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST, flags, cmd, handle, offset, length) + payload


def nbd_seeds():
    flags = struct.pack(">I", 3)  # fixed newstyle, no zeroes
    queries = [b"base:allocation", b"qemu:dirty-bitmap:bm0", b"qemu:allocation-depth"]
    io = (
        nbd_req(CMD_WRITE, 4096, 512, payload=b"\x11" * 512)
        + nbd_req(CMD_READ, 0, 8192, handle=2)
        + nbd_req(CMD_WRITE_ZEROES, 8192, 4096, handle=3)
        + nbd_req(CMD_TRIM, 0, 4096, handle=4)
        + nbd_req(CMD_FLUSH, handle=5)
        + nbd_req(CMD_BLOCK_STATUS, 0, 1 << 20, handle=6)
        + nbd_req(CMD_CACHE, 0, 4096, handle=7)
        + nbd_req(CMD_READ, (1 << 20) - 512, 1024, handle=8)
        + nbd_req(CMD_DISC)
    )
    return {
        "list-info-abort": flags + nbd_opt(OPT_LIST) + nbd_opt(OPT_INFO, nbd_name(b"null", [0, 1, 2, 3]))
        + nbd_opt(OPT_INFO, nbd_name(b"nope")) + nbd_opt(OPT_ABORT),
        "go-simple": flags + nbd_opt(OPT_GO, nbd_name(b"disk", [3])) + io,
        "go-structured": flags + nbd_opt(OPT_STRUCTURED_REPLY)
        + nbd_opt(OPT_SET_META_CONTEXT, nbd_meta(b"disk", queries))
        + nbd_opt(OPT_GO, nbd_name(b"disk")) + io,
        "meta-null": flags + nbd_opt(OPT_STRUCTURED_REPLY)
        + nbd_opt(OPT_LIST_META_CONTEXT, nbd_meta(b"null", [b"qemu:"]))
        + nbd_opt(OPT_SET_META_CONTEXT, nbd_meta(b"null", queries))
        + nbd_opt(OPT_GO, nbd_name(b"null"))
        + nbd_req(CMD_BLOCK_STATUS, 0, 65536, flags=8) + nbd_req(CMD_WRITE, 0, 512, payload=b"x" * 512, handle=2),
        "export-name": struct.pack(">I", 1) + nbd_opt(OPT_EXPORT_NAME, b"disk") + nbd_req(CMD_READ, 0, 512) + nbd_req(CMD_DISC),
        "export-name-unknown": flags + nbd_opt(OPT_EXPORT_NAME, b"nope"),
        "bad-magic": flags + b"\0" * 16 + nbd_opt(OPT_LIST),
        "bad-request": flags + nbd_opt(OPT_GO, nbd_name(b"null")) + b"\x25\x60\x95\x14" + b"\0" * 24,
        "oversized": flags + nbd_opt(OPT_GO, nbd_name(b"disk")) + nbd_req(CMD_READ, 0, 64 << 20)
        + nbd_req(CMD_WRITE, 0, 33 << 20, handle=2),
        "unknown-option": flags + nbd_opt(99, b"abc") + nbd_opt(OPT_INFO, b"\xff" * 8),
    }

SEEDS["nbd"] = nbd_seeds()


# nbd_client: server byte streams, answering the harness's client
# (fuzz/src/nbd_client.rs): options, then requests with cookies 1, 2, ...
REP_MAGIC = 0x0003E889045565A9
REP_ACK, REP_INFO, REP_META_CONTEXT, REP_ERR_UNSUP = 1, 3, 4, (1 << 31) + 1
SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x67446698, 0x668E33EF
GREETING = b"NBDMAGIC" + struct.pack(">QH", NBD_IHAVEOPT, 3)
SEND_ALL = 1 | 4 | 8 | 32 | 64  # HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES


def rep(option, kind, data=b"") -> bytes:
    return struct.pack(">QIII", REP_MAGIC, option, kind, len(data)) + data


def go(size=8 << 20, flags=SEND_ALL, block_size=None) -> bytes:
    out = rep(OPT_GO, REP_INFO, struct.pack(">HQH", 0, size, flags))
    if block_size:
        out += rep(OPT_GO, REP_INFO, struct.pack(">HIII", 3, *block_size))
    return out + rep(OPT_GO, REP_ACK)


def chunk(cookie, kind, payload=b"", done=True) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, 1 if done else 0, kind, cookie, len(payload)) + payload


def simple(cookie, error=0, data=b"") -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie) + data


def nbd_client_seeds():
    structured = (
        GREETING
        + rep(OPT_STRUCTURED_REPLY, REP_ACK)
        + rep(OPT_SET_META_CONTEXT, REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
        + rep(OPT_SET_META_CONTEXT, REP_ACK)
    )
    replies = (
        chunk(1, 1, struct.pack(">Q", 0) + b"\x61" * 4096)
        + chunk(2, 2, struct.pack(">QI", 1 << 20, 4096), done=False)
        + chunk(2, 1, struct.pack(">Q", (1 << 20) + 4096) + b"\x63" * 16384, done=False)
        + chunk(2, 0)
        + chunk(3, 0)
        + chunk(4, 0)
        + chunk(5, 0)
        + chunk(6, 0)
        + chunk(7, 5, struct.pack(">III", 1, 65536, 3))
        + chunk(8, 1, struct.pack(">Q", 4 << 20) + b"\x62" * 512)
    )
    unstructured = GREETING + rep(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP)
    plain = b"".join(
        simple(c, data=bytes(n)) for c, n in [(1, 4096), (2, 20480), (3, 0), (4, 0), (5, 0), (6, 0), (7, 512)]
    )
    return {
        "structured": structured + go() + replies,
        "block-sizes": structured + go(block_size=(512, 4096, 32768)) + replies,
        "simple": unstructured + go(flags=1 | 4) + plain,
        "errors": structured + go() + chunk(1, (1 << 15) + 1, struct.pack(">IH", 5, 4) + b"oops")
        + simple(2, error=28) + chunk(3, (1 << 15) + 2, struct.pack(">IHQ", 22, 0, 8192)),
        "outside-the-read": structured + go() + chunk(1, 1, struct.pack(">Q", (1 << 64) - 8) + bytes(16)),
        "unknown-cookie": structured + go() + chunk(99, 0),
        "read-only": structured + go(flags=1 | 2),
        "export-refused": GREETING + rep(OPT_STRUCTURED_REPLY, REP_ACK) + rep(OPT_SET_META_CONTEXT, (1 << 31) + 6),
        "oversized-reply": GREETING + struct.pack(">QIII", REP_MAGIC, OPT_STRUCTURED_REPLY, REP_ACK, 1 << 20),
        "oldstyle": b"NBDMAGIC" + struct.pack(">QQ", 0x00420281861253, 1 << 20) + bytes(128),
    }

SEEDS["nbd_client"] = nbd_client_seeds()


# vhost_user: a frontend's messages (header: request, flags, size; LE).
def vu(request, payload=b"", flags=1) -> bytes:
    return struct.pack("<III", request, flags, len(payload)) + payload


def u64(*values) -> bytes:
    return b"".join(struct.pack("<Q", v) for v in values)


def u32(*values) -> bytes:
    return b"".join(struct.pack("<I", v) for v in values)


UADDR = 0x7F0000000000
VU_FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 9) | (1 << 6) | (1 << 11) | (1 << 13) | (1 << 14)
VU_HANDSHAKE = (
    vu(1)  # GET_FEATURES
    + vu(15)  # GET_PROTOCOL_FEATURES
    + vu(16, u64(0x1 | 0x2 | 0x8 | 0x200 | 0x8000 | 0x10000))  # SET_PROTOCOL_FEATURES
    + vu(17)  # GET_QUEUE_NUM
    + vu(36)  # GET_MAX_MEM_SLOTS
    + vu(3)  # SET_OWNER
    + vu(24, u32(0, 60, 0) + bytes(60))  # GET_CONFIG
    + vu(2, u64(VU_FEATURES))  # SET_FEATURES
)


def vu_queue(index, desc, avail, used) -> bytes:
    return (
        vu(8, u32(index, 16))  # SET_VRING_NUM
        + vu(9, u32(index, 0) + u64(UADDR + desc, UADDR + used, UADDR + avail, 0))  # SET_VRING_ADDR
        + vu(10, u32(index, 0))  # SET_VRING_BASE
        + vu(12, u64(index))  # SET_VRING_KICK
        + vu(13, u64(index))  # SET_VRING_CALL
        + vu(18, u32(index, 1))  # SET_VRING_ENABLE
    )


VHOST_USER = {
    "handshake": VU_HANDSHAKE,
    "memory-and-queues": VU_HANDSHAKE
    + vu(5, u32(1, 0) + u64(0, 1 << 20, UADDR, 0))  # SET_MEM_TABLE, one region
    + vu_queue(0, 0x10000, 0x11000, 0x12000)
    + vu_queue(1, 0x20000, 0x21000, 0x22000)
    + vu(11, u32(0, 0))  # GET_VRING_BASE: stop queue 0
    + vu(25, u32(0, 1, 0) + bytes([1])),  # SET_CONFIG: wce
    "mem-regions": VU_HANDSHAKE
    + vu(37, u64(0) + u64(0, 1 << 20, UADDR, 0))  # ADD_MEM_REG
    + vu(37, u64(0) + u64(1 << 20, 1 << 20, UADDR + (1 << 20), 0))
    + vu(38, u64(0) + u64(0, 1 << 20, UADDR, 0))  # REM_MEM_REG
    + vu(5, u32(2, 0) + u64(0, 1 << 40, UADDR, 0) + u64(1 << 40, 4096, 0, 1 << 30)),  # too large
    "inflight-and-log": VU_HANDSHAKE
    + vu(31, u64(0, 0) + struct.pack("<HH4x", 2, 16))  # GET_INFLIGHT_FD
    + vu(32, u64(1 << 20, 0) + struct.pack("<HH4x", 2, 16))  # SET_INFLIGHT_FD
    + vu(6, u64(4096, 0))  # SET_LOG_BASE
    + vu(7)  # SET_LOG_FD
    + vu(21)  # SET_BACKEND_REQ_FD
    + vu(14, u64(0)),  # SET_VRING_ERR
    "bad": vu(2, u64(VU_FEATURES), flags=0) + vu(99, b"x" * 8) + vu(1, b"\0" * 4) + vu(8, u32(7, 1 << 16))
    + struct.pack("<III", 5, 1, 1 << 20),
}

# Protocol features with INFLIGHT_SHMFD (0x1000) and BACKEND_REQ (0x20).
VU_PROTOCOL_ALL = 0x1 | 0x2 | 0x8 | 0x20 | 0x200 | 0x1000 | 0x8000 | 0x10000


def inflight_region(queues, size, marks, used_idx=0) -> bytes:
    """An inflight region of the layout fuzz/src/vhost_user.rs's harness
    passes back: per queue a 16-byte header, then 16 bytes per descriptor
    (inflight, padding, next, counter), each queue padded to 64 bytes."""
    out = b""
    for q in range(queues):
        region = struct.pack("<QHHHH", 0, 1, size, 0, used_idx)
        for head in range(size):
            counter = marks.get((q, head))
            region += struct.pack("<B5xHQ", counter is not None, 0, counter or 0)
        out += region + bytes(-len(region) % 64)
    return out


def inflight_seed(region) -> bytes:
    """A frontend that passes `region` back to a new backend and starts
    both queues; the region is the input's last 1 KiB (the harness's
    INFLIGHT_TAIL), after a header that ends the session."""
    messages = (
        vu(1) + vu(15) + vu(16, u64(VU_PROTOCOL_ALL)) + vu(3) + vu(2, u64(VU_FEATURES))
        + vu(21)  # SET_BACKEND_REQ_FD
        + vu(5, u32(1, 0) + u64(0, 1 << 20, UADDR, 0))
        + vu(32, u64(len(region), 0) + struct.pack("<HH4x", 2, 16))  # SET_INFLIGHT_FD
        + vu_queue(0, 0x10000, 0x11000, 0x12000)
        + vu_queue(1, 0x20000, 0x21000, 0x22000)
    )
    return messages + struct.pack("<III", 0, 1, 0xFFFFFFF0) + region.ljust(1024, b"\0")


VHOST_USER["inflight-resubmit"] = inflight_seed(inflight_region(2, 16, {(0, 3): 7, (0, 5): 2, (1, 15): 0}))
VHOST_USER["inflight-fresh"] = inflight_seed(bytes(640))
VHOST_USER["inflight-crashed"] = inflight_seed(inflight_region(2, 16, {(0, 1): 1}, used_idx=3))

SEEDS["vhost_user"] = VHOST_USER


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "seeds")
    for target in ["options", "qmp_stream", *SEEDS]:
        (out / target).mkdir(parents=True, exist_ok=True)
    for target, seeds in SEEDS.items():
        for name, data in seeds.items():
            (out / target / f"seed-{name}").write_bytes(data)
    for i, arg in enumerate(BLOCKDEV_ARGS):
        (out / "options" / f"seed-arg-{i:02}").write_text(arg)
    for i, value in enumerate(BLOCKDEV_JSON):
        (out / "options" / f"seed-json-{i:02}").write_text(json.dumps(value))
    for name, data in QMP_STREAMS.items():
        (out / "qmp_stream" / f"seed-{name}").write_bytes(data)
    print(f"seeds written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
