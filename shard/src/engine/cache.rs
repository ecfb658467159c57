//! Phase: the query result cache (see [`crate::cache`]).
//!
//! - unit start: a lone simple Query that only reads, outside a transaction, whose
//!   shape the catalog has cleared, is answered from the shard's store when a fresh
//!   result is there; otherwise the unit notes the epochs of its tables and collects
//!   the answer as it streams to the client.
//! - each client message: a statement that may write adds what it reaches to the
//!   unit's invalidations (a shape not yet resolved reaches everything, once).
//! - each server message: the answer is collected; a write's CommandComplete and the
//!   ReadyForQuery move the epochs before the client sees them.
//! - unit done: a complete answer is stored if no epoch moved meanwhile, and shapes
//!   seen for the first time are resolved on the unit's (idle) connection.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::BackendError;
use crate::bus::ShardMsg;
use crate::cache::key::{self, KeyBuilder};
use crate::cache::l2;
use crate::cache::normalize::{self, Lifted, Param};
use crate::cache::resolve::{self, Learning, Reach, Resolved};
use crate::cache::shard::{ShardCache, Tier};
use crate::cache::store::Entry;
use crate::cache::writes::{self, Writes};
use crate::codec::backend as be;
use crate::codec::error::CodecError;
use crate::codec::frame::{split_cstr, split_message};
use crate::codec::tag::{be as server, fe, status};
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::sql::{analyze, Pins, ReadOnlyFunctions, RouteAnalysis};

use super::message::MessageCx;
use super::phase::{ClientAction, Phase, Ready, Start, Wire};
use super::session::Session;
use super::unit::{Analysis, Unit};

pub struct ResultCache;

/// Shapes one unit may resolve once it is done (each costs a round trip).
const MAX_LEARNED_PER_UNIT: usize = 4;

/// Answers keyed apart: a simple Query's, and an extended-protocol execution's with and
/// without a RowDescription.
const SIMPLE_QUERY: u8 = 0;
const EXTENDED: u8 = 1;
const EXTENDED_DESCRIBED: u8 = 2;
/// L3 keys (answers with a RowDescription and text results).
const NORMALIZED: u8 = 3;

/// An Execute of every row (what a simple Query runs).
const EXECUTE_ALL: &[u8] = &[0, 0, 0, 0, 0];

/// The unit's cache work.
#[derive(Default)]
pub struct CacheUnit {
    /// The shard while its cache is enabled (else every point is one branch).
    ctx: Option<Rc<ShardCtx>>,
    shard: Option<Rc<ShardCache>>,
    functions: Option<Rc<ReadOnlyFunctions>>,
    /// Database, user and settings of the session (see [`key::session_fingerprint`]).
    session: u64,
    database: Option<Rc<str>>,
    fill: Option<Box<Fill>>,
    writes: Writes,
    /// Statement shapes to resolve once the unit is done.
    learn: Vec<(u64, Rc<RouteAnalysis>, Learning)>,
    /// The unit runs on a standby or replica: what it reads is not stored.
    from_read_node: bool,
    /// Reads may be answered and stored for this session (see `Session::cache_bypass`,
    /// and sessions whose statements and settings the proxy does not keep).
    reads: bool,
    /// The proxy keeps the session's settings and statements: a write's names resolve
    /// as the learned shapes say, and a Bind's statement is known.
    tracked: bool,
    /// `standard_conforming_strings = off`: the text cannot be read reliably, so every
    /// statement counts as a write that reaches everything.
    unreadable_text: bool,
    /// The session made state that hides names or changes who it is (carried to the
    /// session at the unit's end).
    bypass_from_now: bool,
    /// The session's transactions are READ COMMITTED unless they say otherwise.
    read_committed: bool,
    /// A `BEGIN READ ONLY` (READ COMMITTED) went to the server ...
    read_only_begun: bool,
    /// ... and the server is in that transaction: its reads see each statement's own
    /// snapshot, and no write can precede them, so they may be cached as outside one.
    in_read_only: bool,
}

impl CacheUnit {
    pub fn reset(&mut self) {
        self.ctx = None;
        self.shard = None;
        self.database = None;
        self.functions = None;
        self.fill = None;
        self.writes.clear();
        self.learn.clear();
        self.from_read_node = false;
        self.reads = false;
        self.tracked = false;
        self.unreadable_text = false;
        self.bypass_from_now = false;
        self.read_only_begun = false;
        self.in_read_only = false;
    }

    /// Applies the writes the unit owes now: a unit that ends without the server's last
    /// word (its connection lost, its COMMIT settled from elsewhere) may have committed.
    pub fn flush_writes(&mut self) {
        if let Some(shard) = self.shard.as_ref() {
            if !self.writes.is_empty() {
                self.writes.apply(&shard.epochs);
                self.writes.clear();
            }
        }
    }

    /// The answer is being collected: the pump must hand over rows and notices.
    pub fn wants_rows(&self) -> bool {
        self.fill
            .as_ref()
            .is_some_and(|f| f.state == FillState::Collecting)
    }

    fn note_learn(&mut self, shape: u64, analysis: Rc<RouteAnalysis>, sql: &[u8]) {
        if self.learn.len() < MAX_LEARNED_PER_UNIT
            && !self.learn.iter().any(|(s, _, _)| *s == shape)
        {
            self.learn.push((shape, analysis, Learning::of(sql)));
        }
    }

    /// A statement that may write is on its way to the server.
    fn note_write(&mut self, sql: &[u8], analysis: Rc<RouteAnalysis>, settings_touched: bool) {
        let Some(shard) = self.shard.clone() else {
            return;
        };
        // Whatever the transaction was, it is not a read-only one the cache may answer in
        // any more (SET TRANSACTION, SET LOCAL, a write).
        self.in_read_only = false;
        self.read_only_begun = false;
        if !analysis.dml_only {
            match writes::reach(sql) {
                writes::Reach::Nothing if analysis.data_writes => self.writes.everything = true,
                writes::Reach::Nothing => {}
                writes::Reach::Everything => self.writes.everything = true,
                writes::Reach::Catalog => self.writes.catalog = true,
            }
            return;
        }
        if settings_touched || !self.tracked {
            // Its names may resolve differently under the settings this unit changed.
            self.writes.everything = true;
            return;
        }
        let shape = key::shape(sql);
        match shard.resolution(self.session, shape) {
            Some(resolved) => match &resolved.writes {
                Reach::Tables(slots) => self.writes.add(slots),
                Reach::Everything => self.writes.everything = true,
            },
            None => {
                // Not resolved yet: everything goes this once.
                self.writes.everything = true;
                self.note_learn(shape, analysis, sql);
            }
        }
    }
}

/// An answer being collected for the store.
struct Fill {
    key: u128,
    /// The L3 key, when the answer may be shared by other spellings of the statement.
    normalized: Option<u128>,
    deps: Box<[(u32, u64)]>,
    global: u64,
    ttl: Option<Duration>,
    bytes: Vec<u8>,
    rows_at: Option<usize>,
    completed: bool,
    limit: usize,
    state: FillState,
    /// The transaction status the answer's ReadyForQuery must carry (`I`, or `T` inside a
    /// read-only transaction).
    status: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FillState {
    Collecting,
    /// The whole answer is in.
    Done,
    /// Not cacheable after all (an error, a notice, too large, …).
    Dropped,
}

impl Fill {
    fn on_message(&mut self, tag: u8, body: &[u8]) {
        if self.state != FillState::Collecting {
            return;
        }
        match tag {
            server::ROW_DESCRIPTION if self.rows_at.is_none() => {
                self.append(tag, body);
                self.rows_at = Some(self.bytes.len());
            }
            server::DATA_ROW if self.rows_at.is_some() && !self.completed => self.append(tag, body),
            // The statement's end, or (Execute with a row limit) the portal's pause.
            server::COMMAND_COMPLETE | server::PORTAL_SUSPENDED
                if self.rows_at.is_some() && !self.completed =>
            {
                self.append(tag, body);
                self.completed = true;
            }
            server::READY_FOR_QUERY => {
                let as_expected = body.first() == Some(&self.status);
                self.state = if self.completed && as_expected {
                    FillState::Done
                } else {
                    FillState::Dropped
                };
            }
            // Reported as they go by, not part of the result; and the extended
            // protocol's acknowledgements, which a hit writes itself.
            server::PARAMETER_STATUS
            | server::NOTIFICATION_RESPONSE
            | server::PARSE_COMPLETE
            | server::BIND_COMPLETE => {}
            _ => self.drop_answer(),
        }
    }

    fn append(&mut self, tag: u8, body: &[u8]) {
        if self.bytes.len() + 5 + body.len() > self.limit {
            self.drop_answer();
            return;
        }
        self.bytes.push(tag);
        self.bytes
            .extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        self.bytes.extend_from_slice(body);
    }

    fn drop_answer(&mut self) {
        self.state = FillState::Dropped;
        self.bytes = Vec::new();
    }
}

/// Starts the unit's cache work (every unit, so writes are seen however the unit began).
pub fn begin_unit(ctx: &Rc<ShardCtx>, s: &Session, unit: &mut Unit) {
    if !ctx.cache.enabled() {
        return;
    }
    let work = &mut unit.cache;
    work.ctx = Some(ctx.clone());
    work.shard = Some(ctx.cache.clone());
    work.database = Some(s.home.key.database.clone());
    let setting = |wanted: &str| {
        s.startup
            .iter()
            .chain(s.settings.iter())
            .rfind(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| value.as_str())
    };
    work.tracked = s.features.shared_statements && s.features.follow_settings;
    work.unreadable_text =
        setting("standard_conforming_strings").is_some_and(|v| v.eq_ignore_ascii_case("off"));
    work.reads = work.tracked && !work.unreadable_text && !s.cache_bypass;
    work.functions = Some(ctx.read_only_functions.borrow().clone());
    work.session = key::session_fingerprint(
        &s.home.key.database,
        &s.user.server_user,
        &s.startup,
        &s.settings,
    );
    // READ COMMITTED by the server's default (learned with the catalog) and the session's.
    work.read_committed = ctx.cache.read_committed(work.session) == Some(true)
        && setting("default_transaction_isolation").is_none_or(|v| {
            v.eq_ignore_ascii_case("read committed") || v.eq_ignore_ascii_case("read uncommitted")
        });
}

/// The SQL text of a Query or Parse message (`msg` with its header), or of the
/// statement a Bind names.
fn statement_text<'m>(
    msg: &'m [u8],
    client: &'m super::prepared::ClientStatements,
) -> Option<&'m [u8]> {
    let body = msg.get(5..)?;
    let cstr = |b: &'m [u8]| {
        b.iter()
            .position(|&c| c == 0)
            .map(|end| (&b[..end], &b[end + 1..]))
    };
    match msg[0] {
        fe::QUERY => cstr(body).map(|(sql, _)| sql),
        fe::PARSE => {
            let (_, rest) = cstr(body)?;
            cstr(rest).map(|(sql, _)| sql)
        }
        fe::BIND => {
            let (_, rest) = cstr(body)?;
            let (name, _) = cstr(rest)?;
            client.text(name)
        }
        _ => None,
    }
}

/// A request the cache may answer: a lone simple Query, or one extended-protocol
/// execution of a statement ([unnamed Parse] Bind [Describe portal] Execute Sync).
struct Candidate<'a> {
    /// The statement's SQL text.
    sql: &'a [u8],
    /// Simple: the text. Extended: text, NUL, parameter types (the Parse body after
    /// its name).
    spec: &'a [u8],
    /// The Bind body after its portal and statement names: parameter formats and
    /// values, result formats.
    bind: Option<&'a [u8]>,
    /// The Execute body: the unnamed portal and how many rows it asks for (0: all).
    execute: &'a [u8],
    /// The statement a Bind names ("" for the unnamed one).
    statement: &'a [u8],
    /// The unnamed Parse's body (after its name), when the request starts with one.
    parse: Option<&'a [u8]>,
    /// A Describe of the portal: the answer carries the RowDescription.
    describe: bool,
    /// The columns the client was told when it prepared the named statement it binds:
    /// after DDL a result of another shape must not reach it (PostgreSQL says `cached
    /// plan must not change result type`).
    told: &'a [u8],
    /// Bytes of the request the answer covers.
    len: usize,
}

impl<'a> Candidate<'a> {
    fn read(request: &'a [u8], statements: &'a super::prepared::ClientStatements) -> Option<Self> {
        let mut rest = request;
        let mut next = || -> Option<(u8, &'a [u8])> {
            let (tag, body, len) = split_message(rest, usize::MAX >> 1).ok()??;
            rest = &rest[len..];
            Some((tag, body))
        };
        let (tag, body) = next()?;
        if tag == fe::QUERY {
            let (sql, _) = split_cstr(body)?;
            return Some(Candidate {
                sql,
                spec: sql,
                bind: None,
                execute: b"",
                statement: b"",
                parse: None,
                describe: true,
                told: b"",
                len: request.len() - rest.len(),
            });
        }
        let (mut tag, mut body) = (tag, body);
        let mut parse = None;
        if tag == fe::PARSE {
            let (name, spec) = split_cstr(body)?;
            if !name.is_empty() {
                // A named statement is registered by the prepared-statement phase.
                return None;
            }
            parse = Some(spec);
            (tag, body) = next()?;
        }
        if tag != fe::BIND {
            return None;
        }
        let (portal, after_portal) = split_cstr(body)?;
        let (statement, bind) = split_cstr(after_portal)?;
        if !portal.is_empty() || (parse.is_some() && !statement.is_empty()) {
            return None;
        }
        let spec = match parse {
            Some(spec) => spec,
            None => statements.spec(statement)?,
        };
        let told = if statement.is_empty() {
            &[][..]
        } else {
            statements.told_shape(statement).unwrap_or_default()
        };
        let (sql, _) = split_cstr(spec)?;
        let (mut tag, mut body) = next()?;
        let mut describe = false;
        if tag == fe::DESCRIBE {
            if body != b"P\0" {
                return None;
            }
            describe = true;
            (tag, body) = next()?;
        }
        // Execute the unnamed portal (up to some rows, or all), then Sync.
        if tag != fe::EXECUTE || body.len() != 5 || body[0] != 0 {
            return None;
        }
        let execute = body;
        let (tag, _) = next()?;
        if tag != fe::SYNC {
            return None;
        }
        Some(Candidate {
            sql,
            spec,
            bind: Some(bind),
            execute,
            statement,
            parse,
            describe,
            told,
            len: request.len() - rest.len(),
        })
    }

    fn key(&self, session: u64) -> u128 {
        let protocol = match (self.bind.is_some(), self.describe) {
            (false, _) => SIMPLE_QUERY,
            (true, true) => EXTENDED_DESCRIBED,
            (true, false) => EXTENDED,
        };
        KeyBuilder::new(session, protocol)
            .part(self.spec)
            .part(self.bind.unwrap_or_default())
            .part(self.execute)
            .part(self.told)
            .finish()
    }

    /// The L3 key: the normalized statement with its lifted values. `None` when the
    /// request does not qualify (binary parameters or results, a reference past the
    /// bound parameters).
    fn normalized_key(&self, session: u64) -> Option<u128> {
        let mut params: Vec<Param<'_>> = Vec::new();
        if let Some(bind) = self.bind {
            read_text_params(self.spec, bind, &mut params)?;
        }
        let mut text = Vec::with_capacity(self.sql.len());
        let mut values: Vec<Lifted<'_>> = Vec::new();
        if !normalize::normalize(self.sql, &params, &mut text, &mut values) {
            return None;
        }
        let mut key = KeyBuilder::new(session, NORMALIZED).part(&text);
        for value in &values {
            key = key.part(&value.type_oid.to_le_bytes());
            key = match value.value {
                Some(v) => key.part(b"v").part(v),
                None => key.part(b"n"),
            };
        }
        let execute = if self.bind.is_some() {
            self.execute
        } else {
            EXECUTE_ALL
        };
        Some(key.part(execute).finish())
    }

    fn answer_shape(&self) -> AnswerShape {
        AnswerShape {
            parse_complete: self.parse.is_some(),
            bind_complete: self.bind.is_some(),
            row_description: self.describe,
        }
    }
}

/// The bound parameters of `bind` with the types `spec` declares, when every
/// parameter and every result column is in text format.
fn read_text_params<'a>(spec: &'a [u8], bind: &'a [u8], out: &mut Vec<Param<'a>>) -> Option<()> {
    let (_, types) = split_cstr(spec)?;
    let declared = |i: usize| -> u32 {
        let count = types
            .first_chunk::<2>()
            .map_or(0, |n| i16::from_be_bytes(*n).max(0) as usize);
        if i >= count {
            return normalize::UNKNOWN;
        }
        types
            .get(2 + i * 4..6 + i * 4)
            .map_or(normalize::UNKNOWN, |b| {
                u32::from_be_bytes([b[0], b[1], b[2], b[3]])
            })
    };
    let mut at = 0usize;
    let i16_at = |at: &mut usize| -> Option<i16> {
        let v = i16::from_be_bytes(*bind.get(*at..*at + 2)?.first_chunk::<2>()?);
        *at += 2;
        Some(v)
    };
    let formats = i16_at(&mut at)?.max(0) as usize;
    for _ in 0..formats {
        if i16_at(&mut at)? != 0 {
            return None;
        }
    }
    let count = i16_at(&mut at)?.max(0) as usize;
    for i in 0..count {
        let len = i32::from_be_bytes(*bind.get(at..at + 4)?.first_chunk::<4>()?);
        at += 4;
        let value = if len < 0 {
            None
        } else {
            let v = bind.get(at..at + len as usize)?;
            at += len as usize;
            Some(v)
        };
        out.push((declared(i), value));
    }
    let results = i16_at(&mut at)?.max(0) as usize;
    for _ in 0..results {
        if i16_at(&mut at)? != 0 {
            return None;
        }
    }
    Some(())
}

/// Which messages around the cached result the client's request asks for.
#[derive(Clone, Copy)]
struct AnswerShape {
    parse_complete: bool,
    bind_complete: bool,
    row_description: bool,
}

impl AnswerShape {
    fn answer(self, entry: &Entry, transaction_status: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(entry.bytes.len() + 16);
        if self.parse_complete {
            out.extend_from_slice(&[server::PARSE_COMPLETE, 0, 0, 0, 4]);
        }
        if self.bind_complete {
            out.extend_from_slice(&[server::BIND_COMPLETE, 0, 0, 0, 4]);
        }
        let from = if self.row_description {
            0
        } else {
            entry.rows_at
        };
        out.extend_from_slice(&entry.bytes[from..]);
        be::write_ready_for_query(&mut out, transaction_status);
        out
    }
}

/// Whether a transaction's opening text asks for REPEATABLE READ (SERIALIZABLE is in the
/// routing analysis already).
fn mentions_repeatable_read(sql: &[u8]) -> bool {
    sql.windows(10)
        .any(|w| w.eq_ignore_ascii_case(b"repeatable"))
}

/// A lone Query inside a READ COMMITTED read-only transaction, with nothing in flight: a
/// fresh L1 or L3 result answers it (ReadyForQuery `T`); else its answer is collected.
fn in_read_only_transaction(
    m: &mut MessageCx<'_>,
    msg: &[u8],
    analysis: &RouteAnalysis,
) -> ClientAction {
    let (Some(shard), Some(ctx)) = (m.cache.shard.clone(), m.cache.ctx.clone()) else {
        return ClientAction::Forward;
    };
    let Some(candidate) = Candidate::read(msg, m.client) else {
        return ClientAction::Forward;
    };
    let session = m.cache.session;
    let Some(resolved) = shard.resolution(session, key::shape(candidate.sql)) else {
        return ClientAction::Forward;
    };
    if !resolved.readable || resolved.refusal.is_some() {
        return ClientAction::Forward;
    }
    let key = candidate.key(session);
    let epochs = &shard.epochs;
    let tiers = &ctx.stats.cache_tiers;
    let normalized = (!resolved.reads.is_empty())
        .then(|| candidate.normalized_key(session))
        .flatten();
    let hit = match shard.store(Tier::L1).fresh(key, epochs) {
        Some(entry) => Some((entry, Tier::L1)),
        None => {
            tiers[Tier::L1 as usize].misses.inc();
            normalized
                .and_then(|n| shard.store(Tier::L3).fresh(n, epochs))
                .map(|entry| (entry, Tier::L3))
        }
    };
    if let Some((entry, tier)) = hit {
        // (The statistics phase counts the Query as it goes by.)
        tiers[tier as usize].hits.inc();
        let answer = candidate
            .answer_shape()
            .answer(&entry, status::IN_TRANSACTION);
        m.responses.ready.extend_from_slice(&answer);
        m.client.answered_query();
        return ClientAction::Rewritten;
    }
    ctx.stats.cache_misses.inc();
    let database = m.cache.database.clone().unwrap_or_else(|| Rc::from(""));
    if m.cache.fill.is_none() && shard.may_fill(&database) {
        let mut fill = start_fill(&shard, &resolved, analysis.cache_ttl, key, true);
        fill.normalized = normalized;
        fill.status = status::IN_TRANSACTION;
        m.cache.fill = Some(Box::new(fill));
    }
    ClientAction::Forward
}

/// Whether a statement's kind may be cached at all: one statement that only reads
/// (unless a function it calls writes, which the catalog settles).
fn cacheable_kind(analysis: &RouteAnalysis) -> bool {
    analysis.reads_but_for_calls && analysis.dml_only && analysis.statements == 1
}

/// Whether the text may carry a hint (`helios:…` or `/*+ … */`) in a comment.
fn has_hint(sql: &[u8]) -> bool {
    sql.windows(3).any(|w| w == b"/*+")
        || sql.windows(7).any(|w| w.eq_ignore_ascii_case(b"helios:"))
}

/// The routing analysis of the candidate's statement (made once per text).
fn candidate_analysis(s: &Session, u: &mut Unit, c: &Candidate<'_>) -> Rc<RouteAnalysis> {
    if let Some(route) = u.sql.take(u.position).and_then(|a| a.route) {
        return route;
    }
    let functions = s.ctx.read_only_functions.borrow().clone();
    if c.parse.is_none() && c.bind.is_some() {
        if let Some(route) = s.statements.analysis(c.statement, &functions) {
            return route;
        }
    }
    let route = Rc::new(analyze(c.sql, &functions));
    u.sql.push(
        u.position,
        Analysis {
            effects: crate::sql::classify(c.sql),
            route: Some(route.clone()),
        },
    );
    route
}

impl Phase for ResultCache {
    async fn unit_start(&self, s: &mut Session, u: &mut Unit, request: &[u8]) -> Start {
        let Some(shard) = u.cache.shard.clone() else {
            return Start::Continue;
        };
        // Only outside a transaction, on a session whose settings and statements the
        // proxy keeps.
        if !u.cache.reads
            || s.held
                .as_ref()
                .is_some_and(|h| h.lease.status != status::IDLE)
        {
            return Start::Continue;
        }
        let Some(candidate) = Candidate::read(request, &s.statements) else {
            return Start::Continue;
        };
        let stats = &s.ctx.stats;
        let shape = key::shape(candidate.sql);
        let resolved = shard.resolution(u.cache.session, shape);
        // Hints live in comments, which the shape leaves out; without any, a shape the
        // catalog already cleared needs no analysis of its own.
        let hinted = has_hint(candidate.sql);
        let mut ttl_hint = None;
        if hinted || resolved.is_none() {
            let analysis = candidate_analysis(s, u, &candidate);
            // (A call to a function not known to be read-only is settled by the catalog:
            // only immutable ones are cached.)
            if !cacheable_kind(&analysis) || analysis.cache_skip {
                return Start::Continue;
            }
            ttl_hint = analysis.cache_ttl;
            if resolved.is_none() {
                stats.cache_misses.inc();
                u.cache.note_learn(shape, analysis, candidate.sql);
                return Start::Continue;
            }
        }
        let Some(resolved) = resolved else {
            return Start::Continue;
        };
        if !resolved.readable {
            // A shape learned from a write: never answered from the cache.
            return Start::Continue;
        }
        if resolved.refusal.is_some() {
            stats.cache_uncacheable.inc();
            return Start::Continue;
        }
        let key = candidate.key(u.cache.session);
        // A statement that reads no table keeps its constants: `SELECT 'x'` and an untyped
        // `SELECT $1` are not the same statement.
        let normalizable = !resolved.reads.is_empty();
        let session = u.cache.session;
        let normalized = || {
            normalizable
                .then(|| candidate.normalized_key(session))
                .flatten()
        };
        let (hit, normalized) = lookup(&s.ctx, &shard, key, normalized, candidate.told).await;
        if let Some((entry, tier)) = hit {
            stats.cache_tiers[tier as usize].hits.inc();
            stats.queries.inc();
            let answer = candidate.answer_shape().answer(&entry, status::IDLE);
            let len = candidate.len;
            let simple = candidate.bind.is_none();
            // The client's unnamed statement is what the server's would have been.
            if simple {
                s.statements.answered_query();
            } else if let Ok(Some((fe::PARSE, body, _))) = split_message(request, usize::MAX >> 1) {
                if let Some((_, spec)) = split_cstr(body) {
                    s.statements.answered_unnamed_parse(spec);
                }
            }
            return Start::Answer(answer, len);
        }
        stats.cache_misses.inc();
        shard.publish(stats);
        if !shard.may_fill(&s.home.key.database) {
            // Its WAL follower is not streaming yet: a write made directly on the server
            // now would go unseen.
            return Start::Continue;
        }
        let mut fill = start_fill(&shard, &resolved, ttl_hint, key, candidate.describe);
        fill.normalized = normalized.filter(|_| candidate.describe);
        u.cache.fill = Some(Box::new(fill));
        Start::Continue
    }

    /// A read that runs on a standby or replica is stored only when that node has
    /// replayed every write that moved its tables' epochs before it started.
    async fn after_acquire(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Ready {
        if u.cache.shard.is_none() {
            return Ready::Go;
        }
        u.cache.from_read_node = u.on_read_node;
        if !u.on_read_node {
            return Ready::Go;
        }
        let Some(fill) = u.cache.fill.as_ref() else {
            return Ready::Go;
        };
        let node = backend.pool().key.node.clone();
        let replayed = s
            .ctx
            .nodes
            .borrow()
            .iter()
            .find(|n| n.address == node)
            .and_then(|n| n.replay_lsn);
        let slots: Vec<u32> = fill.deps.iter().map(|&(slot, _)| slot).collect();
        let holds = match (u.cache.shard.as_ref(), replayed) {
            (Some(shard), Some(replayed)) => shard.epochs.replica_has_writes(&slots, replayed),
            _ => false,
        };
        if holds {
            u.cache.from_read_node = false;
        } else {
            u.cache.fill = None;
        }
        Ready::Go
    }

    fn needs_body(&self, m: &MessageCx<'_>, tag: u8) -> bool {
        m.cache.shard.is_some()
            && matches!(tag, fe::QUERY | fe::PARSE | fe::BIND | fe::FUNCTION_CALL)
    }

    fn client_message(
        &self,
        m: &mut MessageCx<'_>,
        msg: &[u8],
        _out: &mut Vec<u8>,
    ) -> Result<ClientAction, CodecError> {
        if m.cache.shard.is_none() {
            return Ok(ClientAction::Forward);
        }
        match msg.first() {
            Some(&(fe::QUERY | fe::PARSE | fe::BIND)) => {}
            // A function called by its oid: anything may change.
            Some(&fe::FUNCTION_CALL) => {
                m.cache.writes.everything = true;
                return Ok(ClientAction::Forward);
            }
            _ => return Ok(ClientAction::Forward),
        }
        if m.cache.unreadable_text {
            m.cache.writes.everything = true;
            return Ok(ClientAction::Forward);
        }
        let ahead = m.sql.take(m.offset).and_then(|a| a.route);
        let Some(sql) = statement_text(msg, m.client) else {
            if msg[0] == fe::BIND && !m.cache.tracked {
                // The statement was prepared where the proxy did not keep it: it may
                // write anything.
                m.cache.writes.everything = true;
            }
            return Ok(ClientAction::Forward);
        };
        let (analysis, effects) = match ahead {
            Some(route) => (route, m.sql.take(m.offset).map(|a| a.effects)),
            None => match m.cache.functions.as_ref() {
                Some(functions) => (Rc::new(analyze(sql, functions)), None),
                None => return Ok(ClientAction::Forward),
            },
        };
        let effects = effects.unwrap_or_else(|| crate::sql::classify(sql));
        if effects.pins.contains(Pins::TEMP_TABLE)
            || effects.pins.contains(Pins::SESSION_AUTHORIZATION)
        {
            // Names may now mean the session's own tables, or the session is someone
            // else: none of its reads are answered from the cache from here on.
            m.cache.bypass_from_now = true;
            m.cache.reads = false;
        }
        if !analysis.read_only {
            m.cache.note_write(sql, analysis, m.notes.settings_touched);
            return Ok(ClientAction::Forward);
        }
        if analysis.begins_transaction {
            // A READ ONLY transaction opened from outside one, READ COMMITTED.
            m.cache.read_only_begun = analysis.read_only_transaction
                && m.responses.status == status::IDLE
                && !analysis.serializable
                && !mentions_repeatable_read(sql)
                && m.cache.read_committed
                && m.cache.reads;
            return Ok(ClientAction::Forward);
        }
        if m.cache.in_read_only
            && m.cache.reads
            && !m.notes.settings_touched
            && msg[0] == fe::QUERY
            && m.responses.status == status::IN_TRANSACTION
            && m.responses.outstanding() == 0
            && m.responses.ready.is_empty()
            && !m.responses.unsynced
            && cacheable_kind(&analysis)
            && !analysis.cache_skip
        {
            return Ok(in_read_only_transaction(m, msg, &analysis));
        }
        Ok(ClientAction::Forward)
    }

    fn server_message(&self, w: &mut Wire<'_>, tag: u8, body: &[u8]) {
        let work = &mut *w.cache;
        let Some(shard) = work.shard.as_ref() else {
            return;
        };
        if !w.forwarded {
            return;
        }
        if tag == server::READY_FOR_QUERY {
            match body.first() {
                Some(&status::IN_TRANSACTION) if work.read_only_begun => {
                    work.read_only_begun = false;
                    work.in_read_only = true;
                }
                Some(&status::IN_TRANSACTION) => {}
                _ => {
                    work.read_only_begun = false;
                    work.in_read_only = false;
                }
            }
        }
        // A write's epochs move first: a result collected in the same transaction as a
        // write is then found stale and not stored.
        if !work.writes.is_empty() {
            match tag {
                // A write completed (or, in extended protocol, is about to commit):
                // results read so far are stale before the client hears of it.
                server::COMMAND_COMPLETE => {
                    work.writes.apply(&shard.epochs);
                    w.stats.cache_invalidations.inc();
                }
                server::READY_FOR_QUERY => {
                    work.writes.apply(&shard.epochs);
                    w.stats.cache_invalidations.inc();
                    if body.first() == Some(&status::IDLE) {
                        // The transaction is over: its writes are all accounted for.
                        work.writes.clear();
                    }
                }
                _ => {}
            }
        }
        if let Some(fill) = work.fill.as_mut() {
            fill.on_message(tag, body);
            if fill.state != FillState::Collecting {
                let fill = work.fill.take().expect("a fill");
                if let Some(ctx) = work.ctx.as_ref() {
                    store_fill(ctx, shard, *fill, work.from_read_node);
                }
            }
        }
    }

    async fn unit_done(
        &self,
        s: &mut Session,
        u: &mut Unit,
        backend: &mut Lease,
    ) -> Result<(), BackendError> {
        let Some(shard) = u.cache.shard.clone() else {
            return Ok(());
        };
        // (A complete answer was stored at its ReadyForQuery; one still collecting now
        // never completed.)
        u.cache.fill = None;
        if u.cache.bypass_from_now {
            s.cache_bypass = true;
        }
        if u.cache.learn.is_empty() || backend.status != status::IDLE || u.notes.settings_touched {
            return Ok(());
        }
        let learn = std::mem::take(&mut u.cache.learn);
        let config = shard.config();
        let mut buf = s.ctx.bufs.take();
        for (shape, analysis, learning) in learn {
            let catalog = shard.epochs.catalog();
            let found = Box::pin(resolve::resolve(
                backend,
                &analysis,
                &learning,
                &s.home.key.database,
                &config,
                catalog,
                &mut buf,
            ))
            .await?;
            // The lookup used the unnamed statement: the client's is not there any more.
            u.notes.unnamed_here = false;
            let resolved = match found {
                Some((resolved, names)) => {
                    shard.epochs.learn_names(&names);
                    resolved
                }
                None => unresolvable(catalog),
            };
            log::debug!(
                target: "heliosdb_proxy::cache",
                "client {}: statement shape {shape:016x}: {}",
                s.pid(),
                resolved.refusal.as_deref().unwrap_or("cacheable")
            );
            shard.learn(u.cache.session, shape, resolved);
        }
        Ok(())
    }
}

/// A resolution for a shape the catalog query failed on: never cached, and its writes
/// reach everything.
fn unresolvable(catalog: u64) -> Resolved {
    Resolved {
        readable: false,
        read_committed: false,
        refusal: Some("its tables could not be resolved".into()),
        reads: Box::new([]),
        writes: Reach::Everything,
        ttl: None,
        catalog,
        learned: Instant::now(),
    }
}

/// Notes the epochs the answer is read at (before the statement goes to the server).
fn start_fill(
    shard: &ShardCache,
    resolved: &Resolved,
    ttl_hint: Option<u32>,
    key: u128,
    described: bool,
) -> Fill {
    let epochs = &shard.epochs;
    let global = epochs.global();
    let deps = resolved
        .reads
        .iter()
        .map(|&slot| (slot, epochs.epoch(slot)))
        .collect();
    let ttl = match ttl_hint {
        Some(secs) => Some(Duration::from_secs(u64::from(secs))),
        None => resolved.ttl,
    };
    Fill {
        key,
        normalized: None,
        deps,
        global,
        ttl,
        bytes: Vec::new(),
        // Without a Describe the server sends no RowDescription: rows come first.
        rows_at: (!described).then_some(0),
        completed: false,
        limit: shard.config().max_result_bytes as usize,
        state: FillState::Collecting,
        status: status::IDLE,
    }
}

/// Looks the request up in L1, then with the key's owner (L2), then by its normalized
/// form (L3); a result found beyond L1 is kept in L1 too.
async fn lookup(
    ctx: &ShardCtx,
    shard: &ShardCache,
    key: u128,
    normalized: impl FnOnce() -> Option<u128>,
    told: &[u8],
) -> (Option<(Arc<Entry>, Tier)>, Option<u128>) {
    let epochs = &shard.epochs;
    let tiers = &ctx.stats.cache_tiers;
    if let Some(entry) = shard.store(Tier::L1).fresh(key, epochs) {
        return (Some((entry, Tier::L1)), None);
    }
    tiers[Tier::L1 as usize].misses.inc();
    if shard.has_l2() {
        let owner = l2::owner(key, shard.workers());
        let found = if owner == shard.shard {
            shard.store(Tier::L2).fresh(key, epochs)
        } else {
            let ticket = shard.waiting.register();
            let asked = crate::bus::try_send(
                ctx,
                owner,
                ShardMsg::CacheGet {
                    key,
                    from: shard.shard,
                    ticket,
                },
            );
            let answer = shard.waiting.wait(ticket);
            if asked {
                crate::sync::timeout(l2::ANSWER_WAIT, answer)
                    .await
                    .flatten()
                    // Fresh when the owner looked; still fresh now?
                    .filter(|e| e.fresh(epochs, Instant::now()))
            } else {
                None
            }
        };
        match found {
            Some(entry) => {
                shard.store(Tier::L1).insert(key, entry.clone());
                return (Some((entry, Tier::L2)), None);
            }
            None => tiers[Tier::L2 as usize].misses.inc(),
        }
    }
    let Some(normalized) = normalized() else {
        return (None, None);
    };
    // Another spelling's result, for a named statement, only with the columns the
    // client was told.
    let fits = |e: &Arc<Entry>| told.is_empty() || e.bytes.get(5..e.rows_at) == Some(told);
    match shard.store(Tier::L3).fresh(normalized, epochs).filter(fits) {
        Some(entry) => {
            shard.store(Tier::L1).insert(key, entry.clone());
            (Some((entry, Tier::L3)), Some(normalized))
        }
        None => {
            tiers[Tier::L3 as usize].misses.inc();
            (None, Some(normalized))
        }
    }
}

/// Stores a complete answer, unless a write moved an epoch since it was read (or it
/// came from a read node, which may not have replayed the latest writes): in L1, with
/// the key's owner (L2), and under its normalized form (L3).
fn store_fill(ctx: &ShardCtx, shard: &ShardCache, fill: Fill, from_read_node: bool) {
    if fill.state != FillState::Done || from_read_node {
        return;
    }
    let epochs = &shard.epochs;
    let unchanged = epochs.global() == fill.global
        && fill.deps.iter().all(|&(slot, at)| epochs.epoch(slot) == at);
    if !unchanged {
        ctx.stats.cache_fills_discarded.inc();
        return;
    }
    if fill.ttl == Some(Duration::ZERO) {
        return;
    }
    let entry = Arc::new(Entry {
        bytes: fill.bytes.into_boxed_slice(),
        rows_at: fill.rows_at.unwrap_or(0),
        deps: fill.deps,
        global: fill.global,
        expires: fill.ttl.map(|ttl| Instant::now() + ttl),
    });
    let tiers = &ctx.stats.cache_tiers;
    shard.store(Tier::L1).insert(fill.key, entry.clone());
    tiers[Tier::L1 as usize].fills.inc();
    if shard.has_l2() {
        let owner = l2::owner(fill.key, shard.workers());
        if owner == shard.shard {
            shard.store(Tier::L2).insert(fill.key, entry.clone());
            tiers[Tier::L2 as usize].fills.inc();
        } else {
            crate::bus::try_send(
                ctx,
                owner,
                ShardMsg::CachePut {
                    key: fill.key,
                    entry: entry.clone(),
                },
            );
        }
    }
    if let Some(normalized) = fill.normalized {
        shard.store(Tier::L3).insert(normalized, entry);
        tiers[Tier::L3 as usize].fills.inc();
    }
    ctx.stats.cache_fills.inc();
    shard.publish(&ctx.stats);
}
