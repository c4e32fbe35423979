//! Drain by object: a node labelled `migrate.kubectl.io/drain=true` is cordoned, and every pod
//! on it that can be migrated gets a PodMigration, which the controller then carries out like
//! any other. The rules are `kubectl migrate drain`'s ([`crate::drain`]): DaemonSet, static and
//! terminating pods are left alone; each other pod goes to the first node by name that the
//! preflight accepts. Unlike the `drain` command, nothing is evicted: a pod that cannot be
//! migrated stays, and the node's `migrate.kubectl.io/drain-status` annotation (and an Event)
//! names it with the preflight's reason, so a person decides.
//!
//! Pods of one controller move one at a time (a ReplicaSet's handoff needs its other pods
//! steady). A PodMigration the drain made that did not succeed is not made again: the pod is
//! reported, not retried in a loop; except one refused because another migration held the pod
//! (`PodBusy`: the plugin, another drain), made again once that migration ended. A pod kept
//! frozen for good by a `--keep-source` move (`done-kept`) is reported. Removing the label stops the drain (the node stays
//! cordoned, as after `kubectl drain`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource as _, ResourceExt};

use super::Context;
use super::reconcile::{ReconcileError, failed_at};
use crate::crd::{Phase, PodMigration, PodMigrationSpec};

/// The label that asks for a node's drain (value `true`).
pub const DRAIN_LABEL: &str = "migrate.kubectl.io/drain";
/// On each PodMigration a drain made: the node it drains.
pub const DRAINED_NODE_LABEL: &str = "migrate.kubectl.io/drained-node";
/// On the node: what the drain did and what is left.
pub const DRAIN_STATUS: &str = "migrate.kubectl.io/drain-status";

/// How often a node being drained is looked at again while its pods move.
const AGAIN: Duration = Duration::from_secs(10);

pub(super) fn error_policy(
    node: Arc<Node>,
    error: &ReconcileError,
    _context: Arc<Context>,
) -> Action {
    tracing::warn!(node = %node.name_any(), %error, "drain: again in 10 s");
    Action::requeue(AGAIN)
}

pub(super) async fn reconcile(
    node: Arc<Node>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if node.labels().get(DRAIN_LABEL).map(String::as_str) != Some("true") {
        return Ok(Action::await_change());
    }
    let name = node.name_any();
    let nodes: Api<Node> = Api::all(context.client.clone());
    if !node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
            )
            .await
            .map_err(failed_at("cordoning the node (patch nodes)"))?;
    }
    let pods: Api<Pod> = Api::all(context.client.clone());
    let mut on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
        .await
        .map_err(failed_at("listing the node's pods"))?
        .items;
    on_node.sort_by_key(|p| (p.namespace().unwrap_or_default(), p.name_any()));
    let all: Api<PodMigration> = Api::all(context.client.clone());
    let migrations = all
        .list(&ListParams::default())
        .await
        .map_err(failed_at("listing the PodMigrations"))?
        .items;
    let active = |m: &PodMigration| {
        !matches!(
            m.status.as_ref().and_then(|s| s.phase),
            Some(Phase::Succeeded | Phase::Failed | Phase::RolledBack)
        )
    };
    let of_pod = |pod: &Pod| {
        let namespace = pod.namespace().unwrap_or_default();
        let pod_name = pod.name_any();
        migrations
            .iter()
            .filter(move |m| m.namespace().as_deref() == Some(&namespace) && m.spec.pod == pod_name)
    };
    // The owners with a move under way: their other pods wait their turn.
    let owner_of = |pod: &Pod| {
        crate::check::pod::controller(pod).map(|o| {
            (
                pod.namespace().unwrap_or_default(),
                o.kind.clone(),
                o.name.clone(),
            )
        })
    };
    let mut busy_owners: BTreeSet<_> = on_node
        .iter()
        .filter(|pod| of_pod(pod).any(active))
        .filter_map(owner_of)
        .collect();
    let candidates = crate::drain::other_nodes(&nodes, Some(&name))
        .await
        .map_err(failed_at("listing the nodes"))?;
    let (mut moving, mut waiting, mut left) = (0, 0, Vec::new());
    for pod in &on_node {
        let label = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        if crate::drain::left_alone(pod).is_some() {
            continue;
        }
        if of_pod(pod).any(active) {
            moving += 1;
            continue;
        }
        // The latest of this drain's migrations of the pod decides. One refused because
        // another migration (the plugin, another drain) held the pod is tried again once the
        // pod is free, not left for good.
        let latest = of_pod(pod)
            .filter(|m| m.labels().get(DRAINED_NODE_LABEL) == Some(&name))
            .max_by_key(|m| m.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let busy = latest.is_some_and(|m| ready_reason(m) == Some("PodBusy"));
        let kept = crate::record::Phase::of(pod) == Some(crate::record::Phase::DoneKept);
        if busy && !kept && crate::record::migration_in_flight_on(pod) {
            waiting += 1;
            continue;
        }
        if let Some(ended) = latest.filter(|m| {
            (!busy || kept) && m.status.as_ref().and_then(|s| s.phase) != Some(Phase::Succeeded)
        }) {
            let message = ended
                .status
                .as_ref()
                .and_then(|s| s.message.clone())
                .unwrap_or_default();
            left.push(format!(
                "{label} (PodMigration {} did not succeed: {message})",
                ended.name_any()
            ));
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue; // finished: nothing runs to move
        }
        if let Some(owner) = owner_of(pod)
            && busy_owners.contains(&owner)
        {
            waiting += 1;
            continue;
        }
        match crate::drain::first_fitting_node(&context.client, pod, &candidates).await {
            Ok(target) => {
                create(&context.client, pod, &name, &target).await?;
                publish(
                    &context,
                    &node,
                    EventType::Normal,
                    "DrainMigrating",
                    format!("migrating {label} to {target}"),
                )
                .await;
                if let Some(owner) = owner_of(pod) {
                    busy_owners.insert(owner);
                }
                moving += 1;
            }
            Err(reason) => left.push(format!("{label} ({reason})")),
        }
    }
    let status = if moving + waiting == 0 && left.is_empty() {
        "drained: no pod to migrate is left".to_string()
    } else {
        let mut text = format!("{moving} migrating, {waiting} waiting their turn");
        if !left.is_empty() {
            text.push_str(&format!(
                "; {} cannot be migrated and stay: {}",
                left.len(),
                left.join("; ")
            ));
        }
        text
    };
    if node.annotations().get(DRAIN_STATUS) != Some(&status) {
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"metadata": {"annotations": {DRAIN_STATUS: &status}}}),
                ),
            )
            .await
            .map_err(failed_at(
                "recording the drain's status on the node (patch nodes)",
            ))?;
        let type_ = if left.is_empty() {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(&context, &node, type_, "Drain", status).await;
    }
    Ok(if moving + waiting > 0 {
        Action::requeue(AGAIN)
    } else {
        // Pods that may land later (a DaemonSet's aside, nothing schedules here: cordoned).
        Action::requeue(Duration::from_secs(60))
    })
}

/// The reason of `migration`'s `Ready` condition (`PodBusy`, `Undone`, …).
fn ready_reason(migration: &PodMigration) -> Option<&str> {
    migration
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.as_str())
}

/// The PodMigration of `pod` off `node`, to `target`.
async fn create(
    client: &kube::Client,
    pod: &Pod,
    node: &str,
    target: &str,
) -> Result<(), ReconcileError> {
    let namespace = pod.namespace().unwrap_or_default();
    let migration = PodMigration {
        metadata: ObjectMeta {
            generate_name: Some(format!("drain-{}-", pod.name_any())),
            namespace: Some(namespace.clone()),
            labels: Some([(DRAINED_NODE_LABEL.to_string(), node.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: PodMigrationSpec {
            pod: pod.name_any(),
            target_node: Some(target.to_string()),
            transfer: Default::default(),
            lazy: false,
            keep_source: false,
            timeout_seconds: None,
        },
        status: None,
    };
    let api: Api<PodMigration> = Api::namespaced(client.clone(), &namespace);
    api.create(&PostParams::default(), &migration)
        .await
        .map(drop)
        .map_err(|source| ReconcileError::Api {
            step: "creating a PodMigration for the drain",
            source,
        })
}

async fn publish(context: &Context, node: &Node, type_: EventType, reason: &str, note: String) {
    let object = node.object_ref(&());
    context.publish(&object, type_, "Drain", reason, note).await;
}
