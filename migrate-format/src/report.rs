//! The JSON the launcher's sub-commands print: `status`, and the results of `checkpoint`,
//! `receive` and `rollback`. The plugin parses the same types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The launcher's state, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherState {
    /// The app runs, started fresh.
    Running,
    /// The app is stopped by `freeze` (SIGSTOP to its group), so that several containers can be
    /// checkpointed at one consistent moment; `thaw` or `rollback` resumes it.
    Frozen,
    /// A checkpoint is being taken.
    Checkpointing,
    /// The app is frozen after a checkpoint; its state is in the archive. `rollback` resumes it.
    Checkpointed,
    /// Started with `--wait-for-checkpoint`; no app yet.
    Waiting,
    /// An archive is being verified and restored.
    Restoring,
    /// The app runs, restored from an archive.
    Restored,
    /// The last restore failed; `receive` may be tried again.
    Failed,
}

/// Why the launcher refused a control request, as a code the plugin decides on (it never
/// matches the words of [`Answer::error`], which are for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// A checkpoint or restore is in progress; ask again once it ends. A `rollback` asked
    /// meanwhile also tells the checkpoint to stop writing.
    Busy,
    /// Nothing is frozen: `rollback` has nothing to resume.
    NothingToRollBack,
    /// The request needs a running app (`freeze`, `checkpoint`) or a frozen one (`thaw`,
    /// `commit`), and the app is not in that state.
    WrongState,
    /// The freeze's lease expired and the app resumed: the migration can neither renew nor
    /// commit any more.
    LeaseExpired,
    /// There is no lease to renew (never frozen with one, or already committed).
    NoLease,
    /// The migration holding this frozen app is committed: this copy is stale and only an
    /// explicit `rollback` resumes it.
    Committed,
    /// The launcher is not waiting for a checkpoint (`receive`).
    NotWaiting,
    /// The request was malformed or lacked its stream.
    BadRequest,
    /// The peer's uid may not drive this launcher.
    NotAllowed,
    /// The launcher tried and failed (a process could not be stopped, a job not started,
    /// CRIU not found); the error says what.
    Failed,
    /// `checkpoint --to`: the target's address could not be reached (no route, refused, timed
    /// out). Nothing was dumped and the app is as it was: the exec relay may be tried instead.
    Unreachable,
}

/// PID 1's answer to `freeze`, `renew`, `commit`, `thaw` and `rollback`, and to any refused
/// request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    /// The launcher's state after the request.
    #[serde(default)]
    pub state: Option<LauncherState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_pid: Option<i32>,
    /// Set when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
    /// What went wrong and what to do, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the request took effect (the app stopped for `freeze`, resumed for `thaw`), in
    /// milliseconds since the Unix epoch by this node's CLOCK_REALTIME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
}

impl Answer {
    /// A request that took effect.
    pub fn done(state: LauncherState, app_pid: Option<i32>) -> Self {
        Answer {
            ok: true,
            state: Some(state),
            app_pid,
            refusal: None,
            error: None,
            at_ms: Some(unix_ms()),
        }
    }

    /// A refused request.
    pub fn refused(refusal: Refusal, state: Option<LauncherState>, error: String) -> Self {
        Answer {
            ok: false,
            state,
            app_pid: None,
            refusal: Some(refusal),
            error: Some(error),
            at_ms: None,
        }
    }
}

/// Milliseconds since the Unix epoch, by this machine's CLOCK_REALTIME.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The lines a direct transfer prints on stdout before its final report (one JSON value per
/// line): the target's `receive --listen` says where it listens, the source's `checkpoint
/// --to` that its channel stands and then how many archive bytes it has sent so far (every
/// quarter of a second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// `receive --listen`: the TCP port it accepts the source's connection on.
    Listening { port: u16 },
    /// `checkpoint --to`: the channel to the target stands (authenticated, taken by the
    /// target); nothing is dumped until a line `go` arrives on stdin.
    Connected,
    /// `checkpoint --to`: archive bytes sent so far (the whole stream, after encryption's
    /// framing is taken off).
    Sent { bytes: u64 },
}

/// The per-migration secret of a direct transfer, handed to both launchers as one JSON line on
/// their stdin (never in argv, the environment, a pod spec or a log): a self-signed
/// certificate and its private key, made fresh for one container's transfer. Each side
/// presents it and accepts only a peer presenting the same certificate and proving it holds
/// the key (mutual TLS 1.3 with the certificate pinned).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectSecret {
    /// The certificate, DER, hex.
    pub cert: String,
    /// Its private key, PKCS#8 DER, hex.
    pub key: String,
}

impl std::fmt::Debug for DirectSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectSecret(..)")
    }
}

/// Post-copy (`--lazy`): where the app's memory stands after a restore that did not wait for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCopy {
    pub state: PostCopyState,
    /// When it ended (every page arrived or was served, or it failed), by this node's
    /// CLOCK_REALTIME in ms since the epoch.
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// See [`PostCopy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostCopyState {
    /// Pages are still coming (target) or being served (source).
    Moving,
    /// Every page arrived (target) or was served (source).
    Complete,
    /// The page transfer broke off: on the target the app was killed (it cannot go on
    /// without its memory); the source still holds the app, frozen.
    Failed,
}

/// What `status` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub state: LauncherState,
    pub app_pid: Option<i32>,
    pub launcher_version: String,
    pub criu_version: Option<String>,
    pub kernel: String,
    pub arch: String,
    pub last_checkpoint: Option<CheckpointReport>,
    pub last_restore: Option<RestoreReport>,
    /// The last error, while in the `failed` state.
    pub error: Option<String>,
    /// Whether the app's root process is stopped (frozen, checkpointed, or restored from a
    /// frozen checkpoint and not yet thawed).
    #[serde(default)]
    pub app_stopped: bool,
    /// Seconds until a frozen app resumes by itself (its freeze's lease), if it has one.
    #[serde(default)]
    pub lease_seconds_left: Option<u64>,
    /// Whether the migration holding the app frozen is committed (it never resumes on its own).
    #[serde(default)]
    pub committed: bool,
    /// When this node's kernel booted, in seconds since the Unix epoch: CLOCK_MONOTONIC and
    /// CLOCK_BOOTTIME count from it, so a restored app's monotonic clocks jump by the
    /// difference between the source's and the target's.
    #[serde(default)]
    pub boot_time: Option<u64>,
    /// SysV IPC objects a checkpoint would leave behind ("1 SysV semaphore set (key 0x0)"):
    /// those of the container's IPC namespace, when the app shares it with the launcher.
    #[serde(default)]
    pub sysv_ipc: Option<String>,
    /// After a post-copy restore (`--lazy`): whether every page of the app's memory arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<PostCopy>,
    /// Why this container cannot be the source of a post-copy (`--lazy`), if it cannot: what
    /// it lacks and how to give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy_source: Option<String>,
    /// Why this container's app cannot be checkpointed at all, if it cannot: the capability it
    /// lacks and how to give it. The preflight refuses to move it with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_blocked: Option<String>,
    /// What this launcher can do that older ones could not ([`FEATURES`]): the plugin asks for
    /// what a migration needs before it touches anything, since the launcher ships inside
    /// app images that may be older than the plugin.
    #[serde(default)]
    pub features: Vec<String>,
    /// The migration (the id its `freeze --migration` named) whose freeze of the app ended
    /// without a commit since this launcher started: its lease or limit ran out, its
    /// checkpoint died, or it was rolled back. The app resumed, and that migration can never
    /// commit (a commit needs the freeze): what it left behind only needs removing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_freeze: Option<String>,
}

/// What a launcher of this version can do, as `status` lists it:
/// - `freeze-limit`: `freeze --limit-ms`, a bound no lease renewal passes;
/// - `probe`: `restore-launcher probe`, the startup probe of a migration's target;
/// - `rollback-committed`: `rollback --committed` (a plain `rollback` refuses a committed copy);
/// - `moved-record`: a restarted source container does not start its app after the commit.
/// - `ended-freeze`: `freeze --migration ID`, and `status` naming the migration whose freeze
///   ended without a commit;
/// - `direct-from`: `receive --listen --from IP`, taking connections from the source pod only.
pub const FEATURES: &[&str] = &[
    "freeze-limit",
    "probe",
    "rollback-committed",
    "moved-record",
    "ended-freeze",
    "direct-from",
];

/// What `checkpoint` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub id: String,
    pub ok: bool,
    pub error: Option<String>,
    /// Whether the app kept running after the dump.
    pub left_running: bool,
    pub app_pids: Vec<i32>,
    pub images_bytes: u64,
    pub included_bytes: u64,
    /// Compressed archive bytes written.
    pub archive_bytes: u64,
    /// Per-phase durations in milliseconds: dump, snapshot, hash, write, total.
    pub timings_ms: BTreeMap<String, u64>,
    /// How long the app was frozen before it resumed (leave-running), in milliseconds.
    pub frozen_ms: Option<u64>,
    /// Peak resident memory in KiB of the launcher's checkpoint job and of criu.
    #[serde(default)]
    pub peak_rss_kib: BTreeMap<String, u64>,
    /// A post-copy checkpoint (`checkpoint --to --lazy`): the memory was served after the
    /// archive, and this report comes once every page was (or the serving failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_copy: Option<PostCopy>,
    /// Why it failed, as a code (the error says it in words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<CheckpointFailure>,
}

/// What kind of failure ended a checkpoint. The first five say the app cannot be checkpointed
/// as it is now (change the app or the pod, then try again); the others that this attempt
/// failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointFailure {
    /// Processes left the app's tree (a daemonizing double fork, an exec session's leftover).
    LeftTree,
    /// The app watches files (inotify, fanotify) and CRIU lacks CAP_SYS_ADMIN.
    FileWatches,
    /// SysV IPC objects in the namespace the app shares with the launcher.
    SysvIpc,
    /// An included path cannot be carried (a socket file, a device, a symlinked ancestor).
    IncludedPath,
    /// The sealing key cannot be used.
    Key,
    /// The work directory cannot be made or handed to criu.
    WorkDir,
    /// CRIU's dump failed (its log's error lines are in the error).
    Criu,
    /// The checkpoint's files could not be read back (a file changed kind, the manifest is too
    /// large for a target).
    Archive,
    /// The archive's reader went away, stalled, or a rollback cancelled the write.
    Output,
    /// Post-copy: not every page reached the target.
    PostCopy,
}

/// What `receive` (and a `--restore-from` start) reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub id: Option<String>,
    pub ok: bool,
    pub error: Option<String>,
    pub app_pid: Option<i32>,
    pub archive_bytes: u64,
    /// Per-phase durations in milliseconds: verify, put_back, restore, total.
    pub timings_ms: BTreeMap<String, u64>,
    /// From the source's freeze (the manifest's freeze time) to the end of this restore, in
    /// milliseconds (the two nodes' clocks must agree). In a migration the app stays frozen
    /// until every container is restored and thawed: the plugin's report gives that span,
    /// freeze → thaw, as the migration's downtime.
    pub downtime_ms: Option<u64>,
    /// Peak resident memory in KiB of the launcher's restore job and of criu.
    #[serde(default)]
    pub peak_rss_kib: BTreeMap<String, u64>,
    /// A post-copy restore: the PID of the `criu lazy-pages` daemon still fetching the app's
    /// memory (its end is in `status`'s `post_copy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_pages_pid: Option<i32>,
}

impl CheckpointReport {
    /// A report for checkpoint `id`, not yet successful, to be filled in.
    pub fn new(id: String, left_running: bool) -> Self {
        CheckpointReport {
            id,
            ok: false,
            error: None,
            left_running,
            app_pids: Vec::new(),
            images_bytes: 0,
            included_bytes: 0,
            archive_bytes: 0,
            timings_ms: BTreeMap::new(),
            frozen_ms: None,
            peak_rss_kib: BTreeMap::new(),
            post_copy: None,
            failure: None,
        }
    }

    /// A failed checkpoint that produced nothing.
    pub fn failed(error: String) -> Self {
        CheckpointReport {
            error: Some(error),
            ..CheckpointReport::new(String::new(), false)
        }
    }
}

impl RestoreReport {
    /// A report for a restore, not yet successful, to be filled in.
    pub fn new() -> Self {
        RestoreReport {
            id: None,
            ok: false,
            error: None,
            app_pid: None,
            archive_bytes: 0,
            timings_ms: BTreeMap::new(),
            downtime_ms: None,
            peak_rss_kib: BTreeMap::new(),
            lazy_pages_pid: None,
        }
    }

    /// A failed restore.
    pub fn failed(error: String) -> Self {
        RestoreReport {
            error: Some(error),
            ..RestoreReport::new()
        }
    }
}

impl Default for RestoreReport {
    fn default() -> Self {
        Self::new()
    }
}
