//! Moves traffic between a client and the server connection it leases in transaction or
//! statement pooling: both directions at once in one future, like the session pump, but
//! message-aware upstream (names are rewritten, see [`super::upstream`]) and able to drop
//! or insert whole messages downstream (see [`super::responses`]).
//!
//! Downstream bytes are forwarded in place from the read buffer; only a message that may
//! still be dropped (ParseComplete, CloseComplete, ErrorResponse) is held back until it
//! is complete. Upstream messages are copied into an output buffer as they are translated.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::backend::ServerParams;
use crate::bufpool::{Buf, BufPool};
use crate::codec::frame::{read_header, Scanner, Step, TagSet, HEADER_LEN};
use crate::codec::tag::{be, fe, status};
use crate::codec::{backend, frontend, CodecError};
use crate::stats::ShardStats;
use crate::sync::Latch;

use super::responses::{Action, Outcome};
use super::upstream::{Translated, Upstream};
use crate::session::pump::{PumpEnd, Stream};

/// Server messages whose body decides something: errors, command tags, transaction
/// status, parameter changes, notifications (whose sender pid may be rewritten).
const DOWN_CAPTURE: TagSet = TagSet::new(&[
    be::ERROR_RESPONSE,
    be::COMMAND_COMPLETE,
    be::READY_FOR_QUERY,
    be::PARAMETER_STATUS,
    be::PARAMETER_DESCRIPTION,
    be::ROW_DESCRIPTION,
    be::NOTIFICATION_RESPONSE,
]);
/// Server messages whose arrival completes an answer.
const DOWN_NOTIFY: TagSet = TagSet::new(&[
    be::PARSE_COMPLETE,
    be::BIND_COMPLETE,
    be::CLOSE_COMPLETE,
    be::NO_DATA,
    be::EMPTY_QUERY_RESPONSE,
    be::PORTAL_SUSPENDED,
    be::COPY_IN_RESPONSE,
    be::COPY_OUT_RESPONSE,
    be::COPY_BOTH_RESPONSE,
]);
/// Server messages the proxy may drop or rewrite: held back until complete.
const DROPPABLE: TagSet = TagSet::new(&[
    be::PARSE_COMPLETE,
    be::CLOSE_COMPLETE,
    be::ERROR_RESPONSE,
    be::PARAMETER_DESCRIPTION,
    be::ROW_DESCRIPTION,
    be::NO_DATA,
    be::NOTIFICATION_RESPONSE,
]);
/// Stop translating client messages while this much output waits to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// Client → server: raw bytes in, translated bytes out.
pub struct UpLane {
    inb: Option<Buf>,
    start: usize,
    end: usize,
    /// A message larger than the read buffer, being assembled.
    big: Vec<u8>,
    big_len: usize,
    pub out: Vec<u8>,
    out_pos: usize,
    max_message_size: usize,
}

impl UpLane {
    pub fn new(max_message_size: usize) -> Self {
        UpLane {
            inb: None,
            start: 0,
            end: 0,
            big: Vec::new(),
            big_len: 0,
            out: Vec::new(),
            out_pos: 0,
            max_message_size,
        }
    }

    /// Client bytes not yet translated.
    pub fn pending(&self) -> &[u8] {
        match &self.inb {
            Some(buf) => &buf[self.start..self.end],
            None => &[],
        }
    }

    /// Takes over bytes read while idle.
    pub fn seed(&mut self, buf: Buf, n: usize) {
        self.inb = Some(buf);
        self.start = 0;
        self.end = n;
    }

    pub fn activate(&mut self, pool: &BufPool) {
        if self.inb.is_none() {
            self.inb = Some(pool.take());
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives the read buffer back when nothing in it is pending.
    pub fn deactivate(&mut self) {
        if self.start == self.end {
            self.inb = None;
            self.start = 0;
            self.end = 0;
        }
        if self.out_pos == self.out.len() && self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
            self.out_pos = 0;
        }
    }

    /// Nothing received that is not yet sent, and no message half-received.
    pub fn is_quiet(&self) -> bool {
        self.start == self.end && self.big_len == 0 && self.out_pos == self.out.len()
    }

    /// Bytes of translated output not yet written.
    pub fn unsent(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// True when part of a message is still missing.
    pub fn mid_message(&self) -> bool {
        self.start != self.end || self.big_len != 0
    }
}

/// Server → client, forwarded in place: [start, end) scanned and ready to send (minus a
/// held-back tail), [end, raw_end) read but not scanned yet.
pub struct DownLane {
    buf: Option<Buf>,
    start: usize,
    end: usize,
    raw_end: usize,
    hold: usize,
    ready_pos: usize,
    scanner: Scanner,
}

impl DownLane {
    pub fn new() -> Self {
        DownLane {
            buf: None,
            start: 0,
            end: 0,
            raw_end: 0,
            hold: 0,
            ready_pos: 0,
            scanner: Scanner::new(backend::TAGS, DOWN_CAPTURE, usize::MAX >> 1)
                .with_notify(DOWN_NOTIFY),
        }
    }

    pub fn seed(&mut self, buf: Buf, n: usize) {
        self.buf = Some(buf);
        self.start = 0;
        self.end = 0;
        self.raw_end = n;
        self.hold = 0;
    }

    pub fn activate(&mut self, pool: &BufPool) {
        if self.buf.is_none() {
            self.buf = Some(pool.take());
            self.start = 0;
            self.end = 0;
            self.raw_end = 0;
            self.hold = 0;
        }
    }

    pub fn deactivate(&mut self) {
        if self.start == self.raw_end {
            self.buf = None;
            self.start = 0;
            self.end = 0;
            self.raw_end = 0;
            self.hold = 0;
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.start == self.raw_end && self.scanner.at_boundary()
    }

    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary() && self.end == self.raw_end
    }

    fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

impl Default for DownLane {
    fn default() -> Self {
        Self::new()
    }
}

/// Protocol state the release decision needs.
#[derive(Debug, Default)]
pub struct Flow {
    /// The server waits for COPY data from the client.
    pub copy_in: bool,
    /// The client sent Terminate.
    pub terminated: bool,
    /// When the oldest unanswered request went out (for the query-duration histogram).
    pub since: Option<std::time::Instant>,
    /// The lease is on a read node: outside a transaction, read no more client input,
    /// so the client's next unit is routed on its own (it may write).
    pub hold_when_idle: bool,
    /// The server sent a FATAL (or PANIC) ErrorResponse, which the client has; the
    /// connection closes next and the proxy adds no error of its own.
    pub server_fatal: bool,
}

/// Generic over both streams (`C` client, `S` server), so a TLS stream slots in beside a
/// plain socket.
pub struct PooledPump<'a, C, S> {
    pub client: &'a mut C,
    pub server: &'a mut S,
    pub params: &'a mut ServerParams,
    pub status: &'a mut u8,
    pub up: &'a mut UpLane,
    pub down: &'a mut DownLane,
    /// Translation state, including the answers owed and the connection's statements.
    pub translate: Upstream<'a>,
    pub flow: &'a mut Flow,
    pub stats: &'a ShardStats,
    pub draining: &'a Latch,
    pub backend_eof: bool,
    /// (the server's real pid, the pid the client was given): a notification the
    /// client's own backend sent shows the client's pid, as it would without a pooler.
    pub pids: (i32, i32),
}

type Moved = Result<bool, PumpEnd>;

impl<C: Stream, S: Stream> Future for PooledPump<'_, C, S> {
    type Output = PumpEnd;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PumpEnd> {
        let this = &mut *self;
        loop {
            let mut progress = false;
            for step in [
                PooledPump::flush_down,
                PooledPump::scan_down,
                PooledPump::fill_down,
                PooledPump::flush_up,
                PooledPump::translate_up,
                PooledPump::fill_up,
            ] {
                match step(this, cx) {
                    Poll::Ready(Ok(moved)) => progress |= moved,
                    Poll::Ready(Err(end)) => return Poll::Ready(end),
                    Poll::Pending => {}
                }
            }
            if this.backend_eof && this.down.start == this.down.raw_end {
                return Poll::Ready(PumpEnd::BackendGone);
            }
            if this.flow.terminated && this.up.is_quiet() {
                return Poll::Ready(PumpEnd::ClientTerminated);
            }
            if this.up.is_quiet() && this.down.is_quiet() && this.translate.responses.is_empty() {
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

impl<C: Stream, S: Stream> PooledPump<'_, C, S> {
    fn flush_down(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        let Some(buf) = lane.buf.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        let limit = lane.end - lane.hold.min(lane.end - lane.start);
        if lane.start < limit {
            return match Pin::new(&mut *self.client).poll_write(cx, &buf[lane.start..limit]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
                Poll::Ready(Ok(n)) => {
                    lane.start += n;
                    self.stats.bytes_to_clients.add(n as u64);
                    compact_down(lane);
                    Poll::Ready(Ok(true))
                }
                Poll::Pending => Poll::Pending,
            };
        }
        // The proxy's own answers go in at a message boundary, after what came before.
        let ready = &mut self.translate.responses.ready;
        let at_boundary =
            lane.start == lane.end && (lane.end < lane.raw_end || lane.scanner.at_boundary());
        if !ready.is_empty() && at_boundary {
            return match Pin::new(&mut *self.client).poll_write(cx, &ready[lane.ready_pos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
                Poll::Ready(Ok(n)) => {
                    lane.ready_pos += n;
                    self.stats.bytes_to_clients.add(n as u64);
                    if lane.ready_pos == ready.len() {
                        ready.clear();
                        lane.ready_pos = 0;
                    }
                    Poll::Ready(Ok(true))
                }
                Poll::Pending => Poll::Pending,
            };
        }
        Poll::Ready(Ok(false))
    }

    /// Scans read server bytes, stopping at a message to drop or where the proxy's own
    /// answers must go in.
    fn scan_down(&mut self, _cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        if lane.end == lane.raw_end || !self.translate.responses.ready.is_empty() {
            return Poll::Ready(Ok(false));
        }
        let Some(buf) = lane.buf.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        let base = lane.end;
        let responses = &mut *self.translate.responses;
        let backend_status = &mut *self.status;
        let params = &mut *self.params;
        let server = &mut *self.translate.server;
        let flow = &mut *self.flow;
        let stats = self.stats;
        let mut outcome = Outcome::default();
        let mut dropped: Option<usize> = None;
        let mut own_notification: Option<usize> = None;
        let (server_pid, client_pid) = self.pids;
        let chunk = &buf[base..lane.raw_end];
        let scanned = lane.scanner.scan(chunk, |tag, body, end| {
            match tag {
                be::NOTIFICATION_RESPONSE if backend::notification_from(body, server_pid) => {
                    // Patched once the scan lets go of the buffer (the message is held
                    // back until complete, so all of it is still there).
                    own_notification = (base + end).checked_sub(body.len());
                    return Step::Stop;
                }
                be::READY_FOR_QUERY => {
                    *backend_status = body.first().copied().unwrap_or(status::IDLE);
                    flow.copy_in = false;
                }
                be::COPY_IN_RESPONSE => flow.copy_in = true,
                be::COMMAND_COMPLETE => {
                    flow.copy_in = false;
                    stats.count_statement(body);
                }
                be::ERROR_RESPONSE => {
                    flow.copy_in = false;
                    flow.server_fatal |= backend::is_fatal_error(body);
                }
                be::PARAMETER_STATUS => {
                    if let Ok(backend::BackendMessage::ParameterStatus { name, value }) =
                        backend::decode(tag, body)
                    {
                        params.set(name, value);
                    }
                }
                _ => {}
            }
            let action = responses.on_server_message(tag, body, server, &mut outcome);
            if tag == be::READY_FOR_QUERY && responses.outstanding() == 0 {
                if let Some(since) = flow.since.take() {
                    stats
                        .query_duration
                        .record_us(since.elapsed().as_micros() as u64);
                }
            }
            if action == Action::Drop {
                dropped = Some(HEADER_LEN + body.len());
                return Step::Stop;
            }
            if responses.ready.is_empty() {
                Step::Continue
            } else {
                Step::Stop
            }
        });
        let scanned = match scanned {
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(PumpEnd::BackendProtocol(e))),
        };
        if let Some(at) = own_notification.filter(|&at| at >= lane.start) {
            buf[at..at + 4].copy_from_slice(&client_pid.to_be_bytes());
        }
        if outcome.cleared {
            self.translate.server.clear();
            self.translate.pending_close.clear();
        }
        self.translate
            .pending_close
            .extend(std::mem::take(&mut outcome.to_close));
        if outcome.schema_changed {
            // Plans prepared before may no longer fit: prepare afresh where next used.
            self.translate.registry.schema_changed();
        }
        if self.translate.client.settle(&mut outcome) {
            // A Parse held back for a name whose registration was undecided may go on.
            self.translate.responses.awaiting_parse = false;
        }
        let lane = &mut *self.down;
        let msg_end = base + scanned;
        match dropped {
            Some(len) if msg_end - len >= lane.start => {
                let from = msg_end - len;
                if let Some(buf) = lane.buf.as_mut() {
                    buf.copy_within(msg_end..lane.raw_end, from);
                }
                lane.raw_end -= len;
                lane.end = from;
            }
            _ => lane.end = msg_end,
        }
        lane.hold = if lane.end == lane.raw_end {
            match lane.scanner.partial_message() {
                Some((None, n)) => n,
                Some((Some(tag), n)) if DROPPABLE.contains(tag) => n,
                _ => 0,
            }
        } else {
            0
        };
        // A held-back message that fills the whole buffer cannot be held any longer.
        if lane.hold > 0 && lane.start + lane.hold >= lane.capacity() {
            lane.hold = 0;
        }
        Poll::Ready(Ok(true))
    }

    fn fill_down(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        if self.backend_eof || lane.end != lane.raw_end {
            return Poll::Ready(Ok(false));
        }
        compact_down(lane);
        if lane.raw_end == lane.capacity() {
            return Poll::Ready(Ok(false));
        }
        let Some(buf) = lane.buf.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        match Pin::new(&mut *self.server).poll_read(cx, &mut buf[lane.raw_end..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                self.backend_eof = true;
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Ok(n)) => {
                lane.raw_end += n;
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn flush_up(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.up;
        if lane.out_pos == lane.out.len() {
            return Poll::Ready(Ok(false));
        }
        match Pin::new(&mut *self.server).poll_write(cx, &lane.out[lane.out_pos..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                // The server is gone; forward what it said last, then end.
                self.backend_eof = true;
                lane.out.clear();
                lane.out_pos = 0;
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Ok(n)) => {
                lane.out_pos += n;
                if lane.out_pos == lane.out.len() {
                    lane.out.clear();
                    lane.out_pos = 0;
                }
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Translates every complete client message received so far.
    fn translate_up(&mut self, _cx: &mut Context<'_>) -> Poll<Moved> {
        let mut moved = false;
        loop {
            let lane = &mut *self.up;
            if lane.out.len() - lane.out_pos >= OUT_HIGH_WATER
                || self.flow.terminated
                || self.translate.responses.awaiting_check
                || self.translate.responses.awaiting_parse
            {
                return Poll::Ready(Ok(moved));
            }
            let Some(inb) = lane.inb.as_ref() else {
                return Poll::Ready(Ok(moved));
            };
            if lane.big_len > 0 {
                let want = lane.big_len - lane.big.len();
                let take = want.min(lane.end - lane.start);
                lane.big
                    .extend_from_slice(&inb[lane.start..lane.start + take]);
                lane.start += take;
                moved |= take > 0;
                if lane.big.len() < lane.big_len {
                    return Poll::Ready(Ok(moved));
                }
                let msg = std::mem::take(&mut lane.big);
                let result = self.translate.message(&msg, &mut lane.out);
                if result == Ok(Translated::Hold) {
                    // Offered again once the shape check is answered.
                    self.up.big = msg;
                    return Poll::Ready(Ok(true));
                }
                lane.big_len = 0;
                self.after_message(msg[0]);
                let mut msg = msg;
                msg.clear();
                if msg.capacity() <= 64 * 1024 {
                    self.up.big = msg;
                }
                if let Err(e) = result {
                    return Poll::Ready(Err(PumpEnd::ClientProtocol(e)));
                }
                continue;
            }
            let pending = &inb[lane.start..lane.end];
            let (tag, len) = match read_header(pending, lane.max_message_size) {
                Ok(Some(h)) => h,
                Ok(None) => return Poll::Ready(Ok(moved)),
                Err(e) => return Poll::Ready(Err(PumpEnd::ClientProtocol(e))),
            };
            if !frontend::TAGS.contains(tag) {
                return Poll::Ready(Err(PumpEnd::ClientProtocol(CodecError::UnknownTag(tag))));
            }
            if len > pending.len() {
                if len > inb.len() {
                    // Larger than the read buffer: assemble it on the side.
                    lane.big.clear();
                    lane.big.reserve(len);
                    lane.big.extend_from_slice(pending);
                    lane.big_len = len;
                    lane.start = lane.end;
                    moved = true;
                    continue;
                }
                return Poll::Ready(Ok(moved));
            }
            let msg = &inb[lane.start..lane.start + len];
            let result = self.translate.message(msg, &mut lane.out);
            if result == Ok(Translated::Hold) {
                return Poll::Ready(Ok(true));
            }
            lane.start += len;
            self.after_message(tag);
            if let Err(e) = result {
                return Poll::Ready(Err(PumpEnd::ClientProtocol(e)));
            }
            moved = true;
        }
    }

    fn after_message(&mut self, tag: u8) {
        if matches!(tag, fe::QUERY | fe::FUNCTION_CALL | fe::SYNC) && self.flow.since.is_none() {
            self.flow.since = Some(std::time::Instant::now());
        }
        match tag {
            fe::QUERY | fe::FUNCTION_CALL => self.stats.queries.inc(),
            fe::EXECUTE => self.stats.queries.inc(),
            fe::COPY_DONE | fe::COPY_FAIL => self.flow.copy_in = false,
            fe::TERMINATE => self.flow.terminated = true,
            _ => {}
        }
    }

    fn fill_up(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.up;
        if self.flow.terminated
            || self.backend_eof
            || (self.flow.hold_when_idle && *self.status == status::IDLE)
        {
            return Poll::Ready(Ok(false));
        }
        if lane.start == lane.end {
            lane.start = 0;
            lane.end = 0;
        }
        let Some(buf) = lane.inb.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        if lane.end == buf.len() {
            if lane.start == 0 {
                return Poll::Ready(Ok(false));
            }
            buf.copy_within(lane.start..lane.end, 0);
            lane.end -= lane.start;
            lane.start = 0;
        }
        match Pin::new(&mut *self.client).poll_read(cx, &mut buf[lane.end..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
            Poll::Ready(Ok(n)) => {
                lane.end += n;
                self.stats.bytes_from_clients.add(n as u64);
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn compact_down(lane: &mut DownLane) {
    if lane.start == lane.raw_end {
        lane.start = 0;
        lane.end = 0;
        lane.raw_end = 0;
    } else if lane.start > 0 && lane.raw_end == lane.capacity() {
        let (start, raw_end) = (lane.start, lane.raw_end);
        if let Some(b) = lane.buf.as_mut() {
            b.copy_within(start..raw_end, 0);
        }
        lane.end -= start;
        lane.raw_end -= start;
        lane.start = 0;
    }
}
