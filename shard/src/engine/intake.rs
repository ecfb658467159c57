//! A unit's client input before any server is involved. The unit's first message is
//! received whole before a connection is leased for it (up to
//! `limits.buffered_message_size`; a larger one streams once the unit runs), so a client
//! that stops halfway holds no server connection. Messages assembled beyond a read
//! buffer count against the worker's [`MessageMemory`]. A unit the proxy refuses is
//! skipped to its end, as PostgreSQL skips to Sync after an error.

use std::cell::Cell;
use std::rc::Rc;

use futures_lite::AsyncReadExt;

use crate::codec::frame::read_header;
use crate::codec::tag::fe;
use crate::codec::{frontend, CodecError};
use crate::stats::ShardStats;

use super::cut::{Cut, Limits};
use super::idle::Stream;
use super::lanes::UpLane;

/// Bytes of partly received client messages a worker holds, against its limit.
#[derive(Debug)]
pub struct MessageMemory {
    used: Cell<usize>,
    limit: Cell<usize>,
    stats: std::sync::Arc<ShardStats>,
}

impl MessageMemory {
    pub fn new(limit: usize, stats: std::sync::Arc<ShardStats>) -> Rc<MessageMemory> {
        Rc::new(MessageMemory {
            used: Cell::new(0),
            limit: Cell::new(limit),
            stats,
        })
    }

    pub fn limit(&self) -> usize {
        self.limit.get()
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.set(limit);
    }

    /// Room for a `bytes` message, or `None` when the worker holds too much already.
    pub fn reserve(self: &Rc<Self>, bytes: usize) -> Option<Reservation> {
        let used = self.used.get();
        if used + bytes > self.limit.get() {
            return None;
        }
        self.used.set(used + bytes);
        self.stats.message_memory_bytes.add(bytes as u64);
        Some(Reservation {
            memory: self.clone(),
            bytes,
        })
    }
}

/// A message's share of [`MessageMemory`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    memory: Rc<MessageMemory>,
    bytes: usize,
}

impl Reservation {
    /// Takes `bytes` more; false (and nothing taken) past the worker's limit.
    pub fn grow(&mut self, bytes: usize) -> bool {
        let m = &self.memory;
        let used = m.used.get();
        if used + bytes > m.limit.get() {
            return false;
        }
        m.used.set(used + bytes);
        m.stats.message_memory_bytes.add(bytes as u64);
        self.bytes += bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let m = &self.memory;
        m.used.set(m.used.get() - self.bytes);
        m.stats.message_memory_bytes.sub(self.bytes as u64);
    }
}

/// Why intake stopped short.
#[derive(Debug)]
pub enum Stop {
    /// The client closed its connection.
    Gone,
    /// The client sent something that is not protocol.
    Protocol(CodecError),
    /// A limit ended the session.
    Cut(Cut),
}

/// Reads more client bytes after the pending ones, waiting at most the stall timeout
/// (`mid_message`) or as long as it takes (between messages).
async fn read_more<C: Stream>(
    client: &mut C,
    up: &mut UpLane,
    limits: &Limits,
    stats: &ShardStats,
    mid_message: bool,
) -> Result<(), Stop> {
    let room = up.room_for_more();
    let read = if mid_message {
        crate::sync::timeout(limits.stall, client.read(room)).await
    } else {
        Some(client.read(room).await)
    };
    match read {
        None => Err(Stop::Cut(Cut::Stalled)),
        Some(Ok(0)) | Some(Err(_)) => Err(Stop::Gone),
        Some(Ok(n)) => {
            up.received(n);
            stats.bytes_from_clients.add(n as u64);
            Ok(())
        }
    }
}

/// Waits until the first pending message is whole — in the read buffer, or assembled
/// on the side when larger — unless it is larger than `limits.buffered_message_size`
/// (it streams once the unit runs).
pub async fn whole_first_message<C: Stream>(
    client: &mut C,
    up: &mut UpLane,
    memory: &Rc<MessageMemory>,
    limits: &Limits,
    stats: &ShardStats,
) -> Result<(), Stop> {
    loop {
        if up.big_len > 0 {
            if up.big.len() == up.big_len {
                return Ok(());
            }
            if !up.gather_big() {
                return Err(Stop::Cut(Cut::MessageMemory));
            }
            if up.big.len() < up.big_len {
                read_more(client, up, limits, stats, true).await?;
            }
            continue;
        }
        let pending = up.pending();
        let (tag, len) = match read_header(pending, up.max_message_size) {
            Ok(Some(header)) => header,
            Ok(None) => {
                read_more(client, up, limits, stats, true).await?;
                continue;
            }
            Err(e) => return Err(Stop::Protocol(e)),
        };
        if !frontend::TAGS.contains(tag) {
            return Err(Stop::Protocol(CodecError::UnknownTag(tag)));
        }
        // Messages a feature reads whole (SQL, statement names) are assembled here
        // whatever their size, so no server connection waits while they arrive.
        let read_whole = matches!(tag, fe::QUERY | fe::PARSE | fe::BIND | fe::FUNCTION_CALL);
        if len <= pending.len() || (len > limits.buffered_message_size && !read_whole) {
            return Ok(());
        }
        if len <= up.capacity() {
            read_more(client, up, limits, stats, true).await?;
        } else if !up.start_big(len, memory) {
            return Err(Stop::Cut(Cut::MessageMemory));
        }
    }
}

/// Consumes a refused unit through its end: a Query, or everything up to and including
/// the next Sync. `Ok(false)`: the client sent Terminate instead.
pub async fn skip_unit<C: Stream>(
    client: &mut C,
    up: &mut UpLane,
    limits: &Limits,
    stats: &ShardStats,
) -> Result<bool, Stop> {
    // A unit that starts with a Query is that Query; any other runs to the next Sync
    // (a Query inside it is skipped too, as PostgreSQL does).
    let mut first = true;
    if up.big_len > 0 {
        let tag = up.big.first().copied();
        let rest = up.big_len - up.big.len();
        up.drop_big();
        skip_bytes(client, up, rest, limits, stats).await?;
        match tag {
            Some(fe::QUERY | fe::SYNC) => return Ok(true),
            _ => first = false,
        }
    }
    loop {
        let (tag, len) = match read_header(up.pending(), up.max_message_size) {
            Ok(Some(header)) => header,
            Ok(None) => {
                let mid_message = !up.pending().is_empty();
                read_more(client, up, limits, stats, mid_message).await?;
                continue;
            }
            Err(e) => return Err(Stop::Protocol(e)),
        };
        if tag == fe::TERMINATE {
            return Ok(false);
        }
        skip_bytes(client, up, len, limits, stats).await?;
        if tag == fe::SYNC || (tag == fe::QUERY && first) {
            return Ok(true);
        }
        first = false;
    }
}

/// Consumes `n` client bytes, reading as needed.
async fn skip_bytes<C: Stream>(
    client: &mut C,
    up: &mut UpLane,
    mut n: usize,
    limits: &Limits,
    stats: &ShardStats,
) -> Result<(), Stop> {
    loop {
        let here = n.min(up.pending().len());
        up.consume(here);
        up.skip_copied();
        n -= here;
        if n == 0 {
            return Ok(());
        }
        read_more(client, up, limits, stats, true).await?;
    }
}
