//! The contract between `restore-launcher` and `kubectl-migrate` that is data, not behaviour:
//! the checkpoint archive's manifest and the rules an archive must obey before anything in it
//! is used, the JSON the launcher's sub-commands print, and the annotation keys. Portable (no
//! `nix`), since the plugin runs on users' laptops.
//!
//! # The archive
//! One zstd-compressed tar stream. Its first entry is `manifest.json` ([`Manifest`]); then the
//! CRIU images under `criu/`; then the included paths' contents under `include/N/`, where `N`
//! is the index of the path in [`Manifest::included_paths`]. Every later entry is listed in
//! [`Manifest::entries`] with its size and SHA-256, and a reader refuses an archive whose
//! entries differ from that list in any way.

pub mod manifest;
pub mod report;

pub use manifest::{
    ARCHIVE_FORMAT_VERSION, Entry, EntryKind, MANIFEST_NAME, MANIFEST_SIZE_LIMIT, Manifest,
    ManifestError, PathError, XATTR_VALUE_LIMIT, is_carried_xattr, validate_entry_path,
};
pub use report::{
    Answer, CheckpointFailure, CheckpointReport, DirectSecret, FEATURES, LauncherState, PostCopy,
    PostCopyState, Progress, Refusal, RestoreReport, StatusReport, unix_ms,
};

/// Annotation keys the plugin writes on source and target pods.
pub mod annotations {
    /// The migration's id (the archive id).
    pub const MIGRATION_ID: &str = "migrate.kubectl.io/id";
    /// The phase reached: checking, checkpointing, transferring, restoring, verified, done, failed.
    pub const PHASE: &str = "migrate.kubectl.io/phase";
    /// Per-phase timings as JSON.
    pub const TIMINGS: &str = "migrate.kubectl.io/timings";
    /// On the target: the source pod; on the source: the target pod.
    pub const PEER: &str = "migrate.kubectl.io/peer";
    /// How many migrations this pod's lineage has been through (names the next target).
    pub const GENERATION: &str = "migrate.kubectl.io/generation";
    /// On the target: `true` while its launchers are to wait for a checkpoint, `false` once
    /// the restore is done. The launchers read it through the downward API
    /// (`RESTORE_LAUNCHER_WAIT_FOR_CHECKPOINT` from `metadata.annotations[…]`), which the
    /// kubelet resolves each time it starts a container: a container restarted after the
    /// migration starts its app fresh instead of waiting for an archive that never comes.
    pub const WAIT_FOR_CHECKPOINT: &str = "migrate.kubectl.io/wait-for-checkpoint";
    /// A readiness gate (`spec.readinessGates[].conditionType`) the plugin puts on every target
    /// pod and sets as a pod condition: `True` once the pod's app runs (thawed), `False` while
    /// it waits for a checkpoint or is frozen for a migration. The kubelet counts the pod
    /// Ready only when it is `True`, so Services send it no traffic before the thaw.
    pub const SERVING: &str = "migrate.kubectl.io/serving";
    /// On the source (written with its claim) and on the target or holder: how the pod
    /// moves, decided once by the preflight: `plain`, `handoff` (a ReplicaSet's pod, handed to
    /// its ReplicaSet), `stateful-set` (keeps its name through a holder), with `+post-copy`
    /// for `--lazy`. Every later step and every recovery command reads it.
    pub const VARIANT: &str = "migrate.kubectl.io/variant";
    /// On the target of a post-copy (`--lazy`): `true`. The source may be deleted only once
    /// every page arrived, which `kubectl migrate resume` must know even when the target's
    /// launcher no longer does (its container restarted).
    pub const POST_COPY: &str = "migrate.kubectl.io/post-copy";
    /// On the target of a pod a controller owns (a ReplicaSet's): the source's labels, as a
    /// JSON object. The target is created without them, so that it matches no controller's
    /// selector and no Service before the handoff, which gives them back.
    pub const HELD_LABELS: &str = "migrate.kubectl.io/held-labels";
    /// On the same target: the source's controller `ownerReference`, as JSON, which the
    /// handoff makes the target's.
    pub const OWNER: &str = "migrate.kubectl.io/owner";
    /// In a StatefulSet pod's move: `holder` on the pod that keeps the checkpoint on the
    /// target node while the pod's name changes hands, `successor` on the pod that takes the
    /// name (and the app) there.
    pub const ROLE: &str = "migrate.kubectl.io/role";
    /// On the holder: the successor pod to create once the source is gone, as JSON (the
    /// source's own spec, pinned to the target node), so that `kubectl migrate resume` can
    /// create it after the source is gone.
    pub const SUCCESSOR: &str = "migrate.kubectl.io/successor";
    /// On the holder: the source pod's uid. The source and the successor share a name; the uid
    /// tells which of them has it.
    pub const SOURCE_UID: &str = "migrate.kubectl.io/source-uid";
    /// On the holder, once committed: the source's containers' restart counts then (JSON). A
    /// source container that restarted after the commit started its app fresh.
    pub const SOURCE_RESTARTS: &str = "migrate.kubectl.io/source-restarts";
    /// On the source, from its freeze on: its containers' restart counts at the freeze (JSON).
    /// A container whose count is higher later was restarted: its app started fresh and the
    /// state at the freeze is gone from it, whatever else says.
    pub const RESTARTS_AT_FREEZE: &str = "migrate.kubectl.io/restarts-at-freeze";
    /// Kubernetes' own: which of a ReplicaSet's pods it deletes first when it has too many
    /// (lowest first, among pods equally ready).
    pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
}
