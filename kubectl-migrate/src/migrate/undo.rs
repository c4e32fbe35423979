//! Before the commit, any failure, deadline or interruption undoes: the sources are resumed
//! first (their app's way back), then the target is deleted. Reads, rollbacks and deletes are
//! tried again for a while (the fault may be the API server restarting); what cannot be done
//! is named with the command that does it; a source container that restarted meanwhile is
//! reported as such, never as "kept its state".

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use migrate_format::Refusal;

use super::commit::retry_get;
use super::{Aftermath, MigrateError, Options, Progress, record, restart_counts};
use crate::client::Connection;
use crate::launchers::{LauncherError, Launchers};
use crate::{retry, rewrite};

/// Undoes a failed migration: delete the target, roll every source container back. Returns
/// what was done and how to finish by hand if something could not be.
pub async fn undo<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
    error: &MigrateError,
) -> Aftermath {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let mut done = Vec::new();
    let mut manual = Vec::new();
    // Never touch what this migration does not hold: refused by the preflight, or the pod
    // is another migration's.
    if !progress.claimed
        || matches!(
            error,
            MigrateError::Preflight(_) | MigrateError::Claimed { .. }
        )
    {
        // Cut short while the claim was being written, it may have landed: released, and
        // only if it is this migration's.
        if !progress.claimed
            && matches!(
                error,
                MigrateError::Deadline { .. }
                    | MigrateError::Interrupted { .. }
                    | MigrateError::Api { .. }
            )
            && let Some(error) = record_failed(&pods, &options.pod, &progress.id).await
        {
            // The claim may hold the pod: left, it keeps every later migration off it.
            return Aftermath::UndoIncomplete {
                text: format!(
                    "nothing was changed, but the pod's claim by this migration may be left ({error}): `kubectl migrate abort -n {} {}` releases it",
                    connection.namespace, options.pod
                ),
            };
        }
        return Aftermath::Untouched {
            text: "nothing was changed".into(),
        };
    }
    // Never delete the last copy: a source restarted since the freeze lost the app, and a
    // target that restored it holds the only one; then the migration goes forward.
    let forward = || {
        Box::pin(forward_if_the_source_lost_it(
            connection,
            launchers,
            &options.pod,
            &progress.id,
            progress.target.as_ref(),
        ))
    };
    if let Some(forward) = forward().await {
        return forward;
    }
    // The source's phase moves to `aborting` first, guarded by the pod's resourceVersion: a
    // commit recorded meanwhile (an `abort` that went forward) or another migration that took
    // the pod since stops the undo before it touches anything. Only then may it resume a
    // source that acknowledged the commit (`rollback --committed`): the record, not the
    // launcher, says the migration is not committed.
    let owned = match settle_aborting(&pods, &options.pod, &progress.id).await {
        Ok(owned) => owned,
        Err(text) => return Aftermath::Superseded { text },
    };
    // Reads and deletes are retried for a while: the fault that ended the migration may be the
    // API server itself restarting.
    let source = if progress.transfer_started {
        match retry_get(&pods, &options.pod).await {
            Ok(source) => Some(source),
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                done.push(format!("the source pod {} is gone", options.pod));
                None
            }
            // Never skip the rollback silently: say it could not be checked, and how to do it.
            Err(error) => {
                manual.push(format!(
                    "kubectl migrate abort -n {} {}   (the source pod could not be read: {error})",
                    connection.namespace, options.pod
                ));
                None
            }
        }
    } else {
        None
    };
    let source_owner_kind = source
        .as_ref()
        .and_then(crate::check::pod::controller)
        .map(|o| o.kind.clone());
    let mut restarted = Vec::new();
    if let Some(source) = source {
        let mut nothing_frozen = false;
        for container in rewrite::migrated_containers(&source) {
            match rollback_when_idle(launchers, &source, &container, owned).await {
                Ok(()) => done.push(format!("resumed the source app in container {container}")),
                // Never frozen (the failure came before the freeze): nothing to undo. A
                // checkpoint still in flight is not that: it is reported below.
                Err(error) if error.refusal() == Some(Refusal::NothingToRollBack) => {
                    nothing_frozen = true;
                }
                Err(error) => manual.push(format!(
                    "kubectl migrate abort -n {} {}   (container {container} could not be resumed: {error})",
                    connection.namespace, options.pod
                )),
            }
        }
        // A source container that restarted meanwhile (killed mid-migration: its launcher
        // has nothing frozen) lost the state at the freeze: say so, never "kept its state".
        // The kubelet reports the restart a moment after the new container runs.
        // Against the counts recorded on the source at the freeze (an abort run later knows
        // them only from there), else those the preflight saw.
        for attempt in 0..6 {
            let now = pods
                .get(&options.pod)
                .await
                .unwrap_or_else(|_| source.clone());
            restarted = super::restarted_since_freeze(&now).unwrap_or_else(|| {
                let counts = restart_counts(&now);
                progress
                    .source_restarts
                    .iter()
                    .filter(|(c, before)| counts.get(*c).is_some_and(|n| n > before))
                    .map(|(c, _)| c.clone())
                    .collect()
            });
            if !restarted.is_empty()
                || !nothing_frozen
                || !progress.transfer_started
                || attempt == 5
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !restarted.is_empty() {
            done.push(format!(
                "container(s) {} of the source pod {} restarted during the migration (killed: its app's state at the freeze is lost, and it started fresh)",
                restarted.join(", "),
                options.pod
            ));
        }
        record(
            connection,
            &source,
            "MigrationFailed",
            format!("{error}; rolled back"),
        )
        .await;
    }
    // A restart the kubelet reported late: the target may hold the only copy now.
    if !restarted.is_empty()
        && let Some(forward) = forward().await
    {
        return forward;
    }
    // The target goes after the source is resumed: the app's way back comes first.
    if let Some(target) = &progress.target {
        let name = target.metadata.name.clone().unwrap_or_default();
        let delete = DeleteParams::default();
        let deleted = match retry::by_when(
            retry::api_restart(),
            || pods.delete(&name, &delete),
            retry::passing,
        )
        .await
        {
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
            other => other.map(|_| true),
        };
        match deleted {
            Ok(true) => done.push(format!("deleted the target pod {name}")),
            Ok(false) => done.push(format!("the target pod {name} is gone")),
            Err(error) => manual.push(format!(
                "kubectl delete pod -n {} {name}   ({error})",
                connection.namespace
            )),
        }
    }
    // A StatefulSet pod's move: its guard goes with the holder (also when the holder is gone
    // already: a guard left behind keeps the StatefulSet from ever recreating the pod).
    let stateful = progress.plan.variant == super::Variant::StatefulSet
        || source_owner_kind.as_deref() == Some("StatefulSet");
    if stateful {
        let guard = super::identity::guard::name(&progress.id);
        match super::identity::guard::remove(&connection.client, &progress.id).await {
            Ok(()) => done.push(format!("deleted the admission policy {guard}")),
            Err(error) => manual.push(format!(
                "kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {guard}   ({error})"
            )),
        }
    }
    // `failed` ends the migration in `kubectl migrate status`: written only once nothing is
    // left to do by hand (else the frozen source must stay listed, with its command), and only
    // while the source still records this migration.
    if manual.is_empty()
        && let Some(error) = record_failed(&pods, &options.pod, &progress.id).await
    {
        // Undone, but the record says otherwise: it would keep every later migration off
        // the pod, so the undo is not complete until it is written.
        manual.push(format!(
            "kubectl migrate abort -n {} {}   (the undone migration could not be recorded on the source: {error})",
            connection.namespace, options.pod
        ));
    }
    let mut text = if done.is_empty() {
        "the source pod was not touched".to_string()
    } else {
        done.join(", ")
    };
    if manual.is_empty() && restarted.is_empty() {
        text.push_str(&format!(
            "; pod {} keeps running with its state; run the migration again to retry",
            options.pod
        ));
    } else if manual.is_empty() {
        text.push_str(&format!(
            "; pod {} runs, restarted fresh; run the migration again to retry",
            options.pod
        ));
    } else {
        text.push_str(&format!(
            "; to finish aborting, run: {}",
            manual.join(" ; ")
        ));
        return Aftermath::UndoIncomplete { text };
    }
    Aftermath::Undone {
        text,
        restarted: !restarted.is_empty(),
    }
}

/// Writes `failed` for migration `id` on the source, trying again by
/// [`retry::api_restart`]. Returns the error when it could not be written and the pod is
/// there; nothing when it was written, the pod is gone, or the pod records something else
/// now (another migration's claim, a commit).
async fn record_failed(pods: &Api<Pod>, source: &str, id: &str) -> Option<kube::Error> {
    let written = retry::by_when(
        retry::api_restart(),
        || super::settle(pods, source, id, super::Phase::Failed),
        super::Claim::passing,
    )
    .await;
    match written {
        Err(super::Claim::Api(error)) if !matches!(&error, kube::Error::Api(status) if status.is_not_found()) => {
            Some(error)
        }
        _ => None,
    }
}

/// How long an undo waits for a source's checkpoint job to end. The launcher's job gives up
/// on an output that takes nothing for `--output-stall-timeout` (20 s by default), plus the
/// time the stream's buffers take to fill (~20 s measured over a dropped exec session).
const ROLLBACK_PATIENCE: Duration = Duration::from_secs(120);
/// How long an undo keeps trying a source launcher it cannot reach.
const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(30);

/// Rolls a source container back (`committed`: also a source that acknowledged the commit
/// before the commit was recorded, which the caller asks only while the record says
/// `aborting` for its migration), waiting out a checkpoint still in flight: when the
/// migration is cut short mid-transfer, the launcher's checkpoint job only ends once it notices
/// its stream is gone, and until then it refuses a rollback as busy (and is told to stop
/// writing). Leaving it there would leave the app frozen.
pub(crate) async fn rollback_when_idle<L: Launchers + Sync>(
    launchers: &L,
    source: &Pod,
    container: &str,
    committed: bool,
) -> Result<(), LauncherError> {
    let deadline = tokio::time::Instant::now() + ROLLBACK_PATIENCE;
    // An exec that could not reach the launcher (the API server or the kubelet restarting) is
    // tried again for a while too; a refusal other than "busy" is an answer.
    let unreachable_until = tokio::time::Instant::now() + UNREACHABLE_PATIENCE;
    loop {
        let now = tokio::time::Instant::now();
        match launchers.rollback(source, container, committed).await {
            Err(error) if error.refusal() == Some(Refusal::Busy) && now < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(LauncherError::Failed(_) | LauncherError::Unknown { .. })
                if now < unreachable_until =>
            {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            other => return other,
        }
    }
}

/// Moves the source's phase to `aborting` for migration `id`, trying for a while (the fault
/// may be the API server restarting). `Ok(true)`: the undo owns the source and may resume a
/// copy that acknowledged the commit; `Ok(false)`: the record could not be read or written, so
/// only a plain rollback is asked (a launcher that acknowledged the commit refuses it, and the
/// message names `kubectl migrate abort`); `Err`: the source is not this migration's to undo
/// any more, with the sentence that says so.
async fn settle_aborting(pods: &Api<Pod>, source: &str, id: &str) -> Result<bool, String> {
    let claimed = retry::by_when(
        retry::api_restart(),
        || super::claim(pods, source, id, super::Phase::Aborting),
        super::Claim::passing,
    )
    .await;
    match claimed {
        Ok(()) => Ok(true),
        // Undone already (an earlier undo resumed the source): going on is idempotent, with
        // a plain rollback only, since a new migration may have taken the pod since.
        Err(super::Claim::Taken {
            phase: Some(super::Phase::Failed),
            by: None,
        }) => Ok(false),
        Err(super::Claim::Taken { phase, by }) => {
            let phase = crate::record::phase_text(phase);
            Err(match by {
                Some(other) => format!(
                    "nothing was undone: pod {source} now belongs to migration {other} (phase {phase})"
                ),
                None => format!(
                    "nothing was undone: migration {id} of pod {source} is {phase} now (settled by another command meanwhile); `kubectl migrate status {source}` shows what is left"
                ),
            })
        }
        Err(super::Claim::Api(kube::Error::Api(status))) if status.is_not_found() => Ok(true),
        // Refused, or the API server unreachable for all the tries.
        Err(super::Claim::Api(_)) => Ok(false),
    }
}

/// When the source restarted after the freeze (its copy of the app is gone: a liveness probe,
/// an OOM kill) and every target container holds the restored app, the target has the only
/// copy: the source containers that did not restart acknowledge the commit (so that none
/// resumes by its lease), the commit is recorded, and the migration is finished. Returns what
/// was done; `None` when that is not the case, or when the commit could not be taken, and the
/// undo goes on.
pub(crate) async fn forward_if_the_source_lost_it<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    source_name: &str,
    id: &str,
    target: Option<&Pod>,
) -> Option<Aftermath> {
    let target = target?;
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let source = pods.get_opt(source_name).await.ok().flatten()?;
    let restarted = super::restarted_since_freeze(&source)?;
    if restarted.is_empty() {
        return None;
    }
    let containers = rewrite::migrated_containers(target);
    for container in &containers {
        match launchers.status(target, container).await {
            Ok(status) if status.state == migrate_format::LauncherState::Restored => {}
            _ => return None,
        }
    }
    for container in rewrite::migrated_containers(&source) {
        if !restarted.contains(&container) && launchers.commit(&source, &container).await.is_err() {
            return None;
        }
    }
    crate::record::commit_forward(&pods, source_name, id)
        .await
        .ok()?;
    let options = Options {
        pod: source_name.into(),
        target_node: super::node_of(target),
        ..Options::recovery()
    };
    let progress = Progress {
        id: id.into(),
        plan: super::Plan::recorded(Some(target), Some(&source)),
        target: Some(target.clone()),
        containers,
        transfer_started: true,
        committed: true,
        claimed: true,
        ..Progress::default()
    };
    let target_name = target.metadata.name.clone().unwrap_or_default();
    let head = format!(
        "container(s) {} of the source pod {source_name} restarted after the freeze, so its copy of the app is gone; the target holds the app restored, so the migration went forward instead of being undone",
        restarted.join(", ")
    );
    Some(
        match Box::pin(super::finish(connection, launchers, &options, &progress)).await {
            Ok(_) => Aftermath::Finished {
                text: format!(
                    "{head}: finished instead: pod {target_name} runs the app on node {}; the source pod {source_name} was deleted",
                    options.target_node
                ),
                target: target_name,
            },
            Err(error) => Aftermath::Stuck {
                text: format!(
                    "{head}: the commit is recorded, but finishing failed: {error}; `kubectl migrate resume {source_name}` finishes"
                ),
            },
        },
    )
}
