//! Jobs: the long pieces of work (dump and write an archive; verify and restore one) run in a
//! child process forked from PID 1, never in PID 1 itself.
//!
//! Why a process and not a thread: PID 1 stays single-threaded, so forking the app, criu and
//! throw-away PID-burning children stays async-signal-safe; PID 1 keeps relaying output and
//! handling signals while the job blocks on a slow network stream; and a failure inside
//! archive code can only end the job, never the container's init. A job reports its outcome
//! as one JSON line on a pipe that PID 1 drains from its poll loop while the job runs
//! ([`Job::pump`]): a job never blocks on a full pipe that PID 1 would read only after reaping
//! it, and PID 1 never keeps more than [`OUTCOME_LIMIT`] of it. Its text fields are bounded
//! before it is written ([`Outcome::bounded`]): archive-controlled strings and long lists of
//! processes end up in error messages.

use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;

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

/// The most of a job's outcome PID 1 keeps; what comes beyond is read and dropped.
pub const OUTCOME_LIMIT: usize = 1024 * 1024;
/// The longest error message an outcome carries (the rest is cut, saying so).
const ERROR_LIMIT: usize = 16 * 1024;

impl Outcome {
    fn ok(&self) -> bool {
        match self {
            Outcome::Checkpoint(report) => report.ok,
            Outcome::Restore(report) => report.ok,
        }
    }

    /// This outcome with its error message cut to about [`ERROR_LIMIT`]: its beginning and its
    /// end (where the reason usually is) are kept, the middle is replaced by how much was cut.
    fn bounded(mut self) -> Self {
        let error = match &mut self {
            Outcome::Checkpoint(report) => &mut report.error,
            Outcome::Restore(report) => &mut report.error,
        };
        if let Some(text) = error
            && text.len() > ERROR_LIMIT
        {
            let mut head = ERROR_LIMIT * 3 / 4;
            while !text.is_char_boundary(head) {
                head -= 1;
            }
            let mut tail = text.len() - ERROR_LIMIT / 4;
            while !text.is_char_boundary(tail) {
                tail += 1;
            }
            *text = format!(
                "{} … ({} bytes cut) … {}",
                &text[..head],
                tail - head,
                &text[tail..]
            );
        }
        self
    }
}

/// A running job.
#[derive(Debug)]
pub struct Job {
    pub pid: Pid,
    /// The read end of the outcome pipe (non-blocking) until its end of file.
    result: Option<OwnedFd>,
    /// What was read of the outcome so far, at most [`OUTCOME_LIMIT`].
    read: Vec<u8>,
    /// Whether the outcome was longer than that.
    overflowed: bool,
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
                let outcome = work().bounded();
                let mut line = serde_json::to_vec(&outcome).unwrap_or_default();
                line.push(b'\n');
                let _ = std::fs::File::from(writer).write_all(&line);
                std::process::exit(if outcome.ok() { 0 } else { 1 });
            }
            ForkResult::Parent { child } => {
                drop(writer);
                let flags = nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_GETFL)?;
                nix::fcntl::fcntl(
                    &reader,
                    nix::fcntl::FcntlArg::F_SETFL(
                        nix::fcntl::OFlag::from_bits_truncate(flags)
                            | nix::fcntl::OFlag::O_NONBLOCK,
                    ),
                )?;
                Ok(Job {
                    pid: child,
                    result: Some(reader),
                    read: Vec::new(),
                    overflowed: false,
                })
            }
        }
    }

    /// The outcome pipe, to poll for readability while it is open.
    pub fn result_fd(&self) -> Option<BorrowedFd<'_>> {
        self.result.as_ref().map(AsFd::as_fd)
    }

    /// Reads what the job has written of its outcome so far, never blocking; keeps at most
    /// [`OUTCOME_LIMIT`] and drops the rest.
    pub fn pump(&mut self) {
        let Some(fd) = &self.result else {
            return;
        };
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match nix::unistd::read(fd, &mut buffer) {
                Ok(0) => {
                    self.result = None;
                    return;
                }
                Ok(n) => {
                    let room = OUTCOME_LIMIT.saturating_sub(self.read.len());
                    if n > room {
                        self.overflowed = true;
                    }
                    self.read.extend_from_slice(&buffer[..n.min(room)]);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(error) => {
                    tracing::warn!(%error, "reading a job's outcome failed");
                    self.result = None;
                    return;
                }
            }
        }
    }

    /// The outcome the job wrote, once it was reaped (everything it wrote is in the pipe).
    /// `None` when it wrote none, or one that is not an outcome or is over [`OUTCOME_LIMIT`].
    pub fn outcome(mut self) -> Option<Outcome> {
        self.pump();
        if self.overflowed {
            tracing::warn!(
                limit = OUTCOME_LIMIT,
                "a job's outcome was longer than the limit; it counts as none"
            );
            return None;
        }
        serde_json::from_slice(self.read.trim_ascii()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_error_keeps_its_beginning_and_end_and_says_how_much_was_cut() {
        let long = format!(
            "archive refused: `{}` is not absolute",
            "é".repeat(ERROR_LIMIT)
        );
        let Outcome::Restore(report) = Outcome::Restore(RestoreReport::failed(long)).bounded()
        else {
            panic!("the kind changed");
        };
        let error = report.error.unwrap_or_default();
        assert!(error.len() < ERROR_LIMIT + 64, "{}", error.len());
        assert!(
            error.starts_with("archive refused: `éé"),
            "{}",
            &error[..40]
        );
        assert!(
            error.ends_with("éé` is not absolute"),
            "{}",
            &error[error.len() - 40..]
        );
        assert!(error.contains(" bytes cut) … "));
    }
}
