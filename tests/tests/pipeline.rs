//! The migration pipeline against a real kube-apiserver, with pod status driven by the test
//! (no kubelet here; the end-to-end tests run a real one). What happens inside containers —
//! `restore-launcher checkpoint | receive`, `status`, `rollback` through `kubectl exec` — is
//! played by [`StandIn`], the one seam these tests use (exec needs a kubelet), recording every call so the tests can
//! assert the order: the source is deleted only after every container reported `restored`, and
//! on every failure the target is deleted and the source rolled back.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use kubectl_migrate::check::{self, Launchers};
use kubectl_migrate::client::Connection;
use kubectl_migrate::launchers::{LauncherError, Route, TransferMode, Transferred};
use kubectl_migrate::migrate::{self, MigrateError, Options};
use kubectl_migrate::recover;
use migrate_format::{CheckpointReport, RestoreReport, StatusReport};
use migrate_tests::{ApiServer, apiserver_tests_can_run};

/// What the stand-in's transfer does.
#[derive(Debug, Clone, PartialEq)]
enum Transfer {
    Works,
    RestoreFails,
    Hangs,
}

/// Plays the launchers in the pods' containers (see the module comment).
struct StandIn {
    client: kube::Client,
    transfer: Transfer,
    /// `thaw` never answers (the plugin is killed while it waits).
    thaw_hangs: bool,
    /// Post-copy (`--lazy`): the target reports that not every page arrived.
    post_copy_fails: bool,
    calls: Mutex<Vec<String>>,
    restored: Mutex<BTreeSet<String>>,
    source_gone_too_early: AtomicBool,
}

impl StandIn {
    fn new(client: kube::Client, transfer: Transfer) -> Self {
        StandIn {
            client,
            transfer,
            thaw_hangs: false,
            post_copy_fails: false,
            calls: Mutex::default(),
            restored: Mutex::default(),
            source_gone_too_early: AtomicBool::new(false),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn call(&self, text: String) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(text);
        }
    }
}

fn status(state: &str) -> StatusReport {
    serde_json::from_value(
        serde_json::json!({"state": state, "app_pid": 1000, "launcher_version": "0.1.0",
        "criu_version": "4.1.1", "kernel": "6.18.4", "arch": "x86_64", "last_checkpoint": null,
        "last_restore": null, "error": null, "features": migrate_format::FEATURES}),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

impl Launchers for StandIn {
    async fn status(&self, pod: &Pod, container: &str) -> Result<StatusReport, LauncherError> {
        self.call(format!("status {}/{container}", name(pod)));
        let key = format!("{}/{container}", name(pod));
        if self
            .restored
            .lock()
            .map(|r| r.contains(&key))
            .unwrap_or(false)
        {
            // Verification of the target: the source must still be there, undeleted.
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), "apps");
            let source = pods.get_opt("counter").await.map_err(|e| e.to_string())?;
            if source.is_none_or(|p| p.metadata.deletion_timestamp.is_some()) {
                self.source_gone_too_early.store(true, Ordering::SeqCst);
            }
            return Ok(status("restored"));
        }
        Ok(status(if name(pod).ends_with("-m1") {
            "waiting"
        } else {
            "running"
        }))
    }

    type Ready = ();

    async fn prepare(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        _mode: TransferMode,
    ) -> Result<(), LauncherError> {
        self.call(format!(
            "prepare {}/{container} -> {}",
            name(source),
            name(target)
        ));
        Ok(())
    }

    async fn transfer(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        _ready: (),
        moved: Arc<AtomicU64>,
    ) -> Result<Transferred, LauncherError> {
        self.call(format!(
            "transfer {}/{container} -> {}",
            name(source),
            name(target)
        ));
        match self.transfer {
            Transfer::Hangs => std::future::pending::<()>().await,
            Transfer::RestoreFails => return Err("restore failed: criu restore failed (exit status: 1): Can't fork for 1000: File exists".into()),
            Transfer::Works => {}
        }
        moved.fetch_add(611_447, Ordering::Relaxed);
        if let Ok(mut restored) = self.restored.lock() {
            restored.insert(format!("{}/{container}", name(target)));
        }
        let mut checkpoint = CheckpointReport::new("ck-test".into(), false);
        checkpoint.ok = true;
        checkpoint.archive_bytes = 611_447;
        let mut restore = RestoreReport::new();
        restore.ok = true;
        restore.app_pid = Some(1000);
        Ok(Transferred {
            checkpoint,
            restore,
            route: Route::Direct,
        })
    }

    async fn rollback(
        &self,
        pod: &Pod,
        container: &str,
        committed: bool,
    ) -> Result<(), LauncherError> {
        let how = if committed { " --committed" } else { "" };
        self.call(format!("rollback{how} {}/{container}", name(pod)));
        Ok(())
    }

    async fn freeze(
        &self,
        pod: &Pod,
        container: &str,
        _migration: &str,
        lease: Duration,
        _limit: Option<Duration>,
    ) -> Result<Option<u64>, LauncherError> {
        self.call(format!("freeze {}/{container}", name(pod)));
        if lease.is_zero() {
            return Err("a freeze without a lease".into());
        }
        // The launcher's stamp: this machine's realtime clock, as a node's would be.
        Ok(Some(migrate_format::unix_ms()))
    }

    async fn renew(
        &self,
        pod: &Pod,
        container: &str,
        _lease: Duration,
    ) -> Result<(), LauncherError> {
        self.call(format!("renew {}/{container}", name(pod)));
        Ok(())
    }

    async fn commit(&self, pod: &Pod, container: &str) -> Result<(), LauncherError> {
        self.call(format!("commit {}/{container}", name(pod)));
        Ok(())
    }

    async fn complete_post_copy(
        &self,
        target: &Pod,
        container: &str,
    ) -> Result<Option<kubectl_migrate::launchers::PostCopyDone>, LauncherError> {
        self.call(format!("complete_post_copy {}/{container}", name(target)));
        let state = if self.post_copy_fails {
            migrate_format::PostCopyState::Failed
        } else {
            migrate_format::PostCopyState::Complete
        };
        Ok(Some(kubectl_migrate::launchers::PostCopyDone {
            container: container.into(),
            arrived: migrate_format::PostCopy {
                state,
                ended_at_ms: Some(migrate_format::unix_ms()),
                error: self
                    .post_copy_fails
                    .then(|| "page-xfer: Remote side closed connection".into()),
            },
            served: None,
        }))
    }

    async fn thaw(&self, pod: &Pod, container: &str) -> Result<Option<u64>, LauncherError> {
        self.call(format!("thaw {}/{container}", name(pod)));
        if self.thaw_hangs {
            std::future::pending::<()>().await;
        }
        // The launchers' stamps: the report's downtime is thaw minus freeze.
        Ok(Some(migrate_format::unix_ms()))
    }
}

/// What the stand-in kubelet does with the target pod once it appears.
#[derive(Debug, Clone, Copy)]
enum Kubelet {
    Runs,
    Fails,
    PullFails,
    Never,
}

/// A control plane with two Ready nodes and pod `apps/counter` running on node-a.
async fn cluster() -> Result<(ApiServer, Connection)> {
    let server = ApiServer::start()?;
    server.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: apps\n---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {kubernetes.io/os: linux, kubernetes.io/arch: amd64}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n  labels: {kubernetes.io/os: linux, kubernetes.io/arch: amd64}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: counter\n  namespace: apps\n  labels: {app: counter}\nspec:\n  nodeName: node-a\n  containers:\n  - name: counter\n    image: localhost/migrate/counter:v1\n",
    )?;
    server.node_status("node-a", true, "6.18.4")?;
    server.node_status("node-b", true, "6.18.4")?;
    server.patch_status(
        "pod",
        "counter",
        Some("apps"),
        &serde_json::json!({"status": {"phase": "Running"}}),
    )?;
    let client = server.client().await?;
    let connection = Connection {
        client,
        namespace: "apps".into(),
        server: server.url.clone(),
    };
    Ok((server, connection))
}

/// Plays the kubelet for the target pod `counter-m1`.
fn kubelet(server: &ApiServer, behaviour: Kubelet) -> std::thread::JoinHandle<()> {
    let kubectl = migrate_tests::apiserver::kubectl();
    let kubeconfig = server.kubeconfig.clone();
    std::thread::spawn(move || {
        let status = match behaviour {
            Kubelet::Never => return,
            Kubelet::Runs => {
                serde_json::json!({"status": {"phase": "Running", "containerStatuses": [{"name": "counter", "ready": true,
                "restartCount": 0, "image": "localhost/migrate/counter:v1", "imageID": "", "state": {"running": {"startedAt": "2026-11-22T00:00:00Z"}}}]}})
            }
            Kubelet::Fails => {
                serde_json::json!({"status": {"phase": "Failed", "message": "the launcher exited 1"}})
            }
            Kubelet::PullFails => {
                serde_json::json!({"status": {"phase": "Pending", "containerStatuses": [{"name": "counter", "ready": false,
                "restartCount": 0, "image": "localhost/migrate/counter:v1", "imageID": "", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}})
            }
        };
        for _ in 0..200 {
            let output = std::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args([
                    "patch",
                    "pod",
                    "counter-m1",
                    "-n",
                    "apps",
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &status.to_string(),
                ])
                .output();
            if output.is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn options(timeout: Duration) -> Options {
    Options {
        id: None,
        pod: "counter".into(),
        target_node: "node-b".into(),
        timeout,
        keep_source: false,
        force: false,
        lease: Duration::from_secs(120),
        max_downtime: None,
        transfer: TransferMode::Auto,
        lazy: false,
        moved: Default::default(),
    }
}

/// Runs a migration whose target the stand-in kubelet brings up; it must succeed.
async fn must_succeed(
    server: &ApiServer,
    connection: &Connection,
    launchers: &StandIn,
) -> Result<migrate::Report> {
    let driver = kubelet(server, Kubelet::Runs);
    let outcome = migrate::migrate(
        connection,
        launchers,
        &options(Duration::from_secs(60)),
        std::future::pending(),
    )
    .await;
    let _ = driver.join();
    outcome.map_err(|e| anyhow::anyhow!("the migration should have succeeded: {e}"))
}

/// Runs a migration (deadline `seconds`) that must fail; returns how it failed.
async fn must_fail(
    connection: &Connection,
    launchers: &StandIn,
    seconds: u64,
    interrupted: impl std::future::Future<Output = ()>,
) -> Result<migrate::Failed> {
    migrate::migrate(
        connection,
        launchers,
        &options(Duration::from_secs(seconds)),
        interrupted,
    )
    .await
    .err()
    .context("the migration should have failed")
}

async fn pod(connection: &Connection, name: &str) -> Result<Option<Pod>> {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), "apps");
    Ok(pods.get_opt(name).await?)
}

/// Deleted, or being deleted (without a kubelet a pod bound to a node keeps its
/// deletionTimestamp until the kubelet confirms).
async fn deleted(connection: &Connection, name: &str) -> Result<bool> {
    Ok(pod(connection, name)
        .await?
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_creates_the_target_on_the_node_and_deletes_the_source_only_after_restored()
-> Result<()> {
    if !apiserver_tests_can_run(
        "success_creates_the_target_on_the_node_and_deletes_the_source_only_after_restored",
    ) {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    let report = must_succeed(&server, &connection, &launchers).await?;

    ensure!(
        report.target == "counter-m1" && report.node == "node-b" && report.source_deleted,
        "{report:?}"
    );
    let target = pod(&connection, "counter-m1")
        .await?
        .context("the target pod is missing")?;
    ensure!(target.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-b"));
    let notes = target.metadata.annotations.clone().unwrap_or_default();
    ensure!(
        notes.get("migrate.kubectl.io/phase").map(String::as_str) == Some("done"),
        "{notes:?}"
    );
    ensure!(
        notes.get("migrate.kubectl.io/id") == Some(&report.id),
        "{notes:?}"
    );
    ensure!(
        notes.contains_key("migrate.kubectl.io/timings"),
        "{notes:?}"
    );
    ensure!(
        deleted(&connection, "counter").await?,
        "the source pod was not deleted"
    );
    ensure!(
        !launchers.source_gone_too_early.load(Ordering::SeqCst),
        "the source was deleted before the target reported restored"
    );
    let calls = launchers.calls();
    let transfer = calls
        .iter()
        .position(|c| c.starts_with("transfer"))
        .context("no transfer")?;
    let verify = calls
        .iter()
        .position(|c| c == "status counter-m1/counter")
        .context("no verification")?;
    ensure!(
        transfer < verify && !calls.iter().any(|c| c.starts_with("rollback")),
        "{calls:?}"
    );
    // The consistent cut: frozen before any transfer, thawed together after verification.
    let freeze = calls
        .iter()
        .position(|c| c == "freeze counter/counter")
        .context("no freeze")?;
    let thaw = calls
        .iter()
        .position(|c| c == "thaw counter-m1/counter")
        .context("no thaw")?;
    ensure!(freeze < transfer && verify < thaw, "{calls:?}");
    // The transfer is made ready before anything is frozen (its setup is not downtime).
    let prepare = calls
        .iter()
        .position(|c| c.starts_with("prepare counter/counter"))
        .context("no prepare")?;
    ensure!(prepare < freeze, "{calls:?}");
    let commit = calls
        .iter()
        .position(|c| c == "commit counter/counter")
        .context("the source launcher was not told of the commit")?;
    ensure!(verify < commit && commit < thaw, "{calls:?}");
    let phases: Vec<&str> = report.phases.iter().map(|(p, _)| p.as_str()).collect();
    ensure!(
        phases
            == [
                "check",
                "target",
                "transfer setup",
                "checkpoint+transfer+restore",
                "verify",
                "commit",
                "thaw+cleanup",
                "total"
            ],
        "{phases:?}"
    );
    ensure!(
        // Freeze → thaw from the stamps, within the plugin's own bracket of it.
        report
            .downtime_ms
            .zip(report.downtime_bound_ms)
            .is_some_and(|(stamped, bound)| stamped <= bound)
            && report.container_downtime_ms.contains_key("counter")
            && report.bytes_moved == 611_447,
        "{report:?}"
    );

    let events = server
        .kubectl(&["get", "events", "-n", "apps", "-o", "json"])
        .output()?;
    let events: serde_json::Value = serde_json::from_slice(&events.stdout)?;
    let reasons: BTreeSet<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect();
    for reason in ["MigrationStarted", "MigrationTarget", "MigrationDone"] {
        ensure!(reasons.contains(reason), "no {reason} event: {reasons:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_deleted_and_the_source_rolled_back() -> Result<()> {
    if !apiserver_tests_can_run("a_failing_target_is_deleted_and_the_source_rolled_back") {
        return Ok(());
    }
    // The target pod itself fails, or cannot pull its image, before anything was frozen.
    for behaviour in [Kubelet::Fails, Kubelet::PullFails] {
        let (server, connection) = cluster().await?;
        let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
        let driver = kubelet(&server, behaviour);
        let failed = must_fail(&connection, &launchers, 60, std::future::pending()).await?;
        let _ = driver.join();
        let text = failed.to_string();
        ensure!(
            matches!(failed.error, MigrateError::TargetFailed { .. })
                && matches!(
                    failed.aftermath,
                    migrate::Aftermath::Undone {
                        restarted: false,
                        ..
                    }
                ),
            "{behaviour:?}: {text}"
        );
        ensure!(
            text.contains("deleted the target pod counter-m1") && text.contains("keeps running"),
            "{behaviour:?}: {text}"
        );
        ensure!(
            deleted(&connection, "counter-m1").await? && !deleted(&connection, "counter").await?,
            "{behaviour:?}"
        );
        ensure!(
            !launchers.calls().iter().any(|c| c.starts_with("transfer")),
            "{behaviour:?}: nothing should have been frozen"
        );
    }
    // The restore fails in the target: target deleted, source rolled back.
    let (server, connection) = cluster().await?;
    let launchers = StandIn::new(connection.client.clone(), Transfer::RestoreFails);
    let driver = kubelet(&server, Kubelet::Runs);
    let failed = must_fail(&connection, &launchers, 60, std::future::pending()).await?;
    let _ = driver.join();
    let text = failed.to_string();
    ensure!(
        text.contains("container counter: restore failed") && text.contains("File exists"),
        "{text}"
    );
    ensure!(
        text.contains("resumed the source app in container counter"),
        "{text}"
    );
    ensure!(
        launchers
            .calls()
            .contains(&"rollback --committed counter/counter".to_string()),
        "{:?}",
        launchers.calls()
    );
    ensure!(deleted(&connection, "counter-m1").await? && !deleted(&connection, "counter").await?);
    let source = pod(&connection, "counter").await?.context("source")?;
    let phase = source
        .metadata
        .annotations
        .unwrap_or_default()
        .get("migrate.kubectl.io/phase")
        .cloned();
    ensure!(phase.as_deref() == Some("failed"), "{phase:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_or_an_interruption_undoes_the_migration() -> Result<()> {
    if !apiserver_tests_can_run("a_passed_deadline_or_an_interruption_undoes_the_migration") {
        return Ok(());
    }
    // Deadline while waiting for a target that never runs.
    let (server, connection) = cluster().await?;
    let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    let never = kubelet(&server, Kubelet::Never);
    let start = std::time::Instant::now();
    let failed = must_fail(&connection, &launchers, 3, std::future::pending()).await?;
    let _ = never.join();
    ensure!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    let text = failed.to_string();
    ensure!(
        text.contains("deadline (3s, --timeout) passed during creating the target"),
        "{text}"
    );
    ensure!(deleted(&connection, "counter-m1").await? && !deleted(&connection, "counter").await?);

    // Interrupted (Ctrl-C) in the middle of the transfer: the source may be frozen, so it is
    // rolled back; the message says it keeps running and how to retry.
    let (server, connection) = cluster().await?;
    let launchers = StandIn::new(connection.client.clone(), Transfer::Hangs);
    let driver = kubelet(&server, Kubelet::Runs);
    let transferring = async {
        while !launchers.calls().iter().any(|c| c.starts_with("transfer")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let failed = must_fail(&connection, &launchers, 60, transferring).await?;
    let _ = driver.join();
    let text = failed.to_string();
    ensure!(
        text.contains("interrupted during checkpoint and transfer"),
        "{text}"
    );
    ensure!(
        text.contains("resumed the source app")
            && text.contains("run the migration again to retry"),
        "{text}"
    );
    ensure!(
        launchers
            .calls()
            .contains(&"rollback --committed counter/counter".to_string())
    );
    ensure!(deleted(&connection, "counter-m1").await? && !deleted(&connection, "counter").await?);
    Ok(())
}

/// A kubeconfig whose user is the ServiceAccount `apps/kubectl-migrate`, bound to exactly the
/// shipped `config/rbac.yaml`.
async fn service_account_connection(
    server: &ApiServer,
    role_verbs: Option<&str>,
) -> Result<Connection> {
    let rbac = migrate_tests::workspace().join("config/rbac.yaml");
    let output = server
        .kubectl(&["apply", "-n", "apps", "-f"])
        .arg(&rbac)
        .output()?;
    ensure!(
        output.status.success(),
        "apply rbac: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    if let Some(verbs) = role_verbs {
        let patch =
            format!("[{{\"op\":\"replace\",\"path\":\"/rules/0/verbs\",\"value\":{verbs}}}]");
        let output = server
            .kubectl(&[
                "patch",
                "role",
                "kubectl-migrate",
                "-n",
                "apps",
                "--type=json",
                "-p",
                &patch,
            ])
            .output()?;
        ensure!(
            output.status.success(),
            "patch role: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = server
        .kubectl(&[
            "create",
            "clusterrolebinding",
            "kubectl-migrate-nodes",
            "--clusterrole=kubectl-migrate-nodes",
            "--serviceaccount=apps:kubectl-migrate",
        ])
        .output()?;
    ensure!(
        output.status.success(),
        "bind: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = server
        .kubectl(&["create", "token", "kubectl-migrate", "-n", "apps"])
        .output()?;
    ensure!(
        token.status.success(),
        "token: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout)?.trim().to_string();
    let path = server.dir().join("sa-kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context:\n    cluster: c\n    user: sa\n    namespace: apps\ncurrent-context: sa\n",
            server.url
        ),
    )?;
    let global = kubectl_migrate::cli::Global {
        namespace: None,
        context: None,
        kubeconfig: Some(path),
        verbose: 0,
    };
    Ok(kubectl_migrate::client::connect(&global).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_rbac_is_enough_and_a_missing_verb_is_named() -> Result<()> {
    if !apiserver_tests_can_run("the_shipped_rbac_is_enough_and_a_missing_verb_is_named") {
        return Ok(());
    }
    let (server, admin) = cluster().await?;
    let connection = service_account_connection(&server, None).await?;
    ensure!(connection.namespace == "apps");
    let launchers = StandIn::new(admin.client.clone(), Transfer::Works);
    let report = must_succeed(&server, &connection, &launchers).await?;
    ensure!(report.source_deleted && deleted(&admin, "counter").await?);

    // The same Role without `delete` on pods: refused up front, naming the verb and resource.
    let (server, admin) = cluster().await?;
    let connection = service_account_connection(
        &server,
        Some("[\"get\",\"list\",\"watch\",\"create\",\"patch\"]"),
    )
    .await?;
    let launchers = StandIn::new(admin.client.clone(), Transfer::Works);
    let failed = must_fail(&connection, &launchers, 60, std::future::pending()).await?;
    let text = failed.to_string();
    ensure!(
        text.contains("you are not allowed to: delete pods in namespace apps")
            && text.contains("config/rbac.yaml"),
        "{text}"
    );
    ensure!(
        pod(&admin, "counter-m1").await?.is_none() && !deleted(&admin, "counter").await?,
        "something was changed"
    );
    ensure!(
        launchers.calls().iter().all(|c| c.starts_with("status")),
        "{:?}",
        launchers.calls()
    );
    Ok(())
}

/// A real admission fault: a ValidatingAdmissionPolicy (no webhook server: CEL in the API
/// server itself) refusing to delete pods labelled `protect=yes`.
const NO_DELETES: &str = "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata:\n  name: no-pod-deletes\nspec:\n  failurePolicy: Fail\n  matchConstraints:\n    resourceRules:\n    - apiGroups: [\"\"]\n      apiVersions: [v1]\n      operations: [DELETE]\n      resources: [pods]\n  validations:\n  - expression: 'false'\n    message: pods labelled protect=yes cannot be deleted (test fault)\n---\napiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata:\n  name: no-pod-deletes\nspec:\n  policyName: no-pod-deletes\n  validationActions: [Deny]\n  matchResources:\n    objectSelector:\n      matchLabels: {protect: \"yes\"}\n";

/// Post-copy (`--lazy`) failing after the commit: the target reports that not every page
/// arrived (its launcher killed the app). The migration fails naming the post-copy, the
/// daemon's reason and the two commands that go back to the source; the source is kept, and
/// nothing advises deleting it or calls it stale. The target was thawed before the wait for
/// its pages, as post-copy needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_post_copy_keeps_the_source_and_never_advises_deleting_it() -> Result<()> {
    if !apiserver_tests_can_run("a_failed_post_copy_keeps_the_source_and_never_advises_deleting_it")
    {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    let mut launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    launchers.post_copy_fails = true;
    let driver = kubelet(&server, Kubelet::Runs);
    let mut lazy = options(Duration::from_secs(60));
    lazy.lazy = true;
    let failed = migrate::migrate(&connection, &launchers, &lazy, std::future::pending())
        .await
        .err()
        .context("a failed post-copy should fail the migration")?;
    let _ = driver.join();
    let text = failed.to_string();
    for needle in [
        "post-copy failed",
        "Remote side closed connection",
        "kubectl delete pod counter-m1 --wait && kubectl exec counter -c counter -- restore-launcher rollback --committed",
        "the source pod counter is kept",
    ] {
        ensure!(text.contains(needle), "`{needle}` not in: {text}");
    }
    for needle in ["never resume it", "kubectl delete pod -n apps counter"] {
        ensure!(!text.contains(needle), "`{needle}` in: {text}");
    }
    let source = pod(&connection, "counter").await?;
    ensure!(
        source.is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "the source of a failed post-copy was deleted"
    );
    let calls = launchers.calls();
    let thawed = calls.iter().position(|c| c == "thaw counter-m1/counter");
    let completed = calls
        .iter()
        .position(|c| c == "complete_post_copy counter-m1/counter");
    ensure!(
        thawed.is_some() && thawed < completed,
        "post-copy thaws the target before waiting for its pages: {calls:?}"
    );
    Ok(())
}

/// Past the commit point nothing undoes. The source's delete refused by the API server leaves
/// the target thawed and running, the source frozen with the commit recorded on it, no
/// rollback, and a message that says so and gives the command that finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_commit_undoes_nothing_and_names_the_command_that_finishes()
-> Result<()> {
    if !apiserver_tests_can_run(
        "a_failure_after_the_commit_undoes_nothing_and_names_the_command_that_finishes",
    ) {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    server.apply(NO_DELETES)?;
    server.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probe\n  namespace: apps\n  labels: {protect: \"yes\"}\nspec:\n  nodeName: node-a\n  containers:\n  - name: probe\n    image: probe\n",
    )?;
    // The policy takes effect once the API server's informer has it: wait for a refusal of a
    // server-side dry-run delete (admission runs, nothing is deleted).
    let start = std::time::Instant::now();
    loop {
        let output = server
            .kubectl(&["delete", "pod", "probe", "-n", "apps", "--dry-run=server"])
            .output()?;
        if String::from_utf8_lossy(&output.stderr).contains("cannot be deleted") {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the admission policy never refused a delete"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = server
        .kubectl(&["label", "pod", "counter", "-n", "apps", "protect=yes"])
        .output()?;
    ensure!(output.status.success());

    let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    let driver = kubelet(&server, Kubelet::Runs);
    let failed = must_fail(&connection, &launchers, 60, std::future::pending()).await?;
    let _ = driver.join();
    let text = failed.to_string();
    for needle in [
        "cannot delete the source pod counter",
        "cannot be deleted (test fault)",
        "committed",
        "nothing was undone",
        "never resume it",
        "kubectl delete pod -n apps counter",
    ] {
        ensure!(text.contains(needle), "`{needle}` not in: {text}");
    }
    let target = pod(&connection, "counter-m1")
        .await?
        .context("the committed target was deleted")?;
    ensure!(
        target.metadata.deletion_timestamp.is_none(),
        "the target is being deleted"
    );
    let source = pod(&connection, "counter")
        .await?
        .context("the source is gone")?;
    ensure!(
        migrate::is_committed(
            &source,
            &target.metadata.annotations.clone().unwrap_or_default()["migrate.kubectl.io/id"]
        ),
        "the commit is not recorded on the source: {:?}",
        source.metadata.annotations
    );
    let calls = launchers.calls();
    ensure!(
        calls.iter().any(|c| c == "thaw counter-m1/counter"),
        "the target was not thawed: {calls:?}"
    );
    ensure!(
        !calls.iter().any(|c| c.starts_with("rollback")),
        "the stale source was resumed: {calls:?}"
    );
    Ok(())
}

/// Runs a migration and drops it, without its undo, once the stand-in has seen a call
/// starting with `call`: what a plugin killed with SIGKILL at that point leaves behind.
async fn killed_at(connection: &Connection, launchers: &StandIn, call: &str) -> Result<()> {
    let options = options(Duration::from_secs(60));
    let work = migrate::migrate(connection, launchers, &options, std::future::pending());
    tokio::pin!(work);
    let reached = async {
        while !launchers.calls().iter().any(|c| c.starts_with(call)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        outcome = &mut work => anyhow::bail!("the migration ended before `{call}`: {:?}", outcome.err()),
        () = reached => Ok(()),
    }
}

/// The plugin killed mid-stream: `status` lists the migration as uncommitted, the preflight
/// refuses a new one naming `abort`, `resume` refuses, and `abort` deletes the target and
/// resumes the source; a second `abort` has nothing left to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_before_the_commit_is_aborted_by_command() -> Result<()> {
    if !apiserver_tests_can_run("a_plugin_killed_before_the_commit_is_aborted_by_command") {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    let driver = kubelet(&server, Kubelet::Runs);
    let launchers = StandIn::new(connection.client.clone(), Transfer::Hangs);
    killed_at(&connection, &launchers, "transfer").await?;
    let _ = driver.join();

    let found = recover::list(&connection.client, "apps", Some("counter"), &launchers).await?;
    ensure!(found.len() == 1, "{found:?}");
    ensure!(
        !found[0].committed
            && found[0].phase == "checkpointing"
            && found[0].target.as_deref() == Some("counter-m1"),
        "{found:?}"
    );
    let facts = check::gather(
        &connection.client,
        "apps",
        "counter",
        "node-b",
        &launchers,
        false,
    )
    .await?
    .map_err(|p| anyhow::anyhow!("{p}"))?;
    let problems: Vec<String> = check::problems(&facts)
        .iter()
        .map(ToString::to_string)
        .collect();
    ensure!(
        problems
            .iter()
            .any(|p| p.contains("did not finish") && p.contains("kubectl migrate abort counter")),
        "the preflight does not name the leftover: {problems:?}"
    );

    let fresh = StandIn::new(connection.client.clone(), Transfer::Works);
    let refused = recover::resume(&connection, &fresh, "counter").await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("kubectl migrate abort counter")),
        "resume of an uncommitted migration: {refused:?}"
    );
    let done = recover::abort(&connection, &fresh, "counter").await?;
    ensure!(
        matches!(
            done,
            migrate::Aftermath::Undone {
                restarted: false,
                ..
            }
        ) && done.text().contains("deleted the target pod counter-m1"),
        "{done:?}"
    );
    ensure!(
        fresh
            .calls()
            .iter()
            .any(|c| c == "rollback --committed counter/counter"),
        "the source was not resumed: {:?}",
        fresh.calls()
    );
    ensure!(
        deleted(&connection, "counter-m1").await?,
        "the target is still there"
    );
    ensure!(
        !deleted(&connection, "counter").await?,
        "the source was deleted"
    );
    ensure!(
        recover::list(&connection.client, "apps", None, &launchers)
            .await?
            .is_empty()
    );
    let again = recover::abort(&connection, &fresh, "counter").await?;
    ensure!(
        matches!(again, migrate::Aftermath::Untouched { .. })
            && again.text().contains("nothing to abort"),
        "{again:?}"
    );
    Ok(())
}

/// The plugin killed after the commit, before the thaw: `status` lists it as committed,
/// `abort` refuses naming `resume`, and `resume` thaws the target and deletes the source,
/// never resuming the stale source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_after_the_commit_is_resumed_by_command() -> Result<()> {
    if !apiserver_tests_can_run("a_plugin_killed_after_the_commit_is_resumed_by_command") {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    let driver = kubelet(&server, Kubelet::Runs);
    let mut launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    launchers.thaw_hangs = true;
    killed_at(&connection, &launchers, "thaw").await?;
    let _ = driver.join();

    let found = recover::list(&connection.client, "apps", None, &launchers).await?;
    // Past the commit the target is thawed first and the source deleted only after it: the
    // thaw hangs, so the source is still there, committed; only finishing is allowed.
    ensure!(
        found.len() == 1 && found[0].committed && found[0].phase == "committed",
        "{found:?}"
    );
    let fresh = StandIn::new(connection.client.clone(), Transfer::Works);
    let refused = recover::abort(&connection, &fresh, "counter").await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("kubectl migrate resume counter")),
        "abort of a committed migration: {refused:?}"
    );
    let done = recover::resume(&connection, &fresh, "counter-m1").await?;
    ensure!(done.contains("finished migration"), "{done}");
    let calls = fresh.calls();
    ensure!(
        calls.iter().any(|c| c == "thaw counter-m1/counter"),
        "{calls:?}"
    );
    ensure!(
        !calls.iter().any(|c| c.starts_with("rollback")),
        "{calls:?}"
    );
    ensure!(
        deleted(&connection, "counter").await?,
        "the source is still there"
    );
    ensure!(
        !deleted(&connection, "counter-m1").await?,
        "the target was deleted"
    );
    ensure!(
        recover::list(&connection.client, "apps", None, &launchers)
            .await?
            .is_empty()
    );
    let again = recover::resume(&connection, &fresh, "counter").await?;
    ensure!(again.contains("nothing to resume"), "{again}");
    Ok(())
}

/// The freeze is bounded: an app that would stay frozen past `--max-downtime` (or what its
/// liveness probes allow) is resumed by an undo before a probe could restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_longer_than_max_downtime_is_undone() -> Result<()> {
    if !apiserver_tests_can_run("a_freeze_longer_than_max_downtime_is_undone") {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    let driver = kubelet(&server, Kubelet::Runs);
    let launchers = StandIn::new(connection.client.clone(), Transfer::Hangs);
    let mut options = options(Duration::from_secs(60));
    options.max_downtime = Some(Duration::from_secs(2));
    let start = std::time::Instant::now();
    let failed = migrate::migrate(&connection, &launchers, &options, std::future::pending())
        .await
        .err()
        .context("a freeze past --max-downtime must fail the migration")?;
    let _ = driver.join();
    ensure!(
        matches!(failed.error, MigrateError::FrozenTooLong { .. })
            && matches!(failed.aftermath, migrate::Aftermath::Undone { .. }),
        "{failed}"
    );
    ensure!(
        start.elapsed() < Duration::from_secs(30),
        "the limit was not enforced"
    );
    let text = failed.to_string();
    ensure!(
        text.contains("longer than 2s") && text.contains("deleted the target pod counter-m1"),
        "{text}"
    );
    ensure!(
        launchers
            .calls()
            .iter()
            .any(|c| c == "rollback --committed counter/counter"),
        "the source was not resumed: {:?}",
        launchers.calls()
    );
    Ok(())
}

/// A plugin committing and a user aborting at the same moment: the source's phase is claimed
/// with a resourceVersion precondition, so exactly one wins and the other is told what won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_and_an_abort_racing_settle_on_exactly_one() -> Result<()> {
    if !apiserver_tests_can_run("a_commit_and_an_abort_racing_settle_on_exactly_one") {
        return Ok(());
    }
    let (_server, connection) = cluster().await?;
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), "apps");
    let mark = |phase: &str| {
        serde_json::json!({"metadata": {"annotations": {
            "migrate.kubectl.io/phase": phase, "migrate.kubectl.io/id": "mig-race"}}})
    };
    for first in [migrate::Phase::Aborting, migrate::Phase::Committed] {
        pods.patch(
            "counter",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&mark("checkpointing")),
        )
        .await?;
        let second = if first == migrate::Phase::Aborting {
            migrate::Phase::Committed
        } else {
            migrate::Phase::Aborting
        };
        let (a, b) = tokio::join!(
            migrate::claim(&pods, "counter", "mig-race", first),
            migrate::claim(&pods, "counter", "mig-race", second)
        );
        let won: Vec<bool> = vec![a.is_ok(), b.is_ok()];
        ensure!(
            won.iter().filter(|w| **w).count() == 1,
            "racing claims {first}/{second}: {a:?} {b:?}"
        );
        let phase = pods
            .get("counter")
            .await?
            .metadata
            .annotations
            .unwrap_or_default()
            .get("migrate.kubectl.io/phase")
            .cloned()
            .unwrap_or_default();
        let loser = if a.is_ok() { &b } else { &a };
        ensure!(
            matches!(loser, Err(migrate::Claim::Taken { phase: Some(p), by: None }) if p.as_str() == phase),
            "the loser was not told what won ({phase}): {loser:?}"
        );
        // Once settled, the other claim is refused whatever the order.
        let late = migrate::claim(
            &pods,
            "counter",
            "mig-race",
            if phase == "committed" {
                migrate::Phase::Aborting
            } else {
                migrate::Phase::Committed
            },
        )
        .await;
        ensure!(
            matches!(late, Err(migrate::Claim::Taken { .. })),
            "{late:?}"
        );
    }
    Ok(())
}

/// `kubectl migrate abort` marks the source `aborting` while the plugin waits for its target:
/// the plugin stops before freezing anything (it cannot overwrite the mark), so no commit can
/// follow an abort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_while_the_target_starts_stops_the_plugin_before_the_freeze() -> Result<()> {
    if !apiserver_tests_can_run(
        "an_abort_while_the_target_starts_stops_the_plugin_before_the_freeze",
    ) {
        return Ok(());
    }
    let (_server, connection) = cluster().await?;
    let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), "apps");
    // The abort, then the target coming up: what a user running `abort` sees happen.
    let aborter = {
        let pods = pods.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                if pods.get_opt("counter-m1").await.ok().flatten().is_some() {
                    let mark = serde_json::json!({"metadata": {"annotations": {
                        "migrate.kubectl.io/phase": "aborting"}}});
                    let _ = pods
                        .patch(
                            "counter",
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&mark),
                        )
                        .await;
                    let running = serde_json::json!({"status": {"phase": "Running", "containerStatuses": [{"name": "counter", "ready": true,
                        "restartCount": 0, "image": "localhost/migrate/counter:v1", "imageID": "", "state": {"running": {"startedAt": "2026-11-22T00:00:00Z"}}}]}});
                    let _ = pods
                        .patch_status(
                            "counter-m1",
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&running),
                        )
                        .await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let failed = must_fail(&connection, &launchers, 60, std::future::pending()).await?;
    let _ = aborter.await;
    let text = failed.to_string();
    ensure!(
        text.contains("cannot go on") && text.contains("aborting"),
        "{text}"
    );
    let calls = launchers.calls();
    ensure!(
        !calls
            .iter()
            .any(|c| c.starts_with("freeze") || c.starts_with("commit")),
        "the plugin went on after the abort: {calls:?}"
    );
    ensure!(
        deleted(&connection, "counter-m1").await?,
        "the target was left"
    );
    Ok(())
}

/// Sets condition `kind` of pod `name` (strategic merge: the other conditions stay), as the
/// kubelet would.
async fn set_condition(connection: &Connection, name: &str, kind: &str, value: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), "apps");
    let patch = serde_json::json!({"status": {"conditions": [{"type": kind, "status": value}]}});
    pods.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Strategic(&patch),
    )
    .await?;
    Ok(())
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// A ReplicaSet's pod (the ReplicaSet object is real; no controller runs here, so the test
/// watches the writes themselves): the target is created with no labels and no owner; after
/// the thaw, the handoff waits while the target or the ReplicaSet's other pod is not Ready
/// (the ReplicaSet would delete a not-Ready pod before any deletion cost counts); then the
/// source gets the lowest deletion cost, the target the ReplicaSet as controller with the
/// source's labels, the source is deleted, and the target keeps no deletion cost and no
/// handoff annotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_set_pod_is_handed_over_only_once_every_pod_of_it_is_ready() -> Result<()> {
    if !apiserver_tests_can_run(
        "a_replica_set_pod_is_handed_over_only_once_every_pod_of_it_is_ready",
    ) {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    server.apply(
        "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: web-1\n  namespace: apps\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: counter}}\n  template:\n    metadata: {labels: {app: counter}}\n    spec: {containers: [{name: counter, image: localhost/migrate/counter:v1}]}\n",
    )?;
    server.patch_status(
        "replicaset",
        "web-1",
        Some("apps"),
        &serde_json::json!({"status": {"replicas": 2, "readyReplicas": 2}}),
    )?;
    let replica_sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(connection.client.clone(), "apps");
    let uid = replica_sets
        .get("web-1")
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    let owner = format!(
        "[{{apiVersion: apps/v1, kind: ReplicaSet, name: web-1, uid: {uid}, controller: true, blockOwnerDeletion: true}}]"
    );
    server.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: counter\n  namespace: apps\n  labels: {{app: counter}}\n  ownerReferences: {owner}\nspec:\n  nodeName: node-a\n  containers:\n  - name: counter\n    image: localhost/migrate/counter:v1\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: twin\n  namespace: apps\n  labels: {{app: counter}}\n  ownerReferences: {owner}\nspec:\n  nodeName: node-b\n  containers:\n  - name: counter\n    image: localhost/migrate/counter:v1\n"
    ))?;
    server.patch_status(
        "pod",
        "twin",
        Some("apps"),
        &serde_json::json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
    )?;
    let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    // The kubelet's part: the target runs; it turns Ready only once the plugin has set its
    // serving gate; meanwhile the other replica has turned unready and comes back later.
    let kubelet_part = async {
        let pods: Api<Pod> = Api::namespaced(connection.client.clone(), "apps");
        let mut created = None;
        for _ in 0..600 {
            if let Some(target) = pods.get_opt("counter-m1").await? {
                created = Some(target);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let target = created.context("no target pod")?;
        ensure!(
            target.metadata.labels.is_none() && target.metadata.owner_references.is_none(),
            "the target must be created with no labels and no owner: {:?}",
            target.metadata
        );
        set_condition(&connection, "twin", "Ready", "False").await?;
        let mut serving = false;
        for _ in 0..600 {
            let target = pods.get("counter-m1").await?;
            if condition(&target, "migrate.kubectl.io/serving").as_deref() == Some("True") {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(serving, "the plugin never set the target's serving gate");
        set_condition(&connection, "counter-m1", "Ready", "True").await?;
        // Two seconds with the other replica unready: nothing may be handed over.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let target = pods.get("counter-m1").await?;
        let source = pods.get("counter").await?;
        ensure!(
            target.metadata.owner_references.is_none()
                && source.metadata.deletion_timestamp.is_none(),
            "the target was handed over (or the source deleted) while another pod of the ReplicaSet was not Ready"
        );
        set_condition(&connection, "twin", "Ready", "True").await?;
        Ok::<(), anyhow::Error>(())
    };
    let driver = kubelet(&server, Kubelet::Runs);
    let moving = options(Duration::from_secs(60));
    let (outcome, kubelet_part) = tokio::join!(
        migrate::migrate(&connection, &launchers, &moving, std::future::pending()),
        kubelet_part
    );
    let _ = driver.join();
    kubelet_part?;
    let report =
        outcome.map_err(|e| anyhow::anyhow!("the migration should have succeeded: {e}"))?;
    ensure!(report.source_deleted, "{report:?}");
    let target = pod(&connection, "counter-m1").await?.context("no target")?;
    let owners = target.metadata.owner_references.clone().unwrap_or_default();
    ensure!(
        owners.len() == 1 && owners[0].uid == uid && owners[0].controller == Some(true),
        "the target is not the ReplicaSet's: {owners:?}"
    );
    ensure!(
        target.metadata.labels.clone().unwrap_or_default()
            == [("app".to_string(), "counter".to_string())].into(),
        "the target lacks the source's labels: {:?}",
        target.metadata.labels
    );
    let notes = target.metadata.annotations.clone().unwrap_or_default();
    for gone in [
        "controller.kubernetes.io/pod-deletion-cost",
        "migrate.kubectl.io/owner",
        "migrate.kubectl.io/held-labels",
    ] {
        ensure!(
            !notes.contains_key(gone),
            "the target kept {gone}: {notes:?}"
        );
    }
    ensure!(
        notes.get("migrate.kubectl.io/phase").map(String::as_str) == Some("done")
            && notes
                .get("migrate.kubectl.io/wait-for-checkpoint")
                .map(String::as_str)
                == Some("false"),
        "{notes:?}"
    );
    // Without a kubelet the deleted source keeps its object: its last writes are readable.
    let source = pod(&connection, "counter").await?.context("no source")?;
    ensure!(
        source.metadata.deletion_timestamp.is_some()
            && source
                .metadata
                .annotations
                .clone()
                .unwrap_or_default()
                .get("controller.kubernetes.io/pod-deletion-cost")
                .map(String::as_str)
                == Some("-2147483648"),
        "the source was not deleted with the lowest deletion cost: {:?}",
        source.metadata
    );
    Ok(())
}

/// A StatefulSet pod's move is found by its holder, which counts as committed only once the
/// commit is recorded (on the holder, or on a source that is there): a holder whose source
/// went without a commit (it resumed by its lease, then was deleted) holds a stale checkpoint,
/// so `resume` is refused and `abort` deletes the holder, never restoring it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_set_holder_counts_as_committed_only_with_the_commit_recorded() -> Result<()> {
    if !apiserver_tests_can_run(
        "a_stateful_set_holder_counts_as_committed_only_with_the_commit_recorded",
    ) {
        return Ok(());
    }
    let (server, connection) = cluster().await?;
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), "apps");
    let source: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-0", "namespace": "apps", "annotations": {
            "migrate.kubectl.io/id": "mig-7", "migrate.kubectl.io/phase": "checkpointing",
            "migrate.kubectl.io/peer": "web-0-m1"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "i"}]}
    }))?;
    let source = pods.create(&Default::default(), &source).await?;
    let holder = kubectl_migrate::rewrite::holder_pod(&source, "node-b", "mig-7");
    pods.create(&Default::default(), &holder).await?;

    let listed = |committed: bool, phase: &str| {
        let connection = &connection;
        let phase = phase.to_string();
        async move {
            let found = kubectl_migrate::record::in_flight_migrations(
                &connection.client,
                "apps",
                Some("web-0"),
            )
            .await?;
            ensure!(
                found.len() == 1
                    && found[0].committed == committed
                    && found[0].phase == phase
                    && found[0].target.as_deref() == Some("web-0-m1"),
                "expected committed={committed}, phase {phase}: {found:?}"
            );
            Ok::<_, anyhow::Error>(found[0].next_step())
        }
    };
    ensure!(listed(false, "checkpointing").await? == "kubectl migrate abort web-0");
    let commit =
        serde_json::json!({"metadata": {"annotations": {"migrate.kubectl.io/phase": "committed"}}});
    pods.patch("web-0", &PatchParams::default(), &Patch::Merge(&commit))
        .await?;
    ensure!(listed(true, "committed").await? == "kubectl migrate resume web-0");

    // The source gone without a commit (back to `checkpointing`, then deleted): stale.
    let uncommit = serde_json::json!({"metadata": {"annotations": {"migrate.kubectl.io/phase": "checkpointing"}}});
    pods.patch("web-0", &PatchParams::default(), &Patch::Merge(&uncommit))
        .await?;
    pods.delete("web-0", &DeleteParams::default().grace_period(0))
        .await?;
    ensure!(
        deleted(&connection, "web-0").await?,
        "the source is still there"
    );
    ensure!(listed(false, "source-deleted").await? == "kubectl migrate abort web-0");
    let launchers = StandIn::new(connection.client.clone(), Transfer::Works);
    let refused = recover::resume(&connection, &launchers, "web-0").await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("is not committed")),
        "resume of a stale holder: {refused:?}"
    );
    let done = recover::abort(&connection, &launchers, "web-0").await?;
    ensure!(
        matches!(done, migrate::Aftermath::Undone { .. })
            && done.text().contains("deleted the target pod web-0-m1")
            && done
                .text()
                .contains("deleted the admission policy kubectl-migrate-mig-7"),
        "{done:?}"
    );
    ensure!(
        !launchers.calls().iter().any(|c| c.starts_with("unpark")),
        "the stale checkpoint was sent on: {:?}",
        launchers.calls()
    );
    drop(server);
    Ok(())
}
