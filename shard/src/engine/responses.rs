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
use crate::codec::tag::{be as tag, status};
use crate::prepared::{ServerStatements, Statement};

/// The server's answer to a Parse, as a complete message.
pub const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";

/// One registration of a client's statement name (see `ClientStatements`): the name and
/// the serial number it got, so news about an older registration of the same name is
/// not applied to a newer one.
pub type ClientName = (Box<[u8]>, u32);

#[derive(Debug)]
pub enum Expect {
    /// A client Parse. `prepares` is the shared statement it prepares on this connection
    /// (none for the client's unnamed statement, or when the Parse only probes the
    /// server's transaction state); `client` the client's name it registers, confirmed by
    /// ParseComplete and forgotten if the server rejects or skips the Parse.
    Parse {
        prepares: Option<Rc<Statement>>,
        client: Option<ClientName>,
    },
    /// A client Parse of a statement this connection already has: the proxy answers
    /// ParseComplete itself when everything before it was answered.
    ParseAnswered(ClientName),
    /// A Parse the proxy added to prepare a statement here; its ParseComplete is dropped.
    InjectedParse(Rc<Statement>),
    /// A Parse the proxy added to recreate the client's unnamed statement on this
    /// connection; its ParseComplete is dropped.
    InjectedUnnamedParse,
    /// A Close the proxy added to evict a statement; its CloseComplete is dropped.
    InjectedClose(Rc<str>),
    /// A Describe the proxy added after preparing a statement, to learn its result
    /// shape; the answer is dropped. `client` names the client statement that is told the
    /// shape learnt (a Parse the client sent); `check` means the client's next message
    /// waits for this answer.
    InjectedDescribe {
        stmt: Rc<Statement>,
        client: Option<ClientName>,
        check: bool,
    },
    Bind(Option<Rc<Statement>>),
    /// A Describe; names the shared statement when it describes one.
    Describe(Option<Rc<Statement>>),
    Execute,
    Close,
    Sync,
    /// A simple Query or FunctionCall: answered through ReadyForQuery.
    Query,
    /// Bytes the proxy answers itself once everything before them was answered.
    Synthetic(&'static [u8]),
    /// A simple Query the proxy answers itself: this command tag, then ReadyForQuery with
    /// the transaction status at that point.
    SyntheticCommand(&'static str),
    /// A message the proxy made fail on purpose: its ErrorResponse is replaced by this.
    ReplaceError(Box<[u8]>),
    /// A simple Query the proxy made fail on purpose: its ErrorResponse is replaced by
    /// this, and it is answered through ReadyForQuery.
    RefusedQuery(Box<[u8]>),
    /// The proxy's own simple Query for the transaction's id, sent just before a COMMIT
    /// (`failover.track_commit_outcome`): its answers are the proxy's, not the client's.
    /// `owes_tag`: the client is still owed the CommandComplete of the COMMIT that
    /// follows (its own COMMIT; not one the proxy added).
    XidQuery {
        owes_tag: bool,
    },
    /// A simple Query of the proxy's own whose every answer is dropped (the `BEGIN` put
    /// around a client's autocommit write).
    Silent,
    /// A client's simple Query inside a block the proxy opened for it: answered as it
    /// is, but for its ReadyForQuery (the block's end answers the client).
    QueryInBlock,
    /// The `COMMIT` closing such a block: its CommandComplete is dropped, an error and
    /// the ReadyForQuery are the client's.
    CommitForClient,
}

/// What the proxy knows of the id of the transaction whose COMMIT is in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitXid {
    /// Nothing asked, or the answer to the COMMIT itself began: nothing to settle.
    #[default]
    Unknown,
    /// Asked; not a byte of the answer yet.
    Asked,
    /// Its answer is coming (the server ran the query, so may have run the COMMIT).
    Answering,
    /// The id (`None`: the transaction wrote nothing, so had no id), and nothing of the
    /// COMMIT's own answer has come. `owes_tag`: the client is still owed the COMMIT's
    /// CommandComplete (an explicit COMMIT; an autocommit write's came before).
    Learned { xid: Option<u64>, owes_tag: bool },
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Forward,
    /// Not for the client (an answer to the proxy's own message, or a replaced error).
    Drop,
}

/// Side effects on the server connection's and the client's bookkeeping that the pump
/// applies.
#[derive(Default)]
pub struct Outcome {
    /// Names to Close before the next request.
    pub to_close: Vec<Rc<str>>,
    /// Client statement names now told the statement's current result shape.
    pub shapes: Vec<(ClientName, Rc<Statement>)>,
    /// Client statement names whose Parse the server (or the proxy) completed.
    pub confirmed: Vec<ClientName>,
    /// Client statement names whose Parse failed or was skipped: PostgreSQL keeps no
    /// statement under that name.
    pub forgotten: Vec<ClientName>,
    /// The client's unnamed Parse failed: it has no unnamed statement now.
    pub unnamed_failed: bool,
    /// The server dropped all prepared statements.
    pub cleared: bool,
    /// The schema changed (CREATE, ALTER, DROP completed): shared plans may not fit.
    pub schema_changed: bool,
}

#[derive(Default)]
pub struct Responses {
    queue: VecDeque<Expect>,
    /// Bytes to put into the client stream at the current message boundary.
    pub ready: Vec<u8>,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The server reported an error and ignores everything up to the next Sync.
    skipping: bool,
    /// A shape check the client's next message waits for is outstanding.
    pub awaiting_check: bool,
    /// The client's next message re-registers a name whose Parse is still unanswered: it
    /// waits until that Parse succeeded or failed.
    pub awaiting_parse: bool,
    /// Transaction status from the server's last ReadyForQuery.
    pub status: u8,
    /// The id of the transaction whose COMMIT went out (see [`Expect::XidQuery`]).
    pub commit_xid: CommitXid,
}

impl Responses {
    /// Starts a lease of a server connection whose status is `status`. The queue's
    /// memory is kept for the next transaction (no allocation per transaction), unless a
    /// large pipeline grew it.
    pub fn start(&mut self, status: u8) {
        const KEEP: usize = 64;
        self.queue.clear();
        if self.queue.capacity() > KEEP {
            self.queue = VecDeque::new();
        }
        self.ready.clear();
        if self.ready.capacity() > KEEP * 16 {
            self.ready = Vec::new();
        }
        self.unsynced = false;
        self.skipping = false;
        self.awaiting_check = false;
        self.awaiting_parse = false;
        self.status = status;
        self.commit_xid = CommitXid::Unknown;
    }

    /// The proxy's own query for the transaction's id is in flight: its DataRow must be
    /// read whole.
    pub fn awaits_xid(&self) -> bool {
        matches!(self.commit_xid, CommitXid::Asked | CommitXid::Answering)
    }

    /// Answers to the proxy's own query for the transaction's id are still to come: no
    /// message may reach the client before it is whole (it may be one to drop).
    pub fn xid_query_queued(&self) -> bool {
        self.awaits_xid()
            || matches!(
                self.queue.front(),
                Some(
                    Expect::XidQuery { .. }
                        | Expect::Silent
                        | Expect::QueryInBlock
                        | Expect::CommitForClient
                )
            )
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.ready.is_empty()
    }

    /// Answers still owed by the server (not counting the proxy's own ready bytes).
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }

    /// Nothing expected, owed or waited for: a new `Responses` would do as well.
    pub fn is_clear(&self) -> bool {
        self.queue.is_empty()
            && self.ready.is_empty()
            && !self.unsynced
            && !self.skipping
            && !self.awaiting_check
            && !self.awaiting_parse
            && matches!(self.commit_xid, CommitXid::Unknown)
    }

    /// The server ignores a message sent now: it reported an error and has not been
    /// sent the Sync that ends the skipping (once that Sync is queued, messages sent
    /// after it are answered again).
    pub fn is_skipping(&self) -> bool {
        self.skipping && self.queue.is_empty()
    }

    /// ReadyForQuery messages still to come.
    pub fn pending_syncs(&self) -> u32 {
        self.queue
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Expect::Sync
                        | Expect::Query
                        | Expect::RefusedQuery(_)
                        | Expect::CommitForClient
                )
            })
            .count() as u32
    }

    /// Queues what the server will owe for a message being sent. While the server skips
    /// to Sync after an error, messages before that Sync get no answer at all.
    pub fn push(&mut self, expect: Expect, server: &mut ServerStatements, out: &mut Outcome) {
        if self.is_skipping() && !matches!(expect, Expect::Sync) {
            Self::unprepare(expect, server, out);
            return;
        }
        match expect {
            Expect::Synthetic(bytes) if self.queue.is_empty() => {
                self.ready.extend_from_slice(bytes)
            }
            Expect::ParseAnswered(name) if self.queue.is_empty() => {
                self.ready.extend_from_slice(PARSE_COMPLETE);
                out.confirmed.push(name);
            }
            Expect::SyntheticCommand(tag) if self.queue.is_empty() => self.answer_command(tag),
            Expect::XidQuery { .. } => {
                self.commit_xid = CommitXid::Asked;
                self.queue.push_back(expect);
            }
            Expect::InjectedDescribe { check: true, .. } => {
                self.awaiting_check = true;
                self.queue.push_back(expect);
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
        let action = self.answer(tag, body, server, out);
        self.release_synthetic(out);
        action
    }

    fn answer(
        &mut self,
        tag: u8,
        body: &[u8],
        server: &mut ServerStatements,
        out: &mut Outcome,
    ) -> Action {
        let Some(head) = self.queue.front() else {
            return Action::Forward;
        };
        let own_answer = matches!(head, Expect::XidQuery { .. })
            || (matches!(head, Expect::CommitForClient) && tag == tag::COMMAND_COMPLETE);
        if matches!(self.commit_xid, CommitXid::Learned { .. })
            && !own_answer
            && !matches!(
                tag,
                tag::NOTICE_RESPONSE | tag::NOTIFICATION_RESPONSE | tag::PARAMETER_STATUS
            )
        {
            // The COMMIT's own answer is coming: the client will know.
            self.commit_xid = CommitXid::Unknown;
        }
        match (tag, head) {
            (tag::DATA_ROW, Expect::XidQuery { owes_tag }) => {
                self.commit_xid = learned(body, *owes_tag);
                Action::Drop
            }
            (tag::READY_FOR_QUERY, Expect::XidQuery { .. }) => {
                if matches!(self.commit_xid, CommitXid::Asked | CommitXid::Answering) {
                    self.commit_xid = CommitXid::Unknown;
                }
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.pop(Action::Drop)
            }
            (tag::READY_FOR_QUERY, Expect::Silent) => {
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.pop(Action::Drop)
            }
            (
                tag::ROW_DESCRIPTION | tag::COMMAND_COMPLETE | tag::ERROR_RESPONSE,
                Expect::XidQuery { .. },
            ) => {
                if self.commit_xid == CommitXid::Asked {
                    self.commit_xid = CommitXid::Answering;
                }
                if tag == tag::ERROR_RESPONSE {
                    log::warn!(
                        "the transaction id query before a COMMIT failed: {}",
                        String::from_utf8_lossy(body).replace('\0', " ")
                    );
                    self.commit_xid = CommitXid::Unknown;
                }
                Action::Drop
            }
            (tag::ERROR_RESPONSE, Expect::RefusedQuery(bytes)) => {
                self.ready.extend_from_slice(bytes);
                Action::Drop
            }
            (tag::READY_FOR_QUERY, Expect::RefusedQuery(_)) => {
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.pop(Action::Forward)
            }
            (tag::ERROR_RESPONSE, Expect::Query | Expect::Sync) => Action::Forward,
            (_, Expect::Silent) => Action::Drop,
            (tag::READY_FOR_QUERY, Expect::QueryInBlock) => {
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.pop(Action::Drop)
            }
            (tag::COMMAND_COMPLETE, Expect::QueryInBlock) => {
                note_command(body, out);
                Action::Forward
            }
            (_, Expect::QueryInBlock) => Action::Forward,
            (tag::COMMAND_COMPLETE, Expect::CommitForClient) => Action::Drop,
            (tag::READY_FOR_QUERY, Expect::CommitForClient) => {
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.pop(Action::Forward)
            }
            (_, Expect::CommitForClient) => Action::Forward,
            (tag::ERROR_RESPONSE, _) => self.on_error(body, server, out),
            (tag::PARSE_COMPLETE, Expect::Parse { .. }) => {
                if let Some(Expect::Parse {
                    client: Some(name), ..
                }) = self.queue.pop_front()
                {
                    out.confirmed.push(name);
                }
                Action::Forward
            }
            (tag::PARSE_COMPLETE, Expect::InjectedParse(_) | Expect::InjectedUnnamedParse) => {
                self.pop(Action::Drop)
            }
            (tag::PARAMETER_DESCRIPTION, Expect::InjectedDescribe { .. }) => Action::Drop,
            (tag::ROW_DESCRIPTION | tag::NO_DATA, Expect::InjectedDescribe { .. }) => {
                if let Some(Expect::InjectedDescribe {
                    stmt,
                    client,
                    check,
                }) = self.queue.pop_front()
                {
                    stmt.learn_shape(if tag == tag::ROW_DESCRIPTION {
                        body
                    } else {
                        b""
                    });
                    if let Some(name) = client {
                        out.shapes.push((name, stmt));
                    }
                    if check {
                        self.awaiting_check = false;
                    }
                }
                Action::Drop
            }
            (tag::CLOSE_COMPLETE, Expect::InjectedClose(_)) => self.pop(Action::Drop),
            (tag::CLOSE_COMPLETE, Expect::Close) => self.pop(Action::Forward),
            (tag::BIND_COMPLETE, Expect::Bind(_)) => self.pop(Action::Forward),
            (tag::ROW_DESCRIPTION | tag::NO_DATA, Expect::Describe(_)) => self.pop(Action::Forward),
            (
                tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED,
                Expect::Execute,
            ) => {
                if tag == tag::COMMAND_COMPLETE {
                    note_command(body, out);
                }
                self.pop(Action::Forward)
            }
            (tag::COMMAND_COMPLETE, Expect::Query) => {
                note_command(body, out);
                Action::Forward
            }
            (tag::READY_FOR_QUERY, Expect::Sync | Expect::Query) => {
                self.status = body.first().copied().unwrap_or(status::IDLE);
                self.skipping = false;
                self.pop(Action::Forward)
            }
            _ => Action::Forward,
        }
    }

    fn pop(&mut self, action: Action) -> Action {
        self.queue.pop_front();
        action
    }

    /// Moves answers the proxy gives itself to `ready` once they reach the head.
    fn release_synthetic(&mut self, out: &mut Outcome) {
        loop {
            match self.queue.front() {
                Some(Expect::Synthetic(bytes)) => self.ready.extend_from_slice(bytes),
                Some(Expect::SyntheticCommand(tag)) => {
                    let tag = *tag;
                    self.answer_command(tag);
                }
                Some(Expect::ParseAnswered(_)) => {
                    if let Some(Expect::ParseAnswered(name)) = self.queue.pop_front() {
                        self.ready.extend_from_slice(PARSE_COMPLETE);
                        out.confirmed.push(name);
                    }
                    continue;
                }
                _ => return,
            }
            self.queue.pop_front();
        }
    }

    /// CommandComplete and ReadyForQuery for a command the proxy handled itself; in a
    /// failed transaction, the error PostgreSQL gives instead.
    fn answer_command(&mut self, tag: &str) {
        if self.status == status::FAILED {
            be::write_error(
                &mut self.ready,
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
        } else {
            be::write_command_complete(&mut self.ready, tag);
        }
        be::write_ready_for_query(&mut self.ready, self.status);
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
        self.skipping = true;
        match self.queue.pop_front() {
            Some(Expect::ReplaceError(bytes)) => {
                self.ready.extend_from_slice(&bytes);
                action = Action::Drop;
            }
            Some(Expect::Parse {
                prepares: None,
                client: None,
            }) => out.unnamed_failed = true,
            Some(
                Expect::Bind(Some(stmt))
                | Expect::Describe(Some(stmt))
                | Expect::InjectedDescribe { stmt, .. },
            ) if is_stale_plan(body) => {
                // DDL changed the result type under a shared plan: retire the name so
                // every connection prepares the statement afresh; this one drops the old.
                let old = stmt.server_name();
                log::debug!("statement {old}: stale plan on a server connection; preparing afresh");
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
        self.awaiting_check = false;
        action
    }

    /// A message the server rejected or skipped: undo what sending it assumed.
    /// The connection was lost: nothing queued will be answered. Client names whose
    /// Parse was in flight are forgotten, as PostgreSQL never created them.
    pub fn abandon(&mut self, server: &mut ServerStatements, out: &mut Outcome) {
        while let Some(expect) = self.queue.pop_front() {
            Self::unprepare(expect, server, out);
        }
        self.ready.clear();
        self.unsynced = false;
        self.skipping = false;
        self.awaiting_check = false;
        self.awaiting_parse = false;
    }

    fn unprepare(expect: Expect, server: &mut ServerStatements, out: &mut Outcome) {
        match expect {
            Expect::Parse { prepares, client } => {
                if let Some(stmt) = prepares {
                    server.remove(&stmt.server_name());
                }
                out.forgotten.extend(client);
            }
            Expect::ParseAnswered(name) => out.forgotten.push(name),
            Expect::InjectedParse(stmt) => {
                server.remove(&stmt.server_name());
            }
            // The eviction did not happen: close it next time.
            Expect::InjectedClose(name) => out.to_close.push(name),
            Expect::InjectedDescribe { .. } => {}
            _ => {}
        }
    }
}

/// What the DataRow answering the proxy's query for a transaction's id says.
fn learned(body: &[u8], owes_tag: bool) -> CommitXid {
    match first_value(body) {
        Some(Some(text)) => match std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
        {
            Some(xid) => CommitXid::Learned {
                xid: Some(xid),
                owes_tag,
            },
            None => CommitXid::Unknown,
        },
        Some(None) => CommitXid::Learned {
            xid: None,
            owes_tag,
        },
        None => CommitXid::Unknown,
    }
}

/// The first column of a DataRow body: `Some(None)` for NULL, `None` if malformed.
fn first_value(body: &[u8]) -> Option<Option<&[u8]>> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if count == 0 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return Some(None);
    }
    body.get(6..6 + len as usize).map(Some)
}

/// "cached plan must not change result type" (SQLSTATE 0A000).
fn is_stale_plan(body: &[u8]) -> bool {
    match be::decode(tag::ERROR_RESPONSE, body) {
        Ok(be::BackendMessage::ErrorResponse(fields)) => {
            fields.code() == "0A000" && fields.message().contains("cached plan must not change")
        }
        _ => false,
    }
}

/// What a CommandComplete tag tells about prepared statements and the schema.
fn note_command(body: &[u8], out: &mut Outcome) {
    if drops_prepared(body) {
        out.cleared = true;
    }
    if body.starts_with(b"ALTER ") || body.starts_with(b"CREATE ") || body.starts_with(b"DROP ") {
        out.schema_changed = true;
    }
}

/// CommandComplete tags after which the server has no prepared statements left.
fn drops_prepared(body: &[u8]) -> bool {
    let tag = body.strip_suffix(b"\0").unwrap_or(body);
    tag == b"DEALLOCATE ALL" || tag == b"DISCARD ALL"
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_transaction_id_is_read_from_the_first_column() {
        // One column, "1234".
        let row = [0, 1, 0, 0, 0, 4, b'1', b'2', b'3', b'4'];
        assert_eq!(super::first_value(&row), Some(Some(&b"1234"[..])));
        let null = [0, 1, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(super::first_value(&null), Some(None));
        assert_eq!(super::first_value(&[0, 1, 0, 0]), None);
    }

    use super::*;
    use crate::prepared::Registry;

    fn error_body(code: &str, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        be::write_error(&mut out, "ERROR", code, message);
        out[5..].to_vec()
    }

    /// A server connection's statements, an outcome and a queue, all empty.
    fn fixture() -> (ServerStatements, Outcome, Responses) {
        Default::default()
    }

    fn spec(q: &str) -> Vec<u8> {
        let mut s = q.as_bytes().to_vec();
        s.extend_from_slice(&[0, 0, 0]);
        s
    }

    #[test]
    fn injected_answers_are_dropped_and_synthetic_ones_placed_in_order() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"), None);
        let (mut server, mut out, mut r) = fixture();
        r.push(Expect::InjectedParse(stmt.clone()), &mut server, &mut out);
        r.push(Expect::Bind(Some(stmt.clone())), &mut server, &mut out);
        r.push(Expect::Synthetic(PARSE_COMPLETE), &mut server, &mut out);
        r.push(Expect::Execute, &mut server, &mut out);
        r.push(Expect::Sync, &mut server, &mut out);
        assert_eq!(
            r.on_server_message(tag::PARSE_COMPLETE, b"", &mut server, &mut out),
            Action::Drop
        );
        assert_eq!(
            r.on_server_message(tag::BIND_COMPLETE, b"", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(
            r.ready, PARSE_COMPLETE,
            "ParseComplete follows BindComplete"
        );
        r.ready.clear();
        assert_eq!(
            r.on_server_message(tag::DATA_ROW, b"", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(
            r.on_server_message(tag::COMMAND_COMPLETE, b"SELECT 1\0", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(
            r.on_server_message(tag::READY_FOR_QUERY, b"I", &mut server, &mut out),
            Action::Forward
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_synthetic_answer_with_nothing_before_it_is_ready_at_once() {
        let (mut server, mut out, mut r) = fixture();
        r.push(Expect::Synthetic(PARSE_COMPLETE), &mut server, &mut out);
        assert_eq!(r.ready, PARSE_COMPLETE);
        assert_eq!(r.outstanding(), 0);
    }

    #[test]
    fn an_error_skips_to_sync_and_undoes_assumed_preparations() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"), None);
        let mut server = ServerStatements::default();
        server.insert(&stmt, 10);
        let mut out = Outcome::default();
        let mut r = Responses::default();
        r.push(Expect::Execute, &mut server, &mut out);
        r.push(
            Expect::InjectedClose("_hx_old".into()),
            &mut server,
            &mut out,
        );
        r.push(Expect::InjectedParse(stmt.clone()), &mut server, &mut out);
        r.push(Expect::Synthetic(PARSE_COMPLETE), &mut server, &mut out);
        r.push(Expect::Sync, &mut server, &mut out);
        let err = error_body("22012", "division by zero");
        assert_eq!(
            r.on_server_message(tag::ERROR_RESPONSE, &err, &mut server, &mut out),
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
            r.on_server_message(tag::READY_FOR_QUERY, b"I", &mut server, &mut out),
            Action::Forward
        );
        assert!(r.is_empty());
    }

    #[test]
    fn replaced_errors_and_stale_plans() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT * FROM t"), None);
        let mut server = ServerStatements::default();
        server.insert(&stmt, 10);
        let old = stmt.server_name();
        let mut out = Outcome::default();
        let mut r = Responses::default();
        r.push(
            Expect::ReplaceError(b"ours".to_vec().into()),
            &mut server,
            &mut out,
        );
        r.push(Expect::Sync, &mut server, &mut out);
        let err = error_body("42601", "syntax error");
        assert_eq!(
            r.on_server_message(tag::ERROR_RESPONSE, &err, &mut server, &mut out),
            Action::Drop
        );
        assert_eq!(r.ready, b"ours");
        r.ready.clear();
        r.on_server_message(tag::READY_FOR_QUERY, b"I", &mut server, &mut out);

        r.push(Expect::Bind(Some(stmt.clone())), &mut server, &mut out);
        r.push(Expect::Sync, &mut server, &mut out);
        let stale = error_body("0A000", "cached plan must not change result type");
        assert_eq!(
            r.on_server_message(tag::ERROR_RESPONSE, &stale, &mut server, &mut out),
            Action::Forward
        );
        assert_ne!(stmt.server_name(), old, "renamed so it is prepared afresh");
        assert!(out.to_close.contains(&old));
    }

    #[test]
    fn messages_after_an_error_before_sync_get_no_answer() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"), None);
        let (mut server, mut out, mut r) = fixture();
        r.push(Expect::Execute, &mut server, &mut out);
        let err = error_body("22012", "division by zero");
        r.on_server_message(tag::ERROR_RESPONSE, &err, &mut server, &mut out);
        // The client's next messages arrive after the error was seen.
        server.insert(&stmt, 10);
        r.push(named_parse(&stmt, "s1", 1), &mut server, &mut out);
        r.push(Expect::Synthetic(PARSE_COMPLETE), &mut server, &mut out);
        r.push(Expect::Execute, &mut server, &mut out);
        assert!(!server.has(&stmt), "a skipped Parse prepares nothing");
        assert!(r.ready.is_empty());
        r.push(Expect::Sync, &mut server, &mut out);
        assert_eq!(r.outstanding(), 1);
        r.on_server_message(tag::READY_FOR_QUERY, b"I", &mut server, &mut out);
        assert!(r.is_empty());
        r.push(Expect::Execute, &mut server, &mut out);
        assert_eq!(r.outstanding(), 1, "after Sync the server answers again");
    }

    #[test]
    fn messages_after_a_sync_already_sent_are_answered_despite_an_error() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"), None);
        let (mut server, mut out, mut r) = fixture();
        r.push(Expect::Execute, &mut server, &mut out);
        r.push(Expect::Sync, &mut server, &mut out);
        r.on_server_message(
            tag::ERROR_RESPONSE,
            &error_body("22012", "division by zero"),
            &mut server,
            &mut out,
        );
        assert!(!r.is_skipping(), "the Sync that ends it is on its way");
        // The next batch, sent before the first batch's ReadyForQuery arrived.
        server.insert(&stmt, 10);
        r.push(named_parse(&stmt, "s1", 1), &mut server, &mut out);
        assert!(server.has(&stmt), "not skipped: the server will run it");
        assert!(out.forgotten.is_empty());
        assert_eq!(r.outstanding(), 2);
    }

    #[test]
    fn shapes_are_learnt_from_injected_describes() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT * FROM t"), None);
        let (mut server, mut out, mut r) = fixture();
        r.push(
            Expect::InjectedDescribe {
                stmt: stmt.clone(),
                client: Some((b"s1".to_vec().into(), 1)),
                check: true,
            },
            &mut server,
            &mut out,
        );
        assert!(r.awaiting_check);
        assert_eq!(
            r.on_server_message(tag::PARAMETER_DESCRIPTION, b"", &mut server, &mut out),
            Action::Drop
        );
        assert_eq!(
            r.on_server_message(tag::ROW_DESCRIPTION, b"two", &mut server, &mut out),
            Action::Drop
        );
        assert!(!r.awaiting_check);
        assert_eq!(out.shapes.len(), 1);
        let told = stmt.shape();
        r.push(
            Expect::InjectedDescribe {
                stmt: stmt.clone(),
                client: None,
                check: false,
            },
            &mut server,
            &mut out,
        );
        r.on_server_message(tag::ROW_DESCRIPTION, b"three", &mut server, &mut out);
        assert_ne!(stmt.shape(), told, "a new shape is learnt");
    }

    fn name(n: &str, serial: u32) -> ClientName {
        (n.as_bytes().into(), serial)
    }

    /// A client's Parse of `stmt` as `n`, preparing it on the connection.
    fn named_parse(stmt: &Rc<Statement>, n: &str, serial: u32) -> Expect {
        Expect::Parse {
            prepares: Some(stmt.clone()),
            client: Some(name(n, serial)),
        }
    }

    #[test]
    fn a_parse_the_server_rejects_or_skips_registers_nothing() {
        let reg = Registry::default();
        let bad = reg.intern(&spec("SELEC 1"), None);
        let good = reg.intern(&spec("SELECT 2"), None);
        let (mut server, mut out, mut r) = fixture();
        server.insert(&bad, 10);
        server.insert(&good, 10);
        r.push(named_parse(&bad, "s1", 1), &mut server, &mut out);
        r.push(named_parse(&good, "s2", 2), &mut server, &mut out);
        r.push(Expect::ParseAnswered(name("s3", 3)), &mut server, &mut out);
        r.push(Expect::Sync, &mut server, &mut out);
        let err = error_body("42601", "syntax error");
        r.on_server_message(tag::ERROR_RESPONSE, &err, &mut server, &mut out);
        assert_eq!(out.forgotten, [name("s1", 1), name("s2", 2), name("s3", 3)]);
        assert!(out.confirmed.is_empty());
        assert!(!server.has(&bad) && !server.has(&good));
        assert!(r.ready.is_empty(), "no ParseComplete for a skipped Parse");
        r.on_server_message(tag::READY_FOR_QUERY, b"I", &mut server, &mut out);
        assert!(r.is_empty());
    }

    #[test]
    fn a_parse_the_server_completes_is_confirmed_in_order() {
        let reg = Registry::default();
        let stmt = reg.intern(&spec("SELECT 1"), None);
        let (mut server, mut out, mut r) = fixture();
        r.push(named_parse(&stmt, "s1", 1), &mut server, &mut out);
        r.push(Expect::ParseAnswered(name("s2", 2)), &mut server, &mut out);
        assert!(out.confirmed.is_empty() && r.ready.is_empty());
        assert_eq!(
            r.on_server_message(tag::PARSE_COMPLETE, b"", &mut server, &mut out),
            Action::Forward
        );
        assert_eq!(out.confirmed, [name("s1", 1), name("s2", 2)]);
        assert_eq!(r.ready, PARSE_COMPLETE);
        // Nothing ahead of it: answered at once.
        r.ready.clear();
        r.push(Expect::ParseAnswered(name("s3", 3)), &mut server, &mut out);
        assert_eq!(out.confirmed.last(), Some(&name("s3", 3)));
        assert_eq!(r.ready, PARSE_COMPLETE);
    }

    #[test]
    fn a_failed_unnamed_parse_is_reported() {
        let (mut server, mut out, mut r) = fixture();
        r.push(
            Expect::Parse {
                prepares: None,
                client: None,
            },
            &mut server,
            &mut out,
        );
        r.push(Expect::Sync, &mut server, &mut out);
        r.on_server_message(
            tag::ERROR_RESPONSE,
            &error_body("42601", "syntax error"),
            &mut server,
            &mut out,
        );
        assert!(out.unnamed_failed);
    }

    #[test]
    fn deallocate_all_is_seen_in_command_complete() {
        let (mut server, mut out, mut r) = fixture();
        r.push(Expect::Query, &mut server, &mut out);
        r.on_server_message(
            tag::COMMAND_COMPLETE,
            b"DEALLOCATE ALL\0",
            &mut server,
            &mut out,
        );
        assert!(out.cleared);
    }
}
