//! The pods people run, against the real controllers (kube-controller-manager and
//! kube-scheduler of the local cluster): a Deployment's pod handed from its source to its
//! restored copy without the ReplicaSet ever starting or deleting a replica of its own, its
//! rollback, a StatefulSet's pod moved keeping its name, and the refusals for pods that cannot
//! move.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// A Deployment of `replicas` counters, one per node at most (a topology spread constraint
/// that the scheduler enforces).
fn counter_deployment(name: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}, tier: demo}}
    spec:
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {{app: {name}}}
      containers:
      - name: counter
        image: {image}
        imagePullPolicy: Never
        env:
        - {{name: COUNTER_INTERVAL, value: '0.5'}}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop: [ALL]
            add: [CHECKPOINT_RESTORE, SETPCAP]
",
        image = migrate_tests::cluster::counter_image()
    )
}

/// The pod of Deployment `name` that runs on `node`, once the Deployment is fully available.
fn deployment_pod_on(cluster: &Cluster, name: &str, node: &str) -> Result<String> {
    cluster.kubectl_ok(&[
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=120s",
    ])?;
    let pods = cluster.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        &format!("app={name}"),
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    pods.split_whitespace()
        .next()
        .map(String::from)
        .with_context(|| format!("no pod of deployment {name} on {node}"))
}

/// The uid of the ReplicaSet that controls `pod`.
fn controller_uid(cluster: &Cluster, pod: &str) -> Result<String> {
    pod_field(
        cluster,
        pod,
        "{.metadata.ownerReferences[?(@.controller==true)].uid}",
    )
}

/// What a watch of the namespace's pods saw of one ReplicaSet's pods: every pod name it ever
/// owned, and the least and most pods it owned at once (all of them, terminating included,
/// and the active ones, which the ReplicaSet counts).
#[derive(Debug, Default)]
struct Census {
    names: BTreeSet<String>,
    least_active: usize,
    most_owned: usize,
}

/// `kubectl get pods --watch` in the background, counting the pods controlled by `owner_uid`
/// after every event, from the moment it has seen `replicas` of them (the watch lists the
/// existing pods one event at a time).
struct OwnedPodsWatch {
    child: Child,
    census: Arc<Mutex<Census>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl OwnedPodsWatch {
    fn start(cluster: &Cluster, owner_uid: &str, replicas: usize) -> Result<OwnedPodsWatch> {
        let mut child = cluster
            .kubectl(&[
                "get",
                "pods",
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let census = Arc::new(Mutex::new(Census {
            least_active: usize::MAX,
            ..Census::default()
        }));
        let sink = Arc::clone(&census);
        let owner = owner_uid.to_string();
        let reader = std::thread::spawn(move || {
            // name → terminating, for the pods the ReplicaSet controls now.
            let mut owned: BTreeMap<String, bool> = BTreeMap::new();
            let mut armed = false;
            let events = serde_json::Deserializer::from_reader(stdout)
                .into_iter::<serde_json::Value>()
                .map_while(Result::ok);
            for event in events {
                let pod = &event["object"];
                let name = pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let controlled = pod["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| o["uid"] == owner.as_str() && o["controller"] == true);
                if event["type"] == "DELETED" || !controlled {
                    owned.remove(&name);
                } else {
                    owned.insert(
                        name.clone(),
                        !pod["metadata"]["deletionTimestamp"].is_null(),
                    );
                }
                let mut census = sink.lock().expect("lock");
                if controlled {
                    census.names.insert(name);
                }
                let active = owned.values().filter(|terminating| !**terminating).count();
                armed |= active >= replicas;
                if !armed {
                    continue;
                }
                census.least_active = census.least_active.min(active);
                census.most_owned = census.most_owned.max(owned.len());
            }
        });
        Ok(OwnedPodsWatch {
            child,
            census,
            reader: Some(reader),
        })
    }

    /// Waits until the watch has listed `replicas` pods.
    fn wait_listed(&self, replicas: usize) -> Result<()> {
        wait_until("the watch to list the pods", WAIT, || {
            Ok((self.census.lock().expect("lock").least_active == replicas).then_some(()))
        })
    }

    /// Stops the watch; what it saw.
    fn finish(mut self) -> Census {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        std::mem::take(&mut *self.census.lock().expect("lock"))
    }
}

/// Once Deployment `name` is steady again, what `watch` saw of its 2-replica ReplicaSet, which
/// must have owned exactly `pods` (the two replicas and the restored pod: no fresh replica) and
/// between 2 and 3 of them at any time. The watch runs 3 s past the rollout's end, a window in
/// which a controller about to make a replica would have made it.
fn settled_census(
    cluster: &Cluster,
    name: &str,
    watch: OwnedPodsWatch,
    pods: [&String; 3],
) -> Result<Census> {
    cluster.kubectl_ok(&[
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=60s",
    ])?;
    std::thread::sleep(Duration::from_secs(3));
    let census = watch.finish();
    let expected: BTreeSet<String> = pods.into_iter().cloned().collect();
    ensure!(
        census.names == expected,
        "the ReplicaSet owned other pods than the two replicas and the restored one (a fresh replica was made): {:?}",
        census.names
    );
    ensure!(
        census.least_active >= 2 && census.most_owned <= 3,
        "the ReplicaSet's pods went outside 2..=3: {census:?}"
    );
    Ok(census)
}

/// Acceptance: a Deployment of 2 counters; its node-a pod moves to node-b; the count
/// continues; the ReplicaSet never owns fewer than 2 or more than 3 pods and never makes a pod
/// of its own; afterwards it owns the restored pod, the Deployment is 2/2 ready, and its
/// Service's endpoints are the restored pod and the other replica.
pub fn deployment_pod_moves_with_a_handoff(cluster: &Cluster) -> Result<()> {
    let name = "shop";
    cluster.apply(&counter_deployment(name, 2))?;
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - port: 80\n"
    ))?;
    let source = deployment_pod_on(cluster, name, "node-a")?;
    let other = deployment_pod_on(cluster, name, "node-b")?;
    let owner = controller_uid(cluster, &source)?;
    let source_runtime = cluster.oci_runtime_of(&source)?;
    let watch = OwnedPodsWatch::start(cluster, &owner, 2)?;
    let follow = Follow::start(cluster, &source)?;
    watch.wait_listed(2)?;
    let out = migrate_ok(cluster, &[&source, "--to", "node-b"], &[])?;
    let target = format!("{source}-m1");
    ensure!(
        out.stdout.contains(&format!("as {target}")),
        "no summary line: {}",
        out.stdout
    );
    let before = follow.finish(WAIT);
    wait_gone(cluster, &source)?;
    wait_until(&format!("3 counts on {target}"), WAIT, || {
        Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
    })?;
    let (last, first) = assert_continued(&before, &logs(cluster, &target, None))?;
    let census = settled_census(cluster, name, watch, [&source, &other, &target])?;
    ensure!(
        controller_uid(cluster, &target)? == owner,
        "the ReplicaSet does not own the restored pod"
    );
    let labels = pod_field(cluster, &target, "{.metadata.labels}")?;
    let source_hash = cluster.kubectl_ok(&[
        "get",
        "rs",
        "-l",
        &format!("app={name}"),
        "-o",
        "jsonpath={.items[0].metadata.labels.pod-template-hash}",
    ])?;
    ensure!(
        labels.contains(&format!("\"pod-template-hash\":\"{source_hash}\""))
            && labels.contains("\"tier\":\"demo\""),
        "the restored pod lacks the Deployment's labels: {labels}"
    );
    let notes = pod_field(cluster, &target, "{.metadata.annotations}")?;
    ensure!(
        !notes.contains("pod-deletion-cost"),
        "the restored pod kept a deletion cost: {notes}"
    );
    let ready = cluster.kubectl_ok(&[
        "get",
        "deployment",
        name,
        "-o",
        "jsonpath={.status.readyReplicas}/{.spec.replicas}",
    ])?;
    ensure!(ready == "2/2", "the Deployment is {ready} ready");
    // The Service routes to the restored pod: its EndpointSlice lists it, ready, beside the
    // other replica, and no longer the source.
    let target_ip = pod_field(cluster, &target, "{.status.podIP}")?;
    let other_ip = pod_field(cluster, &other, "{.status.podIP}")?;
    let endpoints = wait_until("the Service's endpoints to follow", WAIT, || {
        let ready = cluster.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={name}"),
            "-o",
            "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}",
        ])?;
        let ips: BTreeSet<&str> = ready.split_whitespace().collect();
        Ok((ips == [target_ip.as_str(), other_ip.as_str()].into()).then(|| ready.clone()))
    })?;
    let restarts = pod_field(
        cluster,
        &target,
        "{.status.containerStatuses[0].restartCount}",
    )?;
    ensure!(restarts == "0", "{target} restarted {restarts} times");
    // The move crossed runtime stacks.
    let runtimes = (source_runtime, cluster.oci_runtime_of(&target)?);
    ensure!(
        runtimes == ("runc".to_string(), "crun".to_string()),
        "the move did not go from runc to crun: {runtimes:?}"
    );
    eprintln!(
        "deployment {name}: {source} ({}) → {target} ({}) on node-b, count {last} → {first}; the ReplicaSet owned {:?} ({}..={} pods); Service endpoints {endpoints}",
        runtimes.0, runtimes.1, census.names, census.least_active, census.most_owned
    );
    cluster.kubectl_ok(&["delete", "deployment", name, "--wait=false"])?;
    cluster.kubectl_ok(&["delete", "service", name, "--wait=false"])?;
    Ok(())
}

/// Acceptance: the rollback guarantee holds for a Deployment's pod: a damaged archive leaves
/// the source running (counting on, never restarted), the target deleted, and the ReplicaSet's
/// pods as they were.
pub fn deployment_pod_rolls_back_on_a_damaged_archive(cluster: &Cluster) -> Result<()> {
    let name = "till";
    cluster.apply(&counter_deployment(name, 2))?;
    let source = deployment_pod_on(cluster, name, "node-a")?;
    let owner = controller_uid(cluster, &source)?;
    let watch = OwnedPodsWatch::start(cluster, &owner, 2)?;
    let follow = Follow::start(cluster, &source)?;
    watch.wait_listed(2)?;
    let out = migrate(
        cluster,
        &[&source, "--to", "node-b", "--transfer", "relay"],
        &[("KUBECTL_MIGRATE_FAULT_FLIP_BYTE", "20000")],
    )?;
    ensure!(
        out.code.is_some_and(|c| c != 0) && out.stderr.contains("keeps running with its state"),
        "a damaged archive must fail the migration and say the source keeps running: {:?}\n{}",
        out.code,
        out.stderr
    );
    wait_gone(cluster, &format!("{source}-m1"))?;
    source_kept_counting(cluster, &source, follow)?;
    std::thread::sleep(Duration::from_secs(3));
    let census = watch.finish();
    ensure!(
        census.names.len() == 2 && census.least_active == 2 && census.most_owned == 2,
        "the ReplicaSet's pods changed during a rolled-back move: {census:?}"
    );
    let restarts = pod_field(
        cluster,
        &source,
        "{.status.containerStatuses[0].restartCount}",
    )?;
    ensure!(restarts == "0", "the source restarted {restarts} times");
    cluster.kubectl_ok(&["delete", "deployment", name, "--wait=false"])?;
    Ok(())
}

/// A StatefulSet of one counter with a claim from its volumeClaimTemplate, bound to a
/// statically made volume (no provisioner here) that may attach on any node, preferring
/// node-a.
fn counter_stateful_set(name: &str) -> String {
    format!(
        "apiVersion: v1
kind: PersistentVolume
metadata:
  name: {name}-data
spec:
  capacity: {{storage: 64Mi}}
  accessModes: [ReadWriteOnce]
  storageClassName: {name}-manual
  persistentVolumeReclaimPolicy: Delete
  hostPath: {{path: /tmp/migrate-e2e-{name}, type: DirectoryOrCreate}}
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: None
  selector: {{app: {name}}}
  ports: [{{port: 80}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {name}
spec:
  serviceName: {name}
  replicas: 1
  selector:
    matchLabels: {{app: {name}}}
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec:
      accessModes: [ReadWriteOnce]
      storageClassName: {name}-manual
      resources: {{requests: {{storage: 64Mi}}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            preference:
              matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [node-a]}}]
      containers:
      - name: counter
        image: {image}
        imagePullPolicy: Never
        env:
        - {{name: COUNTER_INTERVAL, value: '0.5'}}
        # A damaged archive can leave its reader waiting for bytes that never come: given up
        # after 20 s instead of 120 (the holder's `park` and the new pod's `receive` alike).
        - {{name: RESTORE_LAUNCHER_INPUT_STALL_TIMEOUT, value: '20'}}
        volumeMounts: [{{name: data, mountPath: /data}}]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            drop: [ALL]
            add: [CHECKPOINT_RESTORE, SETPCAP]
",
        image = migrate_tests::cluster::counter_image()
    )
}

/// `kubectl get pods --watch` in the background, noting every pod named `name` that ever
/// exists: its uid and node. A StatefulSet's replacement started by the controller would
/// show as a uid more.
struct NamedPodWatch {
    child: Child,
    seen: Arc<Mutex<BTreeMap<String, String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl NamedPodWatch {
    fn start(cluster: &Cluster, name: &str) -> Result<NamedPodWatch> {
        let mut child = cluster
            .kubectl(&[
                "get",
                "pods",
                "--watch",
                "-o",
                "jsonpath={.metadata.name} {.metadata.uid} {.spec.nodeName}{\"\\n\"}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let sink = Arc::clone(&seen);
        let wanted = name.to_string();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut fields = line.split_whitespace();
                if let (Some(pod), Some(uid)) = (fields.next(), fields.next())
                    && pod == wanted
                {
                    let node = fields.next().unwrap_or("").to_string();
                    sink.lock().expect("lock").insert(uid.to_string(), node);
                }
            }
        });
        Ok(NamedPodWatch {
            child,
            seen,
            reader: Some(reader),
        })
    }

    /// Every uid seen, with its node, once the watch has seen `uid` (the last pod expected).
    fn finish(mut self, uid: &str) -> Result<BTreeMap<String, String>> {
        wait_until("the pod watch to see the restored pod", WAIT, || {
            Ok(self
                .seen
                .lock()
                .expect("lock")
                .contains_key(uid)
                .then_some(()))
        })?;
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(self.seen.lock().expect("lock").clone())
    }
}

/// Waits until no holder pod of `pod` (`POD-mN`) and no migration's admission policy is
/// left.
fn holder_and_policy_gone(cluster: &Cluster, pod: &str, when: &str) -> Result<()> {
    wait_until(
        &format!("the holder and the policy to go {when}"),
        WAIT,
        || {
            let left = cluster.kubectl_ok(&[
                "get",
                "validatingadmissionpolicies,pods",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])?;
            Ok(
                (!left.contains("kubectl-migrate-") && !left.contains(&format!("{pod}-m")))
                    .then_some(()),
            )
        },
    )
}

/// Waits until pod `name` runs on `node` and has printed 3 counts; returns its logs.
fn counting_on(cluster: &Cluster, name: &str, node: &str) -> Result<String> {
    wait_until(&format!("pod {name} counting on {node}"), WAIT, || {
        let output = cluster
            .kubectl(&["get", "pod", name, "-o", "jsonpath={.spec.nodeName}"])
            .output()?;
        if String::from_utf8_lossy(&output.stdout) != node {
            return Ok(None);
        }
        let text = logs(cluster, name, None);
        Ok((counter_values(&text).len() >= 3).then_some(text))
    })
}

/// Acceptance: a StatefulSet's pod moves keeping its identity -- the same name, hostname and
/// claim, on node-b (runc → crun) -- and its count continues; the StatefulSet controller, which
/// recreates a missing pod by name, never gets to start it fresh: exactly two pods ever have
/// the name (the source and the restored one), and the controller's own attempt is seen
/// refused. Before that, a damaged archive rolls back (the source counts on, the holder and
/// the policy go); after it, a move back killed with the source gone (the parked checkpoint
/// the only copy) is finished by `kubectl migrate resume`, the count continuing again.
pub fn stateful_set_pod_moves_keeping_its_name(cluster: &Cluster) -> Result<()> {
    let set = "ledger";
    let pod = "ledger-0";
    cluster.apply(&counter_stateful_set(set))?;
    cluster.kubectl_ok(&[
        "rollout",
        "status",
        &format!("statefulset/{set}"),
        "--timeout=120s",
    ])?;
    let node = pod_field(cluster, pod, "{.spec.nodeName}")?;
    ensure!(
        node == "node-a",
        "the scheduler put {pod} on {node}, not node-a"
    );
    let claim = "{.spec.volumes[?(@.name==\"data\")].persistentVolumeClaim.claimName}";
    ensure!(pod_field(cluster, pod, claim)? == format!("data-{pod}"));
    let source_uid = pod_field(cluster, pod, "{.metadata.uid}")?;
    let source_runtime = cluster.oci_runtime_of(pod)?;
    let watch = NamedPodWatch::start(cluster, pod)?;
    let follow = Follow::start(cluster, pod)?;
    wait_until("3 counts on the source", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= 3).then_some(()))
    })?;

    // The rollback guarantee first: a byte damaged on its way to the holder is refused there,
    // before the commit; the source counts on, never restarted, and the holder and the
    // policy are gone. (The watch below shows no other pod ever had the name.)
    let damaged = migrate(
        cluster,
        &[pod, "--to", "node-b"],
        &[("KUBECTL_MIGRATE_FAULT_FLIP_BYTE", "20000")],
    )?;
    ensure!(
        damaged.code == Some(1)
            && damaged.stderr.contains("archive refused")
            && damaged.stderr.contains("nothing was parked")
            && damaged.stderr.contains("deleted the admission policy"),
        "a damaged archive: exit {:?}\n{}{}",
        damaged.code,
        damaged.stdout,
        damaged.stderr
    );
    let counted = counter_values(&follow.text()).len();
    wait_until("the source counting on after the rollback", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= counted + 2).then_some(()))
    })?;
    ensure!(pod_field(cluster, pod, "{.metadata.uid}")? == source_uid);
    let restarts = pod_field(cluster, pod, "{.status.containerStatuses[0].restartCount}")?;
    ensure!(restarts == "0", "the source restarted {restarts} times");
    holder_and_policy_gone(cluster, pod, "after the rollback")?;

    let out = migrate_ok(cluster, &[pod, "--to", "node-b"], &[])?;
    ensure!(
        out.stdout.contains(&format!("as {pod} ")),
        "no summary line naming the same pod: {}",
        out.stdout
    );
    let before = follow.finish(WAIT);
    let after = counting_on(cluster, pod, "node-b")?;
    let (last, first) = assert_continued(&before, &after)?;
    let uid = pod_field(cluster, pod, "{.metadata.uid}")?;
    let seen = watch.finish(&uid)?;
    ensure!(
        seen.len() == 2
            && seen.get(&source_uid).map(String::as_str) == Some("node-a")
            && seen.get(&uid).map(String::as_str) == Some("node-b"),
        "pods named {pod} other than the source and the restored one existed: {seen:?}"
    );
    // The identity: hostname, claim, owner, labels the controller checks.
    let hostname = cluster.kubectl_ok(&["exec", pod, "--", "hostname"])?;
    ensure!(
        hostname.trim() == pod,
        "the restored pod's hostname is {hostname}"
    );
    ensure!(pod_field(cluster, pod, claim)? == format!("data-{pod}"));
    let owner = pod_field(
        cluster,
        pod,
        "{.metadata.ownerReferences[?(@.controller==true)].kind}/{.metadata.ownerReferences[?(@.controller==true)].name}",
    )?;
    ensure!(owner == format!("StatefulSet/{set}"), "owned by {owner}");
    let restarts = pod_field(cluster, pod, "{.status.containerStatuses[0].restartCount}")?;
    ensure!(restarts == "0", "{pod} restarted {restarts} times");
    wait_until("the StatefulSet 1/1 ready", WAIT, || {
        let ready = cluster.kubectl_ok(&[
            "get",
            "statefulset",
            set,
            "-o",
            "jsonpath={.status.readyReplicas}/{.status.currentReplicas}",
        ])?;
        Ok((ready == "1/1").then_some(()))
    })?;
    // The controller did try to recreate the pod, and the migration's policy refused it.
    let refused = cluster.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={set},reason=FailedCreate"),
        "-o",
        "jsonpath={.items[*].message}",
    ])?;
    ensure!(
        refused.contains("kubectl-migrate-mig-"),
        "no refused attempt of the controller seen: {refused:?}"
    );
    holder_and_policy_gone(cluster, pod, "after the move")?;
    let runtimes = (source_runtime, cluster.oci_runtime_of(pod)?);
    ensure!(
        runtimes == ("runc".to_string(), "crun".to_string()),
        "the move did not go from runc to crun: {runtimes:?}"
    );
    eprintln!(
        "statefulset {set}: {pod} node-a ({}) → node-b ({}), count {last} → {first}; pods named {pod}: {seen:?}",
        runtimes.0, runtimes.1
    );

    // Back to node-a, the plugin killed once the source is gone: only the parked checkpoint
    // holds the app, and `resume` finishes from it.
    let follow = Follow::start(cluster, pod)?;
    wait_until("3 counts on node-b", WAIT, || {
        Ok((counter_values(&follow.text()).len() >= 3).then_some(()))
    })?;
    let out = migrate(
        cluster,
        &[pod, "--to", "node-a"],
        &[("KUBECTL_MIGRATE_FAULT_KILL_AT", "source-gone")],
    )?;
    ensure!(
        out.code.is_none() && out.stderr.contains("at stage source-gone"),
        "the plugin was to die at source-gone: exit {:?}\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    let before = follow.finish(WAIT);
    let status = migrate_ok(cluster, &["status", pod], &[])?;
    ensure!(
        status.stdout.contains("committed")
            && status
                .stdout
                .contains(&format!("kubectl migrate resume {pod}")),
        "status does not name the resume: {}",
        status.stdout
    );
    let resumed = migrate_ok(cluster, &["resume", pod], &[])?;
    ensure!(
        resumed
            .stdout
            .contains(&format!("pod {pod} runs the app on node node-a")),
        "{}",
        resumed.stdout
    );
    let after = counting_on(cluster, pod, "node-a")?;
    let (last, first) = assert_continued(&before, &after)?;
    // The holder is deleted last (and takes a moment to terminate): gone, and the policy too.
    holder_and_policy_gone(cluster, pod, "after the resume")?;
    eprintln!(
        "statefulset {set}: killed with the source gone, resumed on node-a, count {last} → {first}"
    );
    cluster.kubectl_ok(&["delete", "statefulset", set, "--wait=false"])?;
    cluster.kubectl_ok(&["delete", "service", set, "--wait=false"])?;
    Ok(())
}

/// Acceptance: `check` refuses a DaemonSet's pod and a Job's, each with its reason, and
/// changes nothing.
pub fn daemon_set_and_job_pods_are_refused_with_their_reasons(cluster: &Cluster) -> Result<()> {
    let image = migrate_tests::cluster::counter_image();
    let container = format!(
        "      containers:\n      - name: counter\n        image: {image}\n        imagePullPolicy: Never\n        securityContext:\n          allowPrivilegeEscalation: false\n          capabilities: {{drop: [ALL], add: [CHECKPOINT_RESTORE, SETPCAP]}}\n"
    );
    cluster.apply(&format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\nspec:\n  selector:\n    matchLabels: {{app: agent}}\n  template:\n    metadata:\n      labels: {{app: agent}}\n    spec:\n{container}"
    ))?;
    cluster.apply(&format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: batch\nspec:\n  backoffLimit: 0\n  template:\n    metadata:\n      labels: {{app: batch}}\n    spec:\n      restartPolicy: Never\n      nodeSelector: {{kubernetes.io/hostname: node-a}}\n{container}"
    ))?;
    for (label, reason) in [
        (
            "app=agent",
            "managed by DaemonSet agent, which runs one pod on each node",
        ),
        (
            "app=batch",
            "managed by Job batch: the Job controller starts a fresh pod",
        ),
    ] {
        let pod = wait_until(&format!("a running pod {label}"), WAIT, || {
            let pods = cluster.kubectl_ok(&[
                "get",
                "pods",
                "-l",
                label,
                "--field-selector",
                "status.phase=Running,spec.nodeName=node-a",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])?;
            Ok(pods.split_whitespace().next().map(String::from))
        })?;
        let out = migrate(cluster, &["check", &pod, "--to", "node-b"], &[])?;
        ensure!(
            out.code.is_some_and(|c| c != 0) && out.stderr.contains(reason),
            "check of {pod} must refuse with \"{reason}\": {:?}\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        ensure!(
            cluster
                .kubectl_ok(&["get", "pods", "-o", "name"])?
                .lines()
                .all(|l| !l.ends_with("-m1") || !l.contains(&pod)),
            "check created a target for {pod}"
        );
    }
    cluster.kubectl_ok(&["delete", "daemonset", "agent", "--wait=false"])?;
    cluster.kubectl_ok(&["delete", "job", "batch", "--wait=false"])?;
    Ok(())
}

/// Pods of earlier tests still on `node` (all of them finished): a drain would move them too.
fn clear_node(cluster: &Cluster, node: &str) -> Result<()> {
    let left = cluster.kubectl_ok(&[
        "get",
        "pods",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    for pod in left.split_whitespace() {
        cluster.kubectl_ok(&["delete", "pod", pod, "--wait=false", "--grace-period=1"])?;
    }
    for pod in left.split_whitespace() {
        wait_gone(cluster, pod)?;
    }
    Ok(())
}

/// Acceptance: `kubectl migrate drain node-a` with a bare counter, a Deployment's counter and
/// a pod without the launcher: the two counters are migrated with their counts continuing,
/// the third is evicted, node-a is cordoned, the table is printed, exit 0. Then a pod that a
/// PodDisruptionBudget protects: the drain reports the refused eviction and exits 1, and the
/// migrated pods still count.
pub fn drain_migrates_what_it_can_and_evicts_the_rest(cluster: &Cluster) -> Result<()> {
    clear_node(cluster, "node-a")?;
    let result = drain_scenario(cluster);
    // Later tests schedule onto node-a.
    cluster.kubectl_ok(&["uncordon", "node-a"])?;
    result
}

fn drain_scenario(cluster: &Cluster) -> Result<()> {
    let start = Instant::now();
    let step = |what: &str| eprintln!("drain test: {what} at {:?}", start.elapsed());
    run_counter(cluster, "solo", "node-a", &[])?;
    let deployment = "depot";
    cluster.apply(&counter_deployment(deployment, 2))?;
    let replica = deployment_pod_on(cluster, deployment, "node-a")?;
    let plain = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  nodeName: node-a\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: pause\n    image: {}\n    imagePullPolicy: Never\n",
            migrate_tests::cluster::PAUSE_IMAGE
        )
    };
    cluster.apply(&plain("plain", "app: plain"))?;
    cluster.wait_running("plain", WAIT)?;
    let follow_solo = Follow::start(cluster, "solo")?;
    let follow_replica = Follow::start(cluster, &replica)?;

    step("pods running");
    // A dry run changes nothing, and without --force a pod no controller owns is not evicted.
    let dry = migrate(
        cluster,
        &["drain", "node-a", "--to", "node-b", "--dry-run"],
        &[],
    )?;
    ensure!(
        dry.code == Some(1)
            && row_of(&dry.stdout, "solo")[2] == "would-migrate"
            && row_of(&dry.stdout, &replica)[2] == "would-migrate"
            && row_of(&dry.stdout, "plain")[2] == "failed"
            && dry.stderr.contains("pass --force to evict it anyway"),
        "the dry run must plan two migrations and refuse to evict a bare pod without --force: {:?}\n{}{}",
        dry.code,
        dry.stdout,
        dry.stderr
    );
    ensure!(
        cluster.kubectl_ok(&[
            "get",
            "node",
            "node-a",
            "-o",
            "jsonpath={.spec.unschedulable}"
        ])? != "true"
            && pod_field(cluster, "solo", "{.metadata.annotations}")?
                .find("migrate.kubectl.io/phase")
                .is_none(),
        "the dry run changed something"
    );
    let out = migrate(
        cluster,
        &["drain", "node-a", "--to", "node-b", "--force"],
        &[],
    )?;
    step("drained");
    ensure!(
        out.code == Some(0),
        "drain exited {:?}:\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    let row = |pod: &str| row_of(&out.stdout, pod);
    ensure!(
        row("solo")[2..].starts_with(&["migrated".into(), "node-b".into()])
            && row(&replica)[2..].starts_with(&["migrated".into(), "node-b".into()])
            && row("plain")[2..].starts_with(&["evicted".into()]),
        "the table does not say solo and {replica} migrated to node-b and plain evicted:\n{}",
        out.stdout
    );
    ensure!(
        row(&replica)[1].starts_with("ReplicaSet/depot-")
            && row("solo")[1] == "-"
            && row("solo")[4].parse::<u64>().is_ok(),
        "the table lacks the owner or the downtime:\n{}",
        out.stdout
    );
    for line in [
        "pod default/solo migrated as solo-m1 to node-b",
        "pod default/plain evicted",
    ] {
        ensure!(
            out.stderr.contains(line),
            "no progress line \"{line}\":\n{}",
            out.stderr
        );
    }
    for (source, follow) in [("solo", follow_solo), (replica.as_str(), follow_replica)] {
        let target = format!("{source}-m1");
        let before = follow.finish(WAIT);
        wait_gone(cluster, source)?;
        wait_until(&format!("3 counts on {target}"), WAIT, || {
            Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
        })?;
        assert_continued(&before, &logs(cluster, &target, None))?;
    }
    step("counts checked");
    wait_gone(cluster, "plain")?;
    ensure!(cordoned(cluster, "node-a")?, "node-a is not cordoned");
    let left = cluster.kubectl_ok(&[
        "get",
        "pods",
        "--field-selector",
        "spec.nodeName=node-a",
        "-o",
        "name",
    ])?;
    ensure!(left.trim().is_empty(), "pods left on node-a: {left}");

    // A PodDisruptionBudget that forbids evicting the one pod it protects.
    cluster.apply(&plain("guarded", "app: guarded"))?;
    cluster.wait_running("guarded", WAIT)?;
    cluster.apply(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: guarded\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels: {app: guarded}\n",
    )?;
    wait_until(
        "the disruption controller to count the budget",
        WAIT,
        || {
            let expected = cluster.kubectl_ok(&[
                "get",
                "pdb",
                "guarded",
                "-o",
                "jsonpath={.status.expectedPods}",
            ])?;
            Ok((expected == "1").then_some(()))
        },
    )?;
    step("budget counted");
    let out = migrate(
        cluster,
        &["drain", "node-a", "--force", "--eviction-timeout", "6s"],
        &[],
    )?;
    step("drained again");
    ensure!(
        out.code == Some(1)
            && row_of(&out.stdout, "guarded")[2] == "failed"
            && out
                .stderr
                .contains("kept refusing it for 6s (HTTP 429: Cannot evict pod as it would violate the pod's disruption budget. The disruption budget guarded needs 1 healthy pods"),
        "a drain that a PodDisruptionBudget stops must say so and exit 1: {:?}\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    ensure!(
        pod_field(cluster, "guarded", "{.status.phase}")? == "Running",
        "the guarded pod was not left running"
    );
    for target in ["solo-m1".to_string(), format!("{replica}-m1")] {
        let before = counter_values(&logs(cluster, &target, None)).len();
        wait_until(&format!("{target} to count on"), WAIT, || {
            Ok((counter_values(&logs(cluster, &target, None)).len() > before).then_some(()))
        })?;
    }
    eprintln!("drain: {}", out.stdout.trim());
    for (kind, name) in [
        ("pdb", "guarded"),
        ("pod", "guarded"),
        ("pod", "solo-m1"),
        ("deployment", deployment),
    ] {
        cluster.kubectl_ok(&["delete", kind, name, "--wait=false"])?;
    }
    Ok(())
}

/// The table row of `pod` (namespace default) in drain's output, split into its columns
/// (POD OWNER ACTION TARGET DOWNTIME [ms]); blanks when the pod has no row.
fn row_of(stdout: &str, pod: &str) -> Vec<String> {
    let mut columns: Vec<String> = stdout
        .lines()
        .find(|l| l.starts_with(&format!("default/{pod} ")))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    columns.resize(6, String::new());
    columns
}

/// The plugin SIGKILLed past the commit of a Deployment pod's move, before the handoff
/// (`committed`) and right after it (`handed-off`): `kubectl migrate resume` finishes it, and
/// the ReplicaSet, watched throughout, never makes a pod of its own nor drops below 2.
pub fn deployment_pod_move_resumes_after_a_kill(cluster: &Cluster) -> Result<()> {
    for stage in ["committed", "handed-off"] {
        let name = format!("kill-{stage}");
        cluster.apply(&counter_deployment(&name, 2))?;
        let source = deployment_pod_on(cluster, &name, "node-a")?;
        let other = deployment_pod_on(cluster, &name, "node-b")?;
        let owner = controller_uid(cluster, &source)?;
        let watch = OwnedPodsWatch::start(cluster, &owner, 2)?;
        let follow = Follow::start(cluster, &source)?;
        watch.wait_listed(2)?;
        migrate_killed_at(cluster, &source, stage)?;
        let done = kubectl_migrate(cluster, &["resume", &source]).output()?;
        ensure!(
            done.status.success(),
            "`kubectl migrate resume {source}` after a kill at {stage} failed:\n{}{}",
            String::from_utf8_lossy(&done.stdout),
            String::from_utf8_lossy(&done.stderr)
        );
        let target = format!("{source}-m1");
        wait_gone(cluster, &source)?;
        let before = follow.finish(WAIT);
        wait_until(&format!("3 counts on {target}"), WAIT, || {
            Ok((counter_values(&logs(cluster, &target, None)).len() >= 3).then_some(()))
        })?;
        assert_continued(&before, &logs(cluster, &target, None))?;
        let census = settled_census(cluster, &name, watch, [&source, &other, &target])
            .with_context(|| format!("killed at {stage}"))?;
        ensure!(
            controller_uid(cluster, &target)? == owner,
            "killed at {stage}: the ReplicaSet does not own the restored pod"
        );
        let notes = pod_field(cluster, &target, "{.metadata.annotations}")?;
        ensure!(
            !notes.contains("pod-deletion-cost"),
            "killed at {stage}: the restored pod kept a deletion cost: {notes}"
        );
        eprintln!(
            "killed at {stage}: resumed; the ReplicaSet owned {:?}",
            census.names
        );
        cluster.kubectl_ok(&["delete", "deployment", &name, "--wait=false"])?;
    }
    Ok(())
}
