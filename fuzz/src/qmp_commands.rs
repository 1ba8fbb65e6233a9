//! The `qmp_commands` harness: bytes as a sequence of QMP commands run by
//! the daemon's real command table (`blkgraph_backend::control`), on a
//! graph of small nodes.
//!
//! The input is one command per line, `{"execute": NAME, "arguments":
//! {...}}` (lines that are not such an object are skipped: the
//! `qmp_stream` target covers the decoder and the session). Each input gets
//! a fresh graph with the `options` harness's base nodes (null-co nodes, a
//! copy-before-write node, bitmap `bm0`, throttle group `tg0`), made as the
//! daemon makes it so that it runs jobs, a fresh export table and a
//! `Control`, the dispatcher the daemon gives its QMP server (`quit` does
//! nothing here). For each command:
//!
//! - `control::check_arguments` (the pure argument parser) must give `Ok`
//!   or a clean QMP error: a known class and a text;
//! - if it refuses, `Control::execute` must refuse the same way and change
//!   nothing;
//! - otherwise the command runs with its outside-world arguments
//!   sandboxed (`options::sandbox`: every string `filename` is the
//!   scratch file, every `path` a socket in a temporary directory, every
//!   `host` 127.0.0.1, every `port` 0, no NBD client waits to connect;
//!   commands that would open an `rbd` node are skipped), and if it fails
//!   its error must be clean and the graph unchanged: the nodes, their
//!   children, bitmaps and driver state as `query-named-block-nodes` and
//!   `x-debug-query-block-graph` show them, the jobs (`query-block-jobs`),
//!   the exports and the throttle groups.
//!
//! Jobs (`blockdev-backup`, `blockdev-mirror`, `block-commit`,
//! `block-stream`, `blockdev-create`, alone or in a `transaction`) run on
//! their own and change the graph when they end, so before each command
//! the harness waits until every job has settled in a state that only a
//! command ends (paused by job-pause, ready with nothing left to copy,
//! pending without auto-finalize, concluded without auto-dismiss; never
//! once a cancel or job-complete was asked for), for at most
//! [`SETTLE_BUDGET`] per input and while the jobs show change (a job that
//! waits for a command, as a backup with `sync: none`, or copies at a low
//! `speed`, shows none for [`STILL`]), and again after a failed command
//! (whose drained section paused the jobs); while a job has not settled, a
//! failed command's error is checked but not its effect on the graph.
//!
//! After the last command every export is deleted (`mode: hard`), the NBD
//! server stopped and the graph shut down as the daemon does at exit
//! (jobs cancelled, nodes flushed and closed), and no file descriptor may
//! be left open and no thread running once the threads that ended are gone
//! (within 5 s: an NBD connection's thread closes its socket just after
//! the server has let go of it). The scratch file gets its first content
//! back before each input (jobs write it, `block_resize` resizes it).

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use blkgraph_backend::control::{check_arguments, Control};
use blkgraph_backend::exports::Exports;
use blkgraph_ctl::{Dispatcher, ErrorClass, NamedFds, QmpError};
use blkgraph_graph::Graph;
use serde_json::{json, Map, Value};

use crate::options::{base_graph, reset_scratch_file, sandbox, scratch_file, socket_path};
use crate::Leftovers;

/// Checks that an error is a clean QMP error.
fn check_error(command: &str, e: &QmpError) {
    let name = e.class.as_str();
    assert_eq!(
        ErrorClass::from_name(name),
        Some(e.class),
        "{command}: class {name}"
    );
    assert!(!e.desc.is_empty(), "{command}: an error without text");
}

/// What a failed command must leave as it was.
fn state(control: &Control, graph: &Graph) -> Value {
    let mut fds = NamedFds::new();
    let mut query = |name: &str| {
        control
            .execute(name, Map::new(), &mut fds)
            .unwrap_or_else(|e| panic!("{name} failed: {e:?}"))
    };
    let groups: Vec<String> = graph
        .throttle_groups()
        .iter()
        .map(|g| format!("{} {:?}", g.id(), g.limits()))
        .collect();
    // Moved in: json! would copy each answer through the serializer.
    let mut snapshot = json!({"throttle-groups": groups});
    snapshot["nodes"] = query("query-named-block-nodes");
    snapshot["graph"] = query("x-debug-query-block-graph");
    snapshot["jobs"] = query("query-block-jobs");
    snapshot["exports"] = query("query-block-exports");
    snapshot
}

/// The longest the harness waits, over one input, for jobs to settle.
pub const SETTLE_BUDGET: Duration = Duration::from_millis(500);

/// The longest the harness waits after a failed command for the jobs
/// paused by its drained section to take up where they were.
pub const RESETTLE: Duration = Duration::from_millis(200);

/// Whether no job changes anything until a command moves it on.
fn settled(graph: &Graph) -> bool {
    graph.jobs().iter().all(|job| {
        let info = job.block_info();
        let flag = |name: &str| info[name].as_bool().unwrap_or(true);
        // A cancel or job-complete ends a job on its own from any state
        // but the last.
        let moving = job.cancel_requested() || job.should_complete();
        match info["status"].as_str().unwrap_or("") {
            // Paused by job-pause; a pause of a drained section ends on
            // its own, just after the section.
            "paused" | "standby" => !moving && flag("paused") && !flag("busy"),
            // A mirror or commit waiting for job-complete, once it has
            // copied what was left when it became ready: it polls its
            // source, but changes nothing without guest writes (there are
            // none here). Not once a pause was asked for: the job goes on
            // to standby at its next pause point.
            "ready" => !moving && !flag("paused") && info["offset"] == info["len"],
            "pending" => !moving && !flag("auto-finalize"),
            "concluded" => !flag("auto-dismiss"),
            _ => false,
        }
    })
}

/// How long the jobs may show no change before [`settle`] stops waiting
/// for them: a job that waits for a command (a backup with `sync: none`)
/// or copies at a low `speed` would otherwise take the whole budget of
/// every input that starts one. A job that copies at full speed over the
/// harness's small nodes shows progress well within it; one judged still
/// too early only costs the check of the next failed command's effect.
pub const STILL: Duration = Duration::from_millis(5);

/// What [`settle`] watches for change: each job's status and progress.
fn jobs_view(graph: &Graph) -> Vec<Value> {
    graph.jobs().iter().map(|job| job.block_info()).collect()
}

/// Waits until [`settled`], while `deadline` allows and the jobs move
/// (they stay unsettled once they show no change for [`STILL`]); whether
/// they are.
fn settle(graph: &Graph, deadline: Instant) -> bool {
    let mut view = jobs_view(graph);
    let mut changed = Instant::now();
    loop {
        if settled(graph) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline || now >= changed + STILL {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
        let again = jobs_view(graph);
        if again != view {
            view = again;
            changed = Instant::now();
        }
    }
}

/// How long a command or the graph's shutdown may take before the
/// watchdog reports it: milliseconds, up to a second on a loaded machine;
/// libFuzzer's `-timeout` (10 s in run.py) ends the process later.
const WATCH_LIMIT: Duration = Duration::from_secs(4);

/// Runs `step` under the watchdog ([`crate::watchdog`]), which reports
/// every thread's stack and the graph's jobs if it hangs.
fn watch<T>(what: &str, graph: Weak<Graph>, step: impl FnOnce() -> T) -> T {
    crate::watchdog::watch(what, WATCH_LIMIT, move || describe_jobs(&graph), step)
}

/// Every job of the graph: its query-block-jobs entry, and whether a
/// cancel or job-complete was asked for.
fn describe_jobs(graph: &Weak<Graph>) -> String {
    let Some(graph) = graph.upgrade() else {
        return "the graph is gone".into();
    };
    let jobs: Vec<String> = graph
        .jobs()
        .iter()
        .map(|job| {
            format!(
                "{} cancel-requested={} should-complete={}",
                job.block_info(),
                job.cancel_requested(),
                job.should_complete()
            )
        })
        .collect();
    if jobs.is_empty() {
        "no job".into()
    } else {
        jobs.join("\n")
    }
}

/// Whether `BLKGRAPH_FUZZ_VERBOSE` is set: then each outcome is printed.
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("BLKGRAPH_FUZZ_VERBOSE").is_some())
}

/// The commands of an input: (name, arguments) of each line that is a
/// QMP command object.
pub fn commands(data: &[u8]) -> Vec<(String, Map<String, Value>)> {
    data.split(|&b| b == b'\n')
        .filter_map(|line| {
            let Ok(Value::Object(mut message)) = serde_json::from_slice::<Value>(line) else {
                return None;
            };
            let Some(Value::String(name)) = message.remove("execute") else {
                return None;
            };
            match message.remove("arguments") {
                None => Some((name, Map::new())),
                Some(Value::Object(args)) => Some((name, args)),
                Some(_) => None,
            }
        })
        .collect()
}

/// Commands that start, once per process, what the first job starts for
/// good: the background executor that runs job I/O (its io_uring and
/// eventfd) and the job control thread.
const WARM_UP: &str = r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "w", "size": 1048576}}
{"execute": "blockdev-backup", "arguments": {"device": "null1", "target": "w", "sync": "full"}}"#;

/// Runs [`WARM_UP`] on a graph of its own, so that the descriptor check
/// of each input sees only what the input left.
fn warm_up() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let graph = base_graph();
        let exports = Arc::new(Exports::new(graph.clone()));
        let control = Control::new(graph.clone(), exports, Box::new(|| {}));
        let mut fds = NamedFds::new();
        for (name, args) in commands(WARM_UP.as_bytes()) {
            if let Err(e) = control.execute(&name, args, &mut fds) {
                panic!("warm-up {name}: {e:?}");
            }
        }
        // Until it has ended, however long it stands still on a busy
        // machine ([`settle`] would give up after [`STILL`]).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !settled(&graph) {
            assert!(Instant::now() < deadline, "the warm-up job did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
        graph.shut_down();
    });
}

/// What the harness sets up once per process: the fuzz target runs it
/// before libFuzzer's first input, so that the per-input timeout counts
/// none of it; [`run`] calls it too, a no-op by then, for callers that
/// replay inputs without the target.
pub fn init() {
    crate::daemon_signals();
    crate::watchdog::start();
    crate::log_if_verbose();
    scratch_file();
    socket_path();
    warm_up();
}

/// The harness.
pub fn run(data: &[u8]) {
    init();
    let commands = commands(data);
    if commands.is_empty() {
        return;
    }
    reset_scratch_file();
    let left = Leftovers::now();
    let deadline = Instant::now() + SETTLE_BUDGET;
    let graph = base_graph();
    let exports = Arc::new(Exports::new(graph.clone()));
    let control = Control::new(graph.clone(), exports.clone(), Box::new(|| {}));
    let mut fds = NamedFds::new();
    for (name, mut args) in commands {
        // Whether a failed command must have left the state as it was:
        // not while a job may still change it on its own.
        let settled = settle(&graph, deadline);
        if let Err(e) = check_arguments(&name, args.clone()) {
            if verbose() {
                eprintln!("{name}: refused: {e:?}");
            }
            check_error(&name, &e);
            let before = settled.then(|| state(&control, &graph));
            let again = control.execute(&name, args, &mut fds);
            assert_eq!(again.err(), Some(e), "{name}: checked and run differ");
            if let Some(before) = before {
                assert_eq!(
                    state(&control, &graph),
                    before,
                    "{name}: a refused command changed the graph"
                );
            }
            continue;
        }
        if !sandbox(&mut args) {
            if verbose() {
                eprintln!("{name}: not run (rbd)");
            }
            continue;
        }
        let before = settled.then(|| state(&control, &graph));
        let jobs = Arc::downgrade(&graph);
        match watch(&name, jobs, || control.execute(&name, args, &mut fds)) {
            Ok(value) => {
                if verbose() {
                    eprintln!("{name}: {value}");
                }
            }
            Err(e) => {
                if verbose() {
                    eprintln!("{name}: {e:?}");
                }
                check_error(&name, &e);
                // A command that failed inside a drained section leaves
                // the jobs it paused to resume on their own, just after.
                let before = before.filter(|_| settle(&graph, Instant::now() + RESETTLE));
                if let Some(before) = before {
                    let after = state(&control, &graph);
                    assert_eq!(
                        after, before,
                        "{name} failed ({}) and changed the graph",
                        e.desc
                    );
                }
            }
        }
    }
    // Leave nothing behind: exports (and their threads and sockets), the
    // NBD server, then the graph as the daemon leaves it at exit (jobs
    // cancelled, nodes flushed and closed).
    let ids: Vec<String> = exports
        .query()
        .as_array()
        .expect("query-block-exports")
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    for id in ids {
        if let Err(e) = exports.delete(&id, true) {
            panic!("block-export-del {id} mode=hard failed: {e}");
        }
    }
    let _ = exports.nbd_server_stop();
    assert_eq!(
        exports.query(),
        json!([]),
        "exports left after deleting them"
    );
    let jobs = Arc::downgrade(&graph);
    watch("the graph's shutdown", jobs, || graph.shut_down());
    drop((control, exports, graph, fds));
    // The threads of NBD connections end just after the server lets go of
    // them: give their sockets a moment.
    left.check_none_left(Duration::from_secs(5));
}
