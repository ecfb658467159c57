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

/// Reads more client bytes after the pending ones, waiting at most the stall timeout.
async fn read_more<C: Stream>(
    client: &mut C,
    up: &mut UpLane,
    limits: &Limits,
    stats: &ShardStats,
) -> Result<(), Stop> {
    let room = up.room_for_more();
    let read = crate::sync::timeout(limits.stall, client.read(room)).await;
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
            up.gather_big();
            if up.big.len() < up.big_len {
                read_more(client, up, limits, stats).await?;
            }
            continue;
        }
        let pending = up.pending();
        let (tag, len) = match read_header(pending, up.max_message_size) {
            Ok(Some(header)) => header,
            Ok(None) => {
                read_more(client, up, limits, stats).await?;
                continue;
            }
            Err(e) => return Err(Stop::Protocol(e)),
        };
        if !frontend::TAGS.contains(tag) {
            return Err(Stop::Protocol(CodecError::UnknownTag(tag)));
        }
        if len <= pending.len() || len > limits.buffered_message_size {
            return Ok(());
        }
        if len <= up.capacity() {
            read_more(client, up, limits, stats).await?;
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
    if up.big_len > 0 {
        let tag = up.big.first().copied();
        let rest = up.big_len - up.big.len();
        up.drop_big();
        skip_bytes(client, up, rest, limits, stats).await?;
        if matches!(tag, Some(fe::QUERY | fe::SYNC)) {
            return Ok(true);
        }
    }
    loop {
        let (tag, len) = match read_header(up.pending(), up.max_message_size) {
            Ok(Some(header)) => header,
            Ok(None) => {
                read_more(client, up, limits, stats).await?;
                continue;
            }
            Err(e) => return Err(Stop::Protocol(e)),
        };
        if tag == fe::TERMINATE {
            return Ok(false);
        }
        skip_bytes(client, up, len, limits, stats).await?;
        if matches!(tag, fe::QUERY | fe::SYNC) {
            return Ok(true);
        }
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
        read_more(client, up, limits, stats).await?;
    }
}
