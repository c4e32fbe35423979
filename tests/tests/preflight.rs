//! `kubectl migrate check` against a real kube-apiserver: every listed problem is reported
//! with its fix, and nothing on the server changes. Nodes and pod statuses are written through
//! the API, as envtest-style tests do (there is no kubelet here). The launcher's `status`,
//! which a cluster answers through `kubectl exec`, is answered by [`StandIn`] — the one seam
//! these tests use, since exec needs a kubelet (the end-to-end tests run the real one).

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kubectl_migrate::check::{self, Launchers};
use kubectl_migrate::launchers::LauncherError;
use migrate_format::StatusReport;
use migrate_tests::{ApiServer, apiserver_tests_can_run, workspace_binary};

/// Stands in for `kubectl exec POD -c C -- restore-launcher status`: containers named
/// `plain` do not run the launcher; all others answer like a launcher with CRIU 4.1.1.
struct StandIn;

impl Launchers for StandIn {
    async fn status(&self, _pod: &Pod, container: &str) -> Result<StatusReport, LauncherError> {
        if container == "plain" {
            return Err("exec: \"restore-launcher\": executable file not found in $PATH".into());
        }
        serde_json::from_value(
            serde_json::json!({"state": "running", "app_pid": 1000, "launcher_version": "0.1.0",
            "criu_version": "4.1.1", "kernel": "6.18.4", "arch": "x86_64", "last_checkpoint": null,
            "last_restore": null, "error": null, "features": migrate_format::FEATURES}),
        )
        .map_err(|e| LauncherError::Failed(e.to_string()))
    }

    type Ready = ();

    async fn prepare(
        &self,
        _source: &Pod,
        _target: &Pod,
        _container: &str,
        _mode: kubectl_migrate::launchers::TransferMode,
    ) -> Result<(), LauncherError> {
        Err("the preflight never transfers".into())
    }

    async fn transfer(
        &self,
        _source: &Pod,
        _target: &Pod,
        _container: &str,
        _ready: (),
        _moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<kubectl_migrate::launchers::Transferred, LauncherError> {
        Err("the preflight never transfers".into())
    }

    async fn rollback(
        &self,
        _pod: &Pod,
        _container: &str,
        _committed: bool,
    ) -> Result<(), LauncherError> {
        Err("the preflight never rolls back".into())
    }

    async fn freeze(
        &self,
        _pod: &Pod,
        _container: &str,
        _migration: &str,
        _lease: Duration,
        _limit: Option<Duration>,
    ) -> Result<Option<u64>, LauncherError> {
        Err("the preflight never freezes".into())
    }

    async fn renew(
        &self,
        _pod: &Pod,
        _container: &str,
        _lease: Duration,
    ) -> Result<(), LauncherError> {
        Err("the preflight holds no lease".into())
    }

    async fn commit(&self, _pod: &Pod, _container: &str) -> Result<(), LauncherError> {
        Err("the preflight never commits".into())
    }

    async fn thaw(&self, _pod: &Pod, _container: &str) -> Result<Option<u64>, LauncherError> {
        Err("the preflight never thaws".into())
    }
}

fn node(name: &str, labels: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/os: linux, {labels}}}\nspec: {spec}\n---\n"
    )
}

fn pod(name: &str, extra_spec: &str, owner: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: apps\n{owner}spec:\n  nodeName: node-a\n{extra_spec}  containers:\n  - name: app\n    image: localhost/app:v1\n    resources: {{requests: {{cpu: 500m, memory: 256Mi}}}}\n---\n"
    )
}

/// Every object's resourceVersion, to prove the preflight wrote nothing.
fn versions(server: &ApiServer) -> Result<String> {
    let output = server
        .kubectl(&[
            "get",
            "pods,nodes,pvc,events",
            "-A",
            "-o",
            "custom-columns=K:.kind,N:.metadata.name,V:.metadata.resourceVersion",
        ])
        .output()?;
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_every_problem_with_its_fix_and_changes_nothing() -> Result<()> {
    if !apiserver_tests_can_run("check_names_every_problem_with_its_fix_and_changes_nothing") {
        return Ok(());
    }
    let server = ApiServer::start()?;
    let mut manifests = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: apps\n---\n",
    );
    manifests += &node("node-a", "kubernetes.io/arch: amd64, zone: eu-1a", "{}");
    manifests += &node("node-b", "kubernetes.io/arch: amd64, zone: eu-1a", "{}");
    manifests += &node("node-notready", "kubernetes.io/arch: amd64", "{}");
    manifests += &node(
        "node-cordoned",
        "kubernetes.io/arch: amd64",
        "{unschedulable: true}",
    );
    manifests += &node(
        "node-tainted",
        "kubernetes.io/arch: amd64",
        "{taints: [{key: dedicated, value: gpu, effect: NoSchedule}]}",
    );
    manifests += &node("node-arm", "kubernetes.io/arch: arm64", "{}");
    manifests += &node("node-old", "kubernetes.io/arch: amd64", "{}");
    manifests += &node("node-full", "kubernetes.io/arch: amd64", "{}");
    manifests += "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\n  namespace: apps\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {requests: {storage: 1Gi}}\n---\n";
    manifests += &pod("counter", "", "");
    manifests += &pod("pending", "", "");
    manifests += &pod(
        "owned",
        "",
        "  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-1, uid: 0a1b2c3d-0000-4000-8000-000000000001, controller: true}]\n",
    );
    manifests += &pod(
        "hostpath",
        "  volumes: [{name: logs, hostPath: {path: /var/log}}]\n",
        "",
    );
    manifests += &pod(
        "rwo",
        "  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]\n",
        "",
    );
    manifests += &pod("selective", "  nodeSelector: {disk: ssd}\n", "");
    manifests += &pod(
        "affine",
        "  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: zone, operator: In, values: [eu-2a]}]}]}}}\n",
        "",
    );
    manifests += "apiVersion: v1\nkind: Pod\nmetadata:\n  name: no-launcher\n  namespace: apps\nspec:\n  nodeName: node-a\n  containers:\n  - name: plain\n    image: localhost/plain:v1\n---\n";
    for i in 0..4 {
        manifests +=
            &pod(&format!("filler-{i}"), "", "").replace("nodeName: node-a", "nodeName: node-full");
    }
    server.apply(&manifests)?;
    for (name, ready, kernel) in [
        ("node-a", true, "6.18.4"),
        ("node-b", true, "6.18.4"),
        ("node-notready", false, "6.18.4"),
        ("node-cordoned", true, "6.18.4"),
        ("node-tainted", true, "6.18.4"),
        ("node-arm", true, "6.18.4"),
        ("node-old", true, "5.15.0"),
        ("node-full", true, "6.18.4"),
    ] {
        server.node_status(name, ready, kernel)?;
    }
    for name in [
        "counter",
        "owned",
        "hostpath",
        "rwo",
        "selective",
        "affine",
        "no-launcher",
        "filler-0",
        "filler-1",
        "filler-2",
        "filler-3",
    ] {
        server.patch_status(
            "pod",
            name,
            Some("apps"),
            &serde_json::json!({"status": {"phase": "Running"}}),
        )?;
    }

    let client = server.client().await?;
    let before = versions(&server)?;

    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("counter", "node-b", vec![]),
        (
            "missing",
            "node-b",
            vec![
                "pod apps/missing does not exist",
                "check the name and the namespace",
            ],
        ),
        (
            "pending",
            "node-b",
            vec!["is Pending, not Running", "wait until it runs"],
        ),
        (
            "no-launcher",
            "node-b",
            vec![
                "container plain does not answer `restore-launcher status`",
                "FROM the restore-launcher base image",
            ],
        ),
        (
            "counter",
            "node-nowhere",
            vec!["node node-nowhere does not exist", "kubectl get nodes"],
        ),
        (
            "counter",
            "node-notready",
            vec!["node node-notready is not Ready"],
        ),
        (
            "counter",
            "node-cordoned",
            vec!["is cordoned", "kubectl uncordon node-cordoned"],
        ),
        (
            "counter",
            "node-tainted",
            vec![
                "taint dedicated=gpu:NoSchedule that the pod does not tolerate",
                "add a matching toleration",
            ],
        ),
        (
            "counter",
            "node-arm",
            vec![
                "kubernetes.io/arch=arm64 but the pod runs on amd64",
                "same OS and architecture",
            ],
        ),
        (
            "counter",
            "node-old",
            vec!["runs kernel 5.15.0 but the pod's node runs 6.18.4"],
        ),
        (
            "counter",
            "node-full",
            vec![
                "has 0m cpu free of 2000m but the pod requests 500m",
                "pick a node with room",
            ],
        ),
        (
            "rwo",
            "node-b",
            vec![
                "claim data with access modes [\"ReadWriteOnce\"]",
                "source detaches it",
            ],
        ),
        (
            "hostpath",
            "node-b",
            vec!["volume logs is a hostPath", "--force"],
        ),
        (
            "owned",
            "node-b",
            vec![
                "the ReplicaSet web-1 that manages pod owned no longer exists",
                "garbage collector",
            ],
        ),
        (
            "selective",
            "node-b",
            vec!["nodeSelector disk=ssd excludes node node-b"],
        ),
        (
            "affine",
            "node-b",
            vec!["required node affinity excludes node node-b"],
        ),
    ];
    for (pod_name, target, expected) in cases {
        let facts = check::gather(&client, "apps", pod_name, target, &StandIn, false).await?;
        let problems = match facts {
            Ok(facts) => check::problems(&facts),
            Err(problem) => vec![problem],
        };
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        if expected.is_empty() {
            ensure!(
                problems.is_empty(),
                "{pod_name} → {target}: expected no problem, got {text:#?}"
            );
            continue;
        }
        ensure!(
            problems.len() == 1,
            "{pod_name} → {target}: expected one problem, got {text:#?}"
        );
        for needle in expected {
            ensure!(
                text[0].contains(needle),
                "{pod_name} → {target}: `{needle}` not in `{}`",
                text[0]
            );
        }
    }

    // Through the binary: non-zero exit and the problem on stderr.
    let plugin = workspace_binary("kubectl-migrate");
    let output = std::process::Command::new(&plugin)
        .args([
            "check",
            "counter",
            "--to",
            "node-notready",
            "-n",
            "apps",
            "--kubeconfig",
        ])
        .arg(&server.kubeconfig)
        .output()
        .context("run kubectl-migrate check")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(1),
        "check exited {:?}: {stderr}",
        output.status.code()
    );
    ensure!(
        stderr.contains("node node-notready is not Ready") && stderr.contains("fix:"),
        "{stderr}"
    );

    ensure!(
        versions(&server)? == before,
        "the preflight changed objects on the server"
    );
    Ok(())
}
