//! A connection, to a client or to a server: plain TCP, or TLS over it once negotiated
//! (an `SSLRequest` answered `S`, or PostgreSQL 17's direct TLS), or — towards a node
//! configured by socket directory — a Unix-domain socket (never TLS, as with libpq). One
//! type for all, so the login, the console, the engine and the backend code serve any
//! without knowing which.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpStream, UnixStream};

use crate::nodeaddr::NodeAddr;

type Tls = futures_rustls::TlsStream<TcpStream>;

pub enum NetStream {
    Plain(TcpStream),
    /// A Unix-domain socket to a server, with its fd (glommio's type does not lend it).
    Unix(UnixStream, RawFd),
    /// Boxed: a TLS session's state is large and most clients are plain.
    Tls(Box<Tls>),
    /// Only while a TLS handshake takes the socket over.
    Upgrading,
}

impl NetStream {
    /// Connects to a server at `addr` within `timeout` (a timeout is `TimedOut`).
    pub async fn connect(addr: &NodeAddr, timeout: Duration) -> io::Result<NetStream> {
        match addr {
            NodeAddr::Tcp(addr) => TcpStream::connect_timeout(*addr, timeout)
                .await
                .map(NetStream::Plain)
                .map_err(io::Error::from),
            NodeAddr::Unix { path, .. } => connect_unix(path, timeout).await,
        }
    }

    fn tcp(&self) -> Option<&TcpStream> {
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
        Ok(self.tcp().ok_or_else(|| self.no_ip())?.peer_addr()?)
    }

    /// Sets TCP_NODELAY; nothing to do on a Unix-domain socket.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        if self.is_unix() {
            return Ok(());
        }
        Ok(self.tcp().ok_or_else(gone)?.set_nodelay(on)?)
    }

    /// Peeks at the raw socket (for TLS, the encrypted bytes): 0 means the peer left.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let NetStream::Unix(unix, _) = self {
            return Ok(unix.peek(buf).await?);
        }
        Ok(self.tcp().ok_or_else(gone)?.peek(buf).await?)
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

    fn take_plain(&mut self) -> io::Result<TcpStream> {
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

    /// Gives up glommio's hold on a plain TCP socket (its state and any pending poll are
    /// freed) and keeps the socket itself; any other stream is handed back.
    pub fn into_parkable(self) -> Result<std::os::fd::OwnedFd, NetStream> {
        let NetStream::Plain(tcp) = self else {
            return Err(self);
        };
        // glommio's stream has no way to let go of its fd without closing it: keep a
        // duplicate, then let the stream close the original.
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a live fd returns a new fd we own.
        let fd = unsafe { libc::fcntl(tcp.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetStream::Plain(tcp));
        }
        drop(tcp);
        // SAFETY: `fd` was just created above and is owned by nothing else.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// A plain TCP client stream over a socket given up by [`NetStream::into_parkable`].
    ///
    /// # Safety
    /// `fd` must be an open, connected TCP socket that nothing else owns.
    pub unsafe fn from_parked(fd: RawFd) -> NetStream {
        NetStream::Plain(TcpStream::from_raw_fd(fd))
    }

    /// The local IP address and port (an error for a Unix-domain socket).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.tcp().ok_or_else(|| self.no_ip())?.local_addr()?)
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
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is the connected socket just made here; the stream takes it over and
    // closes it. The number is kept only to be read while the stream lives.
    let unix = unsafe { UnixStream::from_raw_fd(fd) };
    Ok(NetStream::Unix(unix, fd))
}

impl AsRawFd for NetStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NetStream::Unix(_, fd) => *fd,
            _ => self.tcp().map_or(-1, AsRawFd::as_raw_fd),
        }
    }
}

impl From<TcpStream> for NetStream {
    fn from(tcp: TcpStream) -> Self {
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
            NetStream::Unix(unix, _) => Pin::new(unix).poll_read(cx, buf),
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
            NetStream::Unix(unix, _) => Pin::new(unix).poll_write(cx, buf),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            NetStream::Unix(unix, _) => Pin::new(unix).poll_flush(cx),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            NetStream::Unix(unix, _) => Pin::new(unix).poll_close(cx),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_close(cx),
            NetStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
