//! The `qmp_stream` harness: bytes as what a client writes to the QMP
//! control socket, read in chunks the fuzzer chooses.
//!
//! The input is the byte stream, except for byte `0xFF`, which marks where
//! one `read` ends and the next begins; `0xFF 0xFF` stands for one `0xFF`
//! byte of the stream. So a plain transcript is an input read in one go, and
//! the fuzzer splits it by inserting `0xFF`.
//!
//! The stream goes through `blkgraph_ctl::FuzzSession` (the server's
//! decoder and session, as a client's reader thread drives them) in the
//! chosen chunks and, if there is more than one, again whole. What must
//! hold: both give the
//! same reply lines (read boundaries never change what a client gets); every
//! line is one ASCII JSON object ending in CRLF with `return` or `error`
//! (with a known `class` and a `desc`) and perhaps `id`.
//!
//! Commands go to [`ParseOnly`]: the daemon's command table
//! (`blkgraph_backend::control`), whose argument parser answers every
//! command without running it. [`run_with`] takes any other
//! [`Dispatcher`].

use std::sync::{Arc, OnceLock};

use blkgraph_backend::control::{check_arguments, Control};
use blkgraph_backend::exports::Exports;
use blkgraph_ctl::{Dispatcher, ErrorClass, FuzzSession, NamedFds, QmpError};
use blkgraph_graph::Graph;
use serde_json::{json, Map, Value};

/// The message size limit of the fuzzed sessions: small, so that inputs of
/// libFuzzer's default length reach the oversized-message path.
pub const MAX_MESSAGE_SIZE: usize = 1024;

/// The byte that ends a chunk (doubled: the byte itself).
pub const SPLIT: u8 = 0xff;

/// The harness command that returns its arguments, so that replies carry
/// arbitrary client data (strings, numbers, nesting) to the encoder.
pub const ECHO: &str = "x-echo";

/// The daemon's command table, parsing only: its names are the daemon's
/// (`control::COMMANDS` and the job commands, see [`daemon_commands`])
/// and [`ECHO`], and `execute` runs
/// `control::check_arguments`, the parser every command goes through
/// before it runs, and returns `{}` without running anything. So every
/// argument error a client can get is the daemon's own, and both sessions
/// of one input see the same table. (`qmp_commands` runs the commands.)
pub struct ParseOnly;

/// The commands the daemon's `Control` lists in `query-commands`, asked of
/// a `Control` over an empty graph once per process.
pub fn daemon_commands() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let graph = Graph::shared();
        let exports = Arc::new(Exports::new(graph.clone()));
        Control::new(graph, exports, Box::new(|| {})).commands()
    })
}

impl Dispatcher for ParseOnly {
    fn execute(
        &self,
        command: &str,
        arguments: Map<String, Value>,
        _fds: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        if command == ECHO {
            return Ok(Value::Object(arguments));
        }
        check_arguments(command, arguments).map(|()| json!({}))
    }

    fn commands(&self) -> Vec<String> {
        daemon_commands()
            .iter()
            .cloned()
            .chain([ECHO.to_string()])
            .collect()
    }
}

/// Splits an input into the chunks the client's bytes arrive in (see the
/// module's documentation).
pub fn chunks(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut bytes = data.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        if b == SPLIT {
            if bytes.peek() == Some(&SPLIT) {
                bytes.next();
            } else {
                out.push(Vec::new());
                continue;
            }
        }
        out.last_mut().expect("never empty").push(b);
    }
    out
}

/// Checks one reply line: one ASCII JSON object ending in CRLF, with
/// `return` or `error` and perhaps `id`.
pub fn check_line(line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    assert!(line.is_ascii(), "reply is not ASCII: {text}");
    let body = line
        .strip_suffix(b"\r\n")
        .unwrap_or_else(|| panic!("reply does not end in CRLF: {text}"));
    assert!(
        !body.contains(&b'\n') && !body.contains(&b'\r'),
        "reply spans lines: {text}"
    );
    let value: Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {text}"));
    let reply = value
        .as_object()
        .unwrap_or_else(|| panic!("reply is not an object: {text}"));
    assert!(
        reply
            .keys()
            .all(|k| matches!(k.as_str(), "return" | "error" | "id")),
        "unexpected member in reply: {text}"
    );
    match (reply.get("return"), reply.get("error")) {
        (Some(_), None) => {}
        (None, Some(error)) => {
            let class = error["class"].as_str().unwrap_or_default();
            assert!(
                ErrorClass::from_name(class).is_some(),
                "unknown error class: {text}"
            );
            let desc = error["desc"].as_str().unwrap_or_default();
            assert!(!desc.is_empty(), "error without text: {text}");
            assert_eq!(error.as_object().map(Map::len), Some(2), "{text}");
        }
        _ => panic!("reply needs exactly one of return and error: {text}"),
    }
}

/// The harness with [`ParseOnly`].
pub fn run(data: &[u8]) {
    run_with(data, Arc::new(ParseOnly));
}

/// The harness with any command table (which must answer the same input
/// the same way twice).
pub fn run_with(data: &[u8], dispatcher: Arc<dyn Dispatcher>) {
    let chunks = chunks(data);
    let mut split = FuzzSession::new(dispatcher.clone(), MAX_MESSAGE_SIZE);
    let mut split_lines = Vec::new();
    for chunk in &chunks {
        split_lines.extend(split.feed(chunk));
    }
    let verbose = std::env::var_os("BLKGRAPH_FUZZ_VERBOSE").is_some();
    for line in &split_lines {
        if verbose {
            eprint!("{}", String::from_utf8_lossy(line));
        }
        check_line(line);
    }
    if chunks.len() == 1 {
        // Read in one go: that was the whole stream already.
        return;
    }
    let mut whole = FuzzSession::new(dispatcher, MAX_MESSAGE_SIZE);
    let whole_lines = whole.feed(&chunks.concat());
    if split_lines != whole_lines {
        let show = |lines: &[Vec<u8>]| {
            lines
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect::<String>()
        };
        panic!(
            "read boundaries changed the replies:\nin {} chunks:\n{}whole:\n{}",
            chunks.len(),
            show(&split_lines),
            show(&whole_lines)
        );
    }
    assert_eq!(split.negotiated(), whole.negotiated());
    assert_eq!(split.closed(), whole.closed());
}
