//! Golden tests of the pod-spec rewrite: every `tests/fixtures/rewrite/NAME.source.yaml` is
//! rewritten for node `node-b` and must equal `NAME.target.yaml` byte for byte. Set
//! `UPDATE_GOLDEN=1` to rewrite the golden files (then review the diff). A StatefulSet's pod
//! also has its holder (`NAME.holder.yaml`) and successor (`NAME.successor.yaml`). That the real API
//! server accepts every golden target is tested in `tests/tests/apiserver.rs`.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kubectl_migrate::rewrite::{WAIT_ENV, holder_pod, successor_pod, target_pod, wait_field_path};
use migrate_format::annotations;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rewrite")
}

#[test]
fn every_fixture_rewrites_to_its_golden_target() {
    let mut cases = 0;
    let mut entries: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for source_path in entries
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".source.yaml"))
    {
        let name = source_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".source.yaml", "");
        let source: Pod = serde_yaml::from_str(&std::fs::read_to_string(source_path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: fixture is not a Pod: {e}"));
        let target = target_pod(&source, "node-b", "mig-0001");
        let rendered = serde_yaml::to_string(&target).unwrap();
        let golden_path = fixtures().join(format!("{name}.target.yaml"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden_path, &rendered).unwrap();
        }
        let golden = std::fs::read_to_string(&golden_path).unwrap_or_else(|_| {
            panic!(
                "{name}: no golden file {} (run with UPDATE_GOLDEN=1 and review it)",
                golden_path.display()
            )
        });
        assert_eq!(
            rendered, golden,
            "{name}: the rewrite differs from its golden file"
        );

        // Invariants that hold for every case, whatever the golden says.
        let spec = target.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-b"), "{name}");
        assert!(
            target.status.is_none()
                && target.metadata.uid.is_none()
                && target.metadata.resource_version.is_none(),
            "{name}"
        );
        let owned = source
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true));
        let notes = target.metadata.annotations.clone().unwrap_or_default();
        if owned {
            // Held back until the handoff: the controller must neither count nor adopt the
            // target, and no Service select it, before then.
            assert_eq!(target.metadata.labels, None, "{name}: labels held back");
            let held: std::collections::BTreeMap<String, String> =
                serde_json::from_str(&notes[annotations::HELD_LABELS]).unwrap();
            assert_eq!(
                Some(held),
                source.metadata.labels,
                "{name}: every label comes back at the handoff"
            );
            assert!(notes.contains_key(annotations::OWNER), "{name}");
        } else {
            assert_eq!(
                target.metadata.labels, source.metadata.labels,
                "{name}: labels must stay for Services"
            );
        }
        assert_eq!(
            target
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotations::WAIT_FOR_CHECKPOINT))
                .map(String::as_str),
            Some("true"),
            "{name}: the target is created waiting for its checkpoint"
        );
        for container in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let waits = container
                .env
                .iter()
                .flatten()
                .filter(|e| e.name == WAIT_ENV)
                .collect::<Vec<_>>();
            assert_eq!(
                waits.len(),
                1,
                "{name}/{}: exactly one wait setting",
                container.name
            );
            let field = waits[0]
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone());
            assert_eq!(
                (waits[0].value.as_deref(), field),
                (None, Some(wait_field_path())),
                "{name}/{}: the wait comes from the pod's annotation",
                container.name
            );
        }
        cases += 1;
    }
    assert!(cases >= 8, "expected the 8 fixture cases, found {cases}");
}

/// Renders `pod` and compares it with (or with UPDATE_GOLDEN, writes) `file`.
fn golden(pod: &Pod, file: &str) {
    let rendered = serde_yaml::to_string(pod).unwrap();
    let path = fixtures().join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!("no golden file {file} (run with UPDATE_GOLDEN=1 and review it)")
    });
    assert_eq!(
        rendered, golden,
        "{file}: the rewrite differs from its golden file"
    );
}

#[test]
fn a_stateful_set_pod_has_a_holder_without_identity_and_a_successor_with_all_of_it() {
    let source: Pod = serde_yaml::from_str(
        &std::fs::read_to_string(fixtures().join("stateful-set.source.yaml")).unwrap(),
    )
    .unwrap();
    let holder = holder_pod(&source, "node-b", "mig-0001");
    golden(&holder, "stateful-set.holder.yaml");
    let holder_name = holder.metadata.name.clone().unwrap();
    let successor = successor_pod(&source, "node-b", "mig-0001", &holder_name);
    golden(&successor, "stateful-set.successor.yaml");

    // The holder: nothing selects it, nothing owns it, it claims nothing and reserves nothing.
    assert_eq!(holder_name, "ledger-0-m1");
    assert_eq!(holder.metadata.labels, None);
    assert_eq!(holder.metadata.owner_references, None);
    let notes = holder.metadata.annotations.clone().unwrap();
    assert_eq!(notes[annotations::ROLE], "holder");
    assert_eq!(
        notes[annotations::SOURCE_UID],
        "5e7a0000-0000-4000-8000-000000000042"
    );
    assert!(
        !notes.contains_key(annotations::OWNER) && !notes.contains_key(annotations::HELD_LABELS)
    );
    let spec = holder.spec.as_ref().unwrap();
    assert_eq!(
        (spec.hostname.as_deref(), spec.subdomain.as_deref()),
        (None, None)
    );
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .all(|v| v.persistent_volume_claim.is_none())
    );
    let data = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "data")
        .unwrap();
    assert!(
        data.empty_dir.is_some(),
        "the claim's mount stays, on an emptyDir"
    );
    let c = &spec.containers[0];
    assert!(c.ports.is_none() && c.liveness_probe.is_none() && c.readiness_probe.is_none());
    assert!(c.lifecycle.is_none());
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(
        requests["memory"].0, "32Mi",
        "small requests instead of the app's"
    );
    assert!(c.resources.as_ref().unwrap().limits.is_none());
    let work_dir = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "RESTORE_LAUNCHER_WORK_DIR")
        .and_then(|e| e.value.clone());
    assert_eq!(work_dir.as_deref(), Some("/run/migrate-parked/ledger"));
    let parked = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "migrate-parked")
        .unwrap();
    assert!(
        parked.empty_dir.is_some(),
        "the parked archive outlives a container restart"
    );
    assert!(
        c.env
            .iter()
            .flatten()
            .any(|e| e.name == "RESTORE_LAUNCHER_KEY"),
        "the key stays"
    );

    // The successor: the source's identity, pinned, waiting, behind the readiness gate.
    assert_eq!(successor.metadata.name, source.metadata.name);
    assert_eq!(successor.metadata.labels, source.metadata.labels);
    assert_eq!(
        successor.metadata.owner_references,
        source.metadata.owner_references
    );
    let notes = successor.metadata.annotations.clone().unwrap();
    assert_eq!(notes[annotations::ROLE], "successor");
    assert_eq!(notes[annotations::PEER], "ledger-0-m1");
    assert_eq!(notes[annotations::WAIT_FOR_CHECKPOINT], "true");
    let spec = successor.spec.as_ref().unwrap();
    let source_spec = source.spec.as_ref().unwrap();
    assert_eq!(spec.hostname, source_spec.hostname);
    assert_eq!(spec.subdomain, source_spec.subdomain);
    assert_eq!(spec.node_name.as_deref(), Some("node-b"));
    let claim = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "data")
        .unwrap();
    assert_eq!(
        claim
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("data-ledger-0")
    );
    assert_eq!(
        spec.containers[0].liveness_probe,
        source_spec.containers[0].liveness_probe
    );
}
