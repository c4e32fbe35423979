//! `--include PATH`: local paths (emptyDir, writable directories) whose contents travel with
//! the checkpoint. At checkpoint they are copied while the app is frozen, so files the app has
//! open match what CRIU recorded (CRIU refuses to restore an open file whose size changed).
//! At restore they are put back, byte for byte, before CRIU runs.
//!
//! An archive may only write into paths the restoring launcher was itself told to include:
//! the manifest cannot choose where files land.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use migrate_format::{EntryKind, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum IncludeError {
    #[error("included path `{}` cannot be copied", path.display())]
    Copy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the archive carries `{0}`, which this launcher was not told to include; start it with the same --include options as the source"
    )]
    NotAllowed(String),
}

/// Copies each of `paths` to `dest/include/N` (N its index), keeping modes and symlinks.
/// A path that does not exist is recorded as absent (nothing copied).
///
/// # Errors
/// [`IncludeError::Copy`] naming the path that failed.
pub fn snapshot(paths: &[PathBuf], dest: &Path) -> Result<u64, IncludeError> {
    let mut bytes = 0;
    for (index, path) in paths.iter().enumerate() {
        if path.symlink_metadata().is_err() {
            tracing::warn!(path = %path.display(), "included path does not exist; nothing of it is checkpointed");
            continue;
        }
        let target = dest.join("include").join(index.to_string());
        bytes += copy_tree(path, &target).map_err(|source| IncludeError::Copy {
            path: path.clone(),
            source,
        })?;
    }
    Ok(bytes)
}

/// Copies `src` to `dst` recursively (files, directories with their modes, symlinks as links,
/// FIFOs recreated as FIFOs). A socket file or a device node cannot be carried: it is refused
/// by name rather than silently left behind.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<u64> {
    let meta = src.symlink_metadata()?;
    let kind = meta.file_type();
    if kind.is_fifo() {
        nix::unistd::mkfifo(
            dst,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )?;
        fs::set_permissions(
            dst,
            fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
        )?;
        return Ok(0);
    }
    let unsupported = if kind.is_socket() {
        Some("a socket file")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device node")
    } else {
        None
    };
    if let Some(what) = unsupported {
        return Err(io::Error::other(format!(
            "`{}` is {what}, which a checkpoint cannot carry; keep it out of the included path",
            src.display()
        )));
    }
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
        return Ok(0);
    }
    if meta.is_dir() {
        fs::create_dir_all(dst)?;
        let mut bytes = 0;
        for child in fs::read_dir(src)? {
            let child = child?;
            bytes += copy_tree(&child.path(), &dst.join(child.file_name()))?;
        }
        fs::set_permissions(
            dst,
            fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
        )?;
        return Ok(bytes);
    }
    if meta.is_file() {
        return fs::copy(src, dst);
    }
    Ok(0)
}

/// Checks that every path the archive carries is one this launcher includes.
///
/// # Errors
/// [`IncludeError::NotAllowed`] for the first that is not.
pub fn check_allowed(manifest: &Manifest, allowed: &[PathBuf]) -> Result<(), IncludeError> {
    for path in &manifest.included_paths {
        if !allowed.iter().any(|a| a == Path::new(path)) {
            return Err(IncludeError::NotAllowed(path.clone()));
        }
    }
    Ok(())
}

/// Puts the verified included contents from `staging/include/N` back at their paths: the
/// path's current contents are replaced by the archive's, then symlinks are made from the
/// manifest. Call only after [`check_allowed`] and full verification.
///
/// # Errors
/// [`IncludeError::Copy`] naming the path that failed.
pub fn put_back(manifest: &Manifest, staging: &Path) -> Result<(), IncludeError> {
    for (index, path) in manifest.included_paths.iter().enumerate() {
        let path = PathBuf::from(path);
        let prefix = format!("include/{index}");
        let Some(root) = manifest.entry(&prefix) else {
            continue;
        };
        let fail = |source| IncludeError::Copy {
            path: path.clone(),
            source,
        };
        match root.kind {
            EntryKind::Dir => {
                fs::create_dir_all(&path).map_err(fail)?;
                for child in fs::read_dir(&path).map_err(fail)? {
                    let child = child.map_err(fail)?.path();
                    let removed = if child
                        .symlink_metadata()
                        .map(|m| m.is_dir())
                        .unwrap_or(false)
                    {
                        fs::remove_dir_all(&child)
                    } else {
                        fs::remove_file(&child)
                    };
                    removed.map_err(fail)?;
                }
                let source = staging.join(&prefix);
                for child in fs::read_dir(&source).map_err(fail)? {
                    let child = child.map_err(fail)?;
                    copy_tree(&child.path(), &path.join(child.file_name())).map_err(fail)?;
                }
            }
            EntryKind::File => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(fail)?;
                }
                fs::copy(staging.join(&prefix), &path).map_err(fail)?;
            }
            EntryKind::Fifo => {
                let _ = fs::remove_file(&path);
                copy_tree(&staging.join(&prefix), &path).map_err(fail)?;
            }
            EntryKind::Symlink => {}
        }
        // Modes from the manifest (staging files were created 0600), then symlinks.
        for entry in manifest
            .entries
            .iter()
            .filter(|e| e.path == prefix || e.path.starts_with(&format!("{prefix}/")))
        {
            let relative = entry.path[prefix.len()..].trim_start_matches('/');
            let target = if relative.is_empty() {
                path.clone()
            } else {
                path.join(relative)
            };
            match entry.kind {
                EntryKind::Symlink => {
                    let _ = fs::remove_file(&target);
                    std::os::unix::fs::symlink(entry.link.as_deref().unwrap_or(""), &target)
                        .map_err(fail)?;
                }
                EntryKind::File | EntryKind::Dir | EntryKind::Fifo => {
                    fs::set_permissions(&target, fs::Permissions::from_mode(entry.mode))
                        .map_err(fail)?;
                }
            }
        }
    }
    Ok(())
}
