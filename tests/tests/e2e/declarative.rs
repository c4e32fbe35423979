//! The declarative API: `kubectl apply -k config/` installs the PodMigration resource and the
//! controller (its image from `cargo xtask images`, its RBAC exactly as `config/controller/`
//! has it, two replicas with leader election), which runs as pods of this cluster and reaches
//! the API server through the `kubernetes` Service (the nodes' kube-proxy). Then PodMigrations
//! are applied as a user would, and the tests check what a user would: the object's phase,
//! message, timings and Events, the counts of the apps, and that exactly one copy runs.

use super::*;

const NAMESPACE: &str = "kubectl-migrate-system";
const SERVICE_ACCOUNT: &str =
    "system:serviceaccount:kubectl-migrate-system:kubectl-migrate-controller";

/// Installs the controller as the README says, and waits until one replica leads.
fn install(cluster: &Cluster) -> Result<String> {
    let config = workspace().join("config");
    cluster.kubectl_ok(&["apply", "-k", &config.display().to_string()])?;
    cluster.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "deployment/kubectl-migrate-controller",
        "--timeout=120s",
    ])?;
    wait_until("a controller replica to hold the Lease", WAIT, || {
        let holder = cluster
            .kubectl(&[
                "-n",
                NAMESPACE,
                "get",
                "lease",
                "kubectl-migrate-controller",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .output()?;
        let holder = String::from_utf8_lossy(&holder.stdout).trim().to_string();
        Ok((!holder.is_empty()).then_some(holder))
    })
}

fn uninstall(cluster: &Cluster) -> Result<()> {
    let config = workspace().join("config");
    cluster.kubectl_ok(&[
        "delete",
        "-k",
        &config.display().to_string(),
        "--ignore-not-found",
        "--timeout=120s",
    ])?;
    Ok(())
}

/// A counter on node-a with a hostPath volume: its files stay on the node, so the preflight
/// refuses to move it.
fn run_hostpath_counter(cluster: &Cluster, name: &str) -> Result<()> {
    let yaml = example_pod(
        "counter/pod.yaml",
        name,
        "node-a",
        &[("COUNTER_INTERVAL", "0.5")],
    )?;
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    pod["spec"]["volumes"] = serde_yaml::from_str(&format!(
        "[{{name: scratch, hostPath: {{path: /tmp/migrate-e2e-{name}, type: DirectoryOrCreate}}}}]"
    ))?;
    pod["spec"]["containers"][0]["volumeMounts"] =
        serde_yaml::from_str("[{name: scratch, mountPath: /scratch}]")?;
    cluster.apply(&serde_yaml::to_string(&pod)?)?;
    cluster.wait_running(name, WAIT)
}

fn pod_migration(name: &str, pod: &str, node: Option<&str>) -> String {
    let target = node.map_or(String::new(), |n| format!(", targetNode: {n}"));
    format!(
        "apiVersion: migrate.kubectl.io/v1alpha1\nkind: PodMigration\nmetadata: {{name: {name}}}\nspec: {{pod: {pod}{target}}}\n"
    )
}

fn field(cluster: &Cluster, name: &str, jsonpath: &str) -> Result<String> {
    cluster.kubectl_ok(&[
        "get",
        "podmigration",
        name,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ])
}

/// Waits until PodMigration `name` ended (`Succeeded`, `Failed` or `RolledBack`); its phase.
fn ended(cluster: &Cluster, name: &str, limit: Duration) -> Result<String> {
    wait_until(&format!("PodMigration {name} to end"), limit, || {
        let phase = field(cluster, name, "{.status.phase}")?;
        Ok(matches!(phase.as_str(), "Succeeded" | "Failed" | "RolledBack").then_some(phase))
    })
}

/// The reasons of the Events about object `name` (any kind), oldest first.
fn event_reasons(cluster: &Cluster, name: &str) -> Result<Vec<String>> {
    let text = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name}"),
        "--sort-by=.metadata.creationTimestamp",
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ])?;
    Ok(text.lines().map(String::from).collect())
}

/// Checks a `Succeeded` PodMigration of counter `pod`: the status names the target, its node,
/// per-phase timings and the downtime; the count continued from the source's last; the
/// source is gone and the target runs; Events are on the object and on both pods.
fn succeeded_with_the_count_continued(
    cluster: &Cluster,
    name: &str,
    pod: &str,
    node: &str,
    follow: Follow,
) -> Result<()> {
    let target = field(cluster, name, "{.status.targetPod}")?;
    ensure!(
        target == format!("{pod}-m1"),
        "status.targetPod is {target:?}"
    );
    ensure!(field(cluster, name, "{.status.targetNode}")? == node);
    ensure!(pod_field(cluster, &target, "{.spec.nodeName}")? == node);
    let timings = field(cluster, name, "{.status.timings[*].name}")?;
    for phase in ["check", "target", "commit", "total"] {
        ensure!(
            timings.split_whitespace().any(|t| t == phase),
            "no {phase} timing in {timings}"
        );
    }
    let downtime: u64 = field(cluster, name, "{.status.downtimeMs}")?
        .parse()
        .context("status.downtimeMs")?;
    ensure!(downtime > 0, "a downtime of 0 ms is not measured");
    ensure!(
        field(
            cluster,
            name,
            "{.status.conditions[?(@.type==\"Ready\")].status}"
        )? == "True"
    );
    cluster.wait_running(&target, WAIT)?;
    let before = follow.finish(WAIT);
    wait_gone(cluster, pod)?;
    wait_until(&format!("3 counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
    })?;
    let (last, first) = assert_continued(&before, &logs(cluster, &target, None))?;
    eprintln!("{name}: {pod} → {target} on {node}, count {last} → {first}, {downtime} ms");
    let on_object = event_reasons(cluster, name)?;
    ensure!(
        on_object.iter().any(|r| r == "Started") && on_object.iter().any(|r| r == "Succeeded"),
        "Events on PodMigration {name}: {on_object:?}"
    );
    let on_source = event_reasons(cluster, pod)?;
    ensure!(
        on_source.iter().any(|r| r == "MigrationStarted"),
        "Events on the source {pod}: {on_source:?}"
    );
    let on_target = event_reasons(cluster, &target)?;
    ensure!(
        on_target.iter().any(|r| r == "MigrationTarget")
            && on_target.iter().any(|r| r == "MigrationDone"),
        "Events on the target {target}: {on_target:?}"
    );
    Ok(())
}

/// Acceptance 1, 2, 4 and 5: two PodMigrations at once both succeed; a second one for a pod
/// with an active migration is refused in its status; one for a pod that cannot move ends
/// `Failed` with the preflight's reasons and nothing changed; `--async` hands a move to the
/// controller; and the controller's rights are exactly `config/controller/`'s.
pub fn the_controller_carries_out_pod_migrations(cluster: &Cluster) -> Result<()> {
    let leader = install(cluster)?;
    eprintln!("controller leader: {leader}");
    let outcome = carry_out(cluster);
    let cleanup = uninstall(cluster);
    outcome.and(cleanup)
}

fn carry_out(cluster: &Cluster) -> Result<()> {
    // Its rights are those of config/controller/: what the pipeline and the drain need; no
    // node deleted, no eviction, no Secret, no PodMigration deleted.
    for (verb, resource, subresource, allowed) in [
        ("create", "pods", None, true),
        ("create", "pods", Some("exec"), true),
        (
            "patch",
            "podmigrations.migrate.kubectl.io",
            Some("status"),
            true,
        ),
        ("patch", "nodes", None, true),
        ("delete", "nodes", None, false),
        ("create", "pods", Some("eviction"), false),
        ("get", "secrets", None, false),
        ("delete", "podmigrations.migrate.kubectl.io", None, false),
    ] {
        let mut args = vec![
            "auth",
            "can-i",
            verb,
            resource,
            "-A",
            "--as",
            SERVICE_ACCOUNT,
        ];
        let flag = subresource.map(|s| format!("--subresource={s}"));
        args.extend(flag.as_deref());
        let answer = cluster.kubectl(&args).output()?;
        let said = String::from_utf8_lossy(&answer.stdout).trim().to_string();
        ensure!(
            said == "yes" || said == "no",
            "kubectl auth can-i {verb} {resource} {subresource:?} answered {said:?}: {}",
            String::from_utf8_lossy(&answer.stderr)
        );
        ensure!(
            (said == "yes") == allowed,
            "the controller may {verb} {resource} {subresource:?}: {said} (expected {})",
            if allowed { "yes" } else { "no" }
        );
    }

    run_counter(cluster, "pmig-a", "node-a", &[])?;
    run_counter(cluster, "pmig-b", "node-a", &[])?;
    let follow_a = Follow::start(cluster, "pmig-a")?;
    let follow_b = Follow::start(cluster, "pmig-b")?;
    // Made together, in this order: `move-a-again` names the pod `move-a` moves.
    cluster.apply(&format!(
        "{}---\n{}---\n{}",
        pod_migration("move-a", "pmig-a", Some("node-b")),
        pod_migration("move-b", "pmig-b", Some("node-b")),
        pod_migration("move-a-again", "pmig-a", Some("node-b")),
    ))?;
    // Both run at once (seen Running together), and both succeed.
    let mut together = false;
    let phases = wait_until("move-a and move-b to end", Duration::from_secs(180), || {
        let a = field(cluster, "move-a", "{.status.phase}")?;
        let b = field(cluster, "move-b", "{.status.phase}")?;
        together |= a == "Running" && b == "Running";
        let done = |p: &str| matches!(p, "Succeeded" | "Failed" | "RolledBack");
        Ok((done(&a) && done(&b)).then_some((a, b)))
    })?;
    ensure!(
        phases == ("Succeeded".into(), "Succeeded".into()),
        "the two migrations ended {phases:?}: {} / {}",
        field(cluster, "move-a", "{.status.message}")?,
        field(cluster, "move-b", "{.status.message}")?
    );
    ensure!(
        together,
        "the two migrations were never seen running at once"
    );
    ensure!(ended(cluster, "move-a-again", WAIT)? == "Failed");
    let refused = field(cluster, "move-a-again", "{.status.message}")?;
    ensure!(
        refused.contains("already has an active migration") && refused.contains("move-a"),
        "the duplicate's message: {refused}"
    );
    ensure!(
        event_reasons(cluster, "move-a-again")?.contains(&"Duplicate".to_string()),
        "no Duplicate Event"
    );
    succeeded_with_the_count_continued(cluster, "move-a", "pmig-a", "node-b", follow_a)?;
    succeeded_with_the_count_continued(cluster, "move-b", "pmig-b", "node-b", follow_b)?;
    ensure!(
        field(cluster, "move-a", "{.metadata.finalizers}")?.is_empty(),
        "an ended PodMigration keeps its finalizer"
    );

    // A pod that cannot move: a hostPath volume (its files stay on the node). Refused with the
    // preflight's reason; the pod is as it was.
    run_hostpath_counter(cluster, "pmig-host")?;
    let uid = pod_field(cluster, "pmig-host", "{.metadata.uid}")?;
    cluster.apply(&pod_migration("move-host", "pmig-host", Some("node-b")))?;
    ensure!(ended(cluster, "move-host", WAIT)? == "Failed");
    let message = field(cluster, "move-host", "{.status.message}")?;
    ensure!(
        message.contains("preflight")
            && message.contains("hostPath")
            && message.contains("nothing was changed"),
        "the refusal does not give the preflight's reason: {message}"
    );
    ensure!(
        field(
            cluster,
            "move-host",
            "{.status.conditions[?(@.type==\"Ready\")].reason}"
        )? == "PreflightFailed"
    );
    ensure!(pod_field(cluster, "pmig-host", "{.metadata.uid}")? == uid);
    ensure!(pod_field(cluster, "pmig-host", "{.status.phase}")? == "Running");
    ensure!(
        pod_field(
            cluster,
            "pmig-host",
            "{.metadata.annotations.migrate\\.kubectl\\.io/id}"
        )?
        .is_empty(),
        "the refused pod was annotated"
    );
    ensure!(
        cluster
            .kubectl(&["get", "pod", "pmig-host-m1"])
            .output()?
            .status
            .code()
            == Some(1),
        "a target pod was made"
    );
    cluster.kubectl_ok(&["delete", "pod", "pmig-host", "--wait=false"])?;

    // The plugin as the controller's client.
    run_counter(cluster, "pmig-c", "node-a", &[])?;
    let follow_c = Follow::start(cluster, "pmig-c")?;
    let handed = migrate_ok(cluster, &["pmig-c", "--to", "node-b", "--async"], &[])?;
    let name = handed
        .stdout
        .trim()
        .strip_prefix("podmigration.migrate.kubectl.io/")
        .and_then(|rest| rest.strip_suffix(" created"))
        .with_context(|| format!("--async printed {:?}", handed.stdout))?
        .to_string();
    ensure!(ended(cluster, &name, Duration::from_secs(180))? == "Succeeded");
    succeeded_with_the_count_continued(cluster, &name, "pmig-c", "node-b", follow_c)?;
    let listed = kubectl_migrate(cluster, &["status"]).output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    ensure!(
        listed.contains(&name) && listed.contains("Succeeded"),
        "`kubectl migrate status` does not list {name}:\n{listed}"
    );
    for pod in ["pmig-a-m1", "pmig-b-m1", "pmig-c-m1"] {
        cluster.kubectl_ok(&["delete", "pod", pod, "--wait=false"])?;
    }
    Ok(())
}

/// Acceptance 3: the leading controller's container killed (SIGKILL) while it migrates a
/// counter. Once it runs again, the PodMigration ends `Succeeded` or `RolledBack`, and either
/// way exactly one copy of the app counts on from where it was.
pub fn a_controller_killed_mid_migration_ends_it_with_one_copy_counting(
    cluster: &Cluster,
) -> Result<()> {
    let leader = install(cluster)?;
    let outcome = killed_mid_migration(cluster, &leader);
    let cleanup = uninstall(cluster);
    outcome.and(cleanup)
}

fn killed_mid_migration(cluster: &Cluster, leader: &str) -> Result<()> {
    run_counter(cluster, "pmig-k", "node-a", &[])?;
    let follow = Follow::start(cluster, "pmig-k")?;
    cluster.apply(&pod_migration("move-k", "pmig-k", Some("node-b")))?;
    // Mid-migration: the target pod exists (made, or being restored into).
    let id = wait_until("the migration to make its target", WAIT, || {
        let id = field(cluster, "move-k", "{.status.migrationId}")?;
        let target = cluster.kubectl(&["get", "pod", "pmig-k-m1"]).output()?;
        Ok((!id.is_empty() && target.status.success()).then_some(id))
    })?;
    let restarts = |pod: &str| -> Result<u32> {
        Ok(cluster
            .kubectl_ok(&[
                "-n",
                NAMESPACE,
                "get",
                "pod",
                pod,
                "-o",
                "jsonpath={.status.containerStatuses[0].restartCount}",
            ])?
            .parse()?)
    };
    let before = restarts(leader)?;
    cluster.kill_container_in(NAMESPACE, leader)?;
    let phase_at_kill = field(cluster, "move-k", "{.status.phase}")?;
    eprintln!("killed the leader {leader} during migration {id} (phase {phase_at_kill})");
    ensure!(
        phase_at_kill == "Running",
        "the kill did not land mid-migration: the PodMigration was {phase_at_kill}"
    );
    let phase = ended(cluster, "move-k", Duration::from_secs(240))?;
    let message = field(cluster, "move-k", "{.status.message}")?;
    eprintln!("after the restart: {phase}: {message}");
    ensure!(
        message.contains("the controller stopped during migration"),
        "the PodMigration does not say it was recovered: {message}"
    );
    ensure!(
        restarts(leader)? > before,
        "the leader's container was not restarted"
    );
    match phase.as_str() {
        "Succeeded" => {
            let target = field(cluster, "move-k", "{.status.targetPod}")?;
            ensure!(target == "pmig-k-m1", "status.targetPod is {target:?}");
            cluster.wait_running(&target, WAIT)?;
            let before = follow.finish(WAIT);
            wait_gone(cluster, "pmig-k")?;
            wait_until("3 counts on pmig-k-m1", WAIT, || {
                Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
            })?;
            assert_continued(&before, &logs(cluster, &target, None))?;
            cluster.kubectl_ok(&["delete", "pod", &target, "--wait=false"])?;
        }
        "RolledBack" => {
            wait_gone(cluster, "pmig-k-m1")?;
            source_kept_counting(cluster, "pmig-k", follow)?;
            cluster.kubectl_ok(&["delete", "pod", "pmig-k", "--wait=false"])?;
        }
        other => bail!("the migration ended {other}: {message}"),
    }
    ensure!(
        kubectl_migrate(cluster, &["status"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("no unfinished migrations"))?,
        "a migration is left unfinished"
    );
    Ok(())
}

/// Drain by object: `kubectl label node node-a migrate.kubectl.io/drain=true` makes the
/// controller cordon node-a and migrate the counters on it through PodMigrations of its own;
/// a pod that cannot be migrated (a hostPath volume) stays, named with its reason on the node.
pub fn a_node_labelled_for_drain_is_emptied(cluster: &Cluster) -> Result<()> {
    install(cluster)?;
    let outcome = drained_by_label(cluster);
    let _ = cluster
        .kubectl(&["label", "node", "node-a", "migrate.kubectl.io/drain-"])
        .output();
    let _ = cluster.kubectl(&["uncordon", "node-a"]).output();
    let cleanup = uninstall(cluster);
    outcome.and(cleanup)
}

fn drained_by_label(cluster: &Cluster) -> Result<()> {
    run_counter(cluster, "drl-a", "node-a", &[])?;
    run_counter(cluster, "drl-b", "node-a", &[])?;
    run_hostpath_counter(cluster, "drl-host")?;
    let follow_a = Follow::start(cluster, "drl-a")?;
    let follow_b = Follow::start(cluster, "drl-b")?;
    cluster.kubectl_ok(&["label", "node", "node-a", "migrate.kubectl.io/drain=true"])?;
    // The drain's own PodMigrations, one per counter, each ending Succeeded.
    let made_for = |pod: &str| -> Result<Option<String>> {
        let names = cluster.kubectl_ok(&[
            "get",
            "podmigrations",
            "-l",
            "migrate.kubectl.io/drained-node=node-a",
            "-o",
            &format!("jsonpath={{.items[?(@.spec.pod==\"{pod}\")].metadata.name}}"),
        ])?;
        Ok(names.split_whitespace().next().map(String::from))
    };
    for (pod, follow) in [("drl-a", follow_a), ("drl-b", follow_b)] {
        let name = wait_until(&format!("the drain's PodMigration of {pod}"), WAIT, || {
            made_for(pod)
        })?;
        let phase = ended(cluster, &name, Duration::from_secs(180))?;
        ensure!(
            phase == "Succeeded",
            "{name} ended {phase}: {}",
            field(cluster, &name, "{.status.message}")?
        );
        succeeded_with_the_count_continued(cluster, &name, pod, "node-b", follow)?;
        cluster.kubectl_ok(&["delete", "pod", &format!("{pod}-m1"), "--wait=false"])?;
    }
    ensure!(cordoned(cluster, "node-a")?, "node-a is not cordoned");
    let status = wait_until(
        "the drain's status to name the pod that stays",
        WAIT,
        || {
            let status = cluster.kubectl_ok(&[
                "get",
                "node",
                "node-a",
                "-o",
                "jsonpath={.metadata.annotations.migrate\\.kubectl\\.io/drain-status}",
            ])?;
            Ok(
                (status.contains("default/drl-host") && status.contains("0 migrating"))
                    .then_some(status),
            )
        },
    )?;
    ensure!(
        status.contains("hostPath"),
        "the drain's status does not give drl-host's reason: {status}"
    );
    ensure!(
        made_for("drl-host")?.is_none(),
        "a PodMigration was made for drl-host"
    );
    ensure!(
        pod_field(cluster, "drl-host", "{.status.phase}")? == "Running"
            && pod_field(cluster, "drl-host", "{.spec.nodeName}")? == "node-a",
        "drl-host did not stay"
    );
    eprintln!("node-a: {status}");
    cluster.kubectl_ok(&["delete", "pod", "drl-host", "--wait=false"])?;
    Ok(())
}

/// Acceptance: `kubectl migrate P --to N` racing a PodMigration of P, round after round
/// (`MIGRATE_E2E_POD_MIGRATION_RACES`, 20 by default). The pod is claimed before anything is
/// created, so every round ends with exactly one copy counting on, no reset: either the
/// plugin moved it and the PodMigration ended `Failed` (`PodBusy`, naming the plugin's
/// migration, or the preflight's refusal of a pod already moving, or of one already gone), or
/// the PodMigration `Succeeded` and the plugin was told which migration holds the pod.
pub fn a_pod_migration_racing_the_plugin_leaves_one_copy(cluster: &Cluster) -> Result<()> {
    install(cluster)?;
    let outcome = race_rounds(cluster);
    let cleanup = uninstall(cluster);
    outcome.and(cleanup)
}

fn race_rounds(cluster: &Cluster) -> Result<()> {
    let rounds: usize = std::env::var("MIGRATE_E2E_POD_MIGRATION_RACES")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut current = "pmig-race".to_string();
    run_counter(cluster, &current, "node-a", &[])?;
    let (mut plugin_won, mut object_won, mut contended) = (0, 0, 0);
    for round in 0..rounds {
        let to = if round % 2 == 0 { "node-b" } else { "node-a" };
        let follow = Follow::start(cluster, &current)?;
        let object = format!("race-{round}");
        let plugin = Command::new(workspace_binary("kubectl-migrate"))
            .args([current.as_str(), "--to", to])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        cluster.apply(&pod_migration(&object, &current, Some(to)))?;
        let (code, said) = {
            let out = plugin.wait_with_output()?;
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let phase = ended(cluster, &object, Duration::from_secs(240))?;
        let message = field(cluster, &object, "{.status.message}")?;
        let (next, winner) = match (code, phase.as_str()) {
            (Some(0), "Failed") => {
                let id = reported_id(&said).context("the plugin's report names no migration")?;
                contended += usize::from(message.contains(&id));
                ensure!(
                    message.contains(&id) || gone(&current, &message),
                    "round {round}: the PodMigration lost without naming the plugin's migration {id}: {message}"
                );
                plugin_won += 1;
                (
                    format!("{}-m{}", base(&current), generation(&current) + 1),
                    "plugin",
                )
            }
            (Some(1), "Succeeded") => {
                let id = field(cluster, &object, "{.status.migrationId}")?;
                contended += usize::from(said.contains(&format!("migration {id}")));
                ensure!(
                    said.contains(&format!("migration {id}")) || gone(&current, &said),
                    "round {round}: the plugin lost without naming the PodMigration's migration {id}:\n{said}"
                );
                object_won += 1;
                (
                    field(cluster, &object, "{.status.targetPod}")?,
                    "PodMigration",
                )
            }
            other => bail!(
                "round {round}: not exactly one winner: plugin {other:?}, PodMigration {phase}: {message}\n{said}"
            ),
        };
        let (last, first) = counted_on(cluster, &current, &next, follow)?;
        let copies = cluster
            .kubectl_ok(&["get", "pods", "-o", "name"])?
            .lines()
            .filter(|p| p.trim_start_matches("pod/").starts_with("pmig-race"))
            .count();
        ensure!(copies == 1, "round {round}: {copies} copies of the app");
        eprintln!("race round {round}: the {winner} moved {current} → {next} ({last} → {first})");
        cluster.kubectl_ok(&["delete", "podmigration", &object])?;
        current = next;
    }
    eprintln!(
        "{rounds} rounds: the plugin won {plugin_won}, the PodMigration {object_won}; {contended} lost to a migration in flight"
    );
    ensure!(
        contended > 0,
        "no round had the two migrations meet: the race was not run"
    );
    cluster.kubectl_ok(&["delete", "pod", &current, "--wait=false"])?;
    Ok(())
}

/// Whether `said` is a refusal because pod `pod` is gone (the other migration moved it first):
/// the preflight's words, or the API server's.
fn gone(pod: &str, said: &str) -> bool {
    said.contains(&format!("pod default/{pod} does not exist"))
        || said.contains(&format!("pods \"{pod}\" not found"))
}

/// `NAME` of `NAME-mN`, and N (0 without a suffix).
fn base(name: &str) -> &str {
    name.rsplit_once("-m")
        .filter(|(_, n)| n.parse::<u32>().is_ok())
        .map_or(name, |(base, _)| base)
}

fn generation(name: &str) -> u32 {
    name.rsplit_once("-m")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}
