//! The control socket against a running daemon: transactions are atomic,
//! permission conflicts change nothing, and the export keeps serving.

mod frontend;
mod qmp;

use std::ffi::OsString;

use blkgraph_ctl::QmpClient;
use blkgraph_tests::{check_pattern, fill_pattern, Daemon, DaemonKind, ExportOptions, TempDir};
use frontend::blk::{read, segment, simple, write, BlkRequest, S_IOERR, S_OK, T_DISCARD, T_FLUSH};
use frontend::driver::Driver;
use qmp::exec;
use serde_json::{json, Value};

const SIZE: u64 = 64 << 20;

struct Setup {
    qmp: QmpClient,
    qmp_path: std::path::PathBuf,
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
        qmp_path,
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

#[test]
fn aborted_bitmap_changes_under_guest_writes_lose_no_bit() {
    let mut s = setup();
    exec(
        &mut s.qmp,
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0", "granularity": 512}),
    )
    .unwrap();
    // Other clients keep clearing (or disabling) the bitmap in
    // transactions that abort, while the guest writes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let aborters: Vec<_> = (0..3)
        .map(|t| {
            let (path, stop) = (s.qmp_path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut qmp = QmpClient::connect(&path).unwrap();
                let mut n = t;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let change = if n % 2 == 0 {
                        json!({"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "b0"}})
                    } else {
                        json!({"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}})
                    };
                    let e = exec(
                        &mut qmp,
                        "transaction",
                        json!({"actions": [change, {"type": "abort", "data": {}}]}),
                    )
                    .unwrap_err();
                    assert_eq!(e, "Transaction aborted using Abort action");
                    n += 1;
                }
                n / 3
            })
        })
        .collect();
    let mem = s.driver.mem.clone();
    let q = &mut s.driver.queues[0];
    // 64 MiB in 64 KiB writes, sixteen at a time.
    let chunks = SIZE / 65536;
    for batch in 0..chunks / 16 {
        let data = vec![0x5au8; 65536];
        let reqs: Vec<BlkRequest> = (0..16)
            .map(|i| BlkRequest::new(q, &mem, 1, (batch * 16 + i) * 128, &data, 0))
            .collect();
        for r in &reqs {
            q.submit(&mem, &r.descs);
        }
        q.kick();
        let used = q.wait(&mem, 16);
        assert!(reqs.iter().all(|r| r.outcome(&mem, used[0]).status == S_OK));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let aborted: u64 = aborters.into_iter().map(|t| t.join().unwrap()).sum();
    let nodes = exec(&mut s.qmp, "query-named-block-nodes", json!({})).unwrap();
    let disk0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap();
    let b0 = &disk0["dirty-bitmaps"][0];
    assert_eq!(b0["recording"], true);
    assert_eq!(
        b0["count"],
        chunks * 65536,
        "{aborted} aborted transactions lost bits of the guest's writes"
    );
}

#[test]
fn a_hard_delete_answers_every_request_the_frontend_submitted() {
    let mut s = setup();
    exec(
        &mut s.qmp,
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "slow", "limits": {"iops-total": 20},
               "file": {"driver": "null-co", "size": SIZE, "read-zeroes": true}}),
    )
    .unwrap();
    let dir = TempDir::new("blkgraph-hard-delete").unwrap();
    let path = dir.path().join("slow.sock");
    exec(
        &mut s.qmp,
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "slow", "node-name": "slow",
               "addr": {"type": "unix", "path": path}}),
    )
    .unwrap();
    let mut d = Driver::connect(&path, 1, false);
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    // Twenty reads in flight at 20 IOPS: about a second of work.
    let first: Vec<BlkRequest> = (0..20)
        .map(|i| BlkRequest::new(q, &mem, 0, i * 8, &[], 4096))
        .collect();
    for r in &first {
        q.submit(&mem, &r.descs);
    }
    q.kick();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let deleter = {
        let path = s.qmp_path.clone();
        std::thread::spawn(move || {
            let mut qmp = QmpClient::connect(&path).unwrap();
            exec(
                &mut qmp,
                "block-export-del",
                json!({"id": "slow", "mode": "hard"}),
            )
        })
    };
    // Ten more while the delete drains the export: they are not started.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second: Vec<BlkRequest> = (0..10)
        .map(|i| BlkRequest::new(q, &mem, 0, 1000 + i * 8, &[], 4096))
        .collect();
    for r in &second {
        q.submit(&mem, &r.descs);
    }
    q.kick();
    // Every request gets an answer: those in flight complete, the queued
    // ones fail; none is left hanging.
    let used = q.wait(&mem, 30);
    deleter.join().unwrap().unwrap();
    let status = |r: &BlkRequest| r.outcome(&mem, used[0]).status;
    assert!(first.iter().all(|r| status(r) == S_OK));
    assert!(second.iter().all(|r| status(r) == S_IOERR));
    serves_io(&mut s.driver, 6);
}

/// The export's statistics in query-blockstats.
fn export_stats(qmp: &mut QmpClient) -> Value {
    let list = exec(qmp, "query-blockstats", json!({})).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["qdev"] == "vub0")
        .cloned()
        .expect("an entry for the export");
    assert_eq!(entry["node-name"], "disk0");
    entry["stats"].clone()
}

/// query-blockstats counts exactly what a frontend did, over two queues
/// (whose counters are summed), including refused requests; the node the
/// export serves shows the same counts with query-nodes.
#[test]
fn statistics_count_what_the_frontend_did() {
    let dir = TempDir::new("blkgraph-stats").unwrap();
    let image = dir.path().join("disk.raw");
    blkgraph_tests::create_sparse_image(&image, SIZE).unwrap();
    let socket = dir.path().join("vub.sock");
    let qmp_path = dir.path().join("qmp.sock");
    let mut options = ExportOptions::new(&image, &socket);
    options.num_queues = 2;
    options.discard_unmap = true;
    let mut args = options.args();
    args.push(OsString::from("--qmp"));
    args.push(qmp_path.clone().into());
    let _daemon = Daemon::start(DaemonKind::Blkgraph, &args, dir.path(), &socket).unwrap();
    let mut qmp = QmpClient::connect(&qmp_path).unwrap();
    let before = export_stats(&mut qmp);
    assert_eq!(before["rd_operations"], 0);
    assert!(before.get("idle_time_ns").is_none());

    let mut d = Driver::connect(&socket, 2, true);
    let mem = d.mem.clone();
    let data = vec![0x5au8; 65536];
    {
        let q = &mut d.queues[0];
        for i in 0..3u64 {
            assert_eq!(write(q, &mem, i * 256, &data).status, S_OK);
        }
        for i in 0..5u64 {
            assert_eq!(read(q, &mem, i * 8, 4096).status, S_OK);
        }
        // Past the end: refused, counted as an invalid read.
        assert_eq!(read(q, &mem, SIZE / 512, 4096).status, S_IOERR);
    }
    {
        let q = &mut d.queues[1];
        for i in 0..2u64 {
            assert_eq!(read(q, &mem, 4096 + i * 16, 8192).status, S_OK);
        }
        assert_eq!(simple(q, &mem, T_FLUSH, &[]).status, S_OK);
        assert_eq!(
            simple(q, &mem, T_DISCARD, &segment(2048, 16, 0)).status,
            S_OK
        );
    }
    let s = export_stats(&mut qmp);
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
    assert_eq!(n("wr_operations"), 3);
    assert_eq!(n("wr_bytes"), 3 * 65536);
    assert_eq!(n("rd_operations"), 7);
    assert_eq!(n("rd_bytes"), 5 * 4096 + 2 * 8192);
    assert_eq!(n("flush_operations"), 1);
    assert_eq!(n("unmap_operations"), 1);
    assert_eq!(n("unmap_bytes"), 16 * 512);
    assert_eq!(n("invalid_rd_operations"), 1);
    assert_eq!(n("failed_rd_operations"), 0);
    assert_eq!(n("wr_highest_offset"), 2 * 256 * 512 + 65536);
    assert!(n("rd_total_time_ns") > 0 && n("wr_total_time_ns") > 0);
    assert!(s["idle_time_ns"].is_u64());

    // The same counts for the node the export serves.
    let nodes = exec(&mut qmp, "query-blockstats", json!({"query-nodes": true})).unwrap();
    let disk0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node-name"] == "disk0")
        .unwrap();
    assert_eq!(disk0["stats"]["rd_operations"], 7);
    assert_eq!(disk0["parent"]["node-name"], "f0");

    // Latency histograms: every read of the queues lands in a bin.
    let unknown = exec(
        &mut qmp,
        "block-latency-histogram-set",
        json!({"id": "nope", "boundaries": [1000]}),
    );
    assert_eq!(unknown.unwrap_err(), "Device 'nope' not found");
    exec(
        &mut qmp,
        "block-latency-histogram-set",
        json!({"id": "vub0", "boundaries": [1000, 1000000], "boundaries-write": [10]}),
    )
    .unwrap();
    for (i, q) in d.queues.iter_mut().enumerate() {
        for j in 0..2u64 {
            assert_eq!(read(q, &mem, (i as u64 * 4 + j) * 8, 4096).status, S_OK);
        }
    }
    let s = export_stats(&mut qmp);
    let h = &s["rd_latency_histogram"];
    assert_eq!(h["boundaries"], json!([1000, 1000000]));
    let bins: u64 = h["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(bins, 4);
    assert_eq!(s["wr_latency_histogram"]["boundaries"], json!([10]));
    assert_eq!(s["rd_operations"], 11);
    // No boundaries at all: the histograms go.
    exec(
        &mut qmp,
        "block-latency-histogram-set",
        json!({"id": "vub0"}),
    )
    .unwrap();
    assert!(export_stats(&mut qmp).get("rd_latency_histogram").is_none());
}
