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
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// File name of the socket inside the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// How long PID 1 waits for a connected client to send its request.
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
    /// Resume the app frozen by the last checkpoint (or by `freeze`).
    Rollback,
    /// Stop the app's process tree (SIGSTOP) for a consistent multi-container checkpoint.
    /// With a lease, the app resumes by itself unless `commit` comes within it (renewed by
    /// `renew`): a migration whose driver died never leaves the app frozen for ever.
    Freeze {
        #[serde(default)]
        lease_seconds: Option<u64>,
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
    #[error("cannot create the state directory `{}`; set --state-dir (RESTORE_LAUNCHER_STATE_DIR) to a writable path such as an emptyDir", path.display())]
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
    #[error("the request is not valid: {0}")]
    BadRequest(String),
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

    /// Accepts one pending connection and reads its request, if a client is waiting.
    ///
    /// # Errors
    /// [`ControlError::Io`] / [`ControlError::BadRequest`]; the connection is then answered
    /// by the caller or dropped.
    pub fn accept(&self) -> Result<Option<Incoming>, ControlError> {
        let stream = match self.listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(error) => return Err(ControlError::Io(error)),
        };
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|errno| ControlError::Io(errno.into()))?;
        let own = nix::unistd::geteuid().as_raw();
        if !peer_allowed(peer.uid(), own) {
            let _ = answer(
                &stream,
                &serde_json::json!({"ok": false, "error": format!(
                    "refused: the launcher only takes requests from its own user (uid {own}) or root, not uid {}",
                    peer.uid()
                )}),
            );
            return Ok(None);
        }
        stream.set_nonblocking(false).map_err(ControlError::Io)?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(ControlError::Io)?;
        let (line, fd) = receive_line_with_fd(&stream)?;
        let request: Result<Request, _> = serde_json::from_str(&line);
        Ok(Some(Incoming {
            stream,
            request: request.map_err(|e| e.to_string()),
            fd,
        }))
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

/// Reads one line, collecting an fd passed with its first bytes.
fn receive_line_with_fd(stream: &UnixStream) -> Result<(String, Option<OwnedFd>), ControlError> {
    let mut line = Vec::new();
    let mut fd = None;
    let mut buffer = [0u8; 4096];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| ControlError::Io(e.into()))?;
        for cmsg in message.cmsgs().map_err(|e| ControlError::Io(e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: the kernel just installed this fd in our table for us; we own it.
                    #[allow(unsafe_code)]
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        let n = message.bytes;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buffer[..n]);
        if line.contains(&b'\n') || line.len() > REQUEST_LIMIT {
            break;
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    let text = String::from_utf8(line[..end].to_vec())
        .map_err(|_| ControlError::BadRequest("not UTF-8".into()))?;
    Ok((text, fd))
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
    let path = state_dir.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|source| ControlError::Connect {
        path: path.clone(),
        source,
    })?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Io(io::Error::other(e)))?;
    line.push(b'\n');
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
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
    let mut answer = String::new();
    BufReader::new(&stream)
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
        let back: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap_or(Request::Rollback);
        let freeze: Request =
            serde_json::from_str(r#"{"op":"freeze"}"#).unwrap_or(Request::Rollback);
        assert_eq!(
            freeze,
            Request::Freeze {
                lease_seconds: None
            },
            "an older client's freeze"
        );
        assert_eq!(back, Request::Status);
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
        let incoming = loop {
            if let Some(incoming) = server.accept().unwrap_or_else(|e| panic!("{e}")) {
                break incoming;
            }
            std::thread::sleep(Duration::from_millis(5));
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
