//! Before the commit, any failure, deadline or interruption undoes: the sources are resumed
//! first (their app's way back), then the target is deleted. Reads, rollbacks and deletes are
//! tried again for a while (the fault may be the API server restarting); what cannot be done
//! is named with the command that does it; a source container that restarted meanwhile is
//! reported as such, never as "kept its state".

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use migrate_format::Refusal;

use super::commit::retry_get;
use super::{MigrateError, Options, Progress, record, restart_counts};
use crate::client::Connection;
use crate::launchers::{LauncherError, Launchers};
use crate::rewrite;

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
    // Never touch what this migration does not hold: refused by the preflight, or the pod
    // is another migration's.
    if !progress.claimed
        || matches!(
            error,
            MigrateError::Preflight(_) | MigrateError::Claimed { .. }
        )
    {
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
    let source_owner_kind = source
        .as_ref()
        .and_then(crate::check::pod::controller)
        .map(|o| o.kind.clone());
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
        // The baseline: the counts recorded on the source at the freeze (an abort run later
        // knows them only from there), else those the preflight saw.
        let baseline =
            super::restarts_at_freeze(&source).unwrap_or_else(|| progress.source_restarts.clone());
        for attempt in 0..6 {
            let now = match pods.get(&options.pod).await {
                Ok(pod) => restart_counts(&pod),
                Err(_) => restart_counts(&source),
            };
            restarted = baseline
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
    // A StatefulSet pod's move: its guard goes with the holder (also when the holder is gone
    // already: a guard left behind keeps the StatefulSet from ever recreating the pod).
    let stateful = progress
        .target
        .as_ref()
        .is_some_and(super::identity::is_holder)
        || source_owner_kind.as_deref() == Some("StatefulSet");
    if stateful {
        let guard = super::identity::guard::name(&progress.id);
        match super::identity::guard::remove(&connection.client, &progress.id).await {
            Ok(()) => done.push(format!("deleted the admission policy {guard}")),
            Err(error) => manual.push(format!(
                "kubectl delete validatingadmissionpolicybinding,validatingadmissionpolicy {guard}   ({error})"
            )),
        }
    }
    // `failed` ends the migration in `kubectl migrate status`: written only once nothing is
    // left to do by hand (else the frozen source must stay listed, with its command), and only
    // while the source still records this migration.
    if manual.is_empty()
        && let Err(super::Claim::Api(error)) =
            super::commit::settle(&pods, &options.pod, &progress.id, "failed").await
        && !matches!(&error, kube::Error::Api(status) if status.is_not_found())
    {
        tracing::warn!(%error, pod = options.pod, "cannot record the undone migration on the source");
    }
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

/// Rolls a source container back (`--committed`: a source that acknowledged the commit before
/// the commit was recorded is this migration's to resume, since the record, not the launcher,
/// decides; only the claim's owner gets here), waiting out a checkpoint still in flight: when the
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
        match launchers.rollback(source, container, true).await {
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
