//! What the router needs to know about a SQL text: may it run on a hot standby, does it
//! open a (read-only) transaction, which routing hints its comments carry, and which
//! relations it names (for schema routes).
//!
//! Sans-IO and conservative: anything not recognised as a read goes to the primary.
//!
//! Cost: one pass over the lexer's tokens with one token of lookahead, a fixed-size
//! stack of parenthesis levels and fixed-size state; no regex and no allocation except
//! the `tables` entries actually found (and CTE names past the eighth in one statement).

mod functions;
mod hints;
mod keywords;

use super::lexer::{Lexer, Token};
pub use functions::ReadOnlyFunctions;
use hints::Hints;
use keywords::{keyword, Kw};

/// How a SQL text (one Query message, possibly several statements; or one Parse) may be routed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteAnalysis {
    /// Every statement only reads (safe on a hot standby); false means "must go to the primary".
    pub read_only: bool,
    /// The text opens a transaction block (BEGIN / START TRANSACTION) ...
    pub begins_transaction: bool,
    /// ... declared READ ONLY (BEGIN READ ONLY, START TRANSACTION ISOLATION LEVEL ... READ
    /// ONLY, BEGIN; SET TRANSACTION READ ONLY in the same text also counts). Such a block
    /// may run on a replica. The last BEGIN in the text decides.
    pub read_only_transaction: bool,
    /// The text asks for SERIALIZABLE isolation (BEGIN / SET TRANSACTION), which a hot
    /// standby refuses ("cannot use serializable mode in a hot standby").
    pub serializable: bool,
    /// A routing hint from a comment, if any (last valid one wins).
    pub hint: Option<RouteHint>,
    /// `helios:cache=skip` was present.
    pub cache_skip: bool,
    /// `helios:cache=ttl:N`: the result may be served for N seconds.
    pub cache_ttl: Option<u32>,
    /// Relations the text references (FROM, JOIN, UPDATE, INSERT INTO, DELETE FROM, TABLE,
    /// TRUNCATE, COPY, LOCK, ...), in order, without duplicates. CTE names are not relations.
    pub tables: Vec<TableRef>,
    /// Functions the text calls by name, in order, without duplicates (SQL constructs
    /// such as COALESCE or CAST are not calls).
    pub functions: Vec<TableRef>,
    /// It uses a function written as a bare SQL keyword (CURRENT_TIMESTAMP, LOCALTIME,
    /// CURRENT_USER, …): its value depends on the moment or the session.
    pub value_functions: bool,
    /// Every statement only reads, unless a function it calls (one not known to be
    /// read-only) writes: what the catalog's word on those functions settles.
    pub reads_but_for_calls: bool,
    /// Statements in the text.
    pub statements: u32,
    /// Some statement changes data itself (INSERT, UPDATE, DELETE, MERGE, locking
    /// reads) or calls a function not known to be read-only.
    pub data_writes: bool,
    /// Names the text gives its CTEs (which may hide tables of the same name).
    pub cte_names: Vec<TableRef>,
    /// Parentheses nested deeper than the analysis tracks: names there may be missed.
    pub too_deep: bool,
    /// Every statement is a query or plain data change (SELECT, VALUES, TABLE, WITH,
    /// INSERT, UPDATE, DELETE, MERGE, COPY, TRUNCATE): what it changes is `tables`.
    pub dml_only: bool,
}

/// Where a comment asks the query to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteHint {
    Primary,
    Standby,
    Nearest,
}

/// A relation name: unquoted identifiers lower-cased, quoted ones exact (quotes removed, "" unescaped).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

/// Analyses `sql` for routing.
///
/// Runs once per Query (or Parse) on the hot path, so it is one pass over the lexer's
/// tokens with one token of lookahead, fixed-size state (33 parenthesis levels, 8 inline
/// CTE names) and no regex; it allocates only for the tables it reports.
pub fn analyze(sql: &[u8], functions: &ReadOnlyFunctions) -> RouteAnalysis {
    let mut analyzer = Analyzer::new(functions);
    let mut tokens = Tokens::new(sql);
    while let Some(token) = tokens.next() {
        analyzer.token(token, &mut tokens);
    }
    analyzer.finish_statement();
    let mut out = analyzer.out;
    out.read_only = analyzer.all_read;
    out.dml_only = analyzer.all_dml;
    out.reads_but_for_calls = analyzer.all_read_but_for_calls;
    out.hint = tokens.hints.route;
    out.cache_skip = tokens.hints.cache_skip;
    out.cache_ttl = tokens.hints.cache_ttl;
    out
}

/// The lexer with one token of push-back; comments are read for hints on the way.
struct Tokens<'a> {
    lexer: Lexer<'a>,
    back: Option<Token<'a>>,
    hints: Hints,
}

impl<'a> Tokens<'a> {
    fn new(sql: &'a [u8]) -> Self {
        Tokens {
            lexer: Lexer::with_comments(sql),
            back: None,
            hints: Hints::default(),
        }
    }

    fn next(&mut self) -> Option<Token<'a>> {
        if let Some(token) = self.back.take() {
            return Some(token);
        }
        loop {
            match self.lexer.next()? {
                Token::Comment(text) => hints::scan(text, &mut self.hints),
                token => return Some(token),
            }
        }
    }

    fn peek(&mut self) -> Option<Token<'a>> {
        let token = self.next();
        self.back = token;
        token
    }
}

/// One identifier as written.
#[derive(Clone, Copy, Debug)]
struct Ident<'a> {
    text: &'a [u8],
    quoted: bool,
}

impl<'a> Ident<'a> {
    /// The identifier as PostgreSQL folds it: ASCII lower case unless quoted, `""` → `"`.
    fn folded(self) -> impl Iterator<Item = u8> + 'a {
        let (text, quoted) = (self.text, self.quoted);
        let mut pos = 0;
        std::iter::from_fn(move || {
            let b = *text.get(pos)?;
            pos += 1;
            if !quoted {
                return Some(b.to_ascii_lowercase());
            }
            if b == b'"' && text.get(pos) == Some(&b'"') {
                pos += 1;
            }
            Some(b)
        })
    }

    fn same(self, other: Ident) -> bool {
        self.folded().eq(other.folded())
    }

    fn matches(self, s: &str) -> bool {
        self.folded().eq(s.bytes())
    }

    fn to_folded_string(self) -> String {
        let bytes: Vec<u8> = self.folded().collect();
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// A possibly qualified name; the last three parts are kept (catalog.schema.name).
#[derive(Clone, Copy, Debug)]
struct Name<'a> {
    parts: [Ident<'a>; 3],
    len: usize,
}

impl<'a> Name<'a> {
    fn new(first: Ident<'a>) -> Self {
        Name {
            parts: [first; 3],
            len: 1,
        }
    }

    fn push(&mut self, part: Ident<'a>) {
        if self.len == 3 {
            self.parts.rotate_left(1);
            self.parts[2] = part;
        } else {
            self.parts[self.len] = part;
            self.len += 1;
        }
    }

    fn name(&self) -> Ident<'a> {
        self.parts[self.len - 1]
    }

    fn schema(&self) -> Option<Ident<'a>> {
        (self.len > 1).then(|| self.parts[self.len - 2])
    }

    /// The name as PostgreSQL folds it, with its schema if qualified.
    fn table_ref(&self) -> TableRef {
        TableRef {
            schema: self.schema().map(Ident::to_folded_string),
            name: self.name().to_folded_string(),
        }
    }

    /// A bare keyword that stands for a function call (SQL's value functions).
    fn is_value_function(&self) -> bool {
        const VALUE_FUNCTIONS: &[&[u8]] = &[
            b"current_catalog",
            b"current_date",
            b"current_role",
            b"current_schema",
            b"current_time",
            b"current_timestamp",
            b"current_user",
            b"localtime",
            b"localtimestamp",
            b"session_user",
            b"system_user",
            b"user",
        ];
        let part = self.parts[0];
        self.len == 1
            && !part.quoted
            && VALUE_FUNCTIONS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(part.text))
    }

    /// The keyword this name is, if it is one bare unquoted word.
    fn keyword(&self) -> (Kw, bool) {
        let part = self.parts[0];
        if self.len == 1 && !part.quoted {
            keyword(part.text)
        } else {
            (Kw::Ident, false)
        }
    }
}

/// What the next name at a level is expected to be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Expect {
    #[default]
    Nothing,
    /// A FROM/JOIN item: a relation, a function, `(subquery)` or a parenthesised join.
    FromItem,
    /// A relation after INTO, UPDATE, TABLE, COPY; `(` after it is a column list.
    Target,
    /// Like `Target`, in a comma list (TRUNCATE, LOCK).
    TargetList,
}

/// Progress through a WITH list at one level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Cte {
    #[default]
    None,
    ExpectName,
    AfterName,
    ColumnList,
    ExpectBody,
    InBody,
    /// After a body: SEARCH/CYCLE clauses, `,` or the main statement.
    AfterBody,
}

/// State of one parenthesis level (the statement itself is level 0).
#[derive(Clone, Copy, Debug, Default)]
struct Level<'a> {
    /// The first word at this level (its statement kind, for subqueries).
    kind: Option<Kw>,
    from_list: bool,
    in_join: bool,
    expect: Expect,
    target_list: bool,
    cte: Cte,
    cte_name: Option<Ident<'a>>,
    /// The `( … )` option list right after EXPLAIN.
    explain_options: bool,
}

/// EXPLAIN handling for the current statement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Explain {
    #[default]
    No,
    /// Reading options; the explained statement has not started yet.
    Options,
    /// Plans only: reads whatever the statement is.
    Plain,
    /// Runs the statement: it is classified as such.
    Analyze,
}

/// COPY direction for the current statement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum CopyDir {
    #[default]
    Unknown,
    To,
    ToStdout,
    From,
}

/// The statement being walked.
#[derive(Clone, Copy, Debug, Default)]
struct Statement {
    started: bool,
    first: Option<Kw>,
    /// Tokens at level 0 so far.
    words: usize,
    /// Its kind alone needs the primary.
    kind_writes: bool,
    /// Something inside it needs the primary.
    writes: bool,
    /// It calls a function not known to be read-only (which needs the primary too).
    unknown_call: bool,
    explain: Explain,
    explain_analyze: bool,
    copy: CopyDir,
    /// BEGIN / START TRANSACTION, or SET TRANSACTION.
    transaction_modes: bool,
    read_only: Option<bool>,
}

/// Parenthesis levels tracked exactly; deeper ones share a scratch level.
const MAX_DEPTH: usize = 32;
/// CTE names kept inline per statement before spilling to the heap.
const INLINE_CTES: usize = 8;

/// CTE names of the current statement.
#[derive(Default)]
struct CteNames<'a> {
    inline: [Option<Ident<'a>>; INLINE_CTES],
    len: usize,
    spill: Vec<Ident<'a>>,
}

impl<'a> CteNames<'a> {
    fn push(&mut self, name: Ident<'a>) {
        if self.len < INLINE_CTES {
            self.inline[self.len] = Some(name);
            self.len += 1;
        } else {
            self.spill.push(name);
        }
    }

    fn contains(&self, name: Ident) -> bool {
        self.inline[..self.len]
            .iter()
            .flatten()
            .chain(self.spill.iter())
            .any(|cte| cte.same(name))
    }

    fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }
}

struct Analyzer<'a, 'f> {
    functions: &'f ReadOnlyFunctions,
    out: RouteAnalysis,
    all_read: bool,
    all_read_but_for_calls: bool,
    all_dml: bool,
    stmt: Statement,
    levels: [Level<'a>; MAX_DEPTH + 1],
    depth: usize,
    ctes: CteNames<'a>,
    /// The previous two words' roles (`Punct` for other tokens).
    prev: Kw,
    prev2: Kw,
    prev_close: bool,
    /// The next name is a type or alias (after `::` or AS): `(` after it is no call.
    type_next: bool,
}

impl<'a, 'f> Analyzer<'a, 'f> {
    fn new(functions: &'f ReadOnlyFunctions) -> Self {
        Analyzer {
            functions,
            out: RouteAnalysis::default(),
            all_read: true,
            all_read_but_for_calls: true,
            all_dml: true,
            stmt: Statement::default(),
            levels: [Level::default(); MAX_DEPTH + 1],
            depth: 0,
            ctes: CteNames::default(),
            prev: Kw::Punct,
            prev2: Kw::Punct,
            prev_close: false,
            type_next: false,
        }
    }

    fn level(&mut self) -> &mut Level<'a> {
        &mut self.levels[self.depth.min(MAX_DEPTH)]
    }

    fn token(&mut self, token: Token<'a>, tokens: &mut Tokens<'a>) {
        let first = match token {
            Token::Word(w) => Ident {
                text: w,
                quoted: false,
            },
            Token::Quoted(q) => Ident {
                text: q,
                quoted: true,
            },
            other => return self.punctuation(other),
        };
        let mut name = Name::new(first);
        while tokens.peek() == Some(Token::Dot) {
            tokens.next();
            match tokens.next() {
                Some(Token::Word(w)) => name.push(Ident {
                    text: w,
                    quoted: false,
                }),
                Some(Token::Quoted(q)) => name.push(Ident {
                    text: q,
                    quoted: true,
                }),
                // `t.*`: the star is handled as the next token.
                other => {
                    tokens.back = other;
                    break;
                }
            }
        }
        let next = tokens.peek();
        self.name(name, next);
    }

    fn punctuation(&mut self, token: Token<'a>) {
        if token == Token::Semicolon {
            self.finish_statement();
            return;
        }
        if self.depth == 0 {
            if !self.stmt.started {
                // `(SELECT …) UNION …`; anything else in first place is not a known read.
                let kind = if token == Token::OpenParen {
                    Kw::Select
                } else {
                    Kw::Punct
                };
                self.start_statement(kind);
                self.level().kind = Some(kind);
            }
            self.stmt.words += 1;
        }
        self.type_next = token == Token::Cast;
        self.prev_close = token == Token::CloseParen;
        self.prev2 = self.prev;
        self.prev = Kw::Punct;
        match token {
            Token::OpenParen => self.open_paren(),
            Token::CloseParen => {
                self.depth = self.depth.saturating_sub(1);
                let level = self.level();
                match level.cte {
                    Cte::InBody => level.cte = Cte::AfterBody,
                    Cte::ColumnList => level.cte = Cte::AfterName,
                    _ => {}
                }
            }
            Token::Comma => {
                let level = self.level();
                if level.cte == Cte::AfterBody {
                    level.cte = Cte::ExpectName;
                } else if level.from_list {
                    level.expect = Expect::FromItem;
                    level.in_join = false;
                } else if level.target_list {
                    level.expect = Expect::TargetList;
                }
            }
            _ => {
                let level = self.level();
                if level.expect != Expect::Nothing {
                    level.expect = Expect::Nothing;
                }
                if level.cte != Cte::InBody && level.cte != Cte::AfterBody {
                    level.cte = Cte::None;
                }
            }
        }
    }

    fn open_paren(&mut self) {
        let explain_options =
            self.depth == 0 && self.stmt.explain == Explain::Options && self.stmt.words == 2;
        let mut child = Level {
            explain_options,
            ..Level::default()
        };
        let mut cte_name = None;
        let parent = self.level();
        match parent.expect {
            Expect::FromItem => {
                child.expect = Expect::FromItem;
                child.from_list = true;
            }
            Expect::Target | Expect::TargetList | Expect::Nothing => {}
        }
        parent.expect = Expect::Nothing;
        parent.target_list = false;
        match parent.cte {
            Cte::ExpectBody => {
                parent.cte = Cte::InBody;
                cte_name = parent.cte_name.take();
            }
            Cte::AfterName => parent.cte = Cte::ColumnList,
            Cte::InBody | Cte::AfterBody => {}
            _ => parent.cte = Cte::None,
        }
        if parent.kind.is_none() {
            parent.kind = Some(Kw::Select);
        }
        if let Some(name) = cte_name {
            self.ctes.push(name);
            // A CTE may share its name with a table its body (or the rest of the text)
            // reads: reported, so a cache can count that table in too.
            let folded = TableRef {
                schema: None,
                name: name.to_folded_string(),
            };
            if !self.out.cte_names.contains(&folded) {
                self.out.cte_names.push(folded);
            }
        }
        self.depth += 1;
        if self.depth <= MAX_DEPTH {
            self.levels[self.depth] = child;
        } else {
            // Deeper levels share a scratch level: what they name may be missed.
            self.out.too_deep = true;
            self.levels[MAX_DEPTH] = Level::default();
        }
    }

    fn start_statement(&mut self, kind: Kw) {
        self.stmt.started = true;
        self.stmt.first = Some(kind);
        self.out.statements += 1;
        // Transaction control changes no data: `BEGIN; UPDATE …; COMMIT` is data changes
        // alone.
        self.all_dml &= matches!(
            kind,
            Kw::Select
                | Kw::Values
                | Kw::Table
                | Kw::With
                | Kw::Insert
                | Kw::Update
                | Kw::Delete
                | Kw::Merge
                | Kw::Copy
                | Kw::Truncate
                | Kw::Begin
                | Kw::Start
                | Kw::Commit
                | Kw::End
                | Kw::Rollback
                | Kw::Abort
                | Kw::Savepoint
                | Kw::Release
        );
        self.stmt.kind_writes = !matches!(
            kind,
            Kw::Select
                | Kw::Values
                | Kw::Table
                | Kw::Show
                | Kw::With
                | Kw::Fetch
                | Kw::Move
                | Kw::Close
                | Kw::Declare
                | Kw::Commit
                | Kw::End
                | Kw::Rollback
                | Kw::Abort
                | Kw::Savepoint
                | Kw::Release
                | Kw::Begin
                | Kw::Start
                | Kw::Explain
        );
        match kind {
            Kw::Begin | Kw::Start => {
                self.out.begins_transaction = true;
                self.stmt.transaction_modes = true;
                self.stmt.read_only = Some(false);
            }
            Kw::Explain if self.stmt.explain == Explain::No => self.stmt.explain = Explain::Options,
            _ => {}
        }
    }

    fn finish_statement(&mut self) {
        let stmt = std::mem::take(&mut self.stmt);
        self.depth = 0;
        self.levels[0] = Level::default();
        self.ctes.clear();
        self.prev = Kw::Punct;
        self.prev2 = Kw::Punct;
        self.prev_close = false;
        self.type_next = false;
        if !stmt.started {
            return;
        }
        let reads_but_for_calls = match stmt.explain {
            Explain::Plain => true,
            Explain::Options => false,
            Explain::No | Explain::Analyze if stmt.first == Some(Kw::Copy) => {
                stmt.copy == CopyDir::ToStdout && !stmt.writes
            }
            Explain::No | Explain::Analyze => !stmt.kind_writes && !stmt.writes,
        };
        let calls_count = stmt.explain != Explain::Plain && stmt.unknown_call;
        self.all_read &= reads_but_for_calls && !calls_count;
        self.out.data_writes |=
            stmt.explain != Explain::Plain && (stmt.writes || stmt.unknown_call);
        self.all_read_but_for_calls &= reads_but_for_calls;
        if stmt.transaction_modes {
            let opens = matches!(stmt.first, Some(Kw::Begin | Kw::Start));
            if opens || self.out.begins_transaction {
                if let Some(read_only) = stmt.read_only {
                    self.out.read_only_transaction = read_only;
                }
            }
        }
    }

    /// One (possibly qualified) name; `next` is the token after it.
    fn name(&mut self, name: Name<'a>, next: Option<Token<'a>>) {
        let (kw, construct) = name.keyword();
        let paren = next == Some(Token::OpenParen);
        let mut first_word = false;
        if self.depth == 0 {
            if !self.stmt.started {
                self.start_statement(kw);
                first_word = true;
            } else if self.stmt.explain == Explain::Options && self.stmt.words > 0 {
                match kw {
                    Kw::Analyze => self.stmt.explain_analyze = true,
                    Kw::Verbose => {}
                    _ => {
                        self.stmt.explain = if self.stmt.explain_analyze {
                            Explain::Analyze
                        } else {
                            Explain::Plain
                        };
                        self.start_statement(kw);
                        first_word = true;
                    }
                }
            }
            self.stmt.words += 1;
            self.transaction_words(kw);
            self.copy_words(kw, first_word);
        }
        let type_next = std::mem::take(&mut self.type_next);
        let level = &mut self.levels[self.depth.min(MAX_DEPTH)];
        if level.explain_options {
            match kw {
                Kw::Analyze => self.stmt.explain_analyze = true,
                Kw::False | Kw::Off if self.prev == Kw::Analyze => {
                    self.stmt.explain_analyze = false
                }
                _ => {}
            }
        }
        if first_word || level.kind.is_none() {
            level.kind = Some(kw);
            first_word = true;
        }
        if kw == Kw::Hold && self.prev == Kw::With && self.stmt.first == Some(Kw::Declare) {
            self.stmt.writes = true;
        }
        if let Some(role) = self.cte_step(name, kw) {
            self.shift(role);
            return;
        }
        if self.level().kind == Some(Kw::With) && !first_word && starts_query(kw) {
            // The main statement after a WITH list.
            self.level().kind = Some(kw);
        }
        if let Some(role) = self.item(name, kw, construct, paren, next) {
            self.shift(role);
            return;
        }
        // A statement's leading word takes options, not arguments: `COPY (`, `EXPLAIN (`.
        let leading = first_word && self.depth == 0;
        if paren && !construct && !type_next && !leading && self.is_call() {
            let schema = name.schema().and_then(|s| std::str::from_utf8(s.text).ok());
            let function = std::str::from_utf8(name.name().text).ok();
            if !function.is_some_and(|f| self.functions.contains(schema, f)) {
                self.stmt.unknown_call = true;
            }
            let called = name.table_ref();
            if !self.out.functions.contains(&called) {
                self.out.functions.push(called);
            }
        } else if !paren && !type_next && name.is_value_function() {
            self.out.value_functions = true;
        }
        if kw != Kw::Ident {
            self.keyword_effects(kw, first_word);
        }
        self.shift(kw);
    }

    fn shift(&mut self, kw: Kw) {
        self.prev2 = self.prev;
        self.prev = kw;
        self.prev_close = false;
    }

    /// READ ONLY / READ WRITE / SERIALIZABLE in BEGIN, START TRANSACTION, SET TRANSACTION.
    fn transaction_words(&mut self, kw: Kw) {
        if self.stmt.first == Some(Kw::Set) && self.stmt.words == 2 && kw == Kw::Transaction {
            self.stmt.transaction_modes = true;
        }
        if !self.stmt.transaction_modes {
            return;
        }
        match kw {
            Kw::Only if self.prev == Kw::Read => self.stmt.read_only = Some(true),
            Kw::Write if self.prev == Kw::Read => self.stmt.read_only = Some(false),
            Kw::Serializable => self.out.serializable = true,
            _ => {}
        }
    }

    /// COPY … TO STDOUT reads; COPY … FROM writes.
    fn copy_words(&mut self, kw: Kw, first_word: bool) {
        if self.stmt.first != Some(Kw::Copy) || first_word {
            return;
        }
        match (kw, self.stmt.copy) {
            (Kw::To, CopyDir::Unknown) => self.stmt.copy = CopyDir::To,
            (Kw::From, CopyDir::Unknown) => self.stmt.copy = CopyDir::From,
            (Kw::Stdout, CopyDir::To) => self.stmt.copy = CopyDir::ToStdout,
            (_, CopyDir::To) => self.stmt.copy = CopyDir::Unknown,
            _ => {}
        }
    }

    /// WITH name [(columns)] AS [NOT] [MATERIALIZED] ( body ) [, …]. Returns the role
    /// to remember when the name was consumed as part of the list.
    fn cte_step(&mut self, name: Name<'a>, kw: Kw) -> Option<Kw> {
        let level = self.level();
        match level.cte {
            Cte::ExpectName if kw == Kw::Recursive => Some(kw),
            Cte::ExpectName => {
                level.cte_name = Some(name.name());
                level.cte = Cte::AfterName;
                Some(Kw::Ident)
            }
            Cte::AfterName if kw == Kw::As => {
                level.cte = Cte::ExpectBody;
                // Not a CTE after all (`WITH ORDINALITY AS t(a, n)`): t( is an alias.
                self.type_next = true;
                Some(kw)
            }
            Cte::ExpectBody if matches!(kw, Kw::Not | Kw::Materialized) => Some(kw),
            // SEARCH … / CYCLE … clauses after a body.
            Cte::AfterBody if !starts_query(kw) && kw != Kw::With => Some(kw),
            Cte::InBody => None,
            _ => {
                level.cte = Cte::None;
                level.cte_name = None;
                None
            }
        }
    }

    /// A FROM item or a target relation. Returns the role to remember when the name was
    /// consumed as one (or as a word leading up to one, like ONLY).
    fn item(
        &mut self,
        name: Name<'a>,
        kw: Kw,
        construct: bool,
        paren: bool,
        next: Option<Token<'a>>,
    ) -> Option<Kw> {
        let level = self.level();
        match level.expect {
            Expect::Nothing => None,
            Expect::FromItem => {
                let rows_from = kw == Kw::Rows
                    && matches!(next, Some(Token::Word(w)) if keyword(w).0 == Kw::From);
                if matches!(kw, Kw::Only | Kw::Lateral) || rows_from {
                    return Some(kw);
                }
                level.expect = Expect::Nothing;
                if construct || paren {
                    // A keyword ends the expectation; a function in FROM is checked as a
                    // call by the caller.
                    return None;
                }
                self.record(name);
                Some(Kw::Ident)
            }
            Expect::Target | Expect::TargetList => {
                if matches!(
                    kw,
                    Kw::Only | Kw::Temp | Kw::Unlogged | Kw::Table | Kw::If | Kw::Not | Kw::Exists
                ) {
                    return Some(kw);
                }
                if construct {
                    level.expect = Expect::Nothing;
                    return None;
                }
                level.target_list = level.expect == Expect::TargetList;
                level.expect = Expect::Nothing;
                self.record(name);
                Some(Kw::Ident)
            }
        }
    }

    /// Whether a name followed by `(` here is a function call (not an alias column list).
    fn is_call(&self) -> bool {
        let level = &self.levels[self.depth.min(MAX_DEPTH)];
        let alias = level.from_list && (self.prev_close || self.prev == Kw::Ident);
        !alias && self.prev != Kw::Tablesample
    }

    fn keyword_effects(&mut self, kw: Kw, first_word: bool) {
        let depth = self.depth;
        let (prev, prev2) = (self.prev, self.prev2);
        let stmt_first = self.stmt.first;
        let level = &mut self.levels[depth.min(MAX_DEPTH)];
        // TRUNCATE a, b RESTART IDENTITY: a keyword ends the list.
        level.target_list = false;
        match kw {
            Kw::Insert | Kw::Delete | Kw::Merge => self.stmt.writes = true,
            // COMMIT PREPARED / ROLLBACK PREPARED finish a two-phase transaction: primary.
            Kw::Prepared if depth == 0 && matches!(stmt_first, Some(Kw::Commit | Kw::Rollback)) => {
                self.stmt.writes = true
            }
            Kw::Update => {
                self.stmt.writes = true;
                if !matches!(prev, Kw::For | Kw::Key | Kw::Do | Kw::Then) {
                    level.expect = Expect::Target;
                }
            }
            Kw::Share if matches!(prev, Kw::For | Kw::Key) => self.stmt.writes = true,
            Kw::Into => {
                level.from_list = false;
                level.expect = Expect::Target;
                if matches!(level.kind, Some(Kw::Select | Kw::Values | Kw::With)) {
                    // SELECT … INTO new_table creates a table.
                    self.stmt.writes = true;
                }
            }
            Kw::Table => level.expect = Expect::Target,
            Kw::Truncate | Kw::Lock if first_word => level.expect = Expect::TargetList,
            Kw::Copy if first_word && depth == 0 => level.expect = Expect::Target,
            Kw::From => {
                let distinct_from = prev == Kw::Distinct && matches!(prev2, Kw::Is | Kw::Not);
                let copy = depth == 0 && stmt_first == Some(Kw::Copy);
                if allows_from(level.kind) && !distinct_from && !copy {
                    level.from_list = true;
                    level.in_join = false;
                    level.expect = Expect::FromItem;
                }
            }
            Kw::Join if level.from_list => {
                level.in_join = true;
                level.expect = Expect::FromItem;
            }
            Kw::Using => {
                let delete_using = level.from_list && level.kind == Some(Kw::Delete);
                if !level.in_join && (delete_using || level.kind == Some(Kw::Merge)) {
                    level.from_list = true;
                    level.expect = Expect::FromItem;
                }
            }
            Kw::Where
            | Kw::Group
            | Kw::Having
            | Kw::Window
            | Kw::Order
            | Kw::Limit
            | Kw::Offset
            | Kw::Fetch
            | Kw::For
            | Kw::Union
            | Kw::Intersect
            | Kw::Except
            | Kw::Returning
            | Kw::Set
            | Kw::When
            | Kw::Do
            | Kw::Select
            | Kw::Values => {
                level.from_list = false;
                level.target_list = false;
                level.expect = Expect::Nothing;
            }
            Kw::With if level.cte == Cte::None => level.cte = Cte::ExpectName,
            Kw::As => self.type_next = true,
            _ => {}
        }
    }

    fn record(&mut self, name: Name<'a>) {
        let (schema, table) = (name.schema(), name.name());
        if schema.is_none() && self.ctes.contains(table) {
            return;
        }
        let known = self.out.tables.iter().any(|t| {
            table.matches(&t.name)
                && match (schema, &t.schema) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.matches(b),
                    _ => false,
                }
        });
        if !known {
            self.out.tables.push(TableRef {
                schema: schema.map(Ident::to_folded_string),
                name: table.to_folded_string(),
            });
        }
    }
}

/// Words that start a query or data-modifying statement.
fn starts_query(kw: Kw) -> bool {
    matches!(
        kw,
        Kw::Select | Kw::Values | Kw::Table | Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge
    )
}

/// Levels whose FROM starts a list of relations (not EXTRACT(… FROM …), FETCH … FROM c,
/// REVOKE … FROM role).
fn allows_from(kind: Option<Kw>) -> bool {
    matches!(
        kind,
        Some(
            Kw::Select
                | Kw::Values
                | Kw::Table
                | Kw::With
                | Kw::Insert
                | Kw::Update
                | Kw::Delete
                | Kw::Merge
                | Kw::Explain
                | Kw::Declare
                | Kw::Create
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(sql: &str) -> RouteAnalysis {
        analyze(sql.as_bytes(), &ReadOnlyFunctions::new(&[]))
    }

    fn reads(sql: &str) -> bool {
        run(sql).read_only
    }

    fn tables(sql: &str) -> Vec<String> {
        run(sql)
            .tables
            .iter()
            .map(|t| match &t.schema {
                Some(s) => format!("{s}.{}", t.name),
                None => t.name.clone(),
            })
            .collect()
    }

    fn assert_reads(cases: &[&str]) {
        for sql in cases {
            assert!(reads(sql), "should read: {sql}: {:?}", run(sql));
        }
    }

    fn assert_writes(cases: &[&str]) {
        for sql in cases {
            assert!(
                !reads(sql),
                "should need the primary: {sql}: {:?}",
                run(sql)
            );
        }
    }

    #[test]
    fn calls_value_functions_and_statement_kinds() {
        let a = run("SELECT now(), s.f(1), coalesce(a, 1), count(*) FROM t");
        let names: Vec<String> = a
            .functions
            .iter()
            .map(|f| match &f.schema {
                Some(s) => format!("{s}.{}", f.name),
                None => f.name.clone(),
            })
            .collect();
        assert_eq!(names, ["now", "s.f", "count"]);
        assert!(!a.value_functions);
        assert!(run("SELECT CURRENT_TIMESTAMP").value_functions);
        assert!(run("SELECT 1 WHERE user = 'x'").value_functions);
        assert!(!run("SELECT \"user\" FROM t").value_functions);
        let q = run("SELECT 1; UPDATE t SET a = 1");
        assert_eq!((q.statements, q.dml_only), (2, true));
        assert!(!run("CREATE TABLE t (a int)").dml_only);
        assert!(!run("SET x = 1").dml_only);
        assert!(run("WITH x AS (SELECT 1) SELECT * FROM x").dml_only);
        let tx = run("BEGIN; WITH d AS (DELETE FROM t RETURNING 1) SELECT count(*) FROM d; COMMIT");
        assert!(tx.dml_only && tx.data_writes && !tx.read_only);
        assert_eq!(
            tx.tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["t"]
        );
        let shadow = run("WITH orders AS (SELECT * FROM orders) SELECT * FROM orders");
        assert_eq!(shadow.cte_names.len(), 1);
        assert!(!run("SET x = 1; SELECT 1").data_writes);
        let call = run("SELECT my_func(1) FROM t");
        assert!(!call.read_only && call.reads_but_for_calls);
        assert!(!run("SELECT * FROM t FOR UPDATE").reads_but_for_calls);
    }

    #[test]
    fn empty_text_and_comments_only() {
        for sql in ["", "   ", ";", "-- just a comment", "/* a */ ; /* b */"] {
            assert_eq!(
                run(sql),
                RouteAnalysis {
                    read_only: true,
                    reads_but_for_calls: true,
                    dml_only: true,
                    ..RouteAnalysis::default()
                },
                "{sql}"
            );
        }
    }

    #[test]
    fn plain_reads() {
        assert_reads(&[
            "SELECT 1",
            "select * from t where id = $1",
            "SELECT a FROM t UNION SELECT b FROM u",
            "SELECT a FROM t INTERSECT SELECT a FROM u EXCEPT SELECT a FROM v",
            "(SELECT 1) UNION ALL (SELECT 2)",
            "VALUES (1, 'a'), (2, 'b')",
            "TABLE t",
            "SHOW search_path",
            "show all",
            "SELECT * FROM t ORDER BY a LIMIT 10 OFFSET 5",
            "SELECT DISTINCT ON (a) a, b FROM t",
            "SELECT (SELECT max(x) FROM u) FROM t WHERE EXISTS (SELECT 1 FROM v)",
            "SELECT * FROM t WHERE a IN (1, 2) AND b = ANY($1) AND c = ALL(ARRAY[1])",
        ]);
    }

    #[test]
    fn writes_and_ddl_need_the_primary() {
        assert_writes(&[
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "COPY t FROM STDIN",
            "CREATE TABLE t (a int)",
            "ALTER TABLE t ADD COLUMN b int",
            "DROP TABLE t",
            "TRUNCATE t",
            "GRANT SELECT ON t TO u",
            "REVOKE SELECT ON t FROM u",
            "VACUUM t",
            "ANALYZE t",
            "CLUSTER t",
            "REINDEX TABLE t",
            "LOCK TABLE t",
            "CALL p()",
            "DO $$ BEGIN END $$",
            "NOTIFY chan",
            "REFRESH MATERIALIZED VIEW v",
        ]);
    }

    #[test]
    fn session_commands_need_the_primary() {
        assert_writes(&[
            "SET search_path = a",
            "SET LOCAL work_mem = '1MB'",
            "RESET ALL",
            "DISCARD ALL",
            "LISTEN chan",
            "PREPARE p AS SELECT 1",
            "DEALLOCATE p",
            "EXECUTE p",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "\"SELECT\" 1",
            "'SELECT'",
        ]);
    }

    #[test]
    fn select_into_and_locking_clauses_need_the_primary() {
        assert_writes(&[
            "SELECT * INTO new_t FROM t",
            "SELECT a INTO TEMP TABLE x FROM t",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t FOR NO KEY UPDATE",
            "SELECT * FROM t FOR SHARE",
            "SELECT * FROM t FOR KEY SHARE",
            "SELECT * FROM t FOR UPDATE OF t SKIP LOCKED",
            "select * from t for update nowait",
            "SELECT * FROM t LIMIT 1 FOR SHARE OF t",
        ]);
    }

    #[test]
    fn quoting_hides_keywords() {
        assert_reads(&[
            "SELECT 'it''s a DELETE'",
            "SELECT $$ DELETE FROM t $$",
            "SELECT $body$ INSERT INTO t VALUES (nextval('s')) $body$",
            "SELECT E'\\' FOR UPDATE'",
            "SELECT 1 -- FOR UPDATE\n",
            "SELECT /* DELETE FROM t; */ 1",
            "SELECT \"update\", \"delete\" FROM t",
            "SELECT t.update, t.insert FROM t",
            "SELECT \"Select\" FROM \"Table\"",
        ]);
        assert_writes(&["SELECT 1 /* nested /* comment */ still */; DELETE FROM t"]);
    }

    #[test]
    fn multi_statement_texts_need_every_statement_to_read() {
        assert_reads(&["SELECT 1; SELECT 2;", "SELECT 1;;SHOW x"]);
        assert_writes(&[
            "SELECT 1; INSERT INTO t VALUES (1)",
            "INSERT INTO t VALUES (1); SELECT 1",
            "SELECT 1; SET x = 1",
        ]);
    }

    #[test]
    fn keywords_ignore_case() {
        assert_reads(&["sElEcT * FrOm t", "WiTh x As (SeLeCt 1) sElEcT * fRoM x"]);
        assert_writes(&["InSeRt InTo t VaLuEs (1)", "select * from t FoR uPdAtE"]);
    }

    #[test]
    fn function_calls_must_be_known_read_only() {
        assert_reads(&[
            "SELECT count(*), sum(a), max(b) FROM t",
            "SELECT now(), pg_catalog.now(), PG_CATALOG.COUNT(*) FROM t",
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), pg_current_wal_lsn()",
            "SELECT currval('s')",
            "SELECT lower(name), coalesce(a, b), nullif(a, 0), greatest(1, 2) FROM t",
            "SELECT \"count\"(*) FROM t",
            "SELECT left(name, 2), right(name, 2) FROM t",
            "SELECT current_setting('x'), version(), current_database()",
        ]);
        assert_writes(&[
            "SELECT nextval('s')",
            "SELECT setval('s', 1)",
            "SELECT my_func()",
            "SELECT pg_advisory_lock(1)",
            "SELECT set_config('a', 'b', false)",
            "SELECT txid_current()",
            "SELECT lo_create(0)",
            "SELECT dblink_exec('x')",
            "SELECT public.count(*) FROM t",
            "SELECT \"nextval\"('s')",
            "SELECT * FROM t WHERE id = (SELECT nextval('s'))",
            "SELECT a FROM t ORDER BY my_func(a)",
            "SELECT x OPERATOR(pg_catalog.+) my_func(1)",
            "SELECT 1 AS x, nextval('s')",
            "SELECT a AS b FROM my_srf()",
            "SELECT x FROM t AS a WHERE my_func(x)",
            "SELECT * FROM t a, my_srf() b",
            "SELECT * FROM t a JOIN my_srf() b ON true",
            "SELECT * FROM t JOIN u ON t.id = u.id AND my_func(u.a)",
            "SELECT * FROM t JOIN u ON t.id = nextval('s')",
            "SELECT * FROM t, LATERAL (SELECT nextval('s')) s",
            "SELECT * FROM generate_series(1, 2) g(i) WHERE my_func(i)",
        ]);
    }

    #[test]
    fn configured_functions_are_read_only() {
        let functions = ReadOnlyFunctions::new(&["My_Func".into(), "reports.summary".into()]);
        let reads = |sql: &str| analyze(sql.as_bytes(), &functions).read_only;
        assert!(reads("SELECT my_func(), MY_FUNC(1)"));
        assert!(reads("SELECT reports.summary(1)"));
        assert!(reads("SELECT \"reports\".\"summary\"(1)"));
        assert!(!reads("SELECT summary(1)"));
        assert!(!reads("SELECT other.summary(1)"));
    }

    #[test]
    fn syntax_with_parentheses_is_not_a_call() {
        assert_reads(&[
            "SELECT CAST(a AS varchar(10)), a::numeric(10,2), a::timestamp(3) FROM t",
            "SELECT a::character varying(5), a::bit varying(3), b::bit(3), c::interval(2)",
            "SELECT CAST(a AS public.mytype(3)), a::mytype(4)",
            "SELECT EXTRACT(year FROM ts), SUBSTRING(s FROM 1 FOR 2), TRIM(BOTH 'x' FROM s)",
            "SELECT POSITION('a' IN s), OVERLAY(s PLACING 'x' FROM 2 FOR 1) FROM t",
            "SELECT count(*) FILTER (WHERE a > 1) OVER (PARTITION BY b ORDER BY c) FROM t",
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t",
            "SELECT ROW(1, 2), ARRAY(SELECT 1), EXISTS(SELECT 1) ",
            "SELECT a FROM t GROUP BY ROLLUP(a), CUBE(b), GROUPING SETS((a), (b))",
            "SELECT * FROM t JOIN u USING (id) WHERE NOT (a = 1)",
            "SELECT * FROM t AS x(a, b)",
            "SELECT * FROM generate_series(1, 3) g(i)",
            "SELECT * FROM unnest(ARRAY[1, 2]) WITH ORDINALITY AS u(v, n)",
            "SELECT * FROM t TABLESAMPLE bernoulli(10) REPEATABLE (1)",
            "SELECT a IS DISTINCT FROM b, CASE WHEN (a) THEN (b) ELSE (c) END FROM t",
            "SELECT x::timestamp with time zone, interval '1 day'",
        ]);
    }

    #[test]
    fn functions_in_from_are_calls() {
        assert_reads(&["SELECT * FROM generate_series(1, 10)"]);
        assert_writes(&[
            "SELECT * FROM my_srf(1)",
            "SELECT * FROM t, LATERAL my_srf(t.a)",
            "SELECT * FROM t JOIN LATERAL my_srf(t.a) ON true",
            "SELECT * FROM ROWS FROM (generate_series(1, 2), my_srf())",
            "SELECT * FROM t, nextval('s') AS n",
        ]);
    }

    #[test]
    fn ctes() {
        assert_reads(&[
            "WITH x AS (SELECT * FROM t) SELECT * FROM x",
            "WITH x(a, b) AS (SELECT 1, 2), y AS MATERIALIZED (SELECT 3) SELECT * FROM x, y",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
             SEARCH DEPTH FIRST BY n SET ord SELECT * FROM r",
            "WITH x AS NOT MATERIALIZED (SELECT 1) SELECT * FROM x",
        ]);
        assert_writes(&[
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i",
            "WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT 1",
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "WITH x AS (SELECT nextval('s')) SELECT * FROM x",
            "WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x",
        ]);
    }

    #[test]
    fn explain() {
        assert_reads(&[
            "EXPLAIN SELECT * FROM t",
            "EXPLAIN DELETE FROM t",
            "EXPLAIN (FORMAT JSON) UPDATE t SET a = 1",
            "EXPLAIN VERBOSE SELECT nextval('s')",
            "EXPLAIN ANALYZE SELECT * FROM t",
            "EXPLAIN (ANALYZE, BUFFERS) SELECT count(*) FROM t",
            "EXPLAIN (ANALYZE false) DELETE FROM t",
        ]);
        assert_writes(&[
            "EXPLAIN ANALYZE DELETE FROM t",
            "EXPLAIN ANALYSE INSERT INTO t VALUES (1)",
            "EXPLAIN (ANALYZE) UPDATE t SET a = 1",
            "EXPLAIN (ANALYZE on, VERBOSE) SELECT nextval('s')",
            "EXPLAIN ANALYZE VERBOSE SELECT * FROM t FOR UPDATE",
            "EXPLAIN",
        ]);
        assert_eq!(tables("EXPLAIN DELETE FROM t"), ["t"]);
    }

    #[test]
    fn cursors_and_transaction_control_are_neutral() {
        assert_reads(&[
            "DECLARE c CURSOR FOR SELECT * FROM t",
            "DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1",
            "FETCH 10 FROM c",
            "FETCH ALL IN c",
            "MOVE NEXT FROM c",
            "CLOSE c",
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "SAVEPOINT a",
            "RELEASE SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
            "BEGIN; SELECT 1; COMMIT",
        ]);
        assert_writes(&[
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
            "DECLARE c CURSOR FOR SELECT nextval('s')",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT",
        ]);
        assert!(tables("FETCH 10 FROM c").is_empty());
    }

    #[test]
    fn copy_directions() {
        assert_reads(&[
            "COPY t TO STDOUT",
            "COPY t (a, b) TO STDOUT WITH (FORMAT csv)",
            "COPY (SELECT * FROM t WHERE a > 1) TO STDOUT",
        ]);
        assert_writes(&[
            "COPY t FROM STDIN",
            "COPY t (a) FROM STDIN WITH (FORMAT csv)",
            "COPY t TO '/tmp/file'",
            "COPY t TO PROGRAM 'gzip'",
            "COPY (SELECT nextval('s')) TO STDOUT",
        ]);
        assert_eq!(tables("COPY t (a, b) FROM STDIN"), ["t"]);
        assert_eq!(tables("COPY (SELECT * FROM s.u) TO STDOUT"), ["s.u"]);
    }

    #[test]
    fn transaction_blocks() {
        let a = run("BEGIN");
        assert!(a.read_only && a.begins_transaction && !a.read_only_transaction);
        for sql in [
            "BEGIN READ ONLY",
            "begin transaction read only",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "BEGIN; SET TRANSACTION READ ONLY;",
            "BEGIN WORK ISOLATION LEVEL READ COMMITTED READ ONLY",
        ] {
            let a = run(sql);
            assert!(a.begins_transaction && a.read_only_transaction, "{sql}");
            assert!(!a.serializable, "{sql}");
        }
        let a = run("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE");
        assert!(a.read_only && a.begins_transaction && a.read_only_transaction);
        assert!(a.serializable);
        for sql in [
            "START TRANSACTION READ WRITE",
            "BEGIN READ ONLY; COMMIT; BEGIN",
            "BEGIN; SET TRANSACTION READ WRITE",
            "SET TRANSACTION READ ONLY",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SELECT 'BEGIN READ ONLY'",
        ] {
            assert!(!run(sql).read_only_transaction, "{sql}");
        }
        assert!(!run("SELECT 'BEGIN'").begins_transaction);
        // SET is never a read, even SET TRANSACTION: the flags carry the mode.
        assert!(!run("BEGIN; SET TRANSACTION READ ONLY;").read_only);
    }

    #[test]
    fn hints_in_both_spellings() {
        assert_eq!(
            run("/*+ route=primary */ SELECT 1").hint,
            Some(RouteHint::Primary)
        );
        assert_eq!(
            run("SELECT 1 /* helios:route=standby */").hint,
            Some(RouteHint::Standby)
        );
        assert_eq!(
            run("-- helios:route=NEAREST\nSELECT 1").hint,
            Some(RouteHint::Nearest)
        );
        assert_eq!(
            run("SELECT /* HELIOS:ROUTE=replica */ 1").hint,
            Some(RouteHint::Standby)
        );
        let a = run("/* helios:route=standby helios:cache=skip */ SELECT 1");
        assert_eq!(a.hint, Some(RouteHint::Standby));
        assert!(a.cache_skip);
        let a = run("/* helios:route=standby,helios:cache=skip */ INSERT INTO t VALUES (1)");
        assert_eq!(a.hint, Some(RouteHint::Standby));
        assert!(a.cache_skip && !a.read_only);
    }

    #[test]
    fn last_valid_hint_wins_and_unknown_ones_are_ignored() {
        let a = run("/*+ route=primary */ SELECT /* helios:route=standby */ 1");
        assert_eq!(a.hint, Some(RouteHint::Standby));
        let a = run("/* helios:route=primary */ SELECT 1 /* helios:route=sideways */");
        assert_eq!(a.hint, Some(RouteHint::Primary));
        let a = run("/* helios:colour=blue helios:cache=maybe */ SELECT 1");
        assert_eq!((a.hint, a.cache_skip), (None, false));
        // Hint-looking text outside comments or plain comments is no hint.
        assert_eq!(run("SELECT 'helios:route=primary'").hint, None);
        assert_eq!(run("/* route=primary */ SELECT 1").hint, None);
        assert_eq!(run("SELECT $$ /* helios:route=primary */ $$").hint, None);
        assert!(run("-- helios:cache=skip").cache_skip);
    }

    #[test]
    fn tables_from_every_position() {
        assert_eq!(
            tables("SELECT * FROM a, b JOIN c ON true LEFT JOIN d USING (id)"),
            ["a", "b", "c", "d"]
        );
        assert_eq!(
            tables("UPDATE ONLY t SET a = 1 FROM u WHERE t.id = u.id"),
            ["t", "u"]
        );
        assert_eq!(
            tables("INSERT INTO t (a, b) SELECT x, y FROM s"),
            ["t", "s"]
        );
        assert_eq!(
            tables("DELETE FROM t USING u, v WHERE t.id = u.id"),
            ["t", "u", "v"]
        );
        assert_eq!(
            tables("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 1"),
            ["t", "s"]
        );
        assert_eq!(tables("TABLE t"), ["t"]);
        assert_eq!(tables("INSERT INTO s.t(a) VALUES (1)"), ["s.t"]);
        assert_eq!(tables("CREATE TABLE IF NOT EXISTS t (a varchar(3))"), ["t"]);
        assert_eq!(
            tables("TRUNCATE TABLE ONLY a, b RESTART IDENTITY"),
            ["a", "b"]
        );
        assert_eq!(tables("LOCK TABLE a, s.b IN SHARE MODE"), ["a", "s.b"]);
        assert_eq!(tables("COPY t TO STDOUT"), ["t"]);
        assert_eq!(tables("SELECT * INTO new_t FROM t"), ["new_t", "t"]);
        assert_eq!(tables("SELECT * FROM ONLY t"), ["t"]);
        assert_eq!(
            tables("SELECT * FROM (a JOIN b ON a.x = b.x) JOIN c ON true"),
            ["a", "b", "c"]
        );
        assert_eq!(
            tables("SELECT * FROM t WHERE x IN (SELECT y FROM u) AND EXISTS (SELECT 1 FROM v)"),
            ["t", "u", "v"]
        );
        assert_eq!(
            tables("SELECT * FROM (SELECT * FROM inner_t) AS s"),
            ["inner_t"]
        );
        assert_eq!(tables("SELECT a FROM t UNION SELECT a FROM u"), ["t", "u"]);
    }

    #[test]
    fn table_names_fold_like_postgres() {
        assert_eq!(
            run("SELECT * FROM Public.Users, \"MySchema\".\"My\"\"Table\", db.s.t").tables,
            [
                TableRef {
                    schema: Some("public".into()),
                    name: "users".into()
                },
                TableRef {
                    schema: Some("MySchema".into()),
                    name: "My\"Table".into()
                },
                TableRef {
                    schema: Some("s".into()),
                    name: "t".into()
                },
            ]
        );
        assert_eq!(
            tables("SELECT * FROM t, T, \"t\", public.t JOIN t ON true"),
            ["t", "public.t"]
        );
        assert_eq!(tables("SELECT * FROM \"T\""), ["T"]);
    }

    #[test]
    fn functions_and_subqueries_are_not_tables() {
        assert!(tables("SELECT * FROM generate_series(1, 3) g(i)").is_empty());
        assert!(tables("SELECT a, b, c FROM (VALUES (1, 2, 3)) v(a, b, c)").is_empty());
        assert!(tables("SELECT EXTRACT(year FROM ts), a IS DISTINCT FROM b").is_empty());
        assert!(tables("SELECT * FROM t FOR UPDATE OF t").len() == 1);
    }

    #[test]
    fn cte_names_are_not_tables() {
        assert_eq!(
            tables("WITH x AS (SELECT * FROM t), y AS (SELECT * FROM x JOIN u ON true) SELECT * FROM y, x"),
            ["t", "u"]
        );
        assert_eq!(
            tables("WITH \"X\" AS (SELECT 1) SELECT * FROM \"X\", x"),
            ["x"]
        );
        assert_eq!(
            tables("WITH x AS (SELECT 1) SELECT * FROM public.x"),
            ["public.x"]
        );
        assert_eq!(
            tables("WITH RECURSIVE r AS (SELECT 1 UNION SELECT n FROM r) SELECT * FROM r"),
            Vec::<String>::new()
        );
        assert_eq!(
            tables("WITH d AS (DELETE FROM t RETURNING *) INSERT INTO log SELECT * FROM d"),
            ["t", "log"]
        );
        // CTE names are per statement.
        assert_eq!(
            tables("WITH x AS (SELECT 1) SELECT * FROM x; SELECT * FROM x"),
            ["x"]
        );
        let many: String = (0..12).map(|i| format!("c{i} AS (SELECT 1), ")).collect();
        let sql = format!("WITH {many} last AS (SELECT 1) SELECT * FROM c0, c11, last, real_t");
        assert_eq!(tables(&sql), ["real_t"]);
    }

    #[test]
    fn deep_nesting_stays_correct() {
        let deep = format!("SELECT {}1{}", "(".repeat(100), ")".repeat(100));
        assert!(reads(&deep));
        let deep = format!("SELECT {}nextval('s'){}", "(".repeat(100), ")".repeat(100));
        assert!(!reads(&deep));
        let deep = format!(
            "SELECT * FROM t WHERE a IN {}SELECT 1{} AND b IN (SELECT c FROM u)",
            "(".repeat(50),
            ")".repeat(50)
        );
        assert_eq!(tables(&deep), ["t", "u"]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = analyze(&bytes, &ReadOnlyFunctions::new(&[]));
        }

        #[test]
        fn arbitrary_sql_like_text_never_panics(
            words in proptest::collection::vec(
                proptest::sample::select(vec![
                    "SELECT", "FROM", "(", ")", ",", ";", "WITH", "AS", "x", "\"Q\"", ".", "::",
                    "INSERT", "INTO", "UPDATE", "JOIN", "USING", "EXPLAIN", "ANALYZE", "COPY",
                    "TO", "STDOUT", "BEGIN", "READ", "ONLY", "f(", "'s'", "$$a$$", "/*", "*/",
                    "--", "\n", "helios:route=standby", "TRUNCATE", "LOCK", "TABLE", "ONLY",
                ]),
                0..40,
            )
        ) {
            let _ = analyze(words.join(" ").as_bytes(), &ReadOnlyFunctions::new(&[]));
        }
    }
}
