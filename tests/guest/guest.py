"""Boot the test guest against a vhost-user-blk socket and collect its results.

Typical use::

    result = Guest(sock, workdir, "fio-verify", num_queues=2,
                   params={"size": "64M"}).run()
    assert result["fio-verify"].rc == 0
    print(result.md5)

For background use, call start(), do things while the guest runs (for
example wait_console("== fio") and then QMP commands to the backend), then
wait().  The jobs and their parameters are documented in init.sh.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import guest_images

QEMU = os.environ.get("BLKGRAPH_QEMU", "qemu-system-x86_64")
BEGIN, END, DONE = "@@blkgraph-begin ", "@@blkgraph-end ", "@@blkgraph-done"


class GuestError(Exception):
    """The guest did not run to its end (timeout, crash, QEMU error)."""


@dataclass
class JobResult:
    """One framed result of the guest: its name, exit code and output."""

    name: str
    rc: int
    output: str

    def json(self) -> dict:
        """Parse the output as JSON, skipping anything fio printed before it."""
        start = self.output.find("{")
        if start < 0:
            raise ValueError(f"{self.name}: no JSON in {self.output!r}")
        return json.loads(self.output[start:])


@dataclass
class GuestResult:
    """Everything a finished guest reported, by result name."""

    jobs: dict[str, JobResult] = field(default_factory=dict)
    complete: bool = False
    console: str = ""

    def __getitem__(self, name: str) -> JobResult:
        return self.jobs[name]

    @property
    def md5(self) -> str:
        """The md5 the md5 job (or fio-verify) computed on the disk."""
        job = self.jobs["md5"]
        if job.rc != 0:
            raise ValueError(f"md5 job failed: rc={job.rc}")
        return job.output.strip()

    def pairs(self, name: str) -> dict[str, int]:
        """Parse a result made of KEY=NUMBER lines."""
        pairs = (line.split("=", 1) for line in self.jobs[name].output.split())
        return {k: int(v) for k, v in pairs}

    @property
    def disk(self) -> dict[str, int]:
        """What the guest saw of the disk: queues, sectors, logical_block_size, cpus."""
        return self.pairs("disk")

    @property
    def interrupts(self) -> list[int]:
        """Interrupts the guest took on each request queue, in queue order."""
        counts = self.pairs("interrupts")
        return [counts[f"req{i}"] for i in range(len(counts))]


def parse_results(text: str) -> GuestResult:
    """Parse the framed results that init.sh writes to the second serial port."""
    result = GuestResult()
    name, body = None, []
    for line in text.replace("\r", "").split("\n"):
        if line.startswith(BEGIN):
            name, body = line[len(BEGIN) :], []
        elif name is not None and line.startswith(f"{END}{name} rc="):
            rc = int(line.rsplit("rc=", 1)[1])
            result.jobs[name] = JobResult(name, rc, "\n".join(body[:-1]))
            name = None
        elif name is not None:
            body.append(line)
        elif line == DONE:
            result.complete = True
    return result


def fio_errors(report: dict) -> int:
    """Sum the error counts of all jobs in a fio JSON report."""
    return sum(job["error"] for job in report["jobs"])


def file_md5(path, size: int) -> str:
    """Return the md5 of the first size bytes of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while size > 0:
            chunk = f.read(min(size, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            size -= len(chunk)
    return h.hexdigest()


def _check_plain(path) -> str:
    path = str(path)
    if "," in path or "=" in path:
        raise ValueError(f"a ',' or '=' in {path!r} breaks QEMU's option parsing")
    return path


def _kvm_boots(workdir: Path) -> bool:
    guest = Guest(None, workdir, "none", accel="kvm", timeout=20, name="kvm-probe")
    try:
        return guest.run().complete
    except GuestError:
        return False


def accelerator(images: guest_images.GuestImages) -> str:
    """Pick "kvm" or "tcg" for the guest.

    BLKGRAPH_GUEST_ACCEL=kvm|tcg forces one.  Otherwise KVM is used only if a
    guest was seen to boot under it on this host (the probe result is cached
    next to the images); /dev/kvm existing is not enough.
    """
    forced = os.environ.get("BLKGRAPH_GUEST_ACCEL", "auto")
    if forced != "auto":
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    qemu = shutil.which(QEMU) or QEMU
    key = hashlib.sha256()
    for part in (
        os.uname().release,
        qemu,
        *(os.stat(p).st_mtime_ns for p in (qemu, images.kernel)),
    ):
        key.update(str(part).encode())
    cached = guest_images.CACHE_DIR / f"accel-{key.hexdigest()[:16]}"
    if not cached.exists():
        probe_dir = guest_images.CACHE_DIR / "kvm-probe"
        probe_dir.mkdir(exist_ok=True)
        cached.write_text("kvm" if _kvm_boots(probe_dir) else "tcg")
    return cached.read_text()


class Guest:
    """A QEMU guest that runs one or more init.sh jobs against a vhost-user-blk socket.

    socket: the backend's vhost-user socket (None: no disk).
    job: comma-separated init.sh jobs.
    params: more init.sh parameters (bg.KEY=VALUE), e.g. {"size": "64M"};
        numjobs defaults to num_queues and ioengine to io_uring when the guest
        kernel has it.
    fio_job: text of a fio job file for the "fio" job (${DISK} is the disk).
    cpus: vCPUs, num_queues by default.
    name: prefix of the files the guest leaves in workdir (NAME.console.log,
        NAME.results, NAME.qemu.log).
    reconnect_ms: QEMU reconnects to the socket this many milliseconds
        after the backend went away (None: it does not).
    """

    def __init__(
        self,
        socket,
        workdir,
        job="fio-verify",
        *,
        num_queues=1,
        cpus=None,
        params=None,
        fio_job=None,
        timeout=600,
        accel=None,
        memory_mb=1024,
        name="guest",
        extra_args=(),
        reconnect_ms=None,
    ):
        self.images = guest_images.ensure_built()
        self.workdir = Path(_check_plain(workdir))
        self.socket = socket
        self.num_queues = num_queues
        self.cpus = cpus or num_queues
        self.params = {
            "job": job,
            "numjobs": num_queues,
            "ioengine": "io_uring" if self.images.io_uring else "libaio",
        }
        self.params.update(params or {})
        self.fio_job = fio_job
        self.timeout = timeout
        self.accel = accel
        self.memory_mb = memory_mb
        self.extra_args = list(extra_args)
        self.reconnect_ms = reconnect_ms
        self.console_path = self.workdir / f"{name}.console.log"
        self.results_path = self.workdir / f"{name}.results"
        self.qemu_log = self.workdir / f"{name}.qemu.log"
        self.fio_path = self.workdir / f"{name}.fio"
        self.proc = None
        self._deadline = None

    def command(self) -> list[str]:
        """Return the QEMU command line."""
        accel = self.accel or accelerator(self.images)
        cpu = "host" if accel == "kvm" else "max"
        mem = self.memory_mb
        bg = []
        for key, value in self.params.items():
            value = str(value)
            if not re.fullmatch(r"[a-z_]+", key) or not value or re.search(r"\s", value):
                raise ValueError(f"bad guest parameter {key}={value!r}")
            bg.append(f"bg.{key}={value}")
        # fmt: off
        cmd = [
            QEMU, "-M", "q35", "-accel", accel, "-cpu", cpu,
            "-smp", str(self.cpus), "-m", f"{mem}M",
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{_check_plain(self.console_path)}",
            "-serial", f"file:{_check_plain(self.results_path)}",
            "-kernel", _check_plain(self.images.kernel),
            "-initrd", _check_plain(self.images.initramfs),
            "-append", " ".join(["console=ttyS0 loglevel=4 panic=-1 mitigations=off", *bg]),
        ]
        # fmt: on
        if self.socket is not None:
            chardev = f"socket,id=vub0,path={_check_plain(self.socket)}"
            if self.reconnect_ms is not None:
                chardev += f",reconnect-ms={self.reconnect_ms}"
            device = f"vhost-user-blk-pci,chardev=vub0,num-queues={self.num_queues}"
            cmd += ["-chardev", chardev, "-device", device]
        if self.fio_job is not None:
            cmd += ["-fw_cfg", f"name=opt/blkgraph/fio,file={_check_plain(self.fio_path)}"]
        return cmd + self.extra_args

    def start(self) -> "Guest":
        """Start QEMU in the background and return self."""
        if self.fio_job is not None:
            self.fio_path.write_text(self.fio_job)
        cmd = self.command()
        self.results_path.unlink(missing_ok=True)
        self.console_path.unlink(missing_ok=True)
        with open(self.qemu_log, "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._deadline = time.monotonic() + self.timeout
        return self

    def running(self) -> bool:
        """Whether QEMU is still running."""
        return self.proc is not None and self.proc.poll() is None

    def console(self) -> str:
        """The guest's console output so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float = 120) -> None:
        """Wait until text appears on the guest console; raise GuestError if it does not."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if not self.running():
                raise self._error(f"guest ended before {text!r} appeared")
            if time.monotonic() > deadline:
                raise self._error(f"{text!r} did not appear within {timeout}s")
            time.sleep(0.1)

    def wait(self, timeout=None) -> GuestResult:
        """Wait for the guest to power off; return its results.

        Raises GuestError if the guest times out (it is then killed) or ends
        without finishing its jobs.
        """
        if timeout is None:
            timeout = max(0.0, self._deadline - time.monotonic())
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._error("guest timed out") from None
        result = parse_results(
            self.results_path.read_text(errors="replace") if self.results_path.exists() else ""
        )
        result.console = self.console()
        if not result.complete:
            raise self._error(f"guest did not finish its jobs (qemu rc={self.proc.returncode})")
        return result

    def run(self) -> GuestResult:
        """Boot the guest, wait for it to power off and return its results."""
        return self.start().wait()

    def kill(self) -> None:
        """Stop QEMU if it is still running."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _error(self, message: str) -> GuestError:
        tail = "\n".join(self.console().splitlines()[-40:])
        qemu = self.qemu_log.read_text(errors="replace")[-3000:] if self.qemu_log.exists() else ""
        return GuestError(f"{message}\n--- console tail ---\n{tail}\n--- qemu ---\n{qemu}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
