//! The plugin against a real kube-apiserver + etcd (built from the `k8s.io/kubernetes` Go
//! module): the rewritten pods are accepted by the server, and `--dry-run` prints the target
//! and creates nothing.

use std::path::PathBuf;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use migrate_tests::{ApiServer, apiserver_tests_can_run, workspace, workspace_binary};

fn golden_targets() -> Result<Vec<PathBuf>> {
    let dir = workspace().join("kubectl-migrate/tests/fixtures/rewrite");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let p = p.to_string_lossy();
            // A StatefulSet pod's move creates a holder and a successor instead of a target.
            p.ends_with(".target.yaml")
                || p.ends_with(".holder.yaml")
                || p.ends_with(".successor.yaml")
        })
        .collect();
    paths.sort();
    Ok(paths)
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\n\
apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: apps\n";

#[test]
fn every_golden_target_is_accepted_by_the_api_server() -> Result<()> {
    if !apiserver_tests_can_run("every_golden_target_is_accepted_by_the_api_server") {
        return Ok(());
    }
    let server = ApiServer::start()?;
    server.apply(NAMESPACE)?;
    let targets = golden_targets()?;
    ensure!(
        targets.len() >= 10,
        "expected 10 golden pods, found {}",
        targets.len()
    );
    for target in targets {
        let output = server
            .kubectl(&["create", "--dry-run=server", "-o", "name", "-f"])
            .arg(&target)
            .output()?;
        ensure!(
            output.status.success(),
            "the API server refused {}: {}",
            target.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Nothing was created by the dry runs.
    let pods = server
        .kubectl(&["get", "pods", "-n", "apps", "-o", "name"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&pods.stdout).trim().is_empty(),
        "dry runs created pods"
    );
    Ok(())
}

#[test]
fn dry_run_prints_the_target_pod_and_creates_nothing() -> Result<()> {
    if !apiserver_tests_can_run("dry_run_prints_the_target_pod_and_creates_nothing") {
        return Ok(());
    }
    let server = ApiServer::start()?;
    server.apply(NAMESPACE)?;
    server.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: counter\n  namespace: apps\n  labels: {app: counter}\n\
         spec:\n  nodeName: node-a\n  containers:\n  - name: counter\n    image: localhost/migrate/counter:v1\n",
    )?;
    let plugin = workspace_binary("kubectl-migrate");
    ensure!(
        plugin.exists(),
        "kubectl-migrate is not built (run the tests through `cargo xtask test`)"
    );
    for (format, parse) in [("yaml", true), ("json", false)] {
        let output = std::process::Command::new(&plugin)
            .args([
                "counter",
                "--to",
                "node-b",
                "-n",
                "apps",
                "--dry-run",
                "-o",
                format,
                "--kubeconfig",
            ])
            .arg(&server.kubeconfig)
            .output()?;
        ensure!(
            output.status.success(),
            "--dry-run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout)?;
        let pod: Pod = if parse {
            serde_yaml::from_str(&text)?
        } else {
            serde_json::from_str(&text)?
        };
        ensure!(pod.metadata.name.as_deref() == Some("counter-m1"), "{text}");
        ensure!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-b"),
            "{text}"
        );
        ensure!(
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app"))
                .map(String::as_str)
                == Some("counter")
        );
    }
    let pods = server
        .kubectl(&["get", "pods", "-n", "apps", "-o", "name"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&pods.stdout).trim() == "pod/counter",
        "--dry-run changed the cluster: {}",
        String::from_utf8_lossy(&pods.stdout)
    );

    // A pod or node that does not exist: `check` says so, exits 1.
    for (pod, node, expected) in [
        ("missing", "node-b", "pod apps/missing does not exist"),
        (
            "counter",
            "node-nowhere",
            "node node-nowhere does not exist",
        ),
    ] {
        let output = std::process::Command::new(&plugin)
            .args(["check", pod, "--to", node, "-n", "apps", "--kubeconfig"])
            .arg(&server.kubeconfig)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(1) && stderr.contains(expected),
            "check {pod} --to {node}: {stderr}"
        );
    }

    // kubectl finds the plugin on PATH, as users run it.
    let dir = plugin.parent().context("plugin dir")?;
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let list = server
        .kubectl(&["plugin", "list"])
        .env("PATH", &path)
        .output()?;
    ensure!(
        String::from_utf8_lossy(&list.stdout).contains("kubectl-migrate"),
        "kubectl plugin list: {}",
        String::from_utf8_lossy(&list.stdout)
    );
    // kubectl wants its own flags after the plugin's name; they are then the plugin's.
    let via_kubectl = std::process::Command::new(migrate_tests::apiserver::kubectl())
        .args([
            "migrate",
            "counter",
            "--to",
            "node-b",
            "-n",
            "apps",
            "--dry-run",
            "-o",
            "json",
            "--kubeconfig",
        ])
        .arg(&server.kubeconfig)
        .env("PATH", &path)
        .output()?;
    ensure!(
        via_kubectl.status.success(),
        "kubectl migrate: {}",
        String::from_utf8_lossy(&via_kubectl.stderr)
    );
    Ok(())
}

#[test]
fn connection_problems_are_clear_errors_without_a_hang() -> Result<()> {
    let plugin = workspace_binary("kubectl-migrate");
    if !plugin.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build kubectl-migrate"
        );
        eprintln!(
            "SKIPPED connection_problems_are_clear_errors_without_a_hang: kubectl-migrate not built"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let unreachable = dir.path().join("unreachable");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        &unreachable,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: ctx\n  context:\n    cluster: c\n    user: u\ncurrent-context: ctx\n"
        ),
    )?;
    let cases: [(&[&str], &str); 3] = [
        (
            &["--kubeconfig", "/no/such/kubeconfig"],
            "cannot read the kubeconfig",
        ),
        (
            &[
                "--kubeconfig",
                unreachable.to_str().context("utf8")?,
                "--context",
                "nope",
            ],
            "context `nope` is not in the kubeconfig (it has: ctx)",
        ),
        (
            &["--kubeconfig", unreachable.to_str().context("utf8")?],
            "cannot read pod default/counter",
        ),
    ];
    for (extra, expected) in cases {
        let start = std::time::Instant::now();
        let output = std::process::Command::new(&plugin)
            .args(["counter", "--to", "node-b", "--dry-run"])
            .args(extra)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{extra:?}: exited 0");
        ensure!(
            stderr.contains(expected),
            "{extra:?}: expected `{expected}` in: {stderr}"
        );
        ensure!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "{extra:?}: took {:?}",
            start.elapsed()
        );
    }
    Ok(())
}

/// The declarative API's definition (`config/crd/`, generated from the Rust types) is accepted
/// by the API server, which then takes a PodMigration and refuses one its schema forbids.
#[test]
fn the_pod_migration_definition_is_accepted_and_enforces_its_schema() -> Result<()> {
    if !apiserver_tests_can_run("the_pod_migration_definition_is_accepted_and_enforces_its_schema")
    {
        return Ok(());
    }
    let server = ApiServer::start()?;
    server.apply(NAMESPACE)?;
    let crd = workspace().join("config/crd/podmigrations.yaml");
    let output = server.kubectl(&["apply", "-f"]).arg(&crd).output()?;
    ensure!(
        output.status.success(),
        "the API server refused the CRD: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = server
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/podmigrations.migrate.kubectl.io",
        ])
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    server.apply(
        "apiVersion: migrate.kubectl.io/v1alpha1\nkind: PodMigration\nmetadata:\n  name: counter\n  namespace: apps\nspec:\n  pod: counter\n  targetNode: node-b\n",
    )?;
    let stored = server
        .kubectl(&[
            "get",
            "pmig",
            "-n",
            "apps",
            "counter",
            "-o",
            "jsonpath={.spec}",
        ])
        .output()?;
    let spec = String::from_utf8_lossy(&stored.stdout);
    ensure!(
        spec.contains("\"transfer\":\"auto\"") && spec.contains("\"lazy\":false"),
        "the schema's defaults were not applied: {spec}"
    );
    let refused = server
        .kubectl(&["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().expect("stdin").write_all(
                b"apiVersion: migrate.kubectl.io/v1alpha1\nkind: PodMigration\nmetadata:\n  name: bad\n  namespace: apps\nspec:\n  pod: counter\n  transfer: teleport\n  timeoutSeconds: 0\n",
            )?;
            child.wait_with_output()
        })?;
    let why = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && why.contains("teleport") && why.contains("timeoutSeconds"),
        "a PodMigration with a bad transfer and timeout was not refused: {why}"
    );
    // A request is carried out as made: its spec cannot change afterwards.
    let changed = server
        .kubectl(&[
            "patch",
            "pmig",
            "-n",
            "apps",
            "counter",
            "--type=merge",
            "-p",
            r#"{"spec":{"pod":"another"}}"#,
        ])
        .output()?;
    let why = String::from_utf8_lossy(&changed.stderr);
    ensure!(
        !changed.status.success() && why.contains("cannot be changed"),
        "a PodMigration's spec was changed: {why}"
    );
    Ok(())
}
