//! Why the proxy ends a client's session on its own initiative (a limit, not an error of
//! the server or the protocol), with the SQLSTATE and text PostgreSQL uses for the same
//! situation where it has one.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Silent in the middle of a message for `timeouts.client_stall_timeout_ms`.
    Stalled,
    /// Idle between transactions for `timeouts.client_idle_timeout_ms`.
    IdleSession,
    /// Idle inside a transaction for `timeouts.idle_transaction_timeout_ms`.
    IdleInTransaction,
    /// A request unanswered for `timeouts.query_timeout_ms`.
    QueryTimeout,
    /// A message that would take the worker past `limits.message_memory`.
    MessageMemory,
}

impl Cut {
    pub const ALL: [Cut; 5] = [
        Cut::Stalled,
        Cut::IdleSession,
        Cut::IdleInTransaction,
        Cut::QueryTimeout,
        Cut::MessageMemory,
    ];

    /// The label in metrics and the admin API.
    pub fn label(self) -> &'static str {
        match self {
            Cut::Stalled => "client_stall_timeout",
            Cut::IdleSession => "client_idle_timeout",
            Cut::IdleInTransaction => "idle_transaction_timeout",
            Cut::QueryTimeout => "query_timeout",
            Cut::MessageMemory => "message_memory",
        }
    }

    pub fn sqlstate(self) -> &'static str {
        match self {
            Cut::Stalled => "08006",
            Cut::IdleSession => "57P05",
            Cut::IdleInTransaction => "25P03",
            Cut::QueryTimeout => "57014",
            Cut::MessageMemory => "53200",
        }
    }

    /// The FATAL message the client gets; `limit` is the timeout or memory limit hit.
    pub fn message(self, limit: u64) -> String {
        match self {
            Cut::Stalled => format!(
                "terminating connection because the client sent nothing for {limit} ms in the middle of a message"
            ),
            Cut::IdleSession => "terminating connection due to idle-session timeout".into(),
            Cut::IdleInTransaction => {
                "terminating connection due to idle-in-transaction timeout".into()
            }
            Cut::QueryTimeout => format!(
                "canceling statement due to query timeout ({limit} ms); terminating connection"
            ),
            Cut::MessageMemory => format!(
                "out of memory: partly received client messages would exceed this worker's limit of {limit} bytes"
            ),
        }
    }
}

/// The session's limits, read once per session from the configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub stall: Duration,
    pub idle_session: Option<Duration>,
    pub idle_transaction: Option<Duration>,
    pub query: Option<Duration>,
    /// Messages up to this size are received whole before they are sent on.
    pub buffered_message_size: usize,
}

impl Limits {
    pub fn new(config: &crate::config::Config) -> Limits {
        let ms = Duration::from_millis;
        let optional = |v: u64| (v > 0).then(|| ms(v));
        let t = &config.timeouts;
        Limits {
            stall: ms(t.client_stall_timeout_ms),
            idle_session: optional(t.client_idle_timeout_ms),
            idle_transaction: optional(t.idle_transaction_timeout_ms),
            query: optional(t.query_timeout_ms),
            buffered_message_size: config.limits.buffered_message_size,
        }
    }

    /// The limit a cut names in its message (milliseconds, or bytes for memory).
    pub fn value_for(&self, cut: Cut, memory_limit: usize) -> u64 {
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
        match cut {
            Cut::Stalled => self.stall.as_millis() as u64,
            Cut::IdleSession => ms(self.idle_session),
            Cut::IdleInTransaction => ms(self.idle_transaction),
            Cut::QueryTimeout => ms(self.query),
            Cut::MessageMemory => memory_limit as u64,
        }
    }
}
