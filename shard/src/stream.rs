//! A client's connection: plain TCP, or TLS over it once negotiated (an `SSLRequest`
//! answered `S`, or PostgreSQL 17's direct TLS). One type for both, so the login, the
//! console and the engine serve either without knowing which.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

type Tls = futures_rustls::server::TlsStream<TcpStream>;

pub enum ClientStream {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is large and most clients are plain.
    Tls(Box<Tls>),
    /// Only while a TLS handshake takes the socket over.
    Upgrading,
}

impl ClientStream {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            ClientStream::Plain(tcp) => Some(tcp),
            ClientStream::Tls(tls) => Some(tls.get_ref().0),
            ClientStream::Upgrading => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The application protocol agreed in the TLS handshake, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            ClientStream::Tls(tls) => tls.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// The client's certificate chain, leaf first, when it presented one over TLS.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match self {
            ClientStream::Tls(tls) => tls
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

    /// Runs a TLS handshake over the plain connection and continues over TLS.
    pub async fn start_tls(&mut self, acceptor: &futures_rustls::TlsAcceptor) -> io::Result<()> {
        let ClientStream::Plain(tcp) = std::mem::replace(self, ClientStream::Upgrading) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already on",
            ));
        };
        let tls = acceptor.accept(tcp).await?;
        *self = ClientStream::Tls(Box::new(tls));
        Ok(())
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl AsRawFd for ClientStream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().map_or(-1, AsRawFd::as_raw_fd)
    }
}

impl From<TcpStream> for ClientStream {
    fn from(tcp: TcpStream) -> Self {
        ClientStream::Plain(tcp)
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            ClientStream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            ClientStream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            ClientStream::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            ClientStream::Tls(tls) => Pin::new(&mut **tls).poll_close(cx),
            ClientStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
