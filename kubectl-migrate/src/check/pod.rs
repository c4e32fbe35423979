//! Rules about the pod itself: it runs, no controller owns it, no earlier migration of it is
//! unfinished, every container runs a restore-launcher with CRIU, and no liveness probe would
//! kill the frozen app before the migration may end.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

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

/// The pod's controller (the ownerReference with `controller: true`), if any.
pub fn controller(pod: &k8s_openapi::api::core::v1::Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// A static pod: the kubelet runs it from a file on its node, and the API shows a mirror.
pub fn is_mirror(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
        || controller(pod).is_some_and(|o| o.kind == "Node")
}

/// Pods whose controller cannot hand them over: a DaemonSet's (bound to its node), a Job's,
/// static pods, and any controller this plugin does not know. A ReplicaSet's pod moves with a
/// handoff (`migrate::handoff`), when the ReplicaSet is steady and the source is not to be
/// kept; a StatefulSet's keeps its name (`migrate::identity`), when the StatefulSet is steady.
pub fn controller_owned(facts: &Facts) -> Vec<Problem> {
    let pod = pod_name(facts);
    if is_mirror(&facts.pod) {
        return vec![Problem::new(
            format!(
                "pod {pod} is a static pod: its node's kubelet runs it from a file on that node (the API shows a mirror of it)"
            ),
            "a static pod cannot move: the kubelet of its node would start it again; move the manifest to the other node's static pod directory instead",
        )];
    }
    let Some(owner) = controller(&facts.pod) else {
        return Vec::new();
    };
    let managed = format!("pod {pod} is managed by {} {}", owner.kind, owner.name);
    let problem = match owner.kind.as_str() {
        "ReplicaSet" => return replica_set_problems(facts, owner),
        "DaemonSet" => Problem::new(
            format!("{managed}, which runs one pod on each node: this pod is bound to its node"),
            "there is nothing to move: the DaemonSet runs its own pod on the target node (`kubectl migrate drain` leaves DaemonSet pods in place)",
        ),
        "Job" => Problem::new(
            format!(
                "{managed}: the Job controller starts a fresh pod as soon as this one goes, and chooses which of two running pods to delete with no regard for which one holds the moved state"
            ),
            "let the Job's pod finish where it runs, or delete it and let the Job start it again (`--force` does not help: the Job would run the app twice)",
        ),
        "StatefulSet" => return stateful_set_problems(facts, owner),
        kind => Problem::new(
            format!("{managed}, a controller kubectl migrate cannot hand a pod over to"),
            format!(
                "migrate pods that a ReplicaSet (a Deployment) owns or that no controller owns; a {kind} would replace or fight the moved copy"
            ),
        ),
    };
    vec![problem]
}

/// A ReplicaSet's pod moves when the ReplicaSet is steady (no scale or rollout under way, which
/// could delete the frozen source before the commit) and the source is not to be kept (the
/// ReplicaSet deletes its surplus pod).
fn replica_set_problems(facts: &Facts, owner: &OwnerReference) -> Vec<Problem> {
    let pod = pod_name(facts);
    let Some(rs) = &facts.replica_set else {
        return vec![Problem::new(
            format!(
                "the ReplicaSet {} that manages pod {pod} no longer exists",
                owner.name
            ),
            "the garbage collector is deleting the pod; migrate another pod of the Deployment",
        )];
    };
    let mut found = Vec::new();
    let wanted = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = rs.status.clone().unwrap_or_default();
    let (has, ready) = (status.replicas, status.ready_replicas.unwrap_or(0));
    if rs.metadata.deletion_timestamp.is_some() || wanted != has || ready != has {
        found.push(Problem::new(
            format!(
                "ReplicaSet {} is changing (it wants {wanted} pods, has {has}, {ready} of them Ready{})",
                owner.name,
                if rs.metadata.deletion_timestamp.is_some() { ", and is being deleted" } else { "" }
            ),
            "it could delete the frozen pod mid-move, and the handoff needs its other pods Ready; wait until it is steady (`kubectl rollout status deployment/NAME`), then migrate",
        ));
    }
    if let Some(deployment) = &facts.deployment {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let wanted = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let status = deployment.status.clone().unwrap_or_default();
        let settled = status.observed_generation == deployment.metadata.generation
            && status.updated_replicas == Some(wanted)
            && status.replicas == Some(wanted)
            && status.available_replicas == Some(wanted);
        if !settled {
            found.push(Problem::new(
                format!(
                    "Deployment {name} is rolling out (it wants {wanted} pods; {} updated, {} in all, {} available)",
                    status.updated_replicas.unwrap_or(0),
                    status.replicas.unwrap_or(0),
                    status.available_replicas.unwrap_or(0)
                ),
                format!("a rollout scales ReplicaSets up and down and could delete the frozen pod mid-move; wait for `kubectl rollout status deployment/{name}`, then migrate"),
            ));
        }
    }
    if facts.keep_source {
        found.push(Problem::new(
            format!("--keep-source keeps the source pod {pod}, but its ReplicaSet {} deletes its surplus pod once the moved one joins it", owner.name),
            "migrate without --keep-source",
        ));
    }
    found
}

/// A StatefulSet's pod moves keeping its name (`migrate::identity`) when the StatefulSet is
/// steady (no scale or rollout under way, which could delete or replace the pod mid-move), the
/// source is not to be kept (the name can only be the moved pod's) and the transfer is not
/// post-copy (the checkpoint is parked on the target node before the pod exists there).
fn stateful_set_problems(facts: &Facts, owner: &OwnerReference) -> Vec<Problem> {
    let pod = pod_name(facts);
    let Some(set) = &facts.stateful_set else {
        return vec![Problem::new(
            format!(
                "the StatefulSet {} that manages pod {pod} no longer exists",
                owner.name
            ),
            "the garbage collector is deleting the pod; nothing to migrate",
        )];
    };
    let mut found = Vec::new();
    let wanted = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = set.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let rolling = status.current_revision.is_some()
        && status.update_revision.is_some()
        && status.current_revision != status.update_revision;
    if set.metadata.deletion_timestamp.is_some()
        || status.observed_generation != set.metadata.generation
        || status.replicas != wanted
        || ready != wanted
        || rolling
    {
        found.push(Problem::new(
            format!(
                "StatefulSet {} is changing (it wants {wanted} pods, has {}, {ready} of them Ready{})",
                owner.name,
                status.replicas,
                if rolling {
                    ", and is rolling out a new revision"
                } else if set.metadata.deletion_timestamp.is_some() {
                    ", and is being deleted"
                } else {
                    ""
                }
            ),
            format!(
                "it could delete or replace the pod mid-move; wait until it is steady (`kubectl rollout status statefulset/{}`), then migrate",
                owner.name
            ),
        ));
    }
    if facts.keep_source {
        found.push(Problem::new(
            format!(
                "--keep-source keeps the source pod {pod}, but a StatefulSet's pod keeps its name when it moves: only one pod can have it"
            ),
            "migrate without --keep-source",
        ));
    }
    if facts.lazy {
        found.push(Problem::new(
            format!(
                "pod {pod} is a StatefulSet's: its checkpoint waits on the target node until the pod's name is free there, so its memory cannot be served after the thaw (post-copy)"
            ),
            "migrate without --lazy",
        ));
    }
    found
}

/// A StatefulSet's pod is deleted while its app is frozen, and the moved pod starts only once
/// it is gone: a preStop hook (run against the frozen app, which cannot answer) can hold that
/// up to the grace period, all of it downtime.
pub fn stop_hooks_in_downtime(facts: &Facts) -> Option<String> {
    facts.stateful_set.as_ref()?;
    let spec = facts.pod.spec.as_ref()?;
    let hooked: Vec<&str> = spec
        .containers
        .iter()
        .filter(|c| c.lifecycle.as_ref().is_some_and(|l| l.pre_stop.is_some()))
        .map(|c| c.name.as_str())
        .collect();
    (!hooked.is_empty()).then(|| {
        format!(
            "container(s) {} of pod {} have a preStop hook: it runs against the frozen app when the pod is deleted, and the moved pod starts only once the old one is gone, so a hook that waits for the app adds up to the grace period ({} s) to the downtime",
            hooked.join(", "),
            pod_name(facts),
            spec.termination_grace_period_seconds.unwrap_or(30)
        )
    })
}

/// A migration of this pod that started and did not finish (the plugin was killed, a
/// connection dropped) leaves a frozen source or a waiting target: clear it first.
pub fn unfinished_migrations(facts: &Facts) -> Vec<Problem> {
    facts
        .unfinished
        .iter()
        .map(|m| {
            if m.freeze_ended {
                return Problem::new(
                    format!(
                        "migration {} of pod {} can never finish (its freeze ended without a commit, and the app runs on with its state){}; it still holds the pod",
                        m.id,
                        m.source,
                        m.target
                            .as_ref()
                            .map(|t| format!(": its target {t} is left behind"))
                            .unwrap_or_default(),
                    ),
                    format!(
                        "`{}` removes what it left (the source is not touched), then migrate again",
                        m.next_step()
                    ),
                );
            }
            Problem::new(
                format!(
                    "migration {} of pod {} is in progress or did not finish (phase {}{}{})",
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
                    "wait for it to end; if nothing runs it any more, `{}` ({}), then migrate again",
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

/// `--lazy` keeps the source frozen until every page of the app's memory reached the target
/// -- the target's app faults its pages in from it -- with no bound a probe could be given:
/// a liveness probe that fails on the frozen source would have the kubelet restart it midway,
/// and the app on the target would die with the pages it lacks. Refused up front.
pub fn lazy_with_freezing_probes(facts: &Facts) -> Vec<Problem> {
    if !facts.lazy {
        return Vec::new();
    }
    freezing_probes(facts)
        .into_iter()
        .map(|(container, budget)| {
            Problem::new(
                format!(
                    "--lazy keeps pod {} frozen until every page of its memory has reached the target, however long that takes, and container {container}'s liveness probe would restart it {} s into the freeze, killing the app on the target with it",
                    pod_name(facts),
                    budget.as_secs()
                ),
                "migrate without --lazy (the freeze is then cut short before the probe fails), or give the container a TCP liveness probe, which a frozen app still passes",
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
            // The launcher ships in the app's image, which may be older than this plugin: a
            // migration that relied on what it cannot do would lose the app (a startup probe
            // it cannot answer, a freeze limit it ignores).
            Ok(status) => {
                let lacking: Vec<&str> = migrate_format::FEATURES
                    .iter()
                    .copied()
                    .filter(|f| !status.features.iter().any(|has| has == f))
                    .collect();
                (!lacking.is_empty()).then(|| Problem::new(
                    format!(
                        "container {container}'s restore-launcher ({}) is older than this plugin: it lacks {}",
                        status.launcher_version,
                        lacking.join(", ")
                    ),
                    "rebuild the image on the current restore-launcher base image, or use the kubectl-migrate release that matches it",
                ))
            }
        })
        .collect()
}

/// A pod in the node's PID namespace (`hostPID`): its launcher is not its containers' PID 1,
/// their processes mix with the node's, and its launcher cannot tell the plugin's `kubectl
/// exec` from a process of the node, so the way back to a committed copy would be refused.
pub fn host_pid(facts: &Facts) -> Option<Problem> {
    let shares = facts
        .pod
        .spec
        .as_ref()
        .and_then(|spec| spec.host_pid)
        .unwrap_or(false);
    shares.then(|| {
        Problem::new(
            format!(
                "pod {} shares the node's PID namespace (hostPID: true): a checkpoint taken inside the container carries the app's PIDs, which another node's PID namespace cannot give back, and its launcher cannot tell the plugin from the node's processes",
                facts.pod.metadata.name.as_deref().unwrap_or_default()
            ),
            "run the app without hostPID (it keeps its own PID namespace, with the launcher as PID 1), and recreate the pod",
        )
    })
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

/// A source container whose launcher says it cannot checkpoint its app (a capability the pod
/// does not grant): the move would freeze the app only to fail, so it is refused up front.
pub fn cannot_checkpoint(facts: &Facts) -> Vec<Problem> {
    facts
        .launchers
        .iter()
        .filter_map(|(container, status)| {
            let reason = status.as_ref().ok()?.checkpoint_blocked.as_ref()?;
            Some(Problem::new(
                format!(
                    "container {container} of pod {} cannot be checkpointed: {reason}",
                    pod_name(facts)
                ),
                "give the container what is named above in its securityContext, and recreate the pod".to_string(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{facts, status};
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSet;

    #[test]
    fn a_source_whose_launcher_cannot_checkpoint_is_refused_naming_what_it_lacks() {
        let mut f = facts();
        assert!(cannot_checkpoint(&f).is_empty());
        let mut blocked = status();
        blocked.checkpoint_blocked = Some(
            "criu checkpoint needs CAP_CHECKPOINT_RESTORE, which this container lacks; add it to the container's securityContext.capabilities.add".into(),
        );
        f.launchers.insert("counter".into(), Ok(blocked));
        let found = cannot_checkpoint(&f);
        assert_eq!(found.len(), 1);
        assert!(found[0].what.contains("container counter"));
        assert!(found[0].what.contains("CAP_CHECKPOINT_RESTORE"));
    }

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
    fn a_pod_in_the_nodes_pid_namespace_is_refused_naming_host_pid() {
        let mut f = facts();
        assert_eq!(host_pid(&f), None);
        f.pod.spec.as_mut().unwrap().host_pid = Some(true);
        let p = host_pid(&f).unwrap();
        assert!(p.what.contains("hostPID: true"), "{p}");
        assert!(p.fix.contains("without hostPID"), "{p}");
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
        let owned_by = |f: &mut Facts, kind: &str| {
            f.pod.metadata.owner_references = Some(
                serde_json::from_value(serde_json::json!([
                    {"apiVersion": "apps/v1", "kind": kind, "name": "web-1", "uid": "u", "controller": true},
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-a-controller", "uid": "v"}
                ]))
                .unwrap(),
            );
        };
        for (kind, says, fix) in [
            (
                "DaemonSet",
                "one pod on each node",
                "drain` leaves DaemonSet pods",
            ),
            (
                "Job",
                "starts a fresh pod",
                "the Job would run the app twice",
            ),
            (
                "CronTab",
                "cannot hand a pod over to",
                "a CronTab would replace",
            ),
        ] {
            owned_by(&mut f, kind);
            let found = controller_owned(&f);
            assert_eq!(found.len(), 1, "{kind}: {found:#?}");
            assert!(
                found[0].what.contains(&format!("managed by {kind} web-1"))
                    && found[0].what.contains(says)
                    && found[0].fix.contains(fix),
                "{kind}: {found:#?}"
            );
        }
    }

    #[test]
    fn a_stateful_set_pod_moves_only_while_its_set_is_steady_without_keep_source_or_lazy() {
        let mut f = facts();
        f.pod.metadata.owner_references = Some(
            serde_json::from_value(serde_json::json!([
                {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u", "controller": true}
            ]))
            .unwrap(),
        );
        let set = |replicas: i32, ready: i32, current: &str, update: &str| {
            serde_json::from_value::<StatefulSet>(serde_json::json!({
                "metadata": {"name": "web", "uid": "u", "generation": 2},
                "spec": {"replicas": 1, "selector": {}, "template": {}, "serviceName": "web"},
                "status": {"replicas": replicas, "readyReplicas": ready, "observedGeneration": 2,
                           "currentRevision": current, "updateRevision": update}
            }))
            .unwrap()
        };
        let found = controller_owned(&f);
        assert!(
            found[0]
                .what
                .contains("the StatefulSet web that manages pod counter no longer exists"),
            "{found:#?}"
        );
        f.stateful_set = Some(set(1, 1, "web-1", "web-1"));
        assert_eq!(controller_owned(&f), Vec::new(), "a steady set's pod moves");
        f.stateful_set = Some(set(1, 0, "web-1", "web-1"));
        let found = controller_owned(&f);
        assert!(
            found[0]
                .what
                .contains("StatefulSet web is changing (it wants 1 pods, has 1, 0 of them Ready)"),
            "{found:#?}"
        );
        assert!(
            found[0]
                .fix
                .contains("kubectl rollout status statefulset/web")
        );
        f.stateful_set = Some(set(1, 1, "web-1", "web-2"));
        let found = controller_owned(&f);
        assert!(
            found[0].what.contains("rolling out a new revision"),
            "{found:#?}"
        );
        f.stateful_set = Some(set(1, 1, "web-1", "web-1"));
        f.keep_source = true;
        f.lazy = true;
        let found = controller_owned(&f);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].what.contains("only one pod can have it"));
        assert!(found[1].fix.contains("without --lazy"));
    }

    #[test]
    fn a_stateful_set_pods_pre_stop_hook_is_noted_as_downtime() {
        let mut f = facts();
        f.pod.spec.as_mut().unwrap().containers[0].lifecycle = Some(
            serde_json::from_value(
                serde_json::json!({"preStop": {"exec": {"command": ["sleep", "5"]}}}),
            )
            .unwrap(),
        );
        assert_eq!(
            stop_hooks_in_downtime(&f),
            None,
            "a bare pod's source goes after the thaw"
        );
        f.stateful_set = Some(Default::default());
        let note = stop_hooks_in_downtime(&f).unwrap();
        assert!(
            note.contains("container(s) counter of pod counter have a preStop hook"),
            "{note}"
        );
        assert!(note.contains("(30 s)"), "{note}");
    }

    #[test]
    fn a_replica_set_pod_moves_only_while_its_replica_set_is_steady_and_without_keep_source() {
        let mut f = facts();
        f.pod.metadata.owner_references = Some(
            serde_json::from_value(serde_json::json!([
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": true}
            ]))
            .unwrap(),
        );
        let gone = controller_owned(&f);
        assert!(
            gone.len() == 1 && gone[0].what.contains("no longer exists"),
            "{gone:#?}"
        );
        let rs = |wanted: i32, has: i32| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "uid": "u"},
                "spec": {"replicas": wanted, "selector": {"matchLabels": {"app": "web"}}},
                "status": {"replicas": has, "readyReplicas": has}
            }))
            .unwrap()
        };
        f.replica_set = Some(rs(2, 2));
        assert_eq!(controller_owned(&f), Vec::new());
        f.replica_set = Some(rs(2, 3));
        let scaling = controller_owned(&f);
        assert!(
            scaling.len() == 1
                && scaling[0].what.contains("wants 2 pods, has 3")
                && scaling[0].fix.contains("rollout status"),
            "{scaling:#?}"
        );
        f.replica_set = Some(rs(2, 2));
        f.keep_source = true;
        let kept = controller_owned(&f);
        assert!(
            kept.len() == 1 && kept[0].what.contains("--keep-source"),
            "{kept:#?}"
        );
    }

    #[test]
    fn a_deployment_pod_is_refused_while_its_deployment_rolls_out() {
        let mut f = facts();
        f.pod.metadata.owner_references = Some(
            serde_json::from_value(serde_json::json!([
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": true}
            ]))
            .unwrap(),
        );
        f.replica_set = Some(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "uid": "u"},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}},
                "status": {"replicas": 2, "readyReplicas": 2}
            }))
            .unwrap(),
        );
        let deployment = |updated: i32| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "generation": 3},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {}},
                "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": updated, "availableReplicas": 2}
            }))
            .unwrap()
        };
        f.deployment = Some(deployment(2));
        assert_eq!(controller_owned(&f), Vec::new());
        f.deployment = Some(deployment(1));
        let rolling = controller_owned(&f);
        assert!(
            rolling.len() == 1
                && rolling[0].what.contains("Deployment web is rolling out")
                && rolling[0]
                    .fix
                    .contains("kubectl rollout status deployment/web"),
            "{rolling:#?}"
        );
    }

    #[test]
    fn a_static_pod_is_refused() {
        let mut f = facts();
        f.pod.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_string(), "abc".to_string())].into());
        let found = controller_owned(&f);
        assert!(
            found.len() == 1 && found[0].what.contains("static pod"),
            "{found:#?}"
        );
    }

    #[test]
    fn an_unfinished_migration_names_the_command_that_clears_it() {
        let mut f = facts();
        assert!(unfinished_migrations(&f).is_empty());
        let mut m = crate::record::InFlight {
            id: "mig-1".into(),
            source: "counter".into(),
            target: Some("counter-m1".into()),
            phase: "checkpointing".into(),
            committed: false,
            age_seconds: Some(30),
            freeze_ended: false,
        };
        f.unfinished = vec![m.clone()];
        let p = &unfinished_migrations(&f)[0];
        assert!(p.what.contains("migration mig-1 of pod counter is in progress or did not finish (phase checkpointing, target counter-m1)"), "{p}");
        assert!(p.fix.contains("kubectl migrate abort counter"), "{p}");
        m.freeze_ended = true;
        f.unfinished = vec![m.clone()];
        let p = &unfinished_migrations(&f)[0];
        assert!(
            p.what.contains("can never finish") && p.what.contains("counter-m1 is left behind"),
            "{p}"
        );
        assert!(
            p.fix.contains("`kubectl migrate abort counter` removes"),
            "{p}"
        );
        m.freeze_ended = false;
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
    fn a_launcher_older_than_the_plugin_is_refused_naming_what_it_lacks() {
        let mut f = facts();
        assert!(launchers_missing(&f).is_empty());
        if let Some(Ok(status)) = f.launchers.get_mut("counter") {
            status.features = vec!["probe".into()];
        }
        let found = launchers_missing(&f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].what.contains(
                "is older than this plugin: it lacks freeze-limit, rollback-committed, moved-record"
            ),
            "{}",
            found[0]
        );
        assert!(found[0].fix.contains("rebuild the image"), "{}", found[0]);
    }

    #[test]
    fn lazy_is_refused_for_a_source_whose_liveness_probe_fails_when_frozen() {
        let mut f = facts();
        f.lazy = true;
        assert!(lazy_with_freezing_probes(&f).is_empty(), "no probe");
        let probe = |kind: serde_json::Value| {
            Some(serde_json::from_value::<k8s_openapi::api::core::v1::Probe>(kind).unwrap())
        };
        f.pod.spec.as_mut().unwrap().containers[0].liveness_probe = probe(serde_json::json!(
            {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 2, "failureThreshold": 3}
        ));
        let found = lazy_with_freezing_probes(&f);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].what.contains("--lazy keeps pod")
                && found[0].what.contains("restart it 5 s into the freeze"),
            "{}",
            found[0]
        );
        assert!(found[0].fix.contains("without --lazy"), "{}", found[0]);
        // Without --lazy the same probe only bounds the freeze; a TCP probe never fails.
        f.lazy = false;
        assert!(lazy_with_freezing_probes(&f).is_empty());
        f.lazy = true;
        f.pod.spec.as_mut().unwrap().containers[0].liveness_probe =
            probe(serde_json::json!({"tcpSocket": {"port": 8080}}));
        assert!(lazy_with_freezing_probes(&f).is_empty());
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
