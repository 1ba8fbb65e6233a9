//! QEMU's job states and verbs, and which transitions and verbs each
//! state allows (job.c's JobSTT and JobVerbTable).

use std::fmt;

/// A job's state (QAPI's JobStatus).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused while running.
    Paused,
    /// Done with its bulk work, waiting for job-complete (mirror).
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Done, waiting to be finalized.
    Pending,
    /// Failing or cancelled, being cleaned up.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// QMP's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether the job may go from this state to `to`.
    pub fn can_become(self, to: JobStatus) -> bool {
        // Rows: from; columns: to, in the order of ALL.
        const T: [[u8; 11]; 11] = [
            [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], // undefined
            [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1], // created
            [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0], // running
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], // paused
            [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], // ready
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // standby
            [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], // waiting
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // pending
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], // aborting
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // concluded
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // null
        ];
        T[self.index()][to.index()] == 1
    }

    /// Whether the state allows `verb`.
    pub fn allows(self, verb: Verb) -> bool {
        const V: [[u8; 11]; 8] = [
            [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], // cancel
            [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // pause
            [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // resume
            [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], // set-speed
            [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], // complete
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], // finalize
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], // dismiss
            [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0], // change
        ];
        V[verb as usize][self.index()] == 1
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a user asks of a job (QAPI's JobVerb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// job-cancel.
    Cancel = 0,
    /// job-pause.
    Pause,
    /// job-resume.
    Resume,
    /// block-job-set-speed.
    SetSpeed,
    /// job-complete.
    Complete,
    /// job-finalize.
    Finalize,
    /// job-dismiss.
    Dismiss,
    /// block-job-change.
    Change,
}

impl Verb {
    /// QMP's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
            Verb::Change => "change",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_tables() {
        use JobStatus::*;
        assert!(Created.can_become(Running));
        assert!(Running.can_become(Ready) && Ready.can_become(Standby));
        assert!(!Paused.can_become(Ready));
        assert!(Pending.can_become(Concluded) && !Concluded.can_become(Running));
        assert!(Ready.allows(Verb::Complete) && !Running.allows(Verb::Complete));
        assert!(Concluded.allows(Verb::Dismiss) && !Pending.allows(Verb::Dismiss));
        assert!(Pending.allows(Verb::Finalize) && Pending.allows(Verb::Cancel));
        assert!(!Aborting.allows(Verb::Cancel));
    }
}
