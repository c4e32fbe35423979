//! Command line of `restore-launcher`: options, their `RESTORE_LAUNCHER_*` environment twins,
//! and the command to supervise. Parsing only; nothing here has side effects.

use std::ffi::OsString;

use clap::Parser;

/// Default lowest PID the app may get; see [`Options::pid_floor`].
pub const DEFAULT_PID_FLOOR: i32 = 1000;

/// PID 1 for migratable containers.
///
/// Runs CMD in its own session and process group, forwards signals to it, reaps zombies,
/// relays its stdout/stderr and exits with its status (128+N when killed by signal N,
/// 127 when CMD is not found, 126 when it cannot be executed).
#[derive(Debug, Parser)]
#[command(
    name = "restore-launcher",
    version,
    about,
    after_help = "Every option can also be set through the environment variable shown with it, \
                  so a pod spec can configure the launcher without changing the image's ENTRYPOINT."
)]
pub struct Options {
    /// Lowest PID the app (and therefore its children) may get inside the container's PID
    /// namespace. PIDs below it stay free for the launcher, `kubectl exec` sessions and criu
    /// when the app is restored elsewhere, so restored PIDs cannot collide with them.
    #[arg(
        long,
        env = "RESTORE_LAUNCHER_PID_FLOOR",
        default_value_t = DEFAULT_PID_FLOOR,
        value_parser = clap::value_parser!(i32).range(2..=4_000_000),
        value_name = "PID"
    )]
    pub pid_floor: i32,

    /// The command to supervise, after `--`.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}
