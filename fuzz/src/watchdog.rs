//! A watchdog over the harnesses' steps that wait for the code under test
//! (a graph's shutdown). libFuzzer reports a hang at its `-timeout` with
//! the stack of the main thread only: it shows what waits, not what it
//! waits for, and a rare hang may not come back when its input is
//! replayed. A step that takes far longer than it should gets, once,
//! every thread's stack (gdb attached to this process) and a description
//! from the harness (its jobs' states) on stderr, in the log of the run
//! that found it, before libFuzzer's timeout ends the process.

use std::process::Command;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// What the harness says about the state a step waits on.
type Describe = Box<dyn Fn() -> String + Send>;

/// The step being watched.
struct Armed {
    what: String,
    deadline: Instant,
    describe: Describe,
}

struct Watchdog {
    armed: Mutex<Option<Armed>>,
    changed: Condvar,
}

impl Watchdog {
    fn lock(&self) -> MutexGuard<'_, Option<Armed>> {
        // Nothing panics with the lock held; a poisoned one is still sound.
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The watchdog and its thread, started on first use: [`start`] starts it
/// before an input's leftovers are counted.
fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(watch_loop)
            .expect("cannot start the watchdog thread");
        Watchdog {
            armed: Mutex::new(None),
            changed: Condvar::new(),
        }
    })
}

/// Starts the watchdog's thread, once per process.
pub fn start() {
    watchdog();
}

fn watch_loop() {
    // Waits until the thread that started this one has published it.
    let w = watchdog();
    let mut armed = w.lock();
    loop {
        let Some(deadline) = armed.as_ref().map(|a| a.deadline) else {
            armed = w.changed.wait(armed).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let now = Instant::now();
        if now < deadline {
            armed = w
                .changed
                .wait_timeout(armed, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let Some(step) = armed.take() else { continue };
        drop(armed);
        report(&step);
        armed = w.lock();
    }
}

/// Prints the stacks first: describing the state takes locks that the
/// hang may hold.
fn report(step: &Armed) {
    eprintln!(
        "==== watchdog: {} has not returned after its limit; every thread's stack:",
        step.what
    );
    eprintln!("{}", stacks());
    eprintln!("==== watchdog: the state {} waits on:", step.what);
    eprintln!("{}", (step.describe)());
    eprintln!("==== watchdog: end of report");
}

/// Every thread's stack, from gdb attached to this process. LeakSanitizer
/// traces the process for a moment at each of its checks: gdb cannot
/// attach then, and tries again.
fn stacks() -> String {
    let pid = std::process::id().to_string();
    let mut last = String::new();
    for _ in 0..5 {
        let out = Command::new("gdb")
            .args(["-p", &pid, "-batch", "-nx", "-ex", "thread apply all bt 40"])
            .output();
        match out {
            Ok(o) if o.stdout.windows(7).any(|w| w == b"Thread ") => {
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            Ok(o) => last = String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => return format!("cannot run gdb: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    format!("gdb could not attach: {last}")
}

/// Runs `step`, named `what`; if it has not returned after `limit`, the
/// watchdog reports every thread's stack and `describe()` on stderr.
pub fn watch<T>(
    what: impl Into<String>,
    limit: Duration,
    describe: impl Fn() -> String + Send + 'static,
    step: impl FnOnce() -> T,
) -> T {
    let w = watchdog();
    *w.lock() = Some(Armed {
        what: what.into(),
        deadline: Instant::now() + limit,
        describe: Box::new(describe),
    });
    w.changed.notify_all();
    let out = step();
    *w.lock() = None;
    w.changed.notify_all();
    out
}
