//! The one Kubernetes client builder: `--kubeconfig`, else `KUBECONFIG` (merged, as kubectl
//! does), else `~/.kube/config`, else in-cluster; `--context`; the namespace from `-n` or the
//! context. Connection problems become errors that say what to check.

use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Client, Config};

use crate::cli::Global;

/// How long to wait for a TCP/TLS connection before saying the server is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot read the kubeconfig `{path}`; pass --kubeconfig PATH or set KUBECONFIG to a readable file"
    )]
    Read {
        path: String,
        #[source]
        source: KubeconfigError,
    },
    #[error(
        "no kubeconfig found (no --kubeconfig, KUBECONFIG or ~/.kube/config) and not running in a cluster"
    )]
    NoConfig,
    #[error(
        "context `{context}` is not in the kubeconfig (it has: {known}); pass an existing --context"
    )]
    UnknownContext { context: String, known: String },
    #[error("the kubeconfig cannot be used")]
    Config(#[source] KubeconfigError),
    #[error("cannot create the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client and the namespace to work in.
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    pub namespace: String,
    /// The API server's URL, for messages.
    pub server: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("namespace", &self.namespace)
            .field("server", &self.server)
            .finish()
    }
}

/// Builds the client from the global options.
///
/// # Errors
/// A [`ClientError`] that names what to fix.
pub async fn connect(global: &Global) -> Result<Connection, ClientError> {
    connect_with(global, true).await
}

/// [`connect`], with the client's own retries of HTTP 429, 503 and 504 on (`retry`) or off:
/// off for a caller that must see a refusal as it comes (the drain's evictions, which a
/// PodDisruptionBudget refuses with 429).
///
/// # Errors
/// A [`ClientError`] that names what to fix.
pub async fn connect_with(global: &Global, retry: bool) -> Result<Connection, ClientError> {
    let kubeconfig = match &global.kubeconfig {
        Some(path) => Some(
            Kubeconfig::read_from(path).map_err(|source| ClientError::Read {
                path: path.display().to_string(),
                source,
            })?,
        ),
        None => match Kubeconfig::from_env() {
            Ok(Some(config)) => Some(config),
            Ok(None) => Kubeconfig::read().ok(),
            Err(source) => {
                return Err(ClientError::Read {
                    path: std::env::var("KUBECONFIG").unwrap_or_default(),
                    source,
                });
            }
        },
    };
    let mut config = match kubeconfig {
        Some(kubeconfig) => {
            if let Some(context) = &global.context
                && !kubeconfig.contexts.iter().any(|c| &c.name == context)
            {
                let known: Vec<&str> = kubeconfig
                    .contexts
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect();
                return Err(ClientError::UnknownContext {
                    context: context.clone(),
                    known: known.join(", "),
                });
            }
            let options = KubeConfigOptions {
                context: global.context.clone(),
                cluster: None,
                user: None,
            };
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(ClientError::Config)?
        }
        None => Config::incluster().map_err(|_| ClientError::NoConfig)?,
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.default_retry = retry;
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(ClientError::Client)?;
    Ok(Connection {
        client,
        namespace,
        server,
    })
}
