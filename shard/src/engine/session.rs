//! The per-session context: what a client carries from its login to its last message,
//! across units and server connections.

use std::rc::Rc;

use crate::backend::Settings;
use crate::cancel::CancelHandle;
use crate::config::{Config, PoolMode};
use crate::context::{ShardCtx, UserEntry};
use crate::lease::Lease;
use crate::pool::Pool;

use super::prepared::ClientStatements;
use super::routing::NodePools;
use super::unit::LeaseNotes;

/// Which phases act for this session, fixed at login from the configuration: a phase
/// that is off costs one branch at each of its points.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub mode: PoolMode,
    /// Client statement names map to shared server statements, which follow the client
    /// to every connection it uses. Off in session mode on one node: the client's
    /// statements are its own connection's.
    pub shared_statements: bool,
    /// Session settings are snapshotted and re-applied on every connection the client
    /// uses.
    pub follow_settings: bool,
    /// Reads may go to standbys and replicas.
    pub read_write_split: bool,
    /// State that ties a session to one connection is allowed (pooled modes).
    pub pin_session_state: bool,
    pub max_prepared_statements: usize,
    /// Learn a transaction's id just before its COMMIT (`failover.track_commit_outcome`).
    pub track_commit: bool,
    /// Units are journaled and replayed, and the session's state moves to a new
    /// connection when its own is lost (`failover.replay`).
    pub replay: bool,
}

impl Features {
    pub fn new(config: &Config, mode: PoolMode) -> Self {
        let split = config.load_balancer.read_write_split;
        let replay = config.failover.replay;
        // A session's statements and settings are kept by the proxy when the session
        // may move to another connection.
        let moves = mode != PoolMode::Session || split || replay;
        // The result cache keys results by the session's settings and answers for its
        // statements without a server: the proxy keeps both.
        let follow_settings = moves || config.cache.enabled;
        Features {
            mode,
            shared_statements: follow_settings,
            follow_settings,
            read_write_split: split,
            pin_session_state: config.pool_mode.pin_session_state,
            max_prepared_statements: config.pool_mode.max_prepared_statements as usize,
            track_commit: replay && config.failover.track_commit_outcome,
            replay,
        }
    }

    /// Session mode: the session keeps a connection on its home node from login to end.
    pub fn keeps_home_connection(&self) -> bool {
        self.mode == PoolMode::Session
    }
}

/// A connection the session keeps between units: its home connection in session mode,
/// or, in the pooled modes, one that holds state tied to the client (LISTEN, temporary
/// tables, …) until that state is gone.
pub struct Held {
    pub lease: Lease,
    pub notes: LeaseNotes,
}

/// One client's session.
pub struct Session {
    pub ctx: Rc<ShardCtx>,
    pub features: Features,
    /// Timeouts and message limits, as configured when the session began.
    pub limits: super::cut::Limits,
    pub cancel: Registered,
    /// The primary's pool for the client's database and user.
    pub home: Rc<Pool>,
    /// The topology version `home` was last checked against (see `engine::home_pool`).
    pub home_version: u64,
    pub held: Option<Box<Held>>,
    /// Connection-bound state exists on the held connection (session mode with
    /// read/write splitting: it keeps the session's units on that connection).
    pub pinned: bool,
    pub statements: ClientStatements,
    pub settings: Settings,
    /// The startup packet's parameters the server default does not already give: what
    /// RESET goes back to.
    pub startup: Vec<(String, String)>,
    /// Who the client logs in to servers as, for finding its pool on another node.
    pub user: Rc<UserEntry>,
    /// Pools on other nodes this client was routed to (read/write splitting).
    pub pools: NodePools,
    /// The primary's WAL position after this client's last write (0: none yet).
    pub wrote_at: u64,
    /// Connection-bound state that moves with the session (see `carry`).
    pub carried: Option<Box<super::carry::Carried>>,
    /// Bytes of the client's stream consumed so far, kept while the session holds no
    /// lanes (between units, or parked).
    pub stream_position: u64,
    /// The session made state that changes what names mean or who it is (temporary
    /// tables, SET SESSION AUTHORIZATION): the result cache answers none of its reads,
    /// though its writes still invalidate.
    pub cache_bypass: bool,
}

/// The session's entry in the shard's cancel registry (SHOW CLIENTS, KILL_CLIENT, cancel
/// requests), removed when the session ends.
pub struct Registered {
    pub handle: Rc<CancelHandle>,
    ctx: Rc<ShardCtx>,
}

impl Registered {
    pub fn new(ctx: &Rc<ShardCtx>, handle: Rc<CancelHandle>) -> Self {
        Registered {
            handle,
            ctx: ctx.clone(),
        }
    }
}

impl std::ops::Deref for Registered {
    type Target = CancelHandle;

    fn deref(&self) -> &CancelHandle {
        &self.handle
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.ctx.cancels.unregister(&self.handle);
    }
}

impl Session {
    /// The pid the client was given: its home backend's in session mode, else made up.
    pub fn pid(&self) -> i32 {
        self.cancel.pid
    }

    /// Cancel requests reach `backend` (or, with none, nothing).
    pub fn point_cancel(&self, backend: Option<&crate::backend::BackendConn>) {
        match backend {
            Some(b) => self.cancel.attach(crate::cancel::CancelTarget {
                addr: b.addr.clone(),
                key: b.key,
                backend_id: b.id,
            }),
            None => self.cancel.detach(),
        }
    }

    /// How a connection of this session is cleaned when the session ends.
    pub fn reset_for(&self, notes: &LeaseNotes) -> super::finish::Reset {
        use super::finish::Reset;
        if self.features.keeps_home_connection() {
            Reset::Query
        } else if notes.maybe_pinned {
            Reset::DiscardAll
        } else {
            Reset::Settings
        }
    }
}
