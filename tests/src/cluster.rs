//! A real local Kubernetes cluster on this machine, for the end-to-end tests, the demo and
//! `cargo xtask cluster up`: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
//! one kubelet and kube-proxy per node (all built from the `k8s.io/kubernetes` Go module), each node with its
//! own containerd (Debian's, with the CNI bridge plugin). The controller-manager runs the
//! controllers a workload needs (ReplicaSet, Deployment, StatefulSet, DaemonSet, Job, garbage
//! collector, disruption for PodDisruptionBudgets, EndpointSlices, ServiceAccounts and their
//! tokens, the root CA ConfigMap), each under its own ServiceAccount; pods they create are
//! placed by the scheduler. The node lifecycle controller runs with a 10-minute grace period
//! and no taint eviction controller: the fault tests stop kubelets on purpose and must not
//! see their nodes declared lost or their pods evicted meanwhile.
//!
//! The nodes run different runtime stacks, so every move from node-a to node-b crosses them:
//! node-a's containerd runs containers with runc, node-b's with crun (both from Debian).
//!
//! Several nodes share the machine the way kind's do, kept apart by: a network namespace each
//! (`mig-NODE`, as kind gives each node a container), holding the node's IP (`10.77.0.N` on its
//! `eth0`, where the kubelet listens on 10250), its kubelet, containerd, CNI bridge and pods; a
//! containerd each (own root, state and socket, so one kubelet never sees, or garbage-collects,
//! the other's containers); a CNI bridge and pod subnet each (`migbrN`, `10.88.N.0/24`); a
//! cgroup root each (`/migrate-NODE`), and a pod log directory each.
//!
//! The network is made here and lives only in namespaces made here: the control plane (etcd,
//! kube-apiserver) has a namespace of its own (`mig-cp`) with a bridge, `migsw`, that every
//! node's `eth0` is joined to by a veth pair; the API server listens there on `10.77.0.254`.
//! Each node routes the other nodes' pod subnets to them over that bridge, so pods reach pods
//! on every node. Nothing is added to the machine's own interfaces: `kubectl` on the machine
//! reaches the API server on 127.0.0.1 through `netns-forward`, and a test reaches a pod
//! through [`Cluster::connect`], from inside a node's namespace.
//!
//! Security as a real cluster has it: TLS with a CA made here, token authentication for the
//! admin and for each node (`system:node:NAME`), the Node and RBAC authorizers with
//! NodeRestriction, and kubelets that authenticate the API server's client certificate and
//! ask the API server to authorize every request (no anonymous access).
//!
//! Everything a cluster starts is recorded in its directory, so [`Cluster::stop_at`] can tear
//! it down from another process (`cargo xtask cluster down`): daemons, containers (by their
//! cgroups), shims, mounts, network namespaces, bridges and addresses. One cluster runs on a
//! machine at a time (a lock serialises test binaries and the demo).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::apiserver::{free_port, k8s_bin_dir, kubectl, which};
use crate::{ready_or_skip, tail, workspace};

/// The version tag of the images `cargo xtask images` builds (the workspace's version).
pub const IMAGE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The pod sandbox image (catatonit in pause mode; see `cargo xtask images`).
pub const PAUSE_IMAGE: &str = "localhost/pause:3.10";
/// The kubelet's port on each node's IP.
pub const KUBELET_PORT: u16 = 10250;
const LOCK: &str = "/run/kubectl-migrate-cluster.lock";
const CNI_BIN: &str = "/usr/lib/cni";
/// The pods' addresses: node N's pods get `10.88.N.0/24` on its bridge `migbr(N-1)`, whose
/// gateway address is the node's; pods reach the other nodes' pods through it.
const POD_NETWORK: &str = "10.88.0.0/16";
/// The control plane's network namespace, and the bridge in it that joins the nodes.
const CONTROL_NETNS: &str = "mig-cp";
const SWITCH: &str = "migsw";
/// The API server's address on that bridge (the nodes are `10.77.0.1`, `10.77.0.2`, …).
const CONTROL_IP: &str = "10.77.0.254";
/// The Services' addresses; the API server's own Service, `kubernetes`, takes the first one.
const SERVICE_NETWORK: &str = "10.96.0.0/16";
const API_SERVICE_IP: &str = "10.96.0.1";
/// The controllers kube-controller-manager runs (see the module's documentation).
const CONTROLLERS: &[&str] = &[
    "replicaset-controller",
    "deployment-controller",
    "statefulset-controller",
    "daemonset-controller",
    "job-controller",
    "garbage-collector-controller",
    "disruption-controller",
    "endpointslice-controller",
    "endpoints-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "persistentvolume-binder-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    // It takes away the `node.kubernetes.io/not-ready` taint a kubelet registers its node
    // with; its grace period is long (see `--node-monitor-grace-period`) so that a kubelet a
    // fault test stops is not declared lost.
    "node-lifecycle-controller",
];

/// Where `cargo xtask images` works and leaves its archive.
pub fn images_dir() -> PathBuf {
    workspace().join(".cache").join("images")
}

/// The OCI image-layout archive with every image the cluster imports.
pub fn images_archive() -> PathBuf {
    images_dir().join("images.oci.tar")
}

/// The counter example's image name.
pub fn counter_image() -> String {
    format!("localhost/migrate-counter:{IMAGE_VERSION}")
}

/// The web example's image name.
pub fn web_image() -> String {
    format!("localhost/migrate-web:{IMAGE_VERSION}")
}

/// Whether a cluster can start here; skips loudly outside CI, fails in CI.
pub fn cluster_tests_can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for binary in ["kube-apiserver", "kubectl", "etcd", "kubelet"] {
        if !k8s_bin_dir().join(binary).exists() {
            missing.push(format!("{binary} (run `cargo xtask k8s`)"));
        }
    }
    for binary in ["kube-controller-manager", "kube-scheduler", "kube-proxy"] {
        if !k8s_bin_dir().join(binary).exists() {
            missing.push(format!("{binary} (run `cargo xtask k8s`)"));
        }
    }
    for tool in [
        "containerd",
        "ctr",
        "runc",
        "crun",
        "openssl",
        "ip",
        "nsenter",
        "nft",
    ] {
        if which(tool).is_none() {
            missing.push(format!(
                "{tool} (apt-get install containerd runc crun openssl iproute2 util-linux nftables)"
            ));
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new(CNI_BIN).join(plugin).exists() {
            missing.push(format!(
                "CNI plugin {plugin} (apt-get install containernetworking-plugins)"
            ));
        }
    }
    if !images_archive().exists() {
        missing.push("the images (run `cargo xtask images` as root)".into());
    }
    ready_or_skip(test, &missing)
}

/// One node of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub name: String,
    /// The node's InternalIP, where its kubelet listens.
    pub ip: String,
    index: usize,
}

impl ClusterNode {
    fn new(index: usize) -> ClusterNode {
        let letter = char::from(b'a' + u8::try_from(index).unwrap_or(0));
        ClusterNode {
            name: format!("node-{letter}"),
            ip: format!("10.77.0.{}", index + 1),
            index,
        }
    }
    fn bridge(&self) -> String {
        format!("migbr{}", self.index)
    }
    /// This node's slice of [`POD_NETWORK`].
    fn subnet(&self) -> String {
        format!("10.88.{}.0/24", self.index + 1)
    }
    fn cgroup_root(&self) -> String {
        format!("migrate-{}", self.name)
    }
    /// The OCI runtime this node's containerd runs containers with: runc on node-a, crun on
    /// the others, so a move between node-a and node-b crosses runtime stacks.
    pub fn oci_runtime(&self) -> &'static str {
        if self.index == 0 { "runc" } else { "crun" }
    }
    /// The node's network namespace (`/run/netns/NAME`).
    pub fn netns(&self) -> String {
        format!("mig-{}", self.name)
    }
}

/// `program` run inside network namespace `netns` (only the network namespace changes: the
/// daemon keeps the machine's mounts, cgroups and PID namespace, and its PID).
fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// `ip ARGS`, failing with its message.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().context("run ip")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The cluster's network: the control plane's namespace with its bridge, a namespace per node
/// joined to it by a veth pair, forwarding on in each node, and routes between the nodes' pod
/// subnets.
fn create_network(nodes: &[ClusterNode]) -> Result<()> {
    // What a killed run left under the same names (one cluster runs at a time: the lock).
    remove_network(nodes);
    let cp = CONTROL_NETNS;
    ip(&["netns", "add", cp])?;
    ip(&["-n", cp, "link", "set", "lo", "up"])?;
    ip(&["-n", cp, "link", "add", SWITCH, "type", "bridge"])?;
    ip(&[
        "-n",
        cp,
        "addr",
        "add",
        &format!("{CONTROL_IP}/24"),
        "dev",
        SWITCH,
    ])?;
    ip(&["-n", cp, "link", "set", SWITCH, "up"])?;
    for node in nodes {
        let ns = node.netns();
        let port = format!("mv-{}", node.name);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", cp, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", cp, "link", "set", &port, "master", SWITCH, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        // Pod to pod across nodes: this node forwards between its pods' bridge and eth0.
        let sysctl = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .context("run sysctl in the node's namespace")?;
        if !sysctl.success() {
            bail!("cannot turn on forwarding in {ns}");
        }
        for other in nodes.iter().filter(|o| o.index != node.index) {
            ip(&["-n", &ns, "route", "add", &other.subnet(), "via", &other.ip])?;
        }
        // Pods reach the API server (through the `kubernetes` Service, which the node's
        // kube-proxy translates) with their own addresses: its answers go back the same way.
        ip(&["-n", cp, "route", "add", &node.subnet(), "via", &node.ip])?;
    }
    Ok(())
}

/// Removes the cluster's network namespaces (their bridges and veth pairs go with them).
fn remove_network(nodes: &[ClusterNode]) {
    for ns in nodes
        .iter()
        .map(ClusterNode::netns)
        .chain([CONTROL_NETNS.to_string()])
    {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// A running cluster; dropping it tears it down unless [`Cluster::keep_running`] was called.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    /// The admin's kubeconfig (context `admin`, namespace `default`).
    pub kubeconfig: PathBuf,
    pub nodes: Vec<ClusterNode>,
    keep: bool,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Cluster {
    /// Starts a cluster of `nodes` nodes with its state in `dir` (created; emptied first) and
    /// waits until every node is Ready with the images imported.
    ///
    /// # Errors
    /// When a part does not start, with the last lines of its log.
    pub fn start(dir: &Path, nodes: usize) -> Result<Cluster> {
        let lock = std::fs::File::create(LOCK).context("create the cluster lock (needs root)")?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .context("lock the cluster")?;
        // A cluster that a killed run left in the same directory.
        Cluster::stop_at(dir)?;
        std::fs::create_dir_all(dir.join("pids"))?;
        let dir = dir.canonicalize()?;
        let nodes: Vec<ClusterNode> = (0..nodes).map(ClusterNode::new).collect();
        std::fs::write(
            dir.join("nodes"),
            nodes
                .iter()
                .map(|n| format!("{}\n", n.index))
                .collect::<String>(),
        )?;
        let cluster = Cluster {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            nodes,
            keep: false,
            _lock: Some(lock),
        };
        create_network(&cluster.nodes)?;
        hybrid_cgroups_for_crun()?;
        cluster.start_control_plane()?;
        for node in cluster.nodes.clone() {
            cluster.start_node(&node)?;
        }
        for node in &cluster.nodes {
            cluster.wait_ready(node, Duration::from_secs(90))?;
        }
        Ok(cluster)
    }

    /// Leaves the cluster running when this value is dropped (stop it with [`Cluster::stop_at`]).
    pub fn keep_running(mut self) {
        self.keep = true;
    }

    /// The cluster's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A TCP connection to `address` (a pod's IP and port) made from inside the network
    /// namespace of the node that holds the pod (found by its pod subnet), as the kubelet's
    /// probes come: the machine itself has no route into the cluster's network, and pods route
    /// only the pod network back.
    ///
    /// # Errors
    /// When the namespace cannot be entered or the connection fails within `timeout`.
    pub fn connect(&self, address: &str, timeout: Duration) -> Result<std::net::TcpStream> {
        let address: std::net::SocketAddr = address.parse().context("a pod address")?;
        let node = self
            .nodes
            .iter()
            .find(|n| {
                address
                    .ip()
                    .to_string()
                    .starts_with(&format!("10.88.{}.", n.index + 1))
            })
            .with_context(|| format!("{address} is not a pod address of this cluster"))?;
        let netns = std::fs::File::open(format!("/run/netns/{}", node.netns()))
            .with_context(|| format!("open {}'s network namespace", node.name))?;
        // A thread of its own enters the namespace; the socket it makes keeps it.
        std::thread::spawn(move || -> Result<std::net::TcpStream> {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("enter the node's network namespace")?;
            Ok(std::net::TcpStream::connect_timeout(&address, timeout)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
    }

    /// `program` run in node `node`'s network namespace (for example `nft`, to block a port
    /// there).
    pub fn node_command(&self, node: &str, program: &str) -> Command {
        let netns = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map_or_else(|| format!("mig-{node}"), ClusterNode::netns);
        in_netns(&netns, program)
    }

    /// Node `node`'s pod subnet (`10.88.N.0/24`).
    pub fn pod_subnet(&self, node: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(ClusterNode::subnet)
    }

    /// `kubectl` (the one built with the cluster) as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl());
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args);
        cmd
    }

    /// `kubectl ARGS`, its stdout on success.
    ///
    /// # Errors
    /// When kubectl fails, with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.kubectl(args).output()?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`.
    ///
    /// # Errors
    /// When kubectl refuses it.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        crate::apiserver::kubectl_apply(self.kubectl(&["apply", "-f", "-"]), yaml)
    }

    /// Waits until pod `name` is Running with every container ready.
    ///
    /// # Errors
    /// On timeout, with the pod's description.
    pub fn wait_running(&self, name: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let ready = self
                .kubectl_ok(&[
                    "get",
                    "pod",
                    name,
                    "-o",
                    "jsonpath={.status.phase} {.status.containerStatuses[*].ready}",
                ])
                .unwrap_or_default();
            let mut words = ready.split_whitespace();
            if words.next() == Some("Running")
                && words.clone().count() > 0
                && words.all(|w| w == "true")
            {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "pod {name} did not run within {limit:?}:\n{}",
                    self.kubectl_ok(&["describe", "pod", name])
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of every part's log and the pods and events, for failure messages.
    pub fn diagnose(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.join("logs"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let interesting: String = text
                .lines()
                .filter(|l| !l.contains("level=info") && !l.starts_with('I'))
                .collect::<Vec<_>>()
                .join("\n");
            out.push_str(&format!(
                "--- {}:\n{}\n",
                log.display(),
                tail(&interesting, 15)
            ));
        }
        for args in [
            &["get", "pods", "-o", "wide"][..],
            &["get", "events", "--sort-by=.lastTimestamp"][..],
        ] {
            out.push_str(&format!(
                "--- kubectl {}:\n{}\n",
                args.join(" "),
                self.kubectl_ok(args).unwrap_or_else(|e| e.to_string())
            ));
        }
        out
    }

    fn log(&self, name: &str) -> Result<Stdio> {
        std::fs::create_dir_all(self.dir.join("logs"))?;
        Ok(std::fs::File::create(self.dir.join("logs").join(format!("{name}.log")))?.into())
    }

    /// Starts a daemon in its own process group and records its PID for [`Cluster::stop_at`].
    fn daemon(&self, name: &str, cmd: &mut Command) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(self.log(&format!("{name}-out"))?)
            .stderr(self.log(name)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        std::fs::write(
            self.dir.join("pids").join(format!("{name}.pid")),
            child.id().to_string(),
        )?;
        // Its command line, so a fault test can start it again as it was.
        let line: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        std::fs::write(
            self.dir.join("pids").join(format!("{name}.cmd")),
            line.join("\0"),
        )?;
        Ok(())
    }

    /// Stops daemon `name` (`kube-apiserver`, `kubelet-node-b`, …) as an operator or a crash
    /// would: SIGTERM, then SIGKILL after 5 s. Its pods and containers are left alone.
    pub fn stop_daemon(&self, name: &str) {
        let pid = std::fs::read_to_string(self.dir.join("pids").join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        stop_pid(pid);
    }

    /// The containerd socket of `pod`'s node and the id of its first container there.
    fn first_container(&self, pod: &str) -> Result<(PathBuf, String)> {
        self.first_container_in("default", pod)
    }

    fn first_container_in(&self, namespace: &str, pod: &str) -> Result<(PathBuf, String)> {
        let fields = self.kubectl_ok(&[
            "-n",
            namespace,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.spec.nodeName} {.status.containerStatuses[0].containerID}",
        ])?;
        let (node, id) = fields
            .split_once(' ')
            .with_context(|| format!("pod {pod}: no node or container ({fields})"))?;
        let id = id.trim().trim_start_matches("containerd://").to_string();
        Ok((self.dir.join(node).join("containerd.sock"), id))
    }

    /// Kills the first container of `pod` with SIGKILL through its node's containerd, as the
    /// OOM killer or a crash would: the kubelet then restarts it.
    ///
    /// # Errors
    /// When the pod or its container cannot be found, or containerd refuses.
    pub fn kill_container(&self, pod: &str) -> Result<()> {
        self.kill_container_in("default", pod)
    }

    /// [`Cluster::kill_container`] for a pod of `namespace`.
    ///
    /// # Errors
    /// When the pod or its container cannot be found, or containerd refuses.
    pub fn kill_container_in(&self, namespace: &str, pod: &str) -> Result<()> {
        let (socket, id) = self.first_container_in(namespace, pod)?;
        let output = ctr(&socket, &["task", "kill", "--signal", "SIGKILL", &id])?;
        if !output.status.success() {
            bail!(
                "ctr task kill {id}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// The OCI runtime (`runc`, `crun`) that runs the first container of `pod`, as its node's
    /// containerd recorded it (the runc shim's `BinaryName` option).
    ///
    /// # Errors
    /// When the pod, its container or the record cannot be read.
    pub fn oci_runtime_of(&self, pod: &str) -> Result<String> {
        let (socket, id) = self.first_container(pod)?;
        let output = ctr(&socket, &["containers", "info", &id])?;
        ensure!(
            output.status.success(),
            "ctr containers info {id}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let info: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        // The options are a protobuf message; the binary's path is a string field in it.
        let options = info["Runtime"]["Options"]["value"]
            .as_str()
            .unwrap_or_default();
        let mut decode = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("run base64")?;
        decode
            .stdin
            .take()
            .context("stdin")?
            .write_all(options.as_bytes())?;
        let decoded = String::from_utf8_lossy(&decode.wait_with_output()?.stdout).into_owned();
        ["crun", "runc"]
            .into_iter()
            .find(|r| decoded.contains(&format!("/{r}")))
            .map(String::from)
            .with_context(|| format!("no OCI runtime named in {info}"))
    }

    /// Starts daemon `name` again with the command line it was first started with.
    ///
    /// # Errors
    /// When it was never started or does not start.
    pub fn start_daemon(&self, name: &str) -> Result<()> {
        let line = std::fs::read_to_string(self.dir.join("pids").join(format!("{name}.cmd")))
            .with_context(|| format!("{name} was never started"))?;
        let mut parts = line.split('\0');
        let mut cmd = Command::new(parts.next().context("empty command line")?);
        cmd.args(parts);
        self.daemon(&format!("{name}-again"), &mut cmd)?;
        // The restarted daemon's PID under its own name, for the next stop and the teardown.
        std::fs::rename(
            self.dir.join("pids").join(format!("{name}-again.pid")),
            self.dir.join("pids").join(format!("{name}.pid")),
        )?;
        Ok(())
    }

    fn start_control_plane(&self) -> Result<()> {
        let d = &self.dir;
        let pki = d.join("pki");
        std::fs::create_dir_all(&pki)?;
        openssl(
            &pki,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3",
                "-subj",
                "/CN=kubectl-migrate-test-ca",
            ],
        )?;
        sign(
            &pki,
            "apiserver",
            "/CN=kube-apiserver",
            // 127.0.0.1 for kubectl on this machine, CONTROL_IP for the nodes, and the
            // `kubernetes` Service's address and names for pods (in-cluster clients).
            Some(&format!(
                "IP:127.0.0.1,IP:{CONTROL_IP},IP:{API_SERVICE_IP},DNS:localhost,DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
            )),
        )?;
        // The API server's client certificate towards kubelets (exec, logs): the kubelets'
        // webhook authorizer asks the API server, where system:masters may do anything.
        sign(
            &pki,
            "kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            None,
        )?;
        openssl(&pki, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(&pki, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;

        let (client, peer, secure) = (free_port()?, free_port()?, free_port()?);
        let token = |who: &str| format!("{who}-{:016x}", rand_u64());
        let admin = token("admin");
        let mut tokens = format!("{admin},admin,admin-uid,\"system:masters\"\n");
        // The controller-manager, the scheduler and kube-proxy as the users Kubernetes'
        // bootstrap RBAC roles are bound to.
        for component in ["kube-controller-manager", "kube-scheduler", "kube-proxy"] {
            let t = token(component);
            tokens.push_str(&format!("{t},system:{component},{component}-uid\n"));
            self.write_kubeconfig(
                &d.join(format!("{component}.kubeconfig")),
                &format!("system:{component}"),
                &t,
                &format!("{CONTROL_IP}:{secure}"),
            )?;
        }
        for node in &self.nodes {
            let t = token(&node.name);
            tokens.push_str(&format!(
                "{t},system:node:{0},{0}-uid,\"system:nodes\"\n",
                node.name
            ));
            self.write_kubeconfig(
                &d.join(format!("{}.kubeconfig", node.name)),
                &node.name,
                &t,
                &format!("{CONTROL_IP}:{secure}"),
            )?;
        }
        write_private(&pki.join("tokens.csv"), &tokens)?;

        let bin = k8s_bin_dir();
        self.daemon(
            "etcd",
            in_netns(CONTROL_NETNS, bin.join("etcd"))
                .args(["--name", "e2e", "--data-dir"])
                .arg(d.join("etcd"))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster=e2e=http://127.0.0.1:{peer}"))
                .args(["--log-level", "warn", "--unsafe-no-fsync"]),
        )?;
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let p = |name: &str| pki.join(name).display().to_string();
        self.daemon(
            "kube-apiserver",
            in_netns(CONTROL_NETNS, bin.join("kube-apiserver"))
                .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
                .arg("--bind-address=0.0.0.0")
                .arg(format!("--advertise-address={CONTROL_IP}"))
                .arg(format!("--secure-port={secure}"))
                .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
                .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
                .arg(format!("--client-ca-file={}", p("ca.crt")))
                .arg(format!("--token-auth-file={}", p("tokens.csv")))
                .arg(format!(
                    "--kubelet-client-certificate={}",
                    p("kubelet-client.crt")
                ))
                .arg(format!("--kubelet-client-key={}", p("kubelet-client.key")))
                .arg("--kubelet-preferred-address-types=InternalIP")
                .args([
                    "--authorization-mode=Node,RBAC",
                    "--enable-admission-plugins=NodeRestriction",
                ])
                .arg(format!("--service-account-issuer={issuer}"))
                .arg(format!("--api-audiences={issuer}"))
                .arg(format!("--service-account-key-file={}", p("sa.pub")))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    p("sa.key")
                ))
                .arg(format!("--service-cluster-ip-range={SERVICE_NETWORK}"))
                .args(["--allow-privileged=false", "-v=1"]),
        )?;
        // kubectl and the plugin on this machine: 127.0.0.1, forwarded into the namespace.
        self.daemon(
            "apiserver-forward",
            Command::new(crate::apiserver::workspace_binary("netns-forward"))
                .arg(format!("127.0.0.1:{secure}"))
                .arg(format!("/run/netns/{CONTROL_NETNS}"))
                .arg(format!("127.0.0.1:{secure}")),
        )?;
        self.write_kubeconfig(
            &self.kubeconfig,
            "admin",
            &admin,
            &format!("127.0.0.1:{secure}"),
        )?;

        let start = Instant::now();
        while self.kubectl_ok(&["get", "--raw", "/readyz"]).is_err() {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "kube-apiserver was not ready within 120 s\n{}",
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.daemon(
            "kube-controller-manager",
            in_netns(CONTROL_NETNS, bin.join("kube-controller-manager"))
                .arg("--kubeconfig")
                .arg(d.join("kube-controller-manager.kubeconfig"))
                .arg(format!("--controllers={}", CONTROLLERS.join(",")))
                .arg("--use-service-account-credentials")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    p("sa.key")
                ))
                .arg(format!("--root-ca-file={}", p("ca.crt")))
                .args([
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    "--concurrent-replicaset-syncs=2",
                    "--node-monitor-grace-period=10m",
                    "-v=1",
                ]),
        )?;
        self.daemon(
            "kube-scheduler",
            in_netns(CONTROL_NETNS, bin.join("kube-scheduler"))
                .arg("--kubeconfig")
                .arg(d.join("kube-scheduler.kubeconfig"))
                .args([
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    "-v=1",
                ]),
        )?;
        // Pods need the namespace's default ServiceAccount (admission) and the root CA
        // ConfigMap their token volumes project: the controller-manager makes both.
        let start = Instant::now();
        while self
            .kubectl_ok(&["get", "serviceaccount", "default"])
            .is_err()
            || self
                .kubectl_ok(&["get", "configmap", "kube-root-ca.crt"])
                .is_err()
        {
            if start.elapsed() > Duration::from_secs(120) {
                bail!(
                    "kube-controller-manager made no default ServiceAccount and root CA ConfigMap within 120 s\n{}",
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    fn write_kubeconfig(&self, path: &Path, user: &str, token: &str, server: &str) -> Result<()> {
        let ca = self.dir.join("pki/ca.crt");
        write_private(
            path,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{server}\n    certificate-authority: {ca}\n\
                 users:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {user}\n  context:\n    cluster: local\n    user: {user}\n    namespace: default\n\
                 current-context: {user}\n",
                ca = ca.display()
            ),
        )
    }

    fn start_node(&self, node: &ClusterNode) -> Result<()> {
        let nd = self.dir.join(&node.name);
        for sub in ["cni", "kubelet", "pod-logs"] {
            std::fs::create_dir_all(nd.join(sub))?;
        }
        for hierarchy in cgroup_hierarchies() {
            std::fs::create_dir_all(hierarchy.join(node.cgroup_root()))?;
        }
        let socket = nd.join("containerd.sock");
        std::fs::write(
            nd.join("containerd.toml"),
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The machine's root lacks CAP_SYS_RESOURCE: oom_score_adj may only be raised.
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{runtime}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{runtime}]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{runtime}.options]
        BinaryName = "{binary}"
        SystemdCgroup = false
"#,
                runtime = node.oci_runtime(),
                binary = which(node.oci_runtime())
                    .with_context(|| format!("{} is not installed", node.oci_runtime()))?
                    .display(),
                root = nd.join("containerd-root").display(),
                state = nd.join("containerd-state").display(),
                socket = socket.display(),
                cni = nd.join("cni").display(),
            ),
        )?;
        std::fs::write(
            nd.join("cni/10-bridge.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0", "name": format!("migrate-{}", node.name),
                "plugins": [
                    {"type": "bridge", "bridge": node.bridge(), "isGateway": true, "ipMasq": false, "hairpinMode": true,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": node.subnet()}]],
                              // pods reach the other nodes' pods through their bridge's
                              // gateway (routed by their node's namespace), and Services
                              // through it too (kube-proxy translates them there): nothing else
                              "routes": [{"dst": POD_NETWORK}, {"dst": SERVICE_NETWORK}],
                              "dataDir": nd.join("cni-ipam").display().to_string()}},
                    {"type": "loopback"}
                ]
            })
            .to_string(),
        )?;
        self.daemon(
            &format!("containerd-{}", node.name),
            in_netns(&node.netns(), "containerd")
                .arg("--config")
                .arg(nd.join("containerd.toml")),
        )?;
        let start = Instant::now();
        while !ctr(&socket, &["version"]).is_ok_and(|o| o.status.success()) {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "containerd of {} did not start\n{}",
                    node.name,
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let import = ctr(
            &socket,
            &["images", "import", &images_archive().display().to_string()],
        )?;
        if !import.status.success() {
            bail!(
                "importing the images into {}'s containerd: {}",
                node.name,
                String::from_utf8_lossy(&import.stderr)
            );
        }

        let pki = self.dir.join("pki");
        std::fs::write(
            nd.join("kubelet.yaml"),
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
                 # This machine has cgroup v1 (hybrid); recent kubelets refuse it unless told.\n\
                 failCgroupV1: false\ncgroupDriver: cgroupfs\ncgroupRoot: /{cgroup_root}\n\
                 containerRuntimeEndpoint: unix://{socket}\naddress: {ip}\nport: {KUBELET_PORT}\nreadOnlyPort: 0\nhealthzPort: 0\n\
                 authentication:\n  anonymous: {{enabled: false}}\n  webhook: {{enabled: true}}\n  x509: {{clientCAFile: {ca}}}\n\
                 authorization: {{mode: Webhook}}\n\
                 podLogsDir: {logs}\nfailSwapOn: false\nresolvConf: /etc/resolv.conf\n\
                 # The images are imported, not pulled: never garbage-collect them.\n\
                 imageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
                 evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}}\n",
                cgroup_root = node.cgroup_root(),
                socket = socket.display(),
                ip = node.ip,
                ca = pki.join("ca.crt").display(),
                logs = nd.join("pod-logs").display(),
            ),
        )?;
        self.daemon(
            &format!("kubelet-{}", node.name),
            in_netns(&node.netns(), k8s_bin_dir().join("kubelet"))
                .arg("--config")
                .arg(nd.join("kubelet.yaml"))
                .arg("--kubeconfig")
                .arg(self.dir.join(format!("{}.kubeconfig", node.name)))
                .arg("--root-dir")
                .arg(nd.join("kubelet"))
                .arg("--cert-dir")
                .arg(nd.join("kubelet/pki"))
                .args([
                    "--hostname-override",
                    &node.name,
                    "--node-ip",
                    &node.ip,
                    "-v=1",
                ]),
        )?;
        // Services for the node's pods (an in-cluster client reaches the API server through
        // the `kubernetes` Service), in nftables mode, in the node's namespace. The conntrack
        // limits are the machine's, shared by every node: left as they are.
        self.daemon(
            &format!("kube-proxy-{}", node.name),
            in_netns(&node.netns(), k8s_bin_dir().join("kube-proxy"))
                .arg("--kubeconfig")
                .arg(self.dir.join("kube-proxy.kubeconfig"))
                .args([
                    "--proxy-mode=nftables",
                    "--hostname-override",
                    &node.name,
                    "--cluster-cidr",
                    POD_NETWORK,
                    "--conntrack-max-per-core=0",
                    "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0",
                    // each node has its own namespace: the usual ports, on its loopback
                    "--metrics-bind-address=127.0.0.1:10249",
                    "--healthz-bind-address=127.0.0.1:10256",
                    "-v=1",
                ]),
        )?;
        Ok(())
    }

    fn wait_ready(&self, node: &ClusterNode, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let ready = self
                .kubectl_ok(&[
                    "get",
                    "node",
                    &node.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .unwrap_or_default();
            if ready == "True" {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "node {} was not Ready within {limit:?}\n{}",
                    node.name,
                    self.diagnose()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Tears down whatever a cluster with state in `dir` left running, and removes `dir`.
    /// Safe to call when nothing runs.
    ///
    /// # Errors
    /// When a mount or directory cannot be removed.
    pub fn stop_at(dir: &Path) -> Result<()> {
        // Only a directory a cluster was started in (it records the PIDs) is torn down.
        if !dir.join("pids").exists() {
            return Ok(());
        }
        let dir = dir.canonicalize()?;
        let pid_of = |name: &str| -> Option<i32> {
            std::fs::read_to_string(dir.join("pids").join(format!("{name}.pid")))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let nodes: Vec<ClusterNode> = std::fs::read_to_string(dir.join("nodes"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .map(ClusterNode::new)
            .collect();
        // The controllers first, so none replaces what is stopped next; then the kubelets, so
        // none restarts what is killed next; then every container (all processes in the
        // node's cgroups), the shims, containerd and the control plane.
        stop_pid(pid_of("kube-scheduler"));
        stop_pid(pid_of("kube-controller-manager"));
        for node in &nodes {
            stop_pid(pid_of(&format!("kubelet-{}", node.name)));
        }
        for node in &nodes {
            kill_cgroup_tree(&node.cgroup_root());
            let socket = dir.join(&node.name).join("containerd.sock");
            for pid in pids_with_arg(&socket.display().to_string()) {
                stop_pid(Some(pid));
            }
            stop_pid(pid_of(&format!("containerd-{}", node.name)));
        }
        stop_pid(pid_of("apiserver-forward"));
        stop_pid(pid_of("kube-apiserver"));
        stop_pid(pid_of("etcd"));
        unmount_under(&dir)?;
        for node in &nodes {
            remove_cgroup_tree(&node.cgroup_root());
        }
        remove_network(&nodes);
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::env::var_os("KEEP_CLUSTER").is_some() {
            eprintln!(
                "KEEP_CLUSTER set: the cluster keeps running in {}",
                self.dir.display()
            );
            return;
        }
        if let Err(error) = Cluster::stop_at(&self.dir) {
            eprintln!("cluster teardown: {error:#}");
        }
    }
}

fn ctr(socket: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()?)
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    if !output.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A key and a certificate for `subject` signed by the CA in `dir`, with `san` if given.
fn sign(dir: &Path, name: &str, subject: &str, san: Option<&str>) -> Result<()> {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ],
    )?;
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        match san {
            Some(san) => format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".to_string(),
        },
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "3",
            "-extfile",
            &ext,
        ],
    )
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = random.read_exact(&mut bytes);
    }
    u64::from_le_bytes(bytes)
}

/// Every mounted cgroup hierarchy (v1 controllers, the named systemd one, the v2 one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// SIGKILLs every process in cgroup `root` and below, in every hierarchy, until none is left.
fn kill_cgroup_tree(root: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut any = false;
        for hierarchy in cgroup_hierarchies() {
            for dir in dirs_below(&hierarchy.join(root)) {
                for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse::<i32>().ok())
                {
                    any = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if !any || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_cgroup_tree(root: &str) {
    for hierarchy in cgroup_hierarchies() {
        let mut dirs = dirs_below(&hierarchy.join(root));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `dir` and every directory below it.
fn dirs_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
            found.push(d);
        }
    }
    found
}

/// crun refuses a hybrid cgroup machine (v1 controllers, a v2 hierarchy at
/// `/sys/fs/cgroup/unified`) while any controller is left on the v2 side: `cgroups in hybrid
/// mode not supported, drop all controllers from cgroupv2`. On such a machine (this one had
/// `hugetlb` there, enabled in no v2 group) each such controller gets its v1 hierarchy, as
/// systemd's hybrid mode mounts them, which moves it off the v2 side. The mount stays, like
/// the machine's other v1 hierarchies; nothing changes on a pure v1 or v2 machine.
fn hybrid_cgroups_for_crun() -> Result<()> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let Ok(controllers) = std::fs::read_to_string(unified.join("cgroup.controllers")) else {
        return Ok(());
    };
    for controller in controllers.split_whitespace() {
        let mountpoint = Path::new("/sys/fs/cgroup").join(controller);
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("create {}", mountpoint.display()))?;
        let status = Command::new("mount")
            .args(["-t", "cgroup", "-o", controller, "cgroup"])
            .arg(&mountpoint)
            .status()
            .context("run mount")?;
        if !status.success() {
            bail!(
                "crun (node-b's runtime) needs every cgroup controller off the v2 hierarchy of this hybrid machine, and mounting {controller}'s v1 hierarchy at {} failed",
                mountpoint.display()
            );
        }
    }
    Ok(())
}

/// PIDs of processes with `arg` among their arguments (containerd's shims name its socket).
fn pids_with_arg(arg: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM, then SIGKILL after 5 s; returns when the process is gone (or a zombie).
fn stop_pid(pid: Option<i32>) {
    use nix::sys::signal::{Signal, kill};
    let Some(pid) = pid else { return };
    let pid = nix::unistd::Pid::from_raw(pid);
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        let _ = kill(pid, Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first.
fn unmount_under(dir: &Path) -> Result<()> {
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    Ok(())
}
