//! `restore-launcher`: PID 1 for migratable containers.
//!
//! Thin on purpose: parse the command line, set up PID 1 duties in order, hand over to the
//! supervisor, and map the outcome to an exit code. Where each duty lives:
//! - [`cli`]: options and their `RESTORE_LAUNCHER_*` environment twins;
//! - [`signals`]: blocked mask, signalfd, which signal means what;
//! - [`spawn`]: PID floor and starting the app with pipes the launcher owns;
//! - [`relay`]: copying the app's output to the container's streams;
//! - [`supervisor`]: the init loop (forward, reap, relay, exit with the app's status);
//! - [`exit_status`]: how the app's end maps to the launcher's exit code.

mod cli;
mod exit_status;
mod log;
mod relay;
mod signals;
mod spawn;
mod supervisor;

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
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Spawn(error) => error.exit_code(),
            StartError::Signals(_) | StartError::Subreaper(_) => 1,
        }
    }
}

fn main() -> ExitCode {
    // A bad option is reported by clap (exit 2) before anything is started.
    let options = cli::Options::parse();
    if let Some(warning) = log::init() {
        tracing::warn!("{warning}");
    }
    match start(&options) {
        Ok(supervisor) => ExitCode::from(supervisor.run()),
        Err(error) => {
            log::print_error(&ErrorChain(&error));
            ExitCode::from(error.exit_code())
        }
    }
}

/// Everything before the app runs: any failure here ends the launcher with a clear message.
fn start(options: &cli::Options) -> Result<supervisor::Supervisor, StartError> {
    let signals = signals::block()?;
    if std::process::id() != 1 {
        // Orphans of the app must come back to us to be reaped, not to the host's init.
        nix::sys::prctl::set_child_subreaper(true).map_err(StartError::Subreaper)?;
    }
    let floor = spawn::advance_pid_counter(options.pid_floor)?;
    tracing::debug!(
        forks = floor.forks,
        last_pid = floor.last_pid,
        "advanced the PID counter"
    );
    let app = spawn::spawn(&options.command, &signals.original_mask)?;
    tracing::info!(pid = app.pid.as_raw(), "started the app");
    Ok(supervisor::Supervisor::new(signals, app))
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
