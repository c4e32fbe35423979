//! The target's side of finishing (`finish`), whatever the variant (the target of a bare or
//! ReplicaSet pod, a StatefulSet pod's successor): thaw every container (only a restored app
//! counts), end the target's wait for a checkpoint, let it take Service traffic.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use migrate_format::annotations;

use super::MigrateError;
use crate::launchers::Launchers;
use crate::retry;

/// What finishing a committed migration left to say.
#[derive(Debug, Default)]
pub struct Finished {
    pub source_deleted: bool,
    pub warnings: Vec<String>,
    /// When each target container's app resumed, by the target node's CLOCK_REALTIME (ms since
    /// the epoch), as its launcher reported it.
    pub thawed_at: std::collections::BTreeMap<String, Option<u64>>,
    /// When the last thaw was answered (this plugin's monotonic clock).
    pub thaw_answered: Option<std::time::Instant>,
    /// Post-copy (`--lazy`): each container's memory transfer, ended.
    pub post_copy: Vec<crate::launchers::PostCopyDone>,
    /// When the source pod's deletion was asked, by this plugin's CLOCK_REALTIME (ms since
    /// the epoch).
    pub source_deleted_at_ms: Option<u64>,
    /// A StatefulSet pod's move: each container's restore from the parked checkpoint.
    pub restored: std::collections::BTreeMap<String, migrate_format::RestoreReport>,
}

/// Now that its app runs, the target may take Service traffic (its readiness gate).
pub(super) async fn mark_serving(pods: &Api<Pod>, target_name: &str, finished: &mut Finished) {
    if let Err(error) = retry::by(retry::finishing(), || set_serving(pods, target_name, true)).await
    {
        finished.warnings.push(format!(
            "cannot mark pod {target_name} ready for Service traffic ({error}): until then its Services skip it: kubectl patch pod {target_name} --subresource=status --type=strategic -p '{{\"status\":{{\"conditions\":[{{\"type\":\"{}\",\"status\":\"True\"}}]}}}}'",
            annotations::SERVING
        ));
    }
}

/// Thaws every target container, noting when each app resumed.
pub(super) async fn thaw_all<L: Launchers + Sync>(
    launchers: &L,
    containers: &[String],
    target: &Pod,
    finished: &mut Finished,
) -> Result<(), MigrateError> {
    for container in containers {
        let at = retry::by(retry::finishing(), || launchers.thaw(target, container))
            .await
            .map_err(|error| MigrateError::ThawRefused {
                container: container.clone(),
                error,
            })?;
        finished.thawed_at.insert(container.clone(), at);
    }
    finished.thaw_answered = Some(std::time::Instant::now());
    Ok(())
}

/// Ends the target's wait for a checkpoint (`annotations::WAIT_FOR_CHECKPOINT`, read by its
/// launchers through the downward API at every container start): from now on a restarted
/// container starts its app fresh. `phase`, if given, is written as the target's phase in the
/// same write. If the API server keeps refusing, the migration goes on
/// (the app runs) and the returned warning gives the command to run.
pub(super) async fn end_wait(
    pods: &Api<Pod>,
    name: &str,
    phase: Option<super::Phase>,
) -> Option<String> {
    let mut notes = serde_json::Map::new();
    notes.insert(annotations::WAIT_FOR_CHECKPOINT.into(), "false".into());
    if let Some(phase) = phase {
        notes.insert(annotations::PHASE.into(), phase.as_str().into());
    }
    let patch = serde_json::json!({"metadata": {"annotations": notes}});
    retry::by(retry::finishing(), || async {
        pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .err()
    .map(|error| {
        format!(
            "cannot mark pod {name} as restored ({error}): until this runs, a restart of one of its containers would wait for a checkpoint instead of starting the app: kubectl annotate pod {name} {}=false --overwrite",
            annotations::WAIT_FOR_CHECKPOINT
        )
    })
}

/// Sets the [`annotations::SERVING`] condition of pod `name` (its readiness gate): the
/// kubelet then counts the pod Ready, or not, and Services follow.
pub(super) async fn set_serving(
    pods: &Api<Pod>,
    name: &str,
    serving: bool,
) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": annotations::SERVING,
        "status": if serving { "True" } else { "False" },
        "lastTransitionTime": now,
        "reason": if serving { "AppRunning" } else { "Migrating" },
    }]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map(drop)
}
