//! The one pump: moves traffic between a client and the server connection its unit
//! uses, both directions at once in one future (neither side can block the other: a
//! client pipelining a large batch while the server streams results cannot deadlock).
//!
//! Downstream bytes are forwarded in place from the read buffer; only a message that may
//! still be dropped (ParseComplete, CloseComplete, ErrorResponse, …) is held back until
//! it is complete. Upstream, each message goes to the phases: one no phase needs to read
//! is forwarded in place as it streams through; one a phase reads is forwarded in place
//! too unless the phase rewrites it (see [`super::lanes::UpLane`]).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use glommio::timer::Timer;

use crate::backend::ServerParams;
use crate::codec::frame::{read_header, Step, TagSet, HEADER_LEN};
use crate::codec::tag::{be, fe, status};
use crate::codec::{backend, frontend, CodecError};
use crate::stats::ShardStats;
use crate::sync::Latch;

use super::cut::Cut;
use super::idle::{PumpEnd, Stream};
use super::intake::MessageMemory;
use super::journal::Swallowed;
use super::lanes::{DownLane, UpLane, DOWN_CAPTURE, DOWN_CAPTURE_FILL, DOWN_CAPTURE_WITH_ROWS};
use super::message::MessageCx;
use super::phase::{ClientAction, Phase, Wire};
use super::responses::{Action, Outcome};
use super::unit::Flow;

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
/// Stop deciding on client messages while this much output waits to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// Generic over both streams (`C` client, `S` server), so a TLS stream slots in beside a
/// plain socket, and over the phases `P` (static dispatch).
pub struct Pump<'a, C, S, P> {
    pub client: &'a mut C,
    pub server: &'a mut S,
    pub params: &'a mut ServerParams,
    pub status: &'a mut u8,
    pub up: &'a mut UpLane,
    pub down: &'a mut DownLane,
    /// What the phases read and update per message, including the answers owed.
    pub cx: MessageCx<'a>,
    pub phases: &'a P,
    pub flow: &'a mut Flow,
    pub stats: &'a ShardStats,
    pub draining: &'a Latch,
    pub backend_eof: bool,
    /// (the server's real pid, the pid the client was given): a notification the
    /// client's own backend sent shows the client's pid, as it would without a pooler.
    pub pids: (i32, i32),
    /// Where messages assembled on the side take their memory from.
    pub memory: &'a Rc<MessageMemory>,
    /// `timeouts.client_stall_timeout_ms`, and its timer while the client is silent in
    /// the middle of a message.
    pub stall_after: Duration,
    pub stall: Option<Timer>,
    /// `timeouts.query_timeout_ms`, and its timer for the request now out (with the
    /// ReadyForQuery count when it was armed).
    pub query_limit: Option<Duration>,
    pub query_deadline: Option<(Timer, u32)>,
    /// The last read of the client's socket found nothing (with room to read).
    pub client_read_pending: bool,
    /// How long a replay may take to reproduce what the client has, and its timer.
    pub verify_limit: Duration,
    pub verify_timer: Option<Timer>,
    /// Bytes were written to the client (the server) since its last flush.
    pub client_unflushed: bool,
    pub server_unflushed: bool,
}

type Moved = Result<bool, PumpEnd>;

impl<C: Stream, S: Stream, P: Phase> Future for Pump<'_, C, S, P> {
    type Output = PumpEnd;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PumpEnd> {
        let this = &mut *self;
        loop {
            let mut progress = false;
            for step in [
                Pump::flush_down,
                Pump::scan_down,
                Pump::fill_down,
                Pump::flush_up,
                Pump::decide_up,
                Pump::fill_up,
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
            if this.up.is_quiet()
                && this.down.is_quiet()
                && this.cx.responses.is_empty()
                && !this.client_unflushed
                && !this.server_unflushed
            {
                if this.down.verifying() {
                    // The replay answered everything and gave the client less than it has.
                    return Poll::Ready(PumpEnd::Diverged);
                }
                return Poll::Ready(if this.draining.is_set() {
                    PumpEnd::Drain
                } else {
                    PumpEnd::Quiet
                });
            }
            if !progress {
                if this.replay_stuck(cx) {
                    return Poll::Ready(PumpEnd::Diverged);
                }
                if let Some(cut) = this.limit_reached(cx) {
                    return Poll::Ready(PumpEnd::Cut(cut));
                }
                return Poll::Pending;
            }
        }
    }
}

/// What swallowing replayed bytes means for the pump.
fn swallowed(state: Swallowed, stats: &ShardStats) -> Moved {
    match state {
        Swallowed::Diverged => Err(PumpEnd::Diverged),
        Swallowed::Matched => {
            stats.replays_succeeded.inc();
            Ok(true)
        }
        Swallowed::More => Ok(true),
    }
}

impl<C: Stream, S: Stream, P: Phase> Pump<'_, C, S, P> {
    /// A replay still checking what the client has cannot go on: the server waits for
    /// client bytes the replay withholds (COPY data, the rest of a message), or the check
    /// outlasted `failover.write_timeout_secs`. (Called when the pump is about to wait.)
    fn replay_stuck(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.down.verifying() {
            self.verify_timer = None;
            return false;
        }
        if self.up.replay_waits_at_gate()
            && self.down.is_quiet()
            && (self.flow.copy_in || self.up.awaits_client_bytes())
        {
            return true;
        }
        let limit = self.verify_limit;
        let timer = self.verify_timer.get_or_insert_with(|| Timer::new(limit));
        Pin::new(timer).poll(cx).is_ready()
    }

    /// Called when the pump is about to wait: a cut when a limit ran out while it
    /// waited (the timers are armed here, so their wake-ups come back to this check).
    fn limit_reached(&mut self, cx: &mut Context<'_>) -> Option<Cut> {
        if let Some(limit) = self.query_limit {
            // Each request is timed from when it went out until a ReadyForQuery answers
            // it; nothing is timed while the server owes nothing.
            if self.flow.since.is_none() {
                self.query_deadline = None;
            } else {
                let readies = self.flow.readies;
                let fresh = !matches!(self.query_deadline, Some((_, at)) if at == readies);
                if fresh {
                    self.query_deadline = Some((Timer::new(limit), readies));
                }
                if let Some((timer, _)) = self.query_deadline.as_mut() {
                    if Pin::new(timer).poll(cx).is_ready() {
                        return Some(Cut::QueryTimeout);
                    }
                }
            }
        }
        // Only a wait on the client's own socket, with room to read and part of a
        // message missing, is the client's stall (not the server's backpressure).
        if self.client_read_pending && self.up.awaits_client_bytes() {
            let stall_after = self.stall_after;
            let timer = self.stall.get_or_insert_with(|| Timer::new(stall_after));
            if Pin::new(timer).poll(cx).is_ready() {
                return Some(Cut::Stalled);
            }
        } else {
            self.stall = None;
        }
        None
    }

    fn flush_down(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        let Some(buf) = lane.buf.as_ref() else {
            return Poll::Ready(Ok(false));
        };
        let limit = lane.end - lane.hold.min(lane.end - lane.start);
        if lane.start < limit {
            if let Some(delivered) = lane.delivered.as_mut().filter(|d| d.verifying()) {
                // A replay: the client already has these bytes.
                let (n, state) = delivered.swallow(&buf[lane.start..limit]);
                lane.start += n;
                lane.compact();
                return Poll::Ready(swallowed(state, self.stats));
            }
            return match Pin::new(&mut *self.client).poll_write(cx, &buf[lane.start..limit]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
                Poll::Ready(Ok(n)) => {
                    if let Some(delivered) = lane.delivered.as_mut() {
                        delivered.record(&buf[lane.start..lane.start + n]);
                    }
                    lane.start += n;
                    self.stats.bytes_to_clients.add(n as u64);
                    lane.compact();
                    self.client_unflushed = true;
                    Poll::Ready(Ok(true))
                }
                Poll::Pending => Poll::Pending,
            };
        }
        // The proxy's own answers go in at a message boundary, after what came before.
        let ready = &mut self.cx.responses.ready;
        let at_boundary =
            lane.start == lane.end && (lane.end < lane.raw_end || lane.scanner.at_boundary());
        if !ready.is_empty() && at_boundary {
            // The client hears the proxy's own answers: the unit can no longer start over.
            self.flow.may_start_over = false;
            self.up.clear_anchor();
            if let Some(delivered) = lane.delivered.as_mut().filter(|d| d.verifying()) {
                let (n, state) = delivered.swallow(&ready[lane.ready_pos..]);
                lane.ready_pos += n;
                if lane.ready_pos == ready.len() {
                    ready.clear();
                    lane.ready_pos = 0;
                }
                return Poll::Ready(swallowed(state, self.stats));
            }
            return match Pin::new(&mut *self.client).poll_write(cx, &ready[lane.ready_pos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
                Poll::Ready(Ok(n)) => {
                    if let Some(delivered) = lane.delivered.as_mut() {
                        delivered.record(&ready[lane.ready_pos..lane.ready_pos + n]);
                    }
                    lane.ready_pos += n;
                    self.stats.bytes_to_clients.add(n as u64);
                    self.client_unflushed = true;
                    if lane.ready_pos == ready.len() {
                        ready.clear();
                        lane.ready_pos = 0;
                    }
                    Poll::Ready(Ok(true))
                }
                Poll::Pending => Poll::Pending,
            };
        }
        // Everything is written: make sure it left (a TLS stream keeps records back).
        if self.client_unflushed {
            return match Pin::new(&mut *self.client).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.client_unflushed = false;
                    Poll::Ready(Ok(true))
                }
                Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
                Poll::Pending => Poll::Pending,
            };
        }
        Poll::Ready(Ok(false))
    }

    /// Scans read server bytes, stopping at a message to drop or where the proxy's own
    /// answers must go in.
    fn scan_down(&mut self, _cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.down;
        if lane.end == lane.raw_end || !self.cx.responses.ready.is_empty() {
            return Poll::Ready(Ok(false));
        }
        lane.scanner.set_capture(if self.cx.cache.wants_rows() {
            DOWN_CAPTURE_FILL
        } else if self.cx.responses.awaits_xid() {
            DOWN_CAPTURE_WITH_ROWS
        } else {
            DOWN_CAPTURE
        });
        let Some(buf) = lane.buf.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        let base = lane.end;
        let responses = &mut *self.cx.responses;
        let backend_status = &mut *self.status;
        let params = &mut *self.params;
        let server = &mut *self.cx.server;
        let cache = &mut *self.cx.cache;
        let flow = &mut *self.flow;
        let stats = self.stats;
        let phases = self.phases;
        let mut outcome = Outcome::default();
        let mut dropped: Option<usize> = None;
        let mut own_notification: Option<usize> = None;
        let (server_pid, client_pid) = self.pids;
        let chunk = &buf[base..lane.raw_end];
        let scanned = lane.scanner.scan(chunk, |tag, body, end| {
            // A crashed-peer warning is the server going away, never an answer.
            let crash_notice = tag == be::NOTICE_RESPONSE && backend::is_crash_notice(body);
            if !flow.heard_back
                && flow.may_start_over
                && ((tag == be::ERROR_RESPONSE && backend::is_idle_death(body)) || crash_notice)
            {
                // The server died waiting for input and had answered nothing of the
                // client's (only the proxy's own requests, if any): nothing of the
                // request was run, and the unit starts over elsewhere.
                flow.dead_on_arrival = true;
                dropped = Some(HEADER_LEN + body.len());
                return Step::Stop;
            }
            if flow.soften_server_gone
                && ((tag == be::ERROR_RESPONSE && backend::is_server_gone_error(body))
                    || crash_notice)
            {
                // The server is going away; the session is not tied to it: the client
                // hears of the lost unit from the engine instead, and carries on.
                log::info!(
                    "server going away mid-unit: {}",
                    String::from_utf8_lossy(body).replace('\0', " ")
                );
                flow.server_gone = true;
                dropped = Some(HEADER_LEN + body.len());
                return Step::Stop;
            }
            match tag {
                be::COMMAND_COMPLETE | be::READY_FOR_QUERY => flow.completed_any = true,
                _ => {}
            }
            match tag {
                be::NOTIFICATION_RESPONSE
                    if server_pid != client_pid && backend::notification_from(body, server_pid) =>
                {
                    // Patched once the scan lets go of the buffer (the message is held
                    // back until complete, so all of it is still there).
                    own_notification = (base + end).checked_sub(body.len());
                    return Step::Stop;
                }
                be::READY_FOR_QUERY => {
                    *backend_status = body.first().copied().unwrap_or(status::IDLE);
                    flow.copy_in = false;
                    flow.readies = flow.readies.wrapping_add(1);
                }
                be::COPY_IN_RESPONSE => flow.copy_in = true,
                be::COMMAND_COMPLETE => flow.copy_in = false,
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
            let mut action = responses.on_server_message(tag, body, server, &mut outcome);
            if tag == be::ERROR_RESPONSE && action == Action::Forward {
                if let Some(error) = flow.replace_next_error.take() {
                    responses.ready.extend_from_slice(&error);
                    action = Action::Drop;
                }
            }
            // An answer the client will see: the unit is under way on this connection.
            // (Answers to the proxy's own requests, dropped here, do not count: the
            // server may still die before reading the client's.)
            if action != Action::Drop {
                flow.heard_back = true;
            }
            phases.server_message(
                &mut Wire {
                    flow: &mut *flow,
                    stats,
                    answered: responses.outstanding() == 0,
                    forwarded: action != Action::Drop,
                    cache: &mut *cache,
                },
                tag,
                body,
            );
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
        if self.flow.heard_back {
            self.up.clear_anchor();
        }
        if let Some(at) = own_notification.filter(|&at| at >= lane.start) {
            buf[at..at + 4].copy_from_slice(&client_pid.to_be_bytes());
        }
        if outcome.cleared {
            self.cx.server.clear();
            self.cx.pending_close.clear();
        }
        self.cx
            .pending_close
            .extend(std::mem::take(&mut outcome.to_close));
        if outcome.schema_changed {
            // Plans prepared before may no longer fit: prepare afresh where next used.
            self.cx.registry.schema_changed();
        }
        if self.cx.client.settle(&mut outcome) {
            // A Parse held back for a name whose registration was undecided may go on.
            self.cx.responses.awaiting_parse = false;
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
                Some((Some(_), n)) if self.cx.responses.xid_query_queued() => n,
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
        lane.compact();
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

    /// Writes the in-place range, then what waits in `out`.
    fn flush_up(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        let lane = &mut *self.up;
        let (bytes, in_place) = match lane.inb.as_ref() {
            Some(buf) if lane.start < lane.fwd_end => (&buf[lane.start..lane.fwd_end], true),
            _ if lane.out_pos < lane.out.len() => (&lane.out[lane.out_pos..], false),
            _ if self.server_unflushed => {
                // Everything is written: make sure it left (TLS keeps records back).
                return match Pin::new(&mut *self.server).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.server_unflushed = false;
                        Poll::Ready(Ok(true))
                    }
                    Poll::Ready(Err(_)) => {
                        self.backend_eof = true;
                        self.server_unflushed = false;
                        Poll::Ready(Ok(true))
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            _ => return Poll::Ready(Ok(false)),
        };
        match Pin::new(&mut *self.server).poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                // The server is gone; forward what it said last, then end.
                self.backend_eof = true;
                lane.start = lane.fwd_end;
                lane.out.clear();
                lane.out_pos = 0;
                lane.skip_copied();
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Ok(n)) => {
                self.server_unflushed = true;
                if in_place {
                    lane.start += n;
                    lane.skip_copied();
                } else {
                    lane.out_pos += n;
                    if lane.out_pos == lane.out.len() {
                        lane.out.clear();
                        lane.out_pos = 0;
                    }
                }
                Poll::Ready(Ok(true))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Decides on every client message received so far.
    fn decide_up(&mut self, _cx: &mut Context<'_>) -> Poll<Moved> {
        let mut moved = false;
        loop {
            let lane = &mut *self.up;
            if lane.out.len() - lane.out_pos >= OUT_HIGH_WATER
                || self.flow.terminated
                || self.cx.responses.awaiting_check
                || self.cx.responses.awaiting_parse
            {
                return Poll::Ready(Ok(moved));
            }
            let Some(inb) = lane.inb.as_ref() else {
                return Poll::Ready(Ok(moved));
            };
            if lane.stream_left > 0 {
                // The rest of a message forwarded unread.
                let take = lane.stream_left.min(lane.end - lane.next);
                if take == 0 {
                    return Poll::Ready(Ok(moved));
                }
                lane.forward(take);
                lane.stream_left -= take;
                moved = true;
                continue;
            }
            if lane.big_len > 0 {
                let had = lane.big.len();
                if !lane.gather_big() {
                    return Poll::Ready(Err(PumpEnd::Cut(Cut::MessageMemory)));
                }
                moved |= lane.big.len() > had;
                if lane.big.len() < lane.big_len {
                    return Poll::Ready(Ok(moved));
                }
                let msg = std::mem::take(&mut lane.big);
                self.cx.offset = lane.big_at;
                let result = self
                    .phases
                    .client_message(&mut self.cx, &msg, &mut lane.out);
                match result {
                    Ok(ClientAction::Hold) => {
                        // Offered again once the awaited answer is in.
                        self.up.big = msg;
                        return Poll::Ready(Ok(true));
                    }
                    Ok(ClientAction::Forward) => {
                        lane.out.extend_from_slice(&msg);
                        self.cx.expect_forwarded(msg[0]);
                    }
                    Ok(ClientAction::Rewritten) | Err(_) => {}
                }
                let lane = &mut *self.up;
                let tag = msg[0];
                lane.big = msg;
                lane.drop_big();
                if let Err(e) = result {
                    return Poll::Ready(Err(PumpEnd::ClientProtocol(e)));
                }
                self.after_message(tag);
                // (Assembled before the pump ran, it may have taken no byte just now.)
                moved = true;
                continue;
            }
            let pending = &inb[lane.next..lane.end];
            let (tag, len) = match read_header(pending, lane.max_message_size) {
                Ok(Some(h)) => h,
                Ok(None) => return Poll::Ready(Ok(moved)),
                Err(e) => return Poll::Ready(Err(PumpEnd::ClientProtocol(e))),
            };
            if !frontend::TAGS.contains(tag) {
                return Poll::Ready(Err(PumpEnd::ClientProtocol(CodecError::UnknownTag(tag))));
            }
            if tag == fe::TERMINATE {
                // Everything before it still goes to the server; it does not.
                if len > pending.len() {
                    return Poll::Ready(Ok(moved));
                }
                lane.consume(len);
                self.flow.terminated = true;
                return Poll::Ready(Ok(true));
            }
            if !self.phases.needs_body(&self.cx, tag) {
                // No phase reads it: forward it in place, streaming what is yet to come.
                self.cx.offset = lane.position;
                self.cx.expect_forwarded(tag);
                let here = len.min(pending.len());
                lane.forward(here);
                lane.stream_left = len - here;
                self.after_message(tag);
                moved = true;
                continue;
            }
            if len > pending.len() {
                if len > inb.len() {
                    // Larger than the read buffer: assemble it on the side.
                    if !lane.start_big(len, self.memory) {
                        return Poll::Ready(Err(PumpEnd::Cut(Cut::MessageMemory)));
                    }
                    moved = true;
                    continue;
                }
                return Poll::Ready(Ok(moved));
            }
            let msg = &inb[lane.next..lane.next + len];
            self.cx.offset = lane.position;
            let result = self.phases.client_message(&mut self.cx, msg, &mut lane.out);
            match result {
                Ok(ClientAction::Hold) => return Poll::Ready(Ok(true)),
                Ok(ClientAction::Forward) => {
                    self.cx.expect_forwarded(tag);
                    lane.forward(len);
                }
                Ok(ClientAction::Rewritten) => lane.consume(len),
                Err(e) => return Poll::Ready(Err(PumpEnd::ClientProtocol(e))),
            }
            self.after_message(tag);
            moved = true;
        }
    }

    fn after_message(&mut self, tag: u8) {
        self.cx.notes.client_spoke = true;
        if matches!(tag, fe::COPY_DONE | fe::COPY_FAIL) {
            self.flow.copy_in = false;
        }
        self.phases.client_tag(
            &mut Wire {
                flow: &mut *self.flow,
                stats: self.stats,
                answered: false,
                forwarded: true,
                cache: &mut *self.cx.cache,
            },
            tag,
        );
    }

    fn fill_up(&mut self, cx: &mut Context<'_>) -> Poll<Moved> {
        self.client_read_pending = false;
        let lane = &mut *self.up;
        if self.flow.terminated
            || self.backend_eof
            || (self.flow.hold_when_idle && *self.status == status::IDLE)
        {
            return Poll::Ready(Ok(false));
        }
        match lane.feed_replay(!self.down.verifying()) {
            Some(0) => return Poll::Ready(Ok(false)),
            Some(_) => return Poll::Ready(Ok(true)),
            None => {}
        }
        // Keep what is not yet sent or decided; move it to the front when full.
        let room = lane.room_for_more();
        if room.is_empty() {
            return Poll::Ready(Ok(false));
        }
        match Pin::new(&mut *self.client).poll_read(cx, room) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Err(PumpEnd::ClientGone)),
            Poll::Ready(Ok(n)) => {
                lane.received(n);
                self.stats.bytes_from_clients.add(n as u64);
                // The client is not stalled.
                self.stall = None;
                self.client_read_pending = false;
                Poll::Ready(Ok(true))
            }
            Poll::Pending => {
                self.client_read_pending = true;
                Poll::Pending
            }
        }
    }
}
