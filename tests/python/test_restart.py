"""Restarting and upgrading the daemon under a running guest.

The guest runs fio randwrite with crc32c verification on a disk exported
through a throttle node whose write limit is far below what the guest
submits, so the queue is always full of writes in flight whenever the
daemon goes; a second fio job reads another region, unthrottled, so its
reads complete before the writes queued ahead of them: requests complete
out of order, as they do without a throttle.  QEMU's chardev reconnects
(reconnect-ms) to the daemon started again with the same command line.

- kill -9, three times: the new process resubmits what was in flight
  (inflight tracking, VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD); its log must
  say it did.
- SIGTERM, three times, alternating two different builds of the daemon (the
  release and the debug binary by default): the old process finishes what
  is in flight and leaves what is queued in the ring; the new one has
  nothing to resubmit and takes the queued requests.

- kill -9 of a daemon started with --state-file that had its throttle filter
  inserted over QMP (object-add, blockdev-add, x-blockdev-replace) rather
  than on its command line: started again with the same command line, it
  comes back with the filter over the export's root, and takes what was in
  flight in it.

Either way fio must end without an error or a verification failure, and the
guest must log no I/O error.  The test prints the guest-visible stall (fio's
largest completion latency) and each restart's time from start to serving.

qemu-storage-daemon does not offer inflight tracking (QEMU then rewinds the
ring to the last used entry) and completes queued requests with an error
on SIGTERM; run with BLKGRAPH_TEST_QSD=1 to see it fail these tests.
"""

import os
import re
import time
from pathlib import Path

import pytest

from guest import Guest, fio_errors
from test_jobs import connect, ok
from test_state_file import insert_throttle

SIZE = 48 << 20  # the region fio writes and verifies
IMAGE_SIZE = 2 * SIZE
RESTARTS = 3
THROTTLE_IOPS = 400  # writes; the guest submits several thousand under TCG
WRITING = 2 << 20  # bytes on the image before the first restart: the writes flow
RESTART_EVERY = 4  # seconds between restarts
RECONNECT_MS = 200
# The writes last this long at the throttle's rate: well past the restarts.
assert SIZE // 4096 / THROTTLE_IOPS > RESTARTS * RESTART_EVERY + 10

# Two jobs on the one queue: the writes, throttled, keep the queue full for
# the whole run and are verified (crc32c) once all are written; the reads,
# not throttled, keep overtaking them, so requests complete out of order,
# until the writes job ends (exitall).
FIO_JOB_TEMPLATE = """\
[global]
filename=${{DISK}}
direct=1
ioengine=libaio
bs=4k
exitall=1

[writes]
rw=randwrite
iodepth=32
size={size}
verify=crc32c
verify_fatal=1
do_verify=1

[reads]
rw=randread
iodepth=8
offset={size}
size={size}
time_based=1
runtime=600
"""
FIO_JOB = FIO_JOB_TEMPLATE.format(size=SIZE)

VERIFY_FAILURES = ("verify failed", "bad magic header", "bad header", "verify type mismatch")
RESUBMITTED = re.compile(r"resubmitting (\d+) requests left in flight")


def other_binary(daemon_kind, daemon_bin) -> str:
    """The second build to alternate with: BLKGRAPH_OTHER_BIN, by default
    the debug build of blkgraph (the release one is the default daemon)."""
    if daemon_kind == "qsd":
        return daemon_bin
    repo = Path(__file__).resolve().parents[2]
    path = Path(os.environ.get("BLKGRAPH_OTHER_BIN", "target/debug/blkgraph"))
    path = path if path.is_absolute() else repo / path
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run cargo build, or set BLKGRAPH_OTHER_BIN")
    if path.resolve() == Path(daemon_bin).resolve():
        pytest.fail(f"{path} is the daemon under test itself: set BLKGRAPH_OTHER_BIN")
    return str(path)


def wait_writing(image: Path, guest, timeout=120) -> None:
    """Wait until the guest's writes reach the (sparse) image."""
    deadline = time.monotonic() + timeout
    while image.stat().st_blocks * 512 < WRITING:
        assert guest.running(), "the guest ended before it wrote"
        assert time.monotonic() < deadline, "the guest did not write"
        time.sleep(0.1)


def restart(daemon, binary: str, how: str, generation: int) -> float:
    """Stop the daemon (SIGKILL or SIGTERM) and start `binary` with the same
    arguments; return the seconds from the start to a listening socket."""
    if how == "kill":
        daemon.kill()
    else:
        assert daemon.stop() == 0, daemon.log.read_text(errors="replace")[-3000:]
    daemon.args[0] = daemon.binary = binary
    daemon.log = daemon.log.with_name(f"vub0.daemon.{generation}.log")
    start = time.monotonic()
    daemon.start()
    return time.monotonic() - start


def wait_connected(daemon, timeout=30) -> float:
    """Seconds until the frontend has reconnected to the daemon (blkgraph
    logs it; for QSD, a short grace period)."""
    start = time.monotonic()
    if daemon.binary.endswith("qemu-storage-daemon"):
        time.sleep(1)
        return 0.0
    while "frontend connected" not in daemon.log.read_text(errors="replace"):
        assert time.monotonic() - start < timeout, "the guest did not reconnect"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize("how", ["kill", "term"])
def test_restart_under_fio(daemon_kind, daemon_bin, start_daemon, workdir, monkeypatch, how):
    monkeypatch.setenv("BLKGRAPH_LOG", "info")
    binaries = [daemon_bin, other_binary(daemon_kind, daemon_bin) if how == "term" else daemon_bin]
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    daemon = start_daemon(image, throttle_iops=THROTTLE_IOPS)
    guest = Guest(
        daemon.socket,
        workdir,
        "fio",
        fio_job=FIO_JOB,
        reconnect_ms=RECONNECT_MS,
        timeout=SIZE // 4096 // THROTTLE_IOPS + 180,
    ).start()
    timings = []
    logs = []
    try:
        guest.wait_console("== fio")
        wait_writing(image, guest)
        for i in range(RESTARTS):
            logs.append(daemon.log)
            started = restart(daemon, binaries[(i + 1) % 2], how, i + 1)
            timings.append((started, wait_connected(daemon)))
            time.sleep(RESTART_EVERY)
        result = guest.wait()
    finally:
        guest.kill()
    logs.append(daemon.log)

    fio = result["fio"]
    assert fio.rc == 0, result.console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0
    console = result.console
    assert "I/O error" not in console, console[-4000:]
    assert not [m for m in VERIFY_FAILURES if m in console], console[-4000:]
    job = next(j for j in report["jobs"] if j["jobname"] == "writes")
    assert job["write"]["io_bytes"] == SIZE and job["read"]["io_bytes"] == SIZE

    resubmitted = [
        sum(int(n) for n in RESUBMITTED.findall(log.read_text(errors="replace"))) for log in logs
    ]
    stall_ms = job["write"]["clat_ns"]["max"] / 1e6
    print(
        f"\n{daemon_kind} {how}: largest write completion latency {stall_ms:.0f} ms; "
        + "; ".join(
            f"started in {s * 1000:.0f} ms, reconnected after {c * 1000:.0f} ms" for s, c in timings
        )
        + f"; resubmitted per process: {resubmitted}"
    )
    if daemon_kind == "blkgraph":
        if how == "kill":
            # Each kill hit requests in flight, and the next process took them.
            assert all(n > 0 for n in resubmitted[1:]), resubmitted
        else:
            # SIGTERM finishes what is in flight: nothing to resubmit.
            assert sum(resubmitted) == 0, resubmitted


# The writes of the state file test: they last about FILTERED_SIZE / 4096 /
# THROTTLE_IOPS seconds (10 s) from the moment the guest's fio starts.
FILTERED_SIZE = 16 << 20


def test_restart_keeps_a_filter_inserted_over_qmp(
    daemon_kind, daemon_bin, start_daemon, workdir, monkeypatch
):
    if daemon_kind != "blkgraph":
        pytest.skip("qemu-storage-daemon has no --state-file")
    monkeypatch.setenv("BLKGRAPH_LOG", "info")
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(2 * FILTERED_SIZE)
    state = workdir / "state.json"
    daemon = start_daemon(image, qmp=True, extra_args=["--state-file", str(state)])
    q = connect(daemon)
    insert_throttle(q, {"iops-write": THROTTLE_IOPS})
    q.close()
    guest = Guest(
        daemon.socket,
        workdir,
        "fio",
        fio_job=FIO_JOB_TEMPLATE.format(size=FILTERED_SIZE),
        reconnect_ms=RECONNECT_MS,
        timeout=FILTERED_SIZE // 4096 // THROTTLE_IOPS + 180,
    ).start()
    try:
        guest.wait_console("== fio")
        wait_writing(image, guest)
        started = restart(daemon, daemon_bin, "kill", 1)
        reconnected = wait_connected(daemon)
        q = connect(daemon)
        root = next(e for e in ok(q, "query-block-exports") if e["id"] == "vub0")["node-name"]
        nodes = {n["node-name"]: n for n in ok(q, "query-named-block-nodes")}
        q.close()
        assert guest.running(), "fio ended before the restart: the filter did not hold it"
        result = guest.wait()
    finally:
        guest.kill()

    assert root == "thr0" and nodes["thr0"]["drv"] == "throttle"
    fio = result["fio"]
    assert fio.rc == 0, result.console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0
    assert "I/O error" not in result.console, result.console[-4000:]
    assert not [m for m in VERIFY_FAILURES if m in result.console], result.console[-4000:]
    job = next(j for j in report["jobs"] if j["jobname"] == "writes")
    assert job["write"]["io_bytes"] == FILTERED_SIZE
    resubmitted = sum(int(n) for n in RESUBMITTED.findall(daemon.log.read_text(errors="replace")))
    print(
        f"\nstate file restart: started in {started * 1000:.0f} ms, reconnected after "
        f"{reconnected * 1000:.0f} ms, resubmitted {resubmitted}, largest write completion "
        f"latency {job['write']['clat_ns']['max'] / 1e6:.0f} ms"
    )
    # The filter came back full: what was in flight in it was taken again.
    assert resubmitted > 0
