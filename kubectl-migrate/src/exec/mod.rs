//! Running `restore-launcher` sub-commands in a pod's containers through the API server's
//! exec endpoint (what `kubectl exec` does): the real implementation of [`Launchers`].
//!
//! The transfer streams the source's `checkpoint --output -` stdout into the target's
//! `receive --input -` stdin through a 64 KiB buffer, so the plugin's memory stays flat
//! whatever the archive's size. The archive is one zstd frame, so the receiver knows where it
//! ends without needing stdin's end (which older exec protocols do not deliver).

pub mod direct;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;
use kube::{Api, Client};
use migrate_format::{
    Answer, CheckpointReport, LauncherState, Refusal, RestoreReport, StatusReport,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use direct::Direct;

use crate::launchers::{LauncherError, Launchers, Route, TransferMode, Transferred};

/// Bytes copied per read in a transfer.
const CHUNK: usize = 64 * 1024;

/// Execs in containers with the user's client.
#[derive(Clone)]
pub struct ExecLaunchers {
    pub client: Client,
    /// `--lazy`: direct transfers are post-copy.
    pub lazy: bool,
    /// Post-copy transfers whose memory is still moving, by container (see
    /// [`direct`]).
    pub post_copies: std::sync::Arc<
        tokio::sync::Mutex<std::collections::BTreeMap<String, direct::PostCopyTask>>,
    >,
}

impl std::fmt::Debug for ExecLaunchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExecLaunchers")
    }
}

impl ExecLaunchers {
    pub(crate) fn pods(&self, pod: &Pod) -> (Api<Pod>, String) {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        (
            Api::namespaced(self.client.clone(), &namespace),
            pod.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// Runs `restore-launcher ARGS` in `container`; says what its stream told of the outcome.
    async fn run(&self, pod: &Pod, container: &str, args: &[&str]) -> Reply {
        let (pods, name) = self.pods(pod);
        let mut command = vec!["restore-launcher"];
        command.extend_from_slice(args);
        let params = AttachParams::default()
            .container(container)
            .stdout(true)
            .stderr(true)
            .stdin(false);
        let mut process = match pods.exec(&name, command, &params).await {
            Ok(process) => process,
            Err(error) => return Reply::Failed(LauncherError::Failed(error.to_string())),
        };
        let stdout = read_all(process.stdout()).await;
        let stderr = read_all(process.stderr()).await.unwrap_or_default();
        let status = match process.take_status() {
            Some(status) => status.await,
            None => None,
        };
        let stdout = match stdout {
            Ok(stdout) => stdout,
            Err(error) => {
                return Reply::Unknown {
                    detail: format!("reading its output failed: {error}"),
                    stdout: String::new(),
                };
            }
        };
        match status {
            Some(status) if status.status.as_deref() == Some("Failure") => Reply::Failed(failure(
                &stdout,
                &stderr,
                status.message.unwrap_or_default(),
            )),
            Some(_) => Reply::Succeeded(stdout),
            None => Reply::Unknown {
                detail: format!(
                    "the exec stream closed with no exit status{}",
                    if stdout.trim().is_empty() {
                        String::new()
                    } else {
                        format!(" after printing `{}`", stdout.trim())
                    }
                ),
                stdout,
            },
        }
    }

    /// Runs a sub-command that changes the launcher's state (`freeze`, `thaw`, `rollback`).
    /// An unknown outcome is settled by reading the launcher's `status` before anything is
    /// decided: a dropped stream must never count as success, nor as failure, unseen.
    async fn act(
        &self,
        pod: &Pod,
        container: &str,
        args: &[&str],
        took_effect: fn(&StatusReport) -> bool,
    ) -> Result<Option<u64>, LauncherError> {
        let verb = args.first().copied().unwrap_or_default();
        match self.run(pod, container, args).await {
            // When it took effect, by the launcher's clock (older launchers do not say).
            Reply::Succeeded(stdout) => Ok(last_json::<Answer>(&stdout).and_then(|a| a.at_ms)),
            Reply::Failed(why) => Err(why),
            Reply::Unknown { detail, .. } => settle(
                verb,
                &detail,
                self.status(pod, container).await,
                took_effect,
            )
            .map(|()| None),
        }
    }
}

/// What an exec'd sub-command's stream told of its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The API server delivered a success status; the command's stdout.
    Succeeded(String),
    /// It delivered a failure, or the exec could not start; the reason (the launcher's
    /// refusal code when it gave one).
    Failed(LauncherError),
    /// The stream ended with no status (a dropped WebSocket, a restarted API server or
    /// kubelet): the command may or may not have run. What happened, and what it printed.
    Unknown { detail: String, stdout: String },
}

/// Why a sub-command failed: the launcher's refusal code when its answer gives one (a
/// message is for people only), else what it printed, else the API server's message.
pub fn failure(stdout: &str, stderr: &str, message: String) -> LauncherError {
    if let Some(Answer {
        refusal: Some(refusal),
        error,
        ..
    }) = last_json::<Answer>(stdout)
    {
        return LauncherError::Refused {
            refusal,
            message: error.unwrap_or_default(),
        };
    }
    let why = if stdout.trim().is_empty() {
        stderr.trim()
    } else {
        stdout.trim()
    };
    LauncherError::Failed(if why.is_empty() {
        message
    } else {
        why.to_string()
    })
}

/// Decides an unknown outcome of `verb` from the launcher's status read afterwards: done if
/// `took_effect` says the state is what `verb` makes it, else an error that says "unknown
/// outcome" and what the status showed.
///
/// # Errors
/// When the status shows it did not take effect, or cannot be read.
pub fn settle(
    verb: &str,
    detail: &str,
    status: Result<StatusReport, LauncherError>,
    took_effect: fn(&StatusReport) -> bool,
) -> Result<(), LauncherError> {
    match status {
        Ok(status) if took_effect(&status) => {
            tracing::warn!(
                verb,
                detail,
                "unknown outcome; the launcher's status shows it took effect"
            );
            Ok(())
        }
        Ok(status) => Err(LauncherError::Unknown {
            verb: verb.into(),
            detail: detail.into(),
            seen: format!(
                "the launcher's status shows it did not take effect (state {:?}, app stopped: {})",
                status.state, status.app_stopped
            ),
        }),
        Err(error) => Err(LauncherError::Unknown {
            verb: verb.into(),
            detail: detail.into(),
            seen: format!("and the launcher's status cannot be read ({error})"),
        }),
    }
}

/// `freeze` took effect: the whole app is stopped.
pub fn is_frozen(status: &StatusReport) -> bool {
    status.state == LauncherState::Frozen && status.app_stopped
}

/// A lease as the launcher's `--lease` takes it: whole seconds, at least one.
fn seconds(lease: std::time::Duration) -> String {
    lease.as_secs().max(1).to_string()
}

/// `renew` took effect: the app is still held frozen (before or after its checkpoint) with a
/// lease.
pub fn is_frozen_or_dumped(status: &StatusReport) -> bool {
    matches!(
        status.state,
        LauncherState::Frozen | LauncherState::Checkpointing | LauncherState::Checkpointed
    ) && status.lease_seconds_left.is_some()
}

/// A thaw that found the app running fresh: refused as the launcher refuses a thaw with no
/// restored app (waiting, failed), so that callers decide on one code.
fn not_restored() -> LauncherError {
    LauncherError::Refused {
        refusal: Refusal::WrongState,
        message: "runs its app fresh, not restored (the container restarted after the restore)"
            .into(),
    }
}

/// `thaw` or `rollback` took effect: the app runs.
pub fn is_running(status: &StatusReport) -> bool {
    matches!(
        status.state,
        LauncherState::Running | LauncherState::Restored
    ) && !status.app_stopped
}

pub(crate) async fn read_all(stream: Option<impl AsyncRead + Unpin>) -> Result<String, String> {
    let mut text = String::new();
    if let Some(mut stream) = stream {
        stream
            .read_to_string(&mut text)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(text)
}

/// Copies `from` to `to` in bounded chunks (64 KiB), counting bytes into `moved`, then shuts
/// `to` down. The plugin's memory does not grow with the archive: see
/// `tests/transfer_memory.rs`.
///
/// # Errors
/// The first read or write error.
pub async fn copy_counting(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    moved: &AtomicU64,
) -> std::io::Result<u64> {
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0;
    let corrupt_at = fault_flip_byte();
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        if let Some(at) = corrupt_at.and_then(|at| at.checked_sub(total))
            && let Some(byte) = usize::try_from(at)
                .ok()
                .and_then(|at| buffer[..n].get_mut(at))
        {
            *byte ^= 0xff;
        }
        to.write_all(&buffer[..n]).await?;
        total += n as u64;
        moved.fetch_add(n as u64, Ordering::Relaxed);
    }
    to.shutdown().await?;
    Ok(total)
}

/// How long the copy may wait for the archive's first byte (the source dumps and hashes the
/// app first), and then for each next byte, before the transfer is declared stalled. A stream
/// whose far end died without the connection closing (an API server that restarted mid-stream
/// leaves such half-open sockets) would otherwise keep the source frozen until `--timeout`.
/// The launchers give up on their own after 20 s (output) and 120 s (input).
const FIRST_BYTE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);
const NEXT_BYTE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `copy` while adding what `own` counts to `total` (every 100 ms, and at the end).
async fn forward_count<T>(
    copy: impl std::future::Future<Output = T>,
    own: &AtomicU64,
    total: &AtomicU64,
) -> T {
    let mut seen = 0;
    let mut forward = || {
        let now = own.load(Ordering::Relaxed);
        total.fetch_add(now - seen, Ordering::Relaxed);
        seen = now;
    };
    tokio::pin!(copy);
    loop {
        tokio::select! {
            done = &mut copy => {
                forward();
                return done;
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => forward(),
        }
    }
}

/// Runs `copy`, failing it when `moved` stops growing (see [`NEXT_BYTE_PATIENCE`]).
pub(crate) async fn watched(
    copy: impl std::future::Future<Output = std::io::Result<u64>>,
    moved: &AtomicU64,
) -> std::io::Result<u64> {
    let stall = async {
        let start = moved.load(Ordering::Relaxed);
        let mut last = start;
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now = moved.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = tokio::time::Instant::now();
            }
            let patience = if last == start {
                FIRST_BYTE_PATIENCE
            } else {
                NEXT_BYTE_PATIENCE
            };
            if since.elapsed() >= patience {
                return patience;
            }
        }
    };
    tokio::select! {
        copied = copy => copied,
        patience = stall => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the transfer stalled: no archive byte moved for {} s (a stream left open by an API server, kubelet or network fault)",
                patience.as_secs()
            ),
        )),
    }
}

/// How long the archive copy may go on after the target answered, and the checkpoint's
/// summary may take after the copy ended.
pub(crate) const TARGET_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Fault injection for the end-to-end rollback test (tests/tests/e2e.rs): with
/// `KUBECTL_MIGRATE_FAULT_FLIP_BYTE=N` set, the byte at offset N of every archive is flipped on
/// its way through the plugin -- "a damaged archive in transit", which no real part on one
/// machine produces on demand. Only in builds with the `fault-injection` feature, which the
/// test builds enable and release builds never do (a test runs the release binary with the
/// variable set and sees the bytes arrive unchanged).
#[cfg(feature = "fault-injection")]
fn fault_flip_byte() -> Option<u64> {
    std::env::var("KUBECTL_MIGRATE_FAULT_FLIP_BYTE")
        .ok()?
        .parse()
        .ok()
}

/// Without the `fault-injection` feature no archive is ever altered.
#[cfg(not(feature = "fault-injection"))]
fn fault_flip_byte() -> Option<u64> {
    None
}

/// The last line of `text` that parses as `T` (reports are one JSON line among log lines).
pub(crate) fn last_json<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    text.lines()
        .rev()
        .find_map(|line| serde_json::from_str(line.trim()).ok())
}

/// How long the target's answer may lag behind what its launcher's `status` says is done, or
/// how long the target may be unreachable, before the restore's outcome is decided without it.
const ANSWER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a holder's `park` may take to answer once the archive ended (it verifies, writes
/// and syncs it to disk).
const PARK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

impl ExecLaunchers {
    /// The target launcher's report of restoring `checkpoint` (matched by its id), read from its
    /// `status` once it is no longer restoring (waiting up to [`ANSWER_PATIENCE`] for that).
    async fn restore_of(
        &self,
        target: &Pod,
        container: &str,
        checkpoint: Option<&CheckpointReport>,
    ) -> Option<RestoreReport> {
        let id = checkpoint.map(|c| c.id.clone())?;
        let deadline = tokio::time::Instant::now() + ANSWER_PATIENCE;
        loop {
            match self.status(target, container).await {
                Ok(status) if status.state != LauncherState::Restoring => {
                    return status
                        .last_restore
                        .filter(|r| r.id.as_deref() == Some(id.as_str()));
                }
                _ if tokio::time::Instant::now() >= deadline => return None,
                _ => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
            }
        }
    }

    /// Waits for `receive`'s answer (its stdout and stderr), checking the target's launcher
    /// every few seconds: once it is no longer restoring, or cannot be reached, for
    /// [`ANSWER_PATIENCE`], its `status` (the last restore report) is the answer.
    pub(crate) async fn await_answer(
        &self,
        target: &Pod,
        container: &str,
        answer: &mut (impl std::future::Future<Output = Result<(String, String), String>> + Unpin),
    ) -> Result<(String, String), String> {
        let mut settled_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                answer = &mut *answer => return answer,
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            }
            let status = self.status(target, container).await;
            let finished = match &status {
                Ok(s) => s.state != LauncherState::Restoring,
                Err(_) => true,
            };
            if !finished {
                settled_since = None;
                continue;
            }
            let since = *settled_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < ANSWER_PATIENCE {
                continue;
            }
            return match status {
                Ok(StatusReport {
                    last_restore: Some(report),
                    ..
                }) => {
                    tracing::warn!(
                        "the target's answer never came; its launcher's status tells the outcome"
                    );
                    Ok((
                        serde_json::to_string(&report).unwrap_or_default(),
                        String::new(),
                    ))
                }
                Ok(other) => Err(format!(
                    "the target's answer never came, and its launcher is {:?} with no restore report",
                    other.state
                )),
                Err(error) => Err(format!(
                    "the target's answer never came, and its launcher cannot be reached ({error})"
                )),
            };
        }
    }

    /// The relay: the source's `checkpoint --output -` streamed through this plugin into the
    /// target's `receive --input -` (or, for a StatefulSet's move, into a holder's `park`, and
    /// from its `unpark`: `leg`).
    async fn relay(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        moved: Arc<AtomicU64>,
        leg: Leg,
    ) -> Result<(CheckpointReport, RestoreReport), LauncherError> {
        let (send, take) = leg.commands();
        let (source_pods, source_name) = self.pods(source);
        let (target_pods, target_name) = self.pods(target);
        // kube's exec streams default to 1 KiB pipes: one WebSocket message per KiB, which
        // caps a transfer at a few MB/s. A chunk per message keeps memory flat and is ~10x faster.
        let dump_params = AttachParams::default()
            .container(container)
            .stdout(true)
            .stderr(true)
            .stdin(false)
            .max_stdout_buf_size(CHUNK);
        let receive_params = AttachParams::default()
            .container(container)
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .max_stdin_buf_size(CHUNK);
        let mut receive = target_pods
            .exec(&target_name, take.to_vec(), &receive_params)
            .await
            .map_err(|e| {
                format!(
                    "cannot start `{}` in pod {target_name}: {e}",
                    take.join(" ")
                )
            })?;
        let mut dump = source_pods
            .exec(&source_name, send.to_vec(), &dump_params)
            .await
            .map_err(|e| {
                format!(
                    "cannot start `{}` in pod {source_name}: {e}",
                    send.join(" ")
                )
            })?;
        let (Some(archive), Some(input)) = (dump.stdout(), receive.stdin()) else {
            return Err(LauncherError::Failed(
                "the exec streams did not open".into(),
            ));
        };
        // This container's own count: the watchdog and the cut-stream check must not mistake
        // another container's bytes for this stream's progress. The shared count is for the
        // progress display.
        let own = AtomicU64::new(0);
        let mut copy = Box::pin(watched(
            forward_count(copy_counting(archive, input, &own), &own, &moved),
            &own,
        ));
        let summary = read_all(dump.stderr());
        // Both of the target's output streams are read: kube's exec task stops serving a
        // session (stdin included) while one of its output pipes is full.
        let mut answer = Box::pin(async {
            let (answer, log) =
                tokio::join!(read_all(receive.stdout()), read_all(receive.stderr()));
            answer.map(|answer| (answer, log.unwrap_or_default()))
        });
        let mut summary = Box::pin(summary);
        // The target normally answers once the whole archive is in. When it answers first,
        // it refused the archive (damaged, wrong arch, ...) and stops reading: the copy would
        // then wait forever on a stream nobody drains, so it gets a moment to finish and is
        // then dropped, which closes the source's stream and ends its checkpoint job.
        let (copied, answer, target_first) = tokio::select! {
            copied = &mut copy => {
                tracing::debug!(container, ?leg, ok = copied.is_ok(), "the archive's copy ended first");
                // The copy is over; the target now restores. Its answer comes over a stream
                // that a fault can leave open and silent: the target's launcher is asked
                // directly meanwhile, and its word is taken once it has finished.
                let answer = if leg == Leg::Park {
                    // A holder's launcher only waits, so its status tells nothing of `park`,
                    // which writes and syncs the archive after the last byte: its own answer
                    // is the only word.
                    tokio::time::timeout(PARK_PATIENCE, &mut answer)
                        .await
                        .unwrap_or_else(|_| Err(format!(
                            "`restore-launcher park` gave no answer {} s after the archive ended",
                            PARK_PATIENCE.as_secs()
                        )))
                } else {
                    self.await_answer(target, container, &mut answer).await
                };
                (copied, answer, false)
            }
            answer = &mut answer => {
                tracing::debug!(container, ?leg, "the target answered before the copy ended");
                let copied = tokio::time::timeout(TARGET_GRACE, &mut copy)
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::other("the target stopped reading the archive")));
                (copied, answer, true)
            }
        };
        drop(copy);
        tracing::debug!(
            container,
            ?leg,
            answered = answer.is_ok(),
            "waiting for the source's summary"
        );
        let summary = tokio::time::timeout(TARGET_GRACE, &mut summary)
            .await
            .unwrap_or_else(|_| Ok(String::new()))
            .map_err(LauncherError::Failed)?;
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

    /// A holder's leg of a StatefulSet pod's move ([`Leg::Park`], [`Leg::Unpark`]), relayed.
    async fn relayed(
        &self,
        from: &Pod,
        to: &Pod,
        container: &str,
        moved: Arc<AtomicU64>,
        leg: Leg,
    ) -> Result<Transferred, LauncherError> {
        let (checkpoint, restore) = self.relay(from, to, container, moved, leg).await?;
        Ok(Transferred {
            checkpoint,
            restore,
            route: Route::Relay,
        })
    }

    /// Decides one container's transfer from how it ended: both reports when both succeeded,
    /// else the most telling reason (the target's refusal, the checkpoint's failure, a cut
    /// stream). A report a broken stream did not deliver is read from the launcher's status.
    pub(crate) async fn conclude(
        &self,
        target: &Pod,
        container: &str,
        ended: Ended,
    ) -> Result<(CheckpointReport, RestoreReport), LauncherError> {
        let Ended {
            copied,
            summary,
            answer,
            target_first,
            moved,
        } = ended;
        let checkpoint: Option<CheckpointReport> = last_json(&summary);
        let (answer, target_log) = match answer {
            Ok(answer) => answer,
            // The target's stream broke (an API server restart): its launcher still knows.
            Err(error) => match self
                .restore_of(target, container, checkpoint.as_ref())
                .await
            {
                Some(report) => (serde_json::to_string(&report).unwrap_or_default(), error),
                None => return Err(LauncherError::Failed(error)),
            },
        };
        let restore: Option<RestoreReport> = match last_json(&answer) {
            Some(report) => Some(report),
            // The stream ended with no report (cut after the archive was in): ask the launcher.
            None => {
                self.restore_of(target, container, checkpoint.as_ref())
                    .await
            }
        };
        tracing::debug!(
            moved,
            written = checkpoint.as_ref().map(|c| c.archive_bytes),
            target_log = target_log.trim(),
            "transfer ended"
        );
        // A whole archive written but only part of it carried: the exec stream from the source
        // was cut on the way (the target then finds the archive truncated).
        if let Some(written) = checkpoint
            .as_ref()
            .filter(|c| c.ok && c.archive_bytes > moved)
            .map(|c| c.archive_bytes)
            && restore.as_ref().is_none_or(|r| !r.ok)
        {
            return Err(LauncherError::Failed(format!(
                "the exec stream from the source was cut after {moved} of {written} archive bytes \
                 (the API server, the kubelet or the runtime closed it); receive said: {}",
                restore
                    .and_then(|r| r.error)
                    .unwrap_or_else(|| answer.trim().to_string())
            )));
        }
        let failed = match (checkpoint, restore) {
            (Some(checkpoint), Some(restore)) if checkpoint.ok && restore.ok => {
                return Ok((checkpoint, restore));
            }
            // Both failed: which stream closed first says nothing of which failure caused the
            // other (a refused archive breaks the source's stream; a failed dump truncates the
            // target's), and the two exec sessions close in either order, so both are told.
            (Some(checkpoint), Some(restore)) if !checkpoint.ok && !restore.ok => both_failed(
                checkpoint.error.unwrap_or_default(),
                restore.error.unwrap_or_default(),
                target_first,
            ),
            (_, Some(restore)) if target_first && !restore.ok => {
                format!("restore failed: {}", restore.error.unwrap_or_default())
            }
            (Some(checkpoint), _) if !checkpoint.ok => format!(
                "checkpoint failed: {}",
                checkpoint.error.unwrap_or_default()
            ),
            (_, Some(restore)) if !restore.ok => {
                format!("restore failed: {}", restore.error.unwrap_or_default())
            }
            _ => format!(
                "the transfer broke off after {moved} bytes ({}); checkpoint said: {}; receive said: {} {}",
                copied
                    .err()
                    .map_or_else(|| "stream ended".to_string(), |e| e.to_string()),
                summary.trim(),
                answer.trim(),
                target_log.trim()
            ),
        };
        Err(LauncherError::Failed(failed))
    }
}

/// The message of a transfer whose two sides both failed: the side that answered first comes
/// first, and the other's reason is never dropped (a target that refused the archive, for
/// "no space", breaks the source's stream: the source then fails with a broken pipe).
fn both_failed(checkpoint: String, restore: String, target_first: bool) -> String {
    if target_first {
        format!("restore failed: {restore}; the source's checkpoint failed too: {checkpoint}")
    } else {
        format!("checkpoint failed: {checkpoint}; the target's restore failed too: {restore}")
    }
}

/// Which two sub-commands a relay joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg {
    /// `checkpoint` into `receive`: a migration's transfer.
    Migrate,
    /// `checkpoint` into a holder's `park`.
    Park,
    /// A holder's `unpark` into `receive`.
    Unpark,
}

impl Leg {
    fn commands(self) -> (&'static [&'static str], &'static [&'static str]) {
        const CHECKPOINT: &[&str] = &["restore-launcher", "checkpoint", "--output", "-"];
        const RECEIVE: &[&str] = &["restore-launcher", "receive", "--input", "-"];
        match self {
            Leg::Migrate => (CHECKPOINT, RECEIVE),
            Leg::Park => (CHECKPOINT, &["restore-launcher", "park"]),
            Leg::Unpark => (&["restore-launcher", "unpark"], RECEIVE),
        }
    }
}

/// A transfer made ready before the freeze: relayed, or direct with its channel standing.
#[derive(Debug)]
pub enum Ready {
    Relay,
    Direct(Box<direct::Channel>),
}

/// How a transfer's streams ended, for [`ExecLaunchers::conclude`].
pub(crate) struct Ended {
    /// The archive copy: bytes, or why it stopped.
    pub(crate) copied: std::io::Result<u64>,
    /// What the source printed after the archive (its checkpoint summary is the last JSON line).
    pub(crate) summary: String,
    /// The target's answer and log, or why they never came.
    pub(crate) answer: Result<(String, String), String>,
    /// The target answered before the archive was all sent (it refused it).
    pub(crate) target_first: bool,
    /// Archive bytes that reached the target's side.
    pub(crate) moved: u64,
}

impl Launchers for ExecLaunchers {
    async fn status(&self, pod: &Pod, container: &str) -> Result<StatusReport, LauncherError> {
        // `status` changes nothing: its answer is what counts, whatever the stream's end said.
        let stdout = match self.run(pod, container, &["status"]).await {
            Reply::Succeeded(stdout) | Reply::Unknown { stdout, .. } => stdout,
            Reply::Failed(why) => return Err(why),
        };
        last_json(&stdout).ok_or_else(|| {
            LauncherError::Failed(format!(
                "restore-launcher status printed no status (`{}`)",
                stdout.trim()
            ))
        })
    }

    type Ready = Ready;

    async fn prepare(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        mode: TransferMode,
    ) -> Result<Ready, LauncherError> {
        if mode == TransferMode::Relay {
            if self.lazy {
                return Err(LauncherError::Failed(
                    "post-copy (--lazy) needs the direct transfer: drop --transfer relay, or drop --lazy".into(),
                ));
            }
            return Ok(Ready::Relay);
        }
        match self.connect_direct(source, target, container).await {
            Err(Direct::Unavailable(why)) if self.lazy => Err(LauncherError::Failed(format!(
                "post-copy (--lazy) needs the direct transfer, which is not possible: {why}; migrate without --lazy (the relay is then used)"
            ))),
            Ok(channel) => Ok(Ready::Direct(Box::new(channel))),
            Err(Direct::Unavailable(why)) if mode == TransferMode::Auto => {
                tracing::warn!(
                    "container {container}: the direct transfer is not possible ({why}); relaying the checkpoint through the API server instead"
                );
                Ok(Ready::Relay)
            }
            Err(Direct::Unavailable(why)) => Err(LauncherError::Failed(format!(
                "the direct transfer is not possible: {why} (--transfer auto would relay through the API server instead)"
            ))),
            Err(Direct::Failed(error)) => Err(error),
        }
    }

    async fn transfer(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        ready: Ready,
        moved: Arc<AtomicU64>,
    ) -> Result<Transferred, LauncherError> {
        let (reports, route) = match ready {
            Ready::Relay => (
                self.relay(source, target, container, moved, Leg::Migrate)
                    .await,
                Route::Relay,
            ),
            Ready::Direct(channel) if self.lazy => (
                self.run_post_copy(container, *channel, &moved).await,
                Route::Direct,
            ),
            Ready::Direct(channel) => (
                self.run_direct(target, container, *channel, &moved).await,
                Route::Direct,
            ),
        };
        let (checkpoint, restore) = reports?;
        Ok(Transferred {
            checkpoint,
            restore,
            route,
        })
    }

    async fn park(
        &self,
        source: &Pod,
        holder: &Pod,
        container: &str,
        moved: Arc<AtomicU64>,
    ) -> Result<Transferred, LauncherError> {
        self.relayed(source, holder, container, moved, Leg::Park)
            .await
    }

    async fn unpark(
        &self,
        holder: &Pod,
        target: &Pod,
        container: &str,
        moved: Arc<AtomicU64>,
    ) -> Result<Transferred, LauncherError> {
        self.relayed(holder, target, container, moved, Leg::Unpark)
            .await
    }

    async fn rollback(
        &self,
        pod: &Pod,
        container: &str,
        committed: bool,
    ) -> Result<(), LauncherError> {
        let args: &[&str] = if committed {
            &["rollback", "--committed"]
        } else {
            &["rollback"]
        };
        self.act(pod, container, args, is_running).await.map(drop)
    }

    async fn freeze(
        &self,
        pod: &Pod,
        container: &str,
        migration: &str,
        lease: std::time::Duration,
        limit: Option<std::time::Duration>,
    ) -> Result<Option<u64>, LauncherError> {
        let lease = seconds(lease);
        let mut args = vec!["freeze", "--migration", migration, "--lease", &lease];
        let limit = limit.map(|l| l.as_millis().max(1).to_string());
        if let Some(limit) = &limit {
            args.extend(["--limit-ms", limit]);
        }
        self.act(pod, container, &args, is_frozen).await
    }

    async fn renew(
        &self,
        pod: &Pod,
        container: &str,
        lease: std::time::Duration,
    ) -> Result<(), LauncherError> {
        let lease = seconds(lease);
        self.act(
            pod,
            container,
            &["renew", "--lease", &lease],
            is_frozen_or_dumped,
        )
        .await
        .map(drop)
    }

    async fn commit(&self, pod: &Pod, container: &str) -> Result<(), LauncherError> {
        self.act(pod, container, &["commit"], |s| s.committed)
            .await
            .map(drop)
    }

    async fn complete_post_copy(
        &self,
        target: &Pod,
        container: &str,
    ) -> Result<Option<crate::launchers::PostCopyDone>, LauncherError> {
        self.await_post_copy(target, container).await
    }

    async fn thaw(&self, pod: &Pod, container: &str) -> Result<Option<u64>, LauncherError> {
        // Only a restored app is thawed: a launcher that runs its app fresh (its container
        // restarted after the restore) accepts a thaw too, and must not pass for the target
        // that holds the app.
        match self.run(pod, container, &["thaw"]).await {
            Reply::Succeeded(stdout) => {
                let answer = last_json::<Answer>(&stdout);
                if answer
                    .as_ref()
                    .is_some_and(|a| a.state == Some(LauncherState::Running))
                {
                    return Err(not_restored());
                }
                Ok(answer.and_then(|a| a.at_ms))
            }
            Reply::Failed(why) => Err(why),
            Reply::Unknown { detail, .. } => match self.status(pod, container).await {
                Ok(status) if status.state == LauncherState::Running => Err(not_restored()),
                status => settle("thaw", &detail, status, is_running).map(|()| None),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_both_sides_failed_both_reasons_are_told_whichever_closed_first() {
        let no_space = "no space: restoring needs 9 bytes in `/work` but only 1 are free";
        let pipe = "cannot write the archive to its output: Broken pipe (os error 32)";
        for target_first in [false, true] {
            let text = both_failed(pipe.into(), no_space.into(), target_first);
            assert!(text.contains(no_space) && text.contains(pipe), "{text}");
        }
    }

    fn status(state: &str, stopped: bool) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "state": state, "app_pid": 1000, "launcher_version": "0.1.0", "criu_version": "4.2",
            "kernel": "6.18", "arch": "x86_64", "last_checkpoint": null, "last_restore": null,
            "error": null, "app_stopped": stopped
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_moves_nothing_is_cut_as_stalled() {
        let moved = AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        let never = std::future::pending::<std::io::Result<u64>>();
        let error = watched(never, &moved).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            error
                .to_string()
                .contains("no archive byte moved for 120 s")
        );
        assert!(started.elapsed() >= FIRST_BYTE_PATIENCE);
        // Once bytes flow, a pause of NEXT_BYTE_PATIENCE is a stall.
        let moved = std::sync::Arc::new(AtomicU64::new(0));
        let feeder = moved.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                feeder.fetch_add(1, Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        let error = watched(std::future::pending(), &moved).await.unwrap_err();
        assert!(error.to_string().contains("for 30 s"), "{error}");
        assert!(started.elapsed() >= std::time::Duration::from_secs(50 + 30));
        // A copy that ends is never cut.
        let done = watched(async { Ok(7) }, &AtomicU64::new(0)).await.unwrap();
        assert_eq!(done, 7);
    }

    #[test]
    fn a_refusal_is_decided_by_its_code_not_its_words() {
        let stdout = r#"{"ok":false,"state":"checkpointing","refusal":"busy","error":"cannot rollback: the launcher is checkpointing"}"#;
        let error = failure(&format!("log line\n{stdout}\n"), "", "exit 1".into());
        assert_eq!(error.refusal(), Some(migrate_format::Refusal::Busy));
        assert_eq!(
            error.to_string(),
            "cannot rollback: the launcher is checkpointing"
        );
        // An answer without a code (an older launcher), or no answer: a plain failure.
        let old = failure(
            r#"{"ok":false,"error":"nothing to roll back"}"#,
            "",
            String::new(),
        );
        assert_eq!(old.refusal(), None);
        let exec = failure(
            "",
            "exec: \"restore-launcher\": not found",
            "command terminated".into(),
        );
        assert_eq!(
            exec,
            LauncherError::Failed("exec: \"restore-launcher\": not found".into())
        );
        assert_eq!(
            failure("", "", "command terminated with exit code 1".into()).to_string(),
            "command terminated with exit code 1"
        );
    }

    #[test]
    fn an_unknown_outcome_is_settled_by_the_launchers_status_not_assumed() {
        let dropped = "the exec stream closed with no exit status";
        assert_eq!(
            settle("freeze", dropped, Ok(status("frozen", true)), is_frozen),
            Ok(())
        );
        let not_frozen = settle("freeze", dropped, Ok(status("running", false)), is_frozen)
            .unwrap_err()
            .to_string();
        assert!(
            not_frozen.starts_with("unknown outcome of `freeze`")
                && not_frozen.contains("did not take effect"),
            "{not_frozen}"
        );
        assert_eq!(
            settle(
                "rollback",
                dropped,
                Ok(status("running", false)),
                is_running
            ),
            Ok(())
        );
        let still_frozen = settle(
            "rollback",
            dropped,
            Ok(status("checkpointed", true)),
            is_running,
        )
        .unwrap_err()
        .to_string();
        assert!(
            still_frozen.contains("unknown outcome of `rollback`"),
            "{still_frozen}"
        );
        let unreadable = settle(
            "thaw",
            dropped,
            Err("connection refused".into()),
            is_running,
        )
        .unwrap_err()
        .to_string();
        assert!(
            unreadable.contains("unknown outcome of `thaw`")
                && unreadable.contains("status cannot be read (connection refused)"),
            "{unreadable}"
        );
        assert!(
            !is_running(&status("restored", true)),
            "restored but still frozen"
        );
        assert!(is_running(&status("restored", false)));
    }
}
