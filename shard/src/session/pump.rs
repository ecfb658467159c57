//! Moves bytes between a client and its backend in both directions at once, unchanged,
//! while scanning message boundaries to keep the protocol state the pooler needs
//! (outstanding Syncs, transaction status, COPY, server parameters).
//!
//! One hand-written future polls four operations — read/write on each side — so neither
//! direction can block the other (a client pipelining a large batch while the server
//! streams results back cannot deadlock), reads fill whole buffers and writes send them
//! in one call, and nothing is allocated per message.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

use crate::backend::ServerParams;
use crate::bufpool::{Buf, BufPool};
use crate::codec::frame::{Scanner, Step, TagSet};
use crate::codec::tag::{be, fe, status};
use crate::codec::{backend, frontend, CodecError};
use crate::stats::ShardStats;
use crate::sync::Latch;

/// Frontend messages whose arrival changes the state we track.
const UP_NOTIFY: TagSet = TagSet::new(&[
    fe::QUERY,
    fe::SYNC,
    fe::FUNCTION_CALL,
    fe::PARSE,
    fe::BIND,
    fe::DESCRIBE,
    fe::EXECUTE,
    fe::CLOSE,
    fe::FLUSH,
    fe::COPY_DONE,
    fe::COPY_FAIL,
]);
/// Frontend messages whose body we need: Terminate ends the session.
const UP_CAPTURE: TagSet = TagSet::new(&[fe::TERMINATE]);
/// Backend messages whose body we need (CommandComplete: to count reads and writes;
/// ErrorResponse: to know whether the server said FATAL before closing).
const DOWN_CAPTURE: TagSet = TagSet::new(&[
    be::READY_FOR_QUERY,
    be::PARAMETER_STATUS,
    be::COPY_IN_RESPONSE,
    be::COMMAND_COMPLETE,
    be::ERROR_RESPONSE,
]);

/// One direction of traffic: a loaned buffer (only while active) and a scanner.
pub struct Lane {
    buf: Option<Buf>,
    start: usize,
    end: usize,
    scanner: Scanner,
}

impl Lane {
    pub fn upstream(max_message_size: usize) -> Lane {
        Lane::new(Scanner::new(frontend::TAGS, UP_CAPTURE, max_message_size).with_notify(UP_NOTIFY))
    }

    pub fn downstream() -> Lane {
        Lane::new(Scanner::new(backend::TAGS, DOWN_CAPTURE, usize::MAX >> 1))
    }

    fn new(scanner: Scanner) -> Lane {
        Lane {
            buf: None,
            start: 0,
            end: 0,
            scanner,
        }
    }

    /// Takes a buffer for the active phase.
    pub fn activate(&mut self, pool: &BufPool) {
        if self.buf.is_none() {
            self.buf = Some(pool.take());
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives the buffer back once everything in it has been sent.
    pub fn deactivate(&mut self) {
        if self.start == self.end {
            self.buf = None;
            self.start = 0;
            self.end = 0;
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.start == self.end && self.scanner.at_boundary()
    }

    /// Bytes received but not yet sent on.
    pub fn pending(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.start..self.end],
            None => &[],
        }
    }

    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary()
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Makes room at the end of the buffer by moving unsent bytes to the front.
    fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.end == self.capacity() {
            let (start, end) = (self.start, self.end);
            if let Some(b) = self.buf.as_mut() {
                b.copy_within(start..end, 0);
            }
            self.start = 0;
            self.end = end - start;
        }
    }

    fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

/// Protocol state of the backend as seen from the traffic.
#[derive(Debug)]
pub struct Tracker {
    /// Query/Sync/FunctionCall messages sent whose ReadyForQuery has not come back.
    pub in_flight: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The server is waiting for COPY data from the client.
    pub copy_in: bool,
    /// Transaction status from the last ReadyForQuery.
    pub status: u8,
    /// When the oldest unanswered request was sent (for the query-duration histogram).
    since: Option<std::time::Instant>,
    /// The server sent a FATAL (or PANIC) ErrorResponse: it closes next, and the client
    /// already has the one error PostgreSQL gives.
    pub server_fatal: bool,
}

impl Tracker {
    pub fn new(status: u8) -> Self {
        Tracker {
            in_flight: 0,
            unsynced: false,
            copy_in: false,
            status,
            since: None,
            server_fatal: false,
        }
    }

    fn on_client_message(&mut self, tag: u8, stats: &ShardStats) {
        match tag {
            fe::QUERY | fe::FUNCTION_CALL => {
                self.request_sent();
                stats.queries.inc();
            }
            fe::SYNC => {
                self.request_sent();
                self.unsynced = false;
            }
            fe::EXECUTE => {
                self.unsynced = true;
                stats.queries.inc();
            }
            fe::COPY_DONE | fe::COPY_FAIL => self.copy_in = false,
            _ => self.unsynced = true,
        }
    }

    fn request_sent(&mut self) {
        if self.in_flight == 0 {
            self.since = Some(std::time::Instant::now());
        }
        self.in_flight += 1;
    }

    fn on_server_message(
        &mut self,
        tag: u8,
        body: &[u8],
        params: &mut ServerParams,
        stats: &ShardStats,
    ) {
        match tag {
            be::READY_FOR_QUERY => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.copy_in = false;
                if self.in_flight == 0 {
                    if let Some(since) = self.since.take() {
                        stats
                            .query_duration
                            .record_us(since.elapsed().as_micros() as u64);
                    }
                }
            }
            be::COMMAND_COMPLETE => stats.count_statement(body),
            be::ERROR_RESPONSE => self.server_fatal |= backend::is_fatal_error(body),
            be::COPY_IN_RESPONSE => self.copy_in = true,
            be::PARAMETER_STATUS => {
                if let Ok(backend::BackendMessage::ParameterStatus { name, value }) =
                    backend::decode(tag, body)
                {
                    params.set(name, value);
                }
            }
            _ => {}
        }
    }
}

/// How an active phase ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// Both directions drained, no request outstanding: the session can go idle.
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
}

/// Generic over both streams (`C` client, `S` server), so a TLS stream slots in beside a
/// plain socket.
pub struct Pump<'a, C, S> {
    pub client: &'a mut C,
    pub backend: &'a mut S,
    pub params: &'a mut ServerParams,
    pub up: &'a mut Lane,
    pub down: &'a mut Lane,
    pub track: &'a mut Tracker,
    pub stats: &'a ShardStats,
    pub draining: &'a Latch,
    pub backend_eof: bool,
    /// The client sent Terminate: forward what came before it, then end.
    pub client_terminated: bool,
}

/// What the pumps read and write: an unpinned async byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin {}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for T {}

impl<C: Stream, S: Stream> Future for Pump<'_, C, S> {
    type Output = PumpEnd;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PumpEnd> {
        let this = &mut *self;
        loop {
            let mut progress = false;

            // Server → client: send what we have, then read more.
            match this.flush_down(cx) {
                Poll::Ready(Ok(moved)) => progress |= moved,
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Pending => {}
            }
            if this.down.start == this.down.end && this.backend_eof {
                return Poll::Ready(PumpEnd::BackendGone);
            }
            match this.fill_down(cx) {
                Poll::Ready(Ok(moved)) => progress |= moved,
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Pending => {}
            }

            // Client → server.
            match this.flush_up(cx) {
                Poll::Ready(Ok(moved)) => progress |= moved,
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Pending => {}
            }
            match this.fill_up(cx) {
                Poll::Ready(Ok(moved)) => progress |= moved,
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Pending => {}
            }

            if this.up.is_quiet() && this.down.is_quiet() && this.track.in_flight == 0 {
                return Poll::Ready(if this.draining.is_set() {
                    PumpEnd::Drain
                } else {
                    PumpEnd::Quiet
                });
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

type Moved = Result<bool, PumpEnd>;

impl<C: Stream, S: Stream> Pump<'_, C, S> {
    fn flush_down(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        if lane.start == lane.end {
            return Poll::Ready(Ok(false));
        }
        let Some(buf) = lane.buf.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        match Pin::new(&mut *self.client).poll_write(cx, &buf[lane.start..lane.end]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
            Poll::Ready(Ok(n)) => {
                lane.start += n;
                self.stats.bytes_to_clients.add(n as u64);
                lane.compact();
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn fill_down(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        if self.backend_eof || lane.end == lane.capacity() {
            return Poll::Ready(Ok(false));
        }
        let Some(buf) = lane.buf.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        match Pin::new(&mut *self.backend).poll_read(cx, &mut buf[lane.end..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                self.backend_eof = true;
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Ok(n)) => {
                let chunk = &buf[lane.end..lane.end + n];
                let (track, params, stats) = (&mut *self.track, &mut *self.params, self.stats);
                let scanned = lane.scanner.scan(chunk, |tag, body, _| {
                    track.on_server_message(tag, body, params, stats);
                    Step::Continue
                });
                if let Err(e) = scanned {
                    return Poll::Ready(Err(PumpEnd::BackendProtocol(e)));
                }
                lane.end += n;
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn flush_up(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.up;
        // A header still arriving is held back: it might be a Terminate.
        let limit = lane.end - lane.scanner.partial_header_len();
        if lane.start >= limit {
            return Poll::Ready(Ok(false));
        }
        let Some(buf) = lane.buf.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        match Pin::new(&mut *self.backend).poll_write(cx, &buf[lane.start..limit]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                // The server is gone; forward what it said last, then end.
                self.backend_eof = true;
                lane.clear();
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Ok(n)) => {
                lane.start += n;
                lane.compact();
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn fill_up(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.up;
        if self.client_terminated {
            return Poll::Ready(if lane.start == lane.end {
                Err(PumpEnd::ClientTerminated)
            } else {
                Ok(false)
            });
        }
        if self.backend_eof || lane.end == lane.capacity() {
            return Poll::Ready(Ok(false));
        }
        let Some(buf) = lane.buf.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        match Pin::new(&mut *self.client).poll_read(cx, &mut buf[lane.end..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
            Poll::Ready(Ok(n)) => {
                self.stats.bytes_from_clients.add(n as u64);
                match scan_up(lane, n, self.track, self.stats) {
                    Ok(terminated) => {
                        // Everything before a Terminate still goes to the server.
                        self.client_terminated = terminated;
                        Poll::Ready(Ok(true))
                    }
                    Err(e) => Poll::Ready(Err(PumpEnd::ClientProtocol(e))),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Scans `n` newly read client bytes at the end of the up lane. Returns true when the
/// client sent Terminate; the lane is then cut just before it.
fn scan_up(
    lane: &mut Lane,
    n: usize,
    track: &mut Tracker,
    stats: &ShardStats,
) -> Result<bool, CodecError> {
    let base = lane.end;
    let Some(buf) = lane.buf.as_ref() else {
        return Ok(false);
    };
    let mut terminate_at = None;
    let scanned = lane.scanner.scan(&buf[base..base + n], |tag, body, end| {
        if tag == fe::TERMINATE {
            terminate_at = Some(base + end - 5 - body.len());
            return Step::Stop;
        }
        track.on_client_message(tag, stats);
        Step::Continue
    })?;
    match terminate_at {
        Some(at) => {
            lane.end = at;
            lane.scanner.reset();
            Ok(true)
        }
        None => {
            lane.end = base + scanned;
            Ok(false)
        }
    }
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

impl Lane {
    /// Makes `buf` this lane's buffer; its freshly read bytes are scanned next.
    fn install(&mut self, buf: Buf) {
        self.buf = Some(buf);
        self.start = 0;
        self.end = 0;
    }
}

/// Takes over client bytes read while idle and scans them as if the pump had read them.
/// Returns true when they hold a Terminate.
pub fn seed_up(
    lane: &mut Lane,
    buf: Buf,
    n: usize,
    track: &mut Tracker,
    stats: &ShardStats,
) -> Result<bool, CodecError> {
    lane.install(buf);
    stats.bytes_from_clients.add(n as u64);
    scan_up(lane, n, track, stats)
}

/// The server-side counterpart of [`seed_up`].
pub fn seed_down(
    lane: &mut Lane,
    buf: Buf,
    n: usize,
    track: &mut Tracker,
    params: &mut ServerParams,
    stats: &ShardStats,
) -> Result<(), CodecError> {
    lane.install(buf);
    let chunk = match lane.buf.as_ref() {
        Some(b) => &b[..n],
        None => return Ok(()),
    };
    let scanned = lane.scanner.scan(chunk, |tag, body, _| {
        track.on_server_message(tag, body, params, stats);
        Step::Continue
    });
    lane.end = n;
    scanned.map(|_| ())
}
