//! The migration pipeline: check → target → freeze → checkpoint + transfer + restore →
//! verify → **commit** → thaw + cleanup, as one function, [`migrate`], whose `run` reads as
//! that sequence; one module per step (`target`, `transfer`, `commit`, `finish`, and `undo`
//! for what runs instead before the commit), with everything that touches containers behind
//! the [`Launchers`] seam.
//!
//! Order, and why:
//! 1. **check**: the preflight; any problem stops here, nothing changed.
//! 2. **target**: the target pod is created first and waited for (image pulled, launcher
//!    waiting), *before* the source is frozen, so none of that counts as downtime. The wait
//!    fails fast when the pod fails, cannot pull its image, crash-loops or is deleted.
//! 3. **transfer**: made ready first, before anything is frozen (`--transfer`: the direct
//!    channels between the pods stand, or the relay is settled on); then every source
//!    container's app is frozen (`freeze`), so the cut is consistent across containers; then
//!    per container and all at once, the source launcher's `checkpoint` goes into the target
//!    launcher's `receive`, pod to pod or relayed through the plugin (bounded buffer, never
//!    the whole archive in memory).
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

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Resource as _};
use migrate_format::annotations;
use serde::Serialize;

use crate::check::{self, Problem};
use crate::client::Connection;
use crate::launchers::{LauncherError, Launchers, TransferMode, Transferred};

mod commit;
mod finish;
pub mod handoff;
pub mod identity;
mod target;
mod thaw;
mod transfer;
mod undo;

pub use crate::record::{
    Claim, Phase, Plan, Variant, claim, claim_back, is_committed, peer_of, restart_counts,
    restarted_since_freeze, restarts_at_freeze, settle, take,
};
pub use finish::{clock_jump, finish};
pub use thaw::Finished;
pub use undo::undo;
pub(crate) use undo::{forward_if_the_source_lost_it, rollback_when_idle};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The migration's id, when the caller made it (the controller records it on its
    /// PodMigration before the first step); `None`: a new one ([`new_id`]).
    pub id: Option<String>,
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
    /// `--transfer`: pod to pod, through the plugin, or the first that works.
    pub transfer: TransferMode,
    /// `--lazy`: post-copy (the launchers were made with it too).
    pub lazy: bool,
}

impl Options {
    /// What the recovery commands (`abort`, `resume`) and a migration that goes forward
    /// after the fact run the undo and finish steps with; the caller sets the pod and node.
    pub fn recovery() -> Options {
        Options {
            id: None,
            pod: String::new(),
            target_node: String::new(),
            timeout: Duration::from_secs(300),
            keep_source: false,
            force: false,
            lease: Duration::from_secs(120),
            max_downtime: None,
            moved: Default::default(),
            transfer: Default::default(),
            lazy: false,
        }
    }
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
    /// Each container's transfer: both launchers' reports and the way its archive went.
    pub containers: BTreeMap<String, Transferred>,
    /// The pod's downtime as its users see it: from the first container's app stopping on the
    /// source (`freeze`) to the last one's resuming on the target (`thaw`), by the two nodes'
    /// CLOCK_REALTIME as their launchers stamp it. `None` when a launcher did not say.
    pub downtime_ms: Option<u64>,
    /// Each container's freeze → thaw, by the same clocks.
    pub container_downtime_ms: BTreeMap<String, u64>,
    /// The same span by this plugin's monotonic clock, from asking the first freeze to the last
    /// thaw's answer: an upper bound (it includes the exec round trips), with no clock skew.
    pub downtime_bound_ms: Option<u64>,
    pub bytes_moved: u64,
    pub source_deleted: bool,
    /// When the source pod's deletion was asked, by this plugin's CLOCK_REALTIME (ms since
    /// the epoch): with `--lazy`, after every container's last page arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_deleted_at_ms: Option<u64>,
    /// Post-copy (`--lazy`): each container's memory transfer after the thaw, as the target's
    /// launcher (every page arrived, when) and the source's (every page served) reported it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub post_copy: Vec<crate::launchers::PostCopyDone>,
    /// What went wrong after the app ran on the target, with the command that fixes it.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the preflight found {} problem(s); nothing was changed", .0.len())]
    Preflight(Vec<Problem>),
    #[error(
        "pod {pod} is being migrated already, by migration {by} (phase {phase}); nothing was changed. `kubectl migrate status {pod}` shows it; once no migration of it runs any more, `kubectl migrate abort {pod}` clears it"
    )]
    Claimed {
        pod: String,
        by: String,
        phase: String,
    },
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
    #[error(
        "the migration cannot go on: pod {pod} is {phase} already (a `kubectl migrate abort` ran meanwhile?)"
    )]
    CommitTaken { pod: String, phase: String },
    #[error("the outcome of recording the commit on pod {pod} is unknown")]
    CommitUnknown {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}")]
    AfterCommit { what: String },
    /// Past the commit, the target's launcher holds no restored app any more (its container
    /// restarted): the source, untouched, is the way back (`resume --from-source`).
    #[error("{what}")]
    TargetLost { what: String },
    /// A target container's thaw failed (see `finish::lost_or_failed`).
    #[error("cannot thaw container {container}: {error}")]
    ThawRefused {
        container: String,
        error: LauncherError,
    },
    /// Post-copy failed past the commit: the target's app was killed, and the source, which
    /// still holds the app as of the freeze, must be resumed, never deleted.
    #[error("{what}")]
    PostCopyFailed { what: String },
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
    pub aftermath: Aftermath,
}

/// What a failed migration left behind, decided where it happened: the CLI prints its text
/// under the cause, the controller records it as it is (it never reads the pods again to
/// find out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aftermath {
    /// Refused before it touched anything: the preflight, or another migration's claim.
    Untouched { text: String },
    /// Undone: the target is gone, the source runs (`restarted`: it started fresh meanwhile,
    /// its state at the freeze lost, and `text` says so).
    Undone { text: String, restarted: bool },
    /// The undo could not finish: `text` ends with the commands that do.
    UndoIncomplete { text: String },
    /// Another command settled this migration (or another migration took the pod) while it
    /// ran: this one stopped touching anything.
    Superseded { text: String },
    /// Finished after all: past the commit, or gone forward because the source lost the app.
    Finished { target: String, text: String },
    /// Committed, not finished: `text` names what holds the app and what finishes.
    Stuck { text: String },
    /// Committed, but the target lost the app (or post-copy failed): the source is kept,
    /// frozen; going back to it is a person's decision (`text` gives the commands).
    SourceKept { text: String },
    /// Whether the commit was recorded is unknown: `text` says how to tell, and what to run.
    CommitUnknown { text: String },
}

impl Aftermath {
    /// What the user reads.
    pub fn text(&self) -> &str {
        match self {
            Aftermath::Untouched { text }
            | Aftermath::Undone { text, .. }
            | Aftermath::UndoIncomplete { text }
            | Aftermath::Superseded { text }
            | Aftermath::Finished { text, .. }
            | Aftermath::Stuck { text }
            | Aftermath::SourceKept { text }
            | Aftermath::CommitUnknown { text } => text,
        }
    }
}

impl std::fmt::Display for Aftermath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
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
    /// How the pod moves (decided by the preflight, recorded on the pods with the claim).
    pub plan: Plan,
    pub target: Option<Pod>,
    pub transfer_started: bool,
    /// Past the point of no return: the commit is recorded on the source pod.
    pub committed: bool,
    /// The source pod records this migration ([`take`]): only then may an undo touch it.
    pub claimed: bool,
    /// The app containers moved (set by the commit, for finishing).
    pub containers: Vec<String>,
    /// The source's containers' restart counts when the migration started: a container that
    /// restarted meanwhile lost the state the undo would resume.
    pub source_restarts: BTreeMap<String, i32>,
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
        id: options.id.clone().unwrap_or_else(new_id),
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
                Box::pin(finish::after_commit(
                    connection, launchers, options, &progress, &error,
                ))
                .await
            } else if matches!(error, MigrateError::CommitUnknown { .. }) {
                commit::commit_unknown(connection, options, &progress)
            } else {
                Box::pin(undo(connection, launchers, options, &progress, &error)).await
            };
            Err(Failed { error, aftermath })
        }
    }
}

/// What every step works with.
struct Ctx<'a, L> {
    connection: &'a Connection,
    launchers: &'a L,
    options: &'a Options,
    pods: Api<Pod>,
}

/// Per-phase durations, in order.
struct Laps {
    phases: Vec<(String, u64)>,
    lap: Instant,
}

impl Laps {
    fn done(&mut self, name: &str) {
        self.phases
            .push((name.to_string(), self.lap.elapsed().as_millis() as u64));
        self.lap = Instant::now();
    }
}

/// The pipeline, step by step; `progress` says how far it got (what an undo or a finish
/// needs).
async fn run<L: Launchers + Sync>(
    connection: &Connection,
    launchers: &L,
    options: &Options,
    progress: &mut Progress,
) -> Result<Report, MigrateError> {
    let ctx = Ctx {
        connection,
        launchers,
        options,
        pods: Api::namespaced(connection.client.clone(), &connection.namespace),
    };
    let mut laps = Laps {
        phases: Vec::new(),
        lap: Instant::now(),
    };

    progress.phase = "check".into();
    let checked = check_step(&ctx).await?;
    progress.source_restarts = restart_counts(&checked.source);
    // One claim per pod, before anything is created: a second migration stops here.
    progress.plan = checked.plan;
    match take(&ctx.pods, &options.pod, &progress.id, checked.plan).await {
        Ok(()) => {}
        Err(Claim::Taken { phase, by }) => {
            return Err(MigrateError::Claimed {
                pod: options.pod.clone(),
                by: by.unwrap_or_else(|| "(its id is not recorded)".into()),
                phase: crate::record::phase_text(phase).into(),
            });
        }
        Err(Claim::Api(source)) => {
            return Err(MigrateError::Api {
                step: "claiming the pod for the migration",
                source,
            });
        }
    }
    progress.claimed = true;
    laps.done("check");
    let source = checked.source;
    let plan = checked.plan;

    // Where the app goes: a new target pod, or for a StatefulSet's pod a holder on the
    // target node (and the guard that keeps the StatefulSet from recreating the pod fresh).
    progress.phase = "creating the target".into();
    let target = match plan.variant {
        Variant::Plain | Variant::Handoff => target::create(&ctx, progress, &source).await?,
        Variant::StatefulSet => identity::hold(&ctx, progress, &source).await?,
    };
    laps.done("target");
    fault::stage("target-running");
    fault::pause("target-running").await;

    // Before anything is frozen: the direct channels stand (or the relay is settled on).
    progress.phase = "preparing the transfer".into();
    let ready = match plan.variant {
        Variant::StatefulSet => BTreeMap::new(),
        Variant::Plain | Variant::Handoff => transfer::prepare(&ctx, &source, &target).await?,
    };
    laps.done("transfer setup");

    progress.phase = "checkpoint and transfer".into();
    let cut = transfer::freeze(&ctx, progress, &source, checked.freeze_limit).await?;
    fault::stage("frozen");
    // Restored (frozen) in the target, or parked in the holder.
    let reports = match plan.variant {
        Variant::Plain | Variant::Handoff => {
            transfer::stream(&ctx, &source, &target, &cut, ready).await?
        }
        Variant::StatefulSet => identity::park(&ctx, &source, &target, &cut).await?,
    };
    laps.done("checkpoint+transfer+restore");

    progress.phase = "verify".into();
    let target_boot_time = match plan.variant {
        Variant::Plain | Variant::Handoff => commit::verify(&ctx, &source, &target, &cut).await?,
        Variant::StatefulSet => identity::verify(&ctx, &target).await.map(|()| None)?,
    };
    fault::stage("restored");
    commit::acknowledge(&ctx, &source, &cut).await?;
    laps.done("verify");
    fault::stage("acknowledged");

    // The point of no return: from here the target holds the app's state, and nothing undoes
    // the migration any more; failures are retried or reported with the commands that finish.
    progress.phase = "commit".into();
    commit::commit(&ctx.pods, &options.pod, &progress.id).await?;
    progress.committed = true;
    laps.done("commit");
    fault::stage("committed");

    // `finish` takes the variant's own way (see there).
    progress.phase = "thaw and cleanup".into();
    let mut finished = Box::pin(finish(connection, launchers, options, progress)).await?;
    if let (Some(&from), Some(to)) = (checked.boot_times.first(), target_boot_time) {
        finished.warnings.extend(clock_jump(from, to));
    }
    laps.done("thaw+cleanup");

    // A StatefulSet's pod runs under its own name, restored from what was parked.
    let (target_name, reports) = match plan.variant {
        Variant::Plain | Variant::Handoff => {
            (target.metadata.name.clone().unwrap_or_default(), reports)
        }
        Variant::StatefulSet => (
            options.pod.clone(),
            identity::restored_from_parked(reports, &finished),
        ),
    };
    let downtime = Downtime::of(&cut, &finished);
    let timings = serde_json::to_string(&laps.phases).unwrap_or_default();
    annotate_timings(&ctx.pods, &target_name, &timings).await;
    if plan.variant != Variant::StatefulSet {
        record(
            connection,
            &target,
            "MigrationDone",
            format!(
                "restored from {} in {} ms of downtime (freeze → thaw)",
                options.pod,
                downtime
                    .pod_ms
                    .or(downtime.bound_ms)
                    .map_or("?".into(), |d| d.to_string())
            ),
        )
        .await;
    }
    Ok(Report::assemble(
        progress,
        options,
        target_name,
        laps,
        reports,
        downtime,
        finished,
    ))
}

impl Report {
    /// The report of a migration that finished: its phases, each container's transfer, the
    /// downtime, and what finishing did.
    fn assemble(
        progress: &Progress,
        options: &Options,
        target: String,
        laps: Laps,
        containers: BTreeMap<String, Transferred>,
        downtime: Downtime,
        finished: Finished,
    ) -> Report {
        Report {
            id: progress.id.clone(),
            source: options.pod.clone(),
            target,
            node: options.target_node.clone(),
            phases: laps.phases,
            containers,
            downtime_ms: downtime.pod_ms,
            container_downtime_ms: downtime.containers,
            downtime_bound_ms: downtime.bound_ms,
            bytes_moved: options.moved.load(Ordering::Relaxed),
            source_deleted: finished.source_deleted,
            source_deleted_at_ms: finished.source_deleted_at_ms,
            post_copy: finished.post_copy,
            warnings: finished.warnings,
        }
    }
}

/// Freeze → thaw, per container and for the pod (see [`Report::downtime_ms`]).
struct Downtime {
    pod_ms: Option<u64>,
    containers: BTreeMap<String, u64>,
    bound_ms: Option<u64>,
}

impl Downtime {
    fn of(cut: &transfer::Cut, finished: &Finished) -> Downtime {
        let mut containers = BTreeMap::new();
        for (container, frozen) in &cut.frozen_at {
            let thawed = finished.thawed_at.get(container).copied().flatten();
            if let (Some(frozen), Some(thawed)) = (frozen, thawed) {
                containers.insert(container.clone(), thawed.saturating_sub(*frozen));
            }
        }
        let all_stamped = !cut.frozen_at.is_empty()
            && containers.len() == cut.frozen_at.len()
            && finished.thawed_at.len() == cut.frozen_at.len();
        let first_frozen = cut.frozen_at.values().flatten().min();
        let last_thawed = finished.thawed_at.values().flatten().max();
        let bound_ms = finished
            .thaw_answered
            .map(|at| at.duration_since(cut.freeze_asked).as_millis() as u64);
        let pod_ms = match (all_stamped, first_frozen, last_thawed) {
            (true, Some(frozen), Some(thawed)) if thawed >= frozen => Some(thawed - frozen),
            _ => None,
        };
        // The stamps come from two nodes' clocks; the plugin's own span bounds them. Stamps
        // that disagree with it (a thaw before the freeze, a span longer than the bracket)
        // say the nodes' clocks are apart: the bound is the honest figure then.
        let pod_ms = match (pod_ms, bound_ms) {
            (Some(stamped), Some(bound)) if stamped > bound => {
                tracing::warn!(
                    stamped,
                    bound,
                    "the nodes' clocks disagree (freeze → thaw is longer than the plugin saw); reporting the plugin's span"
                );
                Some(bound)
            }
            (None, Some(bound)) if all_stamped => {
                tracing::warn!(
                    "the nodes' clocks disagree (a thaw stamped before its freeze); reporting the plugin's span"
                );
                Some(bound)
            }
            (stamped, _) => stamped,
        };
        Downtime {
            pod_ms,
            containers,
            bound_ms,
        }
    }
}

/// What the preflight established for the steps after it.
struct Checked {
    source: Pod,
    /// How long the app may stay frozen (what its liveness probes or `--max-downtime` allow).
    freeze_limit: Option<Duration>,
    /// The source node's boot time, as its launchers report it.
    boot_times: Vec<u64>,
    /// How the pod moves: decided here, once.
    plan: Plan,
}

/// Step 1, the preflight (`crate::check`): any problem stops here, nothing changed.
async fn check_step<L: Launchers + Sync>(ctx: &Ctx<'_, L>) -> Result<Checked, MigrateError> {
    let options = ctx.options;
    let facts = check::gather(
        &ctx.connection.client,
        &ctx.connection.namespace,
        &options.pod,
        &options.target_node,
        ctx.launchers,
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
    facts.lazy = options.lazy;
    for note in check::notes(&facts) {
        tracing::warn!("{note}");
    }
    let mut problems = check::problems(&facts);
    let plan = Plan {
        variant: if facts.stateful_set.is_some() {
            Variant::StatefulSet
        } else if check::pod::controller(&facts.pod).is_some() {
            Variant::Handoff
        } else {
            Variant::Plain
        },
        post_copy: options.lazy,
    };
    if plan.variant == Variant::StatefulSet && options.transfer == TransferMode::Direct {
        problems.push(Problem::new(
            format!(
                "pod {} is a StatefulSet's: its checkpoint is parked in a holder pod through this plugin (the relay), not sent pod to pod",
                options.pod
            ),
            "migrate without --transfer direct",
        ));
    }
    if !problems.is_empty() {
        return Err(MigrateError::Preflight(problems));
    }
    Ok(Checked {
        plan,
        freeze_limit: check::pod::freeze_limit(&facts),
        boot_times: facts
            .launchers
            .values()
            .filter_map(|s| s.as_ref().ok().and_then(|s| s.boot_time))
            .collect(),
        source: facts.pod,
    })
}

/// Moves the source's phase on to `to` through the claim (with `extra`'s annotations): an
/// `abort` that settled the migration meanwhile is never overwritten, and stops it.
async fn advance_phase(
    pods: &Api<Pod>,
    source: &str,
    id: &str,
    to: Phase,
    extra: crate::record::Extra<'_>,
) -> Result<(), MigrateError> {
    match crate::record::claim_with(pods, source, id, to, extra).await {
        Ok(()) => Ok(()),
        Err(Claim::Taken { phase, by }) => Err(MigrateError::CommitTaken {
            pod: source.into(),
            phase: Claim::phase_text(phase, by.as_deref()),
        }),
        Err(Claim::Api(error)) => {
            tracing::warn!(%error, phase = to.as_str(), "cannot record the phase on the source");
            Ok(())
        }
    }
}

/// Merge-patches the migration annotations onto a pod; a failure is logged, not fatal.
async fn annotate(pods: &Api<Pod>, name: &str, id: &str, phase: Phase, peer: Option<&str>) {
    let mut values = serde_json::Map::new();
    values.insert(annotations::MIGRATION_ID.into(), id.into());
    values.insert(annotations::PHASE.into(), phase.as_str().into());
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

/// `mig-SECONDS-xxxx`: unique enough per namespace, sortable.
pub fn new_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("mig-{}-{:04x}", now.as_secs(), now.subsec_nanos() & 0xffff)
}

/// Fault injection for the end-to-end fault matrix (`tests/tests/e2e.rs`): with
/// `KUBECTL_MIGRATE_FAULT_KILL_AT=STAGE` the plugin kills itself with SIGKILL on reaching
/// STAGE (`target-running`, `frozen`, `restored`, `acknowledged`, `committed`,
/// `source-deleted`; for a StatefulSet's pod `guarded`, `frozen`, `parked`, `acknowledged`,
/// `committed`, `source-gone`, `unparked`), as a plugin dies whose laptop closed or whose terminal went away, at an
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

    /// With `KUBECTL_MIGRATE_FAULT_PAUSE_AT=STAGE:SECONDS` the plugin waits that long on
    /// reaching STAGE: a slow image pull, a busy API server, a plugin on a slow link, made
    /// exact (the target waits for its checkpoint meanwhile).
    #[cfg(feature = "fault-injection")]
    pub async fn pause(name: &str) {
        let wanted = std::env::var("KUBECTL_MIGRATE_FAULT_PAUSE_AT").ok();
        if let Some((stage, seconds)) = wanted.as_deref().and_then(|w| w.split_once(':'))
            && stage == name
            && let Ok(seconds) = seconds.parse::<u64>()
        {
            eprintln!("fault injection: pausing {seconds} s at stage {name}");
            tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub async fn pause(_name: &str) {}
}
