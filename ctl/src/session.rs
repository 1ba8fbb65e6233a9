//! One client's protocol state: capabilities negotiation, the commands the
//! server answers itself (with the client's named file descriptors), and
//! replies.

use std::os::unix::io::OwnedFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::dispatcher::Dispatcher;
use crate::error::{ErrorClass, QmpError};
use crate::fds::NamedFds;
use crate::json::to_line;
use crate::request::{parse_request, take_id};

/// The negotiation command.
const QMP_CAPABILITIES: &str = "qmp_capabilities";
/// The command listing commands.
const QUERY_COMMANDS: &str = "query-commands";
/// The command naming the file descriptor sent with it.
const GETFD: &str = "getfd";
/// The command closing a named file descriptor.
const CLOSEFD: &str = "closefd";
/// The commands the session answers itself, in query-commands order.
const OWN_COMMANDS: [&str; 4] = [QMP_CAPABILITIES, QUERY_COMMANDS, GETFD, CLOSEFD];

/// A reply: `return` or `error`, then `id` if the command had one.
#[derive(Serialize)]
struct Reply<'a> {
    #[serde(rename = "return", skip_serializing_if = "Option::is_none")]
    ret: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a QmpError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// Encodes a reply line.
pub(crate) fn reply_line(result: &Result<Value, QmpError>, id: Option<&Value>) -> Vec<u8> {
    let (ret, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    to_line(&Reply { ret, error, id })
}

/// Encodes an error reply without id (for input that is not a message).
pub(crate) fn error_line(desc: impl Into<String>) -> Vec<u8> {
    reply_line(&Err(QmpError::generic(desc)), None)
}

/// The greeting: `{"QMP": {"version": ..., "capabilities": []}}`.
#[derive(Serialize)]
struct Greeting<'a> {
    #[serde(rename = "QMP")]
    qmp: GreetingBody<'a>,
}

/// The greeting's `QMP` member.
#[derive(Serialize)]
struct GreetingBody<'a> {
    version: &'a Value,
    capabilities: [&'a str; 0],
}

/// Encodes the greeting line.
pub(crate) fn greeting_line(version: &Value) -> Vec<u8> {
    to_line(&Greeting {
        qmp: GreetingBody {
            version,
            capabilities: [],
        },
    })
}

/// The state of one connection.
pub(crate) struct Session {
    dispatcher: Arc<dyn Dispatcher>,
    negotiated: bool,
    /// The descriptors named with `getfd`, closed with the session.
    fds: NamedFds,
}

impl Session {
    /// A connection that has not negotiated yet.
    pub(crate) fn new(dispatcher: Arc<dyn Dispatcher>) -> Self {
        Session {
            dispatcher,
            negotiated: false,
            fds: NamedFds::new(),
        }
    }

    /// Whether `qmp_capabilities` succeeded (events may be sent).
    pub(crate) fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one decoded message, which came with the file descriptors
    /// `received`, and returns the reply line. `getfd` keeps the first of
    /// them; all others are closed on return.
    pub(crate) fn handle(&mut self, mut message: Value, received: Vec<OwnedFd>) -> Vec<u8> {
        let id = take_id(&mut message);
        let result =
            parse_request(message).and_then(|r| self.execute(&r.command, r.arguments, received));
        reply_line(&result, id.as_ref())
    }

    fn execute(
        &mut self,
        command: &str,
        arguments: Map<String, Value>,
        received: Vec<OwnedFd>,
    ) -> Result<Value, QmpError> {
        if !self.negotiated {
            if command != QMP_CAPABILITIES {
                return Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            check_capabilities(arguments)?;
            self.negotiated = true;
            return Ok(json!({}));
        }
        match command {
            QMP_CAPABILITIES => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            QUERY_COMMANDS => {
                no_arguments(&arguments)?;
                Ok(self.query_commands())
            }
            GETFD => {
                let name = fdname(arguments)?;
                let fd = received.into_iter().next().ok_or_else(|| {
                    QmpError::generic("No file descriptor supplied via SCM_RIGHTS")
                })?;
                self.fds.insert(&name, fd)?;
                Ok(json!({}))
            }
            CLOSEFD => {
                self.fds.close(&fdname(arguments)?)?;
                Ok(json!({}))
            }
            _ => {
                if !self.dispatcher.commands().iter().any(|c| c == command) {
                    return Err(QmpError::command_not_found(command));
                }
                let (dispatcher, fds) = (&self.dispatcher, &mut self.fds);
                panic::catch_unwind(AssertUnwindSafe(|| {
                    dispatcher.execute(command, arguments, fds)
                }))
                .unwrap_or_else(|payload| {
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    log::error!("QMP command '{command}' panicked: {what}");
                    Err(QmpError::generic(format!(
                        "Internal error: command '{command}' failed unexpectedly"
                    )))
                })
            }
        }
    }

    fn query_commands(&self) -> Value {
        let mut names = self.dispatcher.commands();
        for own in OWN_COMMANDS {
            if !names.iter().any(|n| n == own) {
                names.push(own.to_string());
            }
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        Value::Array(names.into_iter().map(|n| json!({"name": n})).collect())
    }
}

/// Checks `qmp_capabilities`' arguments: `enable` may be absent or list no
/// capability, as none is offered.
fn check_capabilities(mut arguments: Map<String, Value>) -> Result<(), QmpError> {
    let enable = arguments.remove("enable");
    no_arguments(&arguments)?;
    let list = match enable {
        None => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ))
        }
    };
    let mut unavailable = Vec::new();
    for (i, cap) in list.iter().enumerate() {
        match cap.as_str() {
            Some("oob") => unavailable.push("oob"),
            Some(other) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'enable[{i}]' does not accept value '{other}'"
                )))
            }
            None => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'enable[{i}]', expected: string"
                )))
            }
        }
    }
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Capability {} not available",
            unavailable.join(", ")
        )))
    }
}

/// Parses the arguments of `getfd` and `closefd`: `{"fdname": NAME}`.
fn fdname(mut arguments: Map<String, Value>) -> Result<String, QmpError> {
    let name = match arguments.remove("fdname") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'fdname', expected: string",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'fdname' is missing")),
    };
    no_arguments(&arguments)?;
    Ok(name)
}

/// Rejects any argument, in QEMU's wording.
fn no_arguments(arguments: &Map<String, Value>) -> Result<(), QmpError> {
    match arguments.keys().next() {
        Some(key) => Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scm::tests::{closed, probe};
    use std::os::unix::net::UnixStream;

    struct Echo;

    impl Dispatcher for Echo {
        fn execute(
            &self,
            command: &str,
            arguments: Map<String, Value>,
            fds: &mut NamedFds,
        ) -> Result<Value, QmpError> {
            match command {
                "echo" => Ok(Value::Object(arguments)),
                "boom" => panic!("kaboom"),
                // Takes a named descriptor and drops it (closing it).
                "use-fd" => {
                    let name = arguments["fdname"].as_str().unwrap_or_default();
                    fds.take(name).map(|_| json!({}))
                }
                _ => Err(QmpError::device_not_found("no such thing")),
            }
        }

        fn commands(&self) -> Vec<String> {
            ["echo", "boom", "missing", "query-commands", "use-fd"]
                .map(String::from)
                .into()
        }
    }

    fn reply(s: &mut Session, msg: Value) -> Value {
        reply_with(s, msg, Vec::new())
    }

    fn reply_with(s: &mut Session, msg: Value, fds: Vec<OwnedFd>) -> Value {
        let line = s.handle(msg, fds);
        assert!(line.ends_with(b"\r\n"));
        serde_json::from_slice(&line).unwrap()
    }

    fn generic(desc: &str) -> Value {
        json!({"error": {"class": "GenericError", "desc": desc}})
    }

    fn negotiated() -> Session {
        let mut s = Session::new(Arc::new(Echo));
        assert_eq!(
            reply(&mut s, json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        s
    }

    #[test]
    fn greeting() {
        let line = greeting_line(&json!({"qemu": {"major": 9}, "package": "p"}));
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"QMP\": {\"version\": {\"package\": \"p\", \"qemu\": {\"major\": 9}}, \"capabilities\": []}}\r\n"
        );
    }

    #[test]
    fn negotiation_first() {
        let mut s = Session::new(Arc::new(Echo));
        let expecting = json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1});
        assert_eq!(
            reply(&mut s, json!({"execute": "echo", "id": 1})),
            expecting
        );
        assert_eq!(
            reply(&mut s, json!({"execute": "query-commands", "id": 1})),
            expecting
        );
        assert_eq!(
            reply(&mut s, json!({"execute": "nope", "id": 1})),
            expecting
        );
        assert!(!s.negotiated());
        for args in [json!({}), json!({"enable": []})] {
            let mut s = Session::new(Arc::new(Echo));
            let r = reply(
                &mut s,
                json!({"execute": "qmp_capabilities", "arguments": args, "id": "n"}),
            );
            assert_eq!(r, json!({"return": {}, "id": "n"}));
            assert!(s.negotiated());
        }
    }

    #[test]
    fn negotiation_errors() {
        let cases = [
            (json!({"enable": ["oob"]}), "Capability oob not available"),
            (
                json!({"enable": ["xyz"]}),
                "Parameter 'enable[0]' does not accept value 'xyz'",
            ),
            (
                json!({"enable": [1]}),
                "Invalid parameter type for 'enable[0]', expected: string",
            ),
            (
                json!({"enable": "oob"}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (json!({"oob": true}), "Parameter 'oob' is unexpected"),
        ];
        for (args, desc) in cases {
            let mut s = Session::new(Arc::new(Echo));
            let r = reply(
                &mut s,
                json!({"execute": "qmp_capabilities", "arguments": args}),
            );
            assert_eq!(
                r,
                json!({"error": {"class": "GenericError", "desc": desc}}),
                "{args}"
            );
            assert!(!s.negotiated());
        }
    }

    #[test]
    fn second_negotiation_is_refused() {
        let mut s = negotiated();
        assert_eq!(
            reply(&mut s, json!({"execute": "qmp_capabilities", "id": [1, 2]})),
            json!({"error": {"class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored"},
                "id": [1, 2]})
        );
        assert!(s.negotiated());
    }

    #[test]
    fn dispatch_and_errors() {
        let mut s = negotiated();
        assert_eq!(
            reply(
                &mut s,
                json!({"execute": "echo", "arguments": {"a": "\u{e9}"}, "id": {"x": null}})
            ),
            json!({"return": {"a": "\u{e9}"}, "id": {"x": null}})
        );
        assert_eq!(
            reply(&mut s, json!({"execute": "missing"})),
            json!({"error": {"class": "DeviceNotFound", "desc": "no such thing"}})
        );
        assert_eq!(
            reply(&mut s, json!({"execute": "frob", "id": 7})),
            json!({"error": {"class": "CommandNotFound",
                "desc": "The command frob has not been found"}, "id": 7})
        );
        assert_eq!(
            reply(&mut s, json!({"execute": "boom", "id": 8})),
            json!({"error": {"class": "GenericError",
                "desc": "Internal error: command 'boom' failed unexpectedly"}, "id": 8})
        );
        // Shape errors keep the id.
        assert_eq!(
            reply(
                &mut s,
                json!({"execute": "echo", "arguments": 1, "id": 2.5})
            ),
            json!({"error": {"class": "GenericError",
                "desc": "QMP input member 'arguments' must be an object"}, "id": 2.5})
        );
    }

    #[test]
    fn query_commands_lists_everything_once() {
        let mut s = negotiated();
        assert_eq!(
            reply(&mut s, json!({"execute": "query-commands"})),
            json!({"return": [{"name": "echo"}, {"name": "boom"}, {"name": "missing"},
                {"name": "query-commands"}, {"name": "use-fd"}, {"name": "qmp_capabilities"},
                {"name": "getfd"}, {"name": "closefd"}]})
        );
        assert_eq!(
            reply(
                &mut s,
                json!({"execute": "query-commands", "arguments": {"x": 1}})
            ),
            json!({"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}})
        );
    }

    #[test]
    fn getfd_names_the_descriptor_sent_with_it() {
        let mut s = negotiated();
        let (a, peer_a) = probe();
        let getfd = |name: &str| json!({"execute": "getfd", "arguments": {"fdname": name}});
        assert_eq!(
            reply_with(&mut s, getfd("a"), vec![a]),
            json!({"return": {}})
        );
        assert!(!closed(&peer_a));
        // A command takes it by name, once.
        let use_fd = |name: &str| json!({"execute": "use-fd", "arguments": {"fdname": name}});
        assert_eq!(reply(&mut s, use_fd("a")), json!({"return": {}}));
        assert!(closed(&peer_a));
        assert_eq!(
            reply(&mut s, use_fd("a")),
            generic("File descriptor named 'a' has not been found")
        );
        // getfd without a descriptor.
        assert_eq!(
            reply(&mut s, getfd("b")),
            generic("No file descriptor supplied via SCM_RIGHTS")
        );
        // getfd takes the first of several; the others are closed.
        let probes: Vec<(OwnedFd, UnixStream)> = (0..3).map(|_| probe()).collect();
        let (fds, peers): (Vec<_>, Vec<_>) = probes.into_iter().unzip();
        assert_eq!(reply_with(&mut s, getfd("b"), fds), json!({"return": {}}));
        assert!(!closed(&peers[0]) && closed(&peers[1]) && closed(&peers[2]));
        // A name starting with a digit is refused and the descriptor closed.
        let (c, peer_c) = probe();
        assert_eq!(
            reply_with(&mut s, getfd("7"), vec![c]),
            generic("Parameter 'fdname' expects a name not starting with a digit")
        );
        assert!(closed(&peer_c));
        // Giving a name again replaces (and closes) the old descriptor.
        let (d, peer_d) = probe();
        assert_eq!(
            reply_with(&mut s, getfd("b"), vec![d]),
            json!({"return": {}})
        );
        assert!(closed(&peers[0]) && !closed(&peer_d));
        // closefd.
        let closefd = |name: &str| json!({"execute": "closefd", "arguments": {"fdname": name}});
        assert_eq!(reply(&mut s, closefd("b")), json!({"return": {}}));
        assert!(closed(&peer_d));
        assert_eq!(
            reply(&mut s, closefd("b")),
            generic("File descriptor named 'b' not found")
        );
        // The session's remaining descriptors are closed with it.
        let (e, peer_e) = probe();
        assert_eq!(
            reply_with(&mut s, getfd("e"), vec![e]),
            json!({"return": {}})
        );
        drop(s);
        assert!(closed(&peer_e));
    }

    #[test]
    fn descriptors_sent_with_other_messages_are_closed() {
        let mut s = Session::new(Arc::new(Echo));
        let mut peers = Vec::new();
        let mut send = |s: &mut Session, msg: Value| {
            let (fd, peer) = probe();
            peers.push(peer);
            reply_with(s, msg, vec![fd])
        };
        // Before negotiation, even getfd.
        let getfd = json!({"execute": "getfd", "arguments": {"fdname": "x"}});
        assert_eq!(
            send(&mut s, getfd.clone())["error"]["class"],
            "CommandNotFound"
        );
        send(&mut s, json!({"execute": "qmp_capabilities"}));
        for msg in [
            json!({"execute": "echo"}),
            json!({"execute": "boom"}),
            json!({"execute": "nope"}),
            json!({"execute": "query-commands"}),
            json!([1]),
            json!({"execute": "getfd"}),
            json!({"execute": "getfd", "arguments": {"fdname": 1}}),
            json!({"execute": "getfd", "arguments": {"fdname": "x", "y": 1}}),
            json!({"execute": "closefd", "arguments": {"fdname": "x"}}),
        ] {
            send(&mut s, msg);
        }
        assert!(peers.iter().all(closed));
    }

    #[test]
    fn fd_argument_errors() {
        let mut s = negotiated();
        for command in ["getfd", "closefd"] {
            for (args, desc) in [
                (json!({}), "Parameter 'fdname' is missing"),
                (
                    json!({"fdname": 1}),
                    "Invalid parameter type for 'fdname', expected: string",
                ),
                (
                    json!({"fdname": "x", "extra": 1}),
                    "Parameter 'extra' is unexpected",
                ),
            ] {
                let (fd, _peer) = probe();
                let msg = json!({"execute": command, "arguments": args});
                assert_eq!(
                    reply_with(&mut s, msg, vec![fd]),
                    generic(desc),
                    "{command}"
                );
            }
        }
    }

    #[test]
    fn parse_error_has_no_id() {
        let line = error_line("JSON parse error, x");
        assert_eq!(
            line,
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, x\"}}\r\n"
        );
    }
}
