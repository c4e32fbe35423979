//! Part of step 6 for a pod a ReplicaSet owns (a Deployment's): the handoff of the pod's place
//! in its ReplicaSet from the source to the restored target, after the commit, such that the
//! ReplicaSet controller never starts a fresh replica and never deletes the restored one.
//!
//! The target was created without the source's labels and owner (see `rewrite`), so until
//! now the ReplicaSet neither counted nor adopted it and no Service selected it. The handoff,
//! once the target's app runs:
//! 1. checks that the ReplicaSet is still the source's (same uid, not being deleted) and selects
//!    the labels the target is to get, then waits until the target and every other pod of the
//!    ReplicaSet is assigned, Running, Ready and not itself being migrated: the ReplicaSet
//!    controller deletes such a pod before a Ready one whatever the deletion costs, so with one
//!    around it could delete that pod, or the target, instead of the source;
//! 2. gives the source the lowest `controller.kubernetes.io/pod-deletion-cost` and, in one
//!    write, gives the target the highest with the source's labels and its controller's
//!    ownerReference: from then the ReplicaSet owns `replicas + 1` pods and, if it acts
//!    before step 3, deletes the cheapest, the source;
//! 3. the caller deletes the source: the ReplicaSet owns `replicas` pods again (a terminating
//!    pod does not count), the restored one among them, and the target's deletion cost is
//!    taken away (it would otherwise skew the ReplicaSet's later scale-downs).
//!
//! Both writes to the target are idempotent, so `kubectl migrate resume` runs the handoff again
//! after an interruption. The pod count of the ReplicaSet stays within `replicas` and
//! `replicas + 1` throughout, and the source is never deleted before the target is owned.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt as _};
use migrate_format::annotations;

use crate::record::Phase;

/// How long the target may take to become Ready once its app runs.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The controller the target is to be handed to, from its `owner` annotation; None for the
/// target of a pod no controller owns.
pub fn owner_of(target: &Pod) -> Option<OwnerReference> {
    let notes = target.metadata.annotations.as_ref()?;
    serde_json::from_str(notes.get(annotations::OWNER)?).ok()
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Steps 1 and 2: makes target `target` the controller's pod in place of `source`. Returns
/// the controller (`Kind name`) it was handed to, or None when the target has no owner to take.
///
/// # Errors
/// What kept the handoff from happening, with the command that finishes it; the source is
/// then still the controller's pod (it must not be deleted by hand: the controller would
/// start a fresh replica).
pub async fn hand_off(
    pods: &Api<Pod>,
    replica_sets: &Api<ReplicaSet>,
    namespace: &str,
    source: &str,
    target: &str,
) -> Result<Option<String>, String> {
    let read = |name: &str, e: kube::Error| format!("cannot read pod {name}: {e}");
    let pod = pods.get(target).await.map_err(|e| read(target, e))?;
    let Some(owner) = owner_of(&pod) else {
        return Ok(None);
    };
    let named = format!("{} {}", owner.kind, owner.name);
    // An earlier handoff got that far.
    if controlled_by(&pod, &owner) {
        return Ok(Some(named));
    }
    let keep = format!(
        "the source pod {source} stays the ReplicaSet's, frozen (never delete it by hand: a fresh replica would start)"
    );
    let resume = format!("`kubectl migrate resume -n {namespace} {source}`");
    let labels: BTreeMap<String, String> = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::HELD_LABELS))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            format!(
                "the target pod {target} lacks the source's labels (annotation {} missing or damaged), so it cannot join {named}: {keep}",
                annotations::HELD_LABELS
            )
        })?;
    // The ReplicaSet must still be the one the source belonged to, live, and select the
    // labels the target is to get: else it would release the target, or the garbage
    // collector delete it as an orphan of a gone owner.
    let rs = replica_sets
        .get_opt(&owner.name)
        .await
        .map_err(|e| format!("cannot read {named}: {e}; {keep}; {resume} tries again"))?
        .filter(|rs| rs.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .ok_or_else(|| {
            format!(
                "{named} is gone or being deleted, so the target pod {target} was not handed to it: the target runs the app as a pod no controller owns; {keep}"
            )
        })?;
    let selects = rs
        .spec
        .as_ref()
        .and_then(|s| Selector::try_from(s.selector.clone()).ok())
        .is_some_and(|selector| !selector.selects_all() && selector.matches(&labels));
    if !selects {
        return Err(format!(
            "{named}'s selector no longer matches the source's labels, so it would not keep the target pod {target}: {keep}"
        ));
    }
    // The ReplicaSet deletes first a pod that is unassigned, not Running or not Ready, before
    // it looks at deletion costs: the target and every other pod of it must be none of these.
    let start = Instant::now();
    loop {
        let pod = pods.get(target).await.map_err(|e| read(target, e))?;
        let others = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| {
                format!("cannot list the pods of {named}: {e}; {keep}; {resume} tries again")
            })?
            .items;
        let unsteady = std::iter::once(&pod)
            .chain(others.iter().filter(|p| {
                controlled_by(p, &owner)
                    && p.metadata.deletion_timestamp.is_none()
                    && p.metadata.name.as_deref() != Some(source)
            }))
            .find(|p| !steady(p))
            .and_then(|p| p.metadata.name.clone());
        let Some(unsteady) = unsteady else {
            break;
        };
        if start.elapsed() > READY_WITHIN {
            return Err(format!(
                "pod {unsteady} was not Running and Ready (or is itself being migrated) within {READY_WITHIN:?}, so the target pod {target} was not handed to {named}: the ReplicaSet deletes such a pod before the stale source; {keep}. Once `kubectl get pods -n {namespace}` shows it Ready, {resume} finishes"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cost = |value: i32| serde_json::json!({"metadata": {"annotations": {annotations::DELETION_COST: value.to_string()}}});
    match pods
        .patch(
            source,
            &PatchParams::default(),
            &Patch::Merge(&cost(i32::MIN)),
        )
        .await
    {
        Ok(_) => {}
        // Deleted already (by the ReplicaSet, or an earlier run): nothing to steer.
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => {
            return Err(format!(
                "cannot set the deletion cost of the source pod {source}: {e}; {keep}; {resume} finishes"
            ));
        }
    }
    let patch = serde_json::json!({"metadata": {
        "labels": labels,
        "ownerReferences": [owner],
        "annotations": {
            annotations::DELETION_COST: i32::MAX.to_string(),
            annotations::HELD_LABELS: null,
        },
    }});
    pods.patch(target, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            format!(
                "cannot hand the target pod {target} to {named} (labels and owner): {e}; {keep}; {resume} finishes"
            )
        })?;
    Ok(Some(named))
}

/// Whether `pod` is controlled by `owner`.
fn controlled_by(pod: &Pod, owner: &OwnerReference) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == owner.uid && o.controller == Some(true))
}

/// A pod the ReplicaSet ranks after a Ready, Running, assigned one only by deletion cost: it
/// is all three, and no migration of it is under way (a frozen source may turn unready).
fn steady(pod: &Pod) -> bool {
    let assigned = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let migrating = Phase::of(pod).is_some_and(Phase::unfinished);
    assigned && running && ready(pod) && !migrating
}

/// Step 3's end: the target's deletion cost goes, once the source is deleted, and with it the
/// `owner` annotation (the target is the ReplicaSet's own pod now: a later migration of it
/// reads its owner from its ownerReferences).
///
/// # Errors
/// The API error, as a warning's text with the command that does it.
pub async fn drop_deletion_cost(pods: &Api<Pod>, target: &str) -> Result<(), String> {
    let patch = serde_json::json!({"metadata": {"annotations": {
        annotations::DELETION_COST: null,
        annotations::OWNER: null,
    }}});
    pods.patch(target, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot remove the deletion cost of pod {target} ({e}): until then its ReplicaSet deletes it last when scaling down: kubectl annotate pod {target} {}-",
                annotations::DELETION_COST
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: Option<&str>, phase: &str, ready: &str, migration: Option<&str>) -> Pod {
        let mut notes = serde_json::Map::new();
        if let Some(m) = migration {
            notes.insert(annotations::PHASE.into(), m.into());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": notes},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap()
    }

    #[test]
    fn only_an_assigned_running_ready_pod_outside_a_migration_is_steady() {
        assert!(steady(&pod(Some("a"), "Running", "True", None)));
        assert!(steady(&pod(Some("a"), "Running", "True", Some("done"))));
        for (why, p) in [
            ("unassigned", pod(None, "Running", "True", None)),
            ("pending", pod(Some("a"), "Pending", "True", None)),
            ("not ready", pod(Some("a"), "Running", "False", None)),
            (
                "a frozen source",
                pod(Some("a"), "Running", "True", Some("checkpointing")),
            ),
            (
                "a committed source",
                pod(Some("a"), "Running", "True", Some("committed")),
            ),
        ] {
            assert!(!steady(&p), "{why}");
        }
    }

    #[test]
    fn the_owner_comes_from_the_annotation_and_adoption_from_the_references() {
        let owner: OwnerReference = serde_json::from_value(serde_json::json!(
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u", "controller": true}
        ))
        .unwrap();
        let mut target = pod(Some("b"), "Running", "True", None);
        assert!(
            owner_of(&target).is_none(),
            "a bare pod's target has no owner"
        );
        target.metadata.annotations = Some(
            [(
                annotations::OWNER.to_string(),
                serde_json::to_string(&owner).unwrap(),
            )]
            .into(),
        );
        assert_eq!(owner_of(&target), Some(owner.clone()));
        assert!(!controlled_by(&target, &owner));
        target.metadata.owner_references = Some(vec![owner.clone()]);
        assert!(controlled_by(&target, &owner));
    }
}
