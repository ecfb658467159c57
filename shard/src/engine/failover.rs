//! Failover on the data path. While no primary may take work and none is confirmed (a
//! failover is under way), units that need the primary wait here — the switchover buffer
//! — until the new one is published, bounded by `failover.buffer_max` and
//! `failover.write_timeout_secs`. And a unit whose server connection is lost mid-way
//! (the primary died, or was fenced) ends with an error the client can act on, while
//! its connection to the proxy stays usable for the next unit.

use std::time::Instant;

use crate::codec::backend as be;
use crate::codec::tag::status;
use crate::context::{share, ShardCtx};

use super::lanes::Lanes;
use super::session::Session;
use super::unit::Unit;

/// Why a unit that needs the primary was not kept waiting for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unbuffered {
    /// `failover.buffer_max` units already wait.
    Full,
    /// No primary came within `failover.write_timeout_secs`.
    TimedOut,
}

impl Unbuffered {
    /// The ErrorResponse the client gets (SQLSTATE 08006, saying a failover is under way).
    pub fn error(self, ctx: &ShardCtx) -> Vec<u8> {
        let message = self.message(ctx);
        let mut out = Vec::with_capacity(64 + message.len());
        be::write_error(&mut out, "ERROR", "08006", &message);
        out
    }

    pub fn message(self, ctx: &ShardCtx) -> String {
        let config = ctx.config();
        match self {
            Unbuffered::Full => format!(
                "failover in progress: no primary, and {} requests already wait for one (failover.buffer_max)",
                config.failover.buffer_max
            ),
            Unbuffered::TimedOut => format!(
                "failover in progress: no primary within {} s (failover.write_timeout_secs)",
                config.failover.write_timeout_secs
            ),
        }
    }
}

/// Counts a unit in the buffer for as long as it waits.
struct InBuffer<'a>(&'a ShardCtx);

impl<'a> InBuffer<'a> {
    fn enter(ctx: &'a ShardCtx) -> Self {
        ctx.buffered.set(ctx.buffered.get() + 1);
        ctx.stats.buffered_units.inc();
        InBuffer(ctx)
    }
}

impl Drop for InBuffer<'_> {
    fn drop(&mut self) {
        self.0.buffered.set(self.0.buffered.get() - 1);
        self.0.stats.buffered_units.sub(1);
    }
}

/// Waits in the switchover buffer until a primary may take work again. Waiters are
/// woken together by the topology that names it and go on in their pools' order.
pub async fn wait_for_primary(ctx: &ShardCtx) -> Result<(), Unbuffered> {
    let config = ctx.config();
    let room = share(config.failover.buffer_max, ctx.workers, ctx.id).max(1);
    if ctx.buffered.get() >= room {
        ctx.stats.buffer_overflows.inc();
        return Err(Unbuffered::Full);
    }
    let _in = InBuffer::enter(ctx);
    let deadline = Instant::now() + config.failover.write_timeout();
    while ctx.awaiting_primary() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            ctx.stats.buffer_timeouts.inc();
            return Err(Unbuffered::TimedOut);
        }
        crate::sync::timeout(left, ctx.topology_changed.wait()).await;
    }
    Ok(())
}

/// Nothing of the session lives on its unit's connection: a pooled mode, no pinned
/// state, no other connection kept.
pub fn session_detached(s: &Session) -> bool {
    !s.features.keeps_home_connection() && !s.pinned && s.held.is_none()
}

/// What the session keeps on its connection can move to another (`failover.replay`, and
/// nothing there that cannot move): losing the connection need not end the session.
pub fn session_movable(s: &Session) -> bool {
    s.features.replay
        && s.carried
            .as_ref()
            .is_none_or(|c| c.first_unmovable().is_none())
}

/// Why the session cannot move to another connection (`failover.replay` is on and it
/// keeps state there that cannot): the FATAL `08006` it ends with names it.
pub fn unmovable_message(s: &Session) -> Option<String> {
    let what = s.carried.as_ref()?.first_unmovable()?;
    Some(format!(
        "connection to the server lost, and the session's {what} cannot move to another server"
    ))
}

/// Can the session go on after its unit's connection was lost mid-way? Only when it is
/// detached from the connection, the unit changed no session state there (settings,
/// locks, LISTEN…), no transaction of the client's dies with it (outside one, or with
/// its COMMIT in flight: either way it is over), the client's stream of server messages
/// is whole (an error can follow), and nothing of the client's is half-sent or waiting.
/// `last_status` is the transaction status of the connection's last ReadyForQuery.
pub fn survivable(s: &Session, unit: &Unit, lanes: &Lanes, last_status: u8) -> bool {
    let transaction_over = last_status == status::IDLE
        || (last_status == status::IN_TRANSACTION && unit.notes.commit_sent);
    (session_detached(s) || session_movable(s))
        && transaction_over
        && !unit.notes.settings_touched
        && !unit.notes.maybe_pinned
        && !unit.flow.server_fatal
        && !unit.flow.copy_in
        && lanes.down.client_at_boundary()
        && !lanes.up.mid_message()
        && lanes.up.unsent().iter().all(|part| part.is_empty())
}

/// The error for a unit whose connection was lost with `last_status` the transaction
/// status of its last ReadyForQuery: `08007` when what was in flight may have committed
/// (an autocommit statement, or a COMMIT inside a transaction), else `08006`.
pub fn lost_error(unit: &Unit, last_status: u8) -> Vec<u8> {
    // A server that said it was going away while waiting for input had finished with
    // what it was sent; without a statement completed, nothing was committed.
    let settled = unit.flow.server_gone && !unit.flow.completed_any;
    let unknown = !unit.on_read_node
        && !settled
        && match last_status {
            status::IDLE => true,
            status::IN_TRANSACTION => unit.notes.commit_sent,
            _ => false,
        };
    let mut out = Vec::with_capacity(160);
    if unknown {
        be::write_error(
            &mut out,
            "ERROR",
            "08007",
            "connection to the server lost while a commit was in flight: whether it committed is unknown",
        );
    } else {
        be::write_error(
            &mut out,
            "ERROR",
            "08006",
            "connection to the server lost: the transaction did not complete",
        );
    }
    out
}

/// What the client is owed for a lost unit: an error and a ReadyForQuery for each
/// request the server will never answer, and whether it is still sending one (its
/// messages are then skipped to the Sync, which gets the same).
pub fn owed(lanes: &Lanes) -> (u32, bool) {
    (lanes.responses.pending_syncs(), lanes.responses.unsynced)
}
