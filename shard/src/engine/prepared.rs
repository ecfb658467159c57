//! Phase: shared prepared statements. Client statement names are mapped to the
//! server-side names of shared statements (preparing them first where this connection
//! lacks them), so a client's statements follow it to every connection it uses; what the
//! server will owe for rewritten messages is queued, and what the SQL does to session
//! state is noted for the settings and pinning phases. Messages that need no change are
//! forwarded as they are (in place).

use std::rc::Rc;

use hashbrown::HashMap;

use crate::codec::backend as be;
use crate::codec::frame::{self, write_parts};
use crate::codec::tag::{fe, field, status, target};
use crate::codec::CodecError;
use crate::prepared::{Shape, Statement};
use crate::sql::route::{analyze, ReadOnlyFunctions, RouteAnalysis};
use crate::sql::Effects;

use super::message::MessageCx;
use super::phase::{ClientAction, Phase};
use super::responses::{ClientName, Expect, Outcome};

/// A Close for a name that never exists: the server answers CloseComplete and nothing
/// else happens (closing a nonexistent statement is not an error).
const NO_SUCH_STATEMENT: &[u8] = b"_hx_none";

/// SQL that always fails to parse: sent in place of a refused statement so the server
/// aborts the batch (and any transaction) exactly as if the refused one had failed.
const ALWAYS_FAILS: &[u8] = b")\0";

/// A valid statement that is not a transaction exit: parsed (unnamed) in a failed
/// transaction, the server rejects it with 25P02 as it would the client's own Parse.
const PROBE_ABORTED: &[u8] = b"SELECT\0\0\0";

/// What one of the client's statement names stands for.
struct ClientEntry {
    stmt: Rc<Statement>,
    /// The result shape the client was told when it prepared the statement.
    shape: Option<Shape>,
    /// Tells this registration of the name from earlier ones.
    serial: u32,
    /// The server has not yet answered the Parse that registered the name.
    pending: bool,
}

/// The client's own statement names and what they stand for. Lives as long as the client.
#[derive(Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, ClientEntry>,
    next_serial: u32,
    /// The client's unnamed statement (Parse body after the name), which PostgreSQL keeps
    /// until the next unnamed Parse or simple Query — possibly across transactions, so
    /// across server connections here. The buffer is reused.
    unnamed: Vec<u8>,
    has_unnamed: bool,
    /// With replay on: how to put the names back as they were when the unit began.
    undo: Option<Vec<Undo>>,
}

/// One change to the client's names during a unit, as what undoes it.
enum Undo {
    /// `name` stood for this (or nothing) before.
    Name(Box<[u8]>, Option<ClientEntry>),
    /// Every name, before they were all dropped.
    All(HashMap<Box<[u8]>, ClientEntry>),
    /// The unnamed statement before the unit changed it.
    Unnamed(Vec<u8>, bool),
}

impl ClientStatements {
    /// Applies what the server's answers settled about the client's names: Parses that
    /// completed or failed, shapes learnt for them, an unnamed Parse that failed. True
    /// when a pending name was settled (a held Parse may go on).
    pub fn settle(&mut self, out: &mut Outcome) -> bool {
        let mut settled = false;
        for (name, serial) in out.confirmed.drain(..) {
            if let Some(entry) = self.entry_mut(&name, serial) {
                entry.pending = false;
                settled = true;
            }
        }
        for (name, serial) in out.forgotten.drain(..) {
            if self.entry_mut(&name, serial).is_some() {
                self.remove(&name);
                settled = true;
            }
        }
        for ((name, serial), stmt) in out.shapes.drain(..) {
            if let Some(entry) = self.entry_mut(&name, serial) {
                if Rc::ptr_eq(&entry.stmt, &stmt) {
                    entry.shape = stmt.shape();
                }
            }
        }
        if std::mem::take(&mut out.unnamed_failed) {
            self.set_unnamed(None);
        }
        settled
    }

    /// A unit begins; with `journaled`, its changes to the names are kept to undo.
    pub fn begin_unit(&mut self, journaled: bool) {
        match (&mut self.undo, journaled) {
            (Some(undo), true) => undo.clear(),
            (undo, true) => *undo = Some(Vec::new()),
            (undo, false) => *undo = None,
        }
    }

    /// Puts every name back as it was when the unit began: a replay re-sends the
    /// unit's Parse and Close messages, which must meet the names they met first.
    pub fn rewind_unit(&mut self) {
        let Some(mut undo) = self.undo.take() else {
            return;
        };
        while let Some(change) = undo.pop() {
            match change {
                Undo::Name(name, Some(entry)) => {
                    self.by_name.insert(name, entry);
                }
                Undo::Name(name, None) => {
                    self.by_name.remove(&name);
                }
                Undo::All(names) => self.by_name = names,
                Undo::Unnamed(spec, has) => {
                    self.unnamed = spec;
                    self.has_unnamed = has;
                }
            }
        }
        self.undo = Some(undo);
    }

    /// Forgets `name`; true when the client had it.
    fn remove(&mut self, name: &[u8]) -> bool {
        let old = self.by_name.remove(name);
        let had = old.is_some();
        if let (Some(undo), Some(old)) = (self.undo.as_mut(), old) {
            undo.push(Undo::Name(name.into(), Some(old)));
        }
        had
    }

    /// Sets the client's unnamed statement (`None`: it has none now).
    fn set_unnamed(&mut self, spec: Option<&[u8]>) {
        if let Some(undo) = self.undo.as_mut() {
            if !undo.iter().any(|u| matches!(u, Undo::Unnamed(..))) {
                undo.push(Undo::Unnamed(self.unnamed.clone(), self.has_unnamed));
            }
        }
        match spec {
            Some(spec) => {
                self.unnamed.clear();
                self.unnamed.extend_from_slice(spec);
                self.has_unnamed = true;
            }
            None => self.has_unnamed = false,
        }
    }

    fn entry_mut(&mut self, name: &[u8], serial: u32) -> Option<&mut ClientEntry> {
        self.by_name
            .get_mut(name)
            .filter(|entry| entry.serial == serial)
    }

    /// Registers `name` for `stmt`, pending until the server answers its Parse.
    fn register(&mut self, name: &[u8], stmt: &Rc<Statement>) -> ClientName {
        self.next_serial = self.next_serial.wrapping_add(1);
        let serial = self.next_serial;
        let old = self.by_name.insert(
            name.into(),
            ClientEntry {
                stmt: stmt.clone(),
                shape: stmt.shape(),
                serial,
                pending: true,
            },
        );
        if let Some(undo) = self.undo.as_mut() {
            undo.push(Undo::Name(name.into(), old));
        }
        (name.into(), serial)
    }

    /// The result shape the client was told when it prepared `name` (its columns as a
    /// RowDescription body), if it was told one.
    pub fn told_shape(&self, name: &[u8]) -> Option<&[u8]> {
        self.by_name.get(name)?.shape.as_deref()
    }

    /// The statement (query text, NUL, parameter types) a Bind of `name` runs.
    pub fn spec(&self, name: &[u8]) -> Option<&[u8]> {
        if name.is_empty() {
            return self.has_unnamed.then_some(&self.unnamed[..]);
        }
        self.by_name.get(name).map(|entry| entry.stmt.spec())
    }

    /// A simple Query the proxy answered itself: it drops the unnamed statement, as the
    /// server would have.
    pub fn answered_query(&mut self) {
        if self.has_unnamed {
            self.set_unnamed(None);
        }
    }

    /// An unnamed Parse the proxy answered itself (with the Bind and Execute after it):
    /// the client's unnamed statement is that one now.
    pub fn answered_unnamed_parse(&mut self, spec: &[u8]) {
        self.set_unnamed(Some(spec));
    }

    /// How the statement a Bind names may be routed: a named one's cached analysis, or
    /// the unnamed one analysed now. `None` for a name the client never prepared.
    pub fn analysis(
        &self,
        name: &[u8],
        functions: &Rc<ReadOnlyFunctions>,
    ) -> Option<Rc<RouteAnalysis>> {
        if name.is_empty() {
            if !self.has_unnamed {
                return None;
            }
            let end = self
                .unnamed
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(self.unnamed.len());
            return Some(Rc::new(analyze(&self.unnamed[..end], functions)));
        }
        self.by_name
            .get(name)
            .map(|entry| entry.stmt.route_analysis(functions))
    }

    /// The SQL text a Bind of `name` ran when the unit began (the undo log remembers
    /// what the unit replaced), if the client had such a statement then.
    pub fn text_at_unit_start(&self, name: &[u8]) -> Option<&[u8]> {
        for change in self.undo.iter().flatten() {
            match change {
                Undo::Name(n, old) if !name.is_empty() && &**n == name => {
                    return old.as_ref().map(|e| e.stmt.query());
                }
                Undo::All(names) if !name.is_empty() => {
                    return names.get(name).map(|e| e.stmt.query());
                }
                Undo::Unnamed(spec, has) if name.is_empty() => {
                    return has.then(|| {
                        let end = spec.iter().position(|&b| b == 0).unwrap_or(spec.len());
                        &spec[..end]
                    });
                }
                _ => {}
            }
        }
        self.text(name)
    }

    /// The SQL text a Bind of the client's statement `name` runs (empty name: its
    /// unnamed statement), if it has one.
    pub fn text(&self, name: &[u8]) -> Option<&[u8]> {
        if name.is_empty() {
            if !self.has_unnamed {
                return None;
            }
            let end = self
                .unnamed
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(self.unnamed.len());
            return Some(&self.unnamed[..end]);
        }
        self.by_name.get(name).map(|entry| entry.stmt.query())
    }

    pub fn clear(&mut self) {
        let names = std::mem::take(&mut self.by_name);
        if let Some(undo) = self.undo.as_mut() {
            undo.push(Undo::All(names));
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The phase (zero-sized: its state is the session's and the connection's).
pub struct SharedStatements;

impl Phase for SharedStatements {
    fn needs_body(&self, m: &MessageCx<'_>, tag: u8) -> bool {
        m.features.shared_statements
            && (matches!(
                tag,
                fe::QUERY | fe::PARSE | fe::BIND | fe::DESCRIBE | fe::CLOSE
            ) || (!m.pending_close.is_empty()
                && matches!(tag, fe::EXECUTE | fe::SYNC | fe::FUNCTION_CALL | fe::FLUSH)))
    }

    fn client_message(
        &self,
        m: &mut MessageCx<'_>,
        msg: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<ClientAction, CodecError> {
        if !m.features.shared_statements {
            return Ok(ClientAction::Forward);
        }
        let tag = msg[0];
        let body = &msg[5..];
        if !m.pending_close.is_empty() {
            m.flush_pending_close(out);
        }
        match tag {
            fe::QUERY => Ok(m.query(body, out)),
            fe::PARSE => m.parse(body, out),
            fe::BIND => m.bind(body, out),
            fe::DESCRIBE => m.describe(body, out),
            fe::CLOSE => m.close(body, out),
            _ => Ok(ClientAction::Forward),
        }
    }
}

impl MessageCx<'_> {
    fn query(&mut self, body: &[u8], out: &mut Vec<u8>) -> ClientAction {
        let sql = body.strip_suffix(b"\0").unwrap_or(body);
        let effects = self.analysis(sql).effects;
        if let Some(refusal) = super::pinning::refusal(self.features, &effects) {
            self.expect(Expect::RefusedQuery(error_bytes("0A000", &refusal)));
            write_parts(out, fe::QUERY, &[ALWAYS_FAILS]);
            return ClientAction::Rewritten;
        }
        if let Some(name) = crate::sql::deallocate_name(sql) {
            if self.client.remove(name.as_slice()) {
                // The client's own name for a shared statement: forgetting the name is
                // all DEALLOCATE means here; the server keeps the plan for others.
                self.responses.unsynced = false;
                self.expect(Expect::SyntheticCommand("DEALLOCATE"));
                return ClientAction::Rewritten;
            }
        }
        self.note(&effects, sql);
        // A simple Query drops the unnamed statement.
        if self.client.has_unnamed {
            self.client.set_unnamed(None);
        }
        // The transaction status is known only with nothing in flight: a request
        // pipelined behind others (a replay's, or a pipelining client's) is left as it is.
        let settled = self.responses.outstanding() == 0;
        if self.features.track_commit
            && settled
            && self.responses.status == status::IDLE
            && is_lone_dml(sql)
        {
            // An autocommit write runs in a block of the proxy's, so that its
            // transaction's id is known before the commit: BEGIN, the write (answered as
            // it is), the id, COMMIT (its ReadyForQuery ends the client's request; an
            // error from it is the client's, as the implicit commit's would be).
            write_parts(out, fe::QUERY, &[b"BEGIN\0"]);
            self.expect(Expect::Silent);
            write_parts(out, fe::QUERY, &[body]);
            self.expect(Expect::QueryInBlock);
            write_parts(out, fe::QUERY, &[XID_QUERY]);
            self.expect(Expect::XidQuery { owes_tag: false });
            write_parts(out, fe::QUERY, &[b"COMMIT\0"]);
            self.expect(Expect::CommitForClient);
            self.notes.commit_sent = true;
            self.responses.unsynced = false;
            return ClientAction::Rewritten;
        }
        if effects.may_commit
            && self.features.track_commit
            && settled
            && self.responses.status == status::IN_TRANSACTION
            && is_plain_commit(sql)
        {
            // Learn the transaction's id before its COMMIT goes out (same round trip): a
            // COMMIT lost in flight is then settled from the new primary's word.
            write_parts(out, fe::QUERY, &[XID_QUERY]);
            self.expect(Expect::XidQuery { owes_tag: true });
            write_parts(out, fe::QUERY, &[body]);
            self.responses.unsynced = false;
            self.expect(Expect::Query);
            return ClientAction::Rewritten;
        }
        ClientAction::Forward
    }

    fn parse(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<ClientAction, CodecError> {
        // The body is interned and replayed on other connections: it must be well formed.
        crate::codec::frontend::decode(fe::PARSE, body)?;
        let (name, spec) = split_cstr(body, "Parse")?;
        if name.is_empty() {
            let sql = split_cstr(spec, "Parse")?.0;
            let effects = self.analysis(sql).effects;
            if let Some(refusal) = super::pinning::refusal(self.features, &effects) {
                self.refuse_extended(&refusal, "0A000", out);
                return Ok(ClientAction::Rewritten);
            }
            self.note(&effects, sql);
            self.client.set_unnamed(Some(spec));
            self.notes.unnamed_here = true;
        }
        if name.is_empty() || self.responses.is_skipping() {
            // The unnamed statement is the client's own on this connection; a named one
            // the server ignores (an earlier message failed) registers nothing, as in
            // PostgreSQL.
            return Ok(ClientAction::Forward);
        }
        match self.client.by_name.get(name) {
            Some(entry) if entry.pending => {
                // Whether the name is taken depends on an answer still to come.
                write_parts(out, fe::FLUSH, &[]);
                self.responses.awaiting_parse = true;
                return Ok(ClientAction::Hold);
            }
            Some(_) => {
                let message = format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(name)
                );
                self.refuse_extended(&message, "42P05", out);
                return Ok(ClientAction::Rewritten);
            }
            None => {}
        }
        let ahead = self.sql.take(self.offset);
        let stmt = self.registry.intern(spec, ahead.map(|a| a.effects));
        if let Some(refusal) = super::pinning::refusal(self.features, &stmt.effects) {
            self.refuse_extended(&refusal, "0A000", out);
            return Ok(ClientAction::Rewritten);
        }
        let client = self.client.register(name, &stmt);
        self.responses.unsynced = true;
        if self.server.has(&stmt) {
            if self.responses.status == status::FAILED && self.responses.outstanding() == 0 {
                // A failed transaction: PostgreSQL refuses the Parse (25P02) and skips to
                // Sync. Let the server say so with a Parse of its own that fails the same
                // way; it replaces the unnamed statement here, which is recreated if the
                // client needs its own.
                write_parts(out, fe::PARSE, &[b"\0", PROBE_ABORTED]);
                self.notes.unnamed_here = false;
                self.expect(Expect::Parse {
                    prepares: None,
                    client: Some(client),
                });
                return Ok(ClientAction::Rewritten);
            }
            self.expect(Expect::ParseAnswered(client));
            return Ok(ClientAction::Rewritten);
        }
        self.make_room(&stmt, out);
        let server_name = stmt.server_name();
        write_parts(
            out,
            fe::PARSE,
            &[server_name.as_bytes(), b"\0", stmt.spec()],
        );
        self.expect(Expect::Parse {
            prepares: Some(stmt.clone()),
            client: Some(client.clone()),
        });
        // Learn the shape the client is being told, so a later change is noticed.
        write_parts(
            out,
            fe::DESCRIBE,
            &[&[target::STATEMENT], server_name.as_bytes(), b"\0"],
        );
        self.expect(Expect::InjectedDescribe {
            stmt,
            client: Some(client),
            check: false,
        });
        Ok(ClientAction::Rewritten)
    }

    fn bind(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<ClientAction, CodecError> {
        let (portal, rest) = split_cstr(body, "Bind")?;
        let (name, rest) = split_cstr(rest, "Bind")?;
        let Some((stmt, told)) = self.lookup(name) else {
            // Unnamed, or unknown: the server answers as PostgreSQL would.
            if name.is_empty() && !self.ensure_unnamed(out) {
                // Whatever unnamed statement this connection has is another client's.
                write_parts(
                    out,
                    fe::BIND,
                    &[portal, b"\0", NO_SUCH_STATEMENT, b"\0", rest],
                );
                self.responses.unsynced = true;
                self.expect(Expect::ReplaceError(error_bytes(
                    "26000",
                    "unnamed prepared statement does not exist",
                )));
                return Ok(ClientAction::Rewritten);
            }
            return Ok(ClientAction::Forward);
        };
        self.responses.unsynced = true;
        if !self.server.has(&stmt) && !self.responses.is_skipping() {
            // Prepare it here and learn its shape before the client's Bind may run.
            self.prepare_here(&stmt, true, out);
            if self.responses.awaiting_check {
                write_parts(out, fe::FLUSH, &[]);
                return Ok(ClientAction::Hold);
            }
        }
        if shape_changed(told.as_ref(), stmt.shape().as_ref()) {
            // The result columns changed since the client prepared this: PostgreSQL's
            // answer (a table dropped and created alike is no change).
            log::debug!(
                "statement {}: result shape changed since the client prepared it",
                stmt.server_name(),
            );
            write_parts(
                out,
                fe::BIND,
                &[portal, b"\0", NO_SUCH_STATEMENT, b"\0", rest],
            );
            self.expect(Expect::ReplaceError(stale_plan_error()));
            return Ok(ClientAction::Rewritten);
        }
        if !stmt.effects.is_plain() {
            self.note(&stmt.effects, stmt.query());
        }
        let server_name = stmt.server_name();
        write_parts(
            out,
            fe::BIND,
            &[portal, b"\0", server_name.as_bytes(), b"\0", rest],
        );
        self.expect(Expect::Bind(Some(stmt)));
        Ok(ClientAction::Rewritten)
    }

    fn describe(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<ClientAction, CodecError> {
        let Some((&kind, rest)) = body.split_first() else {
            return Err(CodecError::malformed("Describe", "missing kind"));
        };
        let (name, _) = split_cstr(rest, "Describe")?;
        let stmt = if kind == target::STATEMENT {
            self.lookup(name)
        } else {
            None
        };
        match stmt {
            Some((stmt, _)) => {
                if !self.server.has(&stmt) && !self.responses.is_skipping() {
                    self.prepare_here(&stmt, false, out);
                }
                let server_name = stmt.server_name();
                write_parts(
                    out,
                    fe::DESCRIBE,
                    &[&[target::STATEMENT], server_name.as_bytes(), b"\0"],
                );
                self.responses.unsynced = true;
                self.expect(Expect::Describe(Some(stmt)));
                Ok(ClientAction::Rewritten)
            }
            None => {
                if kind == target::STATEMENT && name.is_empty() && !self.ensure_unnamed(out) {
                    write_parts(
                        out,
                        fe::DESCRIBE,
                        &[&[target::STATEMENT], NO_SUCH_STATEMENT, b"\0"],
                    );
                    self.responses.unsynced = true;
                    self.expect(Expect::ReplaceError(error_bytes(
                        "26000",
                        "unnamed prepared statement does not exist",
                    )));
                    return Ok(ClientAction::Rewritten);
                }
                Ok(ClientAction::Forward)
            }
        }
    }

    fn close(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<ClientAction, CodecError> {
        let Some((&kind, rest)) = body.split_first() else {
            return Err(CodecError::malformed("Close", "missing kind"));
        };
        let (name, _) = split_cstr(rest, "Close")?;
        if kind == target::STATEMENT && !name.is_empty() {
            // The shared statement stays prepared for others; only the client's name goes.
            self.client.remove(name);
            write_parts(
                out,
                fe::CLOSE,
                &[&[target::STATEMENT], NO_SUCH_STATEMENT, b"\0"],
            );
            self.responses.unsynced = true;
            self.expect(Expect::Close);
            return Ok(ClientAction::Rewritten);
        }
        Ok(ClientAction::Forward)
    }

    fn lookup(&self, name: &[u8]) -> Option<(Rc<Statement>, Option<Shape>)> {
        if name.is_empty() {
            return None;
        }
        self.client
            .by_name
            .get(name)
            .map(|entry| (entry.stmt.clone(), entry.shape.clone()))
    }

    /// Prepares `stmt` on this connection (which lacks it) and learns its result shape;
    /// the answers are the proxy's, not the client's. With `check`, the client's next
    /// message waits for the shape.
    fn prepare_here(&mut self, stmt: &Rc<Statement>, check: bool, out: &mut Vec<u8>) {
        self.make_room(stmt, out);
        let server_name = stmt.server_name();
        write_parts(
            out,
            fe::PARSE,
            &[server_name.as_bytes(), b"\0", stmt.spec()],
        );
        self.expect(Expect::InjectedParse(stmt.clone()));
        write_parts(
            out,
            fe::DESCRIBE,
            &[&[target::STATEMENT], server_name.as_bytes(), b"\0"],
        );
        self.expect(Expect::InjectedDescribe {
            stmt: stmt.clone(),
            client: None,
            check,
        });
    }

    /// Makes sure this connection's unnamed statement is the client's: recreates it when
    /// the client parsed it in an earlier transaction, on another connection. False when
    /// the client has none (any unnamed statement here belongs to someone else).
    fn ensure_unnamed(&mut self, out: &mut Vec<u8>) -> bool {
        if self.notes.unnamed_here || self.responses.is_skipping() {
            return true;
        }
        if !self.client.has_unnamed {
            return false;
        }
        write_parts(out, fe::PARSE, &[b"\0", &self.client.unnamed]);
        self.expect(Expect::InjectedUnnamedParse);
        self.notes.unnamed_here = true;
        true
    }

    /// Records `stmt` as prepared here, closing the least recently used statement when
    /// the connection is at `max_prepared_statements`.
    fn make_room(&mut self, stmt: &Rc<Statement>, out: &mut Vec<u8>) {
        if let Some(victim) = self
            .server
            .insert(stmt, self.features.max_prepared_statements)
        {
            write_parts(
                out,
                fe::CLOSE,
                &[&[target::STATEMENT], victim.as_bytes(), b"\0"],
            );
            self.expect(Expect::InjectedClose(victim));
        }
    }

    pub(super) fn flush_pending_close(&mut self, out: &mut Vec<u8>) {
        for name in std::mem::take(self.pending_close) {
            write_parts(
                out,
                fe::CLOSE,
                &[&[target::STATEMENT], name.as_bytes(), b"\0"],
            );
            self.expect(Expect::InjectedClose(name));
        }
    }

    /// Sends a Parse that fails in place of a refused message; the client gets `message`.
    fn refuse_extended(&mut self, message: &str, code: &str, out: &mut Vec<u8>) {
        write_parts(out, fe::PARSE, &[b"\0", ALWAYS_FAILS, &[0, 0]]);
        self.responses.unsynced = true;
        self.expect(Expect::ReplaceError(error_bytes(code, message)));
    }

    /// Tells the settings and pinning phases what the SQL does to session state; a
    /// statement that drops every prepared statement drops the client's names.
    fn note(&mut self, effects: &Effects, sql: &[u8]) {
        // Should the connection be lost from here on, the outcome may be unknown.
        self.notes.commit_sent |= effects.may_commit;
        super::settings::note(self.notes, effects, sql);
        super::pinning::note(self.notes, effects);
        if effects.drops_prepared {
            // The client's own names go now; the server's set is cleared when the
            // server confirms (CommandComplete).
            self.client.clear();
        }
    }
}

/// The proxy's query for the id of the transaction about to commit (NULL when it wrote
/// nothing, so has none), in the form every supported server knows.
const XID_QUERY: &[u8] = b"SELECT pg_catalog.txid_current_if_assigned()\0";

/// One INSERT, UPDATE, DELETE or MERGE alone in its text (a trailing `;` allowed): in a
/// transaction block it behaves as in its own implicit one (other commands, such as
/// VACUUM, refuse to run in a block).
fn is_lone_dml(sql: &[u8]) -> bool {
    use crate::sql::lexer::{Lexer, Token};
    let mut first = None;
    let mut ended = false;
    for token in Lexer::new(sql) {
        match token {
            Token::Comment(_) => {}
            Token::Semicolon => ended = true,
            _ if ended => return false,
            Token::Word(w) if first.is_none() => first = Some(w.to_ascii_lowercase()),
            _ => {}
        }
    }
    matches!(
        first.as_deref(),
        Some(b"insert" | b"update" | b"delete" | b"merge")
    )
}

/// A COMMIT whose answer is just `COMMIT` with the transaction over: not `AND CHAIN`, not
/// `PREPARE TRANSACTION`, nothing else in the same text.
fn is_plain_commit(sql: &[u8]) -> bool {
    let text = String::from_utf8_lossy(sql).to_ascii_lowercase();
    let words: Vec<&str> = text
        .trim()
        .trim_end_matches(';')
        .split_ascii_whitespace()
        .collect();
    matches!(
        words.as_slice(),
        ["commit"] | ["end"] | ["commit" | "end", "work" | "transaction"]
    )
}

/// True when the client was told one result shape and the statement now has another.
fn shape_changed(told: Option<&Shape>, now: Option<&Shape>) -> bool {
    matches!((told, now), (Some(told), Some(now)) if told != now)
}

/// The error PostgreSQL raises when a prepared statement's result type changed, with the
/// routine name drivers (asyncpg) look for to re-prepare and retry by themselves.
fn stale_plan_error() -> Box<[u8]> {
    let mut out = Vec::with_capacity(128);
    be::write_error_fields(
        &mut out,
        &[
            (field::SEVERITY, b"ERROR"),
            (field::SEVERITY_NONLOCALIZED, b"ERROR"),
            (field::CODE, b"0A000"),
            (field::MESSAGE, b"cached plan must not change result type"),
            (field::FILE, b"plancache.c"),
            (field::ROUTINE, b"RevalidateCachedQuery"),
        ],
    );
    out.into_boxed_slice()
}

fn error_bytes(code: &str, message: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(message.len() + 32);
    be::write_error(&mut out, "ERROR", code, message);
    out.into_boxed_slice()
}

/// Splits a NUL-terminated string off the front of `bytes`, or says which message lacks it.
fn split_cstr<'a>(bytes: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), CodecError> {
    frame::split_cstr(bytes).ok_or(CodecError::malformed(what, "missing string terminator"))
}

#[cfg(test)]
mod tests {
    use super::is_plain_commit;

    #[test]
    fn only_a_lone_write_gets_the_id_query_appended() {
        use super::is_lone_dml;
        for sql in [
            "INSERT INTO t VALUES (1)",
            "update t set a = 1;",
            "/* c */ DELETE FROM t",
        ] {
            assert!(is_lone_dml(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "INSERT INTO t VALUES (1); SELECT 1",
            "VACUUM t",
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
        ] {
            assert!(!is_lone_dml(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn only_a_lone_commit_is_tracked() {
        for sql in [
            "COMMIT",
            "commit;",
            "  END  ",
            "COMMIT WORK",
            "end transaction;",
        ] {
            assert!(is_plain_commit(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "COMMIT AND CHAIN",
            "PREPARE TRANSACTION 'x'",
            "COMMIT; BEGIN",
            "ROLLBACK",
            "COMMIT PREPARED 'x'",
        ] {
            assert!(!is_plain_commit(sql.as_bytes()), "{sql}");
        }
    }
}
