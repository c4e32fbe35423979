//! `park` and `unpark`: keeping an archive, verified, in a pod that restores nothing.
//!
//! A StatefulSet's pod keeps its name when it moves, so the moved pod can only be created once
//! the source pod is gone. Until then the checkpoint waits in a *holder* pod on the target
//! node: `park` reads the archive from stdin (as `receive` would), verifies it in full
//! (manifest, every entry's digest, the seal when a key is configured) and keeps exactly the
//! bytes it read, mode 0600, under the work directory; `unpark` writes them to stdout for the
//! moved pod's `receive`, which verifies them again before restoring. Neither talks to PID 1:
//! the holder's launcher just waits, and no app runs there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use migrate_format::{CheckpointReport, RestoreReport};

use crate::archive::{self, CountingReader};
use crate::checkpoint::chain;
use crate::seal::{self, KeySource};
use crate::{sysinfo, workdir};

/// The parked archive's file name in the work directory.
const PARKED: &str = "parked.archive";

/// Where the parked archive lives: the work directory, which is sized for archives.
pub fn parked_path(work_dir: &Path) -> PathBuf {
    work_dir.join(PARKED)
}

/// Copies every byte `inner` yields into `copy` as it is read.
struct Tee<R, W> {
    inner: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// `park` from stdin, giving up once it brings nothing for `stall`: a damaged archive can
/// leave the reader waiting for bytes the sender never sends, and `kubectl exec` does not
/// always pass the end of stdin on (as `receive`'s `--input-stall-timeout`).
pub fn park_stdin(
    stdin: File,
    stall: std::time::Duration,
    work_dir: &Path,
    key: Option<&KeySource>,
) -> RestoreReport {
    park(
        crate::restore::StallReader::new(stdin, stall),
        work_dir,
        key,
    )
}

/// Reads an archive from `input`, verifies it, and keeps it in the work directory (0600,
/// written under a temporary name and renamed once verified). The report says `ok` only for a
/// kept archive; its id is the checkpoint's.
pub fn park(input: impl Read, work_dir: &Path, key: Option<&KeySource>) -> RestoreReport {
    let mut report = RestoreReport::new();
    let start = Instant::now();
    match park_verified(input, work_dir, key, &mut report) {
        Ok(()) => report.ok = true,
        Err(error) => report.error = Some(error),
    }
    report
        .timings_ms
        .insert("total".into(), start.elapsed().as_millis() as u64);
    report
}

fn park_verified(
    input: impl Read,
    work_dir: &Path,
    key: Option<&KeySource>,
    report: &mut RestoreReport,
) -> Result<(), String> {
    let key = key
        .map(seal::Key::load)
        .transpose()
        .map_err(|e| chain(&e))?;
    let id = sysinfo::new_id("pk");
    // The staging copy of the unpacked archive exists only to verify it; it goes with the job.
    let job = workdir::JobDir::create(work_dir, &format!("rs-{id}")).map_err(|e| {
        format!(
            "cannot create the work directory {}: {e}; set --work-dir to a writable path",
            work_dir.display()
        )
    })?;
    let path = parked_path(work_dir);
    let partial = work_dir.join(format!(".{PARKED}.{id}"));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let verified = (|| {
        let mut input = CountingReader::new(Tee {
            inner: input,
            copy: io::BufWriter::new(&file),
        });
        let opened = seal::open(
            io::BufReader::with_capacity(1 << 20, &mut input),
            key.as_ref(),
        )
        .map_err(|e| format!("archive refused: {}", chain(&e)))?;
        let manifest = archive::read_verified(opened, &job.path().join("archive"), sysinfo::arch())
            .map_err(|e| format!("archive refused: {}", chain(&e)))?;
        let bytes = input.count;
        let Tee { copy, .. } = input.into_inner();
        copy.into_inner()
            .map_err(|e| format!("cannot write {}: {}", partial.display(), e.error()))?
            .sync_all()
            .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
        Ok::<_, String>((manifest, bytes))
    })();
    let (manifest, bytes) = match verified {
        Ok(done) => done,
        Err(error) => {
            let _ = fs::remove_file(&partial);
            return Err(format!("{error}; nothing was parked"));
        }
    };
    fs::rename(&partial, &path).map_err(|e| {
        let _ = fs::remove_file(&partial);
        format!("cannot keep the archive as {}: {e}", path.display())
    })?;
    report.id = Some(manifest.id);
    report.archive_bytes = bytes;
    Ok(())
}

/// Writes the parked archive to `out`. The report's `archive_bytes` is the archive's size, so
/// a stream cut on the way is told from a whole one.
pub fn unpark(out: impl Write, work_dir: &Path, key: Option<&KeySource>) -> CheckpointReport {
    let start = Instant::now();
    let path = parked_path(work_dir);
    let mut report = CheckpointReport::new(String::new(), false);
    match send(out, &path, key) {
        Ok((id, bytes)) => {
            report.id = id;
            report.archive_bytes = bytes;
            report.ok = true;
        }
        Err(error) => report.error = Some(error),
    }
    report
        .timings_ms
        .insert("total".into(), start.elapsed().as_millis() as u64);
    report
}

fn send(
    mut out: impl Write,
    path: &Path,
    key: Option<&KeySource>,
) -> Result<(String, u64), String> {
    let open = || {
        File::open(path).map_err(|e| {
            format!(
                "no parked archive at {}: {e} (was it parked in this container?)",
                path.display()
            )
        })
    };
    // The checkpoint's id, read back from the manifest (the first entry) without unpacking.
    let key = key
        .map(seal::Key::load)
        .transpose()
        .map_err(|e| chain(&e))?;
    let id = archive::read_manifest(
        seal::open(io::BufReader::new(open()?), key.as_ref()).map_err(|e| chain(&e))?,
    )
    .map_err(|e| format!("the parked archive cannot be read: {}", chain(&e)))?
    .id;
    let mut file = open()?;
    let bytes =
        io::copy(&mut file, &mut out).map_err(|e| format!("cannot send the archive: {e}"))?;
    out.flush()
        .map_err(|e| format!("cannot send the archive: {e}"))?;
    Ok((id, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A small real archive, as a checkpoint writes it (manifest first, digests).
    fn archive_bytes(dir: &Path) -> (Vec<u8>, String) {
        let (manifest, root) = archive::fuzz::sample(dir);
        let mut out = Vec::new();
        archive::write(&mut out, &manifest, &root).unwrap();
        (out, manifest.id)
    }

    #[test]
    fn a_verified_archive_is_kept_0600_and_sent_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = archive_bytes(dir.path());
        let work = dir.path().join("work");
        let report = park(&bytes[..], &work, None);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.id.as_deref(), Some(id.as_str()));
        assert_eq!(report.archive_bytes, bytes.len() as u64);
        let mode = fs::metadata(parked_path(&work))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Only the parked file stays: the staging copy went with the job.
        let left: Vec<_> = fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec![PARKED.to_string()]);

        let mut out = Vec::new();
        let sent = unpark(&mut out, &work, None);
        assert!(sent.ok, "{sent:?}");
        assert_eq!(sent.id, id);
        assert_eq!(sent.archive_bytes, bytes.len() as u64);
        assert_eq!(out, bytes);
    }

    #[test]
    fn an_archive_that_stops_coming_is_given_up_after_the_stall_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _) = archive_bytes(dir.path());
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(&bytes[..bytes.len() / 2]).unwrap();
        let work = dir.path().join("work");
        // The sender stays connected and sends nothing more, as a cut exec stream does.
        let report = park_stdin(
            File::from(std::os::fd::OwnedFd::from(reader)),
            std::time::Duration::from_millis(300),
            &work,
            None,
        );
        drop(writer);
        assert!(!report.ok);
        let error = report.error.unwrap();
        assert!(error.contains("brought nothing"), "{error}");
        assert!(!parked_path(&work).exists());
    }

    #[test]
    fn a_damaged_archive_is_refused_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut bytes, _) = archive_bytes(dir.path());
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        let work = dir.path().join("work");
        let report = park(&bytes[..], &work, None);
        assert!(!report.ok);
        let error = report.error.unwrap();
        assert!(error.contains("archive refused"), "{error}");
        assert!(error.contains("nothing was parked"), "{error}");
        assert!(!parked_path(&work).exists());
        assert_eq!(
            fs::read_dir(&work).unwrap().count(),
            0,
            "no partial file stays"
        );

        let sent = unpark(Vec::new(), &work, None);
        assert!(!sent.ok);
        assert!(sent.error.unwrap().contains("no parked archive"));
    }
}
