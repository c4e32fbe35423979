//! Steps 4 and 5, verify and commit: every target container must report `restored`; every
//! source launcher then acknowledges the commit (its lease ends: it never resumes on its own);
//! then one durable write on the source pod, `migrate.kubectl.io/phase: committed`, is the
//! point of no return. Before it any failure undoes; after it nothing does.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use migrate_format::annotations;

use super::transfer::{Cut, keep_alive, leased, within};
use super::{Ctx, MigrateError, Options, Progress};
use crate::client::Connection;
use crate::launchers::Launchers;
use crate::record::{Claim, Phase, claim, is_committed};
use crate::retry;

/// Every target container's launcher reports `restored`. Returns the target node's boot time
/// (from its launchers' status), for the clock-jump warning.
pub(super) async fn verify<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    source: &Pod,
    target: &Pod,
    cut: &Cut,
) -> Result<Option<u64>, MigrateError> {
    let mut target_boot_time = None;
    let verify = async {
        for container in &cut.containers {
            let status = ctx
                .launchers
                .status(target, container)
                .await
                .map_err(|error| MigrateError::Transfer {
                    container: container.clone(),
                    error,
                })?;
            if status.state != migrate_format::LauncherState::Restored {
                return Err(MigrateError::NotRestored {
                    container: container.clone(),
                    state: status.state,
                });
            }
            target_boot_time = target_boot_time.or(status.boot_time);
        }
        Ok(())
    };
    within(cut.thaw_by, leased(verify, keep_alive(ctx, source, cut))).await???;
    Ok(target_boot_time)
}

/// Every source launcher acknowledges the commit (its lease ends: it will not resume on its
/// own) before it is recorded; one whose lease already expired refuses, and the migration is
/// undone like any failure before the commit. No renewal runs meanwhile: it would be refused
/// by a launcher that has already taken the commit.
pub(super) async fn acknowledge<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    source: &Pod,
    cut: &Cut,
) -> Result<(), MigrateError> {
    let acknowledge = async {
        for container in &cut.containers {
            ctx.launchers
                .commit(source, container)
                .await
                .map_err(|error| MigrateError::Launcher {
                    container: container.clone(),
                    step: "the source refused the commit",
                    error,
                })?;
        }
        Ok::<(), MigrateError>(())
    };
    within(cut.thaw_by, acknowledge).await?
}

/// Records the commit durably on the source pod (`migrate.kubectl.io/phase: committed` with
/// the migration's id), the one write that decides between undo and finish.
///
/// # Errors
/// [`MigrateError::Commit`] when the API server refused it (nothing is committed: the caller
/// undoes); [`MigrateError::CommitUnknown`] when its outcome cannot be known (the reply was
/// lost and the pod cannot be read back): then neither undo nor finish is safe to decide here.
pub(super) async fn commit(pods: &Api<Pod>, source: &str, id: &str) -> Result<(), MigrateError> {
    let error = match claim(pods, source, id, Phase::Committed).await {
        Ok(()) => return Ok(()),
        Err(Claim::Taken { phase, by }) => {
            return Err(MigrateError::CommitTaken {
                pod: source.into(),
                phase: Claim::phase_text(phase, by.as_deref()),
            });
        }
        Err(Claim::Api(error)) => error,
    };
    // A refusal is an answer; anything else may have been applied with its reply lost.
    if let kube::Error::Api(status) = &error
        && (400..500).contains(&status.code)
    {
        return Err(MigrateError::Commit {
            pod: source.into(),
            source: error,
        });
    }
    match retry_get(pods, source).await {
        Ok(pod) if is_committed(&pod, id) => Ok(()),
        Ok(_) => Err(MigrateError::Commit {
            pod: source.into(),
            source: error,
        }),
        Err(_) => Err(MigrateError::CommitUnknown {
            pod: source.into(),
            source: error,
        }),
    }
}

/// Reads `name` back, trying again by [`retry::api_restart`]: after a lost reply the API
/// server may need a moment (a restart, a leader change) before it answers again.
pub(super) async fn retry_get(pods: &Api<Pod>, name: &str) -> Result<Pod, kube::Error> {
    retry::by_when(retry::api_restart(), || pods.get(name), retry::passing).await
}

/// The commit's outcome is unknown: say how to tell, and what to run in either case.
pub(super) fn commit_unknown(
    connection: &Connection,
    options: &Options,
    progress: &Progress,
) -> super::Aftermath {
    super::Aftermath::CommitUnknown {
        text: how_to_tell(connection, options, progress),
    }
}

fn how_to_tell(connection: &Connection, options: &Options, progress: &Progress) -> String {
    let ns = &connection.namespace;
    let target = progress
        .target
        .as_ref()
        .and_then(|t| t.metadata.name.clone())
        .unwrap_or_default();
    let containers = |verb: &str, pod: &str| -> String {
        progress
            .containers
            .iter()
            .map(|c| format!("kubectl exec -n {ns} {pod} -c {c} -- restore-launcher {verb}"))
            .collect::<Vec<_>>()
            .join(" && ")
    };
    if progress.plan.variant == crate::record::Variant::StatefulSet {
        // A StatefulSet's pod: its checkpoint is parked in the holder; the source goes first.
        return format!(
            "nothing was undone and nothing was resumed: the source is frozen and its checkpoint parked in pod {target}. `kubectl get pod -n {ns} {source} -o jsonpath='{{.metadata.annotations}}'` tells: if its {phase} is `committed` with id {id}, finish with `kubectl migrate resume -n {ns} {source}` (never delete {target}: it holds the app); otherwise abort with `kubectl migrate abort -n {ns} {source}`",
            source = options.pod,
            phase = annotations::PHASE,
            id = progress.id,
        );
    }
    if progress.plan.variant == crate::record::Variant::Handoff {
        // A ReplicaSet's pod: deleting the source by hand would start a fresh replica.
        return format!(
            "nothing was undone and nothing was resumed: both pods are frozen. `kubectl get pod -n {ns} {source} -o jsonpath='{{.metadata.annotations}}'` tells: if its {phase} is `committed` with id {id}, finish with `kubectl migrate resume -n {ns} {source}` (never delete the source by hand: it is its ReplicaSet's pod until the handoff, and a fresh replica would start); otherwise abort with `kubectl migrate abort -n {ns} {source}`",
            source = options.pod,
            phase = annotations::PHASE,
            id = progress.id,
        );
    }
    format!(
        "nothing was undone and nothing was resumed: both pods are frozen. `kubectl get pod -n {ns} {source} -o jsonpath='{{.metadata.annotations}}'` tells: if its {phase} is `committed` with id {id}, finish with `kubectl migrate resume {source}` (or: {thaw} && kubectl delete pod -n {ns} {source} && kubectl annotate pod -n {ns} {target} {wait}=false --overwrite); otherwise abort with `kubectl migrate abort {source}` (or: {rollback} && kubectl delete pod -n {ns} {target})",
        source = options.pod,
        phase = annotations::PHASE,
        id = progress.id,
        wait = annotations::WAIT_FOR_CHECKPOINT,
        thaw = containers("thaw", &target),
        // The sources acknowledged the commit: only `--committed` resumes them, which is right
        // here since the record says the migration is not committed.
        rollback = containers("rollback --committed", &options.pod),
    )
}
