//! PID 1's event loop. It waits on its signalfd, the app's output pipes and the control
//! socket; forwards signals, reaps every child, relays output, answers control requests,
//! starts jobs (checkpoint, restore) and acts on their outcome; and when the app has exited it
//! returns the code to exit with.
//!
//! Which request is allowed in which state, and what it leads to, is decided by the pure
//! state machine in [`crate::machine`]; this module performs the effects it names.
//! From the moment the app runs, the launcher never gives up because of an error of its own
//! (catatonit: `bail()` only before the child starts, `warn()` after): errors are logged or
//! answered to the client, and the loop goes on, since PID 1 exiting would kill the container.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use migrate_format::{
    Answer, CheckpointReport, LauncherState, Refusal, RestoreReport, StatusReport,
};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::checkpoint::{self, chain};
use crate::cli::OnRestoreFailure;
use crate::control::{self, Incoming, Pending, Request, Server};
use crate::criu::Criu;
use crate::exit_status;
use crate::job::{Job, Outcome};
use crate::machine::{self, Effect, Input, Origin, State};
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
/// After the app exits, how long output it wrote that the log reader has not taken yet is
/// held for a reader that takes nothing, before the launcher exits anyway (and says how much
/// it dropped). A reader that keeps taking bytes is waited for as long as it does.
const OUTPUT_PATIENCE: Duration = Duration::from_secs(30);
/// Control connections whose request is still arriving, at most; beyond, the oldest is dropped.
const MAX_PENDING: usize = 16;
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
    /// The key that seals archives, if one is configured.
    pub key: Option<crate::seal::KeySource>,
    /// How long a checkpoint's output may take nothing before the checkpoint gives up.
    pub output_stall_timeout: Duration,
    /// How long a received archive stream may bring nothing before the restore gives up.
    pub input_stall_timeout: Duration,
    pub on_restore_failure: OnRestoreFailure,
    pub command: Vec<OsString>,
    /// Start the app in an IPC namespace of its own (`--ipc-namespace`).
    pub ipc_namespace: bool,
    /// Start the app as this user (`--user`).
    pub user: Option<crate::creds::Creds>,
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
    Checkpoint,
    /// The read ends of the pipes the restored app will write to.
    Restore {
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
}

/// Supervises the app through its whole life in this container.
#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    signals: Signals,
    control: Option<Server>,
    /// Connections whose request is still arriving (read as it comes, never waited for).
    pending: Vec<Pending>,
    criu: Option<Criu>,
    state: State,
    app: Option<Pid>,
    relays: Vec<Relay>,
    running: Option<Running>,
    exit_code: Option<u8>,
    exited_at: Option<Instant>,
    /// A terminating signal received while a job ran, acted upon when it ends.
    deferred_terminate: Option<i32>,
    /// Exit statuses of children reaped before PID 1 knew them as the app (a restored app
    /// that exits before its restore job's outcome is read).
    unclaimed: BTreeMap<i32, WaitStatus>,
    /// The committed copy's threads, traced so that no SIGCONT resumes them (`crate::hold`).
    held: Option<crate::hold::Held>,
    last_checkpoint: Option<CheckpointReport>,
    last_restore: Option<RestoreReport>,
    error: Option<String>,
    /// After a post-copy restore: the `criu lazy-pages` daemon still fetching the app's
    /// memory, and where that stands.
    lazy_pages: Option<Pid>,
    post_copy: Option<migrate_format::PostCopy>,
    /// The migration whose freeze holds the app (`freeze --migration`).
    frozen_for: Option<String>,
    /// The last migration whose freeze ended without a commit ([`StatusReport::ended_freeze`]).
    ended_freeze: Option<String>,
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
        // Staged images a killed job or an earlier launcher left behind hold the app's memory.
        for left in crate::workdir::clean_leftovers(&config.work_dir) {
            tracing::info!(dir = %left, "removed a job directory left behind");
        }
        let mut supervisor = Supervisor {
            config,
            signals,
            control,
            pending: Vec::new(),
            criu,
            state: State::Running {
                origin: Origin::Fresh,
            },
            app: None,
            relays: Vec::new(),
            running: None,
            exit_code: None,
            exited_at: None,
            deferred_terminate: None,
            unclaimed: BTreeMap::new(),
            held: None,
            last_checkpoint: None,
            last_restore: None,
            error: None,
            lazy_pages: None,
            post_copy: None,
            frozen_for: None,
            ended_freeze: None,
        };
        match start {
            Start::Fresh(app) => supervisor.adopt(app.pid, app.stdout, app.stderr),
            Start::Wait => supervisor.state = State::Waiting,
            Start::RestoreFrom(path) => {
                supervisor.state = State::Restoring { at_start: true };
                supervisor.start_restore(restore::Source::Path(path), None, None);
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
            self.advance(Input::Tick);
            let drain = self
                .drain_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            // A lease that expires during a checkpoint stops the job (then the app resumes
            // when it ended): it is waited for as when nothing runs.
            let lease = self
                .state
                .lease()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let request_deadline = self
                .pending
                .iter()
                .map(|p| p.deadline().saturating_duration_since(Instant::now()))
                .min();
            let timeout = match drain.into_iter().chain(lease).chain(request_deadline).min() {
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
            for ((relay, readable), writable) in
                self.relays.iter_mut().zip(ready.relays).zip(ready.outputs)
            {
                if readable {
                    relay.pump();
                } else if writable {
                    relay.flush();
                }
            }
            // A job's outcome is read as it comes: one longer than a pipe holds would
            // otherwise block the job, which is reaped (and read) only once it ends.
            if ready.job
                && let Some(running) = self.running.as_mut()
            {
                running.job.pump();
            }
            if ready.signals {
                self.handle_signals();
            }
            if ready.control {
                self.accept_control();
            }
            self.read_requests(&ready.pending);
        }
    }

    /// When the launcher stops waiting for output after the app exited. Counted from the
    /// exit or the last bytes written since, whichever is later: [`OUTPUT_PATIENCE`] while the
    /// app's own output waits for the log reader (its pipes are at end of file, bytes are
    /// held), else [`DRAIN_AFTER_EXIT`] for descendants still holding the pipes open.
    fn drain_deadline(&self) -> Option<Instant> {
        let exited = self.exited_at?;
        let quiet_since = self
            .relays
            .iter()
            .map(Relay::last_progress)
            .fold(exited, Instant::max);
        let held_for_the_reader = self.relays.iter().all(Relay::source_closed)
            && self.relays.iter().any(Relay::holds_output);
        Some(
            quiet_since
                + if held_for_the_reader {
                    OUTPUT_PATIENCE
                } else {
                    DRAIN_AFTER_EXIT
                },
        )
    }

    /// The exit code once the app has exited (or no app will come), no job runs, and the
    /// output is done (or the drain timed out).
    fn finished(&self) -> Option<u8> {
        let code = self.exit_code?;
        if self.running.is_some() {
            return None;
        }
        let drained = self.relays.iter().all(Relay::is_closed);
        let timed_out = self.drain_deadline().is_some_and(|at| Instant::now() >= at);
        if timed_out && !drained {
            let dropped: usize = self.relays.iter().map(Relay::held_bytes).sum();
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "the app exited, and the log reader took none of its last output for {} s; exiting without it",
                    OUTPUT_PATIENCE.as_secs()
                );
            } else {
                tracing::info!(
                    "the app exited but a descendant still holds its output open; not waiting for it"
                );
            }
        }
        (drained || timed_out).then_some(code)
    }

    fn wait(&self, timeout: PollTimeout) -> nix::Result<Ready> {
        let interesting = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
        let mut fds = vec![PollFd::new(self.signals.fd.as_fd(), PollFlags::POLLIN)];
        let control_slot = self.control.as_ref().map(|server| {
            fds.push(PollFd::new(server.listener().as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let pending_start = fds.len();
        for pending in &self.pending {
            fds.push(PollFd::new(pending.as_fd(), PollFlags::POLLIN));
        }
        let job_slot = self
            .running
            .as_ref()
            .and_then(|r| r.job.result_fd())
            .map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
                fds.len() - 1
            });
        let mut relay_slots = Vec::new();
        for relay in &self.relays {
            relay_slots.push(relay.source().map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
                fds.len() - 1
            }));
        }
        // Outputs with the app's bytes waiting: written when they accept more.
        let mut output_slots = Vec::new();
        for relay in &self.relays {
            output_slots.push(relay.waiting_output().map(|output| {
                let fd = match output {
                    Output::Stdout => stdout.as_fd(),
                    Output::Stderr => stderr.as_fd(),
                };
                fds.push(PollFd::new(fd, PollFlags::POLLOUT));
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
            job: job_slot.is_some_and(ready),
            pending: (pending_start..pending_start + self.pending.len())
                .map(ready)
                .collect(),
            relays: relay_slots
                .into_iter()
                .map(|slot| slot.is_some_and(ready))
                .collect(),
            outputs: output_slots
                .into_iter()
                .map(|slot| {
                    slot.is_some_and(|slot| {
                        fds[slot]
                            .revents()
                            .is_some_and(|r| r.intersects(crate::relay::WRITE_NOW))
                    })
                })
                .collect(),
        })
    }

    // ----- the app -------------------------------------------------------------------------

    /// Makes `pid` the supervised app with output on the given pipes.
    fn adopt(&mut self, pid: Pid, stdout: OwnedFd, stderr: OwnedFd) {
        self.app = Some(pid);
        self.relays = vec![
            Relay::new(stdout, Output::Stdout),
            Relay::new(stderr, Output::Stderr),
        ];
        // A restored app that already exited before we knew its PID.
        if let Some(status) = self.unclaimed.remove(&pid.as_raw()) {
            self.app_exited(status);
        }
    }

    fn app_exited(&mut self, status: WaitStatus) {
        self.held = None;
        if let Some(code) = exit_status::from_wait_status(status) {
            // A frozen app killed because the pod is going away reports the signal that asked.
            let code = match (self.state, self.deferred_terminate) {
                (
                    State::Checkpointed { .. } | State::Frozen { .. } | State::Running { .. },
                    Some(signo),
                ) => 128 + signo as u8,
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
        match spawn::spawn(
            &self.config.command,
            &self.signals.original_mask,
            self.config.ipc_namespace,
            self.config.user.as_ref(),
        ) {
            Ok(app) => {
                tracing::info!(pid = app.pid.as_raw(), "started the app fresh");
                self.adopt(app.pid, app.stdout, app.stderr);
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
        match self.state.reported() {
            // An app restored from a frozen checkpoint and never thawed (a target the
            // migration deletes): a stopped process would not see the signal until the
            // runtime's SIGKILL after the grace period, and thawing it to deliver it would
            // let a stale copy act. It is stopped for good, like a frozen source.
            LauncherState::Restored if self.app.is_some_and(tree::all_stopped) => {
                tracing::info!(signo, "stopping the app, which is stopped (never thawed)");
                self.deferred_terminate = Some(signo);
                if let Some(app) = self.app {
                    tree::kill_all(app);
                }
            }
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
            // __WALL: also the threads of a held copy (`crate::hold`), whose stops and exits
            // are reported to PID 1 as their tracer.
            match waitpid(
                None::<Pid>,
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
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
        } else if Some(pid) == self.lazy_pages {
            self.post_copy_ended(status);
        } else {
            tracing::debug!(?status, "reaped a child");
            if self.unclaimed.len() >= 64 {
                self.unclaimed.pop_first();
            }
            self.unclaimed.insert(pid.as_raw(), status);
        }
    }

    // ----- control requests ----------------------------------------------------------------

    /// Accepts every waiting connection; their requests are read as they arrive, in the same
    /// loop as signals and output, so a client that is slow to send (or sends nothing) never
    /// holds up forwarding, reaping or the log relay.
    fn accept_control(&mut self) {
        let Some(server) = &self.control else { return };
        loop {
            match server.accept() {
                Ok(Some(pending)) => {
                    if self.pending.len() >= MAX_PENDING {
                        tracing::warn!("too many control connections waiting; dropping the oldest");
                        self.pending.remove(0).time_out();
                    }
                    self.pending.push(pending);
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(error = %chain(&error), "a control connection failed");
                    break;
                }
            }
        }
        // A request that came with its connection is read now, not after another poll.
        let all = vec![true; self.pending.len()];
        self.read_requests(&all);
    }

    /// Reads what arrived on the pending connections that are `ready`; acts on each complete
    /// request; drops the connections that timed out or went away.
    fn read_requests(&mut self, ready: &[bool]) {
        let now = Instant::now();
        let mut complete = Vec::new();
        let mut kept = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        for (index, mut connection) in pending.into_iter().enumerate() {
            if ready.get(index).copied().unwrap_or(false) {
                match connection.read() {
                    control::Read::Complete(incoming) => {
                        complete.push(incoming);
                        continue;
                    }
                    control::Read::Gone => continue,
                    control::Read::Partial => {}
                }
            }
            if now >= connection.deadline() {
                tracing::warn!("a control client sent no complete request in time; dropped it");
                connection.time_out();
                continue;
            }
            kept.push(connection);
        }
        self.pending = kept;
        for incoming in complete {
            self.on_request(incoming);
        }
    }

    fn on_request(&mut self, incoming: Incoming) {
        let Incoming {
            stream,
            request,
            fd,
            pages,
            from_runtime,
            from_app,
        } = incoming;
        let request = match request {
            Ok(request) => request,
            Err(error) => {
                return refuse(
                    &stream,
                    Refusal::BadRequest,
                    self.state,
                    format!("the request is not valid: {error}"),
                );
            }
        };
        tracing::info!(?request, state = ?self.state, "control request");
        if request.needs_fd() && fd.is_none() {
            return refuse(
                &stream,
                Refusal::BadRequest,
                self.state,
                "the request carried no stream to read or write".into(),
            );
        }
        // The app and what it starts may read the launcher's state, never steer it: a freeze,
        // checkpoint, commit or rollback comes from outside the app's tree (`kubectl exec`, the
        // node), so the app cannot end a migration's freeze, forge its steps or dump itself
        // into a stream of its choosing.
        if from_app && request != Request::Status {
            return refuse(
                &stream,
                Refusal::NotAllowed,
                self.state,
                "refused: this request comes from a process of the app's own tree (the app, or something it started); the launcher takes requests other than `status` only from outside it, as `kubectl exec POD -- restore-launcher …` runs them".into(),
            );
        }
        let (input, verb) = match request {
            Request::Status => {
                let _ = control::answer(&stream, &self.status());
                return;
            }
            // The way back to a committed copy makes it the app again: only the plugin's
            // recovery asks it, through `kubectl exec`; never a process in the container (a
            // shell of the app's user), which must not make a second copy run.
            Request::Rollback { committed: true } if !from_runtime => {
                return refuse(
                    &stream,
                    Refusal::NotAllowed,
                    self.state,
                    "rollback --committed is taken only from `kubectl exec POD -- restore-launcher rollback --committed` itself (started by the container runtime), not from a process started inside the container: it resumes a copy whose migration committed, which only the plugin's way back may do (`kubectl migrate resume --from-source POD` checks that the target holds no copy first)".into(),
                );
            }
            Request::Rollback { committed } => (Input::Rollback { committed }, "rollback"),
            Request::Freeze {
                lease_seconds,
                limit_ms,
                migration,
            } => {
                let input = Input::Freeze {
                    lease: lease_seconds.map(Duration::from_secs),
                    limit: limit_ms.map(Duration::from_millis),
                };
                if self.request(stream, fd, pages, input, "freeze") {
                    self.frozen_for = migration;
                }
                return;
            }
            Request::Renew { lease_seconds } => (
                Input::Renew {
                    lease: Duration::from_secs(lease_seconds),
                },
                "renew",
            ),
            Request::Commit => (Input::Commit, "commit"),
            Request::Thaw => (Input::Thaw, "thaw"),
            Request::Checkpoint { leave_running } => {
                (Input::Checkpoint { leave_running }, "checkpoint")
            }
            Request::Receive => (Input::Receive, "receive"),
        };
        self.request(stream, fd, pages, input, verb);
    }

    /// A client's request: asks the state machine, performs its effects, answers. A job's
    /// client is answered when the job ends. Returns whether it was accepted.
    fn request(
        &mut self,
        stream: UnixStream,
        fd: Option<OwnedFd>,
        mut pages: Option<OwnedFd>,
        input: Input,
        verb: &str,
    ) -> bool {
        let previous = self.state;
        let step = machine::step(previous, input, Instant::now());
        if let Err(refusal) = step.answer {
            self.perform_all(&step.effects);
            refuse(
                &stream,
                refusal,
                previous,
                machine::explain(refusal, verb, previous),
            );
            return false;
        }
        self.state = step.next;
        let mut client = Some(stream);
        let mut fd = fd;
        for effect in step.effects {
            let done = match effect {
                Effect::StopTree => self.stop_tree(),
                Effect::StartCheckpoint {
                    leave_running,
                    was_frozen,
                } => match fd.take() {
                    // The client is taken only once the job runs (it answers it when it
                    // ends): a checkpoint that cannot start is refused to it here.
                    Some(output) => self.start_checkpoint(
                        &mut client,
                        output,
                        pages.take(),
                        leave_running,
                        was_frozen,
                    ),
                    None => Err("no stream".into()),
                },
                Effect::HoldTree => self.hold_tree(),
                Effect::StartRestore => match (client.take(), fd.take()) {
                    (Some(stream), Some(input)) => {
                        self.start_restore(
                            restore::Source::Stream(input),
                            Some(stream),
                            pages.take(),
                        );
                        Ok(())
                    }
                    _ => Err("no stream".into()),
                },
                other => {
                    self.perform(other);
                    Ok(())
                }
            };
            if let Err(error) = done {
                self.state = previous;
                if let Some(stream) = &client {
                    refuse(
                        stream,
                        Refusal::Failed,
                        previous,
                        format!("cannot {verb}: {error}"),
                    );
                }
                return false;
            }
        }
        self.track_freeze(previous);
        if step.next != previous {
            tracing::info!(state = ?self.state, "{verb}: done");
        }
        // Jobs answer when they end; everything else now.
        if let Some(stream) = client {
            let _ = control::answer(
                &stream,
                &Answer::done(self.state.reported(), self.app.map(Pid::as_raw)),
            );
        }
        true
    }

    /// An input from inside (a job ended, time passed): takes the state machine's next state
    /// and performs its effects.
    fn advance(&mut self, input: Input) {
        let step = machine::step(self.state, input, Instant::now());
        if step.answer.is_err() {
            tracing::warn!(?input, state = ?self.state, "an internal event does not apply here");
            return;
        }
        let before = self.state;
        self.state = step.next;
        self.track_freeze(before);
        // The effects first (a lease's SIGCONT above all): a log line can wait on a slow log
        // reader, the app must not.
        self.perform_all(&step.effects);
        if input == Input::Tick && before != self.state {
            if self.state.busy() {
                tracing::warn!(
                    "the freeze's lease or limit ran out during the checkpoint (the migration's driver is gone): stopping it, then resuming the app"
                );
            } else {
                tracing::warn!(
                    "the freeze's lease expired with no commit (the migration's driver is gone): resumed the app"
                );
            }
        }
    }

    /// After a transition from `before`: a freeze that ended with the app running again, not
    /// committed, is recorded as the migration that can no longer commit.
    fn track_freeze(&mut self, before: State) {
        if let Some(ended) = machine::freeze_ended(before, self.state) {
            if ended == machine::FreezeEnd::Uncommitted {
                self.ended_freeze = self.frozen_for.take();
                if let Some(id) = &self.ended_freeze {
                    tracing::info!(migration = %id, "the freeze ended without a commit");
                }
            } else {
                self.frozen_for = None;
            }
        }
    }

    fn perform_all(&mut self, effects: &[Effect]) {
        for effect in effects {
            self.perform(*effect);
        }
    }

    /// The effects that cannot fail (or whose failure is handled where they happen).
    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::HoldTree => {
                if let Err(error) = self.hold_tree() {
                    self.not_held(&error);
                }
            }
            Effect::ResumeTree => {
                if let Some(held) = self.held.take() {
                    held.release();
                }
                if let Some(app) = self.app {
                    checkpoint::resume(app);
                    tracing::info!(pid = app.as_raw(), "resumed the app");
                }
            }
            Effect::CancelCheckpoint => {
                // A checkpoint still writing (into a stream nobody reads any more, typically):
                // stop now; the refusal says "busy", and the caller asks again.
                if let Some(cancel) = self.running.as_ref().and_then(|r| r.cancel.as_ref()) {
                    let _ = nix::unistd::write(cancel, b"x");
                    tracing::info!(
                        "rollback asked during a checkpoint: told the job to stop writing"
                    );
                }
            }
            Effect::StartFresh => {
                tracing::error!(
                    error = self.error.as_deref().unwrap_or(""),
                    "RESTORE FAILED — starting the app FRESH because --on-restore-failure=fresh: its checkpointed state is NOT restored"
                );
                self.start_fresh();
            }
            Effect::RecordMoved => {
                let path = crate::moved::path();
                if let Err(error) = crate::moved::record(&path) {
                    tracing::warn!(%error, path = %path.display(), "cannot record that the app moved away: if this container restarts before the pod is deleted, it starts the app fresh");
                }
            }
            Effect::ClearMoved => crate::moved::clear(&crate::moved::path()),
            Effect::ExitRestoreFailed => {
                tracing::error!(
                    error = self.error.as_deref().unwrap_or(""),
                    "restore failed; exiting (use --on-restore-failure=fresh to start the app fresh instead)"
                );
                self.exit(RESTORE_FAILED);
            }
            // Performed by `request`, which has the client's stream.
            Effect::StopTree | Effect::StartCheckpoint { .. } | Effect::StartRestore => {
                tracing::warn!(?effect, "effect without a request; ignored");
            }
        }
    }

    /// Holds the stopped app (a committed copy) so that no SIGCONT resumes it; fails when a
    /// process of it runs again.
    fn hold_tree(&mut self) -> Result<(), String> {
        let Some(app) = self.app else {
            return Err("there is no app".into());
        };
        if self.held.is_none() {
            self.held = crate::hold::hold(app).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// A checkpointed copy that could not be held (it runs again, or another process traces
    /// it) after a job ended. Uncommitted, the next `commit` is refused for it. Committed with
    /// every page served (post-copy), the target runs the app: this copy is killed so that one
    /// runs. Committed after a failed post-copy, it is the only whole copy: stopped again.
    fn not_held(&mut self, error: &str) {
        let Some(app) = self.app else { return };
        match self.state {
            State::Checkpointed {
                hold: machine::Hold::Committed,
                ..
            } => {
                tracing::error!(
                    error,
                    "the committed copy ran again after the target took the app: killing it, so that one copy runs"
                );
                tree::kill_all(app);
            }
            State::Frozen {
                hold: machine::Hold::Committed,
                ..
            } => {
                tracing::error!(
                    error,
                    "the committed copy ran again after its post-copy failed: stopping it again"
                );
                if tree::stop(app).is_ok() {
                    if let Err(error) = self.hold_tree() {
                        tracing::error!(%error, "the committed copy cannot be held stopped");
                    }
                }
            }
            _ => tracing::warn!(
                error,
                "the checkpointed copy cannot be held stopped: a commit will be refused"
            ),
        }
    }

    /// SIGSTOP to the app's whole tree: the first half of a consistent multi-container cut.
    fn stop_tree(&mut self) -> Result<(), String> {
        let Some(app) = self.app else {
            return Err("there is no app".into());
        };
        if let Err(error) = tree::stop(app) {
            // Never leave half a tree frozen.
            tree::resume(app);
            return Err(chain(&error));
        }
        tracing::info!(pid = app.as_raw(), "froze the app");
        Ok(())
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            state: self.state.reported(),
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
                .state
                .lease()
                .map(|at| at.saturating_duration_since(Instant::now()).as_secs()),
            committed: self.state.committed(),
            boot_time: sysinfo::boot_time(),
            sysv_ipc: self.app.and_then(crate::checkpoint::uncarried_sysv_ipc),
            post_copy_source: crate::criu::post_copy_source_blocked(self.config.user.is_some()),
            checkpoint_blocked: crate::criu::check_capabilities("checkpoint")
                .err()
                .map(|error| error.to_string()),
            post_copy: self.post_copy.clone(),
            features: migrate_format::FEATURES
                .iter()
                .map(|f| (*f).to_string())
                .collect(),
            ended_freeze: self.ended_freeze.clone(),
        }
    }

    // ----- jobs ----------------------------------------------------------------------------

    fn start_checkpoint(
        &mut self,
        client: &mut Option<UnixStream>,
        output: OwnedFd,
        pages: Option<OwnedFd>,
        leave_running: bool,
        was_frozen: bool,
    ) -> Result<(), String> {
        let Some(app) = self.app else {
            return Err("there is no app".into());
        };
        if self.criu.is_none() {
            self.criu = Some(Criu::find(self.config.criu.as_deref()).map_err(|e| chain(&e))?);
        }
        let Some(criu) = self.criu.clone() else {
            return Err("criu is not available".into());
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
            was_frozen,
            output_stall_timeout: self.config.output_stall_timeout,
            key: self.config.key.clone(),
        };
        let (cancel_read, cancel_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| format!("cannot start the checkpoint: {e}"))?;
        let job = Job::start(move || {
            Outcome::Checkpoint(checkpoint::run(&plan, output, &cancel_read, pages))
        })
        .map_err(|e| format!("cannot start the checkpoint: {e}"))?;
        self.running = Some(Running {
            job,
            client: client.take(),
            kind: JobKind::Checkpoint,
            cancel: Some(cancel_write),
        });
        Ok(())
    }

    /// Starts a restore job (the state is `restoring` already); if it cannot even start, that
    /// is a failed restore (answered to the client, if any).
    fn start_restore(
        &mut self,
        source: restore::Source,
        client: Option<UnixStream>,
        pages: Option<OwnedFd>,
    ) {
        if let Err(error) = self.try_start_restore(source, &client, pages) {
            let error = format!("cannot start the restore: {error}");
            if let Some(client) = &client {
                let _ = control::answer(client, &RestoreReport::failed(error.clone()));
            }
            self.restore_failed(error);
        }
    }

    fn try_start_restore(
        &mut self,
        source: restore::Source,
        client: &Option<UnixStream>,
        pages: Option<OwnedFd>,
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
            key: self.config.key.clone(),
            user: self.config.user.clone(),
        };
        let job = Job::start(move || {
            let pipes = restore::Pipes {
                stdout: &stdout_write,
                stderr: &stderr_write,
            };
            Outcome::Restore(restore::run(&plan, source, &pipes, pages))
        })?;
        self.running = Some(Running {
            job,
            client,
            kind: JobKind::Restore {
                stdout: stdout_read,
                stderr: stderr_read,
            },
            cancel: None,
        });
        Ok(())
    }

    fn job_done(&mut self, running: Running, status: WaitStatus) {
        let Running {
            job, client, kind, ..
        } = running;
        let outcome = job.outcome();
        // A job that died without cleaning up (killed) left its staged images behind.
        for left in crate::workdir::clean_leftovers(&self.config.work_dir) {
            tracing::info!(dir = %left, "removed the directory of a job that ended");
        }
        match kind {
            JobKind::Checkpoint => {
                let (report, died) = match outcome {
                    Some(Outcome::Checkpoint(report)) => (report, false),
                    _ => (
                        CheckpointReport::failed(format!(
                            "the checkpoint job ended unexpectedly ({status:?}); the app was resumed"
                        )),
                        true,
                    ),
                };
                self.advance(Input::CheckpointEnded {
                    ok: report.ok,
                    died,
                });
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
            JobKind::Restore { stdout, stderr } => {
                let report = match outcome {
                    Some(Outcome::Restore(report)) => report,
                    _ => RestoreReport::failed(format!(
                        "the restore job ended unexpectedly ({status:?})"
                    )),
                };
                if let Some(client) = &client {
                    let _ = control::answer(client, &report);
                }
                if let Some(daemon) = report.lazy_pages_pid.filter(|_| report.ok) {
                    self.lazy_pages = Some(Pid::from_raw(daemon));
                    self.post_copy = Some(migrate_format::PostCopy {
                        state: migrate_format::PostCopyState::Moving,
                        ended_at_ms: None,
                        error: None,
                    });
                }
                match report.app_pid.filter(|_| report.ok) {
                    Some(pid) => {
                        tracing::info!(
                            pid,
                            id = report.id.as_deref().unwrap_or(""),
                            "restored the app"
                        );
                        self.last_restore = Some(report);
                        self.error = None;
                        self.advance(Input::RestoreEnded {
                            ok: true,
                            fresh_on_failure: false,
                        });
                        self.adopt(Pid::from_raw(pid), stdout, stderr);
                        // A daemon that ended before its PID was known.
                        if let Some(status) = self
                            .lazy_pages
                            .and_then(|daemon| self.unclaimed.remove(&daemon.as_raw()))
                        {
                            self.post_copy_ended(status);
                        }
                        // Restored frozen, the app would not see a forwarded signal
                        // until the runtime's SIGKILL: terminate as the state says.
                        if let Some(signo) = self.deferred_terminate.take() {
                            self.on_terminate(signo);
                        }
                    }
                    None => {
                        let error = report
                            .error
                            .clone()
                            .unwrap_or_else(|| "unknown error".into());
                        self.last_restore = Some(report);
                        self.restore_failed(error);
                    }
                }
            }
        }
    }

    /// The `criu lazy-pages` daemon ended: every page arrived (exit 0), or the app can never
    /// have the rest of its memory. A page it lacks would read as zeros once the daemon's
    /// userfaultfd is gone, so it is killed at once; its container then restarts waiting for
    /// a checkpoint (the plugin has not ended that wait), and the plugin rolls back to the
    /// source, which still holds the app frozen.
    fn post_copy_ended(&mut self, status: WaitStatus) {
        self.lazy_pages = None;
        let complete = matches!(status, WaitStatus::Exited(_, 0));
        let error = (!complete).then(|| {
            let log = self.config.state_dir.join("last-lazy-pages.log");
            format!(
                "post-copy failed: criu lazy-pages ended ({status:?}) before every page of the app's memory arrived: {}; the app was killed (full log: {})",
                crate::criu::log_excerpt(&log, ""),
                log.display()
            )
        });
        if complete {
            tracing::info!("post-copy: every page of the app's memory arrived");
        } else {
            tracing::error!(error = error.as_deref().unwrap_or(""), "post-copy failed");
            if let Some(app) = self.app {
                tree::kill_all(app);
            }
            self.error = error.clone();
        }
        self.post_copy = Some(migrate_format::PostCopy {
            state: if complete {
                migrate_format::PostCopyState::Complete
            } else {
                migrate_format::PostCopyState::Failed
            },
            ended_at_ms: Some(sysinfo::now_ms()),
            error,
        });
        for left in crate::workdir::clean_leftovers(&self.config.work_dir) {
            tracing::info!(dir = %left, "removed the post-copy's staged images");
        }
    }

    fn restore_failed(&mut self, error: String) {
        self.error = Some(error.clone());
        if let Some(signo) = self.deferred_terminate.take() {
            tracing::error!(%error, "restore failed");
            self.state = State::Failed;
            return self.exit(128 + signo as u8);
        }
        let at_start = matches!(self.state, State::Restoring { at_start: true });
        let fresh_on_failure = self.config.on_restore_failure == OnRestoreFailure::Fresh;
        if !fresh_on_failure && !at_start {
            tracing::error!(%error, "restore failed; still waiting for a checkpoint");
        }
        self.advance(Input::RestoreEnded {
            ok: false,
            fresh_on_failure,
        });
    }
}

/// Which of the polled fds are ready.
#[derive(Debug)]
struct Ready {
    signals: bool,
    control: bool,
    /// The running job wrote (part of) its outcome.
    job: bool,
    pending: Vec<bool>,
    relays: Vec<bool>,
    /// Per relay: its output accepts the bytes waiting.
    outputs: Vec<bool>,
}

/// Answers a refused request.
fn refuse(stream: &UnixStream, refusal: Refusal, state: State, error: String) {
    tracing::warn!(%error, ?refusal, "refused a control request");
    let _ = control::answer(
        stream,
        &Answer::refused(refusal, Some(state.reported()), error),
    );
}
