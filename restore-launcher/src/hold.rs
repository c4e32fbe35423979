//! A committed copy held stopped. Once a migration commits, the app on the source is stale
//! (the target holds its state) and must not run again unless the plugin's way back asks
//! (`rollback --committed`). SIGSTOP alone does not keep it stopped: any process of the app's
//! user may send it SIGCONT (a shell of that user, a process of another container sharing the
//! pod's PID namespace). So PID 1 seizes every thread of the stopped app with ptrace: a traced
//! thread in a stop leaves it only when its tracer lets it go, whatever SIGCONT arrives
//! (the kernel only notes it for the tracer), while SIGKILL still ends it (the pod's
//! deletion). With `PTRACE_O_EXITKILL` the held copy dies with PID 1 rather than running.
//!
//! Seizing needs ptrace rights over the app: the same user with no capability the launcher
//! lacks (root and non-root mode), or CAP_SYS_PTRACE (`--user` mode), and a Yama scope that
//! allows a parent to trace its descendants. Without them the copy stays stopped by SIGSTOP
//! only, which is said in the log; either way a commit is refused when any process of the app
//! runs again.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

/// The app's threads PID 1 traces.
#[derive(Debug)]
pub struct Held {
    threads: Vec<Pid>,
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Something resumed the app (SIGCONT) since it was frozen.
    #[error(
        "process {0} of the app runs again (something sent it SIGCONT since the freeze): this copy is no longer the state the target got"
    )]
    Running(i32),
}

impl Held {
    /// Lets every held thread go (they stay stopped until SIGCONT, which the caller sends).
    pub fn release(self) {
        for thread in self.threads {
            // ESRCH: it exited (SIGKILL) meanwhile.
            let _ = ptrace::detach(thread, None);
        }
    }
}

/// Seizes every thread of the app's tree under `root`, which must be stopped. `Ok(None)` when
/// ptrace is not permitted here (the copy stays stopped by SIGSTOP alone, said in the log).
///
/// # Errors
/// [`HoldError::Running`] when a process of the tree is not stopped (nothing stays held).
pub fn hold(root: Pid) -> Result<Option<Held>, HoldError> {
    let mut held = Held {
        threads: Vec::new(),
    };
    for pid in crate::tree::pids(root) {
        for thread in crate::procfs::threads(pid).into_iter().map(Pid::from_raw) {
            match ptrace::seize(thread, ptrace::Options::PTRACE_O_EXITKILL) {
                Ok(()) => held.threads.push(thread),
                // Gone meanwhile: it runs nothing.
                Err(Errno::ESRCH) => {}
                Err(errno) => {
                    held.release();
                    tracing::warn!(
                        %errno,
                        pid,
                        "cannot hold the committed copy under ptrace (another user's app without CAP_SYS_PTRACE, a Yama ptrace scope of 2 or more, or a debugger attached): it stays stopped by SIGSTOP only, which a process of the app's user could undo with SIGCONT"
                    );
                    return stopped(root).map(|()| None);
                }
            }
        }
    }
    // Seized threads that were stopped move into a trace stop; one that runs stays running.
    // Checked once all are seized, so no SIGCONT can slip in between.
    for &thread in &held.threads {
        if !wait_stopped(thread) {
            held.release();
            return Err(HoldError::Running(thread.as_raw()));
        }
    }
    stopped(root)?;
    Ok(Some(held))
}

/// Ok when every process of the tree is stopped.
fn stopped(root: Pid) -> Result<(), HoldError> {
    match crate::tree::pids(root)
        .into_iter()
        .find(|&pid| !crate::tree::is_stopped(pid))
    {
        Some(pid) => Err(HoldError::Running(pid)),
        None => Ok(()),
    }
}

/// Whether a just-seized thread is (or within a moment becomes) stopped: the kernel moves a
/// group-stopped thread into a trace stop as it is seized.
fn wait_stopped(thread: Pid) -> bool {
    for _ in 0..100 {
        if crate::tree::is_stopped(thread.as_raw()) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}
