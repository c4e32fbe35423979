//! The launcher's own capabilities, and how they reach CRIU but not the app.
//!
//! As root (uid 0) the launcher holds every capability of the container's bounding set, and so
//! does criu after exec; nothing here changes that.
//!
//! As any other user -- a pod with `runAsUser`/`runAsNonRoot`, an image with `USER postgres` --
//! a process gets no capability from the runtime, whatever `capabilities.add` says: the kernel
//! clears the permitted set on exec for a non-root user, and Kubernetes sets no ambient
//! capabilities (kubernetes/kubernetes#56374). Measured under the local cluster's kubelet with
//! `runAsUser: 1000` and `add: [CHECKPOINT_RESTORE, SETPCAP]`: `CapBnd 0000010000000100`, but
//! `CapPrm`/`CapEff` all zero. The one way in is a *file capability* on the launcher binary:
//! the base image marks `/usr/local/bin/restore-launcher` with `cap_checkpoint_restore,
//! cap_setpcap,cap_sys_admin+p` (permitted only, no effective bit, so a pod whose bounding set
//! lacks one still starts; it gets what both allow: file ∩ bounding). Under `no_new_privs`
//! (`allowPrivilegeEscalation: false`) the kernel caps what an exec gains at the permitted set
//! the process had before; runc puts the granted capabilities there before it switches to the
//! container's user and execs, so they survive (measured: a uid-1000 pod with
//! `allowPrivilegeEscalation: false` migrates).
//!
//! [`adopt`] then makes the permitted capabilities effective (for clone3 `set_tid`), inheritable
//! and ambient, so that criu -- an ordinary binary exec'd by the launcher -- receives them.
//! The app must not: [`drop_for_app`] runs in the app's child before exec and clears the
//! ambient and inheritable sets, so a non-root app starts with no capability at all, as it
//! would without the launcher.

use caps::{CapSet, Capability};

/// Whether this process is a non-root user holding capabilities (from the launcher binary's
/// file capabilities): then nothing the environment says may choose a binary it runs with
/// them (the criu module takes criu only from a fixed root-owned path), and it
/// runs only as the container's PID 1 (`borrowed`).
pub fn privileged_non_root() -> bool {
    nix::unistd::geteuid().as_raw() != 0
        && caps::read(None, CapSet::Permitted).is_ok_and(|set| !set.is_empty())
}

/// Whether `no_new_privs` is set (`allowPrivilegeEscalation: false`): an exec then gains no
/// capability from a file.
pub fn no_new_privs() -> bool {
    crate::procfs::status(None)
        .is_some_and(|status| crate::procfs::field(&status, "NoNewPrivs") == Some("1"))
}

/// Why this launcher must not run: a non-root launcher that gained capabilities from its file
/// and is not the container's PID 1 was started by something inside the container -- the app
/// or a shell of its user -- which would run its own code with them (`--criu`, its
/// environment, a PATH of its choosing). Under `no_new_privs` no exec gains them, so nothing
/// can be borrowed.
pub fn borrowed(pid: u32) -> Option<String> {
    // The container's first process: PID 1, or started by the runtime from outside the PID
    // namespace (parent 0), as under `shareProcessNamespace` (the pause process is PID 1).
    let first = pid == 1 || nix::unistd::getppid().as_raw() == 0;
    if first || !privileged_non_root() || no_new_privs() {
        return None;
    }
    let held = caps::read(None, CapSet::Permitted)
        .map(|set| {
            let mut names: Vec<String> = set
                .iter()
                .map(|c| c.to_string().trim_start_matches("CAP_").to_string())
                .collect();
            names.sort();
            names.join(", ")
        })
        .unwrap_or_default();
    Some(format!(
        "not starting: this launcher runs as uid {} with the capabilities of its file ({held}) but is not the container's PID 1, so something inside the container started it and could use them to run its own code. The launcher runs as the container's entrypoint only; to run it otherwise, set `allowPrivilegeEscalation: false` in the container's securityContext, under which it gains nothing",
        nix::unistd::geteuid()
    ))
}

/// What [`adopt`] did, for the log and for error messages.
#[derive(Debug, Clone, Default)]
pub struct Adopted {
    /// The effective user id (0: nothing was done).
    pub euid: u32,
    /// Capabilities now effective and passed on to criu as ambient ones.
    pub held: Vec<String>,
}

/// As a non-root user, makes every permitted capability effective, inheritable and ambient (see
/// the module documentation). As root, does nothing.
pub fn adopt() -> Adopted {
    let euid = nix::unistd::geteuid().as_raw();
    let mut adopted = Adopted {
        euid,
        held: Vec::new(),
    };
    if euid == 0 {
        return adopted;
    }
    let permitted = match caps::read(None, CapSet::Permitted) {
        Ok(set) => set,
        Err(error) => {
            tracing::warn!(%error, "cannot read the launcher's capabilities");
            return adopted;
        }
    };
    if permitted.is_empty() {
        return adopted;
    }
    for set in [CapSet::Effective, CapSet::Inheritable] {
        if let Err(error) = caps::set(None, set, &permitted) {
            tracing::warn!(%error, ?set, "cannot raise the launcher's capabilities");
        }
    }
    let mut held: Vec<Capability> = permitted.iter().copied().collect();
    held.sort_by_key(|c| c.index());
    for cap in &held {
        if let Err(error) = caps::raise(None, CapSet::Ambient, *cap) {
            tracing::warn!(%error, %cap, "cannot pass a capability on to criu");
        }
    }
    adopted.held = held.iter().map(ToString::to_string).collect();
    tracing::debug!(euid, held = ?adopted.held, "capabilities from the launcher's file capabilities");
    adopted
}

/// The launcher's (effective, permitted) capability masks, read before forking the app, for
/// [`drop_for_app`].
pub fn own_masks() -> (u64, u64) {
    let status = crate::procfs::status(None).unwrap_or_default();
    (
        status_mask(&status, "CapEff").unwrap_or(0),
        status_mask(&status, "CapPrm").unwrap_or(0),
    )
}

/// The capability set `field` (`CapEff`, `CapPrm`, `CapAmb` …) of a /proc/PID/status text
/// as a mask; `None` when the line is missing or unreadable.
pub fn status_mask(status: &str, field: &str) -> Option<u64> {
    crate::procfs::field(status, field).and_then(|hex| u64::from_str_radix(hex, 16).ok())
}

/// Clears the ambient and inheritable sets in the app's child before exec (keeping
/// `masks`, the effective and permitted sets, which exec recomputes), so the app gets none of
/// the launcher's capabilities, not even through a binary with inheritable file capabilities.
/// Async-signal-safe (prctl, capset).
pub fn drop_for_app(masks: (u64, u64)) -> std::io::Result<()> {
    drop_ambient()?;
    capset(masks.0, masks.1, 0)?;
    Ok(())
}

/// Clears the ambient set. An old kernel without ambient capabilities (EINVAL) has nothing to
/// clear.
fn drop_ambient() -> std::io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: prctl with integer arguments only; no memory is touched.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc == -1 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
    }
    Ok(())
}

/// Why a non-root launcher lacks capabilities its pod grants, and what to change; `None` as
/// root (the pod spec's `capabilities.add` is then the whole story).
pub fn non_root_hint() -> Option<String> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 {
        return None;
    }
    let no_new_privs = no_new_privs();
    let bounding = caps::read(None, CapSet::Bounding).unwrap_or_default();
    let wanted = [Capability::CAP_CHECKPOINT_RESTORE, Capability::CAP_SETPCAP];
    let absent: Vec<String> = wanted
        .iter()
        .filter(|c| !bounding.contains(c))
        .map(|c| c.to_string().trim_start_matches("CAP_").to_string())
        .collect();
    Some(if !absent.is_empty() {
        format!(
            "the container runs as uid {euid} and its pod does not grant {}: add {} to securityContext.capabilities.add",
            absent.join(", "),
            if absent.len() == 1 { "it" } else { "them" }
        )
    } else if no_new_privs {
        format!(
            "the container runs as uid {euid}, and a non-root process gets capabilities only from the launcher binary's file capabilities; under no_new_privs (`allowPrivilegeEscalation: false`) the kernel grants them only up to what the runtime put in the permitted set before exec (runc and containerd do), which this runtime did not: remove `allowPrivilegeEscalation: false`"
        )
    } else {
        format!(
            "the container runs as uid {euid}, and a non-root process gets capabilities only from the launcher binary's file capabilities, which this one lacks: build the image FROM the restore-launcher base image (or `setcap cap_checkpoint_restore,cap_setpcap,cap_sys_admin+p` the launcher)"
        )
    })
}

/// Makes exactly the capabilities in `keep` (a mask the process holds in its permitted set)
/// effective, permitted, inheritable and ambient, so an exec that follows passes them on:
/// criu run as the app's user keeping CAP_CHECKPOINT_RESTORE.
///
/// Async-signal-safe: capset and prctl on integers.
pub fn keep_as_ambient(keep: u64) -> nix::Result<()> {
    capset(keep, keep, keep)?;
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            #[allow(unsafe_code)]
            // SAFETY: integer arguments only.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            nix::errno::Errno::result(rc)?;
        }
    }
    Ok(())
}

/// capset(2) with version 3 structures, all three sets given as 64-bit masks.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> nix::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = |mask: u64| mask as u32;
    let high = |mask: u64| (mask >> 32) as u32;
    let data = [
        Data {
            effective: low(effective),
            permitted: low(permitted),
            inheritable: low(inheritable),
        },
        Data {
            effective: high(effective),
            permitted: high(permitted),
            inheritable: high(inheritable),
        },
    ];
    #[allow(unsafe_code)]
    // SAFETY: header and data are valid repr(C) structures of the layout capset(2) expects
    // for _LINUX_CAPABILITY_VERSION_3 (two data elements).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Capability numbers (linux/capability.h).
pub const CAP_KILL: u32 = 5;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_CHROOT: u32 = 18;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYS_RESOURCE: u32 = 24;
pub const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Whether capability `cap` is in this process's effective set (from /proc/self/status).
pub fn has_effective(cap: u32) -> bool {
    own_masks().0 & (1u64 << cap) != 0
}

/// Whether the launcher runs with CAP_SYS_ADMIN (CRIU's privileged mode, file watches).
pub fn has_sys_admin() -> bool {
    has_effective(CAP_SYS_ADMIN)
}
