//! Step 1, the preflight (`kubectl migrate check`, and the start of every migration): every
//! reason the move would fail, in plain words with the fix, before anything is touched.
//!
//! Split in two: [`gather`] reads what it needs from the API (and each container's launcher
//! `status` through the [`Launchers`] seam); [`problems`] is a pure function of that, unit-
//! tested case by case.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ListParams;
use kube::{Api, Client};
use migrate_format::StatusReport;

/// What the plugin does inside containers, through `restore-launcher` sub-commands. In a
/// cluster this is the exec API (`kubectl exec`, [`crate::exec::ExecLaunchers`]); it is a seam
/// so the API-server tests, which have no kubelet, can stand in for it and say so.
pub trait Launchers {
    /// The launcher's status in `container`, or why it could not be read.
    fn status(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<StatusReport, String>> + Send;

    /// Streams `checkpoint --output -` of `container` in `source` into `receive --input -` of
    /// the same container in `target`, adding the bytes moved to `moved`. Returns both reports.
    fn transfer(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> impl std::future::Future<
        Output = Result<
            (
                migrate_format::CheckpointReport,
                migrate_format::RestoreReport,
            ),
            String,
        >,
    > + Send;

    /// `rollback` in `container`: resume the app frozen by a checkpoint.
    fn rollback(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;

    /// `freeze` in `container`: stop the app, so all containers are frozen before any is dumped.
    fn freeze(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;

    /// `thaw` in `container`: resume the app (on the target, once every container is restored).
    fn thaw(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Taints the node controller sets from node conditions (reported as NotReady / cordoned).
const CONDITION_TAINTS: [&str; 3] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/unschedulable",
];

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
    /// `--force`: accept hostPath volumes and placement that excludes the target.
    pub force: bool,
    /// The permissions the migration needs that the API server says the user lacks.
    pub denied: Vec<Permission>,
}

/// One permission the migration needs (see config/rbac.yaml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// None: cluster-wide.
    pub namespaced: bool,
}

/// Everything `kubectl migrate` does through the API, as RBAC sees it.
pub const NEEDED: [Permission; 10] = [
    Permission {
        verb: "get",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "watch",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "create",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "delete",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "patch",
        resource: "pods",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "create",
        resource: "pods",
        subresource: Some("exec"),
        namespaced: true,
    },
    Permission {
        verb: "get",
        resource: "persistentvolumeclaims",
        subresource: None,
        namespaced: true,
    },
    Permission {
        verb: "get",
        resource: "nodes",
        subresource: None,
        namespaced: false,
    },
    Permission {
        verb: "list",
        resource: "nodes",
        subresource: None,
        namespaced: false,
    },
    Permission {
        verb: "list",
        resource: "pods",
        subresource: None,
        namespaced: false,
    },
];

/// Asks the API server (SelfSubjectAccessReview) which of [`NEEDED`] the caller lacks.
///
/// # Errors
/// API errors.
pub async fn denied_permissions(
    client: &Client,
    namespace: &str,
) -> Result<Vec<Permission>, kube::Error> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for permission in NEEDED {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(permission.verb.into()),
                    resource: Some(permission.resource.into()),
                    subresource: permission.subresource.map(Into::into),
                    namespace: permission.namespaced.then(|| namespace.to_string()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = reviews
            .create(&kube::api::PostParams::default(), &review)
            .await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            denied.push(permission);
        }
    }
    Ok(denied)
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

fn problem(what: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        what: what.into(),
        fix: fix.into(),
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
        return Ok(Err(permission_problem(&denied, namespace)));
    }
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(Err(problem(
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
    let mut statuses = BTreeMap::new();
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if running {
        for container in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            statuses.insert(
                container.name.clone(),
                launchers.status(&pod, &container.name).await,
            );
        }
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
    }))
}

/// Every problem with the move, in order of the pipeline; empty when it can go ahead.
pub fn problems(facts: &Facts) -> Vec<Problem> {
    let mut found = Vec::new();
    if !facts.denied.is_empty() {
        found.push(permission_problem(
            &facts.denied,
            facts.pod.metadata.namespace.as_deref().unwrap_or("default"),
        ));
    }
    let pod = &facts.pod;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());

    if phase != "Running" {
        found.push(problem(
            format!("pod {name} is {phase}, not Running"),
            "only a running pod can be migrated; wait until it runs (`kubectl get pod -w`)",
        ));
    }
    for owner in pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
    {
        found.push(problem(
            format!("pod {name} is managed by {} {}", owner.kind, owner.name),
            format!(
                "its controller would fight the moved copy (a {} counts and replaces its pods); migrate pods you created directly, or scale the {} down and run the pod on its own",
                owner.kind, owner.kind
            ),
        ));
    }
    for (container, status) in &facts.launchers {
        match status {
            Err(error) => found.push(problem(
                format!("container {container} does not answer `restore-launcher status` ({error})"),
                "build its image FROM the restore-launcher base image so restore-launcher is its ENTRYPOINT",
            )),
            Ok(status) if status.criu_version.is_none() => found.push(problem(
                format!("container {container} runs restore-launcher but has no CRIU"),
                "build the image FROM the restore-launcher base image, which ships CRIU 4.x",
            )),
            Ok(_) => {}
        }
    }

    let target = &facts.target_name;
    let Some(node) = &facts.target_node else {
        found.push(problem(
            format!("node {target} does not exist"),
            "pick a node from `kubectl get nodes`",
        ));
        return found;
    };
    // Moving within a node is allowed (a new pod spec, a restart without losing state); the
    // volume checks below then have nothing to object to, since the files stay reachable.
    let same_node = spec.node_name.as_deref() == Some(target.as_str());
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    if !ready {
        found.push(problem(
            format!("node {target} is not Ready"),
            "pick a Ready node (`kubectl get nodes`) or fix the node first",
        ));
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        found.push(problem(
            format!("node {target} is cordoned (unschedulable)"),
            format!("`kubectl uncordon {target}` or pick another node"),
        ));
    }
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    for taint in node.spec.iter().flat_map(|s| s.taints.iter().flatten()) {
        // Soft taints do not block; the node-condition taints mirror the Ready and cordon
        // checks above, which already say what is wrong.
        if taint.effect == "PreferNoSchedule" || CONDITION_TAINTS.contains(&taint.key.as_str()) {
            continue;
        }
        let tolerated = tolerations.iter().any(|t| {
            let key_ok = t.key.is_none() && t.operator.as_deref() == Some("Exists")
                || t.key.as_deref() == Some(taint.key.as_str());
            let value_ok = t.operator.as_deref() == Some("Exists") || t.value == taint.value;
            let effect_ok = t
                .effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == taint.effect);
            key_ok && value_ok && effect_ok
        });
        if !tolerated {
            found.push(problem(
                format!(
                    "node {target} has taint {}={}:{} that the pod does not tolerate",
                    taint.key,
                    taint.value.as_deref().unwrap_or(""),
                    taint.effect
                ),
                "add a matching toleration to the pod, or pick another node",
            ));
        }
    }
    let label = |n: &Node, key: &str| n.metadata.labels.as_ref().and_then(|l| l.get(key)).cloned();
    if let Some(source) = &facts.source_node {
        for key in ["kubernetes.io/os", "kubernetes.io/arch"] {
            if label(source, key) != label(node, key) {
                found.push(problem(
                    format!(
                        "node {target} has {key}={} but the pod runs on {}",
                        label(node, key).unwrap_or_default(),
                        label(source, key).unwrap_or_default()
                    ),
                    "a checkpoint only restores on the same OS and architecture; pick such a node",
                ));
            }
        }
        let kernel = |n: &Node| {
            n.status
                .as_ref()
                .and_then(|s| s.node_info.as_ref())
                .map(|i| i.kernel_version.clone())
                .unwrap_or_default()
        };
        if major_minor(&kernel(node)) < major_minor(&kernel(source)) {
            found.push(problem(
                format!("node {target} runs kernel {} but the pod's node runs {}", kernel(node), kernel(source)),
                "CRIU restores onto the same or a newer kernel; pick a node with kernel at least as new",
            ));
        }
    }
    if !facts.force {
        if let Some(selector) = &spec.node_selector {
            for (key, value) in selector {
                if label(node, key).as_deref() != Some(value.as_str()) {
                    found.push(problem(
                        format!("the pod's nodeSelector {key}={value} excludes node {target}"),
                        "label the node, pick a matching node, or pass --force to migrate anyway (the selector is kept)",
                    ));
                }
            }
        }
        let required = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        if let Some(required) = required {
            let labels = node.metadata.labels.clone().unwrap_or_default();
            let matches = required.node_selector_terms.iter().any(|term| {
                term.match_expressions
                    .iter()
                    .flatten()
                    .all(|e| requirement_matches(e, &labels))
            });
            if !matches {
                found.push(problem(
                    format!("the pod's required node affinity excludes node {target}"),
                    "pick a node its affinity allows, or pass --force to migrate anyway",
                ));
            }
        }
    }
    found.extend(resource_problems(facts, node));
    for volume in spec.volumes.iter().flatten() {
        if same_node {
            continue;
        }
        if volume.host_path.is_some() && !facts.force {
            found.push(problem(
                format!("volume {} is a hostPath: its files stay on the source node", volume.name),
                "use a PVC or emptyDir (with --include), or pass --force to migrate without its contents",
            ));
        }
        if let Some(claim) = &volume.persistent_volume_claim {
            match facts.claims.get(&claim.claim_name) {
                Some(Some(pvc)) => {
                    let modes = pvc
                        .spec
                        .as_ref()
                        .and_then(|s| s.access_modes.clone())
                        .unwrap_or_default();
                    let shared = modes
                        .iter()
                        .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany");
                    if !shared {
                        found.push(problem(
                            format!("volume {} uses claim {} with access modes {modes:?}", volume.name, claim.claim_name),
                            "a ReadWriteOnce volume can only attach to the target after the source detaches it; use a ReadWriteMany claim",
                        ));
                    }
                }
                _ => found.push(problem(
                    format!(
                        "claim {} of volume {} does not exist",
                        claim.claim_name, volume.name
                    ),
                    "create the claim or fix the pod's volume",
                )),
            }
        }
    }
    found
}

/// One problem listing every missing permission as `verb resource` and where.
fn permission_problem(denied: &[Permission], namespace: &str) -> Problem {
    let list: Vec<String> = denied
        .iter()
        .map(|p| {
            let resource = p.subresource.map_or_else(
                || p.resource.to_string(),
                |sub| format!("{}/{sub}", p.resource),
            );
            let scope = if p.namespaced {
                format!("in namespace {namespace}")
            } else {
                "cluster-wide".into()
            };
            format!("{} {resource} {scope}", p.verb)
        })
        .collect();
    problem(
        format!("you are not allowed to: {}", list.join(", ")),
        "apply config/rbac.yaml in the namespace and bind its Role and ClusterRole to you (see the README)",
    )
}

/// Whether the pod's requests fit into what the target has left.
fn resource_problems(facts: &Facts, node: &Node) -> Vec<Problem> {
    let allocatable = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.clone())
        .unwrap_or_default();
    let mut found = Vec::new();
    for (resource, parse) in [
        ("cpu", parse_cpu as fn(&Quantity) -> Option<f64>),
        ("memory", parse_bytes),
    ] {
        let Some(total) = allocatable.get(resource).and_then(parse) else {
            continue;
        };
        let used: f64 = facts
            .pods_on_target
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .map(|p| requests(p, resource, parse))
            .sum();
        let wanted = requests(&facts.pod, resource, parse);
        if wanted > total - used {
            found.push(problem(
                format!(
                    "node {} has {} {resource} free of {} but the pod requests {}",
                    facts.target_name,
                    show(resource, total - used),
                    show(resource, total),
                    show(resource, wanted)
                ),
                "pick a node with room, or free some on this one",
            ));
        }
    }
    found
}

fn requests(pod: &Pod, resource: &str, parse: fn(&Quantity) -> Option<f64>) -> f64 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| {
            c.resources
                .as_ref()?
                .requests
                .as_ref()?
                .get(resource)
                .and_then(parse)
        })
        .sum()
}

fn show(resource: &str, value: f64) -> String {
    if resource == "cpu" {
        format!("{}m", (value * 1000.0).round())
    } else {
        format!("{}Mi", (value / 1048576.0).round())
    }
}

/// CPU quantity in cores ("250m", "2", "1.5").
pub fn parse_cpu(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| m / 1000.0),
        None => s.parse().ok(),
    }
}

/// Memory quantity in bytes ("256Mi", "1G", "1073741824", "1.5Gi").
pub fn parse_bytes(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let units: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in units {
        if let Some(number) = s.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    s.parse().ok()
}

fn major_minor(kernel: &str) -> (u32, u32) {
    let mut parts = kernel
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Evaluates one node-affinity requirement against node labels.
fn requirement_matches(
    requirement: &NodeSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> bool {
    let value = labels.get(&requirement.key);
    let values = requirement.values.clone().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if requirement.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "counter", "namespace": "apps"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "counter", "image": "c",
                "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn node(name: &str) -> Node {
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

    fn status() -> StatusReport {
        serde_json::from_value(
            json!({"state": "running", "app_pid": 1000, "launcher_version": "0.1.0",
            "criu_version": "4.1.1", "kernel": "6.18.4", "arch": "x86_64", "last_checkpoint": null,
            "last_restore": null, "error": null}),
        )
        .unwrap()
    }

    fn facts() -> Facts {
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
        }
    }

    fn single(facts: &Facts) -> Problem {
        let found = problems(facts);
        assert_eq!(found.len(), 1, "{found:#?}");
        found[0].clone()
    }

    #[test]
    fn a_movable_pod_has_no_problem() {
        assert_eq!(problems(&facts()), Vec::new());
    }

    #[test]
    fn each_problem_is_named_with_its_fix() {
        let mut f = facts();
        f.pod.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(single(&f).what.contains("is Pending, not Running"));

        let mut f = facts();
        f.launchers.insert(
            "counter".into(),
            Err("exec: restore-launcher: not found".into()),
        );
        let p = single(&f);
        assert!(
            p.what.contains("does not answer `restore-launcher status`")
                && p.fix.contains("base image"),
            "{p}"
        );

        let mut f = facts();
        f.target_node = None;
        assert!(single(&f).what.contains("node node-b does not exist"));

        let mut f = facts();
        f.target_node
            .as_mut()
            .unwrap()
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        assert!(single(&f).what.contains("is not Ready"));

        let mut f = facts();
        f.target_node.as_mut().unwrap().spec =
            Some(serde_json::from_value(json!({"unschedulable": true})).unwrap());
        assert!(single(&f).fix.contains("kubectl uncordon node-b"));

        let mut f = facts();
        f.target_node.as_mut().unwrap().spec = Some(
            serde_json::from_value(
                json!({"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}),
            )
            .unwrap(),
        );
        assert!(single(&f).what.contains("taint dedicated=gpu:NoSchedule"));
        f.pod.spec.as_mut().unwrap().tolerations =
            Some(serde_json::from_value(json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}])).unwrap());
        assert_eq!(
            problems(&f),
            Vec::new(),
            "a matching toleration makes it fine"
        );

        let mut f = facts();
        f.target_node
            .as_mut()
            .unwrap()
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("kubernetes.io/arch".into(), "arm64".into());
        assert!(single(&f).fix.contains("same OS and architecture"));

        let mut f = facts();
        f.target_node
            .as_mut()
            .unwrap()
            .status
            .as_mut()
            .unwrap()
            .node_info
            .as_mut()
            .unwrap()
            .kernel_version = "6.1.0".into();
        assert!(single(&f).what.contains("runs kernel 6.1.0"));

        let mut f = facts();
        f.pods_on_target = vec![pod(), pod(), pod()]; // 1.5 of 2 cores taken: 0.5 left, enough
        assert_eq!(problems(&f), Vec::new(), "exactly enough room is enough");
        f.pods_on_target.push(pod()); // 2 of 2 cores taken
        let p = single(&f);
        assert_eq!(
            p.what,
            "node node-b has 0m cpu free of 2000m but the pod requests 500m"
        );

        let mut f = facts();
        f.pod.spec.as_mut().unwrap().volumes = Some(
            serde_json::from_value(json!([{"name": "logs", "hostPath": {"path": "/var/log"}}]))
                .unwrap(),
        );
        assert!(single(&f).what.contains("is a hostPath"));
        f.force = true;
        assert_eq!(problems(&f), Vec::new(), "--force accepts a hostPath");

        let mut f = facts();
        f.pod.spec.as_mut().unwrap().volumes = Some(
            serde_json::from_value(
                json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]),
            )
            .unwrap(),
        );
        f.claims.insert(
            "data".into(),
            Some(
                serde_json::from_value(json!({"spec": {"accessModes": ["ReadWriteOnce"]}}))
                    .unwrap(),
            ),
        );
        assert!(single(&f).fix.contains("source detaches it"));
        f.claims.insert(
            "data".into(),
            Some(
                serde_json::from_value(json!({"spec": {"accessModes": ["ReadWriteMany"]}}))
                    .unwrap(),
            ),
        );
        assert_eq!(problems(&f), Vec::new(), "RWX is fine");

        let mut f = facts();
        f.pod.metadata.owner_references = Some(
            serde_json::from_value(json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "web-1", "uid": "u", "controller": true}]))
            .unwrap(),
        );
        assert!(single(&f).what.contains("managed by ReplicaSet web-1"));

        let mut f = facts();
        f.pod.spec.as_mut().unwrap().node_selector =
            Some(BTreeMap::from([("disk".to_string(), "hdd".to_string())]));
        assert!(
            single(&f)
                .what
                .contains("nodeSelector disk=hdd excludes node node-b")
        );

        let mut f = facts();
        f.pod.spec.as_mut().unwrap().affinity = Some(serde_json::from_value(json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["eu-2a"]}]}]}}})).unwrap());
        assert!(
            single(&f)
                .what
                .contains("required node affinity excludes node node-b")
        );
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_cpu(&Quantity("250m".into())), Some(0.25));
        assert_eq!(parse_cpu(&Quantity("2".into())), Some(2.0));
        assert_eq!(parse_bytes(&Quantity("256Mi".into())), Some(268435456.0));
        assert_eq!(parse_bytes(&Quantity("1G".into())), Some(1e9));
        assert_eq!(parse_bytes(&Quantity("1024".into())), Some(1024.0));
    }
}
