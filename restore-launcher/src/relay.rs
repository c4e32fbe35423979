//! Copies the app's stdout and stderr from the pipes the launcher owns to the launcher's own
//! stdout and stderr (the container's log streams), byte for byte and in order per stream.
//!
//! PID 1 never blocks on either side. The read side is non-blocking and read in bounded
//! bursts, so one chatty stream cannot starve signal handling. The write side writes only
//! what the output accepts now (after `poll` says it is writable, at most `PIPE_BUF` at a
//! time, which a pipe takes whole), keeping the rest in a buffer of [`BUFFER`] bytes. While
//! that buffer is full the app's pipe is not read: a slow log reader slows the app down
//! through its full pipe, as it would without a launcher, and nothing is dropped; PID 1 goes
//! on forwarding signals, reaping and answering requests. Once the app has exited, what it
//! wrote is held for the reader as long as the reader keeps taking bytes (the supervisor gives
//! up, saying how many bytes it drops, only after a reader took nothing for 30 s).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Bytes moved per read.
const CHUNK: usize = 64 * 1024;
/// Bytes moved per wake-up before the supervisor looks at signals again.
const BURST: usize = 1024 * 1024;
/// Bytes read from the app and not yet written, per stream, at most.
pub const BUFFER: usize = 1024 * 1024;
/// What one write may hand a pipe that `poll` said is writable without blocking.
const PIPE_BUF: usize = libc::PIPE_BUF;

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

    /// Whether to write to this output now: it accepts bytes, or is closed or failed (then the
    /// write fails, and the stream is marked broken instead of waited for).
    fn writable(self) -> bool {
        let (stdout, stderr) = (io::stdout(), io::stderr());
        let fd = match self {
            Output::Stdout => stdout.as_fd(),
            Output::Stderr => stderr.as_fd(),
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
            && fds[0].revents().is_some_and(|r| r.intersects(WRITE_NOW))
    }
}

/// What `poll` says about an output that makes a write worth trying: room, or an end (closed
/// reader, error, a closed descriptor), which the write then reports.
pub const WRITE_NOW: PollFlags = PollFlags::POLLOUT
    .union(PollFlags::POLLERR)
    .union(PollFlags::POLLHUP)
    .union(PollFlags::POLLNVAL);

/// One app stream being copied.
#[derive(Debug)]
pub struct Relay {
    source: Option<OwnedFd>,
    output: Output,
    /// Set once writing to our own output failed (closed log pipe): the app's output is then
    /// still drained, so the app never blocks on a full pipe, but discarded.
    output_broken: bool,
    /// Read from the app, not yet written.
    pending: VecDeque<u8>,
    /// When bytes were last written (or the relay began): a drain after the app's exit goes on
    /// while the output keeps taking bytes.
    last_progress: std::time::Instant,
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
            pending: VecDeque::new(),
            last_progress: std::time::Instant::now(),
        }
    }

    /// The pipe to poll for readability, while it is open and there is room to read into.
    pub fn source(&self) -> Option<BorrowedFd<'_>> {
        self.source
            .as_ref()
            .filter(|_| self.pending.len() < BUFFER)
            .map(AsFd::as_fd)
    }

    /// Which output to poll for writability: one this relay has bytes waiting for.
    pub fn waiting_output(&self) -> Option<Output> {
        (!self.pending.is_empty() && !self.output_broken).then_some(self.output)
    }

    /// Inode of the pipe (CRIU names it `pipe:[INODE]` in the app's images), while open.
    pub fn inode(&self) -> Option<u64> {
        let fd = self.source.as_ref()?;
        nix::sys::stat::fstat(fd).ok().map(|st| st.st_ino)
    }

    /// Whether the app's pipe reached end of file (or failed) and was closed.
    pub fn source_closed(&self) -> bool {
        self.source.is_none()
    }

    /// Whether bytes read from the app wait for the output.
    pub fn holds_output(&self) -> bool {
        !self.pending.is_empty() && !self.output_broken
    }

    /// How many bytes read from the app wait for the output.
    pub fn held_bytes(&self) -> usize {
        if self.output_broken {
            0
        } else {
            self.pending.len()
        }
    }

    /// When this relay last wrote bytes (or began).
    pub fn last_progress(&self) -> std::time::Instant {
        self.last_progress
    }

    /// Whether the pipe reached end of file (or failed) and was closed, and everything read
    /// from it was written (or can never be).
    pub fn is_closed(&self) -> bool {
        self.source.is_none() && (self.pending.is_empty() || self.output_broken)
    }

    /// Reads up to one burst of what is in the pipe (as much as the buffer takes), and writes
    /// what the output accepts now.
    pub fn pump(&mut self) -> Pumped {
        let pumped = self.read_in();
        self.flush();
        pumped
    }

    fn read_in(&mut self) -> Pumped {
        let Some(source) = self.source.take() else {
            return Pumped::Closed;
        };
        let mut buffer = [0u8; CHUNK];
        let mut moved = 0;
        while moved < BURST && self.pending.len() < BUFFER {
            let room = (BUFFER - self.pending.len()).min(CHUNK);
            match nix::unistd::read(&source, &mut buffer[..room]) {
                // End of file: every writer is gone; dropping `source` closes our end.
                Ok(0) => return Pumped::Closed,
                Ok(n) => {
                    moved += n;
                    if !self.output_broken {
                        self.pending.extend(&buffer[..n]);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(error) => {
                    tracing::warn!(%error, output = ?self.output, "reading the app's output failed; no more of this stream will be copied");
                    return Pumped::Closed;
                }
            }
            self.flush();
        }
        self.source = Some(source);
        Pumped::Open
    }

    /// Writes what the output accepts now of the bytes waiting, never blocking.
    pub fn flush(&mut self) {
        let mut moved = 0;
        while !self.pending.is_empty() && !self.output_broken && moved < BURST {
            if !self.output.writable() {
                return;
            }
            let (front, _) = self.pending.as_slices();
            let take = front.len().min(PIPE_BUF);
            match self.output.write(&front[..take]) {
                Ok(n) => {
                    self.pending.drain(..n);
                    moved += n;
                    self.last_progress = std::time::Instant::now();
                }
                Err(Errno::EINTR) => {}
                // Handed to us non-blocking, and full after all: later.
                Err(Errno::EAGAIN) => return,
                Err(error) => {
                    tracing::warn!(%error, output = ?self.output, "cannot write the app's output to the launcher's own; discarding this stream from now on");
                    self.output_broken = true;
                    self.pending.clear();
                }
            }
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}
