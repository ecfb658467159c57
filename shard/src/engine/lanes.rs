//! The two directions of a session's traffic. Each borrows a pooled read buffer only
//! while bytes flow, and forwards what no phase changes in place, from that buffer.
//!
//! Upstream, the bytes of the read buffer are, in order: sent `[start, fwd_end)` … to send
//! in place `[fwd_end, next)` … consumed by copying (their translation sits in `out`)
//! `[next, end)` … read, not yet decided. Whatever waits in `out` goes after the in-place
//! range, so the order on the wire is the order of the client's messages.

use std::rc::Rc;

use crate::bufpool::{Buf, BufPool};
use crate::codec::backend;
use crate::codec::frame::{read_header, Scanner, TagSet};
use crate::codec::tag::be;

use super::intake::{MessageMemory, Reservation};
use super::journal::{ClientJournal, Delivered, ReplaySource};

/// Server messages whose body decides something: errors, command tags, transaction
/// status, parameter changes, notifications (whose sender pid may be rewritten).
pub(super) const DOWN_CAPTURE: TagSet = TagSet::new(&[
    be::ERROR_RESPONSE,
    be::COMMAND_COMPLETE,
    be::READY_FOR_QUERY,
    be::PARAMETER_STATUS,
    be::PARAMETER_DESCRIPTION,
    be::ROW_DESCRIPTION,
    be::NOTIFICATION_RESPONSE,
]);
/// The same, and rows too: while the proxy's own query for a transaction's id is
/// answered (see `responses::Expect::XidQuery`).
pub(super) const DOWN_CAPTURE_WITH_ROWS: TagSet = TagSet::new(&[
    be::ERROR_RESPONSE,
    be::COMMAND_COMPLETE,
    be::READY_FOR_QUERY,
    be::PARAMETER_STATUS,
    be::PARAMETER_DESCRIPTION,
    be::ROW_DESCRIPTION,
    be::NOTIFICATION_RESPONSE,
    be::DATA_ROW,
]);
/// The same, and notices too: while a result is collected for the cache (an answer
/// with a notice in it is not kept).
pub(super) const DOWN_CAPTURE_FILL: TagSet = TagSet::new(&[
    be::ERROR_RESPONSE,
    be::COMMAND_COMPLETE,
    be::READY_FOR_QUERY,
    be::PARAMETER_STATUS,
    be::PARAMETER_DESCRIPTION,
    be::ROW_DESCRIPTION,
    be::NOTIFICATION_RESPONSE,
    be::DATA_ROW,
    be::NOTICE_RESPONSE,
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

/// Client → server.
pub struct UpLane {
    pub(super) inb: Option<Buf>,
    pub(super) start: usize,
    pub(super) fwd_end: usize,
    pub(super) next: usize,
    pub(super) end: usize,
    /// Bytes still to come of a message forwarded unread as it streams through.
    pub(super) stream_left: usize,
    /// A message larger than the read buffer that a phase must read whole, being assembled.
    pub(super) big: Vec<u8>,
    pub(super) big_len: usize,
    /// Where the message being assembled starts in the client's byte stream.
    pub(super) big_at: u64,
    /// The assembled message's share of the worker's message memory.
    pub(super) big_memory: Option<Reservation>,
    /// Rewritten (or copied) bytes, sent after the in-place range.
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    pub(super) max_message_size: usize,
    /// Where `next` is in the client's byte stream since login.
    pub(super) position: u64,
    /// Where the unit began (offset in the buffer, position in the stream), kept until
    /// the server first answers: a connection found dead on arrival lets the unit start
    /// over on another one from here. Dropped rather than let it fill the buffer.
    /// (With it, how long the journal was then: what a start over decides again is
    /// journaled again.)
    anchor: Option<(usize, u64, usize)>,
    /// With replay on: every byte of the unit decided on, as the client sent it.
    pub journal: Option<Box<ClientJournal>>,
    /// A replay under way: journal bytes read ahead of the client's socket.
    pub replay: Option<Box<ReplaySource>>,
}

impl UpLane {
    pub fn new(max_message_size: usize) -> Self {
        UpLane {
            inb: None,
            start: 0,
            fwd_end: 0,
            next: 0,
            end: 0,
            stream_left: 0,
            big: Vec::new(),
            big_len: 0,
            big_at: 0,
            big_memory: None,
            out: Vec::new(),
            out_pos: 0,
            max_message_size,
            position: 0,
            anchor: None,
            journal: None,
            replay: None,
        }
    }

    /// Starts replaying the unit that began at `position` in the client's stream: its
    /// journal, then the bytes read but not yet decided on, are read again ahead of the
    /// client's socket (see [`ReplaySource`]). False when the journal cannot: replay is
    /// off, or the unit outgrew it.
    pub fn start_replay(&mut self, position: u64, hold_last: bool) -> bool {
        let Some(journal) = self.journal.as_mut() else {
            return false;
        };
        if journal.overflowed {
            return false;
        }
        let mut bytes = journal.take();
        // Lost again while a replay was still checking: what the first lost connection
        // had was decided then, whatever this replay has decided again so far.
        let gate = match &self.replay {
            _ if hold_last => last_message_start(&bytes),
            Some(old) => bytes.len().max(old.gate),
            None => bytes.len(),
        };
        if let Some(inb) = &self.inb {
            bytes.extend_from_slice(&inb[self.next..self.end]);
        }
        if let Some(old) = self.replay.take() {
            bytes.extend_from_slice(&old.bytes[old.pos..]);
        }
        self.stream_left = 0;
        self.drop_big();
        self.start = 0;
        self.fwd_end = 0;
        self.next = 0;
        self.end = 0;
        self.out.clear();
        self.out_pos = 0;
        self.anchor = None;
        self.position = position;
        self.replay = Some(Box::new(ReplaySource {
            bytes,
            pos: 0,
            gate,
        }));
        true
    }

    /// Stops a replay where the lost connection had stopped: what the replay has not
    /// yet re-sent of the journal is dropped (the client's answers for it are settled
    /// otherwise) and the bytes the client sent after it are pending again. False when
    /// the journal ended in the middle of a message, which cannot be cut there.
    pub fn abandon_replay(&mut self, position: u64, bufs: &BufPool) -> bool {
        let Some(source) = self.replay.take() else {
            return true;
        };
        // Bytes read from the journal but not yet decided on are the last ones fed; those
        // past the gate are the client's own later requests, pending again.
        let undecided = self.inb.as_ref().map_or(0, |_| self.end - self.next);
        let rest = &source.bytes[source.gate.max(source.pos.saturating_sub(undecided))..];
        let whole_messages = {
            let mut at = &source.bytes[..source.gate];
            loop {
                match read_header(at, usize::MAX >> 1) {
                    Ok(Some((_, len))) if len <= at.len() => at = &at[len..],
                    Ok(None) if at.is_empty() => break true,
                    _ => break false,
                }
            }
        };
        self.stream_left = 0;
        self.drop_big();
        self.out.clear();
        self.out_pos = 0;
        self.anchor = None;
        self.position = position + source.gate as u64;
        if let Some(journal) = self.journal.as_mut() {
            // What follows runs on a connection that only carries the failed transaction.
            journal.give_up();
        }
        let mut buf = self.inb.take().unwrap_or_else(|| bufs.take());
        if !whole_messages || rest.len() > buf.len() {
            return false;
        }
        buf[..rest.len()].copy_from_slice(rest);
        self.seed(buf, rest.len());
        true
    }

    /// Journal bytes for a replay, copied into the read buffer like bytes from the
    /// client: those past the gate only once `verified`. `None` when no replay is under
    /// way (read the client), else how many bytes were copied (0: wait).
    pub(super) fn feed_replay(&mut self, verified: bool) -> Option<usize> {
        let source = self.replay.as_ref()?;
        if source.is_done() {
            if !verified {
                // Nothing the client sent after the lost connection's last byte is read
                // before the replay has reproduced what the client has.
                return Some(0);
            }
            self.replay = None;
            return None;
        }
        let until = if verified {
            source.bytes.len()
        } else {
            source.gate
        };
        if source.pos >= until {
            return Some(0);
        }
        self.compact();
        let end = self.end;
        let (Some(buf), Some(source)) = (self.inb.as_mut(), self.replay.as_mut()) else {
            return Some(0);
        };
        let n = (buf.len() - end).min(until - source.pos);
        buf[end..end + n].copy_from_slice(&source.bytes[source.pos..source.pos + n]);
        source.pos += n;
        self.end += n;
        Some(n)
    }

    /// A replay has fed everything up to its gate and the server took all of it: what
    /// else it answers comes without more from the client.
    pub fn replay_waits_at_gate(&self) -> bool {
        self.replay.as_ref().is_some_and(|r| r.pos >= r.gate)
            && self.start == self.fwd_end
            && self.out_pos == self.out.len()
    }

    /// No replay bytes are left to read.
    pub fn replay_done(&self) -> bool {
        self.replay.as_ref().is_none_or(|r| r.is_done())
    }

    /// Marks the pending bytes as the unit's start (see `anchor`); only when they are in
    /// the read buffer (not a message assembled on the side).
    pub fn set_anchor(&mut self) {
        let journaled = self.journal.as_ref().map_or(0, |j| j.len());
        self.anchor = (self.inb.is_some() && self.big_len == 0 && self.stream_left == 0)
            .then_some((self.next, self.position, journaled));
    }

    pub fn anchored(&self) -> bool {
        self.anchor.is_some()
    }

    /// The server answered: the unit can no longer start over.
    pub fn clear_anchor(&mut self) {
        self.anchor = None;
    }

    /// Goes back to the unit's start, as if none of its bytes had been decided: the
    /// phases see them again for another connection. False when that is not possible.
    pub fn rewind(&mut self) -> bool {
        let Some((at, position, journaled)) = self.anchor.take() else {
            return false;
        };
        if self.stream_left != 0 || self.big_len != 0 || self.inb.is_none() {
            return false;
        }
        if let Some(journal) = self.journal.as_mut() {
            journal.truncate(journaled);
        }
        self.start = at;
        self.fwd_end = at;
        self.next = at;
        self.position = position;
        self.out.clear();
        self.out_pos = 0;
        true
    }

    /// Client bytes not yet decided on: what a unit's phases look at before it starts.
    pub fn pending(&self) -> &[u8] {
        match &self.inb {
            Some(buf) => &buf[self.next..self.end],
            None => &[],
        }
    }

    /// The unit's first bytes, as its start phases see them: the first message when it
    /// was assembled on the side, else the pending bytes.
    pub fn request(&self) -> &[u8] {
        if self.big_len > 0 {
            &self.big
        } else {
            self.pending()
        }
    }

    /// Undecided client bytes wait (the last unit ended before them).
    pub fn has_pending(&self) -> bool {
        self.next != self.end || self.big_len > 0
    }

    /// Where the pending bytes start in the client's byte stream.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The first `len` undecided bytes were answered by a phase itself: they are
    /// consumed, and what follows them waits for the next unit.
    pub fn answered(&mut self, len: usize) {
        if self.big_len > 0 || len >= self.end - self.next {
            self.discard_pending();
            return;
        }
        self.consume(len);
        self.skip_copied();
    }

    /// Drops the undecided bytes: a phase answered them itself.
    pub fn discard_pending(&mut self) {
        self.drop_big();
        let len = self.end - self.next;
        self.consume(len);
        self.skip_copied();
        self.deactivate();
    }

    /// The read buffer's size (0 without one).
    pub fn capacity(&self) -> usize {
        self.inb.as_ref().map_or(0, |b| b.len())
    }

    /// Moves what is not yet sent or decided to the front when the buffer is full.
    pub(super) fn compact(&mut self) {
        if self.end >= self.capacity() && self.anchor.is_some_and(|(at, _, _)| at == 0) {
            // Keeping the unit's start would leave no room to read: give that up.
            self.anchor = None;
        }
        if self.anchor.is_none() && self.start == self.fwd_end && self.next == self.end {
            self.start = 0;
            self.fwd_end = 0;
            self.next = 0;
            self.end = 0;
        }
        if self.end < self.capacity() {
            return;
        }
        self.skip_copied();
        let keep = self
            .anchor
            .map_or(self.start, |(at, _, _)| at.min(self.start));
        if keep == 0 {
            return;
        }
        if let Some(buf) = self.inb.as_mut() {
            buf.copy_within(keep..self.end, 0);
        }
        self.start -= keep;
        self.fwd_end -= keep;
        self.next -= keep;
        self.end -= keep;
        if let Some((at, _, _)) = self.anchor.as_mut() {
            *at -= keep;
        }
    }

    /// Free space after the received bytes, made by compacting if needed. (The lane
    /// must be active.)
    pub(super) fn room_for_more(&mut self) -> &mut [u8] {
        self.compact();
        let end = self.end;
        match self.inb.as_mut() {
            Some(buf) => &mut buf[end..],
            None => &mut [],
        }
    }

    /// `n` more bytes were read into [`UpLane::room_for_more`].
    pub(super) fn received(&mut self, n: usize) {
        self.end += n;
    }

    /// Starts assembling a `len`-byte message larger than the read buffer on the side,
    /// from the pending bytes; false when the worker's message memory has no room for
    /// them. (Memory is counted as bytes arrive, not as announced; the allocation
    /// grows with them too.)
    pub(super) fn start_big(&mut self, len: usize, memory: &Rc<MessageMemory>) -> bool {
        let Some(reservation) = memory.reserve(0) else {
            return false;
        };
        self.big.clear();
        self.big_len = len;
        self.big_at = self.position;
        self.big_memory = Some(reservation);
        self.gather_big()
    }

    /// Moves pending bytes into the message being assembled, up to its length; false
    /// when the worker's message memory has no room for them.
    pub(super) fn gather_big(&mut self) -> bool {
        let take = (self.big_len - self.big.len()).min(self.end - self.next);
        if take == 0 {
            return true;
        }
        if let Some(reservation) = self.big_memory.as_mut() {
            if !reservation.grow(take) {
                return false;
            }
        }
        if let Some(inb) = &self.inb {
            self.big
                .extend_from_slice(&inb[self.next..self.next + take]);
        }
        self.consume(take);
        self.skip_copied();
        true
    }

    /// Ends the message assembled on the side (used, or skipped), keeping a small
    /// allocation for the next one.
    pub(super) fn drop_big(&mut self) {
        self.big_len = 0;
        self.big_memory = None;
        self.big.clear();
        if self.big.capacity() > 64 * 1024 {
            self.big = Vec::new();
        }
    }

    /// Takes over bytes read while idle.
    pub fn seed(&mut self, buf: Buf, n: usize) {
        self.inb = Some(buf);
        self.start = 0;
        self.fwd_end = 0;
        self.next = 0;
        self.end = n;
        self.anchor = None;
    }

    pub fn activate(&mut self, pool: &BufPool) {
        if self.inb.is_none() {
            self.inb = Some(pool.take());
            self.start = 0;
            self.fwd_end = 0;
            self.next = 0;
            self.end = 0;
            self.anchor = None;
        }
    }

    /// Gives the read buffer back when nothing in it is pending (nor kept for a start
    /// over).
    pub fn deactivate(&mut self) {
        if self.anchor.is_none() && self.start == self.fwd_end && self.next == self.end {
            self.inb = None;
            self.start = 0;
            self.fwd_end = 0;
            self.next = 0;
            self.end = 0;
        }
        if self.out_pos == self.out.len() && self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
            self.out_pos = 0;
        }
    }

    /// Nothing received that is not yet sent, and no message half-received.
    pub fn is_quiet(&self) -> bool {
        self.start == self.fwd_end
            && self.next == self.end
            && self.big_len == 0
            && self.stream_left == 0
            && self.out_pos == self.out.len()
    }

    /// Decided bytes not yet written, in wire order: the in-place range, then `out`.
    pub fn unsent(&self) -> [&[u8]; 2] {
        let in_place = match &self.inb {
            Some(buf) => &buf[self.start..self.fwd_end],
            None => &[],
        };
        [in_place, &self.out[self.out_pos..]]
    }

    /// True when the lane cannot go on until the client sends more of a message.
    pub fn awaits_client_bytes(&self) -> bool {
        if self.start != self.fwd_end || self.out_pos != self.out.len() {
            // The server has not taken what the client sent yet: not the client's wait.
            return false;
        }
        if self.stream_left > 0 || self.big.len() < self.big_len {
            return true;
        }
        let pending = self.pending();
        !pending.is_empty()
            && match read_header(pending, usize::MAX >> 1) {
                Ok(Some((_, len))) => len > pending.len(),
                Ok(None) => true,
                Err(_) => false,
            }
    }

    /// True when part of a message is still missing or undecided.
    pub fn mid_message(&self) -> bool {
        self.next != self.end || self.big_len != 0 || self.stream_left != 0
    }

    /// True when forwarded bytes can extend the in-place range (nothing copied waits
    /// between it and the next message).
    pub(super) fn in_place_ok(&self) -> bool {
        self.fwd_end == self.next && self.out_pos == self.out.len()
    }

    /// Forwards `len` decided bytes at `next`: in place when the order allows, else copied.
    pub(super) fn forward(&mut self, len: usize) {
        if self.in_place_ok() {
            self.fwd_end += len;
        } else if let Some(buf) = &self.inb {
            self.out.extend_from_slice(&buf[self.next..self.next + len]);
        }
        self.consume(len);
    }

    /// Moves past `len` decided bytes that are not sent in place.
    pub(super) fn consume(&mut self, len: usize) {
        if let (Some(journal), Some(inb)) = (self.journal.as_mut(), self.inb.as_ref()) {
            journal.record(&inb[self.next..self.next + len]);
        }
        self.next += len;
        self.position += len as u64;
    }

    /// Once the in-place range is sent, bytes consumed by copying need no further look.
    pub(super) fn skip_copied(&mut self) {
        if self.start == self.fwd_end {
            self.start = self.next;
            self.fwd_end = self.next;
        }
    }
}

/// Where the last whole message of `journal` starts (its length when it has none).
fn last_message_start(journal: &[u8]) -> usize {
    let mut at = 0;
    let mut last = journal.len();
    while let Ok(Some((_, len))) = read_header(&journal[at..], usize::MAX >> 1) {
        if at + len > journal.len() {
            break;
        }
        last = at;
        at += len;
    }
    last
}

/// Server → client, forwarded in place: [start, end) scanned and ready to send (minus a
/// held-back tail), [end, raw_end) read but not scanned yet.
pub struct DownLane {
    pub(super) buf: Option<Buf>,
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) raw_end: usize,
    pub(super) hold: usize,
    pub(super) ready_pos: usize,
    pub(super) scanner: Scanner,
    /// With replay on: what the client received during the unit.
    pub delivered: Option<Box<Delivered>>,
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
            delivered: None,
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

    /// Forgets what a lost connection sent (nothing of it reached the client).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.raw_end = 0;
        self.hold = 0;
        self.ready_pos = 0;
        self.scanner.reset();
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

    /// A replay has yet to reproduce what the client already has.
    pub fn verifying(&self) -> bool {
        self.delivered.as_ref().is_some_and(|d| d.verifying())
    }

    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary() && self.end == self.raw_end
    }

    /// What the client received so far ends at a message boundary: a message of the
    /// proxy's own may go in now without splitting one of the server's.
    pub fn client_at_boundary(&self) -> bool {
        let held = self.hold.min(self.end - self.start);
        self.start == self.end - held && (held > 0 || self.scanner.at_boundary())
    }

    pub(super) fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Makes room at the end of the buffer by moving unsent bytes to the front.
    pub(super) fn compact(&mut self) {
        if self.start == self.raw_end {
            self.start = 0;
            self.end = 0;
            self.raw_end = 0;
        } else if self.start > 0 && self.raw_end == self.capacity() {
            let (start, raw_end) = (self.start, self.raw_end);
            if let Some(b) = self.buf.as_mut() {
                b.copy_within(start..raw_end, 0);
            }
            self.end -= start;
            self.raw_end -= start;
            self.start = 0;
        }
    }
}

impl Default for DownLane {
    fn default() -> Self {
        Self::new()
    }
}

/// What a session keeps across units so that no unit allocates: its two lanes and its
/// queue of owed answers.
pub struct Lanes {
    pub up: UpLane,
    pub down: DownLane,
    pub responses: super::responses::Responses,
}

impl Lanes {
    pub fn new(max_message_size: usize) -> Self {
        Lanes {
            up: UpLane::new(max_message_size),
            down: DownLane::new(),
            responses: Default::default(),
        }
    }

    pub fn activate(&mut self, pool: &BufPool) {
        self.up.activate(pool);
        self.down.activate(pool);
    }

    pub fn deactivate(&mut self) {
        self.up.deactivate();
        self.down.deactivate();
    }

    /// Nothing in the lanes outlives the unit but the client stream's position: no bytes
    /// pending, held or owed, no journal, nothing expected from a server. An idle session
    /// then drops them (a few hundred bytes) and builds new ones for its next unit.
    pub fn disposable(&self) -> bool {
        let (up, down) = (&self.up, &self.down);
        up.inb.is_none()
            && up.big_len == 0
            && up.big_memory.is_none()
            && up.out_pos == up.out.len()
            && up.anchor.is_none()
            && up.journal.is_none()
            && up.replay.is_none()
            && down.buf.is_none()
            && down.delivered.is_none()
            && down.scanner.at_boundary()
            && self.responses.is_clear()
    }

    /// Fresh lanes that go on from `position` in the client's stream.
    pub fn resume(max_message_size: usize, position: u64) -> Self {
        let mut lanes = Lanes::new(max_message_size);
        lanes.up.position = position;
        lanes
    }

    /// Keeps a replay journal of every unit, up to `max` client bytes each.
    pub fn keep_journal(&mut self, max: usize) {
        self.up.journal = Some(Box::new(ClientJournal::new(max)));
        self.down.delivered = Some(Box::default());
    }

    /// A unit begins: its journal starts empty.
    pub fn begin_unit(&mut self) {
        if let Some(journal) = self.up.journal.as_mut() {
            journal.reset();
        }
        if let Some(delivered) = self.down.delivered.as_mut() {
            delivered.reset();
        }
        self.up.replay = None;
    }
}
