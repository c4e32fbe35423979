//! Step 1, the preflight (`kubectl migrate check`, and the start of every migration): every
//! reason the move would fail, in plain words with the fix, before anything is touched.
//!
//! Split in two: [`gather`] reads what it needs from the API (and each container's launcher
//! `status` through the [`Launchers`] seam); [`problems`] is a pure function of that, made of
//! small rules grouped by subject, each unit-tested alone:
//! - [`permissions`]: what RBAC lets the user do;
//! - [`pod`]: the pod itself and its launchers;
//! - [`node`]: the target node (readiness, taints, OS/arch, kernel, placement, room);
//! - [`volumes`]: whether each volume's contents can follow the pod.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::{Api, Client};
use migrate_format::StatusReport;

pub mod node;
pub mod permissions;
pub mod pod;
pub mod volumes;

pub use crate::launchers::Launchers;
pub use permissions::{NEEDED, Permission, denied_permissions};

/// Everything the preflight looks at.
#[derive(Debug, Clone)]
pub struct Facts {
    pub pod: Pod,
    pub source_node: Option<Node>,
    pub target_name: String,
    pub target_node: Option<Node>,
    /// Pods already on the target node (their requests count against its allocatable).
    pub pods_on_target: Vec<Pod>,
    /// Claims the pod mounts, by name (None: the claim does not exist).
    pub claims: BTreeMap<String, Option<PersistentVolumeClaim>>,
    /// Each container's launcher status, or why it could not be read.
    pub launchers: BTreeMap<String, Result<StatusReport, String>>,
    /// `--force`: migrate although hostPath volumes' files stay on the source node.
    pub force: bool,
    /// The permissions the migration needs that the API server says the user lacks.
    pub denied: Vec<Permission>,
    /// Migrations of this pod that started and did not finish.
    pub unfinished: Vec<crate::record::InFlight>,
    /// `--max-downtime`, when given: the longest the app may stay frozen.
    pub max_downtime: Option<std::time::Duration>,
    /// `--keep-source`: the source stays, frozen, after the migration.
    pub keep_source: bool,
    /// `--lazy`: post-copy, which the source's containers must be able to serve.
    pub lazy: bool,
    /// The ReplicaSet that controls the pod, when one does (None also when it is gone).
    pub replica_set: Option<ReplicaSet>,
    /// The Deployment that controls that ReplicaSet, when one does.
    pub deployment: Option<Deployment>,
    /// The StatefulSet that controls the pod, when one does (None also when it is gone).
    pub stateful_set: Option<StatefulSet>,
    /// For a StatefulSet's pod: the volume bound to each of its claims, by claim name (None
    /// when unbound or unreadable), whose node affinity says whether it attaches on the target.
    pub bound_volumes: BTreeMap<String, Option<PersistentVolume>>,
}

/// One reason the migration would fail: what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.what, self.fix)
    }
}

impl Problem {
    /// What is wrong, and what to do about it.
    pub fn new(what: impl Into<String>, fix: impl Into<String>) -> Problem {
        Problem {
            what: what.into(),
            fix: fix.into(),
        }
    }
}

/// Reads the facts for moving pod `name` in `namespace` to node `target`.
///
/// # Errors
/// API errors other than not-found (which become problems).
pub async fn gather(
    client: &Client,
    namespace: &str,
    name: &str,
    target: &str,
    launchers: &impl Launchers,
    force: bool,
) -> Result<Result<Facts, Problem>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let denied = denied_permissions(client, namespace).await?;
    if denied
        .iter()
        .any(|p| p.verb == "get" && p.resource == "pods" && p.subresource.is_none())
    {
        return Ok(Err(permissions::problem(&denied, namespace)));
    }
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(Err(Problem::new(
            format!("pod {namespace}/{name} does not exist"),
            "check the name and the namespace (-n); `kubectl get pods -n NAMESPACE` lists them",
        )));
    };
    let nodes: Api<Node> = Api::all(client.clone());
    let source_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let source_node = match &source_name {
        Some(n) => nodes.get_opt(n).await?,
        None => None,
    };
    let target_node = nodes.get_opt(target).await?;
    let all_pods: Api<Pod> = Api::all(client.clone());
    let pods_on_target = if target_node.is_some() {
        all_pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={target}")))
            .await?
            .items
    } else {
        Vec::new()
    };
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut claims = BTreeMap::new();
    for claim in pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
    {
        claims.insert(
            claim.claim_name.clone(),
            claims_api.get_opt(&claim.claim_name).await?,
        );
    }
    let unfinished = crate::record::in_flight_migrations(client, namespace, Some(name)).await?;
    let replica_set = match pod::controller(&pod) {
        Some(owner) if owner.kind == "ReplicaSet" => {
            Api::<ReplicaSet>::namespaced(client.clone(), namespace)
                .get_opt(&owner.name)
                .await?
                .filter(|rs| rs.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        }
        _ => None,
    };
    let deployment = match replica_set
        .as_ref()
        .and_then(|rs| rs.metadata.owner_references.as_ref())
        .and_then(|refs| refs.iter().find(|o| o.controller == Some(true)))
    {
        Some(owner) if owner.kind == "Deployment" => {
            Api::<Deployment>::namespaced(client.clone(), namespace)
                .get_opt(&owner.name)
                .await?
                .filter(|d| d.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        }
        _ => None,
    };
    let stateful_set = match pod::controller(&pod) {
        Some(owner) if owner.kind == "StatefulSet" => {
            Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .get_opt(&owner.name)
                .await?
                .filter(|set| set.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        }
        _ => None,
    };
    let mut bound_volumes = BTreeMap::new();
    if stateful_set.is_some() {
        let volumes: Api<PersistentVolume> = Api::all(client.clone());
        for (claim, pvc) in &claims {
            let bound = pvc
                .as_ref()
                .and_then(|c| c.spec.as_ref())
                .and_then(|s| s.volume_name.clone());
            let volume = match bound {
                // Unreadable (no RBAC for persistentvolumes) is said by the rule, not fatal.
                Some(name) => volumes.get_opt(&name).await.ok().flatten(),
                None => None,
            };
            bound_volumes.insert(claim.clone(), volume);
        }
    }
    let mut statuses = BTreeMap::new();
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if running {
        for container in crate::rewrite::migrated_containers(&pod) {
            let status = launchers.status(&pod, &container).await;
            statuses.insert(container, status.map_err(|e| e.to_string()));
        }
    }
    let mut unfinished = unfinished;
    let read: Option<Vec<&StatusReport>> = statuses.values().map(|s| s.as_ref().ok()).collect();
    for m in unfinished
        .iter_mut()
        .filter(|m| !m.committed && m.source == name)
    {
        m.freeze_ended = read
            .as_deref()
            .is_some_and(|read| crate::record::freeze_ended(&m.id, read));
    }
    Ok(Ok(Facts {
        pod,
        source_node,
        target_name: target.into(),
        target_node,
        pods_on_target,
        claims,
        launchers: statuses,
        force,
        denied,
        unfinished,
        max_downtime: None,
        keep_source: false,
        lazy: false,
        replica_set,
        deployment,
        stateful_set,
        bound_volumes,
    }))
}

/// What the user should know about the move that does not stop it.
pub fn notes(facts: &Facts) -> Vec<String> {
    facts
        .target_node
        .as_ref()
        .and_then(|target| node::clock_jump(facts, target))
        .into_iter()
        .chain(pod::stop_hooks_in_downtime(facts))
        .collect()
}

/// Every problem with the move, in order of the pipeline; empty when it can go ahead.
pub fn problems(facts: &Facts) -> Vec<Problem> {
    let mut found: Vec<Problem> = permissions::denied(facts).into_iter().collect();
    found.extend(pod::not_running(facts));
    found.extend(pod::host_pid(facts));
    found.extend(pod::controller_owned(facts));
    found.extend(pod::unfinished_migrations(facts));
    found.extend(pod::launchers_missing(facts));
    found.extend(pod::sysv_ipc_left_behind(facts));
    found.extend(pod::cannot_serve_post_copy(facts));
    found.extend(pod::cannot_checkpoint(facts));
    found.extend(pod::probes_too_tight(facts));
    found.extend(pod::kept_source_with_probes(facts));
    found.extend(pod::lazy_with_freezing_probes(facts));
    let Some(target) = &facts.target_node else {
        found.push(node::missing(facts));
        return found;
    };
    found.extend(node::not_ready(facts, target));
    found.extend(node::cordoned(facts, target));
    found.extend(node::untolerated_taints(facts, target));
    found.extend(node::other_platform(facts, target));
    found.extend(node::older_kernel(facts, target));
    found.extend(node::selector_excludes(facts, target));
    found.extend(node::affinity_excludes(facts, target));
    found.extend(node::no_room(facts, target));
    found.extend(volumes::host_paths(facts));
    found.extend(volumes::claims(facts));
    found
}

/// The pod's name, for messages.
fn pod_name(facts: &Facts) -> String {
    facts.pod.metadata.name.clone().unwrap_or_default()
}

/// Whether the pod is moving within its own node (a new pod on the same node: its volumes'
/// files stay reachable, so the volume rules have nothing to object to).
fn same_node(facts: &Facts) -> bool {
    facts.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(facts.target_name.as_str())
}

/// Shared by the rules' unit tests: a movable pod, its node and a fitting target.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use serde_json::json;

    pub fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "counter", "namespace": "apps"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "counter", "image": "c",
                "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    pub fn node(name: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "disk": "ssd", "zone": "eu-1a"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "allocatable": {"cpu": "2", "memory": "4Gi"},
                       "nodeInfo": {"kernelVersion": "6.18.4", "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "",
                                    "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "operatingSystem": "linux",
                                    "osImage": "", "systemUUID": ""}}
        }))
        .unwrap()
    }

    pub fn status() -> StatusReport {
        serde_json::from_value(
            json!({"state": "running", "app_pid": 1000, "launcher_version": "0.1.0",
            "criu_version": "4.1.1", "kernel": "6.18.4", "arch": "x86_64", "last_checkpoint": null,
            "last_restore": null, "error": null, "features": migrate_format::FEATURES}),
        )
        .unwrap()
    }

    pub fn facts() -> Facts {
        Facts {
            pod: pod(),
            source_node: Some(node("node-a")),
            target_name: "node-b".into(),
            target_node: Some(node("node-b")),
            pods_on_target: Vec::new(),
            claims: BTreeMap::new(),
            launchers: BTreeMap::from([("counter".to_string(), Ok(status()))]),
            force: false,
            denied: Vec::new(),
            unfinished: Vec::new(),
            max_downtime: None,
            keep_source: false,
            lazy: false,
            replica_set: None,
            deployment: None,
            stateful_set: None,
            bound_volumes: BTreeMap::new(),
        }
    }

    /// The target node of [`facts`], to change.
    pub fn target(facts: &mut Facts) -> &mut Node {
        facts.target_node.as_mut().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    #[test]
    fn a_movable_pod_has_no_problem() {
        assert_eq!(problems(&facts()), Vec::new());
    }

    #[test]
    fn a_missing_node_stops_the_node_rules_but_not_the_pod_rules() {
        let mut f = facts();
        f.target_node = None;
        f.pod.status.as_mut().unwrap().phase = Some("Pending".into());
        let found = problems(&f);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].what.contains("is Pending"));
        assert!(found[1].what.contains("node node-b does not exist"));
    }

    #[test]
    fn several_problems_are_all_listed_in_pipeline_order() {
        let mut f = facts();
        f.pod.status.as_mut().unwrap().phase = Some("Pending".into());
        target(&mut f).spec =
            Some(serde_json::from_value(serde_json::json!({"unschedulable": true})).unwrap());
        let found = problems(&f);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].what.contains("is Pending"));
        assert!(found[1].what.contains("is cordoned"));
    }
}
