//! `cargo xtask cluster up|down` and `cargo xtask demo`: the local cluster of
//! `migrate_tests::cluster` (etcd, kube-apiserver, two kubelets with containerd) run for a
//! person, and the main job shown in README.md: the counter pod migrated with `kubectl migrate`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use migrate_tests::cluster::{Cluster, counter_image};

use crate::{cargo, images, is_root, k8s, run, target_dir, workspace_root};

/// Everything a cluster needs that is built here; returns the directory of `kubectl-migrate`.
fn prepare() -> Result<PathBuf> {
    if !is_root() {
        bail!(
            "the local cluster runs containerd and kubelets: run it as root (sudo -E cargo xtask ...)"
        );
    }
    k8s()?;
    images::build()?;
    run(cargo().args(["build", "--quiet", "--package", "kubectl-migrate"]))?;
    crate::build_forwarder()?;
    Ok(target_dir().join("debug"))
}

/// `PATH` with the plugin's directory first, so `kubectl migrate` finds `kubectl-migrate`.
fn path_with(plugin_dir: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![plugin_dir.to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}

pub fn run_task(args: &[String]) -> Result<()> {
    let dir = workspace_root().join(".cache/cluster");
    match args.first().map(String::as_str) {
        Some("up") => {
            let plugin_dir = prepare()?;
            std::fs::create_dir_all(&dir)?;
            let cluster = Cluster::start(&dir, 2)?;
            let kubectl = migrate_tests::apiserver::kubectl();
            println!(
                "cluster: up, nodes node-a and node-b, state in {}",
                dir.display()
            );
            println!("  export KUBECONFIG={}", cluster.kubeconfig.display());
            println!(
                "  export PATH={}:{}:$PATH",
                plugin_dir.display(),
                kubectl.parent().unwrap_or(&dir).display()
            );
            println!(
                "  kubectl apply -f images/examples/counter/pod.yaml   # add spec.nodeName: node-a"
            );
            println!("  kubectl migrate counter --to node-b");
            println!("  cargo xtask cluster down");
            cluster.keep_running();
            Ok(())
        }
        Some("down") => {
            // `down DIR` stops a cluster kept by a test run with KEEP_CLUSTER=1.
            let dir = args.get(1).map_or(dir, PathBuf::from);
            Cluster::stop_at(&dir)?;
            println!("cluster: down");
            Ok(())
        }
        _ => bail!("usage: cargo xtask cluster up|down [DIR]"),
    }
}

/// The main job: a two-node cluster, the counter pod on node-a, `kubectl migrate counter --to
/// node-b`, and the counter before and after.
pub fn demo() -> Result<()> {
    let plugin_dir = prepare()?;
    let dir = workspace_root().join(".cache/demo-cluster");
    std::fs::create_dir_all(&dir)?;
    println!(
        "demo: starting a local cluster: etcd, kube-apiserver, kubelets node-a and node-b (containerd + runc)"
    );
    let cluster = Cluster::start(&dir, 2)?;
    let result = demo_on(&cluster, &plugin_dir);
    if result.is_err() {
        eprintln!("{}", cluster.diagnose());
    }
    println!("demo: stopping the cluster");
    drop(cluster);
    result
}

fn demo_on(cluster: &Cluster, plugin_dir: &std::path::Path) -> Result<()> {
    let pod = std::fs::read_to_string(workspace_root().join("images/examples/counter/pod.yaml"))?
        .replace("spec:\n", "spec:\n  nodeName: node-a\n");
    println!(
        "demo: kubectl apply -f images/examples/counter/pod.yaml (image {}, on node-a)",
        counter_image()
    );
    cluster.apply(&pod)?;
    cluster.wait_running("counter", Duration::from_secs(60))?;
    let logs = |pod: &str| cluster.kubectl_ok(&["logs", pod]).unwrap_or_default();
    let start = Instant::now();
    while migrate_tests::counter_values(&logs("counter")).len() < 5 {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the counter printed nothing:\n{}", cluster.diagnose());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // Follow the source's log to its end, to show the last count it printed before the move.
    let mut follow = cluster
        .kubectl(&["logs", "--follow", "counter"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let source_log = follow.stdout.take().context("kubectl logs stdout")?;
    let source_lines =
        std::thread::spawn(move || std::io::read_to_string(source_log).unwrap_or_default());
    println!("demo: kubectl migrate counter --to node-b");
    let status = Command::new(migrate_tests::apiserver::kubectl())
        .args(["migrate", "counter", "--to", "node-b"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("PATH", path_with(plugin_dir))
        .status()
        .context("run kubectl migrate")?;
    if !status.success() {
        bail!("kubectl migrate failed ({status})");
    }
    cluster.wait_running("counter-m1", Duration::from_secs(30))?;
    let _ = follow.wait();
    let source_log = source_lines.join().unwrap_or_default();
    let before = *migrate_tests::counter_values(&source_log)
        .last()
        .context("the source printed nothing")?;
    for line in source_log
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("  counter (node-a)    | {line}");
    }
    std::thread::sleep(Duration::from_secs(3));
    print!("{}", cluster.kubectl_ok(&["get", "pods", "-o", "wide"])?);
    let after_logs = logs("counter-m1");
    for line in after_logs.lines().take(3) {
        println!("  counter-m1 (node-b) | {line}");
    }
    let gone = cluster.kubectl_ok(&["get", "pod", "counter"]).is_err();
    let after = *migrate_tests::counter_values(&after_logs)
        .first()
        .context("the new pod printed nothing")?;
    let money = |cents: u64| format!("{}.{:02}", cents / 100, cents % 100);
    let continued = after.0 == before.0 + 1
        && after.1
            == before.1 + migrate_tests::expected_revenue(after.0)
                - migrate_tests::expected_revenue(before.0);
    println!();
    println!(
        "  counter before (last line of counter on node-a):     events={} revenue={}",
        before.0,
        money(before.1)
    );
    println!(
        "  counter after (first line of counter-m1 on node-b):  events={} revenue={}",
        after.0,
        money(after.1)
    );
    println!(
        "  continued without reset:                             {}",
        if continued { "yes" } else { "NO" }
    );
    println!(
        "  source pod counter deleted:                          {}",
        if gone { "yes" } else { "NO" }
    );
    if !continued || !gone {
        bail!("the counter did not continue on node-b");
    }
    Ok(())
}
