//! Users: the app's user when the launcher starts it as another one (`--user`, as gosu or
//! `setpriv` would), and criu run as the app's user to dump it.
//!
//! Why criu dumps as the app's user: a root criu dumping a tree of another user needs
//! CAP_SYS_PTRACE (ptrace across users) and CAP_SYS_RESOURCE (`prlimit` of another user's
//! process: `Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted`). Pods
//! rarely have those (and some nodes' root has no CAP_SYS_RESOURCE at all). criu running as
//! the app's own user, keeping CAP_CHECKPOINT_RESTORE (and SYS_ADMIN, SYS_PTRACE when held)
//! across the user switch as ambient capabilities, needs neither. The restore then runs as
//! root, which sets the app's credentials back (CAP_SETUID/CAP_SETGID) and may write an IPC
//! namespace's sysctls (the kernel's `ipc_permissions` lets only the namespace's root uid
//! write those, whatever capability another uid holds).

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User};

/// A user, group and supplementary groups, numeric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error(
        "--user (RESTORE_LAUNCHER_USER) `{0}`: no such user in the image's /etc/passwd; give a name from it or a numeric UID[:GID]"
    )]
    NoUser(String),
    #[error("--user (RESTORE_LAUNCHER_USER) `{0}`: no such group in the image's /etc/group")]
    NoGroup(String),
    #[error(
        "--user (RESTORE_LAUNCHER_USER) needs the launcher to run as root, to start the app as that user; the container runs as uid {0}: drop runAsUser, or drop --user and let the whole container run as the app's user"
    )]
    NotRoot(u32),
    #[error(
        "--user (RESTORE_LAUNCHER_USER) needs {0}, which this container lacks (SETUID and SETGID start the app as that user, KILL signals it): add them to the container's securityContext.capabilities.add"
    )]
    Capabilities(String),
}

/// Resolves `spec` (`NAME`, `UID`, `NAME:GROUP` or `UID:GID`) with the image's passwd and
/// group files, supplementary groups included, as `setpriv --init-groups` would. `None` when
/// the launcher already runs as that user (an image that sets RESTORE_LAUNCHER_USER, run by a
/// pod that sets the same `runAsUser`): there is nothing to switch.
///
/// # Errors
/// [`CredsError`] naming what is not found or missing.
pub fn resolve(spec: &str) -> Result<Option<Creds>, CredsError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        let wanted = lookup(spec)?;
        if wanted.uid == euid {
            return Ok(None);
        }
        return Err(CredsError::NotRoot(euid));
    }
    let missing: Vec<&str> = [
        (crate::caps::CAP_SETUID, "SETUID"),
        (crate::caps::CAP_SETGID, "SETGID"),
        (crate::caps::CAP_KILL, "KILL"),
    ]
    .into_iter()
    .filter(|(cap, _)| !crate::caps::has_effective(*cap))
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        return Err(CredsError::Capabilities(missing.join(", ")));
    }
    lookup(spec).map(Some)
}

fn lookup(spec: &str) -> Result<Creds, CredsError> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
        Err(_) => User::from_name(user).ok().flatten(),
    };
    let uid = match (&entry, user.parse::<u32>()) {
        (Some(entry), _) => entry.uid.as_raw(),
        (None, Ok(uid)) => uid,
        (None, Err(_)) => return Err(CredsError::NoUser(user.to_string())),
    };
    let gid = match group {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
                .ok_or_else(|| CredsError::NoGroup(group.to_string()))?,
        },
        None => entry.as_ref().map_or(uid, |e| e.gid.as_raw()),
    };
    let mut groups = vec![gid];
    if let Some(entry) = &entry {
        if let Ok(name) = CString::new(entry.name.as_str()) {
            if let Ok(list) = nix::unistd::getgrouplist(&name, Gid::from_raw(gid)) {
                groups = list.into_iter().map(Gid::as_raw).collect();
            }
        }
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(Creds { uid, gid, groups })
}

/// The credentials of process `pid` (effective uid and gid, supplementary groups), from
/// /proc/PID/status.
pub fn of_process(pid: i32) -> Option<Creds> {
    let status = crate::procfs::status(Some(pid))?;
    let field = |name: &str| -> Option<Vec<u32>> {
        Some(
            crate::procfs::field(&status, name)?
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect(),
        )
    };
    let uids = field("Uid")?;
    let gids = field("Gid")?;
    let mut groups = field("Groups").unwrap_or_default();
    groups.sort_unstable();
    Some(Creds {
        uid: *uids.get(1)?,
        gid: *gids.get(1)?,
        groups,
    })
}

/// Checks that every process of the restored tree rooted at `root` runs as `creds` (uid, gid,
/// groups) and holds no capability (permitted, effective, ambient).
///
/// # Errors
/// A message naming the first process that does not.
pub fn check_restored(root: i32, creds: &Creds) -> Result<(), String> {
    for pid in crate::tree::pids(nix::unistd::Pid::from_raw(root)) {
        let found = of_process(pid)
            .ok_or_else(|| format!("cannot read the credentials of restored process {pid}"))?;
        if found.uid != creds.uid || found.gid != creds.gid || found.groups != creds.groups {
            return Err(format!(
                "restored process {pid} runs as uid {} gid {} groups {:?}, not as RESTORE_LAUNCHER_USER's uid {} gid {} groups {:?}: the archive comes from a container that ran the app as another user",
                found.uid, found.gid, found.groups, creds.uid, creds.gid, creds.groups
            ));
        }
        let status = crate::procfs::status(Some(pid)).unwrap_or_default();
        for set in ["CapPrm", "CapEff", "CapAmb"] {
            let held = crate::caps::status_mask(&status, set).unwrap_or(u64::MAX);
            if held != 0 {
                return Err(format!(
                    "restored process {pid} holds capabilities ({} {held:#x}), which an app run as RESTORE_LAUNCHER_USER never has: the archive does not match this container",
                    set
                ));
            }
        }
    }
    Ok(())
}

/// Switches the calling process (the app's child before exec) to `creds`: groups, then
/// group, then user, all of real, effective and saved.
///
/// Async-signal-safe: system calls on data prepared before the fork.
pub fn become_user(creds: &Creds) -> nix::Result<()> {
    set_groups(&creds.groups)?;
    let gid = Gid::from_raw(creds.gid);
    nix::unistd::setresgid(gid, gid, gid)?;
    let uid = Uid::from_raw(creds.uid);
    nix::unistd::setresuid(uid, uid, uid)
}

fn set_groups(groups: &[u32]) -> nix::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: `groups` is a valid slice of gid_t (u32) for the duration of the call.
    let rc = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Like [`become_user`], keeping the capabilities in `keep` (a mask of capability numbers the
/// process holds) effective and passing them on as ambient ones through the exec that
/// follows: criu dumping as the app's user with CAP_CHECKPOINT_RESTORE.
///
/// Async-signal-safe: prctl, setgroups, setres[ug]id and capset on prepared data.
pub fn become_user_keeping(creds: &Creds, keep: u64) -> nix::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    nix::errno::Errno::result(rc)?;
    become_user(creds)?;
    // After the switch KEEPCAPS left the permitted set; effective and ambient were cleared.
    crate::caps::keep_as_ambient(keep)
}

/// Gives directory `dir` and the files in it, which criu wrote as the app's user, back to the
/// launcher's user, so that a root launcher without CAP_DAC_OVERRIDE can read them.
///
/// # Errors
/// A message naming the file and CAP_CHOWN.
pub fn take_back(dir: &std::path::Path) -> Result<(), String> {
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let take = |path: &std::path::Path| {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| {
            format!(
                "cannot take back {} from the app's user: {e}; add CHOWN to the container's securityContext.capabilities.add",
                path.display()
            )
        })
    };
    // The directory first: until it is the launcher's again, a launcher without
    // CAP_DAC_READ_SEARCH cannot list it. Followed: `dir` is the launcher's own path, or a
    // `/proc/self/fd/N` of a directory it opened; the entries below are never followed.
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
        format!(
            "cannot take back {} from the app's user: {e}; add CHOWN to the container's securityContext.capabilities.add",
            dir.display()
        )
    })?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        take(&entry.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credentials_of_this_process_are_read_from_proc() {
        let creds = of_process(std::process::id() as i32).unwrap();
        assert_eq!(creds.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(creds.gid, nix::unistd::getegid().as_raw());
    }
}
