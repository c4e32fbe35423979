//! Harness for cross-binary tests with real parts: the cached Debian trixie root filesystem
//! with CRIU 4.x and python3 (built by `cargo xtask rootfs`), and [`Node`]s — a copy of that
//! root run by `node-sandbox` in fresh mount, PID, UTS, IPC, network and cgroup namespaces
//! with the static `restore-launcher` as PID 1, the way a container runtime runs a pod's
//! container on a node. Sub-commands reach PID 1 through `nsenter` into all its namespaces,
//! the way `kubectl exec` does.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub mod apiserver;
pub mod cluster;
pub mod reference;
pub use apiserver::{
    ApiServer, KUBERNETES_VERSION, apiserver_tests_can_run, k8s_bin_dir, workspace_binary,
};

/// Version of the cached root filesystem's recipe; bump when the package list changes.
pub const ROOTFS_RECIPE: &str = "trixie-minbase-criu-python3-v1";
/// Debian packages in the root filesystem besides minbase.
pub const ROOTFS_PACKAGES: &str = "criu,python3-minimal";
/// The least capabilities CRIU needs in the container (found by experiment; `docs/security.md`).
pub const LEAST_CAPS: &str = "CAP_CHECKPOINT_RESTORE,CAP_SYS_PTRACE,CAP_SETPCAP";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds the plugin the way a release ships it -- the command `cargo xtask release` runs for
/// linux/amd64, so the two share one build, without the test-only `fault-injection` feature --
/// and returns the binary.
///
/// # Errors
/// When cargo cannot build it (the musl target missing: `rustup target add
/// x86_64-unknown-linux-musl`).
pub fn release_plugin() -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace())
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "kubectl-migrate",
        ])
        .args(["--target", TARGET])
        .status()?;
    anyhow::ensure!(
        status.success(),
        "cargo build --release of the plugin failed"
    );
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    Ok(target_dir.join(TARGET).join("release/kubectl-migrate"))
}

/// Where the cached root filesystem lives.
pub fn rootfs_path() -> PathBuf {
    workspace()
        .join(".cache")
        .join("rootfs")
        .join(ROOTFS_RECIPE)
}

/// Whether the CRIU tests can run here; outside CI they skip loudly when not, in CI (`CI`
/// set) a missing part is a failure.
pub fn criu_tests_can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    if !rootfs_path().join("usr/sbin/criu").exists() {
        missing.push(format!(
            "the trixie root filesystem at {} (run `cargo xtask rootfs` as root)",
            rootfs_path().display()
        ));
    }
    if static_launcher().is_none() {
        missing.push("the static launcher (run the tests through `cargo xtask test`)".into());
    }
    ready_or_skip(test, &missing)
}

/// True when nothing is `missing`. Otherwise a test skips with a loud `SKIPPED` line, or,
/// under CI (`CI` set, where everything is installed), fails: a CI run never silently skips.
pub fn ready_or_skip(test: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must provide {}",
        missing.join(", ")
    );
    eprintln!("SKIPPED {test}: needs {}", missing.join(", "));
    false
}

pub use nix::sys::signal::Signal;

static LAUNCHER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Uses `path` as the launcher to install in nodes (for programs; tests use the environment).
pub fn use_launcher(path: &Path) {
    let _ = LAUNCHER.set(path.to_path_buf());
}

/// The static launcher: set by [`use_launcher`], or built by `cargo xtask test` and named in
/// `RESTORE_LAUNCHER_STATIC`.
pub fn static_launcher() -> Option<PathBuf> {
    LAUNCHER
        .get()
        .cloned()
        .or_else(|| std::env::var_os("RESTORE_LAUNCHER_STATIC").map(PathBuf::from))
        .filter(|p| p.exists())
}

/// `node-sandbox`, built by cargo next to the test binary (`target/debug/deps/..` → `target/debug`).
fn sandbox_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Next to the program (xtask in target/debug), or one up (tests in target/debug/deps).
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("node-sandbox"))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("node-sandbox"))
}

/// How to start a node's PID 1.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    pub name: String,
    /// Arguments to `restore-launcher` (options, `--`, the app).
    pub launcher_args: Vec<String>,
    /// Environment for PID 1 (`K=V`).
    pub env: Vec<String>,
    /// Keep only these capabilities (comma-separated names), as a pod's securityContext would.
    pub keep_caps: Option<String>,
}

/// One "node": its own root filesystem copy, and its container's PID 1.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Option<Instant>,
}

impl Node {
    /// Lays out a node's root (a full copy of the cached rootfs plus the launcher and the test
    /// apps) without starting anything. Use [`Node::start`] next.
    ///
    /// # Errors
    /// When copying fails.
    pub fn prepare(name: &str) -> Result<Node> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("node-{name}-"))
            .tempdir()?;
        let root = dir.path().join("root");
        let status = Command::new("cp")
            .arg("-a")
            .arg(rootfs_path())
            .arg(&root)
            .status()?;
        if !status.success() {
            bail!("copying the root filesystem failed: {status}");
        }
        let launcher = static_launcher().context("no static launcher")?;
        std::fs::copy(&launcher, root.join("usr/local/bin/restore-launcher"))?;
        let apps = root.join("opt/apps");
        std::fs::create_dir_all(&apps)?;
        for example in ["counter/counter.py", "sysv/sysv.pl"] {
            let from = workspace().join("images/examples").join(example);
            let name = from.file_name().context("an example without a name")?;
            std::fs::copy(&from, apps.join(name))?;
        }
        for entry in std::fs::read_dir(workspace().join("tests/apps"))? {
            let entry = entry?;
            std::fs::copy(entry.path(), apps.join(entry.file_name()))?;
        }
        Ok(Node {
            name: name.into(),
            dir,
            child: None,
            stdout: Arc::default(),
            stderr: Arc::default(),
            readers: Vec::new(),
            started: None,
        })
    }

    /// Starts the node's PID 1.
    ///
    /// # Errors
    /// When `node-sandbox` cannot be started.
    pub fn start(mut self, options: &NodeOptions) -> Result<Node> {
        let mut cmd = Command::new(sandbox_binary());
        cmd.arg("--root")
            .arg(self.root())
            .arg("--hostname")
            .arg(&options.name);
        if let Some(caps) = &options.keep_caps {
            cmd.arg("--keep-caps").arg(caps);
        }
        for kv in &options.env {
            cmd.arg("--env").arg(kv);
        }
        cmd.arg("--")
            .arg("/usr/local/bin/restore-launcher")
            .args(&options.launcher_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("start node-sandbox")?;
        for (pipe, buffer) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                self.stdout.clone(),
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                self.stderr.clone(),
            ),
        ] {
            let Some(mut pipe) = pipe else { continue };
            self.readers.push(std::thread::spawn(move || {
                let mut chunk = [0u8; 65536];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut buffer) = buffer.lock() {
                        buffer.extend_from_slice(&chunk[..n]);
                    }
                }
            }));
        }
        self.child = Some(child);
        self.started = Some(Instant::now());
        // Ready when PID 1 answers `status` (its socket is on the node's own /run tmpfs, which
        // the host cannot see), or when it already exited (a refused restore).
        self.wait_for(
            "PID 1 to answer `status`",
            Duration::from_secs(20),
            |node| {
                let exited =
                    node.child.as_ref().is_some_and(|c| {
                        std::fs::metadata(format!("/proc/{}/task", c.id())).is_err()
                    }) || node.launcher_pid().is_none() && node.started_for(Duration::from_secs(2));
                let answers = || {
                    node.launcher(&["status"])
                        .output()
                        .is_ok_and(|o| o.status.success())
                };
                (exited || answers()).then_some(())
            },
        )?;
        Ok(self)
    }

    fn started_for(&self, at_least: Duration) -> bool {
        self.started.is_some_and(|t| t.elapsed() >= at_least)
    }

    /// The node's root filesystem as seen from the host.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A path inside the node, as seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// PID 1's PID on the host (the sandbox's child).
    pub fn launcher_pid(&self) -> Option<i32> {
        let sandbox = self.child.as_ref()?.id();
        let text =
            std::fs::read_to_string(format!("/proc/{sandbox}/task/{sandbox}/children")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// A command run inside the node's container, like `kubectl exec`.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("--target")
            .arg(self.launcher_pid().unwrap_or(0).to_string());
        cmd.args([
            "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd", "--",
        ]);
        cmd.args(args);
        cmd.env_clear().env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        cmd
    }

    /// `restore-launcher SUBCOMMAND ARGS` inside the node.
    pub fn launcher(&self, args: &[&str]) -> Command {
        let mut full = vec!["/usr/local/bin/restore-launcher"];
        full.extend_from_slice(args);
        self.exec(&full)
    }

    /// `checkpoint --output -` in this node piped into `receive --input -` in `target`, as
    /// the plugin does through exec; returns the checkpoint summary and the restore report.
    ///
    /// # Errors
    /// When either side fails, with both reports and the target's log.
    pub fn stream_to(&self, target: &Node) -> Result<(serde_json::Value, serde_json::Value)> {
        let mut dump = self
            .launcher(&["checkpoint", "--output", "-"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let receive = target
            .launcher(&["receive", "--input", "-"])
            .stdin(dump.stdout.take().context("checkpoint stdout")?)
            .output()?;
        let dump = dump.wait_with_output()?;
        let lossy = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        if !dump.status.success() || !receive.status.success() {
            bail!(
                "the streamed migration failed\ncheckpoint: {}\nreceive: {} {}\n{}: {}",
                lossy(&dump.stderr),
                lossy(&receive.stdout),
                lossy(&receive.stderr),
                target.name,
                tail(&target.stderr(), 20)
            );
        }
        let checkpoint = serde_json::from_slice(&dump.stderr)
            .with_context(|| format!("checkpoint summary: {}", lossy(&dump.stderr)))?;
        let restore = serde_json::from_slice(&receive.stdout)
            .with_context(|| format!("receive answer: {}", lossy(&receive.stdout)))?;
        Ok((checkpoint, restore))
    }

    /// `status` as JSON.
    ///
    /// # Errors
    /// When status cannot be read.
    pub fn status(&self) -> Result<serde_json::Value> {
        let output = self.launcher(&["status"]).output()?;
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "status of {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Polls `probe` until it returns something, or fails after `limit` naming `what`, with
    /// the node's output for diagnosis.
    ///
    /// # Errors
    /// On timeout.
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut(&Node) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        loop {
            if let Some(value) = probe(self) {
                return Ok(value);
            }
            if start.elapsed() > limit {
                bail!(
                    "{}: timed out after {limit:?} waiting for {what}\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.name,
                    tail(&self.stdout(), 20),
                    tail(&self.stderr(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for PID 1 to exit; returns its exit code.
    ///
    /// # Errors
    /// On timeout (the node is killed) or when it died by a signal.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<i32> {
        let child = self.child.as_mut().context("not started")?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status
                    .code()
                    .with_context(|| format!("{} died by {status}", self.name));
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                bail!(
                    "{}: PID 1 did not exit within {limit:?}\n--- stderr:\n{}",
                    self.name,
                    tail(&self.stderr(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to PID 1.
    ///
    /// # Errors
    /// When PID 1 is gone.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.launcher_pid().context("PID 1 is not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // node-sandbox's child dies with it (PDEATHSIG), taking the PID namespace along.
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A shell command that prints every process's /proc/PID/stat line, run inside a node or
/// pod; [`states_named`] reads its output.
pub const LIST_STATS: &str = "for f in /proc/[0-9]*/stat; do read -r l < $f && echo \"$l\"; done";

/// `(PID, state letter)` of the processes named `comm` in [`LIST_STATS`]' output.
pub fn states_named(stats: &str, comm: &str) -> Vec<(String, String)> {
    stats
        .lines()
        .filter(|l| l.contains(&format!("({comm})")))
        .filter_map(|l| {
            let pid = l.split_whitespace().next()?;
            let state = l[l.rfind(')')? + 1..].split_whitespace().next()?;
            Some((pid.to_string(), state.to_string()))
        })
        .collect()
}

/// Counter lines (`events=N revenue=R ...`) as (events, revenue in cents).
pub fn counter_values(stdout: &str) -> Vec<(u64, u64)> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut events = None;
            let mut revenue = None;
            for word in line.split_whitespace() {
                if let Some(v) = word.strip_prefix("events=") {
                    events = v.parse().ok();
                }
                if let Some(v) = word.strip_prefix("revenue=") {
                    let (units, cents) = v.split_once('.')?;
                    revenue = Some(units.parse::<u64>().ok()? * 100 + cents.parse::<u64>().ok()?);
                }
            }
            Some((events?, revenue?))
        })
        .collect()
}

/// What [`run_measuring_rss`] saw of a finished command.
#[derive(Debug)]
pub struct Measured {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The process's peak resident memory (VmHWM), KiB, polled every 20 ms.
    pub peak_rss_kib: u64,
    pub elapsed: Duration,
}

/// Runs `cmd` to its end with its output collected, polling its peak RSS (the process itself,
/// not a wrapper: run the binary directly).
///
/// # Errors
/// When it cannot be started.
pub fn run_measuring_rss(cmd: &mut Command) -> Result<Measured> {
    use std::io::Read as _;
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(kib) = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
        {
            peak = peak.max(kib);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait()?;
    Ok(Measured {
        status,
        elapsed: started.elapsed(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        peak_rss_kib: peak,
    })
}

/// Milliseconds since the Unix epoch of a CRI log time stamp (`2026-11-23T19:30:48.453986146Z`,
/// what `kubectl logs --timestamps` prints first on each line).
pub fn log_stamp_ms(stamp: &str) -> Option<u64> {
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (parts.next()??, parts.next()??, parts.next()??);
    let millis: i64 = format!("{fraction:0<3}").get(..3)?.parse().ok()?;
    // Days from 1970-01-01 to the civil date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60 * 1000 + ss * 1000 + millis).ok()
}

/// The time stamp (ms since the epoch) of the first, or the last, counter line of `kubectl
/// logs --timestamps` output.
pub fn count_stamp_ms(timestamped_log: &str, last: bool) -> Option<u64> {
    let mut lines = timestamped_log.lines().filter(|l| l.contains("events="));
    let line = if last {
        lines.next_back()
    } else {
        lines.next()
    }?;
    log_stamp_ms(line.split_whitespace().next()?)
}

/// Revenue in cents after `events` events, as the counter app computes it.
/// What `images/examples/sysv/sysv.pl` prints each tick: (events, semaphore 0, semaphore 1,
/// the message it received, the shared-memory contents).
pub fn sysv_ticks(stdout: &str) -> Vec<(u64, u64, u64, String, String)> {
    stdout
        .lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .map(str::to_string)
            };
            Some((
                field("events=")?.parse().ok()?,
                field("sem=")?.parse().ok()?,
                field("mark=")?.parse().ok()?,
                field("msg=")?,
                field("shm=")?,
            ))
        })
        .collect()
}

pub fn expected_revenue(events: u64) -> u64 {
    const PRICES_CENTS: [u64; 5] = [199, 1250, 75, 499, 2999];
    (1..=events).map(|e| PRICES_CENTS[(e % 5) as usize]).sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_time_stamps_read_as_epoch_milliseconds() {
        assert_eq!(super::log_stamp_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            super::log_stamp_ms("2026-11-23T19:30:48.453986146Z"),
            Some(1_795_462_248_453)
        );
        assert_eq!(
            super::log_stamp_ms("2024-02-29T23:59:59.999Z"),
            Some(1_709_251_199_999)
        );
        assert_eq!(super::log_stamp_ms("yesterday"), None);
        let log = "2026-11-23T19:30:48.453986146Z events=1 revenue=0.75\n\
                   2026-11-23T19:30:48.474807189Z events=2 revenue=2.74\n";
        assert_eq!(super::count_stamp_ms(log, true), Some(1_795_462_248_474));
    }
}
