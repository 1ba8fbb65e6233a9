//! The QMP server's protocol layer over a real unix socket, with a test
//! dispatcher.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkgraph_ctl::{ClientError, ErrorClass, QmpClient, MAX_MESSAGE_SIZE};
use common::{error, start, wait_for, RawClient};
use serde_json::{json, Map, Value};

#[test]
fn greeting_is_the_first_line() {
    let server = start();
    let mut c = RawClient::connect(&server.path);
    assert_eq!(
        c.recv_line(),
        "{\"QMP\": {\"version\": {\"package\": \"blkgraph-test\", \"qemu\": \
         {\"major\": 9, \"micro\": 0, \"minor\": 2}}, \"capabilities\": []}}\r\n"
    );
}

#[test]
fn socket_mode_is_0600() {
    let server = start();
    let mode = std::fs::metadata(&server.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn commands_wait_for_negotiation() {
    let server = start();
    let mut c = RawClient::greeted(&server.path);
    let expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
    for cmd in ["echo", "query-commands", "no-such-command"] {
        assert_eq!(
            c.call(json!({"execute": cmd, "id": cmd})),
            error("CommandNotFound", expecting, Some(json!(cmd)))
        );
    }
    assert_eq!(server.dispatcher.calls.load(Ordering::SeqCst), 0);
    // oob cannot be enabled, and failing does not negotiate.
    assert_eq!(
        c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})),
        error("GenericError", "Capability oob not available", None)
    );
    assert_eq!(
        c.call(json!({"execute": "echo"})),
        error("CommandNotFound", expecting, None)
    );
    assert_eq!(
        c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1})),
        json!({"return": {}, "id": 1})
    );
    assert_eq!(
        c.call(json!({"execute": "qmp_capabilities", "arguments": {}})),
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
            None
        )
    );
    assert_eq!(
        c.call(json!({"execute": "echo", "arguments": {"a": 1}})),
        json!({"return": {"a": 1}})
    );
}

#[test]
fn negotiation_accepts_absent_and_empty_arguments() {
    let server = start();
    for args in [None, Some(json!({})), Some(json!({"enable": []}))] {
        let mut c = RawClient::greeted(&server.path);
        let mut msg = json!({"execute": "qmp_capabilities"});
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        assert_eq!(c.call(msg), json!({"return": {}}));
    }
}

#[test]
fn id_is_echoed_exactly() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    for id in [
        json!("__qmp#00000"),
        json!(0),
        json!(-17),
        json!(18446744073709551615u64),
        json!(1.5),
        json!(true),
        json!(null),
        json!([1, "two", {"three": [3]}]),
        json!({"nested": {"obj": [null, false]}, "n": 1}),
        json!("caf\u{e9} \u{1f600}"),
        json!(""),
    ] {
        assert_eq!(
            c.call(json!({"execute": "nothing", "id": id.clone()})),
            json!({"return": {}, "id": id.clone()}),
            "{id}"
        );
        assert_eq!(
            c.call(json!({"execute": "fail", "id": id.clone()})),
            error("GenericError", "Parameter 'x' is missing", Some(id.clone()))
        );
        assert_eq!(
            c.call(json!({"execute": "nope", "id": id.clone()})),
            error(
                "CommandNotFound",
                "The command nope has not been found",
                Some(id.clone())
            )
        );
        assert_eq!(
            c.call(json!({"execute": 1, "id": id.clone()})),
            error(
                "GenericError",
                "QMP input member 'execute' must be a string",
                Some(id.clone())
            )
        );
    }
}

#[test]
fn malformed_requests_execute_nothing() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    let cases = [
        (
            json!({"execute": "echo", "bogus": 1, "id": 1}),
            "QMP input member 'bogus' is unexpected",
        ),
        (
            json!({"exec-oob": "echo", "id": 1}),
            "QMP input member 'exec-oob' is unexpected",
        ),
        (
            json!({"arguments": {}, "id": 1}),
            "QMP input lacks member 'execute'",
        ),
        (
            json!({"execute": null, "id": 1}),
            "QMP input member 'execute' must be a string",
        ),
        (
            json!({"execute": "echo", "arguments": [1], "id": 1}),
            "QMP input member 'arguments' must be an object",
        ),
        (
            json!({"execute": "echo", "arguments": "a=b", "id": 1}),
            "QMP input member 'arguments' must be an object",
        ),
    ];
    for (msg, desc) in cases {
        assert_eq!(c.call(msg), error("GenericError", desc, Some(json!(1))));
    }
    for msg in [json!([{"execute": "echo"}]), json!("echo"), json!(3)] {
        assert_eq!(
            c.call(msg),
            error("GenericError", "QMP input must be a JSON object", None)
        );
    }
    assert_eq!(server.dispatcher.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn command_errors_keep_their_class() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    assert_eq!(
        c.call(json!({"execute": "find", "arguments": {"id": "vda"}, "id": "f"})),
        error(
            "DeviceNotFound",
            "Cannot find device='vda' nor node-name=''",
            Some(json!("f"))
        )
    );
    // A panicking command fails; the connection and the server go on.
    assert_eq!(
        c.call(json!({"execute": "panic", "id": 2})),
        error(
            "GenericError",
            "Internal error: command 'panic' failed unexpectedly",
            Some(json!(2))
        )
    );
    assert_eq!(
        c.call(json!({"execute": "echo", "arguments": {"ok": true}})),
        json!({"return": {"ok": true}})
    );
}

#[test]
fn query_commands_lists_all_commands() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    let reply = c.call(json!({"execute": "query-commands"}));
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in [
        "qmp_capabilities",
        "query-commands",
        "getfd",
        "closefd",
        "echo",
        "x-debug-query-block-graph",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert_eq!(names.len(), 12);
}

#[test]
fn output_is_ascii_and_faithful() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    let args = json!({"name": "d\u{e9}j\u{e0} vu \u{1f4be}", "ctl": "\u{1}\u{7f}", "k\u{f6}y": 1});
    c.send_json(&json!({"execute": "echo", "arguments": args}));
    let line = c.recv_line();
    assert!(
        line.contains("\\u00e9") && line.contains("\\ud83d\\udcbe"),
        "{line}"
    );
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply, json!({"return": args}));
}

#[test]
fn invalid_json_then_valid_command() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    // The error has no id; the next line is read normally.
    c.send(b"{\"execute\": \"echo\", \"id\": 1,}\n{\"execute\": \"echo\", \"id\": 2}\n");
    let e = c.recv();
    assert!(e.get("id").is_none(), "{e}");
    assert_eq!(e["error"]["class"], "GenericError");
    let desc = e["error"]["desc"].as_str().unwrap();
    assert!(desc.starts_with("JSON parse error, "), "{desc}");
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));
    // Unterminated input ends at the end of its line.
    c.send(b"{\"execute\": \"echo\", \"id\": \"x\n{\"execute\": \"echo\", \"id\": 3}\n");
    assert_eq!(
        c.recv(),
        error(
            "GenericError",
            "JSON parse error, end of line in string",
            None
        )
    );
    assert_eq!(c.recv(), json!({"return": {}, "id": 3}));
    // Plain text.
    c.send(b"help me\r\n{\"execute\": \"echo\", \"id\": 4}\r\n");
    assert_eq!(
        c.recv(),
        error(
            "GenericError",
            "JSON parse error, unexpected character 'h', expecting a value",
            None
        )
    );
    assert_eq!(c.recv(), json!({"return": {}, "id": 4}));
    // An unfinished object swallows what follows until a control character
    // resets the parser, as in QEMU.
    c.send(b"{\"execute\":\n\x1b\n{\"execute\": \"echo\", \"id\": 5}\n");
    let e = c.recv();
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error"));
    assert_eq!(c.recv(), json!({"return": {}, "id": 5}));
}

#[test]
fn stream_framing() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    // Several objects on a line, one object over several lines, no newline
    // at all between objects.
    c.send(b"{\"execute\":\"echo\",\"id\":1}{\"execute\":\"echo\",\"id\":2} {\"execute\":\n\"echo\",\n \"arguments\": {\"a\":\n[1,\n2]},\n\"id\": 3\n}");
    assert_eq!(c.recv(), json!({"return": {}, "id": 1}));
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));
    assert_eq!(c.recv(), json!({"return": {"a": [1, 2]}, "id": 3}));
    // Byte by byte.
    for b in b"{\"execute\": \"echo\", \"id\": \"slow\"}" {
        c.send(std::slice::from_ref(b));
    }
    assert_eq!(c.recv(), json!({"return": {}, "id": "slow"}));
}

#[test]
fn non_utf8_input() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    c.send(b"{\"execute\": \"echo\", \"arguments\": {\"a\": \"\xff\xfe\"}, \"id\": 1}\n");
    let e = c.recv();
    assert!(e.get("id").is_none(), "{e}");
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error, "));
    c.send(b"\xc3\xa9\n");
    assert_eq!(
        c.recv(),
        error(
            "GenericError",
            "JSON parse error, unexpected byte 0xc3, expecting a value",
            None
        )
    );
    // Valid UTF-8 in strings is fine.
    assert_eq!(
        c.call(json!({"execute": "echo", "arguments": {"a": "\u{e9}"}})),
        json!({"return": {"a": "\u{e9}"}})
    );
}

#[test]
fn message_size_limit() {
    let server = start();
    // Just under the limit: served.
    let mut c = RawClient::negotiated(&server.path);
    let head = r#"{"execute": "echo", "id": 1, "arguments": {"s": ""#;
    let tail = r#""}}"#;
    let fill = MAX_MESSAGE_SIZE - head.len() - tail.len();
    let msg = format!("{head}{}{tail}\n", "a".repeat(fill));
    c.send(msg.as_bytes());
    let reply = c.recv();
    assert_eq!(reply["id"], 1);
    assert_eq!(reply["return"]["s"].as_str().unwrap().len(), fill);

    // One byte more: an error, then the connection is closed.
    let mut c = RawClient::negotiated(&server.path);
    let msg = format!("{head}{}{tail}\n", "a".repeat(fill + 1));
    let writer = c.writer.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut writer = writer;
        // The server may close before it has read everything.
        let _ = std::io::Write::write_all(&mut writer, msg.as_bytes());
    });
    let e = c.recv();
    assert_eq!(
        e,
        error(
            "GenericError",
            &format!("JSON parse error, message exceeds the limit of {MAX_MESSAGE_SIZE} bytes"),
            None
        )
    );
    assert!(c.closed());
    sender.join().unwrap();
    // Others are not affected.
    let mut other = RawClient::negotiated(&server.path);
    assert_eq!(
        other.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

#[test]
fn random_bytes_affect_only_their_client() {
    let server = start();
    let mut good = RawClient::negotiated(&server.path);
    for seed in 0..4u64 {
        let mut bad = RawClient::connect(&server.path);
        let bytes = noise(256 << 10, seed);
        // Read replies concurrently so the server never waits for us.
        let mut reader = bad.reader.get_ref().try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = reader.read_to_end(&mut all);
            all
        });
        bad.send(&bytes);
        if seed % 2 == 0 {
            // Resynchronize, negotiate, run a command.
            bad.send(b"\x1b\n\"\x1b\n{\"execute\": \"qmp_capabilities\", \"id\": \"neg\"}\n");
            bad.send(b"{\"execute\": \"echo\", \"id\": \"after\"}\n");
        }
        assert_eq!(
            good.call(json!({"execute": "echo", "arguments": {"seed": seed}})),
            json!({"return": {"seed": seed}})
        );
        // Close our side: the server finishes and closes too.
        bad.writer.shutdown(std::net::Shutdown::Write).unwrap();
        let all = drain.join().unwrap();
        let text = String::from_utf8(all).expect("output is UTF-8");
        assert!(text.is_ascii());
        let mut lines = text.split_terminator("\r\n");
        let greeting: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert!(greeting.get("QMP").is_some());
        let replies: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(!replies.is_empty());
        if seed % 2 == 0 {
            assert_eq!(
                replies.last().unwrap(),
                &json!({"return": {}, "id": "after"})
            );
        }
    }
    assert_eq!(good.call(json!({"execute": "echo"})), json!({"return": {}}));
}

#[test]
fn disconnect_during_a_command() {
    let server = start();
    let mut c = RawClient::negotiated(&server.path);
    c.send_json(&json!({"execute": "sleep", "arguments": {"ms": 300}, "id": 1}));
    drop(c);
    let mut other = RawClient::negotiated(&server.path);
    wait_for("the command to finish", || {
        server.dispatcher.slept.load(Ordering::SeqCst) == 1
    });
    assert_eq!(
        other.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
    // Events after the client went away reach the others.
    server.events.emit("AFTER", json!({}));
    assert_eq!(other.recv()["event"], "AFTER");
}

#[test]
fn half_closed_client_gets_its_replies() {
    let server = start();
    let mut c = RawClient::connect(&server.path);
    c.send(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"echo\", \"id\": 9}\n");
    c.writer.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.recv().get("QMP").is_some());
    assert_eq!(c.recv(), json!({"return": {}}));
    assert_eq!(c.recv(), json!({"return": {}, "id": 9}));
    assert!(c.closed());
}

#[test]
fn long_command_does_not_block_other_clients() {
    let server = start();
    let mut slow = RawClient::negotiated(&server.path);
    slow.send_json(&json!({"execute": "sleep", "arguments": {"ms": 1500}, "id": "slow"}));
    let start = Instant::now();
    let mut fast = RawClient::negotiated(&server.path);
    for i in 0..20 {
        assert_eq!(
            fast.call(json!({"execute": "echo", "id": i})),
            json!({"return": {}, "id": i})
        );
    }
    server.events.emit("DURING", json!({"x": 1}));
    assert_eq!(fast.recv()["event"], "DURING");
    assert!(start.elapsed() < Duration::from_millis(1000));
    // The slow client got the event while its command ran, then its reply.
    assert_eq!(slow.recv()["event"], "DURING");
    assert_eq!(slow.recv(), json!({"return": {}, "id": "slow"}));
}

#[test]
fn concurrent_clients() {
    let server = start();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let path = server.path.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::negotiated(&path);
                for i in 0..200 {
                    let id = json!([t, i]);
                    assert_eq!(
                        c.call(json!({"execute": "echo", "arguments": {"t": t}, "id": id})),
                        json!({"return": {"t": t}, "id": id})
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(server.dispatcher.calls.load(Ordering::SeqCst), 1600);
}

#[test]
fn events_only_after_negotiation() {
    let server = start();
    let mut early = RawClient::greeted(&server.path);
    let mut a = RawClient::negotiated(&server.path);
    let mut b = RawClient::negotiated(&server.path);
    assert_eq!(server.events.subscribers(), 2);
    server.events.emit("FIRST", json!({"id": "fl-nbd"}));
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "FIRST");
        assert_eq!(e["data"], json!({"id": "fl-nbd"}));
        assert!(e["timestamp"]["seconds"].is_u64());
        assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    // The first line the late client sees after the greeting is its
    // negotiation reply, and it gets the events that follow.
    assert_eq!(
        early.call(json!({"execute": "qmp_capabilities", "id": "neg"})),
        json!({"return": {}, "id": "neg"})
    );
    // An event emitted by a command comes before the command's reply.
    early.send_json(&json!({"execute": "emit", "arguments": {"event": "SECOND"}, "id": 1}));
    assert_eq!(early.recv()["event"], "SECOND");
    assert_eq!(early.recv(), json!({"return": {}, "id": 1}));
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "SECOND");
        assert!(e.get("data").is_none());
    }
}

#[test]
fn slow_reader_is_dropped_without_blocking_others() {
    let server = start();
    let stuck = RawClient::negotiated(&server.path);
    let good = RawClient::negotiated(&server.path);
    assert_eq!(server.events.subscribers(), 2);
    let seen = Arc::new(AtomicUsize::new(0));
    let mut good_reader = good.reader;
    let reading = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::BufRead::read_line(&mut good_reader, &mut line).unwrap() > 0 {
                if line.contains("\"LAST\"") {
                    break;
                }
                seen.fetch_add(1, Ordering::SeqCst);
                line.clear();
            }
            seen.load(Ordering::SeqCst)
        })
    };
    let data = json!({"pad": "x".repeat(4096)});
    let mut slowest = Duration::ZERO;
    for i in 0..3000 {
        // Keep the good client well within its queue, however the threads
        // are scheduled; the stuck one falls behind for good.
        wait_for("the good client to read", || {
            i - seen.load(Ordering::SeqCst) < 500
        });
        let t = Instant::now();
        server.events.emit("BULK", data.clone());
        slowest = slowest.max(t.elapsed());
    }
    server.events.emit("LAST", json!({}));
    assert!(
        slowest < Duration::from_secs(1),
        "emit blocked for {slowest:?}"
    );
    assert_eq!(reading.join().unwrap(), 3000);
    assert_eq!(server.events.subscribers(), 1);
    // The stuck client was disconnected: after what was buffered, EOF.
    let mut stuck = stuck;
    assert!(stuck.closed());
    drop(good.writer);
}

#[test]
fn qmp_client_library() {
    let server = start();
    let mut c = QmpClient::connect(&server.path).unwrap();
    assert_eq!(c.greeting()["QMP"]["version"], common::version());
    c.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut args = Map::new();
    args.insert("k".into(), json!([1, 2]));
    assert_eq!(c.execute("echo", args).unwrap(), json!({"k": [1, 2]}));
    match c.execute("find", Map::new()) {
        Err(ClientError::Qmp(e)) => assert_eq!(e.class, ErrorClass::DeviceNotFound),
        other => panic!("{other:?}"),
    }
    let mut args = Map::new();
    args.insert("event".into(), json!("MINE"));
    c.execute("emit", args).unwrap();
    assert_eq!(c.next_event().unwrap()["event"], "MINE");
}

#[test]
fn server_survives_many_short_connections() {
    let server = start();
    for _ in 0..200 {
        let s = UnixStream::connect(&server.path).unwrap();
        drop(s);
    }
    let mut c = RawClient::negotiated(&server.path);
    assert_eq!(c.call(json!({"execute": "echo"})), json!({"return": {}}));
}
