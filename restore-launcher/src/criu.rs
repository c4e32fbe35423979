//! Running CRIU: finding the binary, its version, and the exact `criu dump` / `criu restore`
//! command lines the launcher relies on, with failures reported from CRIU's own log.
//!
//! Options, and why:
//! - `--manage-cgroups=ignore` on both sides: the target container has other cgroup paths and
//!   no right to create cgroups; runc documents `ignore` on both dump and restore for
//!   restoring into a different cgroup.
//! - `--tcp-close`: established TCP connections are neither frozen nor restored (that would
//!   need the same IP and an iptables/nftables lock in the image); they come back closed, as
//!   a peer would see after a network blip. Listening sockets are restored.
//! - `--skip-in-flight` at dump: a connection still in a listening socket's accept queue (the
//!   app was frozen before accepting it; a kubelet TCP probe, a client's connect) is dropped,
//!   as established ones are closed; without it criu refuses the whole dump (measured with
//!   PostgreSQL under a TCP readiness probe: `inet: In-flight connection (l) for …`).
//! - `--ext-unix-sk`: Unix sockets connected outside the app (syslog, the launcher) are allowed.
//! - `--file-locks`: flock/fcntl locks are dumped and restored.
//! - `--leave-stopped` at dump: the tree stays frozen so nothing changes until the launcher
//!   decides (resume for `--leave-running` or on failure, keep frozen for a migration).
//! - `--restore-detached --restore-sibling` at restore: the tree becomes a child of criu's
//!   parent (the launcher's restore job); when that job exits it is re-parented to the
//!   launcher (PID 1 or subreaper), which then supervises it.
//! - `--inherit-fd fd[N]:pipe:[INODE]`: the app's stdout/stderr pipes, whose other end was
//!   the source launcher, are replaced by the restoring launcher's new pipes.
//! - `--unprivileged` unless the launcher is root with every capability criu's privileged mode
//!   uses ([`privileged`]): without it criu's kernel probes try to create namespaces and fail
//!   with EPERM before dumping anything (measured here: `kerndat_has_nftables_concat ...
//!   Operation not permitted`).

use std::ffi::OsString;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};

use crate::caps::{
    CAP_CHECKPOINT_RESTORE, CAP_NET_ADMIN, CAP_SETPCAP, CAP_SYS_ADMIN, CAP_SYS_CHROOT,
    CAP_SYS_PTRACE, CAP_SYS_RESOURCE, has_effective,
};
use crate::creds::Creds;

/// Environment variable naming the criu binary (default: `criu` from PATH).
pub const CRIU_ENV: &str = "RESTORE_LAUNCHER_CRIU";

/// A usable criu binary.
#[derive(Debug, Clone)]
pub struct Criu {
    pub path: PathBuf,
    pub version: String,
}

/// CRIU problems, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error(
        "criu was not found ({searched}); build the app image FROM the restore-launcher base image, which ships CRIU 4.x, or set {CRIU_ENV} to its path"
    )]
    NotFound { searched: String },
    #[error("cannot run `{} --version`", path.display())]
    Version {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{} --version` printed no version (`{output}`); is it really CRIU?", path.display())]
    NoVersion { path: PathBuf, output: String },
    #[error(
        "criu {action} needs {missing}, which this container lacks; {fix} (docs/security.md, section Capabilities)"
    )]
    Capabilities {
        action: &'static str,
        missing: String,
        fix: String,
    },
    #[error("this container cannot serve post-copy (--lazy): {0}")]
    PostCopySource(String),
    #[error("cannot start criu {action}")]
    Spawn {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("criu {action} failed ({status}): {excerpt} ({})", log.as_ref().map_or_else(|| "criu wrote no log".to_string(), |l| format!("full log: {}", l.display())))]
    Failed {
        action: &'static str,
        status: String,
        excerpt: String,
        /// The log as kept for reading after the job, if criu wrote one.
        log: Option<PathBuf>,
    },
}

/// Where a launcher holding capabilities as a non-root user looks for criu, in order: the
/// places Debian's package and a source build put it.
pub const TRUSTED_CRIU: &[&str] = &["/usr/sbin/criu", "/usr/local/sbin/criu"];

/// The first of [`TRUSTED_CRIU`] that is a regular file which only root can change: owned by
/// root, not writable by its group or others, and so is every directory above it.
fn trusted_criu() -> Result<PathBuf, CriuError> {
    use std::os::unix::fs::MetadataExt as _;
    let root_only = |path: &Path| {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
    };
    for candidate in TRUSTED_CRIU {
        // Resolved first (`/usr/sbin` may be a link to `bin`): then no link is left on the
        // way, and each directory of the real path is checked.
        let Ok(path) = std::fs::canonicalize(candidate) else {
            continue;
        };
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        if is_file && path.ancestors().all(root_only) {
            return Ok(path);
        }
    }
    Err(CriuError::NotFound {
        searched: format!(
            "a launcher holding capabilities as a non-root user runs criu only from {}, owned by root and writable by nobody else, and none is",
            TRUSTED_CRIU.join(" or ")
        ),
    })
}

impl Criu {
    /// Finds criu: `explicit` if given (`--criu`, `$RESTORE_LAUNCHER_CRIU`), else `criu` in
    /// PATH, and reads its version. A non-root launcher holding capabilities from its file
    /// runs criu with them, so then neither the option, the environment nor PATH chooses it:
    /// only [`TRUSTED_CRIU`], owned by root and writable by nobody else
    /// ([`crate::caps::privileged_non_root`]).
    ///
    /// # Errors
    /// [`CriuError::NotFound`] or a version problem.
    pub fn find(explicit: Option<&Path>) -> Result<Criu, CriuError> {
        let path = if crate::caps::privileged_non_root() {
            if let Some(asked) = explicit {
                tracing::warn!(asked = %asked.display(), "ignoring the criu path given: a launcher holding capabilities as a non-root user runs criu only from a root-owned path");
            }
            trusted_criu()?
        } else {
            match explicit {
                Some(path) if path.is_file() => path.to_path_buf(),
                Some(path) => {
                    return Err(CriuError::NotFound {
                        searched: format!("{} does not exist", path.display()),
                    });
                }
                None => which::which("criu").map_err(|_| CriuError::NotFound {
                    searched: format!("not in PATH={}", std::env::var("PATH").unwrap_or_default()),
                })?,
            }
        };
        let output = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CriuError::Version {
                path: path.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&output.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| CriuError::NoVersion {
                path: path.clone(),
                output: text.trim().to_string(),
            })?;
        Ok(Criu { path, version })
    }

    /// `criu dump` of the tree rooted at `pid`, images into `images`, leaving it frozen; as
    /// [`Dumper`]'s user when given (crate::creds says why), which must be able to write
    /// `images` and `log`'s directory. The log is copied to `keep` afterwards.
    ///
    /// # Errors
    /// [`CriuError::Failed`] with the error lines of the log (written to `log`).
    pub fn dump(
        &self,
        pid: i32,
        images: &Path,
        log: &Log<'_>,
        original_mask: &SigSet,
        dumper: Dumper<'_>,
    ) -> Result<(), CriuError> {
        let args = dump_args(pid, images, log.path, dumper.run_as);
        self.run(
            "dump",
            &args,
            log,
            original_mask,
            dumper.dirs,
            dumper.run_as,
        )
    }

    /// `criu dump --lazy-pages` (post-copy): dumps everything but the app's memory into
    /// `images`, says it is ready, then serves the memory page by page over `pages` (its end of
    /// the page-server connection, `--ps-socket`) until the target's `criu lazy-pages` has all
    /// of it. The tree stays seized (frozen) all that time, and stopped after it.
    ///
    /// # Errors
    /// [`CriuError::Failed`] when criu ends before it is ready (the dump failed).
    pub fn dump_lazy(
        &self,
        pid: i32,
        images: &Path,
        log: &Log<'_>,
        original_mask: &SigSet,
        dumper: Dumper<'_>,
        pages: BorrowedFd<'_>,
    ) -> Result<Serving, CriuError> {
        if let Some(reason) = post_copy_source_blocked(dumper.run_as.is_some()) {
            return Err(CriuError::PostCopySource(reason));
        }
        let mut args = dump_args(pid, images, log.path, dumper.run_as);
        args.extend(["--lazy-pages".into(), "--ps-socket".into()]);
        args.push(pages.as_raw_fd().to_string().into());
        let mut inherit = vec![pages.as_raw_fd()];
        inherit.extend_from_slice(dumper.dirs);
        self.serve(
            "dump",
            args,
            log,
            original_mask,
            &inherit,
            dumper.run_as,
            true,
        )
    }

    /// `criu lazy-pages --page-server` (post-copy, on the target): the daemon that takes the
    /// restored app's userfaultfd, fetches each page the app touches from the source (over
    /// `pages`, `--ps-socket`) and pushes the rest in the background until all arrived; then
    /// it exits 0. It outlives the restore job (PID 1 reaps it), and keeps the fds in `keep`.
    ///
    /// # Errors
    /// [`CriuError::Failed`] when it ends before it is ready.
    pub fn lazy_pages(
        &self,
        images: &Path,
        log: &Log<'_>,
        original_mask: &SigSet,
        pages: BorrowedFd<'_>,
        keep: &[i32],
    ) -> Result<Serving, CriuError> {
        let mut args: Vec<OsString> = vec!["lazy-pages".into(), "--page-server".into()];
        args.extend(common_args(images, log.path, true));
        args.extend(["--ps-socket".into(), pages.as_raw_fd().to_string().into()]);
        let mut inherit = vec![pages.as_raw_fd()];
        inherit.extend_from_slice(keep);
        self.serve(
            "lazy-pages",
            args,
            log,
            original_mask,
            &inherit,
            None,
            false,
        )
    }

    /// Starts criu with `--status-fd` and returns once it says it is ready.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        action: &'static str,
        mut args: Vec<OsString>,
        log: &Log<'_>,
        original_mask: &SigSet,
        inherit: &[i32],
        run_as: Option<&Creds>,
        die_with_parent: bool,
    ) -> Result<Serving, CriuError> {
        use std::io::Read as _;
        let (ready_read, ready_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| CriuError::Spawn {
                action,
                source: e.into(),
            })?;
        args.extend([
            "--status-fd".into(),
            ready_write.as_raw_fd().to_string().into(),
        ]);
        let mut inherit = inherit.to_vec();
        inherit.push(ready_write.as_raw_fd());
        let mut cmd = self.command(
            action,
            &args,
            original_mask,
            &inherit,
            run_as,
            die_with_parent,
        )?;
        // It runs long after this call: nobody would read a stderr pipe. The log has it all.
        cmd.stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|source| CriuError::Spawn { action, source })?;
        drop(ready_write);
        let mut byte = [0u8; 1];
        let said = std::fs::File::from(ready_read).read(&mut byte).unwrap_or(0);
        if said == 1 {
            return Ok(Serving {
                child,
                action,
                log: log.path.to_path_buf(),
            });
        }
        let status = child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        let kept = log.keep();
        let mut excerpt = log_excerpt(log.path, "");
        if let Some(cause) = known_cause(&excerpt) {
            excerpt = format!("{excerpt} -- {cause}");
        }
        Err(CriuError::Failed {
            action,
            status,
            excerpt,
            log: kept,
        })
    }

    /// `criu restore` from `images`, re-attaching `stdout`/`stderr` in place of the source's
    /// pipes `stdout_pipe`/`stderr_pipe` (inodes). Returns the restored root PID.
    ///
    /// # Errors
    /// [`CriuError::Failed`] with the error lines of the log.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &self,
        images: &Path,
        log: &Path,
        pidfile: &Path,
        pipes: &[(Option<u64>, BorrowedFd<'_>)],
        original_mask: &SigSet,
        lazy: bool,
    ) -> Result<i32, CriuError> {
        let log = Log {
            path: log,
            keep: log,
        };
        let mut args: Vec<OsString> = vec!["restore".into()];
        args.extend(common_args(images, log.path, lazy));
        args.extend(["--restore-detached".into(), "--restore-sibling".into()]);
        args.extend(["--pidfile".into(), pidfile.as_os_str().to_owned()]);
        if lazy {
            // The memory comes from the `criu lazy-pages` daemon already running.
            args.push("--lazy-pages".into());
        }
        let mut inherited = Vec::new();
        for (inode, fd) in pipes {
            if let Some(inode) = inode {
                args.push("--inherit-fd".into());
                args.push(format!("fd[{}]:pipe:[{inode}]", fd.as_raw_fd()).into());
                inherited.push(fd.as_raw_fd());
            }
        }
        self.run("restore", &args, &log, original_mask, &inherited, None)?;
        let text = std::fs::read_to_string(pidfile).unwrap_or_default();
        text.trim().parse().map_err(|_| CriuError::Failed {
            action: "restore",
            status: "no pidfile".into(),
            excerpt: format!(
                "criu reported success but wrote no PID to {}",
                pidfile.display()
            ),
            log: Some(log.keep.to_path_buf()),
        })
    }

    /// The criu command line for `action`, set up to run as the launcher needs (see the SAFETY
    /// note); `die_with_parent`: criu is killed when the process that started it dies.
    #[allow(clippy::too_many_arguments)]
    fn command(
        &self,
        action: &'static str,
        args: &[OsString],
        original_mask: &SigSet,
        inherit: &[i32],
        run_as: Option<&Creds>,
        die_with_parent: bool,
    ) -> Result<Command, CriuError> {
        check_capabilities(action)?;
        let mask = *original_mask;
        let inherit = inherit.to_vec();
        let switch_to = run_as.cloned();
        // What criu keeps as the app's user: CHECKPOINT_RESTORE, and SYS_ADMIN (entering the
        // app's IPC namespace) and SYS_PTRACE (Yama nodes) when the launcher holds them.
        let keep_caps = crate::caps::own_masks().0
            & ((1 << CAP_CHECKPOINT_RESTORE) | (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE));
        let parent = nix::unistd::getpid();
        let mut cmd = Command::new(&self.path);
        cmd.args(args)
            // The sealing key is the launcher's: criu (run as the app's user, too) needs none.
            .env_remove(crate::seal::KEY_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // kept: criu reports some failures (a missing capability) only on stderr
            .stderr(Stdio::piped());
        #[allow(unsafe_code)]
        // SAFETY: between fork and exec only async-signal-safe system calls are made
        // (sigprocmask, umask, prctl, fcntl, getppid, _exit, and for `run_as` setgroups,
        // setres[ug]id and capset on data prepared before the fork) and nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                // criu inherits the launcher's nearly-full blocked mask; it must not run deaf.
                sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)?;
                // Images hold the app's memory (secrets): created 0600, not criu's 0644.
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
                for fd in &inherit {
                    // SAFETY: these fds stay open in the parent for the duration of the call.
                    let fd = BorrowedFd::borrow_raw(*fd);
                    nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                }
                if let Some(creds) = &switch_to {
                    crate::creds::become_user_keeping(creds, keep_caps)?;
                }
                // If the job driving criu dies, criu must not carry on alone. Set after the
                // user switch, which clears it; a parent already gone is caught by getppid.
                if die_with_parent {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                    if nix::unistd::getppid() != parent {
                        libc::_exit(1);
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    fn run(
        &self,
        action: &'static str,
        args: &[OsString],
        log: &Log<'_>,
        original_mask: &SigSet,
        inherit: &[i32],
        run_as: Option<&Creds>,
    ) -> Result<(), CriuError> {
        let mut cmd = self.command(action, args, original_mask, inherit, run_as, true)?;
        let output = cmd
            .output()
            .map_err(|source| CriuError::Spawn { action, source })?;
        if run_as.is_some() {
            if let Some(dir) = log.path.parent() {
                if let Err(error) = crate::creds::take_back(dir) {
                    tracing::warn!(%error, "cannot read criu's log");
                }
            }
        }
        let kept = log.keep();
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut excerpt = log_excerpt(log.path, &stderr);
        if let Some(cause) = known_cause(&excerpt) {
            excerpt = format!("{excerpt} -- {cause}");
        }
        Err(CriuError::Failed {
            action,
            status: output.status.to_string(),
            excerpt,
            log: kept,
        })
    }
}

/// Who runs `criu dump`: the launcher (`run_as` None), or the app's user writing through
/// `dirs`, descriptors criu inherits for an images and log directory given as
/// `/proc/self/fd/N` paths (directories the app's user cannot reach by path).
#[derive(Debug, Clone, Copy, Default)]
pub struct Dumper<'a> {
    pub run_as: Option<&'a Creds>,
    pub dirs: &'a [i32],
}

/// Where criu writes its log, and where the launcher keeps it for reading after the job (the
/// job's directory is removed; the state directory keeps the last dump's and restore's log).
#[derive(Debug, Clone, Copy)]
pub struct Log<'a> {
    pub path: &'a Path,
    pub keep: &'a Path,
}

impl Log<'_> {
    /// Copies the log to where it is kept (0600); returns that path if a log exists there.
    fn keep(&self) -> Option<PathBuf> {
        if self.path != self.keep {
            let _ = std::fs::remove_file(self.keep);
            if let Ok(text) = read_log(self.path) {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let _ = std::fs::OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .mode(0o600)
                    .open(self.keep)
                    .and_then(|mut f| f.write_all(&text));
            }
        }
        self.keep.exists().then(|| self.keep.to_path_buf())
    }
}

/// A criu that goes on after saying it is ready: a lazy dump serving pages, or the lazy-pages
/// daemon fetching them.
#[derive(Debug)]
pub struct Serving {
    pub child: std::process::Child,
    action: &'static str,
    log: PathBuf,
}

impl Serving {
    /// Waits for it to end, polling `cancel` (readable: kill it); Ok when it exited 0.
    ///
    /// # Errors
    /// [`CriuError::Failed`] with its log's error lines.
    pub fn wait(mut self, cancel: Option<BorrowedFd<'_>>) -> Result<(), CriuError> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(source) => {
                    return Err(CriuError::Spawn {
                        action: self.action,
                        source,
                    });
                }
            }
            let cancelled = cancel.is_some_and(|fd| {
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).is_ok_and(|n| n > 0)
            });
            if cancel.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if cancelled {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(CriuError::Failed {
                    action: self.action,
                    status: "killed".into(),
                    excerpt: "called off (rollback) before every page was served".into(),
                    log: Some(self.log.clone()),
                });
            }
        };
        if status.success() {
            return Ok(());
        }
        Err(CriuError::Failed {
            action: self.action,
            status: status.to_string(),
            excerpt: log_excerpt(&self.log, ""),
            log: Some(self.log.clone()),
        })
    }
}

/// `criu dump` of the tree at `pid`: the arguments of every dump.
fn dump_args(pid: i32, images: &Path, log: &Path, run_as: Option<&Creds>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["dump".into(), "--tree".into(), pid.to_string().into()];
    args.extend(common_args(images, log, false));
    // criu as a non-root user always needs it ("Running as non-root requires
    // '--unprivileged'"), even when the launcher itself is fully privileged.
    if run_as.is_some() && !args.iter().any(|a| a == "--unprivileged") {
        args.push("--unprivileged".into());
    }
    args.push("--leave-stopped".into());
    args.push("--skip-in-flight".into());
    args
}

/// `post_copy`: the target's lazy restore and its lazy-pages daemon, which need CRIU's
/// privileged mode ([`post_copy_privileged`]).
fn common_args(images: &Path, log: &Path, post_copy: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--images-dir".into(), images.as_os_str().to_owned()];
    args.extend([
        "--log-file".into(),
        log.as_os_str().to_owned(),
        "-v4".into(),
    ]);
    // criu's work directory (its cwd, stats files): the state directory, never the images'
    // directory, which may be the user's unpacked archive that must stay untouched.
    if let Some(dir) = log.parent() {
        args.extend(["--work-dir".into(), dir.as_os_str().to_owned()]);
    }
    args.extend(
        [
            "--manage-cgroups=ignore",
            "--tcp-close",
            "--ext-unix-sk",
            "--file-locks",
        ]
        .into_iter()
        .map(OsString::from),
    );
    let privileged = if post_copy {
        post_copy_privileged()
    } else {
        privileged()
    };
    if !privileged {
        args.push("--unprivileged".into());
    }
    args
}

/// Whether criu may run in its privileged mode: as root holding the capabilities that mode
/// uses beyond CAP_SYS_ADMIN. Anything less gets `--unprivileged`: measured under the kubelet,
/// a root container with SYS_ADMIN but not NET_ADMIN failed its restore in privileged mode
/// (`net: Unable to create a veth pair`, `Unable to set socket SO_SNDBUFFORCE/SO_RCVBUFFORCE:
/// Operation not permitted`), and a non-root criu must always say `--unprivileged`.
fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
        && [
            CAP_SYS_ADMIN,
            CAP_NET_ADMIN,
            CAP_SYS_RESOURCE,
            CAP_SYS_PTRACE,
        ]
        .into_iter()
        .all(has_effective)
}

/// Whether criu may run privileged for post-copy (the lazy restore and `criu lazy-pages`).
/// Under `--unprivileged` criu skips its userfaultfd probe (CRIU's kerndat.c): the daemon
/// then exits 1 without a word, and the restore would open the app's userfaultfd without the
/// non-cooperative events (fork, mremap, munmap) the daemon relies on. So post-copy needs the
/// privileged mode: root, SYS_ADMIN, NET_ADMIN (sockets are restored with SO_SNDBUFFORCE),
/// SYS_CHROOT (the restore always chroots there: "Can't change root: Operation not
/// permitted" without it), and SYS_PTRACE (userfaultfd while vm.unprivileged_userfaultfd is
/// 0). Not SYS_RESOURCE: without it privileged criu cannot raise its own RLIMIT_NOFILE (a
/// warning) nor give the app a hard limit above the target container's (CRIU ignores that
/// setrlimit's failure, as under `--unprivileged`).
fn post_copy_privileged() -> bool {
    nix::unistd::geteuid().is_root()
        && [CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_CHROOT]
            .into_iter()
            .all(has_effective)
}

/// The pipe size CRIU's page server asks for (`F_SETPIPE_SZ` of `PIPE_MAX_SIZE` pages, 819,
/// which the kernel rounds up to a power of two): its lazy dump reads each run of pages
/// through such a pipe. Above `fs.pipe-max-size` the kernel wants CAP_SYS_RESOURCE; without
/// either the pipe keeps its 16 pages and the dump fails on the first longer run (measured:
/// `page-pipe: tee: 65536`).
const LAZY_DUMP_PIPE_BYTES: u64 = 4 << 20;

/// Why this container cannot be the source of a post-copy (`--lazy`), if it cannot; None
/// when it can. A lazy dump keeps all of the app's memory in pipes until the target has it:
/// - the page server's pipe must be [`LAZY_DUMP_PIPE_BYTES`]: `fs.pipe-max-size` at least
///   that, or CAP_SYS_RESOURCE (which a criu run as the app's user, `as_app_user`, does not
///   keep);
/// - without CAP_SYS_ADMIN (or SYS_RESOURCE) the kernel limits one user's pipes, across the
///   whole node, to `fs.pipe-user-pages-soft` pages (16384 = 64 MiB by default) and then
///   gives out 2-page pipes (measured: `page-pipe: tee: 8192`).
pub fn post_copy_source_blocked(as_app_user: bool) -> Option<String> {
    let sysctl = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/sys/fs/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let resource = !as_app_user && has_effective(CAP_SYS_RESOURCE);
    let mut reasons = Vec::new();
    // Unreadable settings are taken as the kernel's defaults.
    let max = sysctl("pipe-max-size").unwrap_or(1 << 20);
    if !resource && max < LAZY_DUMP_PIPE_BYTES {
        reasons.push(format!(
            "CRIU's lazy dump needs pipes of {LAZY_DUMP_PIPE_BYTES} bytes and this node's fs.pipe-max-size is {max}: raise it on the source node (`sysctl -w fs.pipe-max-size={LAZY_DUMP_PIPE_BYTES}`), or add SYS_RESOURCE to the container's capabilities"
        ));
    }
    let soft = sysctl("pipe-user-pages-soft").unwrap_or(16384);
    if !resource && !has_effective(CAP_SYS_ADMIN) && soft != 0 {
        reasons.push(format!(
            "a lazy dump holds the app's memory in pipes until the target has it, and without SYS_ADMIN the kernel limits a user's pipes across the node to fs.pipe-user-pages-soft ({soft} pages): add SYS_ADMIN to the container's capabilities, or set fs.pipe-user-pages-soft=0 on the source node"
        ));
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Checks, before running criu, that this container has the capabilities `action` needs
/// (found by experiment, `docs/security.md`): CAP_CHECKPOINT_RESTORE for both (criu
/// only logs "Effective capability 40 missing"), and CAP_SETPCAP to restore (criu re-applies
/// the app's capability bounding set; without it the restored task dies in rt_sigreturn with
/// a segfault). CAP_SYS_ADMIN covers all of them.
///
/// # Errors
/// [`CriuError::Capabilities`] naming what to add to the pod's securityContext.
pub fn check_capabilities(action: &'static str) -> Result<(), CriuError> {
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN covers what CAP_CHECKPOINT_RESTORE allows (measured: a pod with SYS_ADMIN
    // and without CHECKPOINT_RESTORE migrates), but not the bounding-set drop SETPCAP allows
    // (measured without SETPCAP and with SYS_ADMIN: `BUG at criu/pie/restorer.c`).
    if !has_effective(CAP_CHECKPOINT_RESTORE) && !has_effective(CAP_SYS_ADMIN) {
        missing.push("CAP_CHECKPOINT_RESTORE");
    }
    if action == "restore" && !has_effective(CAP_SETPCAP) {
        missing.push("CAP_SETPCAP");
    }
    // Post-copy: `criu lazy-pages` works only in CRIU's privileged mode: under
    // `--unprivileged` its kernel probe skips userfaultfd and the daemon exits 1 without a
    // word in its log (read in CRIU's kerndat.c, and measured). The userfaultfd system call
    // itself needs CAP_SYS_PTRACE while vm.unprivileged_userfaultfd is 0.
    if action == "lazy-pages" && !post_copy_privileged() {
        let lazy: Vec<&str> = [
            (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
            (CAP_SYS_CHROOT, "CAP_SYS_CHROOT"),
        ]
        .into_iter()
        .filter(|(cap, _)| !has_effective(*cap))
        .map(|(_, name)| name)
        .collect();
        return Err(CriuError::Capabilities {
            action,
            missing: if nix::unistd::geteuid().is_root() {
                lazy.join(", ")
            } else {
                "root".into()
            },
            fix: "post-copy needs CRIU's privileged mode in the target container (root, with SYS_ADMIN, NET_ADMIN, SYS_CHROOT and SYS_PTRACE); migrate without --lazy".into(),
        });
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CriuError::Capabilities {
            action,
            missing: missing.join(", "),
            fix: crate::caps::non_root_hint().unwrap_or_else(|| {
                "add it to the container's securityContext.capabilities.add".to_string()
            }),
        })
    }
}

/// What a CRIU error with a known cause means, and what to change in the pod spec.
pub fn known_cause(excerpt: &str) -> Option<&'static str> {
    if excerpt.contains("Can't get rlimit") && excerpt.contains("Operation not permitted") {
        // criu/cr-dump.c: prlimit() of a task of another user needs CAP_SYS_RESOURCE.
        return Some(
            "the app runs as another user than the launcher, and CRIU needs CAP_SYS_RESOURCE to read that user's limits: add SYS_RESOURCE to the container's securityContext.capabilities.add",
        );
    }
    if excerpt.contains("SysVIPC shmem map") || excerpt.contains("doesn't live in IPC ns") {
        return Some(
            "the app has a SysV shared-memory segment attached; it lives in the container's IPC namespace, which a checkpoint taken inside the container cannot carry",
        );
    }
    if excerpt.contains("fsnotify") && excerpt.contains("Can't dump that handle") {
        // criu/fsnotify.c: without CAP_SYS_ADMIN a watch's file handle cannot be resolved.
        return Some(
            "the app holds an inotify or fanotify watch, which CRIU run inside the container cannot dump without CAP_SYS_ADMIN: stop watching files in this app (poll instead), or do not migrate it",
        );
    }
    if excerpt.contains("Unable to set perms") && excerpt.contains("Operation not permitted") {
        // criu/util.c: restoring the mode of a file (a Unix socket's) that belongs to the
        // app's user, from a root launcher.
        return Some(
            "criu restores a file of the app's user and needs CAP_FOWNER to set its mode: add FOWNER to the container's securityContext.capabilities.add",
        );
    }
    if excerpt.contains("Can't open file") && excerpt.contains("Permission denied") {
        // criu/files-reg.c: a root launcher restoring files (a working directory, data files)
        // that only the app's user may open.
        return Some(
            "criu restores files that only the app's user may open and needs CAP_DAC_OVERRIDE to open them: add DAC_OVERRIDE to the container's securityContext.capabilities.add",
        );
    }
    if excerpt.contains("Effective capability 40 missing") {
        return Some("add CHECKPOINT_RESTORE to the container's securityContext.capabilities.add");
    }
    None
}

/// CRIU's `Error` lines from its log, minus the probes it always logs on a container without
/// them (tun, raising RLIMIT_NOFILE), last five; else what it printed on stderr.
pub fn log_excerpt(log: &Path, stderr: &str) -> String {
    let text = read_log(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("Error (") && !l.contains("criu/tun.c") && !l.contains("RLIMIT_NOFILE")
        })
        .map(|l| l.split_once(") ").map_or(l, |(_, rest)| rest).trim())
        .collect();
    if errors.is_empty() {
        let printed: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if printed.is_empty() {
            return "criu logged no error line".into();
        }
        return printed[printed.len().saturating_sub(3)..].join("; ");
    }
    errors[errors.len().saturating_sub(5)..].join("; ")
}

/// A log criu wrote, read without following a symlink at its name (criu may have run as the
/// app's user, and the launcher reading it may be root) and only up to [`LOG_LIMIT`].
fn read_log(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = Vec::new();
    file.take(LOG_LIMIT).read_to_end(&mut text)?;
    Ok(text)
}

/// How much of a criu log is read (a -v4 dump log of a large app is a few MiB).
const LOG_LIMIT: u64 = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_errors_with_a_known_cause_say_what_to_add() {
        let rlimit = "Can't get rlimit 0: Operation not permitted";
        assert!(known_cause(rlimit).is_some_and(|c| c.contains("SYS_RESOURCE")));
        let shm = "Task 1000 with SysVIPC shmem map @7f0000000000 doesn't live in IPC ns";
        assert!(known_cause(shm).is_some_and(|c| c.contains("SysV shared-memory")));
        assert!(
            known_cause("Effective capability 40 missing")
                .is_some_and(|c| c.contains("CHECKPOINT_RESTORE"))
        );
        assert_eq!(known_cause("Can't dump inet socket"), None);
    }
}
