//! Project tasks, run as `cargo xtask TASK` (the alias is in `.cargo/config.toml`).
//!
//! - `test`: build the static launcher, then run every test of the workspace against it.
//! - `demo`: the main job shown in README.md: a local cluster (etcd, kube-apiserver, two
//!   kubelets with containerd) and the counter pod moved by `kubectl migrate`; `demo --sandbox`
//!   is the launcher alone between two sandboxed nodes.
//! - `cluster up|down`: that local cluster, left running for a person.
//! - `images`: the images of `images/`, built without Docker (debootstrap + umoci).
//! - `bench`: dump/restore downtime, throughput and memory against raw CRIU (not a test);
//!   `bench --cluster`: relay against direct on the local cluster, against the same floor.
//! - `release`: the krew archives of `kubectl-migrate` and the manifest with their sha256.
//! - `docs`: rewrite the `--help` blocks of `docs/reference.md` from the built binaries.
//! - `static-launcher`: build the statically linked `restore-launcher` and print its path.
//! - `rootfs`: build (once, cached) the Debian trixie root filesystem with CRIU 4.x that the
//!   CRIU tests and the demo run the launcher in (needs root and debootstrap).
//!
//! Tasks only orchestrate cargo and the built binaries; they install nothing system-wide
//! (that is `.ci/run`'s job on a fresh machine).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, Result, bail};

mod bench;
mod bench_cluster;
mod cluster;
mod demo;
mod images;
mod release;

/// Features the test builds enable: the plugin's fault hook, which release builds leave out.
const TEST_FEATURES: &str = "kubectl-migrate/fault-injection";

/// The target the launcher ships as: musl links statically with no extra flags.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("demo") if args.get(1).map(String::as_str) == Some("--sandbox") => demo::sandbox(),
        Some("demo") => cluster::demo(),
        Some("bench") if args.get(1).is_some_and(|a| a == "--cluster") => {
            bench_cluster::run(&args[2..])
        }
        // The archive reader with many included files: the unit test prints its figures. Staged
        // in memory (tmpfs), so that they are the reader's work, not the disk's writeback.
        Some("bench") if args.get(1).is_some_and(|a| a == "--archive") => {
            run(cargo().env("TMPDIR", "/dev/shm").args([
                "test",
                "--release",
                "-p",
                "restore-launcher",
                "--bin",
                "restore-launcher",
                "thirty_thousand_included_files",
                "--",
                "--nocapture",
            ]))
        }
        Some("bench") => bench::run(&args[1..]),
        Some("static-launcher") => static_launcher().map(|path| println!("{}", path.display())),
        Some("rootfs") => rootfs().map(|path| println!("{}", path.display())),
        Some("k8s") => k8s().map(|path| println!("{}", path.display())),
        Some("images") => images::build().map(|path| println!("{}", path.display())),
        Some("cluster") => cluster::run_task(&args[1..]),
        Some("release") => release::run_task(&args[1..]),
        Some("docs") => docs(),
        Some("crd") => crd(),
        Some("help" | "-h" | "--help") | None => {
            println!(
                "usage: cargo xtask <test [CARGO TEST ARGS]|demo [--sandbox]|cluster up|down|bench [--cluster|--archive] [SIZES_MIB]|release [--out DIR] [--allow-missing]|docs|crd|static-launcher|rootfs|k8s|images>"
            );
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!(
            "unknown task `{other}`; see `cargo xtask help`"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ sits directly in the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Rewrites the generated `--help` blocks of `docs/reference.md` (`migrate_tests::reference`).
/// Regenerates `config/crd/` from the Rust types (`kubectl-migrate/src/crd.rs`): the test
/// that compares them writes the file when asked to.
fn crd() -> Result<()> {
    run(cargo()
        .args([
            "test",
            "--quiet",
            "--package",
            "kubectl-migrate",
            "--lib",
            "crd::",
        ])
        .env("UPDATE_GOLDEN", "1"))?;
    println!(
        "{}",
        workspace_root()
            .join("config/crd/podmigrations.yaml")
            .display()
    );
    Ok(())
}

fn docs() -> Result<()> {
    run(cargo().args([
        "build",
        "--quiet",
        "--package",
        "kubectl-migrate",
        "--package",
        "restore-launcher",
    ]))?;
    let path = migrate_tests::reference::path();
    let doc = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    std::fs::write(&path, migrate_tests::reference::refresh(&doc)?)?;
    println!("{}", path.display());
    Ok(())
}

/// Builds the release launcher for [`STATIC_TARGET`] and returns its path.
pub(crate) fn static_launcher() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "restore-launcher",
        "--target",
        STATIC_TARGET,
    ]))
    .with_context(|| {
        format!("building the static launcher (needs `rustup target add {STATIC_TARGET}`)")
    })?;
    Ok(target_dir()
        .join(STATIC_TARGET)
        .join("release")
        .join("restore-launcher"))
}

/// Builds the release plugin for [`STATIC_TARGET`] (the controller image runs it) and returns
/// its path.
pub(crate) fn static_plugin() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "--package",
        "kubectl-migrate",
        "--target",
        STATIC_TARGET,
    ]))
    .with_context(|| {
        format!(
            "building the static plugin (needs `rustup target add {STATIC_TARGET}` and musl-tools)"
        )
    })?;
    Ok(target_dir()
        .join(STATIC_TARGET)
        .join("release")
        .join("kubectl-migrate"))
}

/// Cargo's target directory.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds `node-sandbox`, the harness binary that runs a node (for the demo and benchmark).
pub(crate) fn build_sandbox() -> Result<()> {
    build_harness_binary("node-sandbox")
}

/// Builds `netns-forward`, which forwards the local cluster's API server port from the control
/// plane's network namespace to 127.0.0.1.
pub(crate) fn build_forwarder() -> Result<()> {
    build_harness_binary("netns-forward")
}

fn build_harness_binary(name: &str) -> Result<()> {
    run(cargo().args([
        "build",
        "--quiet",
        "--package",
        "migrate-tests",
        "--bin",
        name,
    ]))
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Builds the cached trixie root filesystem if it is not there yet. Debian bookworm's CRIU
/// 3.17 does not work on current kernels (`vdso: Unexpected rt vDSO area bounds`); trixie's
/// 4.1 does. Built into a temporary directory and renamed, so an interrupted build is redone.
pub(crate) fn rootfs() -> Result<PathBuf> {
    let path = migrate_tests::rootfs_path();
    if path.join("usr/sbin/criu").exists() {
        return Ok(path);
    }
    let parent = path.parent().context("rootfs path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let partial = parent.join(format!(".partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    eprintln!(
        "xtask: building the trixie root filesystem with CRIU at {} (about 30 s)",
        path.display()
    );
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={}", migrate_tests::ROOTFS_PACKAGES),
            "trixie",
        ])
        .arg(&partial))
    .context("debootstrap (apt-get install debootstrap; needs root)")?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// Builds kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubelet, kubectl and etcd from the Go module recipe in `tests/k8s/go.mod` (upstream
/// packages only, through the Go module proxy) into `.cache/k8s/bin`, once. A cold build takes
/// about six minutes on two cores.
pub(crate) fn k8s() -> Result<PathBuf> {
    let bin = migrate_tests::k8s_bin_dir();
    let version = migrate_tests::KUBERNETES_VERSION;
    let parts = [
        ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
        ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
        ("k8s.io/kubernetes/cmd/kubelet", "kubelet"),
        (
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-controller-manager",
        ),
        ("k8s.io/kubernetes/cmd/kube-scheduler", "kube-scheduler"),
        ("k8s.io/kubernetes/cmd/kube-proxy", "kube-proxy"),
        ("go.etcd.io/etcd/server/v3", "etcd"),
    ];
    if parts.iter().all(|(_, name)| bin.join(name).exists()) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&bin)?;
    eprintln!(
        "xtask: building kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubelet and kubectl {version} and etcd from Go modules into {} (minutes)",
        bin.display()
    );
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={version} -X k8s.io/component-base/version.gitMajor=1 \
         -X k8s.io/component-base/version.gitMinor={minor} -X k8s.io/component-base/version.gitTreeState=clean",
        minor = version.split('.').nth(1).unwrap_or("0")
    );
    let recipe = workspace_root().join("tests/k8s");
    for (package, name) in parts.iter().filter(|(_, name)| !bin.join(name).exists()) {
        let partial = bin.join(format!(".{name}.partial"));
        run(Command::new("go")
            .current_dir(&recipe)
            .env("GOFLAGS", "-mod=mod")
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(&partial)
            .arg(package))
        .with_context(|| format!("building {name} with Go (is Go installed?)"))?;
        std::fs::rename(&partial, bin.join(name))?;
    }
    Ok(bin)
}

/// Runs `cargo test --workspace` against the static launcher, echoing its output, and ends
/// with one total line over all test binaries (`N passed, N failed, N skipped`), where
/// skipped counts ignored tests and tests that printed a loud `SKIPPED` line.
fn test(extra: &[String]) -> Result<()> {
    let launcher = static_launcher()?;
    k8s()?;
    if is_root() {
        rootfs()?;
        images::build()?;
    } else {
        eprintln!("xtask: not root: the CRIU and namespace tests will be SKIPPED");
    }
    // The cross-binary tests run the workspace's binaries (kubectl-migrate, node-sandbox), the
    // plugin with its test-only fault hook (as `cargo test` builds it for the test crate).
    run(cargo().args([
        "build",
        "--workspace",
        "--bins",
        "--features",
        TEST_FEATURES,
    ]))?;
    let mut child = cargo()
        .args(["test", "--workspace", "--features", TEST_FEATURES])
        .args(extra)
        .env("RESTORE_LAUNCHER_STATIC", &launcher)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let stderr = child.stderr.take().context("cargo test stderr")?;
    let skipped_loudly = std::thread::spawn(move || {
        let mut skipped = 0;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            skipped += usize::from(line.starts_with("SKIPPED "));
        }
        skipped
    });
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        totals.add_result_line(&line);
    }
    let status = child.wait()?;
    let skipped_loudly = skipped_loudly.join().unwrap_or(0);
    println!(
        "\ntotal: {} passed, {} failed, {} skipped",
        totals.passed.saturating_sub(skipped_loudly),
        totals.failed,
        totals.ignored + skipped_loudly
    );
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    // Under CI everything a test needs is installed: a test that did not run is a failure.
    if std::env::var_os("CI").is_some() && totals.ignored + skipped_loudly > 0 {
        bail!(
            "{} test(s) were ignored or skipped under CI, which must run every test",
            totals.ignored + skipped_loudly
        );
    }
    Ok(())
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
#[derive(Debug, Default)]
struct Totals {
    passed: usize,
    failed: usize,
    ignored: usize,
}

impl Totals {
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<usize>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}
