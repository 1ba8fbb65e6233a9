"""A real guest writes and verifies data through the daemon's vhost-user-blk export."""

import pytest

from guest import Guest, file_md5, fio_errors

SIZE = 64 << 20
IMAGE_SIZE = 2 * SIZE


@pytest.mark.parametrize("num_queues", [2, 1])
def test_fio_verify(daemon_kind, start_daemon, workdir, num_queues):
    """fio write+verify in the guest; the image then holds what the guest wrote."""
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    daemon = start_daemon(image, num_queues=num_queues)

    result = Guest(
        daemon.socket,
        workdir,
        "fio-verify",
        num_queues=num_queues,
        params={"size": SIZE},
        timeout=300,
    ).run()

    assert result.disk == {
        "queues": num_queues,
        "sectors": IMAGE_SIZE // 512,
        "logical_block_size": 512,
        "cpus": num_queues,
    }
    fio = result["fio-verify"]
    assert fio.rc == 0, result.console[-4000:]
    report = fio.json()
    assert fio_errors(report) == 0
    assert sum(job["write"]["io_bytes"] for job in report["jobs"]) == SIZE
    assert sum(job["read"]["io_bytes"] for job in report["jobs"]) == SIZE
    assert len(result.interrupts) == num_queues
    assert all(result.interrupts), f"a queue was not used: {result.interrupts}"

    assert daemon.stop() == 0
    assert file_md5(image, SIZE) == result.md5
