#!/usr/bin/env python3
"""Write the hand-made seed inputs of the fuzz targets.

The seeds are real inputs: the `--blockdev` strings of README.md, docs/ and
the tests, their QMP `blockdev-add` forms, and QMP transcripts like those of
tests/python/test_qmp.py (good clients and the misbehaving ones). The
committed corpora (fuzz/corpus/<target>/) started from these and were
minimised with libFuzzer's -merge=1 (`fuzz/run.sh merge`).

    python3 fuzz/seeds.py DIR      # writes DIR/options/* and DIR/qmp_stream/*
"""

import json
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


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "seeds")
    (out / "options").mkdir(parents=True, exist_ok=True)
    (out / "qmp_stream").mkdir(parents=True, exist_ok=True)
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
