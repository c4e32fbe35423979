//! `cargo xtask bench [SIZES_MIB]` (not a test): for apps holding 64, 256 and 1024 MiB of
//! random data, measures checkpoint-to-running-again three ways, in one run on this machine:
//!
//! - raw CRIU, the floor: `criu dump` in node A, copy the image directory, `criu restore` in
//!   node B, with the same options the launcher uses;
//! - launcher via archive file: `checkpoint --output FILE`, copy the file, `receive --input FILE`;
//! - launcher streamed: `checkpoint --output - | receive --input -`.
//!
//! Prints downtime (app frozen → app running again), MiB/s of app memory moved, archive size,
//! peak RSS of the tooling (criu and the launcher's job) and the ratio launcher/raw.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use migrate_tests::{Node, NodeOptions};

use crate::{build_sandbox, is_root, rootfs, static_launcher};

/// One measured way of moving the app.
struct Row {
    method: &'static str,
    downtime: Duration,
    archive_bytes: u64,
    /// Peak RSS in MiB of criu and of the launcher's jobs (None for raw).
    criu_rss_mib: Option<f64>,
    job_rss_mib: Option<f64>,
    /// Where the time went (per-phase milliseconds from the launcher's reports).
    phases: String,
}

const CRIU_OPTIONS: [&str; 4] = [
    "--manage-cgroups=ignore",
    "--tcp-close",
    "--ext-unix-sk",
    "--file-locks",
];

pub fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the benchmark runs CRIU in namespaces: run it as root");
    }
    let sizes: Vec<u64> = match args.first() {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse().context("sizes are MiB, comma separated"))
            .collect::<Result<_>>()?,
        None => vec![64, 256, 1024],
    };
    migrate_tests::use_launcher(&static_launcher()?);
    rootfs()?;
    build_sandbox()?;
    println!(
        "benchmark: app memory is random data (incompressible); images and archives on the host disk (node /tmp)"
    );
    println!(
        "{:>6}  {:<20} {:>10} {:>10} {:>12} {:>10} {:>10} {:>8}",
        "MiB", "method", "downtime", "MiB/s", "archive", "criu RSS", "job RSS", "vs raw"
    );
    for size in sizes {
        let raw = raw_criu(size)?;
        let file = launcher_file(size)?;
        let stream = launcher_stream(size)?;
        for row in [&raw, &file, &stream] {
            let ratio = row.downtime.as_secs_f64() / raw.downtime.as_secs_f64();
            println!(
                "{:>6}  {:<20} {:>9.3}s {:>10.0} {:>10.1}Mi {:>10} {:>10} {:>7.2}x",
                size,
                row.method,
                row.downtime.as_secs_f64(),
                size as f64 / row.downtime.as_secs_f64(),
                row.archive_bytes as f64 / 1048576.0,
                row.criu_rss_mib
                    .map_or("n/a".into(), |m| format!("{m:.0}Mi")),
                row.job_rss_mib
                    .map_or("n/a".into(), |m| format!("{m:.0}Mi")),
                ratio
            );
            if !row.phases.is_empty() {
                println!("{:>8}{}", "", row.phases);
            }
        }
    }
    Ok(())
}

fn memhog(name: &str, size: u64, wait: bool) -> Result<Node> {
    let mut launcher_args = vec!["--work-dir".to_string(), "/tmp/work".into()];
    if wait {
        launcher_args.push("--wait-for-checkpoint".into());
    }
    launcher_args.extend([
        "--".into(),
        "python3".into(),
        "/opt/apps/memhog.py".into(),
        size.to_string(),
    ]);
    let node = Node::prepare(name)?.start(&NodeOptions {
        name: name.into(),
        launcher_args,
        env: vec![],
        keep_caps: None,
    })?;
    if !wait {
        node.wait_for(
            "the app to fill its memory",
            Duration::from_secs(120),
            |n| n.stdout().contains("ready").then_some(()),
        )?;
    }
    Ok(node)
}

/// Runs `cmd` under GNU time when present, returning (wall time, peak RSS MiB of the tree).
fn timed(cmd: &mut Command) -> Result<(Duration, Option<f64>, std::process::Output)> {
    let rss_file = std::env::temp_dir().join(format!("bench-rss-{}", std::process::id()));
    let has_time = Path::new("/usr/bin/time").exists();
    let mut wrapped = if has_time {
        let mut w = Command::new("/usr/bin/time");
        w.arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&rss_file)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        w
    } else {
        let mut w = Command::new(cmd.get_program());
        w.args(cmd.get_args());
        w
    };
    wrapped
        .env_clear()
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))));
    let start = Instant::now();
    let output = wrapped.output()?;
    let elapsed = start.elapsed();
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.trim().lines().last()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0);
    let _ = std::fs::remove_file(&rss_file);
    Ok((elapsed, rss, output))
}

fn raw_criu(size: u64) -> Result<Row> {
    raw_criu_between(
        &memhog("raw-a", size, false)?,
        &memhog("raw-b", size, true)?,
    )
}

/// The raw CRIU floor for the cluster benchmark: the counter app itself, with `size` MiB of
/// ballast and a 20 ms tick as the cluster's pods run it, dumped in one sandboxed node, its
/// images copied, restored in another. Dump + copy + restore, by this machine's monotonic clock.
pub(crate) fn raw_criu_floor(size: u64) -> Result<Duration> {
    let a = counter_node("floor-a", size, false)?;
    let b = counter_node("floor-b", size, true)?;
    Ok(raw_criu_between(&a, &b)?.downtime)
}

/// A sandboxed node running the counter with `size` MiB of ballast (or waiting for one).
fn counter_node(name: &str, size: u64, wait: bool) -> Result<Node> {
    let mut launcher_args = vec!["--work-dir".to_string(), "/tmp/work".into()];
    if wait {
        launcher_args.push("--wait-for-checkpoint".into());
    }
    launcher_args.extend(["--".into(), "python3".into(), "/opt/apps/counter.py".into()]);
    let node = Node::prepare(name)?.start(&NodeOptions {
        name: name.into(),
        launcher_args,
        env: vec![
            "COUNTER_INTERVAL=0.02".into(),
            format!("COUNTER_BALLAST_MB={size}"),
        ],
        keep_caps: None,
    })?;
    if !wait {
        node.wait_for(
            "the counter to fill its ballast",
            Duration::from_secs(300),
            |n| n.stdout().contains("ballast=").then_some(()),
        )?;
    }
    Ok(node)
}

/// `criu dump` of the app in `a`, its images copied to `b`, `criu restore` there.
fn raw_criu_between(a: &Node, b: &Node) -> Result<Row> {
    let mut dump = a.exec(&[
        "criu",
        "dump",
        "-t",
        "1000",
        "-D",
        "/tmp/raw",
        "-o",
        "/tmp/dump.log",
        "--leave-stopped",
    ]);
    dump.args(CRIU_OPTIONS);
    std::fs::create_dir_all(a.path("/tmp/raw"))?;
    let (dump_time, dump_rss, out) = timed(&mut dump)?;
    ensure!(
        out.status.success(),
        "raw criu dump failed: {}",
        std::fs::read_to_string(a.path("/tmp/dump.log")).unwrap_or_default()
    );
    let copy_start = Instant::now();
    ensure!(
        Command::new("cp")
            .arg("-r")
            .arg(a.path("/tmp/raw"))
            .arg(b.path("/tmp/raw"))
            .status()?
            .success()
    );
    let copy_time = copy_start.elapsed();
    let mut restore = b.exec(&[
        "criu",
        "restore",
        "-D",
        "/tmp/raw",
        "-o",
        "/tmp/restore.log",
        "--restore-detached",
    ]);
    restore.args(CRIU_OPTIONS);
    let (restore_time, restore_rss, out) = timed(&mut restore)?;
    ensure!(
        out.status.success(),
        "raw criu restore failed: {}",
        std::fs::read_to_string(b.path("/tmp/restore.log")).unwrap_or_default()
    );
    let bytes = dir_size(&a.path("/tmp/raw"))?;
    Ok(Row {
        method: "raw criu (floor)",
        downtime: dump_time + copy_time + restore_time,
        archive_bytes: bytes,
        criu_rss_mib: dump_rss.into_iter().chain(restore_rss).reduce(f64::max),
        job_rss_mib: None,
        phases: format!(
            "dump {} ms, copy {} ms, restore {} ms",
            dump_time.as_millis(),
            copy_time.as_millis(),
            restore_time.as_millis()
        ),
    })
}

fn launcher_file(size: u64) -> Result<Row> {
    let a = memhog("file-a", size, false)?;
    let b = memhog("file-b", size, true)?;
    let checkpoint = a
        .launcher(&["checkpoint", "--output", "/tmp/ck.tar.zst"])
        .output()?;
    ensure!(
        checkpoint.status.success(),
        "checkpoint failed: {}",
        String::from_utf8_lossy(&checkpoint.stdout)
    );
    ensure!(
        Command::new("cp")
            .arg(a.path("/tmp/ck.tar.zst"))
            .arg(b.path("/tmp/ck.tar.zst"))
            .status()?
            .success()
    );
    let receive = b
        .launcher(&["receive", "--input", "/tmp/ck.tar.zst"])
        .output()?;
    ensure!(
        receive.status.success(),
        "receive failed: {}",
        String::from_utf8_lossy(&receive.stdout)
    );
    row(
        "launcher, file",
        &serde_json::from_slice(&checkpoint.stdout)?,
        &serde_json::from_slice(&receive.stdout)?,
    )
}

fn launcher_stream(size: u64) -> Result<Row> {
    let a = memhog("stream-a", size, false)?;
    let b = memhog("stream-b", size, true)?;
    let (checkpoint, restore) = a.stream_to(&b)?;
    row("launcher, streamed", &checkpoint, &restore)
}

fn row(
    method: &'static str,
    checkpoint: &serde_json::Value,
    restore: &serde_json::Value,
) -> Result<Row> {
    let peak = |key: &str| -> Option<f64> {
        [checkpoint, restore]
            .iter()
            .filter_map(|r| r["peak_rss_kib"][key].as_u64())
            .max()
            .map(|kib| kib as f64 / 1024.0)
    };
    Ok(Row {
        method,
        downtime: Duration::from_millis(
            restore["downtime_ms"]
                .as_u64()
                .context("no downtime in the restore report")?,
        ),
        archive_bytes: checkpoint["archive_bytes"].as_u64().unwrap_or(0),
        criu_rss_mib: peak("criu"),
        job_rss_mib: peak("job"),
        phases: format!(
            "checkpoint {} / restore {}",
            checkpoint["timings_ms"], restore["timings_ms"]
        ),
    })
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}
