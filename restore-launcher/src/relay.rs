//! Copies the app's stdout and stderr from the pipes the launcher owns to the launcher's own
//! stdout and stderr (the container's log streams), byte for byte and in order per stream.
//!
//! The read side is non-blocking and read in bounded bursts so one chatty stream cannot
//! starve signal handling. The write side blocks: if the log reader is slow, the app is
//! slowed down through its full pipe instead of output being dropped.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Bytes moved per read.
const CHUNK: usize = 64 * 1024;
/// Bytes moved per wake-up before the supervisor looks at signals again.
const BURST: usize = 1024 * 1024;

/// Where a stream goes: the launcher's stdout (fd 1) or stderr (fd 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

impl Output {
    /// Writes what it can of `bytes` to this output.
    fn write(self, bytes: &[u8]) -> nix::Result<usize> {
        match self {
            Output::Stdout => nix::unistd::write(io::stdout(), bytes),
            Output::Stderr => nix::unistd::write(io::stderr(), bytes),
        }
    }

    /// Waits until this output accepts more bytes.
    fn wait_writable(self) {
        let fd = match self {
            Output::Stdout => io::stdout().as_fd().try_clone_to_owned(),
            Output::Stderr => io::stderr().as_fd().try_clone_to_owned(),
        };
        if let Ok(fd) = fd {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
            let _ = poll(&mut fds, PollTimeout::NONE);
        }
    }
}

/// One app stream being copied.
#[derive(Debug)]
pub struct Relay {
    source: Option<OwnedFd>,
    output: Output,
    /// Set once writing to our own output failed (closed log pipe): the app's output is then
    /// still drained, so the app never blocks on a full pipe, but discarded.
    output_broken: bool,
}

/// What a call to [`Relay::pump`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// Copied what was there; more may come.
    Open,
    /// Every writer of the pipe is gone and everything was copied.
    Closed,
}

impl Relay {
    /// Takes the read end of an app pipe; makes it non-blocking.
    pub fn new(source: OwnedFd, output: Output) -> Self {
        if let Err(error) = set_nonblocking(&source) {
            // Still correct with a blocking fd: we only read after poll says it is readable.
            tracing::warn!(%error, ?output, "cannot make the app's output pipe non-blocking");
        }
        Relay {
            source: Some(source),
            output,
            output_broken: false,
        }
    }

    /// The pipe to poll for readability, while it is open.
    pub fn source(&self) -> Option<BorrowedFd<'_>> {
        self.source.as_ref().map(AsFd::as_fd)
    }

    /// Inode of the pipe (CRIU names it `pipe:[INODE]` in the app's images), while open.
    pub fn inode(&self) -> Option<u64> {
        let fd = self.source.as_ref()?;
        nix::sys::stat::fstat(fd).ok().map(|st| st.st_ino)
    }

    /// Whether the pipe reached end of file (or failed) and was closed.
    pub fn is_closed(&self) -> bool {
        self.source.is_none()
    }

    /// Copies up to one burst of what is in the pipe to the output.
    pub fn pump(&mut self) -> Pumped {
        let Some(source) = self.source.take() else {
            return Pumped::Closed;
        };
        let mut buffer = [0u8; CHUNK];
        let mut moved = 0;
        while moved < BURST {
            match nix::unistd::read(&source, &mut buffer) {
                // End of file: every writer is gone; dropping `source` closes our end.
                Ok(0) => return Pumped::Closed,
                Ok(n) => {
                    moved += n;
                    self.write_out(&buffer[..n]);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(error) => {
                    tracing::warn!(%error, output = ?self.output, "reading the app's output failed; no more of this stream will be copied");
                    return Pumped::Closed;
                }
            }
        }
        self.source = Some(source);
        Pumped::Open
    }

    fn write_out(&mut self, mut bytes: &[u8]) {
        if self.output_broken {
            return;
        }
        while !bytes.is_empty() {
            match self.output.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EINTR) => {}
                // Our stdout may have been handed to us non-blocking: wait until it drains.
                Err(Errno::EAGAIN) => self.output.wait_writable(),
                Err(error) => {
                    tracing::warn!(%error, output = ?self.output, "cannot write the app's output to the launcher's own; discarding this stream from now on");
                    self.output_broken = true;
                    return;
                }
            }
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}
