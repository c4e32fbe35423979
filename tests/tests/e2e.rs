//! End to end, as a user runs it: a real local cluster (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, two kubelets with containerd, node-a's running
//! containers with runc and node-b's with crun; `migrate_tests::cluster`), the example images built by `cargo
//! xtask images`, and `kubectl migrate` -- the built plugin found by kubectl on PATH -- moving
//! running pods while the tests watch what a user would: `kubectl logs`, `kubectl get`, the
//! pod's IP answering, the exit code and the message.
//!
//! One cluster serves every test (starting one takes ~20 s), so this file has its own harness
//! (libtest-mimic) that starts it, runs the tests one at a time and tears it down. Each test
//! uses pods of its own names.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use libtest_mimic::{Arguments, Failed, Trial};
use migrate_tests::cluster::{Cluster, cluster_tests_can_run};
use migrate_tests::{counter_values, expected_revenue, workspace, workspace_binary};

const WAIT: Duration = Duration::from_secs(90);

#[path = "e2e/declarative.rs"]
mod declarative;
#[path = "e2e/probes.rs"]
mod probes;
#[path = "e2e/servers.rs"]
mod servers;
#[path = "e2e/transfer.rs"]
mod transfer;
#[path = "e2e/workloads.rs"]
mod workloads;

/// One end-to-end test, run against the shared cluster.
type Scenario = fn(&Cluster) -> Result<()>;

fn main() {
    let args = Arguments::from_args();
    let tests: &[(&str, Scenario)] = &[
        (
            "counter_moves_to_another_node_and_keeps_counting",
            counter_moves_to_another_node,
        ),
        (
            "a_direct_transfer_moves_the_counter_and_its_downtime_matches_the_logs",
            transfer::direct_transfer_moves_the_counter_and_the_downtime_matches_the_logs,
        ),
        (
            "a_peer_without_the_secret_gets_nothing_and_a_wrong_secret_undoes",
            transfer::a_peer_without_the_secret_gets_nothing_and_a_wrong_secret_undoes,
        ),
        (
            "a_blocked_direct_path_fails_direct_and_falls_back_to_the_relay_with_auto",
            transfer::a_blocked_direct_path_fails_direct_and_falls_back_with_auto,
        ),
        (
            "post_copy_moves_the_counter_and_deletes_the_source_after_the_last_page",
            transfer::post_copy_moves_the_counter_and_deletes_the_source_after_the_last_page,
        ),
        (
            "a_post_copy_cut_before_the_last_page_goes_back_to_the_source",
            transfer::a_post_copy_cut_before_the_last_page_goes_back_to_the_source,
        ),
        (
            "a_deployment_pod_moves_and_its_replica_set_never_makes_or_deletes_a_replica",
            workloads::deployment_pod_moves_with_a_handoff,
        ),
        (
            "a_deployment_pod_with_a_damaged_archive_rolls_back_and_its_replica_set_is_unchanged",
            workloads::deployment_pod_rolls_back_on_a_damaged_archive,
        ),
        (
            "a_deployment_pod_move_killed_after_its_commit_is_resumed_without_a_fresh_replica",
            workloads::deployment_pod_move_resumes_after_a_kill,
        ),
        (
            "a_stateful_set_pod_moves_keeping_its_name_and_the_controller_never_starts_it_fresh",
            workloads::stateful_set_pod_moves_keeping_its_name,
        ),
        (
            "daemon_set_and_job_pods_are_refused_by_check_with_their_reasons",
            workloads::daemon_set_and_job_pods_are_refused_with_their_reasons,
        ),
        (
            "counter_moves_within_its_node",
            counter_moves_within_its_node,
        ),
        (
            "a_restart_after_a_migration_starts_the_app_fresh",
            restart_after_migration_starts_fresh,
        ),
        (
            "a_native_sidecar_moves_with_its_app",
            native_sidecar_moves_with_its_app,
        ),
        (
            "web_pod_moves_with_a_consistent_cut_and_nginx_answers",
            web_pod_moves,
        ),
        (
            "damaged_archive_in_transit_rolls_back_and_the_source_keeps_counting",
            damaged_archive_rolls_back,
        ),
        (
            "the_release_plugin_ignores_the_fault_variable",
            release_plugin_ignores_the_fault_variable,
        ),
        (
            "interrupted_plugin_leaves_the_source_running",
            interrupted_plugin_leaves_the_source_running,
        ),
        (
            "a_target_whose_work_directory_is_full_is_refused_as_no_space",
            target_work_dir_full,
        ),
        (
            "a_taken_target_name_moves_on_to_the_next",
            taken_target_name,
        ),
        (
            "a_plugin_killed_at_each_stage_is_recovered_by_status_then_abort_or_resume",
            plugin_killed_at_each_stage,
        ),
        (
            "a_plugin_killed_mid_stream_is_aborted_and_the_source_counts_on",
            plugin_killed_mid_stream,
        ),
        (
            "a_plugin_killed_and_never_run_again_leaves_a_source_that_resumes_after_its_lease",
            plugin_killed_source_resumes_by_lease,
        ),
        (
            "the_api_server_restarted_mid_stream_leaves_one_copy_counting",
            apiserver_restarted_mid_stream,
        ),
        (
            "the_targets_kubelet_stopped_mid_restore_leaves_one_copy_counting",
            target_kubelet_stopped_mid_restore,
        ),
        (
            "the_source_container_killed_mid_checkpoint_is_reported_and_leaves_one_copy",
            source_container_killed_mid_checkpoint,
        ),
        (
            "a_frozen_app_is_restarted_by_an_http_liveness_probe_not_a_tcp_one_and_the_preflight_refuses_the_first",
            liveness_probes_measured,
        ),
        (
            "pods_carry_only_the_launchers_capabilities",
            least_capabilities,
        ),
        (
            "plugin_memory_stays_flat_across_real_exec_streams",
            plugin_memory_flat,
        ),
        (
            "a_run_as_non_root_pod_moves_with_its_count_and_a_missing_capability_is_named",
            servers::non_root_pod_moves,
        ),
        (
            "the_apps_user_cannot_borrow_the_launchers_capabilities",
            servers::the_apps_user_cannot_borrow_the_launchers_capabilities,
        ),
        (
            "a_user_pods_orphan_fails_the_checkpoint_and_the_source_keeps_counting",
            servers::a_user_pods_orphan_fails_the_checkpoint_and_the_source_keeps_counting,
        ),
        (
            "in_a_uid_1000_pod_a_shell_of_the_apps_user_cannot_resume_a_committed_copy",
            servers::a_shell_of_the_apps_user_cannot_resume_a_committed_copy,
        ),
        (
            "a_sysv_ipc_app_moves_in_its_own_ipc_namespace_and_is_refused_without_it",
            servers::sysv_app_moves_in_its_ipc_namespace,
        ),
        (
            "postgres_moves_as_the_postgres_user_with_its_memory_while_clients_reconnect",
            servers::postgres_moves_with_clients,
        ),
        (
            "redis_moves_as_the_redis_user_with_the_keys_it_holds_only_in_memory",
            servers::redis_moves_with_its_keys,
        ),
        (
            "pod_migrations_are_carried_out_by_the_in_cluster_controller_and_a_duplicate_is_refused",
            declarative::the_controller_carries_out_pod_migrations,
        ),
        (
            "the_in_cluster_controller_killed_mid_migration_ends_it_with_one_copy_counting",
            declarative::a_controller_killed_mid_migration_ends_it_with_one_copy_counting,
        ),
        (
            "a_pod_migration_racing_the_plugin_leaves_one_copy_and_the_loser_told",
            declarative::a_pod_migration_racing_the_plugin_leaves_one_copy,
        ),
        (
            "a_node_labelled_for_drain_is_emptied_by_the_in_cluster_controller",
            declarative::a_node_labelled_for_drain_is_emptied,
        ),
        (
            "a_dead_plugin_leaves_a_probed_source_that_resumes_within_its_budget",
            probes::a_dead_plugin_leaves_a_probed_source_that_resumes_within_its_budget,
        ),
        (
            "a_target_waiting_past_the_probe_budget_is_not_restarted_and_its_probe_works_after",
            probes::a_target_waiting_past_the_probe_budget_is_not_restarted_and_its_probe_works_after,
        ),
        (
            "a_target_that_lost_the_app_after_the_commit_keeps_the_source",
            probes::a_target_that_lost_the_app_after_the_commit_keeps_the_source,
        ),
        (
            "a_deployment_source_killed_by_its_probe_after_the_commit_never_serves_twice",
            probes::a_deployment_source_killed_by_its_probe_after_the_commit_never_serves_twice,
        ),
        (
            "two_migrations_of_one_pod_end_with_one_copy_and_the_loser_told",
            probes::two_migrations_of_one_pod_end_with_one_copy_and_the_loser_told,
        ),
        // Last: it empties node-a of every pod the tests before left.
        (
            "drain_migrates_the_counters_evicts_the_rest_and_a_disruption_budget_stops_it",
            workloads::drain_migrates_what_it_can_and_evicts_the_rest,
        ),
    ];
    let cluster: Arc<Mutex<Option<Cluster>>> = Arc::new(Mutex::new(None));
    let wanted = |name: &str| args.filter.as_deref().is_none_or(|f| name.contains(f));
    if tests.iter().any(|(name, _)| wanted(name)) && !args.list && cluster_tests_can_run("e2e") {
        let dir = tempfile::Builder::new()
            .prefix("e2e-cluster-")
            .tempdir()
            .expect("temp dir")
            .keep();
        match Cluster::start(&dir, 2) {
            Ok(started) => *cluster.lock().expect("lock") = Some(started),
            Err(error) => eprintln!("the cluster did not start: {error:#}"),
        }
    }
    let ready = cluster.lock().expect("lock").is_some();
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            let cluster = Arc::clone(&cluster);
            Trial::test(name, move || {
                let guard = cluster.lock().expect("lock");
                let Some(cluster) = guard.as_ref() else {
                    return Err(Failed::from("no cluster (see above)"));
                };
                // The cause again after the diagnosis: CI shows only the output's tail.
                test(cluster).map_err(|e| {
                    Failed::from(format!(
                        "{e:#}\n{}\n=== {name} failed: {e:#}",
                        cluster.diagnose()
                    ))
                })
            })
            // Outside CI a machine without a cluster skips them; under CI a cluster that did
            // not start fails every trial (it never passes by not running).
            .with_ignored_flag(!ready && std::env::var_os("CI").is_none())
        })
        .collect();
    let mut args = args;
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, trials);
    drop(cluster.lock().expect("lock").take());
    conclusion.exit();
}

/// A pod YAML from `images/examples` pinned to `node`, renamed, with extra container env.
fn example_pod(file: &str, name: &str, node: &str, env: &[(&str, &str)]) -> Result<String> {
    let yaml = std::fs::read_to_string(workspace().join("images/examples").join(file))?;
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    pod["metadata"]["name"] = name.into();
    pod["metadata"]["labels"]["app"] = name.into();
    pod["spec"]["nodeName"] = node.into();
    for container in pod["spec"]["containers"]
        .as_sequence_mut()
        .context("containers")?
    {
        let list = container
            .as_mapping_mut()
            .context("container")?
            .entry("env".into())
            .or_insert_with(|| serde_yaml::Value::Sequence(Vec::new()));
        for (key, value) in env {
            let mut var = serde_yaml::Mapping::new();
            var.insert("name".into(), (*key).into());
            var.insert("value".into(), (*value).into());
            list.as_sequence_mut().context("env")?.push(var.into());
        }
    }
    Ok(serde_yaml::to_string(&pod)?)
}

fn run_counter(cluster: &Cluster, name: &str, node: &str, env: &[(&str, &str)]) -> Result<()> {
    let mut all = vec![("COUNTER_INTERVAL", "0.5")];
    all.extend_from_slice(env);
    cluster.apply(&example_pod("counter/pod.yaml", name, node, &all)?)?;
    cluster.wait_running(name, WAIT)?;
    wait_until(&format!("{name} counts"), WAIT, || {
        Ok((counter_values(&logs(cluster, name, None)).len() >= 4).then_some(()))
    })
}

/// The app moved from `source` to `target`: the source is gone, and the target counts on
/// from the source's last count (`follow` followed the source). The last and the first count.
fn counted_on(cluster: &Cluster, source: &str, target: &str, follow: Follow) -> Result<(u64, u64)> {
    wait_gone(cluster, source)?;
    let before = follow.finish(WAIT);
    wait_until(&format!("3 counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, target, None)).len() >= 3).then_some(()))
    })?;
    assert_continued(&before, &logs(cluster, target, None))
}

/// `kubectl migrate status POD` lists no migration of `pod`.
fn nothing_in_flight(cluster: &Cluster, pod: &str) -> Result<()> {
    let listed = kubectl_migrate(cluster, &["status", pod]).output()?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).contains("no unfinished migrations"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    Ok(())
}

/// The migration id a successful move's report names: `… (migration mig-…)`.
fn reported_id(report: &str) -> Option<String> {
    report
        .split("(migration ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .map(str::to_string)
}

/// `restore-launcher status` in `pod` (and `container`), as JSON.
fn launcher_status(
    cluster: &Cluster,
    pod: &str,
    container: Option<&str>,
) -> Result<serde_json::Value> {
    let mut args = vec!["exec", pod];
    if let Some(c) = container {
        args.extend(["-c", c]);
    }
    args.extend(["--", "restore-launcher", "status"]);
    Ok(serde_json::from_str(&cluster.kubectl_ok(&args)?)?)
}

fn logs(cluster: &Cluster, pod: &str, container: Option<&str>) -> String {
    let mut args = vec!["logs", pod];
    if let Some(c) = container {
        args.extend(["-c", c]);
    }
    cluster.kubectl_ok(&args).unwrap_or_default()
}

/// `kubectl logs --follow POD`, collected until the container ends (its last lines survive
/// the pod's deletion this way).
struct Follow {
    child: Child,
    lines: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follow {
    fn start(cluster: &Cluster, pod: &str) -> Result<Follow> {
        let mut child = cluster
            .kubectl(&["logs", "--follow", pod])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut text = sink.lock().expect("lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Ok(Follow {
            child,
            lines,
            reader: Some(reader),
        })
    }

    fn text(&self) -> String {
        self.lines.lock().expect("lock").clone()
    }

    /// Waits for the stream to end (the container stopped), then returns everything.
    fn finish(mut self, limit: Duration) -> String {
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.text()
    }
}

/// The plugin's directory first on PATH, so `kubectl migrate` runs the built `kubectl-migrate`.
fn plugin_path() -> std::ffi::OsString {
    plugin_path_with(&workspace_binary("kubectl-migrate"))
}

/// PATH with the directory of the `plugin` binary first.
fn plugin_path_with(plugin: &std::path::Path) -> std::ffi::OsString {
    let mut paths = vec![plugin.parent().map(PathBuf::from).unwrap_or_default()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}

/// `kubectl migrate ARGS` through kubectl's plugin mechanism.
fn kubectl_migrate(cluster: &Cluster, args: &[&str]) -> Command {
    let mut cmd = cluster.kubectl(&["migrate"]);
    cmd.args(args).env("PATH", plugin_path());
    cmd
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn migrate(cluster: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Result<Outcome> {
    let output = kubectl_migrate(cluster, args)
        .envs(env.iter().copied())
        .output()?;
    Ok(Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// `kubectl migrate ARGS`, which must exit 0.
fn migrate_ok(cluster: &Cluster, args: &[&str], env: &[(&str, &str)]) -> Result<Outcome> {
    let out = migrate(cluster, args, env)?;
    ensure!(
        out.code == Some(0),
        "kubectl migrate exited {:?}:\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    Ok(out)
}

fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether `node` is cordoned (unschedulable).
fn cordoned(cluster: &Cluster, node: &str) -> Result<bool> {
    Ok(
        cluster.kubectl_ok(&["get", "node", node, "-o", "jsonpath={.spec.unschedulable}"])?
            == "true",
    )
}

fn pod_field(cluster: &Cluster, pod: &str, jsonpath: &str) -> Result<String> {
    cluster.kubectl_ok(&["get", "pod", pod, "-o", &format!("jsonpath={jsonpath}")])
}

fn wait_gone(cluster: &Cluster, pod: &str) -> Result<()> {
    wait_until(&format!("pod {pod} to be deleted"), WAIT, || {
        let output = cluster.kubectl(&["get", "pod", pod]).output()?;
        Ok((!output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains("NotFound"))
        .then_some(()))
    })
}

/// The count continued: the first value after is the last value before plus one, revenue
/// included (the app's whole state), and every later value follows on.
fn assert_continued(before: &str, after: &str) -> Result<(u64, u64)> {
    let before = counter_values(before);
    let after = counter_values(after);
    let last = *before.last().context("the source printed no count")?;
    let first = *after.first().context("the target printed no count")?;
    ensure!(
        first.0 == last.0 + 1,
        "the count did not continue: last on the source {last:?}, first on the target {first:?}"
    );
    for (events, revenue) in &after {
        ensure!(
            *revenue == expected_revenue(*events),
            "revenue {revenue} wrong at event {events}"
        );
    }
    for pair in after.windows(2) {
        ensure!(
            pair[1].0 == pair[0].0 + 1,
            "the target's count jumped: {pair:?}"
        );
    }
    Ok((last.0, first.0))
}

/// Runs counter pod `name` on `from`, moves it to `to` with `kubectl migrate`, and checks what
/// every successful move shows: exit 0, NAME-m1 Running on `to`, the source gone, and the
/// target's count continuing from the source's last. Returns the plugin's output and the
/// source's last and the target's first count.
/// `env` is the plugin's environment.
fn move_counter(
    cluster: &Cluster,
    name: &str,
    from: &str,
    to: &str,
    env: &[(&str, &str)],
) -> Result<(Outcome, u64, u64)> {
    move_counter_with(cluster, name, from, to, &[], env)
}

/// [`move_counter`] with more arguments for the plugin.
fn move_counter_with(
    cluster: &Cluster,
    name: &str,
    from: &str,
    to: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(Outcome, u64, u64)> {
    let target = format!("{name}-m1");
    run_counter(cluster, name, from, &[])?;
    let follow = Follow::start(cluster, name)?;
    let mut all = vec![name, "--to", to];
    all.extend_from_slice(args);
    let out = migrate_ok(cluster, &all, env)?;
    ensure!(
        pod_field(cluster, &target, "{.spec.nodeName}")? == to,
        "{target} is not on {to}"
    );
    cluster.wait_running(&target, WAIT)?;
    let before = follow.finish(WAIT);
    wait_gone(cluster, name)?;
    wait_until(&format!("3 counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
    })?;
    let (last, first) = assert_continued(&before, &logs(cluster, &target, None))?;
    // Thawed, the target takes Service traffic: its readiness gate is set, the pod Ready.
    let ready = pod_field(
        cluster,
        &target,
        "{.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"migrate.kubectl.io/serving\")].status}",
    )?;
    ensure!(
        ready == "True True",
        "the thawed target is not Ready: {ready}"
    );
    Ok((out, last, first))
}

fn counter_moves_to_another_node(cluster: &Cluster) -> Result<()> {
    let (out, last, first) = move_counter(cluster, "hop", "node-a", "node-b", &[])?;
    ensure!(
        out.stdout.contains("moved to node node-b as hop-m1"),
        "no summary line: {}",
        out.stdout
    );
    let downtime = out
        .stdout
        .lines()
        .find(|l| l.starts_with("downtime"))
        .context("no downtime in the timing table")?;
    let events = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=hop-m1",
        "-o",
        "jsonpath={.items[*].reason}",
    ])?;
    ensure!(
        events.contains("MigrationDone"),
        "no MigrationDone event on hop-m1: {events}"
    );
    let annotations = pod_field(cluster, "hop-m1", "{.metadata.annotations}")?;
    ensure!(
        annotations.contains("migrate.kubectl.io/id")
            && annotations.contains("migrate.kubectl.io/timings"),
        "hop-m1 lacks the migration annotations: {annotations}"
    );
    let restarts = pod_field(
        cluster,
        "hop-m1",
        "{.status.containerStatuses[0].restartCount}",
    )?;
    ensure!(restarts == "0", "hop-m1 restarted {restarts} times");
    // The move crossed runtime stacks (the Deployment test checks the source's side: runc).
    let runtime = cluster.oci_runtime_of("hop-m1")?;
    ensure!(
        runtime == "crun",
        "node-b's container did not run under crun but {runtime}"
    );
    eprintln!(
        "node-a → node-b ({runtime}): last count on the source {last}, first on the target {first}; {downtime}"
    );
    Ok(())
}

fn counter_moves_within_its_node(cluster: &Cluster) -> Result<()> {
    move_counter(cluster, "stay", "node-b", "node-b", &[]).map(drop)
}

/// GET http://IP:8080/PATH with a plain HTTP/1.0 request; the status code and body.
fn http_get(cluster: &Cluster, ip: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = cluster.connect(&format!("{ip}:8080"), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The writer's line numbers, checked to be exactly 1, 2, 3, …: no line lost, none repeated,
/// no restart from 1.
fn stamp_numbers(body: &str) -> Result<Vec<u64>> {
    let numbers: Vec<u64> = body
        .lines()
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("a line without its number")
        })
        .collect::<Result<_>>()?;
    for (i, n) in numbers.iter().enumerate() {
        ensure!(
            *n == i as u64 + 1,
            "line {} is numbered {n}: the writer's file is not one unbroken run:\n{body}",
            i + 1
        );
    }
    Ok(numbers)
}

fn web_pod_moves(cluster: &Cluster) -> Result<()> {
    cluster.apply(&example_pod("web/pod.yaml", "web", "node-a", &[])?)?;
    cluster.wait_running("web", WAIT)?;
    let ip = pod_field(cluster, "web", "{.status.podIP}")?;
    let before = wait_until("3 stamps served by nginx", WAIT, || {
        Ok(http_get(cluster, &ip, "/stamps.log")
            .ok()
            .filter(|(code, body)| *code == 200 && body.lines().count() >= 3))
    })?;
    let before_numbers = stamp_numbers(&before.1)?;

    let out = migrate_ok(cluster, &["web", "--to", "node-b"], &[])?;
    // Both containers' archives went pod to pod (the default), one consistent cut.
    ensure!(
        out.stdout.matches(": direct transfer").count() == 2,
        "not both containers moved directly:\n{}",
        out.stdout
    );
    cluster.wait_running("web-m1", WAIT)?;
    wait_gone(cluster, "web")?;
    let new_ip = pod_field(cluster, "web-m1", "{.status.podIP}")?;
    ensure!(new_ip != ip, "the new pod kept the old IP {ip}");
    let restarts = pod_field(
        cluster,
        "web-m1",
        "{.status.containerStatuses[*].restartCount}",
    )?;
    ensure!(
        restarts.split_whitespace().all(|r| r == "0"),
        "containers restarted: {restarts}"
    );
    // Two more stamps after the move, served by the restored nginx on the new pod's IP.
    let after = wait_until("nginx on the new pod serving new stamps", WAIT, || {
        Ok(http_get(cluster, &new_ip, "/stamps.log")
            .ok()
            .filter(|(code, body)| {
                *code == 200 && body.lines().count() >= before_numbers.len() + 4
            }))
    })?;
    let after_numbers = stamp_numbers(&after.1)?;
    ensure!(
        after.1.starts_with(&before.1),
        "the file on the new pod does not start with the lines served before the move"
    );
    let nginx_log = logs(cluster, "web-m1", Some("nginx"));
    ensure!(
        nginx_log.contains("GET /stamps.log"),
        "the restored nginx's log does not show the requests: {nginx_log}"
    );
    eprintln!(
        "web: {} stamps served on node-a at {ip}, {} on node-b at {new_ip}, one unbroken run 1..{}",
        before_numbers.len(),
        after_numbers.len(),
        after_numbers.len()
    );
    Ok(())
}

fn damaged_archive_rolls_back(cluster: &Cluster) -> Result<()> {
    run_counter(cluster, "fragile", "node-a", &[])?;
    let follow = Follow::start(cluster, "fragile")?;
    // The relay: the archive passes through the plugin, where the hook damages it.
    let out = migrate(
        cluster,
        &["fragile", "--to", "node-b", "--transfer", "relay"],
        &[("KUBECTL_MIGRATE_FAULT_FLIP_BYTE", "20000")],
    )?;
    ensure!(
        out.code.is_some_and(|c| c != 0),
        "a damaged archive must fail the migration: {:?}",
        out.code
    );
    ensure!(
        out.stderr.contains("restore failed")
            && out.stderr.contains("deleted the target pod fragile-m1"),
        "the message does not say what failed and what was undone:\n{}",
        out.stderr
    );
    ensure!(
        out.stderr.contains("resumed the source app")
            && out.stderr.contains("keeps running with its state"),
        "the message does not say the source keeps running:\n{}",
        out.stderr
    );
    wait_gone(cluster, "fragile-m1")?;
    source_kept_counting(cluster, "fragile", follow)?;
    cluster.kubectl_ok(&["delete", "pod", "fragile", "--wait=false"])?;
    Ok(())
}

/// Once a pod's restore is done, its container restarts like any container's: the restored
/// app killed with SIGKILL makes the kubelet restart the container (restart count 1), and the
/// new launcher starts the app fresh from the image's command -- it does not wait for a
/// checkpoint that never comes (the wait setting comes from the pod's annotation, which the
/// plugin turned off after the restore).
fn restart_after_migration_starts_fresh(cluster: &Cluster) -> Result<()> {
    move_counter(cluster, "phoenix", "node-a", "node-b", &[])?;
    let target = "phoenix-m1";
    let note = pod_field(
        cluster,
        target,
        "{.metadata.annotations.migrate\\.kubectl\\.io/wait-for-checkpoint}",
    )?;
    ensure!(
        note == "false",
        "the target still waits for a checkpoint: {note:?}"
    );
    let status = launcher_status(cluster, target, None)?;
    let app = status["app_pid"].as_i64().context("no app_pid")?;
    cluster.kubectl_ok(&[
        "exec",
        target,
        "--",
        "sh",
        "-c",
        &format!("kill -KILL {app}"),
    ])?;
    wait_until("the container to restart", WAIT, || {
        let restarts = pod_field(
            cluster,
            target,
            "{.status.containerStatuses[0].restartCount}",
        )?;
        let ready = pod_field(cluster, target, "{.status.containerStatuses[0].ready}")?;
        Ok((restarts == "1" && ready == "true").then_some(()))
    })?;
    let fresh = wait_until("the restarted app to count", WAIT, || {
        let values = counter_values(&logs(cluster, target, None));
        Ok((values.len() >= 2).then_some(values))
    })?;
    ensure!(
        fresh[0].0 == 1,
        "the restarted app did not start fresh: its first count is {:?}",
        fresh[0]
    );
    let status = launcher_status(cluster, target, None)?;
    ensure!(
        status["state"] == "running",
        "the restarted launcher is {}, not running",
        status["state"]
    );
    cluster.kubectl_ok(&["delete", "pod", target, "--wait=false"])?;
    Ok(())
}

/// A native sidecar (an init container with `restartPolicy: Always`) runs beside the app for
/// the pod's life, so it moves with it, in the same consistent cut: both counters continue on
/// the new pod, neither restarted.
fn native_sidecar_moves_with_its_app(cluster: &Cluster) -> Result<()> {
    let image = format!(
        "localhost/migrate-counter:{}",
        migrate_tests::cluster::IMAGE_VERSION
    );
    let container = |name: &str, sidecar: bool| {
        format!(
            "  - name: {name}\n    image: {image}\n    imagePullPolicy: Never\n{}    env: [{{name: COUNTER_INTERVAL, value: \"0.5\"}}]\n    securityContext:\n      allowPrivilegeEscalation: false\n      capabilities: {{drop: [ALL], add: [CHECKPOINT_RESTORE, SETPCAP]}}\n",
            if sidecar {
                "    restartPolicy: Always\n"
            } else {
                ""
            }
        )
    };
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: duo\n  labels: {{app: duo}}\nspec:\n  nodeName: node-a\n  initContainers:\n{}  containers:\n{}",
        container("tally", true),
        container("counter", false)
    ))?;
    cluster.wait_running("duo", WAIT)?;
    wait_until("both containers counting", WAIT, || {
        Ok(
            (counter_values(&logs(cluster, "duo", Some("tally"))).len() >= 3
                && counter_values(&logs(cluster, "duo", Some("counter"))).len() >= 3)
                .then_some(()),
        )
    })?;
    migrate_ok(cluster, &["duo", "--to", "node-b"], &[])?;
    for name in ["tally", "counter"] {
        let values = wait_until(&format!("{name} counting on duo-m1"), WAIT, || {
            let values = counter_values(&logs(cluster, "duo-m1", Some(name)));
            Ok((values.len() >= 3).then_some(values))
        })?;
        ensure!(
            values[0].0 > 3,
            "{name} started fresh on the new pod instead of continuing: {:?}",
            values[0]
        );
        for pair in values.windows(2) {
            ensure!(
                pair[1].0 == pair[0].0 + 1,
                "{name}'s count jumped: {pair:?}"
            );
        }
        let status = launcher_status(cluster, "duo-m1", Some(name))?;
        ensure!(
            status["state"] == "restored",
            "{name} is {}",
            status["state"]
        );
    }
    let restarts = pod_field(
        cluster,
        "duo-m1",
        "{.status.initContainerStatuses[0].restartCount} {.status.containerStatuses[0].restartCount}",
    )?;
    ensure!(restarts == "0 0", "restarts on the new pod: {restarts}");
    wait_gone(cluster, "duo")?;
    cluster.kubectl_ok(&["delete", "pod", "duo-m1", "--wait=false"])?;
    Ok(())
}

/// The fault hook is not in the release binary: the plugin as `cargo xtask release` builds it,
/// run with `KUBECTL_MIGRATE_FAULT_FLIP_BYTE` set (which makes the test build damage every
/// archive, as the test above shows), moves the counter: the target checked every entry's
/// SHA-256 and restored it, and the count continues.
fn release_plugin_ignores_the_fault_variable(cluster: &Cluster) -> Result<()> {
    let plugin = migrate_tests::release_plugin()?;
    let path = plugin_path_with(&plugin);
    let path = path.to_str().context("PATH is not UTF-8")?;
    // The relay: the archive passes through the plugin, where the test build's hook would
    // damage it.
    let (out, last, first) = move_counter_with(
        cluster,
        "sealed",
        "node-a",
        "node-b",
        &["--transfer", "relay"],
        &[("PATH", path), ("KUBECTL_MIGRATE_FAULT_FLIP_BYTE", "20000")],
    )?;
    ensure!(
        out.stdout.contains("moved to node node-b as sealed-m1"),
        "no summary line: {}",
        out.stdout
    );
    eprintln!(
        "release plugin {} with the fault variable set: moved intact ({last} -> {first})",
        plugin.display()
    );
    Ok(())
}

/// After an undone migration: the source pod is Running without a restart and its count,
/// followed since before the migration, goes on with no gap and no repeat.
fn source_kept_counting(cluster: &Cluster, pod: &str, follow: Follow) -> Result<()> {
    ensure!(
        pod_field(cluster, pod, "{.status.phase}")? == "Running",
        "the source {pod} is not running"
    );
    let count = counter_values(&follow.text()).len();
    wait_until(&format!("{pod} counting again"), WAIT, || {
        Ok((counter_values(&follow.text()).len() >= count + 3).then_some(()))
    })?;
    let values = counter_values(&follow.text());
    for pair in values.windows(2) {
        ensure!(
            pair[1].0 == pair[0].0 + 1,
            "the source's count broke: {pair:?}"
        );
    }
    let restarts = pod_field(cluster, pod, "{.status.containerStatuses[0].restartCount}")?;
    ensure!(restarts == "0", "the source {pod} restarted");
    Ok(())
}

/// Ctrl-C while the archive streams: the plugin deletes the target and resumes the source,
/// whose checkpoint job was left writing into an exec stream nobody reads any more.
fn interrupted_plugin_leaves_the_source_running(cluster: &Cluster) -> Result<()> {
    // A big app, so the transfer lasts long enough to be interrupted in the middle.
    run_counter(
        cluster,
        "halted",
        "node-a",
        &[("COUNTER_BALLAST_MB", "384")],
    )?;
    let follow = Follow::start(cluster, "halted")?;
    let mut plugin = Command::new(workspace_binary("kubectl-migrate"))
        .args(["halted", "--to", "node-b"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = plugin.stderr.take().context("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    wait_until("the source's checkpoint streaming", WAIT, || {
        let status = cluster
            .kubectl_ok(&["exec", "halted", "--", "restore-launcher", "status"])
            .unwrap_or_default();
        Ok(status.contains(r#""state":"checkpointing""#).then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(plugin.id())?),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let interrupted = Instant::now();
    let code = wait_until(
        "the interrupted plugin to exit",
        Duration::from_secs(150),
        || Ok(plugin.try_wait()?.map(|status| status.code())),
    )?;
    let stderr = stderr.join().unwrap_or_default();
    eprintln!(
        "interrupted mid-stream: the plugin undid the migration in {:.1} s, exit {code:?}: {}",
        interrupted.elapsed().as_secs_f64(),
        stderr.lines().last().unwrap_or_default()
    );
    ensure!(
        code.is_some_and(|c| c != 0),
        "an interrupted migration must exit non-zero: {code:?}\n{stderr}"
    );
    for needle in [
        "interrupted",
        "deleted the target pod halted-m1",
        "resumed the source app",
        "run the migration again",
    ] {
        ensure!(
            stderr.contains(needle),
            "the message does not say {needle:?}:\n{stderr}"
        );
    }
    wait_gone(cluster, "halted-m1")?;
    source_kept_counting(cluster, "halted", follow)?;
    cluster.kubectl_ok(&["delete", "pod", "halted", "--wait=false"])?;
    Ok(())
}

/// The target's work directory is a 1 MiB tmpfs (an emptyDir in memory with a size limit),
/// too small for the app's checkpoint; the source's is roomy. One spec serves both: the work
/// directory is chosen by node name. The migration fails saying "no space" (not that the
/// archive was bad), the target is deleted, and the source counts on.
fn target_work_dir_full(cluster: &Cluster) -> Result<()> {
    let name = "roomless";
    let yaml = example_pod(
        "counter/pod.yaml",
        name,
        "node-a",
        &[("COUNTER_INTERVAL", "0.5")],
    )?;
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    let container = &mut pod["spec"]["containers"][0];
    let env = container["env"].as_sequence_mut().context("env")?;
    env.insert(
        0,
        serde_yaml::from_str(
            "{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}",
        )?,
    );
    env.push(serde_yaml::from_str(
        "{name: RESTORE_LAUNCHER_WORK_DIR, value: /work/$(NODE_NAME)}",
    )?);
    container["volumeMounts"] = serde_yaml::from_str(
        "[{name: roomy, mountPath: /work/node-a}, {name: small, mountPath: /work/node-b}]",
    )?;
    pod["spec"]["volumes"] = serde_yaml::from_str(
        "[{name: roomy, emptyDir: {}}, {name: small, emptyDir: {medium: Memory, sizeLimit: 1Mi}}]",
    )?;
    cluster.apply(&serde_yaml::to_string(&pod)?)?;
    cluster.wait_running(name, WAIT)?;
    wait_until(&format!("{name} counts"), WAIT, || {
        Ok((counter_values(&logs(cluster, name, None)).len() >= 4).then_some(()))
    })?;
    let follow = Follow::start(cluster, name)?;
    let out = migrate(cluster, &[name, "--to", "node-b"], &[])?;
    ensure!(
        out.code == Some(1)
            && out.stderr.contains("no space")
            && !out.stderr.contains("archive refused")
            && out.stderr.contains("resumed the source app"),
        "expected a refusal as no space, undone:\n{}{}",
        out.stdout,
        out.stderr
    );
    wait_gone(cluster, &format!("{name}-m1"))?;
    source_kept_counting(cluster, name, follow)?;
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// A pod already named like the target (`NAME-m1`, anyone's): the migration takes `NAME-m2`
/// and leaves that pod alone.
fn taken_target_name(cluster: &Cluster) -> Result<()> {
    run_counter(cluster, "taken-m1", "node-b", &[])?;
    run_counter(cluster, "taken", "node-a", &[])?;
    let out = migrate_ok(cluster, &["taken", "--to", "node-b"], &[])?;
    ensure!(
        out.stdout.contains("moved to node node-b as taken-m2"),
        "{}",
        out.stdout
    );
    cluster.wait_running("taken-m2", WAIT)?;
    wait_gone(cluster, "taken")?;
    let bystander = launcher_status(cluster, "taken-m1", None)?;
    ensure!(
        bystander["state"] == "running"
            && pod_field(
                cluster,
                "taken-m1",
                "{.status.containerStatuses[0].restartCount}"
            )? == "0",
        "the pod that had the name was touched: {bystander}"
    );
    cluster.kubectl_ok(&["delete", "pod", "taken-m1", "taken-m2", "--wait=false"])?;
    Ok(())
}

/// The plugin SIGKILLed at each stage of a migration (the fault hook kills it at the exact
/// point): `kubectl migrate status` names the migration, whether it is committed, and the
/// command that clears it; that command leaves exactly one copy running, its count continued
/// with no reset; running it again is harmless.
fn plugin_killed_at_each_stage(cluster: &Cluster) -> Result<()> {
    for (stage, committed) in [
        ("target-running", false),
        ("frozen", false),
        ("restored", false),
        ("acknowledged", false),
        ("committed", true),
        ("source-deleted", true),
    ] {
        let name = format!("killed-{stage}");
        run_counter(cluster, &name, "node-a", &[])?;
        let follow = Follow::start(cluster, &name)?;
        migrate_killed_at(cluster, &name, stage)?;
        recover_after_kill(cluster, &name, follow, committed)
            .with_context(|| format!("killed at stage {stage}"))?;
        eprintln!("killed at {stage}: recovered, one copy runs, the count continued");
    }
    Ok(())
}

/// `kubectl migrate POD --to node-b` with the fault hook killing the plugin by SIGKILL at
/// `stage`; it must have died there.
fn migrate_killed_at(cluster: &Cluster, pod: &str, stage: &str) -> Result<()> {
    let out = migrate(
        cluster,
        &[pod, "--to", "node-b"],
        &[("KUBECTL_MIGRATE_FAULT_KILL_AT", stage)],
    )?;
    ensure!(
        out.code.is_none() && out.stderr.contains(&format!("at stage {stage}")),
        "the plugin was to die by SIGKILL at {stage}: exit {:?}\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// After a plugin died mid-migration of `name`: `status`, then the command it names; checks
/// that exactly one copy runs and that the count continued.
fn recover_after_kill(
    cluster: &Cluster,
    name: &str,
    follow: Follow,
    committed: bool,
) -> Result<()> {
    let target = format!("{name}-m1");
    let (command, committed_column) = if committed {
        ("resume", "yes")
    } else {
        ("abort", "no")
    };
    // Never thawed, the target takes no Service traffic (its readiness gate is not set).
    let ready = pod_field(
        cluster,
        &target,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    )?;
    ensure!(
        ready == "False",
        "the unthawed target {target} is Ready ({ready}): a Service would send it traffic"
    );
    let status = kubectl_migrate(cluster, &["status", name]).output()?;
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with(name))
        .with_context(|| format!("`kubectl migrate status {name}` lists nothing:\n{table}"))?;
    let columns: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        columns.get(1) == Some(&target.as_str())
            && columns.get(4) == Some(&committed_column)
            && row.ends_with(&format!("kubectl migrate {command} {name}")),
        "status should show target {target}, committed {committed_column}, next `kubectl migrate {command} {name}`:\n{table}"
    );
    let done = kubectl_migrate(cluster, &[command, name]).output()?;
    ensure!(
        done.status.success(),
        "`kubectl migrate {command} {name}` failed:\n{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    if committed {
        // The target holds the app: the source is gone, the target counts on from its cut.
        counted_on(cluster, name, &target, follow)?;
        let restarts = pod_field(
            cluster,
            &target,
            "{.status.containerStatuses[0].restartCount}",
        )?;
        ensure!(restarts == "0", "the target {target} restarted");
    } else {
        // The source holds the app: the target is gone, the source counts on, unrestarted.
        wait_gone(cluster, &target)?;
        source_kept_counting(cluster, name, follow)?;
    }
    let again = kubectl_migrate(cluster, &[command, name]).output()?;
    let again_text = String::from_utf8_lossy(&again.stdout);
    ensure!(
        again.status.success() && again_text.contains(&format!("nothing to {command}")),
        "a second `{command}` is not harmless: {again_text}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let survivor = if committed { target } else { name.to_string() };
    cluster.kubectl_ok(&["delete", "pod", &survivor, "--wait=false"])?;
    Ok(())
}

/// The plugin SIGKILLed while the archive streams (from outside, like a closed laptop):
/// `status` then `abort` resume the source, whose checkpoint job was left writing into a dead
/// stream.
fn plugin_killed_mid_stream(cluster: &Cluster) -> Result<()> {
    let name = "killed-midstream";
    run_counter(cluster, name, "node-a", &[("COUNTER_BALLAST_MB", "384")])?;
    let follow = Follow::start(cluster, name)?;
    let mut plugin = Command::new(workspace_binary("kubectl-migrate"))
        .args([name, "--to", "node-b"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_until("the source's checkpoint streaming", WAIT, || {
        Ok(launcher_in(cluster, name, "checkpointing").then_some(()))
    })?;
    plugin.kill()?; // SIGKILL
    let status = plugin.wait()?;
    ensure!(
        status.code().is_none(),
        "the plugin was not killed: {status}"
    );
    recover_after_kill(cluster, name, follow, false)
}

/// The plugin SIGKILLed after the freeze and never run again: the source resumes by itself
/// when its lease runs out; `status` still names the waiting target, and `abort` removes it.
fn plugin_killed_source_resumes_by_lease(cluster: &Cluster) -> Result<()> {
    let name = "killed-lease";
    run_counter(cluster, name, "node-a", &[])?;
    let follow = Follow::start(cluster, name)?;
    let out = migrate(
        cluster,
        &[name, "--to", "node-b", "--lease", "10s"],
        &[("KUBECTL_MIGRATE_FAULT_KILL_AT", "frozen")],
    )?;
    ensure!(out.code.is_none(), "the plugin was to die: {}", out.stderr);
    let frozen = launcher_status(cluster, name, None)?;
    ensure!(
        frozen["state"] == "frozen" && frozen["lease_seconds_left"].as_u64().is_some(),
        "the source is not frozen under a lease: {frozen}"
    );
    // Nobody runs anything: the lease alone brings the source back.
    source_kept_counting(cluster, name, follow)?;
    let resumed = launcher_status(cluster, name, None)?;
    ensure!(
        resumed["state"] == "running" && resumed["app_stopped"] == false,
        "{resumed}"
    );
    let done = kubectl_migrate(cluster, &["abort", name]).output()?;
    ensure!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    wait_gone(cluster, &format!("{name}-m1"))?;
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// nginx (the web example's first container) with a liveness probe of period 1 s and
/// threshold 2, of the given kind.
fn probed_nginx(cluster: &Cluster, name: &str, probe: &str) -> Result<()> {
    let yaml = example_pod("web/pod.yaml", name, "node-a", &[])?;
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    let containers = pod["spec"]["containers"]
        .as_sequence_mut()
        .context("containers")?;
    containers.truncate(1);
    containers[0]["livenessProbe"] = serde_yaml::from_str(&format!(
        "{{{probe}, periodSeconds: 1, failureThreshold: 2, timeoutSeconds: 1}}"
    ))?;
    cluster.apply(&serde_yaml::to_string(&pod)?)?;
    cluster.wait_running(name, WAIT)
}

/// What the real kubelet does to a frozen app, measured: an HTTP liveness probe (period 1 s,
/// threshold 2) restarts the container of an app frozen for 5 s; a TCP probe does not (the
/// kernel completes the handshake on the frozen app's listening socket). So the preflight
/// refuses the first up front and lets the second go, and a refused migration changes
/// nothing.
fn liveness_probes_measured(cluster: &Cluster) -> Result<()> {
    probed_nginx(cluster, "probed-http", "httpGet: {path: /, port: 8080}")?;
    probed_nginx(cluster, "probed-tcp", "tcpSocket: {port: 8080}")?;
    let restarts =
        |pod: &str| pod_field(cluster, pod, "{.status.containerStatuses[0].restartCount}");
    for pod in ["probed-http", "probed-tcp"] {
        cluster.kubectl_ok(&[
            "exec",
            pod,
            "--",
            "restore-launcher",
            "freeze",
            "--lease",
            "5",
        ])?;
    }
    let killed = wait_until(
        "the kubelet to restart the frozen HTTP-probed app",
        WAIT,
        || Ok((restarts("probed-http")? != "0").then_some(())),
    );
    wait_until("the TCP-probed app's lease to run out", WAIT, || {
        let status = launcher_status(cluster, "probed-tcp", None)?;
        Ok((status["state"] == "running" && status["app_stopped"] == false).then_some(()))
    })?;
    let tcp = restarts("probed-tcp")?;
    eprintln!(
        "a 5 s freeze under a 1 s x 2 liveness probe: HTTP restarted by the kubelet: {}; TCP restarts: {tcp}",
        killed.is_ok()
    );
    killed?;
    ensure!(
        tcp == "0",
        "the TCP-probed frozen app was restarted ({tcp})"
    );

    // The remedy: the preflight refuses the HTTP-probed pod before anything is touched.
    let check = kubectl_migrate(cluster, &["check", "probed-http", "--to", "node-b"]).output()?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    ensure!(
        !check.status.success() && said.contains("liveness probe"),
        "the preflight did not refuse the HTTP-probed pod:\n{said}"
    );
    let before = restarts("probed-http")?;
    let out = migrate(cluster, &["probed-http", "--to", "node-b"], &[])?;
    ensure!(
        out.code == Some(1) && out.stderr.contains("nothing was changed"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    ensure!(
        cluster
            .kubectl(&["get", "pod", "probed-http-m1"])
            .output()?
            .status
            .code()
            != Some(0),
        "a refused migration created a target"
    );
    ensure!(
        restarts("probed-http")? == before,
        "the refused migration restarted the pod"
    );
    let check = kubectl_migrate(cluster, &["check", "probed-tcp", "--to", "node-b"]).output()?;
    ensure!(
        check.status.success(),
        "the TCP-probed pod is refused: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    cluster.kubectl_ok(&["delete", "pod", "probed-http", "probed-tcp", "--wait=false"])?;
    Ok(())
}

/// Whether the launcher of `pod` (its first container) says it is in `state`.
fn launcher_in(cluster: &Cluster, pod: &str, state: &str) -> bool {
    launcher_status(cluster, pod, None).is_ok_and(|s| s["state"] == state)
}

/// Starts `kubectl-migrate NAME --to node-b` in the background and waits until the source's
/// checkpoint streams (a big app, so the stream lasts).
fn plugin_streaming(cluster: &Cluster, name: &str, args: &[&str]) -> Result<(Child, Follow)> {
    run_counter(cluster, name, "node-a", &[("COUNTER_BALLAST_MB", "384")])?;
    let follow = Follow::start(cluster, name)?;
    let plugin = Command::new(workspace_binary("kubectl-migrate"))
        .args([name, "--to", "node-b"])
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_until("the source's checkpoint streaming", WAIT, || {
        Ok(launcher_in(cluster, name, "checkpointing").then_some(()))
    })?;
    Ok((plugin, follow))
}

/// Waits for the plugin to exit; its exit code and stderr.
fn plugin_ended(plugin: Child) -> Result<(Option<i32>, String)> {
    let output = plugin.wait_with_output()?;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// After a fault the plugin answered with a failure: whatever it could not undo is finished
/// with `kubectl migrate abort` if `status` still lists the migration; then the target is gone
/// and the source counts on, unrestarted.
fn undone_with_source_counting(
    cluster: &Cluster,
    name: &str,
    follow: Follow,
    code: Option<i32>,
    stderr: &str,
    fault: &str,
) -> Result<()> {
    ensure!(code == Some(1), "the plugin exited {code:?}:\n{stderr}");
    eprintln!("{fault}: {}", stderr.lines().last().unwrap_or_default());
    let listed = kubectl_migrate(cluster, &["status", name]).output()?;
    if String::from_utf8_lossy(&listed.stdout).contains(&format!("kubectl migrate abort {name}")) {
        ensure!(
            stderr.contains("kubectl migrate abort") || stderr.contains("rollback"),
            "the migration is left unfinished, and the plugin's message did not name the recovery:\n{stderr}"
        );
        let done = kubectl_migrate(cluster, &["abort", name]).output()?;
        ensure!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    wait_gone(cluster, &format!("{name}-m1"))?;
    // A log stream through an API server that restarted is dead: follow anew (it starts with
    // the container's whole log, so the count is checked from the beginning).
    drop(follow);
    let follow = Follow::start(cluster, name)?;
    source_kept_counting(cluster, name, follow)?;
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// kube-apiserver stopped and started again while the archive streams through it: the exec
/// streams break; the plugin undoes the migration once the API server answers again (or names
/// `kubectl migrate abort`); one copy, the source, counts on.
fn apiserver_restarted_mid_stream(cluster: &Cluster) -> Result<()> {
    let name = "apiserver-cut";
    // The relay: the archive itself streams through the API server.
    let (plugin, follow) = plugin_streaming(cluster, name, &["--transfer", "relay"])?;
    cluster.stop_daemon("kube-apiserver");
    std::thread::sleep(Duration::from_secs(2)); // down for a moment, as in a restart
    cluster.start_daemon("kube-apiserver")?;
    wait_until("the API server ready again", WAIT, || {
        Ok(cluster
            .kubectl_ok(&["get", "--raw", "/readyz"])
            .is_ok()
            .then_some(()))
    })?;
    let (code, stderr) = plugin_ended(plugin)?;
    undone_with_source_counting(
        cluster,
        name,
        follow,
        code,
        &stderr,
        "API server restarted mid-stream",
    )
}

/// The target node's kubelet stopped while the target receives and restores: the receive
/// stream breaks; the migration is undone (the target's delete completes when the kubelet is
/// back); one copy, the source, counts on.
fn target_kubelet_stopped_mid_restore(cluster: &Cluster) -> Result<()> {
    let name = "kubelet-cut";
    let (plugin, follow) = plugin_streaming(cluster, name, &[])?;
    wait_until("the target restoring", WAIT, || {
        Ok(launcher_in(cluster, &format!("{name}-m1"), "restoring").then_some(()))
    })?;
    cluster.stop_daemon("kubelet-node-b");
    let (code, stderr) = plugin_ended(plugin)?;
    cluster.start_daemon("kubelet-node-b")?;
    undone_with_source_counting(
        cluster,
        name,
        follow,
        code,
        &stderr,
        "kubelet stopped mid-restore",
    )
}

/// The source container SIGKILLed (as by the OOM killer) while its checkpoint streams: its
/// state dies with it, and no partial archive is restored anywhere. The plugin undoes the
/// migration and says the source restarted fresh; exactly one copy runs, the restarted source.
fn source_container_killed_mid_checkpoint(cluster: &Cluster) -> Result<()> {
    let name = "source-killed";
    let (plugin, _follow) = plugin_streaming(cluster, name, &[])?;
    cluster.kill_container(name)?;
    let (code, stderr) = plugin_ended(plugin)?;
    ensure!(code == Some(1), "the plugin exited {code:?}:\n{stderr}");
    ensure!(
        stderr.contains("restarted during the migration")
            && stderr.contains("deleted the target pod"),
        "the message does not say the source restarted and the target was deleted:\n{stderr}"
    );
    wait_gone(cluster, &format!("{name}-m1"))?;
    cluster.wait_running(name, WAIT)?;
    let restarts = pod_field(cluster, name, "{.status.containerStatuses[0].restartCount}")?;
    ensure!(restarts == "1", "restart count {restarts}, not 1");
    wait_until(&format!("{name} counting fresh"), WAIT, || {
        Ok((counter_values(&logs(cluster, name, None)).len() >= 2).then_some(()))
    })?;
    nothing_in_flight(cluster, name)?;
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CAP_CHECKPOINT_RESTORE (40) and CAP_SETPCAP (8): what the launcher needs, nothing else.
const LAUNCHER_CAPS: u64 = (1 << 40) | (1 << 8);

fn least_capabilities(cluster: &Cluster) -> Result<()> {
    for file in ["counter/pod.yaml", "web/pod.yaml"] {
        let yaml = std::fs::read_to_string(workspace().join("images/examples").join(file))?;
        let pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
        for container in pod["spec"]["containers"]
            .as_sequence()
            .context("containers")?
        {
            let security = &container["securityContext"];
            ensure!(
                security["privileged"].as_bool() != Some(true),
                "{file}: privileged"
            );
            ensure!(
                security["allowPrivilegeEscalation"].as_bool() == Some(false),
                "{file}: privilege escalation allowed"
            );
            let caps = &security["capabilities"];
            ensure!(
                caps["drop"] == serde_yaml::Value::from(vec!["ALL"]),
                "{file}: does not drop ALL"
            );
            ensure!(
                caps["add"] == serde_yaml::Value::from(vec!["CHECKPOINT_RESTORE", "SETPCAP"]),
                "{file}: adds {:?}",
                caps["add"]
            );
        }
    }
    // What the running containers really hold, as the kernel reports it.
    run_counter(cluster, "caps", "node-a", &[])?;
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let line = cluster.kubectl_ok(&[
            "exec",
            "caps",
            "--",
            "grep",
            &format!("^{field}:"),
            "/proc/1/status",
        ])?;
        let value = u64::from_str_radix(line.split_whitespace().nth(1).context("no value")?, 16)?;
        ensure!(
            value == LAUNCHER_CAPS,
            "{field} of the launcher is {value:#x}, expected {LAUNCHER_CAPS:#x}"
        );
    }
    let nnp = cluster.kubectl_ok(&[
        "exec",
        "caps",
        "--",
        "grep",
        "^NoNewPrivs:",
        "/proc/1/status",
    ])?;
    ensure!(nnp.contains('1'), "no_new_privs is not set: {nnp}");
    // And they suffice: the pod migrates.
    let out = migrate(cluster, &["caps", "--to", "node-b"], &[])?;
    ensure!(
        out.code == Some(0),
        "kubectl migrate exited {:?}:\n{}",
        out.code,
        out.stderr
    );
    cluster.kubectl_ok(&["delete", "pod", "caps-m1", "--wait=false"])?;
    Ok(())
}

/// Peak RSS (VmHWM) of the plugin while it runs, sampled until it exits.
fn migrate_measuring(cluster: &Cluster, args: &[&str]) -> Result<(Outcome, u64)> {
    // The plugin itself (not kubectl in front of it), so /proc/PID is the plugin's.
    let run = migrate_tests::run_measuring_rss(
        Command::new(workspace_binary("kubectl-migrate"))
            .args(args)
            .env("KUBECONFIG", &cluster.kubeconfig),
    )?;
    Ok((
        Outcome {
            code: run.status.code(),
            stdout: run.stdout,
            stderr: run.stderr,
        },
        run.peak_rss_kib,
    ))
}

fn bytes_moved(stdout: &str) -> u64 {
    stdout
        .lines()
        .find(|l| l.starts_with("bytes moved"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The plugin's peak RSS stays flat with the archive's size, the relay (every byte through the
/// plugin) and the direct transfer (only the launchers' byte counts) alike.
fn plugin_memory_flat(cluster: &Cluster) -> Result<()> {
    plugin_memory_flat_with(cluster, "relay")?;
    plugin_memory_flat_with(cluster, "direct")
}

fn plugin_memory_flat_with(cluster: &Cluster, transfer: &str) -> Result<()> {
    let (small_pod, ballast_pod) = (format!("small-{transfer}"), format!("ballast-{transfer}"));
    let (small_target, ballast_target) = (format!("{small_pod}-m1"), format!("{ballast_pod}-m1"));
    run_counter(cluster, &small_pod, "node-a", &[])?;
    let (small, small_peak) = migrate_measuring(
        cluster,
        &[&small_pod, "--to", "node-b", "--transfer", transfer],
    )?;
    ensure!(
        small.code == Some(0),
        "small migration failed:\n{}",
        small.stderr
    );
    run_counter(
        cluster,
        &ballast_pod,
        "node-a",
        &[("COUNTER_BALLAST_MB", "384")],
    )?;
    let checksum = |text: &str| {
        text.lines()
            .last()
            .and_then(|l| l.split("ballast=").nth(1))
            .map(str::to_string)
    };
    let before = checksum(&logs(cluster, &ballast_pod, None)).context("no ballast checksum")?;
    let (big, big_peak) = migrate_measuring(
        cluster,
        &[&ballast_pod, "--to", "node-b", "--transfer", transfer],
    )?;
    ensure!(
        big.code == Some(0),
        "ballast migration failed:\n{}",
        big.stderr
    );
    cluster.wait_running(&ballast_target, WAIT)?;
    wait_until("a count on the ballast's target", WAIT, || {
        Ok(checksum(&logs(cluster, &ballast_target, None)))
    })
    .and_then(|after| {
        ensure!(
            after == before,
            "the ballast changed across the move: {before} → {after}"
        );
        Ok(())
    })?;
    let (small_bytes, big_bytes) = (bytes_moved(&small.stdout), bytes_moved(&big.stdout));
    eprintln!(
        "plugin peak RSS, {transfer}: {small_peak} KiB moving {} KiB; {big_peak} KiB moving {} KiB \
         (growth {} KiB for {} MiB more, ratio {:.2})",
        small_bytes / 1024,
        big_bytes / 1024,
        big_peak.saturating_sub(small_peak),
        (big_bytes - small_bytes.min(big_bytes)) >> 20,
        big_peak as f64 / small_peak.max(1) as f64
    );
    ensure!(
        big_bytes > 300 << 20,
        "the ballast archive is only {big_bytes} bytes"
    );
    // Buffering the archive would add hundreds of MiB; a few chunks and TLS buffers do not.
    ensure!(
        big_peak < small_peak + 32 * 1024,
        "the plugin grew from {small_peak} KiB to {big_peak} KiB while moving {big_bytes} bytes"
    );
    for pod in [&small_target, &ballast_target] {
        cluster.kubectl_ok(&["delete", "pod", pod, "--wait=false"])?;
    }
    Ok(())
}
