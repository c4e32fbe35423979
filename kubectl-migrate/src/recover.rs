//! Recovery from a migration that did not finish -- the plugin killed, a laptop gone to sleep,
//! a connection dropped: `kubectl migrate status [POD]` lists them from the annotations the
//! pipeline writes on both pods; `abort POD` undoes one that is not committed; `resume POD`
//! finishes one that is.
//!
//! Both run the very steps the pipeline runs ([`migrate::undo`] before the commit point,
//! [`migrate::finish`] after it), each of which tolerates having been done already (a deleted
//! pod, a thawed app, a resumed source), so they are safe to run twice or concurrently. The
//! commit record on the source pod decides which of the two is allowed: never both.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use migrate_format::{LauncherState, annotations};

use crate::client::Connection;
use crate::launchers::Launchers;
use crate::migrate::{self, Options, Progress};
pub use crate::record::InFlight;

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("cannot read the pods")]
    Api(#[source] kube::Error),
    #[error(
        "the migration {id} of pod {pod} is committed: its target {target} holds the app's state, so it cannot be aborted; finish it with `kubectl migrate resume {pod}`"
    )]
    Committed {
        id: String,
        pod: String,
        target: String,
    },
    #[error(
        "the migration {id} of pod {pod} is not committed, so the source still holds the app; undo it with `kubectl migrate abort {pod}`"
    )]
    NotCommitted { id: String, pod: String },
    #[error(
        "the target of the committed migration {id} is gone; the source {pod} still holds the app as it was frozen at the cut (what the target did since is lost): resume it with `kubectl migrate resume --from-source {pod}`"
    )]
    TargetGone { id: String, pod: String },
    #[error(
        "pod {pod} now records {phase} phase, not migration {id}: its target {target} is a leftover of that one. Delete it with `kubectl delete pod {target}` (the source is not touched)"
    )]
    Superseded {
        id: String,
        pod: String,
        phase: String,
        target: String,
    },
    #[error("cannot go back to the source pod {pod}: {why}")]
    FromSource { pod: String, why: String },
    #[error("finishing the migration failed: {0}")]
    Finish(Box<crate::migrate::MigrateError>),
    #[error(
        "the target {target} already runs the app (container {container} is {state}); aborting would delete the running copy. Check `kubectl migrate status`, and delete the pod you do not want by hand"
    )]
    TargetRuns {
        target: String,
        container: String,
        state: String,
    },
    #[error(
        "cannot tell whether the target {target} runs the app (container {container}: {error}); aborting could delete the running copy. Check it, then delete the target or the source by hand"
    )]
    TargetUnknown {
        target: String,
        container: String,
        error: crate::launchers::LauncherError,
    },
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Every unfinished migration in `namespace` that involves `pod` (as source or target), or all
/// of them ([`crate::record::in_flight_migrations`]). An uncommitted one whose source's
/// launchers say its freeze ended without a commit is marked
/// [`InFlight::freeze_ended`]: it can never finish, only its leftovers remain.
///
/// # Errors
/// [`RecoverError::Api`] when the pods cannot be listed.
pub async fn list<L: Launchers + Sync>(
    client: &kube::Client,
    namespace: &str,
    pod: Option<&str>,
    launchers: &L,
) -> Result<Vec<InFlight>, RecoverError> {
    let mut found = crate::record::in_flight_migrations(client, namespace, pod)
        .await
        .map_err(RecoverError::Api)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for m in found.iter_mut().filter(|m| !m.committed) {
        let Ok(Some(source)) = pods.get_opt(&m.source).await else {
            continue;
        };
        let mut statuses = Vec::new();
        for container in crate::rewrite::migrated_containers(&source) {
            match launchers.status(&source, &container).await {
                Ok(status) => statuses.push(status),
                // Unreadable: nothing is proven.
                Err(_) => {
                    statuses.clear();
                    break;
                }
            }
        }
        m.freeze_ended = crate::record::freeze_ended(&m.id, &statuses.iter().collect::<Vec<_>>());
    }
    Ok(found)
}

/// Undoes the unfinished, uncommitted migration of `pod`: deletes its target and resumes the
/// source's frozen app. Returns what was done ("nothing to abort" when none is in flight).
///
/// # Errors
/// [`RecoverError::Committed`] for a committed migration (see [`resume`]).
pub async fn abort<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    pod: &str,
) -> Result<migrate::Aftermath, RecoverError> {
    abort_migration(connection, launchers, pod, None).await
}

/// [`abort`], of migration `id` only when given (the controller knows which one it ran).
///
/// # Errors
/// As [`abort`].
pub async fn abort_migration<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    pod: &str,
    id: Option<&str>,
) -> Result<migrate::Aftermath, RecoverError> {
    let Some((found, target)) = unfinished(connection, pod, id).await? else {
        return Ok(migrate::Aftermath::Untouched {
            text: format!("no unfinished migration of pod {pod}: nothing to abort"),
        });
    };
    if found.committed {
        return Err(RecoverError::Committed {
            id: found.id,
            target: found.target.unwrap_or_default(),
            pod: found.source,
        });
    }
    // Never delete the last copy: a source restarted since the freeze lost the app (its
    // liveness probe failed on the frozen app, an OOM kill), and a target that restored it
    // holds the only one. Then the migration goes forward instead: committed, and finished.
    if let Some(forward) = Box::pin(migrate::forward_if_the_source_lost_it(
        connection,
        launchers,
        &found.source,
        &found.id,
        target.as_ref(),
    ))
    .await
    {
        return Ok(forward);
    }
    // Settle the race with a plugin that may still be running: the source's phase moves to
    // `aborting` only if no commit landed first (and a commit cannot land after it).
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    match migrate::claim(&pods, &found.source, &found.id, migrate::Phase::Aborting).await {
        Ok(()) => {}
        Err(migrate::Claim::Taken {
            phase: Some(phase),
            by: None,
        }) if phase.committed() => {
            return Err(RecoverError::Committed {
                id: found.id,
                target: found.target.unwrap_or_default(),
                pod: found.source,
            });
        }
        // An earlier abort, or an undo, got there: going on is idempotent.
        Err(migrate::Claim::Taken {
            phase: Some(migrate::Phase::Aborting | migrate::Phase::Failed),
            by: None,
        }) => {}
        Err(migrate::Claim::Taken { phase, by }) => {
            return Err(RecoverError::Superseded {
                id: found.id,
                pod: found.source,
                phase: migrate::Claim::phase_text(phase, by.as_deref()),
                target: found.target.unwrap_or_default(),
            });
        }
        Err(migrate::Claim::Api(kube::Error::Api(status))) if status.is_not_found() => {}
        Err(migrate::Claim::Api(error)) => return Err(RecoverError::Api(error)),
    }
    // Never delete a target that runs the app: only a waiting, restoring or still frozen one.
    if let Some(pod) = &target {
        let name = name(pod);
        for container in crate::rewrite::migrated_containers(pod) {
            match launchers.status(pod, &container).await {
                Ok(status)
                    if matches!(
                        status.state,
                        LauncherState::Running | LauncherState::Restored
                    ) && !status.app_stopped =>
                {
                    return Err(RecoverError::TargetRuns {
                        target: name,
                        container,
                        state: format!("{:?}", status.state).to_lowercase(),
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(RecoverError::TargetUnknown {
                        target: name,
                        container,
                        error,
                    });
                }
            }
        }
    }
    let source = pods.get_opt(&found.source).await.ok().flatten();
    let progress = Progress {
        id: found.id.clone(),
        plan: migrate::Plan::recorded(target.as_ref(), source.as_ref()),
        target,
        transfer_started: true,
        claimed: true,
        ..Progress::default()
    };
    let options = options_for(&found.source, "");
    Ok(Box::pin(migrate::undo(
        connection,
        launchers,
        &options,
        &progress,
        &migrate::MigrateError::Aborted,
    ))
    .await)
}

/// How long `resume` (and the controller's recovery, which runs it) may take to finish.
const RESUME_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// Finishes the committed migration of `pod`: thaws its target, ends its wait for a
/// checkpoint, deletes the source. Returns what was done ("nothing to resume" when none is in
/// flight).
///
/// # Errors
/// [`RecoverError::NotCommitted`] for an uncommitted one (see [`abort`]);
/// [`RecoverError::TargetGone`]; [`RecoverError::Finish`] when a step keeps failing.
pub async fn resume<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    pod: &str,
) -> Result<String, RecoverError> {
    resume_migration(connection, launchers, pod, None).await
}

/// [`resume`], of migration `id` only when given (the controller knows which one it ran).
///
/// # Errors
/// As [`resume`].
pub async fn resume_migration<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    pod: &str,
    id: Option<&str>,
) -> Result<String, RecoverError> {
    let Some((found, target)) = committed_in_flight(connection, pod, id).await? else {
        return Ok(format!(
            "no unfinished migration of pod {pod}: nothing to resume"
        ));
    };
    let Some(target) = target else {
        return Err(RecoverError::TargetGone {
            id: found.id,
            pod: found.source,
        });
    };
    let node = target
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let mut progress = Progress {
        id: found.id.clone(),
        plan: migrate::Plan::recorded(Some(&target), None),
        containers: crate::rewrite::migrated_containers(&target),
        target: Some(target),
        transfer_started: true,
        committed: true,
        claimed: true,
        ..Progress::default()
    };
    let options = options_for(&found.source, &node);
    // A post-copy migration finishes in its own order (thaw, every page, then the source's
    // deletion): the recorded plan says so, and so do its launchers. One that cannot be asked
    // is taken as post-copy: thawing before the deletion is the order that never cuts an app
    // off its memory, and a post-copy target that lost its app fails there, keeping the source.
    if progress.plan.variant != migrate::Variant::StatefulSet {
        for container in &progress.containers {
            let target = progress.target.as_ref().expect("set above");
            progress.plan.post_copy |= launchers
                .status(target, container)
                .await
                .map_or(true, |status| status.post_copy.is_some());
        }
    }
    let stateful = progress.plan.variant == migrate::Variant::StatefulSet;
    // Bounded: a step that never ends (a successor stuck in ContainerCreating, a thaw that
    // never answers) is reported, and running this again goes on from where it stopped.
    let finished = tokio::time::timeout(
        RESUME_DEADLINE,
        Box::pin(migrate::finish(connection, launchers, &options, &progress)),
    )
    .await
    .map_err(|_| {
        RecoverError::Finish(Box::new(migrate::MigrateError::Deadline {
            phase: "finishing (kubectl migrate resume; run it again, it goes on from there)".into(),
            timeout: RESUME_DEADLINE,
        }))
    })?
    .map_err(|e| RecoverError::Finish(Box::new(e)))?;
    let mut text = if stateful {
        format!(
            "finished migration {}: pod {} runs the app on node {node}, restored from the checkpoint parked in {}",
            found.id,
            found.source,
            found.target.unwrap_or_default()
        )
    } else {
        format!(
            "finished migration {}: pod {} runs the app on node {node}; the source pod {} was deleted",
            found.id,
            found.target.unwrap_or_default(),
            found.source
        )
    };
    for warning in finished.warnings {
        text.push_str(&format!("; warning: {warning}"));
    }
    Ok(text)
}

/// Goes back to the source of a committed migration whose target lost the app
/// (`kubectl migrate resume --from-source POD`): only when the target provably holds no copy
/// of it -- the pod is gone, or every migrated container's launcher waits for a checkpoint,
/// failed its restore or runs the app fresh -- and the source still does (its containers
/// frozen by this migration and not restarted since the freeze). Then the target is deleted
/// and waited for, and the source's app resumed (`rollback --committed`): what the app did on
/// the target since the thaw is lost, its state at the freeze is not.
///
/// # Errors
/// [`RecoverError::FromSource`] saying which condition does not hold and what to do instead.
pub async fn resume_from_source<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    pod: &str,
) -> Result<String, RecoverError> {
    let refuse = |why: String| RecoverError::FromSource {
        pod: pod.into(),
        why,
    };
    let Some((found, target)) = committed_in_flight(connection, pod, None).await? else {
        return Ok(format!(
            "no unfinished migration of pod {pod}: nothing to resume"
        ));
    };
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let source = pods
        .get_opt(&found.source)
        .await
        .map_err(RecoverError::Api)?
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .ok_or_else(|| refuse(format!("the source pod {} is gone", found.source)))?;
    // A StatefulSet pod's move whose holder is there finishes from it (`resume`); with the
    // holder gone, the source is the only copy and going back to it is the way (its successor
    // cannot exist while it does), the guard going with it.
    let stateful = migrate::Plan::recorded(target.as_ref(), Some(&source)).variant
        == migrate::Variant::StatefulSet;
    if stateful && target.is_some() {
        return Err(refuse(
            "a StatefulSet pod's move keeps its checkpoint in the holder pod: finish it with `kubectl migrate resume`".into(),
        ));
    }
    // The source must still hold the app: frozen by this migration, never restarted since.
    let restarted = migrate::restarted_since_freeze(&source).unwrap_or_default();
    if !restarted.is_empty() {
        return Err(refuse(format!(
            "container(s) {} of the source pod {} restarted after the freeze: its copy of the app is gone too",
            restarted.join(", "),
            found.source
        )));
    }
    let containers = crate::rewrite::migrated_containers(&source);
    for container in &containers {
        let status = launchers.status(&source, container).await.map_err(|e| {
            refuse(format!(
                "the source's container {container} cannot be asked: {e}"
            ))
        })?;
        if !(status.committed && status.app_stopped) {
            return Err(refuse(format!(
                "the source's container {container} holds no frozen copy of the app (its launcher is {:?})",
                status.state
            )));
        }
    }
    // The target must provably hold none. A target being deleted (not listed as in flight) is
    // looked up by the name the source records, and waited for: until it is gone, its app
    // may still run through its grace period.
    let target = match target {
        Some(target) => Some(target),
        None => match migrate::peer_of(&source) {
            Some(name) => pods
                .get_opt(&name)
                .await
                .map_err(RecoverError::Api)?
                .filter(|t| crate::record::note(t, annotations::MIGRATION_ID) == Some(&found.id)),
            None => None,
        },
    };
    if let Some(target) = target
        .as_ref()
        .filter(|t| t.metadata.deletion_timestamp.is_some())
    {
        wait_deleted(&pods, target).await.map_err(refuse)?;
    }
    if let Some(target) = target
        .as_ref()
        .filter(|t| t.metadata.deletion_timestamp.is_none())
    {
        let name = name(target);
        for container in crate::rewrite::migrated_containers(target) {
            match launchers.status(target, &container).await {
                Ok(status)
                    if matches!(
                        status.state,
                        LauncherState::Waiting | LauncherState::Failed | LauncherState::Running
                    ) => {}
                Ok(status) => {
                    return Err(refuse(format!(
                        "the target pod {name} may hold the app (container {container} is {:?}): finish the migration with `kubectl migrate resume {pod}`",
                        status.state
                    )));
                }
                Err(error) => {
                    return Err(refuse(format!(
                        "the target pod {name} cannot be asked whether it holds the app (container {container}: {error}); try again once it answers"
                    )));
                }
            }
        }
        match pods
            .delete(&name, &kube::api::DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => return Err(RecoverError::Api(error)),
        }
        wait_deleted(&pods, target).await.map_err(refuse)?;
    }
    for container in &containers {
        migrate::rollback_when_idle(launchers, &source, container, true)
            .await
            .map_err(|e| {
                refuse(format!(
                    "resuming the source's container {container} failed: {e}; run this again"
                ))
            })?;
    }
    if stateful
        && let Err(error) = migrate::identity::guard::remove(&connection.client, &found.id).await
    {
        return Err(refuse(format!(
            "pod {} runs the app again, but this migration's admission policy could not be deleted ({error}); until it is, the StatefulSet cannot recreate the pod: kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {}",
            found.source,
            migrate::identity::guard::name(&found.id)
        )));
    }
    // The record goes back from `committed`, so that `status` no longer lists a migration
    // whose source runs (not through `settle`, which never overwrites a commit).
    if let Err(error) = migrate::claim_back(&pods, &found.source, &found.id).await {
        return Err(refuse(format!(
            "pod {} runs the app again, but its record still says committed ({error:?}): `kubectl annotate pod {} {}=failed --overwrite`",
            found.source,
            found.source,
            annotations::PHASE
        )));
    }
    Ok(format!(
        "went back to the source of migration {}: {}pod {} runs the app again as it was frozen (what it did on the target since the thaw is lost)",
        found.id,
        found
            .target
            .map(|t| format!("deleted the target pod {t}, which held no copy of the app; "))
            .unwrap_or_default(),
        found.source
    ))
}

/// The unfinished migration of `pod` for `resume`, which must be committed.
///
/// # Errors
/// [`RecoverError::NotCommitted`] when it is not (then `abort` is the command).
async fn committed_in_flight(
    connection: &Connection,
    pod: &str,
    id: Option<&str>,
) -> Result<Option<(InFlight, Option<Pod>)>, RecoverError> {
    match unfinished(connection, pod, id).await? {
        Some((found, _)) if !found.committed => Err(RecoverError::NotCommitted {
            id: found.id,
            pod: found.source,
        }),
        other => Ok(other),
    }
}

/// Waits until pod `target` (this very pod, by uid) is gone, for up to two minutes.
async fn wait_deleted(pods: &Api<Pod>, target: &Pod) -> Result<(), String> {
    let name = name(target);
    crate::wait::gone(pods, target, std::time::Duration::from_secs(120))
        .await
        .map_err(|_| format!("the target pod {name} was not gone within 2 minutes; run this again"))
}

/// The unfinished migration of `pod` (as source or target; migration `id` if given), with its
/// target pod if it exists.
async fn unfinished(
    connection: &Connection,
    pod: &str,
    id: Option<&str>,
) -> Result<Option<(InFlight, Option<Pod>)>, RecoverError> {
    let Some(found) =
        crate::record::in_flight_migrations(&connection.client, &connection.namespace, Some(pod))
            .await
            .map_err(RecoverError::Api)?
            .into_iter()
            .find(|found| id.is_none_or(|id| found.id == id))
    else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let target = match &found.target {
        Some(t) => pods.get_opt(t).await.map_err(RecoverError::Api)?,
        None => None,
    };
    Ok(Some((found, target)))
}

/// The options the undo and finish steps read: the source's name and the target's node.
fn options_for(source: &str, node: &str) -> Options {
    Options {
        pod: source.into(),
        target_node: node.into(),
        ..Options::recovery()
    }
}
