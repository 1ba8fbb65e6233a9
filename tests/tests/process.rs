//! The daemon as a process: its pid file lock, the modes of the sockets it
//! creates, and the signals it ignores or exits on.

mod frontend;
mod qmp;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkgraph_ctl::QmpClient;
use blkgraph_tests::{Daemon, DaemonKind, ExportOptions, TempDir};
use frontend::blk::{read, S_OK};
use frontend::driver::Driver;
use qmp::exec;
use serde_json::json;

/// The sockets of one daemon, named after `tag` in a directory.
struct Sockets {
    vhost_user: PathBuf,
    nbd: PathBuf,
    qmp: PathBuf,
}

impl Sockets {
    fn new(dir: &Path, tag: &str) -> Sockets {
        Sockets {
            vhost_user: dir.join(format!("{tag}-vub.sock")),
            nbd: dir.join(format!("{tag}-nbd.sock")),
            qmp: dir.join(format!("{tag}-qmp.sock")),
        }
    }

    fn all(&self) -> [&Path; 3] {
        [&self.vhost_user, &self.nbd, &self.qmp]
    }

    /// A vhost-user-blk export of `image`, the NBD server and a QMP socket
    /// (`Daemon::start` adds `--pidfile`).
    fn args(&self, image: &Path) -> Vec<OsString> {
        let mut args = ExportOptions::new(image, &self.vhost_user).args();
        args.push("--nbd-server".into());
        let mut nbd = OsString::from("addr.type=unix,addr.path=");
        nbd.push(&self.nbd);
        args.push(nbd);
        args.push("--qmp".into());
        args.push(self.qmp.clone().into());
        args
    }
}

/// A blkgraph daemon with every kind of socket.
struct Running {
    daemon: Daemon,
    sockets: Sockets,
    image: PathBuf,
    dir: TempDir,
}

fn start() -> Running {
    let dir = TempDir::new("blkgraph-process").unwrap();
    let image = dir.path().join("disk.raw");
    blkgraph_tests::create_sparse_image(&image, 16 << 20).unwrap();
    let sockets = Sockets::new(dir.path(), "first");
    let daemon = Daemon::start(
        DaemonKind::Blkgraph,
        &sockets.args(&image),
        dir.path(),
        &sockets.vhost_user,
    )
    .unwrap();
    Running {
        daemon,
        sockets,
        image,
        dir,
    }
}

impl Running {
    /// The pid file `Daemon::start` gave it.
    fn pidfile(&self) -> PathBuf {
        self.dir.path().join("daemon.pid")
    }

    /// Ends the daemon with SIGTERM: it exits 0 and leaves neither its
    /// sockets nor its pid file behind.
    fn stop_cleanly(mut self) {
        let status = self.daemon.stop().expect("exit status");
        assert!(status.success(), "{status}: {}", self.daemon.log_contents());
        for path in self.sockets.all() {
            assert!(!path.exists(), "{} is left", path.display());
        }
        assert!(!self.pidfile().exists(), "the pid file is left");
    }
}

/// The daemon answers on its vhost-user and QMP sockets.
fn assert_serving(r: &Running) {
    let mut d = Driver::connect(&r.sockets.vhost_user, 1, true);
    let mem = d.mem.clone();
    assert_eq!(read(&mut d.queues[0], &mem, 0, 4096).status, S_OK);
    let mut qmp = QmpClient::connect(&r.sockets.qmp).unwrap();
    let exports = exec(&mut qmp, "query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["id"], "vub0");
}

/// The vhost-user, NBD and QMP sockets are all created with mode 0600.
#[test]
fn every_socket_is_owner_only() {
    let r = start();
    for path in r.sockets.all() {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    assert_serving(&r);
    r.stop_cleanly();
}

/// A second daemon given the same pid file (and sockets of its own) exits
/// 1 with QSD's message before it creates anything; the first keeps
/// serving and keeps its pid file until it exits.
#[test]
fn a_second_daemon_with_the_same_pidfile_is_refused() {
    let r = start();
    let pid = fs::read_to_string(r.pidfile()).unwrap();
    let second = Sockets::new(r.dir.path(), "second");
    let mut child = Command::new(DaemonKind::Blkgraph.binary())
        .args(second.args(&r.image))
        .arg("--pidfile")
        .arg(r.pidfile())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the second daemon runs beside the first");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "blkgraph: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n"
    );
    for path in second.all() {
        assert!(!path.exists(), "{} was created", path.display());
    }
    assert_eq!(fs::read_to_string(r.pidfile()).unwrap(), pid);
    assert_serving(&r);
    r.stop_cleanly();
}

/// Signals whose default action would kill the daemon and leave its
/// sockets and pid file behind are ignored; SIGTERM still ends it cleanly.
#[test]
fn signals_it_has_no_use_for_are_ignored() {
    let mut r = start();
    let mut signals = vec![
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGPIPE,
        libc::SIGALRM,
        libc::SIGPROF,
        libc::SIGVTALRM,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
        libc::SIGXFSZ,
    ];
    signals.extend([libc::SIGRTMIN(), libc::SIGRTMIN() + 3, libc::SIGRTMAX()]);
    for signal in signals {
        // SAFETY: kill(2) on our own child, which has not been reaped.
        let ret = unsafe { libc::kill(r.daemon.pid() as libc::pid_t, signal) };
        assert_eq!(ret, 0);
        std::thread::sleep(Duration::from_millis(20));
        if let Some(status) = r.daemon.try_exit_status() {
            panic!("signal {signal} ended the daemon: {status}");
        }
    }
    assert_serving(&r);
    r.stop_cleanly();
}
