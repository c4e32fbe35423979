//! The pod-wide record that this pod's app moved away: written when a migration's commit
//! reaches this (source) launcher, read when the launcher starts.
//!
//! After the commit the source's frozen copy is stale and the target holds the app. The
//! source pod lingers for a while (until the plugin deletes it, up to a minute while a
//! ReplicaSet's pod is handed over, or until `kubectl migrate resume` if the plugin died), and
//! if its container restarts meanwhile -- its liveness probe fails on the frozen app, an OOM
//! kill -- the kubelet starts the container again and a launcher with no memory of the commit
//! would start the app fresh: a second copy, with the pod's labels, serving the same Services
//! as the moved one. The record keeps that launcher from starting the app.
//!
//! It lives in the pod's `/dev/shm`: the runtime gives every container of a pod the same one
//! (containerd and CRI-O keep it with the pod's sandbox), so it outlives a container restart
//! and goes with the pod. It does not outlive the sandbox: after a node reboot the kubelet
//! makes a new one, and a restarted source starts its app fresh as before. The file is named
//! after the pod's hostname, so that pods sharing the node's `/dev/shm` (`hostIPC: true`) do
//! not see each other's. A launcher that finds it exits at once with [`MOVED_AWAY`] and says
//! why: the container never runs long enough to be Ready, so no Service sends it traffic.
//! `rollback --committed` (the way back, once the target holds no copy) removes it.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// The launcher's exit code when it refuses to start an app that moved away.
pub const MOVED_AWAY: u8 = 3;

/// Where the record is kept: `/dev/shm/.restore-launcher-moved-HOSTNAME`
/// (`RESTORE_LAUNCHER_MOVED_RECORD` overrides it).
pub fn path() -> PathBuf {
    if let Some(path) = std::env::var_os("RESTORE_LAUNCHER_MOVED_RECORD") {
        return PathBuf::from(path);
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    PathBuf::from(format!("/dev/shm/.restore-launcher-moved-{host}"))
}

/// Records the commit. A failure is returned for the log: the commit stands either way.
///
/// # Errors
/// When the record cannot be written (no `/dev/shm`, read-only).
pub fn record(path: &Path) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    writeln!(
        file,
        "committed at {} ms since the epoch: this pod's app moved to another pod",
        migrate_format::unix_ms()
    )
}

/// Whether the record is there: a regular file (not a link) owned by this launcher's user or
/// by root -- one the app planted under another user does not count.
pub fn recorded(path: &Path) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    let euid = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_file() || (meta.uid() != euid && meta.uid() != 0) {
        return None;
    }
    Some(
        fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string(),
    )
}

/// Removes the record (the committed copy resumed: it holds the app again).
pub fn clear(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "cannot remove the moved-away record")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_written_0600_read_back_and_cleared() {
        let dir = std::env::temp_dir().join(format!("moved-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let path = dir.join("record");
        assert_eq!(recorded(&path), None);
        assert!(record(&path).is_ok());
        let meta = fs::metadata(&path).map(|m| m.mode() & 0o777).ok();
        assert_eq!(meta, Some(0o600));
        assert!(recorded(&path).is_some_and(|r| r.contains("moved to another pod")));
        // A link planted there is neither followed when written nor believed when read.
        clear(&path);
        let elsewhere = dir.join("elsewhere");
        let _ = fs::write(&elsewhere, "x");
        let _ = std::os::unix::fs::symlink(&elsewhere, &path);
        assert_eq!(recorded(&path), None);
        assert!(record(&path).is_err(), "O_NOFOLLOW");
        let _ = fs::remove_dir_all(&dir);
    }
}
