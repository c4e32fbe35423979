//! Steps 4 and 5, verify and commit: every target container must report `restored`; every
//! source launcher then acknowledges the commit (its lease ends: it never resumes on its own);
//! then one durable write on the source pod, `migrate.kubectl.io/phase: committed`, is the
//! point of no return. Before it any failure undoes; after it nothing does.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use migrate_format::annotations;

use super::transfer::{Cut, keep_alive, leased, within};
use super::{Ctx, MigrateError, Options, Progress};
use crate::client::Connection;
use crate::launchers::Launchers;

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
    let error = match claim(pods, source, id, "committed").await {
        Ok(()) => return Ok(()),
        Err(Claim::Taken { phase, .. }) => {
            return Err(MigrateError::CommitTaken {
                pod: source.into(),
                phase,
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

/// Why [`claim`] did not move the phase.
#[derive(Debug)]
pub enum Claim {
    /// Another writer moved it first: it is `phase` (`committed`, `aborting`, …) or the pod
    /// records another migration now.
    Taken {
        phase: String,
        /// The other migration's id, when the pod records another one.
        by: Option<String>,
    },
    Api(kube::Error),
}

/// Moves migration `id`'s phase on the source pod to `to` (`committed` by the pipeline,
/// `aborting` by `kubectl migrate abort`) only if no one else has settled it: the write
/// carries the resourceVersion of the read that found it unsettled, so of two racing writers
/// (a plugin committing and a user aborting) exactly one wins, and the other learns what won.
///
/// # Errors
/// [`Claim::Taken`] when the phase is already `committed`, `done-kept`, `aborting` or `failed`
/// (or another migration's); [`Claim::Api`] on an API error.
pub async fn claim(pods: &Api<Pod>, source: &str, id: &str, to: &str) -> Result<(), Claim> {
    claim_with(pods, source, id, to, &nothing).await
}

/// Annotations a guarded write adds, made from the pod as the write read it.
pub(super) type Extra<'a> = &'a (dyn Fn(&Pod) -> serde_json::Map<String, serde_json::Value> + Sync);

/// No annotations beyond the phase and the id.
fn nothing(_: &Pod) -> serde_json::Map<String, serde_json::Value> {
    serde_json::Map::new()
}

/// [`claim`], writing `extra`'s annotations in the same guarded write.
pub(super) async fn claim_with(
    pods: &Api<Pod>,
    source: &str,
    id: &str,
    to: &str,
    extra: Extra<'_>,
) -> Result<(), Claim> {
    guarded_write(pods, source, id, to, extra, |_, phase, same_migration| {
        if !same_migration || matches!(phase, "committed" | "done-kept" | "aborting" | "failed") {
            return Err(if same_migration {
                phase.to_string()
            } else {
                "another migration's".into()
            });
        }
        Ok(())
    })
    .await
}

/// Whether a pod whose annotations say `phase` (and `waiting`: it is a target that still waits
/// for its checkpoint) has a migration in flight on it: the source phases of a migration that
/// has not ended, a handoff not finished, a target still waiting. Anything else -- no
/// migration, one undone (`failed`), the restored pod of a finished one whatever its last
/// phase -- may be taken by a new one. `done-kept` (a source kept frozen for good) is in
/// flight for ever: it is never to run again.
fn in_flight(phase: &str, waiting: bool) -> bool {
    waiting
        || matches!(
            phase,
            "claimed"
                | "creating-target"
                | "checkpointing"
                | "committed"
                | "aborting"
                | "done-kept"
                | "handing-off"
        )
}

/// Takes pod `source` for migration `id`, before anything is created for it: one guarded
/// write (`migrate.kubectl.io/phase: claimed` with the id) that succeeds only when no other
/// migration is in flight on it. Of two migrations of one pod (the plugin and a PodMigration,
/// two drains) exactly one takes it; the other is refused having touched nothing, and never
/// undoes what it does not own.
///
/// # Errors
/// [`Claim::Taken`] naming the migration in flight and its phase; [`Claim::Api`].
pub async fn take(pods: &Api<Pod>, source: &str, id: &str) -> Result<(), Claim> {
    // What an earlier migration recorded goes: its peer, its restart counts.
    let fresh = |_: &Pod| {
        let mut values = serde_json::Map::new();
        values.insert(annotations::PEER.into(), serde_json::Value::Null);
        values.insert(
            annotations::RESTARTS_AT_FREEZE.into(),
            serde_json::Value::Null,
        );
        values
    };
    guarded_write(
        pods,
        source,
        id,
        "claimed",
        &fresh,
        |pod, phase, same_migration| {
            let waiting = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotations::WAIT_FOR_CHECKPOINT))
                .is_some_and(|w| w == "true");
            if same_migration || !in_flight(phase, waiting) {
                Ok(())
            } else {
                Err(phase.to_string())
            }
        },
    )
    .await
}

/// Writes migration `id`'s final phase `to` on the source (`failed` after an undo) only while
/// the pod still records that migration: a write never lands on a pod another migration has
/// taken since.
pub async fn settle(pods: &Api<Pod>, source: &str, id: &str, to: &str) -> Result<(), Claim> {
    guarded_write(
        pods,
        source,
        id,
        to,
        &nothing,
        |_, phase, same_migration| {
            // A commit recorded meanwhile (an `abort` that went forward) is never overwritten.
            if same_migration && !matches!(phase, "committed" | "done-kept") {
                Ok(())
            } else {
                Err(phase.to_string())
            }
        },
    )
    .await
}

/// Takes migration `id`'s record back from `committed` to `failed` once its source runs the
/// app again (`kubectl migrate resume --from-source`, after the target proved to hold no
/// copy): the one write that may undo a commit, and only of that migration.
///
/// # Errors
/// [`Claim::Taken`] when the source records another migration or phase; [`Claim::Api`].
pub async fn claim_back(pods: &Api<Pod>, source: &str, id: &str) -> Result<(), Claim> {
    guarded_write(
        pods,
        source,
        id,
        "failed",
        &nothing,
        |_, phase, same_migration| {
            if same_migration && matches!(phase, "committed" | "failed") {
                Ok(())
            } else {
                Err(phase.to_string())
            }
        },
    )
    .await
}

/// Reads the source, asks `allowed(pod, phase, same_migration)`, and writes phase `to` and the
/// id (with `extra`'s annotations) carrying the read's resourceVersion, so that a concurrent writer makes it
/// read and decide again instead of being overwritten.
async fn guarded_write(
    pods: &Api<Pod>,
    source: &str,
    id: &str,
    to: &str,
    extra: Extra<'_>,
    allowed: impl Fn(&Pod, &str, bool) -> Result<(), String>,
) -> Result<(), Claim> {
    for _ in 0..10 {
        let pod = pods.get(source).await.map_err(Claim::Api)?;
        let notes = pod.metadata.annotations.clone().unwrap_or_default();
        let phase = notes.get(annotations::PHASE).cloned().unwrap_or_default();
        let recorded = notes.get(annotations::MIGRATION_ID).cloned();
        let same_migration = recorded.as_deref() == Some(id);
        let mut values = extra(&pod);
        if phase == to && same_migration && values.is_empty() {
            return Ok(());
        }
        if let Err(phase) = allowed(&pod, &phase, same_migration) {
            return Err(Claim::Taken {
                phase,
                by: recorded.filter(|_| !same_migration),
            });
        }
        values.insert(annotations::PHASE.into(), to.into());
        values.insert(annotations::MIGRATION_ID.into(), id.into());
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": pod.metadata.resource_version,
            "annotations": values,
        }});
        match pods
            .patch(source, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            // Changed since the read (often only the kubelet's status): read again.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(Claim::Api(error)),
        }
    }
    Err(Claim::Api(kube::Error::Api(
        kube::core::Status::failure(
            "the pod kept changing while the phase was written",
            "Conflict",
        )
        .with_code(409)
        .boxed(),
    )))
}

/// Reads `name` back, trying for a few seconds: after a lost reply the API server may need
/// a moment (a restart, a leader change) before it answers again.
pub(super) async fn retry_get(pods: &Api<Pod>, name: &str) -> Result<Pod, kube::Error> {
    let mut attempt = 0;
    loop {
        match pods.get(name).await {
            Ok(pod) => return Ok(pod),
            Err(error) if attempt >= 9 => return Err(error),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
        }
    }
}

/// Whether `pod` records migration `id` as committed: its phase is `committed`, or already
/// `done-kept` (finished with `--keep-source`), with this id.
pub fn is_committed(pod: &Pod, id: &str) -> bool {
    let notes = pod.metadata.annotations.as_ref();
    let note = |key: &str| notes.and_then(|a| a.get(key)).map(String::as_str);
    matches!(note(annotations::PHASE), Some("committed" | "done-kept"))
        && note(annotations::MIGRATION_ID) == Some(id)
}

/// The commit's outcome is unknown: say how to tell, and what to run in either case.
pub(super) fn commit_unknown(
    connection: &Connection,
    options: &Options,
    progress: &Progress,
) -> String {
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
    if progress
        .target
        .as_ref()
        .is_some_and(super::identity::is_holder)
    {
        // A StatefulSet's pod: its checkpoint is parked in the holder; the source goes first.
        return format!(
            "nothing was undone and nothing was resumed: the source is frozen and its checkpoint parked in pod {target}. `kubectl get pod -n {ns} {source} -o jsonpath='{{.metadata.annotations}}'` tells: if its {phase} is `committed` with id {id}, finish with `kubectl migrate resume -n {ns} {source}` (never delete {target}: it holds the app); otherwise abort with `kubectl migrate abort -n {ns} {source}`",
            source = options.pod,
            phase = annotations::PHASE,
            id = progress.id,
        );
    }
    if progress
        .target
        .as_ref()
        .and_then(super::handoff::owner_of)
        .is_some()
    {
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
