//! Step 6, past the commit: finish (delete the stale source, thaw the targets, end their wait
//! for a checkpoint, let them take Service traffic), idempotently; after a failure past the
//! commit, finish anyway or say exactly what finishes. Nothing here ever undoes.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use migrate_format::annotations;

use super::thaw::{Finished, end_wait, mark_serving, thaw_all};
use super::{
    Aftermath, MigrateError, Options, Progress, Variant, annotate, fault, handoff, identity, record,
};
use crate::client::Connection;
use crate::launchers::Launchers;
use crate::retry;

/// Finishes a committed migration, idempotently (it runs again after a failure or an
/// interruption past the commit), whatever its variant; the steps are the same, in the order
/// each variant needs:
/// 1. **the app's new pod**: the target, restored and frozen. A StatefulSet's pod has its
///    successor instead, which can exist only once the source is gone
///    ([`identity::restore_successor`]: the holder records the commit, the source is deleted
///    and waited for, the successor created and restored from the parked checkpoint).
/// 2. **thaw** every container there. A thaw that works, on an app restored there, proves the
///    new pod holds the app; a target that lost it keeps the source, the way back
///    (`lost_or_failed`). With `--lazy`, every page of its memory must arrive first.
/// 3. **the source goes** (its frozen copy is stale; should its container restart meanwhile,
///    its launcher does not start the app again); with `--keep-source` it is kept, frozen. A
///    ReplicaSet's pod is first made Ready and handed to the ReplicaSet ([`handoff`]), so it
///    never starts a fresh replica.
/// 4. **the new pod serves**: its wait for a checkpoint ends, it is marked Ready and done; a
///    StatefulSet's holder and guard go ([`identity::clean_up`]).
///
/// # Errors
/// [`MigrateError::AfterCommit`] naming the step that kept failing; nothing is undone. A
/// source that cannot be deleted does not keep the target frozen: it is thawed all the same,
/// and the error then names the delete.
pub async fn finish<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
) -> Result<Finished, MigrateError> {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let variant = progress.plan.variant;
    let mut finished = Finished::default();
    // 1. The app's new pod.
    let target = match variant {
        // Boxed, as every call into a whole finish or undo is: their futures nest (an undo can
        // go forward into a finish) and would otherwise grow past a thread's stack.
        Variant::StatefulSet => {
            Box::pin(identity::restore_successor(
                connection,
                launchers,
                options,
                progress,
                &mut finished,
            ))
            .await?
        }
        Variant::Plain | Variant::Handoff => progress.target.clone().unwrap_or_default(),
    };
    let target_name = target.metadata.name.clone().unwrap_or_default();
    let containers = match variant {
        Variant::StatefulSet => crate::rewrite::migrated_containers(&target),
        Variant::Plain | Variant::Handoff => progress.containers.clone(),
    };
    // 2. Thaw, before anything happens to a source that is still there.
    if let Err(error) = thaw_all(launchers, &containers, &target, &mut finished).await {
        return Err(match variant {
            // Its source is gone already; the holder keeps the parked checkpoint, and a
            // `resume` restores a successor that lost its app from it again.
            Variant::StatefulSet => identity::thaw_failed(error, connection, &target_name),
            Variant::Plain | Variant::Handoff => {
                lost_or_failed(error, &pods, options, &target_name).await
            }
        });
    }
    if progress.plan.post_copy {
        for container in &containers {
            let done = launchers
                .complete_post_copy(&target, container)
                .await
                .map_err(|error| MigrateError::AfterCommit {
                    what: format!(
                        "cannot learn whether every page of container {container}'s memory arrived in pod {target_name}: {error}; the source pod {} is kept: delete it once `kubectl exec {target_name} -c {container} -- restore-launcher status` says post_copy complete",
                        options.pod
                    ),
                })?;
            if let Some(done) = done {
                if done.arrived.state != migrate_format::PostCopyState::Complete {
                    return Err(MigrateError::PostCopyFailed {
                        what: format!(
                            "post-copy failed: not every page of container {container}'s memory reached pod {target_name} ({}). Its launcher killed the app there (it cannot run without the rest of its memory). The source pod {} still holds the app, frozen as it was at the freeze (what the target did since the thaw is lost). To go back to it: kubectl delete pod {target_name} --wait && kubectl exec {} -c {container} -- restore-launcher rollback --committed",
                            done.arrived.error.as_deref().unwrap_or("no reason given"),
                            options.pod,
                            options.pod
                        ),
                    });
                }
                finished.post_copy.push(done);
            }
        }
    }
    // 3. The source goes (a StatefulSet's went in step 1). A ReplicaSet's pod is handed to it
    // first, which needs its app running and the pod Ready.
    let deleted = match variant {
        Variant::StatefulSet => Ok(()),
        Variant::Handoff => {
            // The app runs: a restarted container must start it fresh from now on. The same
            // write marks the target `handing-off`, by which `kubectl migrate status` finds an
            // interrupted handoff once the source is gone (the ReplicaSet may delete it
            // itself). Then Ready (the gate), which the handoff waits for.
            finished
                .warnings
                .extend(end_wait(&pods, &target_name, Some(super::Phase::HandingOff)).await);
            mark_serving(&pods, &target_name, &mut finished).await;
            let replica_sets = Api::namespaced(connection.client.clone(), &connection.namespace);
            handoff::hand_off(
                &pods,
                &replica_sets,
                &connection.namespace,
                &options.pod,
                &target_name,
            )
            .await
            .map_err(|what| MigrateError::AfterCommit { what })?;
            fault::stage("handed-off");
            let deleted = delete_source(
                connection,
                &pods,
                options,
                progress,
                &target_name,
                &mut finished,
            )
            .await;
            if deleted.is_ok()
                && let Err(warning) = retry::by(retry::finishing(), || {
                    handoff::drop_deletion_cost(&pods, &target_name)
                })
                .await
            {
                finished.warnings.push(warning);
            }
            deleted
        }
        Variant::Plain => {
            delete_source(
                connection,
                &pods,
                options,
                progress,
                &target_name,
                &mut finished,
            )
            .await
        }
    };
    // 4. The new pod serves, and is done.
    match variant {
        Variant::StatefulSet => {
            finished
                .warnings
                .extend(end_wait(&pods, &target_name, Some(super::Phase::Done)).await);
            mark_serving(&pods, &target_name, &mut finished).await;
            identity::clean_up(connection, &target, &mut finished).await;
        }
        Variant::Plain | Variant::Handoff => {
            if variant == Variant::Plain {
                finished
                    .warnings
                    .extend(end_wait(&pods, &target_name, None).await);
                mark_serving(&pods, &target_name, &mut finished).await;
            }
            annotate(
                &pods,
                &target_name,
                &progress.id,
                super::Phase::Done,
                Some(&options.pod),
            )
            .await;
        }
    }
    deleted.map_err(|error| MigrateError::AfterCommit {
        what: format!("cannot delete the source pod {}: {error}", options.pod),
    })?;
    finished.source_deleted = finished.source_deleted || !options.keep_source;
    Ok(finished)
}

/// Step 3 of [`finish`] for a bare or ReplicaSet pod: deletes the source (the event on it says
/// where the app went), or with `--keep-source` records it as kept, frozen, for good.
async fn delete_source(
    connection: &Connection,
    pods: &Api<Pod>,
    options: &Options,
    progress: &Progress,
    target_name: &str,
    finished: &mut Finished,
) -> Result<(), String> {
    let deleted = if options.keep_source {
        annotate(
            pods,
            &options.pod,
            &progress.id,
            super::Phase::DoneKept,
            Some(target_name),
        )
        .await;
        Ok(())
    } else {
        if let Ok(source) = pods.get(&options.pod).await {
            record(
                connection,
                &source,
                "MigrationDone",
                format!(
                    "moved to {target_name} on {}; deleting this pod",
                    options.target_node
                ),
            )
            .await;
        }
        finished.source_deleted_at_ms = Some(migrate_format::unix_ms());
        retry::by(retry::finishing(), || async {
            match pods.delete(&options.pod, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await
    };
    fault::stage("source-deleted");
    deleted
}

/// A thaw refused because the target has no restored app (its launcher waits for a checkpoint
/// again, failed, or runs the app fresh: its container restarted after the restore) means the
/// target lost the app: the source, which [`finish`] has not touched, is the way back.
async fn lost_or_failed(
    error: MigrateError,
    pods: &Api<Pod>,
    options: &Options,
    target_name: &str,
) -> MigrateError {
    match error {
        MigrateError::ThawRefused { container, error }
            if error.refusal() == Some(migrate_format::Refusal::WrongState) =>
        {
            let source = &options.pod;
            let source_there = pods
                .get_opt(source)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none());
            let way_back = if source_there {
                format!(
                    "The source pod {source} was not deleted and holds the app as it was frozen (unless its own container restarted since): go back to it with `kubectl migrate resume --from-source {source}`"
                )
            } else {
                format!(
                    "The source pod {source} is gone too, so the app's state is lost: delete pod {target_name} (it waits for a checkpoint that will not come) and start the app again"
                )
            };
            MigrateError::TargetLost {
                what: format!(
                    "the target pod {target_name} lost the app: container {container} {error}. {way_back}"
                ),
            }
        }
        MigrateError::ThawRefused { container, error } => MigrateError::AfterCommit {
            what: format!("cannot thaw container {container} of pod {target_name}: {error}"),
        },
        other => other,
    }
}

/// After a failure past the commit point: nothing is undone. Finishes the migration if it
/// can (within a minute), else says what holds the app and the commands that finish it.
pub(super) async fn after_commit<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
    error: &MigrateError,
) -> Aftermath {
    let target = progress
        .target
        .as_ref()
        .and_then(|t| t.metadata.name.clone())
        .unwrap_or_default();
    let ns = &connection.namespace;
    // The error names the way back to the source: finishing would delete it.
    if matches!(
        error,
        MigrateError::PostCopyFailed { .. } | MigrateError::TargetLost { .. }
    ) {
        return Aftermath::SourceKept {
            text: format!(
                "nothing was finished: the source pod {} is kept, frozen, holding the app as of the freeze; go back to it with the commands above",
                options.pod
            ),
        };
    }
    let head = format!(
        "the migration was committed before this (the target pod {target} holds the app's state), so nothing was undone"
    );
    let finishing = tokio::time::timeout(
        Duration::from_secs(60),
        Box::pin(finish(connection, launchers, options, progress)),
    )
    .await;
    match finishing {
        Ok(Ok(finished)) => {
            // A StatefulSet's pod runs under its own name (the holder is gone).
            let runs = if progress.plan.variant == Variant::StatefulSet {
                options.pod.clone()
            } else {
                target
            };
            let mut text = format!(
                "{head}; it was finished instead: pod {runs} runs the app on node {}",
                options.target_node
            );
            if finished.source_deleted {
                text.push_str(&format!("; the source pod {} was deleted", options.pod));
            }
            for warning in finished.warnings {
                text.push_str(&format!("; warning: {warning}"));
            }
            Aftermath::Finished { target: runs, text }
        }
        outcome => {
            let why = match outcome {
                Ok(Err(error)) => error.to_string(),
                _ => "finishing took over a minute".into(),
            };
            if progress.plan.variant == Variant::StatefulSet {
                return Aftermath::Stuck {
                    text: identity::stuck(connection, options, progress, &why),
                };
            }
            if progress.plan.post_copy {
                // The source may still hold memory the target lacks: never advise deleting
                // it before the target says every page arrived.
                let c = progress.containers.first().map_or("C", String::as_str);
                return Aftermath::Stuck {
                    text: format!(
                        "{head}; finishing failed too ({why}). With --lazy the source pod {src} is kept, frozen: it may still hold memory the target lacks, so never delete it by hand. When `kubectl exec -n {ns} {target} -c {c} -- restore-launcher status` says post_copy complete, `kubectl migrate resume -n {ns} {src}` finishes; if it says failed, go back: kubectl delete pod -n {ns} {target} --wait && kubectl exec -n {ns} {src} -c {c} -- restore-launcher rollback --committed",
                        src = options.pod
                    ),
                };
            }
            if progress.plan.variant == Variant::Handoff {
                // The source is its controller's pod until the handoff: deleting it by hand
                // would make the controller start a fresh replica beside the restored one.
                return Aftermath::Stuck {
                    text: format!(
                        "{head}; finishing failed too ({why}); the source pod {src} is frozen and holds a stale copy, but it is still its ReplicaSet's pod until the target is handed over: never delete it by hand (a fresh replica would start) and never resume it. `kubectl migrate resume -n {ns} {src}` finishes (thaw, handoff, then the source's deletion)",
                        src = options.pod
                    ),
                };
            }
            let mut commands: Vec<String> = progress
                .containers
                .iter()
                .map(|c| format!("kubectl exec -n {ns} {target} -c {c} -- restore-launcher thaw"))
                .collect();
            commands.push(format!(
                "kubectl annotate pod -n {ns} {target} {}=false --overwrite",
                annotations::WAIT_FOR_CHECKPOINT
            ));
            if !options.keep_source {
                commands.push(format!("kubectl delete pod -n {ns} {}", options.pod));
            }
            Aftermath::Stuck {
                text: format!(
                    "{head}; finishing failed too ({why}); the source pod {} is frozen and holds a stale copy: never resume it. To finish, run: {}",
                    options.pod,
                    commands.join(" ; ")
                ),
            }
        }
    }
}

/// What a restored app sees of its monotonic clocks when the nodes booted at different times
/// (`from` and `to`, seconds since the epoch): CLOCK_MONOTONIC and CLOCK_BOOTTIME are the
/// target kernel's, so they jump by the difference of the two nodes' uptimes. CRIU keeps them
/// continuous only in a time namespace, whose clock offsets need CAP_SYS_TIME (a pod must not
/// have it).
/// Nothing to say for one second or less.
pub fn clock_jump(from: u64, to: u64) -> Option<String> {
    let jump = i128::from(from) - i128::from(to);
    (jump.abs() > 1).then(|| {
        format!(
            "the app's CLOCK_MONOTONIC and CLOCK_BOOTTIME jumped {} by {} s: the target node booted {} s {} the source's, and a restore inside the container cannot keep them continuous (a time namespace's clock offsets need CAP_SYS_TIME). Wall-clock time is unaffected; timers and timeouts the app measures with them fire early or late once",
            if jump > 0 { "forward" } else { "backward" },
            jump.abs(),
            jump.abs(),
            if jump > 0 { "before" } else { "after" }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_jump_is_reported_with_its_direction_and_size() {
        assert_eq!(clock_jump(1_000, 1_000), None);
        assert_eq!(clock_jump(1_001, 1_000), None, "a second of btime rounding");
        let forward = clock_jump(5_000, 1_000).unwrap_or_default();
        assert!(
            forward.contains("jumped forward by 4000 s")
                && forward.contains("booted 4000 s before the source's"),
            "{forward}"
        );
        let backward = clock_jump(1_000, 5_000).unwrap_or_default();
        assert!(backward.contains("jumped backward by 4000 s"), "{backward}");
    }
}
