//! Image fleecing end to end: a frontend writes through the vhost-user-blk
//! device while a copy-before-write filter is inserted above the export's
//! root in one transaction, and real NBD clients (qemu-io, nbdinfo,
//! nbdcopy) read the point-in-time snapshot.

mod frontend;
mod qmp;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use blkgraph_ctl::QmpClient;
use blkgraph_tests::{check_pattern, fill_pattern, Daemon, DaemonKind, ExportOptions, TempDir};
use frontend::blk::{read, write, S_IOERR, S_OK};
use frontend::driver::Driver;
use qmp::exec;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

struct Fleece {
    qmp: QmpClient,
    guest: Driver,
    dir: TempDir,
    image: PathBuf,
    nbd: PathBuf,
    _daemon: Daemon,
}

/// A daemon exporting a 64 MiB image (written with `init` first) on
/// vhost-user-blk, with QMP and an NBD server.
fn start(init: impl FnOnce(&Path)) -> Fleece {
    let dir = TempDir::new("blkgraph-fleece").unwrap();
    let image = dir.path().join("disk.raw");
    blkgraph_tests::create_sparse_image(&image, SIZE).unwrap();
    init(&image);
    let socket = dir.path().join("vub.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let nbd = dir.path().join("nbd.sock");
    let mut opts = ExportOptions::new(&image, &socket);
    opts.discard_unmap = true;
    let mut args = opts.args();
    args.extend([OsString::from("--qmp"), qmp_path.clone().into()]);
    let daemon = Daemon::start(DaemonKind::Blkgraph, &args, dir.path(), &socket).unwrap();
    let mut qmp = QmpClient::connect(&qmp_path).unwrap();
    exec(
        &mut qmp,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    )
    .unwrap();
    let guest = Driver::connect(&socket, 1, true);
    Fleece {
        qmp,
        guest,
        dir,
        image,
        nbd,
        _daemon: daemon,
    }
}

impl Fleece {
    fn temp(&self) -> PathBuf {
        self.dir.path().join("temp.raw")
    }

    /// Builds the fleecing graph in one transaction and exports the
    /// snapshot over NBD as `fleece`.
    fn begin(&mut self, cbw_extra: Value, pre: Vec<Value>, target: Value) {
        let mut cbw = json!({"driver": "copy-before-write", "node-name": "fl-cbw",
            "file": "disk0", "target": "fl-tmp"});
        cbw.as_object_mut()
            .unwrap()
            .extend(cbw_extra.as_object().unwrap().clone());
        let mut actions = pre;
        actions.extend([
            json!({"type": "blockdev-add", "data": target}),
            json!({"type": "blockdev-add", "data": cbw}),
            json!({"type": "x-blockdev-replace", "data": {"parent-type": "export",
                   "export-id": "vub0", "new-child": "fl-cbw"}}),
            json!({"type": "blockdev-add", "data": {"driver": "snapshot-access",
                   "node-name": "fl-access", "discard": "unmap", "file": "fl-cbw"}}),
        ]);
        exec(&mut self.qmp, "transaction", json!({ "actions": actions })).unwrap();
    }

    fn raw_temp(&self) -> Value {
        blkgraph_tests::create_sparse_image(&self.temp(), SIZE).unwrap();
        json!({"driver": "raw", "node-name": "fl-tmp", "discard": "unmap",
               "file": {"driver": "file", "filename": self.temp(), "discard": "unmap"}})
    }

    fn export(&mut self, writable: bool, bitmaps: Value) {
        exec(
            &mut self.qmp,
            "block-export-add",
            json!({"type": "nbd", "id": "fl-nbd", "node-name": "fl-access", "name": "fleece",
                   "writable": writable, "bitmaps": bitmaps}),
        )
        .unwrap();
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///fleece?socket={}", self.nbd.display())
    }

    /// Tears the fleecing graph down in one transaction.
    fn end(&mut self) {
        exec(
            &mut self.qmp,
            "block-export-del",
            json!({"id": "fl-nbd", "mode": "hard"}),
        )
        .unwrap();
        exec(
            &mut self.qmp,
            "transaction",
            json!({"actions": [
                {"type": "blockdev-del", "data": {"node-name": "fl-access"}},
                {"type": "x-blockdev-replace", "data": {"parent-type": "export",
                 "export-id": "vub0", "new-child": "disk0"}},
                {"type": "blockdev-del", "data": {"node-name": "fl-cbw"}},
                {"type": "blockdev-del", "data": {"node-name": "fl-tmp"}},
            ]}),
        )
        .unwrap();
    }

    fn guest_write(&mut self, off: u64, len: usize, byte: u8) {
        let mem = self.guest.mem.clone();
        let out = write(&mut self.guest.queues[0], &mem, off / 512, &vec![byte; len]);
        assert_eq!(out.status, S_OK, "guest write at {off}");
    }

    fn cbw_info(&mut self) -> Value {
        let nodes = exec(&mut self.qmp, "query-named-block-nodes", json!({})).unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "fl-cbw")
            .map(|n| n["__org.blkgraph_snapshot"].clone())
            .unwrap()
    }
}

/// Runs qemu-io on the snapshot; returns (success, output).
fn qemu_io(uri: &str, cmd: &str) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", uri, "-c", cmd])
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let ok =
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification");
    (ok, text)
}

fn qemu_io_write(path: &Path, byte: u8, off: u64, len: u64) {
    let st = Command::new("qemu-io")
        .args(["-f", "raw", path.to_str().unwrap(), "-c"])
        .arg(format!("write -P {byte:#x} {off} {len}"))
        .status()
        .unwrap();
    assert!(st.success());
}

const PATTERNS: [(u8, u64); 4] = [
    (0x5d, 0),
    (0xd5, MIB),
    (0xdc, 32 * MIB),
    (0xcd, SIZE - 65536),
];
const OVERWRITES: [(u8, u64); 4] = [
    (0xab, 0),
    (0xad, 0xf8000),
    (0x1d, 0x2008000),
    (0xea, 0x3fe0000),
];
const ZEROES: [(u64, u64); 3] = [(0xf8000, 32768), (0x2010000, 32768), (0x3fe0000, 65536)];

fn check_view(f: &Fleece, bitmap: bool) {
    for (byte, off) in PATTERNS {
        let (ok, out) = qemu_io(&f.uri(), &format!("read -P {byte:#x} {off} 64k"));
        assert!(ok, "pattern {byte:#x} at {off}: {out}");
    }
    for (off, len) in ZEROES {
        let (ok, out) = qemu_io(&f.uri(), &format!("read -P 0 {off} {len}"));
        if bitmap {
            assert!(
                !ok && out.contains("Invalid argument"),
                "outside the bitmap at {off}: {out}"
            );
        } else {
            assert!(ok, "zeroes at {off}: {out}");
        }
    }
}

fn image_fleecing(bitmap: bool) {
    let mut f = start(|image| {
        for (byte, off) in PATTERNS {
            qemu_io_write(image, byte, off, 65536);
        }
    });
    let mut pre = Vec::new();
    if bitmap {
        // Only the pattern clusters are in the bitmap, as if it had been
        // recording while they were written.
        pre.push(
            json!({"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b0"}}),
        );
    }
    if bitmap {
        exec(&mut f.qmp, "transaction", json!({"actions": pre})).unwrap();
        for (byte, off) in PATTERNS {
            f.guest_write(off, 65536, byte);
        }
    }
    let temp = f.raw_temp();
    let extra = if bitmap {
        json!({"bitmap": {"node": "disk0", "name": "b0"}})
    } else {
        json!({})
    };
    f.begin(extra, vec![], temp);
    f.export(false, json!([]));
    check_view(&f, bitmap);
    for (byte, off) in OVERWRITES {
        f.guest_write(off, 65536, byte);
    }
    check_view(&f, bitmap);
    f.end();
    // The guest's data reached the disk; untouched halves survived.
    let image = std::fs::read(&f.image).unwrap();
    let is = |off: u64, len: u64, byte: u8| {
        image[off as usize..(off + len) as usize]
            .iter()
            .all(|&b| b == byte)
    };
    for (byte, off) in OVERWRITES {
        assert!(is(off, 65536, byte), "overwrite {byte:#x}");
    }
    assert!(is(0x108000, 32768, 0xd5));
    assert!(is(32 * MIB, 32768, 0xdc));
    assert!(is(SIZE - 65536, 65536, 0xcd));
}

#[test]
fn image_fleecing_full() {
    image_fleecing(false);
}

#[test]
fn image_fleecing_with_a_bitmap() {
    image_fleecing(true);
}

#[test]
fn snapshot_is_the_point_in_time_under_load() {
    let mut f = start(|image| {
        let mut data = vec![0u8; SIZE as usize];
        fill_pattern(&mut data, 0, 77);
        std::fs::write(image, &data).unwrap();
    });
    // The reference: the image at the commit instant (no write in flight).
    let reference = std::fs::read(&f.image).unwrap();
    let temp = f.raw_temp();
    f.begin(json!({}), vec![], temp);
    f.export(false, json!([]));
    let out = f.dir.path().join("snapshot.raw");
    let mut copy = Command::new("nbdcopy")
        .arg(f.uri())
        .arg(&out)
        .spawn()
        .expect("run nbdcopy");
    // Random writes with read-back while nbdcopy reads the snapshot.
    let mut model = reference.clone();
    let mut x = 12345u64;
    for i in 0..400u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (SIZE / 4096)) * 4096;
        let len = 4096 * (1 + (x >> 40) % 8) as usize;
        let len = len.min((SIZE - off) as usize);
        let mut data = vec![0u8; len];
        fill_pattern(&mut data, off, 1000 + i);
        let mem = f.guest.mem.clone();
        assert_eq!(
            write(&mut f.guest.queues[0], &mem, off / 512, &data).status,
            S_OK
        );
        let back = read(&mut f.guest.queues[0], &mem, off / 512, len as u32);
        check_pattern(&back.data, off, 1000 + i).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    assert!(copy.wait().unwrap().success());
    let snapshot = std::fs::read(&out).unwrap();
    assert!(
        snapshot == reference,
        "the snapshot differs from the image at the commit instant"
    );
    f.end();
    assert!(
        std::fs::read(&f.image).unwrap() == model,
        "the image lacks guest writes"
    );
}

#[test]
fn snapshot_discard_gives_space_back() {
    let mut f = start(|image| {
        let mut data = vec![0u8; 8 * MIB as usize];
        fill_pattern(&mut data, 0, 5);
        blkgraph_tests::write_file_range(image, 0, &data).unwrap();
    });
    let temp = f.raw_temp();
    f.begin(json!({}), vec![], temp);
    f.export(true, json!([]));
    f.guest_write(0, 4 * MIB as usize, 0x42);
    let blocks = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(f.temp()).unwrap());
    let before = blocks();
    assert!(before >= 4 * MIB / 512);
    // The backup client is done with the first 4 MiB.
    let st = Command::new("qemu-io")
        .args(["-f", "raw", &f.uri(), "-c", "discard 0 4M"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        blocks() + 4 * MIB / 512 <= before,
        "{before} -> {}",
        blocks()
    );
    let (ok, out) = qemu_io(&f.uri(), "read 0 64k");
    assert!(!ok, "a discarded range must not be readable: {out}");
    // Discard a range never copied, then write it: no copy is made.
    let st = Command::new("qemu-io")
        .args(["-f", "raw", &f.uri(), "-c", "discard 4M 2M"])
        .status()
        .unwrap();
    assert!(st.success());
    let copied = f.cbw_info()["clusters-copied"].as_u64().unwrap();
    f.guest_write(4 * MIB, 2 * MIB as usize, 0x43);
    assert_eq!(f.cbw_info()["clusters-copied"].as_u64().unwrap(), copied);
    f.end();
}

#[test]
fn incremental_backup_exports_the_dirty_bitmap() {
    let mut f = start(|_| {});
    // The bitmap records from the last backup on.
    exec(
        &mut f.qmp,
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "since-last"}),
    )
    .unwrap();
    f.guest_write(MIB, 65536, 1);
    f.guest_write(10 * MIB, 3 * 65536, 2);
    let temp = f.raw_temp();
    // The bitmap switch and the insertion in one transaction: a fresh
    // bitmap starts recording, the old one is frozen for this backup.
    f.begin(
        json!({"bitmap": {"node": "disk0", "name": "since-last"}}),
        vec![
            json!({"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "next"}}),
            json!({"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "since-last"}}),
        ],
        temp,
    );
    f.export(false, json!([{"node": "disk0", "name": "since-last"}]));
    f.guest_write(20 * MIB, 65536, 3);
    let out = Command::new("nbdinfo")
        .args(["--map=qemu:dirty-bitmap:since-last", "--json", &f.uri()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(MIB, 65536), (10 * MIB, 3 * 65536)]);
    f.end();
    let nodes = exec(&mut f.qmp, "query-named-block-nodes", json!({})).unwrap();
    let disk0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap();
    let next = disk0["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "next")
        .unwrap();
    assert_eq!(next["count"], 65536);
}

#[test]
fn cbw_timeout_with_a_throttled_target() {
    for (mode, guest_ok) in [("break-guest-write", false), ("break-snapshot", true)] {
        let mut f = start(|image| {
            blkgraph_tests::write_file_range(image, 0, &vec![7u8; MIB as usize]).unwrap();
        });
        blkgraph_tests::create_sparse_image(&f.temp(), SIZE).unwrap();
        let target = json!({"driver": "throttle", "node-name": "fl-tmp",
            "limits": {"bps-write": 300 * 1024},
            "file": {"driver": "file", "filename": f.temp()}});
        f.begin(
            json!({"on-cbw-error": mode, "cbw-timeout": 1}),
            vec![],
            target,
        );
        f.export(false, json!([]));
        f.guest_write(0, 512 * 1024, 1);
        let mem = f.guest.mem.clone();
        let second = write(&mut f.guest.queues[0], &mem, 1024, &vec![2u8; 512 * 1024]).status;
        let (snap_ok, out) = qemu_io(&f.uri(), "read -P 7 0 1M");
        if guest_ok {
            assert_eq!(second, S_OK, "{mode}");
            assert!(!snap_ok, "{mode}: the snapshot must be broken: {out}");
            assert_eq!(f.cbw_info()["snapshot-valid"], false);
        } else {
            assert_eq!(second, S_IOERR, "{mode}");
            assert!(snap_ok, "{mode}: the snapshot keeps the old data: {out}");
        }
    }
}

#[test]
fn overlapping_snapshot_reads_status_and_guest_writes() {
    let mut f = start(|image| {
        let mut data = vec![0u8; 4 * MIB as usize];
        fill_pattern(&mut data, 0, 9);
        blkgraph_tests::write_file_range(image, 0, &data).unwrap();
    });
    let temp = f.raw_temp();
    f.begin(json!({}), vec![], temp);
    f.export(false, json!([]));
    let uri = f.uri();
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    if i % 2 == 0 {
                        let out = Command::new("nbdcopy").args([&uri, "-"]).output().unwrap();
                        assert!(out.status.success());
                        let mut want = vec![0u8; SIZE as usize];
                        fill_pattern(&mut want[..4 * MIB as usize], 0, 9);
                        assert!(
                            out.stdout == want,
                            "snapshot data changed under guest writes"
                        );
                    } else {
                        let st = Command::new("nbdinfo")
                            .args(["--map", &uri])
                            .output()
                            .unwrap();
                        assert!(st.status.success());
                    }
                }
            })
        })
        .collect();
    for i in 0..200u64 {
        f.guest_write((i * 4096 * 7) % (4 * MIB), 8192, (i % 250) as u8 + 1);
    }
    for r in readers {
        r.join().unwrap();
    }
    f.end();
}

/// A tmpfs of 1 MiB, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: PathBuf) -> SmallFs {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        SmallFs(at)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn on_cbw_error_with_a_failing_target() {
    for (mode, guest_ok) in [("break-guest-write", false), ("break-snapshot", true)] {
        let mut f = start(|image| {
            blkgraph_tests::write_file_range(image, 0, &vec![7u8; 4 * MIB as usize]).unwrap();
        });
        // The target runs out of space after 1 MiB of copies.
        let fs = SmallFs::mount(f.dir.path().join("small"));
        let temp = fs.0.join("temp.raw");
        blkgraph_tests::create_sparse_image(&temp, SIZE).unwrap();
        let target = json!({"driver": "raw", "node-name": "fl-tmp",
            "file": {"driver": "file", "filename": temp}});
        f.begin(json!({"on-cbw-error": mode}), vec![], target);
        f.export(false, json!([]));
        f.guest_write(0, 512 * 1024, 1);
        let mem = f.guest.mem.clone();
        let second = write(
            &mut f.guest.queues[0],
            &mem,
            2 * MIB / 512,
            &vec![2u8; 2 * MIB as usize],
        )
        .status;
        let (first_ok, out) = qemu_io(&f.uri(), "read -P 7 0 512k");
        if guest_ok {
            assert_eq!(second, S_OK, "{mode}");
            assert!(
                !first_ok,
                "{mode}: every snapshot read fails once broken: {out}"
            );
            let info = f.cbw_info();
            assert_eq!(info["snapshot-valid"], false);
            assert!(
                info["snapshot-error"].as_str().unwrap().contains("space"),
                "{info}"
            );
            let event = f.qmp.next_event().unwrap();
            assert_eq!(event["event"], "__org.blkgraph_SNAPSHOT_BROKEN");
        } else {
            assert_eq!(second, S_IOERR, "{mode}");
            assert!(first_ok, "{mode}: the snapshot stays valid: {out}");
            let (ok, out) = qemu_io(&f.uri(), "read -P 7 2M 2M");
            assert!(ok, "{mode}: the source was not overwritten: {out}");
        }
        f.end();
        drop(fs);
    }
}
