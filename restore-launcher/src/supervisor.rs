//! The init loop: once the app runs, the launcher waits on its signalfd and the app's output
//! pipes, forwards signals, reaps every child, relays output, and when the app has exited
//! returns the code to exit with.
//!
//! From here on the launcher never gives up because of an error of its own (catatonit:
//! `bail()` only before the child starts, `warn()` after): an error is logged and the loop
//! goes on, since PID 1 exiting would kill the whole container.

use std::os::fd::AsFd as _;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::exit_status;
use crate::relay::{Output, Relay};
use crate::signals::{self, Action, Signals};
use crate::spawn::App;

/// After the app exits, how long output still held open by its leftover descendants is
/// relayed before the launcher exits anyway. Output the app itself wrote is not bounded by
/// this: its pipe reaches end of file as soon as every writer is gone.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Supervises one running app.
#[derive(Debug)]
pub struct Supervisor {
    signals: Signals,
    app: Pid,
    relays: [Relay; 2],
    exit_code: Option<u8>,
    exited_at: Option<Instant>,
}

impl Supervisor {
    pub fn new(signals: Signals, app: App) -> Self {
        Supervisor {
            signals,
            app: app.pid,
            relays: [
                Relay::new(app.stdout, Output::Stdout),
                Relay::new(app.stderr, Output::Stderr),
            ],
            exit_code: None,
            exited_at: None,
        }
    }

    /// Runs until the app has exited and its output is relayed; returns the launcher's exit code.
    pub fn run(mut self) -> u8 {
        loop {
            if let Some(code) = self.finished() {
                // Children that exited during the drain are collected before we go.
                self.reap();
                return code;
            }
            let timeout = match self.exited_at {
                Some(at) => {
                    let left = DRAIN_AFTER_EXIT.saturating_sub(at.elapsed());
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO)
                }
                None => PollTimeout::NONE,
            };
            let (signal_ready, ready) = match self.wait(timeout) {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::warn!(%error, "poll failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // Output first: if the app wrote and then exited, its last words are copied before
            // its exit is acted upon.
            for (relay, ready) in self.relays.iter_mut().zip(ready) {
                if ready {
                    relay.pump();
                }
            }
            if signal_ready {
                self.handle_signals();
            }
        }
    }

    /// The exit code once the app has exited and its output is done (or the drain timed out).
    fn finished(&self) -> Option<u8> {
        let code = self.exit_code?;
        let drained = self.relays.iter().all(Relay::is_closed);
        let timed_out = self
            .exited_at
            .is_some_and(|at| at.elapsed() >= DRAIN_AFTER_EXIT);
        if timed_out && !drained {
            tracing::info!(
                "the app exited but a descendant still holds its output open; not waiting for it"
            );
        }
        (drained || timed_out).then_some(code)
    }

    /// Polls the signalfd and open pipes; says which are readable.
    fn wait(&self, timeout: PollTimeout) -> nix::Result<(bool, [bool; 2])> {
        let interesting = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        let mut fds = vec![PollFd::new(self.signals.fd.as_fd(), PollFlags::POLLIN)];
        let mut slots = [None, None];
        for (index, relay) in self.relays.iter().enumerate() {
            if let Some(fd) = relay.source() {
                slots[index] = Some(fds.len());
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(error) => return Err(error),
        }
        let ready = |slot: usize| {
            fds[slot]
                .revents()
                .is_some_and(|r| r.intersects(interesting))
        };
        Ok((ready(0), slots.map(|slot| slot.is_some_and(ready))))
    }

    fn handle_signals(&mut self) {
        loop {
            match self.signals.fd.read_signal() {
                Ok(Some(info)) => self.on_signal(info.ssi_signo as i32),
                Ok(None) => return,
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "reading the signalfd failed");
                    return;
                }
            }
        }
    }

    fn on_signal(&mut self, signo: i32) {
        match signals::action(signo) {
            Action::Reap => self.reap(),
            Action::Ignore => {
                tracing::debug!(signo, "ignoring a terminal's request to stop the launcher")
            }
            Action::Forward => match signals::send_to_group(self.app, signo) {
                Ok(()) => tracing::debug!(
                    signo,
                    pgid = self.app.as_raw(),
                    "forwarded signal to the app's process group"
                ),
                Err(Errno::ESRCH) => {
                    tracing::debug!(signo, "no process left in the app's group to forward to")
                }
                Err(error) => {
                    tracing::warn!(%error, signo, "cannot forward signal to the app's process group")
                }
            },
        }
    }

    /// Collects every child that has exited: the app, its orphaned descendants (re-parented to
    /// PID 1 or to us as subreaper) and anything else. Signals merge, so one SIGCHLD can stand
    /// for many exits: loop until none is left.
    fn reap(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    if status.pid() == Some(self.app) {
                        if let Some(code) = exit_status::from_wait_status(status) {
                            tracing::info!(?status, code, "the app exited");
                            self.exit_code = Some(code);
                            self.exited_at = Some(Instant::now());
                        }
                    } else {
                        tracing::debug!(?status, "reaped a child");
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "waitpid failed");
                    return;
                }
            }
        }
    }
}
