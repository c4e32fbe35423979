//! The archive manifest and the checks every reader applies before trusting an archive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Name of the archive's first entry.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Format version this build writes and reads.
pub const ARCHIVE_FORMAT_VERSION: u32 = 1;
/// A manifest larger than this is refused before parsing (it lists entries, not data: about
/// 250 bytes each, so some 250 000 files of included paths).
pub const MANIFEST_SIZE_LIMIT: u64 = 64 * 1024 * 1024;
/// Most entries a manifest may list (a checkpoint has a few dozen CRIU images plus the files
/// of its included paths).
pub const ENTRY_LIMIT: usize = 1_000_000;

/// What a checkpoint archive contains and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Unique id of this checkpoint (also the migration id).
    pub id: String,
    /// When the checkpoint was taken (RFC 3339, UTC).
    pub created: String,
    /// Source pod, namespace, node and container, when the launcher knows them (from the
    /// downward API environment: POD_NAME, POD_NAMESPACE, NODE_NAME, CONTAINER_NAME).
    #[serde(default)]
    pub source: BTreeMap<String, String>,
    pub criu_version: String,
    pub kernel: String,
    /// `std::env::consts::ARCH` of the source (x86_64, aarch64, ...).
    pub arch: String,
    /// SHA-256 over the sorted CPU flags of the source, to warn about CPU feature mismatch.
    pub cpu_flags_digest: String,
    /// The app's root PID (its session and process group id) and every PID of its tree.
    pub app_root_pid: i32,
    pub app_pids: Vec<i32>,
    /// The command the app was started with.
    pub command: Vec<String>,
    /// Pipe inodes of the app's stdout and stderr at the source, which CRIU names
    /// `pipe:[INODE]`; the restoring launcher re-attaches its own pipes in their place.
    pub stdout_pipe: Option<u64>,
    pub stderr_pipe: Option<u64>,
    /// Absolute paths whose contents travel with the checkpoint.
    pub included_paths: Vec<String>,
    /// Every entry after the manifest, in archive order.
    pub entries: Vec<Entry>,
    /// Milliseconds since the Unix epoch when the app was frozen (for downtime).
    pub frozen_at_ms: u64,
    /// Per-phase durations in milliseconds (dump, snapshot, hash, ...).
    pub timings_ms: BTreeMap<String, u64>,
}

/// One archive entry after the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path inside the archive (see [`validate_entry_path`]).
    pub path: String,
    pub kind: EntryKind,
    /// Size in bytes (regular files; 0 otherwise).
    pub size: u64,
    /// Hex SHA-256 of the contents (regular files); of the link target (symlinks).
    #[serde(default)]
    pub sha256: String,
    /// Permission bits.
    pub mode: u32,
    /// Link target (symlinks only); must stay inside its included path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Numeric owner and group (entries of included paths; CRIU's images carry their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Extended attributes, name to hex value (entries of included paths), POSIX ACLs
    /// (`system.posix_acl_access`, `system.posix_acl_default`) among them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

/// Whether a checkpoint carries extended attribute `name`: the app's own (`user.*`) and POSIX
/// ACLs. Never `security.*` (file capabilities grant privileges as setuid bits do; SELinux and
/// other LSM labels belong to the node and the pod, and setting them needs privileges a pod
/// must not have) nor `trusted.*` (privileged).
pub fn is_carried_xattr(name: &str) -> bool {
    name.starts_with("user.")
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}
/// Longest extended attribute value the kernel accepts (XATTR_SIZE_MAX).
pub const XATTR_VALUE_LIMIT: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A named pipe in an included path, recreated empty: a FIFO holds no data at rest (what
    /// was in flight in it belongs to the processes holding it open, which CRIU carries).
    Fifo,
}

/// Why an entry path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("entry path `{0}` is absolute")]
    Absolute(String),
    #[error("entry path `{0}` contains `..`")]
    ParentDir(String),
    #[error("entry path `{0}` is empty or has an empty, `.` or NUL component")]
    Malformed(String),
    #[error("entry path `{0}` is outside criu/ and include/N/")]
    OutsideLayout(String),
    #[error("symlink `{path}` points outside its included path (to `{target}`)")]
    SymlinkEscape { path: String, target: String },
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "the archive does not start with {MANIFEST_NAME} (found `{0}`); it is not a checkpoint archive or it is damaged"
    )]
    NotFirst(String),
    #[error("{MANIFEST_NAME} is {0} bytes, over the {MANIFEST_SIZE_LIMIT}-byte limit")]
    TooLarge(u64),
    #[error("{MANIFEST_NAME} is not valid")]
    Parse(#[source] serde_json::Error),
    #[error(
        "archive format version {found} is not supported by this launcher (it reads version {ARCHIVE_FORMAT_VERSION}); use the same restore-launcher version on both sides"
    )]
    Version { found: u32 },
    #[error(
        "the checkpoint was taken on {found} but this machine is {expected}; migrate to a node of the same architecture"
    )]
    Arch { found: String, expected: String },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("entry `{0}` is listed twice in the manifest")]
    Duplicate(String),
    #[error("included path `{0}` is not absolute")]
    IncludedNotAbsolute(String),
    #[error("entry `{0}` is a FIFO outside the included paths, or has contents")]
    FifoOutsideInclude(String),
    #[error("the manifest lists {0} entries, over the limit of {ENTRY_LIMIT}")]
    TooManyEntries(usize),
    #[error(
        "entry `{path}` has the setuid or setgid bit (mode {mode:o}); a checkpoint never carries them"
    )]
    SetId { path: String, mode: u32 },
    #[error("entry `{path}` lies below the symlink `{link}`")]
    BelowSymlink { path: String, link: String },
    #[error("entry `{path}` carries the extended attribute `{name}`, which {why}")]
    Xattr {
        path: String,
        name: String,
        why: &'static str,
    },
}

/// Checks that `path` is a safe relative archive path in the archive's layout: `criu/NAME` or
/// `include/N[/...]` with N an index into `included`, no absolute path, no `..`, no empty or
/// `.` component.
///
/// # Errors
/// The [`PathError`] naming what is wrong.
pub fn validate_entry_path(path: &str, included: usize) -> Result<(), PathError> {
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.into()));
    }
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    for part in &parts {
        match *part {
            ".." => return Err(PathError::ParentDir(path.into())),
            "" | "." => return Err(PathError::Malformed(path.into())),
            p if p.contains('\0') => return Err(PathError::Malformed(path.into())),
            _ => {}
        }
    }
    let in_layout = match parts.as_slice() {
        ["criu", _name] => true,
        ["include", index, ..] => index.parse::<usize>().is_ok_and(|i| i < included),
        _ => false,
    };
    if in_layout {
        Ok(())
    } else {
        Err(PathError::OutsideLayout(path.into()))
    }
}

/// Longest symlink target an archive may carry (Linux's PATH_MAX): resolving links costs
/// time in their length, on the target, while the app is frozen.
pub const LINK_LIMIT: usize = 4096;

/// Checks that symlink `path` (under `include/N/`) with target `target` resolves inside
/// `include/N/`: relative, and never climbing above its included root. The included root
/// itself is never a symlink (`include/N -> .` would point its path at its parent
/// directory), and a symlink's path has no trailing slash (which would shift its depth).
fn validate_symlink(path: &str, target: &str) -> Result<(), PathError> {
    let escape = || PathError::SymlinkEscape {
        path: path.into(),
        target: target.into(),
    };
    if target.starts_with('/')
        || target.len() > LINK_LIMIT
        || path.ends_with('/')
        || path.split('/').count() < 3
    {
        return Err(escape());
    }
    // Depth of the link's directory below include/N/.
    let mut depth = path.split('/').count().saturating_sub(3) as i64;
    for part in target.split('/') {
        match part {
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(escape());
                }
            }
            "" | "." => {}
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Links followed while resolving one symlink before it counts as a loop (Linux's own limit).
const MAX_LINK_HOPS: usize = 40;

/// Resolves the symlink at `path` (`include/N/…`) to `target` as the kernel would once every
/// listed symlink exists, following the other symlinks of the archive (`links`, by entry path)
/// on the way: a chain such as `a/b/s -> ../..` plus `t -> a/b/s/../..` is an escape although
/// each link alone stays inside. Paths not in the archive do not exist after the put-back
/// (the included path's contents are replaced), so they cannot redirect anything.
///
/// # Errors
/// [`PathError::SymlinkEscape`] when any step leaves `include/N`, or the links loop.
fn resolve_within(
    path: &str,
    target: &str,
    links: &std::collections::BTreeMap<&str, &str>,
) -> Result<(), PathError> {
    let escape = || PathError::SymlinkEscape {
        path: path.into(),
        target: target.into(),
    };
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    // `full` is the path reached so far, `include/N/...`; `depth` how far below the root.
    let root_len = parts.iter().take(2).map(|p| p.len()).sum::<usize>() + 1;
    let mut full = parts[..parts.len().saturating_sub(1)].join("/");
    let mut depth = parts.len().saturating_sub(3);
    let mut pending: std::collections::VecDeque<&str> = target.split('/').collect();
    let (mut hops, mut steps) = (0, 0);
    while let Some(part) = pending.pop_front() {
        // Bounded work whatever the archive: at most a path's length of steps in all.
        steps += 1;
        if steps > LINK_LIMIT {
            return Err(escape());
        }
        match part {
            "" | "." => {}
            ".." => {
                if depth == 0 {
                    return Err(escape());
                }
                depth -= 1;
                full.truncate(full.rfind('/').unwrap_or(root_len).max(root_len));
            }
            name => {
                let before = full.len();
                full.push('/');
                full.push_str(name);
                if let Some(next) = links.get(full.as_str()) {
                    hops += 1;
                    if hops > MAX_LINK_HOPS || next.starts_with('/') {
                        return Err(escape());
                    }
                    full.truncate(before);
                    for step in next.split('/').rev() {
                        pending.push_front(step);
                    }
                } else {
                    depth += 1;
                }
            }
        }
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates a manifest read from an archive.
    ///
    /// # Errors
    /// Any [`ManifestError`]: unparseable, wrong version or architecture, unsafe entry paths,
    /// duplicate entries, symlinks that escape.
    pub fn from_json(bytes: &[u8], this_arch: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(ManifestError::Parse)?;
        manifest.validate(this_arch)?;
        Ok(manifest)
    }

    /// The checks of [`Manifest::from_json`] on an already parsed manifest.
    ///
    /// # Errors
    /// See [`Manifest::from_json`].
    pub fn validate(&self, this_arch: &str) -> Result<(), ManifestError> {
        if self.format_version != ARCHIVE_FORMAT_VERSION {
            return Err(ManifestError::Version {
                found: self.format_version,
            });
        }
        if self.arch != this_arch {
            return Err(ManifestError::Arch {
                found: self.arch.clone(),
                expected: this_arch.into(),
            });
        }
        for path in &self.included_paths {
            if !path.starts_with('/') {
                return Err(ManifestError::IncludedNotAbsolute(path.clone()));
            }
        }
        if self.entries.len() > ENTRY_LIMIT {
            return Err(ManifestError::TooManyEntries(self.entries.len()));
        }
        let links: std::collections::BTreeMap<&str, &str> = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .map(|e| {
                (
                    e.path.trim_end_matches('/'),
                    e.link.as_deref().unwrap_or(""),
                )
            })
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.entries {
            // A directory's setgid bit only makes new files inherit its group (fsGroup
            // emptyDirs have it): kept. Set-id bits on anything else grant privileges.
            let set_id = if entry.kind == EntryKind::Dir {
                0o4000
            } else {
                0o6000
            };
            if entry.mode & set_id != 0 {
                return Err(ManifestError::SetId {
                    path: entry.path.clone(),
                    mode: entry.mode,
                });
            }
            if !entry.path.starts_with("include/") && (entry.uid.is_some() || entry.gid.is_some()) {
                return Err(ManifestError::Xattr {
                    path: entry.path.clone(),
                    name: "(owner)".into(),
                    why: "only files of included paths may carry",
                });
            }
            for (name, value) in &entry.xattrs {
                let why = if !is_carried_xattr(name) {
                    Some("is not one a checkpoint carries (user.* and POSIX ACLs only)")
                } else if !entry.path.starts_with("include/") {
                    Some("only files of included paths may carry")
                } else if entry.kind == EntryKind::Symlink {
                    Some("a symlink cannot carry")
                } else if name.is_empty() || name.len() > 255 || name.contains('\0') {
                    Some("is not a valid attribute name")
                } else if value.len() > 2 * XATTR_VALUE_LIMIT || hex::decode(value).is_err() {
                    Some("has a value that is not hex of at most 64 KiB")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(ManifestError::Xattr {
                        path: entry.path.clone(),
                        name: name.clone(),
                        why,
                    });
                }
            }
            // No entry may be written through a link: nothing lies below a listed symlink.
            let mut prefix = entry.path.trim_end_matches('/');
            while let Some((parent, _)) = prefix.rsplit_once('/') {
                if links.contains_key(parent) {
                    return Err(ManifestError::BelowSymlink {
                        path: entry.path.clone(),
                        link: parent.into(),
                    });
                }
                prefix = parent;
            }
            validate_entry_path(&entry.path, self.included_paths.len())?;
            if !seen.insert(entry.path.trim_end_matches('/')) {
                return Err(ManifestError::Duplicate(entry.path.clone()));
            }
            if entry.kind == EntryKind::Fifo
                && (!entry.path.starts_with("include/") || entry.size != 0)
            {
                return Err(ManifestError::FifoOutsideInclude(entry.path.clone()));
            }
            if entry.kind == EntryKind::Symlink {
                let target = entry.link.as_deref().unwrap_or("");
                if !entry.path.starts_with("include/") || entry.path.ends_with('/') {
                    return Err(PathError::SymlinkEscape {
                        path: entry.path.clone(),
                        target: target.into(),
                    }
                    .into());
                }
                validate_symlink(&entry.path, target)?;
                resolve_within(&entry.path, target, &links)?;
            }
        }
        Ok(())
    }

    /// The entry listed for `path`, if any. A linear scan: to look up every entry of an
    /// archive, build an [`Manifest::index`] once.
    pub fn entry(&self, path: &str) -> Option<&Entry> {
        let path = path.trim_end_matches('/');
        self.entries
            .iter()
            .find(|e| e.path.trim_end_matches('/') == path)
    }

    /// Every entry by its path (without a trailing slash), for lookups in constant time: a
    /// reader looks up each of up to [`ENTRY_LIMIT`] entries while the app is frozen.
    pub fn index(&self) -> std::collections::HashMap<&str, &Entry> {
        self.entries
            .iter()
            .map(|e| (e.path.trim_end_matches('/'), e))
            .collect()
    }

    /// Total bytes of regular-file entries.
    pub fn payload_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format_version: ARCHIVE_FORMAT_VERSION,
            id: "ck-1".into(),
            created: "2026-11-22T00:00:00Z".into(),
            source: BTreeMap::new(),
            criu_version: "4.1.1".into(),
            kernel: "6.18".into(),
            arch: "x86_64".into(),
            cpu_flags_digest: String::new(),
            app_root_pid: 1000,
            app_pids: vec![1000],
            command: vec!["app".into()],
            stdout_pipe: Some(1),
            stderr_pipe: Some(2),
            included_paths: vec!["/data".into()],
            entries: vec![Entry {
                path: "criu/core-1000.img".into(),
                kind: EntryKind::File,
                size: 3,
                sha256: "00".into(),
                mode: 0o600,
                link: None,
                uid: None,
                gid: None,
                xattrs: BTreeMap::new(),
            }],
            frozen_at_ms: 0,
            timings_ms: BTreeMap::new(),
        }
    }

    #[test]
    fn layout_paths_are_accepted() {
        for ok in [
            "criu/pages-1.img",
            "include/0",
            "include/0/",
            "include/0/a/b.txt",
        ] {
            assert_eq!(validate_entry_path(ok, 1), Ok(()), "{ok}");
        }
    }

    #[test]
    fn unsafe_paths_are_refused_with_the_reason() {
        assert!(matches!(
            validate_entry_path("/etc/passwd", 1),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            validate_entry_path("include/0/../../etc", 1),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_entry_path("criu/../x", 1),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_entry_path("include//x", 1),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            validate_entry_path("criu/./x", 1),
            Err(PathError::Malformed(_))
        ));
        assert!(matches!(
            validate_entry_path("other/x", 1),
            Err(PathError::OutsideLayout(_))
        ));
        assert!(matches!(
            validate_entry_path("include/1/x", 1),
            Err(PathError::OutsideLayout(_))
        ));
        assert!(matches!(
            validate_entry_path("criu/a/b", 1),
            Err(PathError::OutsideLayout(_))
        ));
    }

    #[test]
    fn symlinks_must_stay_inside_their_included_path() {
        assert_eq!(validate_symlink("include/0/a/link", "../b"), Ok(()));
        assert_eq!(validate_symlink("include/0/link", "sub/file"), Ok(()));
        assert!(validate_symlink("include/0/link", "../x").is_err());
        assert!(validate_symlink("include/0/a/link", "../../x").is_err());
        assert!(validate_symlink("include/0/link", "/etc/shadow").is_err());
        assert!(validate_symlink("include/0/a/link", "b/../../../x").is_err());
        // The included root is never a link: `include/0 -> .` would make its path point at
        // the directory holding it (`/data -> /`).
        assert!(validate_symlink("include/0", ".").is_err());
        assert!(validate_symlink("include/0", "etc").is_err());
        // A trailing slash would count one level too many.
        assert!(validate_symlink("include/0/l/", "../x").is_err());
        // Nor may a target be longer than a path can be.
        assert!(validate_symlink("include/0/l", &"a/".repeat(LINK_LIMIT)).is_err());
    }

    #[test]
    fn a_manifest_whose_included_root_or_a_slashed_path_is_a_symlink_is_refused() {
        for (path, target) in [
            ("include/0", "etc"),
            ("include/0", "."),
            ("include/0/l/", "../x"),
        ] {
            let mut m = manifest();
            m.entries.retain(|e| !e.path.starts_with("include/0"));
            m.entries.push(link(path, target));
            let error = m.validate("x86_64").unwrap_err();
            assert!(
                matches!(&error, ManifestError::Path(PathError::SymlinkEscape { .. })),
                "{path} -> {target}: {error}"
            );
        }
    }

    #[test]
    fn manifests_for_other_architectures_or_versions_are_refused() {
        let json = serde_json::to_vec(&manifest()).unwrap();
        assert!(Manifest::from_json(&json, "x86_64").is_ok());
        let error = Manifest::from_json(&json, "aarch64").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("taken on x86_64 but this machine is aarch64"),
            "{error}"
        );
        let mut future = manifest();
        future.format_version = 99;
        let error =
            Manifest::from_json(&serde_json::to_vec(&future).unwrap(), "x86_64").unwrap_err();
        assert!(matches!(error, ManifestError::Version { found: 99 }));
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink,
            size: 0,
            sha256: String::new(),
            mode: 0o777,
            link: Some(target.into()),
            uid: None,
            gid: None,
            xattrs: BTreeMap::new(),
        }
    }

    #[test]
    fn a_chain_of_symlinks_that_escapes_together_is_refused() {
        // Each link alone stays inside include/0; together `t` leads two levels above it.
        let mut chain = manifest();
        chain.entries.push(link("include/0/a/b/s", "../.."));
        chain.entries.push(link("include/0/t", "a/b/s/../.."));
        let error = chain.validate("x86_64").unwrap_err();
        assert!(
            matches!(&error, ManifestError::Path(PathError::SymlinkEscape { path, .. }) if path == "include/0/t"),
            "{error}"
        );
        // A chain that stays inside is fine, and so is a link through a link.
        let mut inside = manifest();
        inside.entries.push(link("include/0/a/b/s", "../.."));
        inside.entries.push(link("include/0/t", "a/b/s/a"));
        assert!(inside.validate("x86_64").is_ok());
        // Links that point at each other loop: refused, not followed for ever.
        let mut looping = manifest();
        looping.entries.push(link("include/0/x", "y"));
        looping.entries.push(link("include/0/y", "x"));
        assert!(looping.validate("x86_64").is_err());
    }

    #[test]
    fn only_plain_extended_attributes_of_included_files_are_accepted() {
        let with = |path: &str, name: &str, value: &str| {
            let mut m = manifest();
            m.entries.push(Entry {
                path: path.into(),
                kind: EntryKind::File,
                size: 0,
                sha256: String::new(),
                mode: 0o640,
                link: None,
                uid: Some(1000),
                gid: Some(1000),
                xattrs: [(name.to_string(), value.to_string())].into(),
            });
            m.validate("x86_64")
        };
        assert!(with("include/0/f", "user.origin", "6e6f64652d61").is_ok());
        assert!(with("include/0/f", "system.posix_acl_access", "02000000").is_ok());
        let refused = |result: Result<(), ManifestError>, says: &str| {
            let error = result.unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        };
        for name in [
            "security.capability",
            "security.selinux",
            "trusted.overlay.opaque",
        ] {
            refused(
                with("include/0/f", name, "00"),
                "not one a checkpoint carries",
            );
        }
        refused(
            with("criu/pages-1.img", "user.x", "00"),
            "only files of included paths",
        );
        refused(with("include/0/f", "user.x", "zz"), "not hex");
        refused(
            with("include/0/f", "user.x", &"00".repeat(XATTR_VALUE_LIMIT + 1)),
            "not hex of at most 64 KiB",
        );
    }

    #[test]
    fn setid_bits_entries_below_a_symlink_and_too_many_entries_are_refused() {
        let mut setuid = manifest();
        setuid.entries[0].mode = 0o4755;
        let error = setuid.validate("x86_64").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("setuid or setgid bit (mode 4755)"),
            "{error}"
        );
        let mut below = manifest();
        below.entries.push(link("include/0/d", "sub"));
        below.entries.push(Entry {
            path: "include/0/d/f".into(),
            kind: EntryKind::File,
            size: 0,
            sha256: String::new(),
            mode: 0o644,
            link: None,
            uid: None,
            gid: None,
            xattrs: BTreeMap::new(),
        });
        assert!(matches!(
            below.validate("x86_64"),
            Err(ManifestError::BelowSymlink { .. })
        ));
        let mut many = manifest();
        many.entries = (0..=ENTRY_LIMIT)
            .map(|i| Entry {
                path: format!("criu/{i}.img"),
                kind: EntryKind::File,
                size: 0,
                sha256: String::new(),
                mode: 0o600,
                link: None,
                uid: None,
                gid: None,
                xattrs: BTreeMap::new(),
            })
            .collect();
        assert!(matches!(
            many.validate("x86_64"),
            Err(ManifestError::TooManyEntries(_))
        ));
    }

    #[test]
    fn duplicate_and_escaping_entries_are_refused() {
        let mut dup = manifest();
        dup.entries.push(dup.entries[0].clone());
        assert!(matches!(
            dup.validate("x86_64"),
            Err(ManifestError::Duplicate(_))
        ));
        let mut link = manifest();
        link.entries.push(Entry {
            path: "include/0/evil".into(),
            kind: EntryKind::Symlink,
            size: 0,
            sha256: String::new(),
            mode: 0o777,
            link: Some("../../../../etc".into()),
            uid: None,
            gid: None,
            xattrs: BTreeMap::new(),
        });
        assert!(matches!(
            link.validate("x86_64"),
            Err(ManifestError::Path(PathError::SymlinkEscape { .. }))
        ));
    }
}
