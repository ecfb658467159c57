//! A connection, to a client or to a server: plain TCP, or TLS over it once negotiated
//! (an `SSLRequest` answered `S`, or PostgreSQL 17's direct TLS), or — towards a node
//! configured by socket directory — a Unix-domain socket (never TLS, as with libpq). One
//! type for all, so the login, the console, the engine and the backend code serve any
//! without knowing which.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};

use crate::nodeaddr::NodeAddr;
use crate::readiness::Sock;

type Tls = futures_rustls::TlsStream<Sock>;

pub enum NetStream {
    Plain(Sock),
    /// A Unix-domain socket to a server.
    Unix(Sock),
    /// Boxed: a TLS session's state is large and most clients are plain.
    Tls(Box<Tls>),
    /// Only while a TLS handshake takes the socket over.
    Upgrading,
}

impl NetStream {
    /// Connects to a server at `addr` within `timeout` (a timeout is `TimedOut`).
    pub async fn connect(addr: &NodeAddr, timeout: Duration) -> io::Result<NetStream> {
        match addr {
            NodeAddr::Tcp(addr) => connect_tcp(*addr, timeout).await,
            NodeAddr::Unix { path, .. } => connect_unix(path, timeout).await,
        }
    }

    fn tcp(&self) -> Option<&Sock> {
        match self {
            NetStream::Plain(tcp) => Some(tcp),
            NetStream::Tls(tls) => Some(tls.get_ref().0),
            NetStream::Unix(..) | NetStream::Upgrading => None,
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, NetStream::Unix(..))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, NetStream::Tls(_))
    }

    /// The application protocol agreed in the TLS handshake, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            NetStream::Tls(tls) => tls.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// The client's certificate chain, leaf first, when it presented one over TLS.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            NetStream::Tls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.as_ref()),
            _ => None,
        }
    }

    /// The peer's IP address and port (an error for a Unix-domain socket).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        let addr = self
            .tcp()
            .ok_or_else(|| self.no_ip())?
            .socket()
            .peer_addr()?;
        addr.as_socket().ok_or_else(|| self.no_ip())
    }

    /// Sets TCP_NODELAY; nothing to do on a Unix-domain socket.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        if self.is_unix() {
            return Ok(());
        }
        self.tcp().ok_or_else(gone)?.socket().set_nodelay(on)
    }

    /// True when a plain socket was read dry and nothing arrived since, as far as this
    /// thread has heard (never for TLS, whose library may hold bytes of its own).
    pub fn known_quiet(&self) -> bool {
        match self {
            NetStream::Plain(sock) | NetStream::Unix(sock) => sock.known_quiet(),
            _ => false,
        }
    }

    /// Peeks at the raw socket (for TLS, the encrypted bytes): 0 means the peer left.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let NetStream::Unix(unix) = self {
            return unix.peek(buf).await;
        }
        self.tcp().ok_or_else(gone)?.peek(buf).await
    }

    /// Writes all of `bytes` and pushes them out (TLS keeps records until flushed).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        use futures_lite::AsyncWriteExt;
        self.write_all(bytes).await?;
        self.flush().await
    }

    /// Runs a TLS handshake as the server over the plain connection and continues over
    /// TLS.
    pub async fn start_tls(&mut self, acceptor: &futures_rustls::TlsAcceptor) -> io::Result<()> {
        let tcp = self.take_plain()?;
        let tls = acceptor.accept(tcp).await?;
        *self = NetStream::Tls(Box::new(tls.into()));
        Ok(())
    }

    /// Runs a TLS handshake as the client (towards `name`) and continues over TLS.
    pub async fn connect_tls(
        &mut self,
        connector: &futures_rustls::TlsConnector,
        name: futures_rustls::rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let tcp = self.take_plain()?;
        let tls = connector.connect(name, tcp).await?;
        *self = NetStream::Tls(Box::new(tls.into()));
        Ok(())
    }

    fn take_plain(&mut self) -> io::Result<Sock> {
        match std::mem::replace(self, NetStream::Upgrading) {
            NetStream::Plain(tcp) => Ok(tcp),
            other => {
                let unix = other.is_unix();
                *self = other;
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    if unix {
                        "TLS is not used over a Unix-domain socket"
                    } else {
                        "TLS is already on"
                    },
                ))
            }
        }
    }

    /// Whether the stream may be parked (see `dormant`): a plain TCP client socket.
    pub fn is_parkable(&self) -> bool {
        matches!(self, NetStream::Plain(_))
    }

    /// Takes a plain TCP socket out of the thread's epoll set and gives it up; any other
    /// stream is handed back.
    pub fn into_parkable(self) -> Result<OwnedFd, NetStream> {
        match self {
            NetStream::Plain(tcp) => Ok(tcp.into_fd()),
            other => Err(other),
        }
    }

    /// A plain TCP client stream over a socket given up by [`NetStream::into_parkable`]
    /// (still non-blocking).
    pub fn from_parked(fd: OwnedFd) -> io::Result<NetStream> {
        Sock::nonblocking(fd).map(NetStream::Plain)
    }

    /// The local IP address and port (an error for a Unix-domain socket).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let addr = self
            .tcp()
            .ok_or_else(|| self.no_ip())?
            .socket()
            .local_addr()?;
        addr.as_socket().ok_or_else(|| self.no_ip())
    }

    fn no_ip(&self) -> io::Error {
        if self.is_unix() {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "a Unix-domain socket has no IP address",
            )
        } else {
            gone()
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

/// Connects a Unix-domain stream socket without blocking the executor: connect(2) on a
/// Unix socket completes at once, or fails with `EAGAIN` while the server's listen queue
/// is full; then it is tried again every few milliseconds until `timeout`.
async fn connect_unix(path: &Path, timeout: Duration) -> io::Result<NetStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match socket.connect(&addr) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection timed out",
                    ));
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(NetStream::Unix(Sock::nonblocking(socket.into())?))
}

/// Connects a TCP socket without blocking the executor, within `timeout`.
async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<NetStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    let pending = match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
        Err(e) => return Err(e),
    };
    let sock = Sock::nonblocking(socket.into())?;
    if pending {
        let connected = async {
            loop {
                sock.ready(true).await;
                if let Some(e) = sock.socket().take_error()? {
                    return Err(e);
                }
                // Connected once it has a peer (a wake may come before the handshake ends).
                match sock.socket().peer_addr() {
                    Ok(_) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
                    Err(e) => return Err(e),
                }
            }
        };
        let expired = async {
            glommio::timer::sleep(timeout).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection timed out",
            ))
        };
        futures_lite::future::or(connected, expired).await?;
    }
    Ok(NetStream::Plain(sock))
}

impl AsRawFd for NetStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NetStream::Unix(unix) => unix.as_raw_fd(),
            _ => self.tcp().map_or(-1, AsRawFd::as_raw_fd),
        }
    }
}

impl From<Sock> for NetStream {
    fn from(tcp: Sock) -> Self {
        NetStream::Plain(tcp)
    }
}

impl AsyncRead for NetStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            NetStream::Unix(unix) => Pin::new(unix).poll_read(cx, buf),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for NetStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            NetStream::Unix(unix) => Pin::new(unix).poll_write(cx, buf),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            NetStream::Unix(unix) => Pin::new(unix).poll_flush(cx),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            NetStream::Unix(unix) => Pin::new(unix).poll_close(cx),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_close(cx),
            NetStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
