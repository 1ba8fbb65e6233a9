"""Hot insertion and removal of a throttle filter under a guest writing and verifying data.

While a guest (2 vCPUs, 2 queues) runs fio randwrite with crc32c verification
interleaved with the writes (verify_backlog), the test inserts a throttle node
above the export's root and removes it again through QMP, 50 times, each step
one transaction.  Even cycles use a throttle-group object with limits the
guest never reaches, odd cycles inline limits below its rate, so that the
filter holds queued requests when it is removed.  fio must finish without an error or a verification failure,
the daemon must still run and the block graph must be back to what it was.

qemu-storage-daemon has neither transactional blockdev-add/-del nor
x-blockdev-replace, so this runs against blkgraph only.
"""

import asyncio
import os
import time

import pytest
from qemu.qmp import QMPClient

from guest import Guest, fio_errors

CYCLES = 50
SIZE = 64 << 20  # the region fio writes and verifies
IMAGE_SIZE = 2 * SIZE
NUM_QUEUES = 2
FIO_RUNTIME = 35  # seconds of fio; the cycles run inside this window
FIO_SETTLE = 3  # seconds to wait after fio started before the first cycle
CYCLES_SPAN = 25  # seconds the cycles are spread over, so I/O flows through each state
BS = 4096
VERIFY_BACKLOG = 256  # fio verifies what it wrote after every this many blocks
# Even cycles: a generous group the guest (about 6000 IOPS under TCG) never
# reaches.  Odd cycles: inline limits below the guest's rate, so the filter
# holds queued requests when it is taken out.
GROUP_LIMITS = {"iops-total": 20000, "bps-total": 1 << 30}
INLINE_LIMITS = {"iops-total": 1000}

# Each of the numjobs processes writes and verifies its own slice of the
# region (offset_increment), so no block is written by two processes.
FIO_JOB = """\
[global]
filename=${{DISK}}
direct=1
ioengine={ioengine}
iodepth=16
numjobs={numjobs}
cpus_allowed=0-{last_cpu}
cpus_allowed_policy=split
rw=randwrite
bs={bs}
size={slice}
offset_increment={slice}
verify=crc32c
verify_fatal=1
do_verify=1
verify_backlog={verify_backlog}
time_based=1
runtime={runtime}

[hot-insert]
"""

# Messages fio prints for a verification failure (verify.c), on the console.
VERIFY_FAILURES = ("verify failed", "bad magic header", "bad header", "verify type mismatch")


def skip_unless_blkgraph(daemon_kind):
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon has no transactional graph edits or x-blockdev-replace")


def daemon_log(daemon) -> str:
    """The tail of the daemon's log, for failure messages."""
    text = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
    return f"--- daemon log ({daemon.log}) ---\n{text[-3000:]}"


async def export_root(qmp: QMPClient, export_id: str = "vub0") -> str:
    """The node-name of an export's root, from query-block-exports."""
    exports = {e["id"]: e for e in await qmp.execute("query-block-exports")}
    return exports[export_id]["node-name"]


async def graph_state(qmp: QMPClient) -> tuple:
    """What must be the same before and after: graph, named nodes and exports (without the
    space the image takes on the host, which the guest's writes change)."""
    nodes = await qmp.execute("query-named-block-nodes")
    for node in nodes:
        node["image"].pop("actual-size", None)
    return (
        await qmp.execute("x-debug-query-block-graph"),
        nodes,
        await qmp.execute("query-block-exports"),
    )


def throttle_node(cycle: int) -> dict:
    """The throttle node of one cycle: even cycles use the group, odd ones inline limits."""
    node = {"driver": "throttle", "node-name": "thr0", "file": "disk0"}
    if cycle % 2 == 0:
        node["throttle-group"] = "tg0"
    else:
        node["limits"] = INLINE_LIMITS
    return node


def edges(graph: dict) -> set:
    """The edges of x-debug-query-block-graph as (parent, child name, child) names."""
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return {(names[e["parent"]], e["name"], names[e["child"]]) for e in graph["edges"]}


INSERT = {
    "type": "x-blockdev-replace",
    "data": {"parent-type": "export", "export-id": "vub0", "new-child": "thr0"},
}
REMOVE = [
    {
        "type": "x-blockdev-replace",
        "data": {"parent-type": "export", "export-id": "vub0", "new-child": "disk0"},
    },
    {"type": "blockdev-del", "data": {"node-name": "thr0"}},
]


async def timed(qmp: QMPClient, cmd: str, args: dict) -> float:
    """Execute a command; return how long it took in seconds."""
    start = time.monotonic()
    await qmp.execute(cmd, args)
    return time.monotonic() - start


async def insert_remove_cycles(qmp_path, cycles: int, guest: Guest) -> dict:
    """Insert and remove the throttle filter `cycles` times; return timings.

    The steps are spread evenly over CYCLES_SPAN seconds (each state, filter
    in and filter out, is held for about CYCLES_SPAN / (2 * cycles) seconds),
    so the guest's requests flow through both states and are in flight
    across every swap.
    """
    step = CYCLES_SPAN / (2 * cycles)
    start = time.monotonic()

    async def until(n: int) -> None:
        await asyncio.sleep(max(0.0, start + n * step - time.monotonic()))

    inserts, removes = [], []
    qmp = QMPClient("hot-insert")
    await qmp.connect(str(qmp_path))
    try:
        initial = await graph_state(qmp)
        assert await export_root(qmp) == "disk0"
        await qmp.execute(
            "object-add", {"qom-type": "throttle-group", "id": "tg0", "limits": GROUP_LIMITS}
        )
        for cycle in range(cycles):
            assert guest.running(), f"the guest ended before cycle {cycle}"
            actions = [{"type": "blockdev-add", "data": throttle_node(cycle)}, INSERT]
            inserts.append(await timed(qmp, "transaction", {"actions": actions}))
            assert await export_root(qmp) == "thr0", f"cycle {cycle}: filter not inserted"
            graph = await qmp.execute("x-debug-query-block-graph")
            assert {("vub0", "root", "thr0"), ("thr0", "file", "disk0")} <= edges(graph), graph
            await until(2 * cycle + 1)

            removes.append(await timed(qmp, "transaction", {"actions": REMOVE}))
            assert await export_root(qmp) == "disk0", f"cycle {cycle}: filter not removed"
            names = {n["node-name"] for n in await qmp.execute("query-named-block-nodes")}
            assert "thr0" not in names, f"cycle {cycle}: thr0 still exists after blockdev-del"
            await until(2 * cycle + 2)
        await qmp.execute("object-del", {"id": "tg0"})
        assert guest.running(), "the guest's fio ended before the cycles did"
        assert await graph_state(qmp) == initial, "the graph differs from the initial one"
    finally:
        await qmp.disconnect()
    return {
        "insert_avg_ms": round(1000 * sum(inserts) / len(inserts), 2),
        "insert_max_ms": round(1000 * max(inserts), 2),
        "remove_avg_ms": round(1000 * sum(removes) / len(removes), 2),
        "remove_max_ms": round(1000 * max(removes), 2),
    }


def test_hot_insert_throttle_under_fio_verify(daemon_kind, start_daemon, workdir):
    """50 throttle insert/remove cycles while fio writes and verifies in a 2-queue guest."""
    skip_unless_blkgraph(daemon_kind)
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    daemon = start_daemon(image, num_queues=NUM_QUEUES, qmp=True)

    guest = Guest(
        daemon.socket,
        workdir,
        "fio",
        num_queues=NUM_QUEUES,
        cpus=NUM_QUEUES,
        timeout=FIO_RUNTIME + 90,
    )
    guest.fio_job = FIO_JOB.format(
        ioengine=guest.params["ioengine"],
        numjobs=NUM_QUEUES,
        last_cpu=NUM_QUEUES - 1,
        slice=SIZE // NUM_QUEUES,
        runtime=FIO_RUNTIME,
        bs=BS,
        verify_backlog=VERIFY_BACKLOG,
    )
    with guest:
        guest.start()
        # run_fio prints "== fio" just before it starts fio; give fio time to
        # open the disk and have writes and verifications in flight.
        guest.wait_console("== fio", timeout=60)
        time.sleep(FIO_SETTLE)
        loop_start = time.monotonic()
        try:
            timings = asyncio.run(insert_remove_cycles(daemon.qmp, CYCLES, guest))
        except Exception as err:
            raise AssertionError(f"{err!r}\n{daemon_log(daemon)}") from err
        loop_time = time.monotonic() - loop_start
        print(f"{CYCLES} cycles in {loop_time:.2f}s; {timings}")
        assert (
            daemon.proc.poll() is None
        ), f"the daemon died during the cycles\n{daemon_log(daemon)}"
        result = guest.wait()

    assert result.disk["queues"] == NUM_QUEUES
    assert result.disk["cpus"] == NUM_QUEUES
    fio = result["fio"]
    console = result.console
    assert fio.rc == 0, console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0, report
    for job in report["jobs"]:
        written, verified = job["write"]["io_bytes"], job["read"]["io_bytes"]
        assert written > 0
        # With verify_backlog, fio reads back and checks what it wrote during
        # the run; at most the last backlog may be left unverified when the
        # runtime ends.
        assert 0 <= written - verified <= VERIFY_BACKLOG * BS, (written, verified)
    for needle in VERIFY_FAILURES:
        assert needle not in console, f"fio reported {needle!r}:\n{console[-4000:]}"
    # fio ran for its whole runtime, so the cycles happened while it wrote.
    for job in report["jobs"]:
        assert job["job_runtime"] >= (FIO_RUNTIME - 1) * 1000, job["job_runtime"]
    assert all(result.interrupts), f"a queue was not used: {result.interrupts}"

    assert daemon.proc.poll() is None, f"the daemon died\n{daemon_log(daemon)}"
    assert os.path.getsize(image) == IMAGE_SIZE
    assert daemon.stop() == 0
