//! The app's process tree: its root and every descendant, whatever their session or process
//! group. Signals to the app's process group miss a descendant that called `setsid` or
//! `setpgid` (a daemonising worker, a shell's job), so freezing, resuming and killing a frozen
//! app go to each process of the tree, found through /proc. This is also the tree CRIU dumps
//! (`criu dump --tree ROOT`); a process reparented to PID 1 after its parent exited is no
//! longer part of it.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One process as /proc tells it.
struct Process {
    pid: i32,
    ppid: i32,
    state: String,
    comm: String,
}

/// Every process visible in /proc (this PID namespace's).
fn processes() -> Vec<Process> {
    crate::procfs::pids()
        .into_iter()
        .filter_map(|pid| {
            let stat = crate::procfs::stat(pid)?;
            Some(Process {
                pid,
                ppid: stat.ppid,
                state: stat.state.to_string(),
                comm: stat.comm,
            })
        })
        .collect()
}

/// `root` and all its descendants, from /proc.
pub fn pids(root: Pid) -> Vec<i32> {
    let all = processes();
    let mut tree = vec![root.as_raw()];
    let mut index = 0;
    while index < tree.len() {
        let parent = tree[index];
        tree.extend(all.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
        index += 1;
    }
    tree.sort_unstable();
    tree
}

/// Children of `launcher` other than the app's root and `except` (the job asking), not yet
/// reaped: processes that left the app's tree (their parent exited and the kernel reparented
/// them to the launcher, PID 1 or subreaper). CRIU dumps only the app's tree, so they would be
/// left behind. Each as `PID (comm)`.
pub fn strays(launcher: Pid, app: Pid, except: Pid) -> Vec<String> {
    let mut found: Vec<String> = processes()
        .into_iter()
        .filter(|p| {
            p.ppid == launcher.as_raw()
                && ![app.as_raw(), except.as_raw(), launcher.as_raw()].contains(&p.pid)
                && p.state != "Z"
                && p.state != "X"
        })
        .map(|p| format!("{} ({})", p.pid, p.comm))
        .collect();
    found.sort();
    found
}

/// How long [`stop`] waits for the kernel to stop every process it signalled.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Stops every process of the tree (SIGSTOP to each) and waits until each is stopped. Repeats
/// until a pass finds no process it has not stopped yet, so a child forked while the tree was
/// being frozen is frozen too. Returns the stopped PIDs.
///
/// # Errors
/// The root cannot be signalled (it is gone), or some process is still running after
/// [`STOP_WAIT`]; the processes already stopped stay stopped, for the caller to resume.
pub fn stop(root: Pid) -> Result<Vec<i32>, StopError> {
    // Each process gets exactly one SIGSTOP: a second one stays pending on a stopped task
    // and interrupts CRIU's parasite later ("Unexpected task interruption", measured with a
    // group SIGSTOP sent on top of the per-process ones).
    kill(root, Signal::SIGSTOP).map_err(StopError::Signal)?;
    let deadline = Instant::now() + STOP_WAIT;
    let mut signalled = vec![root.as_raw()];
    loop {
        let tree = pids(root);
        let new: Vec<i32> = tree
            .iter()
            .copied()
            .filter(|pid| !signalled.contains(pid))
            .collect();
        for pid in &new {
            // A process that exited meanwhile is simply no longer part of the tree.
            let _ = kill(Pid::from_raw(*pid), Signal::SIGSTOP);
        }
        signalled.extend(&new);
        let running: Vec<i32> = tree
            .iter()
            .copied()
            .filter(|pid| !is_stopped(*pid))
            .collect();
        if new.is_empty() && running.is_empty() {
            return Ok(tree);
        }
        if Instant::now() > deadline {
            return Err(StopError::StillRunning(running));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Why [`stop`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("cannot stop the app{}", if *.0 == nix::Error::EPERM { " (the app runs as another user than the launcher, and signalling it needs CAP_KILL: add KILL to the container's securityContext.capabilities.add)" } else { "" })]
    Signal(#[source] nix::Error),
    #[error("processes {0:?} of the app's tree did not stop within 2 s")]
    StillRunning(Vec<i32>),
}

/// Resumes every process of the tree (SIGCONT to each).
pub fn resume(root: Pid) {
    for pid in pids(root) {
        if let Err(error) = kill(Pid::from_raw(pid), Signal::SIGCONT) {
            tracing::warn!(%error, pid, "cannot resume a process of the app");
        }
    }
}

/// Kills every process of the tree (SIGKILL to each), the root first so nothing of it reacts.
pub fn kill_all(root: Pid) {
    let tree = pids(root);
    let _ = kill(root, Signal::SIGKILL);
    for pid in tree {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Whether every process of the tree is stopped (state T), as `status` reports it.
pub fn all_stopped(root: Pid) -> bool {
    let tree = pids(root);
    !tree.is_empty() && tree.into_iter().all(is_stopped)
}

/// Whether `pid` (a process or a thread) is stopped (state T in /proc/PID/stat; t, traced,
/// counts too). One that is gone counts as stopped: it runs nothing.
pub fn is_stopped(pid: i32) -> bool {
    crate::procfs::stat(pid).is_none_or(|s| matches!(s.state, 'T' | 't' | 'Z' | 'X'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A shell whose child starts its own session: `setsid` puts it beyond the group.
    #[test]
    fn a_descendant_in_its_own_session_is_stopped_and_resumed_with_the_tree() {
        let Ok(mut shell) = Command::new("sh")
            .args([
                "-c",
                "setsid sh -c 'while :; do sleep 0.05; done' & while :; do sleep 0.05; done",
            ])
            .spawn()
        else {
            return;
        };
        let root = Pid::from_raw(shell.id() as i32);
        let start = Instant::now();
        while pids(root).len() < 3 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let tree = pids(root);
        assert!(tree.len() >= 3, "the tree did not form: {tree:?}");
        let stopped = stop(root).unwrap();
        assert!(all_stopped(root), "not every process stopped: {stopped:?}");
        for pid in &stopped {
            assert!(is_stopped(*pid), "{pid} runs");
        }
        resume(root);
        let start = Instant::now();
        while all_stopped(root) && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!all_stopped(root), "nothing resumed");
        kill_all(root);
        let _ = shell.wait();
    }
}
