//! The job control thread: where jobs end (their filters removed, a
//! mirror's parents pivoted), as QEMU's main loop does it. Ending a job
//! may need a drained section, which waits for every job's I/O, so it
//! never runs on the executor that runs that I/O.

use std::sync::mpsc::{channel, Sender};
use std::sync::OnceLock;

use parking_lot::Mutex;

/// A step to run on the control thread.
pub(crate) type Step = Box<dyn FnOnce() + Send>;

fn thread() -> Option<&'static Mutex<Sender<Step>>> {
    static CONTROL: OnceLock<Option<Mutex<Sender<Step>>>> = OnceLock::new();
    CONTROL
        .get_or_init(|| {
            let (tx, rx) = channel::<Step>();
            let started = std::thread::Builder::new()
                .name("job-control".into())
                .spawn(move || {
                    for step in rx {
                        step();
                    }
                });
            match started {
                Ok(_) => Some(Mutex::new(tx)),
                Err(e) => {
                    log::error!("cannot start the job control thread: {e}");
                    None
                }
            }
        })
        .as_ref()
}

/// Runs `step` on the control thread (on the caller's, if that thread
/// could not be started).
pub(crate) fn submit(step: Step) {
    match thread() {
        Some(tx) => {
            if let Err(e) = tx.lock().send(step) {
                (e.0)();
            }
        }
        None => step(),
    }
}
