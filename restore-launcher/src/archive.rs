//! The checkpoint archive on the wire: writing one `.tar.zst` stream from a checkpoint
//! directory, and reading one back into a staging directory with every check done before
//! anything in it is used.
//!
//! A checkpoint directory holds `criu/` (CRIU images) and `include/N/` (snapshots of the
//! included paths). The stream is `manifest.json` first, then those entries in manifest order.
//!
//! Reading trusts nothing: the manifest must come first and validate (version, architecture,
//! paths); every later entry must be listed in it, appear once, be a file, directory or
//! symlink of the listed kind, and have exactly the listed size and SHA-256; the stream must
//! end cleanly (zstd frame checksum) with every listed entry seen. Files are written only
//! inside the staging directory, with `O_EXCL|O_NOFOLLOW`, and symlinks are never created
//! there (they are recorded and made when included paths are put back), so no entry can
//! write through a link.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use migrate_format::{
    Entry, EntryKind, MANIFEST_NAME, MANIFEST_SIZE_LIMIT, Manifest, ManifestError,
};
use sha2::{Digest as _, Sha256};

/// zstd level: 1 keeps compression well above disk and network speed on one core.
const ZSTD_LEVEL: i32 = 1;

/// Why an archive was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "the archive is truncated or corrupt (the compressed stream or a tar header is damaged)"
    )]
    Stream(#[source] io::Error),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the archive is empty")]
    Empty,
    #[error("entry `{0}` is not listed in the manifest")]
    Unlisted(String),
    #[error("entry `{0}` appears twice")]
    Duplicate(String),
    #[error("entry `{path}` is a {found} but the manifest says {expected:?}")]
    Kind {
        path: String,
        found: String,
        expected: EntryKind,
    },
    #[error(
        "entry `{path}` is {found} bytes but the manifest says {expected}; the archive is damaged"
    )]
    Size {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("entry `{0}` fails its SHA-256 check; the archive is damaged or was altered")]
    Checksum(String),
    #[error(
        "the archive ends early: {missing} listed entries are missing (first: `{first}`); it is truncated"
    )]
    Missing { missing: usize, first: String },
    #[error("entry path is not UTF-8")]
    NotUtf8,
    #[error("cannot write `{}` while unpacking", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read `{}` of the checkpoint", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the archive to its output")]
    Output(#[source] io::Error),
}

/// Lists the entries of checkpoint directory `root` (`criu/` then `include/N/...`), hashing
/// every file. Directories come before their contents.
///
/// # Errors
/// [`ArchiveError::Read`] when a file cannot be read.
pub fn list_entries(root: &Path, included: usize) -> Result<Vec<Entry>, ArchiveError> {
    let mut entries = Vec::new();
    let criu = root.join("criu");
    let mut names: Vec<_> = read_dir_sorted(&criu)?;
    names.retain(|p| p.is_file());
    for path in names {
        entries.push(file_entry(root, &path)?);
    }
    for index in 0..included {
        let dir = root.join("include").join(index.to_string());
        if dir.symlink_metadata().is_ok() {
            walk(root, &dir, &mut entries)?;
        }
    }
    Ok(entries)
}

fn walk(root: &Path, path: &Path, entries: &mut Vec<Entry>) -> Result<(), ArchiveError> {
    let read_error = |source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = path.symlink_metadata().map_err(read_error)?;
    let relative = relative(root, path);
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path)
            .map_err(read_error)?
            .to_string_lossy()
            .into_owned();
        entries.push(Entry {
            path: relative,
            kind: EntryKind::Symlink,
            size: 0,
            sha256: sha256_hex(target.as_bytes()),
            mode,
            link: Some(target),
        });
    } else if meta.is_dir() {
        entries.push(Entry {
            path: relative,
            kind: EntryKind::Dir,
            size: 0,
            sha256: String::new(),
            mode,
            link: None,
        });
        for child in read_dir_sorted(path)? {
            walk(root, &child, entries)?;
        }
    } else if meta.is_file() {
        entries.push(file_entry(root, path)?);
    } else if meta.file_type().is_fifo() {
        entries.push(Entry {
            path: relative,
            kind: EntryKind::Fifo,
            size: 0,
            sha256: String::new(),
            mode,
            link: None,
        });
    } else {
        // `include::snapshot` refuses sockets and device nodes by name before this runs.
        return Err(read_error(io::Error::other(
            "not a file, directory, symlink or FIFO",
        )));
    }
    Ok(())
}

fn file_entry(root: &Path, path: &Path) -> Result<Entry, ArchiveError> {
    let read_error = |source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher).map_err(read_error)?;
    Ok(Entry {
        path: relative(root, path),
        kind: EntryKind::File,
        size,
        sha256: hex::encode(hasher.finalize()),
        mode,
        link: None,
    })
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|source| ArchiveError::Read {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Counts bytes written through it.
#[derive(Debug)]
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the archive for checkpoint directory `root` described by `manifest` to `out`.
/// Returns the compressed bytes written.
///
/// # Errors
/// [`ArchiveError::Output`] when the output fails (a closed pipe, a full disk);
/// [`ArchiveError::Read`] when a checkpoint file cannot be read.
pub fn write<W: Write>(out: W, manifest: &Manifest, root: &Path) -> Result<u64, ArchiveError> {
    let out = Counting {
        inner: out,
        count: 0,
    };
    let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL).map_err(ArchiveError::Output)?;
    encoder
        .include_checksum(true)
        .map_err(ArchiveError::Output)?;
    let mut builder = tar::Builder::new(encoder);
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| ArchiveError::Output(e.into()))?;
    let mut header = new_header(tar::EntryType::Regular, json.len() as u64, 0o600);
    builder
        .append_data(&mut header, MANIFEST_NAME, json.as_slice())
        .map_err(ArchiveError::Output)?;
    for entry in &manifest.entries {
        let path = root.join(&entry.path);
        match entry.kind {
            EntryKind::File => {
                let file = File::open(&path).map_err(|source| ArchiveError::Read {
                    path: path.clone(),
                    source,
                })?;
                let mut header = new_header(tar::EntryType::Regular, entry.size, entry.mode);
                // `take` guarantees the declared size even if the file changed since hashing
                // (it cannot: the app is frozen or the directory is ours; the check is cheap).
                builder
                    .append_data(
                        &mut header,
                        &entry.path,
                        BufReader::new(file).take(entry.size),
                    )
                    .map_err(ArchiveError::Output)?;
            }
            EntryKind::Fifo => {
                let mut header = new_header(tar::EntryType::Fifo, 0, entry.mode);
                builder
                    .append_data(&mut header, &entry.path, io::empty())
                    .map_err(ArchiveError::Output)?;
            }
            EntryKind::Dir => {
                let mut header = new_header(tar::EntryType::Directory, 0, entry.mode);
                builder
                    .append_data(&mut header, &entry.path, io::empty())
                    .map_err(ArchiveError::Output)?;
            }
            EntryKind::Symlink => {
                let mut header = new_header(tar::EntryType::Symlink, 0, entry.mode);
                let target = entry.link.as_deref().unwrap_or("");
                builder
                    .append_link(&mut header, &entry.path, target)
                    .map_err(ArchiveError::Output)?;
            }
        }
    }
    let encoder = builder.into_inner().map_err(ArchiveError::Output)?;
    let mut out = encoder.finish().map_err(ArchiveError::Output)?;
    out.flush().map_err(ArchiveError::Output)?;
    Ok(out.count)
}

fn new_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

/// Counts bytes read through it (the compressed size of a received archive).
#[derive(Debug)]
pub struct CountingReader<R> {
    inner: R,
    pub count: u64,
}

impl<R: Read> CountingReader<R> {
    pub fn new(inner: R) -> Self {
        CountingReader { inner, count: 0 }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Reads and verifies an archive stream into `staging` (an empty directory of ours). Returns
/// the validated manifest. On error, `staging` may hold partial files; the caller removes it.
///
/// # Errors
/// Any [`ArchiveError`]; the message names what is wrong with the archive.
pub fn read_verified<R: Read>(
    input: R,
    staging: &Path,
    arch: &str,
) -> Result<Manifest, ArchiveError> {
    // One frame is the whole archive: reading stops at its end, so a receiver never needs the
    // sender to close the stream (`kubectl exec` delivers stdin EOF only on newer protocols).
    let decoder = zstd::Decoder::new(input)
        .map_err(ArchiveError::Stream)?
        .single_frame();
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive.entries().map_err(ArchiveError::Stream)?;

    let mut first = entries
        .next()
        .ok_or(ArchiveError::Empty)?
        .map_err(ArchiveError::Stream)?;
    let name = entry_path(&first)?;
    if name != MANIFEST_NAME {
        return Err(ManifestError::NotFirst(name).into());
    }
    let size = first.header().size().map_err(ArchiveError::Stream)?;
    if size > MANIFEST_SIZE_LIMIT {
        return Err(ManifestError::TooLarge(size).into());
    }
    let mut json = Vec::with_capacity(size as usize);
    (&mut first)
        .take(MANIFEST_SIZE_LIMIT)
        .read_to_end(&mut json)
        .map_err(ArchiveError::Stream)?;
    drop(first);
    let manifest = Manifest::from_json(&json, arch)?;

    let mut seen = BTreeSet::new();
    for entry in entries {
        let mut entry = entry.map_err(ArchiveError::Stream)?;
        let path = entry_path(&entry)?;
        let key = path.trim_end_matches('/').to_string();
        let listed = manifest
            .entry(&key)
            .ok_or_else(|| ArchiveError::Unlisted(path.clone()))?;
        if !seen.insert(key.clone()) {
            return Err(ArchiveError::Duplicate(path));
        }
        let kind = entry.header().entry_type();
        let found = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => {
                return Err(ArchiveError::Kind {
                    path,
                    found: format!("{other:?}"),
                    expected: listed.kind,
                });
            }
        };
        if found != listed.kind {
            return Err(ArchiveError::Kind {
                path,
                found: format!("{found:?}").to_lowercase(),
                expected: listed.kind,
            });
        }
        let target = staging.join(&key);
        match found {
            EntryKind::Dir => create_dir(&target)?,
            EntryKind::Fifo => {
                if let Some(parent) = target.parent() {
                    create_dir(parent)?;
                }
                nix::unistd::mkfifo(
                    &target,
                    nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
                )
                .map_err(|errno| ArchiveError::Write {
                    path: target.clone(),
                    source: errno.into(),
                })?;
            }
            EntryKind::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                if Some(link.as_str()) != listed.link.as_deref()
                    || sha256_hex(link.as_bytes()) != listed.sha256
                {
                    return Err(ArchiveError::Checksum(path));
                }
            }
            EntryKind::File => {
                let declared = entry.header().size().map_err(ArchiveError::Stream)?;
                if declared != listed.size {
                    return Err(ArchiveError::Size {
                        path,
                        found: declared,
                        expected: listed.size,
                    });
                }
                if let Some(parent) = target.parent() {
                    create_dir(parent)?;
                }
                let write_error = |source| ArchiveError::Write {
                    path: target.clone(),
                    source,
                };
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(write_error)?;
                let mut hashing = HashingWriter {
                    inner: &mut file,
                    hasher: Sha256::new(),
                };
                let copied = io::copy(&mut (&mut entry).take(listed.size + 1), &mut hashing)
                    .map_err(ArchiveError::Stream)?;
                if copied != listed.size {
                    return Err(ArchiveError::Size {
                        path,
                        found: copied,
                        expected: listed.size,
                    });
                }
                if hex::encode(hashing.hasher.finalize()) != listed.sha256 {
                    return Err(ArchiveError::Checksum(path));
                }
            }
        }
    }
    let missing: Vec<&Entry> = manifest
        .entries
        .iter()
        .filter(|e| !seen.contains(e.path.trim_end_matches('/')))
        .collect();
    if let Some(first) = missing.first() {
        return Err(ArchiveError::Missing {
            missing: missing.len(),
            first: first.path.clone(),
        });
    }
    // Read to the end of the zstd frame (not of the stream) so its checksum is verified too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(ArchiveError::Stream)?;
    Ok(manifest)
}

/// Verifies an unpacked archive directory in place (read only): the manifest, and every
/// listed file's kind, size and SHA-256; no symlink anywhere but where listed.
///
/// # Errors
/// Any [`ArchiveError`].
pub fn verify_dir(dir: &Path, arch: &str) -> Result<Manifest, ArchiveError> {
    let path = dir.join(MANIFEST_NAME);
    let json = fs::read(&path).map_err(|source| ArchiveError::Read {
        path: path.clone(),
        source,
    })?;
    if json.len() as u64 > MANIFEST_SIZE_LIMIT {
        return Err(ManifestError::TooLarge(json.len() as u64).into());
    }
    let manifest = Manifest::from_json(&json, arch)?;
    for entry in &manifest.entries {
        let path = dir.join(&entry.path);
        let meta = path.symlink_metadata().map_err(|_| ArchiveError::Missing {
            missing: 1,
            first: entry.path.clone(),
        })?;
        let found = if meta.file_type().is_symlink() {
            EntryKind::Symlink
        } else if meta.is_dir() {
            EntryKind::Dir
        } else if meta.is_file() {
            EntryKind::File
        } else if meta.file_type().is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(ArchiveError::Kind {
                path: entry.path.clone(),
                found: "socket or device node".into(),
                expected: entry.kind,
            });
        };
        if found != entry.kind {
            return Err(ArchiveError::Kind {
                path: entry.path.clone(),
                found: format!("{found:?}").to_lowercase(),
                expected: entry.kind,
            });
        }
        match found {
            EntryKind::File => {
                let listed = file_entry(dir, &path)?;
                if listed.size != entry.size {
                    return Err(ArchiveError::Size {
                        path: entry.path.clone(),
                        found: listed.size,
                        expected: entry.size,
                    });
                }
                if listed.sha256 != entry.sha256 {
                    return Err(ArchiveError::Checksum(entry.path.clone()));
                }
            }
            EntryKind::Symlink => {
                let target = fs::read_link(&path).map_err(|source| ArchiveError::Read {
                    path: path.clone(),
                    source,
                })?;
                if Some(target.to_string_lossy().as_ref()) != entry.link.as_deref() {
                    return Err(ArchiveError::Checksum(entry.path.clone()));
                }
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
    }
    Ok(manifest)
}

fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, ArchiveError> {
    let bytes = entry.path_bytes();
    std::str::from_utf8(&bytes)
        .map(str::to_string)
        .map_err(|_| ArchiveError::NotUtf8)
}

fn create_dir(path: &Path) -> Result<(), ArchiveError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ArchiveError::Write {
            path: path.to_path_buf(),
            source,
        })
}

use std::os::unix::fs::DirBuilderExt as _;

struct HashingWriter<'a> {
    inner: &'a mut File,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
