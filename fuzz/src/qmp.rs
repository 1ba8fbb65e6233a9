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
//! Commands come from a [`Dispatcher`]: [`stand_in_commands`] is a
//! [`CommandTable`] with the daemon's command names, whose arguments are
//! parsed into structs the way the daemon parses them. To fuzz another
//! command table (the daemon's own, say), call [`run_with`] with it.

use std::sync::Arc;

use blkgraph_ctl::{Dispatcher, ErrorClass, FuzzSession, NamedFds, QmpError};
use blkgraph_graph::{Options, ThrottleLimits};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The message size limit of the fuzzed sessions: small, so that inputs of
/// libFuzzer's default length reach the oversized-message path.
pub const MAX_MESSAGE_SIZE: usize = 1024;

/// The byte that ends a chunk (doubled: the byte itself).
pub const SPLIT: u8 = 0xff;

/// A command's implementation: its arguments to its return value.
pub type Handler = Box<dyn Fn(Map<String, Value>) -> Result<Value, QmpError> + Send + Sync>;

/// A dispatcher made of named handlers, in `query-commands` order.
#[derive(Default)]
pub struct CommandTable {
    commands: Vec<(String, Handler)>,
}

impl CommandTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds command `name` with a handler of the raw arguments.
    pub fn raw(
        mut self,
        name: &str,
        handler: impl Fn(Map<String, Value>) -> Result<Value, QmpError> + Send + Sync + 'static,
    ) -> Self {
        self.commands.push((name.to_string(), Box::new(handler)));
        self
    }

    /// Adds command `name` whose arguments are parsed into `T` (see
    /// [`parse`]) before `handler` sees them.
    pub fn typed<T: DeserializeOwned>(
        self,
        name: &str,
        handler: impl Fn(T) -> Result<Value, QmpError> + Send + Sync + 'static,
    ) -> Self {
        self.raw(name, move |args| handler(parse(args)?))
    }
}

impl Dispatcher for CommandTable {
    fn execute(
        &self,
        command: &str,
        arguments: Map<String, Value>,
        _fds: &mut NamedFds,
    ) -> Result<Value, QmpError> {
        match self.commands.iter().find(|(name, _)| name == command) {
            Some((_, handler)) => handler(arguments),
            None => Err(QmpError::command_not_found(command)),
        }
    }

    fn commands(&self) -> Vec<String> {
        self.commands.iter().map(|(name, _)| name.clone()).collect()
    }
}

/// Parses command arguments as the daemon does (`control.rs`): strict JSON
/// types through `blkgraph_graph::Options`, errors that name the key.
pub fn parse<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    Options::from_json(Value::Object(args))
        .and_then(|o| o.parse(""))
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// No arguments at all.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// `blockdev-add`: the driver and node-name; the rest is the driver's.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAdd {
    /// The driver.
    pub driver: String,
    /// The node-name.
    pub node_name: String,
    /// The driver's options.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// Commands that name one node.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeName {
    /// The node.
    pub node_name: String,
}

/// `x-blockdev-replace`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Replace {
    /// `export` or `driver`.
    pub parent_type: String,
    /// The export, for `export`.
    #[serde(default)]
    pub export_id: Option<String>,
    /// The parent node, for `driver`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The child role, for `driver`.
    #[serde(default)]
    pub child: Option<String>,
    /// The node to point the edge at.
    pub new_child: String,
}

/// One action of `transaction`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The action's command name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its arguments.
    pub data: Map<String, Value>,
}

/// `transaction`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    /// The actions.
    pub actions: Vec<Action>,
    /// `{"completion-mode": ...}`.
    #[serde(default)]
    pub properties: Option<Map<String, Value>>,
}

/// `block-export-del`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExportDel {
    /// The export.
    pub id: String,
    /// `safe` or `hard`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// `object-add` of a throttle group.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectAdd {
    /// `throttle-group`.
    pub qom_type: String,
    /// The object id.
    pub id: String,
    /// The group's limits.
    #[serde(default)]
    pub limits: Option<ThrottleLimits>,
}

/// Commands that name one object or export.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Id {
    /// The id.
    pub id: String,
}

/// `block-dirty-bitmap-add`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapAdd {
    /// The node.
    pub node: String,
    /// The bitmap.
    pub name: String,
    /// Bytes per bit.
    #[serde(default)]
    pub granularity: Option<u64>,
    /// Must not be true.
    #[serde(default)]
    pub persistent: Option<bool>,
    /// Not recording.
    #[serde(default)]
    pub disabled: Option<bool>,
}

/// `query-named-block-nodes`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryNodes {
    /// Accepted and ignored.
    #[serde(default)]
    pub flat: Option<bool>,
}

fn done<T>(_: T) -> Result<Value, QmpError> {
    Ok(json!({}))
}

/// A stand-in for the daemon's command table: its command names, each
/// parsing its arguments into a struct and changing nothing. `x-echo`
/// returns its arguments, so that replies carry arbitrary client data.
pub fn stand_in_commands() -> CommandTable {
    CommandTable::new()
        .typed("query-version", |_: NoArgs| {
            Ok(json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "blkgraph-fuzz"}))
        })
        .typed("blockdev-add", done::<BlockdevAdd>)
        .typed("blockdev-del", done::<NodeName>)
        .typed("x-blockdev-replace", |r: Replace| {
            match r.parent_type.as_str() {
                "export" | "driver" => Ok(json!({})),
                other => Err(QmpError::generic(format!(
                    "Parameter 'parent-type' does not accept value '{other}'"
                ))),
            }
        })
        .typed("transaction", done::<Transaction>)
        .typed("query-named-block-nodes", |_: QueryNodes| Ok(json!([])))
        .typed("block-export-del", done::<ExportDel>)
        .typed("object-add", done::<ObjectAdd>)
        .typed("object-del", done::<Id>)
        .typed("block-dirty-bitmap-add", |a: BitmapAdd| {
            if a.persistent == Some(true) {
                Err(QmpError::generic("Persistent bitmaps are not supported"))
            } else {
                Ok(json!({}))
            }
        })
        .typed("quit", done::<NoArgs>)
        .raw("x-echo", |args| Ok(Value::Object(args)))
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

/// The harness with [`stand_in_commands`].
pub fn run(data: &[u8]) {
    run_with(data, Arc::new(stand_in_commands()));
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
