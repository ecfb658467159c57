//! The points in a unit of work's life where features act, in the order a unit meets
//! them, as one trait with a default (do nothing) for each point:
//!
//! 1. [`Phase::login`] — once per session, on the connection that completes the login.
//! 2. [`Phase::unit_start`] — the client's first bytes of a unit are in: continue,
//!    answer without a backend, refuse, or wait.
//! 3. [`Phase::choose_node`] — which pool serves the unit.
//! 4. [`Phase::after_acquire`] — the unit has its connection; bring it to the session.
//! 5. [`Phase::client_message`] — each client message: forward, rewrite, hold, drop.
//! 6. [`Phase::server_message`] — each server message the pump reads whole.
//! 7. [`Phase::before_release`] — the unit reached a boundary: keep, release, discard.
//! 8. [`Phase::backend_lost`] — the unit's connection broke: retry or fail.
//! 9. [`Phase::unit_done`] — the unit is over; its connection is still in hand.
//!
//! Features are zero-sized types chained in a tuple ([`super::Chain`]): dispatch is
//! static, and a feature the session has switched off answers with one branch.

use std::rc::Rc;

use crate::backend::{BackendError, ServerError};
use crate::codec::CodecError;
use crate::lease::Lease;
use crate::pool::Pool;

use super::message::MessageCx;
use super::session::Session;
use super::unit::{Flow, Unit};

/// What the per-message points may touch besides the message: the unit's protocol
/// state and the shard's counters.
pub struct Wire<'a> {
    pub flow: &'a mut Flow,
    pub stats: &'a crate::stats::ShardStats,
    /// (Server messages) the server owes nothing more for what was sent.
    pub answered: bool,
    /// (Server messages) the client gets this message (it is not an answer to one of
    /// the proxy's own requests).
    pub forwarded: bool,
    /// The unit's result-cache work.
    pub cache: &'a mut super::cache::CacheUnit,
}

/// What happens to a unit whose first bytes arrived. (A phase that makes the unit wait
/// does so in its own future, then says `Continue`.)
pub enum Start {
    /// Go on: choose a node and acquire.
    Continue,
    /// The proxy answers the unit itself with these bytes; no backend is used. The
    /// answer covers the first `usize` bytes of the request; any bytes after them start
    /// the next unit.
    Answer(Vec<u8>, usize),
    /// The unit may not run: the client gets this error (SQLSTATE, message) and
    /// ReadyForQuery, and the session goes on.
    Refuse(&'static str, String),
}

/// Whether a freshly acquired connection is ready for the unit.
pub enum Ready {
    Go,
    /// The server refused to take the session's state: the client is told and the
    /// session ends.
    Refused(ServerError),
    /// The connection broke before the unit used it.
    Lost(BackendError),
}

/// What becomes of one client message.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAction {
    /// Sent as it is (in place when the order allows); the engine queues its answer.
    Forward,
    /// The phase wrote what goes instead (possibly nothing) and queued its answers.
    Rewritten,
    /// Not yet: offered again once an awaited answer arrives.
    Hold,
}

/// What becomes of the unit's connection at a boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Release {
    /// Back to its pool.
    Release,
    /// The session keeps it for its next unit.
    Keep,
    /// Closed: its state cannot be handed to anyone.
    Discard,
    /// It broke.
    Lost,
}

/// Where a connection broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostAt {
    /// While being brought to the session, before any of the unit's bytes were sent.
    AfterAcquire,
    /// While the unit ran.
    InUnit,
}

/// What to do about a broken connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Take another connection and start the unit over.
    Retry,
    /// Tell the client and end the session.
    Fail,
}

/// One feature's part at each point. Every method has a default that does nothing.
#[allow(async_fn_in_trait)]
pub trait Phase {
    async fn login(&self, _s: &mut Session, _backend: &mut Lease) -> Ready {
        Ready::Go
    }

    async fn unit_start(&self, _s: &mut Session, _u: &mut Unit, _request: &[u8]) -> Start {
        Start::Continue
    }

    fn choose_node(&self, _s: &mut Session, _u: &mut Unit, _request: &[u8]) -> Option<Rc<Pool>> {
        None
    }

    async fn after_acquire(&self, _s: &mut Session, _u: &mut Unit, _backend: &mut Lease) -> Ready {
        Ready::Go
    }

    /// Whether this phase must see the whole of a client message with `tag` (else the
    /// message may stream through unread).
    fn needs_body(&self, _m: &MessageCx<'_>, _tag: u8) -> bool {
        false
    }

    /// A whole client message (`msg` includes its 5-byte header); `out` takes rewritten
    /// bytes.
    fn client_message(
        &self,
        _m: &mut MessageCx<'_>,
        _msg: &[u8],
        _out: &mut Vec<u8>,
    ) -> Result<ClientAction, CodecError> {
        Ok(ClientAction::Forward)
    }

    /// Every client message's tag, once it is decided on.
    fn client_tag(&self, _w: &mut Wire<'_>, _tag: u8) {}

    /// A server message the pump reads whole (see the lane's capture set).
    fn server_message(&self, _w: &mut Wire<'_>, _tag: u8, _body: &[u8]) {}

    async fn before_release(
        &self,
        _s: &mut Session,
        _u: &mut Unit,
        _backend: &mut Lease,
    ) -> Release {
        Release::Release
    }

    fn backend_lost(&self, _s: &mut Session, _u: &mut Unit, _at: LostAt) -> Lost {
        Lost::Fail
    }

    /// `Err` when the connection broke doing it (the unit itself is complete).
    async fn unit_done(
        &self,
        _s: &mut Session,
        _u: &mut Unit,
        _backend: &mut Lease,
    ) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A tuple of phases is a phase: each point runs them in order. Deciding points stop at
/// the first phase that decides (anything but the default); `before_release` takes the
/// strongest answer and stops at one that ends the connection.
macro_rules! chain {
    ($($p:ident),+) => {
        #[allow(non_snake_case)]
        impl<$($p: Phase),+> Phase for ($($p,)+) {
            async fn login(&self, s: &mut Session, backend: &mut Lease) -> Ready {
                let ($($p,)+) = self;
                $(match $p.login(s, backend).await {
                    Ready::Go => {}
                    other => return other,
                })+
                Ready::Go
            }

            async fn unit_start(&self, s: &mut Session, u: &mut Unit, request: &[u8]) -> Start {
                let ($($p,)+) = self;
                $(match $p.unit_start(s, u, request).await {
                    Start::Continue => {}
                    other => return other,
                })+
                Start::Continue
            }

            fn choose_node(&self, s: &mut Session, u: &mut Unit, request: &[u8]) -> Option<Rc<Pool>> {
                let ($($p,)+) = self;
                $(if let Some(pool) = $p.choose_node(s, u, request) {
                    return Some(pool);
                })+
                None
            }

            async fn after_acquire(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Ready {
                let ($($p,)+) = self;
                $(match $p.after_acquire(s, u, backend).await {
                    Ready::Go => {}
                    other => return other,
                })+
                Ready::Go
            }

            fn needs_body(&self, m: &MessageCx<'_>, tag: u8) -> bool {
                let ($($p,)+) = self;
                false $(|| $p.needs_body(m, tag))+
            }

            fn client_message(
                &self,
                m: &mut MessageCx<'_>,
                msg: &[u8],
                out: &mut Vec<u8>,
            ) -> Result<ClientAction, CodecError> {
                let ($($p,)+) = self;
                $(match $p.client_message(m, msg, out)? {
                    ClientAction::Forward => {}
                    other => return Ok(other),
                })+
                Ok(ClientAction::Forward)
            }

            fn client_tag(&self, w: &mut Wire<'_>, tag: u8) {
                let ($($p,)+) = self;
                $($p.client_tag(w, tag);)+
            }

            fn server_message(&self, w: &mut Wire<'_>, tag: u8, body: &[u8]) {
                let ($($p,)+) = self;
                $($p.server_message(w, tag, body);)+
            }

            async fn before_release(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Release {
                let ($($p,)+) = self;
                let mut decision = Release::Release;
                $(
                    decision = decision.max($p.before_release(s, u, backend).await);
                    if decision >= Release::Discard {
                        return decision;
                    }
                )+
                decision
            }

            fn backend_lost(&self, s: &mut Session, u: &mut Unit, at: LostAt) -> Lost {
                let ($($p,)+) = self;
                $(if $p.backend_lost(s, u, at) == Lost::Retry {
                    return Lost::Retry;
                })+
                Lost::Fail
            }

            async fn unit_done(
                &self,
                s: &mut Session,
                u: &mut Unit,
                backend: &mut Lease,
            ) -> Result<(), BackendError> {
                let ($($p,)+) = self;
                $($p.unit_done(s, u, backend).await?;)+
                Ok(())
            }
        }
    };
}

chain!(A, B);
chain!(A, B, C);
chain!(A, B, C, D);
chain!(A, B, C, D, E);
chain!(A, B, C, D, E, F);
chain!(A, B, C, D, E, F, G);
chain!(A, B, C, D, E, F, G, H);
chain!(A, B, C, D, E, F, G, H, I);
