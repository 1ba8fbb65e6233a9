//! Block jobs with QEMU's job model: states and verbs, pause
//! points, speed, progress, error policies, transactions whose jobs
//! complete together, and QEMU's events.
//!
//! A job's work runs as a future on the background executor (one thread
//! for all jobs, no thread per job); it is a parent of the nodes it uses,
//! with edges and permissions like an export's, and a drained section
//! pauses it at its next pause point and waits until its I/O has
//! finished. Everything that changes the graph when a job ends (removing
//! its filter, pivoting to a mirror's target) runs on the job control
//! thread, never on the executor that runs job I/O.

mod backup;
mod commit;
mod control;
mod create;
mod mirror;
mod status;
mod stream;

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use serde_json::{json, Value};

use crate::aio::{race, sleep, spawn_detached, Either, IoFuture};
use crate::drain::DrainParent;
use crate::error::Error;
use crate::graph::Graph;
use crate::EventSink;

pub use crate::drivers::qcow2::create::{Compression, Qcow2CreateOptions};
pub use backup::{BackupOptions, BitmapMode, SyncMode};
pub use commit::{ChainLayer, CommitOptions};
pub use create::CreateOptions;
pub use mirror::{CopyMode, MirrorOptions};
pub use status::{JobStatus, Verb};
pub use stream::{StreamBase, StreamOptions};

/// What a job does with an I/O error (QAPI's BlockdevOnError).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Go on as if the operation had worked.
    Ignore,
    /// Pause the job until it is resumed, then retry.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// QEMU's `auto`: as report for jobs.
    Auto,
}

/// Which side of a copy failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Reading the source.
    Source,
    /// Writing the target.
    Target,
}

/// What a job's loop does after an I/O error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Try the operation again (the job was stopped and resumed).
    Retry,
    /// Skip it.
    Ignore,
    /// End the job with the error.
    Fail,
}

/// How long a job waits before it retries what failed with an ignored
/// error.
const IGNORED_ERROR_DELAY: Duration = Duration::from_millis(100);
/// How often waiting for a job cancelled by force fails again what its
/// requests wait for (see `Job::wait_cancelled`).
const CANCEL_AGAIN: Duration = Duration::from_millis(100);

/// The options every job takes.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// The job id.
    pub id: String,
    /// Bytes per second, 0 for no limit.
    pub speed: u64,
    /// Finalize on its own when done (else job-finalize).
    pub auto_finalize: bool,
    /// Disappear on its own when concluded (else job-dismiss).
    pub auto_dismiss: bool,
    /// What a read error does.
    pub on_source_error: OnError,
    /// What a write error does.
    pub on_target_error: OnError,
}

impl JobOptions {
    /// QEMU's defaults for a job `id`.
    pub fn new(id: &str) -> Self {
        JobOptions {
            id: id.to_string(),
            speed: 0,
            auto_finalize: true,
            auto_dismiss: true,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
        }
    }
}

/// What a kind of job does: its work, and the steps that end it (QEMU's
/// JobDriver). The steps run on the job control thread and may change the
/// graph.
pub trait JobDriver: Send + Sync + 'static {
    /// QAPI's JobType, e.g. `backup`.
    fn job_type(&self) -> &'static str;

    /// The job's work; returns when it is done or the job was cancelled.
    fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a>;

    /// Whether the job is a block job, with QEMU's BLOCK_JOB_* events and
    /// a place in query-block-jobs (all but blockdev-create's).
    fn is_block_job(&self) -> bool {
        true
    }

    /// Whether job-complete applies (a mirror, an active commit).
    fn completes_on_request(&self) -> bool {
        false
    }

    /// Before the job's success is made final, for every job of its
    /// transaction; an error turns them all into failures.
    fn prepare(&self, _graph: &Graph, _job: &Job) -> Result<(), Error> {
        Ok(())
    }

    /// The job was cancelled by force: requests to its target that wait
    /// for something that may take long fail now (QEMU's JobDriver
    /// `cancel` of backup and mirror). Called without the job's lock.
    fn cancel_in_flight(&self) {}

    /// The job succeeded.
    fn commit(&self, _graph: &Graph, _job: &Job) {}

    /// The job failed or was cancelled.
    fn abort(&self, _graph: &Graph, _job: &Job) {}

    /// Afterwards, either way: gives back what the job holds.
    fn clean(&self, _graph: &Graph, _job: &Job) {}
}

/// Jobs that complete or fail together (a transaction's jobs with
/// `completion-mode: grouped`).
#[derive(Default)]
pub struct JobTxn {
    jobs: Mutex<Vec<Weak<Job>>>,
}

impl JobTxn {
    /// An empty group.
    pub fn new() -> Arc<Self> {
        Arc::new(JobTxn::default())
    }

    fn members(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().iter().filter_map(Weak::upgrade).collect()
    }
}

struct State {
    status: JobStatus,
    /// Pauses asked for: the user's (at most one), drains', stops on error.
    pause_count: u32,
    user_paused: bool,
    /// Parked at a pause point.
    paused: bool,
    /// The work future is running (not parked, not finished).
    busy: bool,
    cancelled: bool,
    force: bool,
    should_complete: bool,
    /// The work future has returned.
    finished: bool,
    result: Option<Result<(), String>>,
    current: u64,
    total: u64,
    speed: u64,
    /// Rate limiting: the current slice's start and bytes.
    slice_start: Instant,
    slice_bytes: u64,
    io_status: &'static str,
    waker: Option<Waker>,
    /// How many times the job was kicked: a sleep ends when it changes.
    kicks: u64,
    auto_finalize: bool,
    auto_dismiss: bool,
    txn: Option<Arc<JobTxn>>,
}

impl State {
    /// Cancelled so that the job ends without its final step: any cancel
    /// before the job is ready, a forced one after (a plain cancel of a
    /// ready job completes it), as QEMU's job_is_cancelled.
    fn is_cancelled(&self) -> bool {
        self.cancelled && self.force
    }

    /// The job's work must get on to its pause point rather than wait (a
    /// sleep, a rate limit): it is cancelled or asked to pause.
    fn must_not_wait(&self) -> bool {
        self.is_cancelled() || self.pause_count > 0
    }
}

/// A job.
pub struct Job {
    id: String,
    driver: Box<dyn JobDriver>,
    graph: Weak<Graph>,
    events: Option<EventSink>,
    on_source_error: OnError,
    on_target_error: OnError,
    state: Mutex<State>,
    changed: Condvar,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.driver.job_type())
            .finish_non_exhaustive()
    }
}

/// The error of a verb a job's state does not allow, in QEMU's words.
fn verb_refused(id: &str, status: JobStatus, verb: Verb) -> Error {
    Error::OpenFailed(format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{}'",
        verb.as_str()
    ))
}

impl Job {
    /// A job in state `created`, not yet running.
    pub(crate) fn new(
        options: &JobOptions,
        driver: Box<dyn JobDriver>,
        graph: Weak<Graph>,
        events: Option<EventSink>,
        txn: Option<Arc<JobTxn>>,
    ) -> Arc<Self> {
        let job = Arc::new(Job {
            id: options.id.clone(),
            driver,
            graph,
            events,
            on_source_error: options.on_source_error,
            on_target_error: options.on_target_error,
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                paused: false,
                busy: false,
                cancelled: false,
                force: false,
                should_complete: false,
                finished: false,
                result: None,
                current: 0,
                total: 0,
                speed: options.speed,
                slice_start: Instant::now(),
                slice_bytes: 0,
                io_status: "ok",
                waker: None,
                kicks: 0,
                auto_finalize: options.auto_finalize,
                auto_dismiss: options.auto_dismiss,
                txn: txn.clone(),
            }),
            changed: Condvar::new(),
        });
        if let Some(txn) = txn {
            txn.jobs.lock().push(Arc::downgrade(&job));
        }
        job
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether it is a block job (query-block-jobs, BLOCK_JOB_* events).
    pub fn is_block_job(&self) -> bool {
        self.driver.is_block_job()
    }

    /// QAPI's JobType.
    pub fn job_type(&self) -> &'static str {
        self.driver.job_type()
    }

    /// The job's state.
    pub fn status(&self) -> JobStatus {
        self.state.lock().status
    }

    fn event(&self, name: &str, data: Value) {
        if let Some(events) = &self.events {
            events(name, data);
        }
    }

    fn transition(&self, s: &mut State, to: JobStatus) {
        if !s.status.can_become(to) {
            log::error!("job '{}': no transition from {} to {to}", self.id, s.status);
        }
        s.status = to;
        self.event(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": to.as_str()}),
        );
        self.changed.notify_all();
    }

    /// The common data of the block job events.
    fn block_event_data(&self, s: &State) -> Value {
        json!({
            "type": self.job_type(),
            "device": self.id,
            "len": s.total,
            "offset": s.current,
            "speed": s.speed,
        })
    }

    /// Starts the work on the background executor.
    pub(crate) fn start(self: &Arc<Self>) -> Result<(), Error> {
        {
            let mut s = self.state.lock();
            self.transition(&mut s, JobStatus::Created);
            self.transition(&mut s, JobStatus::Running);
            s.busy = true;
        }
        let job = self.clone();
        let started = spawn_detached(async move {
            let result = job.driver.run(&job).await;
            // No more I/O from here: a drained section must not wait for
            // the control thread to take note (it may be that thread that
            // waits, in another job's end).
            {
                let mut s = job.state.lock();
                s.busy = false;
                job.changed.notify_all();
            }
            let done = job.clone();
            control::submit(Box::new(move || done.work_done(result)));
        });
        started
            .map(|_| ())
            .map_err(|e| Error::OpenFailed(format!("Cannot start job '{}': {e}", self.id)))
    }

    // ----------------------------------------------------------------
    // For the job's work.

    /// A point where the job may pause (drained sections, job-pause, a stop
    /// on error): waits while it is paused. Returns at once if cancelled.
    pub async fn pause_point(&self) {
        std::future::poll_fn(|cx| self.poll_pause(cx)).await
    }

    fn poll_pause(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock();
        if s.pause_count == 0 || s.is_cancelled() {
            s.busy = true;
            if s.paused {
                s.paused = false;
                s.busy = true;
                let to = match s.status {
                    JobStatus::Standby => Some(JobStatus::Ready),
                    JobStatus::Paused => Some(JobStatus::Running),
                    _ => None,
                };
                if let Some(to) = to {
                    self.transition(&mut s, to);
                }
            }
            return Poll::Ready(());
        }
        if !s.paused {
            s.paused = true;
            s.busy = false;
            let to = match s.status {
                JobStatus::Ready => Some(JobStatus::Standby),
                JobStatus::Running => Some(JobStatus::Paused),
                _ => None,
            };
            if let Some(to) = to {
                self.transition(&mut s, to);
            }
            self.changed.notify_all();
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Waits until the job is cancelled, asked to complete or to pause
    /// (and then until it is resumed), or kicked otherwise: for a job with
    /// nothing to do until then. Returns at once if a cancel, a complete
    /// or a pause was asked for before: one asked for while the job was
    /// running finds no waker to wake.
    pub async fn wait_kick(&self) {
        let kicks = {
            let mut s = self.state.lock();
            if s.cancelled || s.should_complete || s.pause_count > 0 {
                None
            } else {
                s.busy = false;
                self.changed.notify_all();
                Some(s.kicks)
            }
        };
        if let Some(kicks) = kicks {
            self.kicked_since(kicks).await;
        }
        // On, unless it is to pause.
        self.pause_point().await
    }

    /// Resolves once the job has been kicked since its kick count was
    /// `kicks`. Only the job's own task may wait so: a kick wakes the one
    /// task that waits last.
    fn kicked_since(&self, kicks: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let mut s = self.state.lock();
            if s.kicks != kicks {
                return Poll::Ready(());
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    fn kick(&self, s: &mut State) {
        s.kicks = s.kicks.wrapping_add(1);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        self.changed.notify_all();
    }

    /// Whether the job is asked to stop at its next pause point (a drained
    /// section, job-pause): a job with I/O in flight finishes it first.
    pub fn pause_requested(&self) -> bool {
        self.state.lock().pause_count > 0
    }

    /// Whether the job was cancelled (for a job that is ready, only a
    /// forced cancel counts: a plain one completes it without its final
    /// step, see [`Job::cancel_requested`]).
    pub fn is_cancelled(&self) -> bool {
        self.state.lock().is_cancelled()
    }

    /// Whether a cancel was asked for at all.
    pub fn cancel_requested(&self) -> bool {
        self.state.lock().cancelled
    }

    /// Whether job-complete was asked for.
    pub fn should_complete(&self) -> bool {
        self.state.lock().should_complete
    }

    /// Sets how much work there is, in bytes.
    pub fn set_total(&self, total: u64) {
        self.state.lock().total = total;
    }

    /// Adds to the work to do.
    pub fn add_total(&self, bytes: u64) {
        self.state.lock().total += bytes;
    }

    /// Sets the progress: `current` of `total` bytes done.
    pub fn set_progress(&self, current: u64, total: u64) {
        let mut s = self.state.lock();
        s.current = current;
        s.total = total;
    }

    /// Counts work done.
    pub fn add_progress(&self, bytes: u64) {
        self.state.lock().current += bytes;
    }

    /// The progress: (done, total).
    pub fn progress(&self) -> (u64, u64) {
        let s = self.state.lock();
        (s.current, s.total)
    }

    /// For the job's work: sleeps for `duration`, or less. A kick (a
    /// cancel, a pause, a resume, job-complete, a new speed) ends the sleep
    /// at once, and a job that is cancelled or asked to pause does not
    /// sleep, as QEMU's job_sleep_ns, so that the job sees them without
    /// delay (every caller's loop goes on to its pause point). Only the
    /// job's own task may sleep so: a kick wakes the one task that waits
    /// last.
    pub async fn sleep(&self, duration: Duration) -> io::Result<()> {
        let kicks = {
            let s = self.state.lock();
            if s.must_not_wait() {
                return Ok(());
            }
            s.kicks
        };
        match race(sleep(duration), self.kicked_since(kicks)).await {
            Either::Left(slept) => slept,
            Either::Right(()) => Ok(()),
        }
    }

    /// Accounts `bytes` against the speed limit, sleeping as needed
    /// (QEMU's rate limit: slices of 100 ms).
    ///
    /// The sleep is cut short by a cancel, a pause (a drained section or
    /// job-pause: the job must get to its pause point) and a new speed, as
    /// QEMU's job_sleep_ns is: a kick ends each step of at most one slice
    /// (see [`Job::sleep`]), and the job is looked at between them. What is
    /// left of the wait is not forgiven:
    /// the slice stays in the future, so the next call waits for it.
    pub async fn rate_limit(&self, bytes: u64) {
        const SLICE: Duration = Duration::from_millis(100);
        let (until, speed) = {
            let mut s = self.state.lock();
            if s.speed == 0 {
                return;
            }
            let now = Instant::now();
            if now.duration_since(s.slice_start) >= SLICE {
                s.slice_start = now;
                s.slice_bytes = 0;
            }
            s.slice_bytes += bytes;
            let allowed = s.speed / 10;
            if s.slice_bytes <= allowed.max(1) {
                return;
            }
            // Over the quota: wait for the slices the surplus needs.
            let slices = s.slice_bytes / allowed.max(1);
            let until = s.slice_start + SLICE * slices as u32;
            s.slice_start = until;
            s.slice_bytes = 0;
            (until, s.speed)
        };
        loop {
            let wait = {
                let mut s = self.state.lock();
                if s.speed != speed {
                    // Accounted again at the new speed from now on.
                    s.slice_start = Instant::now();
                    s.slice_bytes = 0;
                    return;
                }
                if s.must_not_wait() {
                    return;
                }
                until.saturating_duration_since(Instant::now())
            };
            if wait.is_zero() {
                return;
            }
            if let Err(e) = self.sleep(wait.min(SLICE)).await {
                log::warn!("job '{}': rate limit sleep: {e}", self.id);
                return;
            }
        }
    }

    /// The job is ready: job-complete may end it (BLOCK_JOB_READY).
    pub fn transition_to_ready(&self) {
        let mut s = self.state.lock();
        if s.status == JobStatus::Running {
            self.transition(&mut s, JobStatus::Ready);
            let data = self.block_event_data(&s);
            self.event("BLOCK_JOB_READY", data);
        }
    }

    /// Applies the error policy to an I/O error on `side`: reports it
    /// (BLOCK_JOB_ERROR), and for `stop` pauses the job until it is
    /// resumed (then the operation is retried).
    async fn on_error(&self, side: Side, error: &io::Error) -> Verdict {
        let policy = match side {
            Side::Source => self.on_source_error,
            Side::Target => self.on_target_error,
        };
        let enospc = error.raw_os_error() == Some(libc::ENOSPC);
        let (action, verdict) = match policy {
            OnError::Ignore => ("ignore", Verdict::Ignore),
            OnError::Stop => ("stop", Verdict::Retry),
            OnError::Enospc if enospc => ("stop", Verdict::Retry),
            OnError::Report | OnError::Enospc | OnError::Auto => ("report", Verdict::Fail),
        };
        let operation = match side {
            Side::Source => "read",
            Side::Target => "write",
        };
        self.event(
            "BLOCK_JOB_ERROR",
            json!({"device": self.id, "operation": operation, "action": action}),
        );
        if verdict == Verdict::Retry {
            {
                let mut s = self.state.lock();
                s.io_status = if enospc { "nospace" } else { "failed" };
                if !s.user_paused {
                    s.user_paused = true;
                    s.pause_count += 1;
                }
            }
            self.pause_point().await;
            if self.is_cancelled() {
                return Verdict::Fail;
            }
        }
        verdict
    }

    /// For a job's copy loop, after an operation failed on `side`: applies
    /// the error policy (reports the error, and stops the job for `stop`)
    /// and returns `Ok` when the
    /// loop should try the operation again: at once after a stop and a
    /// resume, after a short delay when the error is ignored (as QEMU's
    /// jobs, which must get the data there to succeed); or the error that
    /// ends the job.
    pub async fn retry_or_fail(&self, side: Side, error: io::Error) -> io::Result<()> {
        match self.on_error(side, &error).await {
            Verdict::Retry => Ok(()),
            Verdict::Ignore => self.sleep(IGNORED_ERROR_DELAY).await,
            Verdict::Fail => Err(error),
        }
    }

    // ----------------------------------------------------------------
    // Verbs.

    fn check(&self, s: &State, verb: Verb) -> Result<(), Error> {
        if s.status.allows(verb) {
            Ok(())
        } else {
            Err(verb_refused(&self.id, s.status, verb))
        }
    }

    /// job-pause.
    pub fn pause(&self) -> Result<(), Error> {
        let mut s = self.state.lock();
        self.check(&s, Verb::Pause)?;
        if !s.user_paused {
            s.user_paused = true;
            s.pause_count += 1;
            self.kick(&mut s);
        }
        Ok(())
    }

    /// job-resume.
    pub fn resume(&self) -> Result<(), Error> {
        let mut s = self.state.lock();
        self.check(&s, Verb::Resume)?;
        if !s.user_paused {
            return Err(Error::OpenFailed(format!(
                "Can't resume a job that was not paused: '{}'",
                self.id
            )));
        }
        s.user_paused = false;
        s.pause_count -= 1;
        s.io_status = "ok";
        self.kick(&mut s);
        Ok(())
    }

    /// block-job-set-speed.
    pub fn set_speed(&self, speed: u64) -> Result<(), Error> {
        let mut s = self.state.lock();
        self.check(&s, Verb::SetSpeed)?;
        s.speed = speed;
        self.kick(&mut s);
        Ok(())
    }

    /// job-complete.
    pub fn complete(&self) -> Result<(), Error> {
        let mut s = self.state.lock();
        self.check(&s, Verb::Complete)?;
        if !self.driver.completes_on_request() {
            return Err(Error::OpenFailed(format!(
                "The active block job '{}' cannot be completed",
                self.id
            )));
        }
        if s.cancelled {
            return Err(Error::OpenFailed(format!(
                "Job '{}' has been cancelled",
                self.id
            )));
        }
        s.should_complete = true;
        self.kick(&mut s);
        Ok(())
    }

    /// job-cancel; `force` cancels a ready job instead of completing it
    /// without its final step.
    pub fn cancel(self: &Arc<Self>, force: bool) -> Result<(), Error> {
        let (status, force) = {
            let mut s = self.state.lock();
            self.check(&s, Verb::Cancel)?;
            // A plain cancel of a job that is not ready is a forced one.
            let force = force || !matches!(s.status, JobStatus::Ready | JobStatus::Standby);
            s.cancelled = true;
            s.force |= force;
            if s.user_paused {
                s.user_paused = false;
                s.pause_count -= 1;
            }
            self.kick(&mut s);
            (s.status, force)
        };
        if force {
            self.driver.cancel_in_flight();
        }
        match status {
            // The whole group is done: it ends now, as a failure.
            JobStatus::Pending => {
                let job = self.clone();
                control::submit(Box::new(move || job.finish_group()));
            }
            // The others are still working: they are cancelled too, and
            // the group ends when the last one has stopped.
            JobStatus::Waiting => {
                for other in self.group().iter().filter(|j| !Arc::ptr_eq(j, self)) {
                    let _ = other.cancel(true);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// job-finalize.
    pub fn finalize(self: &Arc<Self>) -> Result<(), Error> {
        {
            let s = self.state.lock();
            self.check(&s, Verb::Finalize)?;
        }
        self.finalize_group();
        Ok(())
    }

    /// job-dismiss: a concluded job goes.
    pub fn dismiss(&self) -> Result<(), Error> {
        let mut s = self.state.lock();
        self.check(&s, Verb::Dismiss)?;
        // Gone from queries before its last event says so.
        if let Some(g) = self.graph.upgrade() {
            g.forget_job(self);
        }
        self.transition(&mut s, JobStatus::Null);
        Ok(())
    }

    // ----------------------------------------------------------------
    // Ending, on the control thread.

    fn group(self: &Arc<Self>) -> Vec<Arc<Job>> {
        match &self.state.lock().txn {
            Some(txn) => txn.members(),
            None => vec![self.clone()],
        }
    }

    /// The work future returned.
    fn work_done(self: &Arc<Self>, result: io::Result<()>) {
        let group = self.group();
        {
            let mut s = self.state.lock();
            s.finished = true;
            s.busy = false;
            let cancelled = s.is_cancelled();
            s.result = Some(match result {
                Ok(()) if cancelled => Err("Operation canceled".into()),
                Ok(()) => Ok(()),
                Err(e) => Err(e.to_string()),
            });
            if s.result.as_ref().is_some_and(|r| r.is_err()) {
                self.transition(&mut s, JobStatus::Aborting);
            } else {
                self.transition(&mut s, JobStatus::Waiting);
            }
        }
        let failed = self
            .state
            .lock()
            .result
            .as_ref()
            .is_some_and(|r| r.is_err());
        if failed {
            // The others of the group are cancelled and end with it.
            for other in group.iter().filter(|j| !Arc::ptr_eq(j, self)) {
                let _ = other.cancel(true);
            }
        }
        if group.iter().all(|j| j.state.lock().finished) {
            self.finish_group();
        }
    }

    /// Every job of the group has finished its work: failures end the
    /// group; successes go pending and are finalized (now, or on
    /// job-finalize).
    fn finish_group(self: &Arc<Self>) {
        let group = self.group();
        let any_failed = group.iter().any(|j| {
            let s = j.state.lock();
            s.is_cancelled() || s.result.as_ref().is_some_and(|r| r.is_err())
        });
        if any_failed {
            for job in &group {
                job.conclude();
            }
            return;
        }
        let mut auto = true;
        for job in &group {
            let mut s = job.state.lock();
            if s.status == JobStatus::Waiting {
                job.transition(&mut s, JobStatus::Pending);
                if !s.auto_finalize && job.is_block_job() {
                    let data = json!({"type": job.job_type(), "id": job.id});
                    job.event("BLOCK_JOB_PENDING", data);
                }
            }
            auto &= s.auto_finalize;
        }
        if auto {
            self.finalize_group();
        }
    }

    /// Prepares every job of the group, then commits them all, or aborts
    /// them all if one cannot be prepared.
    fn finalize_group(self: &Arc<Self>) {
        let group = self.group();
        let Some(graph) = self.graph.upgrade() else {
            return;
        };
        for job in &group {
            if let Err(e) = job.driver.prepare(&graph, job) {
                let mut s = job.state.lock();
                s.result = Some(Err(e.to_string()));
                job.transition(&mut s, JobStatus::Aborting);
            }
        }
        for job in &group {
            job.conclude();
        }
    }

    /// Commits or aborts the job, cleans up, sends its end event and
    /// concludes it (and dismisses it if it should go on its own).
    fn conclude(&self) {
        let Some(graph) = self.graph.upgrade() else {
            return;
        };
        let (ok, cancelled) = {
            let mut s = self.state.lock();
            if matches!(s.status, JobStatus::Concluded | JobStatus::Null) {
                return;
            }
            let cancelled = s.is_cancelled();
            if cancelled && s.result.as_ref().is_none_or(|r| r.is_ok()) {
                s.result = Some(Err("Operation canceled".into()));
            }
            let ok = s.result.as_ref().is_some_and(|r| r.is_ok());
            if !ok && s.status != JobStatus::Aborting {
                self.transition(&mut s, JobStatus::Aborting);
            }
            (ok, cancelled)
        };
        if ok {
            self.driver.commit(&graph, self);
        } else {
            self.driver.abort(&graph, self);
        }
        self.driver.clean(&graph, self);
        let mut s = self.state.lock();
        if s.auto_dismiss {
            // As in QEMU, where a job ends in one main loop iteration: a
            // client that sees the end event no longer finds the job.
            graph.forget_job(self);
        }
        let mut data = self.block_event_data(&s);
        if cancelled && self.is_block_job() {
            self.event("BLOCK_JOB_CANCELLED", data);
        } else if self.is_block_job() {
            if let Some(Err(e)) = &s.result {
                data["error"] = json!(e);
            }
            self.event("BLOCK_JOB_COMPLETED", data);
        }
        self.transition(&mut s, JobStatus::Concluded);
        let dismiss = s.auto_dismiss;
        drop(s);
        if dismiss {
            let _ = self.dismiss();
        }
    }

    /// The job's error, if it failed.
    pub fn error(&self) -> Option<String> {
        match &self.state.lock().result {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// QAPI's JobInfo (query-jobs).
    pub fn info(&self) -> Value {
        let s = self.state.lock();
        let mut v = json!({
            "id": self.id,
            "type": self.job_type(),
            "status": s.status.as_str(),
            "current-progress": s.current,
            "total-progress": s.total,
        });
        if let Some(Err(e)) = &s.result {
            v["error"] = json!(e);
        }
        v
    }

    /// QAPI's BlockJobInfo (query-block-jobs).
    pub fn block_info(&self) -> Value {
        let s = self.state.lock();
        let mut v = json!({
            "type": self.job_type(),
            "device": self.id,
            "len": s.total,
            "offset": s.current,
            "busy": s.busy,
            "paused": s.user_paused,
            "speed": s.speed,
            "io-status": s.io_status,
            "ready": matches!(s.status, JobStatus::Ready | JobStatus::Standby),
            "status": s.status.as_str(),
            "auto-finalize": s.auto_finalize,
            "auto-dismiss": s.auto_dismiss,
        });
        if let Some(Err(e)) = &s.result {
            v["error"] = json!(e);
        }
        v
    }

    /// Cancels the job and waits until it has concluded (at exit).
    pub(crate) fn cancel_and_wait(self: &Arc<Self>) {
        let _ = self.cancel(true);
        let mut s = self.state.lock();
        while !matches!(s.status, JobStatus::Concluded | JobStatus::Null) {
            self.wait_cancelled(&mut s);
        }
    }

    /// Waits for a change of a job cancelled by force, for at most
    /// `CANCEL_AGAIN`, then fails again what its requests wait for: a
    /// request may have begun to wait for long after the cancel (its
    /// connection found lost just then).
    fn wait_cancelled(&self, s: &mut MutexGuard<'_, State>) {
        self.changed.wait_for(s, CANCEL_AGAIN);
        if s.cancelled && s.force {
            MutexGuard::unlocked(s, || self.driver.cancel_in_flight());
        }
    }
}

/// A drained section pauses the job at its next pause point and waits
/// until it is there (or not running at all).
impl DrainParent for Job {
    fn drained_begin(&self) {
        let mut s = self.state.lock();
        s.pause_count += 1;
        self.kick(&mut s);
        while s.busy && !s.finished {
            if s.cancelled && s.force {
                // It runs to its end: nothing it waits for may last.
                self.wait_cancelled(&mut s);
            } else {
                self.changed.wait(&mut s);
            }
        }
    }

    fn drained_end(&self) {
        let mut s = self.state.lock();
        s.pause_count = s.pause_count.saturating_sub(1);
        self.kick(&mut s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A job whose work is one sleep of an hour.
    struct Sleeper;

    impl JobDriver for Sleeper {
        fn job_type(&self) -> &'static str {
            "backup"
        }

        fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a> {
            Box::pin(job.sleep(Duration::from_secs(3600)))
        }
    }

    /// A job's sleep (a speed limit's step, a ready mirror's idle poll,
    /// the delay after an ignored error) ends when the job is kicked, as
    /// QEMU's job_sleep_ns does: a cancel, a pause or a new speed is seen
    /// at once, not when the sleep is over.
    #[test]
    fn a_kick_ends_a_jobs_sleep() {
        let options = JobOptions::new("job0");
        let job = Job::new(&options, Box::new(Sleeper), Weak::new(), None, None);
        job.start().unwrap();
        // Kicked until its work is over: a kick before the sleep began is
        // not one it sees.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = job.state.lock();
        while !s.finished {
            assert!(
                Instant::now() < deadline,
                "a new speed did not end the sleep"
            );
            s.speed += 1;
            job.kick(&mut s);
            job.changed.wait_for(&mut s, Duration::from_millis(20));
        }
        assert_eq!(s.result, Some(Ok(())));
    }

    /// Found by the qmp_commands fuzz target, under load: a job is
    /// forgotten as it concludes and again as it is dismissed, by id. A
    /// new job that took the id in between (a second block-stream with
    /// the same job-id) was forgotten by the old one's dismissal: it ran
    /// on, out of query-block-jobs, job-cancel and shutdown's reach.
    #[test]
    fn a_job_that_ends_forgets_only_itself() {
        let graph = Graph::shared();
        let options = JobOptions::new("s0");
        let old = Job::new(&options, Box::new(Sleeper), graph.me(), None, None);
        graph.register_job(old.clone());
        graph.forget_job(&old);
        let new = Job::new(&options, Box::new(Sleeper), graph.me(), None, None);
        graph.register_job(new.clone());
        // The old job's dismissal.
        graph.forget_job(&old);
        let known = graph.job("s0").expect("the new job was forgotten");
        assert!(Arc::ptr_eq(&known, &new));
        graph.forget_job(&new);
        assert!(graph.job("s0").is_none());
    }

    /// A job that waits for kicks as a backup with `sync: none` does
    /// (until it is cancelled), and stops after each look at its cancel
    /// until the test lets it go on.
    struct WaitsForCancel {
        checked: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
    }

    impl JobDriver for WaitsForCancel {
        fn job_type(&self) -> &'static str {
            "backup"
        }

        fn run<'a>(&'a self, job: &'a Job) -> IoFuture<'a> {
            Box::pin(async move {
                while !job.cancel_requested() {
                    let _ = self.checked.lock().send(());
                    let _ = self.go.lock().recv_timeout(Duration::from_secs(10));
                    job.wait_kick().await;
                }
                Ok(())
            })
        }
    }

    /// A cancel that comes while the job runs, after it looked at its
    /// cancel and before it waits for a kick, finds no waker (the kick
    /// that woke the job took it): the wait must see the cancel, or the
    /// job waits for ever, and job-cancel and shutdown with it.
    #[test]
    fn a_cancel_before_a_wait_for_a_kick_ends_the_job() {
        let (checked, checked_rx) = mpsc::channel();
        let (go_tx, go) = mpsc::channel();
        let driver = WaitsForCancel {
            checked: Mutex::new(checked),
            go: Mutex::new(go),
        };
        let options = JobOptions::new("job0");
        let job = Job::new(&options, Box::new(driver), Weak::new(), None, None);
        job.start().unwrap();
        let step = Duration::from_secs(10);
        checked_rx.recv_timeout(step).unwrap();
        go_tx.send(()).unwrap();
        // Parked in its wait: a kick takes the waker and wakes it.
        let deadline = Instant::now() + step;
        {
            let mut s = job.state.lock();
            while s.busy || s.waker.is_none() {
                assert!(Instant::now() < deadline, "the job did not wait");
                job.changed.wait_for(&mut s, Duration::from_millis(20));
            }
        }
        job.set_speed(1).unwrap();
        checked_rx.recv_timeout(step).unwrap();
        // Between its look at the cancel and its wait.
        job.cancel(true).unwrap();
        go_tx.send(()).unwrap();
        let mut s = job.state.lock();
        while !s.finished {
            assert!(
                Instant::now() < deadline + step,
                "the cancelled job waits for a kick"
            );
            job.changed.wait_for(&mut s, Duration::from_millis(20));
        }
    }

    /// A job cancelled before it sleeps does not sleep.
    #[test]
    fn a_cancelled_job_does_not_sleep() {
        let options = JobOptions::new("job0");
        let job = Job::new(&options, Box::new(Sleeper), Weak::new(), None, None);
        {
            let mut s = job.state.lock();
            s.cancelled = true;
            s.force = true;
        }
        let slept = crate::aio::block_on(job.sleep(Duration::from_secs(3600)));
        slept.unwrap().unwrap();
    }

    /// A job asked to pause before it sleeps (a drained section, job-pause)
    /// does not sleep: it goes on to its pause point. Its kick came before
    /// the sleep, so only this check keeps the pause from waiting for the
    /// whole sleep (an hour here; up to 100 ms for the jobs' own sleeps).
    #[test]
    fn a_job_asked_to_pause_does_not_sleep() {
        let options = JobOptions::new("job0");
        let job = Job::new(&options, Box::new(Sleeper), Weak::new(), None, None);
        job.state.lock().pause_count = 1;
        let slept = crate::aio::block_on(job.sleep(Duration::from_secs(3600)));
        slept.unwrap().unwrap();
    }
}
