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

/// A migration's phase, as its pods record it ([`annotations::PHASE`]). The source moves
/// through `claimed`, `creating-target`, `checkpointing`, then `committed` (finished: `done`
/// on the target, or `done-kept` on a source kept with `--keep-source`) or `aborting` and
/// `failed` (undone); a ReplicaSet's target is `handing-off` until its controller owns it. A
/// target is created `restoring`, a StatefulSet pod's holder `parking`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Restoring,
    Parking,
    Claimed,
    CreatingTarget,
    Checkpointing,
    Committed,
    Aborting,
    Failed,
    Done,
    DoneKept,
    HandingOff,
}

impl Phase {
    const ALL: [Phase; 11] = [
        Phase::Restoring,
        Phase::Parking,
        Phase::Claimed,
        Phase::CreatingTarget,
        Phase::Checkpointing,
        Phase::Committed,
        Phase::Aborting,
        Phase::Failed,
        Phase::Done,
        Phase::DoneKept,
        Phase::HandingOff,
    ];

    /// The annotation's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Restoring => "restoring",
            Phase::Parking => "parking",
            Phase::Claimed => "claimed",
            Phase::CreatingTarget => "creating-target",
            Phase::Checkpointing => "checkpointing",
            Phase::Committed => "committed",
            Phase::Aborting => "aborting",
            Phase::Failed => "failed",
            Phase::Done => "done",
            Phase::DoneKept => "done-kept",
            Phase::HandingOff => "handing-off",
        }
    }

    /// The phase an annotation's value names (None for a value this plugin never writes).
    pub fn parse(value: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == value)
    }

    /// The phase `pod` records.
    pub fn of(pod: &Pod) -> Option<Phase> {
        note(pod, annotations::PHASE).and_then(Phase::parse)
    }

    /// Whether a source in this phase records a commit (the target holds the app).
    pub const fn committed(self) -> bool {
        matches!(self, Phase::Committed | Phase::DoneKept)
    }

    /// Whether the migration is settled one way or the other: committed, or being (or
    /// having been) undone. A settled migration's phase never moves on to a later step.
    const fn settled(self) -> bool {
        matches!(
            self,
            Phase::Committed | Phase::DoneKept | Phase::Aborting | Phase::Failed
        )
    }

    /// A source phase of a migration that has not ended (claimed up to committed, or being
    /// aborted).
    pub const fn unfinished(self) -> bool {
        matches!(
            self,
            Phase::Claimed
                | Phase::CreatingTarget
                | Phase::Checkpointing
                | Phase::Committed
                | Phase::Aborting
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `phase`, or `none` when a pod records none this plugin knows.
pub fn phase_text(phase: Option<Phase>) -> &'static str {
    phase.map_or("none", Phase::as_str)
}

/// What a pod is in a StatefulSet pod's move ([`annotations::ROLE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The pod on the target node that keeps the parked checkpoint while the name changes
    /// hands.
    Holder,
    /// The pod that takes the source's name (and the app) on the target node.
    Successor,
}

impl Role {
    /// The annotation's value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Holder => "holder",
            Role::Successor => "successor",
        }
    }

    /// The role `pod` records.
    pub fn of(pod: &Pod) -> Option<Role> {
        let role = note(pod, annotations::ROLE)?;
        [Role::Holder, Role::Successor]
            .into_iter()
            .find(|r| r.as_str() == role)
    }
}

/// Whether `pod` is the holder of a StatefulSet pod's move.
pub fn is_holder(pod: &Pod) -> bool {
    Role::of(pod) == Some(Role::Holder)
}

/// Whether `pod` is the successor of a StatefulSet pod's move.
pub fn is_successor(pod: &Pod) -> bool {
    Role::of(pod) == Some(Role::Successor)
}

/// How a pod moves, decided once from the preflight's facts and recorded on its pods
/// ([`annotations::VARIANT`]); every later step, and every recovery command, reads it instead
/// of deciding again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// A pod no controller owns (or one whose controller the move need not involve): the
    /// target is a new pod, the source is deleted once the target runs the app.
    Plain,
    /// A ReplicaSet's pod: the target is handed to the ReplicaSet (labels, owner) once it is
    /// Ready, before the source goes, so the ReplicaSet never starts a fresh replica.
    Handoff,
    /// A StatefulSet's pod: it keeps its name; the checkpoint is parked in a holder on the
    /// target node while the source goes and its successor (same name) is created.
    StatefulSet,
}

/// The variant, and whether memory moves after the restore (post-copy, `--lazy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub variant: Variant,
    pub post_copy: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            variant: Variant::Plain,
            post_copy: false,
        }
    }
}

impl Plan {
    /// The annotation's value: `plain`, `handoff` or `stateful-set`, with `+post-copy`.
    pub fn as_note(&self) -> String {
        let variant = match self.variant {
            Variant::Plain => "plain",
            Variant::Handoff => "handoff",
            Variant::StatefulSet => "stateful-set",
        };
        if self.post_copy {
            format!("{variant}+post-copy")
        } else {
            variant.to_string()
        }
    }

    /// The plan an annotation's value records.
    pub fn parse(value: &str) -> Option<Plan> {
        let (variant, post_copy) = match value.strip_suffix("+post-copy") {
            Some(variant) => (variant, true),
            None => (value, false),
        };
        let variant = match variant {
            "plain" => Variant::Plain,
            "handoff" => Variant::Handoff,
            "stateful-set" => Variant::StatefulSet,
            _ => return None,
        };
        Some(Plan { variant, post_copy })
    }

    /// The plan `pod` records.
    pub fn of(pod: &Pod) -> Option<Plan> {
        note(pod, annotations::VARIANT).and_then(Plan::parse)
    }

    /// The plan a migration recorded, for the commands that recover it: the target's (or the
    /// holder's), else the source's. A migration started by a plugin that recorded no plan
    /// is read from what it did record: a holder's role, a target's owner, its post-copy mark.
    ///
    /// What a target itself carries for this migration outweighs a plan note it may have copied
    /// from its source (a target made by an older plugin copied the source's annotations): a
    /// holder role is a StatefulSet's move, an `owner` a handoff, a post-copy mark post-copy.
    /// Reading a handoff as plain would delete the source before the ReplicaSet owns the
    /// target, and it would start a fresh replica.
    pub fn recorded(target: Option<&Pod>, source: Option<&Pod>) -> Plan {
        let mut plan = target
            .and_then(Plan::of)
            .or_else(|| source.and_then(Plan::of))
            .unwrap_or_default();
        if let Some(target) = target {
            if is_holder(target) {
                plan.variant = Variant::StatefulSet;
            } else if note(target, annotations::OWNER).is_some() {
                plan.variant = Variant::Handoff;
            }
            plan.post_copy |= note(target, annotations::POST_COPY) == Some("true");
        }
        plan
    }
}

/// Whether `pod` records migration `id` as committed: its phase is `committed`, or already
/// `done-kept` (finished with `--keep-source`), with this id.
pub fn is_committed(pod: &Pod, id: &str) -> bool {
    Phase::of(pod).is_some_and(Phase::committed) && note(pod, annotations::MIGRATION_ID) == Some(id)
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
    /// Another writer moved it first: the pod records `phase` (`committed`, `aborting`, …) of
    /// this migration, or (`by`) another migration now.
    Taken {
        phase: Option<Phase>,
        /// The other migration's id, when the pod records another one.
        by: Option<String>,
    },
    Api(kube::Error),
}

impl Claim {
    /// Whether the claim may get through if tried again: an API error that may pass
    /// ([`crate::retry::passing`]); never another writer's phase.
    pub fn passing(&self) -> bool {
        matches!(self, Claim::Api(error) if crate::retry::passing(error))
    }

    /// The phase that won, as a sentence fragment: `committed`, or `another migration's`.
    pub fn phase_text(phase: Option<Phase>, by: Option<&str>) -> String {
        match by {
            Some(_) => "another migration's".into(),
            None => phase_text(phase).into(),
        }
    }
}

/// Moves migration `id`'s phase on the source pod to `to` (`committed` by the pipeline,
/// `aborting` by `kubectl migrate abort`) only if no one else has settled it: the write
/// carries the resourceVersion of the read that found it unsettled, so of two racing writers
/// (a plugin committing and a user aborting) exactly one wins, and the other learns what won.
///
/// # Errors
/// [`Claim::Taken`] when the phase is already `committed`, `done-kept`, `aborting` or `failed`
/// (or another migration's); [`Claim::Api`] on an API error.
pub async fn claim(pods: &Api<Pod>, source: &str, id: &str, to: Phase) -> Result<(), Claim> {
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
    to: Phase,
    extra: Extra<'_>,
) -> Result<(), Claim> {
    guarded_write(pods, source, id, to, extra, |_, phase, same_migration| {
        same_migration && !phase.is_some_and(Phase::settled)
    })
    .await
}

/// Whether a pod whose annotations say `phase` (and `waiting`: it is a target that still waits
/// for its checkpoint) has a migration in flight on it: the source phases of a migration that
/// has not ended, a handoff not finished, a target still waiting. Anything else -- no
/// migration, one undone (`failed`), the restored pod of a finished one whatever its last
/// phase -- may be taken by a new one. `done-kept` (a source kept frozen for good) is in
/// flight for ever: it is never to run again.
fn phase_in_flight(phase: Option<Phase>, waiting: bool) -> bool {
    waiting
        || phase.is_some_and(|p| p.unfinished() || matches!(p, Phase::DoneKept | Phase::HandingOff))
}

/// Whether a migration is in flight on `pod` (it is claimed, frozen, committed, being
/// aborted or handed off, or a target still waiting): no other may take it now.
pub fn migration_in_flight_on(pod: &Pod) -> bool {
    phase_in_flight(
        Phase::of(pod),
        note(pod, annotations::WAIT_FOR_CHECKPOINT) == Some("true"),
    )
}

/// Takes pod `source` for migration `id` moving by `plan`, before anything is created for
/// it: one guarded write (`migrate.kubectl.io/phase: claimed` with the id and the plan) that
/// succeeds only when no other migration is in flight on it. Of two migrations of one pod (the
/// plugin and a PodMigration, two drains) exactly one takes it; the other is refused having
/// touched nothing, and never undoes what it does not own.
///
/// # Errors
/// [`Claim::Taken`] naming the migration in flight and its phase; [`Claim::Api`].
pub async fn take(pods: &Api<Pod>, source: &str, id: &str, plan: Plan) -> Result<(), Claim> {
    // What an earlier migration recorded goes: its peer, its restart counts.
    let fresh = |_: &Pod| {
        let mut values = serde_json::Map::new();
        values.insert(annotations::PEER.into(), serde_json::Value::Null);
        values.insert(
            annotations::RESTARTS_AT_FREEZE.into(),
            serde_json::Value::Null,
        );
        values.insert(annotations::VARIANT.into(), plan.as_note().into());
        values
    };
    guarded_write(
        pods,
        source,
        id,
        Phase::Claimed,
        &fresh,
        |pod, phase, same_migration| {
            let waiting = note(pod, annotations::WAIT_FOR_CHECKPOINT) == Some("true");
            same_migration || !phase_in_flight(phase, waiting)
        },
    )
    .await
}

/// Writes migration `id`'s final phase `to` on the source (`failed` after an undo) only while
/// the pod still records that migration: a write never lands on a pod another migration has
/// taken since.
pub async fn settle(pods: &Api<Pod>, source: &str, id: &str, to: Phase) -> Result<(), Claim> {
    // A commit recorded meanwhile (an `abort` that went forward) is never overwritten.
    guarded_write(
        pods,
        source,
        id,
        to,
        &nothing,
        |_, phase, same_migration| same_migration && !phase.is_some_and(Phase::committed),
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
        Phase::Committed,
        &nothing,
        |_, phase, same_migration| same_migration && phase.is_some_and(Phase::unfinished),
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
        Phase::Failed,
        &nothing,
        |_, phase, same_migration| {
            same_migration && matches!(phase, Some(Phase::Committed | Phase::Failed))
        },
    )
    .await
}

/// Reads the source, asks `allowed(pod, phase, same_migration)`, and writes phase `to` and the
/// id (with `extra`'s annotations) carrying the read's resourceVersion, so that a concurrent
/// writer makes it read and decide again instead of being overwritten.
async fn guarded_write(
    pods: &Api<Pod>,
    source: &str,
    id: &str,
    to: Phase,
    extra: Extra<'_>,
    allowed: impl Fn(&Pod, Option<Phase>, bool) -> bool,
) -> Result<(), Claim> {
    for _ in 0..10 {
        let pod = pods.get(source).await.map_err(Claim::Api)?;
        let phase = Phase::of(&pod);
        let recorded = note(&pod, annotations::MIGRATION_ID).map(str::to_string);
        let same_migration = recorded.as_deref() == Some(id);
        let mut values = extra(&pod);
        if phase == Some(to) && same_migration && values.is_empty() {
            return Ok(());
        }
        if !allowed(&pod, phase, same_migration) {
            return Err(Claim::Taken {
                phase,
                by: recorded.filter(|_| !same_migration),
            });
        }
        values.insert(annotations::PHASE.into(), to.as_str().into());
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
    /// It can never finish: its source's freeze ended without a commit and the app runs on
    /// there with its state ([`freeze_ended`]). Only what it left behind (a waiting target,
    /// the pod's claim) remains, which `abort` removes. Set by whoever asked the source's
    /// launchers; the annotations alone cannot tell.
    pub freeze_ended: bool,
}

/// Whether the uncommitted migration `id` can never commit, from its source's launchers
/// (`statuses`, one per migrated container): one of them names it as the freeze that ended
/// without a commit (a commit needs every container's freeze), and every app runs again.
/// The plugin that drove it is dead or will fail: a launcher refuses to commit a freeze it
/// no longer holds.
pub fn freeze_ended(id: &str, statuses: &[&migrate_format::StatusReport]) -> bool {
    use migrate_format::LauncherState::{Restored, Running};
    !statuses.is_empty()
        && statuses
            .iter()
            .any(|s| s.ended_freeze.as_deref() == Some(id))
        && statuses
            .iter()
            .all(|s| matches!(s.state, Running | Restored) && !s.app_stopped)
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
            || Phase::of(p) == Some(Phase::HandingOff))
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
        let holder_committed = is_holder(target) && Phase::of(target) == Some(Phase::Committed);
        let phase = match source_pod {
            _ if holder_committed => Phase::Committed.as_str(),
            None => "source-deleted",
            Some(s) => Some(s)
                .filter(|s| note(s, annotations::MIGRATION_ID) == Some(id))
                .and_then(|s| Phase::of(s))
                .map_or("target-created", Phase::as_str),
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
                freeze_ended: false,
            },
        );
    }
    // Sources frozen or committed whose target is gone or already finished.
    for source in &all {
        let (Some(id), Some(phase)) = (note(source, annotations::MIGRATION_ID), Phase::of(source))
        else {
            continue;
        };
        // `claimed` and `creating-target`: a plugin that stopped before its target ran still
        // holds the pod's claim, which keeps every other migration off it until aborted.
        if !phase.unfinished() || found.contains_key(id) {
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
                freeze_ended: false,
            },
        );
    }
    Ok(found
        .into_values()
        .filter(|m| pod.is_none_or(|p| m.source == p || m.target.as_deref() == Some(p)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(notes: &[(&str, &str)]) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.annotations = Some(
            notes
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        );
        pod
    }

    #[test]
    fn a_migration_can_never_finish_only_once_its_freeze_ended_and_every_app_runs() {
        let status = |state: &str, stopped: bool, ended: Option<&str>| {
            let mut s: migrate_format::StatusReport = serde_json::from_value(serde_json::json!({
                "state": state, "app_pid": 1, "launcher_version": "0.1.0", "criu_version": null,
                "kernel": "6", "arch": "x86_64", "last_checkpoint": null, "last_restore": null,
                "error": null, "app_stopped": stopped}))
            .unwrap_or_else(|e| panic!("{e}"));
            s.ended_freeze = ended.map(str::to_string);
            s
        };
        let ended = status("running", false, Some("mig-1"));
        assert!(freeze_ended("mig-1", &[&ended]));
        assert!(
            !freeze_ended("mig-2", &[&ended]),
            "another migration's freeze"
        );
        assert!(!freeze_ended("mig-1", &[]), "nothing read proves nothing");
        // One container's freeze ended (so no commit can come), another still frozen: not
        // yet settled.
        let frozen = status("frozen", true, None);
        assert!(!freeze_ended("mig-1", &[&ended, &frozen]));
        let running = status("running", false, None);
        assert!(freeze_ended("mig-1", &[&ended, &running]));
    }

    #[test]
    fn the_pods_rewrite_makes_record_phases_and_roles_this_module_reads() {
        // rewrite.rs writes them as words (this module depends on it, not the other way).
        let mut source = pod(&[(annotations::VARIANT, "plain")]);
        source.metadata.name = Some("web-0".into());
        source.spec = Some(Default::default());
        let target = crate::rewrite::target_pod(&source, "node-b", "mig-1");
        assert_eq!(Phase::of(&target), Some(Phase::Restoring));
        assert_eq!(Plan::of(&target), None, "a copied plan note must go");
        let holder = crate::rewrite::holder_pod(&source, "node-b", "mig-1");
        assert_eq!(Phase::of(&holder), Some(Phase::Parking));
        assert_eq!(Role::of(&holder), Some(Role::Holder));
        let successor = crate::rewrite::successor_pod(&source, "node-b", "mig-1", "web-0-m1");
        assert_eq!(Role::of(&successor), Some(Role::Successor));
    }

    #[test]
    fn every_phase_reads_back_as_written_and_unknown_values_are_none() {
        for phase in Phase::ALL {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
        }
        assert_eq!(Phase::parse("transferring"), None);
        assert_eq!(phase_text(None), "none");
    }

    #[test]
    fn a_settled_phase_is_never_claimed_again_and_only_a_commit_counts_as_one() {
        let committed: Vec<Phase> = Phase::ALL.into_iter().filter(|p| p.committed()).collect();
        assert_eq!(committed, [Phase::Committed, Phase::DoneKept]);
        for phase in [
            Phase::Aborting,
            Phase::Failed,
            Phase::Committed,
            Phase::DoneKept,
        ] {
            assert!(phase.settled(), "{phase}");
        }
        // A pod with a waiting target, a done-kept source or an unfinished handoff is taken.
        assert!(phase_in_flight(Some(Phase::DoneKept), false));
        assert!(phase_in_flight(Some(Phase::HandingOff), false));
        assert!(phase_in_flight(None, true));
        assert!(!phase_in_flight(Some(Phase::Failed), false));
        assert!(!phase_in_flight(Some(Phase::Done), false));
    }

    #[test]
    fn the_plan_reads_back_as_recorded_and_older_migrations_are_read_from_what_they_recorded() {
        for variant in [Variant::Plain, Variant::Handoff, Variant::StatefulSet] {
            for post_copy in [false, true] {
                let plan = Plan { variant, post_copy };
                assert_eq!(Plan::parse(&plan.as_note()), Some(plan));
            }
        }
        assert_eq!(
            Plan::parse("stateful-set+post-copy").map(|p| p.post_copy),
            Some(true)
        );
        assert_eq!(Plan::parse("daemon-set"), None);
        // The target's record wins over the source's.
        let target = pod(&[(annotations::VARIANT, "handoff+post-copy")]);
        let source = pod(&[(annotations::VARIANT, "plain")]);
        assert_eq!(
            Plan::recorded(Some(&target), Some(&source)),
            Plan {
                variant: Variant::Handoff,
                post_copy: true
            }
        );
        // Nothing recorded: the holder's role, the target's owner, its post-copy mark.
        let holder = pod(&[(annotations::ROLE, "holder")]);
        assert_eq!(
            Plan::recorded(Some(&holder), None).variant,
            Variant::StatefulSet
        );
        let owned = pod(&[(annotations::OWNER, "{}"), (annotations::POST_COPY, "true")]);
        assert_eq!(
            Plan::recorded(Some(&owned), None),
            Plan {
                variant: Variant::Handoff,
                post_copy: true
            }
        );
        assert_eq!(Plan::recorded(None, Some(&pod(&[]))), Plan::default());
        // A target that copied a stale `plain` from its source is still a handoff.
        let copied = pod(&[(annotations::VARIANT, "plain"), (annotations::OWNER, "{}")]);
        assert_eq!(
            Plan::recorded(Some(&copied), None).variant,
            Variant::Handoff
        );
    }
}
