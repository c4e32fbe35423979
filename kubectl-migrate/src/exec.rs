//! Running `restore-launcher` sub-commands in a pod's containers through the API server's
//! exec endpoint (what `kubectl exec` does). The real implementation of [`check::Launchers`].

use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;
use kube::{Api, Client};
use migrate_format::StatusReport;
use tokio::io::AsyncReadExt as _;

use crate::check::Launchers;

/// Execs in containers with the user's client.
#[derive(Clone)]
pub struct ExecLaunchers {
    pub client: Client,
}

impl std::fmt::Debug for ExecLaunchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecLaunchers")
    }
}

impl Launchers for ExecLaunchers {
    async fn status(&self, pod: &Pod, container: &str) -> Result<StatusReport, String> {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let params = AttachParams::default()
            .container(container)
            .stdout(true)
            .stderr(true)
            .stdin(false);
        let mut process = pods
            .exec(&name, ["restore-launcher", "status"], &params)
            .await
            .map_err(|e| e.to_string())?;
        let mut stdout = String::new();
        if let Some(mut out) = process.stdout() {
            out.read_to_string(&mut stdout)
                .await
                .map_err(|e| e.to_string())?;
        }
        let status = match process.take_status() {
            Some(status) => status.await,
            None => None,
        };
        if let Some(status) = status
            && status.status.as_deref() == Some("Failure")
        {
            return Err(status
                .message
                .unwrap_or_else(|| "restore-launcher status failed".into()));
        }
        serde_json::from_str(stdout.trim())
            .map_err(|e| format!("restore-launcher status printed no status ({e})"))
    }
}
