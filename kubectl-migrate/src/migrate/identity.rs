//! A StatefulSet's pod keeps its identity when it moves: the restored pod has the source's
//! name (so its ordinal, hostname, DNS record and claims), on the target node.
//!
//! The StatefulSet controller recreates a missing pod by name as soon as it is gone, and two
//! pods cannot share a name, so the source must be gone before the moved pod exists. Order,
//! and why:
//! 1. **holder**: a pod on the target node (`rewrite::holder_pod`: no labels, no owner, no
//!    claims) whose launchers only wait. It carries the successor pod's spec as an annotation,
//!    so a `resume` can create it after the source is gone.
//! 2. **guard**: a ValidatingAdmissionPolicy and its binding, for this migration only, deny
//!    the creation of a pod with the source's name in its namespace unless it carries this
//!    migration's id: the controller's replacement (which would start the app fresh) is
//!    refused, and only the successor gets through. A server-side dry-run create proves the
//!    API server enforces it before anything is frozen.
//! 3. **freeze, checkpoint, park**: as in every migration the app is frozen under a lease;
//!    each container's checkpoint goes into the holder's `restore-launcher park`, which
//!    verifies it in full and keeps it (0600).
//! 4. **commit**: the sources acknowledge, then the commit is recorded on the source pod. From
//!    here the parked checkpoint is the app; nothing undoes.
//! 5. **finish** (`migrate::finish`, the same steps as every variant's, idempotent, also what
//!    `kubectl migrate resume` runs). Its first step here is [`restore_successor`]: the
//!    holder records the commit; the source is deleted and waited for until gone (its
//!    ReadWriteOnce volumes detach); the successor is created (`rewrite::successor_pod`: the
//!    source's name, labels, StatefulSet owner, hostname and claims, pinned to the target
//!    node, waiting for its checkpoint); each container's parked archive goes into its
//!    `receive`, which verifies and restores it (frozen). Then, as for every variant, the
//!    successor is thawed, marked restored and Ready; last the holder and the guard are
//!    deleted ([`clean_up`]).
//!
//! Before the commit any failure undoes as always: the source resumes, the holder is deleted,
//! and so is the guard (`undo`). The app is never started fresh by the controller (the guard)
//! and never runs twice (the source is gone before the successor exists). The parked archive
//! is the only copy of the app from the source's deletion to the successor's restore: a holder
//! lost then (its node failing) loses the app's memory, which the user is told.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use migrate_format::{LauncherState, annotations};

use super::thaw::Finished;
use super::transfer::{Cut, keep_alive, leased, within};
use super::{Ctx, MigrateError, Options, Progress, fault, record, target};
use crate::client::Connection;
use crate::launchers::{Launchers, Transferred};
use crate::record::{Phase, is_successor, note};
use crate::retry;
use crate::rewrite;

/// Where a StatefulSet pod's app goes (the pipeline's target step for this variant): the
/// holder on the target node, recording the successor to create, and the guard that keeps
/// the StatefulSet from recreating the pod fresh. Returns the holder, running.
pub(super) async fn hold<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    progress: &mut Progress,
    source: &Pod,
) -> Result<Pod, MigrateError> {
    let options = ctx.options;
    let node = &options.target_node;
    let holder = rewrite::holder_pod(source, node, &progress.id);
    let holder = target::create_pod(ctx, progress, source, holder).await?;
    let holder_name = holder.metadata.name.clone().unwrap_or_default();
    let successor = rewrite::successor_pod(source, node, &progress.id, &holder_name);
    let patch = serde_json::json!({"metadata": {"annotations": {
        annotations::SUCCESSOR: serde_json::to_string(&successor).unwrap_or_default(),
    }}});
    ctx.pods
        .patch(&holder_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| MigrateError::Api {
            step: "recording the successor pod on the holder",
            source,
        })?;
    progress.phase = "guarding the pod's name".into();
    guard::install(
        &ctx.connection.client,
        &ctx.connection.namespace,
        &options.pod,
        &progress.id,
        &successor,
    )
    .await?;
    fault::stage("guarded");
    Ok(holder)
}

/// Every container's checkpoint into the holder's `park`, all at once, under the lease and
/// the freeze limit (the pipeline's transfer step for this variant).
pub(super) async fn park<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    source: &Pod,
    holder: &Pod,
    cut: &Cut,
) -> Result<BTreeMap<String, Transferred>, MigrateError> {
    let parking = cut.containers.iter().map(|c| async move {
        let moved = ctx.options.moved.clone();
        (
            c.clone(),
            ctx.launchers.park(source, holder, c, moved).await,
        )
    });
    let results = within(
        cut.thaw_by,
        leased(
            futures::future::join_all(parking),
            keep_alive(ctx, source, cut),
        ),
    )
    .await??;
    let mut parked = BTreeMap::new();
    for (container, result) in results {
        let done = result.map_err(|error| MigrateError::Transfer {
            container: container.clone(),
            error,
        })?;
        if done.restore.id.as_deref() != Some(done.checkpoint.id.as_str()) {
            return Err(MigrateError::Transfer {
                container,
                error: format!(
                    "the holder parked checkpoint {:?}, not the one sent ({})",
                    done.restore.id, done.checkpoint.id
                )
                .into(),
            });
        }
        parked.insert(container, done);
    }
    fault::stage("parked");
    Ok(parked)
}

/// The parked archive must still be there to be committed to (the pipeline's verify step for
/// this variant: `park` verified every archive in full before answering).
pub(super) async fn verify<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    holder: &Pod,
) -> Result<(), MigrateError> {
    let holder_name = holder.metadata.name.clone().unwrap_or_default();
    match ctx.pods.get_opt(&holder_name).await {
        Ok(Some(pod)) if pod.metadata.deletion_timestamp.is_none() => Ok(()),
        Ok(_) => Err(MigrateError::TargetFailed {
            target: holder_name,
            reason: "the holder pod was deleted before the commit".into(),
        }),
        Err(source) => Err(MigrateError::Api {
            step: "reading the holder pod before the commit",
            source,
        }),
    }
}

/// Each container's transfer as the report tells it: checkpointed into the holder, restored
/// in the successor from what was parked.
pub(super) fn restored_from_parked(
    parked: BTreeMap<String, Transferred>,
    finished: &Finished,
) -> BTreeMap<String, Transferred> {
    parked
        .into_iter()
        .map(|(container, park)| {
            let restore = finished
                .restored
                .get(&container)
                .cloned()
                .unwrap_or(park.restore);
            let moved = Transferred {
                checkpoint: park.checkpoint,
                restore,
                route: park.route,
            };
            (container, moved)
        })
        .collect()
}

/// How long the source pod may take to be gone once deleted (its kubelet stops its
/// containers; a frozen, committed launcher exits at once on SIGTERM).
const SOURCE_GONE_PATIENCE: Duration = Duration::from_secs(120);

/// The first step of finishing a committed StatefulSet pod's move (`migrate::finish` does the
/// rest, as for every variant), idempotently, from whatever point it stopped: the holder
/// records the commit, the source is deleted and gone, the successor created and each
/// container restored there from the parked archive (frozen). Returns the successor.
/// `progress.target` is the holder.
///
/// # Errors
/// [`MigrateError::AfterCommit`] naming what keeps failing and what finishes; nothing undoes.
pub(super) async fn restore_successor<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
    finished: &mut Finished,
) -> Result<Pod, MigrateError> {
    let ns = &connection.namespace;
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), ns);
    let name = &options.pod;
    let id = &progress.id;
    let holder_name = progress
        .target
        .as_ref()
        .and_then(|t| t.metadata.name.clone())
        .unwrap_or_default();
    let after = |what: String| MigrateError::AfterCommit { what };
    let resume = format!("`kubectl migrate resume -n {ns} {name}` goes on from there");

    let holder = retry::by(retry::finishing(), || pods.get_opt(&holder_name))
        .await
        .map_err(|e| {
            after(format!(
                "cannot read the holder pod {holder_name}: {e}; {resume}"
            ))
        })?;
    // The source and the successor share the name: the successor is the pod with this
    // migration's id and role that is not the source, whose uid the holder records. (A
    // successor loses its role once its move is complete, so the source of a later move never
    // looks like one.)
    let source_uid = holder
        .as_ref()
        .and_then(|h| note(h, annotations::SOURCE_UID))
        .map(str::to_string);
    let at_name = retry::by(retry::finishing(), || pods.get_opt(name))
        .await
        .map_err(|e| after(format!("cannot read pod {name}: {e}; {resume}")))?;
    let ours = |p: &Pod| {
        is_successor(p)
            && note(p, annotations::MIGRATION_ID) == Some(id.as_str())
            && (holder.is_none() || (source_uid.is_some() && p.metadata.uid != source_uid))
    };
    let successor_now = at_name.clone().filter(|p| ours(p));
    let Some(holder) = holder else {
        return match (successor_now, at_name) {
            // The holder goes last: a successor that holds the app finishes.
            (Some(successor), _) => Ok(successor),
            // The holder went before the source did: the source still holds the app, frozen.
            (None, Some(source)) if super::is_committed(&source, id) => Err(after(format!(
                "the holder pod {holder_name} is gone (deleted, or its node failed) before the source pod {name} was: the source still holds the app, frozen as of the freeze. Resume it with {}, then delete the guard: kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {}",
                rewrite::migrated_containers(&source)
                    .iter()
                    .map(|c| format!(
                        "`kubectl exec -n {ns} {name} -c {c} -- restore-launcher rollback --committed`"
                    ))
                    .collect::<Vec<_>>()
                    .join(" and "),
                guard::name(id)
            ))),
            _ => Err(after(format!(
                "the holder pod {holder_name}, which kept the app's checkpoint after the source was deleted, is gone and pod {name} was not restored: the app's memory since the freeze is lost. Delete the guard (`kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {}`) and the StatefulSet starts {name} fresh",
                guard::name(id)
            ))),
        };
    };
    let successor: Pod = note(&holder, annotations::SUCCESSOR)
        .and_then(|json| serde_json::from_str(json).ok())
        .ok_or_else(|| {
            after(format!(
                "the holder pod {holder_name} does not record the pod to create (annotation {}); {resume} cannot either: this migration's holder is damaged",
                annotations::SUCCESSOR
            ))
        })?;

    // The holder records the commit before the source goes: with the source gone, it is the
    // migration's record (`kubectl migrate status` and `resume` read it). Only a source that
    // is there and committed is recorded: a source gone without a commit (its lease ran out,
    // it resumed, then went) means the parked checkpoint is stale, and must never be restored.
    if Phase::of(&holder) != Some(Phase::Committed) {
        let committed_source = at_name.as_ref().filter(|p| {
            p.metadata.uid.is_some() && p.metadata.uid == source_uid && super::is_committed(p, id)
        });
        let Some(source) = committed_source else {
            return Err(after(format!(
                "migration {id} of pod {name} is not committed (its source is gone or records no commit): the checkpoint parked in {holder_name} is not the app's state and is never restored. Undo with `kubectl migrate abort -n {ns} {name}`"
            )));
        };
        let restarts = serde_json::to_string(&super::restart_counts(source)).unwrap_or_default();
        retry::by(retry::finishing(), || async {
            let patch = serde_json::json!({"metadata": {"annotations": {
                annotations::PHASE: Phase::Committed.as_str(), annotations::MIGRATION_ID: id,
                annotations::SOURCE_RESTARTS: restarts,
            }}});
            pods.patch(&holder_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
        })
        .await
        .map_err(|e| {
            after(format!(
                "cannot record the commit on the holder pod {holder_name}: {e}; the source {name} is kept (frozen) until it is: {resume}"
            ))
        })?;
    }
    let restarts_at_commit: Option<BTreeMap<String, i32>> =
        retry::by(retry::finishing(), || pods.get_opt(&holder_name))
            .await
            .ok()
            .flatten()
            .and_then(|h| {
                note(&h, annotations::SOURCE_RESTARTS).and_then(|r| serde_json::from_str(r).ok())
            });

    let successor = match successor_now {
        Some(running) => running,
        None => {
            let source = Source {
                uid: source_uid.as_deref(),
                restarts_at_commit: restarts_at_commit.as_ref(),
            };
            remove_source(connection, &pods, options, progress, source, finished).await?;
            fault::stage("source-gone");
            create_successor(&connection.client, ns, &pods, &successor, id).await?
        }
    };
    let successor_name = successor.metadata.name.clone().unwrap_or_default();
    let successor = target::wait_until_running(&pods, &successor_name)
        .await
        .map_err(|e| {
            after(format!(
                "{e}; the checkpoint stays parked in {holder_name}: {resume}"
            ))
        })?;

    // Each container: restore from the parked archive unless that already happened.
    for container in rewrite::migrated_containers(&successor) {
        let state = launchers
            .status(&successor, &container)
            .await
            .map(|s| s.state)
            .map_err(|e| {
                after(format!(
                    "cannot read the launcher of container {container} in pod {successor_name}: {e}; {resume}"
                ))
            })?;
        if matches!(state, LauncherState::Restored | LauncherState::Running) {
            continue;
        }
        let moved = options.moved.clone();
        let done = launchers
            .unpark(&holder, &successor, &container, moved)
            .await
            .map_err(|e| {
                after(format!(
                    "container {container}: the parked checkpoint could not be restored in pod {successor_name}: {e}. It stays parked in {holder_name} (never delete that pod): {resume}"
                ))
            })?;
        finished.restored.insert(container, done.restore);
    }
    fault::stage("unparked");
    Ok(successor)
}

/// A successor that could not be thawed: its source is gone, but the holder keeps the parked
/// checkpoint until the move is done, and `resume` restores a successor that lost its app
/// (its container restarted, so it waits for a checkpoint again) from it once more.
pub(super) fn thaw_failed(
    error: MigrateError,
    connection: &Connection,
    successor: &str,
) -> MigrateError {
    match error {
        MigrateError::ThawRefused { container, error } => MigrateError::AfterCommit {
            what: format!(
                "cannot thaw container {container} of pod {successor}: {error}; the checkpoint stays parked in the holder: `kubectl migrate resume -n {} {successor}` goes on from there",
                connection.namespace
            ),
        },
        other => other,
    }
}

/// The last step of a StatefulSet pod's move, once its successor runs and serves: the holder
/// and the guard go, and the successor is no longer one. What fails here is a warning (the
/// app has moved), with the command that does it.
pub(super) async fn clean_up(connection: &Connection, successor: &Pod, finished: &mut Finished) {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let name = successor.metadata.name.clone().unwrap_or_default();
    record(
        connection,
        successor,
        "MigrationDone",
        "restored here with its name, from the checkpoint parked on this node".into(),
    )
    .await;
    // The guard first: with the holder gone, nothing would find a guard left behind.
    let id = note(successor, annotations::MIGRATION_ID).unwrap_or_default();
    if let Err(error) = guard::remove(&connection.client, id).await {
        finished.warnings.push(format!(
            "cannot delete this migration's admission policy ({error}); until it goes, the StatefulSet cannot recreate pod {name} if it is deleted: kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {}",
            guard::name(id)
        ));
    }
    if let Some(holder) = note(successor, annotations::PEER) {
        match retry::by(retry::finishing(), || async { pods.delete(holder, &DeleteParams::default()).await.map(drop) }).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => finished.warnings.push(format!(
                "cannot delete the holder pod {holder} ({error}): kubectl delete pod -n {} {holder}",
                connection.namespace
            )),
        }
    }
    // Complete: no longer a successor (the source of a later move must not look like one).
    let patch = serde_json::json!({"metadata": {"annotations": {annotations::ROLE: null}}});
    if let Err(error) = retry::by(retry::finishing(), || async {
        pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    })
    .await
    {
        finished.warnings.push(format!(
            "cannot clear the annotation {} of pod {name} ({error}): kubectl annotate pod -n {} {name} {}-",
            annotations::ROLE,
            connection.namespace,
            annotations::ROLE
        ));
    }
}

/// What the holder knows of the source.
struct Source<'a> {
    uid: Option<&'a str>,
    /// Its containers' restart counts when the commit was recorded on the holder.
    restarts_at_commit: Option<&'a BTreeMap<String, i32>>,
}

/// Deletes the committed source (if it is still there) and waits until it is gone: its
/// containers stopped and its ReadWriteOnce volumes free to attach on the target.
async fn remove_source(
    connection: &Connection,
    pods: &Api<Pod>,
    options: &Options,
    progress: &Progress,
    known: Source<'_>,
    finished: &mut Finished,
) -> Result<(), MigrateError> {
    let name = &options.pod;
    let ns = &connection.namespace;
    let after = |what: String| MigrateError::AfterCommit { what };
    let Some(source) = retry::by(retry::finishing(), || pods.get_opt(name))
        .await
        .map_err(|e| after(format!("cannot read pod {name}: {e}")))?
    else {
        return Ok(());
    };
    let is_source = known.uid.is_some() && source.metadata.uid.as_deref() == known.uid;
    if !is_source {
        if is_successor(&source)
            && note(&source, annotations::MIGRATION_ID) == Some(progress.id.as_str())
        {
            // Another run of this migration (a concurrent `resume`) created it meanwhile.
            return Ok(());
        }
        // Not the source, not the successor: someone else's pod took the name (the guard
        // was deleted by hand?). It may have started the app fresh.
        return Err(after(format!(
            "pod {name} is not this migration's (migration {} is committed, its checkpoint parked in the holder pod): something else created it, maybe the StatefulSet after the admission policy {} was deleted, and it may have started the app fresh and written to its volumes. If you want the moved app back, delete that pod (`kubectl delete pod -n {ns} {name}`), then `kubectl migrate resume -n {ns} {name}` restores the parked app",
            progress.id,
            guard::name(&progress.id),
        )));
    }
    // A source container restarted after the commit (a liveness probe, a node reboot) started
    // the app fresh: it may have written to the volumes since, which the parked memory knows
    // nothing about. Restoring over them is the user's call, not this plugin's.
    let restarted: Vec<String> = super::restart_counts(&source)
        .into_iter()
        .filter(|(c, n)| {
            known
                .restarts_at_commit
                .and_then(|at| at.get(c))
                .is_some_and(|before| n > before)
        })
        .map(|(c, _)| c)
        .collect();
    if !restarted.is_empty() {
        return Err(after(format!(
            "container(s) {} of the source pod {name} restarted after the commit: the app runs there fresh and may have written to its volumes since the checkpoint was taken. Nothing more was done. To keep the fresh app: delete the holder pod and the guard (`kubectl delete pod -n {ns} {}` and `kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {}`); to restore the checkpoint over its volumes instead: `kubectl delete pod -n {ns} {name} --wait`, then `kubectl migrate resume -n {ns} {name}`",
            restarted.join(", "),
            progress
                .target
                .as_ref()
                .and_then(|t| t.metadata.name.clone())
                .unwrap_or_default(),
            guard::name(&progress.id)
        )));
    }
    if source.metadata.deletion_timestamp.is_none() {
        record(
            connection,
            &source,
            "MigrationDone",
            format!(
                "checkpoint parked on node {}; deleting this pod so that its name moves there",
                options.target_node
            ),
        )
        .await;
        finished.source_deleted_at_ms = Some(migrate_format::unix_ms());
        match retry::by(retry::finishing(), || async {
            pods.delete(name, &DeleteParams::default()).await.map(drop)
        })
        .await
        {
            Ok(()) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => {
                return Err(after(format!(
                    "cannot delete the source pod {name}: {error}; it is frozen and committed (never resume it): `kubectl migrate resume -n {ns} {name}` goes on"
                )));
            }
        }
    }
    // Its grace period (preStop hooks run against the frozen app), and some time for the
    // kubelet to report.
    let grace = source
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    let patience = SOURCE_GONE_PATIENCE.max(Duration::from_secs(grace.max(0) as u64 + 30));
    if crate::wait::gone(pods, &source, patience).await.is_err() {
        return Err(after(format!(
            "the source pod {name} was deleted but is not gone after {} s (a preStop hook still running? its node's kubelet down?); once it is, `kubectl migrate resume -n {ns} {name}` goes on",
            patience.as_secs()
        )));
    }
    finished.source_deleted = true;
    Ok(())
}

/// Creates the successor (the guard lets it through: it carries the id). The guard is made
/// sure of first: without it the controller could take the name meanwhile.
async fn create_successor(
    client: &Client,
    namespace: &str,
    pods: &Api<Pod>,
    successor: &Pod,
    id: &str,
) -> Result<Pod, MigrateError> {
    let name = successor.metadata.name.clone().unwrap_or_default();
    // The StatefulSet the successor names as owner must still be the same object: one deleted
    // and recreated (`--cascade=orphan`) has another uid, and the garbage collector would
    // delete a pod owned by the old one.
    if let Some(owner) = crate::check::pod::controller(successor) {
        let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
            Api::namespaced(client.clone(), namespace);
        let now = retry::by(retry::finishing(), || sets.get_opt(&owner.name)).await.map_err(|e| {
            MigrateError::AfterCommit {
                what: format!("cannot read StatefulSet {}: {e}; the checkpoint stays parked: `kubectl migrate resume -n {namespace} {name}` goes on", owner.name),
            }
        })?;
        if now.as_ref().and_then(|s| s.metadata.uid.as_deref()) != Some(owner.uid.as_str()) {
            return Err(MigrateError::AfterCommit {
                what: format!(
                    "StatefulSet {} was deleted or replaced since the move began: pod {name} cannot be given to it. The checkpoint stays parked; once the StatefulSet is back as it was, `kubectl migrate resume -n {namespace} {name}` goes on",
                    owner.name
                ),
            });
        }
    }
    guard::install(client, namespace, &name, id, successor)
        .await
        .map_err(|e| MigrateError::AfterCommit {
            what: format!(
                "{e}; the checkpoint stays parked: `kubectl migrate resume -n {namespace} {name}` goes on"
            ),
        })?;
    match retry::by(retry::finishing(), || async {
        pods.create(&PostParams::default(), successor).await
    })
    .await
    {
        Ok(created) => Ok(created),
        Err(error) => {
            // A lost reply may have created it.
            if let Ok(Some(pod)) = pods.get_opt(&name).await
                && is_successor(&pod)
                && note(&pod, annotations::MIGRATION_ID) == Some(id)
            {
                return Ok(pod);
            }
            Err(MigrateError::AfterCommit {
                what: format!(
                    "cannot create pod {name} on the target node: {error}; the checkpoint stays parked: `kubectl migrate resume -n {namespace} {name}` goes on"
                ),
            })
        }
    }
}

/// What to say when a committed StatefulSet pod's move could not finish.
pub(super) fn stuck(
    connection: &Connection,
    options: &Options,
    progress: &Progress,
    why: &str,
) -> String {
    let holder = progress
        .target
        .as_ref()
        .and_then(|t| t.metadata.name.clone())
        .unwrap_or_default();
    format!(
        "the migration was committed (the app's checkpoint is parked in the holder pod {holder} on node {}), so nothing was undone; finishing failed ({why}). Never delete {holder}: it holds the app. `kubectl migrate resume -n {} {}` finishes (the source's deletion, pod {} on node {}, the restore, the thaw)",
        options.target_node, connection.namespace, options.pod, options.pod, options.target_node
    )
}

/// The per-migration admission policy that keeps the StatefulSet controller from recreating
/// the pod while it moves.
pub mod guard {
    use super::*;

    /// The policy's and its binding's name.
    pub fn name(id: &str) -> String {
        format!("kubectl-migrate-{id}")
    }

    /// How long the API server may take to enforce a new policy.
    const IN_FORCE_PATIENCE: Duration = Duration::from_secs(30);

    /// The policy and binding denying the creation of pod `pod` in `namespace` unless it
    /// carries migration `id`.
    pub fn objects(
        namespace: &str,
        pod: &str,
        id: &str,
    ) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
        let name = name(id);
        let key = annotations::MIGRATION_ID;
        let meta = serde_json::json!({
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "kubectl-migrate"},
            "annotations": {annotations::MIGRATION_ID: id, "migrate.kubectl.io/pod": format!("{namespace}/{pod}")},
        });
        let policy = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": meta,
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["CREATE"], "resources": ["pods"],
                }]},
                "validations": [{
                    "expression": format!(
                        "object.metadata.name != '{pod}' || (has(object.metadata.annotations) && '{key}' in object.metadata.annotations && object.metadata.annotations['{key}'] == '{id}')"
                    ),
                    "message": format!(
                        "pod {pod} is being moved by kubectl migrate (migration {id}): its app is checkpointed and only the migration creates the pod again; `kubectl migrate status -n {namespace} {pod}` shows it"
                    ),
                    "reason": "Forbidden",
                }],
            },
        });
        let binding = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": meta,
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": namespace,
                }}},
            },
        });
        (
            serde_json::from_value(policy).expect("a valid policy"),
            serde_json::from_value(binding).expect("a valid binding"),
        )
    }

    /// Creates the guard (if missing) and waits until the API server enforces it: a
    /// server-side dry-run create of `probe` without the id must be denied by it.
    ///
    /// # Errors
    /// [`MigrateError::Api`] when it cannot be created (RBAC: config/rbac-statefulset.yaml)
    /// or is not enforced in time.
    pub async fn install(
        client: &Client,
        namespace: &str,
        pod: &str,
        id: &str,
        probe: &Pod,
    ) -> Result<(), MigrateError> {
        let (policy, binding) = objects(namespace, pod, id);
        let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
        let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
        let created = |step: &'static str| {
            move |result: Result<(), kube::Error>| match result {
                Err(kube::Error::Api(status)) if status.code == 403 => Err(MigrateError::Api {
                    step: if step == "policy" {
                        "creating the admission policy that keeps the StatefulSet from recreating the pod while it moves (needs create on validatingadmissionpolicies: config/rbac-statefulset.yaml)"
                    } else {
                        "creating the admission policy's binding (needs create on validatingadmissionpolicybindings: config/rbac-statefulset.yaml)"
                    },
                    source: kube::Error::Api(status),
                }),
                Err(source) => Err(MigrateError::Api {
                    step: "creating the admission policy that keeps the StatefulSet from recreating the pod while it moves",
                    source,
                }),
                Ok(()) => Ok(()),
            }
        };
        created("policy")(ensure(&policies, &policy).await)?;
        created("binding")(ensure(&bindings, &binding).await)?;
        let mut denied = probe.clone();
        if let Some(notes) = denied.metadata.annotations.as_mut() {
            notes.remove(annotations::MIGRATION_ID);
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let started = Instant::now();
        let guard = name(id);
        // Several denials in a row: with more than one API server, each learns of the policy
        // on its own.
        let mut denials = 0;
        loop {
            match pods.create(&dry_run, &denied).await {
                Err(kube::Error::Api(status)) if status.message.contains(&guard) => {
                    denials += 1;
                    if denials < IN_FORCE_DENIALS {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "the admission policy is in force"
                    );
                    return successor_admitted(&pods, probe, &dry_run).await;
                }
                outcome if started.elapsed() >= IN_FORCE_PATIENCE => {
                    let seen = match outcome {
                        Ok(_) => "a test create was accepted".to_string(),
                        Err(error) => format!("a test create got: {error}"),
                    };
                    return Err(MigrateError::Api {
                        step: "waiting for the API server to enforce the admission policy (ValidatingAdmissionPolicy must be enabled: Kubernetes 1.30 or later)",
                        source: kube::Error::Api(
                            kube::core::Status::failure(
                                &format!(
                                    "{guard} not in force after {} s; {seen}",
                                    IN_FORCE_PATIENCE.as_secs()
                                ),
                                "Timeout",
                            )
                            .with_code(504)
                            .boxed(),
                        ),
                    });
                }
                _ => {
                    denials = 0;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// How many denials in a row prove the policy in force.
    const IN_FORCE_DENIALS: u32 = 3;

    /// The successor itself (with the id) must get through admission: another policy (a
    /// guard left by an earlier migration of this pod) would deny it after the source is gone.
    /// Its name is taken while the source exists, so "already exists" is the answer then.
    async fn successor_admitted(
        pods: &Api<Pod>,
        successor: &Pod,
        dry_run: &PostParams,
    ) -> Result<(), MigrateError> {
        match pods.create(dry_run, successor).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.reason == "AlreadyExists" => Ok(()),
            Err(source) => Err(MigrateError::Api {
                step: "checking that the API server admits the moved pod (a kubectl-migrate policy left by an earlier migration of this pod? `kubectl get validatingadmissionpolicies -l app.kubernetes.io/managed-by=kubectl-migrate`)",
                source,
            }),
        }
    }

    async fn ensure<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
    where
        K: kube::Resource
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        match api.create(&PostParams::default(), object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.reason == "AlreadyExists" => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Deletes the guard of migration `id` (already gone is fine).
    ///
    /// # Errors
    /// The API error that kept failing.
    pub async fn remove(client: &Client, id: &str) -> Result<(), kube::Error> {
        let name = name(id);
        let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
        let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
        for deleted in [
            retry::by(retry::finishing(), || async {
                bindings
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(drop)
            })
            .await,
            retry::by(retry::finishing(), || async {
                policies
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(drop)
            })
            .await,
        ] {
            match deleted {
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                other => other?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_denies_only_the_pods_name_without_the_migrations_id_in_its_namespace() {
        let (policy, binding) = guard::objects("shop", "ledger-0", "mig-17-ab");
        let name = "kubectl-migrate-mig-17-ab";
        assert_eq!(policy.metadata.name.as_deref(), Some(name));
        let spec = policy.spec.unwrap();
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
        let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
        assert_eq!(
            rules[0].operations.as_deref(),
            Some(&["CREATE".to_string()][..])
        );
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_string()][..])
        );
        let validation = &spec.validations.unwrap()[0];
        assert_eq!(
            validation.expression,
            "object.metadata.name != 'ledger-0' || (has(object.metadata.annotations) && 'migrate.kubectl.io/id' in object.metadata.annotations && object.metadata.annotations['migrate.kubectl.io/id'] == 'mig-17-ab')"
        );
        assert!(
            validation
                .message
                .as_deref()
                .unwrap()
                .contains("kubectl migrate status -n shop ledger-0")
        );
        let spec = binding.spec.unwrap();
        assert_eq!(spec.policy_name.as_deref(), Some(name));
        assert_eq!(
            spec.validation_actions.as_deref(),
            Some(&["Deny".to_string()][..])
        );
        let namespaces = spec.match_resources.unwrap().namespace_selector.unwrap();
        assert_eq!(
            namespaces.match_labels.unwrap()["kubernetes.io/metadata.name"],
            "shop"
        );
    }
}
