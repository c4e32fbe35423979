//! A real control plane for tests: etcd and kube-apiserver built from Go modules
//! (`cargo xtask k8s`), on loopback ports of their own, with token authentication (an admin
//! in `system:masters`), RBAC, service-account token signing, and a generated kubeconfig.
//! No kubelet: tests set pod status themselves, as envtest-style tests do.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{ready_or_skip, workspace};

/// The Kubernetes release the tests build and run.
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// Where `cargo xtask k8s` puts kube-apiserver and etcd.
pub fn k8s_bin_dir() -> PathBuf {
    workspace()
        .join(".cache")
        .join("k8s")
        .join(KUBERNETES_VERSION)
        .join("bin")
}

/// The kubectl built with the API server (`cargo xtask k8s`).
pub fn kubectl() -> PathBuf {
    k8s_bin_dir().join("kubectl")
}

/// Runs `apply` (a `kubectl apply -f -` command) with `yaml` on its stdin, failing with
/// kubectl's message.
pub(crate) fn kubectl_apply(mut apply: Command, yaml: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = apply
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(yaml.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Whether the API-server tests can run; skips loudly outside CI, fails in CI.
pub fn apiserver_tests_can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    for binary in ["kube-apiserver", "kubectl", "etcd"] {
        if !k8s_bin_dir().join(binary).exists() {
            missing.push(format!("{binary} (run `cargo xtask k8s`)"));
        }
    }
    for tool in ["openssl"] {
        if which(tool).is_none() {
            missing.push(tool.to_string());
        }
    }
    ready_or_skip(test, &missing)
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// A running etcd + kube-apiserver pair.
#[derive(Debug)]
pub struct ApiServer {
    dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
    /// A kubeconfig for the admin (context `test-admin`, namespace `default`).
    pub kubeconfig: PathBuf,
    pub url: String,
    pub admin_token: String,
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    ///
    /// # Errors
    /// When a part does not start, with its log.
    pub fn start() -> Result<ApiServer> {
        let dir = tempfile::Builder::new().prefix("apiserver-").tempdir()?;
        let d = dir.path();
        let bin = k8s_bin_dir();
        let (client_port, peer_port, secure_port) = (free_port()?, free_port()?, free_port()?);
        let log = |name: &str| -> Result<Stdio> {
            Ok(std::fs::File::create(d.join(format!("{name}.log")))?.into())
        };

        let etcd = Command::new(bin.join("etcd"))
            .args(["--name", "test", "--data-dir"])
            .arg(d.join("etcd"))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=test=http://127.0.0.1:{peer_port}"
            ))
            .args(["--log-level", "warn", "--unsafe-no-fsync"])
            .stdout(log("etcd-out")?)
            .stderr(log("etcd")?)
            .spawn()
            .context("start etcd")?;

        let key = d.join("sa.key");
        let public = d.join("sa.pub");
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048"))?;
        run(Command::new("openssl")
            .args(["rsa", "-in"])
            .arg(&key)
            .args(["-pubout", "-out"])
            .arg(&public))?;
        let admin_token = format!("admin-{}", std::process::id());
        std::fs::write(
            d.join("tokens.csv"),
            format!("{admin_token},admin,admin-uid,\"system:masters\"\n"),
        )?;

        let issuer = "https://kubernetes.default.svc.cluster.local";
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={secure_port}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={issuer}"))
            .arg(format!("--api-audiences={issuer}"))
            .arg(format!("--service-account-key-file={}", public.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .args([
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "-v=1",
            ])
            .stdout(log("apiserver-out")?)
            .stderr(log("apiserver")?)
            .spawn()
            .context("start kube-apiserver")?;

        let url = format!("https://127.0.0.1:{secure_port}");
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {admin_token}\ncontexts:\n- name: test-admin\n  context:\n    cluster: test\n    user: admin\n    namespace: default\n\
                 current-context: test-admin\n"
            ),
        )?;
        let server = ApiServer {
            dir,
            etcd,
            apiserver,
            kubeconfig,
            url,
            admin_token,
        };
        server.wait_ready(Duration::from_secs(120))?;
        Ok(server)
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let ready = self
                .kubectl(&["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "kube-apiserver was not ready within {limit:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of the apiserver's and etcd's logs, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| {
            crate::tail(
                &std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default(),
                30,
            )
        };
        format!(
            "--- kube-apiserver:\n{}\n--- etcd:\n{}",
            read("apiserver.log"),
            read("etcd.log")
        )
    }

    /// `kubectl --kubeconfig ADMIN ARGS`, with the kubectl built from the same release.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl());
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd
    }

    /// `kubectl apply -f -` of `yaml`, failing with kubectl's message.
    ///
    /// # Errors
    /// When kubectl fails.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        kubectl_apply(self.kubectl(&["apply", "-f", "-"]), yaml)
    }

    /// Patches the `status` subresource of `kind/name` (what a kubelet or controller would
    /// write; there is none here).
    ///
    /// # Errors
    /// When kubectl fails.
    pub fn patch_status(
        &self,
        kind: &str,
        name: &str,
        namespace: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<()> {
        let body = body.to_string();
        let mut args = vec![
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &body,
        ];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let output = self.kubectl(&args).output()?;
        if !output.status.success() {
            bail!(
                "patch {kind}/{name} status: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Writes a node's status as a kubelet would: Ready or not, 2 CPUs / 4 GiB, `kernel`.
    ///
    /// # Errors
    /// When kubectl fails.
    pub fn node_status(&self, name: &str, ready: bool, kernel: &str) -> Result<()> {
        let status = serde_json::json!({"status": {
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "reason": "Test",
                            "lastHeartbeatTime": "2026-11-22T00:00:00Z", "lastTransitionTime": "2026-11-22T00:00:00Z"}],
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "nodeInfo": {"kernelVersion": kernel, "architecture": "amd64", "operatingSystem": "linux", "bootID": "b",
                         "containerRuntimeVersion": "containerd://2", "kubeProxyVersion": "", "kubeletVersion": KUBERNETES_VERSION,
                         "machineID": "m", "osImage": "Debian", "systemUUID": "s"}}});
        self.patch_status("node", name, None, &status)
    }

    /// An async client for the admin kubeconfig.
    ///
    /// # Errors
    /// When the kubeconfig cannot be used.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A working directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let output = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A binary of this workspace built by cargo (`target/debug/NAME`), next to the test binary.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}
