//! What one PodMigration needs next. The reconcile is idempotent and short; the work runs as a
//! task per migration ([`carry_out`], or [`recover`] after a restart):
//!
//! - no phase, or `Pending`: refused (`Failed`) if another PodMigration of the pod is active
//!   ([`blocker`]); `Pending` while [`Settings::max_concurrent`](super::Settings) migrations
//!   run; else the finalizer goes on, the status becomes `Running` with a new migration id,
//!   and [`carry_out`] runs the pipeline;
//! - `Running` with no task in this process (the controller restarted, or the pipeline's
//!   failure left something in flight): [`recover`] asks the pods how far it got and, as
//!   `kubectl migrate resume`/`abort` do, finishes it past its commit or undoes it before;
//! - `Succeeded`, `Failed`, `RolledBack`: the finalizer comes off; nothing more;
//! - deleted while active: the migration is interrupted (undone before its commit, finished
//!   after it), and the finalizer comes off once it ended.
//!
//! Every write that starts work carries the resourceVersion it was decided on, so a stale view
//! of the object (the cache lags the controller's own writes) never starts a migration twice.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource as _, ResourceExt};
use migrate_format::annotations;

use super::Context;
use crate::client::Connection;
use crate::crd::{Phase, PhaseTiming, PodMigration, PodMigrationStatus};
use crate::exec::ExecLaunchers;
use crate::migrate::{self, MigrateError};
use crate::recover;

/// Held while a migration of the object is active: deleting the object then first ends it.
pub const FINALIZER: &str = "migrate.kubectl.io/migration";

/// How long a migration may take when its PodMigration does not say (`--timeout`'s default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a frozen source waits for the controller before it resumes by itself (`--lease`'s
/// default).
const SOURCE_LEASE: Duration = Duration::from_secs(120);
/// Between two attempts to finish or undo a migration whose recovery failed.
const RECOVERY_RETRY: Duration = Duration::from_secs(10);
/// How long recovery goes on, from its first failed attempt, before the controller gives up
/// (`Failed`, reason `RecoveryGaveUp`) and leaves it to a person: a fault that outlasts it (a
/// node down, a pod that never schedules) is not going to pass by itself. Counted from the
/// first failed attempt, so a controller back from a long outage still tries for as long.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{step} failed")]
    Api {
        step: &'static str,
        #[source]
        source: kube::Error,
    },
}

pub(super) fn failed_at(step: &'static str) -> impl FnOnce(kube::Error) -> ReconcileError {
    move |source| ReconcileError::Api { step, source }
}

pub(super) fn error_policy(
    migration: Arc<PodMigration>,
    error: &ReconcileError,
    _context: Arc<Context>,
) -> Action {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(source) = cause {
        text.push_str(&format!(": {source}"));
        cause = source.source();
    }
    tracing::warn!(migration = %migration.name_any(), error = %text, "reconcile failed; again in 5 s");
    Action::requeue(Duration::from_secs(5))
}

pub(super) async fn reconcile(
    migration: Arc<PodMigration>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let uid = migration.uid().unwrap_or_default();
    let api: Api<PodMigration> = Api::namespaced(
        context.client.clone(),
        &migration.namespace().unwrap_or_default(),
    );
    let phase = phase_of(&migration);
    let here = context.is_active(&uid);
    if migration.meta().deletion_timestamp.is_some() {
        if here {
            context.interrupt(&uid);
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        if phase == Some(Phase::Running) && has_finalizer(&migration) {
            start_recovery(&api, &migration, &context).await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        remove_finalizer(&api, &migration).await?;
        return Ok(Action::await_change());
    }
    if here {
        // The task's last status write wakes this reconcile while the task still runs: look
        // again soon, so that what it left (a migration still in flight) is recovered.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    match phase {
        Some(Phase::Succeeded | Phase::Failed | Phase::RolledBack) => {
            remove_finalizer(&api, &migration).await?;
            Ok(Action::await_change())
        }
        Some(Phase::Running) => {
            start_recovery(&api, &migration, &context).await?;
            Ok(Action::await_change())
        }
        None | Some(Phase::Pending) => start(&api, &migration, &context).await,
    }
}

impl Context {
    fn is_active(&self, uid: &str) -> bool {
        self.active.lock().is_ok_and(|a| a.contains_key(uid))
    }

    fn interrupt(&self, uid: &str) {
        if let Ok(active) = self.active.lock()
            && let Some(interrupt) = active.get(uid)
        {
            let _ = interrupt.send(true);
        }
    }

    /// Registers a task for `uid` until the returned guard drops (even by a panic); the
    /// receiver hears of an interruption.
    fn activate(self: &Arc<Self>, uid: &str) -> (Active, tokio::sync::watch::Receiver<bool>) {
        let (interrupt, interrupted) = tokio::sync::watch::channel(false);
        if let Ok(mut active) = self.active.lock() {
            active.insert(uid.to_string(), interrupt);
        }
        let guard = Active {
            context: self.clone(),
            uid: uid.to_string(),
        };
        (guard, interrupted)
    }

    fn deactivate(&self, uid: &str) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(uid);
        }
    }
}

/// A task's registration in [`Context::active`]: dropped when the task ends.
struct Active {
    context: Arc<Context>,
    uid: String,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.context.deactivate(&self.uid);
    }
}

fn phase_of(migration: &PodMigration) -> Option<Phase> {
    migration.status.as_ref().and_then(|s| s.phase)
}

fn has_finalizer(migration: &PodMigration) -> bool {
    migration.finalizers().iter().any(|f| f == FINALIZER)
}

/// Another PodMigration that keeps this one from starting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub name: String,
    pub phase: &'static str,
}

/// The active PodMigration of the same pod that `migration` must yield to: one that runs, or
/// one that waits and came first (by creation time, then name), so that of two made at once
/// exactly one goes on. `None`: it may start.
pub fn blocker(migration: &PodMigration, all: &[PodMigration]) -> Option<Blocker> {
    let order = |m: &PodMigration| (m.creation_timestamp(), m.name_any());
    all.iter()
        .filter(|other| other.uid() != migration.uid() && other.spec.pod == migration.spec.pod)
        .filter(|other| other.meta().deletion_timestamp.is_none())
        .find_map(|other| {
            let phase = match phase_of(other) {
                Some(Phase::Running) => "running",
                None | Some(Phase::Pending) if order(other) < order(migration) => {
                    "made first, waiting to start"
                }
                _ => return None,
            };
            Some(Blocker {
                name: other.name_any(),
                phase,
            })
        })
}

/// A new (or waiting) PodMigration: refused, kept waiting, or started.
async fn start(
    api: &Api<PodMigration>,
    migration: &PodMigration,
    context: &Arc<Context>,
) -> Result<Action, ReconcileError> {
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(failed_at("listing the namespace's PodMigrations"))?;
    if let Some(blocker) = blocker(migration, &all.items) {
        let message = format!(
            "refused: pod {} already has an active migration, PodMigration {} ({}); create this one again once that one ended",
            migration.spec.pod, blocker.name, blocker.phase
        );
        let status = PodMigrationStatus {
            phase: Some(Phase::Failed),
            conditions: vec![ready(false, "Duplicate", &message)],
            message: Some(message.clone()),
            finished_at: Some(now()),
            ..PodMigrationStatus::default()
        };
        write_status(api, migration, &status, true).await?;
        publish(context, migration, EventType::Warning, "Duplicate", message).await;
        return Ok(Action::await_change());
    }
    let Ok(permit) = context.slots.clone().try_acquire_owned() else {
        if phase_of(migration) != Some(Phase::Pending) {
            let message = format!(
                "waiting: {} migrations run already (the controller's --max-concurrent)",
                context.settings.max_concurrent
            );
            let status = PodMigrationStatus {
                phase: Some(Phase::Pending),
                conditions: vec![ready(false, "Queued", &message)],
                message: Some(message),
                ..PodMigrationStatus::default()
            };
            write_status(api, migration, &status, true).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(3)));
    };
    let migration = add_finalizer(api, migration).await?;
    let id = migrate::new_id();
    let message = format!("migrating pod {} (migration {id})", migration.spec.pod);
    let status = PodMigrationStatus {
        phase: Some(Phase::Running),
        conditions: vec![ready(false, "Running", &message)],
        migration_id: Some(id.clone()),
        target_node: migration.spec.target_node.clone(),
        message: Some(message.clone()),
        started_at: Some(now()),
        ..PodMigrationStatus::default()
    };
    let migration = write_status(api, &migration, &status, true).await?;
    publish(context, &migration, EventType::Normal, "Started", message).await;
    let uid = migration.uid().unwrap_or_default();
    let (active, interrupted) = context.activate(&uid);
    let context = context.clone();
    let api = api.clone();
    tokio::spawn(async move {
        let outcome = carry_out(&context, &migration, &id, interrupted).await;
        drop(permit);
        let _ = conclude(&api, &migration, &context, outcome).await;
        drop(active);
    });
    Ok(Action::await_change())
}

/// A `Running` PodMigration that no task of this process runs: [`recover`] it in a task.
async fn start_recovery(
    api: &Api<PodMigration>,
    migration: &PodMigration,
    context: &Arc<Context>,
) -> Result<(), ReconcileError> {
    let Some(id) = migration
        .status
        .as_ref()
        .and_then(|s| s.migration_id.clone())
    else {
        // Running without an id: nothing can have started under it.
        let message = "the controller stopped before the migration began; nothing changed";
        let status = terminal(Phase::RolledBack, "Undone", message);
        write_status(api, migration, &status, true).await?;
        return Ok(());
    };
    // Claims the object as it was read: a stale view (the cache behind this process's own
    // writes) gets a conflict here, not a second recovery.
    let claimed = PodMigrationStatus {
        message: Some(format!(
            "recovering migration {id}: finishing it if it is committed, else undoing it"
        )),
        ..PodMigrationStatus::default()
    };
    let migration = write_status(api, migration, &claimed, true).await?;
    let uid = migration.uid().unwrap_or_default();
    // A recovery is not interrupted: it is the undo or the finish an interruption would run.
    let (active, _interrupted) = context.activate(&uid);
    let context = context.clone();
    let api = api.clone();
    tokio::spawn(async move {
        let outcome = recover(&context, &migration, &id).await;
        if matches!(outcome, Outcome::InFlight { .. }) {
            tokio::time::sleep(RECOVERY_RETRY).await;
        }
        let _ = conclude(&api, &migration, &context, outcome).await;
        drop(active);
    });
    Ok(())
}

/// How a migration ended, or that it has not.
#[derive(Debug)]
enum Outcome {
    Succeeded(Box<migrate::Report>),
    /// Finished by recovery: the pod that runs the app now.
    Finished {
        target: String,
        message: String,
    },
    /// Refused before anything changed.
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Undone: the source runs as before.
    RolledBack {
        message: String,
    },
    /// Still in flight (committed or not): recovery goes on.
    InFlight {
        message: String,
        committed: Option<bool>,
    },
}

/// Runs the pipeline for `migration` (the target node picked first when it names none).
async fn carry_out(
    context: &Context,
    migration: &PodMigration,
    id: &str,
    mut interrupted: tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let namespace = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    let node = match &spec.target_node {
        Some(node) => node.clone(),
        None => match pick_node(&context.client, &namespace, &spec.pod).await {
            Ok(node) => {
                let api: Api<PodMigration> = Api::namespaced(context.client.clone(), &namespace);
                let status = PodMigrationStatus {
                    target_node: Some(node.clone()),
                    ..PodMigrationStatus::default()
                };
                let _ = write_status(&api, migration, &status, false).await;
                node
            }
            Err(message) => {
                return Outcome::Failed {
                    reason: "NoFittingNode",
                    message,
                };
            }
        },
    };
    let connection = Connection {
        client: context.client.clone(),
        namespace,
        server: context.settings.server.clone(),
    };
    let launchers = ExecLaunchers {
        client: context.client.clone(),
        lazy: spec.lazy,
        post_copies: Default::default(),
    };
    let options = migrate::Options {
        id: Some(id.to_string()),
        pod: spec.pod.clone(),
        target_node: node.clone(),
        timeout: spec
            .timeout_seconds
            .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs(s.into())),
        keep_source: spec.keep_source,
        force: false,
        lease: SOURCE_LEASE,
        max_downtime: None,
        moved: Default::default(),
        transfer: spec.transfer.into(),
        lazy: spec.lazy,
    };
    let stop = async move {
        let _ = interrupted.wait_for(|stop| *stop).await;
    };
    match migrate::migrate(&connection, &launchers, &options, stop).await {
        Ok(report) => Outcome::Succeeded(Box::new(report)),
        Err(failed) => match &failed.error {
            MigrateError::Preflight(problems) => Outcome::Failed {
                reason: "PreflightFailed",
                message: format!(
                    "the preflight refused the move to node {node}; nothing was changed:{}",
                    problems
                        .iter()
                        .map(|p| format!("\n✗ {}; fix: {}", p.what, p.fix))
                        .collect::<String>()
                ),
            },
            // Another migration holds the pod (the plugin, a drain): nothing was touched.
            MigrateError::Claimed { .. } => Outcome::Failed {
                reason: "PodBusy",
                message: failed.to_string(),
            },
            // The pipeline says what it left: recorded as it is, never re-read from the pods.
            _ => of_aftermath(&failed.aftermath, failed.to_string()),
        },
    }
}

/// The outcome a failed migration's (or an abort's) aftermath makes: undone or untouched is
/// rolled back, finished is finished, a target that lost the app after the commit fails for
/// a person to decide, anything left to do stays in flight for recovery.
fn of_aftermath(aftermath: &migrate::Aftermath, message: String) -> Outcome {
    use migrate::Aftermath;
    match aftermath {
        Aftermath::Untouched { .. } | Aftermath::Undone { .. } => Outcome::RolledBack { message },
        Aftermath::Finished { target, .. } => Outcome::Finished {
            target: target.clone(),
            message,
        },
        Aftermath::SourceKept { .. } => Outcome::Failed {
            reason: "TargetLost",
            message,
        },
        Aftermath::Stuck { .. } => Outcome::InFlight {
            message,
            committed: Some(true),
        },
        Aftermath::UndoIncomplete { .. } => Outcome::InFlight {
            message,
            committed: Some(false),
        },
        // Settled by someone else, or the commit's fate unknown: recovery reads the pods.
        Aftermath::Superseded { .. } | Aftermath::CommitUnknown { .. } => Outcome::InFlight {
            message,
            committed: None,
        },
    }
}

/// Finishes (committed) or undoes (not committed) migration `id` of `migration`'s pod, as
/// `kubectl migrate resume`/`abort` do, after a restart of the controller.
async fn recover(context: &Context, migration: &PodMigration, id: &str) -> Outcome {
    let connection = Connection {
        client: context.client.clone(),
        namespace: migration.namespace().unwrap_or_default(),
        server: context.settings.server.clone(),
    };
    let launchers = ExecLaunchers {
        client: context.client.clone(),
        lazy: migration.spec.lazy,
        post_copies: Default::default(),
    };
    let pod = &migration.spec.pod;
    let found = match in_flight(&connection, pod, id).await {
        Ok(found) => found,
        Err(error) => {
            return Outcome::InFlight {
                message: format!("cannot read the pods to recover migration {id}: {error}"),
                committed: None,
            };
        }
    };
    match found {
        None => {
            let message = format!(
                "the controller stopped during migration {id}, which nothing records as in flight"
            );
            how_it_ended(&connection, pod, id, message).await
        }
        Some(found) if found.committed => {
            match recover::resume_migration(&connection, &launchers, pod, Some(id)).await {
                Ok(done) => Outcome::Finished {
                    target: found.target.unwrap_or_default(),
                    message: format!(
                        "the controller stopped after the commit of migration {id}; finished: {done}"
                    ),
                },
                // The target lost the app: trying again would fail the same way for ever. The
                // source is kept; a person decides (`resume --from-source`).
                Err(recover::RecoverError::Finish(error))
                    if matches!(*error, migrate::MigrateError::TargetLost { .. }) =>
                {
                    Outcome::Failed {
                        reason: "TargetLost",
                        message: format!(
                            "migration {id} was committed, and then its target lost the app: {error}"
                        ),
                    }
                }
                Err(error) => Outcome::InFlight {
                    message: format!("finishing migration {id} failed (again soon): {error}"),
                    committed: Some(true),
                },
            }
        }
        Some(_) => match recover::abort_migration(&connection, &launchers, pod, Some(id)).await {
            Ok(done) => of_aftermath(
                &done,
                format!("the controller stopped during migration {id}, before its commit: {done}"),
            ),
            Err(error) => Outcome::InFlight {
                message: format!("undoing migration {id} failed (again soon): {error}"),
                committed: Some(false),
            },
        },
    }
}

/// Migration `id` of `pod`, if it is in flight.
async fn in_flight(
    connection: &Connection,
    pod: &str,
    id: &str,
) -> Result<Option<recover::InFlight>, recover::RecoverError> {
    // Whether its freeze ended makes no difference here: an uncommitted one is aborted.
    Ok(
        crate::record::in_flight_migrations(&connection.client, &connection.namespace, Some(pod))
            .await
            .map_err(recover::RecoverError::Api)?
            .into_iter()
            .find(|found| found.id == id),
    )
}

/// How migration `id` of `pod` ended, when nothing records it as in flight, from positive
/// evidence only: a pod it finished (`done`), or else the source still there (undone, or never
/// touched), or else a running pod of it with the source gone. Anything else stays in flight
/// for a person to look at, never guessed.
async fn how_it_ended(connection: &Connection, pod: &str, id: &str, message: String) -> Outcome {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let all = match pods.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(error) => {
            return Outcome::InFlight {
                message: format!("{message}; and cannot read the pods: {error}"),
                committed: None,
            };
        }
    };
    let of_it = |p: &&Pod| {
        p.annotations()
            .get(annotations::MIGRATION_ID)
            .map(String::as_str)
            == Some(id)
    };
    if let Some(done) = all
        .iter()
        .filter(of_it)
        .find(|p| crate::record::Phase::of(p) == Some(crate::record::Phase::Done))
    {
        return Outcome::Finished {
            target: done.name_any(),
            message: format!("{message}; it had finished"),
        };
    }
    if all.iter().any(|p| p.name_any() == pod) {
        return Outcome::RolledBack {
            message: format!("{message}; the source {pod} runs as before"),
        };
    }
    let running = all
        .iter()
        .filter(of_it)
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
    match running {
        Some(target) => Outcome::Finished {
            target: target.name_any(),
            message: format!(
                "{message}; the source is gone and {} runs",
                target.name_any()
            ),
        },
        None => Outcome::InFlight {
            message: format!(
                "{message}; neither the source {pod} nor a pod of the migration runs: `kubectl migrate status` and the pods' Events say what happened"
            ),
            committed: None,
        },
    }
}

/// The first node, by name, that the preflight finds fitting for `pod`, as `drain` picks.
async fn pick_node(client: &kube::Client, namespace: &str, pod: &str) -> Result<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let source = match pods.get_opt(pod).await {
        Ok(Some(source)) => source,
        Ok(None) => return Err(format!("pod {namespace}/{pod} does not exist")),
        Err(error) => return Err(format!("cannot read pod {namespace}/{pod}: {error}")),
    };
    let here = source.spec.as_ref().and_then(|s| s.node_name.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let candidates = crate::drain::other_nodes(&nodes, here.as_deref())
        .await
        .map_err(|error| format!("cannot list the nodes: {error}"))?;
    crate::drain::first_fitting_node(client, &source, &candidates)
        .await
        .map_err(|reason| format!("no node fits pod {pod}: {reason}; name one in spec.targetNode"))
}

/// Records how it ended (status and an Event), or that it goes on.
async fn conclude(
    api: &Api<PodMigration>,
    migration: &PodMigration,
    context: &Context,
    outcome: Outcome,
) -> Result<(), ReconcileError> {
    let now = now();
    let outcome = match outcome {
        Outcome::InFlight { message, committed } if past_recovery(migration, &now) => {
            give_up(migration, message, committed)
        }
        other => other,
    };
    // The first failed attempt starts the recovery's clock; later ones keep it.
    let recovering_since = migration
        .status
        .as_ref()
        .and_then(|s| s.recovering_since.clone())
        .unwrap_or(now);
    let (status, event, reason) = match outcome {
        Outcome::Succeeded(report) => {
            let message = format!(
                "pod {} moved to node {} as {} in {} ms of downtime (freeze → thaw)",
                report.source,
                report.node,
                report.target,
                report
                    .downtime_ms
                    .or(report.downtime_bound_ms)
                    .map_or("?".into(), |d| d.to_string())
            );
            let mut status = terminal(Phase::Succeeded, "Succeeded", &message);
            status.conditions.push(committed(true));
            status.target_node = Some(report.node.clone());
            status.target_pod = Some(report.target.clone());
            status.timings = report
                .phases
                .iter()
                .map(|(name, ms)| PhaseTiming {
                    name: name.clone(),
                    ms: *ms,
                })
                .collect();
            status.downtime_ms = report.downtime_ms.or(report.downtime_bound_ms);
            status.bytes_moved = Some(report.bytes_moved);
            (status, EventType::Normal, "Succeeded")
        }
        Outcome::Finished { target, message } => {
            let mut status = terminal(Phase::Succeeded, "Succeeded", &message);
            status.conditions.push(committed(true));
            status.target_pod = Some(target);
            (status, EventType::Normal, "Succeeded")
        }
        Outcome::Failed { reason, message } => (
            terminal(Phase::Failed, reason, &message),
            EventType::Warning,
            reason,
        ),
        Outcome::RolledBack { message } => {
            let mut status = terminal(Phase::RolledBack, "Undone", &message);
            status.conditions.push(committed(false));
            (status, EventType::Warning, "RolledBack")
        }
        Outcome::InFlight {
            message,
            committed: c,
        } => {
            let mut conditions = vec![ready(false, "Recovering", &message)];
            conditions.extend(c.map(committed));
            let status = PodMigrationStatus {
                conditions,
                message: Some(message.clone()),
                recovering_since: Some(recovering_since),
                ..PodMigrationStatus::default()
            };
            (status, EventType::Warning, "Recovering")
        }
    };
    let note = status.message.clone().unwrap_or_default();
    let ended = status.phase.is_some();
    let written = write_status(api, migration, &status, false).await?;
    publish(context, migration, event, reason, note).await;
    // The reconcile that the status write wakes sees this task still active and leaves the
    // object alone: the finalizer comes off here.
    if ended {
        remove_finalizer(api, &written).await?;
    }
    Ok(())
}

/// Whether `migration`'s recovery has failed for longer than [`RECOVERY_DEADLINE`], from its
/// first failed attempt (`status.recoveringSince`).
fn past_recovery(migration: &PodMigration, now: &Time) -> bool {
    let Some(since) = migration
        .status
        .as_ref()
        .and_then(|s| s.recovering_since.as_ref())
    else {
        return false;
    };
    let elapsed = now.0.as_second() - since.0.as_second();
    elapsed > i64::try_from(RECOVERY_DEADLINE.as_secs()).unwrap_or(i64::MAX)
}

/// Recovery given up: the migration ends `Failed` (reason `RecoveryGaveUp`), its pods left as
/// they are, and the message names the commands a person runs.
fn give_up(migration: &PodMigration, last: String, committed: Option<bool>) -> Outcome {
    let namespace = migration.namespace().unwrap_or_default();
    let pod = &migration.spec.pod;
    let next = match committed {
        Some(true) => format!(
            "it is committed (the target holds the app): `kubectl migrate resume -n {namespace} {pod}` finishes it once the fault is fixed"
        ),
        Some(false) => format!(
            "it is not committed (the source holds the app): `kubectl migrate abort -n {namespace} {pod}` undoes it once the fault is fixed"
        ),
        None => format!(
            "`kubectl migrate status -n {namespace} {pod}` says whether it is committed, and the command that ends it"
        ),
    };
    Outcome::Failed {
        reason: "RecoveryGaveUp",
        message: format!(
            "the controller gave up recovering this migration after {} min of failed attempts; nothing more is done by it and its pods are left as they are: {next}. Last attempt: {last}",
            RECOVERY_DEADLINE.as_secs() / 60
        ),
    }
}

/// The status of an ended migration.
fn terminal(phase: Phase, reason: &str, message: &str) -> PodMigrationStatus {
    PodMigrationStatus {
        phase: Some(phase),
        conditions: vec![ready(phase == Phase::Succeeded, reason, message)],
        message: Some(message.to_string()),
        finished_at: Some(now()),
        ..PodMigrationStatus::default()
    }
}

/// `Ready`: `True` once the app runs on the target; `False` while it moves, and for a move
/// that was refused or undone (`reason` says which, the phase says that it ended).
fn ready(done: bool, reason: &str, message: &str) -> Condition {
    condition("Ready", done, reason, message)
}

/// `Committed`: past the point of no return (the target holds the app's state).
fn committed(yes: bool) -> Condition {
    if yes {
        condition(
            "Committed",
            true,
            "Committed",
            "the target holds the app's state",
        )
    } else {
        condition(
            "Committed",
            false,
            "NotCommitted",
            "the source holds the app's state",
        )
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: kind.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(32_000).collect(),
        last_transition_time: now(),
        observed_generation: None,
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Merge-patches the status. With `guarded`, only if the object is still as `migration` saw it
/// (its resourceVersion): a conflict means a stale view, and the reconcile runs again.
async fn write_status(
    api: &Api<PodMigration>,
    migration: &PodMigration,
    status: &PodMigrationStatus,
    guarded: bool,
) -> Result<PodMigration, ReconcileError> {
    // Conditions as metav1 has them: the generation they speak of, and the time of the last
    // change of their status (not of each write).
    let mut status = status.clone();
    let before = migration
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    for condition in &mut status.conditions {
        condition.observed_generation = migration.metadata.generation;
        if let Some(old) = before
            .iter()
            .find(|old| old.type_ == condition.type_ && old.status == condition.status)
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    let mut patch = serde_json::json!({ "status": status });
    if guarded {
        patch["metadata"] = serde_json::json!({ "resourceVersion": migration.resource_version() });
    }
    api.patch_status(
        &migration.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(failed_at("writing the PodMigration's status"))
}

async fn add_finalizer(
    api: &Api<PodMigration>,
    migration: &PodMigration,
) -> Result<PodMigration, ReconcileError> {
    if has_finalizer(migration) {
        return Ok(migration.clone());
    }
    let mut finalizers = migration.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": migration.resource_version(),
    }});
    api.patch(
        &migration.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(failed_at("adding the PodMigration's finalizer"))
}

/// Takes the finalizer off, read afresh and written with its resourceVersion (again on a
/// conflict), so that no other finalizer is lost.
async fn remove_finalizer(
    api: &Api<PodMigration>,
    migration: &PodMigration,
) -> Result<(), ReconcileError> {
    if !has_finalizer(migration) {
        return Ok(());
    }
    let name = migration.name_any();
    let mut attempts = 0;
    loop {
        let Some(fresh) = api
            .get_opt(&name)
            .await
            .map_err(failed_at("reading the PodMigration"))?
        else {
            return Ok(());
        };
        if !has_finalizer(&fresh) {
            return Ok(());
        }
        let finalizers: Vec<&String> = fresh
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .collect();
        let patch = serde_json::json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": fresh.resource_version(),
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 && attempts < 3 => attempts += 1,
            Err(source) => {
                return Err(ReconcileError::Api {
                    step: "removing the PodMigration's finalizer",
                    source,
                });
            }
        }
    }
}

/// Publishes an Event on the PodMigration.
async fn publish(
    context: &Context,
    migration: &PodMigration,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let object = migration.object_ref(&());
    context
        .publish(&object, type_, "Migrate", reason, note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PodMigrationSpec, Transfer};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn migration(name: &str, pod: &str, second: i64, phase: Option<Phase>) -> PodMigration {
        PodMigration {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                creation_timestamp: Some(Time(
                    k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + second).unwrap(),
                )),
                ..ObjectMeta::default()
            },
            spec: PodMigrationSpec {
                pod: pod.into(),
                target_node: None,
                transfer: Transfer::Auto,
                lazy: false,
                keep_source: false,
                timeout_seconds: None,
            },
            status: phase.map(|phase| PodMigrationStatus {
                phase: Some(phase),
                ..PodMigrationStatus::default()
            }),
        }
    }

    #[test]
    fn recovery_gives_up_only_30_minutes_after_its_first_failed_attempt_and_names_the_command() {
        let at = |second: i64| {
            Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + second).unwrap())
        };
        let mut m = migration("stuck", "counter", 0, Some(Phase::Running));
        m.status.as_mut().unwrap().started_at = Some(at(0));
        // No failed recovery yet (a controller back from a long outage): never given up.
        assert!(!past_recovery(&m, &at(1_000_000)));
        m.status.as_mut().unwrap().recovering_since = Some(at(500_000));
        let deadline = 500_000 + i64::try_from(RECOVERY_DEADLINE.as_secs()).unwrap();
        assert!(!past_recovery(&m, &at(deadline)));
        assert!(past_recovery(&m, &at(deadline + 1)));
        match give_up(&m, "the successor is Pending".into(), Some(true)) {
            Outcome::Failed { reason, message } => {
                assert_eq!(reason, "RecoveryGaveUp");
                assert!(
                    message.contains("kubectl migrate resume -n  counter"),
                    "{message}"
                );
                assert!(message.contains("the successor is Pending"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match give_up(&m, String::new(), Some(false)) {
            Outcome::Failed { message, .. } => {
                assert!(message.contains("kubectl migrate abort"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_running_migration_of_the_pod_blocks_a_new_one() {
        let running = migration("first", "counter", 0, Some(Phase::Running));
        let new = migration("second", "counter", 5, None);
        let blocked = blocker(&new, &[running.clone(), new.clone()]).unwrap();
        assert_eq!(blocked.name, "first");
        assert_eq!(blocked.phase, "running");
        assert_eq!(blocker(&running, &[running.clone(), new]), None);
    }

    #[test]
    fn of_two_made_at_once_exactly_one_goes_on() {
        let a = migration("a", "counter", 0, None);
        let b = migration("b", "counter", 0, Some(Phase::Pending));
        let all = [a.clone(), b.clone()];
        assert_eq!(
            blocker(&a, &all),
            None,
            "same second: the first name goes on"
        );
        assert_eq!(blocker(&b, &all).unwrap().name, "a");
    }

    #[test]
    fn ended_migrations_and_other_pods_do_not_block() {
        let new = migration("new", "counter", 9, None);
        let all = [
            migration("done", "counter", 0, Some(Phase::Succeeded)),
            migration("failed", "counter", 1, Some(Phase::Failed)),
            migration("undone", "counter", 2, Some(Phase::RolledBack)),
            migration("other", "web", 3, Some(Phase::Running)),
            new.clone(),
        ];
        assert_eq!(blocker(&new, &all), None);
    }
}
