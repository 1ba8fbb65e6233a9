//! `blkgraph-ctl`: runs QMP commands on blkgraph's (or any QMP server's)
//! control socket.

mod args;
mod dot;
mod top;

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use blkgraph_ctl::{ClientError, QmpClient, QmpError};
use serde_json::{Map, Value};

const USAGE: &str = "\
Usage: blkgraph-ctl -s SOCKET COMMAND [ARGUMENTS...]
       blkgraph-ctl -s SOCKET events
       blkgraph-ctl -s SOCKET graph [--format dot|json] [--stats [--interval SECS]]
       blkgraph-ctl -s SOCKET top [--interval SECS] [--count N]

Runs one QMP command on the control socket SOCKET and prints its result as
JSON (nothing if it returns {}).

ARGUMENTS are either one JSON object, or words of the form
  key=value    true/false -> boolean, null -> null, integers -> numbers,
               anything else -> string
  key:=JSON    any JSON value, e.g. actions:='[{\"type\": \"abort\", \"data\": {}}]'
Dotted keys nest (file.driver=file gives {\"file\": {\"driver\": \"file\"}}), and
members named 0, 1, ... make an array (enable.0=x).

Special commands:
  events       print events as they arrive, one JSON object per line
  graph        print the block graph (x-debug-query-block-graph) as Graphviz
               dot (the default) or as JSON; with --stats, each edge into a
               node or from an export carries its IOPS, bandwidth and latency
               over --interval seconds (default 1)
  top          a live view of every export and node: IOPS, bandwidth, mean
               latency and read/write latency percentiles (p50, p99), from
               query-blockstats every --interval seconds (default 1), --count
               times (default: until Ctrl-C); it turns on the latency
               histograms (block-latency-histogram-set) of exports without

Options:
  -s, --socket SOCKET   the control socket (QMP monitor) to connect to
  -h, --help            print this help
  -V, --version         print the version

Examples:
  blkgraph-ctl -s qmp.sock query-named-block-nodes
  blkgraph-ctl -s qmp.sock blockdev-add driver=file node-name=f1 filename=/tmp/a.img
  blkgraph-ctl -s qmp.sock blockdev-add '{\"driver\": \"null-co\", \"node-name\": \"n0\"}'
  blkgraph-ctl -s qmp.sock graph | dot -Tsvg > graph.svg

Exit status: 0 success, 1 the command failed (CLASS: DESC on stderr),
2 usage error, 3 connection or protocol failure.
";

/// How the program ends badly.
#[derive(Debug)]
enum Failure {
    /// Wrong command line (exit 2).
    Usage(String),
    /// The server could not be reached or spoke no QMP (exit 3).
    Connection(String),
    /// The command failed (exit 1).
    Command(QmpError),
    /// Another failure (exit 1).
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Qmp(e) => Failure::Command(e),
            other => Failure::Connection(other.to_string()),
        }
    }
}

/// What the command line asks for.
enum Action {
    Help,
    Version,
    Run {
        socket: PathBuf,
        command: String,
        words: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(std::env::args_os().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("blkgraph-ctl: {msg}\nTry 'blkgraph-ctl --help' for more information.");
            ExitCode::from(2)
        }
        Err(Failure::Connection(msg)) => {
            eprintln!("blkgraph-ctl: {msg}");
            ExitCode::from(3)
        }
        Err(Failure::Command(e)) => {
            eprintln!("blkgraph-ctl: {}: {}", e.class, e.desc);
            ExitCode::from(1)
        }
        Err(Failure::Other(msg)) => {
            eprintln!("blkgraph-ctl: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(argv: Vec<OsString>) -> Result<(), Failure> {
    let argv = argv
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| Failure::Usage(format!("argument {a:?} is not valid UTF-8")))
        })
        .collect::<Result<Vec<String>, Failure>>()?;
    let (socket, command, words) = match parse_command_line(argv)? {
        Action::Help => return print(USAGE),
        Action::Version => return print(&format!("blkgraph-ctl {}\n", env!("CARGO_PKG_VERSION"))),
        Action::Run {
            socket,
            command,
            words,
        } => (socket, command, words),
    };
    match command.as_str() {
        "events" => {
            if let Some(extra) = words.first() {
                return Err(Failure::Usage(format!(
                    "'events' takes no arguments, got '{extra}'"
                )));
            }
            let mut client = connect(&socket)?;
            loop {
                let event = match client.next_event() {
                    Ok(event) => event,
                    Err(ClientError::Closed) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                print(&format!("{event}\n"))?;
            }
        }
        "graph" => {
            let options = graph_options(&words)?;
            let mut client = connect(&socket)?;
            let graph = client.execute("x-debug-query-block-graph", Map::new())?;
            let rates = match options.stats {
                Some(interval) => Some(edge_rates(&mut client, interval)?),
                None => None,
            };
            if options.json {
                print_value(&graph)
            } else {
                let text = dot::render(&graph, rates.as_ref())
                    .map_err(|e| Failure::Other(format!("unexpected block graph: {e}")))?;
                print(&text)
            }
        }
        "top" => {
            let (interval, count) = top_options(&words)?;
            let mut client = connect(&socket)?;
            let boundaries: Vec<u64> = top::BOUNDARIES_NS.to_vec();
            let first = sample(&mut client)?;
            for id in first.exports.keys() {
                let mut args = Map::new();
                args.insert("id".into(), Value::from(id.clone()));
                args.insert("boundaries".into(), Value::from(boundaries.clone()));
                // Servers without histograms (QSD) show means only.
                let _ = client.execute("block-latency-histogram-set", args);
            }
            let mut before = sample(&mut client)?;
            let mut shown = 0;
            while count.is_none_or(|n| shown < n) {
                std::thread::sleep(interval);
                let now = sample(&mut client)?;
                let text = top::screen(
                    &socket.display().to_string(),
                    &before,
                    &now,
                    interval.as_secs_f64(),
                );
                print(&format!("\x1b[H\x1b[2J{text}"))?;
                before = now;
                shown += 1;
            }
            Ok(())
        }
        _ => {
            let arguments = args::parse_arguments(&words).map_err(Failure::Usage)?;
            let mut client = connect(&socket)?;
            let value = client.execute(&command, arguments)?;
            if value.as_object().is_some_and(Map::is_empty) {
                Ok(())
            } else {
                print_value(&value)
            }
        }
    }
}

fn parse_command_line(argv: Vec<String>) -> Result<Action, Failure> {
    let mut socket = None;
    let mut words = argv.into_iter();
    let command = loop {
        let Some(word) = words.next() else {
            return Err(Failure::Usage("no command given".into()));
        };
        match word.as_str() {
            "-h" | "--help" => return Ok(Action::Help),
            "-V" | "--version" => return Ok(Action::Version),
            "-s" | "--socket" => match words.next() {
                Some(path) => socket = Some(path),
                None => return Err(Failure::Usage(format!("option '{word}' needs a path"))),
            },
            "--" => match words.next() {
                Some(command) => break command,
                None => return Err(Failure::Usage("no command given".into())),
            },
            _ => {
                if let Some(path) = word.strip_prefix("--socket=") {
                    socket = Some(path.to_string());
                } else if let Some(path) = word.strip_prefix("-s") {
                    socket = Some(path.to_string());
                } else if word.starts_with('-') {
                    return Err(Failure::Usage(format!("unknown option '{word}'")));
                } else {
                    break word;
                }
            }
        }
    };
    let socket = match socket {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        Some(_) => return Err(Failure::Usage("empty socket path".into())),
        None => return Err(Failure::Usage("no socket given: use -s SOCKET".into())),
    };
    Ok(Action::Run {
        socket,
        command,
        words: words.collect(),
    })
}

/// `graph`'s options.
struct GraphOptions {
    /// JSON output rather than dot.
    json: bool,
    /// Figures on the edges, over this interval.
    stats: Option<Duration>,
}

/// Parses `--interval SECS` (a positive number of seconds).
fn interval(word: &str, value: Option<&String>) -> Result<Duration, Failure> {
    value
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| Failure::Usage(format!("option '{word}' needs a number of seconds")))
}

/// `top`'s options: the interval and how many screens to show.
fn top_options(words: &[String]) -> Result<(Duration, Option<u64>), Failure> {
    let (mut every, mut count) = (Duration::from_secs(1), None);
    let mut words = words.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--interval" | "-i" => every = interval(word, words.next())?,
            "--count" | "-n" => {
                count = Some(
                    words
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| Failure::Usage(format!("option '{word}' needs a count")))?,
                )
            }
            w => {
                return Err(Failure::Usage(format!(
                    "'top' takes --interval SECS and --count N, got '{w}'"
                )))
            }
        }
    }
    Ok((every, count))
}

/// One sample of the exports' and nodes' counters.
fn sample(client: &mut QmpClient) -> Result<top::Sample, Failure> {
    let exports = client.execute("query-blockstats", Map::new())?;
    let nodes = client.execute("query-blockstats", top::query_nodes())?;
    Ok(top::Sample::from_replies(&exports, &nodes))
}

/// The rates of every export and node over `interval`.
fn edge_rates(client: &mut QmpClient, interval: Duration) -> Result<dot::EdgeRates, Failure> {
    let a = sample(client)?;
    std::thread::sleep(interval);
    let b = sample(client)?;
    let seconds = interval.as_secs_f64();
    let rates = |a: Option<&top::Counters>, b: &top::Counters| {
        top::Rates::between(&a.cloned().unwrap_or_default(), b, seconds)
    };
    Ok(dot::EdgeRates {
        exports: b
            .exports
            .iter()
            .map(|(id, (_, now))| (id.clone(), rates(a.exports.get(id).map(|e| &e.1), now)))
            .collect(),
        nodes: b
            .nodes
            .iter()
            .map(|(name, now)| (name.clone(), rates(a.nodes.get(name), now)))
            .collect(),
    })
}

/// `graph`'s options.
fn graph_options(words: &[String]) -> Result<GraphOptions, Failure> {
    let mut json = false;
    let (mut stats, mut every) = (false, Duration::from_secs(1));
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let format = match word.as_str() {
            "--stats" => {
                stats = true;
                continue;
            }
            "--interval" | "-i" => {
                every = interval(word, words.next())?;
                continue;
            }
            "--format" | "-f" => words
                .next()
                .ok_or_else(|| Failure::Usage(format!("option '{word}' needs dot or json")))?,
            w => w.strip_prefix("--format=").ok_or_else(|| {
                Failure::Usage(format!(
                    "'graph' takes --format dot|json, --stats and --interval SECS, got '{w}'"
                ))
            })?,
        };
        json = match format {
            "json" => true,
            "dot" => false,
            other => {
                return Err(Failure::Usage(format!(
                    "unknown graph format '{other}' (dot or json)"
                )))
            }
        };
    }
    Ok(GraphOptions {
        json,
        stats: stats.then_some(every),
    })
}

fn connect(socket: &std::path::Path) -> Result<QmpClient, Failure> {
    QmpClient::connect(socket).map_err(|e| match e {
        ClientError::Connect(e) => {
            Failure::Connection(format!("cannot connect to {}: {e}", socket.display()))
        }
        ClientError::Qmp(e) => Failure::Connection(format!(
            "capabilities negotiation with {} failed: {e}",
            socket.display()
        )),
        other => Failure::Connection(format!("{}: {other}", socket.display())),
    })
}

fn print_value(value: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::Other(format!("cannot print the result: {e}")))?;
    print(&format!("{text}\n"))
}

/// Writes to stdout; a closed pipe (`| head`) ends the program quietly.
fn print(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Failure::Other(format!("cannot write the output: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<(PathBuf, String, Vec<String>), String> {
        match parse_command_line(words.iter().map(|w| w.to_string()).collect()) {
            Ok(Action::Run {
                socket,
                command,
                words,
            }) => Ok((socket, command, words)),
            Ok(Action::Help) => Ok(("help".into(), String::new(), vec![])),
            Ok(Action::Version) => Ok(("version".into(), String::new(), vec![])),
            Err(Failure::Usage(m)) => Err(m),
            Err(_) => Err("not a usage error".into()),
        }
    }

    #[test]
    fn socket_option_forms() {
        for words in [
            &["-s", "q.sock", "cmd", "a=1"][..],
            &["--socket", "q.sock", "cmd", "a=1"],
            &["--socket=q.sock", "cmd", "a=1"],
            &["-sq.sock", "cmd", "a=1"],
            &["-s", "q.sock", "--", "cmd", "a=1"],
        ] {
            assert_eq!(
                parse(words).unwrap(),
                ("q.sock".into(), "cmd".into(), vec!["a=1".to_string()]),
                "{words:?}"
            );
        }
        // Options after the command belong to it.
        assert_eq!(
            parse(&["-s", "q", "graph", "--format", "json"]).unwrap().2,
            vec!["--format", "json"]
        );
    }

    #[test]
    fn usage_errors() {
        assert_eq!(parse(&[]).unwrap_err(), "no command given");
        assert_eq!(parse(&["-s", "q"]).unwrap_err(), "no command given");
        assert_eq!(
            parse(&["cmd"]).unwrap_err(),
            "no socket given: use -s SOCKET"
        );
        assert_eq!(parse(&["-s"]).unwrap_err(), "option '-s' needs a path");
        assert_eq!(parse(&["-x", "cmd"]).unwrap_err(), "unknown option '-x'");
        assert_eq!(
            parse(&["--socket=", "cmd"]).unwrap_err(),
            "empty socket path"
        );
        assert_eq!(parse(&["--help", "-x"]).unwrap().0, PathBuf::from("help"));
        assert_eq!(parse(&["-V"]).unwrap().0, PathBuf::from("version"));
    }

    #[test]
    fn graph_formats() {
        let w = |s: &[&str]| -> Vec<String> { s.iter().map(|x| x.to_string()).collect() };
        let json = |s: &[&str]| graph_options(&w(s)).map(|o| o.json);
        assert!(!json(&[]).unwrap());
        assert!(json(&["--format", "json"]).unwrap());
        assert!(json(&["--format=json"]).unwrap());
        assert!(!json(&["-f", "dot"]).unwrap());
        assert!(matches!(
            json(&["--format", "svg"]),
            Err(Failure::Usage(m)) if m == "unknown graph format 'svg' (dot or json)"
        ));
        assert!(matches!(json(&["x"]), Err(Failure::Usage(_))));
        assert!(matches!(json(&["--format"]), Err(Failure::Usage(_))));
        let o = graph_options(&w(&["--stats", "--interval", "0.5"])).unwrap();
        assert_eq!(o.stats, Some(Duration::from_millis(500)));
        assert!(graph_options(&w(&["--interval", "-1"])).is_err());
    }

    #[test]
    fn top_options_parse() {
        let w = |s: &[&str]| -> Vec<String> { s.iter().map(|x| x.to_string()).collect() };
        assert_eq!(
            top_options(&w(&["-i", "2", "--count", "3"])).unwrap(),
            (Duration::from_secs(2), Some(3))
        );
        assert!(top_options(&w(&["--count", "x"])).is_err());
        assert!(top_options(&w(&["--bogus"])).is_err());
    }
}
