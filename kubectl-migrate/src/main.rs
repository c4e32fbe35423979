//! `kubectl-migrate`: the kubectl plugin (`kubectl migrate POD --to NODE`).
//!
//! Only the command line exists so far; the pipeline (check → checkpoint → transfer →
//! restore → verify → cleanup) is built in its own issue. Until then every migration
//! request fails with a message saying so, rather than pretending to work.

use std::process::ExitCode;

use clap::Parser;

/// Live-migrate a running pod to another node, memory and all.
#[derive(Debug, Parser)]
#[command(name = "kubectl-migrate", bin_name = "kubectl migrate", version, about)]
struct Options {
    /// The pod to move.
    pod: String,
    /// The node to move it to.
    #[arg(long = "to", value_name = "NODE")]
    to: String,
}

fn main() -> ExitCode {
    let options = Options::parse();
    eprintln!(
        "error: migrating pod {} to node {} is not implemented yet in this build of kubectl-migrate",
        options.pod, options.to
    );
    ExitCode::from(1)
}
