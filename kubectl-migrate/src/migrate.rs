//! The migration pipeline: check → target → freeze → checkpoint + transfer + restore →
//! verify → **commit** → thaw + cleanup, as one function, [`migrate`], with everything that
//! touches containers behind the [`Launchers`] seam.
//!
//! Order, and why:
//! 1. **check**: the preflight; any problem stops here, nothing changed.
//! 2. **target**: the target pod is created first and waited for (image pulled, launcher
//!    waiting), *before* the source is frozen, so none of that counts as downtime. The wait
//!    fails fast when the pod fails, cannot pull its image, crash-loops or is deleted.
//! 3. **transfer**: every source container's app is frozen first (`freeze`), so the cut is
//!    consistent across containers; then per container, the source launcher's `checkpoint
//!    --output -` is streamed through the plugin into the target launcher's `receive --input
//!    -` (bounded buffer, never the whole archive in memory); all containers at once.
//! 4. **verify**: every target container reports `restored` (its app restored, still frozen).
//! 5. **commit**: one durable write, `migrate.kubectl.io/phase: committed` with the id on the
//!    source pod. Before it, any failure, deadline or interruption *undoes*: the target is
//!    deleted and every source container rolled back (the frozen app resumes). After it,
//!    nothing undoes: the target holds the app's state and the source's is stale, so
//!    failures are retried, then reported with the commands that finish; an interruption
//!    finishes instead of undoing. Never two running copies; never none without a command.
//! 6. **cleanup + thaw** ([`finish`], idempotent): the stale source is deleted (unless
//!    `--keep-source`), every target app is thawed, and the target's wait for a checkpoint is
//!    turned off (restarts start fresh).
//!
//! Each phase is recorded as annotations and Events on both pods.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Resource as _};
use migrate_format::{CheckpointReport, RestoreReport, annotations};
use serde::Serialize;

use crate::check::{self, Problem};
use crate::client::Connection;
use crate::launchers::{LauncherError, Launchers};
use crate::rewrite;
use migrate_format::Refusal;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub pod: String,
    pub target_node: String,
    pub timeout: Duration,
    pub keep_source: bool,
    /// `--force`: migrate although hostPath volumes' files stay on the source node.
    pub force: bool,
    /// `--lease`: how long a frozen source waits for this plugin before it resumes by itself.
    pub lease: Duration,
    /// `--max-downtime`: undo once the app has been frozen this long (default: what its
    /// liveness probes allow, see `check::pod::freeze_limit`).
    pub max_downtime: Option<Duration>,
    /// Archive bytes moved so far, for a progress display (shared with the caller).
    pub moved: Arc<AtomicU64>,
}

/// What a successful migration did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: String,
    pub source: String,
    pub target: String,
    pub node: String,
    /// Phase name and duration in milliseconds, in order.
    pub phases: Vec<(String, u64)>,
    pub containers: BTreeMap<String, (CheckpointReport, RestoreReport)>,
    /// Longest container downtime (frozen at the source → running at the target).
    pub downtime_ms: Option<u64>,
    pub bytes_moved: u64,
    pub source_deleted: bool,
    /// What went wrong after the app ran on the target, with the command that fixes it.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the preflight found {} problem(s); nothing was changed", .0.len())]
    Preflight(Vec<Problem>),
    #[error("{step} failed")]
    Api {
        step: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the target pod {target} failed: {reason}")]
    TargetFailed { target: String, reason: String },
    #[error("container {container}: {error}")]
    Transfer {
        container: String,
        error: LauncherError,
    },
    #[error("container {container}: {step}: {error}")]
    Launcher {
        container: String,
        step: &'static str,
        error: LauncherError,
    },
    #[error("container {container}: the target's launcher is {state:?}, not restored")]
    NotRestored {
        container: String,
        state: migrate_format::LauncherState,
    },
    #[error("the deadline ({timeout:?}, --timeout) passed during {phase}")]
    Deadline { phase: String, timeout: Duration },
    #[error("interrupted during {phase}")]
    Interrupted { phase: String },
    #[error("recording the commit on pod {pod} failed")]
    Commit {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("the outcome of recording the commit on pod {pod} is unknown")]
    CommitUnknown {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}")]
    AfterCommit { what: String },
    #[error("aborted with `kubectl migrate abort`")]
    Aborted,
    #[error("the source's lease could not be renewed in container {container}: {error}")]
    LeaseLost {
        container: String,
        error: LauncherError,
    },
    #[error(
        "the app would have stayed frozen longer than {limit:?} (--max-downtime, or what its liveness probes allow)"
    )]
    FrozenTooLong { limit: Duration },
}

/// A failed migration: why (with the causes, such as the API server's refusal naming the
/// verb and resource), and what was done about it.
#[derive(Debug)]
pub struct Failed {
    pub error: MigrateError,
    /// What happened to the source and target, and how to resume or abort.
    pub aftermath: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        let mut cause = std::error::Error::source(&self.error);
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        if let MigrateError::Preflight(problems) = &self.error {
            for problem in problems {
                write!(f, "\n  ✗ {problem}")?;
            }
        }
        write!(f, "\n{}", self.aftermath)
    }
}

impl std::error::Error for Failed {}

/// How far a migration got: what the undo, or past the commit the finish, needs.
#[derive(Debug, Default)]
pub struct Progress {
    pub phase: String,
    pub id: String,
    pub target: Option<Pod>,
    pub transfer_started: bool,
    /// Past the point of no return: the commit is recorded on the source pod.
    pub committed: bool,
    /// The app containers moved (set by the commit, for finishing).
    pub containers: Vec<String>,
    /// The source's containers' restart counts when the migration started: a container that
    /// restarted meanwhile lost the state the undo would resume.
    pub source_restarts: BTreeMap<String, i32>,
}

/// Each container's restart count (app and init containers).
fn restart_counts(pod: &Pod) -> BTreeMap<String, i32> {
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

/// Migrates the pod. `interrupted` resolves when the user interrupts (Ctrl-C); the migration
/// then undoes itself like on any failure.
///
/// # Errors
/// [`Failed`] with the cause and what was done (target deleted, source rolled back).
pub async fn migrate<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    interrupted: impl Future<Output = ()>,
) -> Result<Report, Failed> {
    let mut progress = Progress {
        id: new_id(),
        ..Progress::default()
    };
    let started = Instant::now();
    let outcome = {
        let work = run(connection, launchers, options, &mut progress);
        tokio::pin!(work);
        tokio::select! {
            outcome = tokio::time::timeout(options.timeout, &mut work) => match outcome {
                Ok(outcome) => outcome,
                Err(_) => Err(MigrateError::Deadline { phase: String::new(), timeout: options.timeout }),
            },
            () = interrupted => Err(MigrateError::Interrupted { phase: String::new() }),
        }
    };
    match outcome {
        Ok(mut report) => {
            report
                .phases
                .push(("total".into(), started.elapsed().as_millis() as u64));
            Ok(report)
        }
        Err(mut error) => {
            match &mut error {
                MigrateError::Deadline { phase, .. } | MigrateError::Interrupted { phase } => {
                    phase.clone_from(&progress.phase)
                }
                _ => {}
            }
            let aftermath = if progress.committed {
                after_commit(connection, launchers, options, &progress).await
            } else if matches!(error, MigrateError::CommitUnknown { .. }) {
                commit_unknown(connection, options, &progress)
            } else {
                undo(connection, launchers, options, &progress, &error).await
            };
            Err(Failed { error, aftermath })
        }
    }
}

async fn run<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &mut Progress,
) -> Result<Report, MigrateError> {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let mut phases = Vec::new();
    let mut lap = Instant::now();
    let mut phase_done = |name: &str, phases: &mut Vec<(String, u64)>| {
        phases.push((name.to_string(), lap.elapsed().as_millis() as u64));
        lap = Instant::now();
    };

    progress.phase = "check".into();
    let facts = check::gather(
        &connection.client,
        &connection.namespace,
        &options.pod,
        &options.target_node,
        launchers,
        options.force,
    )
    .await
    .map_err(|source| MigrateError::Api {
        step: "reading the cluster",
        source,
    })?;
    let mut facts = facts.map_err(|problem| MigrateError::Preflight(vec![problem]))?;
    facts.max_downtime = options.max_downtime;
    facts.keep_source = options.keep_source;
    let freeze_limit = check::pod::freeze_limit(&facts);
    for note in check::notes(&facts) {
        tracing::warn!("{note}");
    }
    let problems = check::problems(&facts);
    if !problems.is_empty() {
        return Err(MigrateError::Preflight(problems));
    }
    let source_boot_times: Vec<u64> = facts
        .launchers
        .values()
        .filter_map(|s| s.as_ref().ok().and_then(|s| s.boot_time))
        .collect();
    let source = facts.pod;
    progress.source_restarts = restart_counts(&source);
    phase_done("check", &mut phases);

    progress.phase = "creating the target".into();
    let mut target = rewrite::target_pod(&source, &options.target_node, &progress.id);
    // The target's name never collides: a taken `NAME-mN` (a leftover, or anyone's pod) moves
    // on to the next N.
    let created = loop {
        let name = target.metadata.name.clone().unwrap_or_default();
        annotate(
            &pods,
            &options.pod,
            &progress.id,
            "creating-target",
            Some(&name),
        )
        .await;
        match pods.create(&PostParams::default(), &target).await {
            Ok(created) => break created,
            Err(kube::Error::Api(status))
                if status.reason == "AlreadyExists"
                    && rewrite::migration_generation(&target) < 100 =>
            {
                tracing::info!(
                    pod = name,
                    "the target's name is taken; trying the next one"
                );
                target = rewrite::next_name(target, &options.pod);
            }
            Err(source) => {
                return Err(MigrateError::Api {
                    step: "creating the target pod",
                    source,
                });
            }
        }
    };
    let target_name = created.metadata.name.clone().unwrap_or_default();
    progress.target = Some(created.clone());
    record(
        connection,
        &source,
        "MigrationStarted",
        format!(
            "moving to node {} as pod {target_name}",
            options.target_node
        ),
    )
    .await;
    record(
        connection,
        &created,
        "MigrationTarget",
        format!(
            "restoring pod {} from node {}",
            options.pod,
            node_of(&source)
        ),
    )
    .await;
    let target = wait_until_running(&pods, &target_name).await?;
    progress.target = Some(target.clone());
    phase_done("target", &mut phases);
    fault::stage("target-running");

    progress.phase = "checkpoint and transfer".into();
    progress.transfer_started = true;
    annotate(
        &pods,
        &options.pod,
        &progress.id,
        "checkpointing",
        Some(&target_name),
    )
    .await;
    let moved = options.moved.clone();
    let containers = rewrite::migrated_containers(&source);
    progress.containers.clone_from(&containers);
    // A source that carries the readiness gate (it was migrated before) leaves its Services'
    // endpoints before it is frozen; the undo sets it back.
    if has_serving_gate(&source)
        && let Err(error) = set_serving(&pods, &options.pod, false).await
    {
        tracing::warn!(%error, "cannot take the source out of its Services' endpoints");
    }
    // A consistent cut: every container's app is stopped before any is dumped (a checkpoint of
    // a frozen app restores frozen; all targets are thawed together after verification).
    // The freeze is bounded from before the first container stops.
    let thaw_by = freeze_limit.map(|limit| (tokio::time::Instant::now() + limit, limit));
    // Each freeze carries a lease: if this plugin dies, the sources resume by themselves. It
    // is renewed while the plugin works, and ended by the commit.
    for container in &containers {
        launchers
            .freeze(&source, container, options.lease)
            .await
            .map_err(|error| MigrateError::Launcher {
                container: container.clone(),
                step: "cannot freeze",
                error,
            })?;
    }
    fault::stage("frozen");
    let keep_alive = || renew_lease(launchers, &source, &containers, options.lease);
    let transfers = containers.iter().map(|c| {
        let moved = moved.clone();
        let (source, target) = (&source, &target);
        async move {
            (
                c.clone(),
                launchers.transfer(source, target, c, moved).await,
            )
        }
    });
    let results = within(
        thaw_by,
        leased(futures::future::join_all(transfers), keep_alive()),
    )
    .await??;
    let mut reports = BTreeMap::new();
    for (container, result) in results {
        let (checkpoint, restore) = result.map_err(|error| MigrateError::Transfer {
            container: container.clone(),
            error,
        })?;
        reports.insert(container, (checkpoint, restore));
    }
    phase_done("checkpoint+transfer+restore", &mut phases);

    progress.phase = "verify".into();
    let mut target_boot_time = None;
    let verify = async {
        for container in &containers {
            let status = launchers
                .status(&target, container)
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
    within(thaw_by, leased(verify, keep_alive())).await???;
    fault::stage("restored");
    // Every source launcher acknowledges the commit (its lease ends: it will not resume on its
    // own) before it is recorded; one whose lease already expired refuses, and the migration
    // is undone like any failure before the commit. No renewal runs meanwhile: it would be
    // refused by a launcher that has already taken the commit.
    let acknowledge = async {
        for container in &containers {
            launchers
                .commit(&source, container)
                .await
                .map_err(|error| MigrateError::Launcher {
                    container: container.clone(),
                    step: "the source refused the commit",
                    error,
                })?;
        }
        Ok::<(), MigrateError>(())
    };
    within(thaw_by, acknowledge).await??;
    phase_done("verify", &mut phases);
    fault::stage("acknowledged");

    // The point of no return: from here the target holds the app's state, and nothing undoes
    // the migration any more; failures are retried or reported with the commands that finish.
    progress.phase = "commit".into();
    commit(&pods, &options.pod, &progress.id).await?;
    progress.committed = true;
    phase_done("commit", &mut phases);
    fault::stage("committed");
    progress.phase = "thaw and cleanup".into();
    let mut finished = finish(connection, launchers, options, progress).await?;
    if let (Some(&from), Some(to)) = (source_boot_times.first(), target_boot_time) {
        finished.warnings.extend(clock_jump(from, to));
    }
    phase_done("thaw+cleanup", &mut phases);
    let downtime_ms = reports.values().filter_map(|(_, r)| r.downtime_ms).max();
    let timings = serde_json::to_string(&phases).unwrap_or_default();
    annotate_timings(&pods, &target_name, &timings).await;
    record(
        connection,
        &target,
        "MigrationDone",
        format!(
            "restored from {} in {} ms of downtime",
            options.pod,
            downtime_ms.unwrap_or(0)
        ),
    )
    .await;
    Ok(Report {
        id: progress.id.clone(),
        source: options.pod.clone(),
        target: target_name,
        node: options.target_node.clone(),
        phases,
        containers: reports,
        downtime_ms,
        bytes_moved: moved.load(Ordering::Relaxed),
        source_deleted: finished.source_deleted,
        warnings: finished.warnings,
    })
}

/// Runs `work` unless the app would stay frozen past `thaw_by` (the deadline and the limit it
/// comes from): then the migration is cut short, and undone, before a liveness probe can
/// restart the frozen app.
async fn within<T>(
    thaw_by: Option<(tokio::time::Instant, Duration)>,
    work: impl Future<Output = T>,
) -> Result<T, MigrateError> {
    match thaw_by {
        None => Ok(work.await),
        Some((deadline, limit)) => tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| MigrateError::FrozenTooLong { limit }),
    }
}

/// Runs `work` while renewing the sources' lease; fails if a renewal is refused (the lease
/// expired and a source resumed: the migration cannot commit any more).
async fn leased<T>(
    work: impl Future<Output = T>,
    keep_alive: impl Future<Output = MigrateError>,
) -> Result<T, MigrateError> {
    tokio::select! {
        done = work => Ok(done),
        lost = keep_alive => Err(lost),
    }
}

/// Renews every source container's lease every quarter of it; returns only when a renewal
/// fails.
async fn renew_lease<L: Launchers + Sync>(
    launchers: &L,
    source: &Pod,
    containers: &[String],
    lease: Duration,
) -> MigrateError {
    loop {
        tokio::time::sleep(lease / 4).await;
        for container in containers {
            // A passing fault (a dropped exec stream) is tried again; the lease has three
            // quarters left.
            if let Err(error) = retry(|| launchers.renew(source, container, lease)).await {
                return MigrateError::LeaseLost {
                    container: container.clone(),
                    error,
                };
            }
        }
    }
}

/// Records the commit durably on the source pod (`migrate.kubectl.io/phase: committed` with
/// the migration's id), the one write that decides between undo and finish.
///
/// # Errors
/// [`MigrateError::Commit`] when the API server refused it (nothing is committed: the caller
/// undoes); [`MigrateError::CommitUnknown`] when its outcome cannot be known (the reply was
/// lost and the pod cannot be read back): then neither undo nor finish is safe to decide here.
async fn commit(pods: &Api<Pod>, source: &str, id: &str) -> Result<(), MigrateError> {
    let patch = serde_json::json!({"metadata": {"annotations": {
        annotations::PHASE: "committed",
        annotations::MIGRATION_ID: id,
    }}});
    let Err(error) = pods
        .patch(source, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    else {
        return Ok(());
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

/// Reads `name` back, trying for a few seconds: after a lost reply the API server may need
/// a moment (a restart, a leader change) before it answers again.
async fn retry_get(pods: &Api<Pod>, name: &str) -> Result<Pod, kube::Error> {
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

/// What finishing a committed migration left to say.
#[derive(Debug, Default)]
pub struct Finished {
    pub source_deleted: bool,
    pub warnings: Vec<String>,
}

/// How often each step of [`finish`] is tried before it is reported.
const FINISH_TRIES: u32 = 3;

/// Finishes a committed migration, idempotently (it runs again after a failure or an
/// interruption past the commit): delete the source first (its frozen copy is stale, and a
/// restart of its container -- a liveness probe, a node reboot -- would start a second copy
/// fresh), then thaw every target container, end the target's wait for a checkpoint and mark
/// it done. With `--keep-source` the source is kept, frozen.
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
    let target = progress.target.clone().unwrap_or_default();
    let target_name = target.metadata.name.clone().unwrap_or_default();
    let mut finished = Finished::default();
    let deleted = if options.keep_source {
        annotate(
            &pods,
            &options.pod,
            &progress.id,
            "done-kept",
            Some(&target_name),
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
        retry(|| async {
            match pods.delete(&options.pod, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        })
        .await
    };
    fault::stage("source-deleted");
    for container in &progress.containers {
        retry(|| launchers.thaw(&target, container))
            .await
            .map_err(|error| MigrateError::AfterCommit {
                what: format!("cannot thaw container {container} of pod {target_name}: {error}"),
            })?;
    }
    finished
        .warnings
        .extend(end_wait(&pods, &target_name).await);
    // Now that its app runs, the target may take Service traffic.
    if let Err(error) = retry(|| set_serving(&pods, &target_name, true)).await {
        finished.warnings.push(format!(
            "cannot mark pod {target_name} ready for Service traffic ({error}): until then its Services skip it: kubectl patch pod {target_name} --subresource=status --type=strategic -p '{{\"status\":{{\"conditions\":[{{\"type\":\"{}\",\"status\":\"True\"}}]}}}}'",
            annotations::SERVING
        ));
    }
    annotate(
        &pods,
        &target_name,
        &progress.id,
        "done",
        Some(&options.pod),
    )
    .await;
    deleted.map_err(|error| MigrateError::AfterCommit {
        what: format!("cannot delete the source pod {}: {error}", options.pod),
    })?;
    finished.source_deleted = !options.keep_source;
    Ok(finished)
}

/// Ends the target's wait for a checkpoint (`annotations::WAIT_FOR_CHECKPOINT`, read by its
/// launchers through the downward API at every container start): from now on a restarted
/// container starts its app fresh. If the API server keeps refusing, the migration goes on
/// (the app runs) and the returned warning gives the command to run.
async fn end_wait(pods: &Api<Pod>, name: &str) -> Option<String> {
    let patch = serde_json::json!({"metadata": {"annotations": {annotations::WAIT_FOR_CHECKPOINT: "false"}}});
    retry(|| async {
        pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .err()
    .map(|error| {
        format!(
            "cannot mark pod {name} as restored ({error}): until this runs, a restart of one of its containers would wait for a checkpoint instead of starting the app: kubectl annotate pod {name} {}=false --overwrite",
            annotations::WAIT_FOR_CHECKPOINT
        )
    })
}

/// Runs `step` up to [`FINISH_TRIES`] times, half a second apart; the last error if none worked.
async fn retry<F, Fut, E>(mut step: F) -> Result<(), E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let mut attempt = 1;
    loop {
        match step().await {
            Ok(()) => return Ok(()),
            Err(error) if attempt >= FINISH_TRIES => return Err(error),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// After a failure past the commit point: nothing is undone. Finishes the migration if it
/// can (within a minute), else says what holds the app and the commands that finish it.
async fn after_commit<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
) -> String {
    let target = progress
        .target
        .as_ref()
        .and_then(|t| t.metadata.name.clone())
        .unwrap_or_default();
    let ns = &connection.namespace;
    let head = format!(
        "the migration was committed before this (the target pod {target} holds the app's state), so nothing was undone"
    );
    let finishing = tokio::time::timeout(
        Duration::from_secs(60),
        finish(connection, launchers, options, progress),
    )
    .await;
    match finishing {
        Ok(Ok(finished)) => {
            let mut text = format!(
                "{head}; it was finished instead: pod {target} runs the app on node {}",
                options.target_node
            );
            if finished.source_deleted {
                text.push_str(&format!("; the source pod {} was deleted", options.pod));
            }
            for warning in finished.warnings {
                text.push_str(&format!("; warning: {warning}"));
            }
            text
        }
        outcome => {
            let why = match outcome {
                Ok(Err(error)) => error.to_string(),
                _ => "finishing took over a minute".into(),
            };
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
            format!(
                "{head}; finishing failed too ({why}); the source pod {} is frozen and holds a stale copy: never resume it. To finish, run: {}",
                options.pod,
                commands.join(" ; ")
            )
        }
    }
}

/// The commit's outcome is unknown: say how to tell, and what to run in either case.
fn commit_unknown(connection: &Connection, options: &Options, progress: &Progress) -> String {
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
    format!(
        "nothing was undone and nothing was resumed: both pods are frozen. `kubectl get pod -n {ns} {source} -o jsonpath='{{.metadata.annotations}}'` tells: if its {phase} is `committed` with id {id}, finish with `kubectl migrate resume {source}` (or: kubectl delete pod -n {ns} {source} && {thaw} && kubectl annotate pod -n {ns} {target} {wait}=false --overwrite); otherwise abort with `kubectl migrate abort {source}` (or: {rollback} && kubectl delete pod -n {ns} {target})",
        source = options.pod,
        phase = annotations::PHASE,
        id = progress.id,
        wait = annotations::WAIT_FOR_CHECKPOINT,
        thaw = containers("thaw", &target),
        rollback = containers("rollback", &options.pod),
    )
}

/// Waits for the target pod to run all its containers, failing fast on terminal states.
async fn wait_until_running(pods: &Api<Pod>, name: &str) -> Result<Pod, MigrateError> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher::watcher(pods.clone(), config));
    let mut last_note = Instant::now();
    while let Some(event) = stream.next().await {
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(watcher::Event::Delete(_)) => {
                return Err(MigrateError::TargetFailed {
                    target: name.into(),
                    reason: "it was deleted".into(),
                });
            }
            Ok(_) => continue,
            Err(error) => {
                tracing::debug!(%error, "watch error; the watcher retries");
                continue;
            }
        };
        if let Some(reason) = terminal(&pod) {
            return Err(MigrateError::TargetFailed {
                target: name.into(),
                reason,
            });
        }
        if running(&pod) {
            return Ok(pod);
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            tracing::info!(pod = name, "still waiting for the target pod to run");
            last_note = Instant::now();
        }
    }
    Err(MigrateError::TargetFailed {
        target: name.into(),
        reason: "the watch ended".into(),
    })
}

/// Whether every container the migration moves (native sidecars included) runs.
fn running(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    let runs: Vec<&str> = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .map(|c| c.name.as_str())
        .collect();
    status.phase.as_deref() == Some("Running")
        && rewrite::migrated_containers(pod)
            .iter()
            .all(|c| runs.contains(&c.as_str()))
}

/// Why a pod can no longer come up, if it cannot.
fn terminal(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(phase @ ("Failed" | "Succeeded")) = status.phase.as_deref() {
        return Some(format!(
            "it is {phase}{}",
            status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    for container in status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
    {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(reason) = waiting.and_then(|w| w.reason.as_deref())
            && matches!(
                reason,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "CrashLoopBackOff"
                    | "CreateContainerConfigError"
                    | "InvalidImageName"
                    | "CreateContainerError"
            )
        {
            return Some(format!("container {} is {reason}", container.name));
        }
    }
    None
}

/// Undoes a failed migration: delete the target, roll every source container back. Returns
/// what was done and how to finish by hand if something could not be.
pub async fn undo<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &Progress,
    error: &MigrateError,
) -> String {
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let mut done = Vec::new();
    let mut manual = Vec::new();
    if matches!(error, MigrateError::Preflight(_)) {
        return "nothing was changed".into();
    }
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
    let mut restarted = Vec::new();
    if let Some(source) = source {
        let mut nothing_frozen = false;
        for container in rewrite::migrated_containers(&source) {
            match rollback_when_idle(launchers, &source, &container).await {
                Ok(()) => done.push(format!("resumed the source app in container {container}")),
                // Never frozen (the failure came before the freeze): nothing to undo. A
                // checkpoint still in flight is not that: it is reported below.
                Err(error) if error.refusal() == Some(Refusal::NothingToRollBack) => {
                    nothing_frozen = true;
                }
                Err(error) => manual.push(format!(
                    "kubectl exec -n {} {} -c {} -- restore-launcher rollback   ({error})",
                    connection.namespace, options.pod, container
                )),
            }
        }
        // A source container that restarted meanwhile (killed mid-migration: its launcher
        // has nothing frozen) lost the state at the freeze: say so, never "kept its state".
        // The kubelet reports the restart a moment after the new container runs.
        for attempt in 0..6 {
            let now = match pods.get(&options.pod).await {
                Ok(pod) => restart_counts(&pod),
                Err(_) => restart_counts(&source),
            };
            restarted = progress
                .source_restarts
                .iter()
                .filter(|(c, before)| now.get(*c).is_some_and(|n| n > before))
                .map(|(c, _)| c.clone())
                .collect();
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
        if has_serving_gate(&source)
            && let Err(error) = set_serving(&pods, &options.pod, true).await
        {
            manual.push(format!(
                "kubectl patch pod -n {} {} --subresource=status --type=strategic -p '{{\"status\":{{\"conditions\":[{{\"type\":\"{}\",\"status\":\"True\"}}]}}}}'   (its Services skip it until then: {error})",
                connection.namespace,
                options.pod,
                annotations::SERVING
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
    // The target goes after the source is resumed: the app's way back comes first.
    if let Some(target) = &progress.target {
        let name = target.metadata.name.clone().unwrap_or_default();
        let mut attempt = 0;
        let deleted = loop {
            match pods.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(status)) if status.is_not_found() => break Ok(false),
                Err(kube::Error::Api(status)) => break Err(kube::Error::Api(status)),
                Err(_) if attempt < 9 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                }
                other => break other.map(|_| true),
            }
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
    annotate(&pods, &options.pod, &progress.id, "failed", None).await;
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
    }
    text
}

/// How long an undo waits for a source's checkpoint job to end. The launcher's job gives up
/// on an output that takes nothing for `--output-stall-timeout` (20 s by default), plus the
/// time the stream's buffers take to fill (~20 s measured over a dropped exec session).
const ROLLBACK_PATIENCE: Duration = Duration::from_secs(120);
/// How long an undo keeps trying a source launcher it cannot reach.
const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(30);

/// Rolls a source container back, waiting out a checkpoint still in flight: when the
/// migration is cut short mid-transfer, the launcher's checkpoint job only ends once it notices
/// its stream is gone, and until then it refuses a rollback as busy (and is told to stop
/// writing). Leaving it there would leave the app frozen.
async fn rollback_when_idle<L: Launchers + Sync>(
    launchers: &L,
    source: &Pod,
    container: &str,
) -> Result<(), LauncherError> {
    let deadline = tokio::time::Instant::now() + ROLLBACK_PATIENCE;
    // An exec that could not reach the launcher (the API server or the kubelet restarting) is
    // tried again for a while too; a refusal other than "busy" is an answer.
    let unreachable_until = tokio::time::Instant::now() + UNREACHABLE_PATIENCE;
    loop {
        let now = tokio::time::Instant::now();
        match launchers.rollback(source, container).await {
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

/// Merge-patches the migration annotations onto a pod; a failure is logged, not fatal.
async fn annotate(pods: &Api<Pod>, name: &str, id: &str, phase: &str, peer: Option<&str>) {
    let mut values = serde_json::Map::new();
    values.insert(annotations::MIGRATION_ID.into(), id.into());
    values.insert(annotations::PHASE.into(), phase.into());
    if let Some(peer) = peer {
        values.insert(annotations::PEER.into(), peer.into());
    }
    let patch = serde_json::json!({"metadata": {"annotations": values}});
    if let Err(error) = pods
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(%error, pod = name, "cannot annotate the pod with the migration's phase");
    }
}

async fn annotate_timings(pods: &Api<Pod>, name: &str, timings: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {annotations::TIMINGS: timings}}});
    if let Err(error) = pods
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(%error, pod = name, "cannot annotate the pod with the migration's timings");
    }
}

/// What a restored app sees of its monotonic clocks when the nodes booted at different times
/// (`from` and `to`, seconds since the epoch): CLOCK_MONOTONIC and CLOCK_BOOTTIME are the
/// target kernel's, so they jump by the difference of the two nodes' uptimes. CRIU keeps them
/// continuous only in a time namespace, which needs CAP_SYS_ADMIN (a pod does not have it).
/// Nothing to say for one second or less.
pub fn clock_jump(from: u64, to: u64) -> Option<String> {
    let jump = i128::from(from) - i128::from(to);
    (jump.abs() > 1).then(|| {
        format!(
            "the app's CLOCK_MONOTONIC and CLOCK_BOOTTIME jumped {} by {} s: the target node booted {} s {} the source's, and a restore inside the container cannot keep them continuous (a time namespace needs CAP_SYS_ADMIN). Wall-clock time is unaffected; timers and timeouts the app measures with them fire early or late once",
            if jump > 0 { "forward" } else { "backward" },
            jump.abs(),
            jump.abs(),
            if jump > 0 { "before" } else { "after" }
        )
    })
}

/// Whether `pod` declares the [`annotations::SERVING`] readiness gate.
fn has_serving_gate(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.condition_type == annotations::SERVING))
}

/// Sets the [`annotations::SERVING`] condition of pod `name` (its readiness gate): the
/// kubelet then counts the pod Ready, or not, and Services follow.
async fn set_serving(pods: &Api<Pod>, name: &str, serving: bool) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": annotations::SERVING,
        "status": if serving { "True" } else { "False" },
        "lastTransitionTime": now,
        "reason": if serving { "AppRunning" } else { "Migrating" },
    }]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map(drop)
}

/// Publishes an Event on `pod`; a failure is logged, not fatal.
async fn record(connection: &Connection, pod: &Pod, reason: &str, note: String) {
    let reporter = Reporter {
        controller: "kubectl-migrate".into(),
        instance: None,
    };
    let recorder = Recorder::new(connection.client.clone(), reporter);
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Migrate".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::warn!(%error, "cannot record the migration as an Event");
    }
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
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

/// `mig-YYYYMMDD-HHMMSS-xxxx`: unique enough per namespace, sortable.
fn new_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("mig-{}-{:04x}", now.as_secs(), now.subsec_nanos() & 0xffff)
}

/// Fault injection for the end-to-end fault matrix (`tests/tests/e2e.rs`): with
/// `KUBECTL_MIGRATE_FAULT_KILL_AT=STAGE` the plugin kills itself with SIGKILL on reaching
/// STAGE (`target-running`, `frozen`, `restored`, `acknowledged`, `committed`,
/// `source-deleted`), as a plugin dies whose laptop closed or whose terminal went away, at an
/// exact point no outside signal can hit reliably. Only in builds with the `fault-injection`
/// feature, which test builds enable and release builds never do.
mod fault {
    #[cfg(feature = "fault-injection")]
    pub fn stage(name: &str) {
        if std::env::var("KUBECTL_MIGRATE_FAULT_KILL_AT").is_ok_and(|at| at == name) {
            eprintln!("fault injection: killing the plugin with SIGKILL at stage {name}");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            // The signal is on its way; nothing more may happen here.
            loop {
                std::thread::park();
            }
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn stage(_name: &str) {}
}
