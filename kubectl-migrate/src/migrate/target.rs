//! Step 2, the target: created from the source's spec (`rewrite::target_pod`) under a name
//! that never collides, then waited for until every container runs (image pulled, launchers
//! waiting for the checkpoint), before anything is frozen: none of that is downtime. The wait
//! fails fast when the pod fails, cannot pull its image, crash-loops or is deleted.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;

use super::{Ctx, MigrateError, Progress, advance_phase, node_of, record};
use crate::launchers::Launchers;
use crate::rewrite;
use migrate_format::annotations;

/// Creates the target pod for `source` and waits until it runs.
pub(super) async fn create<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    progress: &mut Progress,
    source: &Pod,
) -> Result<Pod, MigrateError> {
    let options = ctx.options;
    let mut target = rewrite::target_pod(source, &options.target_node, &progress.id);
    if progress.plan.post_copy {
        rewrite::allow_post_copy(&mut target);
    }
    create_pod(ctx, progress, source, target).await
}

/// Creates `target` (the target, or a StatefulSet pod's holder) under a name that never
/// collides, and waits until it runs.
pub(super) async fn create_pod<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    progress: &mut Progress,
    source: &Pod,
    mut target: Pod,
) -> Result<Pod, MigrateError> {
    let options = ctx.options;
    let pods = &ctx.pods;
    // The plan goes with the pod: a recovery that finds only the target (or the holder)
    // reads it there.
    target
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(annotations::VARIANT.into(), progress.plan.as_note());
    // The target's name never collides: a taken `NAME-mN` (a leftover, or anyone's pod) moves
    // on to the next N.
    let created = loop {
        let name = target.metadata.name.clone().unwrap_or_default();
        // Through the claim: an abort that ran meanwhile is never overwritten.
        let peer = |_: &Pod| {
            let mut values = serde_json::Map::new();
            values.insert(annotations::PEER.into(), name.clone().into());
            values
        };
        advance_phase(
            pods,
            &options.pod,
            &progress.id,
            super::Phase::CreatingTarget,
            &peer,
        )
        .await?;
        match pods.create(&PostParams::default(), &target).await {
            Ok(created) => break created,
            Err(kube::Error::Api(status))
                if status.reason == "AlreadyExists"
                    && rewrite::migration_generation(&target) < 100 =>
            {
                tracing::info!(
                    pod = name,
                    "the target's name is taken; trying the next one"
                );
                target = rewrite::next_name(target, &options.pod);
            }
            Err(source) => {
                // The reply may be lost with the pod created: an undo must know of it.
                if !matches!(source, kube::Error::Api(_))
                    && let Ok(Some(pod)) = pods.get_opt(&name).await
                    && pod
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(migrate_format::annotations::MIGRATION_ID))
                        == Some(&progress.id)
                {
                    break pod;
                }
                return Err(MigrateError::Api {
                    step: "creating the target pod",
                    source,
                });
            }
        }
    };
    let target_name = created.metadata.name.clone().unwrap_or_default();
    progress.target = Some(created.clone());
    record(
        ctx.connection,
        source,
        "MigrationStarted",
        format!(
            "moving to node {} as pod {target_name}",
            options.target_node
        ),
    )
    .await;
    record(
        ctx.connection,
        &created,
        "MigrationTarget",
        format!(
            "restoring pod {} from node {}",
            options.pod,
            node_of(source)
        ),
    )
    .await;
    let target = wait_until_running(pods, &target_name).await?;
    progress.target = Some(target.clone());
    Ok(target)
}

/// Waits for the target pod to run all its containers, failing fast on terminal states.
pub(super) async fn wait_until_running(pods: &Api<Pod>, name: &str) -> Result<Pod, MigrateError> {
    let settled = |pod: Option<&Pod>| pod.is_none_or(|p| running(p) || terminal(p).is_some());
    let pod = crate::wait::pod(pods, name, None, settled)
        .await
        .map_err(|error| MigrateError::TargetFailed {
            target: name.into(),
            reason: format!("waiting for it to run: {error}"),
        })?;
    let Some(pod) = pod else {
        return Err(MigrateError::TargetFailed {
            target: name.into(),
            reason: "it was deleted".into(),
        });
    };
    match terminal(&pod) {
        Some(reason) => Err(MigrateError::TargetFailed {
            target: name.into(),
            reason,
        }),
        None => Ok(pod),
    }
}

/// Whether every container the migration moves (native sidecars included) runs.
fn running(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    let runs: Vec<&str> = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .map(|c| c.name.as_str())
        .collect();
    status.phase.as_deref() == Some("Running")
        && rewrite::migrated_containers(pod)
            .iter()
            .all(|c| runs.contains(&c.as_str()))
}

/// Why a pod can no longer come up, if it cannot.
fn terminal(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(phase @ ("Failed" | "Succeeded")) = status.phase.as_deref() {
        return Some(format!(
            "it is {phase}{}",
            status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    for container in status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
    {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(reason) = waiting.and_then(|w| w.reason.as_deref())
            && matches!(
                reason,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "CrashLoopBackOff"
                    | "CreateContainerConfigError"
                    | "InvalidImageName"
                    | "CreateContainerError"
            )
        {
            return Some(format!("container {} is {reason}", container.name));
        }
    }
    None
}
