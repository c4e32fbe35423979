//! A checkpointed copy held stopped. Once its checkpoint is written, the app on the source
//! must not run again unless the migration is given up (`rollback`, a lease that ran out) or,
//! once committed, the plugin's way back asks (`rollback --committed`). SIGSTOP alone does not
//! keep it stopped: any process of the app's user may send it SIGCONT (a shell of that user, a
//! process of another container sharing the pod's PID namespace). So PID 1 seizes every
//! thread of the stopped app with ptrace: a traced thread in a stop leaves it only when its
//! tracer lets it go, whatever SIGCONT arrives (the kernel only notes it for the tracer),
//! while SIGKILL still ends it (the pod's deletion). With `PTRACE_O_EXITKILL` the held copy
//! dies with PID 1 rather than running.
//!
//! Seizing needs ptrace rights over the app: the same user with no capability the launcher
//! lacks (root and non-root mode), or CAP_SYS_PTRACE (`--user` mode), and a Yama scope that
//! allows a parent to trace its descendants. Without them the copy stays stopped by SIGSTOP
//! only, which is said in the log. Either way, holding fails when any process of the app runs
//! or another process traces it.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
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
    /// Another process traces the app (a debugger, a process of the app's user): it could
    /// resume it whenever it likes.
    #[error(
        "thread {thread} of the app is traced by process {tracer} (a debugger, or a process of the app's user), which could resume it at any time: end that tracer"
    )]
    Traced { thread: i32, tracer: i32 },
}

impl Held {
    /// Lets every held thread go (they stay stopped until SIGCONT, which the caller sends).
    pub fn release(self) {
        for thread in self.threads {
            let_go(thread);
        }
    }
}

/// Detaches `thread`. PTRACE_DETACH needs the tracee in a trace stop: a thread that was
/// running when it was seized is interrupted first, and its stop waited for (a second at
/// most), so that it is never left traced by PID 1, where its next signal would stop it for
/// good.
fn let_go(thread: Pid) {
    // ESRCH: gone, or not in a trace stop (it was running when seized).
    if ptrace::detach(thread, None).is_ok() || !still_traced(thread) {
        return;
    }
    let _ = ptrace::interrupt(thread);
    for _ in 0..1000 {
        match waitpid(thread, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Ok(_) => break,
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
    if let Err(errno) = ptrace::detach(thread, None)
        && errno != Errno::ESRCH
    {
        tracing::warn!(%errno, tid = thread.as_raw(), "cannot let a thread of the app go");
    }
}

/// Whether `thread` lives and is traced by this process.
fn still_traced(thread: Pid) -> bool {
    crate::procfs::stat(thread.as_raw()).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
        && tracer(thread.as_raw()) == Some(std::process::id() as i32)
}

/// The process tracing `thread`, if any.
fn tracer(thread: i32) -> Option<i32> {
    let status = crate::procfs::status(Some(thread))?;
    crate::procfs::field(&status, "TracerPid")?
        .parse()
        .ok()
        .filter(|&pid| pid != 0)
}

/// Seizes every thread of the app's tree under `root`, which must be stopped. `Ok(None)` when
/// ptrace is not permitted here (the copy stays stopped by SIGSTOP alone, said in the log).
///
/// # Errors
/// [`HoldError::Running`] when a process of the tree is not stopped, [`HoldError::Traced`]
/// when another process traces one (nothing stays held).
pub fn hold(root: Pid) -> Result<Option<Held>, HoldError> {
    let mut held = Held {
        threads: Vec::new(),
    };
    let ours = std::process::id() as i32;
    for pid in crate::tree::pids(root) {
        for thread in crate::procfs::threads(pid) {
            let Some(stat) = crate::procfs::stat(thread) else {
                continue; // gone: it runs nothing
            };
            // An exited thread or an unreaped child cannot be traced and runs nothing.
            if matches!(stat.state, 'Z' | 'X') {
                continue;
            }
            match tracer(thread) {
                Some(pid) if pid == ours => continue,
                Some(tracer) => {
                    held.release();
                    return Err(HoldError::Traced { thread, tracer });
                }
                None => {}
            }
            match ptrace::seize(Pid::from_raw(thread), ptrace::Options::PTRACE_O_EXITKILL) {
                Ok(()) => held.threads.push(Pid::from_raw(thread)),
                // Gone meanwhile: it runs nothing.
                Err(Errno::ESRCH) => {}
                Err(errno) => {
                    held.release();
                    if let Some(tracer) = tracer(thread) {
                        return Err(HoldError::Traced { thread, tracer });
                    }
                    tracing::warn!(
                        %errno,
                        thread,
                        "cannot hold the app's checkpointed copy under ptrace (another user's app without CAP_SYS_PTRACE, or a Yama ptrace scope of 2 or more): it stays stopped by SIGSTOP only, which a process of the app's user could undo with SIGCONT"
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
    if let Err(error) = stopped(root) {
        held.release();
        return Err(error);
    }
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
