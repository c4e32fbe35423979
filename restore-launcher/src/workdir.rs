//! The work directory's job directories: where a checkpoint's CRIU images, or a received
//! archive, are staged. They hold the app's memory (its secrets), so none outlives its job:
//! a job removes its own when it ends, and PID 1 removes any left behind (a job killed by the
//! OOM killer, a launcher killed mid-restore whose container restarted with the same
//! emptyDir) when it starts and after every job. A live job holds a lock on its directory,
//! so a directory another launcher's job still uses (a shared work directory) is never
//! touched.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

/// Prefixes of job directories: checkpoints and restores.
const PREFIXES: [&str; 2] = ["ck-", "rs-"];
/// A job directory being created (locked, then renamed).
const NEW_PREFIX: &str = ".new-";
/// How old a directory left half-created must be before it is removed.
const NEW_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// A job's directory, locked while the job lives and removed when it is dropped.
#[derive(Debug)]
pub struct JobDir {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl JobDir {
    /// Creates `work_dir/id` (mode 0700, parents too) and locks it.
    ///
    /// # Errors
    /// When it cannot be created or locked.
    pub fn create(work_dir: &Path, id: &str) -> io::Result<JobDir> {
        let path = work_dir.join(id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(work_dir)?;
        // Created under a name no cleaner looks at, locked, then renamed into place: another
        // launcher sharing the work directory never sees it unlocked. Created here, never an
        // existing directory someone else made.
        let fresh = work_dir.join(format!("{NEW_PREFIX}{id}"));
        fs::DirBuilder::new().mode(0o700).create(&fresh)?;
        let lock = nix::fcntl::Flock::lock(
            File::open(&fresh)?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, errno)| io::Error::from(errno))?;
        fs::rename(&fresh, &path)?;
        Ok(JobDir { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fd of the lock that keeps the directory: a process that inherits it keeps the
    /// directory from [`clean_leftovers`] for as long as it lives.
    pub fn lock_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd as _;
        self.lock_file().as_raw_fd()
    }

    fn lock_file(&self) -> &File {
        &self._lock
    }

    /// Leaves the directory in place when this job ends: a process that inherited the lock
    /// ([`JobDir::lock_fd`]) still uses it, and PID 1 removes it after that process ends.
    pub fn hand_on(self) {
        std::mem::forget(self);
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes the job directories in `work_dir` that no live job holds. Returns their names.
pub fn clean_leftovers(work_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(work_dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let half_made = name.starts_with(NEW_PREFIX)
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > NEW_GRACE));
        if !(half_made || PREFIXES.iter().any(|p| name.starts_with(p)))
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let path = entry.path();
        let Ok(dir) = File::open(&path) else {
            continue;
        };
        // Held by a live job: not a leftover.
        let Ok(lock) = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        // A job killed mid-dump as the app's user (crate::creds) left directories of that
        // user, which a root launcher without CAP_DAC_OVERRIDE cannot empty: taken back first.
        if fs::remove_dir_all(&path).is_err() {
            for sub in ["criu", "log"] {
                if path.join(sub).exists() {
                    let _ = crate::creds::take_back(&path.join(sub));
                }
            }
        }
        if !path.exists() || fs::remove_dir_all(&path).is_ok() {
            removed.push(name);
        } else {
            tracing::warn!(path = %path.display(), "cannot remove a leftover job directory (it holds an app's memory): remove it by hand");
        }
        drop(lock);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_go_and_live_jobs_stay() {
        let work = std::env::temp_dir().join(format!("rl-work-{}", std::process::id()));
        let live = JobDir::create(&work, "ck-live").unwrap_or_else(|e| panic!("{e}"));
        fs::write(live.path().join("pages.img"), b"secret").unwrap_or_default();
        for left in ["ck-dead", "rs-dead"] {
            fs::create_dir_all(work.join(left).join("criu")).unwrap_or_default();
            fs::write(work.join(left).join("criu/pages.img"), b"secret").unwrap_or_default();
        }
        fs::create_dir_all(work.join("other")).unwrap_or_default();
        let mut removed = clean_leftovers(&work);
        removed.sort();
        assert_eq!(removed, ["ck-dead", "rs-dead"]);
        assert!(
            live.path().join("pages.img").exists(),
            "a live job's dir was removed"
        );
        assert!(work.join("other").exists(), "not ours");
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists(), "a job's dir outlived it");
        let _ = fs::remove_dir_all(&work);
    }
}
