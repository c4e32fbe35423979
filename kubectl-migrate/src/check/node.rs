//! Rules about the target node: it exists, is Ready and schedulable, its taints are
//! tolerated, it has the source's OS and architecture and a kernel at least as new, the pod's
//! placement rules allow it, and it has room for the pod's requests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{Facts, Problem};

/// Taints the node controller sets from node conditions (reported as NotReady / cordoned).
const CONDITION_TAINTS: [&str; 3] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/unschedulable",
];

/// The target node is not in the cluster.
pub fn missing(facts: &Facts) -> Problem {
    Problem::new(
        format!("node {} does not exist", facts.target_name),
        "pick a node from `kubectl get nodes`",
    )
}

pub fn not_ready(facts: &Facts, node: &Node) -> Option<Problem> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    (!ready).then(|| {
        Problem::new(
            format!("node {} is not Ready", facts.target_name),
            "pick a Ready node (`kubectl get nodes`) or fix the node first",
        )
    })
}

pub fn cordoned(facts: &Facts, node: &Node) -> Option<Problem> {
    let target = &facts.target_name;
    (node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)).then(|| {
        Problem::new(
            format!("node {target} is cordoned (unschedulable)"),
            format!("`kubectl uncordon {target}` or pick another node"),
        )
    })
}

/// Hard taints the pod does not tolerate. Soft taints (PreferNoSchedule) do not block; the
/// node-condition taints mirror [`not_ready`] and [`cordoned`], which already say what is wrong.
pub fn untolerated_taints(facts: &Facts, node: &Node) -> Vec<Problem> {
    let tolerations = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    node.spec
        .iter()
        .flat_map(|s| s.taints.iter().flatten())
        .filter(|taint| {
            taint.effect != "PreferNoSchedule" && !CONDITION_TAINTS.contains(&taint.key.as_str())
        })
        .filter(|taint| {
            !tolerations.iter().any(|t| {
                let exists = t.operator.as_deref() == Some("Exists");
                let key_ok =
                    t.key.is_none() && exists || t.key.as_deref() == Some(taint.key.as_str());
                let value_ok = exists || t.value == taint.value;
                let effect_ok = t
                    .effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == taint.effect);
                key_ok && value_ok && effect_ok
            })
        })
        .map(|taint| {
            Problem::new(
                format!(
                    "node {} has taint {}={}:{} that the pod does not tolerate",
                    facts.target_name,
                    taint.key,
                    taint.value.as_deref().unwrap_or(""),
                    taint.effect
                ),
                "add a matching toleration to the pod, or pick another node",
            )
        })
        .collect()
}

fn label(node: &Node, key: &str) -> Option<String> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .cloned()
}

/// Not a problem, a note: on another boot of another kernel the restored app's monotonic
/// clocks (CLOCK_MONOTONIC, CLOCK_BOOTTIME) jump by the difference of the two nodes' uptimes;
/// a restore inside the container cannot keep them continuous (a time namespace needs
/// CAP_SYS_ADMIN). Nodes on one kernel boot share those clocks.
pub fn clock_jump(facts: &Facts, node: &Node) -> Option<String> {
    let boot = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.clone())
            .filter(|id| !id.is_empty())
    };
    let (from, to) = (boot(facts.source_node.as_ref()?)?, boot(node)?);
    (from != to).then(|| {
        format!(
            "node {} runs another kernel boot than the pod's node: the app's CLOCK_MONOTONIC and CLOCK_BOOTTIME will jump by the difference of the two nodes' uptimes (wall-clock time is unaffected; the migration reports the size of the jump)",
            facts.target_name
        )
    })
}

/// A checkpoint restores only on the source's OS and architecture.
pub fn other_platform(facts: &Facts, node: &Node) -> Vec<Problem> {
    let Some(source) = &facts.source_node else {
        return Vec::new();
    };
    ["kubernetes.io/os", "kubernetes.io/arch"]
        .into_iter()
        .filter(|key| label(source, key) != label(node, key))
        .map(|key| {
            Problem::new(
                format!(
                    "node {} has {key}={} but the pod runs on {}",
                    facts.target_name,
                    label(node, key).unwrap_or_default(),
                    label(source, key).unwrap_or_default()
                ),
                "a checkpoint only restores on the same OS and architecture; pick such a node",
            )
        })
        .collect()
}

/// CRIU restores onto the same or a newer kernel (major.minor).
pub fn older_kernel(facts: &Facts, node: &Node) -> Option<Problem> {
    let source = facts.source_node.as_ref()?;
    let kernel = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kernel_version.clone())
            .unwrap_or_default()
    };
    (major_minor(&kernel(node)) < major_minor(&kernel(source))).then(|| {
        Problem::new(
            format!(
                "node {} runs kernel {} but the pod's node runs {}",
                facts.target_name,
                kernel(node),
                kernel(source)
            ),
            "CRIU restores onto the same or a newer kernel; pick a node with kernel at least as new",
        )
    })
}

fn major_minor(kernel: &str) -> (u32, u32) {
    let mut parts = kernel
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The target pod keeps the source's nodeSelector, and the kubelet refuses to admit a pod its
/// selector excludes (`NodeAffinity`), so a mismatch cannot be forced.
pub fn selector_excludes(facts: &Facts, node: &Node) -> Vec<Problem> {
    let selector = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    selector
        .into_iter()
        .filter(|(key, value)| label(node, key).as_deref() != Some(value.as_str()))
        .map(|(key, value)| {
            Problem::new(
                format!(
                    "the pod's nodeSelector {key}={value} excludes node {}",
                    facts.target_name
                ),
                format!(
                    "pick a node labelled {key}={value}, or label this one (`kubectl label node {} {key}={value}`); the kubelet refuses a pod its selector excludes",
                    facts.target_name
                ),
            )
        })
        .collect()
}

/// Required node affinity, which the kubelet also enforces at admission.
pub fn affinity_excludes(facts: &Facts, node: &Node) -> Option<Problem> {
    let required = facts
        .pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    (!selector_matches(required, &labels)).then(|| {
        Problem::new(
            format!(
                "the pod's required node affinity excludes node {}",
                facts.target_name
            ),
            "pick a node its affinity allows, or label this one to match; the kubelet refuses a pod its affinity excludes",
        )
    })
}

/// Whether a node with `labels` matches a node selector (any term, every expression).
pub fn selector_matches(
    selector: &k8s_openapi::api::core::v1::NodeSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.node_selector_terms.iter().any(|term| {
        term.match_expressions
            .iter()
            .flatten()
            .all(|e| requirement_matches(e, labels))
    })
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

/// Whether the pod's requests fit into what the target has left.
pub fn no_room(facts: &Facts, node: &Node) -> Vec<Problem> {
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
            found.push(Problem::new(
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

#[cfg(test)]
mod clock_tests {
    use super::super::fixture::{facts, node};
    use super::*;

    #[test]
    fn another_kernel_boot_is_a_note_about_the_monotonic_clocks() {
        let boot = |id: &str| {
            let mut n = node("node-b");
            if let Some(info) = n.status.as_mut().and_then(|s| s.node_info.as_mut()) {
                info.boot_id = id.into();
            }
            n
        };
        let mut f = facts();
        f.source_node = Some(boot("aaaa"));
        assert_eq!(clock_jump(&f, &boot("aaaa")), None, "one kernel boot");
        assert_eq!(clock_jump(&f, &boot("")), None, "unknown");
        let note = clock_jump(&f, &boot("bbbb")).unwrap_or_default();
        assert!(note.contains("CLOCK_MONOTONIC"), "{note}");
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{facts, pod, target};
    use super::*;
    use serde_json::json;

    /// Runs `rule` on the fixture's target node.
    fn on_target<T>(f: &Facts, rule: fn(&Facts, &Node) -> T) -> T {
        rule(f, f.target_node.as_ref().unwrap())
    }

    #[test]
    fn a_missing_node_points_at_the_node_list() {
        let p = missing(&facts());
        assert_eq!(p.what, "node node-b does not exist");
        assert!(p.fix.contains("kubectl get nodes"));
    }

    #[test]
    fn a_node_that_is_not_ready_is_refused() {
        let mut f = facts();
        assert_eq!(on_target(&f, not_ready), None);
        target(&mut f)
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();
        assert!(
            on_target(&f, not_ready)
                .unwrap()
                .what
                .contains("node node-b is not Ready")
        );
        target(&mut f).status.as_mut().unwrap().conditions = None;
        assert!(
            on_target(&f, not_ready).is_some(),
            "no Ready condition is not Ready"
        );
    }

    #[test]
    fn a_cordoned_node_says_how_to_uncordon() {
        let mut f = facts();
        assert_eq!(on_target(&f, cordoned), None);
        target(&mut f).spec = Some(serde_json::from_value(json!({"unschedulable": true})).unwrap());
        assert!(
            on_target(&f, cordoned)
                .unwrap()
                .fix
                .contains("kubectl uncordon node-b")
        );
    }

    #[test]
    fn hard_taints_need_a_toleration_and_soft_or_condition_taints_do_not() {
        let mut f = facts();
        target(&mut f).spec = Some(
            serde_json::from_value(json!({"taints": [
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                {"key": "spot", "effect": "PreferNoSchedule"},
                {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
            ]}))
            .unwrap(),
        );
        let found = on_target(&f, untolerated_taints);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].what.contains("taint dedicated=gpu:NoSchedule"));
        assert!(found[0].fix.contains("add a matching toleration"));
        f.pod.spec.as_mut().unwrap().tolerations = Some(
            serde_json::from_value(json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]))
                .unwrap(),
        );
        assert!(
            on_target(&f, untolerated_taints).is_empty(),
            "a matching toleration"
        );
        f.pod.spec.as_mut().unwrap().tolerations =
            Some(serde_json::from_value(json!([{"operator": "Exists"}])).unwrap());
        assert!(
            on_target(&f, untolerated_taints).is_empty(),
            "tolerate everything"
        );
        f.pod.spec.as_mut().unwrap().tolerations = Some(
            serde_json::from_value(
                json!([{"key": "dedicated", "operator": "Equal", "value": "cpu"}]),
            )
            .unwrap(),
        );
        assert_eq!(on_target(&f, untolerated_taints).len(), 1, "another value");
    }

    #[test]
    fn another_architecture_or_os_is_refused() {
        let mut f = facts();
        assert!(on_target(&f, other_platform).is_empty());
        let labels = target(&mut f).metadata.labels.as_mut().unwrap();
        labels.insert("kubernetes.io/arch".into(), "arm64".into());
        labels.insert("kubernetes.io/os".into(), "windows".into());
        let found = on_target(&f, other_platform);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found[1]
                .what
                .contains("kubernetes.io/arch=arm64 but the pod runs on amd64")
        );
        assert!(found[0].fix.contains("same OS and architecture"));
        f.source_node = None;
        assert!(
            on_target(&f, other_platform).is_empty(),
            "no source node to compare"
        );
    }

    #[test]
    fn an_older_kernel_is_refused_and_a_newer_one_accepted() {
        let mut f = facts();
        assert_eq!(on_target(&f, older_kernel), None);
        target(&mut f)
            .status
            .as_mut()
            .unwrap()
            .node_info
            .as_mut()
            .unwrap()
            .kernel_version = "6.1.0".into();
        assert!(
            on_target(&f, older_kernel)
                .unwrap()
                .what
                .contains("runs kernel 6.1.0 but the pod's node runs 6.18.4")
        );
        target(&mut f)
            .status
            .as_mut()
            .unwrap()
            .node_info
            .as_mut()
            .unwrap()
            .kernel_version = "6.18.1-custom".into();
        assert_eq!(on_target(&f, older_kernel), None, "same major.minor");
        assert_eq!(major_minor("6.20.0"), (6, 20));
        assert!(major_minor("6.9.0") < major_minor("6.18.0"));
    }

    #[test]
    fn a_node_selector_that_excludes_the_node_cannot_be_forced() {
        let mut f = facts();
        f.pod.spec.as_mut().unwrap().node_selector =
            Some(BTreeMap::from([("disk".to_string(), "ssd".to_string())]));
        assert!(on_target(&f, selector_excludes).is_empty());
        f.pod.spec.as_mut().unwrap().node_selector =
            Some(BTreeMap::from([("disk".to_string(), "hdd".to_string())]));
        f.force = true;
        let found = on_target(&f, selector_excludes);
        assert_eq!(found.len(), 1);
        assert!(
            found[0]
                .what
                .contains("nodeSelector disk=hdd excludes node node-b")
        );
        assert!(found[0].fix.contains("kubectl label node node-b disk=hdd"));
        assert!(
            !found[0].fix.contains("--force"),
            "no flag can make the kubelet admit it"
        );
    }

    #[test]
    fn required_affinity_is_evaluated_like_the_scheduler() {
        let mut f = facts();
        let affinity = |expression: serde_json::Value| {
            Some(
                serde_json::from_value(
                    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                    {"nodeSelectorTerms": [{"matchExpressions": [expression]}]}}}),
                )
                .unwrap(),
            )
        };
        assert_eq!(on_target(&f, affinity_excludes), None, "no affinity");
        f.pod.spec.as_mut().unwrap().affinity =
            affinity(json!({"key": "zone", "operator": "In", "values": ["eu-2a"]}));
        let p = on_target(&f, affinity_excludes).unwrap();
        assert!(
            p.what
                .contains("required node affinity excludes node node-b")
        );
        assert!(!p.fix.contains("--force"));
        for (expression, allowed) in [
            (
                json!({"key": "zone", "operator": "In", "values": ["eu-1a"]}),
                true,
            ),
            (
                json!({"key": "zone", "operator": "NotIn", "values": ["eu-1a"]}),
                false,
            ),
            (json!({"key": "gpu", "operator": "DoesNotExist"}), true),
            (json!({"key": "disk", "operator": "Exists"}), true),
            (
                json!({"key": "disk", "operator": "Gt", "values": ["1"]}),
                false,
            ),
        ] {
            f.pod.spec.as_mut().unwrap().affinity = affinity(expression.clone());
            assert_eq!(
                on_target(&f, affinity_excludes).is_none(),
                allowed,
                "{expression}"
            );
        }
    }

    #[test]
    fn requests_must_fit_in_what_is_left() {
        let mut f = facts();
        f.pods_on_target = vec![pod(), pod(), pod()]; // 1.5 of 2 cores taken: 0.5 left, enough
        assert!(
            on_target(&f, no_room).is_empty(),
            "exactly enough room is enough"
        );
        f.pods_on_target.push(pod()); // 2 of 2 cores taken
        let found = on_target(&f, no_room);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(
            found[0].what,
            "node node-b has 0m cpu free of 2000m but the pod requests 500m"
        );
        let mut done = pod();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        f.pods_on_target = vec![pod(), pod(), pod(), done];
        assert!(
            on_target(&f, no_room).is_empty(),
            "finished pods hold nothing"
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
