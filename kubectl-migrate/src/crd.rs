//! The declarative API: `PodMigration` (namespaced), a request that the in-cluster controller
//! carries out with the very pipeline the plugin runs ([`crate::migrate`]). The types are the
//! source of truth; `config/crd/podmigrations.yaml` is what they generate
//! (`cargo xtask crd`), and a test regenerates and compares it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What to move, and how: the options of `kubectl migrate POD --to NODE`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "migrate.kubectl.io",
    version = "v1alpha1",
    kind = "PodMigration",
    namespaced,
    status = "PodMigrationStatus",
    shortname = "pmig",
    category = "migrate",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Downtime ms","type":"integer","jsonPath":".status.downtimeMs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
// A request is carried out as it was made: changing it midway would have the controller look
// after another pod than the one it moves.
#[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "a PodMigration's spec cannot be changed; delete it and create another"}]))]
pub struct PodMigrationSpec {
    /// The pod to move, in the PodMigration's namespace.
    pub pod: String,
    /// The node to move it to; absent: the first node the preflight accepts (as `drain` picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// How the checkpoint travels: `auto` (pod to pod, else relayed), `direct` or `relay`.
    #[serde(default)]
    pub transfer: Transfer,
    /// Post-copy: the app resumes on the target before all its memory arrived.
    #[serde(default)]
    pub lazy: bool,
    /// Keep the source pod, frozen, after the move (bare pods only).
    #[serde(default)]
    pub keep_source: bool,
    /// Give up (and undo, before the commit) after this many seconds; default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<u32>,
}

/// `--transfer`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transfer {
    #[default]
    Auto,
    Direct,
    Relay,
}

impl From<Transfer> for crate::launchers::TransferMode {
    fn from(transfer: Transfer) -> Self {
        match transfer {
            Transfer::Auto => Self::Auto,
            Transfer::Direct => Self::Direct,
            Transfer::Relay => Self::Relay,
        }
    }
}

impl From<crate::launchers::TransferMode> for Transfer {
    fn from(mode: crate::launchers::TransferMode) -> Self {
        use crate::launchers::TransferMode;
        match mode {
            TransferMode::Auto => Self::Auto,
            TransferMode::Direct => Self::Direct,
            TransferMode::Relay => Self::Relay,
        }
    }
}

/// Where a PodMigration stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, not started (another migration of the pod is active, or the controller is at
    /// its limit of concurrent migrations).
    Pending,
    /// The pipeline runs.
    Running,
    /// The app runs on the target.
    Succeeded,
    /// Refused or failed before anything changed (the preflight's reasons are the message).
    Failed,
    /// Failed after it began, and undone: the source runs as before.
    RolledBack,
}

/// One phase's duration.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PhaseTiming {
    pub name: String,
    pub ms: u64,
}

/// What happened, as the controller recorded it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Kubernetes-style conditions: `Ready` (done, whichever way), `Committed` (past the point
    /// of no return).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The migration's id (`mig-…`), as on the pods' annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// The pod that runs the app now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<PhaseTiming>,
    /// Freeze → thaw, by the nodes' clocks (the plugin's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_moved: Option<u64>,
    /// What went wrong and what was done about it, or the last step reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// When the controller's first attempt to recover the migration (finish or undo it after
    /// a failure or a restart) failed; it gives up 30 minutes later (`RecoveryGaveUp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovering_since: Option<Time>,
}

/// The CustomResourceDefinition as YAML, as `config/crd/podmigrations.yaml` holds it.
///
/// # Errors
/// When it cannot be rendered (never, for these types).
pub fn definition_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt as _;
    let yaml = serde_yaml::to_string(&PodMigration::crd())?;
    Ok(format!(
        "# Generated from kubectl-migrate/src/crd.rs by `cargo xtask crd`; do not edit.\n{yaml}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_definition_is_what_the_types_generate() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config/crd/podmigrations.yaml");
        let generated = definition_yaml().unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "config/crd/podmigrations.yaml differs from what kubectl-migrate/src/crd.rs generates: run `cargo xtask crd` (or UPDATE_GOLDEN=1 cargo test -p kubectl-migrate crd)"
        );
    }

    #[test]
    fn a_minimal_request_takes_the_plugins_defaults() {
        let spec: PodMigrationSpec =
            serde_json::from_value(serde_json::json!({"pod": "counter"})).unwrap();
        assert_eq!(spec.target_node, None, "any fitting node");
        assert_eq!(spec.transfer, Transfer::Auto);
        assert!(!spec.lazy && !spec.keep_source);
        assert_eq!(spec.timeout_seconds, None);
    }
}
