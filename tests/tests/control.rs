//! The control socket against a running daemon: transactions are atomic,
//! permission conflicts change nothing, and the export keeps serving.

mod frontend;
mod qmp;

use std::ffi::OsString;

use blkgraph_ctl::QmpClient;
use blkgraph_tests::{check_pattern, fill_pattern, Daemon, DaemonKind, ExportOptions, TempDir};
use frontend::blk::{read, write, S_OK};
use frontend::driver::Driver;
use qmp::exec;
use serde_json::{json, Value};

const SIZE: u64 = 64 << 20;

struct Setup {
    qmp: QmpClient,
    driver: Driver,
    _daemon: Daemon,
    _dir: TempDir,
}

fn setup() -> Setup {
    let dir = TempDir::new("blkgraph-control").unwrap();
    let image = dir.path().join("disk.raw");
    blkgraph_tests::create_sparse_image(&image, SIZE).unwrap();
    let socket = dir.path().join("vub.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let mut args = ExportOptions::new(&image, &socket).args();
    args.push(OsString::from("--qmp"));
    args.push(qmp_path.clone().into());
    let daemon = Daemon::start(DaemonKind::Blkgraph, &args, dir.path(), &socket).unwrap();
    let qmp = QmpClient::connect(&qmp_path).unwrap();
    let driver = Driver::connect(&socket, 1, true);
    Setup {
        qmp,
        driver,
        _daemon: daemon,
        _dir: dir,
    }
}

fn graph(qmp: &mut QmpClient) -> Value {
    exec(qmp, "x-debug-query-block-graph", json!({})).unwrap()
}

/// Writes a fresh pattern through the device and reads it back.
fn serves_io(d: &mut Driver, seed: u64) {
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    let mut data = vec![0u8; 8192];
    fill_pattern(&mut data, 1 << 20, seed);
    assert_eq!(write(q, &mem, (1 << 20) / 512, &data).status, S_OK);
    let r = read(q, &mem, (1 << 20) / 512, 8192);
    assert_eq!(r.status, S_OK);
    check_pattern(&r.data, 1 << 20, seed).unwrap();
}

/// Five actions that together insert a throttle filter above the export's
/// root and rearrange other nodes; `fail` makes action `fail` fail.
fn actions(fail: Option<usize>) -> Value {
    let mut a = vec![
        json!({"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "n1", "size": SIZE}}),
        json!({"type": "blockdev-add", "data": {"driver": "throttle", "node-name": "thr",
               "limits": {"iops-total": 100000}, "file": "disk0"}}),
        json!({"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "vub0",
               "new-child": "thr"}}),
        json!({"type": "blockdev-add", "data": {"driver": "raw", "node-name": "r1", "file": "n1"}}),
        json!({"type": "blockdev-del", "data": {"node-name": "spare"}}),
    ];
    let failing = [
        json!({"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "n1", "size": "big"}}),
        json!({"type": "blockdev-add", "data": {"driver": "throttle", "node-name": "thr",
               "throttle-group": "nope", "file": "disk0"}}),
        json!({"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "vub0",
               "new-child": "missing"}}),
        json!({"type": "blockdev-add", "data": {"driver": "raw", "node-name": "r1", "file": "n1",
               "offset": 2 * SIZE}}),
        json!({"type": "blockdev-del", "data": {"node-name": "disk0"}}),
    ];
    if let Some(i) = fail {
        a[i] = failing[i].clone();
    }
    json!({ "actions": a })
}

#[test]
fn every_failing_action_leaves_the_graph_as_it_was() {
    let mut s = setup();
    exec(
        &mut s.qmp,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "spare"}),
    )
    .unwrap();
    let before = graph(&mut s.qmp);
    serves_io(&mut s.driver, 1);
    for i in 0..5 {
        let e = exec(&mut s.qmp, "transaction", actions(Some(i)))
            .expect_err(&format!("action {i} should have failed"));
        assert!(!e.is_empty());
        assert_eq!(
            graph(&mut s.qmp),
            before,
            "after a failure of action {i}: {e}"
        );
        serves_io(&mut s.driver, 10 + i as u64);
    }
    // An abort action at the end undoes all the others.
    let mut with_abort = actions(None);
    with_abort["actions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "abort", "data": {}}));
    let e = exec(&mut s.qmp, "transaction", with_abort).unwrap_err();
    assert_eq!(e, "Transaction aborted using Abort action");
    assert_eq!(graph(&mut s.qmp), before);
    // The same actions without a failure take effect together.
    exec(&mut s.qmp, "transaction", actions(None)).unwrap();
    let exports = exec(&mut s.qmp, "query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["node-name"], "thr");
    serves_io(&mut s.driver, 20);
    assert_ne!(graph(&mut s.qmp), before);
}

#[test]
fn a_permission_conflict_is_refused_and_changes_nothing() {
    let mut s = setup();
    let before = graph(&mut s.qmp);
    // A copy-before-write filter on disk0 while vub0 still writes it: the
    // export's root must move to the filter in the same transaction.
    let e = exec(
        &mut s.qmp,
        "transaction",
        json!({"actions": [
            {"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "tmp", "size": SIZE}},
            {"type": "blockdev-add", "data": {"driver": "copy-before-write", "node-name": "cbw",
             "file": "disk0", "target": "tmp"}},
        ]}),
    )
    .unwrap_err();
    assert_eq!(
        e,
        "Permission conflict on node 'disk0': permissions 'write' are both required by export \
         'vub0' (uses node 'disk0' as 'root' child) and unshared by node 'cbw' (uses node 'disk0' \
         as 'file' child)"
    );
    assert_eq!(graph(&mut s.qmp), before);
    // The writable export onto a read-only node.
    exec(
        &mut s.qmp,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "ro", "size": SIZE, "read-only": true}),
    )
    .unwrap();
    let with_ro = graph(&mut s.qmp);
    let e = exec(
        &mut s.qmp,
        "x-blockdev-replace",
        json!({"parent-type": "export", "export-id": "vub0", "new-child": "ro"}),
    )
    .unwrap_err();
    assert!(e.contains("is read-only"), "{e}");
    assert_eq!(graph(&mut s.qmp), with_ro);
    serves_io(&mut s.driver, 3);
}

#[test]
fn bad_arguments_name_the_key_and_change_nothing() {
    let mut s = setup();
    let before = graph(&mut s.qmp);
    let cases = [
        (
            "blockdev-del",
            json!({"node": "disk0"}),
            "Parameter 'node' is unexpected",
        ),
        (
            "blockdev-del",
            json!({}),
            "Parameter 'node-name' is missing",
        ),
        (
            "blockdev-del",
            json!({"node-name": 7}),
            "Invalid parameter type for 'node-name'",
        ),
        (
            "x-blockdev-replace",
            json!({"parent-type": "export", "export-id": "vub0", "new-child": "disk0", "extra": 1}),
            "Parameter 'extra' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "x", "filename": "/nonexistent/f"}),
            "Could not open '/nonexistent/f'",
        ),
        (
            "transaction",
            json!({"actions": [{"type": "bogus", "data": {}}]}),
            "'type' does not accept value 'bogus'",
        ),
    ];
    for (cmd, a, want) in cases {
        let e = exec(&mut s.qmp, cmd, a).unwrap_err();
        assert!(e.contains(want), "{cmd}: {e}");
        assert_eq!(graph(&mut s.qmp), before);
    }
    serves_io(&mut s.driver, 4);
}

#[test]
fn exports_are_added_and_deleted_at_run_time() {
    let mut s = setup();
    let dir = TempDir::new("blkgraph-export").unwrap();
    let path = dir.path().join("second.sock");
    exec(
        &mut s.qmp,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n9", "read-zeroes": true}),
    )
    .unwrap();
    exec(
        &mut s.qmp,
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "second", "node-name": "n9",
               "addr": {"type": "unix", "path": path}}),
    )
    .unwrap();
    let mut d = Driver::connect(&path, 1, false);
    let mem = d.mem.clone();
    assert_eq!(read(&mut d.queues[0], &mem, 0, 4096).status, S_OK);
    // Safe deletion refuses while a frontend is connected; hard drops it.
    let e = exec(&mut s.qmp, "block-export-del", json!({"id": "second"})).unwrap_err();
    assert!(e.contains("in use"), "{e}");
    exec(
        &mut s.qmp,
        "block-export-del",
        json!({"id": "second", "mode": "hard"}),
    )
    .unwrap();
    let event = s.qmp.next_event().unwrap();
    assert_eq!(event["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(event["data"]["id"], "second");
    assert!(!path.exists());
    drop(d);
    exec(&mut s.qmp, "blockdev-del", json!({"node-name": "n9"})).unwrap();
    serves_io(&mut s.driver, 5);
}
