//! Phase: pinning. State that lives in one server connection (LISTEN, session advisory
//! locks, temporary tables, WITH HOLD cursors, SQL PREPARE) ties the session to that
//! connection until it is gone: at each boundary where such state may exist, the server
//! is asked, and the connection is kept rather than released while it does. In session
//! mode the connection is kept anyway; there the answer keeps the session's units off
//! the read nodes.

use crate::backend::{BackendConn, BackendError};
use crate::codec::frontend;
use crate::config::PoolMode;
use crate::lease::Lease;
use crate::sql::Effects;

use super::phase::{Phase, Release};
use super::session::{Features, Session};
use super::unit::{LeaseNotes, Unit};

/// Counts what ties a session to its server connection: LISTEN channels, session
/// advisory locks, WITH HOLD cursors, temporary relations and SQL-level prepared statements.
const PIN_CHECK_SQL: &str = "SELECT \
     (SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()) \
     + (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks \
        WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) \
     + (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable) \
     + (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class \
        WHERE relnamespace = pg_catalog.pg_my_temp_schema()) \
     + (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)";

pub struct Pinning;

impl Phase for Pinning {
    async fn before_release(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Release {
        let notes = &mut u.notes;
        let pinned = if notes.maybe_pinned && notes.client_spoke {
            let mut buf = s.ctx.bufs.take();
            match Box::pin(still_pinned(backend, &mut buf)).await {
                Ok(true) => true,
                Ok(false) => {
                    notes.maybe_pinned = false;
                    false
                }
                Err(_) => return Release::Lost,
            }
        } else {
            false
        };
        notes.client_spoke = false;
        if pinned || notes.maybe_pinned {
            s.pinned = true;
            Release::Keep
        } else {
            s.pinned = false;
            Release::Release
        }
    }
}

/// Notes what the SQL may tie to the connection.
pub fn note(notes: &mut LeaseNotes, effects: &Effects) {
    if !effects.pins.is_empty() {
        notes.maybe_pinned = true;
    }
}

/// Why this SQL may not run in this session's pooling mode, if it may not.
pub fn refusal(features: &Features, effects: &Effects) -> Option<String> {
    let mode = features.mode;
    if mode == PoolMode::Session {
        return None;
    }
    if mode == PoolMode::Statement && effects.opens_transaction {
        return Some(
            "transaction blocks are not allowed in statement pooling mode (pool_mode.mode = \"statement\")".into(),
        );
    }
    if !effects.pins.is_empty() && !features.pin_session_state {
        return Some(format!(
            "{} would tie this session to one server connection, which {} pooling does not allow (pool_mode.pin_session_state = false)",
            effects.pins.describe(),
            if mode == PoolMode::Statement { "statement" } else { "transaction" },
        ));
    }
    if !effects.pins.is_empty() && mode == PoolMode::Statement {
        return Some(format!(
            "{} is not supported in statement pooling mode",
            effects.pins.describe()
        ));
    }
    None
}

/// Whether anything still ties this session to its server connection.
pub async fn still_pinned(backend: &mut BackendConn, buf: &mut [u8]) -> Result<bool, BackendError> {
    let mut req = Vec::with_capacity(PIN_CHECK_SQL.len() + 8);
    frontend::encode_query(&mut req, PIN_CHECK_SQL);
    let (rows, error) = backend.fetch(&req, 1, buf).await?;
    if error.is_some() {
        // Cannot tell: stay on the safe side.
        return Ok(true);
    }
    let count = rows
        .first()
        .and_then(|row| row.first().cloned().flatten())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(1);
    Ok(count > 0)
}
