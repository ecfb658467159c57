//! The per-unit context: what the engine and its phases know about one unit of work (a
//! transaction, or a statement outside one) from its start to its end.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::fence::FenceGuard;
use crate::sql::{Effects, RouteAnalysis};

/// One unit of work.
#[derive(Default)]
pub struct Unit {
    /// The unit runs on a standby or replica: read no more client input once the server
    /// connection is idle outside a transaction, so the next unit is routed on its own.
    pub on_read_node: bool,
    /// Learn the primary's WAL position when the unit is done (read-your-writes).
    pub remember_position: bool,
    /// What the client did on the unit's connection that matters when it is given back.
    pub notes: LeaseNotes,
    pub flow: Flow,
    /// Held while the unit needs its database to itself (DROP DATABASE and the like).
    pub fence: Option<FenceGuard>,
    /// Connections tried for the unit that broke before it could use them.
    pub lost_connections: u32,
    /// SQL analysed before the unit reached the pump.
    pub sql: UnitSql,
    /// Where the unit's first bytes are in the client's byte stream.
    pub position: u64,
    /// The primary epoch when the unit took its connection (see `Topology::primary_epoch`).
    pub epoch: u64,
    /// A replay of the unit under way (its connection was lost).
    pub replaying: Option<Box<super::replay::Replaying>>,
    /// The result cache's work for this unit.
    pub cache: super::cache::CacheUnit,
}

impl Unit {
    /// Starts the next unit, keeping the memory the last one grew.
    /// Nothing of this unit matters to the next one (see [`Lanes::disposable`]).
    ///
    /// [`Lanes::disposable`]: super::lanes::Lanes::disposable
    pub fn disposable(&self) -> bool {
        self.fence.is_none() && self.replaying.is_none() && self.sql.is_empty()
    }

    pub fn reset(&mut self) {
        self.on_read_node = false;
        self.remember_position = false;
        self.flow = Flow::default();
        self.fence = None;
        self.lost_connections = 0;
        self.sql.clear();
        self.replaying = None;
        self.cache.reset();
    }
}

/// What the client did during one lease of a server connection that matters at release.
#[derive(Default, Debug)]
pub struct LeaseNotes {
    /// Settings may have changed: take a fresh snapshot before letting go.
    pub settings_touched: bool,
    /// Custom settings or `role` named by SET/RESET, which the snapshot must ask for.
    pub unlisted: Vec<String>,
    /// Connection-bound state may exist: check before letting go.
    pub maybe_pinned: bool,
    /// The client sent something since the last pin check.
    pub client_spoke: bool,
    /// This server connection holds the client's current unnamed statement.
    pub unnamed_here: bool,
    /// A COMMIT (or END, PREPARE TRANSACTION) went to the server in this lease: if the
    /// connection is lost before its answer, whether it committed is unknown.
    pub commit_sent: bool,
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
    /// Outside a transaction, read no more client input (see [`Unit::on_read_node`]).
    pub hold_when_idle: bool,
    /// The server sent a FATAL (or PANIC) ErrorResponse, which the client has; the
    /// connection closes next and the proxy adds no error of its own.
    pub server_fatal: bool,
    /// ReadyForQuery messages seen: each ends a request (for `query_timeout`).
    pub readies: u32,
    /// The unit may start over on another connection if this one turns out dead on
    /// arrival (a fresh connection; the client's bytes are kept until the first answer).
    pub may_start_over: bool,
    /// The server has sent something the client sees since the unit's request went
    /// out (answers to the proxy's own injected requests do not count).
    pub heard_back: bool,
    /// Its first word the client would have seen was a FATAL (it died before reading
    /// the request, as a backend does when its postmaster is gone): the FATAL was
    /// dropped and the unit starts over.
    pub dead_on_arrival: bool,
    /// A FATAL saying the server is going away is not forwarded (the session is not
    /// tied to this connection); `server_gone` records that one came.
    pub soften_server_gone: bool,
    pub server_gone: bool,
    /// A statement of the unit completed (CommandComplete or ReadyForQuery seen).
    pub completed_any: bool,
    /// The server's next ErrorResponse is replaced by this one: the error a diverged
    /// replay owes a client that had nothing outstanding, given where PostgreSQL puts
    /// the first error of an aborted transaction.
    pub replace_next_error: Option<Box<[u8]>>,
}

/// The one analysis of one SQL text (a Query, or a Parse's statement) that every phase
/// shares: made once, when a phase first needs it, and handed on with the message.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    /// What the text does to session state (settings, pins, prepared statements).
    pub effects: Effects,
    /// How it may be routed; only when read/write splitting is on.
    pub route: Option<Rc<RouteAnalysis>>,
}

/// The analyses made before the unit's messages reached the pump (for routing), keyed
/// by where each message starts in the client's byte stream: the pump's phases take
/// them instead of analysing the same text again.
#[derive(Default)]
pub struct UnitSql {
    ahead: VecDeque<(u64, Analysis)>,
}

impl UnitSql {
    pub fn clear(&mut self) {
        self.ahead.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.ahead.is_empty()
    }

    pub fn push(&mut self, offset: u64, analysis: Analysis) {
        self.ahead.push_back((offset, analysis));
    }

    /// The analysis made ahead for the message at `offset`, if one was. (A message held
    /// and offered again finds it still there.)
    pub fn take(&mut self, offset: u64) -> Option<Analysis> {
        while let Some((at, _)) = self.ahead.front() {
            if *at >= offset {
                break;
            }
            self.ahead.pop_front();
        }
        match self.ahead.front() {
            Some((at, analysis)) if *at == offset => Some(analysis.clone()),
            _ => None,
        }
    }
}
