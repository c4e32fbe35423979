//! `cargo xtask demo --sandbox`: a local migration without Kubernetes. The counter app runs under the
//! static launcher as PID 1 of sandboxed "node A" (least capabilities); it is checkpointed with
//! real CRIU and streamed into the launcher of "node B", which restores it. The counter before
//! and after, the downtime and the per-phase timings are printed. Needs root (namespaces).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use migrate_tests::{LEAST_CAPS, Node, NodeOptions, Signal, counter_values};

use crate::{build_sandbox, is_root, rootfs, static_launcher};

/// `cargo xtask demo --sandbox`: the launcher alone, between two sandboxed nodes (no Kubernetes).
pub fn sandbox() -> Result<()> {
    if !is_root() {
        bail!(
            "the demo creates namespaces and runs CRIU: run it as root (sudo -E cargo xtask demo)"
        );
    }
    migrate_tests::use_launcher(&static_launcher()?);
    rootfs()?;
    build_sandbox()?;
    let wait = Duration::from_secs(30);
    let counter: Vec<String> = ["--", "python3", "/opt/apps/counter.py"]
        .map(String::from)
        .to_vec();
    let node = |name: &str, launcher_args: Vec<String>| NodeOptions {
        name: name.into(),
        launcher_args,
        env: vec!["COUNTER_INTERVAL=0.5".into()],
        keep_caps: Some(LEAST_CAPS.into()),
    };

    println!(
        "demo: node A runs: restore-launcher -- python3 counter.py   (event count and revenue, in memory only)"
    );
    let a = Node::prepare("node-a")?.start(&node("node-a", counter.clone()))?;
    a.wait_for("4 ticks", wait, |n| {
        (counter_values(&n.stdout()).len() >= 4).then_some(())
    })?;
    println!("demo: node B runs: restore-launcher --wait-for-checkpoint -- python3 counter.py");
    let mut waiting = vec!["--wait-for-checkpoint".to_string()];
    waiting.extend(counter);
    let mut b = Node::prepare("node-b")?.start(&node("node-b", waiting))?;

    println!(
        "demo: migrating: (A) restore-launcher checkpoint --output - | (B) restore-launcher receive --input -"
    );
    let started = Instant::now();
    let (checkpoint, restore) = a.stream_to(&b)?;
    let elapsed = started.elapsed();
    let before = *counter_values(&a.stdout())
        .last()
        .context("node A printed nothing")?;
    b.wait_for("3 ticks on node B", wait, |n| {
        (counter_values(&n.stdout()).len() >= 3).then_some(())
    })?;
    for line in a.stdout().lines() {
        println!("  node-a | {line}");
    }
    for line in b.stdout().lines() {
        println!("  node-b | {line}");
    }
    let after = counter_values(&b.stdout())[0];
    let money = |cents: u64| format!("{}.{:02}", cents / 100, cents % 100);
    println!();
    println!(
        "  counter before (last on node A):        events={} revenue={}",
        before.0,
        money(before.1)
    );
    println!(
        "  counter after (first on node B):        events={} revenue={}",
        after.0,
        money(after.1)
    );
    println!(
        "  continued without reset:                {}",
        if after.0 == before.0 + 1 { "yes" } else { "NO" }
    );
    println!(
        "  downtime (frozen on A → running on B):  {} ms",
        restore["downtime_ms"]
    );
    println!(
        "  archive:                                {} bytes (CRIU images {} bytes)",
        checkpoint["archive_bytes"], checkpoint["images_bytes"]
    );
    println!(
        "  checkpoint phases (ms):                 {}",
        checkpoint["timings_ms"]
    );
    println!(
        "  restore phases (ms):                    {}",
        restore["timings_ms"]
    );
    println!(
        "  whole transfer:                         {} ms",
        elapsed.as_millis()
    );
    println!(
        "  state now:                              node A {}, node B {}",
        a.status()?["state"],
        b.status()?["state"]
    );
    b.signal(Signal::SIGTERM)?;
    println!(
        "demo: SIGTERM to node B's launcher: it exited {} (143: the app was stopped by SIGTERM)",
        b.wait_exit(wait)?
    );
    if after.0 != before.0 + 1 {
        bail!("the counter did not continue");
    }
    Ok(())
}
