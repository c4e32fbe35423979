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
}

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
    /// From the source's freeze to the app running here, in milliseconds (clocks must agree).
    pub downtime_ms: Option<u64>,
    /// Peak resident memory in KiB of the launcher's restore job and of criu.
    #[serde(default)]
    pub peak_rss_kib: BTreeMap<String, u64>,
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
