//! The in-cluster controller (`kubectl-migrate controller`, what `config/controller/` deploys):
//! it carries out `PodMigration` objects ([`crate::crd`]) with the very pipeline `kubectl
//! migrate` runs ([`crate::migrate::migrate`]), and finishes or undoes, with the pipeline's own
//! recovery ([`crate::recover`]), a migration that a restart of the controller interrupted.
//!
//! - [`run`]: leader election (a Lease, for more than one replica), then a kube-runtime
//!   `Controller` over every namespace's PodMigrations, until SIGTERM;
//! - [`reconcile`](self::reconcile): what one PodMigration needs next (its rules: one active
//!   migration per pod, a bounded number at once, the finalizer while one is active);
//! - [`drain`](self::drain): a node labelled `migrate.kubectl.io/drain=true` is cordoned and
//!   its pods get PodMigrations, by `kubectl migrate drain`'s rules.
//!
//! The reconcile itself stays short: a migration runs as a task of its own, tracked in
//! [`Context::active`], and records its outcome in the object's status and Events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::{Config, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;

use crate::crd::PodMigration;

mod drain;
mod reconcile;

pub use drain::{DRAIN_LABEL, DRAIN_STATUS, DRAINED_NODE_LABEL};
pub use reconcile::{Blocker, blocker};

/// How the controller runs (`kubectl-migrate controller`'s options).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How many migrations run at once; more wait (`Pending`).
    pub max_concurrent: usize,
    /// The Lease (namespace, name) a replica must hold to act; `None`: no election (one
    /// replica).
    pub leader_lease: Option<(String, String)>,
    /// This replica's name, in the Lease and on its Events.
    pub identity: String,
    /// The API server's URL, for messages.
    pub server: String,
}

/// What every reconcile shares.
pub(crate) struct Context {
    pub client: Client,
    pub settings: Settings,
    /// One permit per migration that may run.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The migrations this process runs, by PodMigration uid: sending `true` interrupts one
    /// (undone before its commit, finished after it, as Ctrl-C does to `kubectl migrate`).
    pub active: Mutex<BTreeMap<String, tokio::sync::watch::Sender<bool>>>,
    pub recorder: Recorder,
}

impl Context {
    /// Publishes an Event about `object` (a PodMigration, a node); a failure is logged, not
    /// fatal.
    pub(crate) async fn publish(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        type_: kube::runtime::events::EventType,
        action: &str,
        reason: &str,
        note: String,
    ) {
        let event = kube::runtime::events::Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, object).await {
            tracing::warn!(%error, object = ?object.name, "cannot record an Event");
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "the PodMigration resource is not installed (or not readable) at {server}: install it with `kubectl apply -k config/`"
    )]
    NoDefinition {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("leader election on Lease {namespace}/{name} failed")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error(
        "this replica lost the leadership (Lease {0}): stopping, so that only the new leader acts"
    )]
    LostLease(String),
}

/// How long a migration under way may take to end once the controller is asked to stop, before
/// it is interrupted (undone before its commit, finished after it).
const STOP_PATIENCE: Duration = Duration::from_secs(20);

/// Runs the controller until SIGTERM or SIGINT (or the loss of its Lease).
///
/// # Errors
/// [`ControllerError`] when the resource is not installed or the Lease cannot be held.
pub async fn run(client: Client, settings: Settings) -> Result<(), ControllerError> {
    let migrations: Api<PodMigration> = Api::all(client.clone());
    migrations
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|source| ControllerError::NoDefinition {
            server: settings.server.clone(),
            source,
        })?;
    let mut leading = match &settings.leader_lease {
        Some((namespace, name)) => {
            let lease = |source| ControllerError::Lease {
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            };
            let manager = LeaseManagerBuilder::new(client.clone(), name)
                .with_namespace(namespace)
                .with_identity(&settings.identity)
                .with_duration(15)
                .with_grace(5)
                .build()
                .await
                .map_err(lease)?;
            let (mut leading, task) = manager.watch().await;
            tracing::info!(lease = %name, identity = %settings.identity, "waiting to lead");
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return Err(ControllerError::LostLease(format!("{namespace}/{name}")));
                }
            }
            tracing::info!(lease = %name, identity = %settings.identity, "leading");
            Some((leading, task))
        }
        None => None,
    };
    let lease_name = settings
        .leader_lease
        .as_ref()
        .map(|(n, l)| format!("{n}/{l}"))
        .unwrap_or_default();
    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kubectl-migrate-controller".into(),
                instance: Some(settings.identity.clone()),
            },
        ),
        slots: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent.max(1))),
        active: Mutex::new(BTreeMap::new()),
        client,
        settings,
    });
    let migrating = Controller::new(migrations, watcher::Config::default())
        .with_config(Config::default().concurrency(8))
        .shutdown_on_signal()
        .run(
            reconcile::reconcile,
            reconcile::error_policy,
            context.clone(),
        )
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(%error, "reconcile");
            }
        });
    let nodes: Api<Node> = Api::all(context.client.clone());
    let draining = Controller::new(nodes, watcher::Config::default().labels(DRAIN_LABEL))
        .shutdown_on_signal()
        .run(drain::reconcile, drain::error_policy, context.clone())
        .for_each(|outcome| async move {
            if let Err(error) = outcome {
                tracing::debug!(%error, "drain");
            }
        });
    let controller = async {
        futures::join!(migrating, draining);
    };
    let lost = async {
        match (&mut leading, &context.settings.leader_lease) {
            (Some((leading, _)), Some((namespace, name))) => {
                let told = async {
                    let _ = leading.wait_for(|leader| !*leader).await;
                };
                tokio::select! {
                    () = told => {}
                    () = fence(&context.client, namespace, name, &context.settings.identity) => {}
                }
            }
            _ => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = controller => {
            tracing::info!("stopping: waiting for the migrations under way");
            stop(&context).await;
            Ok(())
        }
        () = lost => Err(ControllerError::LostLease(lease_name)),
    };
    // Hands the Lease over at once (the manager releases it when its channel closes), rather
    // than after it expires.
    if let Some((leading, task)) = leading {
        drop(leading);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    outcome
}

/// How long a leader acts without having seen its own Lease current: the Lease's duration less
/// its grace, so that it stops before another replica may take the Lease.
const FENCE: Duration = Duration::from_secs(10);

/// Returns once this replica cannot be sure it still leads: the Lease names another holder,
/// its last renewal is older than [`FENCE`], or it could not be read for that long (the API
/// server out of reach). The lease manager alone would keep a cut-off leader acting until it
/// reads another holder; this stops it first.
async fn fence(client: &Client, namespace: &str, name: &str, identity: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let mut confirmed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        match leases.get(name).await {
            Ok(lease) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(identity) {
                    tracing::error!(holder = ?spec.holder_identity, "the Lease names another holder");
                    return;
                }
                let renewed = spec.renew_time.map(|t| t.0.as_millisecond());
                let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                if renewed.is_some_and(|at| now - at <= FENCE.as_millis() as i64) {
                    confirmed = tokio::time::Instant::now();
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the Lease"),
        }
        if confirmed.elapsed() > FENCE {
            tracing::error!("the Lease was not seen renewed for {FENCE:?}");
            return;
        }
    }
}

/// Lets the migrations under way end, for [`STOP_PATIENCE`]; then interrupts them (undone
/// before their commit, finished after it) and waits for that, for [`STOP_PATIENCE`] again
/// plus a half. What is still running then is left `Running`, for the next leader to recover.
async fn stop(context: &Context) {
    let idle = || context.active.lock().map(|a| a.is_empty()).unwrap_or(true);
    let deadline = tokio::time::Instant::now() + STOP_PATIENCE;
    while !idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Ok(active) = context.active.lock() {
        for interrupt in active.values() {
            let _ = interrupt.send(true);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_PATIENCE * 5 / 2;
    while !idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !idle() {
        tracing::warn!("stopping with migrations under way: the next leader recovers them");
    }
}
