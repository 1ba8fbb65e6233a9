"""Operating the daemon as tools that drive qemu-storage-daemon do.

- process conventions: --daemonize (the command returns 0 once every socket
  and the pid file exist, 1 with the error on stderr), errors prefixed with
  the option and exit status 1, --export TYPE,..., --object help;
- systemd: READY=1 and STOPPING=1 on NOTIFY_SOCKET; contrib/systemd's units,
  checked by systemd-analyze and run with their sockets passed by
  systemd-socket-activate (LISTEN_FDS);
- QMP: nbd-server-add/-remove, iothread objects and exports on them,
  object-add's errors, query-version and the greeting;
- exit: the sockets removed are the daemon's own, not those of exports
  deleted before;
- statistics of NBD clients (qemu-io) in query-blockstats, summed over
  connections, and the same counters on the metrics endpoint, scraped over
  HTTP and parsed with prometheus_client's OpenMetrics parser.

Tests marked "both" run against qemu-storage-daemon as well with
BLKGRAPH_TEST_QSD=1 (they prove the test); the others use what only
blkgraph has.
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from conftest import REPO, running

MIB = 1 << 20
SIZE = 16 * MIB


def image(workdir):
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def base_args(binary, workdir, img):
    # fmt: off
    return [
        binary,
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=raw,node-name=disk0,file=f0",
    ]
    # fmt: on


def run(args, **kw):
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, **kw
    )


def program(daemon_kind) -> str:
    return "blkgraph" if daemon_kind == "blkgraph" else "qemu-storage-daemon"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_pid(pid: int) -> None:
    os.kill(pid, 15)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def qmp_connect(path) -> QEMUMonitorProtocol:
    q = QEMUMonitorProtocol(str(path))
    q.connect()
    return q


# ------------------------------------------------------------ process


def test_daemonize_returns_once_ready(daemon_bin, workdir):
    """both: the parent exits 0 after the sockets and the pid file exist,
    and the daemon runs on in the background."""
    img = image(workdir)
    vub, qmp, pidfile = workdir / "vub.sock", workdir / "qmp.sock", workdir / "d.pid"
    # fmt: off
    args = base_args(daemon_bin, workdir, img) + [
        "--export", f"type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path={vub}",
        "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m",
        "--pidfile", pidfile, "--daemonize",
    ]
    # fmt: on
    res = run(args)
    assert res.returncode == 0, res.stderr
    # Checked right after the parent returned: nothing is awaited.
    assert vub.exists() and qmp.exists()
    pid = int(pidfile.read_text())
    assert pid_alive(pid)
    q = qmp_connect(qmp)
    assert q.cmd("query-block-exports")[0]["id"] == "vub0"
    q.close()
    stop_pid(pid)


def test_daemonize_reports_errors(daemon_bin, daemon_kind, workdir):
    """both: a configuration error reaches the caller: exit 1, the error
    on stderr, prefixed with the option as QSD does."""
    img = image(workdir)
    arg = "driver=file,node-name=f1,filename=/nonexistent/x.raw"
    res = run(base_args(daemon_bin, workdir, img) + ["--blockdev", arg, "--daemonize"])
    assert res.returncode == 1, res
    assert f"{program(daemon_kind)}: --blockdev {arg}: " in res.stderr, res.stderr
    assert "No such file or directory" in res.stderr


@pytest.mark.parametrize(
    "option,value,text",
    [
        ("--object", "bogus,id=x", "Parameter 'qom-type' does not accept value 'bogus'"),
        ("--object", "throttle-group,id=t,foo=1", "Parameter 'foo' is unexpected"),
        # QEMU's full throttle limits, checked as QEMU does.
        ("--object", "throttle-group,id=t,limits.iops-total=10,limits.iops-total-max=5",
         "bps_max/iops_max cannot be lower than bps/iops"),
        ("--object", "throttle-group,id=t,limits.bps-read-max=5",
         "bps_max/iops_max require corresponding bps/iops values"),
        ("--object", "throttle-group,id=t,limits.iops-write=10,limits.iops-write-max-length=5",
         "burst length set without burst rate"),
        ("--object", "throttle-group,id=t,limits.iops-total=10,limits.iops-read=5",
         "bps/iops/max total values and read/write values cannot be used at the same time"),
        ("--object", "throttle-group,id=t,limits.iops-size=4096",
         "iops size requires an iops value to be set"),
        ("--export", "nbd,id=e,node-name=nope", "Cannot find device='' nor node-name='nope'"),
        ("--blockdev", "driver=raw,node-name=r,file=nope", "Cannot find device='nope' nor node-name='nope'"),
    ],
)
def test_configuration_errors(daemon_bin, daemon_kind, workdir, option, value, text):
    """both: `PROGRAM: OPTION VALUE: ERROR` and exit status 1."""
    img = image(workdir)
    extra = [option, value]
    if option == "--export":
        extra = ["--nbd-server", f"addr.type=unix,addr.path={workdir}/nbd.sock"] + extra
    res = run(base_args(daemon_bin, workdir, img) + extra)
    assert res.returncode == 1
    assert res.stderr.strip() == f"{program(daemon_kind)}: {option} {value}: {text}"


def test_full_throttle_limits_are_taken(daemon_bin, workdir):
    """both: every ThrottleLimits member, on the command line."""
    limits = ",".join(
        f"limits.{kind}-{d}{suffix}={value}"
        for kind, rate in (("iops", 100), ("bps", 1 << 20))
        for d in ("read", "write")
        for suffix, value in (("", rate), ("-max", rate * 2), ("-max-length", 3))
    )
    img = image(workdir)
    qmp = workdir / "qmp.sock"
    # fmt: off
    args = base_args(daemon_bin, workdir, img) + [
        "--object", f"throttle-group,id=tg0,{limits},limits.iops-size=8192",
        "--blockdev", "driver=throttle,node-name=thr,throttle-group=tg0,file=disk0",
        "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m",
    ]
    # fmt: on
    with running(args, qmp):
        q = qmp_connect(qmp)
        assert "thr" in {n["node-name"] for n in q.cmd("query-named-block-nodes")}
        q.close()


def test_unknown_option(daemon_bin, daemon_kind):
    """both."""
    res = run([daemon_bin, "--bogus"])
    assert res.returncode == 1
    assert res.stderr.strip() == f"{program(daemon_kind)}: unrecognized option '--bogus'"


def test_object_help(daemon_bin):
    """both: the types and an iothread's properties."""
    res = run([daemon_bin, "--object", "help"])
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0] == "List of user creatable objects:"
    assert {"  iothread", "  throttle-group"} <= set(lines)
    res = run([daemon_bin, "--object", "iothread,help"])
    assert res.returncode == 0
    assert "  poll-max-ns=<int>" in res.stdout.splitlines()


def test_export_type_first_and_iothreads(daemon_bin, workdir):
    """both: --export nbd,id=... and --object iothread with an export on it;
    deleting an iothread leaves the export that named it serving."""
    img = image(workdir)
    nbd, qmp = workdir / "nbd.sock", workdir / "qmp.sock"
    # fmt: off
    args = base_args(daemon_bin, workdir, img) + [
        "--object", "iothread,id=io0,poll-max-ns=20000",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "nbd,id=e0,node-name=disk0,name=d0,iothread=io0,fixed-iothread=on",
        "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m",
    ]
    # fmt: on
    with running(args, qmp):
        q = qmp_connect(qmp)
        assert [(e["id"], e["type"]) for e in q.cmd("query-block-exports")] == [("e0", "nbd")]
        r = q.cmd_raw("object-add", {"qom-type": "iothread", "id": "io1", "poll-max-ns": 0})
        assert r == {"return": {}}
        r = q.cmd_raw("object-add", {"qom-type": "iothread", "id": "io1"})
        assert "duplicate" in r["error"]["desc"]
        vub = workdir / "vub.sock"
        r = q.cmd_raw("block-export-add", {
            "type": "vhost-user-blk", "id": "v1", "node-name": "disk0", "iothread": "io1",
            "addr": {"type": "unix", "path": str(vub)}})  # fmt: skip
        assert r == {"return": {}}, r
        assert q.cmd_raw("object-del", {"id": "io1"}) == {"return": {}}
        assert {e["id"] for e in q.cmd("query-block-exports")} == {"e0", "v1"}
        r = q.cmd_raw("block-export-add", {
            "type": "vhost-user-blk", "id": "v2", "node-name": "disk0", "iothread": "io1",
            "addr": {"type": "unix", "path": str(workdir / "vub2.sock")}})  # fmt: skip
        assert "io1" in r["error"]["desc"], r
        q.close()


def test_object_add_errors_name_the_type(qmp_daemon, daemon_kind):
    """both: an unsupported type is named, not its first property."""
    q = qmp_connect(qmp_daemon.qmp)
    r = q.cmd_raw("object-add", {"qom-type": "secret", "id": "s0", "data": "x"})
    if daemon_kind == "blkgraph":
        assert r["error"] == {
            "class": "GenericError",
            "desc": "Parameter 'qom-type' does not accept value 'secret'",
        }
    r = q.cmd_raw("object-add", {"qom-type": "bogus", "id": "x", "a": 1})
    assert r["error"]["desc"] == "Parameter 'qom-type' does not accept value 'bogus'"
    r = q.cmd_raw("blockdev-add", {"driver": "null-co", "node-name": "n" * 32})
    assert r["error"]["desc"] == "Node name too long"
    q.close()


def test_version_and_greeting(qmp_daemon, daemon_kind):
    """both: the greeting's version is query-version's, QEMU's layout."""
    q = QEMUMonitorProtocol(str(qmp_daemon.qmp))
    greeting = q.connect(negotiate=True)
    version = q.cmd("query-version")
    assert greeting["QMP"]["version"] == version
    assert set(version) == {"qemu", "package"}
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    if daemon_kind == "blkgraph":
        assert version["qemu"]["major"] >= 10
        assert version["package"].startswith("blkgraph ")
    q.close()


def test_state_changes_are_logged(qmp_daemon, daemon_kind):
    """Timestamped log lines: who connected (pid, uid), and each command
    that changes state with its arguments and result; queries are not
    logged."""
    if daemon_kind != "blkgraph":
        pytest.skip("blkgraph's log")
    q = qmp_connect(qmp_daemon.qmp)
    q.cmd("blockdev-add", driver="null-co", **{"node-name": "n1"})
    q.cmd_raw("blockdev-del", {"node-name": "nope"})
    q.cmd("query-named-block-nodes")
    q.close()
    lines = qmp_daemon.log.read_text().splitlines()
    stamp = r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z INFO  "
    connected = [ln for ln in lines if "QMP client" in ln and "connected" in ln]
    assert connected and re.match(stamp, connected[-1]), lines
    assert f"(pid {os.getpid()}, uid {os.getuid()})" in connected[-1]
    client = re.search(r"QMP client (\d+)", connected[-1]).group(1)
    ok = f'qmp-client-{client}: blockdev-add {{"driver":"null-co","node-name":"n1"}}: ok'
    assert any(re.match(stamp, ln) and ln.endswith(ok) for ln in lines), lines
    failed = (
        f'qmp-client-{client}: blockdev-del {{"node-name":"nope"}}: '
        "GenericError: Cannot find device='' nor node-name='nope'"
    )
    assert any(ln.endswith(failed) for ln in lines), lines
    assert not any("query-named-block-nodes" in ln for ln in lines)


def test_nbd_server_add_and_remove(qmp_daemon, workdir):
    """both: the older NBD export commands."""
    q = qmp_connect(qmp_daemon.qmp)
    sock = workdir / "nbd.sock"
    r = q.cmd_raw("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    assert r == {"return": {}}
    assert q.cmd_raw("nbd-server-add", {"device": "disk0", "name": "d0", "writable": True}) == {
        "return": {}
    }
    uri = f"nbd+unix:///d0?socket={sock}"
    res = run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", "-c", "read -P 0x42 0 4k", uri])
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res
    exports = {e["id"]: e for e in q.cmd("query-block-exports")}
    assert exports["d0"]["type"] == "nbd" and exports["d0"]["node-name"] == "disk0"
    assert q.cmd_raw("nbd-server-remove", {"name": "d0"}) == {"return": {}}
    assert q.get_events(wait=5.0)[0]["event"] == "BLOCK_EXPORT_DELETED"
    r = q.cmd_raw("nbd-server-remove", {"name": "d0"})
    assert "error" in r
    q.close()


def test_exit_leaves_the_socket_of_a_deleted_export(qmp_daemon):
    """both: at exit the daemon removes its sockets, not the path of an
    export deleted before (someone else's by then)."""
    q = qmp_connect(qmp_daemon.qmp)
    assert q.cmd_raw("block-export-del", {"id": "vub0"}) == {"return": {}}
    assert q.get_events(wait=5.0)[0]["event"] == "BLOCK_EXPORT_DELETED"
    q.close()
    qmp_daemon.socket.unlink(missing_ok=True)
    qmp_daemon.socket.write_text("another daemon's\n")
    assert qmp_daemon.stop() == 0
    assert qmp_daemon.socket.read_text() == "another daemon's\n"


# ------------------------------------------------------------ systemd


def test_sd_notify_ready_and_stopping(blkgraph_bin, workdir):
    """READY=1 once serving, STOPPING=1 on SIGTERM, to NOTIFY_SOCKET."""
    img = image(workdir)
    notify = workdir / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    qmp = workdir / "qmp.sock"
    args = base_args(str(blkgraph_bin), workdir, img) + ["--qmp", str(qmp)]
    proc = subprocess.Popen(args, env=dict(os.environ, NOTIFY_SOCKET=str(notify)))
    try:
        msg = listener.recv(4096).decode()
        assert msg.splitlines() == ["READY=1", f"MAINPID={proc.pid}"]
        assert qmp.exists()
        proc.terminate()
        assert listener.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        listener.close()


def unit(name: str) -> str:
    return (REPO / "contrib" / "systemd" / name).read_text()


def exec_start(service: str) -> list:
    """The service's ExecStart command, continuation lines joined."""
    text = service.replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart=") :])


def test_the_systemd_units(blkgraph_bin, workdir):
    """contrib/systemd as systemd would run it: systemd-analyze accepts the
    units, and the service's command line, given the socket unit's two
    sockets by systemd-socket-activate (LISTEN_FDS), sends READY=1 and
    serves QMP on descriptor 3 and vhost-user on 4."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is missing")
    service, sockets = unit("blkgraph.service"), unit("blkgraph.socket")
    if shutil.which("systemd-analyze"):
        units = workdir / "units"
        units.mkdir()
        (units / "blkgraph.service").write_text(service.replace("/usr/local/bin/blkgraph", str(blkgraph_bin)))
        (units / "blkgraph.socket").write_text(sockets)
        res = run(["systemd-analyze", "verify", units / "blkgraph.socket", units / "blkgraph.service"])
        assert res.returncode == 0 and "blkgraph" not in res.stderr, res.stderr
    listen = [ln.split("=", 1)[1] for ln in sockets.splitlines() if ln.startswith("ListenStream=")]
    assert [os.path.basename(p) for p in listen] == ["qmp.sock", "vub0.sock"]
    qmp, vub = workdir / "qmp.sock", workdir / "vub0.sock"
    img = image(workdir)
    command = [str(blkgraph_bin)] + [
        a.replace("${BLKGRAPH_IMAGE}", str(img)) for a in exec_start(service)[1:]
    ]
    notify = workdir / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    # systemd-socket-activate passes on only the variables given with -E.
    # fmt: off
    proc = subprocess.Popen([
        activate, "-l", str(qmp), "-l", str(vub), "-E", f"NOTIFY_SOCKET={notify}", *command,
    ])
    # fmt: on
    try:
        deadline = time.monotonic() + 20
        while not qmp.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # The first connection starts the daemon, which then answers it.
        q = qmp_connect(qmp)
        assert listener.recv(4096).decode().startswith("READY=1\n")
        (export,) = q.cmd("query-block-exports")
        assert (export["id"], export["type"]) == ("vub0", "vhost-user-blk")
        q.close()
        proc.terminate()
        assert listener.recv(4096) == b"STOPPING=1"
    finally:
        proc.terminate()
        proc.wait(30)
        listener.close()


# ------------------------------------------------------------ statistics


def qemu_io(uri, *commands):
    args = ["qemu-io", "-f", "raw"] + [a for c in commands for a in ("-c", c)] + [uri]
    res = run(args)
    assert res.returncode == 0 and "error" not in res.stdout.lower(), res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nbd_statistics_and_metrics(blkgraph_bin, workdir):
    """Counters equal what two qemu-io clients did; the metrics endpoint
    gives the same counters in OpenMetrics."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    img = image(workdir)
    nbd, qmp = workdir / "nbd.sock", workdir / "qmp.sock"
    port = free_port()
    # fmt: off
    args = base_args(str(blkgraph_bin), workdir, img) + [
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "nbd,id=e0,node-name=disk0,name=d0,writable=on",
        "--qmp", str(qmp), "--metrics", f"tcp:127.0.0.1:{port}",
    ]
    # fmt: on
    with running(args, qmp) as proc:
        uri = f"nbd+unix:///d0?socket={nbd}"
        qemu_io(uri, "write -P 0x11 0 64k", "write -P 0x22 1M 4k", "read 0 4k")
        qemu_io(uri, "read -P 0x22 1M 4k", "read 8k 8k", "discard 2M 64k")
        q = qmp_connect(qmp)
        (entry,) = q.cmd("query-blockstats")
        assert (entry["qdev"], entry["node-name"]) == ("e0", "disk0")
        s = entry["stats"]
        assert (s["wr_operations"], s["wr_bytes"]) == (2, 65536 + 4096)
        assert (s["rd_operations"], s["rd_bytes"]) == (3, 4096 + 4096 + 8192)
        assert (s["unmap_operations"], s["unmap_bytes"]) == (1, 65536)
        assert s["wr_highest_offset"] == MIB + 4096
        assert s["failed_wr_operations"] == 0 and s["invalid_rd_operations"] == 0
        # A read past the end: refused, counted as invalid.
        res = run(["qemu-io", "-f", "raw", "-c", f"read {SIZE - 512} 4k", uri])
        assert "error" in (res.stdout + res.stderr).lower() or res.returncode != 0
        s = q.cmd("query-blockstats")[0]["stats"]
        q.close()

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
            text = reply.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def value(family, op):
            (sample,) = [
                x
                for x in families[family].samples
                if x.labels.get("op") == op and x.labels["export"] == "e0" and x.name.endswith("_total")
            ]
            assert sample.labels["node"] == "disk0"
            return sample.value

        assert value("blkgraph_export_operations", "write") == s["wr_operations"]
        assert value("blkgraph_export_operations", "read") == s["rd_operations"]
        assert value("blkgraph_export_bytes", "read") == s["rd_bytes"]
        assert value("blkgraph_export_invalid_operations", "read") == s["invalid_rd_operations"]
        assert value("blkgraph_export_time_seconds", "write") == pytest.approx(
            s["wr_total_time_ns"] / 1e9
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert err.value.code == 404
        proc.terminate()
        assert proc.wait(30) == 0
