//! The control socket between PID 1 and the sub-commands run next to it (`kubectl exec ...
//! restore-launcher checkpoint|receive|rollback|status`).
//!
//! A Unix stream socket in the state directory, created with mode 0600 (no window with a
//! wider mode), answering only peers of the launcher's own uid or root (`SO_PEERCRED`, not the
//! file mode alone). One PID 1 per state directory: it holds an exclusive lock on
//! `STATE_DIR/launcher.lock` for its life, and only the lock holder replaces the socket, so a
//! second launcher never unlinks a live one's socket. One request per connection: the client sends one JSON line, with the
//! stream to write or read passed along as a file descriptor (SCM_RIGHTS) — its stdout for
//! `checkpoint --output -`, its stdin for `receive --input -`, or a file it opened. PID 1 then
//! reads or writes that stream directly, without copying it through the client, and answers
//! with one JSON line (the report) before closing.

use std::io::{self, BufRead as _, BufReader, IoSlice, IoSliceMut, Write as _};
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// File name of the socket inside the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// How long a connected client may take to send its request before PID 1 drops it (PID 1
/// never waits for it: the request is read as it arrives).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line.
const REQUEST_LIMIT: usize = 64 * 1024;

/// What a client asks PID 1 to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Dump the app into an archive written to the passed fd.
    Checkpoint { leave_running: bool },
    /// Restore from an archive read from the passed fd.
    Receive,
    /// Resume the app frozen by the last checkpoint (or by `freeze`); with `committed`, also a
    /// copy whose migration committed (asked only once the target holds no copy).
    Rollback {
        #[serde(default)]
        committed: bool,
    },
    /// Stop the app's process tree (SIGSTOP) for a consistent multi-container checkpoint.
    /// With a lease, the app resumes by itself unless `commit` comes within it (renewed by
    /// `renew`): a migration whose driver died never leaves the app frozen for ever.
    Freeze {
        #[serde(default)]
        lease_seconds: Option<u64>,
        /// The longest the app may stay frozen, renewals or not, unless committed: what its
        /// liveness probes allow.
        #[serde(default)]
        limit_ms: Option<u64>,
        /// The migration it is for, reported as `ended_freeze` should it end uncommitted.
        #[serde(default)]
        migration: Option<String>,
    },
    /// Extend the lease of a frozen app by this many seconds from now.
    Renew { lease_seconds: u64 },
    /// The migration is committed: end the lease; the app never resumes on its own any more
    /// (only an explicit `rollback` resumes it). Refused once the lease has expired.
    Commit,
    /// Resume the app's process group (SIGCONT): after `freeze`, or after restoring a
    /// checkpoint that was taken frozen.
    Thaw,
    /// Report state.
    Status,
}

impl Request {
    /// Whether this request carries a stream fd.
    pub fn needs_fd(&self) -> bool {
        matches!(self, Request::Checkpoint { .. } | Request::Receive)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot use the state directory `{}`; set --state-dir (RESTORE_LAUNCHER_STATE_DIR) to a writable path such as an emptyDir", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on `{}`", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the launcher's control socket `{}`; is this running inside a container whose PID 1 is restore-launcher (same --state-dir)?", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another restore-launcher already runs with the state directory `{}`; give each its own --state-dir", path.display())]
    InUse {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the control connection failed")]
    Io(#[source] io::Error),
    #[error("the launcher closed the connection without an answer; see its log (`kubectl logs`)")]
    NoAnswer,
}

/// PID 1's listening socket, and the lock that makes it the state directory's only PID 1.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The lock file beside the socket.
const LOCK_NAME: &str = "launcher.lock";

/// Whether a peer of uid `peer` may drive the launcher running as `own`: the same user, or
/// root (`kubectl exec` runs as the container's user unless the pod says otherwise).
pub fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

impl Server {
    /// Creates the state directory (0700) and listens on its socket (0600), replacing a stale one.
    ///
    /// # Errors
    /// [`ControlError::StateDir`] or [`ControlError::Bind`].
    pub fn bind(state_dir: &Path) -> Result<Server, ControlError> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| ControlError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        // The directory holds the socket and the app's checkpoints: one made in advance by
        // another user (a shared /tmp) must not be used.
        let meta =
            std::fs::symlink_metadata(state_dir).map_err(|source| ControlError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        let own = nix::unistd::geteuid().as_raw();
        let owner = std::os::unix::fs::MetadataExt::uid(&meta);
        if owner != own {
            return Err(ControlError::StateDir {
                path: state_dir.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "it belongs to uid {owner}, not to this launcher's uid {own}; remove it, or name a directory below it (it is then created for this user)"
                    ),
                ),
            });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| ControlError::StateDir {
                    path: state_dir.to_path_buf(),
                    source,
                },
            )?;
        }
        let lock_path = state_dir.join(LOCK_NAME);
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| ControlError::Bind {
                path: lock_path.clone(),
                source,
            })?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| ControlError::InUse {
                path: state_dir.to_path_buf(),
                source: errno.into(),
            })?;
        let path = state_dir.join(SOCKET_NAME);
        // Ours alone now: a socket left there is a dead launcher's.
        let _ = std::fs::remove_file(&path);
        // Created 0600 (umask 0177 around bind), not chmod-ed after: no moment where another
        // user could connect. PID 1 is single-threaded here, before the app starts.
        let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(&path);
        nix::sys::stat::umask(previous);
        let listener = bound.map_err(|source| ControlError::Bind {
            path: path.clone(),
            source,
        })?;
        debug_assert_eq!(
            std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o777)
                .ok(),
            Some(0o600)
        );
        listener
            .set_nonblocking(true)
            .map_err(|source| ControlError::Bind {
                path: path.clone(),
                source,
            })?;
        Ok(Server {
            listener,
            path,
            _lock: lock,
        })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts one waiting connection, if any, without blocking: a peer that may not drive the
    /// launcher is answered and dropped; any other becomes a [`Pending`] connection whose
    /// request is read as it arrives (never waited for: a slow client must not stall PID 1).
    ///
    /// # Errors
    /// [`ControlError::Io`] when accepting fails.
    pub fn accept(&self) -> Result<Option<Pending>, ControlError> {
        let stream = match self.listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(error) => return Err(ControlError::Io(error)),
        };
        stream.set_nonblocking(true).map_err(ControlError::Io)?;
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|errno| ControlError::Io(errno.into()))?;
        let own = nix::unistd::geteuid().as_raw();
        if !peer_allowed(peer.uid(), own) {
            let _ = answer(
                &stream,
                &migrate_format::Answer::refused(
                    migrate_format::Refusal::NotAllowed,
                    None,
                    format!(
                        "refused: the launcher only takes requests from its own user (uid {own}) or root, not uid {}",
                        peer.uid()
                    ),
                ),
            );
            return Ok(Some(Pending::gone(stream)));
        }
        Ok(Some(Pending {
            stream,
            line: Vec::new(),
            fd: None,
            pages: None,
            since: std::time::Instant::now(),
            gone: false,
            from_runtime: started_by_runtime(peer.pid()),
            from_app: descends_from_launcher(peer.pid()),
        }))
    }
}

/// A connected client whose request line has not all arrived yet. PID 1 polls it with its
/// other fds and reads what is there ([`Pending::read`]); one that sends nothing for
/// [`REQUEST_TIMEOUT`] is dropped.
#[derive(Debug)]
pub struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    fd: Option<OwnedFd>,
    pages: Option<OwnedFd>,
    since: std::time::Instant,
    /// Answered already (refused): to be dropped.
    gone: bool,
    /// The client was started by the container runtime (`kubectl exec`), not by a process of
    /// the container ([`started_by_runtime`]), as read when it connected.
    from_runtime: bool,
    /// The client is a process of the app's tree ([`descends_from_launcher`]).
    from_app: bool,
}

/// What reading a pending connection gave.
#[derive(Debug)]
pub enum Read {
    /// More is to come.
    Partial,
    /// The request is complete.
    Complete(Incoming),
    /// The client went away, sent too much, or was refused: drop the connection.
    Gone,
}

impl Pending {
    fn gone(stream: UnixStream) -> Self {
        Pending {
            stream,
            line: Vec::new(),
            fd: None,
            pages: None,
            since: std::time::Instant::now(),
            gone: true,
            from_runtime: false,
            from_app: true,
        }
    }

    /// The socket, to poll.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.stream.as_fd()
    }

    /// When this connection is dropped if its request has not arrived.
    pub fn deadline(&self) -> std::time::Instant {
        self.since + REQUEST_TIMEOUT
    }

    /// Reads whatever has arrived, without blocking; collects an fd passed with it.
    pub fn read(&mut self) -> Read {
        if self.gone {
            return Read::Gone;
        }
        let mut buffer = [0u8; 4096];
        loop {
            let mut space = nix::cmsg_space!([RawFd; 2]);
            let mut iov = [IoSliceMut::new(&mut buffer)];
            let message = match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(message) => message,
                Err(nix::errno::Errno::EAGAIN) => return Read::Partial,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Read::Gone,
            };
            if let Ok(cmsgs) = message.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        for raw in fds {
                            // SAFETY: the kernel just installed this fd in our table for us; we
                            // own it (and close any beyond the second).
                            #[allow(unsafe_code)]
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            if self.fd.is_none() {
                                self.fd = Some(owned);
                            } else if self.pages.is_none() {
                                self.pages = Some(owned);
                            }
                        }
                    }
                }
            }
            let n = message.bytes;
            if n == 0 {
                // End of stream: a request without its newline is taken as it is.
                return if self.line.is_empty() {
                    Read::Gone
                } else {
                    self.complete()
                };
            }
            self.line.extend_from_slice(&buffer[..n]);
            if self.line.contains(&b'\n') {
                return self.complete();
            }
            if self.line.len() > REQUEST_LIMIT {
                let _ = answer(
                    &self.stream,
                    &migrate_format::Answer::refused(
                        migrate_format::Refusal::BadRequest,
                        None,
                        format!("the request is longer than {REQUEST_LIMIT} bytes"),
                    ),
                );
                return Read::Gone;
            }
        }
    }

    fn complete(&mut self) -> Read {
        let end = self
            .line
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(self.line.len());
        let request = std::str::from_utf8(&self.line[..end])
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|line| serde_json::from_str::<Request>(line).map_err(|e| e.to_string()));
        let Ok(stream) = self.stream.try_clone() else {
            return Read::Gone;
        };
        self.gone = true;
        Read::Complete(Incoming {
            stream,
            request,
            fd: self.fd.take(),
            pages: self.pages.take(),
            from_runtime: self.from_runtime,
            from_app: self.from_app,
        })
    }

    /// Tells a client that sent no request in time why it is dropped.
    pub fn time_out(&self) {
        let _ = answer(
            &self.stream,
            &migrate_format::Answer::refused(
                migrate_format::Refusal::BadRequest,
                None,
                format!("no complete request within {REQUEST_TIMEOUT:?}"),
            ),
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A connected client and what it asked.
#[derive(Debug)]
pub struct Incoming {
    pub stream: UnixStream,
    /// The request, or why it could not be parsed.
    pub request: Result<Request, String>,
    /// The stream fd that came with it, if any.
    pub fd: Option<OwnedFd>,
    /// A second fd with `checkpoint` or `receive`: post-copy (`--lazy`). It is this side's
    /// end of CRIU's page-server connection (`--ps-socket`), which the client relays to the
    /// other launcher.
    pub pages: Option<OwnedFd>,
    /// See [`Pending`]'s fields of the same names.
    pub from_runtime: bool,
    pub from_app: bool,
}

/// Whether process `pid` (a control client) was started by the container runtime into this
/// container: its parent is outside this PID namespace (PPid 0) and it shares the launcher's
/// mount namespace, as the process `kubectl exec` runs. A process of the app, of a shell the
/// app or an exec session started, or of PID 1 has its parent in the container; the first
/// process of another container of the pod (`shareProcessNamespace`) has another mount
/// namespace. Under `hostPID` an exec'd process's parent is the runtime's shim, visible in
/// the namespace: it is not recognised. Read from /proc when the client connects.
pub fn started_by_runtime(pid: i32) -> bool {
    // 0: the kernel could not name the client in this PID namespace, so it runs outside it.
    if pid == 0 {
        return true;
    }
    let mounts = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
    crate::procfs::stat(pid).is_some_and(|stat| stat.ppid == 0)
        && mounts(&pid.to_string()).is_some_and(|theirs| Some(theirs) == mounts("self"))
}

/// Whether process `pid` (a control client) descends from this launcher: a process of the
/// app, of a shell or daemon the app started, or one the app left behind (reparented to the
/// launcher, PID 1 or subreaper). A `kubectl exec` session's processes descend from the
/// container runtime instead, as does a shell on the node when the launcher is not PID 1.
pub fn descends_from_launcher(pid: i32) -> bool {
    let launcher = std::process::id() as i32;
    // 0: the client runs outside this PID namespace.
    if pid == 0 {
        return false;
    }
    let mut at = pid;
    // A chain longer than the PID space cannot be; bounded against a loop read mid-change.
    for _ in 0..4096 {
        if at == launcher {
            return true;
        }
        match crate::procfs::stat(at) {
            Some(stat) if stat.ppid > 0 => at = stat.ppid,
            // Started from outside this PID namespace: not the app's.
            Some(_) => return false,
            // Gone before it could be read: a client that connects, sends and exits at once
            // is taken for the app's, which could do just that.
            None => return true,
        }
    }
    true
}

/// Sends `value` as one JSON line and closes the write side.
///
/// # Errors
/// When the client went away.
pub fn answer<T: Serialize>(mut stream: &UnixStream, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Client side: connects to the socket in `state_dir`, sends `request` (with `fd` attached)
/// and returns the answer line.
///
/// # Errors
/// [`ControlError::Connect`] when no launcher listens there; [`ControlError::NoAnswer`] when
/// it hung up without answering.
pub fn call(
    state_dir: &Path,
    request: &Request,
    fd: Option<RawFd>,
) -> Result<String, ControlError> {
    let stream = send(state_dir, request, &fd.into_iter().collect::<Vec<_>>())?;
    read_answer(&stream)
}

/// [`call`] that hands `fd` over: this process's copy is closed as soon as PID 1 has it, so
/// the other end of a pipe sees its end when PID 1's job is done with it. For post-copy,
/// `pages` is PID 1's end of the page-server connection, handed over with it.
///
/// # Errors
/// As [`call`].
pub fn hand_over(
    state_dir: &Path,
    request: &Request,
    fd: std::os::fd::OwnedFd,
    pages: Option<std::os::fd::OwnedFd>,
) -> Result<String, ControlError> {
    let mut fds = vec![fd.as_raw_fd()];
    fds.extend(pages.as_ref().map(AsRawFd::as_raw_fd));
    let stream = send(state_dir, request, &fds)?;
    drop(fd);
    drop(pages);
    read_answer(&stream)
}

/// Connects to PID 1 and sends `request` with `fd`.
fn send(state_dir: &Path, request: &Request, fds: &[RawFd]) -> Result<UnixStream, ControlError> {
    let path = state_dir.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|source| ControlError::Connect {
        path: path.clone(),
        source,
    })?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Io(io::Error::other(e)))?;
    line.push(b'\n');
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let mut sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| ControlError::Io(e.into()))?;
    while sent < line.len() {
        sent += (&stream).write(&line[sent..]).map_err(ControlError::Io)?;
    }
    Ok(stream)
}

/// PID 1's answer line.
fn read_answer(stream: &UnixStream) -> Result<String, ControlError> {
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(ControlError::Io)?;
    if answer.trim().is_empty() {
        return Err(ControlError::NoAnswer);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let json = serde_json::to_string(&Request::Checkpoint {
            leave_running: true,
        })
        .unwrap_or_default();
        assert_eq!(json, r#"{"op":"checkpoint","leave_running":true}"#);
        let back: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap_or(Request::Status);
        let freeze: Request = serde_json::from_str(r#"{"op":"freeze"}"#).unwrap_or(Request::Status);
        assert_eq!(
            freeze,
            Request::Freeze {
                lease_seconds: None,
                limit_ms: None,
                migration: None,
            },
            "an older client's freeze"
        );
        assert_eq!(back, Request::Status);
        let rollback: Request =
            serde_json::from_str(r#"{"op":"rollback"}"#).unwrap_or(Request::Status);
        assert_eq!(
            rollback,
            Request::Rollback { committed: false },
            "an older client's rollback never resumes a committed copy"
        );
    }

    #[test]
    fn one_launcher_per_state_dir_with_a_socket_made_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("rl-lock-{}", std::process::id()));
        let first = Server::bind(&dir).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(dir.join(SOCKET_NAME))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(mode, 0o600);
        let second = Server::bind(&dir);
        assert!(
            matches!(&second, Err(ControlError::InUse { .. })),
            "{second:?}"
        );
        assert!(
            dir.join(SOCKET_NAME).exists(),
            "the refused launcher removed the live socket"
        );
        drop(first);
        let again = Server::bind(&dir);
        assert!(
            again.is_ok(),
            "the lock is released with the first: {again:?}"
        );
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_sends_nothing_blocks_nobody() {
        let dir = std::env::temp_dir().join(format!("rl-slow-{}", std::process::id()));
        let server = Server::bind(&dir).unwrap_or_else(|e| panic!("{e}"));
        // Connected, silent: accepting and reading it return at once.
        let silent = UnixStream::connect(dir.join(SOCKET_NAME)).unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        let mut pending = server
            .accept()
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no connection accepted"));
        assert!(matches!(pending.read(), Read::Partial));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "reading a silent client blocked for {:?}",
            started.elapsed()
        );
        assert_eq!(pending.deadline(), pending.since + REQUEST_TIMEOUT);
        // Half a request, then the rest: taken once the line is complete.
        (&silent).write_all(br#"{"op":"sta"#).unwrap_or_default();
        assert!(matches!(pending.read(), Read::Partial));
        (&silent).write_all(b"tus\"}\n").unwrap_or_default();
        match pending.read() {
            Read::Complete(incoming) => assert_eq!(incoming.request, Ok(Request::Status)),
            other => panic!("{other:?}"),
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_process_this_launcher_started_is_told_from_one_it_did_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap_or_else(|e| panic!("sleep: {e}"));
        let pid = child.id() as i32;
        assert!(descends_from_launcher(pid), "a child of this process");
        assert!(
            !descends_from_launcher(nix::unistd::getppid().as_raw()),
            "this process's parent"
        );
        assert!(
            !descends_from_launcher(0),
            "a peer outside the PID namespace"
        );
        assert!(
            descends_from_launcher(i32::MAX),
            "a client gone before it was read counts as the app's"
        );
        assert!(started_by_runtime(0), "a peer outside the PID namespace");
        assert!(!started_by_runtime(pid), "a child of this process");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn only_the_same_user_or_root_may_drive_the_launcher() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1001, 1000));
        assert!(
            !peer_allowed(1000, 0),
            "another user may not drive a root launcher"
        );
    }

    #[test]
    fn a_request_and_its_fd_cross_the_socket() {
        let dir = std::env::temp_dir().join(format!("rl-control-{}", std::process::id()));
        let server = Server::bind(&dir).unwrap_or_else(|e| panic!("{e}"));
        let (reader, writer) = nix::unistd::pipe().unwrap_or_else(|e| panic!("{e}"));
        let client_dir = dir.clone();
        let client = std::thread::spawn(move || {
            call(&client_dir, &Request::Receive, Some(reader.as_raw_fd()))
        });
        let mut pending = loop {
            if let Some(pending) = server.accept().unwrap_or_else(|e| panic!("{e}")) {
                break pending;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let incoming = loop {
            match pending.read() {
                Read::Complete(incoming) => break incoming,
                Read::Partial => std::thread::sleep(Duration::from_millis(5)),
                Read::Gone => panic!("the client went away"),
            }
        };
        assert_eq!(incoming.request, Ok(Request::Receive));
        // The fd received is the pipe's read end: bytes written to the pipe come out of it.
        nix::unistd::write(&writer, b"x").unwrap_or_default();
        let mut byte = [0u8; 1];
        let fd = incoming.fd.unwrap_or_else(|| panic!("no fd passed"));
        assert_eq!(nix::unistd::read(&fd, &mut byte).unwrap_or_default(), 1);
        assert_eq!(&byte, b"x");
        answer(&incoming.stream, &serde_json::json!({"ok": true})).unwrap_or_default();
        let reply = client
            .join()
            .unwrap_or_else(|_| panic!("client panicked"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.trim(), r#"{"ok":true}"#);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
