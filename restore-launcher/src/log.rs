//! Logging to stderr as `[restore-launcher PID] LEVEL: message`, the level taken from
//! `RESTORE_LAUNCHER_LOG` (error, warn, info, debug, trace; default warn).
//!
//! The launcher's stderr is the container's stderr, interleaved with the app's output, so
//! every line says who wrote it (as tini's `[WARN  tini (1)]` lines do).
//!
//! PID 1 writes its lines without ever waiting ([`NeverBlock`]): a log reader that stopped
//! reading must not stop signal forwarding, reaping or requests (the app's own output is
//! relayed the same way, `crate::relay`). A line that does not fit is dropped, and the next
//! line that fits says how many bytes were.

use std::fmt;
use std::io::Write as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Environment variable that sets the log level.
pub const LOG_ENV: &str = "RESTORE_LAUNCHER_LOG";

/// Installs the global logger, which never waits on stderr when `never_block` (PID 1).
/// Returns a warning to print if the level was not understood.
pub fn init(never_block: bool) -> Option<String> {
    let (level, warning) = match std::env::var(LOG_ENV) {
        Ok(value) => match parse_level(&value) {
            Some(level) => (level, None),
            None => (
                tracing::level_filters::LevelFilter::WARN,
                Some(format!(
                    "{LOG_ENV}={value:?} is not a log level (use error, warn, info, debug or trace); using warn"
                )),
            ),
        },
        Err(_) => (tracing::level_filters::LevelFilter::WARN, None),
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .event_format(Prefixed);
    // A second init (only possible in tests) keeps the first logger; nothing to report.
    let _ = if never_block {
        tracing::subscriber::set_global_default(builder.with_writer(|| NeverBlock).finish())
    } else {
        tracing::subscriber::set_global_default(builder.with_writer(std::io::stderr).finish())
    };
    warning
}

/// Bytes of log lines dropped because stderr took nothing when they were written.
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// stderr for PID 1's log lines: each line (one `write` from the formatter) is written only
/// as far as stderr takes it now, in pieces of at most `PIPE_BUF` bytes after `poll` says it is
/// writable (a pipe takes such a piece whole, never interleaved with the app's relayed
/// output); the rest is dropped and counted.
struct NeverBlock;

impl std::io::Write for NeverBlock {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = format!(
                "[restore-launcher {}] warning: {dropped} bytes of this launcher's log were dropped while its reader took nothing\n",
                std::process::id()
            );
            let left = write_now(note.as_bytes());
            if left > 0 {
                DROPPED.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        let left = write_now(line);
        DROPPED.fetch_add(left as u64, Ordering::Relaxed);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// stderr opened anew without blocking (its own open file description, so the flag touches
/// nobody else's): a write returns at once, whoever else (a job, the relay) filled the pipe
/// meanwhile. None where /proc cannot reopen it (a socket): then `poll` decides.
static NON_BLOCKING: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

fn non_blocking_stderr() -> Option<&'static std::fs::File> {
    NON_BLOCKING
        .get_or_init(|| {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/proc/self/fd/2")
                .ok()
        })
        .as_ref()
}

/// Writes what stderr takes of `bytes` now; returns how many bytes it did not take.
fn write_now(bytes: &[u8]) -> usize {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stderr = std::io::stderr();
    let reopened = non_blocking_stderr();
    let fd = match reopened {
        Some(file) => std::os::fd::AsFd::as_fd(file),
        None => std::os::fd::AsFd::as_fd(&stderr),
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        if reopened.is_none() {
            let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
            let ready = poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
                && fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLOUT));
            if !ready {
                break;
            }
        }
        // A pipe takes a piece of at most PIPE_BUF bytes whole or not at all.
        let piece = &rest[..rest.len().min(libc::PIPE_BUF)];
        match nix::unistd::write(fd, piece) {
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    rest.len()
}

fn parse_level(value: &str) -> Option<tracing::level_filters::LevelFilter> {
    use tracing::level_filters::LevelFilter;
    match value.trim().to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::OFF),
        "error" => Some(LevelFilter::ERROR),
        "warn" | "warning" | "" => Some(LevelFilter::WARN),
        "info" => Some(LevelFilter::INFO),
        "debug" => Some(LevelFilter::DEBUG),
        "trace" => Some(LevelFilter::TRACE),
        _ => None,
    }
}

/// `[restore-launcher PID] LEVEL: message key=value ...`
struct Prefixed;

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        write!(
            writer,
            "[restore-launcher {}] {level}: ",
            std::process::id()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Prints a message before logging is set up or when it must appear regardless of level
/// (usage errors, the fatal error that ends the launcher before the app started).
pub fn print_error(message: &dyn fmt::Display) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(
        stderr,
        "[restore-launcher {}] error: {message:#}",
        std::process::id()
    );
}

#[cfg(test)]
mod tests {
    use super::parse_level;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn levels_parse_case_insensitively() {
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level(" info "), Some(LevelFilter::INFO));
        assert_eq!(parse_level(""), Some(LevelFilter::WARN));
        assert_eq!(parse_level("loud"), None);
    }
}
