//! `kubectl migrate drain NODE`: empty a node the way `kubectl drain` does, except that every
//! pod that can be migrated is migrated (its memory goes with it) instead of evicted.
//!
//! 1. **cordon**: the node is marked unschedulable, so nothing new lands on it;
//! 2. **plan**: each pod on it gets an action. DaemonSet pods and static pods are skipped (the
//!    DaemonSet runs one on every node; a static pod belongs to its node's kubelet), pods that
//!    are already terminating are left to finish. Every other pod is checked by the same
//!    preflight as `kubectl migrate` ([`crate::check`]) against `--to`, or else against every
//!    other node in name order: the first node with no problem (Ready, schedulable, room for
//!    its requests, taints tolerated, affinity and selectors, OS and architecture, kernel) is
//!    its target. A pod that fits no node -- no launcher, a Job's, a ReadWriteOnce claim -- is
//!    evicted, or left with `--migrate-only`;
//! 3. **migrate**: up to `--parallel` pods at once, each through the same pipeline as `kubectl
//!    migrate` ([`crate::migrate`]), so a failure rolls that pod back (it keeps running where
//!    it was) and does not stop the others;
//! 4. **evict**: the rest through the Eviction API, which honours PodDisruptionBudgets: a
//!    refused eviction (HTTP 429) is retried until `--eviction-timeout`, then reported as failed;
//!    an accepted one is waited for until the pod is gone.
//!
//! The caller prints a line per pod as it is done and the final table; the exit code says
//! whether every pod that was to leave the node left it.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{EvictParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

use crate::check;
use crate::client::Connection;
use crate::exec::ExecLaunchers;
use crate::launchers::TransferMode;
use crate::migrate;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub node: String,
    /// `--to`: every pod's target; None: the first node that fits each pod.
    pub to: Option<String>,
    /// `--parallel`: how many migrations run at once.
    pub parallel: usize,
    /// `--dry-run`: say what would happen; change nothing (not even the cordon).
    pub dry_run: bool,
    /// `--migrate-only`: pods that cannot be migrated stay; nothing is evicted.
    pub migrate_only: bool,
    /// `--force`: evict pods that no controller owns too (nothing recreates them), as
    /// `kubectl drain --force` does.
    pub force: bool,
    /// `--delete-emptydir-data`: evict pods with emptyDir volumes too (their data is lost), as
    /// `kubectl drain --delete-emptydir-data` does.
    pub delete_emptydir_data: bool,
    /// `--eviction-timeout`: how long a PodDisruptionBudget may keep refusing an eviction.
    pub eviction_timeout: Duration,
    /// `--timeout`: each migration's deadline.
    pub timeout: Duration,
    /// `--lease`, as for `kubectl migrate`.
    pub lease: Duration,
    /// `--transfer`, as for `kubectl migrate`.
    pub transfer: TransferMode,
}

/// What happened to one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Migrated {
        target: String,
        node: String,
        downtime_ms: Option<u64>,
    },
    Evicted,
    /// Left on the node, and why (a DaemonSet's, a static pod, `--migrate-only`…).
    Skipped(String),
    /// Still on the node, and why.
    Failed(String),
    /// `--dry-run`: where it would go.
    WouldMigrate {
        node: String,
    },
    /// `--dry-run`: it would be evicted, and why it cannot be migrated.
    WouldEvict(String),
}

impl Action {
    /// The table's word for it.
    pub fn word(&self) -> &'static str {
        match self {
            Action::Migrated { .. } => "migrated",
            Action::Evicted => "evicted",
            Action::Skipped(_) => "skipped",
            Action::Failed(_) => "failed",
            Action::WouldMigrate { .. } => "would-migrate",
            Action::WouldEvict(_) => "would-evict",
        }
    }
}

/// One pod of the drained node and what was done with it.
#[derive(Debug, Clone)]
pub struct Row {
    pub namespace: String,
    pub pod: String,
    /// `Kind/name` of its controller, or `-`.
    pub owner: String,
    pub action: Action,
}

impl Row {
    /// The node it went to, if it was migrated (or would be).
    pub fn target_node(&self) -> Option<&str> {
        match &self.action {
            Action::Migrated { node, .. } | Action::WouldMigrate { node } => Some(node),
            _ => None,
        }
    }
}

/// Whether the drain did everything it was to do: no pod failed.
pub fn succeeded(rows: &[Row]) -> bool {
    rows.iter().all(|r| !matches!(r.action, Action::Failed(_)))
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("node {0} does not exist; `kubectl get nodes` lists them")]
    NoNode(String),
    #[error("{step} failed")]
    Api {
        step: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// What the plan gave each pod, before anything moves.
enum Plan {
    Migrate(String),
    Evict(String),
    Done(Action),
}

/// Drains `options.node`; `done` hears of each pod as it is dealt with. Returns every pod's row.
/// `evictions` is a client that does not retry on its own (see [`evict`]). Ctrl-C undoes the
/// migrations under way (as `kubectl migrate` does), starts no more, and evicts nothing.
///
/// # Errors
/// When the node does not exist, or it cannot be cordoned or its pods listed.
pub async fn drain(
    client: &Client,
    evictions: &Client,
    server: &str,
    options: &Options,
    done: impl Fn(&Row),
) -> Result<Vec<Row>, DrainError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let api = |step| move |source| DrainError::Api { step, source };
    if nodes
        .get_opt(&options.node)
        .await
        .map_err(api("reading the node"))?
        .is_none()
    {
        return Err(DrainError::NoNode(options.node.clone()));
    }
    if !options.dry_run {
        let cordon = serde_json::json!({"spec": {"unschedulable": true}});
        nodes
            .patch(
                &options.node,
                &PatchParams::default(),
                &Patch::Merge(&cordon),
            )
            .await
            .map_err(api("cordoning the node (patch nodes)"))?;
    }
    let candidates: Vec<String> = match &options.to {
        Some(to) => vec![to.clone()],
        None => other_nodes(&nodes, Some(&options.node))
            .await
            .map_err(api("listing the nodes"))?,
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let mut on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={}", options.node)))
        .await
        .map_err(api("listing the node's pods"))?
        .items;
    on_node.sort_by_key(|p| (p.namespace().unwrap_or_default(), p.name_any()));

    let mut rows = Vec::new();
    let mut to_migrate = Vec::new();
    let mut to_evict = Vec::new();
    for pod in on_node {
        let row = Row {
            namespace: pod.namespace().unwrap_or_default(),
            pod: pod.name_any(),
            owner: check::pod::controller(&pod)
                .map_or_else(|| "-".into(), |o| format!("{}/{}", o.kind, o.name)),
            action: Action::Evicted,
        };
        match plan(client, &pod, &candidates).await {
            Plan::Done(action) => finish_row(&mut rows, row, action, &done),
            Plan::Migrate(node) if options.dry_run => {
                finish_row(&mut rows, row, Action::WouldMigrate { node }, &done);
            }
            Plan::Migrate(node) => to_migrate.push((row, node)),
            Plan::Evict(why) if options.migrate_only => finish_row(
                &mut rows,
                row,
                Action::Skipped(format!("--migrate-only; cannot migrate: {why}")),
                &done,
            ),
            Plan::Evict(why) => match eviction_refused(&pod, options) {
                Some(refusal) => finish_row(&mut rows, row, Action::Failed(refusal), &done),
                None if options.dry_run => {
                    finish_row(&mut rows, row, Action::WouldEvict(why), &done);
                }
                None => to_evict.push((row, why)),
            },
        }
    }

    // One Ctrl-C for the whole drain: every migration under way undoes itself, and nothing
    // new starts.
    let (interrupt, interrupted) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: undoing the migrations under way; nothing else starts");
            let _ = interrupt.send(true);
        }
    });
    let stopped = || *interrupted.borrow();
    // Pods of one controller move one after another: the handoff needs the controller's other
    // pods steady, which a frozen sibling is not.
    let mut chains: Vec<Vec<(Row, String)>> = Vec::new();
    for (row, node) in to_migrate {
        let key = (row.namespace.clone(), row.owner.clone());
        match chains
            .iter_mut()
            .find(|c| row.owner != "-" && (c[0].0.namespace.clone(), c[0].0.owner.clone()) == key)
        {
            Some(chain) => chain.push((row, node)),
            None => chains.push(vec![(row, node)]),
        }
    }
    let (finished_tx, mut finished_rx) = tokio::sync::mpsc::unbounded_channel();
    let signal = interrupted.clone();
    // The stream owns the sender: once every chain is done the reporting loop ends.
    let migrations = futures::stream::iter(chains)
        .map(move |chain| {
            let finished = finished_tx.clone();
            let interrupted = signal.clone();
            async move {
                for (row, node) in chain {
                    let action = if *interrupted.borrow() {
                        Action::Skipped("interrupted (Ctrl-C) before its turn".into())
                    } else {
                        let mut signal = interrupted.clone();
                        let cancelled = async move {
                            let _ = signal.wait_for(|stop| *stop).await;
                        };
                        migrate_one(client, server, options, &row, &node, cancelled).await
                    };
                    let _ = finished.send((row, action));
                }
            }
        })
        .buffer_unordered(options.parallel.max(1))
        .collect::<Vec<()>>();
    let reporting = async {
        while let Some((row, action)) = finished_rx.recv().await {
            finish_row(&mut rows, row, action, &done);
        }
    };
    futures::join!(migrations, reporting);
    for (row, why) in to_evict {
        let action = if stopped() {
            Action::Skipped("interrupted (Ctrl-C): not evicted".into())
        } else {
            evict(evictions, &row, options.eviction_timeout, &why).await
        };
        finish_row(&mut rows, row, action, &done);
    }
    Ok(rows)
}

/// Why a pod that cannot be migrated is not evicted either, as `kubectl drain` refuses: no
/// controller would recreate it (unless `--force`), or its emptyDir data would be lost (unless
/// `--delete-emptydir-data`).
fn eviction_refused(pod: &Pod, options: &Options) -> Option<String> {
    if options.migrate_only {
        return None;
    }
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if check::pod::controller(pod).is_none() && !options.force && !finished {
        return Some(
            "it cannot be migrated and no controller owns it, so an eviction deletes it for good: pass --force to evict it anyway".into(),
        );
    }
    let empty_dir = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .find(|v| v.empty_dir.is_some());
    if let Some(volume) = empty_dir
        && !options.delete_emptydir_data
        && !finished
    {
        return Some(format!(
            "it cannot be migrated and its emptyDir volume {} would be lost with an eviction: pass --delete-emptydir-data to evict it anyway",
            volume.name
        ));
    }
    None
}

fn finish_row(rows: &mut Vec<Row>, mut row: Row, action: Action, done: &impl Fn(&Row)) {
    row.action = action;
    done(&row);
    rows.push(row);
}

/// The plan for one pod: left alone, migrated to the first candidate node the preflight finds
/// no problem with, or evicted (with the preflight's first reason against the first node).
async fn plan(client: &Client, pod: &Pod, candidates: &[String]) -> Plan {
    if let Some(why) = left_alone(pod) {
        return Plan::Done(Action::Skipped(why));
    }
    // A pod in the middle of a migration (a frozen source, a waiting target) is neither moved
    // nor evicted: evicting it could lose the app.
    let migration = pod
        .annotations()
        .get(migrate_format::annotations::PHASE)
        .map(String::as_str);
    if migration.is_some_and(|phase| {
        !matches!(
            crate::record::Phase::parse(phase),
            Some(
                crate::record::Phase::Done
                    | crate::record::Phase::DoneKept
                    | crate::record::Phase::Failed
            )
        )
    }) {
        return Plan::Done(Action::Failed(format!(
            "a migration of it has not finished (phase {}): `kubectl migrate status -n {}` says how to finish or undo it; then drain again",
            migration.unwrap_or_default(),
            pod.namespace().unwrap_or_default()
        )));
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Plan::Evict(format!("it has finished ({})", phase.unwrap_or_default()));
    }
    match first_fitting_node(client, pod, candidates).await {
        Ok(node) => Plan::Migrate(node),
        Err(reason) => Plan::Evict(reason),
    }
}

/// Why a drain leaves `pod` where it is without planning it (the same for `drain` and a
/// node drained by label): terminating, a static pod, a DaemonSet's.
pub fn left_alone(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Some("already terminating".into());
    }
    if check::pod::is_mirror(pod) {
        return Some("static pod: its node's kubelet runs it".into());
    }
    if check::pod::controller(pod).is_some_and(|o| o.kind == "DaemonSet") {
        return Some("DaemonSet pod: the DaemonSet runs one on every node".into());
    }
    None
}

/// The nodes a pod on `this` node may go to, in the order they are tried: every other node,
/// by name.
///
/// # Errors
/// When the nodes cannot be listed.
pub async fn other_nodes(
    nodes: &Api<Node>,
    this: Option<&str>,
) -> Result<Vec<String>, kube::Error> {
    let mut names: Vec<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .filter(|n| Some(n.as_str()) != this)
        .collect();
    names.sort();
    Ok(names)
}

/// The first of `candidates` the preflight finds no problem with for `pod` (how `drain`, and
/// the controller for a PodMigration without a target node, pick one), or else the first
/// reason against the first candidate.
///
/// # Errors
/// That reason, or "there is no other node".
pub async fn first_fitting_node(
    client: &Client,
    pod: &Pod,
    candidates: &[String],
) -> Result<String, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let launchers = ExecLaunchers {
        client: client.clone(),
        lazy: false,
        post_copies: Default::default(),
    };
    let mut first_reason = None;
    for node in candidates {
        let reason =
            match check::gather(client, &namespace, &pod.name_any(), node, &launchers, false).await
            {
                Ok(Ok(facts)) => check::problems(&facts)
                    .first()
                    .map(|p| format!("{} (to {node})", p.what)),
                Ok(Err(problem)) => Some(problem.what),
                Err(error) => Some(format!("the preflight could not read the cluster: {error}")),
            };
        match reason {
            None => return Ok(node.clone()),
            Some(reason) => {
                first_reason.get_or_insert(reason);
            }
        }
    }
    Err(first_reason.unwrap_or_else(|| "there is no other node".into()))
}

/// One pod's migration, through the same pipeline as `kubectl migrate`.
async fn migrate_one(
    client: &Client,
    server: &str,
    options: &Options,
    row: &Row,
    node: &str,
    interrupted: impl std::future::Future<Output = ()>,
) -> Action {
    let connection = Connection {
        client: client.clone(),
        namespace: row.namespace.clone(),
        server: server.into(),
    };
    let launchers = ExecLaunchers {
        client: client.clone(),
        lazy: false,
        post_copies: Default::default(),
    };
    let migration = migrate::Options {
        id: None,
        pod: row.pod.clone(),
        target_node: node.into(),
        timeout: options.timeout,
        keep_source: false,
        force: false,
        lease: options.lease,
        max_downtime: None,
        moved: Default::default(),
        transfer: options.transfer,
        lazy: false,
    };
    match migrate::migrate(&connection, &launchers, &migration, interrupted).await {
        Ok(report) => Action::Migrated {
            target: report.target,
            node: report.node,
            downtime_ms: report.downtime_ms,
        },
        Err(failed) => Action::Failed(format!("migration to {node} failed: {failed}")),
    }
}

/// Evicts one pod through the Eviction API, as `kubectl drain` does: while a
/// PodDisruptionBudget refuses (HTTP 429), again every 5 s for up to `patience`; then waits
/// until the pod is gone. `client` must not retry on its own: the default client retries a 429
/// with a backoff growing to minutes, which would hide the refusal and overrun `patience`.
async fn evict(client: &Client, row: &Row, patience: Duration, why: &str) -> Action {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &row.namespace);
    let uid = match pods.get_opt(&row.pod).await {
        Ok(Some(pod)) => pod.uid(),
        Ok(None) => return Action::Evicted,
        Err(error) => return Action::Failed(format!("cannot read it: {error}")),
    };
    let start = Instant::now();
    loop {
        match pods.evict(&row.pod, &EvictParams::default()).await {
            Ok(_) => break,
            Err(kube::Error::Api(status)) if status.is_not_found() => return Action::Evicted,
            Err(kube::Error::Api(status)) if status.code == 429 => {
                if start.elapsed() >= patience {
                    let causes: Vec<String> = status
                        .details
                        .iter()
                        .flat_map(|d| d.causes.iter())
                        .map(|c| c.message.clone())
                        .collect();
                    return Action::Failed(format!(
                        "not evicted: the Eviction API kept refusing it for {patience:?} (HTTP 429: {}{}; `kubectl get pdb -n {}`); it cannot be migrated: {why}. Relax the PodDisruptionBudget or make room for the pods it protects, then drain again",
                        status.message,
                        causes.iter().map(|c| format!(" {c}")).collect::<String>(),
                        row.namespace
                    ));
                }
                tokio::time::sleep(Duration::from_secs(5).min(patience)).await;
            }
            Err(error) => return Action::Failed(format!("the eviction failed: {error}")),
        }
    }
    // Gone, or replaced by a pod of the same name (a StatefulSet's).
    let grace = Duration::from_secs(120);
    let gone_since = Instant::now();
    while gone_since.elapsed() < grace {
        match pods.get_opt(&row.pod).await {
            Ok(Some(pod)) if pod.uid() == uid => {}
            Ok(_) => return Action::Evicted,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Action::Failed(format!(
        "evicted, but still terminating after {grace:?}: `kubectl get pod -n {} {}`",
        row.namespace, row.pod
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(action: Action) -> Row {
        Row {
            namespace: "default".into(),
            pod: "p".into(),
            owner: "-".into(),
            action,
        }
    }

    fn options() -> Options {
        Options {
            node: "a".into(),
            to: None,
            parallel: 1,
            dry_run: false,
            migrate_only: false,
            force: false,
            delete_emptydir_data: false,
            eviction_timeout: Duration::from_secs(120),
            timeout: Duration::from_secs(300),
            lease: Duration::from_secs(120),
            transfer: TransferMode::Auto,
        }
    }

    #[test]
    fn like_kubectl_drain_a_bare_or_empty_dir_pod_is_evicted_only_when_asked() {
        let pod = |owned: bool, empty_dir: bool| -> Pod {
            let owners = if owned {
                serde_json::json!([{"apiVersion": "v1", "kind": "ReplicationController", "name": "r", "uid": "u", "controller": true}])
            } else {
                serde_json::json!([])
            };
            let volumes = if empty_dir {
                serde_json::json!([{"name": "scratch", "emptyDir": {}}])
            } else {
                serde_json::json!([])
            };
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "ownerReferences": owners},
                "spec": {"containers": [], "volumes": volumes},
                "status": {"phase": "Running"}
            }))
            .unwrap()
        };
        let mut o = options();
        assert_eq!(eviction_refused(&pod(true, false), &o), None);
        let bare = eviction_refused(&pod(false, false), &o).unwrap_or_default();
        assert!(bare.contains("--force"), "{bare}");
        let scratch = eviction_refused(&pod(true, true), &o).unwrap_or_default();
        assert!(
            scratch.contains("emptyDir volume scratch")
                && scratch.contains("--delete-emptydir-data"),
            "{scratch}"
        );
        o.force = true;
        o.delete_emptydir_data = true;
        assert_eq!(eviction_refused(&pod(false, true), &o), None);
    }

    #[test]
    fn only_a_failed_pod_fails_the_drain() {
        assert!(succeeded(&[
            row(Action::Evicted),
            row(Action::Skipped("DaemonSet pod".into())),
            row(Action::Migrated {
                target: "p-m1".into(),
                node: "b".into(),
                downtime_ms: Some(400)
            }),
        ]));
        assert!(!succeeded(&[
            row(Action::Evicted),
            row(Action::Failed("PDB".into()))
        ]));
    }
}
