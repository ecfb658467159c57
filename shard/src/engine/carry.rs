//! Phase: session state that moves with the session (`failover.replay`). What a session
//! keeps on its server connection besides settings and protocol-level prepared
//! statements (which follow it anyway) — LISTEN channels, session advisory locks, SQL
//! `PREPARE`d statements — is read from the server at the boundary after a unit that may
//! have changed it, and re-established on a new connection when the session's own was
//! lost (session mode, or a pooled session pinned to its connection), before the client's
//! next message runs there. Temporary tables and `WITH HOLD` cursors cannot move: a
//! session holding one ends with `08006` naming it when its connection is lost, and so
//! does one whose advisory lock another session took meanwhile.

use crate::backend::{BackendConn, BackendError, Rows, ServerError};
use crate::codec::frontend;
use crate::lease::Lease;

use super::cursors::{self, HeldCursor};
use super::phase::{Phase, Ready, Release};
use super::session::Session;
use super::unit::Unit;

/// Every piece of connection-bound session state, one row each: (kind, name, detail).
const STATE_SQL: &str = "SELECT 'listen', c, NULL FROM pg_catalog.pg_listening_channels() c \
     UNION ALL SELECT 'lock', CASE objsubid WHEN 1 \
         THEN ((classid::pg_catalog.int8 OPERATOR(pg_catalog.<<) 32) OPERATOR(pg_catalog.|) objid::pg_catalog.int8)::pg_catalog.text \
         ELSE (classid::pg_catalog.int8::pg_catalog.bit(32)::pg_catalog.int4)::pg_catalog.text OPERATOR(pg_catalog.||) ', ' \
              OPERATOR(pg_catalog.||) (objid::pg_catalog.int8::pg_catalog.bit(32)::pg_catalog.int4)::pg_catalog.text END, mode \
         FROM pg_catalog.pg_locks WHERE locktype OPERATOR(pg_catalog.=) 'advisory' \
         AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() AND granted \
     UNION ALL SELECT 'prepare', name, statement FROM pg_catalog.pg_prepared_statements WHERE from_sql \
     UNION ALL SELECT 'temp', relname::pg_catalog.text, NULL FROM pg_catalog.pg_class \
         WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema() AND relkind IN ('r', 'p', 'S', 'v', 'm', 'f') \
     UNION ALL SELECT 'cursor', name, statement FROM pg_catalog.pg_cursors WHERE is_holdable";

/// What of a session lives on its server connection and must move with it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    pub listen: Vec<String>,
    /// Session advisory locks: the key as SQL arguments (`k` or `a, b`), and whether shared.
    pub locks: Vec<(String, bool)>,
    /// `PREPARE` commands, each alone in its text.
    pub prepared: Vec<String>,
    /// What cannot move, described for the client.
    pub unmovable: Vec<String>,
    /// `WITH HOLD` cursors, with what it takes to place them again.
    pub cursors: Vec<HeldCursor>,
    /// The cursors the last read listed: (name, statement).
    listed_cursors: Vec<(String, String)>,
}

impl Carried {
    pub fn is_empty(&self) -> bool {
        self.listen.is_empty()
            && self.locks.is_empty()
            && self.prepared.is_empty()
            && self.unmovable.is_empty()
            && self.cursors.is_empty()
            && self.listed_cursors.is_empty()
    }

    /// The first thing that cannot move, described for the client.
    pub fn first_unmovable(&self) -> Option<String> {
        self.unmovable
            .first()
            .cloned()
            .or_else(|| self.cursors.iter().find_map(HeldCursor::unmovable))
    }

    /// Takes over what `previous` knew of the cursors still listed.
    fn keep_cursors(&mut self, previous: Vec<HeldCursor>) {
        self.cursors = std::mem::take(&mut self.listed_cursors)
            .into_iter()
            .map(|(name, statement)| {
                previous
                    .iter()
                    .find(|c| c.name == name)
                    .cloned()
                    .unwrap_or_else(|| HeldCursor::new(name, &statement))
            })
            .collect();
    }

    fn from_rows(rows: &Rows) -> Carried {
        let mut carried = Carried::default();
        for row in rows {
            let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            let (kind, name, detail) = (text(0), text(1), text(2));
            match kind.as_str() {
                "listen" => carried.listen.push(name),
                "lock" => carried.locks.push((name, detail == "ShareLock")),
                "prepare" if is_lone_prepare(&detail) => carried.prepared.push(detail),
                "prepare" => carried
                    .unmovable
                    .push(format!("prepared statement \"{name}\" (its PREPARE shared a query string with other statements)")),
                "temp" => carried.unmovable.push(format!("temporary table \"{name}\"")),
                "cursor" => carried.listed_cursors.push((name, detail)),
                _ => {}
            }
        }
        carried
    }

    /// One simple Query re-establishing everything, whose rows name the advisory locks
    /// it could not take again.
    fn restore_sql(&self) -> String {
        let mut sql = String::new();
        for channel in &self.listen {
            sql.push_str(&format!("LISTEN \"{}\";", channel.replace('"', "\"\"")));
        }
        for prepare in &self.prepared {
            sql.push_str(prepare.trim().trim_end_matches(';'));
            sql.push(';');
        }
        let checks: Vec<String> = self
            .locks
            .iter()
            .map(|(key, shared)| {
                format!(
                    "SELECT '{key}' WHERE NOT pg_catalog.pg_try_advisory_lock{}({key})",
                    if *shared { "_shared" } else { "" }
                )
            })
            .collect();
        if !checks.is_empty() {
            sql.push_str(&checks.join(" UNION ALL "));
            sql.push(';');
        }
        sql
    }
}

/// A text that is one `PREPARE` statement and nothing else (what `pg_prepared_statements`
/// shows is the whole query string the client sent).
fn is_lone_prepare(sql: &str) -> bool {
    use crate::sql::lexer::{Lexer, Token};
    let mut statements = 0;
    let mut pending = false;
    let mut first: Option<String> = None;
    for token in Lexer::new(sql.as_bytes()) {
        match token {
            Token::Semicolon => {
                if pending {
                    statements += 1;
                }
                pending = false;
            }
            Token::Comment(_) => {}
            Token::Word(w) => {
                if first.is_none() {
                    first = Some(String::from_utf8_lossy(w).to_ascii_lowercase());
                }
                pending = true;
            }
            _ => pending = true,
        }
    }
    if pending {
        statements += 1;
    }
    statements == 1 && first.as_deref() == Some("prepare")
}

/// The session's connection-bound state, as the server says.
async fn read_state(backend: &mut BackendConn, buf: &mut [u8]) -> Result<Carried, BackendError> {
    let mut req = Vec::with_capacity(STATE_SQL.len() + 8);
    frontend::encode_query(&mut req, STATE_SQL);
    let (rows, error) = backend.fetch(&req, 1, buf).await?;
    Ok(match error {
        None => Carried::from_rows(&rows),
        // Cannot tell: treat it as state that cannot move.
        Some(e) => Carried {
            unmovable: vec![format!("session state the server would not list ({e})")],
            ..Carried::default()
        },
    })
}

pub struct Carry;

impl Phase for Carry {
    /// After a unit that may have taken connection-bound state: what it is now.
    async fn before_release(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Release {
        if !(s.features.replay && u.notes.maybe_pinned && u.notes.client_spoke) {
            return Release::Release;
        }
        let mut buf = s.ctx.bufs.take();
        match Box::pin(read_state(backend, &mut buf)).await {
            Ok(mut carried) => {
                let previous = s.carried.take().map(|c| c.cursors).unwrap_or_default();
                carried.keep_cursors(previous);
                log::debug!("client {}: connection-bound state {carried:?}", s.pid());
                // Told here, the pinning phase need not ask again.
                u.notes.client_spoke = false;
                u.notes.maybe_pinned = !carried.is_empty();
                s.carried = (!carried.is_empty()).then(|| Box::new(carried));
                Release::Release
            }
            Err(_) => Release::Lost,
        }
    }

    /// A new connection for a session whose state lived on a lost one: the state moves
    /// here first, or the session ends naming what could not.
    async fn after_acquire(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Ready {
        let Some(carried) = s.carried.as_ref() else {
            return Ready::Go;
        };
        // The state lands on this connection: it is checked at the unit's end, and the
        // session keeps the connection while any of it is there (not one to give back).
        u.notes.maybe_pinned = true;
        u.notes.client_spoke = true;
        if let Some(what) = carried.first_unmovable() {
            return Ready::Refused(ServerError::own(
                "FATAL",
                "08006",
                &format!(
                    "connection to the server lost, and the session's {what} cannot move to another server"
                ),
            ));
        }
        let sql = carried.restore_sql();
        let mut req = Vec::with_capacity(sql.len() + 8);
        frontend::encode_query(&mut req, &sql);
        let mut buf = s.ctx.bufs.take();
        for cursor in &carried.cursors {
            match cursors::restore(backend, cursor, &mut buf).await {
                Ok(Ok(())) => {}
                Ok(Err(what)) => {
                    return Ready::Refused(ServerError::own(
                        "FATAL",
                        "08006",
                        &format!(
                            "connection to the server lost, and the session's {what} cannot move to another server"
                        ),
                    ))
                }
                Err(e) => return Ready::Lost(e),
            }
        }
        if sql.is_empty() {
            return Ready::Go;
        }
        match backend.fetch(&req, 1, &mut buf).await {
            Ok((rows, None)) => match rows.first().and_then(|r| r.first().cloned().flatten()) {
                None => {
                    log::info!(
                        "client {}: session state moved to pool {} ({} channels, {} locks, {} prepared statements)",
                        s.pid(),
                        backend.pool().label,
                        carried.listen.len(),
                        carried.locks.len(),
                        carried.prepared.len()
                    );
                    Ready::Go
                }
                Some(key) => Ready::Refused(ServerError::own(
                    "FATAL",
                    "08006",
                    &format!(
                        "connection to the server lost, and the session's advisory lock ({key}) was taken by another session meanwhile"
                    ),
                )),
            },
            Ok((_, Some(e))) => Ready::Refused(ServerError::own(
                "FATAL",
                "08006",
                &format!("connection to the server lost, and the session's state could not be re-established: {e}"),
            )),
            Err(e) => Ready::Lost(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: &str, name: &str, detail: Option<&str>) -> Vec<Option<String>> {
        vec![
            Some(kind.into()),
            Some(name.into()),
            detail.map(str::to_string),
        ]
    }

    #[test]
    fn state_is_sorted_into_what_moves_and_what_does_not() {
        let rows = vec![
            row("listen", "jobs \"x\"", None),
            row("lock", "42", Some("ExclusiveLock")),
            row("lock", "1, -2", Some("ShareLock")),
            row("prepare", "p", Some("PREPARE p AS SELECT 1")),
            row("prepare", "q", Some("PREPARE q AS SELECT 1; DELETE FROM t")),
            row("temp", "scratch", None),
        ];
        let c = Carried::from_rows(&rows);
        assert_eq!(c.listen, ["jobs \"x\""]);
        assert_eq!(c.locks, [("42".into(), false), ("1, -2".into(), true)]);
        assert_eq!(c.prepared, ["PREPARE p AS SELECT 1"]);
        assert_eq!(c.unmovable.len(), 2);
        let sql = Carried {
            unmovable: vec![],
            ..c
        }
        .restore_sql();
        assert_eq!(
            sql,
            "LISTEN \"jobs \"\"x\"\"\";PREPARE p AS SELECT 1;\
             SELECT '42' WHERE NOT pg_catalog.pg_try_advisory_lock(42) UNION ALL \
             SELECT '1, -2' WHERE NOT pg_catalog.pg_try_advisory_lock_shared(1, -2);"
        );
    }
}
