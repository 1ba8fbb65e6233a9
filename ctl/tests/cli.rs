//! The `blkgraph-ctl` binary against an in-process server.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{start, wait_for};
use serde_json::{json, Value};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blkgraph-ctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ctl_on(socket: &Path, args: &[&str]) -> Output {
    let mut all = vec!["-s", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    ctl(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn key_value_arguments() {
    let server = start();
    let o = ctl_on(
        &server.path,
        &[
            "echo",
            "driver=raw",
            "node-name=disk0",
            "file.driver=file",
            "file.filename=/tmp/a b.img",
            "read-only=false",
            "size=1024",
            "detect-zeroes:=\"off\"",
            "opts:={\"a\": [1, null]}",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    // Pretty-printed.
    assert!(out.starts_with("{\n  \""), "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({"driver": "raw", "node-name": "disk0",
            "file": {"driver": "file", "filename": "/tmp/a b.img"},
            "read-only": false, "size": 1024, "detect-zeroes": "off",
            "opts": {"a": [1, null]}})
    );
}

#[test]
fn json_object_argument_and_empty_return() {
    let server = start();
    let o = ctl_on(&server.path, &["echo", r#"{"x": {"y": [true]}, "u": "é"}"#]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, json!({"x": {"y": [true]}, "u": "é"}));
    let o = ctl_on(&server.path, &["nothing"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o), "");
    assert_eq!(stderr(&o), "");
}

#[test]
fn qmp_error_exits_1() {
    let server = start();
    let o = ctl_on(&server.path, &["find", "id=vda"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        "blkgraph-ctl: DeviceNotFound: Cannot find device='vda' nor node-name=''\n"
    );
    let o = ctl_on(&server.path, &["no-such-command"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "blkgraph-ctl: CommandNotFound: The command no-such-command has not been found\n"
    );
}

#[test]
fn usage_errors_exit_2() {
    let server = start();
    for (args, msg) in [
        (&["echo"][..], "no socket given: use -s SOCKET"),
        (&["-s", "x"], "no command given"),
        (&["--bogus", "echo"], "unknown option '--bogus'"),
    ] {
        let o = ctl(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&o).starts_with(&format!("blkgraph-ctl: {msg}\n")),
            "{}",
            stderr(&o)
        );
    }
    let o = ctl_on(&server.path, &["echo", "novalue"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("'novalue' is not key=value"));
    let o = ctl_on(&server.path, &["graph", "--format", "svg"]);
    assert_eq!(o.status.code(), Some(2));
    let o = ctl_on(&server.path, &["events", "x=1"]);
    assert_eq!(o.status.code(), Some(2));
    // Nothing reached the server.
    assert_eq!(
        server
            .dispatcher
            .calls
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[test]
fn help_and_version() {
    let o = ctl(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("Usage: blkgraph-ctl -s SOCKET COMMAND"));
    let o = ctl(&["-V"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("blkgraph-ctl "));
}

#[test]
fn connection_failure_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let o = ctl_on(&missing, &["echo"]);
    assert_eq!(o.status.code(), Some(3));
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!(
            "blkgraph-ctl: cannot connect to {}: ",
            missing.display()
        )),
        "{err}"
    );
    // A socket that is not a QMP server: it closes at once.
    let path = dir.path().join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || drop(listener.accept().unwrap()));
    let o = ctl_on(&path, &["echo"]);
    t.join().unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("closed the connection"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn graph_as_dot_and_json() {
    let server = start();
    let o = ctl_on(&server.path, &["graph"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        r#"digraph blkgraph {
    node [shape=box];
    "1" [label="block-export\nvub0", shape=cds];
    "2" [label="block-driver\nraw disk0", shape=ellipse];
    "3" [label="block-driver\nfile f0", shape=ellipse];
    "1" -> "2" [label="root\nR W / shared: R W"];
    "2" -> "3" [label="file\nR W / shared: R U"];
}
"#
    );
    let o = ctl_on(&server.path, &["graph", "--format", "json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3);
    let o = ctl_on(&server.path, &["graph", "--format=dot"]);
    assert!(stdout(&o).starts_with("digraph blkgraph {"));
}

#[test]
fn events_are_printed_as_they_arrive() {
    let server = start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_blkgraph-ctl"))
        .args(["-s", server.path.to_str().unwrap(), "events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("blkgraph-ctl to negotiate", || {
        server.events.subscribers() == 1
    });
    server
        .events
        .emit("BLOCK_EXPORT_DELETED", json!({"id": "fl-nbd"}));
    server
        .events
        .emit("JOB_STATUS_CHANGE", json!({"id": "j", "status": "ready"}));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(first["data"], json!({"id": "fl-nbd"}));
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["event"], "JOB_STATUS_CHANGE");
    child.kill().unwrap();
    child.wait().unwrap();
}
