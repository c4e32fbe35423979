//! The target pod, as one pure function of the source pod: [`target_pod`]. Golden-tested with
//! YAML fixtures (`tests/fixtures/rewrite/`), and each golden target is accepted by a real
//! API server (server-side dry-run create).
//!
//! Policy, and why:
//! - identity and history go: uid, resourceVersion, creationTimestamp, generation,
//!   managedFields, deletion fields, status, generateName (the name is set);
//! - ownerReferences and finalizers go: they belong to the source's controllers;
//! - labels stay, so Services and NetworkPolicies select the new pod as they did the old --
//!   except on the target of a pod a controller owns (a ReplicaSet's): it is created with no
//!   labels, so it matches no controller's selector (the ReplicaSet neither counts nor adopts
//!   it) and no Service, and carries the labels and the controller's ownerReference in two
//!   annotations (`held-labels`, `owner`) for the handoff after the commit
//!   (`migrate::handoff`);
//! - the name is predictable: `NAME-mN`, N counting migrations (`counter` → `counter-m1` →
//!   `counter-m2`), at most 63 characters (the pod's hostname);
//! - `spec.nodeName` pins the target node (no scheduler round);
//! - every container's launcher waits for its checkpoint (`RESTORE_LAUNCHER_WAIT_FOR_CHECKPOINT`,
//!   the env twin of `--wait-for-checkpoint`), so the image's ENTRYPOINT and CMD stay. The
//!   variable comes from the pod's `migrate.kubectl.io/wait-for-checkpoint` annotation through
//!   the downward API: `true` at creation, set to `false` by the plugin once the restore is
//!   done. The kubelet resolves it at every container start, so a container restarted later
//!   (crash, OOM kill, liveness failure, node reboot) starts its app fresh, as any container
//!   would, instead of waiting for an archive that never comes;
//! - the app containers get a startup probe their launcher answers, passing only once the app
//!   runs thawed, so that the app's own liveness probe cannot restart the target while it
//!   waits for its checkpoint or holds the restored app frozen (see `probe_once_thawed`);
//! - init containers that already ran on the source are dropped (their effects on volumes
//!   travel with the checkpoint's `--include` paths; running them again could repeat side
//!   effects), native sidecars (`restartPolicy: Always`) are kept and migrated like containers;
//! - ephemeral (debug) containers are dropped: the API does not accept them at creation;
//! - the service-account token volume injected by admission (`kube-api-access-*`) is dropped
//!   with its mounts, so admission injects a fresh one bound to the new pod;
//! - nodeSelector, affinity, tolerations and all other volumes stay as written (the preflight
//!   says when they exclude the target or cannot move).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector, Pod, Probe,
    ResourceRequirements, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use migrate_format::annotations;

/// The launcher's environment twin of `--work-dir`.
const WORK_DIR_ENV: &str = "RESTORE_LAUNCHER_WORK_DIR";
/// The holder's emptyDir for its parked archives.
const PARK_VOLUME: &str = "migrate-parked";

/// The launcher's environment twin of `--wait-for-checkpoint`.
pub const WAIT_ENV: &str = "RESTORE_LAUNCHER_WAIT_FOR_CHECKPOINT";
/// Longest pod name kept usable as a hostname.
const MAX_NAME: usize = 63;

/// The target pod for moving `source` to `node` in migration `migration_id`.
pub fn target_pod(source: &Pod, node: &str, migration_id: &str) -> Pod {
    let mut pod = source.clone();
    let source_name = source.metadata.name.clone().unwrap_or_default();
    let generation = migration_generation(source) + 1;

    let meta = &mut pod.metadata;
    meta.name = Some(target_name(&source_name, generation));
    meta.generate_name = None;
    meta.uid = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.generation = None;
    meta.managed_fields = None;
    let controller = meta
        .owner_references
        .take()
        .into_iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    meta.finalizers = None;
    let held = controller
        .is_some()
        .then(|| meta.labels.take())
        .flatten()
        .unwrap_or_default();
    let notes = meta.annotations.get_or_insert_with(BTreeMap::new);
    // Left from an earlier move of this pod's lineage (a handoff, a StatefulSet pod's move):
    // only this migration's count.
    for key in [
        annotations::OWNER,
        annotations::HELD_LABELS,
        annotations::ROLE,
        annotations::SUCCESSOR,
        annotations::SOURCE_UID,
        annotations::SOURCE_RESTARTS,
        annotations::RESTARTS_AT_FREEZE,
        annotations::TIMINGS,
        annotations::VARIANT,
    ] {
        notes.remove(key);
    }
    if let Some(owner) = controller {
        notes.insert(
            annotations::OWNER.into(),
            serde_json::to_string(&owner).unwrap_or_default(),
        );
        notes.insert(
            annotations::HELD_LABELS.into(),
            serde_json::to_string(&held).unwrap_or_default(),
        );
    }
    notes.remove(annotations::DELETION_COST);
    notes.insert(annotations::MIGRATION_ID.into(), migration_id.into());
    notes.insert(annotations::PEER.into(), source_name);
    notes.insert(annotations::GENERATION.into(), generation.to_string());
    notes.insert(annotations::PHASE.into(), "restoring".into());
    notes.insert(annotations::WAIT_FOR_CHECKPOINT.into(), "true".into());
    pod.status = None;

    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node.into());
        // No Service traffic before the thaw: the pod is Ready only once the plugin sets the
        // gate's condition.
        let gates = spec.readiness_gates.get_or_insert_with(Vec::new);
        if !gates
            .iter()
            .any(|g| g.condition_type == annotations::SERVING)
        {
            gates.push(k8s_openapi::api::core::v1::PodReadinessGate {
                condition_type: annotations::SERVING.into(),
            });
        }
        spec.ephemeral_containers = None;
        if let Some(init) = spec.init_containers.take() {
            let sidecars: Vec<Container> = init.into_iter().filter(is_native_sidecar).collect();
            spec.init_containers = (!sidecars.is_empty()).then_some(sidecars);
        }
        let dropped: Vec<String> = spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| is_injected_token_volume(v))
            .map(|v| v.name.clone())
            .collect();
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| !dropped.contains(&v.name));
        }
        if spec.volumes.as_ref().is_some_and(Vec::is_empty) {
            spec.volumes = None;
        }
        for container in &mut spec.containers {
            probe_once_thawed(container);
        }
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            wait_for_checkpoint(container);
            if let Some(mounts) = container.volume_mounts.as_mut() {
                mounts.retain(|m| !dropped.contains(&m.name));
            }
            if container.volume_mounts.as_ref().is_some_and(Vec::is_empty) {
                container.volume_mounts = None;
            }
        }
    }
    pod
}

/// A StatefulSet pod's move (`migrate::identity`), the holder: the pod on the target node
/// whose launchers keep the checkpoint (`restore-launcher park`) while the pod's name changes
/// hands. Made from [`target_pod`], so it has the source's images, users, environment and
/// Secret-held key, but it runs no app, so it carries nothing the app needs from its node: no
/// labels (no Service, no controller selects it), no owner, no claims or other data volumes
/// (each becomes an emptyDir: a ReadWriteOnce volume stays with the source until it is gone),
/// no ports, probes or hooks, no hostname, and small requests instead of the app's (the node
/// keeps its room for the successor). Its launchers' work directory, where the archive is
/// parked, is an emptyDir of its own (unless the pod sets one), which outlives a restart of
/// the holder's container.
pub fn holder_pod(source: &Pod, node: &str, migration_id: &str) -> Pod {
    let mut pod = target_pod(source, node, migration_id);
    let notes = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    notes.remove(annotations::OWNER);
    notes.remove(annotations::HELD_LABELS);
    notes.insert(annotations::ROLE.into(), "holder".into());
    if let Some(uid) = &source.metadata.uid {
        notes.insert(annotations::SOURCE_UID.into(), uid.clone());
    }
    notes.insert(annotations::PHASE.into(), "parking".into());
    pod.metadata.labels = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.readiness_gates = None;
        spec.hostname = None;
        spec.subdomain = None;
        spec.priority = None;
        spec.overhead = None;
        // Only volumes that are the pod's own configuration stay; every other (claims,
        // ephemeral and inline disks, hostPath, NFS, CSI...) becomes an emptyDir under the
        // same name, so the mounts still resolve.
        for volume in spec.volumes.iter_mut().flatten() {
            let configuration = volume.config_map.is_some()
                || volume.secret.is_some()
                || volume.projected.is_some()
                || volume.downward_api.is_some()
                || volume.empty_dir.is_some();
            if !configuration {
                *volume = Volume {
                    name: volume.name.clone(),
                    empty_dir: Some(Default::default()),
                    ..Default::default()
                };
            }
        }
        // The parked archive lives in the work directory: on an emptyDir of the holder's own
        // (unless the pod names its own work directory), it outlives a restart of the
        // holder's container.
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: PARK_VOLUME.into(),
            empty_dir: Some(Default::default()),
            ..Default::default()
        });
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            container.ports = None;
            container.liveness_probe = None;
            container.readiness_probe = None;
            container.startup_probe = None;
            container.lifecycle = None;
            container.resize_policy = None;
            // Requests, no limits: not the first pod a pressed node evicts (BestEffort), and
            // no room taken from the pod that follows.
            container.resources = Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("10m".into())),
                    ("memory".to_string(), Quantity("32Mi".into())),
                ])),
                ..Default::default()
            });
            let env = container.env.get_or_insert_with(Vec::new);
            if !env.iter().any(|e| e.name == WORK_DIR_ENV) {
                let path = format!("/run/{PARK_VOLUME}/{}", container.name);
                env.push(EnvVar {
                    name: WORK_DIR_ENV.into(),
                    value: Some(path),
                    value_from: None,
                });
                container
                    .volume_mounts
                    .get_or_insert_with(Vec::new)
                    .push(VolumeMount {
                        name: PARK_VOLUME.into(),
                        mount_path: format!("/run/{PARK_VOLUME}"),
                        ..Default::default()
                    });
            }
        }
    }
    pod
}

/// A StatefulSet pod's move, the successor: the pod that takes the source's name on the
/// target node once the source is gone, and receives the app from the holder. It is the
/// source as its StatefulSet made it -- name, labels (`controller-revision-hash`,
/// `statefulset.kubernetes.io/pod-name`), hostname and subdomain, claims, the StatefulSet as
/// controller -- so the controller takes it as its own pod and never replaces it; pinned to
/// the target node, waiting for its checkpoint, behind the readiness gate.
pub fn successor_pod(source: &Pod, node: &str, migration_id: &str, holder: &str) -> Pod {
    let mut pod = target_pod(source, node, migration_id);
    pod.metadata.name.clone_from(&source.metadata.name);
    pod.metadata.labels.clone_from(&source.metadata.labels);
    pod.metadata.owner_references = source.metadata.owner_references.as_ref().map(|refs| {
        refs.iter()
            .filter(|o| o.controller == Some(true))
            .cloned()
            .collect()
    });
    let notes = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    notes.remove(annotations::OWNER);
    notes.remove(annotations::HELD_LABELS);
    notes.insert(annotations::ROLE.into(), "successor".into());
    notes.insert(annotations::PEER.into(), holder.into());
    pod
}

/// Post-copy (`--lazy`): the target's migrated containers get SYS_PTRACE, SYS_ADMIN, NET_ADMIN
/// and SYS_CHROOT. `criu restore --lazy-pages` and `criu lazy-pages` run in CRIU's privileged
/// mode (under `--unprivileged` CRIU never probes userfaultfd and the daemon exits 1), which
/// needs SYS_ADMIN, NET_ADMIN to restore sockets and SYS_CHROOT for its chroot; the
/// userfaultfd itself needs SYS_PTRACE while
/// `vm.unprivileged_userfaultfd` is 0, the default. CRIU gives the restored app its own
/// capability sets back; only the launcher keeps these.
pub fn allow_post_copy(target: &mut Pod) {
    target
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotations::POST_COPY.into(), "true".into());
    let migrated = migrated_containers(target);
    let Some(spec) = target.spec.as_mut() else {
        return;
    };
    for container in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
        .filter(|c| migrated.contains(&c.name))
    {
        let add = container
            .security_context
            .get_or_insert_with(Default::default)
            .capabilities
            .get_or_insert_with(Default::default)
            .add
            .get_or_insert_with(Vec::new);
        for cap in ["SYS_PTRACE", "SYS_ADMIN", "NET_ADMIN", "SYS_CHROOT"] {
            if !add.iter().any(|c| c.trim_start_matches("CAP_") == cap) {
                add.push(cap.into());
            }
        }
    }
}

/// The containers a migration moves, in `pod` (source or target): the native sidecars (init
/// containers with `restartPolicy: Always`, which run beside the app for the pod's life) and
/// the app containers, in start order. Plain init containers have finished: they stay behind.
pub fn migrated_containers(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .filter(|c| is_native_sidecar(c))
                .chain(s.containers.iter())
        })
        .map(|c| c.name.clone())
        .collect()
}

/// An init container that keeps running beside the app (Kubernetes' native sidecar).
pub fn is_native_sidecar(container: &Container) -> bool {
    container.restart_policy.as_deref() == Some("Always")
}

/// `target` (made by [`target_pod`]) renamed one generation further: its name was taken (a
/// pod left over from an earlier attempt, or anyone's), so the next `NAME-mN` is tried.
pub fn next_name(mut target: Pod, source: &str) -> Pod {
    let generation = migration_generation(&target) + 1;
    target.metadata.name = Some(target_name(source, generation));
    target
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotations::GENERATION.into(), generation.to_string());
    target
}

/// How many times this pod's lineage has been migrated (0 for an original pod).
pub fn migration_generation(pod: &Pod) -> u32 {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::GENERATION))
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// `NAME-mN` from the source's name without its own `-mK` suffix, cut to 63 characters.
pub fn target_name(source: &str, generation: u32) -> String {
    let base = match source.rsplit_once("-m") {
        Some((base, digits))
            if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) =>
        {
            base
        }
        _ => source,
    };
    let suffix = format!("-m{generation}");
    let keep = MAX_NAME.saturating_sub(suffix.len()).min(base.len());
    let base = base[..keep].trim_end_matches(['-', '.']);
    format!("{base}{suffix}")
}

/// How often the kubelet runs the target's startup probe: also the most its Ready condition
/// lags behind the thaw.
const STARTUP_PERIOD_SECONDS: i32 = 1;
/// How many of them may fail: a week of waiting. The probe must outlast every wait a
/// migration can have before its thaw -- the target's start, the transfer, the verify, a
/// plugin that died after the commit and the `kubectl migrate resume` that comes later -- since
/// the container it restarts after them may hold the only copy of the app.
const STARTUP_FAILURES: i32 = 7 * 24 * 3600 / STARTUP_PERIOD_SECONDS;

/// The target's app containers get a startup probe the launcher answers
/// (`restore-launcher probe`): it fails while the launcher waits for its checkpoint,
/// restores, or holds the restored app frozen, and passes once the app runs thawed. The
/// kubelet runs no liveness or readiness probe of a container before its startup probe has
/// passed, so the app's own liveness probe -- which a waiting launcher or a frozen app cannot
/// answer -- never restarts the target before the thaw, and counts from the thaw on. The app's
/// own startup probe is not needed by an app that already started; should the container
/// restart later and start the app fresh, the probe passes only once the app has run as long
/// as that probe allowed it (`--fresh-after`). Native sidecars get none: the kubelet starts the
/// pod's app containers only once a sidecar's startup probe passed, which would never happen
/// before the thaw.
fn probe_once_thawed(container: &mut Container) {
    let fresh_after = container.startup_probe.as_ref().map_or(0, |p| {
        i64::from(p.initial_delay_seconds.unwrap_or(0))
            + i64::from(p.failure_threshold.unwrap_or(3).max(1))
                * i64::from(p.period_seconds.unwrap_or(10).max(1))
    });
    container.startup_probe = Some(Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                "restore-launcher".into(),
                "probe".into(),
                "--fresh-after".into(),
                fresh_after.to_string(),
            ]),
        }),
        period_seconds: Some(STARTUP_PERIOD_SECONDS),
        failure_threshold: Some(STARTUP_FAILURES),
        timeout_seconds: Some(5),
        ..Probe::default()
    });
}

/// Where the launchers' wait setting comes from: the target's own annotation.
pub fn wait_field_path() -> String {
    format!(
        "metadata.annotations['{}']",
        annotations::WAIT_FOR_CHECKPOINT
    )
}

fn wait_for_checkpoint(container: &mut Container) {
    let env = container.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != WAIT_ENV);
    env.push(EnvVar {
        name: WAIT_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: wait_field_path(),
            }),
            ..EnvVarSource::default()
        }),
    });
}

/// The projected volume the ServiceAccount admission plugin adds (`kube-api-access-XXXXX`).
fn is_injected_token_volume(volume: &k8s_openapi::api::core::v1::Volume) -> bool {
    volume.name.starts_with("kube-api-access-")
        && volume.projected.as_ref().is_some_and(|p| {
            p.sources
                .iter()
                .flatten()
                .any(|s| s.service_account_token.is_some())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_move_with_the_app_and_finished_init_containers_stay() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "duo"},
            "spec": {
                "initContainers": [
                    {"name": "setup", "image": "i"},
                    {"name": "tally", "image": "i", "restartPolicy": "Always"}
                ],
                "containers": [{"name": "app", "image": "i"}, {"name": "web", "image": "i"}]
            }
        }))
        .unwrap();
        assert_eq!(migrated_containers(&pod), ["tally", "app", "web"]);
    }

    #[test]
    fn names_count_migrations_and_fit_a_hostname() {
        assert_eq!(target_name("counter", 1), "counter-m1");
        let source: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "counter"}, "spec": {"containers": [{"name": "app"}]}
        }))
        .unwrap_or_default();
        let taken = target_pod(&source, "node-b", "mig-1");
        assert_eq!(taken.metadata.name.as_deref(), Some("counter-m1"));
        let next = next_name(taken, "counter");
        assert_eq!(next.metadata.name.as_deref(), Some("counter-m2"));
        assert_eq!(migration_generation(&next), 2);
        assert_eq!(target_name("counter-m1", 2), "counter-m2");
        assert_eq!(target_name("web-7d9f5-abcde", 1), "web-7d9f5-abcde-m1");
        assert_eq!(
            target_name("my-mux", 1),
            "my-mux-m1",
            "-m followed by letters is part of the name"
        );
        let long = "a".repeat(80);
        let name = target_name(&long, 12);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("-m12"));
    }
}
