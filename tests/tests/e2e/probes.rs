//! Pods shaped as production pods are: an HTTP liveness probe on the app (the counter serving
//! `/healthz`, period 2 s, threshold 3: the kubelet restarts a container that answers nothing
//! for 5 s). What the guarantee must survive under the real kubelet: a plugin that dies with
//! the source frozen, a target that waits past the probe's budget, a target that loses the app
//! after the commit, a Deployment's source killed by its probe after the commit, and two
//! migrations of one pod at once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use migrate_tests::cluster::Cluster;
use migrate_tests::{counter_values, workspace_binary};

use super::{
    Follow, WAIT, assert_continued, counted_on, example_pod, kubectl_migrate, launcher_status,
    logs, migrate_killed_at, migrate_ok, nothing_in_flight, pod_field, source_kept_counting,
    wait_gone, wait_until,
};

/// The liveness probe production pods carry: HTTP, every 2 s, restart after 3 failures.
const PROBE: &str = "{httpGet: {path: /healthz, port: 8080}, periodSeconds: 2, failureThreshold: 3, timeoutSeconds: 1}";

/// The counter serving HTTP on 8080, with [`PROBE`] as its liveness probe, as YAML.
fn probed_counter_yaml(name: &str, node: &str) -> Result<serde_yaml::Value> {
    let yaml = example_pod(
        "counter/pod.yaml",
        name,
        node,
        &[("COUNTER_INTERVAL", "0.5"), ("COUNTER_HTTP_PORT", "8080")],
    )?;
    let mut pod: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    pod["spec"]["containers"][0]["livenessProbe"] = serde_yaml::from_str(PROBE)?;
    Ok(pod)
}

/// Runs the probed counter as a bare pod on `node` and waits until it counts.
fn probed_counter(cluster: &Cluster, name: &str, node: &str) -> Result<()> {
    cluster.apply(&serde_yaml::to_string(&probed_counter_yaml(name, node)?)?)?;
    cluster.wait_running(name, WAIT)?;
    wait_until(&format!("{name} counts"), WAIT, || {
        Ok((counter_values(&logs(cluster, name, None)).len() >= 4).then_some(()))
    })
}

/// The name the next migration gives pod `name`: `NAME-m1`, then `NAME-m2`...
fn next_name(name: &str) -> String {
    match name
        .rsplit_once("-m")
        .map(|(base, n)| (base, n.parse::<u32>()))
    {
        Some((base, Ok(n))) => format!("{base}-m{}", n + 1),
        _ => format!("{name}-m1"),
    }
}

fn restarts(cluster: &Cluster, pod: &str) -> Result<String> {
    pod_field(cluster, pod, "{.status.containerStatuses[0].restartCount}")
}

/// Acceptance: the plugin SIGKILLed with the probed source frozen. The launcher resumes the app
/// by itself at the freeze limit (4 s, a second inside the probe's 5 s), whatever its lease:
/// the kubelet never restarts it, and the count goes on. Nothing is in flight then: `status`
/// names the waiting target the dead migration left, `abort` removes it and says the pod kept
/// its state, which is true. `--lazy`, which would keep the
/// source frozen without a bound, is refused up front for this pod.
pub fn a_dead_plugin_leaves_a_probed_source_that_resumes_within_its_budget(
    cluster: &Cluster,
) -> Result<()> {
    let name = "probed-dead";
    probed_counter(cluster, name, "node-a")?;

    let lazy = kubectl_migrate(cluster, &[name, "--to", "node-b", "--lazy"]).output()?;
    let said =
        String::from_utf8_lossy(&lazy.stdout).into_owned() + &String::from_utf8_lossy(&lazy.stderr);
    ensure!(
        lazy.status.code() == Some(1)
            && said.contains("--lazy keeps pod")
            && said.contains("without --lazy")
            && said.contains("nothing was changed"),
        "--lazy was not refused up front for a probed source:\n{said}"
    );
    ensure!(
        !cluster
            .kubectl(&["get", "pod", &format!("{name}-m1")])
            .output()?
            .status
            .success(),
        "a refused --lazy created a target"
    );

    let follow = Follow::start(cluster, name)?;
    migrate_killed_at(cluster, name, "frozen")?;
    let frozen = Instant::now();
    // Frozen under a lease bounded by the probe (4 s, whatever --lease says), unless that
    // already ran out by the time this exec got there.
    let status = launcher_status(cluster, name, None)?;
    ensure!(
        (status["state"] == "frozen"
            && status["lease_seconds_left"]
                .as_u64()
                .is_some_and(|left| left <= 4))
            || (status["state"] == "running" && frozen.elapsed() >= Duration::from_secs(3)),
        "the source is not frozen under a lease bounded by its probe: {status}"
    );
    wait_until("the source resuming by itself", WAIT, || {
        let status = launcher_status(cluster, name, None)?;
        Ok((status["state"] == "running" && status["app_stopped"] == false).then_some(()))
    })?;
    eprintln!(
        "the probed source resumed by itself {} ms after the plugin died",
        frozen.elapsed().as_millis()
    );
    // Counting on from where it stopped, and never restarted (checked after more than the
    // probe's budget of counting: 8 s).
    let seen = counter_values(&follow.text()).len();
    wait_until("16 more counts on the source", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= seen + 16).then_some(()))
    })?;
    source_kept_counting(cluster, name, follow)?;

    // The migration can never finish (the source's launcher names its freeze as ended
    // without a commit): nothing is in flight, and `status` and `check` name what it left,
    // the waiting target, with the command that removes it.
    let listed = kubectl_migrate(cluster, &["status", name]).output()?;
    let table = String::from_utf8_lossy(&listed.stdout).into_owned();
    ensure!(
        table.contains("no unfinished migrations")
            && table.contains("can never finish")
            && table.contains(&format!("its target {name}-m1"))
            && table.contains(&format!("kubectl migrate abort {name}")),
        "{table}"
    );
    let check = kubectl_migrate(cluster, &["check", name, "--to", "node-b"]).output()?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    ensure!(
        !check.status.success()
            && said.contains("can never finish")
            && said.contains(&format!(
                "kubectl migrate abort {name}` removes what it left"
            )),
        "{said}"
    );
    let abort = kubectl_migrate(cluster, &["abort", name]).output()?;
    let text = String::from_utf8_lossy(&abort.stdout).into_owned();
    ensure!(
        abort.status.success() && text.contains("keeps running with its state"),
        "{text}{}",
        String::from_utf8_lossy(&abort.stderr)
    );
    wait_gone(cluster, &format!("{name}-m1"))?;
    nothing_in_flight(cluster, name)?;
    ensure!(restarts(cluster, name)? == "0", "the source restarted");
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// Acceptance: the target waits for its checkpoint three times the probe's budget (the plugin
/// held by the fault hook before the freeze). The target inherits the app's liveness probe, but
/// its startup probe (the launcher's answer) keeps the kubelet from running it before the thaw:
/// the move succeeds with the target never restarted and the count continued, and from the
/// thaw on the app's own probe works: when the app stops serving, the kubelet restarts it.
pub fn a_target_waiting_past_the_probe_budget_is_not_restarted_and_its_probe_works_after(
    cluster: &Cluster,
) -> Result<()> {
    let name = "probed-wait";
    probed_counter(cluster, name, "node-a")?;
    let follow = Follow::start(cluster, name)?;
    let target = format!("{name}-m1");
    migrate_ok(
        cluster,
        &[name, "--to", "node-b"],
        &[("KUBECTL_MIGRATE_FAULT_PAUSE_AT", "target-running:15")],
    )?;
    counted_on(cluster, name, &target, follow)?;
    ensure!(
        restarts(cluster, &target)? == "0",
        "the target was restarted while it waited"
    );
    let started = pod_field(cluster, &target, "{.status.containerStatuses[0].started}")?;
    ensure!(
        started == "true",
        "the target's startup probe did not pass after the thaw"
    );

    // The app's own liveness probe runs from the thaw on.
    cluster.kubectl_ok(&[
        "exec",
        &target,
        "--",
        "python3",
        "-c",
        "import socket; s = socket.create_connection(('127.0.0.1', 8080)); s.sendall(b'GET /stop-serving HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100))",
    ])?;
    wait_until(
        "the kubelet restarting the app that stopped serving",
        WAIT,
        || Ok((restarts(cluster, &target)? == "1").then_some(())),
    )?;
    cluster.kubectl_ok(&["delete", "pod", &target, "--wait=false"])?;
    Ok(())
}

/// Acceptance: the plugin SIGKILLed right after the commit, then the target's container killed
/// (a node reboot, an OOM kill): its launcher waits for a checkpoint again and holds no copy.
/// `resume` must not delete the source, which holds the only one: it refuses, naming the way
/// back, and `resume --from-source` takes it: the target goes, the source counts on from its
/// freeze, one copy.
pub fn a_target_that_lost_the_app_after_the_commit_keeps_the_source(
    cluster: &Cluster,
) -> Result<()> {
    let name = "lost-target";
    super::run_counter(cluster, name, "node-a", &[])?;
    let follow = Follow::start(cluster, name)?;
    let target = format!("{name}-m1");
    migrate_killed_at(cluster, name, "committed")?;
    cluster.kill_container(&target)?;
    wait_until("the target's launcher waiting again", WAIT, || {
        Ok(launcher_status(cluster, &target, None)
            .is_ok_and(|s| s["state"] == "waiting")
            .then_some(()))
    })?;

    let resume = kubectl_migrate(cluster, &["resume", name]).output()?;
    let said = String::from_utf8_lossy(&resume.stderr).into_owned()
        + &String::from_utf8_lossy(&resume.stdout);
    ensure!(
        !resume.status.success()
            && said.contains("lost the app")
            && said.contains(&format!("kubectl migrate resume --from-source {name}")),
        "resume did not refuse naming the way back:\n{said}"
    );
    let source = launcher_status(cluster, name, None)?;
    ensure!(
        source["committed"] == true && source["app_stopped"] == true,
        "the source's frozen copy was touched: {source}"
    );
    ensure!(
        pod_field(cluster, name, "{.status.phase}")? == "Running",
        "the source was touched"
    );

    let back = kubectl_migrate(cluster, &["resume", "--from-source", name]).output()?;
    ensure!(
        back.status.success(),
        "resume --from-source failed:\n{}{}",
        String::from_utf8_lossy(&back.stdout),
        String::from_utf8_lossy(&back.stderr)
    );
    wait_gone(cluster, &target)?;
    source_kept_counting(cluster, name, follow)?;
    nothing_in_flight(cluster, name)?;
    cluster.kubectl_ok(&["delete", "pod", name, "--wait=false"])?;
    Ok(())
}

/// `kubectl get pods -l SELECTOR` printing each pod's name, deletion time and Ready status.
const READY_LISTING: &str = "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}";

/// The Ready pods of a [`READY_LISTING`], those being deleted left out (a deletion time sits
/// between the name and the status).
fn ready_pods(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() == 2 && fields[1] == "True").then(|| fields[0].to_string())
        })
        .collect()
}

/// Ready pods matching `selector`, not being deleted.
fn serving(cluster: &Cluster, selector: &str) -> Result<Vec<String>> {
    Ok(ready_pods(&cluster.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        READY_LISTING,
    ])?))
}

/// Acceptance: a Deployment's pod, probed, whose plugin died right after the commit: the frozen
/// source is killed by its liveness probe while the target waits for its thaw. Its restarted
/// container must not start the app fresh (it would serve the Service beside the moved one):
/// the launcher finds the pod's record of the commit and stays down, so the pod is never Ready
/// again. Watched through the move: never two Ready pods of the Deployment. `resume` finishes.
pub fn a_deployment_source_killed_by_its_probe_after_the_commit_never_serves_twice(
    cluster: &Cluster,
) -> Result<()> {
    let name = "probed-deploy";
    let pod = probed_counter_yaml(name, "node-a")?;
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": pod["spec"],
            },
        },
    });
    cluster.apply(&serde_yaml::to_string(&deployment)?)?;
    let selector = format!("app={name}");
    let source = wait_until("the Deployment's pod Ready", WAIT, || {
        Ok(serving(cluster, &selector)?.into_iter().next())
    })?;
    wait_until(&format!("{source} counts"), WAIT, || {
        Ok((counter_values(&logs(cluster, &source, None)).len() >= 4).then_some(()))
    })?;
    let follow = Follow::start(cluster, &source)?;

    // A watcher of Ready pods, all through the move.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let most = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (stop, most) = (stop.clone(), most.clone());
        let program = cluster.kubectl(&[]).get_program().to_owned();
        let kubeconfig = cluster.kubeconfig.clone();
        let selector = selector.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new(&program)
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["get", "pods", "-l", &selector, "-o", READY_LISTING])
                    .stderr(Stdio::null())
                    .output();
                if let Ok(out) = out {
                    let ready = ready_pods(&String::from_utf8_lossy(&out.stdout));
                    let mut most = most.lock().expect("lock");
                    if ready.len() > most.len() {
                        *most = ready;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    migrate_killed_at(cluster, &source, "committed")?;
    // The frozen, committed source answers no probe: the kubelet restarts its container, and
    // the launcher there refuses to start the app again.
    wait_until("the kubelet restarting the committed source", WAIT, || {
        Ok((restarts(cluster, &source)? != "0").then_some(()))
    })?;
    let message = wait_until("the restarted launcher's reason", WAIT, || {
        let last = pod_field(
            cluster,
            &source,
            "{.status.containerStatuses[0].lastState.terminated.exitCode}",
        )?;
        Ok((last == "3").then_some(()))
    });
    // The container that refused is the current one or, waiting to start again, the previous.
    let current = cluster.kubectl_ok(&["logs", &source]).unwrap_or_default();
    let previous = cluster
        .kubectl_ok(&["logs", "--previous", &source])
        .unwrap_or_default();
    message.with_context(|| format!("the source's launcher did not stay down: {current}"))?;
    let refused = [&current, &previous]
        .into_iter()
        .find(|log| log.contains("moved to another pod by a committed migration"))
        .with_context(|| {
            format!(
                "the restarted source did not say why it stays down:\n{current}\n---\n{previous}"
            )
        })?;
    ensure!(
        counter_values(refused).is_empty(),
        "the restarted source started the app:\n{refused}"
    );
    let resume = kubectl_migrate(cluster, &["resume", &source]).output()?;
    ensure!(
        resume.status.success(),
        "{}{}",
        String::from_utf8_lossy(&resume.stdout),
        String::from_utf8_lossy(&resume.stderr)
    );
    wait_gone(cluster, &source)?;
    let target = format!("{source}-m1");
    wait_until(&format!("3 counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
    })?;
    let before = follow.finish(WAIT);
    assert_continued(&before, &logs(cluster, &target, None))?;
    wait_until("the moved pod Ready", WAIT, || {
        Ok((serving(cluster, &selector)? == vec![target.clone()]).then_some(()))
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.join();
    let most = most.lock().expect("lock").clone();
    ensure!(
        most.len() <= 1,
        "two Ready pods served the Deployment's Service at once: {most:?}"
    );
    cluster.kubectl_ok(&["delete", "deployment", name, "--wait=false"])?;
    Ok(())
}

/// Acceptance: two migrations of one pod at once (two users, or a drain and a PodMigration),
/// round after round. The pod is claimed before anything is created: exactly one moves it,
/// the other is refused naming the migration that holds the pod, having touched nothing; the
/// count goes on, one copy runs.
pub fn two_migrations_of_one_pod_end_with_one_copy_and_the_loser_told(
    cluster: &Cluster,
) -> Result<()> {
    let rounds: usize = std::env::var("MIGRATE_E2E_RACE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut current = "raced".to_string();
    super::run_counter(cluster, &current, "node-a", &[])?;
    for round in 0..rounds {
        let follow = Follow::start(cluster, &current)?;
        let to = if round % 2 == 0 { "node-b" } else { "node-a" };
        let spawn = || -> Result<std::process::Child> {
            Ok(Command::new(workspace_binary("kubectl-migrate"))
                .args([current.as_str(), "--to", to])
                .env("KUBECONFIG", &cluster.kubeconfig)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?)
        };
        let (one, two) = (spawn()?, spawn()?);
        let outcomes = [one.wait_with_output()?, two.wait_with_output()?];
        let won: Vec<&std::process::Output> =
            outcomes.iter().filter(|o| o.status.success()).collect();
        let lost: Vec<&std::process::Output> =
            outcomes.iter().filter(|o| !o.status.success()).collect();
        let text = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        };
        ensure!(
            won.len() == 1 && lost.len() == 1,
            "round {round}: not exactly one winner:\n{}\n---\n{}",
            text(&outcomes[0]),
            text(&outcomes[1])
        );
        let (won, lost) = (text(won[0]), text(lost[0]));
        let id = super::reported_id(&won)
            .with_context(|| format!("round {round}: no migration id in\n{won}"))?;
        ensure!(
            lost.contains(&format!("migration {id}")) && lost.contains("nothing was changed"),
            "round {round}: the loser was not told that migration {id} holds the pod:\n{lost}"
        );
        let next = next_name(&current);
        let (last, first) = counted_on(cluster, &current, &next, follow)?;
        ensure!(
            restarts(cluster, &next)? == "0",
            "round {round}: {next} restarted"
        );
        let pods = cluster.kubectl_ok(&["get", "pods", "-o", "name"])?;
        let copies = pods
            .lines()
            .filter(|p| p.trim_start_matches("pod/").starts_with("raced"))
            .count();
        ensure!(copies == 1, "round {round}: {copies} copies:\n{pods}");
        eprintln!(
            "race round {round}: {current} → {next}, {last} → {first}, one copy, the loser told"
        );
        current = next;
    }
    cluster.kubectl_ok(&["delete", "pod", &current, "--wait=false"])?;
    Ok(())
}
