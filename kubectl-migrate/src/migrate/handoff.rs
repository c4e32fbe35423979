//! Part of step 6 for a pod a ReplicaSet owns (a Deployment's): the handoff of the pod's place
//! in its ReplicaSet from the source to the restored target, after the commit, such that the
//! ReplicaSet controller never starts a fresh replica and never deletes the restored one.
//!
//! The target was created without the source's labels and owner (see `rewrite`), so until
//! now the ReplicaSet neither counted nor adopted it and no Service selected it. The handoff,
//! once the target's app runs:
//! 1. waits until the target is Ready (its readiness gate is set once the app is thawed): the
//!    ReplicaSet controller deletes a not-Ready pod before a Ready one whatever its deletion
//!    cost, so a target adopted before it is Ready could be the one it deletes;
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

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{Patch, PatchParams};
use migrate_format::annotations;

/// How long the target may take to become Ready once its app runs.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The controller the target is to be handed to, from its `owner` annotation; None for the
/// target of a pod no controller owns.
pub fn owner_of(target: &Pod) -> Option<OwnerReference> {
    let notes = target.metadata.annotations.as_ref()?;
    serde_json::from_str(notes.get(annotations::OWNER)?).ok()
}

/// Whether `target` already belongs to `owner` (an earlier handoff got that far).
fn adopted(target: &Pod, owner: &OwnerReference) -> bool {
    target
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == owner.uid && o.controller == Some(true))
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
    source: &str,
    target: &str,
) -> Result<Option<String>, String> {
    let pod = pods
        .get(target)
        .await
        .map_err(|e| format!("cannot read the target pod {target}: {e}"))?;
    let Some(owner) = owner_of(&pod) else {
        return Ok(None);
    };
    let named = format!("{} {}", owner.kind, owner.name);
    if adopted(&pod, &owner) {
        return Ok(Some(named));
    }
    let start = Instant::now();
    let mut pod = pod;
    while !ready(&pod) {
        if start.elapsed() > READY_WITHIN {
            return Err(format!(
                "the target pod {target} runs the app but was not Ready within {READY_WITHIN:?}, so it was not handed to {named} (the ReplicaSet deletes a pod that is not Ready first); the source pod {source} stays the ReplicaSet's (never delete it by hand: a fresh replica would start). Once `kubectl get pod {target}` shows it Ready, `kubectl migrate resume {source}` finishes"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        pod = pods
            .get(target)
            .await
            .map_err(|e| format!("cannot read the target pod {target}: {e}"))?;
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
                "cannot set the deletion cost of the source pod {source}: {e}; `kubectl migrate resume {source}` finishes"
            ));
        }
    }
    let labels: BTreeMap<String, String> = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::HELD_LABELS))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
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
                "cannot hand the target pod {target} to {named} (labels and owner): {e}; the source pod {source} stays the ReplicaSet's (never delete it by hand); `kubectl migrate resume {source}` finishes"
            )
        })?;
    Ok(Some(named))
}

/// Step 3's end: the target's deletion cost goes, once the source is deleted.
///
/// # Errors
/// The API error, as a warning's text with the command that does it.
pub async fn drop_deletion_cost(pods: &Api<Pod>, target: &str) -> Result<(), String> {
    let patch =
        serde_json::json!({"metadata": {"annotations": {annotations::DELETION_COST: null}}});
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
