//! Starting the app: raise the PID namespace's counter above the PID floor, then run the
//! command in its own session with stdin on /dev/null and stdout/stderr on pipes the
//! launcher owns.
//!
//! Why a PID floor: CRIU restores every process with its original PID (clone3 `set_tid`),
//! and the restore fails with `Can't fork for N: File exists` if the target container
//! already uses one of them (measured with CRIU 4.x; `docs/architecture.md`). The low PIDs of a fresh
//! container are taken by the launcher, `kubectl exec` sessions and criu itself, so the app
//! and all its descendants must live above a floor. `clone3` with `set_tid` would place the
//! app's own PID but not move the namespace's PID counter, so the app's children would come
//! out low again; and writing `/proc/sys/kernel/ns_last_pid` is impossible in a pod (read-only
//! /proc/sys). So the counter is advanced the portable way: fork throw-away children that exit
//! at once until the next PID handed out is above the floor.
//!
//! Why pipes: the app's stdio must be files the launcher owns inside the container, so CRIU
//! can dump them (an fd inherited from outside the mount namespace makes `criu dump` fail) and
//! the restoring launcher can re-attach its own pipes with `--inherit-fd`.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, setsid};

use crate::exit_status;

/// Where `ns_last_pid` can be read (writable only with CAP_CHECKPOINT_RESTORE, readable by all).
const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

/// What advancing the PID counter did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorReport {
    /// Throw-away children forked.
    pub forks: u32,
    /// The last PID handed out before the app is started.
    pub last_pid: i32,
}

/// The started app: its PID (also its session and process-group id) and the read ends of
/// its output pipes.
#[derive(Debug)]
pub struct App {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Errors starting the app. All of them happen before the app runs, so they end the launcher
/// with the exit code of [`SpawnError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot fork to advance the PID counter to the PID floor {floor}")]
    Burn {
        floor: i32,
        #[source]
        source: nix::Error,
    },
    #[error("`{}`: command not found{searched}; check the image's CMD or the pod's `command`/`args`", program.to_string_lossy())]
    NotFound { program: OsString, searched: String },
    #[error("cannot execute `{}`; check that it exists and is executable in the image", program.to_string_lossy())]
    CannotExecute {
        program: OsString,
        #[source]
        source: io::Error,
    },
    #[error("no command given to run")]
    Empty,
    #[error("RESTORE_LAUNCHER_IPC_NAMESPACE (--ipc-namespace) needs {0}")]
    IpcNamespace(String),
}

impl SpawnError {
    /// Launcher exit code for this failure: 127 not found, 126 not executable, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            SpawnError::NotFound { .. } => exit_status::NOT_FOUND,
            SpawnError::CannotExecute { .. } => exit_status::CANNOT_EXECUTE,
            SpawnError::Burn { .. } | SpawnError::Empty | SpawnError::IpcNamespace(_) => 1,
        }
    }
}

/// Marks every file descriptor above stderr that the launcher inherited close-on-exec, so the
/// app never gets them. Such fds were opened outside the container (by the runtime or whoever
/// started us), and CRIU cannot dump a process holding one: `criu dump` fails with
/// `Can't lookup mount=… for fd=…` (seen here with a leaked /dev/null). catatonit closes them
/// for the same reason; marking them keeps them usable by the launcher itself.
pub fn keep_inherited_fds_from_app() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!(
            "cannot list /proc/self/fd; inherited file descriptors may leak into the app"
        );
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        #[allow(unsafe_code)]
        // SAFETY: only the fd's close-on-exec flag changes; a stale number (the listing's own
        // directory fd, already closed) makes fcntl fail with EBADF, which is ignored.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// Reads the namespace's last handed-out PID, if the kernel exposes it.
fn read_last_pid() -> Option<i32> {
    std::fs::read_to_string(NS_LAST_PID)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Forks throw-away children until the next PID handed out is at least `floor`.
///
/// Stops early, with what it reached, if the counter wraps (a `pid_max` below the floor).
///
/// # Errors
/// [`SpawnError::Burn`] when `fork` fails (for example a pids cgroup limit below the floor).
pub fn advance_pid_counter(floor: i32) -> Result<FloorReport, SpawnError> {
    let mut report = FloorReport {
        forks: 0,
        last_pid: read_last_pid().unwrap_or(0),
    };
    while report.last_pid < floor - 1 {
        let child = burn_one().map_err(|source| SpawnError::Burn { floor, source })?;
        report.forks += 1;
        if child.as_raw() < report.last_pid {
            tracing::warn!(
                floor,
                reached = report.last_pid,
                "the PID counter wrapped before reaching the PID floor (kernel.pid_max is lower); \
                 restored PIDs may collide, lower --pid-floor"
            );
            report.last_pid = child.as_raw();
            break;
        }
        report.last_pid = child.as_raw();
    }
    Ok(report)
}

/// Whether `--ipc-namespace` can work here: a root launcher (criu must write the new
/// namespace's sysctls at restore, which the kernel lets only uid 0 do) with CAP_SYS_ADMIN
/// (to create it).
///
/// # Errors
/// [`SpawnError::IpcNamespace`] saying which is missing.
pub fn check_ipc_namespace() -> Result<(), SpawnError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Err(SpawnError::IpcNamespace(format!(
            "the launcher to run as root, since restoring the namespace writes its sysctls, which the kernel lets only uid 0 do; the container runs as uid {euid}: run it as root and start the app as its user with RESTORE_LAUNCHER_USER"
        )));
    }
    if !crate::caps::has_sys_admin() {
        return Err(SpawnError::IpcNamespace(
            "CAP_SYS_ADMIN to give the app an IPC namespace of its own: add SYS_ADMIN to the container's securityContext.capabilities.add, or turn the option off if the app holds no SysV IPC objects".into(),
        ));
    }
    Ok(())
}

/// Forks a child that exits at once, reaps it, and returns its PID.
fn burn_one() -> nix::Result<Pid> {
    #[allow(unsafe_code)]
    // SAFETY: the launcher is single-threaded here (no thread is ever started before the app
    // is spawned), and the child only calls the async-signal-safe `_exit`.
    let forked = unsafe { fork() }?;
    match forked {
        ForkResult::Child => {
            #[allow(unsafe_code)]
            // SAFETY: `_exit` skips atexit handlers and stdio flushing, which belong to the parent.
            unsafe {
                libc::_exit(0)
            }
        }
        ForkResult::Parent { child } => {
            loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => {
                        other?;
                        break;
                    }
                }
            }
            Ok(child)
        }
    }
}

/// Starts `command` in a new session with the original signal mask, stdin on /dev/null and
/// stdout/stderr on fresh pipes whose read ends are returned.
///
/// # Errors
/// [`SpawnError::NotFound`] / [`SpawnError::CannotExecute`] when exec fails; the child never
/// ran any app code then.
pub fn spawn(
    command: &[OsString],
    original_mask: &SigSet,
    ipc_namespace: bool,
    user: Option<&crate::creds::Creds>,
) -> Result<App, SpawnError> {
    let user = user.cloned();
    let masks = crate::caps::own_masks();
    let (program, args) = command.split_first().ok_or(SpawnError::Empty)?;
    if ipc_namespace {
        check_ipc_namespace()?;
    }
    let mask = *original_mask;
    let mut cmd = Command::new(program);
    cmd.args(args)
        // The sealing key is the launcher's, not the app's (nor its checkpoints').
        .env_remove(crate::seal::KEY_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(creds) = &user {
        // As gosu and su do: the app finds its own home and name.
        if let Ok(Some(entry)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(creds.uid))
        {
            cmd.env("HOME", &entry.dir)
                .env("USER", &entry.name)
                .env("LOGNAME", &entry.name);
        }
    }
    #[allow(unsafe_code)]
    // SAFETY: runs in the forked child before exec; setsid, sigprocmask, unshare, prctl,
    // capset, setgroups and setres[ug]id are async-signal-safe system calls on data prepared
    // before the fork, and no memory is allocated.
    unsafe {
        cmd.pre_exec(move || {
            // Own session and process group: the app's group is what signals are forwarded to,
            // and CRIU refuses to dump a tree whose session leader lies outside it.
            setsid()?;
            // The launcher blocks nearly every signal; exec keeps the mask, so give it back.
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None)?;
            // --ipc-namespace: SysV objects the app creates live in a namespace CRIU carries.
            if ipc_namespace {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)?;
            }
            // The launcher's capabilities are for criu, not the app (crate::caps).
            crate::caps::drop_for_app(masks)?;
            // --user: the app runs as that user from its first instruction.
            if let Some(creds) = &user {
                crate::creds::become_user(creds)?;
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| match exit_status::from_spawn_error(&source) {
            exit_status::NOT_FOUND => SpawnError::NotFound {
                program: program.clone(),
                // A bare name was looked up in PATH: say where, since that is what to fix.
                searched: if program.as_encoded_bytes().contains(&b'/') {
                    String::new()
                } else {
                    format!(" in PATH={}", std::env::var("PATH").unwrap_or_default())
                },
            },
            _ => SpawnError::CannotExecute {
                program: program.clone(),
                source,
            },
        })?;
    let pid = Pid::from_raw(child.id() as i32);
    // Both were requested as piped just above, so std always creates them.
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr were configured as pipes");
    };
    // The child is reaped by the supervisor's waitpid(-1) loop, not through `Child`.
    drop(child);
    Ok(App {
        pid,
        stdout: stdout.into(),
        stderr: stderr.into(),
    })
}
