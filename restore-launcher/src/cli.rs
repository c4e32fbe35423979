//! Command line of `restore-launcher`: the PID 1 options with their `RESTORE_LAUNCHER_*`
//! environment twins, the command to supervise, and the sub-commands run next to PID 1.
//! Parsing only; nothing here has side effects.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default lowest PID the app may get; see [`RunOptions::pid_floor`].
pub const DEFAULT_PID_FLOOR: i32 = 1000;
/// Default state directory of a launcher running as root (control socket, logs of the last
/// dump/restore, and the work directory).
pub const DEFAULT_STATE_DIR: &str = "/run/restore-launcher";

/// PID 1 for migratable containers.
///
/// Runs CMD in its own session and process group, forwards signals to it, reaps zombies,
/// relays its stdout/stderr and exits with its status (128+N when killed by signal N,
/// 127 when CMD is not found, 126 when it cannot be executed). Checkpoints and restores the
/// app with CRIU from inside the container when asked through its sub-commands.
#[derive(Debug, Parser)]
#[command(
    name = "restore-launcher",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Every option can also be set through the environment variable shown with it, \
                  so a pod spec can configure the launcher without changing the image's ENTRYPOINT."
)]
pub struct Cli {
    /// Directory of the control socket shared by PID 1 and its sub-commands [default:
    /// /run/restore-launcher as root, /tmp/restore-launcher-UID as any other user, which cannot
    /// create directories in /run]
    #[arg(
        long,
        global = true,
        env = "RESTORE_LAUNCHER_STATE_DIR",
        value_name = "DIR"
    )]
    pub state_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunOptions,
}

impl Cli {
    /// The state directory: the option, else the default for this user (the same for PID 1
    /// and for `kubectl exec` sub-commands, which run as the container's user).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(nix::unistd::geteuid().as_raw()))
    }
}

/// The default state directory for effective user `euid`.
pub fn default_state_dir(euid: u32) -> PathBuf {
    if euid == 0 {
        PathBuf::from(DEFAULT_STATE_DIR)
    } else {
        PathBuf::from(format!("/tmp/restore-launcher-{euid}"))
    }
}

/// What happens when restoring the app fails at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnRestoreFailure {
    /// Exit non-zero (from `--restore-from`) or report the failure and keep waiting.
    Fail,
    /// Start CMD fresh instead, saying so loudly on stderr.
    Fresh,
}

/// Options of PID 1 itself.
#[derive(Debug, Args)]
pub struct RunOptions {
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

    /// Restore the app from this archive file (or unpacked archive directory) instead of
    /// starting CMD. The archive is only read.
    #[arg(
        long,
        env = "RESTORE_LAUNCHER_RESTORE_FROM",
        value_name = "PATH",
        conflicts_with = "wait_for_checkpoint"
    )]
    pub restore_from: Option<PathBuf>,

    /// Start no app; wait for an archive sent with `restore-launcher receive`, then restore it.
    #[arg(long, env = "RESTORE_LAUNCHER_WAIT_FOR_CHECKPOINT", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub wait_for_checkpoint: bool,

    /// A local path (emptyDir, writable directory) whose contents travel with the checkpoint
    /// and are put back before the app is restored. Repeatable; the environment twin takes a
    /// colon-separated list.
    #[arg(
        long = "include",
        env = "RESTORE_LAUNCHER_INCLUDE",
        value_delimiter = ':',
        value_name = "PATH"
    )]
    pub include: Vec<PathBuf>,

    /// Start the app as this user (NAME, UID, NAME:GROUP or UID:GID from the image's passwd
    /// and group files, with its supplementary groups), as gosu or `setpriv` would; the launcher
    /// itself stays root so that it can restore the app's credentials and IPC namespace. Needs
    /// CAP_SETUID and CAP_SETGID (and CAP_CHOWN to give included files back to that user).
    #[arg(long, env = "RESTORE_LAUNCHER_USER", value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// Start the app in an IPC namespace of its own, so that its SysV shared memory, semaphores
    /// and message queues travel with its checkpoints (CRIU carries a namespace the app does
    /// not share with the launcher). Needs CAP_SYS_ADMIN in the container, which is why it is
    /// off by default; an app holding SysV objects without it is refused at checkpoint.
    #[arg(long, env = "RESTORE_LAUNCHER_IPC_NAMESPACE", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub ipc_namespace: bool,

    /// What to do when restoring at start fails.
    #[arg(long, env = "RESTORE_LAUNCHER_ON_RESTORE_FAILURE", value_enum, default_value_t = OnRestoreFailure::Fail)]
    pub on_restore_failure: OnRestoreFailure,

    /// Where CRIU images are staged during a checkpoint or restore (default: STATE_DIR/work).
    /// They are as large as the app's memory: point it at an emptyDir for big apps.
    #[arg(long, env = "RESTORE_LAUNCHER_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// Give up a checkpoint whose archive nobody reads for this many seconds: the app is then
    /// resumed (or stays frozen for `rollback`, when `freeze` stopped it) instead of waiting
    /// forever on a reader that went away, e.g. an interrupted `kubectl migrate`. Keep it
    /// well below the plugin's rollback patience (120 s).
    #[arg(
        long,
        env = "RESTORE_LAUNCHER_OUTPUT_STALL_TIMEOUT",
        default_value_t = 20,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub output_stall_timeout: u64,

    /// Give up a `receive` whose archive stream brings nothing for this many seconds (a
    /// sender gone without closing the stream): the target then reports the failure and
    /// waits for another archive instead of waiting forever. Keep it above the source's dump
    /// time (the first bytes come once CRIU has dumped the app).
    #[arg(
        long,
        env = "RESTORE_LAUNCHER_INPUT_STALL_TIMEOUT",
        default_value_t = 120,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub input_stall_timeout: u64,

    /// Seal every archive this launcher writes with the key in this file (a Secret
    /// volume), and take only archives sealed with it. `RESTORE_LAUNCHER_KEY` may hold the
    /// key itself instead (a Secret's secretKeyRef). `restore-launcher keygen` makes one.
    #[arg(long, env = "RESTORE_LAUNCHER_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// The criu binary (default: `criu` from PATH).
    #[arg(long, env = "RESTORE_LAUNCHER_CRIU", value_name = "PATH")]
    pub criu: Option<PathBuf>,

    /// The command to supervise, after `--`.
    #[arg(trailing_var_arg = true, value_name = "CMD", required = true)]
    pub command: Vec<OsString>,
}

/// Sub-commands, run next to PID 1 (for example through `kubectl exec`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dump the app's process tree into one archive. Without --leave-running the app stays
    /// frozen afterwards (PID 1 keeps running) until `rollback` or the pod is deleted.
    Checkpoint {
        /// Where to write the archive: a file (written to a temporary name, mode 0600, renamed
        /// when complete) or `-` for stdout. The JSON summary goes to stdout, or to stderr
        /// when the archive does.
        #[arg(
            long,
            short,
            default_value = "-",
            value_name = "FILE|-",
            conflicts_with = "to"
        )]
        output: String,
        /// Send the archive straight to the target's `receive --listen` at HOST:PORT, over
        /// mutually authenticated TLS 1.3; the transfer's secret is read as one JSON line from
        /// stdin. Prints the bytes sent as it goes, then the JSON summary, on stdout. When the
        /// target cannot be reached nothing is dumped and the answer's refusal is `unreachable`.
        #[arg(long, value_name = "HOST:PORT")]
        to: Option<String>,
        /// Resume the app right after the dump instead of leaving it frozen.
        #[arg(long)]
        leave_running: bool,
        /// Post-copy: send everything but the app's memory, then serve the memory page by page
        /// to the target's `criu lazy-pages` over a second authenticated connection, until it
        /// has every page; the summary comes then. The app stays frozen here throughout.
        #[arg(long, requires = "to", conflicts_with = "leave_running")]
        lazy: bool,
    },
    /// Hand an archive to a PID 1 started with --wait-for-checkpoint; prints the restore
    /// result as JSON and exits non-zero if the restore failed.
    Receive {
        /// The archive file, or `-` for stdin.
        #[arg(
            long,
            short,
            default_value = "-",
            value_name = "FILE|-",
            conflicts_with = "listen"
        )]
        input: String,
        /// Take the archive from a `checkpoint --to` over TCP on this port instead (0: any
        /// free port), over mutually authenticated TLS 1.3; the transfer's secret is read as
        /// one JSON line from stdin. Prints the port it listens on first. Connections without
        /// the secret are turned away and the wait goes on; it ends when stdin ends.
        #[arg(long, value_name = "PORT")]
        listen: Option<u16>,
        /// Post-copy: the source sends everything but the app's memory; the app is restored
        /// at once and `criu lazy-pages` fetches its memory over a second connection from the
        /// same source while it runs. Prints the restore result as soon as it is known, then
        /// stays until every page arrived (`status` says `post_copy`).
        #[arg(long, requires = "listen")]
        lazy: bool,
        /// Only connections from this address are taken (repeat for each of the source pod's
        /// addresses); others are closed at once, before any handshake, so that connections
        /// from elsewhere on the pod network cannot crowd out the source's.
        #[arg(long = "from", value_name = "IP", requires = "listen")]
        from: Vec<std::net::IpAddr>,
    },
    /// Keep an archive without restoring it: read it from stdin, verify it in full, and keep it
    /// (mode 0600) in the work directory for `unpark`. Prints a JSON report; exits non-zero and
    /// keeps nothing when the archive is refused. Used by the holder pod of a StatefulSet's
    /// migration, whose launcher waits and runs no app.
    Park {
        /// Where the parked archive is kept [default: STATE_DIR/work]
        #[arg(long, env = "RESTORE_LAUNCHER_WORK_DIR", value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Give up when the archive stream brings nothing for this many seconds (a damaged
        /// archive can leave the reader waiting for bytes that never come).
        #[arg(
            long,
            env = "RESTORE_LAUNCHER_INPUT_STALL_TIMEOUT",
            default_value_t = 120,
            value_name = "SECONDS",
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        input_stall_timeout: u64,
    },
    /// Write the archive kept by `park` to stdout (for the moved pod's `receive`); the JSON
    /// summary goes to stderr.
    Unpark {
        /// Where the parked archive is kept [default: STATE_DIR/work]
        #[arg(long, env = "RESTORE_LAUNCHER_WORK_DIR", value_name = "DIR")]
        work_dir: Option<PathBuf>,
    },
    /// Resume the app frozen by the last checkpoint or by `freeze` (used when the target failed).
    Rollback {
        /// Also resume a copy whose migration committed (refused otherwise: the target holds
        /// the app). Only once the target holds no copy of it, or two would run;
        /// `kubectl migrate resume --from-source POD` checks that first.
        #[arg(long)]
        committed: bool,
    },
    /// Stop the app (SIGSTOP to every process of its tree) so that all containers of a pod can
    /// be frozen before any is checkpointed: a consistent cut. A checkpoint of a frozen app
    /// restores frozen.
    Freeze {
        /// Resume the app by itself after this many seconds unless `commit` came first
        /// (`renew` extends it): a migration whose driver died never leaves the app frozen.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        lease: Option<u64>,
        /// Resume the app by itself after this many milliseconds at the latest, whatever the
        /// renewals, unless `commit` came first: the longest its liveness probes let it stay
        /// frozen before the kubelet would restart the container (and its state would be lost).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
        limit_ms: Option<u64>,
        /// The migration this freeze is for. Should the freeze end without a commit (its
        /// lease or limit ran out, its checkpoint died), `status` names it as
        /// `ended_freeze`: proof that this migration can never commit.
        #[arg(long, value_name = "ID", value_parser = migration_id)]
        migration: Option<String>,
    },
    /// Extend the lease of a frozen app to this many seconds from now.
    Renew {
        /// Seconds from now.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        lease: u64,
    },
    /// The migration is committed: end the lease, so the frozen app never resumes on its own
    /// (only an explicit `rollback` resumes it). Refused once the lease has expired.
    Commit,
    /// Resume the app (SIGCONT to every process of its tree): after `freeze`, or on the target once every
    /// container of the pod has been restored from a frozen checkpoint.
    Thaw,
    /// Print PID 1's state as JSON.
    Status,
    /// Exit 0 once the app runs, thawed: restored and resumed, or started fresh at least
    /// --fresh-after seconds ago; else exit 1, saying why. The startup probe of a migration's
    /// target pod: until it passes, the kubelet runs none of the app's liveness probes, which
    /// would restart the container while it waits for its checkpoint or holds the restored app
    /// frozen.
    Probe {
        /// After a fresh start (the container restarted later), pass only once the app has run
        /// this long: the budget of the startup probe the app's own pod had.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        fresh_after: u64,
    },
    /// Print a new random key for sealing checkpoints (256 random bits; keep it secret), e.g. `kubectl create secret generic migrate-key --from-literal=key="$(restore-launcher keygen)"`.
    Keygen,
}

/// A migration id as the plugin makes them (`mig-…`): a DNS label's characters, at most 253.
fn migration_id(id: &str) -> Result<String, String> {
    if !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Ok(id.to_string())
    } else {
        Err("a migration id is 1 to 253 of a-z, 0-9, `-` and `.`".into())
    }
}
