//! Logging to stderr as `[restore-launcher PID] LEVEL: message`, the level taken from
//! `RESTORE_LAUNCHER_LOG` (error, warn, info, debug, trace; default warn).
//!
//! The launcher's stderr is the container's stderr, interleaved with the app's output, so
//! every line says who wrote it (as tini's `[WARN  tini (1)]` lines do).

use std::fmt;
use std::io::Write as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Environment variable that sets the log level.
pub const LOG_ENV: &str = "RESTORE_LAUNCHER_LOG";

/// Installs the global logger. Returns a warning to print if the level was not understood.
pub fn init() -> Option<String> {
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
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(Prefixed)
        .finish();
    // A second init (only possible in tests) keeps the first logger; nothing to report.
    let _ = tracing::subscriber::set_global_default(subscriber);
    warning
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
