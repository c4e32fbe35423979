//! Helpers for running the real `restore-launcher` binary: as PID 1 of a fresh PID namespace
//! (`unshare --pid --fork --mount-proc`, as a container runtime would) or as a plain child,
//! finding its host PID to signal it, and inspecting `/proc`.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the launcher is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of new PID and mount namespaces (needs root).
    Pid1,
    /// An ordinary child of the test (the launcher becomes a subreaper).
    Child,
}

/// The launcher under test: the static release build when `cargo xtask test` provides it
/// (what ships in images), otherwise the debug build cargo made for this test run.
pub fn launcher() -> PathBuf {
    match std::env::var_os("RESTORE_LAUNCHER_STATIC") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_BIN_EXE_restore-launcher")),
    }
}

/// Whether tests needing root can run. Outside CI they skip with a loud message; in CI
/// (`CI=true`, run as root) a missing privilege is a failure, never a silent skip.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must run as root (needs unshare --pid)"
    );
    eprintln!(
        "SKIPPED {test}: needs root for `unshare --pid --fork --mount-proc`; run the tests as root"
    );
    false
}

/// Modes this machine can run, skipping PID 1 loudly when not root.
pub fn modes(test: &str) -> Vec<Mode> {
    if root_or_skip(test) {
        vec![Mode::Pid1, Mode::Child]
    } else {
        vec![Mode::Child]
    }
}

/// A `Command` that starts the launcher in `mode` with `args` (options, `--`, the app).
pub fn launcher_command<I, S>(mode: Mode, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = match mode {
        Mode::Pid1 => {
            let mut cmd = Command::new("unshare");
            cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                .arg(launcher());
            cmd
        }
        Mode::Child => Command::new(launcher()),
    };
    cmd.args(args);
    // Each launcher gets its own control socket directory, as each container has its own.
    let state_dir = std::env::temp_dir().join(format!(
        "rl-state-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    cmd.env("RESTORE_LAUNCHER_STATE_DIR", state_dir);
    cmd
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A running launcher and how to reach it.
#[derive(Debug)]
pub struct Running {
    /// `None` once [`Running::finish`] has taken it.
    child: Option<Child>,
    pub mode: Mode,
}

impl Running {
    pub fn start(mode: Mode, args: &[&str]) -> Running {
        let child = launcher_command(mode, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the launcher");
        Running {
            child: Some(child),
            mode,
        }
    }

    /// The launcher's PID as seen from the test (the child of `unshare` in PID 1 mode).
    pub fn launcher_pid(&self) -> i32 {
        let outer = self.child.as_ref().expect("launcher running").id() as i32;
        match self.mode {
            Mode::Child => outer,
            Mode::Pid1 => wait_for("unshare's child", Duration::from_secs(10), || {
                children_of(outer).into_iter().next()
            }),
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.launcher_pid()), signal)
            .expect("signal the launcher");
    }

    /// Waits for the launcher to exit; returns its exit code, stdout and stderr.
    pub fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let child = self.child.take().expect("launcher running");
        let pid = child.id() as i32;
        let watchdog = std::thread::spawn(move || {
            std::thread::sleep(limit);
            // Still running past the limit: kill it so the test fails instead of hanging.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        let output = child.wait_with_output().expect("wait for the launcher");
        drop(watchdog);
        let code = output
            .status
            .code()
            .unwrap_or_else(|| panic!("launcher killed: {:?}", output.status));
        (
            code,
            String::from_utf8_lossy(&output.stdout).into(),
            String::from_utf8_lossy(&output.stderr).into(),
        )
    }
}

impl Drop for Running {
    /// A failed test must not leave the launcher and its app behind: kill the outer process
    /// (`unshare --kill-child` then takes the whole PID namespace with it).
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `probe` until it returns something, or panics after `limit` naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Direct children of `pid` (all threads' children).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut children = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return children;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    children
}

/// `(state, command name)` of a process, from /proc/PID/stat.
pub fn state_of(pid: i32) -> Option<(char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let state = stat[close + 2..].chars().next()?;
    Some((state, name))
}

/// Zombie children of `pid`.
pub fn zombies_of(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|&c| matches!(state_of(c), Some(('Z', _))))
        .collect()
}

/// A Python interpreter for test apps.
pub fn python() -> PathBuf {
    for candidate in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("python3")
}
