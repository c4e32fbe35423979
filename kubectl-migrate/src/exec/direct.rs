//! The direct transfer (`--transfer direct`, and `auto`'s first choice): the archive goes from
//! the source pod to the target pod over one TCP connection between them, and this plugin
//! only orchestrates through exec sessions.
//!
//! 1. A fresh secret per container's transfer ([`new_secret`]): a self-signed certificate and
//!    its key. It reaches the two launchers only as one line on their exec stdin: never in
//!    argv, a pod spec, an annotation, an Event or a log.
//! 2. The target's `restore-launcher receive --listen 0` prints the port it listens on; it
//!    turns away any connection that does not authenticate with the secret and keeps waiting.
//! 3. The source's `restore-launcher checkpoint --to POD_IP:PORT` connects and authenticates
//!    (mutual TLS 1.3, the certificate pinned on both sides), says `connected`, and waits.
//!    Steps 1–3 ([`ExecLaunchers::connect_direct`]) run *before* the app is frozen: the exec
//!    round trips, the handshake and any connect timeout are not downtime.
//! 4. Once every container is frozen, `go` on the source's stdin
//!    ([`ExecLaunchers::run_direct`]): it dumps straight into the channel and prints the bytes
//!    sent, which feed the progress bar; both answers are read as in the relay
//!    ([`ExecLaunchers::conclude`]).
//!
//! When the target cannot be reached (a NetworkPolicy, separate networks), nothing has been
//! dumped or frozen: [`Direct::Unavailable`] lets `--transfer auto` fall back to the relay.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;
use migrate_format::{Answer, CheckpointReport, DirectSecret, Progress, Refusal, RestoreReport};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

use super::{Ended, ExecLaunchers, last_json, read_all, watched};
use crate::launchers::{LauncherError, Launchers as _, PostCopyDone};

/// How long the target's launcher may take to say where it listens.
const LISTEN_PATIENCE: Duration = Duration::from_secs(30);

/// Why a direct transfer did not happen.
#[derive(Debug)]
pub enum Direct {
    /// It could not start, and nothing was dumped: the target could not listen or could not
    /// be reached. The relay may be tried.
    Unavailable(String),
    /// It started and failed.
    Failed(LauncherError),
}

/// A fresh secret for one transfer: a self-signed ECDSA P-256 certificate and its key.
///
/// # Errors
/// When the key cannot be generated (no randomness).
pub fn new_secret() -> Result<DirectSecret, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["restore-launcher.migration".to_string()])?;
    let cert = params.self_signed(&key)?;
    Ok(DirectSecret {
        cert: hex::encode(cert.der()),
        key: hex::encode(key.serialize_der()),
    })
}

/// The secret as the launchers read it: one JSON line.
fn secret_line(secret: &DirectSecret) -> String {
    let mut line = serde_json::to_string(secret).unwrap_or_default();
    line.push('\n');
    line
}

/// The pod's IP, read fresh (the object the plugin holds may predate it).
async fn pod_ip(launchers: &ExecLaunchers, pod: &Pod) -> Result<IpAddr, String> {
    let (pods, name) = launchers.pods(pod);
    let pod = pods
        .get(&name)
        .await
        .map_err(|e| format!("cannot read pod {name}: {e}"))?;
    let ip = pod
        .status
        .and_then(|s| s.pod_ip)
        .ok_or_else(|| format!("pod {name} has no IP"))?;
    ip.parse()
        .map_err(|e| format!("pod {name}'s IP {ip:?} is not an address: {e}"))
}

/// Every address of `pod` (`status.podIPs`, else `status.podIP`): where the source's
/// connection comes from. None for a `hostNetwork` pod: its connection leaves from whichever
/// of the node's addresses routes to the target (a tunnel's, under an overlay network), not
/// necessarily the one the pod reports, so the target takes any.
fn source_ips(pod: &Pod) -> Vec<String> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Vec::new();
    }
    let status = pod.status.as_ref();
    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if let Some(ip) = status.and_then(|s| s.pod_ip.clone())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips.retain(|ip| ip.parse::<IpAddr>().is_ok());
    ips
}

/// Reads `stream` to its end in a task of its own (an exec session stalls while one of its
/// output pipes is full, so every one is drained).
fn drain(
    stream: Option<impl AsyncRead + Unpin + Send + 'static>,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move { read_all(stream).await.unwrap_or_default() })
}

/// What a [`drain`] task read, given a few seconds to finish (an exec stream a fault left open
/// must not hold the transfer's outcome up).
async fn collected(task: tokio::task::JoinHandle<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;
type Lines = tokio::io::Lines<BufReader<Box<dyn AsyncRead + Unpin + Send>>>;

/// A direct transfer made ready before the app is frozen: the target listens, the source's
/// channel to it stands (authenticated, taken by the target), and the source waits for `go`
/// on its stdin before it dumps.
pub struct Channel {
    // The exec sessions, kept alive with their streams.
    _receive: kube::api::AttachedProcess,
    _dump: kube::api::AttachedProcess,
    to_target: Option<Writer>,
    target_lines: Lines,
    target_said: String,
    target_log: tokio::task::JoinHandle<String>,
    to_source: Writer,
    source_lines: Lines,
    source_log: tokio::task::JoinHandle<String>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel(..)")
    }
}

fn boxed_writer(w: impl AsyncWrite + Unpin + Send + 'static) -> Writer {
    Box::new(w)
}

fn lines(r: impl AsyncRead + Unpin + Send + 'static) -> Lines {
    let boxed: Box<dyn AsyncRead + Unpin + Send> = Box::new(r);
    BufReader::new(boxed).lines()
}

/// How long the source may take to stand its channel (connect, handshake, the target's GO).
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

impl ExecLaunchers {
    /// Stands the direct channel for one container (see the module's documentation), before
    /// anything is frozen: nothing is dumped until [`ExecLaunchers::run_direct`] says `go`.
    pub(crate) async fn connect_direct(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
    ) -> Result<Channel, Direct> {
        let ip = pod_ip(self, target).await.map_err(Direct::Unavailable)?;
        let secret = new_secret().map_err(|e| {
            Direct::Failed(LauncherError::Failed(format!(
                "cannot make the transfer's secret: {e}"
            )))
        })?;
        let source_secret = fault::source_secret(&secret);
        fault::record_secret(&secret);

        // The target listens first, and says where.
        let (target_pods, target_name) = self.pods(target);
        let params = AttachParams::default()
            .container(container)
            .stdin(true)
            .stdout(true)
            .stderr(true);
        let mut receive_args = vec!["restore-launcher", "receive", "--listen", "0"];
        if self.lazy {
            receive_args.push("--lazy");
        }
        // Only the source pod may connect: connections from elsewhere on the pod network are
        // closed before they take a handshake slot.
        let from = source_ips(source);
        for ip in &from {
            receive_args.extend(["--from", ip.as_str()]);
        }
        let mut receive = target_pods
            .exec(&target_name, receive_args, &params)
            .await
            .map_err(|e| {
                Direct::Unavailable(format!(
                    "cannot start `restore-launcher receive --listen` in the target: {e}"
                ))
            })?;
        let (Some(to_target), Some(target_out)) = (receive.stdin(), receive.stdout()) else {
            return Err(Direct::Unavailable(
                "the target's exec streams did not open".into(),
            ));
        };
        let target_log = drain(receive.stderr());
        let mut to_target = Some(boxed_writer(to_target));
        if let Some(stdin) = to_target.as_mut() {
            stdin
                .write_all(secret_line(&secret).as_bytes())
                .await
                .map_err(|e| {
                    Direct::Unavailable(format!("cannot hand the target its secret: {e}"))
                })?;
            stdin.flush().await.ok();
        }
        let mut target_lines = lines(target_out);
        let mut target_said = String::new();
        let port = loop {
            match tokio::time::timeout(LISTEN_PATIENCE, target_lines.next_line()).await {
                Ok(Ok(Some(line))) => match serde_json::from_str::<Progress>(&line) {
                    Ok(Progress::Listening { port }) => break port,
                    _ => {
                        target_said.push_str(&line);
                        target_said.push('\n');
                    }
                },
                Ok(Ok(None) | Err(_)) => {
                    cancel(&mut to_target).await;
                    let log = collected(target_log).await;
                    return Err(Direct::Unavailable(format!(
                        "the target's launcher did not listen ({})",
                        [target_said.trim(), log.trim()].join(" ").trim()
                    )));
                }
                Err(_) => {
                    cancel(&mut to_target).await;
                    return Err(Direct::Unavailable(format!(
                        "the target's launcher did not say where it listens within {} s",
                        LISTEN_PATIENCE.as_secs()
                    )));
                }
            }
        };
        let address = SocketAddr::new(ip, port).to_string();
        tracing::debug!(container, %address, "the target listens");
        fault::hold("target-listening", &address).await;

        // The source connects and authenticates; it dumps only on `go`.
        let (source_pods, source_name) = self.pods(source);
        let mut dump_args = vec!["restore-launcher", "checkpoint", "--to", address.as_str()];
        if self.lazy {
            dump_args.push("--lazy");
        }
        let started = source_pods.exec(&source_name, dump_args, &params).await;
        let mut dump = match started {
            Ok(dump) => dump,
            Err(e) => {
                cancel(&mut to_target).await;
                return Err(Direct::Unavailable(format!(
                    "cannot start `restore-launcher checkpoint --to` in the source: {e}"
                )));
            }
        };
        let (Some(to_source), Some(source_out)) = (dump.stdin(), dump.stdout()) else {
            cancel(&mut to_target).await;
            return Err(Direct::Unavailable(
                "the source's exec streams did not open".into(),
            ));
        };
        let source_log = drain(dump.stderr());
        // Kept open until the end: with exec protocols before v5, closing stdin closes the
        // whole session, and the source's progress and answer with it.
        let mut to_source = boxed_writer(to_source);
        if let Err(e) = to_source
            .write_all(secret_line(&source_secret).as_bytes())
            .await
        {
            cancel(&mut to_target).await;
            return Err(Direct::Unavailable(format!(
                "cannot hand the source its secret: {e}"
            )));
        }
        to_source.flush().await.ok();
        let mut source_lines = lines(source_out);
        let mut said = String::new();
        let connected = tokio::time::timeout(CONNECT_PATIENCE, async {
            while let Ok(Some(line)) = source_lines.next_line().await {
                if matches!(
                    serde_json::from_str::<Progress>(&line),
                    Ok(Progress::Connected)
                ) {
                    return true;
                }
                said.push_str(&line);
                said.push('\n');
            }
            false
        })
        .await;
        if connected == Ok(true) {
            return Ok(Channel {
                _receive: receive,
                _dump: dump,
                to_target,
                target_lines,
                target_said,
                target_log,
                to_source,
                source_lines,
                source_log,
            });
        }
        // Nothing was dumped: the source waits for `go` or has ended.
        cancel(&mut to_target).await;
        let log = collected(source_log).await;
        if let Some(unreachable) = unreachable(&said, &log, 0) {
            return Err(Direct::Unavailable(unreachable));
        }
        Err(Direct::Failed(LauncherError::Failed(
            match last_json::<CheckpointReport>(&said) {
                Some(CheckpointReport { error, .. }) => format!(
                    "checkpoint failed: {}",
                    error.as_deref().unwrap_or("(no reason given)")
                ),
                None => format!(
                    "the source's channel to the target did not stand within {} s ({})",
                    CONNECT_PATIENCE.as_secs(),
                    [said.trim(), log.trim()].join(" ").trim()
                ),
            },
        )))
    }

    /// Runs a direct transfer whose channel stands: `go` to the source, which dumps into the
    /// channel; its progress feeds `moved`; both answers are read as in the relay.
    pub(crate) async fn run_direct(
        &self,
        target: &Pod,
        container: &str,
        channel: Channel,
        moved: &Arc<AtomicU64>,
    ) -> Result<(CheckpointReport, RestoreReport), LauncherError> {
        let Channel {
            mut to_target,
            mut target_lines,
            target_said,
            target_log,
            mut to_source,
            mut source_lines,
            source_log,
            ..
        } = channel;
        to_source
            .write_all(b"go\n")
            .await
            .map_err(|e| format!("cannot tell the source to dump: {e}"))?;
        to_source.flush().await.ok();

        // The source's lines: progress (bytes sent, for the bar and the stall watchdog), then
        // its answer.
        let own = AtomicU64::new(0);
        let mut summary = String::new();
        let follow = async {
            while let Some(line) = source_lines.next_line().await? {
                match serde_json::from_str::<Progress>(&line) {
                    Ok(Progress::Sent { bytes }) => {
                        let before = own.swap(bytes, Ordering::Relaxed);
                        moved.fetch_add(bytes.saturating_sub(before), Ordering::Relaxed);
                    }
                    _ => {
                        summary.push_str(&line);
                        summary.push('\n');
                    }
                }
            }
            Ok(own.load(Ordering::Relaxed))
        };
        let mut copy = Box::pin(watched(follow, &own));
        let mut answer = Box::pin(async {
            let mut answer = target_said.clone();
            while let Ok(Some(line)) = target_lines.next_line().await {
                answer.push_str(&line);
                answer.push('\n');
            }
            Ok((answer, String::new()))
        });
        let (copied, answer, target_first) = tokio::select! {
            copied = &mut copy => {
                let sent = own.load(Ordering::Relaxed);
                drop(copy);
                summary.push_str(&collected(source_log).await);
                // PID 1 refused the checkpoint itself (busy, wrong state, …): its code decides.
                if let Some(Answer { refusal: Some(refusal), error, .. }) = last_json::<Answer>(&summary) {
                    cancel(&mut to_target).await;
                    return Err(LauncherError::Refused {
                        refusal,
                        message: error.unwrap_or_default(),
                    });
                }
                if let Some(CheckpointReport { ok: false, error, .. }) = last_json::<CheckpointReport>(&summary)
                    && sent == 0
                {
                    // The source failed before sending a byte: its reason is the failure.
                    cancel(&mut to_target).await;
                    return Err(LauncherError::Failed(format!(
                        "checkpoint failed: {}",
                        error.as_deref().unwrap_or("(no reason given)")
                    )));
                }
                let answer = self.await_answer(target, container, &mut answer).await;
                (copied, answer, false)
            }
            answer = &mut answer => {
                let copied = tokio::time::timeout(super::TARGET_GRACE, &mut copy)
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::other("the target stopped reading the archive")));
                drop(copy);
                (copied, answer, true)
            }
        };
        // The target answered first, but the source failed before sending a byte (its dump
        // failed): the target only saw the channel end, and the source's reason is the cause.
        if target_first
            && own.load(Ordering::Relaxed) == 0
            && let Some(CheckpointReport {
                ok: false, error, ..
            }) = last_json::<CheckpointReport>(&summary)
        {
            return Err(LauncherError::Failed(format!(
                "checkpoint failed: {}",
                error.as_deref().unwrap_or("(no reason given)")
            )));
        }
        to_target.take();
        let log = collected(target_log).await;
        let answer = answer.map(|(answer, _)| (answer, log));
        self.conclude(
            target,
            container,
            Ended {
                copied,
                summary,
                answer,
                target_first,
                moved: own.load(Ordering::Relaxed),
            },
        )
        .await
    }
}

/// A post-copy transfer whose app runs on the target while its memory still moves: the exec
/// sessions (their launchers relay the pages) and what their output will tell.
pub struct PostCopyTask {
    _receive: kube::api::AttachedProcess,
    _dump: kube::api::AttachedProcess,
    _to_target: Option<Writer>,
    _target_rest: tokio::task::JoinHandle<()>,
    /// The source's remaining lines and log: its checkpoint report comes when every page was
    /// served.
    source: tokio::task::JoinHandle<String>,
}

impl std::fmt::Debug for PostCopyTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostCopyTask(..)")
    }
}

/// How often the target's launcher is asked whether every page arrived.
const POST_COPY_POLL: Duration = Duration::from_millis(250);
/// How long the target's launcher may stay unreachable while post-copy runs (its container
/// restarting after a failure takes a few seconds) before the wait gives up.
const POST_COPY_STATUS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
/// How long the source's report may lag behind the target's last page.
const SOURCE_REPORT_GRACE: Duration = Duration::from_secs(30);

impl ExecLaunchers {
    /// A post-copy transfer (`--lazy`) over a channel that stands: `go` to the source, which
    /// sends everything but the app's memory; the answer is the target's restore, which comes
    /// before the memory has moved. The exec sessions stay open (their launchers relay the
    /// pages) until [`ExecLaunchers::await_post_copy`].
    pub(crate) async fn run_post_copy(
        &self,
        container: &str,
        channel: Channel,
        moved: &Arc<AtomicU64>,
    ) -> Result<(CheckpointReport, RestoreReport), LauncherError> {
        let Channel {
            _receive,
            _dump,
            to_target,
            mut target_lines,
            target_said,
            target_log,
            mut to_source,
            mut source_lines,
            source_log,
        } = channel;
        to_source
            .write_all(b"go\n")
            .await
            .map_err(|e| format!("cannot tell the source to dump: {e}"))?;
        to_source.flush().await.ok();
        let counter = Arc::clone(moved);
        let source = tokio::spawn(async move {
            // Keeps the source's stdin open: its launcher reads nothing more from it.
            let _stdin = to_source;
            let mut own = 0u64;
            let mut summary = String::new();
            while let Ok(Some(line)) = source_lines.next_line().await {
                match serde_json::from_str::<Progress>(&line) {
                    Ok(Progress::Sent { bytes }) => {
                        counter.fetch_add(bytes.saturating_sub(own), Ordering::Relaxed);
                        own = bytes;
                    }
                    _ => {
                        summary.push_str(&line);
                        summary.push('\n');
                    }
                }
            }
            summary.push_str(&collected(source_log).await);
            summary
        });
        let mut said = target_said;
        let restored = loop {
            match target_lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<RestoreReport>(&line) {
                    Ok(report) => break Some(report),
                    Err(_) => {
                        said.push_str(&line);
                        said.push('\n');
                    }
                },
                _ => break None,
            }
        };
        match restored {
            Some(report) if report.ok => {
                let rest = tokio::spawn(async move {
                    while let Ok(Some(_)) = target_lines.next_line().await {}
                    let _ = target_log.await;
                });
                let sent = moved.load(Ordering::Relaxed);
                self.post_copies.lock().await.insert(
                    container.to_string(),
                    PostCopyTask {
                        _receive,
                        _dump,
                        _to_target: to_target,
                        _target_rest: rest,
                        source,
                    },
                );
                // The source's own report comes once every page was served.
                let mut checkpoint =
                    CheckpointReport::new(report.id.clone().unwrap_or_default(), false);
                checkpoint.ok = true;
                checkpoint.archive_bytes = sent;
                checkpoint.post_copy = Some(migrate_format::PostCopy {
                    state: migrate_format::PostCopyState::Moving,
                    ended_at_ms: None,
                    error: None,
                });
                Ok((checkpoint, report))
            }
            Some(report) => {
                source.abort();
                Err(LauncherError::Failed(format!(
                    "restore failed: {}",
                    report.error.as_deref().unwrap_or("(no reason given)")
                )))
            }
            None => {
                let log = collected(target_log).await;
                let summary = tokio::time::timeout(SOURCE_REPORT_GRACE, source)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let source_said = last_json::<CheckpointReport>(&summary)
                    .and_then(|r| r.error)
                    .map(|e| format!("; the source said: {e}"))
                    .unwrap_or_default();
                Err(LauncherError::Failed(format!(
                    "the target's launcher ended without a restore answer ({}){source_said}",
                    [said.trim(), log.trim()].join(" ").trim()
                )))
            }
        }
    }

    /// Waits until the target has every page of a post-copy transfer of `container`, or it
    /// failed (the target's launcher then killed the app); then reads the source's report.
    /// Without a transfer run by this plugin (`kubectl migrate resume` after an interrupted
    /// one), the target's launcher alone says; one that knows of no post-copy (its container
    /// restarted) cannot say every page arrived: that is a failure, never a go-ahead.
    pub(crate) async fn await_post_copy(
        &self,
        target: &Pod,
        container: &str,
    ) -> Result<Option<PostCopyDone>, LauncherError> {
        let task = self.post_copies.lock().await.remove(container);
        // When post-copy fails the target's launcher kills the app and its container restarts:
        // exec fails for a moment then. Only a launcher that stays unreachable is an error.
        let mut unreachable_since: Option<std::time::Instant> = None;
        let arrived = loop {
            let status = match self.status(target, container).await {
                Ok(status) => {
                    unreachable_since = None;
                    status
                }
                Err(error) => {
                    let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > POST_COPY_STATUS_PATIENCE {
                        return Err(error);
                    }
                    tokio::time::sleep(POST_COPY_POLL).await;
                    continue;
                }
            };
            match status.post_copy {
                Some(state) if state.state != migrate_format::PostCopyState::Moving => break state,
                Some(_) => tokio::time::sleep(POST_COPY_POLL).await,
                None => {
                    break migrate_format::PostCopy {
                        state: migrate_format::PostCopyState::Failed,
                        ended_at_ms: None,
                        error: Some(format!(
                            "the target's container restarted and its launcher knows of no post-copy (state {:?}{}): the app there was lost with the rest of its memory",
                            status.state,
                            status.error.map(|e| format!(": {e}")).unwrap_or_default()
                        )),
                    };
                }
            }
        };
        let served = match task {
            Some(task) => {
                let summary = tokio::time::timeout(SOURCE_REPORT_GRACE, task.source)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                last_json::<CheckpointReport>(&summary)
            }
            None => None,
        };
        Ok(Some(PostCopyDone {
            container: container.to_string(),
            arrived,
            served,
        }))
    }
}

/// Ends the target's wait for the source (`receive --listen` stops at any further input): the
/// exec protocol may not carry the end of stdin, so a line is sent.
async fn cancel(to_target: &mut Option<Writer>) {
    if let Some(mut stdin) = to_target.take() {
        let _ = stdin.write_all(b"cancel\n").await;
        let _ = stdin.flush().await;
    }
}

/// Whether the source's `checkpoint --to` ended without dumping because it could not reach the
/// target (its answer's refusal is `unreachable`) or because its launcher predates direct
/// transfers (clap refused `--to`, so nothing ran). What it said, if so. A stream that was
/// merely cut says neither: its outcome is settled like the relay's, never retried.
fn unreachable(summary: &str, log: &str, sent: u64) -> Option<String> {
    if let Some(Answer {
        refusal: Some(Refusal::Unreachable),
        error,
        ..
    }) = last_json::<Answer>(summary)
    {
        return Some(error.unwrap_or_else(|| "the target cannot be reached".into()));
    }
    (sent == 0
        && last_json::<CheckpointReport>(summary).is_none()
        && log.contains("unexpected argument '--to'"))
    .then(|| "the source's restore-launcher is too old for direct transfers".to_string())
}

/// Fault injection for the end-to-end tests of the direct path, only in builds with the
/// `fault-injection` feature (release builds never have it):
/// - `KUBECTL_MIGRATE_FAULT_WRONG_SECRET=1` hands the source a secret of its own, not the
///   target's: "a source without the secret", which no real part produces on demand.
/// - `KUBECTL_MIGRATE_FAULT_SECRET_FILE=F` appends each secret to F (mode 0600), so a test can
///   search pods, Events and logs for it.
/// - `KUBECTL_MIGRATE_FAULT_HOLD_AT=target-listening` with `KUBECTL_MIGRATE_FAULT_HOLD_FILE=F`
///   stops once the target listens, prints its address on stderr, and goes on when F is
///   removed: the moment a test connects from another pod without the secret.
mod fault {
    use migrate_format::DirectSecret;

    #[cfg(feature = "fault-injection")]
    pub fn source_secret(secret: &DirectSecret) -> DirectSecret {
        if std::env::var("KUBECTL_MIGRATE_FAULT_WRONG_SECRET").is_ok_and(|v| v == "1") {
            eprintln!("fault injection: the source gets a secret other than the target's");
            if let Ok(other) = super::new_secret() {
                return other;
            }
        }
        secret.clone()
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn source_secret(secret: &DirectSecret) -> DirectSecret {
        secret.clone()
    }

    #[cfg(feature = "fault-injection")]
    pub fn record_secret(secret: &DirectSecret) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let Some(path) = std::env::var_os("KUBECTL_MIGRATE_FAULT_SECRET_FILE") else {
            return;
        };
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
        {
            let _ = writeln!(
                file,
                "{}",
                serde_json::to_string(secret).unwrap_or_default()
            );
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn record_secret(_secret: &DirectSecret) {}

    #[cfg(feature = "fault-injection")]
    pub async fn hold(stage: &str, detail: &str) {
        if !std::env::var("KUBECTL_MIGRATE_FAULT_HOLD_AT").is_ok_and(|at| at == stage) {
            return;
        }
        let Some(file) = std::env::var_os("KUBECTL_MIGRATE_FAULT_HOLD_FILE") else {
            return;
        };
        eprintln!("fault injection: holding at {stage} ({detail}) until the hold file is removed");
        while std::path::Path::new(&file).exists() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub async fn hold(_stage: &str, _detail: &str) {}
}
