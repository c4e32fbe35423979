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
    Ok(target_dir().join("debug"))
}

/// `PATH` with the plugin's directory first, so `kubectl migrate` finds `kubectl-migrate`.
fn path_with(plugin_dir: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![plugin_dir.to_path_buf()];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
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
            println!("cluster: up, nodes node-a and node-b, state in {}", dir.display());
            println!("  export KUBECONFIG={}", cluster.kubeconfig.display());
            println!(
                "  export PATH={}:{}:$PATH",
                plugin_dir.display(),
                kubectl.parent().unwrap_or(&dir).display()
            );
            println!("  kubectl apply -f images/examples/counter/pod.yaml   # add spec.nodeName: node-a");
            println!("  kubectl migrate counter --to node-b");
            println!("  cargo xtask cluster down");
            cluster.keep_running();
            Ok(())
        }
        Some("down") => {
            Cluster::stop_at(&dir)?;
            println!("cluster: down");
            Ok(())
        }
        _ => bail!("usage: cargo xtask cluster up|down"),
    }
}

/// The main job: a two-node cluster, the counter pod on node-a, `kubectl migrate counter --to
/// node-b`, and the counter before and after.
pub fn demo() -> Result<()> {
    let plugin_dir = prepare()?;
    let dir = workspace_root().join(".cache/demo-cluster");
    std::fs::create_dir_all(&dir)?;
    println!("demo: starting a local cluster: etcd, kube-apiserver, kubelets node-a and node-b (containerd + runc)");
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
    println!("demo: kubectl apply -f images/examples/counter/pod.yaml (image {}, on node-a)", counter_image());
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
    println!();
    println!("  counter after (first line of counter-m1 on node-b):  events={}", after.0);
    println!(
        "  continued without reset:                             {}",
        if after.0 > 5 { "yes" } else { "NO" }
    );
    println!("  source pod counter deleted:                          {}", if gone { "yes" } else { "NO" });
    if after.0 <= 5 || !gone {
        bail!("the counter did not continue on node-b");
    }
    Ok(())
}
