//! `--include PATH`: local paths (emptyDir, writable directories) whose contents travel with
//! the checkpoint. At checkpoint they are copied while the app is frozen, so files the app has
//! open match what CRIU recorded (CRIU refuses to restore an open file whose size changed).
//! At restore they are put back, byte for byte, before CRIU runs.
//!
//! An archive may only write into paths the restoring launcher was itself told to include:
//! the manifest cannot choose where files land.
//!
//! Metadata travels exactly: the permission bits, the numeric owner and group, and the extended
//! attributes (POSIX ACLs are the `system.posix_acl_*` ones) of every file are taken from the
//! original at snapshot time ([`Attributes`]), listed in the manifest, applied after the
//! contents are put back, and read back to check them, as the contents' hashes are checked.
//! File capabilities (`security.capability`) and setuid/setgid bits are never carried.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use migrate_format::{Entry, EntryKind, Manifest, is_carried_xattr};

#[derive(Debug, thiserror::Error)]
pub enum IncludeError {
    #[error("included path `{}` cannot be copied{}", path.display(), unreadable_hint(source))]
    Copy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the archive carries `{0}`, which this launcher was not told to include; start it with the same --include options as the source"
    )]
    NotAllowed(String),
    #[error("`{}` of an included path cannot get its owner {uid}:{gid} back: {fix}", path.display())]
    Owner {
        path: PathBuf,
        uid: u32,
        gid: u32,
        fix: String,
    },
    #[error("`{}` of an included path arrived with {what}; the checkpoint recorded {expected}", path.display())]
    Mismatch {
        path: PathBuf,
        what: String,
        expected: String,
    },
}

/// What to add when a root launcher without CAP_DAC_OVERRIDE meets a file of another user.
fn unreadable_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied && nix::unistd::geteuid().is_root() {
        " (the launcher runs as root without CAP_DAC_OVERRIDE, and the files belong to the app's user with modes that keep others out: add DAC_OVERRIDE to the container's securityContext.capabilities.add)"
    } else {
        ""
    }
}

/// Owner, group and extended attributes of one file of an included path, as the snapshot
/// found them on the original.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub uid: u32,
    pub gid: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// [`Attributes`] by archive path (`include/N/...`).
pub type Recorded = BTreeMap<String, Attributes>;

fn read_xattrs(path: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    carried_xattrs(path, xattr::list(path), |name| xattr::get(path, name))
}

/// The extended attributes a checkpoint carries, from their names `listed` and a `get` for
/// each; a file system without extended attributes has none.
fn carried_xattrs(
    path: &Path,
    listed: io::Result<xattr::XAttrs>,
    get: impl Fn(&str) -> io::Result<Option<Vec<u8>>>,
) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let mut xattrs = BTreeMap::new();
    let names = match listed {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(xattrs),
        Err(e) => return Err(e),
    };
    for name in names {
        let name = name.to_string_lossy().into_owned();
        if !is_carried_xattr(&name) {
            // Node- and pod-owned labels (security.selinux) are the target's to set; others
            // (file capabilities, trusted.*) grant privileges: named in the log, not carried.
            if name == "security.selinux" {
                tracing::debug!(path = %path.display(), %name, "extended attribute left to the target");
            } else {
                tracing::warn!(path = %path.display(), %name, "included file's extended attribute is not carried (only user.* and POSIX ACLs are)");
            }
            continue;
        }
        if let Some(value) = get(&name)? {
            xattrs.insert(name, value);
        }
    }
    Ok(xattrs)
}

/// Writes the recorded attributes into the manifest's entries.
pub fn annotate(entries: &mut [Entry], recorded: &Recorded) {
    for entry in entries {
        if let Some(attributes) = recorded.get(&entry.path) {
            entry.uid = Some(attributes.uid);
            entry.gid = Some(attributes.gid);
            entry.xattrs = attributes
                .xattrs
                .iter()
                .map(|(name, value)| (name.clone(), hex::encode(value)))
                .collect();
        }
    }
}

/// Copies each of `paths` to `dest/include/N` (N its index), keeping modes and symlinks, and
/// records every file's owner, group and extended attributes. A path that does not exist is
/// recorded as absent (nothing copied).
///
/// Everything is read through descriptors, never by path twice: the included path is opened
/// without following any symlink on the way, each entry below it is opened relative to its
/// directory's descriptor with `O_NOFOLLOW`, and its type, mode, owner and extended
/// attributes are read from the descriptor its contents are copied from. A file swapped for a
/// symlink or a FIFO while it is copied (by a process the freeze did not stop) is refused, not
/// followed, so nothing outside the included path is ever read.
///
/// # Errors
/// [`IncludeError::Copy`] naming the path that failed.
pub fn snapshot(paths: &[PathBuf], dest: &Path) -> Result<(u64, Recorded), IncludeError> {
    let mut bytes = 0;
    let mut recorded = Recorded::new();
    for (index, path) in paths.iter().enumerate() {
        let fail = |source| IncludeError::Copy {
            path: path.clone(),
            source,
        };
        let Ok(meta) = path.symlink_metadata() else {
            tracing::warn!(path = %path.display(), "included path does not exist; nothing of it is checkpointed");
            continue;
        };
        // The target refuses an included root that is a link (it would point the path
        // elsewhere there): say so here, before anything is frozen for nothing.
        if meta.file_type().is_symlink() {
            return Err(fail(io::Error::other(
                "it is a symlink, which cannot be the root of an included path; include the path it points to",
            )));
        }
        let root = open_included(path).map_err(fail)?;
        let target = dest.join("include").join(index.to_string());
        bytes += copy_opened(
            root,
            path,
            &target,
            &format!("include/{index}"),
            &mut recorded,
        )
        .map_err(fail)?;
    }
    Ok((bytes, recorded))
}

/// Opens an included path without following a symlink anywhere on the way (a directory of
/// the app's user swapped for a link would otherwise lead the launcher elsewhere).
fn open_included(path: &Path) -> io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
        Ok(fd) => Ok(fd),
        Err(nix::errno::Errno::ELOOP) => Err(io::Error::other(format!(
            "a directory on the way to it is a symlink; include the path it resolves to ({})",
            fs::canonicalize(path).map_or_else(|_| "unknown".into(), |p| p.display().to_string())
        ))),
        // Kernels before 5.6 (ENOSYS), or a seccomp profile that refuses the call (EPERM): the
        // last component is still never followed, the ones before it are.
        Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EPERM) => Ok(nix::fcntl::open(
            path,
            flags,
            nix::sys::stat::Mode::empty(),
        )?),
        Err(errno) => Err(errno.into()),
    }
}

/// Opens `name` in directory `dir` for reading without following it (`O_NONBLOCK`: a FIFO
/// opens at once, and a swapped-in one cannot hold the copy).
fn open_beneath(dir: &OwnedFd, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    Ok(nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?)
}

/// Copies the opened file, directory or FIFO `fd` (shown as `src`) to `dst`, recording its
/// attributes (and those of everything below it) under archive path `at`; all read from `fd`.
fn copy_opened(
    fd: OwnedFd,
    src: &Path,
    dst: &Path,
    at: &str,
    recorded: &mut Recorded,
) -> io::Result<u64> {
    use nix::sys::stat::SFlag;
    let file = fs::File::from(fd);
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let mode = meta.permissions().mode() & 0o7777;
    let attributes = |file: &fs::File| -> io::Result<Attributes> {
        Ok(Attributes {
            uid: meta.uid(),
            gid: meta.gid(),
            xattrs: carried_xattrs(src, xattr::FileExt::list_xattr(file), |name| {
                xattr::FileExt::get_xattr(file, name)
            })?,
        })
    };
    if let Some(what) = uncarried(kind) {
        return Err(cannot_carry(src, what));
    }
    recorded.insert(at.to_string(), attributes(&file)?);
    if kind.is_fifo() {
        nix::unistd::mkfifo(
            dst,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )?;
        fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
        return Ok(0);
    }
    if kind.is_file() {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut copy = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dst)?;
        let bytes = io::copy(&mut &file, &mut copy)?;
        copy.set_permissions(fs::Permissions::from_mode(mode))?;
        return Ok(bytes);
    }
    if !kind.is_dir() {
        return Err(io::Error::other(format!(
            "`{}` is not a file, directory, symlink or FIFO",
            src.display()
        )));
    }
    fs::create_dir_all(dst)?;
    let dir = OwnedFd::from(file);
    let mut names = Vec::new();
    let listed = nix::dir::Dir::from_fd(nix::unistd::dup(&dir)?)?;
    for entry in listed {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    names.sort();
    let mut bytes = 0;
    for name in names {
        let shown = src.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let (into, under) = (
            dst.join(std::ffi::OsStr::from_bytes(name.to_bytes())),
            format!("{at}/{}", name.to_string_lossy()),
        );
        let stat = nix::sys::stat::fstatat(
            &dir,
            name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            let link = nix::fcntl::readlinkat(&dir, name.as_c_str())?;
            std::os::unix::fs::symlink(&link, &into)?;
            recorded.insert(
                under,
                Attributes {
                    uid: stat.st_uid,
                    gid: stat.st_gid,
                    xattrs: BTreeMap::new(),
                },
            );
            continue;
        }
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFSOCK || kind == SFlag::S_IFCHR || kind == SFlag::S_IFBLK {
            let what = if kind == SFlag::S_IFSOCK {
                "a socket file"
            } else {
                "a device node"
            };
            return Err(cannot_carry(&shown, what));
        }
        let child = open_beneath(&dir, name.as_c_str()).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other(format!(
                    "`{}` became a symlink while it was being copied (something outside the frozen app changes the included path)",
                    shown.display()
                ))
            } else {
                e
            }
        })?;
        bytes += copy_opened(child, &shown, &into, &under, recorded)?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(bytes)
}

fn cannot_carry(src: &Path, what: &str) -> io::Error {
    io::Error::other(format!(
        "`{}` is {what}, which a checkpoint cannot carry; keep it out of the included path",
        src.display()
    ))
}

/// What a checkpoint cannot carry: socket files and device nodes.
fn uncarried(kind: fs::FileType) -> Option<&'static str> {
    if kind.is_socket() {
        Some("a socket file")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device node")
    } else {
        None
    }
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
    if let Some(what) = uncarried(kind) {
        return Err(cannot_carry(src, what));
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
                    // Unchanged modes are left alone: the included path itself may be a
                    // mount point (an emptyDir) this user may not chmod.
                    let current = target.symlink_metadata().map_err(fail)?.mode() & 0o7777;
                    if current != entry.mode {
                        fs::set_permissions(&target, fs::Permissions::from_mode(entry.mode))
                            .map_err(fail)?;
                    }
                }
            }
        }
        let entries: Vec<(&Entry, PathBuf)> = manifest
            .entries
            .iter()
            .filter(|e| e.path == prefix || e.path.starts_with(&format!("{prefix}/")))
            .map(|entry| {
                let relative = entry.path[prefix.len()..].trim_start_matches('/');
                let target = if relative.is_empty() {
                    path.clone()
                } else {
                    path.join(relative)
                };
                (entry, target)
            })
            .collect();
        for (entry, target) in &entries {
            apply_xattrs(entry, target).map_err(fail)?;
        }
        verify_attributes(&entries, false)?;
        // Owners last and deepest first: a directory handed to another user (mode 0700) may
        // no longer be entered by a launcher without CAP_DAC_OVERRIDE.
        for (entry, target) in entries.iter().rev() {
            apply_owner(entry, target)?;
        }
    }
    Ok(())
}

/// Gives `target` exactly the manifest's extended attributes (symlinks carry none): removes
/// others (a parent's default ACL puts one on every new file), sets the listed ones.
fn apply_xattrs(entry: &Entry, target: &Path) -> io::Result<()> {
    if entry.kind == EntryKind::Symlink {
        return Ok(());
    }
    for name in read_xattrs(target)?.keys() {
        if !entry.xattrs.contains_key(name) {
            xattr::remove(target, name)?;
        }
    }
    for (name, value) in &entry.xattrs {
        // validated as hex by Manifest::validate before anything is put back
        let value = hex::decode(value).map_err(io::Error::other)?;
        xattr::set(target, name, &value).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot set extended attribute `{name}` on `{}`: {e}",
                    target.display()
                ),
            )
        })?;
    }
    Ok(())
}

/// Gives `target` the manifest's owner and group, and checks that it has them.
fn apply_owner(entry: &Entry, target: &Path) -> Result<(), IncludeError> {
    let (Some(uid), Some(gid)) = (entry.uid, entry.gid) else {
        return Ok(());
    };
    let meta = target
        .symlink_metadata()
        .map_err(|source| IncludeError::Copy {
            path: target.to_path_buf(),
            source,
        })?;
    if (meta.uid(), meta.gid()) == (uid, gid) {
        return Ok(());
    }
    let changed = std::os::unix::fs::lchown(target, Some(uid), Some(gid));
    if let Err(error) = changed {
        let euid = nix::unistd::geteuid().as_raw();
        let fix = if euid == 0 {
            format!(
                "{error}; the launcher runs as root without CAP_CHOWN: add CHOWN to the container's securityContext.capabilities.add"
            )
        } else {
            format!(
                "{error}; the launcher runs as uid {euid}, which cannot give files to another user: run the container as uid {uid} (the user that owns the files at the source) or as root with CAP_CHOWN"
            )
        };
        return Err(IncludeError::Owner {
            path: target.to_path_buf(),
            uid,
            gid,
            fix,
        });
    }
    verify_attributes(&[(entry, target.to_path_buf())], true)
}

/// Reads back mode and extended attributes (and, with `owners`, owner and group) of each
/// entry's file and compares them with the manifest.
fn verify_attributes(entries: &[(&Entry, PathBuf)], owners: bool) -> Result<(), IncludeError> {
    for (entry, target) in entries {
        let read = |source| IncludeError::Copy {
            path: target.clone(),
            source,
        };
        let meta = target.symlink_metadata().map_err(read)?;
        let mismatch = |what: String, expected: String| IncludeError::Mismatch {
            path: target.clone(),
            what,
            expected,
        };
        if entry.kind != EntryKind::Symlink && meta.mode() & 0o7777 != entry.mode {
            return Err(mismatch(
                format!("mode {:o}", meta.mode() & 0o7777),
                format!("{:o}", entry.mode),
            ));
        }
        if owners {
            if let (Some(uid), Some(gid)) = (entry.uid, entry.gid) {
                if (meta.uid(), meta.gid()) != (uid, gid) {
                    return Err(mismatch(
                        format!("owner {}:{}", meta.uid(), meta.gid()),
                        format!("{uid}:{gid}"),
                    ));
                }
            }
        }
        if entry.kind != EntryKind::Symlink {
            let found: BTreeMap<String, String> = read_xattrs(target)
                .map_err(read)?
                .into_iter()
                .map(|(name, value)| (name, hex::encode(value)))
                .collect();
            if found != entry.xattrs {
                return Err(mismatch(
                    format!("extended attributes {:?}", found.keys().collect::<Vec<_>>()),
                    format!("{:?}", entry.xattrs.keys().collect::<Vec<_>>()),
                ));
            }
        }
    }
    Ok(())
}

/// Hostile manifests against the validator and the put-back together: whatever symlinks an
/// archive lists under an included path, one the validator accepts is put back only inside
/// that path, and nothing outside it changes.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const NAMES: &[&str] = &["a", "b", "c"];
    const STEPS: &[&str] = &["a", "b", "c", "..", ".", ""];

    /// `base/{a,b,c}/{a,b,c}` and the same inside `base/data` (the included path's parent), so
    /// that a link that escapes resolves to something that exists and is caught.
    fn scenery(base: &Path) {
        for top in [base.to_path_buf(), base.join("data")] {
            for a in NAMES {
                for b in NAMES {
                    fs::create_dir_all(top.join(a).join(b)).unwrap();
                }
            }
        }
    }

    /// Every path under `dir`, with its kind and link target: what must not change.
    fn listing(dir: &Path, skip: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(next) = pending.pop() {
            let Ok(children) = fs::read_dir(&next) else {
                continue;
            };
            for child in children.flatten() {
                let path = child.path();
                if path == skip {
                    continue;
                }
                let meta = path.symlink_metadata().unwrap();
                let link = fs::read_link(&path).ok();
                found.push(format!(
                    "{} {:?} {link:?}",
                    path.display(),
                    meta.file_type()
                ));
                if meta.is_dir() {
                    pending.push(path);
                }
            }
        }
        found.sort();
        found
    }

    fn entry(path: String, kind: EntryKind, link: Option<String>) -> Entry {
        Entry {
            path,
            kind,
            size: 0,
            sha256: String::new(),
            mode: if kind == EntryKind::Symlink {
                0o777
            } else {
                0o755
            },
            link,
            uid: None,
            gid: None,
            xattrs: BTreeMap::new(),
        }
    }

    fn a_path() -> impl Strategy<Value = Vec<&'static str>> {
        proptest::collection::vec(proptest::sample::select(NAMES), 0..3)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn accepted_symlinks_are_put_back_inside_their_included_path(
            dirs in proptest::collection::vec(a_path(), 0..4),
            links in proptest::collection::vec(
                (a_path(), proptest::sample::select(NAMES), proptest::collection::vec(proptest::sample::select(STEPS), 1..6), any::<bool>()),
                1..4,
            ),
            root_is_link in any::<bool>(),
        ) {
            let base = tempfile::tempdir().unwrap();
            let base = base.path().canonicalize().unwrap();
            scenery(&base);
            let included = base.join("data/inc");
            let staging = base.join("staging");
            let mut entries = Vec::new();
            if root_is_link {
                entries.push(entry("include/0".into(), EntryKind::Symlink, Some(links[0].2.join("/"))));
            } else {
                entries.push(entry("include/0".into(), EntryKind::Dir, None));
                fs::create_dir_all(staging.join("include/0")).unwrap();
            }
            for dir in &dirs {
                let mut at = String::from("include/0");
                for part in dir {
                    at = format!("{at}/{part}");
                    if !entries.iter().any(|e| e.path == at) {
                        entries.push(entry(at.clone(), EntryKind::Dir, None));
                        fs::create_dir_all(staging.join(&at)).unwrap();
                    }
                }
            }
            for (dir, name, target, slash) in &links {
                let mut at = ["include/0".to_string()].into_iter().chain(dir.iter().map(|p| p.to_string())).collect::<Vec<_>>().join("/");
                at = format!("{at}/{name}{}", if *slash { "/" } else { "" });
                if entries.iter().any(|e| e.path.trim_end_matches('/') == at.trim_end_matches('/')) {
                    continue;
                }
                entries.push(entry(at, EntryKind::Symlink, Some(target.join("/"))));
            }
            let manifest: Manifest = serde_json::from_value(serde_json::json!({
                "format_version": migrate_format::ARCHIVE_FORMAT_VERSION, "id": "ck-fuzz",
                "created": "2026-12-07T00:00:00Z", "source": {}, "criu_version": "4.2",
                "kernel": "6.18", "arch": crate::sysinfo::arch(), "cpu_flags_digest": "",
                "app_root_pid": 1000, "app_pids": [1000], "command": ["app"], "stdout_pipe": null,
                "stderr_pipe": null, "included_paths": [included.to_string_lossy()],
                "entries": entries, "frozen_at_ms": 0, "timings_ms": {}
            })).unwrap();
            if manifest.validate(crate::sysinfo::arch()).is_err() {
                // Refused: nothing is put back.
                return Ok(());
            }
            let before = listing(&base, &base.join("data/inc"));
            let _ = put_back(&manifest, &staging);
            prop_assert_eq!(listing(&base, &base.join("data/inc")), before, "something outside the included path changed");
            // Every link put back resolves inside the included path (or nowhere).
            for e in manifest.entries.iter().filter(|e| e.kind == EntryKind::Symlink) {
                let put = included.join(e.path.trim_start_matches("include/0").trim_start_matches('/'));
                if let Ok(resolved) = put.canonicalize() {
                    prop_assert!(resolved.starts_with(&included), "{} -> {:?} resolves to {}", e.path, e.link, resolved.display());
                }
            }
        }
    }
}
