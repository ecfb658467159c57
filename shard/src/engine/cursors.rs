//! `WITH HOLD` cursors that move with the session (`failover.replay`). Such a cursor
//! lives on one server connection beyond its transaction. The proxy keeps, for each one
//! the server lists, its `DECLARE` (when it was alone in its query string) and every lone
//! simple-Query `FETCH` or `MOVE` the client ran on it since, with the count and digest
//! of the bytes the client received for each. On a new connection the cursor is declared
//! again and each of those run again: when every answer is byte for byte what the client
//! had, the cursor stands where the client left it and its next `FETCH` returns the next
//! rows. A cursor used any other way (in a unit with other statements, by the extended
//! protocol, from a function), or whose history outgrew `replay_journal_max_bytes`,
//! cannot be placed and ends the session with `08006` naming it, as does one whose
//! replayed rows differ.

use crate::backend::{BackendConn, BackendError};
use crate::codec::frame::read_header;
use crate::codec::frontend;
use crate::codec::tag::fe;
use crate::sql::lexer::{Lexer, Token};

use super::journal::executed_statements;
use super::lanes::Lanes;
use super::prepared::ClientStatements;

/// One `WITH HOLD` cursor of the session's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCursor {
    pub name: String,
    /// Its `DECLARE`, alone in its text; `None` when it was sent with other statements.
    pub declare: Option<String>,
    /// Each lone FETCH or MOVE since: the client's Query message, and the count and
    /// digest of what the client received for it.
    pub ops: Vec<(Vec<u8>, u64, u64)>,
    /// Why its position cannot be known, if it cannot.
    pub lost_track: Option<&'static str>,
    /// Declared by the unit just ended: that unit is checked for other uses of it.
    pub fresh: bool,
    bytes: usize,
}

impl HeldCursor {
    /// A cursor the server listed for the first time, with its `statement`.
    pub fn new(name: String, statement: &str) -> HeldCursor {
        let declare = is_lone(statement, b"declare").then(|| statement.to_string());
        HeldCursor {
            lost_track: declare
                .is_none()
                .then_some("was declared in a query string with other statements"),
            name,
            declare,
            ops: Vec::new(),
            fresh: true,
            bytes: 0,
        }
    }

    /// Why the cursor cannot move, described for the client.
    pub fn unmovable(&self) -> Option<String> {
        self.lost_track
            .map(|why| format!("WITH HOLD cursor \"{}\" ({why})", self.name))
    }
}

/// Keeps the cursors' histories after a unit: the unit's client bytes (its journal) and
/// what it delivered (count, digest). `max` bounds each cursor's history.
pub fn after_unit(cursors: &mut [HeldCursor], lanes: &Lanes, names: &ClientStatements, max: usize) {
    if cursors.is_empty() {
        return;
    }
    let journal = lanes.up.journal.as_ref();
    let delivered = lanes.down.delivered.as_ref();
    let (Some(journal), Some(delivered)) = (journal, delivered) else {
        return;
    };
    let bytes = journal.bytes();
    for cursor in cursors.iter_mut().filter(|c| c.lost_track.is_none()) {
        if journal.overflowed {
            cursor.lost_track = Some("its session ran a unit too large to follow");
            continue;
        }
        let fresh = std::mem::take(&mut cursor.fresh);
        if !mentions(bytes, &cursor.name) {
            continue;
        }
        if fresh {
            // The unit that declared it (alone, or in a transaction block) must have
            // done nothing else with it.
            let statements = executed_statements(bytes, names).unwrap_or_default();
            let uses: Vec<&[u8]> = statements
                .into_iter()
                .filter(|sql| mentions(sql, &cursor.name))
                .collect();
            let declared_only = matches!(
                uses.as_slice(),
                [sql] if std::str::from_utf8(sql).is_ok_and(|t| is_lone(t, b"declare"))
            );
            if !declared_only {
                cursor.lost_track = Some("was used in the transaction that declared it");
            }
            continue;
        }
        match lone_query(bytes) {
            Some(sql) if names_cursor(sql, &cursor.name) => {
                cursor.bytes += bytes.len();
                if cursor.bytes > max {
                    cursor.lost_track =
                        Some("its history outgrew failover.replay_journal_max_bytes");
                    continue;
                }
                cursor
                    .ops
                    .push((bytes.to_vec(), delivered.count(), delivered.digest()));
            }
            _ => cursor.lost_track = Some("was used in a way the proxy cannot repeat"),
        }
    }
}

/// Declares `cursor` on `backend` again and repeats what the client did with it; `Err`
/// with why it cannot stand where the client left it.
pub async fn restore(
    backend: &mut BackendConn,
    cursor: &HeldCursor,
    buf: &mut [u8],
) -> Result<Result<(), String>, BackendError> {
    if let Some(why) = cursor.unmovable() {
        return Ok(Err(why));
    }
    let Some(declare) = &cursor.declare else {
        return Ok(Err(format!("WITH HOLD cursor \"{}\"", cursor.name)));
    };
    let mut req = Vec::with_capacity(declare.len() + 8);
    frontend::encode_query(&mut req, declare);
    let mut answer = Vec::new();
    backend.exchange_raw(&req, buf, &mut answer).await?;
    if answer.first() == Some(&b'E') {
        return Ok(Err(format!(
            "WITH HOLD cursor \"{}\" (its DECLARE failed on the new server)",
            cursor.name
        )));
    }
    for (op, count, digest) in &cursor.ops {
        answer.clear();
        backend.exchange_raw(op, buf, &mut answer).await?;
        if answer.len() as u64 != *count || xxhash_rust::xxh64::xxh64(&answer, 0) != *digest {
            return Ok(Err(format!(
                "WITH HOLD cursor \"{}\" (its rows differ on the new server)",
                cursor.name
            )));
        }
    }
    Ok(Ok(()))
}

/// The text of the unit's only message when that is a simple Query.
fn lone_query(journal: &[u8]) -> Option<&str> {
    let (tag, len) = read_header(journal, usize::MAX >> 1).ok()??;
    if tag != fe::QUERY || len != journal.len() {
        return None;
    }
    let body = &journal[5..len];
    std::str::from_utf8(body.strip_suffix(b"\0").unwrap_or(body)).ok()
}

/// The journal names `name` somewhere (any case): it may have used the cursor.
fn mentions(journal: &[u8], name: &str) -> bool {
    let name = name.as_bytes();
    !name.is_empty()
        && journal
            .windows(name.len())
            .any(|w| w.eq_ignore_ascii_case(name))
}

/// One statement, alone in `sql` (a trailing `;` allowed), whose first word is `first`.
fn is_lone(sql: &str, first: &[u8]) -> bool {
    let mut words = 0;
    let mut leading = None;
    let mut ended = false;
    for token in Lexer::new(sql.as_bytes()) {
        match token {
            Token::Comment(_) => {}
            Token::Semicolon => ended = true,
            _ if ended => return false,
            Token::Word(w) => {
                if words == 0 {
                    leading = Some(w.to_ascii_lowercase());
                }
                words += 1;
            }
            _ => words += 1,
        }
    }
    leading.as_deref() == Some(first)
}

/// A lone FETCH or MOVE whose cursor (its last word) is `name`.
fn names_cursor(sql: &str, name: &str) -> bool {
    if !(is_lone(sql, b"fetch") || is_lone(sql, b"move")) {
        return false;
    }
    let mut last: Option<String> = None;
    for token in Lexer::new(sql.as_bytes()) {
        match token {
            Token::Word(w) => last = Some(String::from_utf8_lossy(w).to_ascii_lowercase()),
            Token::Quoted(q) => last = Some(String::from_utf8_lossy(q).replace("\"\"", "\"")),
            Token::Semicolon | Token::Comment(_) => {}
            _ => last = None,
        }
    }
    last.as_deref() == Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lone_fetches_and_moves_on_the_cursor_are_repeated() {
        assert!(names_cursor("FETCH 10 FROM walk", "walk"));
        assert!(names_cursor("move forward 5 in WALK;", "walk"));
        assert!(names_cursor("FETCH NEXT FROM \"Walk\"", "Walk"));
        assert!(!names_cursor("FETCH 10 FROM other", "walk"));
        assert!(!names_cursor("FETCH 10 FROM walk; DELETE FROM t", "walk"));
        assert!(!names_cursor("SELECT * FROM walk", "walk"));
        assert!(is_lone(
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            b"declare"
        ));
        assert!(!is_lone(
            "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            b"declare"
        ));
    }
}
