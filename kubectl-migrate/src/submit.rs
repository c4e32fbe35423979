//! The plugin as a client of the in-cluster controller: `--async` creates a PodMigration and
//! returns, `status` lists the namespace's PodMigrations, and `check` says which mode a move
//! would use (this plugin, or the controller it can hand the move to).

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::crd::{PodMigration, PodMigrationSpec};
use crate::launchers::TransferMode;

/// Where `config/controller/` runs the controller, and the Lease its replicas hold.
pub const CONTROLLER_NAMESPACE: &str = "kubectl-migrate-system";
pub const CONTROLLER_LEASE: &str = "kubectl-migrate-controller";

/// Whether the declarative API and its controller are there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No PodMigration resource: this plugin migrates on its own.
    PluginOnly,
    /// The resource is installed; `leader` is the controller replica that holds the Lease
    /// now, if it can be read and is current.
    Controller { leader: Option<String> },
}

impl Mode {
    /// One line for `check`.
    pub fn describe(&self) -> String {
        match self {
            Mode::PluginOnly => "mode: this plugin runs the migration (no in-cluster controller: the PodMigration resource is not installed)".into(),
            Mode::Controller { leader: Some(leader) } => format!(
                "mode: this plugin runs the migration; with --async the in-cluster controller does ({leader} leads)"
            ),
            Mode::Controller { leader: None } => "mode: this plugin runs the migration; the PodMigration resource is installed (for --async), but no controller replica is seen leading now (none runs, or its Lease in kubectl-migrate-system is not readable to you)".into(),
        }
    }
}

/// Finds out the [`Mode`]: the resource by listing it (not found: not installed), the
/// controller by its Lease (unreadable with the caller's rights: not known).
///
/// # Errors
/// When the resource cannot be listed for another reason than its absence (rights, network).
pub async fn mode(client: &Client, namespace: &str) -> Result<Mode, kube::Error> {
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), namespace);
    match migrations.list(&ListParams::default().limit(1)).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Mode::PluginOnly),
        Err(error) => return Err(error),
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let leader = leases
        .get_opt(CONTROLLER_LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|lease| lease.spec)
        .and_then(|spec| {
            let renewed = spec.renew_time?.0;
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            let now = k8s_openapi::jiff::Timestamp::now();
            (now.as_second() - renewed.as_second() <= duration)
                .then_some(spec.holder_identity)
                .flatten()
        });
    Ok(Mode::Controller { leader })
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "the PodMigration resource is not installed at {server}, so there is no controller to hand the move to: install it with `kubectl apply -k config/`, or migrate without --async"
    )]
    NotInstalled { server: String },
    #[error(
        "{flag} cannot be handed to the controller (a PodMigration has no such field); migrate without --async to use it"
    )]
    Unsupported { flag: &'static str },
    #[error("creating the PodMigration failed")]
    Create(#[source] kube::Error),
    #[error(
        "cannot read PodMigrations in namespace {namespace} (you need list and create on podmigrations.migrate.kubectl.io there)"
    )]
    List {
        namespace: String,
        #[source]
        source: kube::Error,
    },
}

/// What `--async` asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub pod: String,
    pub node: String,
    pub timeout: std::time::Duration,
    pub keep_source: bool,
    pub transfer: TransferMode,
    pub lazy: bool,
    pub force: bool,
    pub max_downtime: Option<std::time::Duration>,
}

/// Creates the PodMigration (named after the pod, with a suffix the API server picks).
///
/// # Errors
/// [`SubmitError`] naming the fix.
pub async fn submit(
    client: &Client,
    namespace: &str,
    server: &str,
    request: &Request,
) -> Result<PodMigration, SubmitError> {
    if request.force {
        return Err(SubmitError::Unsupported { flag: "--force" });
    }
    if request.max_downtime.is_some() {
        return Err(SubmitError::Unsupported {
            flag: "--max-downtime",
        });
    }
    let mode = mode(client, namespace)
        .await
        .map_err(|source| SubmitError::List {
            namespace: namespace.into(),
            source,
        })?;
    if mode == Mode::PluginOnly {
        return Err(SubmitError::NotInstalled {
            server: server.into(),
        });
    }
    let migration = PodMigration {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", request.pod)),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: PodMigrationSpec {
            pod: request.pod.clone(),
            target_node: Some(request.node.clone()),
            transfer: request.transfer.into(),
            lazy: request.lazy,
            keep_source: request.keep_source,
            timeout_seconds: Some(
                u32::try_from(request.timeout.as_secs().max(1)).unwrap_or(u32::MAX),
            ),
        },
        status: None,
    };
    let api: Api<PodMigration> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), &migration)
        .await
        .map_err(SubmitError::Create)
}

/// The namespace's PodMigrations, oldest first; `None` when the resource is not installed.
pub async fn list(client: &Client, namespace: &str) -> Option<Vec<PodMigration>> {
    let api: Api<PodMigration> = Api::namespaced(client.clone(), namespace);
    let mut items = api.list(&ListParams::default()).await.ok()?.items;
    items.sort_by_key(|m| m.metadata.creation_timestamp.clone());
    Some(items)
}
