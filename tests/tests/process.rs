//! The daemon as a process: the modes of the sockets it creates.

mod frontend;
mod qmp;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
    _daemon: Daemon,
    sockets: Sockets,
    _dir: TempDir,
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
        _daemon: daemon,
        sockets,
        _dir: dir,
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
}
