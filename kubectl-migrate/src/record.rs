//! What a migration records on its pods, in one place: the annotations' readers (phase,
//! role, commit, peer, restart counts at the freeze), the guarded writes that claim a pod and
//! move its phase (one migration per pod; of two racing writers exactly one wins), and the
//! list of migrations in flight that `status`, the preflight and the recovery commands read.
//! A leaf: it knows the pods and the annotation keys, nothing of the pipeline's steps.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use migrate_format::annotations;

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Pod annotation `key`, if set.
pub fn note<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

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

/// Whether `pod` records migration `id` as committed: its phase is `committed`, or already
/// `done-kept` (finished with `--keep-source`), with this id.
pub fn is_committed(pod: &Pod, id: &str) -> bool {
    let notes = pod.metadata.annotations.as_ref();
    let note = |key: &str| notes.and_then(|a| a.get(key)).map(String::as_str);
    matches!(note(annotations::PHASE), Some("committed" | "done-kept"))
        && note(annotations::MIGRATION_ID) == Some(id)
}

/// Each container's restart count (app and init containers).
pub fn restart_counts(pod: &Pod) -> BTreeMap<String, i32> {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            status
                .and_then(|s| s.init_container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .map(|c| (c.name.clone(), c.restart_count))
        .collect()
}

/// The source's restart counts recorded at the freeze ([`annotations::RESTARTS_AT_FREEZE`]).
pub fn restarts_at_freeze(source: &Pod) -> Option<BTreeMap<String, i32>> {
    let notes = source.metadata.annotations.as_ref()?;
    serde_json::from_str(notes.get(annotations::RESTARTS_AT_FREEZE)?).ok()
}

/// The pod a migration's source records as its target (or a target as its source).
pub fn peer_of(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(annotations::PEER)
        .cloned()
}

/// The migrated containers of `source` that restarted since the freeze (their app started
/// fresh: the state at the freeze is gone from them); `None` when no freeze was recorded.
pub fn restarted_since_freeze(source: &Pod) -> Option<Vec<String>> {
    let before = restarts_at_freeze(source)?;
    let now = restart_counts(source);
    Some(
        crate::rewrite::migrated_containers(source)
            .into_iter()
            .filter(|c| matches!((before.get(c), now.get(c)), (Some(b), Some(n)) if n > b))
            .collect(),
    )
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
pub(crate) type Extra<'a> = &'a (dyn Fn(&Pod) -> serde_json::Map<String, serde_json::Value> + Sync);

/// No annotations beyond the phase and the id.
fn nothing(_: &Pod) -> serde_json::Map<String, serde_json::Value> {
    serde_json::Map::new()
}

/// [`claim`], writing `extra`'s annotations in the same guarded write.
pub(crate) async fn claim_with(
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
fn phase_in_flight(phase: &str, waiting: bool) -> bool {
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
            if same_migration || !phase_in_flight(phase, waiting) {
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

/// Records the commit of migration `id` after the fact, when its source lost the app and the
/// target holds the only copy (`migrate::forward_if_the_source_lost_it`): from any phase of
/// that migration short of its end, `aborting` included (an undo that found the source
/// restarted), but never over another migration's record or an undone one.
///
/// # Errors
/// [`Claim::Taken`]; [`Claim::Api`].
pub async fn commit_forward(pods: &Api<Pod>, source: &str, id: &str) -> Result<(), Claim> {
    guarded_write(
        pods,
        source,
        id,
        "committed",
        &nothing,
        |_, phase, same_migration| {
            if same_migration
                && matches!(
                    phase,
                    "claimed" | "creating-target" | "checkpointing" | "aborting" | "committed"
                )
            {
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

/// A migration that started and did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub id: String,
    pub source: String,
    /// The target pod, if it still exists.
    pub target: Option<String>,
    /// The last phase the source records (`checkpointing`, `committed`), or `target-created`
    /// when the plugin stopped before touching the source.
    pub phase: String,
    pub committed: bool,
    /// Seconds since the target pod was created.
    pub age_seconds: Option<i64>,
}

impl InFlight {
    /// The command that clears it.
    pub fn next_step(&self) -> String {
        if self.committed {
            format!("kubectl migrate resume {}", self.source)
        } else {
            format!("kubectl migrate abort {}", self.source)
        }
    }
}

/// Every unfinished migration in `namespace` that involves `pod` (as source or target), or all
/// of them. A target that still waits for its checkpoint is one; so is a source whose phase
/// says a checkpoint or a commit happened without the migration being done.
///
/// # Errors
/// The API error when the pods cannot be listed.
pub async fn in_flight_migrations(
    client: &kube::Client,
    namespace: &str,
    pod: Option<&str>,
) -> Result<Vec<InFlight>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let all = pods.list(&ListParams::default()).await?.items;
    let by_name: BTreeMap<String, &Pod> = all.iter().map(|p| (name(p), p)).collect();
    let mut found: BTreeMap<String, InFlight> = BTreeMap::new();
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    // Targets still waiting for their checkpoint, and targets of a ReplicaSet's pod whose
    // handoff has not finished (their app runs; the source may be gone already).
    // A StatefulSet pod's move is found by its holder (the successor, which has the source's
    // name, is not a migration of its own).
    for target in all.iter().filter(|p| {
        (note(p, annotations::WAIT_FOR_CHECKPOINT) == Some("true")
            || note(p, annotations::PHASE) == Some("handing-off"))
            && p.metadata.deletion_timestamp.is_none()
            && !is_successor(p)
    }) {
        let (Some(id), Some(source)) = (
            note(target, annotations::MIGRATION_ID),
            note(target, annotations::PEER),
        ) else {
            continue;
        };
        let source_pod = by_name
            .get(source)
            .filter(|s| s.metadata.deletion_timestamp.is_none());
        // A holder that recorded the commit holds the app once the source is gone.
        let holder_committed =
            is_holder(target) && note(target, annotations::PHASE) == Some("committed");
        let phase = match source_pod {
            _ if holder_committed => "committed",
            None => "source-deleted",
            Some(s) => Some(s)
                .filter(|s| note(s, annotations::MIGRATION_ID) == Some(id))
                .and_then(|s| note(s, annotations::PHASE))
                .unwrap_or("target-created"),
        }
        .to_string();
        let age_seconds = target
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| now - t.0.as_second());
        found.insert(
            id.to_string(),
            InFlight {
                id: id.to_string(),
                source: source.to_string(),
                target: Some(name(target)),
                // With the source gone the target holds the only copy: only finishing is
                // safe. Not so for a holder: its checkpoint counts only once committed (a
                // source that resumed by its lease, then went, left a stale one).
                committed: holder_committed
                    || if is_holder(target) {
                        source_pod.is_some_and(|s| is_committed(s, id))
                    } else {
                        source_pod.is_none_or(|s| is_committed(s, id))
                    },
                phase,
                age_seconds,
            },
        );
    }
    // Sources frozen or committed whose target is gone or already finished.
    for source in &all {
        let (Some(id), Some(phase)) = (
            note(source, annotations::MIGRATION_ID),
            note(source, annotations::PHASE),
        ) else {
            continue;
        };
        // `claimed` and `creating-target`: a plugin that stopped before its target ran still
        // holds the pod's claim, which keeps every other migration off it until aborted.
        if !matches!(
            phase,
            "claimed" | "creating-target" | "checkpointing" | "committed" | "aborting"
        ) || found.contains_key(id)
        {
            continue;
        }
        if source.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // The pod the source names, only if it is this migration's: the name is recorded
        // before the create, and may be someone else's pod (a taken name, a create that
        // never happened).
        let target = note(source, annotations::PEER)
            .filter(|t| {
                by_name.get(*t).is_some_and(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && note(p, annotations::MIGRATION_ID) == Some(id)
                })
            })
            .map(str::to_string);
        // A committed migration whose target finished (no longer waiting) and whose source
        // remains: the source's delete is what is left.
        found.insert(
            id.to_string(),
            InFlight {
                id: id.to_string(),
                source: name(source),
                target,
                phase: phase.to_string(),
                committed: is_committed(source, id),
                age_seconds: None,
            },
        );
    }
    Ok(found
        .into_values()
        .filter(|m| pod.is_none_or(|p| m.source == p || m.target.as_deref() == Some(p)))
        .collect())
}
