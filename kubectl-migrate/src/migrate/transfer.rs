//! Step 3, the cut and the transfer: every source container's app is frozen first (`freeze`,
//! under a lease the plugin renews while it works), so the cut is consistent across
//! containers; then, per container and all at once, the source launcher's `checkpoint` streams
//! into the target launcher's `receive` (pod to pod, or relayed through the plugin: `--transfer`),
//! which verifies and restores (frozen).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use super::{Ctx, MigrateError, Progress, advance_phase};
use crate::launchers::{Launchers, Transferred};
use crate::{retry, rewrite};

/// The frozen cut: the containers moved, and until when (and why) the app may stay frozen.
#[derive(Debug)]
pub(super) struct Cut {
    pub containers: Vec<String>,
    pub thaw_by: Option<(tokio::time::Instant, Duration)>,
    /// When each container's app stopped, by the source node's CLOCK_REALTIME (ms since the
    /// epoch), as its launcher reported it.
    pub frozen_at: BTreeMap<String, Option<u64>>,
    /// When this plugin asked for the first freeze (its monotonic clock).
    pub freeze_asked: std::time::Instant,
}

/// Freezes every container's app, each under a lease (if this plugin dies, the sources
/// resume by themselves; renewed while it works, ended by the commit).
pub(super) async fn freeze<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    progress: &mut Progress,
    source: &Pod,
    freeze_limit: Option<Duration>,
) -> Result<Cut, MigrateError> {
    let options = ctx.options;
    progress.transfer_started = true;
    // Claimed, not just written: a `kubectl migrate abort` that already marked the source
    // `aborting` (while this plugin waited for its target) must not be overwritten, or a
    // commit could follow it.
    // The restart counts at the freeze go with it: every later decision (an undo, an abort
    // run by hand, a finish) tells a container restarted since, its state lost, by them.
    // They are read from the pod this very write read: a restart just before the freeze is
    // not taken for one after it.
    let restarts = |pod: &Pod| {
        let mut values = serde_json::Map::new();
        values.insert(
            migrate_format::annotations::RESTARTS_AT_FREEZE.into(),
            serde_json::to_string(&super::restart_counts(pod))
                .unwrap_or_default()
                .into(),
        );
        values
    };
    advance_phase(
        &ctx.pods,
        &options.pod,
        &progress.id,
        super::Phase::Checkpointing,
        &restarts,
    )
    .await?;
    // No unconditional phase write after the claim (it would undo the claim's protection);
    // the target's name was recorded as the peer when the target was created.
    let containers = rewrite::migrated_containers(source);
    progress.containers.clone_from(&containers);
    // A consistent cut: every container's app is stopped before any is dumped (a checkpoint of
    // a frozen app restores frozen; all targets are thawed together after verification).
    // The freeze is bounded from before the first container stops.
    let thaw_by = freeze_limit.map(|limit| (tokio::time::Instant::now() + limit, limit));
    let freeze_asked = std::time::Instant::now();
    let mut frozen_at = BTreeMap::new();
    for container in &containers {
        // The launcher resumes the app by itself at the freeze limit, renewed or not: a plugin
        // that dies here never leaves it frozen until its liveness probe restarts it.
        let at = ctx
            .launchers
            .freeze(source, container, &progress.id, options.lease, freeze_limit)
            .await
            .map_err(|error| MigrateError::Launcher {
                container: container.clone(),
                step: "cannot freeze",
                error,
            })?;
        frozen_at.insert(container.clone(), at);
    }
    Ok(Cut {
        containers,
        thaw_by,
        frozen_at,
        freeze_asked,
    })
}

/// Makes every container's transfer ready, at once, before anything is frozen (`--transfer`:
/// the direct channels stand, or `auto` settled on the relay, saying so).
pub(super) async fn prepare<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    source: &Pod,
    target: &Pod,
) -> Result<BTreeMap<String, L::Ready>, MigrateError> {
    let containers = rewrite::migrated_containers(source);
    let preparing = containers.iter().map(|c| async move {
        (
            c.clone(),
            ctx.launchers
                .prepare(source, target, c, ctx.options.transfer)
                .await,
        )
    });
    let mut ready = BTreeMap::new();
    for (container, result) in futures::future::join_all(preparing).await {
        let prepared = result.map_err(|error| MigrateError::Transfer {
            container: container.clone(),
            error,
        })?;
        ready.insert(container, prepared);
    }
    Ok(ready)
}

/// Streams every container's checkpoint into the target at once, renewing the lease.
pub(super) async fn stream<L: Launchers + Sync>(
    ctx: &Ctx<'_, L>,
    source: &Pod,
    target: &Pod,
    cut: &Cut,
    mut ready: BTreeMap<String, L::Ready>,
) -> Result<BTreeMap<String, Transferred>, MigrateError> {
    let mut transfers = Vec::new();
    for c in &cut.containers {
        let prepared = ready.remove(c).ok_or_else(|| MigrateError::Transfer {
            container: c.clone(),
            error: "its transfer was not made ready".into(),
        })?;
        let moved = ctx.options.moved.clone();
        transfers.push(async move {
            (
                c.clone(),
                ctx.launchers
                    .transfer(source, target, c, prepared, moved)
                    .await,
            )
        });
    }
    let results = within(
        cut.thaw_by,
        leased(
            futures::future::join_all(transfers),
            keep_alive(ctx, source, cut),
        ),
    )
    .await??;
    let mut reports = BTreeMap::new();
    for (container, result) in results {
        let transferred = result.map_err(|error| MigrateError::Transfer {
            container: container.clone(),
            error,
        })?;
        reports.insert(container, transferred);
    }
    Ok(reports)
}

/// Renews the sources' lease until it fails (see [`renew_lease`]).
pub(super) fn keep_alive<'a, L: Launchers + Sync>(
    ctx: &'a Ctx<'a, L>,
    source: &'a Pod,
    cut: &'a Cut,
) -> impl Future<Output = MigrateError> + 'a {
    renew_lease(ctx.launchers, source, &cut.containers, ctx.options.lease)
}

/// Runs `work` unless the app would stay frozen past `thaw_by` (the deadline and the limit it
/// comes from): then the migration is cut short, and undone, before a liveness probe can
/// restart the frozen app.
pub(super) async fn within<T>(
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
pub(super) async fn leased<T>(
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
pub(super) async fn renew_lease<L: Launchers + Sync>(
    launchers: &L,
    source: &Pod,
    containers: &[String],
    lease: Duration,
) -> MigrateError {
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(lease / 4).await;
        for container in containers {
            // A passing fault (a dropped exec stream, an API server restarting) is tried again
            // until half the lease is gone; a refusal (the lease expired) is an answer.
            // Bounded by time, not only by tries: a renewal that hangs counts too.
            let within = (lease / 2).saturating_sub(renewed.elapsed());
            let renewal = retry::by_when(
                retry::lease_renewal(within),
                || launchers.renew(source, container, lease),
                |error| {
                    tracing::debug!(%error, "renewing the lease failed");
                    error.refusal().is_none()
                },
            );
            let error = match tokio::time::timeout_at(renewed + lease / 2, renewal).await {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(_) => crate::launchers::LauncherError::Failed(format!(
                    "no renewal got through within half the lease ({} s)",
                    (lease / 2).as_secs()
                )),
            };
            return MigrateError::LeaseLost {
                container: container.clone(),
                error,
            };
        }
        renewed = tokio::time::Instant::now();
    }
}
