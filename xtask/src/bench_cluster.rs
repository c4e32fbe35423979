//! `cargo xtask bench --cluster [SIZES_MIB]` (a command, not a test): the counter holding 64,
//! 512 and 2048 MiB of random (incompressible) ballast, ticking every 20 ms, moved node-a →
//! node-b on the real local cluster by the release plugin, each way in one run:
//!
//! - `relay`: through the plugin and the API server's exec streams;
//! - `direct`: pod to pod over mutually authenticated TLS;
//! - `direct+lazy`: the same with post-copy (`--lazy`): the target resumes before the app's
//!   memory arrived (its source pod holds SYS_ADMIN, and the benchmark raises the shared
//!   kernel's `fs.pipe-max-size` to 4 MiB for it, as a node set up for post-copy has it);
//! - and the raw CRIU floor of the same size (dump, copy, restore in two sandboxed nodes, with
//!   the launcher's CRIU options; see `bench.rs`), measured in the same run.
//!
//! For each: the downtime the plugin reports (freeze → thaw, the launchers' CLOCK_REALTIME
//! stamps), the app-visible gap between the source's last log line and the target's first (the
//! CRI log's own time stamps, `kubectl logs --timestamps`), the plugin's whole run (the
//! machine's monotonic clock), MB/s of archive while it streams (the checkpoint's `write`
//! phase) and over the whole checkpoint + transfer + restore phase, archive bytes, and peak RSS
//! of the plugin and of each launcher job (checkpoint, restore).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use migrate_tests::cluster::Cluster;

use crate::{build_sandbox, images, is_root, k8s, rootfs, static_launcher};

/// One move on the cluster.
struct Move {
    transfer: &'static str,
    downtime_ms: u64,
    log_gap_ms: u64,
    total: Duration,
    phase_ms: u64,
    /// The checkpoint's `write` phase: from the archive's first byte to its last, streaming.
    stream_ms: u64,
    /// Where the time went: the launchers' phases.
    phases: String,
    archive_bytes: u64,
    plugin_rss_kib: u64,
    checkpoint_job_kib: u64,
    restore_job_kib: u64,
}

const SIZES: [u64; 3] = [64, 512, 2048];
const WAIT: Duration = Duration::from_secs(300);

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the cluster benchmark runs containerd and kubelets: run it as root");
    }
    let sizes: Vec<u64> = match args.first() {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse().context("sizes are MiB, comma separated"))
            .collect::<Result<_>>()?,
        None => SIZES.to_vec(),
    };
    k8s()?;
    images::build()?;
    crate::build_forwarder()?;
    let plugin = migrate_tests::release_plugin()?;
    migrate_tests::use_launcher(&static_launcher()?);
    rootfs()?;
    build_sandbox()?;
    let dir = std::env::temp_dir().join(format!("bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cluster = Cluster::start(&dir, 2)?;
    println!(
        "cluster benchmark: the counter with random ballast, node-a → node-b, release plugin {}",
        plugin.display()
    );
    println!(
        "downtime: freeze → thaw by the launchers' CLOCK_REALTIME stamps; log gap: the source's last \
         line → the target's first, by the CRI log's time stamps; total: the plugin's run, monotonic; \
         stream: MB/s of archive while it flows (the checkpoint's write phase); phase: MB/s over the \
         whole checkpoint+transfer+restore phase (dump and restore included)"
    );
    println!(
        "{:>6}  {:<18} {:>10} {:>10} {:>9} {:>8} {:>8} {:>10} {:>11} {:>11} {:>11} {:>8}",
        "MiB",
        "method",
        "downtime",
        "log gap",
        "total",
        "stream",
        "phase",
        "archive",
        "plugin RSS",
        "ckpt job",
        "rest. job",
        "vs raw"
    );
    let mut figures = Vec::new();
    for size in sizes {
        let raw = crate::bench::raw_criu_floor(size)?;
        let raw_ms = raw.as_millis() as u64;
        println!(
            "{:>6}  {:<18} {:>8}ms {:>10} {:>9} {:>8} {:>8} {:>10} {:>11} {:>11} {:>11} {:>7.2}x",
            size, "raw criu (floor)", raw_ms, "", "", "", "", "", "", "", "", 1.0
        );
        let mut moves = Vec::new();
        for transfer in ["relay", "direct", LAZY] {
            let moved = move_once(&cluster, &plugin, size, transfer)?;
            println!(
                "{:>6}  {:<18} {:>8}ms {:>8}ms {:>8.1}s {:>8} {:>8} {:>8.1}Mi {:>9}Mi {:>9}Mi {:>9}Mi {:>7.2}x",
                size,
                moved.transfer,
                moved.downtime_ms,
                moved.log_gap_ms,
                moved.total.as_secs_f64(),
                rate(moved.archive_bytes, moved.stream_ms),
                rate(moved.archive_bytes, moved.phase_ms),
                moved.archive_bytes as f64 / 1048576.0,
                moved.plugin_rss_kib / 1024,
                moved.checkpoint_job_kib / 1024,
                moved.restore_job_kib / 1024,
                moved.downtime_ms as f64 / raw_ms.max(1) as f64
            );
            println!("{:>8}{}", "", moved.phases);
            moves.push(moved);
        }
        figures.push((size, raw_ms, moves));
    }
    println!("targets (ratios of figures from this run):");
    for (size, raw_ms, moves) in &figures {
        let by = |t: &str| moves.iter().find(|m| m.transfer == t);
        if let (Some(relay), Some(direct)) = (by("relay"), by("direct")) {
            println!(
                "  {size:>5} MiB: direct ÷ relay MB/s = {:.1} streaming, {:.1} over the phase (target ≥ 5 at 512 MiB); \
                 direct downtime ÷ raw CRIU floor = {:.2} (target ≤ 1.3 at 512 MiB and 2 GiB)",
                mb_per_s(direct.archive_bytes, direct.stream_ms)
                    / mb_per_s(relay.archive_bytes, relay.stream_ms).max(0.001),
                mb_per_s(direct.archive_bytes, direct.phase_ms)
                    / mb_per_s(relay.archive_bytes, relay.phase_ms).max(0.001),
                direct.downtime_ms as f64 / (*raw_ms).max(1) as f64
            );
        }
    }
    let lazy = |size: u64| {
        figures
            .iter()
            .find(|(s, _, _)| *s == size)
            .and_then(|(_, _, moves)| {
                moves
                    .iter()
                    .find(|m| m.transfer == LAZY)
                    .map(|m| m.downtime_ms)
            })
    };
    if let (Some(small), Some(large)) = (lazy(64), lazy(2048)) {
        println!(
            "  post-copy: downtime at 2 GiB {large} ms (target ≤ 1000), ÷ its 64 MiB figure = {:.2} (target ≤ 1.5)",
            large as f64 / small.max(1) as f64
        );
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// MB/s for the table; "-" where the phase was not timed (a post-copy's checkpoint reports
/// its timings only once every page was served, after the plugin's report).
fn rate(bytes: u64, ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        format!("{:.0}", mb_per_s(bytes, ms))
    }
}

fn mb_per_s(bytes: u64, ms: u64) -> f64 {
    bytes as f64 / 1e6 / (ms.max(1) as f64 / 1000.0)
}

/// The post-copy way: the direct transfer with `--lazy`.
const LAZY: &str = "direct+lazy";

/// The counter pod `name` on node-a with `size` MiB of ballast, ticking every 20 ms; with
/// `lazy`, able to serve post-copy (SYS_ADMIN: a lazy dump holds all of the app's memory in
/// pipes, beyond the kernel's per-user pipe limit).
fn counter_pod(name: &str, size: u64, lazy: bool) -> Result<String> {
    let yaml = std::fs::read_to_string(
        migrate_tests::workspace().join("images/examples/counter/pod.yaml"),
    )?;
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    pod["metadata"]["name"] = name.into();
    pod["metadata"]["labels"]["app"] = name.into();
    pod["spec"]["nodeName"] = "node-a".into();
    let env: serde_yaml::Value = serde_yaml::from_str(&format!(
        "[{{name: COUNTER_INTERVAL, value: '0.02'}}, {{name: COUNTER_BALLAST_MB, value: '{size}'}}]"
    ))?;
    pod["spec"]["containers"][0]["env"] = env;
    if lazy {
        pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .as_sequence_mut()
            .context("the counter's capabilities")?
            .push("SYS_ADMIN".into());
    }
    Ok(serde_yaml::to_string(&pod)?)
}

fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        ensure!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Moves a fresh counter of `size` MiB node-a → node-b with `--transfer transfer` (or
/// [`LAZY`]).
fn move_once(cluster: &Cluster, plugin: &Path, size: u64, transfer: &'static str) -> Result<Move> {
    let lazy = transfer == LAZY;
    let route = if lazy { "direct" } else { transfer };
    let name = format!(
        "bench-{}-{size}",
        route.to_owned() + if lazy { "-lazy" } else { "" }
    );
    let target = format!("{name}-m1");
    // CRIU's lazy dump asks for 4 MiB pipes: the node must allow them (put back after).
    let _pipes = lazy.then(|| PipeMaxSize::raise(4 << 20)).transpose()?;
    cluster.apply(&counter_pod(&name, size, lazy)?)?;
    cluster.wait_running(&name, WAIT)?;
    let checksum = |log: &str| {
        log.lines()
            .rev()
            .find_map(|l| l.split("ballast=").nth(1))
            .map(str::to_string)
    };
    let before = wait_until("the ballast in memory", || {
        checksum(&cluster.kubectl_ok(&["logs", "--tail", "1", &name]).ok()?)
    })?;
    // The source's log, followed until its container ends (the pod is deleted after the move).
    let mut follow = cluster
        .kubectl(&["logs", "--follow", "--timestamps", "--tail", "20", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let source_log = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&source_log);
    let stdout = follow.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(mut text) = sink.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    let mut args = vec![
        name.as_str(),
        "--to",
        "node-b",
        "--transfer",
        route,
        "--timeout",
        "15m",
        "-o",
        "json",
    ];
    if lazy {
        args.push("--lazy");
    }
    let (report, total, plugin_rss_kib) = run_plugin(cluster, plugin, &args)?;
    let report: serde_json::Value = serde_json::from_str(&report)
        .with_context(|| format!("the plugin's report is not JSON: {report}"))?;
    cluster.wait_running(&target, WAIT)?;
    let target_log = wait_until("the target's first lines", || {
        let log = cluster
            .kubectl_ok(&["logs", "--timestamps", &target])
            .ok()?;
        (log.lines().filter(|l| l.contains("events=")).count() >= 3).then_some(log)
    })?;
    let after = checksum(&target_log);
    ensure!(
        after.as_deref() == Some(before.as_str()),
        "the ballast changed across the move: {before} → {after:?}"
    );
    let start = Instant::now();
    while follow.try_wait()?.is_none() && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = reader.join();
    let source_log = source_log.lock().map(|t| t.clone()).unwrap_or_default();
    let last = migrate_tests::count_stamp_ms(&source_log, true)
        .context("no time-stamped count from the source")?;
    let first = migrate_tests::count_stamp_ms(&target_log, false)
        .context("no time-stamped count from the target")?;
    let container = &report["containers"]["counter"];
    ensure!(
        container["route"] == route,
        "asked for {route}, the archive went {}",
        container["route"]
    );
    let phase_ms = report["phases"]
        .as_array()
        .and_then(|phases| {
            phases.iter().find_map(|p| {
                (p[0] == "checkpoint+transfer+restore")
                    .then(|| p[1].as_u64())
                    .flatten()
            })
        })
        .unwrap_or_default();
    let kib = |side: &str, what: &str| container[side]["peak_rss_kib"][what].as_u64().unwrap_or(0);
    cluster.kubectl_ok(&["delete", "pod", &target, "--wait=true"])?;
    Ok(Move {
        transfer,
        downtime_ms: report["downtime_ms"].as_u64().unwrap_or_default(),
        log_gap_ms: first.saturating_sub(last),
        total,
        phase_ms,
        stream_ms: container["checkpoint"]["timings_ms"]["write"]
            .as_u64()
            .unwrap_or_default(),
        phases: format!(
            "checkpoint {} / restore {} (ms){}",
            container["checkpoint"]["timings_ms"],
            container["restore"]["timings_ms"],
            post_copy_line(&report)
        ),
        archive_bytes: container["checkpoint"]["archive_bytes"]
            .as_u64()
            .unwrap_or(0),
        plugin_rss_kib,
        checkpoint_job_kib: kib("checkpoint", "job").max(kib("checkpoint", "criu")),
        restore_job_kib: kib("restore", "job").max(kib("restore", "criu")),
    })
}

/// For a post-copy move: whether every page arrived, and how long before the source's
/// deletion was asked the last one did (the target node's clock, then the plugin's).
fn post_copy_line(report: &serde_json::Value) -> String {
    let Some(done) = report["post_copy"].as_array().and_then(|all| all.first()) else {
        return String::new();
    };
    let gap = match (
        done["arrived"]["ended_at_ms"].as_u64(),
        report["source_deleted_at_ms"].as_u64(),
    ) {
        (Some(arrived), Some(deleted)) => format!("{} ms", deleted as i64 - arrived as i64),
        _ => "?".into(),
    };
    format!(
        "; post-copy: {}, the last page arrived {gap} before the source's deletion was asked",
        done["arrived"]["state"].as_str().unwrap_or("?")
    )
}

/// `fs.pipe-max-size`, raised to at least a size for as long as this lives.
struct PipeMaxSize(Option<String>);

impl PipeMaxSize {
    const PATH: &str = "/proc/sys/fs/pipe-max-size";

    fn raise(bytes: u64) -> Result<Self> {
        let was = std::fs::read_to_string(Self::PATH)?;
        if was.trim().parse::<u64>().unwrap_or(0) >= bytes {
            return Ok(Self(None));
        }
        std::fs::write(Self::PATH, bytes.to_string())
            .with_context(|| format!("raising {} to {bytes}", Self::PATH))?;
        Ok(Self(Some(was)))
    }
}

impl Drop for PipeMaxSize {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = std::fs::write(Self::PATH, was.trim());
        }
    }
}

/// Runs the plugin, polling its peak RSS (VmHWM); its stdout, run time and peak RSS in KiB.
fn run_plugin(cluster: &Cluster, plugin: &Path, args: &[&str]) -> Result<(String, Duration, u64)> {
    let run = migrate_tests::run_measuring_rss(
        Command::new(plugin)
            .args(args)
            .env("KUBECONFIG", &cluster.kubeconfig),
    )?;
    ensure!(
        run.status.success(),
        "the plugin failed ({}):\n{}",
        run.status,
        run.stderr
    );
    Ok((run.stdout, run.elapsed, run.peak_rss_kib))
}
