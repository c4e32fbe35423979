//! `node-sandbox`: runs a command as PID 1 of fresh mount, PID, UTS, IPC, network and cgroup
//! namespaces with a root filesystem directory as `/`, the way a container runtime starts a
//! container. Tests use one root copy per "node".
//!
//! The mount tree is what CRIU needs (measured; `docs/testing.md`): a plain chroot makes
//! `criu` fail with `mnt: No parent found for mountpoint`, so the root is bind-mounted onto
//! itself and made the real root with `pivot_root`, with proc, sysfs, a tmpfs /dev holding
//! bind-mounted device nodes and a private devpts, and tmpfs /dev/shm and /run.
//!
//! ```text
//! node-sandbox --root DIR [--hostname NAME] [--keep-caps CAP,...] [--env K=V]... -- CMD [ARGS...]
//! ```
//! Exits with CMD's status (128+N when killed by signal N). With `--keep-caps`, every other
//! capability is dropped from the bounding, effective, permitted and inheritable sets before
//! exec, as a runtime does for a pod's `securityContext.capabilities`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, pivot_root};

#[derive(Debug, Parser)]
struct Options {
    /// Root filesystem directory to become `/`.
    #[arg(long)]
    root: PathBuf,
    /// Host name inside the sandbox.
    #[arg(long, default_value = "node")]
    hostname: String,
    /// Keep only these capabilities (names like CAP_SYS_PTRACE, comma separated).
    #[arg(long, value_delimiter = ',')]
    keep_caps: Option<Vec<String>>,
    /// Extra environment for CMD.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// The command to run as PID 1.
    #[arg(required = true, trailing_var_arg = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let options = Options::parse();
    match run(&options) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("node-sandbox: error: {error:#}");
            ExitCode::from(125)
        }
    }
}

fn run(options: &Options) -> Result<u8> {
    let root = options
        .root
        .canonicalize()
        .with_context(|| format!("root {}", options.root.display()))?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .context("unshare namespaces (needs root)")?;
    #[allow(unsafe_code)]
    // SAFETY: single-threaded program; the child only makes system calls and then execs.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            // Dies with the sandbox process, so a killed test takes its node down.
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            let error = become_container(options, &root).err();
            eprintln!(
                "node-sandbox: error: {:#}",
                error.unwrap_or_else(|| anyhow::anyhow!("exec returned"))
            );
            std::process::exit(125);
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code as u8),
                Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as u8),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => bail!("waitpid: {error}"),
            }
        },
    }
}

/// In the new namespaces, as PID 1: build the mount tree, pivot into it, drop capabilities,
/// exec the command. Returns only on error.
fn become_container(options: &Options, root: &Path) -> Result<()> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .context("make / private")?;
    mount(
        Some(root),
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .context("bind root")?;
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    std::fs::create_dir_all(at("/proc"))?;
    mount(
        Some("proc"),
        &at("/proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .context("mount proc")?;
    std::fs::create_dir_all(at("/sys"))?;
    mount(
        Some("sysfs"),
        &at("/sys"),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .context("mount sysfs")?;
    std::fs::create_dir_all(at("/dev"))?;
    mount(
        Some("tmpfs"),
        &at("/dev"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=755,size=65536k"),
    )
    .context("mount /dev")?;
    for device in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = at(&format!("/dev/{device}"));
        std::fs::write(&target, b"")?;
        mount(
            Some(Path::new("/dev").join(device).as_path()),
            &target,
            none,
            MsFlags::MS_BIND,
            none,
        )
        .with_context(|| format!("bind /dev/{device}"))?;
    }
    std::fs::create_dir_all(at("/dev/pts"))?;
    mount(
        Some("devpts"),
        &at("/dev/pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )
    .context("mount devpts")?;
    std::os::unix::fs::symlink("pts/ptmx", at("/dev/ptmx"))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, at(&format!("/dev/{link}")))?;
    }
    for dir in ["/dev/shm", "/run"] {
        std::fs::create_dir_all(at(dir))?;
        mount(
            Some("tmpfs"),
            &at(dir),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )
        .with_context(|| format!("mount {dir}"))?;
    }
    // A CNI plugin leaves loopback up; CRIU needs it (kerndat's TCP-repair probe connects to
    // 127.0.0.1 and fails with "Network is unreachable" otherwise).
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("run `ip` (iproute2)")?;
    if !status.success() {
        bail!("`ip link set lo up` failed: {status}");
    }
    let old_root = at("/.old-root");
    std::fs::create_dir_all(&old_root)?;
    pivot_root(root, &old_root).context("pivot_root")?;
    std::env::set_current_dir("/")?;
    umount2("/.old-root", MntFlags::MNT_DETACH).context("detach the old root")?;
    std::fs::remove_dir("/.old-root")?;
    nix::unistd::sethostname(&options.hostname).context("sethostname")?;
    close_other_fds();
    if let Some(keep) = &options.keep_caps {
        drop_capabilities(keep)?;
    }
    exec(options)
}

/// Marks every fd above stderr close-on-exec, as a runtime gives a container only stdio.
fn close_other_fds() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&fd| fd > 2)
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        // SAFETY: only the close-on-exec flag of a number we were handed changes.
        #[allow(unsafe_code)]
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// Keeps only `keep` in every capability set, as a container runtime does.
fn drop_capabilities(keep: &[String]) -> Result<()> {
    use caps::{CapSet, Capability, CapsHashSet};
    let mut wanted = CapsHashSet::new();
    for name in keep.iter().filter(|n| !n.is_empty()) {
        let cap: Capability = name
            .parse()
            .map_err(|e| anyhow::anyhow!("capability {name}: {e}"))?;
        wanted.insert(cap);
    }
    for cap in caps::all() {
        if !wanted.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("drop {cap} from the bounding set"))?;
        }
    }
    caps::set(None, CapSet::Inheritable, &wanted)?;
    caps::set(None, CapSet::Effective, &wanted)?;
    caps::set(None, CapSet::Permitted, &wanted)?;
    // Keep them across exec for a root PID 1, as runc does by also setting the ambient set.
    for cap in &wanted {
        caps::raise(None, CapSet::Ambient, *cap)?;
    }
    Ok(())
}

fn exec(options: &Options) -> Result<()> {
    let program = CString::new(options.command[0].as_str())?;
    let args: Vec<CString> = options
        .command
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()?;
    let mut env: Vec<CString> = vec![
        CString::new("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")?,
        CString::new("HOME=/root")?,
    ];
    for (key, value) in std::env::vars() {
        if key.starts_with("RESTORE_LAUNCHER_") {
            env.push(CString::new(format!("{key}={value}"))?);
        }
    }
    for kv in &options.env {
        env.push(CString::new(kv.as_str())?);
    }
    nix::unistd::execve(&program, &args, &env)
        .with_context(|| format!("exec {}", options.command[0]))?;
    Ok(())
}
