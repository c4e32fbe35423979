//! Rules about the pod itself: it runs, no controller owns it, and every container runs a
//! restore-launcher with CRIU.

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

#[cfg(test)]
mod tests {
    use super::super::fixture::{facts, status};
    use super::*;

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
