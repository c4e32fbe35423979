//! The seam between the pipeline and the launchers in the pod's containers: what the plugin
//! asks of `restore-launcher` ([`Launchers`]) and how that can fail ([`LauncherError`]). In a
//! cluster this is the exec API ([`crate::exec::ExecLaunchers`]); the API-server tests, which
//! have no kubelet, stand in for it and say so.
//!
//! Decisions are taken on [`LauncherError`]'s variants and the launcher's [`Refusal`] codes,
//! never on the words of a message.

use k8s_openapi::api::core::v1::Pod;
use migrate_format::{Refusal, StatusReport};

/// Why a launcher request did not (or may not have) taken effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LauncherError {
    /// The launcher answered, and refused: `refusal` says why as a code.
    #[error("{message}")]
    Refused { refusal: Refusal, message: String },
    /// The request could not be carried out: the exec could not start, the launcher could not
    /// be reached or is too old to give a code, a checkpoint or restore failed, a stream broke.
    #[error("{0}")]
    Failed(String),
    /// The exec stream ended with no exit status, and the launcher's status (read to settle it)
    /// shows the request did not take effect, or cannot be read.
    #[error("unknown outcome of `{verb}` ({detail}); {seen}")]
    Unknown {
        verb: String,
        detail: String,
        seen: String,
    },
}

impl LauncherError {
    /// The launcher's refusal code, if it refused.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            LauncherError::Refused { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }
}

impl From<String> for LauncherError {
    fn from(message: String) -> Self {
        LauncherError::Failed(message)
    }
}

impl From<&str> for LauncherError {
    fn from(message: &str) -> Self {
        LauncherError::Failed(message.into())
    }
}

/// How the archive goes from the source's launcher to the target's (`--transfer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// Direct, and the relay when the target's port cannot be reached (saying so).
    #[default]
    Auto,
    /// Pod to pod over mutually authenticated TLS, or fail.
    Direct,
    /// Through this plugin and the API server (`kubectl exec` streams).
    Relay,
}

/// The way one container's archive actually went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Direct,
    Relay,
}

/// One container's transfer, done: both launchers' reports and the way the archive went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Transferred {
    pub checkpoint: migrate_format::CheckpointReport,
    pub restore: migrate_format::RestoreReport,
    pub route: Route,
}

/// A post-copy transfer (`--lazy`) that ended: the target launcher's word on the app's memory,
/// and the source's checkpoint report, which comes once every page was served.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PostCopyDone {
    pub container: String,
    /// Every page arrived (or not), with when, by the target node's CLOCK_REALTIME.
    pub arrived: migrate_format::PostCopy,
    pub served: Option<migrate_format::CheckpointReport>,
}

/// What the plugin does inside containers, through `restore-launcher` sub-commands.
pub trait Launchers {
    /// The launcher's status in `container`, or why it could not be read.
    fn status(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<StatusReport, LauncherError>> + Send;

    /// A transfer made ready before the freeze ([`Launchers::prepare`]).
    type Ready: Send;

    /// Makes one container's transfer ready before anything is frozen, the way `mode` says:
    /// for the direct path the channel between the pods stands (so its setup, and finding
    /// that the pods cannot reach each other, are not downtime); `auto` settles on the relay
    /// here, saying so, when they cannot.
    fn prepare(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        mode: TransferMode,
    ) -> impl std::future::Future<Output = Result<Self::Ready, LauncherError>> + Send;

    /// Moves the checkpoint of `container` in `source` into the same container in `target`
    /// (`checkpoint` into `receive`) the way `ready` was made, adding the bytes moved to
    /// `moved`.
    fn transfer(
        &self,
        source: &Pod,
        target: &Pod,
        container: &str,
        ready: Self::Ready,
        moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> impl std::future::Future<Output = Result<Transferred, LauncherError>> + Send;

    /// A StatefulSet's move, first leg: the checkpoint of `container` in `source` goes, relayed
    /// through this plugin, into `park` in the same container of `holder` (verified and kept
    /// there, restored nowhere). The second report is the holder's.
    fn park(
        &self,
        _source: &Pod,
        _holder: &Pod,
        _container: &str,
        _moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> impl std::future::Future<Output = Result<Transferred, LauncherError>> + Send {
        async {
            Err(LauncherError::Failed(
                "parking an archive is not supported here".into(),
            ))
        }
    }

    /// Second leg: the archive parked in `holder` goes (`unpark`) into `receive` in the same
    /// container of `target`, which verifies and restores it (frozen).
    fn unpark(
        &self,
        _holder: &Pod,
        _target: &Pod,
        _container: &str,
        _moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> impl std::future::Future<Output = Result<Transferred, LauncherError>> + Send {
        async {
            Err(LauncherError::Failed(
                "parking an archive is not supported here".into(),
            ))
        }
    }

    /// `rollback` in `container`: resume the app frozen by a checkpoint; with `committed`
    /// (`rollback --committed`) also a copy whose migration committed, which the caller asks
    /// only once the target provably holds no copy.
    fn rollback(
        &self,
        pod: &Pod,
        container: &str,
        committed: bool,
    ) -> impl std::future::Future<Output = Result<(), LauncherError>> + Send;

    /// `freeze --lease` in `container`: stop the app, so all containers are frozen before any
    /// is dumped; it resumes by itself after `lease` unless renewed or committed, and at
    /// `limit` at the latest whatever the renewals (what the app's liveness probes allow).
    /// When the app stopped, by the node's clock (ms since the epoch), if the launcher said.
    /// `migration` is the id the launcher names should this freeze end without a commit.
    fn freeze(
        &self,
        pod: &Pod,
        container: &str,
        migration: &str,
        lease: std::time::Duration,
        limit: Option<std::time::Duration>,
    ) -> impl std::future::Future<Output = Result<Option<u64>, LauncherError>> + Send;

    /// `renew --lease` in `container`: the migration is still working; extend the lease.
    fn renew(
        &self,
        pod: &Pod,
        container: &str,
        lease: std::time::Duration,
    ) -> impl std::future::Future<Output = Result<(), LauncherError>> + Send;

    /// `commit` in `container`: end the lease; the frozen source never resumes on its own.
    fn commit(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<(), LauncherError>> + Send;

    /// After a post-copy transfer of `container` (`--lazy`) and the thaw: waits until the
    /// target has every page of the app's memory, or the transfer failed. `None` when the
    /// transfer was not post-copy.
    fn complete_post_copy(
        &self,
        _target: &Pod,
        _container: &str,
    ) -> impl std::future::Future<Output = Result<Option<PostCopyDone>, LauncherError>> + Send {
        async { Ok(None) }
    }

    /// `thaw` in `container`: resume the app (on the target, once every container is
    /// restored). When the app resumed, by the node's clock (ms since the epoch), if the
    /// launcher said.
    fn thaw(
        &self,
        pod: &Pod,
        container: &str,
    ) -> impl std::future::Future<Output = Result<Option<u64>, LauncherError>> + Send;
}
