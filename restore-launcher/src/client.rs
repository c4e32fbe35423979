//! The sub-commands' side of the control socket: open the stream to pass (file or
//! stdin/stdout), ask PID 1, print its JSON answer, and turn it into an exit code.

use std::fs::{self, OpenOptions};
use std::io::{self, IsTerminal as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use migrate_format::{CheckpointReport, RestoreReport};

use crate::cli::Command;
use crate::control::{self, ControlError, Request};
use crate::direct;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot open `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to write a checkpoint archive to a terminal; use --output FILE or redirect stdout"
    )]
    Terminal,
    #[error("cannot move the finished archive to `{}`", path.display())]
    Rename {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the launcher's answer is not valid JSON: {0}")]
    Answer(String),
    #[error(transparent)]
    Direct(#[from] direct::DirectError),
}

/// Runs a sub-command; returns the process exit code (0 success, 1 failure reported by PID 1).
///
/// # Errors
/// When PID 1 cannot be reached or the stream cannot be opened.
pub fn run(state_dir: &Path, command: &Command) -> Result<u8, ClientError> {
    match command {
        Command::Status => simple(state_dir, &Request::Status),
        Command::Probe { fresh_after } => {
            let answer = control::call(state_dir, &Request::Status, None)?;
            let status: migrate_format::StatusReport =
                serde_json::from_str(&answer).map_err(|e| ClientError::Answer(e.to_string()))?;
            let age = status.app_pid.and_then(process_age);
            match probe(&status, age, Duration::from_secs(*fresh_after)) {
                Ok(()) => {
                    println!("the app runs");
                    Ok(0)
                }
                Err(why) => {
                    println!("{why}");
                    Ok(1)
                }
            }
        }
        Command::Keygen => {
            let key = crate::seal::Key::generate().map_err(|source| ClientError::Open {
                path: "/dev/urandom".into(),
                source,
            })?;
            print!("{key}");
            Ok(0)
        }
        Command::Rollback { committed } => simple(
            state_dir,
            &Request::Rollback {
                committed: *committed,
            },
        ),
        Command::Park {
            work_dir,
            input_stall_timeout,
        } => {
            let work_dir = work_dir.clone().unwrap_or_else(|| state_dir.join("work"));
            let report = crate::park::park_stdin(
                unbuffered_stdin()?,
                std::time::Duration::from_secs(*input_stall_timeout),
                &work_dir,
                crate::seal::KeySource::from_env().as_ref(),
            );
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            let _ = io::stdout().flush();
            if !report.ok {
                // As after a refused `receive`: a sender blocked on our full stdin could not
                // take in this answer.
                drain_stdin();
            }
            Ok(u8::from(!report.ok))
        }
        Command::Unpark { work_dir } => {
            if io::stdout().is_terminal() {
                return Err(ClientError::Terminal);
            }
            let work_dir = work_dir.clone().unwrap_or_else(|| state_dir.join("work"));
            let report = crate::park::unpark(
                io::stdout().lock(),
                &work_dir,
                crate::seal::KeySource::from_env().as_ref(),
            );
            // stdout carries the archive: the summary goes to stderr.
            eprintln!("{}", serde_json::to_string(&report).unwrap_or_default());
            Ok(u8::from(!report.ok))
        }
        Command::Freeze {
            lease,
            limit_ms,
            migration,
        } => simple(
            state_dir,
            &Request::Freeze {
                lease_seconds: *lease,
                limit_ms: *limit_ms,
                migration: migration.clone(),
            },
        ),
        Command::Renew { lease } => simple(
            state_dir,
            &Request::Renew {
                lease_seconds: *lease,
            },
        ),
        Command::Commit => simple(state_dir, &Request::Commit),
        Command::Thaw => simple(state_dir, &Request::Thaw),
        Command::Checkpoint {
            to: Some(to),
            leave_running,
            lazy,
            ..
        } => checkpoint_to(state_dir, to, *leave_running, *lazy),
        Command::Checkpoint {
            output,
            leave_running,
            to: None,
            ..
        } => checkpoint(state_dir, output, *leave_running),
        Command::Receive {
            listen: Some(port),
            lazy,
            from,
            ..
        } => receive_listening(state_dir, *port, *lazy, from),
        Command::Receive {
            input,
            listen: None,
            ..
        } => receive(state_dir, input),
    }
}

/// Whether the app runs, thawed (see `Command::Probe`): `Err` says why not. `age` is how long
/// the app's root process has run.
pub fn probe(
    status: &migrate_format::StatusReport,
    age: Option<Duration>,
    fresh_after: Duration,
) -> Result<(), String> {
    use migrate_format::LauncherState as S;
    match status.state {
        S::Restored | S::Running if status.app_stopped => {
            Err("the app is restored and frozen: it waits for its migration's thaw".into())
        }
        S::Restored => Ok(()),
        S::Running if age.is_some_and(|age| age >= fresh_after) => Ok(()),
        S::Running => Err(format!(
            "the app started fresh and has run {} s of the {} s its startup allows",
            age.unwrap_or_default().as_secs(),
            fresh_after.as_secs()
        )),
        S::Waiting => Err("the launcher waits for its checkpoint".into()),
        S::Restoring => Err("the launcher restores the app".into()),
        S::Failed => Err(format!(
            "the restore failed: {}",
            status.error.as_deref().unwrap_or("no reason given")
        )),
        S::Frozen | S::Checkpointing | S::Checkpointed => {
            Err("the app is frozen for a migration".into())
        }
    }
}

/// How long process `pid` has run, from its start time in `/proc` (in clock ticks since boot)
/// and the system's uptime.
fn process_age(pid: i32) -> Option<Duration> {
    let started_ticks = crate::procfs::stat(pid)?.start_ticks;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)?;
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let started = started_ticks as f64 / ticks as f64;
    Some(Duration::from_secs_f64((uptime - started).max(0.0)))
}

fn simple(state_dir: &Path, request: &Request) -> Result<u8, ClientError> {
    let answer = control::call(state_dir, request, None)?;
    print!("{answer}");
    let value: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| ClientError::Answer(e.to_string()))?;
    Ok(
        if value.get("ok").and_then(serde_json::Value::as_bool) == Some(false) {
            1
        } else {
            0
        },
    )
}

fn checkpoint(state_dir: &Path, output: &str, leave_running: bool) -> Result<u8, ClientError> {
    let request = Request::Checkpoint { leave_running };
    if output == "-" {
        if io::stdout().is_terminal() {
            return Err(ClientError::Terminal);
        }
        let answer = control::call(state_dir, &request, Some(io::stdout().as_raw_fd()))?;
        // stdout carries the archive: the summary goes to stderr.
        eprint!("{answer}");
        return report_ok::<CheckpointReport>(&answer, |r| r.ok);
    }
    let path = PathBuf::from(output);
    let temporary = temporary_name(&path);
    let file: OwnedFd = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|source| ClientError::Open {
            path: temporary.clone(),
            source,
        })?
        .into();
    let result = control::call(state_dir, &request, Some(file.as_raw_fd()));
    drop(file);
    let answer = match result {
        Ok(answer) => answer,
        Err(error) => {
            let _ = fs::remove_file(&temporary);
            return Err(error.into());
        }
    };
    print!("{answer}");
    let code = report_ok::<CheckpointReport>(&answer, |r| r.ok)?;
    if code == 0 {
        fs::rename(&temporary, &path).map_err(|source| ClientError::Rename {
            path: path.clone(),
            source,
        })?;
    } else {
        let _ = fs::remove_file(&temporary);
    }
    Ok(code)
}

fn receive(state_dir: &Path, input: &str) -> Result<u8, ClientError> {
    let answer = if input == "-" {
        control::call(state_dir, &Request::Receive, Some(io::stdin().as_raw_fd()))?
    } else {
        let path = PathBuf::from(input);
        let file = fs::File::open(&path).map_err(|source| ClientError::Open { path, source })?;
        control::call(state_dir, &Request::Receive, Some(file.as_raw_fd()))?
    };
    print!("{answer}");
    let _ = io::stdout().flush();
    let code = report_ok::<RestoreReport>(&answer, |r| r.ok)?;
    if code != 0 && input == "-" {
        drain_stdin();
    }
    Ok(code)
}

/// How long a direct transfer's connection may carry nothing before it is given up. PID 1's
/// own stall timeouts (checkpoint output, receive input) are shorter and act first.
const DIRECT_STALL: std::time::Duration = std::time::Duration::from_secs(150);
/// How long `receive --listen` waits for the source's authenticated connection.
const DIRECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Stdin as a plain file: reads take exactly what they ask for (std's stdin reads ahead).
fn unbuffered_stdin() -> Result<fs::File, ClientError> {
    use std::os::fd::AsFd as _;
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(direct::DirectError::Io)?;
    Ok(fs::File::from(fd))
}

/// `checkpoint --to`: connect and authenticate first (nothing is dumped if the target cannot
/// be reached: the answer's refusal is then `unreachable`), then stream PID 1's checkpoint
/// into the channel, printing the bytes sent; the summary is the last line.
///
/// With `lazy` (post-copy) a second connection carries CRIU's page server: PID 1 gets its end
/// of a socket pair as `--ps-socket`, and a thread here relays it to the target both ways.
/// The archive's channel is closed properly as soon as the archive ends (the target verifies
/// it in full before restoring); the summary comes once every page was served.
fn checkpoint_to(
    state_dir: &Path,
    to: &str,
    leave_running: bool,
    lazy: bool,
) -> Result<u8, ClientError> {
    let stdin = unbuffered_stdin()?;
    let keys = direct::read_secret(&stdin)?;
    let config = direct::client_config(&keys)?;
    let connected = direct::connect(to, &config).and_then(|channel| {
        let pages = if lazy {
            Some(direct::connect(to, &config).inspect_err(|_| direct::abandon_ref(&channel))?)
        } else {
            None
        };
        Ok((channel, pages))
    });
    let (channel, pages) = match connected {
        Ok(channel) => channel,
        Err(error @ direct::DirectError::Connect { .. }) => {
            let answer = migrate_format::Answer::refused(
                migrate_format::Refusal::Unreachable,
                None,
                crate::checkpoint::chain(&error),
            );
            println!("{}", serde_json::to_string(&answer).unwrap_or_default());
            return Ok(1);
        }
        Err(error) => {
            // Nothing was dumped; the app is as it was (frozen by `freeze`, or running).
            let report = CheckpointReport::failed(crate::checkpoint::chain(&error));
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            return Ok(1);
        }
    };
    // The channel stands before the app is frozen: the plugin says `go` once it is.
    direct::say(migrate_format::Progress::Connected);
    if let Err(error) = direct::wait_for_go(&stdin, DIRECT_PATIENCE) {
        direct::abandon(channel);
        if let Some(pages) = pages {
            direct::abandon(pages);
        }
        let report =
            CheckpointReport::failed(format!("not dumped: {}", crate::checkpoint::chain(&error)));
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        return Ok(1);
    }
    let (reader, writer) =
        nix::unistd::pipe().map_err(|e| ClientError::Direct(io::Error::from(e).into()))?;
    let (relay, criu_end) = relay_pages(pages, direct::relay_pages)?;
    let state_dir = state_dir.to_path_buf();
    let job = std::thread::spawn(move || {
        control::hand_over(
            &state_dir,
            &Request::Checkpoint { leave_running },
            writer,
            criu_end,
        )
    });
    let pumped = direct::pump_out(reader, channel, DIRECT_STALL);
    // Post-copy: the archive is whole when its pipe ends (a job that failed midway leaves
    // it short, which the target's verification refuses): close it properly now, so the
    // target restores while the memory is still to come.
    let pumped = match pumped {
        Ok((bytes, channel)) if relay.is_some() => match direct::finish_out(channel) {
            Ok(()) => Ok(None),
            Err(error) => {
                tracing::warn!(
                    "closing the archive's channel failed: {}",
                    crate::checkpoint::chain(&error)
                );
                Ok(None)
            }
        }
        .map(|none: Option<direct::Outbound>| (bytes, none)),
        Ok((bytes, channel)) => Ok((bytes, Some(channel))),
        Err(error) => Err(error),
    };
    let answer = job
        .join()
        .map_err(|_| ClientError::Answer("the checkpoint's thread panicked".into()))??;
    let checkpointed = serde_json::from_str::<CheckpointReport>(&answer).is_ok_and(|r| r.ok);
    finish_relay(relay);
    match pumped {
        Ok((_, None)) => {}
        Ok((_, Some(channel))) if checkpointed => {
            if let Err(error) = direct::finish_out(channel) {
                tracing::warn!(
                    "closing the direct transfer failed: {}",
                    crate::checkpoint::chain(&error)
                );
            }
        }
        Ok((_, Some(channel))) => direct::abandon(channel),
        // PID 1's summary says what the job saw; the channel's side is logged beside it.
        Err(error) => {
            tracing::warn!(
                "the direct transfer failed: {}",
                crate::checkpoint::chain(&error)
            );
        }
    }
    print!("{answer}");
    let _ = io::stdout().flush();
    report_ok::<CheckpointReport>(&answer, |r| r.ok)
}

/// `receive --listen`: print the port, wait for the source's authenticated connection (others
/// are turned away), then hand the decrypted stream to PID 1's `receive`, which verifies all of
/// it before restoring anything.
///
/// With `lazy` (post-copy) the source's second connection carries CRIU's page server: PID 1
/// gets its end of a socket pair for `criu lazy-pages --ps-socket`, and a thread here relays
/// it. The restore's answer is printed as soon as it comes; this command then stays until
/// the daemon has every page (or the channel broke).
fn receive_listening(
    state_dir: &Path,
    port: u16,
    lazy: bool,
    from: &[std::net::IpAddr],
) -> Result<u8, ClientError> {
    let stdin = unbuffered_stdin()?;
    let keys = direct::read_secret(&stdin)?;
    let config = direct::server_config(&keys)?;
    let listener = direct::listen(port)?;
    let port = listener
        .local_addr()
        .map_err(direct::DirectError::Io)?
        .port();
    direct::say(migrate_format::Progress::Listening { port });
    let channel = direct::accept(&listener, &config, &stdin, from, DIRECT_PATIENCE)?;
    let pages = if lazy {
        Some(direct::accept(
            &listener,
            &config,
            &stdin,
            from,
            DIRECT_PATIENCE,
        )?)
    } else {
        None
    };
    drop(listener);
    let (reader, writer) =
        nix::unistd::pipe().map_err(|e| ClientError::Direct(io::Error::from(e).into()))?;
    let (relay, criu_end) = relay_pages(pages, direct::relay_pages)?;
    let state_dir = state_dir.to_path_buf();
    let job = std::thread::spawn(move || {
        control::hand_over(&state_dir, &Request::Receive, reader, criu_end)
    });
    let pumped = direct::pump_in(channel, writer, DIRECT_STALL);
    let answer = job
        .join()
        .map_err(|_| ClientError::Answer("the receive's thread panicked".into()))??;
    if let Err(error) = pumped {
        tracing::warn!(
            "the direct transfer failed: {}",
            crate::checkpoint::chain(&error)
        );
    }
    print!("{answer}");
    let _ = io::stdout().flush();
    let restored = serde_json::from_str::<RestoreReport>(&answer).is_ok_and(|r| r.ok);
    if restored {
        // The app's memory is still coming: relay until the daemon has all of it.
        finish_relay(relay);
    }
    report_ok::<RestoreReport>(&answer, |r| r.ok)
}

/// The relay thread of a post-copy's page-server connection, if there is one, and PID 1's end
/// of the socket pair it relays (for CRIU's `--ps-socket`).
type PagesRelay = Option<std::thread::JoinHandle<Result<(u64, u64), direct::DirectError>>>;

fn relay_pages<T: Send + 'static>(
    channel: Option<T>,
    relay: fn(T, std::os::unix::net::UnixStream) -> Result<(u64, u64), direct::DirectError>,
) -> Result<(PagesRelay, Option<std::os::fd::OwnedFd>), ClientError> {
    let Some(channel) = channel else {
        return Ok((None, None));
    };
    let (ours, criu) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| ClientError::Direct(direct::DirectError::Io(e)))?;
    let thread = std::thread::spawn(move || relay(channel, ours));
    Ok((Some(thread), Some(std::os::fd::OwnedFd::from(criu))))
}

/// Waits for the page relay to end, logging how it went.
fn finish_relay(relay: PagesRelay) {
    let Some(thread) = relay else { return };
    match thread.join() {
        Ok(Ok((inbound, outbound))) => {
            tracing::info!(
                inbound,
                outbound,
                "post-copy: the page-server connection ended"
            );
        }
        Ok(Err(error)) => tracing::warn!(
            "post-copy: the page-server connection failed: {}",
            crate::checkpoint::chain(&error)
        ),
        Err(_) => tracing::warn!("post-copy: the page relay panicked"),
    }
}

/// Reads stdin to its end, discarding it. After a refusal PID 1 stops reading the archive,
/// but whoever feeds it may still be sending: over an exec session a sender blocked on a
/// full stdin cannot take in our answer and exit status either (kube's exec task serves
/// one thing at a time), so the refusal would never arrive. The sender ends stdin once it
/// has sent the whole archive, or drops the session.
fn drain_stdin() {
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
}

fn report_ok<T: serde::de::DeserializeOwned>(
    answer: &str,
    ok: impl Fn(&T) -> bool,
) -> Result<u8, ClientError> {
    match serde_json::from_str::<T>(answer) {
        Ok(report) => Ok(if ok(&report) { 0 } else { 1 }),
        // PID 1 refused the request itself ({"ok":false,"error":...}).
        Err(_) => {
            let value: serde_json::Value =
                serde_json::from_str(answer).map_err(|e| ClientError::Answer(e.to_string()))?;
            Ok(
                if value.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
                    0
                } else {
                    1
                },
            )
        }
    }
}

/// `DIR/.NAME.partial-PID` next to the final name, so the rename is atomic.
fn temporary_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, stopped: bool) -> migrate_format::StatusReport {
        serde_json::from_value(serde_json::json!({
            "state": state, "app_pid": 1000, "launcher_version": "0.1.0", "criu_version": "4.2",
            "kernel": "6.18", "arch": "x86_64", "last_checkpoint": null, "last_restore": null,
            "error": null, "app_stopped": stopped
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_startup_probe_passes_only_once_the_app_runs_thawed() {
        let second = Some(Duration::from_secs(1));
        let none = Duration::ZERO;
        // A target: waiting, restoring, restored but frozen, failed: not yet.
        for (state, stopped) in [
            ("waiting", false),
            ("restoring", false),
            ("restored", true),
            ("failed", false),
            ("frozen", true),
            ("checkpointed", true),
        ] {
            assert!(
                probe(&status(state, stopped), second, none).is_err(),
                "{state} passed"
            );
        }
        assert_eq!(probe(&status("restored", false), second, none), Ok(()));
        // Restarted later, fresh: once it ran as long as its own startup probe allowed.
        let fresh = status("running", false);
        assert_eq!(probe(&fresh, second, none), Ok(()));
        let why = probe(&fresh, second, Duration::from_secs(30)).unwrap_err();
        assert!(why.contains("has run 1 s of the 30 s"), "{why}");
        assert_eq!(
            probe(
                &fresh,
                Some(Duration::from_secs(31)),
                Duration::from_secs(30)
            ),
            Ok(())
        );
    }

    #[test]
    fn a_process_age_is_read_from_proc() {
        let age = process_age(std::process::id() as i32);
        assert!(
            age.is_some_and(|a| a < Duration::from_secs(3600)),
            "{age:?}"
        );
    }
}
