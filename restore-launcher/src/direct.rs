//! Direct transfers: the archive goes from the source's launcher to the target's over one TCP
//! connection between the two pods, not through the plugin and the API server.
//!
//! The channel is TLS 1.3 (rustls, ring), mutually authenticated with a certificate pinned on
//! both sides: the plugin makes a fresh self-signed certificate and key for each container's
//! transfer ([`DirectSecret`]) and hands both to both launchers as one JSON line on their
//! stdin. Each side presents it and accepts only a peer that presents the same certificate and
//! proves, in the handshake, that it holds the key. A peer without the secret learns nothing of
//! the archive and cannot inject a byte of it; the target turns it away and keeps waiting.
//!
//! Both ends run in the `kubectl exec` sub-commands, next to PID 1: the receiving side
//! (`receive --listen`) pipes the decrypted stream into PID 1's usual `receive` (which verifies
//! all of it before restoring anything), the sending side (`checkpoint --to`) pipes PID 1's
//! usual checkpoint stream into the connection. PID 1 sees a pipe, as with the exec relay, so
//! the leases, stall timeouts and cancellation of a checkpoint work the same way.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use migrate_format::{DirectSecret, Progress};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName, ServerConfig,
    ServerConnection, SignatureScheme, StreamOwned,
};

/// How long the source may take to reach the target's port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a handshake may take, on either side, in all (a peer trickling bytes cannot stretch
/// it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on the target; further connections are closed at once (the
/// port is open to the pod network while the target waits).
const MAX_HANDSHAKES: usize = 16;
/// The byte the target sends once it has taken the source's connection: the source dumps only
/// after it (in TLS 1.3 the client's handshake ends before the server has checked its
/// certificate, and the target may have given up meanwhile).
const GO: u8 = b'G';
/// Bytes moved per read: large records keep TLS's per-record cost small.
const CHUNK: usize = 256 * 1024;
/// The longest secret line read from stdin.
const SECRET_LINE_LIMIT: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("reading the transfer's secret (one JSON line on stdin) failed: {0}")]
    Secret(String),
    #[error("the transfer's secret was refused by TLS")]
    Config(#[source] rustls::Error),
    #[error("cannot listen on port {port}")]
    Listen {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot connect to the target at {to} (blocked by a NetworkPolicy or firewall, or not routed between the nodes?)"
    )]
    Connect {
        to: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the encrypted channel with {peer} could not be set up (its secret differs, or it is not a restore-launcher of this migration)"
    )]
    Handshake {
        peer: String,
        #[source]
        source: io::Error,
    },
    #[error("no source connected with the secret within {0} s")]
    NoPeer(u64),
    #[error("the plugin called the transfer off (or went away) before it began")]
    Cancelled,
    #[error("no word from the plugin to start the dump within {0} s")]
    NoGo(u64),
    #[error("the transfer broke off after {bytes} bytes")]
    Stream {
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The certificate and key of one transfer, decoded.
pub struct Keys {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// Reads the secret: one JSON line ([`DirectSecret`]) from `input`, byte by byte, so nothing
/// after the line is consumed (a later line on stdin is the plugin's "stop waiting").
///
/// # Errors
/// [`DirectError::Secret`] when the line is missing, too long or not a secret.
pub fn read_secret(mut input: impl Read) -> Result<Keys, DirectError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        // One byte per read on purpose: a buffered reader would swallow what follows.
        match input.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(DirectError::Secret(error.to_string())),
        }
        if line.len() as u64 > SECRET_LINE_LIMIT {
            return Err(DirectError::Secret("the line is too long".into()));
        }
    }
    if line.is_empty() {
        return Err(DirectError::Secret("stdin ended before the secret".into()));
    }
    let secret: DirectSecret =
        serde_json::from_slice(&line).map_err(|e| DirectError::Secret(e.to_string()))?;
    // Fixed words: a decoding error would quote a character of the key.
    let cert = hex::decode(&secret.cert)
        .map_err(|_| DirectError::Secret("the certificate is not hex".into()))?;
    let key =
        hex::decode(&secret.key).map_err(|_| DirectError::Secret("the key is not hex".into()))?;
    Ok(Keys {
        cert: CertificateDer::from(cert),
        key: PrivatePkcs8KeyDer::from(key),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one certificate, with no chain, and checks the handshake's signatures with
/// the provider's algorithms: a peer passes only if it holds the pinned certificate's key.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn new(cert: &CertificateDer<'static>, provider: &CryptoProvider) -> Self {
        Pinned {
            cert: cert.clone(),
            algorithms: provider.signature_verification_algorithms,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if intermediates.is_empty() && end_entity.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The receiving side's TLS: TLS 1.3 only, the client's certificate required and pinned.
///
/// # Errors
/// When rustls refuses the key or certificate.
pub fn server_config(keys: &Keys) -> Result<Arc<ServerConfig>, DirectError> {
    let provider = provider();
    let pinned = Arc::new(Pinned::new(&keys.cert, &provider));
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(DirectError::Config)?
        .with_client_cert_verifier(pinned)
        .with_single_cert(
            vec![keys.cert.clone()],
            PrivateKeyDer::Pkcs8(keys.key.clone_key()),
        )
        .map_err(DirectError::Config)?;
    Ok(Arc::new(config))
}

/// The sending side's TLS: TLS 1.3 only, the server's certificate pinned, the same certificate
/// presented as the client's.
///
/// # Errors
/// When rustls refuses the key or certificate.
pub fn client_config(keys: &Keys) -> Result<Arc<ClientConfig>, DirectError> {
    let provider = provider();
    let pinned = Arc::new(Pinned::new(&keys.cert, &provider));
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(DirectError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(pinned)
        .with_client_auth_cert(
            vec![keys.cert.clone()],
            PrivateKeyDer::Pkcs8(keys.key.clone_key()),
        )
        .map_err(DirectError::Config)?;
    Ok(Arc::new(config))
}

/// The name the source asks for; the certificate is pinned, so the name is not what is checked.
fn server_name() -> ServerName<'static> {
    ServerName::try_from("restore-launcher.migration")
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()))
}

/// An authenticated connection from the source.
pub type Inbound = StreamOwned<ServerConnection, TcpStream>;
/// An authenticated connection to the target.
pub type Outbound = StreamOwned<ClientConnection, TcpStream>;

/// Runs the handshake to its end, within [`HANDSHAKE_TIMEOUT`].
fn handshake<C, S>(
    mut stream: StreamOwned<C, TcpStream>,
    peer: &str,
) -> Result<StreamOwned<C, TcpStream>, DirectError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let fail = |source| DirectError::Handshake {
        peer: peer.to_string(),
        source,
    };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while stream.conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
            )));
        }
        stream.sock.set_read_timeout(Some(left)).map_err(fail)?;
        stream.sock.set_write_timeout(Some(left)).map_err(fail)?;
        stream.conn.complete_io(&mut stream.sock).map_err(fail)?;
    }
    // What is left of the deadline must not bound what comes next.
    stream
        .sock
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(fail)?;
    stream
        .sock
        .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(fail)?;
    Ok(stream)
}

/// A listening socket on every address of the pod, on `port` (0: any free port).
///
/// # Errors
/// [`DirectError::Listen`].
pub fn listen(port: u16) -> Result<TcpListener, DirectError> {
    // `[::]` takes IPv4 too where the pod has IPv6; an IPv4-only pod gets 0.0.0.0.
    TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .map_err(|source| DirectError::Listen { port, source })
}

/// Prints one progress line on stdout, flushed (the plugin reads it as it comes).
pub fn say(progress: Progress) {
    if let Ok(line) = serde_json::to_string(&progress) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Waits for the source: a connection from an address not in `from` (when given: the source
/// pod's addresses) nor loopback is closed at once, taking nothing; each other connection gets its own
/// handshake (at most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]); one that
/// fails (no secret, a wrong one, a port scanner) is logged on stderr and turned away, and
/// the wait goes on. The first authenticated
/// connection is taken and told so ([`GO`]). Ends with it, or when anything more arrives on
/// `stdin`, or it ends (the plugin gave up on the direct path, or went away), or `patience`
/// passes with none.
///
/// # Errors
/// [`DirectError::Cancelled`], [`DirectError::NoPeer`], or an accept error.
pub fn accept(
    listener: &TcpListener,
    config: &Arc<ServerConfig>,
    stdin: &impl std::os::fd::AsFd,
    from: &[std::net::IpAddr],
    patience: Duration,
) -> Result<Inbound, DirectError> {
    listener.set_nonblocking(true)?;
    // An IPv4 peer on a `[::]` listener shows as `::ffff:a.b.c.d`.
    let allowed = |peer: std::net::IpAddr| {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        // Loopback: a service mesh's sidecar (Istio's 127.0.0.6, Linkerd's 127.0.0.1) hands
        // every inbound connection over from inside the pod, whoever made it.
        from.is_empty() || from.contains(&peer) || peer.is_loopback()
    };
    let mut strangers = 0u64;
    let (done, handshakes) = mpsc::channel::<Inbound>();
    // A finished handshake wakes the wait at once (the app is frozen meanwhile).
    let (wake, woken) = nix::unistd::pipe().map_err(io::Error::from)?;
    let woken = Arc::new(woken);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut stdin_open = true;
    loop {
        while let Ok(mut stream) = handshakes.try_recv() {
            // Taken: the source may dump now. A source gone meanwhile is one more failure.
            match stream.write_all(&[GO]).and_then(|()| stream.flush()) {
                Ok(()) => return Ok(stream),
                Err(error) => tracing::warn!(%error, "the source went away after its handshake"),
            }
        }
        if started.elapsed() >= patience {
            return Err(DirectError::NoPeer(patience.as_secs()));
        }
        let mut fds = vec![
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(io::Error::from(errno).into()),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            let mut drained = [0u8; 64];
            let _ = nix::unistd::read(wake.as_fd(), &mut drained);
        }
        let stdin_event = fds.get(2).and_then(PollFd::revents);
        if stdin_event.is_some_and(|r| r.contains(PollFlags::POLLNVAL)) {
            // No stdin at all (not run through exec): only the patience ends the wait.
            stdin_open = false;
        } else if stdin_event.is_some_and(|r| !r.is_empty()) {
            // After the secret, stdin carries only the plugin's "stop waiting" (a line, or its
            // end).
            return Err(DirectError::Cancelled);
        }
        loop {
            match listener.accept() {
                Ok((socket, peer)) => {
                    if !allowed(peer.ip()) {
                        // Not the source pod: closed before it costs anything (logged once,
                        // then every thousandth, so that a flood cannot fill the log).
                        strangers += 1;
                        if strangers == 1 || strangers % 1000 == 0 {
                            tracing::warn!(%peer, turned_away = strangers, "turned a connection away: not from the source pod");
                        }
                        drop(socket);
                        continue;
                    }
                    if in_flight.load(std::sync::atomic::Ordering::SeqCst) >= MAX_HANDSHAKES {
                        tracing::warn!(%peer, "turned a connection away: too many handshakes at once");
                        continue;
                    }
                    in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (config, done) = (Arc::clone(config), done.clone());
                    let (woken, in_flight) = (Arc::clone(&woken), Arc::clone(&in_flight));
                    std::thread::spawn(move || {
                        let peer = peer.to_string();
                        let attempt = ServerConnection::new(config)
                            .map_err(DirectError::Config)
                            .and_then(|conn| {
                                socket.set_nonblocking(false)?;
                                handshake(StreamOwned::new(conn, socket), &peer)
                            });
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        match attempt {
                            Ok(stream) => {
                                tracing::info!(peer, "the source connected with the secret");
                                // Once the wait is over nobody receives it, and it is dropped.
                                if done.send(stream).is_ok() {
                                    let _ = nix::unistd::write(&*woken, b"!");
                                }
                            }
                            Err(error) => {
                                tracing::warn!(
                                    peer,
                                    "turned a connection away: {}",
                                    crate::checkpoint::chain(&error)
                                );
                            }
                        }
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    break;
                }
            }
        }
    }
}

/// Waits for the plugin's word on `stdin` (one line): `go` to dump, anything else or the end
/// of stdin to call the transfer off; at most `patience`.
///
/// # Errors
/// [`DirectError::Cancelled`] when called off, [`DirectError::NoGo`] when nothing came.
pub fn wait_for_go(stdin: &impl std::os::fd::AsFd, patience: Duration) -> Result<(), DirectError> {
    let deadline = Instant::now() + patience;
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DirectError::NoGo(patience.as_secs()));
        }
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        let wait =
            PollTimeout::try_from(left.min(Duration::from_secs(1))).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, wait) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(errno) => return Err(io::Error::from(errno).into()),
        }
        let mut byte = [0u8; 1];
        match nix::unistd::read(stdin.as_fd(), &mut byte) {
            Ok(0) => return Err(DirectError::Cancelled),
            Ok(_) if byte[0] == b'\n' => {
                return if line == b"go" {
                    Ok(())
                } else {
                    Err(DirectError::Cancelled)
                };
            }
            Ok(_) if line.len() < 16 => line.push(byte[0]),
            Ok(_) => return Err(DirectError::Cancelled),
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(io::Error::from(errno).into()),
        }
    }
}

/// Connects to the target and authenticates it.
///
/// # Errors
/// [`DirectError::Connect`] when no address of `to` can be reached (nothing was sent; the
/// relay may be tried), [`DirectError::Handshake`] when the peer is not the target of this
/// migration.
pub fn connect(to: &str, config: &Arc<ClientConfig>) -> Result<Outbound, DirectError> {
    let unreachable = |source| DirectError::Connect {
        to: to.to_string(),
        source,
    };
    let addresses: Vec<SocketAddr> = to.to_socket_addrs().map_err(unreachable)?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for address in addresses {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(socket) => {
                let _ = socket.set_nodelay(true);
                let conn = ClientConnection::new(Arc::clone(config), server_name())
                    .map_err(DirectError::Config)?;
                let mut stream = handshake(StreamOwned::new(conn, socket), to)?;
                // The target's word that it took this connection (it checks our certificate
                // after our side of the handshake is over).
                let mut go = [0u8; 1];
                let taken = stream
                    .sock
                    .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
                    .and_then(|()| stream.read_exact(&mut go));
                return match taken {
                    Ok(()) if go[0] == GO => Ok(stream),
                    Ok(()) => Err(DirectError::Handshake {
                        peer: to.to_string(),
                        source: io::Error::other("the target answered something else"),
                    }),
                    Err(source) => Err(DirectError::Handshake {
                        peer: to.to_string(),
                        source,
                    }),
                };
            }
            Err(error) => last = error,
        }
    }
    Err(unreachable(last))
}

/// Copies the decrypted stream from the source into `into` (the pipe PID 1 reads) until the
/// source closes the channel properly; how many bytes.
///
/// # Errors
/// [`DirectError::Stream`] when the connection breaks, stalls for `stall`, or ends without the
/// TLS close (a truncated stream; PID 1 refuses the archive anyway).
pub fn pump_in(mut from: Inbound, into: OwnedFd, stall: Duration) -> Result<u64, DirectError> {
    from.sock.set_read_timeout(Some(stall))?;
    from.sock.set_write_timeout(Some(stall))?;
    let mut into = std::fs::File::from(into);
    let mut buffer = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(DirectError::Stream { bytes, source }),
        };
        into.write_all(&buffer[..n])
            .map_err(|source| DirectError::Stream { bytes, source })?;
        bytes += n as u64;
    }
    // Tell the source everything arrived; it may already be gone, which is fine.
    from.conn.send_close_notify();
    let _ = from.flush();
    Ok(bytes)
}

/// Copies PID 1's checkpoint stream (`from`, a pipe) to the target, printing how far it got
/// every quarter of a second. Returns the bytes and the channel, still open: it is closed
/// properly ([`finish_out`]) only if the checkpoint succeeded, so a stream that PID 1 ended
/// early never looks complete to the target.
///
/// # Errors
/// [`DirectError::Stream`] when the connection breaks or the target stops reading for `stall`.
pub fn pump_out(
    from: OwnedFd,
    mut to: Outbound,
    stall: Duration,
) -> Result<(u64, Outbound), DirectError> {
    to.sock.set_write_timeout(Some(stall))?;
    to.sock.set_read_timeout(Some(stall))?;
    let mut from = std::fs::File::from(from);
    let mut buffer = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let mut told = Instant::now();
    let ended = loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => break to.flush(),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => break Err(error),
        };
        if let Err(error) = to.write_all(&buffer[..n]) {
            break Err(error);
        }
        bytes += n as u64;
        if told.elapsed() >= Duration::from_millis(250) {
            say(Progress::Sent { bytes });
            told = Instant::now();
        }
    };
    // The last count, also when the stream broke: how far it got tells the plugin whose
    // failure came first (nothing sent: the source's own).
    say(Progress::Sent { bytes });
    ended.map_err(|source| DirectError::Stream { bytes, source })?;
    Ok((bytes, to))
}

/// Closes the channel properly after a successful checkpoint, and waits (up to the socket's
/// timeout) for the target's close in turn, which says it read to the end.
///
/// # Errors
/// When the close cannot be sent.
pub fn finish_out(mut to: Outbound) -> Result<(), DirectError> {
    to.conn.send_close_notify();
    to.flush()?;
    let mut rest = [0u8; 1024];
    while let Ok(n) = to.read(&mut rest) {
        if n == 0 {
            break;
        }
    }
    let _ = to.sock.shutdown(Shutdown::Both);
    Ok(())
}

/// How long the pages channel may carry nothing, either way, before it is taken as dead: the
/// target's CRIU asks for the next pages as soon as the last arrived, so silence means a
/// peer is gone.
const PAGES_SILENCE: Duration = Duration::from_secs(60);

/// Relays CRIU's page-server connection for post-copy (`--lazy`): `local` is this side's end
/// of the socket pair whose other end CRIU has (`--ps-socket`), `channel` the authenticated
/// connection to the other launcher. Runs both ways until either side ends: CRIU closing its
/// socket (every page went) ends the channel with a proper TLS close; the peer's close ends
/// `local`. Returns the bytes that came in from the peer and went out to it.
///
/// # Errors
/// [`DirectError::Stream`] when the channel breaks, ends without its TLS close, or carries
/// nothing for [`PAGES_SILENCE`].
pub fn relay_pages<C, S>(
    mut channel: StreamOwned<C, TcpStream>,
    mut local: std::os::unix::net::UnixStream,
) -> Result<(u64, u64), DirectError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let mut inbound = 0u64;
    let mut outbound = 0u64;
    let broke = |bytes: u64, source: io::Error| DirectError::Stream { bytes, source };
    channel.sock.set_read_timeout(None)?;
    channel.sock.set_write_timeout(Some(PAGES_SILENCE))?;
    let mut buffer = vec![0u8; CHUNK];
    loop {
        while channel.conn.wants_write() {
            channel
                .conn
                .write_tls(&mut channel.sock)
                .map_err(|e| broke(inbound, e))?;
        }
        let mut fds = [
            PollFd::new(channel.sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(local.as_fd(), PollFlags::POLLIN),
        ];
        let silence = PollTimeout::try_from(PAGES_SILENCE).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, silence) {
            Ok(0) => {
                return Err(broke(
                    inbound,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing moved for {} s", PAGES_SILENCE.as_secs()),
                    ),
                ));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(broke(inbound, error.into())),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let (from_peer, from_local) = (ready(&fds[0]), ready(&fds[1]));
        if from_peer {
            let n = channel
                .conn
                .read_tls(&mut channel.sock)
                .map_err(|e| broke(inbound, e))?;
            let state = channel
                .conn
                .process_new_packets()
                .map_err(|e| broke(inbound, io::Error::other(e)))?;
            loop {
                match channel.conn.reader().read(&mut buffer) {
                    Ok(0) => break,
                    Ok(m) => {
                        local
                            .write_all(&buffer[..m])
                            .map_err(|e| broke(inbound, e))?;
                        inbound += m as u64;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(broke(inbound, error)),
                }
            }
            if state.peer_has_closed() {
                let _ = local.shutdown(Shutdown::Both);
                return Ok((inbound, outbound));
            }
            if n == 0 {
                return Err(broke(
                    inbound,
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the other launcher's channel ended without its TLS close",
                    ),
                ));
            }
        }
        if from_local {
            match local.read(&mut buffer) {
                Ok(0) => {
                    // CRIU is done with the pages: close the channel properly.
                    channel.conn.send_close_notify();
                    while channel.conn.wants_write() {
                        channel
                            .conn
                            .write_tls(&mut channel.sock)
                            .map_err(|e| broke(inbound, e))?;
                    }
                    let _ = channel.sock.shutdown(Shutdown::Write);
                    return Ok((inbound, outbound));
                }
                Ok(m) => {
                    // rustls takes only what fits its send buffer (64 KiB by default) and
                    // then writes 0: flush to the socket until all of it went.
                    let mut rest = &buffer[..m];
                    while !rest.is_empty() {
                        let taken = channel
                            .conn
                            .writer()
                            .write(rest)
                            .map_err(|e| broke(inbound, e))?;
                        rest = &rest[taken..];
                        if taken == 0 && !channel.conn.wants_write() {
                            return Err(broke(
                                inbound,
                                io::Error::new(
                                    io::ErrorKind::WriteZero,
                                    "the TLS connection takes no more data",
                                ),
                            ));
                        }
                        while channel.conn.wants_write() {
                            channel
                                .conn
                                .write_tls(&mut channel.sock)
                                .map_err(|e| broke(inbound, e))?;
                        }
                    }
                    outbound += m as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(broke(inbound, error)),
            }
        }
    }
}

/// Ends the channel without the TLS close, so the target sees a broken stream, never a
/// complete one.
pub fn abandon(to: Outbound) {
    let _ = to.sock.shutdown(Shutdown::Both);
}

/// [`abandon`] for a channel still in use elsewhere.
pub fn abandon_ref(to: &Outbound) {
    let _ = to.sock.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret as the plugin makes one (`kubectl-migrate/src/direct.rs`).
    fn keys() -> Keys {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = rcgen::CertificateParams::new(vec!["restore-launcher.migration".into()])
            .and_then(|p| p.self_signed(&key))
            .unwrap_or_else(|e| panic!("{e}"));
        let line = serde_json::to_string(&DirectSecret {
            cert: hex::encode(cert.der()),
            key: hex::encode(key.serialize_der()),
        })
        .unwrap_or_default();
        read_secret(format!("{line}\nnext line").as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_a_peer_holding_the_secret_gets_through_and_the_wait_survives_the_others() {
        let (good, other) = (keys(), keys());
        let listener = ok(listen(0));
        let port = ok(listener.local_addr()).port();
        let server = ok(server_config(&good));
        let (stdin, _keep_open) = ok(nix::unistd::pipe());
        let waiting = std::thread::spawn(move || {
            accept(&listener, &server, &stdin, &[], Duration::from_secs(30)).and_then(
                |mut inbound| {
                    let mut got = Vec::new();
                    let read = inbound.read_to_end(&mut got).map(|_| got);
                    read.map_err(DirectError::Io)
                },
            )
        });
        let address = format!("127.0.0.1:{port}");

        // Plain bytes: a TLS alert at most, never data.
        let mut plain = ok(TcpStream::connect(&address));
        ok(plain.write_all(b"GET / HTTP/1.0\r\n\r\n"));
        ok(plain.set_read_timeout(Some(Duration::from_secs(15))));
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer);
        assert!(
            answer.is_empty() || (answer.len() <= 7 && answer[0] == 0x15),
            "plain bytes got {answer:?}"
        );

        // Another migration's secret: refused.
        let refused = connect(&address, &ok(client_config(&other)));
        assert!(
            matches!(refused, Err(DirectError::Handshake { .. })),
            "{refused:?}"
        );

        // A connection that says nothing holds no one up.
        let _silent = ok(TcpStream::connect(&address));
        // The secret: through at once, and the bytes arrive whole.
        source_gets_through(&address, &good, waiting, "a silent connection");
    }

    /// The source holding `secret` connects to `address` at once (not held up by `behind`),
    /// and what it sends arrives whole at the `waiting` accept.
    fn source_gets_through(
        address: &str,
        secret: &Keys,
        waiting: std::thread::JoinHandle<Result<Vec<u8>, DirectError>>,
        behind: &str,
    ) {
        let started = Instant::now();
        let mut real = ok(connect(address, &ok(client_config(secret))));
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT / 2,
            "the source waited {:?} behind {behind}",
            started.elapsed()
        );
        ok(real.write_all(b"the archive"));
        real.conn.send_close_notify();
        ok(real.flush());
        let got = ok(ok(waiting
            .join()
            .map_err(|_| "the waiting thread panicked")));
        assert_eq!(got, b"the archive");
    }

    /// A connection from `127.0.0.2` (another pod, say), idle: `std` cannot choose the local
    /// address, so it is made with nix.
    fn idle_from_127_0_0_2(port: u16) -> TcpStream {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket,
        };
        use std::os::fd::AsRawFd as _;
        let fd = ok(socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        ));
        ok(bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 2, 0)));
        ok(connect(
            fd.as_raw_fd(),
            &SockaddrIn::new(127, 0, 0, 1, port),
        ));
        TcpStream::from(fd)
    }

    #[test]
    fn connections_from_elsewhere_are_closed_at_once_and_never_crowd_out_the_source() {
        let secret = keys();
        let listener = ok(listen(0));
        let port = ok(listener.local_addr()).port();
        let server = ok(server_config(&secret));
        let (stdin, _keep_open) = ok(nix::unistd::pipe());
        let source: std::net::IpAddr = [127, 0, 0, 1].into();
        let waiting = std::thread::spawn(move || {
            accept(
                &listener,
                &server,
                &stdin,
                &[source],
                Duration::from_secs(30),
            )
            .and_then(|mut inbound| {
                let mut got = Vec::new();
                let read = inbound.read_to_end(&mut got).map(|_| got);
                read.map_err(DirectError::Io)
            })
        });
        // More idle connections than handshakes may run at once, from another address: each
        // is closed without a word (end of file), none holds a slot.
        let strangers: Vec<TcpStream> = (0..MAX_HANDSHAKES + 8)
            .map(|_| idle_from_127_0_0_2(port))
            .collect();
        for mut stranger in strangers {
            ok(stranger.set_read_timeout(Some(Duration::from_secs(15))));
            let mut answer = Vec::new();
            let read = stranger.read_to_end(&mut answer);
            assert!(
                matches!(read, Ok(0))
                    || read.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
                "a stranger's connection was kept: {answer:?}"
            );
        }
        // The source gets through at once.
        source_gets_through(&format!("127.0.0.1:{port}"), &secret, waiting, "strangers");
    }

    /// Two relays as the launchers run them for post-copy, over a real TLS connection on
    /// loopback: a burst far larger than rustls's send buffer (CRIU's page server sends pages
    /// in runs of many pages) crosses whole, the small requests the other way too, and the
    /// page server closing its socket ends both relays cleanly, the target's CRIU seeing the
    /// end of its socket.
    #[test]
    fn the_page_relays_carry_bursts_larger_than_the_tls_buffer_both_ways() {
        use std::os::unix::net::UnixStream;
        let secret = keys();
        let listener = ok(listen(0));
        let address = format!("127.0.0.1:{}", ok(listener.local_addr()).port());
        let server = ok(server_config(&secret));
        let (stdin, _keep_open) = ok(nix::unistd::pipe());
        let accepted = std::thread::spawn(move || {
            accept(&listener, &server, &stdin, &[], Duration::from_secs(30))
        });
        let outbound = ok(connect(&address, &ok(client_config(&secret))));
        let inbound = ok(ok(accepted.join().map_err(|_| "accept panicked")));
        let (source_relay_end, mut page_server) = ok(UnixStream::pair());
        let (target_relay_end, mut lazy_daemon) = ok(UnixStream::pair());
        let source = std::thread::spawn(move || relay_pages(outbound, source_relay_end));
        let target = std::thread::spawn(move || relay_pages(inbound, target_relay_end));

        let pages: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        ok(lazy_daemon.write_all(b"send me everything"));
        let mut request = [0u8; 18];
        ok(page_server.read_exact(&mut request));
        assert_eq!(&request, b"send me everything");
        let sent = pages.clone();
        let server = std::thread::spawn(move || {
            ok(page_server.write_all(&sent));
            drop(page_server);
        });
        let mut got = Vec::new();
        ok(lazy_daemon.read_to_end(&mut got));
        assert!(
            got == pages,
            "{} bytes arrived of {}",
            got.len(),
            pages.len()
        );
        ok(server.join().map_err(|_| "the page server panicked"));
        let (source_in, source_out) = ok(ok(source.join().map_err(|_| "relay panicked")));
        let (target_in, target_out) = ok(ok(target.join().map_err(|_| "relay panicked")));
        assert_eq!((source_in, source_out), (18, pages.len() as u64));
        assert_eq!((target_in, target_out), (pages.len() as u64, 18));
    }

    #[test]
    fn the_source_dumps_on_go_only() {
        let word = |line: Option<&[u8]>| {
            let (stdin, writer) = ok(nix::unistd::pipe());
            if let Some(line) = line {
                ok(nix::unistd::write(&writer, line));
            } else {
                drop(writer);
                return wait_for_go(&stdin, Duration::from_secs(5));
            }
            wait_for_go(&stdin, Duration::from_secs(5))
        };
        assert!(matches!(word(Some(b"go\n")), Ok(())));
        assert!(matches!(word(Some(b"stop\n")), Err(DirectError::Cancelled)));
        assert!(
            matches!(word(None), Err(DirectError::Cancelled)),
            "stdin ended"
        );
        let (stdin, _silent) = ok(nix::unistd::pipe());
        assert!(matches!(
            wait_for_go(&stdin, Duration::from_millis(300)),
            Err(DirectError::NoGo(_))
        ));
    }

    #[test]
    fn a_line_on_stdin_ends_the_wait() {
        let listener = ok(listen(0));
        let server = ok(server_config(&keys()));
        let (stdin, writer) = ok(nix::unistd::pipe());
        ok(nix::unistd::write(&writer, b"cancel\n"));
        let waited = accept(&listener, &server, &stdin, &[], Duration::from_secs(30));
        assert!(matches!(waited, Err(DirectError::Cancelled)), "{waited:?}");
    }

    #[test]
    fn a_target_nobody_listens_on_is_unreachable_not_a_handshake_failure() {
        // A port that was just free: connection refused.
        let port = ok(ok(listen(0)).local_addr()).port();
        let result = connect(&format!("127.0.0.1:{port}"), &ok(client_config(&keys())));
        assert!(
            matches!(result, Err(DirectError::Connect { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn a_secret_line_that_is_not_one_is_refused() {
        assert!(matches!(read_secret(&b""[..]), Err(DirectError::Secret(_))));
        assert!(matches!(
            read_secret(&b"{\"cert\":\"zz\",\"key\":\"00\"}\n"[..]),
            Err(DirectError::Secret(_))
        ));
    }
}
