//! Signal handling for PID 1, the way catatonit and tini do it: block every signal the
//! kernel does not need to deliver synchronously, read them from a `signalfd`, and decide per
//! signal whether it means "reap", "forward to the app" or "ignore".
//!
//! A PID 1 only receives signals it handles or blocks (the kernel drops default-action
//! signals sent to a namespace's init), so blocking them is what makes `docker stop` /
//! kubelet's SIGTERM reach the launcher at all.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

/// Signals the kernel raises synchronously for a fault of the launcher itself; blocking them
/// would turn a crash into a hang, so they stay unblocked (catatonit's `kernel_signals`).
const SYNCHRONOUS: [Signal; 7] = [
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGABRT,
    Signal::SIGTRAP,
    Signal::SIGSYS,
];

/// What the launcher does with a signal it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A child changed state: collect every exited child.
    Reap,
    /// Send the same signal to the app's whole process group.
    Forward,
    /// The terminal asked the launcher itself to stop for background tty access (only
    /// possible when run interactively). Stopping PID 1 would freeze the container, so it is
    /// ignored, as catatonit does.
    Ignore,
}

/// Policy for one signal number. Everything but SIGCHLD and the tty-stop signals is
/// forwarded, including SIGTSTP/SIGCONT (so `kill -STOP`-style pausing of the app works
/// through the launcher) and real-time signals.
pub fn action(signo: i32) -> Action {
    match Signal::try_from(signo) {
        Ok(Signal::SIGCHLD) => Action::Reap,
        Ok(Signal::SIGTTIN | Signal::SIGTTOU) => Action::Ignore,
        _ => Action::Forward,
    }
}

/// Signals that ask the app to stop (what kubelet and `docker stop` send, and Ctrl-C/Ctrl-\\).
/// Their handling depends on the launcher's state: while the app is frozen by a checkpoint,
/// forwarding is not enough (see the supervisor).
pub fn is_terminating(signo: i32) -> bool {
    matches!(signo, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT)
}

/// Signals blocked in the launcher and read from its signalfd.
fn launcher_mask() -> SigSet {
    let mut mask = SigSet::all();
    for signal in SYNCHRONOUS {
        mask.remove(signal);
    }
    // Rust's runtime ignores SIGPIPE so a closed stdout gives EPIPE instead of killing us.
    // Left out of the mask: a blocked SIGPIPE would be queued and then forwarded to the app
    // as if a user had sent it.
    mask.remove(Signal::SIGPIPE);
    mask
}

/// The blocked signals and the mask to give back to every child before it execs.
#[derive(Debug)]
pub struct Signals {
    pub fd: SignalFd,
    /// The mask the launcher was started with. Children inherit the blocked mask across
    /// fork and exec, so the app and criu must get this back in `pre_exec` or they run deaf.
    pub original_mask: SigSet,
}

/// Errors setting up signal handling (before the app starts, so they end the launcher).
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot block signals")]
    Block(#[source] nix::Error),
    #[error("cannot create the signalfd")]
    SignalFd(#[source] nix::Error),
}

/// Blocks the launcher's signals and opens a non-blocking signalfd for them.
///
/// # Errors
/// When the kernel refuses `sigprocmask` or `signalfd` (not expected on Linux ≥ 2.6.27).
pub fn block() -> Result<Signals, SignalError> {
    let mask = launcher_mask();
    let mut original_mask = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&mask),
        Some(&mut original_mask),
    )
    .map_err(SignalError::Block)?;
    let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(SignalError::SignalFd)?;
    Ok(Signals { fd, original_mask })
}

/// Sends signal number `signo` to every process of group `pgid`.
///
/// # Errors
/// `ESRCH` when the group has no process left; `EPERM` when not allowed.
pub fn send_to_group(pgid: Pid, signo: i32) -> nix::Result<()> {
    // nix's `killpg` only takes the named signals, and real-time signals must be forwarded
    // too, so the raw call is used.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(-pgid.as_raw(), signo) };
    nix::errno::Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigchld_reaps_tty_stops_are_ignored_and_the_rest_forwarded() {
        assert_eq!(action(libc::SIGCHLD), Action::Reap);
        assert_eq!(action(libc::SIGTTIN), Action::Ignore);
        assert_eq!(action(libc::SIGTTOU), Action::Ignore);
        for signo in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTSTP,
            libc::SIGCONT,
            libc::SIGWINCH,
            libc::SIGALRM,
        ] {
            assert_eq!(action(signo), Action::Forward, "signal {signo}");
        }
        assert_eq!(action(libc::SIGRTMIN() + 3), Action::Forward);
    }

    #[test]
    fn the_mask_keeps_fault_signals_and_sigpipe_deliverable() {
        let mask = launcher_mask();
        for signal in SYNCHRONOUS {
            assert!(!mask.contains(signal), "{signal} must stay unblocked");
        }
        assert!(!mask.contains(Signal::SIGPIPE));
        for signal in [
            Signal::SIGTERM,
            Signal::SIGCHLD,
            Signal::SIGINT,
            Signal::SIGTSTP,
        ] {
            assert!(mask.contains(signal), "{signal} must be blocked");
        }
    }
}
