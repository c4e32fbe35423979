//! Self-checkpoint and self-restore with real CRIU 4.x: the launcher runs as PID 1 of a
//! sandboxed node (fresh namespaces, pivot_root into its own copy of a trixie root
//! filesystem), dumps the app from inside, and another node's launcher restores it.
//!
//! Every test asserts what a user would check: the counter continued (never reset), the
//! output kept flowing through the new launcher, the exit code, the error message.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use migrate_tests::{
    LEAST_CAPS, Node, NodeOptions, counter_values, criu_tests_can_run, expected_revenue, sysv_ticks,
};
use nix::sys::signal::Signal;
use sha2::{Digest as _, Sha256};

const LIMIT: Duration = Duration::from_secs(60);
const COUNTER: [&str; 3] = ["--", "python3", "/opt/apps/counter.py"];

fn options(name: &str, launcher_args: &[&str]) -> NodeOptions {
    NodeOptions {
        name: name.into(),
        launcher_args: launcher_args.iter().map(|s| s.to_string()).collect(),
        env: vec!["COUNTER_INTERVAL=0.2".into()],
        keep_caps: None,
    }
}

fn args<'a>(before: &[&'a str], after: &[&'a str]) -> Vec<&'a str> {
    before.iter().chain(after).copied().collect()
}

/// Starts a node running the counter and waits for `lines` ticks.
fn counter_node(name: &str, caps: Option<&str>, lines: usize) -> Result<Node> {
    let mut opts = options(name, &COUNTER);
    opts.keep_caps = caps.map(str::to_string);
    let node = Node::prepare(name)?.start(&opts)?;
    node.wait_for(&format!("{lines} counter lines"), LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= lines).then_some(())
    })?;
    Ok(node)
}

/// Runs `checkpoint` with `extra` arguments; returns its JSON report.
fn checkpoint(node: &Node, extra: &[&str]) -> Result<serde_json::Value> {
    let output = node.launcher(&args(&["checkpoint"], extra)).output()?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "checkpoint answer: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    ensure!(
        output.status.success() && report["ok"] == true,
        "checkpoint failed: {report}\n{}",
        node.stderr()
    );
    Ok(report)
}

/// The appender app with /data included: it appends numbered lines to /data/log.
const APPENDER: [&str; 4] = ["--include", "/data", "--", "/opt/apps/appender.sh"];

/// Starts node `name` running the appender and waits for `lines` lines of its output.
fn appender_node(name: &str, lines: usize) -> Result<Node> {
    let node = Node::prepare(name)?.start(&options(name, &APPENDER))?;
    node.wait_for(&format!("{lines} appended lines"), LIMIT, |n| {
        (n.stdout().lines().count() >= lines).then_some(())
    })?;
    Ok(node)
}

/// Copies archive `archive` (a path inside the nodes) from `a` to a new node-b started with
/// `--restore-from` it and `launcher_args`, and waits until B has restored the app.
fn restore_on_b(a: &Node, archive: &str, launcher_args: &[&str]) -> Result<Node> {
    let b = Node::prepare("node-b")?;
    std::fs::copy(a.path(archive), b.path(archive))?;
    let b = b.start(&options(
        "node-b",
        &args(&["--restore-from", archive], launcher_args),
    ))?;
    b.wait_for("B restored", LIMIT, |n| {
        n.status()
            .ok()
            .filter(|s| s["state"] == "restored")
            .map(drop)
    })?;
    Ok(b)
}

fn sha256(path: &std::path::Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

/// The counter on `b` starts exactly one tick after the last one `a` printed, with the right
/// revenue, and keeps increasing.
fn assert_counter_continues(a_last: (u64, u64), b: &Node) -> Result<()> {
    let values = b.wait_for("3 counter lines after the restore", LIMIT, |n| {
        let v = counter_values(&n.stdout());
        (v.len() >= 3).then_some(v)
    })?;
    ensure!(
        values[0].0 == a_last.0 + 1,
        "B's first tick {:?} does not continue A's last {a_last:?}: {values:?}",
        values[0]
    );
    for window in values.windows(2) {
        ensure!(
            window[1].0 == window[0].0 + 1,
            "B's count does not increase by one: {values:?}"
        );
    }
    for (events, revenue) in &values {
        ensure!(
            *revenue == expected_revenue(*events),
            "revenue {revenue} wrong for {events} events: memory was not restored intact"
        );
    }
    Ok(())
}

#[test]
fn counter_continues_on_another_node_from_a_copied_archive_and_sigterm_stops_it() -> Result<()> {
    if !criu_tests_can_run(
        "counter_continues_on_another_node_from_a_copied_archive_and_sigterm_stops_it",
    ) {
        return Ok(());
    }
    let a = counter_node("node-a", None, 3)?;
    let report = checkpoint(&a, &["--output", "/tmp/counter.tar.zst"])?;
    let archive = a.path("/tmp/counter.tar.zst");
    let mode = std::fs::metadata(&archive)?.permissions().mode() & 0o777;
    ensure!(
        mode == 0o600,
        "archive mode is {mode:o}, not 600 (it holds the app's memory)"
    );
    let leftovers: Vec<_> = std::fs::read_dir(a.path("/tmp"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "temporary archive left behind: {leftovers:?}"
    );
    ensure!(report["archive_bytes"].as_u64() == Some(std::fs::metadata(&archive)?.len()));

    // Without --leave-running: A's app is frozen, its PID 1 alive and saying so.
    let a_values = counter_values(&a.stdout());
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        counter_values(&a.stdout()).len() == a_values.len(),
        "A kept printing after the checkpoint"
    );
    ensure!(a.status()?["state"] == "checkpointed");
    let a_last = *a_values.last().context("A printed nothing")?;

    let b = Node::prepare("node-b")?;
    std::fs::copy(&archive, b.path("/tmp/counter.tar.zst"))?;
    let before = sha256(&b.path("/tmp/counter.tar.zst"))?;
    let mut b = b.start(&options(
        "node-b",
        &args(&["--restore-from", "/tmp/counter.tar.zst"], &COUNTER),
    ))?;
    assert_counter_continues(a_last, &b)?;
    let status = b.status()?;
    ensure!(
        status["state"] == "restored" && status["app_pid"] == a.status()?["app_pid"],
        "{status}"
    );
    ensure!(
        sha256(&b.path("/tmp/counter.tar.zst"))? == before,
        "the archive was modified by the restore"
    );

    // SIGTERM reaches the restored app; its death by SIGTERM is the launcher's exit status.
    b.signal(Signal::SIGTERM)?;
    let code = b.wait_exit(LIMIT)?;
    ensure!(
        code == 143,
        "B's launcher exited {code}, not 143\n{}",
        b.stderr()
    );
    Ok(())
}

#[test]
fn streamed_checkpoint_restores_into_a_node_whose_low_pids_are_taken() -> Result<()> {
    if !criu_tests_can_run("streamed_checkpoint_restores_into_a_node_whose_low_pids_are_taken") {
        return Ok(());
    }
    let a = counter_node("node-a", None, 3)?;
    let b = Node::prepare("node-b")?.start(&options(
        "node-b",
        &args(&["--wait-for-checkpoint"], &COUNTER),
    ))?;
    ensure!(b.status()?["state"] == "waiting");

    // Occupy B's low PIDs the way exec sessions and sidecar helpers would.
    let mut squatters = Vec::new();
    for _ in 0..20 {
        squatters.push(b.exec(&["sleep", "600"]).stdin(Stdio::null()).spawn()?);
    }
    let in_use = b.wait_for("20 low PIDs in use", LIMIT, |n| {
        let out = n
            .exec(&["sh", "-c", "ls /proc | grep -E '^[0-9]+$'"])
            .output()
            .ok()?;
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let low = pids.iter().filter(|&&p| p < 100).count();
        (low >= 20).then_some(low)
    })?;

    let (summary, result) = a.stream_to(&b)?;
    ensure!(result["ok"] == true, "receive failed: {result}");
    ensure!(
        result["id"] == summary["id"],
        "restored {} but sent {}",
        result["id"],
        summary["id"]
    );
    ensure!(
        result["downtime_ms"].as_u64().is_some(),
        "no downtime measured: {result}"
    );

    let a_last = *counter_values(&a.stdout())
        .last()
        .context("A printed nothing")?;
    assert_counter_continues(a_last, &b)?;
    ensure!(b.status()?["state"] == "restored");
    eprintln!(
        "restored with {in_use} low PIDs taken; downtime {} ms",
        result["downtime_ms"]
    );
    for mut squatter in squatters {
        let _ = squatter.kill();
        let _ = squatter.wait();
    }
    Ok(())
}

#[test]
fn rollback_resumes_the_frozen_app_and_leave_running_never_stops_it() -> Result<()> {
    if !criu_tests_can_run("rollback_resumes_the_frozen_app_and_leave_running_never_stops_it") {
        return Ok(());
    }
    let a = counter_node("node-a", None, 3)?;

    // --leave-running: the app keeps printing; the report says how long it was frozen.
    let report = checkpoint(&a, &["--leave-running", "--output", "/tmp/live.tar.zst"])?;
    ensure!(
        report["left_running"] == true && report["frozen_ms"].as_u64().is_some(),
        "{report}"
    );
    let seen = counter_values(&a.stdout()).len();
    a.wait_for(
        "more ticks after a --leave-running checkpoint",
        LIMIT,
        |n| (counter_values(&n.stdout()).len() >= seen + 3).then_some(()),
    )?;
    ensure!(a.status()?["state"] == "running");

    // Without it: frozen, PID 1 alive, `checkpointed`; rollback resumes with the same memory.
    checkpoint(&a, &["--output", "/tmp/frozen.tar.zst"])?;
    let frozen = counter_values(&a.stdout());
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        counter_values(&a.stdout()).len() == frozen.len(),
        "A kept printing while checkpointed"
    );
    ensure!(a.status()?["state"] == "checkpointed" && a.launcher_pid().is_some());
    // A second checkpoint of a frozen app is refused with the reason.
    let again = a
        .launcher(&["checkpoint", "--output", "/tmp/again.tar.zst"])
        .output()?;
    ensure!(
        !again.status.success() && String::from_utf8_lossy(&again.stdout).contains("checkpointed")
    );

    let rollback = a.launcher(&["rollback"]).output()?;
    ensure!(
        rollback.status.success(),
        "rollback failed: {}",
        String::from_utf8_lossy(&rollback.stdout)
    );
    let last = *frozen.last().context("no ticks")?;
    let after = a.wait_for("ticks after the rollback", LIMIT, |n| {
        let v = counter_values(&n.stdout());
        (v.len() > frozen.len()).then(|| v[frozen.len()])
    })?;
    ensure!(
        after.0 == last.0 + 1 && after.1 == expected_revenue(after.0),
        "after rollback {after:?} does not continue {last:?}"
    );
    ensure!(a.status()?["state"] == "running");
    let refused = a.launcher(&["rollback"]).output()?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stdout).contains("nothing to roll back")
            && String::from_utf8_lossy(&refused.stdout)
                .contains(r#""refusal":"nothing-to-roll-back""#),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
    Ok(())
}

#[test]
fn included_directory_is_back_byte_identical_before_the_app_resumes() -> Result<()> {
    if !criu_tests_can_run("included_directory_is_back_byte_identical_before_the_app_resumes") {
        return Ok(());
    }
    let launcher_args = ["--include", "/data", "--", "/opt/apps/appender.sh"];
    let a = Node::prepare("node-a")?.start(&options("node-a", &launcher_args))?;
    let numbers =
        |text: &str| -> Vec<u64> { text.lines().filter_map(|l| l.trim().parse().ok()).collect() };
    a.wait_for("10 appended lines", LIMIT, |n| {
        (numbers(&n.stdout()).len() >= 10).then_some(())
    })?;
    std::fs::set_permissions(a.path("/data/log"), std::fs::Permissions::from_mode(0o640))?;
    let report = checkpoint(&a, &["--output", "/tmp/data.tar.zst"])?;
    ensure!(report["included_bytes"].as_u64() > Some(0), "{report}");
    let frozen_log = std::fs::read(a.path("/data/log"))?;
    let last = *numbers(&a.stdout()).last().context("no output")?;
    ensure!(
        frozen_log.ends_with(format!("line {last}\n").as_bytes()),
        "A's file and output disagree"
    );

    let b = Node::prepare("node-b")?;
    std::fs::copy(a.path("/tmp/data.tar.zst"), b.path("/tmp/data.tar.zst"))?;
    // B's /data has other contents: the restore must replace them, not merge.
    std::fs::create_dir_all(b.path("/data"))?;
    std::fs::write(b.path("/data/stale"), "from node b")?;
    let b = b.start(&options(
        "node-b",
        &args(&["--restore-from", "/tmp/data.tar.zst"], &launcher_args),
    ))?;
    let first = b.wait_for("B's first line", LIMIT, |n| {
        numbers(&n.stdout()).first().copied()
    })?;
    ensure!(
        first == last + 1,
        "B's loop starts at {first}, A stopped at {last}"
    );
    let log = b.wait_for("B's appended lines", LIMIT, |n| {
        let log = std::fs::read(n.path("/data/log")).ok()?;
        (log.len() > frozen_log.len() + 20).then_some(log)
    })?;
    ensure!(
        log.starts_with(&frozen_log),
        "B's /data/log does not start with A's bytes at the checkpoint"
    );
    let next = format!("line {}\n", last + 1);
    ensure!(
        log[frozen_log.len()..].starts_with(next.as_bytes()),
        "B's first append is not `{}`",
        next.trim()
    );
    ensure!(
        !b.path("/data/stale").exists(),
        "B's old /data contents survived the restore"
    );
    let mode = std::fs::metadata(b.path("/data/log"))?.permissions().mode() & 0o777;
    ensure!(mode == 0o640, "mode {mode:o} not carried over");
    Ok(())
}

/// Rebuilds an archive with its manifest edited by `edit` and extra raw tar entries appended.
fn repack(
    good: &[u8],
    edit: impl Fn(&mut serde_json::Value),
    extra: &[(&str, tar::EntryType, &[u8], Option<&str>)],
) -> Result<Vec<u8>> {
    let mut archive = tar::Archive::new(zstd::Decoder::new(good)?);
    let mut out = tar::Builder::new(Vec::new());
    for entry in archive.entries()? {
        let mut entry = entry?;
        let mut header = entry.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        if entry.path_bytes().as_ref() == b"manifest.json" {
            let mut manifest: serde_json::Value = serde_json::from_slice(&data)?;
            edit(&mut manifest);
            data = serde_json::to_vec(&manifest)?;
            header.set_size(data.len() as u64);
            header.set_cksum();
        }
        out.append(&header, data.as_slice())?;
    }
    for (name, kind, data, link) in extra {
        let mut header = tar::Header::new_gnu();
        // Raw name bytes: the tar crate refuses `..` and absolute paths through its setters.
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        out.append(&header, *data)?;
    }
    let tar = out.into_inner()?;
    let mut encoder = zstd::Encoder::new(Vec::new(), 1)?;
    encoder.write_all(&tar)?;
    Ok(encoder.finish()?)
}

fn entry(path: &str, kind: &str, size: usize, sha: &str, link: Option<&str>) -> serde_json::Value {
    let mut value =
        serde_json::json!({"path": path, "kind": kind, "size": size, "sha256": sha, "mode": 420});
    if let Some(link) = link {
        value["link"] = link.into();
    }
    value
}

/// Starts node B on `archive` with `--restore-from`, after `prepare` has altered its root;
/// expects PID 1 to refuse and exit non-zero; returns B (exited) for further checks.
fn refused_restore(
    archive: &[u8],
    launcher_args: &[&str],
    prepare: impl FnOnce(&Node) -> Result<()>,
) -> Result<Node> {
    let b = Node::prepare("node-b")?;
    std::fs::write(b.path("/tmp/archive.tar.zst"), archive)?;
    std::fs::create_dir_all(b.path("/data"))?;
    std::fs::write(b.path("/data/marker"), "untouched")?;
    prepare(&b)?;
    let mut b = b.start(&options(
        "node-b",
        &args(&["--restore-from", "/tmp/archive.tar.zst"], launcher_args),
    ))?;
    let code = b.wait_exit(LIMIT)?;
    ensure!(
        code != 0,
        "the launcher exited 0 on an archive it should refuse\n{}",
        b.stderr()
    );
    ensure!(b.stdout().is_empty(), "an app ran: {}", b.stdout());
    Ok(b)
}

#[test]
fn damaged_or_hostile_archives_are_refused_and_nothing_is_touched() -> Result<()> {
    if !criu_tests_can_run("damaged_or_hostile_archives_are_refused_and_nothing_is_touched") {
        return Ok(());
    }
    let launcher_args = APPENDER;
    let a = appender_node("node-a", 5)?;
    checkpoint(&a, &["--leave-running", "--output", "/tmp/good.tar.zst"])?;
    let good = std::fs::read(a.path("/tmp/good.tar.zst"))?;
    drop(a);

    let evil = sha2::Sha256::digest(b"evil");
    let evil = hex::encode(evil);
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("flipped byte", flipped, "damaged"),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "dot-dot entry",
            repack(
                &good,
                |m| {
                    m["entries"].as_array_mut().into_iter().for_each(|e| {
                        e.push(entry("include/0/../../../etc/evil", "file", 4, &evil, None))
                    })
                },
                &[(
                    "include/0/../../../etc/evil",
                    tar::EntryType::Regular,
                    b"evil",
                    None,
                )],
            )?,
            "contains `..`",
        ),
        (
            "absolute entry",
            repack(
                &good,
                |m| {
                    m["entries"]
                        .as_array_mut()
                        .into_iter()
                        .for_each(|e| e.push(entry("/etc/evil", "file", 4, &evil, None)))
                },
                &[("/etc/evil", tar::EntryType::Regular, b"evil", None)],
            )?,
            "is absolute",
        ),
        (
            "symlink escape",
            repack(
                &good,
                |m| {
                    m["entries"].as_array_mut().into_iter().for_each(|e| {
                        e.push(entry(
                            "include/0/evil",
                            "symlink",
                            0,
                            "",
                            Some("../../../../etc"),
                        ))
                    })
                },
                &[(
                    "include/0/evil",
                    tar::EntryType::Symlink,
                    b"",
                    Some("../../../../etc"),
                )],
            )?,
            "points outside its included path",
        ),
        (
            "other architecture",
            repack(&good, |m| m["arch"] = "aarch64".into(), &[])?,
            "taken on aarch64 but this machine is x86_64",
        ),
        (
            "unlisted entry",
            repack(
                &good,
                |_| {},
                &[("criu/extra.img", tar::EntryType::Regular, b"evil", None)],
            )?,
            "not listed in the manifest",
        ),
    ];
    for (what, bytes, expected) in cases {
        let b = refused_restore(&bytes, &launcher_args, |_| Ok(()))
            .with_context(|| what.to_string())?;
        let stderr = b.stderr();
        ensure!(
            stderr.contains(expected),
            "{what}: message does not name the cause (`{expected}`):\n{stderr}"
        );
        ensure!(stderr.contains("archive refused"), "{what}: {stderr}");
        ensure!(
            std::fs::read(b.path("/tmp/archive.tar.zst"))? == bytes,
            "{what}: the archive was modified"
        );
        let data: Vec<_> = std::fs::read_dir(b.path("/data"))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        ensure!(
            data == ["marker"] && std::fs::read_to_string(b.path("/data/marker"))? == "untouched",
            "{what}: /data was touched: {data:?}"
        );
        ensure!(!b.path("/etc/evil").exists(), "{what}: wrote outside");
    }

    // No criu in the image: refused before anything is read, naming the fix.
    let b = refused_restore(&good, &launcher_args, |b| {
        Ok(std::fs::remove_file(b.path("/usr/sbin/criu"))?)
    })?;
    let stderr = b.stderr();
    ensure!(
        stderr.contains("criu was not found") && stderr.contains("base image"),
        "{stderr}"
    );

    // criu itself failing: the node's shell is another binary than the one dumped.
    let b = refused_restore(&good, &launcher_args, |b| {
        std::fs::copy(b.path("/usr/bin/sleep"), b.path("/usr/bin/dash"))?;
        Ok(())
    })?;
    let stderr = b.stderr();
    ensure!(
        stderr.contains("criu restore failed") && stderr.contains("last-restore.log"),
        "{stderr}"
    );

    // --on-restore-failure=fresh: the app starts from zero, and stderr says so loudly.
    let b = Node::prepare("node-b")?;
    std::fs::write(b.path("/tmp/bad.tar.zst"), &good[..good.len() / 2])?;
    let fresh = args(
        &[
            "--restore-from",
            "/tmp/bad.tar.zst",
            "--on-restore-failure=fresh",
        ],
        &launcher_args,
    );
    let b = b.start(&options("node-b", &fresh))?;
    let first = b.wait_for("a fresh start", LIMIT, |n| {
        n.stdout().lines().next().map(str::to_string)
    })?;
    ensure!(
        first.trim() == "1",
        "the fresh app did not start from 1: {first}"
    );
    let stderr = b.stderr();
    ensure!(
        stderr.contains("RESTORE FAILED") && stderr.contains("FRESH"),
        "{stderr}"
    );
    ensure!(b.status()?["state"] == "running");

    // A waiting launcher refuses a bad stream, stays waiting, and takes a good one after.
    let b = Node::prepare("node-b")?;
    std::fs::write(b.path("/tmp/bad.tar.zst"), &good[..good.len() / 2])?;
    std::fs::write(b.path("/tmp/good.tar.zst"), &good)?;
    let b = b.start(&options(
        "node-b",
        &args(&["--wait-for-checkpoint"], &launcher_args),
    ))?;
    let bad = b
        .launcher(&["receive", "--input", "/tmp/bad.tar.zst"])
        .output()?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stdout).contains("truncated"),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    ensure!(b.status()?["state"] == "failed");
    let ok = b
        .launcher(&["receive", "--input", "/tmp/good.tar.zst"])
        .output()?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    ensure!(b.status()?["state"] == "restored");
    Ok(())
}

#[test]
fn least_privilege_dump_and_restore_work_with_only_the_needed_capabilities() -> Result<()> {
    if !criu_tests_can_run(
        "least_privilege_dump_and_restore_work_with_only_the_needed_capabilities",
    ) {
        return Ok(());
    }
    let a = counter_node("node-a", Some(LEAST_CAPS), 3)?;
    checkpoint(&a, &["--output", "/tmp/least.tar.zst"])?;
    let a_last = *counter_values(&a.stdout()).last().context("no ticks")?;
    let b = Node::prepare("node-b")?;
    std::fs::copy(a.path("/tmp/least.tar.zst"), b.path("/tmp/least.tar.zst"))?;
    let mut opts = options(
        "node-b",
        &args(&["--restore-from", "/tmp/least.tar.zst"], &COUNTER),
    );
    opts.keep_caps = Some(LEAST_CAPS.into());
    let b = b.start(&opts)?;
    assert_counter_continues(a_last, &b)?;

    // Each capability of the set is needed: without it, the error seen (recorded in docs/security.md).
    let without_checkpoint_restore = counter_node("node-c", Some("CAP_SETPCAP"), 2)?;
    let output = without_checkpoint_restore
        .launcher(&["checkpoint", "--output", "/tmp/x"])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success() && text.contains("CAP_CHECKPOINT_RESTORE"),
        "{text}"
    );
    ensure!(text.contains("the app keeps running"));

    let c = counter_node("node-c", Some(LEAST_CAPS), 2)?;
    checkpoint(&c, &["--output", "/tmp/c.tar.zst"])?;
    let d = Node::prepare("node-d")?;
    std::fs::copy(c.path("/tmp/c.tar.zst"), d.path("/tmp/c.tar.zst"))?;
    let mut opts = options(
        "node-d",
        &args(&["--restore-from", "/tmp/c.tar.zst"], &COUNTER),
    );
    opts.keep_caps = Some("CAP_CHECKPOINT_RESTORE".into());
    let mut d = d.start(&opts)?;
    ensure!(
        d.wait_exit(LIMIT)? != 0,
        "restore without CAP_SETPCAP should fail here"
    );
    let stderr = d.stderr();
    ensure!(
        stderr.contains("criu restore needs CAP_SETPCAP") && stderr.contains("securityContext"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_frozen_checkpoint_restores_frozen_until_thawed() -> Result<()> {
    if !criu_tests_can_run("a_frozen_checkpoint_restores_frozen_until_thawed") {
        return Ok(());
    }
    // `freeze` stops the app (the first half of a consistent cut across containers).
    let a = counter_node("node-a", None, 3)?;
    let freeze = a.launcher(&["freeze"]).output()?;
    ensure!(
        freeze.status.success(),
        "freeze: {}",
        String::from_utf8_lossy(&freeze.stdout)
    );
    let frozen = counter_values(&a.stdout());
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        counter_values(&a.stdout()).len() == frozen.len(),
        "A kept printing while frozen"
    );
    let status = a.status()?;
    ensure!(
        status["state"] == "frozen" && status["app_stopped"] == true,
        "{status}"
    );
    checkpoint(&a, &["--output", "/tmp/frozen.tar.zst"])?;
    ensure!(a.status()?["state"] == "checkpointed");

    // Restored on B, the app stays stopped until `thaw`, then continues the count.
    let b = Node::prepare("node-b")?;
    std::fs::copy(a.path("/tmp/frozen.tar.zst"), b.path("/tmp/frozen.tar.zst"))?;
    let b = b.start(&options(
        "node-b",
        &args(&["--restore-from", "/tmp/frozen.tar.zst"], &COUNTER),
    ))?;
    let status = b.wait_for("B restored", LIMIT, |n| {
        n.status().ok().filter(|s| s["state"] == "restored")
    })?;
    ensure!(status["app_stopped"] == true, "{status}");
    std::thread::sleep(Duration::from_millis(800));
    ensure!(b.stdout().is_empty(), "B ran before thaw: {}", b.stdout());
    let thaw = b.launcher(&["thaw"]).output()?;
    ensure!(
        thaw.status.success(),
        "thaw: {}",
        String::from_utf8_lossy(&thaw.stdout)
    );
    let a_last = *frozen.last().context("A printed nothing")?;
    assert_counter_continues(a_last, &b)?;
    ensure!(b.status()?["app_stopped"] == false);

    // The source, checkpointed from frozen, rolls back to running.
    let rollback = a.launcher(&["rollback"]).output()?;
    ensure!(
        rollback.status.success(),
        "rollback: {}",
        String::from_utf8_lossy(&rollback.stdout)
    );
    a.wait_for("A running again", LIMIT, |n| {
        (counter_values(&n.stdout()).len() > frozen.len()).then_some(())
    })?;
    ensure!(a.status()?["state"] == "running");
    Ok(())
}

/// A child that starts its own session (`setsid`) is outside the app's process group, so a
/// freeze by group would leave it running (an inconsistent cut) and a resume by group would
/// leave it stopped forever after a rollback. The launcher freezes and resumes the whole tree.
#[test]
fn freeze_stops_a_child_in_its_own_session_and_rollback_resumes_it() -> Result<()> {
    if !criu_tests_can_run("freeze_stops_a_child_in_its_own_session_and_rollback_resumes_it") {
        return Ok(());
    }
    let app = "setsid sh -c 'echo $$ > /run/child.pid; exec python3 /opt/apps/counter.py > /run/child.out' & exec python3 /opt/apps/counter.py";
    let a = Node::prepare("node-a")?.start(&options("node-a", &["--", "sh", "-c", app]))?;
    let shell = |script: &str| -> Result<String> {
        let output = a.exec(&["sh", "-c", script]).output()?;
        ensure!(output.status.success(), "`{script}` failed");
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let child_ticks =
        || -> Result<usize> { Ok(counter_values(&shell("cat /run/child.out")?).len()) };
    a.wait_for("both counters ticking", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= 3 && child_ticks().unwrap_or(0) >= 3).then_some(())
    })?;
    let child = shell("cat /run/child.pid")?;
    let state = |pid: &str| -> Result<String> {
        let stat = shell(&format!("cat /proc/{pid}/stat"))?;
        let after = stat.rfind(')').context("stat")?;
        Ok(stat[after + 1..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string())
    };
    let sessions = shell(&format!(
        "echo $(cut -d' ' -f6 /proc/{child}/stat) $(cut -d' ' -f6 /proc/$(cat /proc/{child}/stat | cut -d' ' -f4)/stat)"
    ))?;
    let ids: Vec<&str> = sessions.split_whitespace().collect();
    ensure!(
        ids.len() == 2 && ids[0] != ids[1],
        "the child is not in a session of its own: {sessions}"
    );

    let freeze = a.launcher(&["freeze"]).output()?;
    ensure!(
        freeze.status.success(),
        "freeze failed: {}",
        String::from_utf8_lossy(&freeze.stdout)
    );
    ensure!(
        state(&child)? == "T",
        "the setsid child is {} during the freeze",
        state(&child)?
    );
    let status = a.status()?;
    ensure!(
        status["state"] == "frozen" && status["app_stopped"] == true,
        "{status}"
    );
    let (parent_before, child_before) = (counter_values(&a.stdout()).len(), child_ticks()?);
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        counter_values(&a.stdout()).len() == parent_before && child_ticks()? == child_before,
        "a process of the app ran on while frozen"
    );

    let rollback = a.launcher(&["rollback"]).output()?;
    ensure!(
        rollback.status.success(),
        "rollback failed: {}",
        String::from_utf8_lossy(&rollback.stdout)
    );
    a.wait_for("both counters ticking again", LIMIT, |n| {
        (counter_values(&n.stdout()).len() > parent_before + 2
            && child_ticks().unwrap_or(0) > child_before + 2)
            .then_some(())
    })?;
    ensure!(
        state(&child)? != "T",
        "the setsid child stayed stopped after the rollback"
    );
    ensure!(a.status()?["app_stopped"] == false);
    Ok(())
}

/// CRIU inside the container does not dump its IPC namespace: an app holding a SysV semaphore
/// set would be restored without it. The checkpoint is refused up front, naming the object,
/// and the app keeps running.
#[test]
fn an_app_holding_a_sysv_semaphore_set_is_refused_at_checkpoint() -> Result<()> {
    if !criu_tests_can_run("an_app_holding_a_sysv_semaphore_set_is_refused_at_checkpoint") {
        return Ok(());
    }
    let app = "ipcmk -S 1 >&2 && exec python3 /opt/apps/counter.py";
    let a = Node::prepare("node-a")?.start(&options("node-a", &["--", "sh", "-c", app]))?;
    a.wait_for("3 counter lines", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= 3).then_some(())
    })?;
    let output = a
        .launcher(&["checkpoint", "--output", "/tmp/sem.tar.zst"])
        .output()?;
    let answer = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success() && answer.contains("1 SysV semaphore set (key 0x"),
        "the checkpoint was not refused with the reason: {answer}"
    );
    ensure!(
        answer.contains("RESTORE_LAUNCHER_IPC_NAMESPACE=true") && answer.contains("SYS_ADMIN"),
        "the refusal does not name the option that makes it work: {answer}"
    );
    ensure!(
        !a.exec(&["test", "-e", "/tmp/sem.tar.zst"])
            .status()?
            .success(),
        "an archive was written"
    );
    let seen = counter_values(&a.stdout()).len();
    a.wait_for("the app counting on", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 3).then_some(())
    })?;
    ensure!(a.status()?["state"] == "running");
    Ok(())
}

/// Every kind of file in an included path is carried or refused by name, never silently left
/// behind: a FIFO arrives as a FIFO beside a regular file; a socket file makes the checkpoint
/// fail naming it, and the app keeps running.
#[test]
fn an_included_fifo_arrives_as_a_fifo_and_a_socket_file_is_refused_by_name() -> Result<()> {
    if !criu_tests_can_run(
        "an_included_fifo_arrives_as_a_fifo_and_a_socket_file_is_refused_by_name",
    ) {
        return Ok(());
    }
    let launcher_args = APPENDER;
    let a = appender_node("node-a", 3)?;
    let run = |node: &Node, script: &str| -> Result<bool> {
        Ok(node.exec(&["sh", "-c", script]).status()?.success())
    };
    ensure!(run(
        &a,
        "mkfifo -m 0640 /data/pipe && echo kept > /data/note"
    )?);
    checkpoint(&a, &["--output", "/tmp/fifo.tar.zst"])?;

    let b = restore_on_b(&a, "/tmp/fifo.tar.zst", &launcher_args)?;
    ensure!(
        run(&b, "test -p /data/pipe")?,
        "/data/pipe is not a FIFO on B"
    );
    ensure!(
        run(&b, "test \"$(stat -c %a /data/pipe)\" = 640")?,
        "the FIFO's mode was not carried"
    );
    ensure!(
        run(&b, "test \"$(cat /data/note)\" = kept")?,
        "/data/note is not on B"
    );

    // A socket file cannot be carried: refused by name, the app resumed.
    let c = appender_node("node-c", 3)?;
    ensure!(run(
        &c,
        "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('/data/sock')\""
    )?);
    let refused = c
        .launcher(&["checkpoint", "--output", "/tmp/sock.tar.zst"])
        .output()?;
    let answer = String::from_utf8_lossy(&refused.stdout);
    ensure!(
        !refused.status.success()
            && answer.contains("/data/sock")
            && answer.contains("socket file"),
        "the socket file was not refused by name: {answer}"
    );
    let seen = c.stdout().lines().count();
    c.wait_for("C appending on", LIMIT, |n| {
        (n.stdout().lines().count() >= seen + 3).then_some(())
    })?;
    Ok(())
}

/// The app may read its launcher's state but not steer it: a `freeze` and a `rollback` asked
/// by a process of the app's own tree are refused naming `kubectl exec`, its `status` is
/// answered, and the app never stops counting.
#[test]
fn the_apps_own_processes_get_status_but_cannot_freeze_or_roll_back() -> Result<()> {
    if !criu_tests_can_run("the_apps_own_processes_get_status_but_cannot_freeze_or_roll_back") {
        return Ok(());
    }
    let app = "python3 /opt/apps/counter.py & \
        sleep 1; \
        restore-launcher freeze --lease 60 > /tmp/freeze.out 2>&1; echo exit=$? >> /tmp/freeze.out; \
        restore-launcher rollback > /tmp/rollback.out 2>&1; echo exit=$? >> /tmp/rollback.out; \
        restore-launcher status > /tmp/status.out 2>&1; \
        wait";
    let a = Node::prepare("node-a")?.start(&options("node-a", &["--", "sh", "-c", app]))?;
    let read = |path: &str| std::fs::read_to_string(a.path(path)).unwrap_or_default();
    a.wait_for("the app's requests answered", LIMIT, |_| {
        (!read("/tmp/status.out").is_empty()).then_some(())
    })?;
    for out in ["/tmp/freeze.out", "/tmp/rollback.out"] {
        let said = read(out);
        ensure!(
            said.contains("comes from a process of the app's own tree")
                && said.contains("kubectl exec")
                && said.contains("exit=1"),
            "{out}: the app's own request was not refused: {said}"
        );
    }
    ensure!(
        read("/tmp/status.out").contains(r#""state":"running""#),
        "status was not answered: {}",
        read("/tmp/status.out")
    );
    let seen = counter_values(&a.stdout()).len();
    a.wait_for("the app counting on", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 3).then_some(())
    })?;
    Ok(())
}

/// `PID STATE` of every process named `comm` in `node`, read inside it.
fn states_of(node: &Node, comm: &str) -> Result<Vec<(String, String)>> {
    let out = node
        .exec(&["sh", "-c", migrate_tests::LIST_STATS])
        .output()?;
    Ok(migrate_tests::states_named(
        &String::from_utf8_lossy(&out.stdout),
        comm,
    ))
}

/// A committed copy never runs again by a process inside its container: after `freeze`,
/// `checkpoint` and `commit`, a shell there sends SIGCONT to every process it can (`kill -CONT
/// -1`) and asks `rollback --committed`. The app stays stopped (traced by PID 1, state t) and
/// counts nothing, the rollback is refused naming `kubectl exec`, and the same rollback run
/// as the plugin runs it (started by the runtime, like `kubectl exec`) resumes it.
#[test]
fn a_committed_copy_is_held_against_sigcont_and_a_shell_inside_cannot_roll_it_back() -> Result<()> {
    if !criu_tests_can_run(
        "a_committed_copy_is_held_against_sigcont_and_a_shell_inside_cannot_roll_it_back",
    ) {
        return Ok(());
    }
    let a = counter_node("node-a", None, 3)?;
    for args in [
        &["freeze", "--migration", "mig-held", "--lease", "60"][..],
        &["checkpoint", "--output", "/tmp/held.tar.zst"],
        &["commit"],
    ] {
        let output = a.launcher(args).output()?;
        ensure!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let shell = a
        .exec(&[
            "sh",
            "-c",
            "kill -CONT -1; /usr/local/bin/restore-launcher rollback --committed; echo exit=$?",
        ])
        .output()?;
    let said = String::from_utf8_lossy(&shell.stdout);
    ensure!(
        said.contains("rollback --committed is taken only from `kubectl exec")
            && said.contains("exit=1"),
        "a shell in the container rolled the committed copy back: {said}"
    );
    let seen = counter_values(&a.stdout()).len();
    let states = states_of(&a, "python3")?;
    ensure!(
        !states.is_empty() && states.iter().all(|(_, state)| state == "t"),
        "the committed copy is not held in a trace stop after SIGCONT: {states:?}"
    );
    std::thread::sleep(Duration::from_millis(700));
    ensure!(
        counter_values(&a.stdout()).len() == seen,
        "the committed copy counted after a SIGCONT"
    );
    ensure!(a.status()?["state"] == "checkpointed", "{}", a.status()?);
    // The plugin's way back: started by the runtime, as `kubectl exec` starts it.
    let back = a.launcher(&["rollback", "--committed"]).output()?;
    ensure!(
        back.status.success(),
        "rollback --committed from outside: {}",
        String::from_utf8_lossy(&back.stdout)
    );
    a.wait_for("the app counting again", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 2).then_some(())
    })?;
    ensure!(
        states_of(&a, "python3")?
            .iter()
            .all(|(_, state)| state != "t"),
        "still traced after the way back"
    );
    Ok(())
}

/// The freeze's lease: a source whose migration driver died (no `renew`, no `commit`) resumes
/// by itself when the lease expires, even after its checkpoint was taken; a `commit` ends the
/// lease, after which only an explicit `rollback` resumes it; a commit after the expiry is
/// refused, so a resumed source and a thawed target can never both run.
#[test]
fn a_frozen_source_resumes_by_itself_when_its_lease_expires_unless_committed() -> Result<()> {
    if !criu_tests_can_run(
        "a_frozen_source_resumes_by_itself_when_its_lease_expires_unless_committed",
    ) {
        return Ok(());
    }
    let a = counter_node("node-a", None, 3)?;
    let ok = |args: &[&str]| -> Result<()> {
        let output = a.launcher(args).output()?;
        ensure!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        Ok(())
    };
    let frozen_for = |what: &str| -> Result<usize> {
        let seen = counter_values(&a.stdout()).len();
        std::thread::sleep(Duration::from_millis(700));
        ensure!(
            counter_values(&a.stdout()).len() == seen,
            "the app ran while {what}"
        );
        Ok(seen)
    };

    // Frozen and checkpointed, then abandoned: it resumes by itself after the lease.
    ok(&["freeze", "--migration", "mig-abandoned", "--lease", "3"])?;
    ensure!(a.status()?["lease_seconds_left"].as_u64() <= Some(3));
    ensure!(
        a.status()?["ended_freeze"].is_null(),
        "a freeze in force is named as ended"
    );
    checkpoint(&a, &["--output", "/tmp/abandoned.tar.zst"])?;
    let seen = frozen_for("checkpointed under a lease")?;
    a.wait_for("the app resumed by its lease", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 2).then_some(())
    })?;
    // Its migration is named as one that can never commit.
    let status = a.status()?;
    ensure!(
        status["state"] == "running"
            && status["lease_seconds_left"].is_null()
            && status["ended_freeze"] == "mig-abandoned",
        "{status}"
    );
    let late = a.launcher(&["commit"]).output()?;
    ensure!(
        !late.status.success()
            && String::from_utf8_lossy(&late.stdout).contains("cannot commit")
            && String::from_utf8_lossy(&late.stdout).contains(r#""refusal":"wrong-state""#),
        "a commit after the lease expired was accepted: {}",
        String::from_utf8_lossy(&late.stdout)
    );

    // Renewed, then committed: the lease is over and the app stays frozen past it.
    ok(&["freeze", "--migration", "mig-moved", "--lease", "2"])?;
    ok(&["renew", "--lease", "2"])?;
    ok(&["commit"])?;
    std::thread::sleep(Duration::from_secs(3));
    frozen_for("committed")?;
    let status = a.status()?;
    ensure!(
        status["state"] == "frozen" && status["committed"] == true,
        "{status}"
    );
    let renew = a.launcher(&["renew", "--lease", "2"]).output()?;
    ensure!(
        !renew.status.success(),
        "a committed freeze took a new lease"
    );
    // The pod's app moved away: a launcher started in this pod again (its container restarted
    // by a liveness probe, say; it shares the pod's /dev/shm) does not start the app fresh.
    let restarted = |what: &str| -> Result<std::process::Output> {
        let output = a
            .launcher(&["--state-dir", "/tmp/restarted", "--", "echo", "fresh app"])
            .output()?;
        eprintln!(
            "{what}: {} / {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    };
    let refused = restarted("a launcher started after the commit")?;
    ensure!(
        refused.status.code() == Some(3)
            && !String::from_utf8_lossy(&refused.stdout).contains("fresh app")
            && String::from_utf8_lossy(&refused.stderr)
                .contains("moved to another pod by a committed migration"),
        "a restarted launcher started the committed app fresh: {refused:?}"
    );
    // A plain rollback (an undo that lost a race) cannot resume a committed copy.
    let plain = a.launcher(&["rollback"]).output()?;
    ensure!(
        !plain.status.success()
            && String::from_utf8_lossy(&plain.stdout).contains(r#""refusal":"committed""#),
        "a plain rollback resumed a committed copy: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    ok(&["rollback", "--committed"])?;
    // The way back from a committed move is not a migration that ended uncommitted.
    let status = a.status()?;
    ensure!(status["ended_freeze"] == "mig-abandoned", "{status}");
    let started = restarted("a launcher started after the committed copy resumed")?;
    ensure!(
        started.status.success() && String::from_utf8_lossy(&started.stdout).contains("fresh app"),
        "the record outlived the rollback: {started:?}"
    );
    let seen = counter_values(&a.stdout()).len();
    a.wait_for("the app counting after the rollback", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 2).then_some(())
    })?;
    Ok(())
}

#[test]
fn an_encrypted_checkpoint_file_restores_with_its_key_and_is_refused_with_another() -> Result<()> {
    if !criu_tests_can_run(
        "an_encrypted_checkpoint_file_restores_with_its_key_and_is_refused_with_another",
    ) {
        return Ok(());
    }
    let launcher = migrate_tests::static_launcher().context("the static launcher")?;
    let keygen = || -> Result<String> {
        let out = std::process::Command::new(&launcher)
            .arg("keygen")
            .output()?;
        ensure!(out.status.success(), "keygen failed");
        Ok(String::from_utf8(out.stdout)?)
    };
    let (key, other) = (keygen()?, keygen()?);
    ensure!(key != other && key.contains("MIGRATE-KEY-"), "{key}");
    let write_key = |node: &Node, text: &str| -> Result<()> {
        let path = node.path("/tmp/key");
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    };

    // The source seals its checkpoint with the key from a file (as from a Secret volume).
    let a = Node::prepare("node-a")?;
    write_key(&a, &key)?;
    let mut opts = options("node-a", &COUNTER);
    opts.env.push("RESTORE_LAUNCHER_KEY_FILE=/tmp/key".into());
    let a = a.start(&opts)?;
    a.wait_for("3 counter lines", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= 3).then_some(())
    })?;
    checkpoint(&a, &["--output", "/tmp/counter.age"])?;
    let sealed = std::fs::read(a.path("/tmp/counter.age"))?;
    ensure!(
        sealed.starts_with(b"age-encryption.org/v1\n"),
        "the checkpoint file is not sealed"
    );
    ensure!(
        !sealed.windows(4).any(|w| w == [0x28, 0xb5, 0x2f, 0xfd]),
        "a plain zstd frame is visible in the sealed file"
    );
    let a_last = *counter_values(&a.stdout())
        .last()
        .context("A printed nothing")?;

    // A wrong key, or none, is refused before anything is restored; nothing is left staged.
    for (name, key_text) in [("node-wrong", Some(other.as_str())), ("node-nokey", None)] {
        let b = Node::prepare(name)?;
        std::fs::copy(a.path("/tmp/counter.age"), b.path("/tmp/counter.age"))?;
        let mut opts = options(
            name,
            &args(&["--restore-from", "/tmp/counter.age"], &COUNTER),
        );
        if let Some(text) = key_text {
            write_key(&b, text)?;
            opts.env.push("RESTORE_LAUNCHER_KEY_FILE=/tmp/key".into());
        }
        let mut b = b.start(&opts)?;
        let code = b.wait_exit(LIMIT)?;
        let stderr = b.stderr();
        let cause = if key_text.is_some() {
            "encrypted with another key than this launcher's"
        } else {
            "the archive is encrypted and this launcher has no key"
        };
        ensure!(
            code == 1 && stderr.contains(cause) && counter_values(&b.stdout()).is_empty(),
            "{name}: exit {code}, expected a refusal naming `{cause}`:\n{stderr}"
        );
        let staged: Vec<_> = std::fs::read_dir(b.path("/run/restore-launcher/work"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(staged.is_empty(), "{name}: staged files left: {staged:?}");
    }

    // The right key, this time from the environment (a Secret's secretKeyRef): restored.
    let c = Node::prepare("node-c")?;
    std::fs::copy(a.path("/tmp/counter.age"), c.path("/tmp/counter.age"))?;
    let mut opts = options(
        "node-c",
        &args(&["--restore-from", "/tmp/counter.age"], &COUNTER),
    );
    let identity = key
        .lines()
        .find(|l| l.starts_with("MIGRATE-KEY-"))
        .context("no key line")?;
    opts.env.push(format!("RESTORE_LAUNCHER_KEY={identity}"));
    let c = c.start(&opts)?;
    assert_counter_continues(a_last, &c)?;
    Ok(())
}

#[test]
fn a_process_that_left_the_apps_tree_is_named_and_the_checkpoint_refused() -> Result<()> {
    if !criu_tests_can_run("a_process_that_left_the_apps_tree_is_named_and_the_checkpoint_refused")
    {
        return Ok(());
    }
    // A daemon started the classic way: its parent shell exits, so it is reparented to the
    // launcher and is no longer in the tree CRIU dumps.
    let a = Node::prepare("node-a")?.start(&options(
        "node-a",
        &[
            "--",
            "sh",
            "-c",
            "sh -c 'sleep 1000 &'; exec python3 /opt/apps/counter.py",
        ],
    ))?;
    a.wait_for("3 counter lines", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= 3).then_some(())
    })?;
    let output = a
        .launcher(&["checkpoint", "--output", "/tmp/c.tar.zst"])
        .output()?;
    let answer = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success()
            && answer.contains("left the app's process tree")
            && answer.contains("(sleep)"),
        "the stray was not named: {answer}"
    );
    let seen = counter_values(&a.stdout()).len();
    a.wait_for("the app counting on", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 2).then_some(())
    })?;
    ensure!(a.status()?["state"] == "running");
    Ok(())
}

/// A `--user` app (uid 1000 under a root launcher, so criu dumps as uid 1000) whose watcher
/// double-forks an orphan the moment it sees `criu`: the orphan leaves the tree CRIU is
/// freezing and tries to replace an image with a symlink (through criu's cwd and
/// descriptors, and any `criu` directory it finds). It reaches no image, the checkpoint fails
/// naming it, and the app keeps counting. A round where the orphan lost the race (CRIU seized
/// it in time, so it is dumped with the app) checkpoints fine and is rolled back; one round
/// of five must see the escape.
#[test]
fn an_orphan_escaping_during_a_user_dump_reaches_no_image_and_fails_the_checkpoint() -> Result<()> {
    if !criu_tests_can_run(
        "an_orphan_escaping_during_a_user_dump_reaches_no_image_and_fails_the_checkpoint",
    ) {
        return Ok(());
    }
    let a = Node::prepare("node-a")?.start(&options(
        "node-a",
        &[
            "--user",
            "1000:1000",
            "--",
            "python3",
            "/opt/apps/orphan.py",
        ],
    ))?;
    a.wait_for("3 counter lines", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= 3).then_some(())
    })?;
    let orphans = || std::fs::read_to_string(a.path("/tmp/orphan.log")).unwrap_or_default();
    for round in 1..=5 {
        let output = a
            .launcher(&["checkpoint", "--output", "/tmp/c.tar.zst"])
            .output()?;
        let answer = String::from_utf8_lossy(&output.stdout).into_owned();
        // Every orphan of an earlier round exits with its criu.
        let all_gone = || {
            let log = orphans();
            let gone = |pid: &str| log.lines().any(|l| l == format!("gone {pid}"));
            log.lines()
                .filter_map(|l| l.strip_prefix("orphan "))
                .filter_map(|l| l.split_whitespace().next())
                .all(gone)
                .then_some(())
        };
        if output.status.success() {
            eprintln!(
                "round {round}: CRIU seized the orphan in time ({answer}); rolled back, again"
            );
            let rolled = a.launcher(&["rollback"]).output()?;
            ensure!(rolled.status.success(), "rollback: {rolled:?}");
            a.wait_for("the orphans gone", LIMIT, |_| all_gone())?;
            continue;
        }
        if answer.contains("their parent exited") {
            // An orphan forked by a watcher CRIU had seized, once the rollback let it run:
            // caught before the dump, as it should be; not the race this test is after.
            eprintln!("round {round}: a leftover orphan refused before the dump: {answer}");
            a.wait_for("the orphans gone", LIMIT, |_| all_gone())?;
            continue;
        }
        let log = orphans();
        eprintln!("round {round}: {answer}\norphan log:\n{log}");
        ensure!(
            !log.contains("swapped"),
            "the orphan replaced an image:\n{log}"
        );
        // The watcher forks one for every criu it sees (`criu --version` included).
        let pids: Vec<&str> = log
            .lines()
            .filter_map(|l| l.strip_prefix("orphan "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        ensure!(
            answer.contains("while it was being checkpointed")
                && pids
                    .iter()
                    .any(|pid| answer.contains(&format!("{pid} (python3)")))
                && answer.contains("the app keeps running")
                && answer.contains(r#""failure":"left-tree""#),
            "no escaped orphan of {pids:?} was named: {answer}"
        );
        ensure!(
            log.lines().any(|l| l.starts_with("denied")),
            "the orphan tried nothing:\n{log}"
        );
        let seen = counter_values(&a.stdout()).len();
        a.wait_for("the app counting on", LIMIT, |n| {
            (counter_values(&n.stdout()).len() >= seen + 2).then_some(())
        })?;
        ensure!(a.status()?["state"] == "running");
        return Ok(());
    }
    anyhow::bail!(
        "in 5 rounds the orphan never escaped a dump (CRIU seized it every time):\n{}",
        orphans()
    )
}

#[test]
fn an_app_watching_files_is_refused_before_it_is_touched() -> Result<()> {
    if !criu_tests_can_run("an_app_watching_files_is_refused_before_it_is_touched") {
        return Ok(());
    }
    // `tail -f` watches its file with inotify. Measured: with a pod's capabilities CRIU fails
    // on such a watch mid-dump ("fsnotify: Can't dump that handle"), after interrupting the
    // app's blocking calls, and GNU tail exits on that. The launcher refuses first.
    let mut opts = options(
        "node-a",
        &[
            "--",
            "sh",
            "-c",
            "touch /tmp/w.log; tail -f /tmp/w.log & exec python3 /opt/apps/counter.py",
        ],
    );
    opts.keep_caps = Some(LEAST_CAPS.into());
    let a = Node::prepare("node-a")?.start(&opts)?;
    a.wait_for("3 counter lines", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= 3).then_some(())
    })?;
    let output = a
        .launcher(&["checkpoint", "--output", "/tmp/c.tar.zst"])
        .output()?;
    let answer = String::from_utf8_lossy(&output.stdout);
    ensure!(
        !output.status.success()
            && answer.contains("the app watches files")
            && answer.contains("(tail): inotify")
            && answer.contains("CAP_SYS_ADMIN"),
        "the watch was not named: {answer}"
    );
    ensure!(
        !a.stderr().contains("Interrupted system call"),
        "the app was disturbed: {}",
        a.stderr()
    );
    let seen = counter_values(&a.stdout()).len();
    a.wait_for("the app counting on", LIMIT, |n| {
        (counter_values(&n.stdout()).len() >= seen + 2).then_some(())
    })?;
    let tails = a
        .exec(&[
            "sh",
            "-c",
            "cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^tail$'",
        ])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&tails.stdout).trim() == "1",
        "tail is gone: {}",
        String::from_utf8_lossy(&tails.stdout)
    );
    Ok(())
}

/// `--ipc-namespace`: an app holding a SysV semaphore set, a message queue and a
/// shared-memory segment in an IPC namespace of its own is restored on another node with all
/// three intact (semaphore values, queued messages in order, segment contents), continuing
/// its count. The test app prints what it reads back from them every tick.
#[test]
fn sysv_objects_travel_in_the_apps_own_ipc_namespace() -> Result<()> {
    if !criu_tests_can_run("sysv_objects_travel_in_the_apps_own_ipc_namespace") {
        return Ok(());
    }
    let app = ["--ipc-namespace", "--", "perl", "/opt/apps/sysv.pl"];
    let a = Node::prepare("node-a")?.start(&options("node-a", &app))?;
    a.wait_for("5 ticks", LIMIT, |n| {
        (sysv_ticks(&n.stdout()).len() >= 5).then_some(())
    })?;
    // The launcher's own IPC namespace stays empty: the objects are the app's.
    let listed = a.exec(&["cat", "/proc/sysvipc/sem"]).output()?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).lines().count() == 1,
        "the semaphore set is in the launcher's namespace, not the app's"
    );
    checkpoint(&a, &["--output", "/tmp/sysv.tar.zst"])?;
    let last = sysv_ticks(&a.stdout()).last().cloned().context("no tick")?;

    let b = Node::prepare("node-b")?;
    std::fs::copy(a.path("/tmp/sysv.tar.zst"), b.path("/tmp/sysv.tar.zst"))?;
    let b = b.start(&options(
        "node-b",
        &[
            "--restore-from",
            "/tmp/sysv.tar.zst",
            "--",
            "perl",
            "/opt/apps/sysv.pl",
        ],
    ))?;
    let ticks = b.wait_for("3 ticks on B", LIMIT, |n| {
        let t = sysv_ticks(&n.stdout());
        (t.len() >= 3).then_some(t)
    })?;
    for (i, (events, sem, mark, msg, shm)) in ticks.iter().enumerate() {
        let expected = last.0 + 1 + i as u64;
        ensure!(
            *events == expected,
            "B's tick {events} does not continue A's last {}",
            last.0
        );
        ensure!(
            *sem == expected,
            "semaphore 0 is {sem}, expected {expected}: {ticks:?}"
        );
        ensure!(*mark == 41, "semaphore 1 lost its value 41: {ticks:?}");
        ensure!(
            *msg == format!("m{}", expected - 3),
            "the queue did not keep its messages in order: got {msg} at tick {expected}"
        );
        ensure!(
            *shm == expected.to_string(),
            "shared memory holds {shm} at tick {expected}"
        );
    }
    Ok(())
}

/// A POSIX access ACL granting read to user 1234, in the kernel's xattr layout
/// (`posix_acl_xattr_header` version 2, then tag/perm/id entries).
fn acl_granting_read_to_1234() -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX), // ACL_USER_OBJ rw-
        (0x02, 4, 1234),           // ACL_USER 1234 r--
        (0x04, 4, u32::MAX),       // ACL_GROUP_OBJ r--
        (0x10, 4, u32::MAX),       // ACL_MASK r--
        (0x20, 0, u32::MAX),       // ACL_OTHER ---
    ] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    acl
}

/// Files of an included path arrive with their numeric owner and group, their mode, their
/// extended attributes and their POSIX ACL, as the source had them.
#[test]
fn included_files_keep_owner_mode_xattrs_and_acl() -> Result<()> {
    if !criu_tests_can_run("included_files_keep_owner_mode_xattrs_and_acl") {
        return Ok(());
    }
    use std::os::unix::fs::MetadataExt as _;
    let launcher_args = APPENDER;
    let a = appender_node("node-a", 3)?;
    let dir = a.path("/data/owned");
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
    let file = dir.join("secret");
    std::fs::write(&file, "only for 1000 and group 1001\n")?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640))?;
    xattr::set(&file, "user.origin", b"node-a")?;
    xattr::set(
        &file,
        "system.posix_acl_access",
        &acl_granting_read_to_1234(),
    )?;
    std::os::unix::fs::chown(&file, Some(1000), Some(1001))?;
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000))?;
    let source_acl = xattr::get(&file, "system.posix_acl_access")?.context("no ACL on A")?;
    let source_mode = std::fs::metadata(&file)?.mode() & 0o7777;
    checkpoint(&a, &["--output", "/tmp/owned.tar.zst"])?;

    let b = restore_on_b(&a, "/tmp/owned.tar.zst", &launcher_args)?;
    let dir = b.path("/data/owned");
    let file = dir.join("secret");
    let meta = std::fs::metadata(&file)?;
    ensure!(
        (meta.uid(), meta.gid()) == (1000, 1001),
        "owner {}:{} instead of 1000:1001",
        meta.uid(),
        meta.gid()
    );
    ensure!(
        meta.mode() & 0o7777 == source_mode && source_mode & 0o777 == 0o640,
        "mode {:o} instead of {source_mode:o}",
        meta.mode() & 0o7777
    );
    let dir_meta = std::fs::metadata(&dir)?;
    ensure!(
        (dir_meta.uid(), dir_meta.gid(), dir_meta.mode() & 0o7777) == (1000, 1000, 0o750),
        "the directory arrived as {}:{} {:o}",
        dir_meta.uid(),
        dir_meta.gid(),
        dir_meta.mode() & 0o7777
    );
    ensure!(
        xattr::get(&file, "user.origin")?.as_deref() == Some(&b"node-a"[..]),
        "the user.origin attribute did not arrive"
    );
    ensure!(
        xattr::get(&file, "system.posix_acl_access")?.as_deref() == Some(&source_acl[..]),
        "the ACL did not arrive intact"
    );
    ensure!(
        std::fs::read_to_string(&file)? == "only for 1000 and group 1001\n",
        "the contents did not arrive"
    );
    Ok(())
}

/// A job's outcome longer than a pipe holds (64 KiB): an archive whose manifest names a
/// 128 KiB included path makes the restore job's error that long. PID 1 reads the outcome as
/// it comes, so the job ends, is reaped and answers its client; the error keeps its beginning
/// and its reason at the end, saying how much was cut; the launcher waits for a checkpoint
/// again and answers `status`.
#[test]
fn a_job_whose_outcome_outgrows_a_pipe_is_read_reaped_and_answered() -> Result<()> {
    if !criu_tests_can_run("a_job_whose_outcome_outgrows_a_pipe_is_read_reaped_and_answered") {
        return Ok(());
    }
    let long_path = format!("relative/{}", "x".repeat(128 * 1024));
    let manifest = serde_json::json!({
        "format_version": 1, "id": "mig-long", "created": "2026-12-07T00:00:00Z",
        "criu_version": "4.1", "kernel": "6", "arch": std::env::consts::ARCH,
        "cpu_flags_digest": "", "app_root_pid": 1000, "app_pids": [1000], "command": ["true"],
        "stdout_pipe": null, "stderr_pipe": null, "included_paths": [long_path],
        "entries": [], "frozen_at_ms": 0, "timings_ms": {}
    });
    let json = serde_json::to_vec(&manifest)?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o600);
    header.set_cksum();
    tar.append_data(&mut header, "manifest.json", json.as_slice())?;
    let archive = zstd::encode_all(tar.into_inner()?.as_slice(), 1)?;

    let b = Node::prepare("node-b")?;
    std::fs::write(b.path("/tmp/long.tar.zst"), archive)?;
    let b = b.start(&options(
        "node-b",
        &args(&["--wait-for-checkpoint"], &COUNTER),
    ))?;
    b.wait_for("the launcher waiting", LIMIT, |n| {
        n.status()
            .is_ok_and(|s| s["state"] == "waiting")
            .then_some(())
    })?;
    let mut receive = b
        .launcher(&["receive", "--input", "/tmp/long.tar.zst"])
        .stdout(Stdio::piped())
        .spawn()?;
    // Were the job stuck writing its outcome, this would wait for ever: bounded here.
    let asked = std::time::Instant::now();
    let code = loop {
        if let Some(code) = receive.try_wait()? {
            break code;
        }
        if asked.elapsed() > LIMIT {
            let _ = receive.kill();
            anyhow::bail!(
                "`receive` got no answer in {} s: the restore job never ended",
                LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut answer = String::new();
    if let Some(mut out) = receive.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut answer)?;
    }
    ensure!(
        !code.success()
            && answer.contains("included path `relative/xxx")
            && answer.contains("bytes cut) …")
            && answer.contains("is not absolute"),
        "{code}: {}",
        &answer[..answer.len().min(600)]
    );
    ensure!(
        answer.len() < 64 * 1024,
        "the answer was not cut: {} bytes",
        answer.len()
    );
    let status = b.status()?;
    ensure!(
        status["state"] == "waiting" || status["state"] == "failed",
        "{status}"
    );
    Ok(())
}
