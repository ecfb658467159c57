//! Between units, and between the messages of a unit that keeps its connection, a
//! session holds no I/O buffer: it waits on readability and borrows a pooled buffer only
//! for the instant of a read.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

use crate::bufpool::{Buf, BufPool};
use crate::codec::CodecError;
use crate::context::ShardCtx;

/// What the pump reads and writes: an unpinned async byte stream (a plain socket, or a
/// TLS stream over one).
pub trait Stream: AsyncRead + AsyncWrite + Unpin {}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for T {}

/// How a pump run ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// Both directions drained, no answer outstanding: the unit may be at a boundary.
    Quiet,
    /// The client sent Terminate (everything before it was forwarded).
    ClientTerminated,
    /// The client's connection closed or failed.
    ClientGone,
    /// The client sent something that is not valid protocol.
    ClientProtocol(CodecError),
    /// The server's connection closed or failed (after forwarding what it sent).
    BackendGone,
    /// The server sent something that is not valid protocol.
    BackendProtocol(CodecError),
    /// The shard is shutting down and this session just became idle.
    Drain,
    /// A limit ended the session (the client is told why).
    Cut(super::cut::Cut),
    /// A replay did not reproduce what the client had already received.
    Diverged,
}

/// Waits until `stream` is readable and reads into a buffer borrowed from the shard's
/// pool only for the instant of the read (given back when nothing is there), so a waiting
/// session holds no buffer and a whole request arrives with one read.
pub struct ReadPooled<'a, S> {
    pub stream: &'a mut S,
    pub pool: &'a BufPool,
}

impl<S: Stream> Future for ReadPooled<'_, S> {
    type Output = Option<(Buf, usize)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut buf = self.pool.take();
        match Pin::new(&mut *self.stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Ready(Ok(n)) => Poll::Ready(Some((buf, n))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What woke an idle session.
pub enum Wake {
    Client(Buf, usize),
    Backend(Buf, usize),
    ClientGone,
    BackendGone,
    Drain,
    /// Nothing happened within the wait's limit.
    TimedOut,
    /// (No wait) client bytes the last unit left undecided are there already.
    Pending,
    /// The session has idled, holding nothing, since this instant: it may be parked.
    Park(std::time::Instant),
}

/// Waits, holding no buffers, until the client or the connection the session keeps (if
/// any) speaks or goes away, the shard starts draining, `limit` passes, or (with a
/// `nap`) the session has idled long enough to be parked.
pub async fn idle_wait<C: Stream, S: Stream>(
    ctx: &ShardCtx,
    client: &mut C,
    server: Option<&mut S>,
    limit: Option<std::time::Duration>,
    nap: Option<crate::dormant::NapWait<'_>>,
) -> Wake {
    let from_client = async {
        match (ReadPooled {
            stream: client,
            pool: &ctx.bufs,
        })
        .await
        {
            Some((buf, n)) => Wake::Client(buf, n),
            None => Wake::ClientGone,
        }
    };
    let from_server = async {
        let Some(server) = server else {
            return std::future::pending().await;
        };
        match (ReadPooled {
            stream: server,
            pool: &ctx.bufs,
        })
        .await
        {
            Some((buf, n)) => Wake::Backend(buf, n),
            None => Wake::BackendGone,
        }
    };
    let drain = async {
        match limit {
            Some(limit) => {
                futures_lite::future::or(
                    async {
                        ctx.draining.wait().await;
                        Wake::Drain
                    },
                    async {
                        glommio::timer::sleep(limit).await;
                        Wake::TimedOut
                    },
                )
                .await
            }
            None => {
                ctx.draining.wait().await;
                Wake::Drain
            }
        }
    };
    let park = async {
        match nap {
            Some(nap) => Wake::Park(nap.await),
            None => std::future::pending().await,
        }
    };
    futures_lite::future::or(
        from_client,
        futures_lite::future::or(from_server, futures_lite::future::or(drain, park)),
    )
    .await
}
