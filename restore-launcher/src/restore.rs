//! The restore job: verify an archive completely, put included paths back, and have CRIU
//! restore the app tree with its stdout/stderr re-attached to the launcher's new pipes. Runs
//! in a forked job (see [`crate::job`]); the restored tree is re-parented to PID 1 when the
//! job exits.
//!
//! Order matters for "refused cleanly": nothing outside the job's own work directory is
//! touched until the whole archive has been read and every size and checksum matched; the
//! source archive (file or directory) is only ever read.

use std::fs::{self, File};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use migrate_format::RestoreReport;
use nix::sys::signal::SigSet;

use crate::archive::{self, CountingReader};
use crate::checkpoint::chain;
use crate::criu::Criu;
use crate::include;
use crate::spawn;
use crate::sysinfo;

/// Where the archive comes from.
#[derive(Debug)]
pub enum Source {
    /// A stream passed by `receive` (stdin or a file it opened).
    Stream(OwnedFd),
    /// `--restore-from PATH`: an archive file or an unpacked archive directory.
    Path(PathBuf),
}

/// Everything the job needs, copied from PID 1 before the fork.
#[derive(Debug, Clone)]
pub struct Plan {
    pub included: Vec<PathBuf>,
    pub work_dir: PathBuf,
    pub state_dir: PathBuf,
    pub criu: Option<PathBuf>,
    pub pid_floor: i32,
    pub original_mask: SigSet,
    /// How long the archive stream may bring nothing before the restore gives up.
    pub input_stall_timeout: std::time::Duration,
    /// Take only archives sealed with this key (`crate::seal`).
    pub key: Option<crate::seal::KeySource>,
    /// `--user`: the restored app must run as this user, with no capability.
    pub user: Option<crate::creds::Creds>,
}

/// The write ends of the launcher's new stdout/stderr pipes, handed to CRIU.
#[derive(Debug)]
pub struct Pipes<'a> {
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
}

/// Verifies and restores. Every failure is in the report.
/// With `pages` (post-copy, `--lazy`): the archive holds everything but the app's memory; a
/// `criu lazy-pages` daemon fetches it over `pages` (this side's end of the page-server
/// connection) while the app runs, and outlives this job (its PID is in the report).
pub fn run(
    plan: &Plan,
    source: Source,
    pipes: &Pipes<'_>,
    pages: Option<OwnedFd>,
) -> RestoreReport {
    let mut report = RestoreReport::new();
    let id = sysinfo::new_id("rs");
    // Staged images are the app's memory: the job's directory is removed when it ends.
    let outcome = match crate::workdir::JobDir::create(&plan.work_dir, &id) {
        Ok(dir) => {
            let lazy = pages.map(|fd| (fd, dir.lock_fd()));
            let restored = restore(plan, source, pipes, dir.path(), lazy, &mut report);
            if report.lazy_pages_pid.is_some() {
                // The daemon reads the staged images and holds the directory's lock.
                dir.hand_on();
            }
            restored
        }
        Err(error) => Err(format!(
            "cannot create the work directory {}: {error}; set --work-dir to a writable path",
            plan.work_dir.join(&id).display()
        )),
    };
    match outcome {
        Ok(pid) => {
            report.ok = true;
            report.app_pid = Some(pid);
        }
        Err(error) => report.error = Some(error),
    }
    report.peak_rss_kib = sysinfo::peak_rss_kib();
    report
}

fn restore(
    plan: &Plan,
    source: Source,
    pipes: &Pipes<'_>,
    dir: &Path,
    lazy: Option<(OwnedFd, std::os::fd::RawFd)>,
    report: &mut RestoreReport,
) -> Result<i32, String> {
    let start = Instant::now();
    // Before reading anything: without criu nothing can be restored.
    let criu = Criu::find(plan.criu.as_deref()).map_err(|e| chain(&e))?;
    let key = plan
        .key
        .as_ref()
        .map(crate::seal::Key::load)
        .transpose()
        .map_err(|e| chain(&e))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            format!(
                "cannot create the work directory {}: {e}; set --work-dir to a writable path",
                dir.display()
            )
        })?;
    // A directory given as the source is the user's and stays untouched; every other source
    // is unpacked into this job's own staging directory.
    let staged = !matches!(&source, Source::Path(path) if path.is_dir());
    let (manifest, images_root) = match source {
        Source::Path(path) if path.is_dir() => {
            let manifest = archive::verify_dir(&path, sysinfo::arch()).map_err(|e| refused(&e))?;
            report.archive_bytes = manifest.payload_bytes();
            (manifest, path)
        }
        Source::Path(path) => {
            let file = File::open(&path)
                .map_err(|e| format!("cannot open the archive {}: {e}", path.display()))?;
            let mut input = CountingReader::new(file);
            let opened = crate::seal::open(std::io::BufReader::new(&mut input), key.as_ref())
                .map_err(|e| refused(&e))?;
            let staging = dir.join("archive");
            let manifest = archive::read_verified(opened, &staging, sysinfo::arch())
                .map_err(|e| refused(&e))?;
            report.archive_bytes = input.count;
            (manifest, staging)
        }
        Source::Stream(fd) => {
            let mut input =
                CountingReader::new(StallReader::new(File::from(fd), plan.input_stall_timeout));
            let opened = crate::seal::open(
                std::io::BufReader::with_capacity(1 << 20, &mut input),
                key.as_ref(),
            )
            .map_err(|e| refused(&e))?;
            let staging = dir.join("archive");
            let manifest = archive::read_verified(opened, &staging, sysinfo::arch())
                .map_err(|e| refused(&e))?;
            report.archive_bytes = input.count;
            (manifest, staging)
        }
    };
    report.id = Some(manifest.id.clone());
    report
        .timings_ms
        .insert("verify".into(), start.elapsed().as_millis() as u64);
    include::check_allowed(&manifest, &plan.included).map_err(|e| refused(&e))?;
    if manifest.cpu_flags_digest != sysinfo::cpu_flags_digest() {
        tracing::warn!(
            "this CPU's feature flags differ from the source's; CRIU checks whether the app can run here"
        );
    }

    let phase = Instant::now();
    include::put_back(&manifest, &images_root).map_err(|e| chain(&e))?;
    report
        .timings_ms
        .insert("put_back".into(), phase.elapsed().as_millis() as u64);

    let phase = Instant::now();
    let log = plan.state_dir.join("last-restore.log");
    // Post-copy: the daemon that will take the app's userfaultfd must stand first. It talks
    // to `criu restore` over a socket in their shared work directory (the state directory).
    let mut daemon = None;
    if let Some((pages, lock)) = &lazy {
        // Post-copy restores in CRIU's privileged mode, which would also put the app in a new
        // time namespace with the source's clock offsets; writing them needs CAP_SYS_TIME
        // (measured: `timens.c: Unable to set a monotonic clock offset: Operation not
        // permitted`), which a pod must never hold. Without the clocks' image CRIU skips that
        // step ("Clocks values have not been dumped"), as every `--unprivileged` restore does:
        // the app reads this node's monotonic clock, exactly as after a migration without
        // `--lazy`. The images are this job's own staging copy of the verified archive (a
        // post-copy's archive always comes over the channel).
        if !staged {
            return Err("post-copy restores only an archive received from the source".into());
        }
        match fs::remove_file(images_root.join("criu").join("timens-0.img")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "post-copy: cannot leave out the clocks' image: {e}"
                ));
            }
            _ => {}
        }
        let _ = fs::remove_file(plan.state_dir.join("lazy-pages.socket"));
        let lazy_log = plan.state_dir.join("last-lazy-pages.log");
        let serving = criu
            .lazy_pages(
                &images_root.join("criu"),
                &crate::criu::Log {
                    path: &lazy_log,
                    keep: &lazy_log,
                },
                &plan.original_mask,
                pages.as_fd(),
                &[*lock],
            )
            .map_err(|e| format!("post-copy: {}", chain(&e)))?;
        report.lazy_pages_pid = Some(serving.child.id() as i32);
        daemon = Some(serving);
    }
    drop(lazy);
    let pid = criu
        .restore(
            &images_root.join("criu"),
            &log,
            &dir.join("restored.pid"),
            &[
                (manifest.stdout_pipe, pipes.stdout.as_fd()),
                (manifest.stderr_pipe, pipes.stderr.as_fd()),
            ],
            &plan.original_mask,
            daemon.is_some(),
        )
        .map_err(|e| {
            // Nothing was restored: the daemon has nothing to serve. One that ended first is
            // often why the restore failed: its own error lines say.
            let mut said = String::new();
            if let Some(mut daemon) = daemon.take() {
                if let Ok(Some(status)) = daemon.child.try_wait() {
                    said = format!(
                        "; criu lazy-pages had ended ({status}): {}",
                        crate::criu::log_excerpt(&plan.state_dir.join("last-lazy-pages.log"), "")
                    );
                }
                let _ = daemon.child.kill();
                let _ = daemon.child.wait();
            }
            format!("{}{said}", chain(&e))
        });
    if pid.is_err() {
        report.lazy_pages_pid = None;
    }
    let pid = pid?;
    let resumed_at = sysinfo::now_ms();
    // criu (as root) gave the app the credentials its images hold: with --user they must be
    // that user's, capability-free, whatever the archive says.
    if let Some(creds) = &plan.user {
        if let Err(error) = crate::creds::check_restored(pid, creds) {
            crate::tree::kill_all(nix::unistd::Pid::from_raw(pid));
            return Err(format!("{error}; the restored app was killed"));
        }
    }
    report
        .timings_ms
        .insert("restore".into(), phase.elapsed().as_millis() as u64);
    report.downtime_ms = Some(resumed_at.saturating_sub(manifest.frozen_at_ms));
    // CRIU placed the restored PIDs without moving the namespace's PID counter; move it past
    // the floor so the app's future children get high PIDs too (see spawn.rs).
    if let Err(error) = spawn::advance_pid_counter(plan.pid_floor) {
        tracing::warn!(error = %chain(&error), "cannot advance the PID counter after the restore");
    }
    report
        .timings_ms
        .insert("total".into(), start.elapsed().as_millis() as u64);
    Ok(pid)
}

fn refused(error: &(dyn std::error::Error + 'static)) -> String {
    // A full disk is not the archive's fault: say "no space", not "refused".
    let prefix = match error.downcast_ref::<archive::ArchiveError>() {
        Some(archive::ArchiveError::NoSpace { .. }) => "",
        _ => "archive refused: ",
    };
    format!(
        "{prefix}{}; nothing was restored and the archive was left untouched",
        chain(error)
    )
}

/// The archive's input stream, failing a read that brings nothing for `stall`: a sender gone
/// without closing the stream (an exec session dropped by a plugin that died) would otherwise
/// keep the target "restoring" for ever. It waits with poll(2) and reads only what is there,
/// leaving the stream's flags alone: the `receive` client shares it and drains it after a
/// refusal with plain blocking reads.
pub(crate) struct StallReader {
    input: File,
    stall: std::time::Duration,
}

impl StallReader {
    pub(crate) fn new(input: File, stall: std::time::Duration) -> Self {
        StallReader { input, stall }
    }
}

impl std::io::Read for StallReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd as _;
        let deadline = Instant::now() + self.stall;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the archive stream brought nothing for {:.1} s (its sender gone without closing it?)",
                        self.stall.as_secs_f64()
                    ),
                ));
            }
            let mut fds = [PollFd::new(self.input.as_fd(), PollFlags::POLLIN)];
            let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(millis)) {
                // Readable, at its end, or broken: the read says which, without blocking.
                Ok(n) if n > 0 => return self.input.read(buf),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn a_stream_that_brings_nothing_fails_after_the_stall_timeout() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let mut input = StallReader::new(
            File::from(std::os::fd::OwnedFd::from(reader)),
            std::time::Duration::from_millis(300),
        );
        writer.write_all(b"abc").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            input.read(&mut buf).unwrap(),
            3,
            "data that is there is read"
        );
        let start = Instant::now();
        let error = input.read(&mut buf).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            error.to_string().contains("brought nothing for 0 s")
                || error.to_string().contains("brought nothing")
        );
        assert!(start.elapsed() >= std::time::Duration::from_millis(300));
        drop(writer);
        assert_eq!(
            input.read(&mut buf).unwrap(),
            0,
            "a closed stream is its end"
        );
    }
}
