//! `restore-launcher`: PID 1 for migratable containers.
//!
//! Thin on purpose: parse the command line, then either run a sub-command against PID 1
//! ([`client`]) or become PID 1: set up init duties in order, hand over to the supervisor,
//! and map the outcome to an exit code. Where each responsibility lives:
//! - [`cli`]: options, their `RESTORE_LAUNCHER_*` environment twins, sub-commands;
//! - [`caps`]: the launcher's capabilities as a non-root user, passed to criu, not the app;
//! - [`signals`]: blocked mask, signalfd, which signal means what;
//! - [`spawn`]: PID floor and starting the app with pipes the launcher owns;
//! - [`relay`]: copying the app's output to the container's streams;
//! - [`supervisor`]: PID 1's loop and state machine (forward, reap, relay, control, jobs);
//! - [`control`] / [`client`]: the Unix socket between PID 1 and its sub-commands;
//! - [`direct`]: the direct transfer's encrypted channel between two pods' sub-commands;
//! - [`job`]: forked workers for checkpoint and restore;
//! - [`checkpoint`] / [`restore`]: those two jobs; [`criu`]: the CRIU command lines;
//! - [`archive`]: the `.tar.zst` format, written and verified; [`include`]: `--include` paths;
//! - [`park`]: an archive kept verified in a holder pod, and sent on (StatefulSet moves);
//! - [`exit_status`]: how the app's end maps to the launcher's exit code;
//! - [`moved`]: the pod-wide record that the app moved away by a committed migration;
//! - [`sysinfo`]: kernel, architecture, CPU flags, time and ids;
//! - [`tree`]: the app's process tree, stopped, resumed and killed process by process.

mod archive;
mod caps;
mod checkpoint;
mod cli;
mod client;
mod control;
mod creds;
mod criu;
mod direct;
mod exit_status;
mod hold;
mod include;
mod job;
mod log;
mod machine;
mod moved;
mod park;
mod procfs;
mod relay;
mod restore;
mod seal;
mod signals;
mod spawn;
mod supervisor;
mod sysinfo;
mod tree;
mod workdir;

use std::process::ExitCode;

use clap::Parser as _;

/// Errors that end the launcher before the app has started.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Signals(#[from] signals::SignalError),
    #[error("cannot become the child subreaper (needed when not running as PID 1)")]
    Subreaper(#[source] nix::Error),
    #[error(transparent)]
    Spawn(#[from] spawn::SpawnError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    User(#[from] creds::CredsError),
    #[error("{0}")]
    Borrowed(String),
    #[error(
        "not starting the app: this pod's app moved to another pod by a committed migration ({0}), and starting it here would run a second copy. The migration deletes this pod (`kubectl migrate resume POD` finishes one whose plugin stopped); if `kubectl migrate status POD` lists nothing, the app's state is gone from here: delete this pod"
    )]
    MovedAway(String),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Spawn(error) => error.exit_code(),
            StartError::Signals(_)
            | StartError::Subreaper(_)
            | StartError::Control(_)
            | StartError::User(_)
            | StartError::Borrowed(_) => 1,
            StartError::MovedAway(_) => moved::MOVED_AWAY,
        }
    }
}

fn main() -> ExitCode {
    // A bad option is reported by clap (exit 2) before anything is started.
    let cli = cli::Cli::parse();
    // PID 1 (no sub-command) must never wait on a stalled log reader, not even for its own lines.
    if let Some(warning) = log::init(cli.command.is_none()) {
        tracing::warn!("{warning}");
    }
    if let Some(command) = &cli.command {
        return match client::run(&cli.state_dir(), command) {
            Ok(code) => ExitCode::from(code),
            Err(error) => {
                log::print_error(&ErrorChain(&error));
                ExitCode::from(1)
            }
        };
    }
    match start(&cli) {
        Ok(supervisor) => ExitCode::from(supervisor.run()),
        Err(error) => {
            log::print_error(&ErrorChain(&error));
            ExitCode::from(error.exit_code())
        }
    }
}

/// Everything before the app runs (or a restore starts): any failure here ends the launcher
/// with a clear message.
fn start(cli: &cli::Cli) -> Result<supervisor::Supervisor, StartError> {
    let options = &cli.run;
    spawn::keep_inherited_fds_from_app();
    let signals = signals::block()?;
    if std::process::id() != 1 {
        // Orphans of the app must come back to us to be reaped, not to the host's init.
        nix::sys::prctl::set_child_subreaper(true).map_err(StartError::Subreaper)?;
    }
    // Capabilities from the launcher's file are for the container's own launcher only.
    if let Some(why) = caps::borrowed(std::process::id()) {
        return Err(StartError::Borrowed(why));
    }
    // Before anything needs them: the PID floor (clone3 set_tid) and criu.
    let adopted = caps::adopt();
    if !adopted.held.is_empty() {
        tracing::info!(uid = adopted.euid, capabilities = ?adopted.held, "running as a non-root user with the launcher's file capabilities");
    }
    let user = options
        .user
        .as_deref()
        .map(creds::resolve)
        .transpose()?
        .flatten();
    // Also when restoring: a target that could not hold the namespace must say so at start.
    if options.ipc_namespace {
        spawn::check_ipc_namespace()?;
    }
    let config = supervisor::Config {
        pid_floor: options.pid_floor,
        state_dir: cli.state_dir(),
        work_dir: options
            .work_dir
            .clone()
            .unwrap_or_else(|| cli.state_dir().join("work")),
        include: options.include.clone(),
        criu: options.criu.clone(),
        key: options
            .key_file
            .clone()
            .map(seal::KeySource::File)
            .or_else(seal::KeySource::from_env),
        output_stall_timeout: std::time::Duration::from_secs(options.output_stall_timeout),
        input_stall_timeout: std::time::Duration::from_secs(options.input_stall_timeout),
        on_restore_failure: options.on_restore_failure,
        command: options.command.clone(),
        ipc_namespace: options.ipc_namespace,
        user: user.clone(),
    };
    let start = if let Some(path) = &options.restore_from {
        // No PID burning before a restore: criu and its helpers must get PIDs below the
        // restored ones, which the source placed above the floor.
        supervisor::Start::RestoreFrom(path.clone())
    } else if options.wait_for_checkpoint {
        supervisor::Start::Wait
    } else if let Some(record) = moved::recorded(&moved::path()) {
        return Err(StartError::MovedAway(record));
    } else {
        let floor = spawn::advance_pid_counter(options.pid_floor)?;
        tracing::debug!(
            forks = floor.forks,
            last_pid = floor.last_pid,
            "advanced the PID counter"
        );
        let app = spawn::spawn(
            &options.command,
            &signals.original_mask,
            options.ipc_namespace,
            user.as_ref(),
        )?;
        tracing::info!(pid = app.pid.as_raw(), "started the app");
        supervisor::Start::Fresh(app)
    };
    Ok(supervisor::Supervisor::new(config, signals, start)?)
}

/// Displays an error followed by its sources: "what failed: because: because".
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
