//! Rules about volumes: whether each volume's contents can follow the pod to the target node.
//! Within one node every volume stays reachable, so these rules object to nothing there.

use k8s_openapi::api::core::v1::Volume;

use super::{Facts, Problem, same_node};

/// The pod's volumes whose contents must follow it: none when it stays on its node.
fn moving_volumes(facts: &Facts) -> impl Iterator<Item = &Volume> {
    let moving = !same_node(facts);
    facts
        .pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(move |_| moving)
}

/// A hostPath's files stay on the source node. `--force` migrates anyway: the target mounts
/// the same path on its own node, without the source's files.
pub fn host_paths(facts: &Facts) -> Vec<Problem> {
    if facts.force {
        return Vec::new();
    }
    moving_volumes(facts)
        .filter(|v| v.host_path.is_some())
        .map(|volume| {
            Problem::new(
                format!("volume {} is a hostPath: its files stay on the source node", volume.name),
                "use a PVC or emptyDir (with --include), or pass --force to migrate without its contents",
            )
        })
        .collect()
}

/// A claim must exist, and be attachable on the target while the source still runs
/// (ReadWriteMany or ReadOnlyMany) -- except a StatefulSet's pod's: its source is gone before
/// the moved pod starts, so a ReadWriteOnce claim moves when its volume can attach on the
/// target node (its node affinity allows the node: never a local volume of another node).
pub fn claims(facts: &Facts) -> Vec<Problem> {
    if facts.stateful_set.is_some() {
        return stateful_claims(facts);
    }
    moving_volumes(facts)
        .filter_map(|volume| {
            let claim = volume.persistent_volume_claim.as_ref()?;
            let Some(Some(pvc)) = facts.claims.get(&claim.claim_name) else {
                return Some(Problem::new(
                    format!(
                        "claim {} of volume {} does not exist",
                        claim.claim_name, volume.name
                    ),
                    "create the claim or fix the pod's volume",
                ));
            };
            let modes = pvc
                .spec
                .as_ref()
                .and_then(|s| s.access_modes.clone())
                .unwrap_or_default();
            let shared = modes
                .iter()
                .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany");
            (!shared).then(|| {
                Problem::new(
                    format!("volume {} uses claim {} with access modes {modes:?}", volume.name, claim.claim_name),
                    "a ReadWriteOnce volume can only attach to the target after the source detaches it; use a ReadWriteMany claim",
                )
            })
        })
        .collect()
}

/// A StatefulSet's pod's claims: each bound to a volume that can attach on the target.
fn stateful_claims(facts: &Facts) -> Vec<Problem> {
    let labels = facts
        .target_node
        .as_ref()
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    moving_volumes(facts)
        .filter_map(|volume| {
            let claim = volume.persistent_volume_claim.as_ref()?;
            let name = &claim.claim_name;
            let Some(Some(_)) = facts.claims.get(name) else {
                return Some(Problem::new(
                    format!("claim {name} of volume {} does not exist", volume.name),
                    "create the claim or fix the pod's volume",
                ));
            };
            let Some(Some(pv)) = facts.bound_volumes.get(name) else {
                return Some(Problem::new(
                    format!("the volume bound to claim {name} cannot be read (is the claim bound, and may you get persistentvolumes?)"),
                    "whether it can attach on the target node is not known; apply config/rbac-statefulset.yaml, or wait until the claim is Bound",
                ));
            };
            let pv_name = pv.metadata.name.clone().unwrap_or_default();
            let required = pv
                .spec
                .as_ref()
                .and_then(|s| s.node_affinity.as_ref())
                .and_then(|a| a.required.as_ref());
            let attaches = required.is_none_or(|r| super::node::selector_matches(r, &labels));
            (!attaches).then(|| {
                Problem::new(
                    format!(
                        "volume {pv_name} of claim {name} can only attach on nodes its node affinity names, not on node {}{}",
                        facts.target_name,
                        if pv.spec.as_ref().is_some_and(|s| s.local.is_some()) { " (a local volume: its data lives on its node's disk)" } else { "" }
                    ),
                    "the pod's data cannot follow it there; migrate it to a node the volume can attach on, or move the data first",
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixture::facts;
    use super::*;
    use serde_json::json;

    #[test]
    fn a_host_path_is_refused_unless_forced_or_on_the_same_node() {
        let mut f = facts();
        assert!(host_paths(&f).is_empty());
        f.pod.spec.as_mut().unwrap().volumes = Some(
            serde_json::from_value(json!([{"name": "logs", "hostPath": {"path": "/var/log"}}]))
                .unwrap(),
        );
        let found = host_paths(&f);
        assert_eq!(found.len(), 1);
        assert!(found[0].what.contains("volume logs is a hostPath"));
        assert!(found[0].fix.contains("--force"));
        f.force = true;
        assert!(host_paths(&f).is_empty(), "--force accepts a hostPath");
        f.force = false;
        f.target_name = "node-a".into();
        assert!(host_paths(&f).is_empty(), "within its node the files stay");
    }

    #[test]
    fn claims_must_exist_and_attach_on_two_nodes_at_once() {
        let mut f = facts();
        f.pod.spec.as_mut().unwrap().volumes = Some(
            serde_json::from_value(
                json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]),
            )
            .unwrap(),
        );
        f.claims.insert("data".into(), None);
        assert!(
            claims(&f)[0]
                .what
                .contains("claim data of volume data does not exist")
        );
        let with_modes = |modes: serde_json::Value| {
            Some(serde_json::from_value(json!({"spec": {"accessModes": modes}})).unwrap())
        };
        f.claims
            .insert("data".into(), with_modes(json!(["ReadWriteOnce"])));
        let found = claims(&f);
        assert_eq!(found.len(), 1);
        assert!(found[0].fix.contains("source detaches it"));
        for shared in ["ReadWriteMany", "ReadOnlyMany"] {
            f.claims.insert("data".into(), with_modes(json!([shared])));
            assert!(claims(&f).is_empty(), "{shared} is fine");
        }
        f.claims
            .insert("data".into(), with_modes(json!(["ReadWriteOnce"])));
        f.target_name = "node-a".into();
        assert!(
            claims(&f).is_empty(),
            "within its node the claim stays attached"
        );
    }

    #[test]
    fn a_stateful_set_pod_takes_its_read_write_once_claim_where_the_volume_attaches() {
        let mut f = facts();
        f.stateful_set = Some(Default::default());
        f.pod.spec.as_mut().unwrap().volumes = Some(
            serde_json::from_value(
                json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0"}}]),
            )
            .unwrap(),
        );
        f.claims.insert(
            "data-web-0".into(),
            Some(
                serde_json::from_value(
                    json!({"spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv-1"}}),
                )
                .unwrap(),
            ),
        );
        f.bound_volumes.insert("data-web-0".into(), None);
        assert!(
            claims(&f)[0].what.contains("cannot be read"),
            "{:?}",
            claims(&f)
        );
        let volume = |affinity: serde_json::Value| {
            Some(
                serde_json::from_value(json!({"metadata": {"name": "pv-1"}, "spec": affinity}))
                    .unwrap(),
            )
        };
        f.bound_volumes
            .insert("data-web-0".into(), volume(json!({})));
        assert_eq!(
            claims(&f),
            Vec::new(),
            "a volume without node affinity attaches anywhere"
        );
        let pinned = |zone: &str| {
            json!({"local": {"path": "/mnt/disk"}, "nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": [zone]}]}]}}})
        };
        f.bound_volumes
            .insert("data-web-0".into(), volume(pinned("eu-1a")));
        assert_eq!(claims(&f), Vec::new(), "the target is in the volume's zone");
        f.bound_volumes
            .insert("data-web-0".into(), volume(pinned("us-2b")));
        let found = claims(&f);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].what.contains("volume pv-1 of claim data-web-0 can only attach on nodes its node affinity names, not on node node-b (a local volume"),
            "{found:?}"
        );
    }
}
