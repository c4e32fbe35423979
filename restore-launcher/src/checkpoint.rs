//! The checkpoint job: freeze and dump the app with CRIU, snapshot included paths, and write
//! the archive to the stream the client passed. Runs in a forked job (see [`crate::job`]).
//!
//! The app's state is never lost here: CRIU leaves the tree frozen (`--leave-stopped`), and
//! on any failure before the archive is completely written the tree is resumed. Only a
//! complete archive leaves the app frozen (without `--leave-running`), waiting for the plugin
//! to verify the target and delete this pod, or to `rollback`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migrate_format::{ARCHIVE_FORMAT_VERSION, CheckpointReport, Manifest};
use nix::sys::signal::SigSet;
use nix::unistd::Pid;

use crate::archive;
use crate::criu::Criu;
use crate::include;
use crate::seal::{self, Key, KeySource};
use crate::sysinfo;
use crate::workdir::JobDir;

/// Why a checkpoint failed, each saying what to change. The app keeps running (or stays
/// frozen, when `freeze` stopped it: only `thaw` or `rollback` resume it), and nothing was
/// restored anywhere. [`CheckpointError::failure`] is the code the report carries, so that a
/// client can tell "the app cannot be checkpointed as it is" from "this attempt failed".
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot create the work directory {}: {source}; set --work-dir to a writable path; the app keeps running", path.display())]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}; the app keeps running")]
    Key(String),
    #[error(
        "process(es) {} left the app's process tree (their parent exited, so they were reparented to the launcher; a daemonizing double fork, or a process left by a `kubectl exec` session): a checkpoint carries only the app's tree and would leave them behind; keep the app's processes under its main process, or end the leftover; the app keeps running",
        .0.join(", ")
    )]
    LeftTree(Vec<String>),
    #[error(
        "process(es) {} left the app's process tree while it was being checkpointed (a double fork racing the dump): they were not dumped and would be left behind; keep the app's processes under its main process; the checkpoint is refused and the app keeps running",
        .0.join(", ")
    )]
    LeftTreeDuringDump(Vec<String>),
    #[error(
        "the app watches files ({}), which CRIU run inside the container cannot dump without CAP_SYS_ADMIN: stop watching files in this app (poll instead), or do not migrate it; the app keeps running",
        .0.join(", ")
    )]
    FileWatches(Vec<String>),
    #[error(
        "the container's IPC namespace holds {0}, which a checkpoint taken inside the container cannot carry (the app shares that namespace with the launcher, and CRIU carries only a namespace of the app's own): the app would be restored without them; {SYSV_FIX}; the app keeps running"
    )]
    SysvIpc(String),
    /// Preparing criu's directories for the app's user.
    #[error("{0}; the app keeps running")]
    Setup(String),
    #[error("{0}; the app keeps running")]
    Criu(String),
    #[error("{}; the app keeps running", chain(.0))]
    Included(include::IncludeError),
    #[error("{}; the app keeps running", chain(.0))]
    Archive(archive::ArchiveError),
    #[error("cannot sync the archive: {0}; the app keeps running")]
    Sync(std::io::Error),
    #[error(
        "post-copy: not every page of the app's memory was served ({0}); the app here keeps its state, frozen"
    )]
    PostCopy(String),
}

impl CheckpointError {
    /// The code of this failure in the report.
    pub fn failure(&self) -> migrate_format::CheckpointFailure {
        use migrate_format::CheckpointFailure as F;
        match self {
            CheckpointError::WorkDir { .. } | CheckpointError::Setup(_) => F::WorkDir,
            CheckpointError::Key(_) => F::Key,
            CheckpointError::LeftTree(_) | CheckpointError::LeftTreeDuringDump(_) => F::LeftTree,
            CheckpointError::FileWatches(_) => F::FileWatches,
            CheckpointError::SysvIpc(_) => F::SysvIpc,
            CheckpointError::Criu(_) => F::Criu,
            CheckpointError::Included(_) => F::IncludedPath,
            CheckpointError::Archive(archive::ArchiveError::Output(_))
            | CheckpointError::Sync(_) => F::Output,
            CheckpointError::Archive(_) => F::Archive,
            CheckpointError::PostCopy(_) => F::PostCopy,
        }
    }
}

/// Everything the job needs, copied from PID 1 before the fork.
#[derive(Debug, Clone)]
pub struct Plan {
    pub app: Pid,
    pub leave_running: bool,
    pub included: Vec<PathBuf>,
    pub work_dir: PathBuf,
    pub state_dir: PathBuf,
    pub criu: Criu,
    pub stdout_pipe: Option<u64>,
    pub stderr_pipe: Option<u64>,
    pub command: Vec<String>,
    pub original_mask: SigSet,
    /// The app was stopped by `freeze` before this checkpoint: it stays stopped whatever
    /// happens (the plugin thaws or rolls back all containers together).
    pub was_frozen: bool,
    /// How long the output may accept nothing before the checkpoint gives up.
    pub output_stall_timeout: Duration,
    /// Seal the archive with this key (`crate::seal`).
    pub key: Option<KeySource>,
}

/// Runs the checkpoint, writing the archive to `output`. Never panics on bad input; every
/// failure is in the report.
/// With `pages` (post-copy, `--lazy`): the archive carries everything but the app's memory,
/// which CRIU then serves over `pages` (its end of the page-server connection); the report
/// comes once every page was served.
pub fn run(
    plan: &Plan,
    output: OwnedFd,
    cancel: &OwnedFd,
    pages: Option<OwnedFd>,
) -> CheckpointReport {
    let id = sysinfo::new_id("ck");
    let mut report = CheckpointReport::new(id.clone(), plan.leave_running);
    // The images are the app's memory: the job's directory is removed when it ends.
    let result = match JobDir::create(&plan.work_dir, &id) {
        Ok(dir) => checkpoint(plan, &id, dir.path(), output, cancel, pages, &mut report),
        Err(source) => Err(CheckpointError::WorkDir {
            path: plan.work_dir.join(&id),
            source,
        }),
    };
    if let Err(error) = &result {
        report.error = Some(error.to_string());
        report.failure = Some(error.failure());
    }
    report.ok = result.is_ok();
    report.peak_rss_kib = sysinfo::peak_rss_kib();
    report
}

fn checkpoint(
    plan: &Plan,
    id: &str,
    dir: &Path,
    output: OwnedFd,
    cancel: &OwnedFd,
    pages: Option<OwnedFd>,
    report: &mut CheckpointReport,
) -> Result<(), CheckpointError> {
    let start = Instant::now();
    let mut phase = Instant::now();
    let mut lap = |name: &str, report: &mut CheckpointReport| {
        report
            .timings_ms
            .insert(name.into(), phase.elapsed().as_millis() as u64);
        phase = Instant::now();
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join("criu"))
        .map_err(|source| CheckpointError::WorkDir {
            path: dir.to_path_buf(),
            source,
        })?;
    // The key first: a checkpoint that could not be sealed must not freeze the app.
    let key = plan
        .key
        .as_ref()
        .map(Key::load)
        .transpose()
        .map_err(|e| CheckpointError::Key(chain(&e)))?;
    // A process the app started that left its tree (a daemon whose parent exited, reparented
    // to the launcher) is not dumped by CRIU: refuse rather than leave it behind.
    let strays = crate::tree::strays(nix::unistd::getppid(), plan.app, nix::unistd::getpid());
    if !strays.is_empty() {
        return Err(CheckpointError::LeftTree(strays));
    }
    // An inotify or fanotify watch: CRIU without CAP_SYS_ADMIN fails on it mid-dump, after the
    // app's blocking calls were interrupted (GNU tail, for one, exits on that). Refused first.
    let watches = file_watches(plan.app);
    if !watches.is_empty() && !crate::caps::has_sys_admin() {
        return Err(CheckpointError::FileWatches(watches));
    }
    if let Some(objects) = uncarried_sysv_ipc(plan.app) {
        return Err(CheckpointError::SysvIpc(objects));
    }
    // A root launcher dumps an app of another user with criu running as that user
    // (crate::creds says why); criu then writes its images and log into directories of that
    // user, which the launcher takes back afterwards. It reaches them only through
    // descriptors: the job directory stays the launcher's alone, so no process of the app's
    // user (one that left the app's tree, say) can reach the images by path.
    let run_as = dump_user(plan.app);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir.join("log"))
        .map_err(|e| {
            CheckpointError::Setup(format!("cannot create {}: {e}", dir.join("log").display()))
        })?;
    let handed = run_as
        .as_ref()
        .map(|creds| HandedOver::new(dir, creds))
        .transpose()
        .map_err(CheckpointError::Setup)?;
    let (images, logs, dirs) = match &handed {
        Some(handed) => (
            handed.images_path(),
            handed.logs_path(),
            handed.raw_fds().to_vec(),
        ),
        None => (dir.join("criu"), dir.join("log"), Vec::new()),
    };
    // The log is kept next to the socket, outside the work directory that is removed, so the
    // path in an error message can still be read.
    let log = crate::criu::Log {
        path: &logs.join("dump.log"),
        keep: &plan.state_dir.join("last-dump.log"),
    };
    let dumper = crate::criu::Dumper {
        run_as: run_as.as_ref(),
        dirs: &dirs,
    };
    let frozen_at_ms = sysinfo::now_ms();
    let mut serving = None;
    let dumped = match &pages {
        None => plan.criu.dump(
            plan.app.as_raw(),
            &images,
            &log,
            &plan.original_mask,
            dumper,
        ),
        Some(pages) => plan
            .criu
            .dump_lazy(
                plan.app.as_raw(),
                &images,
                &log,
                &plan.original_mask,
                dumper,
                pages.as_fd(),
            )
            .map(|s| serving = Some(s)),
    };
    // CRIU has its own copy of the page-server connection now.
    drop(pages);
    if run_as.is_some() {
        if let Err(error) = crate::creds::take_back(&images) {
            // A tree `freeze` stopped stays stopped: only thaw or rollback resume it.
            if dumped.is_ok() && !plan.was_frozen {
                crate::tree::resume(plan.app);
            }
            let dump = dumped
                .err()
                .map(|e| format!("{}; ", chain(&e)))
                .unwrap_or_default();
            return Err(CheckpointError::Setup(format!("{dump}{error}")));
        }
    }
    drop(handed);
    if let Err(error) = dumped {
        // CRIU resumes the tree itself when a dump fails.
        return Err(CheckpointError::Criu(chain(&error)));
    }
    lap("dump", report);
    // From here the tree is frozen: on any failure, resume it before returning (unless it was
    // frozen by `freeze`, which only `thaw` or `rollback` undoes).
    let frozen = Frozen {
        app: plan.app,
        resume_on_drop: !plan.was_frozen,
    };
    // Again, now that CRIU has the tree frozen (a running app, with `--leave-running`, may
    // fork daemons of its own accord later): a process that left the app's tree while CRIU
    // froze it (a double fork racing the freeze) was not dumped, would keep running here
    // after a commit, and may have gone for the images. Refused.
    let escaped = crate::tree::strays(nix::unistd::getppid(), plan.app, nix::unistd::getpid());
    if !escaped.is_empty() {
        return Err(CheckpointError::LeftTreeDuringDump(escaped));
    }
    report.app_pids = crate::tree::pids(plan.app);
    let (included_bytes, attributes) =
        include::snapshot(&plan.included, dir).map_err(CheckpointError::Included)?;
    report.included_bytes = included_bytes;
    lap("snapshot", report);
    let frozen = if plan.leave_running && !plan.was_frozen {
        frozen.resume();
        report.frozen_ms = Some(sysinfo::now_ms().saturating_sub(frozen_at_ms));
        None
    } else {
        Some(frozen)
    };
    let mut entries =
        archive::list_entries(dir, plan.included.len()).map_err(CheckpointError::Archive)?;
    include::annotate(&mut entries, &attributes);
    report.images_bytes = entries
        .iter()
        .filter(|e| e.path.starts_with("criu/"))
        .map(|e| e.size)
        .sum();
    lap("hash", report);
    let manifest = Manifest {
        format_version: ARCHIVE_FORMAT_VERSION,
        id: id.to_string(),
        created: sysinfo::now_rfc3339(),
        source: source_info(),
        criu_version: plan.criu.version.clone(),
        kernel: sysinfo::kernel(),
        arch: sysinfo::arch().into(),
        cpu_flags_digest: sysinfo::cpu_flags_digest(),
        app_root_pid: plan.app.as_raw(),
        app_pids: report.app_pids.clone(),
        command: plan.command.clone(),
        stdout_pipe: plan.stdout_pipe,
        stderr_pipe: plan.stderr_pipe,
        included_paths: plan
            .included
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        entries,
        frozen_at_ms,
        timings_ms: report.timings_ms.clone(),
    };
    let file = File::from(output);
    let mut out = archive::Counting::new(StallGuard::new(&file, plan.output_stall_timeout, cancel));
    match &key {
        None => {
            archive::write(&mut out, &manifest, dir).map_err(CheckpointError::Archive)?;
        }
        Some(key) => {
            let mut sealed =
                seal::seal(&mut out, key).map_err(|e| CheckpointError::Key(chain(&e)))?;
            archive::write(&mut sealed, &manifest, dir).map_err(CheckpointError::Archive)?;
            sealed
                .finish()
                .map_err(|e| CheckpointError::Archive(archive::ArchiveError::Output(e)))?;
        }
    }
    report.archive_bytes = out.count;
    // Durable when the output is a file; a pipe or socket answers EINVAL, which is fine.
    if let Err(error) = file.sync_all()
        && error.raw_os_error() != Some(libc::EINVAL)
    {
        return Err(CheckpointError::Sync(error));
    }
    lap("write", report);
    if let Some(serving) = serving {
        // The archive is complete: its reader sees the end now, while CRIU serves the memory
        // to the restored app until every page went. Only then is this checkpoint done.
        drop(file);
        let served = serving.wait(Some(cancel.as_fd()));
        report.post_copy = Some(migrate_format::PostCopy {
            state: if served.is_ok() {
                migrate_format::PostCopyState::Complete
            } else {
                migrate_format::PostCopyState::Failed
            },
            ended_at_ms: Some(sysinfo::now_ms()),
            error: served.as_ref().err().map(|e| chain(e)),
        });
        lap("serve pages", report);
        served.map_err(|e| CheckpointError::PostCopy(chain(&e)))?;
    }
    report
        .timings_ms
        .insert("total".into(), start.elapsed().as_millis() as u64);
    if let Some(frozen) = frozen {
        frozen.keep_frozen();
    }
    Ok(())
}

/// The archive's output, failing a write that can make no progress for `stall`.
///
/// A pipe whose reader went away without closing it (an exec session dropped by an
/// interrupted plugin, whose runtime keeps the pipe open but stops draining it) would
/// otherwise block the checkpoint job forever, and the launcher would refuse `rollback`
/// while it "is checkpointing": the app would stay frozen. Files never stall.
struct StallGuard<'a> {
    out: &'a File,
    stall: Duration,
    /// Readable once PID 1 asks the job to stop writing (a rollback during the checkpoint).
    cancel: &'a OwnedFd,
}

impl<'a> StallGuard<'a> {
    /// Makes `out` non-blocking (it is the job's own copy of the stream; the `checkpoint`
    /// client that passed it only prints to stderr) so a write returns what fit.
    fn new(out: &'a File, stall: Duration, cancel: &'a OwnedFd) -> Self {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        if let Ok(flags) = fcntl(out, FcntlArg::F_GETFL) {
            let _ = fcntl(
                out,
                FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
            );
        }
        StallGuard { out, stall, cancel }
    }
}

impl std::io::Write for StallGuard<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd as _;
        let deadline = Instant::now() + self.stall;
        // Not ErrorKind::Interrupted: `write_all` would retry that for ever.
        let cancelled = || {
            std::io::Error::other(
                "cancelled: a rollback was asked while the archive was being written",
            )
        };
        loop {
            let mut asked = [PollFd::new(self.cancel.as_fd(), PollFlags::POLLIN)];
            if poll(&mut asked, PollTimeout::ZERO).is_ok_and(|n| n > 0) {
                return Err(cancelled());
            }
            match (&mut self.out).write(buf) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the archive's reader took nothing for {} s (gone without closing \
                         the stream?)",
                        self.stall.as_secs()
                    ),
                ));
            }
            let mut fds = [
                PollFd::new(self.out.as_fd(), PollFlags::POLLOUT),
                PollFd::new(self.cancel.as_fd(), PollFlags::POLLIN),
            ];
            let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&mut self.out).flush()
    }
}

/// The app tree while CRIU left it frozen; resumed when dropped unless kept frozen.
struct Frozen {
    app: Pid,
    resume_on_drop: bool,
}

impl Frozen {
    fn resume(mut self) {
        self.resume_on_drop = false;
        resume(self.app);
    }
    fn keep_frozen(mut self) {
        self.resume_on_drop = false;
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.resume_on_drop {
            tracing::warn!("checkpoint failed after the dump; resuming the app");
            resume(self.app);
        }
    }
}

/// Resumes the frozen app tree: every process of it, whatever its session or group.
pub fn resume(app: Pid) {
    crate::tree::resume(app);
}

/// The inotify and fanotify instances the app's processes hold, as `PID (comm): inotify`.
pub fn file_watches(app: Pid) -> Vec<String> {
    let mut found = Vec::new();
    for pid in crate::tree::pids(app) {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let info = fs::read_to_string(fd.path()).unwrap_or_default();
            let kind = if info.contains("inotify wd:") {
                "inotify"
            } else if info.contains("fanotify") {
                "fanotify"
            } else {
                continue;
            };
            let entry = format!("{pid} ({}): {kind}", comm.trim());
            if !found.contains(&entry) {
                found.push(entry);
            }
        }
    }
    found
}

/// "error: cause: cause".
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The SysV IPC objects of this IPC namespace (the container's, shared with the app), as
/// "2 semaphore sets (keys 0x…, …)", or None when there are none. CRIU inside the container
/// does not dump the IPC namespace: semaphores and message queues would silently be missing
/// after a restore, and an attached shared-memory segment fails the dump late.
/// The user criu dumps as: the app's, when the launcher is root and every process of the app
/// runs as one other user; `None` (criu as the launcher) otherwise.
fn dump_user(app: Pid) -> Option<crate::creds::Creds> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let pids = crate::tree::pids(app);
    let first = crate::creds::of_process(app.as_raw())?;
    if first.uid == 0 {
        return None;
    }
    pids.iter()
        .all(|&pid| crate::creds::of_process(pid).as_ref() == Some(&first))
        .then_some(first)
}

/// `dir/criu` and `dir/log` given to the app's user for criu to write into as that user, and
/// open as descriptors criu inherits (`/proc/self/fd/N`): the job directory and its
/// ancestors keep their modes, so no other process of that user reaches them by path.
struct HandedOver {
    images: OwnedFd,
    logs: OwnedFd,
    raw: [i32; 2],
}

impl HandedOver {
    fn new(dir: &Path, creds: &crate::creds::Creds) -> Result<Self, String> {
        let open = |sub: &str| -> Result<OwnedFd, String> {
            let path = dir.join(sub);
            std::os::unix::fs::chown(&path, Some(creds.uid), Some(creds.gid)).map_err(|e| {
                format!(
                    "cannot give {} to the app's user {}:{} so that criu can dump as that user: {e}; add CHOWN to the container's securityContext.capabilities.add",
                    path.display(),
                    creds.uid,
                    creds.gid
                )
            })?;
            nix::fcntl::open(
                &path,
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| format!("cannot open {}: {e}", path.display()))
        };
        let images = open("criu")?;
        let logs = open("log")?;
        use std::os::fd::AsRawFd as _;
        let raw = [images.as_raw_fd(), logs.as_raw_fd()];
        Ok(HandedOver { images, logs, raw })
    }

    fn images_path(&self) -> PathBuf {
        fd_path(&self.images)
    }

    fn logs_path(&self) -> PathBuf {
        fd_path(&self.logs)
    }

    fn raw_fds(&self) -> &[i32] {
        &self.raw
    }
}

/// The path of an open directory that needs no search permission on its ancestors.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd as _;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// What to change so that SysV IPC objects travel.
pub const SYSV_FIX: &str = "start the app in an IPC namespace of its own: set RESTORE_LAUNCHER_IPC_NAMESPACE=true in the container's env and add SYS_ADMIN to its securityContext.capabilities.add, then recreate the pod";

/// The SysV objects a checkpoint of `app` would leave behind: those of the container's IPC
/// namespace when the app shares it with the launcher (none when it has its own namespace,
/// `--ipc-namespace`, which CRIU dumps whole).
pub fn uncarried_sysv_ipc(app: Pid) -> Option<String> {
    if !shares_ipc_namespace(app) {
        return None;
    }
    sysv_ipc_objects()
}

/// Whether `app` is in this process's IPC namespace (an unreadable link counts as shared).
pub fn shares_ipc_namespace(app: Pid) -> bool {
    let own = fs::read_link("/proc/self/ns/ipc").ok();
    let its = fs::read_link(format!("/proc/{app}/ns/ipc")).ok();
    own.is_none() || its.is_none() || own == its
}

fn sysv_ipc_objects() -> Option<String> {
    let found: Vec<String> = [
        ("sem", "semaphore set"),
        ("msg", "message queue"),
        ("shm", "shared-memory segment"),
    ]
    .into_iter()
    .filter_map(|(table, what)| {
        let text = fs::read_to_string(format!("/proc/sysvipc/{table}")).ok()?;
        describe_sysv(&text, what)
    })
    .collect();
    (!found.is_empty()).then(|| found.join(" and "))
}

/// "N WHATs (keys K, …)" from one `/proc/sysvipc/*` table (a header line, then one line per
/// object whose first column is its key), or None when it lists none.
fn describe_sysv(table: &str, what: &str) -> Option<String> {
    let keys: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(|key| format!("{:#x}", key.parse::<i64>().unwrap_or(0) as u32))
        .collect();
    (!keys.is_empty()).then(|| {
        format!(
            "{} SysV {what}{} (key{} {})",
            keys.len(),
            if keys.len() == 1 { "" } else { "s" },
            if keys.len() == 1 { "" } else { "s" },
            keys.join(", ")
        )
    })
}

/// Source pod/namespace/node/container from the downward API, when the pod spec sets them.
fn source_info() -> BTreeMap<String, String> {
    [
        ("pod", "POD_NAME"),
        ("namespace", "POD_NAMESPACE"),
        ("node", "NODE_NAME"),
        ("container", "CONTAINER_NAME"),
    ]
    .into_iter()
    .filter_map(|(key, var)| std::env::var(var).ok().map(|v| (key.to_string(), v)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysv_tables_name_each_object_by_key() {
        let header = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n";
        assert_eq!(describe_sysv(header, "semaphore set"), None);
        let two = format!(
            "{header}  1234567        0   600         1     0     0     0     0          0 1700000000\n         0        1   600         1     0     0     0     0          0 1700000000\n"
        );
        assert_eq!(
            describe_sysv(&two, "semaphore set").as_deref(),
            Some("2 SysV semaphore sets (keys 0x12d687, 0x0)")
        );
    }
    use std::io::{Read as _, Write as _};

    fn pipe() -> (File, File) {
        let (read, write) = nix::unistd::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        (File::from(read), File::from(write))
    }

    /// The cancel pipe PID 1 keeps: (its write end, the job's read end).
    fn cancel_pipe() -> (OwnedFd, OwnedFd) {
        let (read, write) = nix::unistd::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        (write, read)
    }

    #[test]
    fn a_rollback_cancels_a_write_at_once_without_waiting_for_the_stall() {
        let (_reader, writer) = pipe(); // never read
        let (cancel_writer, cancel) = cancel_pipe();
        let mut guarded = StallGuard::new(&writer, Duration::from_secs(30), &cancel);
        let start = Instant::now();
        let asker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            nix::unistd::write(&cancel_writer, b"x").unwrap_or_default();
            cancel_writer
        });
        let error = guarded
            .write_all(&vec![7u8; 4 << 20])
            .err()
            .unwrap_or_else(|| panic!("4 MiB fit in an undrained pipe"));
        let _ = asker.join();
        assert!(error.to_string().contains("cancelled"), "{error}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "waited for the stall timeout"
        );
    }

    #[test]
    fn a_reader_that_stops_reading_fails_the_write_instead_of_hanging() {
        let (_reader, writer) = pipe(); // held open, never read: the dropped exec session
        let (_cancel_writer, cancel) = cancel_pipe();
        let mut guarded = StallGuard::new(&writer, Duration::from_millis(300), &cancel);
        let error = guarded
            .write_all(&vec![7u8; 4 << 20])
            .err()
            .unwrap_or_else(|| panic!("4 MiB fit in an undrained pipe"));
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("took nothing"), "{error}");
    }

    #[test]
    fn a_slow_but_steady_reader_gets_everything() {
        let (mut reader, writer) = pipe();
        let slow = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                std::thread::sleep(Duration::from_millis(5));
                match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => break got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let data: Vec<u8> = (0..2_000_000u32).map(|i| i as u8).collect();
        {
            let (_cancel_writer, cancel) = cancel_pipe();
            let mut guarded = StallGuard::new(&writer, Duration::from_millis(300), &cancel);
            guarded
                .write_all(&data)
                .unwrap_or_else(|e| panic!("steady reader: {e}"));
        }
        drop(writer);
        let got = slow.join().unwrap_or_default();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes changed on the way");
    }
}
