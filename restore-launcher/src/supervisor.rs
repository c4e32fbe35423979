//! PID 1's event loop and state machine. It waits on its signalfd, the app's output pipes and
//! the control socket; forwards signals, reaps every child, relays output, answers control
//! requests, starts jobs (checkpoint, restore) and acts on their outcome; and when the app
//! has exited it returns the code to exit with.
//!
//! States (see [`LauncherState`]):
//! ```text
//! fresh start:      running ──checkpoint──▶ checkpointing ──▶ running (--leave-running or failure)
//!                                                        └──▶ checkpointed ──rollback──▶ running
//! --restore-from:   restoring ──▶ restored | exit 1 | running (--on-restore-failure=fresh)
//! --wait-for-...:   waiting ──receive──▶ restoring ──▶ restored | failed (receive again) | running (fresh)
//! ```
//! From the moment the app runs, the launcher never gives up because of an error of its own
//! (catatonit: `bail()` only before the child starts, `warn()` after): errors are logged or
//! answered to the client, and the loop goes on, since PID 1 exiting would kill the container.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use migrate_format::{CheckpointReport, LauncherState, RestoreReport, StatusReport};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::checkpoint::{self, chain};
use crate::cli::OnRestoreFailure;
use crate::control::{self, Incoming, Request, Server};
use crate::criu::Criu;
use crate::exit_status;
use crate::job::{Job, Outcome};
use crate::relay::{Output, Relay};
use crate::restore;
use crate::signals::{self, Action, Signals};
use crate::spawn;
use crate::sysinfo;
use crate::tree;

/// After the app exits, how long output still held open by its leftover descendants is
/// relayed before the launcher exits anyway. Output the app itself wrote is not bounded by
/// this: its pipe reaches end of file as soon as every writer is gone.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Exit code when a restore requested at start fails (and no fresh start was asked for).
pub const RESTORE_FAILED: u8 = 1;

/// PID 1's configuration, fixed at start.
#[derive(Debug, Clone)]
pub struct Config {
    pub pid_floor: i32,
    pub state_dir: PathBuf,
    pub work_dir: PathBuf,
    pub include: Vec<PathBuf>,
    pub criu: Option<PathBuf>,
    /// How long a checkpoint's output may take nothing before the checkpoint gives up.
    pub output_stall_timeout: Duration,
    /// How long a received archive stream may bring nothing before the restore gives up.
    pub input_stall_timeout: Duration,
    pub on_restore_failure: OnRestoreFailure,
    pub command: Vec<OsString>,
}

/// How the app comes to life.
#[derive(Debug)]
pub enum Start {
    /// An app already spawned fresh.
    Fresh(spawn::App),
    /// Restore from this archive file or directory.
    RestoreFrom(PathBuf),
    /// Wait for `receive`.
    Wait,
}

/// A job in progress and what PID 1 must do with its outcome.
#[derive(Debug)]
struct Running {
    job: Job,
    /// The client waiting for the answer (none for a restore requested at start).
    client: Option<UnixStream>,
    kind: JobKind,
    /// A checkpoint's cancel pipe: a byte written here makes the job stop writing its archive
    /// at once (a rollback asked while the stream is dead), instead of after the stall timeout.
    cancel: Option<OwnedFd>,
}

#[derive(Debug)]
enum JobKind {
    Checkpoint {
        leave_running: bool,
        previous: LauncherState,
    },
    /// The read ends of the pipes the restored app will write to.
    Restore {
        stdout: OwnedFd,
        stderr: OwnedFd,
        at_start: bool,
    },
}

/// Supervises the app through its whole life in this container.
#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    signals: Signals,
    control: Option<Server>,
    criu: Option<Criu>,
    state: LauncherState,
    app: Option<Pid>,
    relays: Vec<Relay>,
    running: Option<Running>,
    /// The state to return to on rollback of a frozen app.
    before_checkpoint: LauncherState,
    exit_code: Option<u8>,
    exited_at: Option<Instant>,
    /// A terminating signal received while a job ran, acted upon when it ends.
    deferred_terminate: Option<i32>,
    /// Exit statuses of children reaped before PID 1 knew them as the app (a restored app
    /// that exits before its restore job's outcome is read).
    unclaimed: BTreeMap<i32, WaitStatus>,
    last_checkpoint: Option<CheckpointReport>,
    last_restore: Option<RestoreReport>,
    error: Option<String>,
    /// While the app is held frozen for a migration that is not committed: when it resumes by
    /// itself.
    lease: Option<Instant>,
    /// The migration holding the app frozen is committed: it never resumes on its own.
    committed: bool,
}

impl Supervisor {
    /// Sets up PID 1 for `start`. The control socket is optional for a fresh app (the app runs
    /// even where no state directory can be made) and required otherwise.
    ///
    /// # Errors
    /// When waiting for or restoring a checkpoint is asked but the control socket cannot be
    /// created, or the restore job cannot be started.
    pub fn new(
        config: Config,
        signals: Signals,
        start: Start,
    ) -> Result<Self, control::ControlError> {
        let control = match Server::bind(&config.state_dir) {
            Ok(server) => Some(server),
            Err(error) if matches!(start, Start::Fresh(_)) => {
                tracing::warn!(error = %chain(&error), "checkpoints are not possible in this container");
                None
            }
            Err(error) => return Err(error),
        };
        let criu = match Criu::find(config.criu.as_deref()) {
            Ok(criu) => Some(criu),
            Err(error) => {
                tracing::info!(error = %chain(&error), "criu is not available; checkpoint and restore will fail until it is");
                None
            }
        };
        let mut supervisor = Supervisor {
            config,
            signals,
            control,
            criu,
            state: LauncherState::Running,
            app: None,
            relays: Vec::new(),
            running: None,
            before_checkpoint: LauncherState::Running,
            exit_code: None,
            exited_at: None,
            deferred_terminate: None,
            unclaimed: BTreeMap::new(),
            last_checkpoint: None,
            last_restore: None,
            error: None,
            lease: None,
            committed: false,
        };
        match start {
            Start::Fresh(app) => {
                supervisor.adopt(app.pid, app.stdout, app.stderr, LauncherState::Running)
            }
            Start::Wait => supervisor.state = LauncherState::Waiting,
            Start::RestoreFrom(path) => {
                supervisor.start_restore(restore::Source::Path(path), None, true)
            }
        }
        Ok(supervisor)
    }

    /// Runs until the app has exited and its output is relayed; returns the launcher's exit code.
    pub fn run(mut self) -> u8 {
        loop {
            if let Some(code) = self.finished() {
                self.reap();
                return code;
            }
            self.check_lease();
            let drain = self
                .exited_at
                .map(|at| DRAIN_AFTER_EXIT.saturating_sub(at.elapsed()));
            // A lease that expires during a checkpoint is acted upon when the job ends (its
            // end wakes the loop), not polled for meanwhile.
            let lease = self
                .lease
                .filter(|_| self.state != LauncherState::Checkpointing)
                .map(|at| at.saturating_duration_since(Instant::now()));
            let timeout = match drain.into_iter().chain(lease).min() {
                Some(left) => PollTimeout::try_from(left + Duration::from_millis(1))
                    .unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let ready = match self.wait(timeout) {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::warn!(%error, "poll failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // Output first: if the app wrote and then exited, its last words are copied before
            // its exit is acted upon.
            for (relay, ready) in self.relays.iter_mut().zip(ready.relays) {
                if ready {
                    relay.pump();
                }
            }
            if ready.signals {
                self.handle_signals();
            }
            if ready.control {
                self.handle_control();
            }
        }
    }

    /// The exit code once the app has exited (or no app will come), no job runs, and the
    /// output is done (or the drain timed out).
    fn finished(&self) -> Option<u8> {
        let code = self.exit_code?;
        if self.running.is_some() {
            return None;
        }
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

    fn wait(&self, timeout: PollTimeout) -> nix::Result<Ready> {
        let interesting = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        let mut fds = vec![PollFd::new(self.signals.fd.as_fd(), PollFlags::POLLIN)];
        let control_slot = self.control.as_ref().map(|server| {
            fds.push(PollFd::new(server.listener().as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let mut relay_slots = Vec::new();
        for relay in &self.relays {
            relay_slots.push(relay.source().map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
                fds.len() - 1
            }));
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
        Ok(Ready {
            signals: ready(0),
            control: control_slot.is_some_and(ready),
            relays: relay_slots
                .into_iter()
                .map(|slot| slot.is_some_and(ready))
                .collect(),
        })
    }

    // ----- the app -------------------------------------------------------------------------

    /// Makes `pid` the supervised app with output on the given pipes.
    fn adopt(&mut self, pid: Pid, stdout: OwnedFd, stderr: OwnedFd, state: LauncherState) {
        self.app = Some(pid);
        self.relays = vec![
            Relay::new(stdout, Output::Stdout),
            Relay::new(stderr, Output::Stderr),
        ];
        self.state = state;
        self.error = None;
        // A restored app that already exited before we knew its PID.
        if let Some(status) = self.unclaimed.remove(&pid.as_raw()) {
            self.app_exited(status);
        }
    }

    fn app_exited(&mut self, status: WaitStatus) {
        if let Some(code) = exit_status::from_wait_status(status) {
            // A frozen app killed because the pod is going away reports the signal that asked.
            let code = match (self.state, self.deferred_terminate) {
                (LauncherState::Checkpointed | LauncherState::Frozen, Some(signo)) => {
                    128 + signo as u8
                }
                _ => code,
            };
            tracing::info!(?status, code, "the app exited");
            self.exit_code = Some(code);
            self.exited_at = Some(Instant::now());
        }
    }

    /// Starts CMD fresh (fallback after a failed restore), or gives up with 127/126/1.
    fn start_fresh(&mut self) {
        if let Err(error) = spawn::advance_pid_counter(self.config.pid_floor) {
            tracing::warn!(error = %chain(&error), "cannot advance the PID counter");
        }
        match spawn::spawn(&self.config.command, &self.signals.original_mask) {
            Ok(app) => {
                tracing::info!(pid = app.pid.as_raw(), "started the app fresh");
                self.adopt(app.pid, app.stdout, app.stderr, LauncherState::Running);
            }
            Err(error) => {
                tracing::error!(error = %chain(&error), "cannot start the app");
                self.exit(error.exit_code());
            }
        }
    }

    /// Exits as soon as possible with `code` (no app to wait for).
    fn exit(&mut self, code: u8) {
        self.exit_code = Some(code);
        self.exited_at = Some(Instant::now());
    }

    // ----- signals and reaping -------------------------------------------------------------

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
            Action::Forward if signals::is_terminating(signo) => self.on_terminate(signo),
            Action::Forward => self.forward(signo),
        }
    }

    /// SIGTERM/SIGINT/SIGQUIT: what "stop" means depends on the state.
    fn on_terminate(&mut self, signo: i32) {
        match self.state {
            LauncherState::Running | LauncherState::Restored => self.forward(signo),
            // Acted upon when the job ends: the app is frozen by CRIU or not there yet.
            LauncherState::Checkpointing | LauncherState::Restoring => {
                tracing::info!(
                    signo,
                    "termination requested during a checkpoint or restore; acting on it when that ends"
                );
                self.deferred_terminate = Some(signo);
            }
            // The frozen app's state lives in the archive now; the pod is being deleted after
            // the migration. Resuming it to deliver the signal would let it act twice.
            LauncherState::Checkpointed | LauncherState::Frozen => {
                tracing::info!(signo, "stopping the checkpointed (frozen) app");
                self.deferred_terminate = Some(signo);
                if let Some(app) = self.app {
                    tree::kill_all(app);
                }
            }
            LauncherState::Waiting | LauncherState::Failed => self.exit(128 + signo as u8),
        }
    }

    fn forward(&self, signo: i32) {
        let Some(app) = self.app else { return };
        match signals::send_to_group(app, signo) {
            Ok(()) => tracing::debug!(
                signo,
                pgid = app.as_raw(),
                "forwarded signal to the app's process group"
            ),
            Err(Errno::ESRCH) => {
                tracing::debug!(signo, "no process left in the app's group to forward to")
            }
            Err(error) => {
                tracing::warn!(%error, signo, "cannot forward signal to the app's process group")
            }
        }
    }

    /// Collects every child that has exited: the app, jobs, orphaned descendants (re-parented
    /// to PID 1 or to us as subreaper). Signals merge, so loop until none is left.
    fn reap(&mut self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => self.on_child_exit(status),
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "waitpid failed");
                    return;
                }
            }
        }
    }

    fn on_child_exit(&mut self, status: WaitStatus) {
        let Some(pid) = status.pid() else { return };
        if exit_status::from_wait_status(status).is_none() {
            return; // stopped/continued, not an exit
        }
        if Some(pid) == self.app {
            self.app_exited(status);
        } else if self.running.as_ref().is_some_and(|r| r.job.pid == pid) {
            if let Some(running) = self.running.take() {
                self.job_done(running, status);
            }
        } else {
            tracing::debug!(?status, "reaped a child");
            if self.unclaimed.len() >= 64 {
                self.unclaimed.pop_first();
            }
            self.unclaimed.insert(pid.as_raw(), status);
        }
    }

    // ----- control requests ----------------------------------------------------------------

    fn handle_control(&mut self) {
        loop {
            let Some(server) = &self.control else { return };
            let incoming = match server.accept() {
                Ok(Some(incoming)) => incoming,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(error = %chain(&error), "a control connection failed");
                    return;
                }
            };
            self.on_request(incoming);
        }
    }

    fn on_request(&mut self, incoming: Incoming) {
        let Incoming {
            stream,
            request,
            fd,
        } = incoming;
        let request = match request {
            Ok(request) => request,
            Err(error) => return refuse(&stream, format!("the request is not valid: {error}")),
        };
        tracing::info!(?request, state = ?self.state, "control request");
        if request.needs_fd() && fd.is_none() {
            return refuse(
                &stream,
                "the request carried no stream to read or write".into(),
            );
        }
        match request {
            Request::Status => {
                let _ = control::answer(&stream, &self.status());
            }
            Request::Rollback => self.rollback(&stream),
            Request::Freeze { lease_seconds } => self.freeze(&stream, lease_seconds),
            Request::Renew { lease_seconds } => self.renew(&stream, lease_seconds),
            Request::Commit => self.commit(&stream),
            Request::Thaw => self.thaw(&stream),
            Request::Checkpoint { leave_running } => match fd {
                Some(fd) => self.start_checkpoint(stream, fd, leave_running),
                None => refuse(&stream, "no stream".into()),
            },
            Request::Receive => match fd {
                Some(fd) => {
                    if !matches!(self.state, LauncherState::Waiting | LauncherState::Failed)
                        || self.running.is_some()
                    {
                        let message = format!(
                            "this launcher is {} and not waiting for a checkpoint; start the target container with --wait-for-checkpoint",
                            state_name(self.state)
                        );
                        return refuse(&stream, message);
                    }
                    self.start_restore(restore::Source::Stream(fd), Some(stream), false);
                }
                None => refuse(&stream, "no stream".into()),
            },
        }
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            state: self.state,
            app_pid: self.app.map(Pid::as_raw),
            launcher_version: env!("CARGO_PKG_VERSION").into(),
            criu_version: self.criu.as_ref().map(|c| c.version.clone()),
            kernel: sysinfo::kernel(),
            arch: sysinfo::arch().into(),
            last_checkpoint: self.last_checkpoint.clone(),
            last_restore: self.last_restore.clone(),
            error: self.error.clone(),
            app_stopped: self.app.is_some_and(tree::all_stopped),
            lease_seconds_left: self
                .lease
                .map(|at| at.saturating_duration_since(Instant::now()).as_secs()),
            committed: self.committed,
        }
    }

    /// Answers a successful rollback/freeze/thaw with the new state.
    fn acknowledge(&self, stream: &UnixStream, app: Pid) {
        let _ = control::answer(
            stream,
            &serde_json::json!({"ok": true, "state": self.state, "app_pid": app.as_raw()}),
        );
    }

    fn rollback(&mut self, stream: &UnixStream) {
        // A checkpoint still writing (into a stream nobody reads any more, typically): tell it
        // to stop now; the refusal below says "checkpointing", and the caller asks again.
        if self.state == LauncherState::Checkpointing
            && let Some(cancel) = self.running.as_ref().and_then(|r| r.cancel.as_ref())
        {
            let _ = nix::unistd::write(cancel, b"x");
            tracing::info!("rollback asked during a checkpoint: told the job to stop writing");
        }
        match (self.state, self.app) {
            (LauncherState::Checkpointed | LauncherState::Frozen, Some(app)) => {
                checkpoint::resume(app);
                self.state = self.before_checkpoint;
                self.lease = None;
                self.committed = false;
                tracing::info!(pid = app.as_raw(), "rolled back: the frozen app resumed");
                self.acknowledge(stream, app);
            }
            _ => refuse(
                stream,
                format!(
                    "nothing to roll back: the launcher is {}; rollback resumes an app frozen by `checkpoint` without --leave-running or by `freeze`",
                    state_name(self.state)
                ),
            ),
        }
    }

    /// Resumes an app whose lease expired with no commit: the migration's driver is gone.
    fn check_lease(&mut self) {
        let Some(deadline) = self.lease else {
            return;
        };
        if Instant::now() < deadline
            || !matches!(
                self.state,
                LauncherState::Frozen | LauncherState::Checkpointed
            )
        {
            return; // a checkpoint still running is looked at again when it ends
        }
        self.lease = None;
        if let Some(app) = self.app {
            checkpoint::resume(app);
            self.state = self.before_checkpoint;
            tracing::warn!(
                pid = app.as_raw(),
                "the freeze's lease expired with no commit (the migration's driver is gone): resumed the app"
            );
        }
    }

    /// Extends the lease of an app held frozen for a migration.
    fn renew(&mut self, stream: &UnixStream, seconds: u64) {
        match (self.state, self.app, self.lease) {
            (
                LauncherState::Frozen | LauncherState::Checkpointing | LauncherState::Checkpointed,
                Some(app),
                Some(_),
            ) => {
                self.lease = Some(Instant::now() + Duration::from_secs(seconds));
                self.acknowledge(stream, app);
            }
            _ => refuse(
                stream,
                format!(
                    "no lease to renew: the launcher is {}{}",
                    state_name(self.state),
                    if self.committed { " and committed" } else { "" }
                ),
            ),
        }
    }

    /// Ends the lease: the migration is committed and the frozen app must never resume on
    /// its own. Refused when the lease already expired (the app runs again).
    fn commit(&mut self, stream: &UnixStream) {
        match (self.state, self.app) {
            (LauncherState::Frozen | LauncherState::Checkpointed, Some(app)) => {
                self.lease = None;
                self.committed = true;
                tracing::info!(
                    pid = app.as_raw(),
                    "the migration is committed: the frozen app stays frozen"
                );
                self.acknowledge(stream, app);
            }
            _ => refuse(
                stream,
                format!(
                    "cannot commit: the launcher is {} (its lease expired and the app resumed, or nothing was frozen)",
                    state_name(self.state)
                ),
            ),
        }
    }

    /// SIGSTOP to the app's tree: the first half of a consistent multi-container cut.
    fn freeze(&mut self, stream: &UnixStream, lease_seconds: Option<u64>) {
        match (self.state, self.app) {
            (LauncherState::Running | LauncherState::Restored, Some(app))
                if self.running.is_none() =>
            {
                if let Err(error) = tree::stop(app) {
                    // Never leave half a tree frozen.
                    tree::resume(app);
                    return refuse(stream, format!("cannot freeze: {}", chain(&error)));
                }
                self.before_checkpoint = self.state;
                self.state = LauncherState::Frozen;
                self.committed = false;
                self.lease = lease_seconds.map(|s| Instant::now() + Duration::from_secs(s));
                tracing::info!(pid = app.as_raw(), ?lease_seconds, "froze the app");
                self.acknowledge(stream, app);
            }
            _ => refuse(
                stream,
                format!(
                    "cannot freeze: the launcher is {} (only a running app can be frozen)",
                    state_name(self.state)
                ),
            ),
        }
    }

    /// SIGCONT to the app's group: after `freeze`, or once every container of a pod restored
    /// from a frozen checkpoint.
    fn thaw(&mut self, stream: &UnixStream) {
        match (self.state, self.app) {
            (
                LauncherState::Frozen | LauncherState::Running | LauncherState::Restored,
                Some(app),
            ) if self.running.is_none() => {
                checkpoint::resume(app);
                if self.state == LauncherState::Frozen {
                    self.state = self.before_checkpoint;
                }
                self.lease = None;
                self.committed = false;
                tracing::info!(pid = app.as_raw(), "thawed the app");
                self.acknowledge(stream, app);
            }
            _ => refuse(
                stream,
                format!("cannot thaw: the launcher is {}", state_name(self.state)),
            ),
        }
    }

    // ----- jobs ----------------------------------------------------------------------------

    fn start_checkpoint(&mut self, stream: UnixStream, output: OwnedFd, leave_running: bool) {
        let Some(app) = self.app.filter(|_| {
            matches!(
                self.state,
                LauncherState::Running | LauncherState::Restored | LauncherState::Frozen
            )
        }) else {
            return refuse(
                &stream,
                format!(
                    "cannot checkpoint: the launcher is {} (only a running app can be checkpointed)",
                    state_name(self.state)
                ),
            );
        };
        if self.running.is_some() {
            return refuse(
                &stream,
                "cannot checkpoint: another checkpoint or restore is in progress".into(),
            );
        }
        if self.criu.is_none() {
            match Criu::find(self.config.criu.as_deref()) {
                Ok(criu) => self.criu = Some(criu),
                Err(error) => {
                    return refuse(&stream, format!("cannot checkpoint: {}", chain(&error)));
                }
            }
        }
        let Some(criu) = self.criu.clone() else {
            return;
        };
        let plan = checkpoint::Plan {
            app,
            leave_running,
            included: self.config.include.clone(),
            work_dir: self.config.work_dir.clone(),
            state_dir: self.config.state_dir.clone(),
            criu,
            stdout_pipe: self.relays.first().and_then(Relay::inode),
            stderr_pipe: self.relays.get(1).and_then(Relay::inode),
            command: self
                .config
                .command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            original_mask: self.signals.original_mask,
            was_frozen: self.state == LauncherState::Frozen,
            output_stall_timeout: self.config.output_stall_timeout,
        };
        let (cancel_read, cancel_write) = match nix::unistd::pipe2(
            nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK,
        ) {
            Ok(pipe) => pipe,
            Err(error) => {
                return refuse(&stream, format!("cannot start the checkpoint: {error}"));
            }
        };
        match Job::start(move || Outcome::Checkpoint(checkpoint::run(&plan, output, &cancel_read)))
        {
            Ok(job) => {
                // After `freeze`, the state to resume to is the one before the freeze.
                if self.state != LauncherState::Frozen {
                    self.before_checkpoint = self.state;
                }
                self.running = Some(Running {
                    job,
                    client: Some(stream),
                    kind: JobKind::Checkpoint {
                        leave_running,
                        previous: self.state,
                    },
                    cancel: Some(cancel_write),
                });
                self.state = LauncherState::Checkpointing;
            }
            Err(error) => refuse(&stream, format!("cannot start the checkpoint: {error}")),
        }
    }

    /// Starts a restore job; if it cannot even start, that is a failed restore (answered to
    /// the client, if any).
    fn start_restore(
        &mut self,
        source: restore::Source,
        client: Option<UnixStream>,
        at_start: bool,
    ) {
        if let Err(error) = self.try_start_restore(source, &client, at_start) {
            let error = format!("cannot start the restore: {error}");
            if let Some(client) = &client {
                refuse(client, error.clone());
            }
            self.restore_failed(error, at_start);
        }
    }

    fn try_start_restore(
        &mut self,
        source: restore::Source,
        client: &Option<UnixStream>,
        at_start: bool,
    ) -> nix::Result<()> {
        let client = client
            .as_ref()
            .map(UnixStream::try_clone)
            .transpose()
            .map_err(|_| Errno::EBADF)?;
        let (stdout_read, stdout_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (stderr_read, stderr_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let plan = restore::Plan {
            included: self.config.include.clone(),
            work_dir: self.config.work_dir.clone(),
            state_dir: self.config.state_dir.clone(),
            criu: self.config.criu.clone(),
            pid_floor: self.config.pid_floor,
            original_mask: self.signals.original_mask,
            input_stall_timeout: self.config.input_stall_timeout,
        };
        let job = Job::start(move || {
            let pipes = restore::Pipes {
                stdout: &stdout_write,
                stderr: &stderr_write,
            };
            Outcome::Restore(restore::run(&plan, source, &pipes))
        })?;
        self.running = Some(Running {
            job,
            client,
            kind: JobKind::Restore {
                stdout: stdout_read,
                stderr: stderr_read,
                at_start,
            },
            cancel: None,
        });
        self.state = LauncherState::Restoring;
        Ok(())
    }

    fn job_done(&mut self, running: Running, status: WaitStatus) {
        let Running {
            job, client, kind, ..
        } = running;
        let outcome = job.outcome();
        match kind {
            JobKind::Checkpoint {
                leave_running,
                previous,
            } => {
                let report = match outcome {
                    Some(Outcome::Checkpoint(report)) => report,
                    _ => {
                        // The job died without a word: never leave the app frozen without a
                        // confirmed archive.
                        if let Some(app) = self.app {
                            checkpoint::resume(app);
                        }
                        CheckpointReport::failed(format!(
                            "the checkpoint job ended unexpectedly ({status:?}); the app was resumed"
                        ))
                    }
                };
                self.state = if report.ok && !leave_running {
                    LauncherState::Checkpointed
                } else {
                    previous
                };
                if report.ok {
                    tracing::info!(id = %report.id, bytes = report.archive_bytes, state = ?self.state, "checkpoint written");
                } else {
                    tracing::warn!(
                        error = report.error.as_deref().unwrap_or(""),
                        "checkpoint failed"
                    );
                }
                if let Some(client) = &client {
                    let _ = control::answer(client, &report);
                }
                self.last_checkpoint = Some(report);
                if let Some(signo) = self.deferred_terminate.take() {
                    self.on_terminate(signo);
                }
            }
            JobKind::Restore {
                stdout,
                stderr,
                at_start,
            } => {
                let report = match outcome {
                    Some(Outcome::Restore(report)) => report,
                    _ => RestoreReport::failed(format!(
                        "the restore job ended unexpectedly ({status:?})"
                    )),
                };
                if let Some(client) = &client {
                    let _ = control::answer(client, &report);
                }
                match report.app_pid.filter(|_| report.ok) {
                    Some(pid) => {
                        tracing::info!(
                            pid,
                            id = report.id.as_deref().unwrap_or(""),
                            "restored the app"
                        );
                        self.last_restore = Some(report);
                        self.adopt(Pid::from_raw(pid), stdout, stderr, LauncherState::Restored);
                        if let Some(signo) = self.deferred_terminate.take() {
                            self.forward(signo);
                        }
                    }
                    None => {
                        let error = report
                            .error
                            .clone()
                            .unwrap_or_else(|| "unknown error".into());
                        self.last_restore = Some(report);
                        self.restore_failed(error, at_start);
                    }
                }
            }
        }
    }

    fn restore_failed(&mut self, error: String, at_start: bool) {
        if let Some(signo) = self.deferred_terminate.take() {
            tracing::error!(%error, "restore failed");
            return self.exit(128 + signo as u8);
        }
        match self.config.on_restore_failure {
            OnRestoreFailure::Fresh => {
                tracing::error!(
                    %error,
                    "RESTORE FAILED — starting the app FRESH because --on-restore-failure=fresh: its checkpointed state is NOT restored"
                );
                self.error = Some(error);
                self.start_fresh();
            }
            OnRestoreFailure::Fail if at_start => {
                tracing::error!(%error, "restore failed; exiting (use --on-restore-failure=fresh to start the app fresh instead)");
                self.error = Some(error);
                self.state = LauncherState::Failed;
                self.exit(RESTORE_FAILED);
            }
            OnRestoreFailure::Fail => {
                tracing::error!(%error, "restore failed; still waiting for a checkpoint");
                self.error = Some(error);
                self.state = LauncherState::Failed;
            }
        }
    }
}

/// Which of the polled fds are ready.
#[derive(Debug)]
struct Ready {
    signals: bool,
    control: bool,
    relays: Vec<bool>,
}

/// Whether `pid` is in the stopped state (`T` in /proc/PID/stat).
fn refuse(stream: &UnixStream, error: String) {
    tracing::warn!(%error, "refused a control request");
    let _ = control::answer(stream, &serde_json::json!({"ok": false, "error": error}));
}

fn state_name(state: LauncherState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
