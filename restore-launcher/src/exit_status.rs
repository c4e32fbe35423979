//! How the app's fate becomes the launcher's exit code, as shells, tini and catatonit do it:
//! the app's own code; 128+N when a signal N killed it; 127 when the command was not found;
//! 126 when it was found but could not be executed.

use std::io;

use nix::sys::wait::WaitStatus;

/// Exit code when the command does not exist (shell convention).
pub const NOT_FOUND: u8 = 127;
/// Exit code when the command exists but cannot be executed (shell convention).
pub const CANNOT_EXECUTE: u8 = 126;

/// The exit code that reports how the app ended, or `None` while it has not ended
/// (stopped, continued, or still alive).
pub fn from_wait_status(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(code_byte(code)),
        WaitStatus::Signaled(_, signal, _) => Some(code_byte(128 + signal as i32)),
        _ => None,
    }
}

/// The exit code for a command that could not be started, from the error `exec` gave.
pub fn from_spawn_error(error: &io::Error) -> u8 {
    match error.kind() {
        io::ErrorKind::NotFound => NOT_FOUND,
        _ => CANNOT_EXECUTE,
    }
}

/// Exit statuses are 8 bits wide; the kernel keeps only the low byte of `exit(n)`.
fn code_byte(code: i32) -> u8 {
    (code & 0xff) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn exit_codes_pass_through_unchanged() {
        for code in 0..=255 {
            let status = WaitStatus::Exited(Pid::from_raw(1000), code);
            assert_eq!(from_wait_status(status), Some(code as u8), "code {code}");
        }
    }

    #[test]
    fn death_by_signal_is_128_plus_signal_number() {
        for signal in Signal::iterator() {
            let status = WaitStatus::Signaled(Pid::from_raw(1000), signal, false);
            assert_eq!(
                from_wait_status(status),
                Some(128 + signal as u8),
                "{signal}"
            );
        }
        let killed = WaitStatus::Signaled(Pid::from_raw(7), Signal::SIGKILL, true);
        assert_eq!(from_wait_status(killed), Some(137));
        let termed = WaitStatus::Signaled(Pid::from_raw(7), Signal::SIGTERM, false);
        assert_eq!(from_wait_status(termed), Some(143));
    }

    #[test]
    fn a_stopped_or_continued_app_has_not_ended() {
        let pid = Pid::from_raw(1000);
        assert_eq!(
            from_wait_status(WaitStatus::Stopped(pid, Signal::SIGTSTP)),
            None
        );
        assert_eq!(from_wait_status(WaitStatus::Continued(pid)), None);
        assert_eq!(from_wait_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn spawn_errors_follow_the_shell_convention() {
        let not_found = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(from_spawn_error(&not_found), 127);
        for errno in [libc::EACCES, libc::ENOEXEC, libc::EISDIR, libc::ETXTBSY] {
            let error = io::Error::from_raw_os_error(errno);
            assert_eq!(from_spawn_error(&error), 126, "errno {errno}");
        }
    }
}
