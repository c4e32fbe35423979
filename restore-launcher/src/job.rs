//! Jobs: the long pieces of work (dump and write an archive; verify and restore one) run in a
//! child process forked from PID 1, never in PID 1 itself.
//!
//! Why a process and not a thread: PID 1 stays single-threaded, so forking the app, criu and
//! throw-away PID-burning children stays async-signal-safe; PID 1 keeps relaying output and
//! handling signals while the job blocks on a slow network stream; and a failure inside
//! archive code can only end the job, never the container's init. A job reports its outcome
//! as one JSON line on a pipe that PID 1 reads when it reaps the job.

use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;

use migrate_format::{CheckpointReport, RestoreReport};
use nix::unistd::{ForkResult, Pid, fork};
use serde::{Deserialize, Serialize};

/// What a job reports back to PID 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "lowercase")]
pub enum Outcome {
    Checkpoint(CheckpointReport),
    Restore(RestoreReport),
}

impl Outcome {
    fn ok(&self) -> bool {
        match self {
            Outcome::Checkpoint(report) => report.ok,
            Outcome::Restore(report) => report.ok,
        }
    }
}

/// A running job.
#[derive(Debug)]
pub struct Job {
    pub pid: Pid,
    result: OwnedFd,
}

impl Job {
    /// Forks a job running `work`; the child exits 0 when the outcome is ok, 1 otherwise.
    ///
    /// # Errors
    /// When pipe or fork fails (nothing was started).
    pub fn start(work: impl FnOnce() -> Outcome) -> nix::Result<Job> {
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        #[allow(unsafe_code)]
        // SAFETY: PID 1 never starts a thread, so the child may run any code after fork.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(reader);
                let outcome = work();
                let mut line = serde_json::to_vec(&outcome).unwrap_or_default();
                line.push(b'\n');
                let _ = std::fs::File::from(writer).write_all(&line);
                std::process::exit(if outcome.ok() { 0 } else { 1 });
            }
            ForkResult::Parent { child } => {
                drop(writer);
                Ok(Job {
                    pid: child,
                    result: reader,
                })
            }
        }
    }

    /// The outcome the job wrote, read after it was reaped (so the pipe is complete).
    pub fn outcome(self) -> Option<Outcome> {
        let mut text = String::new();
        std::fs::File::from(self.result)
            .read_to_string(&mut text)
            .ok()?;
        serde_json::from_str(text.trim()).ok()
    }
}
