//! Rules about the pod itself: it runs, no controller owns it, no earlier migration of it is
//! unfinished, every container runs a restore-launcher with CRIU, and no liveness probe would
//! kill the frozen app before the migration may end.

use super::{Facts, Problem, pod_name};

/// Only a running pod has a state to move.
pub fn not_running(facts: &Facts) -> Option<Problem> {
    let phase = facts
        .pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    (phase != "Running").then(|| {
        Problem::new(
            format!("pod {} is {phase}, not Running", pod_name(facts)),
            "only a running pod can be migrated; wait until it runs (`kubectl get pod -w`)",
        )
    })
}

/// A controller (ReplicaSet, StatefulSet, Job…) would replace or count the moved copy.
pub fn controller_owned(facts: &Facts) -> Vec<Problem> {
    facts
        .pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .map(|owner| {
            Problem::new(
                format!("pod {} is managed by {} {}", pod_name(facts), owner.kind, owner.name),
                format!(
                    "its controller would fight the moved copy (a {} counts and replaces its pods); migrate pods you created directly, or scale the {} down and run the pod on its own",
                    owner.kind, owner.kind
                ),
            )
        })
        .collect()
}

/// A migration of this pod that started and did not finish (the plugin was killed, a
/// connection dropped) leaves a frozen source or a waiting target: clear it first.
pub fn unfinished_migrations(facts: &Facts) -> Vec<Problem> {
    facts
        .unfinished
        .iter()
        .map(|m| {
            Problem::new(
                format!(
                    "migration {} of pod {} did not finish (phase {}{}{})",
                    m.id,
                    m.source,
                    m.phase,
                    m.target
                        .as_ref()
                        .map(|t| format!(", target {t}"))
                        .unwrap_or_default(),
                    if m.committed { ", committed" } else { "" }
                ),
                format!(
                    "`{}` ({}), then migrate again",
                    m.next_step(),
                    if m.committed {
                        "the target holds the app: this finishes the move"
                    } else {
                        "this deletes the target and resumes the source"
                    }
                ),
            )
        })
        .collect()
}

/// How long a liveness probe tolerates an app that answers nothing before the kubelet
/// restarts the container: the first failed probe may come right after the freeze, and the
/// restart follows `failureThreshold` consecutive failures, one per `periodSeconds`, each
/// declared after `timeoutSeconds` (Kubernetes' defaults: 3, 10 s, 1 s).
pub fn probe_budget(probe: &k8s_openapi::api::core::v1::Probe) -> std::time::Duration {
    let threshold = u64::try_from(probe.failure_threshold.unwrap_or(3).max(1)).unwrap_or(1);
    let period = u64::try_from(probe.period_seconds.unwrap_or(10).max(1)).unwrap_or(10);
    let timeout = u64::try_from(probe.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1);
    std::time::Duration::from_secs((threshold - 1) * period + timeout)
}

/// The least a liveness probe must leave for the freeze: below it, no migration of an app of
/// any size fits.
pub const MIN_PROBE_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// The liveness probes that fail while the app is frozen, by container, with their budgets. A
/// frozen app answers no HTTP or gRPC request and runs no code for an exec probe that talks to
/// it, so such a probe keeps failing, and once it has failed `failureThreshold` times the
/// kubelet restarts the container: the app would be killed, and on an undo it would not come
/// back with its state. A TCP probe passes: the kernel completes the handshake on a frozen
/// process's listening socket.
fn freezing_probes(facts: &Facts) -> Vec<(String, std::time::Duration)> {
    let migrated = crate::rewrite::migrated_containers(&facts.pod);
    facts
        .pod
        .spec
        .iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
        })
        .filter(|c| migrated.contains(&c.name))
        .filter_map(|c| {
            let probe = c.liveness_probe.as_ref()?;
            (probe.tcp_socket.is_none()).then(|| (c.name.clone(), probe_budget(probe)))
        })
        .collect()
}

/// How long the app may stay frozen: `--max-downtime` if given, else a second less than the
/// tightest liveness probe allows, else no limit. The migration undoes itself (resuming the
/// source) once the app has been frozen that long, before a probe can kill it.
pub fn freeze_limit(facts: &Facts) -> Option<std::time::Duration> {
    facts.max_downtime.or_else(|| {
        freezing_probes(facts)
            .into_iter()
            .map(|(_, budget)| budget.saturating_sub(std::time::Duration::from_secs(1)))
            .min()
    })
}

/// With `--keep-source` the source stays frozen for good, and a liveness probe that fails on a
/// frozen app would make the kubelet restart its container: the launcher would start the app
/// fresh beside the migrated one, a second copy.
pub fn kept_source_with_probes(facts: &Facts) -> Vec<Problem> {
    if !facts.keep_source {
        return Vec::new();
    }
    freezing_probes(facts)
        .into_iter()
        .map(|(container, _)| {
            Problem::new(
                format!(
                    "--keep-source keeps pod {} frozen, and container {container}'s liveness probe would restart it there, starting a second copy of the app",
                    pod_name(facts)
                ),
                "migrate without --keep-source, or give the container a TCP probe, which a frozen app passes",
            )
        })
        .collect()
}

/// A liveness probe that would restart the frozen app: one that leaves less than
/// [`MIN_PROBE_BUDGET`], or less than an explicit `--max-downtime`.
pub fn probes_too_tight(facts: &Facts) -> Vec<Problem> {
    freezing_probes(facts)
        .into_iter()
        .filter(|(_, budget)| {
            *budget < MIN_PROBE_BUDGET || facts.max_downtime.is_some_and(|limit| *budget <= limit)
        })
        .map(|(container, budget)| {
            let needed = facts.max_downtime.unwrap_or(MIN_PROBE_BUDGET).as_secs();
            Problem::new(
                format!(
                    "container {container}'s liveness probe would restart it {} s into the freeze, which leaves no room for a migration{}",
                    budget.as_secs(),
                    facts
                        .max_downtime
                        .map(|l| format!(" of --max-downtime {} s", l.as_secs()))
                        .unwrap_or_default()
                ),
                format!(
                    "allow the probe more than {needed} s ((failureThreshold - 1) × periodSeconds + timeoutSeconds), or use a TCP probe, which a frozen app still passes"
                ),
            )
        })
        .collect()
}

/// Every container must answer `restore-launcher status` and have CRIU.
pub fn launchers_missing(facts: &Facts) -> Vec<Problem> {
    facts
        .launchers
        .iter()
        .filter_map(|(container, status)| match status {
            Err(error) => Some(Problem::new(
                format!("container {container} does not answer `restore-launcher status` ({error})"),
                "build its image FROM the restore-launcher base image so restore-launcher is its ENTRYPOINT",
            )),
            Ok(status) if status.criu_version.is_none() => Some(Problem::new(
                format!("container {container} runs restore-launcher but has no CRIU"),
                "build the image FROM the restore-launcher base image, which ships CRIU 4.x",
            )),
            Ok(_) => None,
        })
        .collect()
}

/// An app holding SysV IPC objects in the container's IPC namespace (which it shares with the
/// launcher) would be restored without them: its launcher must give it a namespace of its own.
pub fn sysv_ipc_left_behind(facts: &Facts) -> Vec<Problem> {
    facts
        .launchers
        .iter()
        .filter_map(|(container, status)| {
            let objects = status.as_ref().ok()?.sysv_ipc.as_ref()?;
            Some(Problem::new(
                format!(
                    "container {container}'s app uses {objects} in the container's IPC namespace, which a checkpoint taken inside the container cannot carry"
                ),
                "give the app an IPC namespace of its own: set RESTORE_LAUNCHER_IPC_NAMESPACE=true in the container's env and add SYS_ADMIN to its securityContext.capabilities.add (CRIU then carries the namespace), and recreate the pod",
            ))
        })
        .collect()
}

/// With `--lazy`, a source container whose launcher says it cannot serve post-copy: the
/// node's pipe limits or the container's capabilities (its status names which and the fix).
pub fn cannot_serve_post_copy(facts: &Facts) -> Vec<Problem> {
    if !facts.lazy {
        return Vec::new();
    }
    facts
        .launchers
        .iter()
        .filter_map(|(container, status)| {
            // The launcher's reason says what is missing and how to give it.
            let reason = status.as_ref().ok()?.post_copy_source.as_ref()?;
            Some(Problem::new(
                format!(
                    "container {container} of pod {} cannot be the source of a post-copy (--lazy)",
                    pod_name(facts)
                ),
                format!("{reason}; or migrate without --lazy"),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{facts, status};
    use super::*;

    #[test]
    fn a_source_that_cannot_serve_post_copy_is_refused_only_with_lazy() {
        let mut f = facts();
        let mut limited = status();
        limited.post_copy_source = Some(
            "CRIU's lazy dump needs pipes of 4194304 bytes and this node's fs.pipe-max-size is 1048576: raise it on the source node".into(),
        );
        f.launchers.insert("counter".into(), Ok(limited));
        assert!(
            cannot_serve_post_copy(&f).is_empty(),
            "refused without --lazy"
        );
        f.lazy = true;
        let found = cannot_serve_post_copy(&f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].what.contains("container counter"), "{}", found[0]);
        assert!(found[0].fix.contains("fs.pipe-max-size"), "{}", found[0]);
        assert!(found[0].fix.contains("without --lazy"), "{}", found[0]);
    }

    #[test]
    fn sysv_ipc_in_the_shared_namespace_names_the_option() {
        let mut f = facts();
        assert!(sysv_ipc_left_behind(&f).is_empty());
        let mut held = status();
        held.sysv_ipc = Some("1 SysV semaphore set (key 0x0)".into());
        f.launchers.insert("counter".into(), Ok(held));
        let found = sysv_ipc_left_behind(&f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].what.contains("1 SysV semaphore set"),
            "{}",
            found[0]
        );
        assert!(
            found[0].fix.contains("RESTORE_LAUNCHER_IPC_NAMESPACE=true"),
            "{}",
            found[0]
        );
        assert!(found[0].fix.contains("SYS_ADMIN"), "{}", found[0]);
    }

    #[test]
    fn a_pod_that_does_not_run_is_refused() {
        let mut f = facts();
        assert_eq!(not_running(&f), None);
        f.pod.status.as_mut().unwrap().phase = Some("Pending".into());
        let p = not_running(&f).unwrap();
        assert!(
            p.what.contains("pod counter is Pending, not Running"),
            "{p}"
        );
        assert!(p.fix.contains("wait until it runs"), "{p}");
        f.pod.status = None;
        assert!(not_running(&f).unwrap().what.contains("is Unknown"));
    }

    #[test]
    fn a_controller_owned_pod_names_its_controller() {
        let mut f = facts();
        assert!(controller_owned(&f).is_empty());
        f.pod.metadata.owner_references = Some(
            serde_json::from_value(serde_json::json!([
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": true},
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-a-controller", "uid": "v"}
            ]))
            .unwrap(),
        );
        let found = controller_owned(&f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].what.contains("managed by ReplicaSet web-1"));
        assert!(found[0].fix.contains("scale the ReplicaSet down"));
    }

    #[test]
    fn an_unfinished_migration_names_the_command_that_clears_it() {
        let mut f = facts();
        assert!(unfinished_migrations(&f).is_empty());
        let mut m = crate::recover::InFlight {
            id: "mig-1".into(),
            source: "counter".into(),
            target: Some("counter-m1".into()),
            phase: "checkpointing".into(),
            committed: false,
            age_seconds: Some(30),
        };
        f.unfinished = vec![m.clone()];
        let p = &unfinished_migrations(&f)[0];
        assert!(p.what.contains("migration mig-1 of pod counter did not finish (phase checkpointing, target counter-m1)"), "{p}");
        assert!(p.fix.contains("kubectl migrate abort counter"), "{p}");
        m.committed = true;
        m.phase = "committed".into();
        f.unfinished = vec![m];
        assert!(
            unfinished_migrations(&f)[0]
                .fix
                .contains("kubectl migrate resume counter")
        );
    }

    #[test]
    fn a_liveness_probe_that_would_kill_the_frozen_app_is_refused_or_bounds_the_freeze() {
        let mut f = facts();
        assert!(probes_too_tight(&f).is_empty(), "no probe");
        assert_eq!(freeze_limit(&f), None, "no probe, no limit");
        let probe = |kind: serde_json::Value| {
            Some(serde_json::from_value::<k8s_openapi::api::core::v1::Probe>(kind).unwrap())
        };
        // HTTP, period 1 s, threshold 2: restarted ~2 s into a freeze: refused up front.
        f.pod.spec.as_mut().unwrap().containers[0].liveness_probe = probe(serde_json::json!(
            {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2}
        ));
        let found = probes_too_tight(&f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].what.contains(
                "container counter's liveness probe would restart it 2 s into the freeze"
            ),
            "{}",
            found[0]
        );
        assert!(found[0].fix.contains("more than 5 s"), "{}", found[0]);
        // Kubernetes' defaults (3 × 10 s + 1 s) leave 21 s: accepted, and the freeze is bounded
        // a second below.
        f.pod.spec.as_mut().unwrap().containers[0].liveness_probe =
            probe(serde_json::json!({"exec": {"command": ["true"]}}));
        assert!(probes_too_tight(&f).is_empty());
        assert_eq!(freeze_limit(&f), Some(std::time::Duration::from_secs(20)));
        // An explicit --max-downtime the probe does not allow is refused; a smaller one wins.
        f.max_downtime = Some(std::time::Duration::from_secs(30));
        assert!(probes_too_tight(&f)[0].fix.contains("more than 30 s"));
        f.max_downtime = Some(std::time::Duration::from_secs(10));
        assert!(probes_too_tight(&f).is_empty());
        assert_eq!(freeze_limit(&f), Some(std::time::Duration::from_secs(10)));
        // A TCP probe: the kernel answers for a frozen app.
        f.max_downtime = None;
        f.pod.spec.as_mut().unwrap().containers[0].liveness_probe = probe(serde_json::json!(
            {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 1}
        ));
        assert!(probes_too_tight(&f).is_empty());
        assert_eq!(freeze_limit(&f), None);
    }

    #[test]
    fn a_kept_source_with_a_probe_that_fails_when_frozen_is_refused() {
        let mut f = facts();
        f.pod.spec.as_mut().unwrap().containers[0].liveness_probe = Some(
            serde_json::from_value(
                serde_json::json!({"httpGet": {"port": 8080}, "periodSeconds": 30}),
            )
            .unwrap(),
        );
        assert!(
            kept_source_with_probes(&f).is_empty(),
            "the source is deleted"
        );
        f.keep_source = true;
        let found = kept_source_with_probes(&f);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].what.contains("starting a second copy"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn a_container_without_launcher_or_criu_is_named() {
        let mut f = facts();
        assert!(launchers_missing(&f).is_empty());
        f.launchers.insert(
            "counter".into(),
            Err("exec: restore-launcher: not found".into()),
        );
        let mut no_criu = status();
        no_criu.criu_version = None;
        f.launchers.insert("sidecar".into(), Ok(no_criu));
        let found = launchers_missing(&f);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].what.contains("container counter does not answer `restore-launcher status` (exec: restore-launcher: not found)"));
        assert!(found[0].fix.contains("base image"));
        assert!(
            found[1]
                .what
                .contains("container sidecar runs restore-launcher but has no CRIU")
        );
    }
}
