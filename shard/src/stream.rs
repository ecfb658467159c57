//! A connection, to a client or to a server: plain TCP, or TLS over it once negotiated
//! (an `SSLRequest` answered `S`, or PostgreSQL 17's direct TLS). One type for both, so
//! the login, the console, the engine and the backend code serve either without knowing
//! which.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

type Tls = futures_rustls::TlsStream<TcpStream>;

pub enum NetStream {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is large and most clients are plain.
    Tls(Box<Tls>),
    /// Only while a TLS handshake takes the socket over.
    Upgrading,
}

impl NetStream {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            NetStream::Plain(tcp) => Some(tcp),
            NetStream::Tls(tls) => Some(tls.get_ref().0),
            NetStream::Upgrading => None,
        }
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

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.tcp().ok_or_else(gone)?.peer_addr()?)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        Ok(self.tcp().ok_or_else(gone)?.set_nodelay(on)?)
    }

    /// Peeks at the raw socket (for TLS, the encrypted bytes): 0 means the peer left.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
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
                *self = other;
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS is already on",
                ))
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.tcp().ok_or_else(gone)?.local_addr()?)
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl AsRawFd for NetStream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().map_or(-1, AsRawFd::as_raw_fd)
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
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            NetStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            NetStream::Tls(tls) => Pin::new(&mut **tls).poll_close(cx),
            NetStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
