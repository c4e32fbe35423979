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
//! 5. **finish** ([`finish`], idempotent, also what `kubectl migrate resume` runs): the holder
//!    records the commit; the source is deleted and waited for until gone (its ReadWriteOnce
//!    volumes detach); the successor is created (`rewrite::successor_pod`: the source's
//!    name, labels, StatefulSet owner, hostname and claims, pinned to the target node, waiting
//!    for its checkpoint); each container's parked archive goes into its `receive`, which
//!    verifies and restores it (frozen); the successor is thawed, marked restored and Ready;
//!    the holder and the guard are deleted.
//!
//! Before the commit any failure undoes as always: the source resumes, the holder is deleted,
//! and so is the guard (`undo`). The app is never started fresh by the controller (the guard)
//! and never runs twice (the source is gone before the successor exists). The parked archive
//! is the only copy of the app from the source's deletion to the successor's restore: a holder
//! lost then (its node failing) loses the app's memory, which the user is told.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use migrate_format::{LauncherState, annotations};

use super::finish::{Finished, end_wait, mark_serving, retry, thaw_all};
use super::transfer::{keep_alive, leased, within};
use super::{
    Checked, Ctx, Downtime, Laps, MigrateError, Options, Progress, Report, annotate_timings, fault,
    record, target, transfer,
};
use crate::check::Problem;
use crate::client::Connection;
use crate::launchers::{Launchers, TransferMode, Transferred};
use crate::rewrite;

/// Whether `pod` is the holder of a StatefulSet pod's move.
pub fn is_holder(pod: &Pod) -> bool {
    role(pod) == Some("holder")
}

/// Whether `pod` is the successor of a StatefulSet pod's move.
pub fn is_successor(pod: &Pod) -> bool {
    role(pod) == Some("successor")
}

fn role(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::ROLE))
        .map(String::as_str)
}

fn note<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The pipeline for a StatefulSet's pod, after the preflight (see the module's order).
pub(super) async fn run<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    progress: &mut Progress,
    mut laps: Laps,
    checked: Checked,
) -> Result<Report, MigrateError> {
    let options = ctx.options;
    if options.transfer == TransferMode::Direct {
        return Err(MigrateError::Preflight(vec![Problem::new(
            format!(
                "pod {} is a StatefulSet's: its checkpoint is parked in a holder pod through this plugin (the relay), not sent pod to pod",
                options.pod
            ),
            "migrate without --transfer direct",
        )]));
    }
    let source = checked.source;
    let node = &options.target_node;

    progress.phase = "creating the holder".into();
    let holder = rewrite::holder_pod(&source, node, &progress.id);
    let holder = target::create_pod(ctx, progress, &source, holder).await?;
    let holder_name = holder.metadata.name.clone().unwrap_or_default();
    let successor = rewrite::successor_pod(&source, node, &progress.id, &holder_name);
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
    laps.done("holder");

    progress.phase = "guarding the pod's name".into();
    guard::install(
        &ctx.connection.client,
        &ctx.connection.namespace,
        &options.pod,
        &progress.id,
        &successor,
    )
    .await?;
    laps.done("guard");
    fault::stage("guarded");

    progress.phase = "checkpoint and park".into();
    let cut = transfer::freeze(ctx, progress, &source, checked.freeze_limit).await?;
    fault::stage("frozen");
    let parked = park_all(ctx, &source, &holder, &cut.containers);
    let parked = within(cut.thaw_by, leased(parked, keep_alive(ctx, &source, &cut))).await???;
    laps.done("checkpoint+park");
    fault::stage("parked");
    super::commit::acknowledge(ctx, &source, &cut).await?;
    fault::stage("acknowledged");

    progress.phase = "commit".into();
    super::commit::commit(&ctx.pods, &options.pod, &progress.id).await?;
    progress.committed = true;
    laps.done("commit");
    fault::stage("committed");

    progress.phase = "moving the name".into();
    let finished = finish(ctx.connection, ctx.launchers, options, progress).await?;
    laps.done("source+successor+restore+thaw");

    let downtime = Downtime::of(&cut, &finished);
    let containers = parked
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
        .collect();
    let timings = serde_json::to_string(&laps.phases).unwrap_or_default();
    annotate_timings(&ctx.pods, &options.pod, &timings).await;
    Ok(Report {
        id: progress.id.clone(),
        source: options.pod.clone(),
        target: options.pod.clone(),
        node: node.clone(),
        phases: laps.phases,
        containers,
        downtime_ms: downtime.pod_ms,
        container_downtime_ms: downtime.containers,
        downtime_bound_ms: downtime.bound_ms,
        bytes_moved: options.moved.load(Ordering::Relaxed),
        source_deleted: finished.source_deleted,
        source_deleted_at_ms: finished.source_deleted_at_ms,
        post_copy: Vec::new(),
        warnings: finished.warnings,
    })
}

/// Every container's checkpoint into the holder's `park`, all at once.
async fn park_all<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    source: &Pod,
    holder: &Pod,
    containers: &[String],
) -> Result<BTreeMap<String, Transferred>, MigrateError> {
    let parking = containers.iter().map(|c| async move {
        let moved = ctx.options.moved.clone();
        (
            c.clone(),
            ctx.launchers.park(source, holder, c, moved).await,
        )
    });
    let mut parked = BTreeMap::new();
    for (container, result) in futures::future::join_all(parking).await {
        let done = result.map_err(|error| MigrateError::Transfer {
            container: container.clone(),
            error,
        })?;
        parked.insert(container, done);
    }
    Ok(parked)
}

/// How long the source pod may take to be gone once deleted (its kubelet stops its
/// containers; a frozen, committed launcher exits at once on SIGTERM).
const SOURCE_GONE_PATIENCE: Duration = Duration::from_secs(120);

/// Finishes a committed StatefulSet pod's move, idempotently: from whatever point it stopped
/// (the holder records the commit, the source is deleted and gone, the successor created,
/// restored from the parked archive, thawed, marked done; the holder and guard deleted).
/// `progress.target` is the holder.
///
/// # Errors
/// [`MigrateError::AfterCommit`] naming what keeps failing and what finishes; nothing undoes.
pub async fn finish<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
) -> Result<Finished, MigrateError> {
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
    let mut finished = Finished::default();

    let holder = retry(|| pods.get_opt(&holder_name)).await.map_err(|e| {
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
    let successor_now = retry(|| pods.get_opt(name))
        .await
        .map_err(|e| after(format!("cannot read pod {name}: {e}; {resume}")))?
        .filter(|p| {
            is_successor(p)
                && note(p, annotations::MIGRATION_ID) == Some(id.as_str())
                && (holder.is_none() || (source_uid.is_some() && p.metadata.uid != source_uid))
        });
    let Some(holder) = holder else {
        // The holder goes last: without it, only a successor that already holds the app can
        // finish.
        return match successor_now {
            Some(successor) => {
                complete(connection, launchers, &successor, &mut finished).await?;
                Ok(finished)
            }
            None => Err(after(format!(
                "the holder pod {holder_name}, which kept the app's checkpoint after the commit, is gone and pod {name} was not restored: the app's state since the freeze is lost. Delete the guard (`kubectl delete validatingadmissionpolicy,validatingadmissionpolicybinding {}`) and the StatefulSet starts {name} fresh",
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
    // migration's record (`kubectl migrate status` and `resume` read it).
    if note(&holder, annotations::PHASE) != Some("committed") {
        retry(|| async {
            let patch = serde_json::json!({"metadata": {"annotations": {
                annotations::PHASE: "committed", annotations::MIGRATION_ID: id,
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

    let successor = match successor_now {
        Some(running) => running,
        None => {
            remove_source(connection, &pods, options, progress, &mut finished).await?;
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
    complete(connection, launchers, &successor, &mut finished).await?;
    Ok(finished)
}

/// The last steps, once the successor holds the app: thaw, restored and Ready, done; then the
/// holder and the guard go.
async fn complete<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    successor: &Pod,
    finished: &mut Finished,
) -> Result<(), MigrateError> {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let name = successor.metadata.name.clone().unwrap_or_default();
    let progress = Progress {
        containers: rewrite::migrated_containers(successor),
        ..Progress::default()
    };
    thaw_all(launchers, &progress, successor, &name, finished).await?;
    finished
        .warnings
        .extend(end_wait(&pods, &name, Some("done")).await);
    mark_serving(&pods, &name, finished).await;
    record(
        connection,
        successor,
        "MigrationDone",
        "restored here with its name, from the checkpoint parked on this node".into(),
    )
    .await;
    if let Some(holder) = note(successor, annotations::PEER) {
        match retry(|| async { pods.delete(holder, &DeleteParams::default()).await.map(drop) }).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => finished.warnings.push(format!(
                "cannot delete the holder pod {holder} ({error}): kubectl delete pod -n {} {holder}",
                connection.namespace
            )),
        }
    }
    let id = note(successor, annotations::MIGRATION_ID).unwrap_or_default();
    if let Err(error) = guard::remove(&connection.client, id).await {
        finished.warnings.push(format!(
            "cannot delete this migration's admission policy ({error}); until it goes, the StatefulSet cannot recreate pod {name} if it is deleted: kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {}",
            guard::name(id)
        ));
    }
    // Complete: no longer a successor (the source of a later move must not look like one).
    let patch = serde_json::json!({"metadata": {"annotations": {annotations::ROLE: null}}});
    if let Err(error) = retry(|| async {
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
    Ok(())
}

/// Deletes the committed source (if it is still there) and waits until it is gone: its
/// containers stopped and its ReadWriteOnce volumes free to attach on the target.
async fn remove_source(
    connection: &Connection,
    pods: &Api<Pod>,
    options: &Options,
    progress: &Progress,
    finished: &mut Finished,
) -> Result<(), MigrateError> {
    let name = &options.pod;
    let after = |what: String| MigrateError::AfterCommit { what };
    let Some(source) = retry(|| pods.get_opt(name))
        .await
        .map_err(|e| after(format!("cannot read pod {name}: {e}")))?
    else {
        return Ok(());
    };
    if !super::is_committed(&source, &progress.id) {
        // Not the committed source, not the successor: someone else's pod took the name (the
        // guard was deleted by hand?). It may have started the app fresh.
        return Err(after(format!(
            "pod {name} is not this migration's (migration {} is committed, its checkpoint parked in the holder pod): something else created it, maybe the StatefulSet after the admission policy {} was deleted. Delete it (`kubectl delete pod -n {} {name}`), then `kubectl migrate resume -n {} {name}` restores the parked app",
            progress.id,
            guard::name(&progress.id),
            connection.namespace,
            connection.namespace
        )));
    }
    let uid = source.metadata.uid.clone().unwrap_or_default();
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
        match retry(|| async { pods.delete(name, &DeleteParams::default()).await.map(drop) }).await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => {
                return Err(after(format!(
                    "cannot delete the source pod {name}: {error}; it is frozen and committed (never resume it): `kubectl migrate resume -n {} {name}` goes on",
                    connection.namespace
                )));
            }
        }
    }
    let gone = tokio::time::timeout(
        SOURCE_GONE_PATIENCE,
        await_condition(pods.clone(), name, conditions::is_deleted(&uid)),
    )
    .await;
    if !matches!(gone, Ok(Ok(_))) {
        return Err(after(format!(
            "the source pod {name} was deleted but is not gone after {} s (is its node's kubelet running?); once it is, `kubectl migrate resume -n {} {name}` goes on",
            SOURCE_GONE_PATIENCE.as_secs(),
            connection.namespace
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
    guard::install(client, namespace, &name, id, successor)
        .await
        .map_err(|e| MigrateError::AfterCommit {
            what: format!(
                "{e}; the checkpoint stays parked: `kubectl migrate resume -n {namespace} {name}` goes on"
            ),
        })?;
    match retry(|| async { pods.create(&PostParams::default(), successor).await }).await {
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
        loop {
            match pods.create(&dry_run, &denied).await {
                Err(kube::Error::Api(status)) if status.message.contains(&guard) => {
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "the admission policy is in force"
                    );
                    return Ok(());
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
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
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
            retry(|| async {
                bindings
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(drop)
            })
            .await,
            retry(|| async {
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
