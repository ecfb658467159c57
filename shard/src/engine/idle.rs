//! Between units, and between the messages of a unit that keeps its connection, a
//! session holds no I/O buffer: it waits on readability and borrows a pooled buffer only
//! for the instant of a read.

use std::future::Future;
use std::pin::{pin, Pin};
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
pub fn idle_wait<'a, C: Stream, S: Stream>(
    ctx: &'a ShardCtx,
    client: &'a mut C,
    server: Option<&'a mut S>,
    limit: Option<std::time::Duration>,
    nap: Option<crate::dormant::NapWait<'a>>,
) -> IdleWait<'a, C, S> {
    IdleWait {
        bufs: &ctx.bufs,
        client,
        server,
        drain: ctx.draining.wait(),
        timer: limit.map(glommio::timer::Timer::new),
        nap,
    }
}

/// The future of [`idle_wait`], written out by hand: an idle client that is not parked
/// keeps this for as long as it idles, so it is kept small.
pub struct IdleWait<'a, C, S> {
    bufs: &'a BufPool,
    client: &'a mut C,
    server: Option<&'a mut S>,
    drain: crate::sync::LatchWait<'a>,
    timer: Option<glommio::timer::Timer>,
    nap: Option<crate::dormant::NapWait<'a>>,
}

impl<C: Stream, S: Stream> Future for IdleWait<'_, C, S> {
    type Output = Wake;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Wake> {
        let this = self.get_mut();
        let from_client = ReadPooled {
            stream: &mut *this.client,
            pool: this.bufs,
        };
        if let Poll::Ready(read) = pin!(from_client).poll(cx) {
            return Poll::Ready(match read {
                Some((buf, n)) => Wake::Client(buf, n),
                None => Wake::ClientGone,
            });
        }
        if let Some(server) = this.server.as_deref_mut() {
            let from_server = ReadPooled {
                stream: server,
                pool: this.bufs,
            };
            if let Poll::Ready(read) = pin!(from_server).poll(cx) {
                return Poll::Ready(match read {
                    Some((buf, n)) => Wake::Backend(buf, n),
                    None => Wake::BackendGone,
                });
            }
        }
        if Pin::new(&mut this.drain).poll(cx).is_ready() {
            return Poll::Ready(Wake::Drain);
        }
        if let Some(timer) = this.timer.as_mut() {
            if Pin::new(timer).poll(cx).is_ready() {
                return Poll::Ready(Wake::TimedOut);
            }
        }
        if let Some(nap) = this.nap.as_mut() {
            if let Poll::Ready(since) = Pin::new(nap).poll(cx) {
                return Poll::Ready(Wake::Park(since));
            }
        }
        Poll::Pending
    }
}
