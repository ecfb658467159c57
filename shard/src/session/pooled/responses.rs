//! What the server owes the client, in order. Every message sent upstream that gets an
//! answer is queued here; server messages complete the entries at the head. That is how
//! the proxy drops answers to messages it injected (a Parse that prepares a statement on
//! this connection, a Close that evicts one), answers a Parse itself when the statement is
//! already prepared, and replaces an error with its own — each at exactly the place in
//! the stream where PostgreSQL would have put it, including after an error, when the
//! server skips everything up to Sync.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::codec::backend as be;
use crate::prepared::{ServerStatements, Statement};
use crate::sql::Effects;

/// The server's answer to a Parse, as a complete message.
pub const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";

#[derive(Debug)]
pub enum Expect {
    /// A client Parse; a named one records the statement it prepares.
    Parse(Option<Rc<Statement>>),
    /// A Parse the proxy added to prepare a statement here; its ParseComplete is dropped.
    InjectedParse(Rc<Statement>),
    /// A Close the proxy added to evict a statement; its CloseComplete is dropped.
    InjectedClose(Rc<str>),
    Bind(Option<Rc<Statement>>),
    Describe,
    Execute,
    Close,
    Sync,
    /// A simple Query or FunctionCall: answered through ReadyForQuery.
    Query(Effects),
    /// Bytes the proxy answers itself once everything before them was answered.
    Synthetic(&'static [u8]),
    /// A message the proxy made fail on purpose: its ErrorResponse is replaced by this.
    ReplaceError(Box<[u8]>),
    /// A simple Query the proxy made fail on purpose: its ErrorResponse is replaced by
    /// this, and it is answered through ReadyForQuery.
    RefusedQuery(Box<[u8]>),
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Forward,
    /// Not for the client (an answer to the proxy's own message, or a replaced error).
    Drop,
}

/// Side effects on the server connection's bookkeeping that the pump applies.
#[derive(Default)]
pub struct Outcome {
    /// Names to Close before the next request.
    pub to_close: Vec<Rc<str>>,
    /// The server dropped all prepared statements.
    pub cleared: bool,
}

#[derive(Default)]
pub struct Responses {
    queue: VecDeque<Expect>,
    /// Bytes to put into the client stream at the current message boundary.
    pub ready: Vec<u8>,
    /// Statement-less messages sent since the last Sync (the server skips them on error).
    pub unsynced: bool,
}

impl Responses {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.ready.is_empty()
    }

    /// Answers still owed by the server (not counting the proxy's own ready bytes).
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }

    /// ReadyForQuery messages still to come.
    pub fn pending_syncs(&self) -> u32 {
        self.queue
            .iter()
            .filter(|e| matches!(e, Expect::Sync | Expect::Query(_) | Expect::RefusedQuery(_)))
            .count() as u32
    }

    pub fn push(&mut self, expect: Expect) {
        match expect {
            Expect::Synthetic(bytes) if self.queue.is_empty() => {
                self.ready.extend_from_slice(bytes)
            }
            other => self.queue.push_back(other),
        }
    }

    /// Decides what happens to a server message and updates the queue. `body` is the
    /// message body for captured tags (ErrorResponse, CommandComplete), else empty.
    pub fn on_server_message(
        &mut self,
        tag: u8,
        body: &[u8],
        server: &mut ServerStatements,
        out: &mut Outcome,
    ) -> Action {
        let Some(head) = self.queue.front() else {
            return Action::Forward;
        };
        let action = match (tag, head) {
            (b'E', Expect::RefusedQuery(bytes)) => {
                self.ready.extend_from_slice(bytes);
                Action::Drop
            }
            (b'Z', Expect::RefusedQuery(_)) => self.pop(Action::Forward),
            (b'E', Expect::Query(_) | Expect::Sync) => Action::Forward,
            (b'E', _) => return self.on_error(body, server, out),
            (b'1', Expect::Parse(_)) => self.pop(Action::Forward),
            (b'1', Expect::InjectedParse(_)) => self.pop(Action::Drop),
            (b'3', Expect::InjectedClose(_)) => self.pop(Action::Drop),
            (b'3', Expect::Close) => self.pop(Action::Forward),
            (b'2', Expect::Bind(_)) => self.pop(Action::Forward),
            (b'T' | b'n', Expect::Describe) => self.pop(Action::Forward),
            (b'C' | b'I' | b's', Expect::Execute) => {
                if tag == b'C' && drops_prepared(body) {
                    out.cleared = true;
                }
                self.pop(Action::Forward)
            }
            (b'C', Expect::Query(_)) => {
                if drops_prepared(body) {
                    out.cleared = true;
                }
                Action::Forward
            }
            (b'Z', Expect::Sync | Expect::Query(_)) => self.pop(Action::Forward),
            _ => Action::Forward,
        };
        self.release_synthetic();
        action
    }

    fn pop(&mut self, action: Action) -> Action {
        self.queue.pop_front();
        action
    }

    /// Moves answers the proxy gives itself to `ready` once they reach the head.
    fn release_synthetic(&mut self) {
        while let Some(Expect::Synthetic(bytes)) = self.queue.front() {
            self.ready.extend_from_slice(bytes);
            self.queue.pop_front();
        }
    }

    /// An ErrorResponse in extended-protocol traffic: it answers the head message, and
    /// the server skips everything else up to the next Sync.
    fn on_error(
        &mut self,
        body: &[u8],
        server: &mut ServerStatements,
        out: &mut Outcome,
    ) -> Action {
        let mut action = Action::Forward;
        match self.queue.pop_front() {
            Some(Expect::ReplaceError(bytes)) => {
                self.ready.extend_from_slice(&bytes);
                action = Action::Drop;
            }
            Some(Expect::Bind(Some(stmt))) if is_stale_plan(body) => {
                // DDL changed the result type under a shared plan: retire the name so
                // every connection prepares the statement afresh; this one drops the old.
                let old = stmt.server_name();
                server.remove(&old);
                out.to_close.push(old);
                stmt.invalidate();
            }
            Some(other) => Self::unprepare(other, server, out),
            None => {}
        }
        while let Some(next) = self.queue.front() {
            if matches!(next, Expect::Sync) {
                break;
            }
            let skipped = self.queue.pop_front().expect("front exists");
            Self::unprepare(skipped, server, out);
        }
        action
    }

    /// A message the server rejected or skipped: undo what sending it assumed.
    fn unprepare(expect: Expect, server: &mut ServerStatements, out: &mut Outcome) {
        match expect {
            Expect::Parse(Some(stmt)) | Expect::InjectedParse(stmt) => {
                server.remove(&stmt.server_name());
            }
            // The eviction did not happen: close it next time.
            Expect::InjectedClose(name) => out.to_close.push(name),
            _ => {}
        }
    }
}

/// "cached plan must not change result type" (SQLSTATE 0A000).
fn is_stale_plan(body: &[u8]) -> bool {
    match be::decode(b'E', body) {
        Ok(be::BackendMessage::ErrorResponse(fields)) => {
            fields.code() == "0A000" && fields.message().contains("cached plan must not change")
        }
        _ => false,
    }
}

/// CommandComplete tags after which the server has no prepared statements left.
fn drops_prepared(body: &[u8]) -> bool {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    tag == b"DEALLOCATE ALL" || tag == b"DISCARD ALL"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepared::Registry;

    fn error_body(code: &str, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        be::write_error(&mut out, "ERROR", code, message);
        out[5..].to_vec()
    }

    fn spec(q: &str) -> Vec<u8> {
        let mut s = q.as_bytes().to_vec();
        s.extend_from_slice(&[0, 0, 0]);
        s
    }

    #[test]
    fn injected_answers_are_dropped_and_synthetic_ones_placed_in_order() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"));
        let mut server = ServerStatements::default();
        let mut out = Outcome::default();
        let mut r = Responses::default();
        r.push(Expect::InjectedParse(stmt.clone()));
        r.push(Expect::Bind(Some(stmt.clone())));
        r.push(Expect::Synthetic(PARSE_COMPLETE));
        r.push(Expect::Execute);
        r.push(Expect::Sync);
        assert_eq!(
            r.on_server_message(b'1', b"", &mut server, &mut out),
            Action::Drop
        );
        assert_eq!(
            r.on_server_message(b'2', b"", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(
            r.ready, PARSE_COMPLETE,
            "ParseComplete follows BindComplete"
        );
        r.ready.clear();
        assert_eq!(
            r.on_server_message(b'D', b"", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(
            r.on_server_message(b'C', b"SELECT 1\0", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(
            r.on_server_message(b'Z', b"I", &mut server, &mut out),
            Action::Forward
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_synthetic_answer_with_nothing_before_it_is_ready_at_once() {
        let mut r = Responses::default();
        r.push(Expect::Synthetic(PARSE_COMPLETE));
        assert_eq!(r.ready, PARSE_COMPLETE);
        assert_eq!(r.outstanding(), 0);
    }

    #[test]
    fn an_error_skips_to_sync_and_undoes_assumed_preparations() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"));
        let mut server = ServerStatements::default();
        server.insert(&stmt, 10);
        let mut out = Outcome::default();
        let mut r = Responses::default();
        r.push(Expect::Execute);
        r.push(Expect::InjectedClose("_hx_old".into()));
        r.push(Expect::InjectedParse(stmt.clone()));
        r.push(Expect::Synthetic(PARSE_COMPLETE));
        r.push(Expect::Sync);
        let err = error_body("22012", "division by zero");
        assert_eq!(
            r.on_server_message(b'E', &err, &mut server, &mut out),
            Action::Forward
        );
        assert!(
            r.ready.is_empty(),
            "nothing after an error but ReadyForQuery"
        );
        assert_eq!(out.to_close, [Rc::<str>::from("_hx_old")]);
        assert!(!server.has(&stmt));
        assert_eq!(r.outstanding(), 1);
        assert_eq!(
            r.on_server_message(b'Z', b"I", &mut server, &mut out),
            Action::Forward
        );
        assert!(r.is_empty());
    }

    #[test]
    fn replaced_errors_and_stale_plans() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT * FROM t"));
        let mut server = ServerStatements::default();
        server.insert(&stmt, 10);
        let old = stmt.server_name();
        let mut out = Outcome::default();
        let mut r = Responses::default();
        r.push(Expect::ReplaceError(b"ours".to_vec().into()));
        r.push(Expect::Sync);
        let err = error_body("42601", "syntax error");
        assert_eq!(
            r.on_server_message(b'E', &err, &mut server, &mut out),
            Action::Drop
        );
        assert_eq!(r.ready, b"ours");
        r.ready.clear();
        r.on_server_message(b'Z', b"I", &mut server, &mut out);

        r.push(Expect::Bind(Some(stmt.clone())));
        r.push(Expect::Sync);
        let stale = error_body("0A000", "cached plan must not change result type");
        assert_eq!(
            r.on_server_message(b'E', &stale, &mut server, &mut out),
            Action::Forward
        );
        assert_ne!(stmt.server_name(), old, "renamed so it is prepared afresh");
        assert!(out.to_close.contains(&old));
    }

    #[test]
    fn deallocate_all_is_seen_in_command_complete() {
        let mut server = ServerStatements::default();
        let mut out = Outcome::default();
        let mut r = Responses::default();
        r.push(Expect::Query(Effects::default()));
        r.on_server_message(b'C', b"DEALLOCATE ALL\0", &mut server, &mut out);
        assert!(out.cleared);
    }
}
