//! What a SQL text does to session state, as far as a transaction pooler must know:
//! whether it changes session settings, creates state tied to one server connection,
//! wipes the server's prepared statements, or leaves a transaction block open.
//!
//! Transaction status itself always comes from ReadyForQuery; this only decides what the
//! pooler must re-check or refuse. Results are cached per prepared statement.

use super::lexer::{Lexer, Token};

/// State that ties a client to one server connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pins(u8);

impl Pins {
    pub const NONE: Pins = Pins(0);
    pub const LISTEN: Pins = Pins(1);
    pub const ADVISORY_LOCK: Pins = Pins(2);
    pub const TEMP_TABLE: Pins = Pins(4);
    pub const HOLD_CURSOR: Pins = Pins(8);
    pub const SQL_PREPARE: Pins = Pins(16);
    pub const SESSION_AUTHORIZATION: Pins = Pins(32);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Pins) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Pins) {
        self.0 |= other.0;
    }

    /// A short description of the first kind present, for error messages.
    pub fn describe(self) -> &'static str {
        const NAMES: [(Pins, &str); 6] = [
            (Pins::LISTEN, "LISTEN"),
            (Pins::ADVISORY_LOCK, "session-level advisory locks"),
            (Pins::TEMP_TABLE, "temporary tables"),
            (Pins::HOLD_CURSOR, "WITH HOLD cursors"),
            (Pins::SQL_PREPARE, "SQL PREPARE"),
            (Pins::SESSION_AUTHORIZATION, "SET SESSION AUTHORIZATION"),
        ];
        NAMES
            .iter()
            .find(|(p, _)| self.contains(*p))
            .map_or("session state", |(_, n)| n)
    }
}

/// What one SQL text (possibly several statements) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Changes session settings (SET, RESET, set_config, DISCARD ALL, …).
    pub touches_settings: bool,
    /// Creates state that lives in one server connection.
    pub pins: Pins,
    /// Removes every prepared statement on the server (DEALLOCATE ALL, DISCARD ALL).
    pub drops_prepared: bool,
    /// A transaction block is still open after the last statement (BEGIN without its end).
    pub opens_transaction: bool,
    /// Changes the schema (CREATE, ALTER, DROP): shared plans may no longer fit.
    pub changes_schema: bool,
    /// Ends a transaction in a way that may commit (COMMIT, END, PREPARE TRANSACTION).
    pub may_commit: bool,
    /// Ends a transaction block one way or the other (those, ROLLBACK, ABORT).
    pub ends_transaction: bool,
}

impl Effects {
    /// Nothing a pooler has to act on.
    pub fn is_plain(&self) -> bool {
        !self.touches_settings
            && self.pins.is_empty()
            && !self.drops_prepared
            && !self.changes_schema
            && !self.may_commit
    }
}

/// Where the walk over one statement stands.
#[derive(Default)]
struct Statement {
    /// Index of the next word in the statement (0 = its first keyword).
    words: usize,
    first: Keyword,
    second: Keyword,
    previous: Keyword,
}

/// The keywords that matter, folded to one compare per word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Keyword {
    #[default]
    None,
    Set,
    Reset,
    Local,
    Global,
    Session,
    Authorization,
    Transaction,
    Constraints,
    Discard,
    All,
    Listen,
    Prepare,
    Deallocate,
    Declare,
    With,
    Hold,
    Create,
    Alter,
    Drop,
    Temp,
    Into,
    Begin,
    Start,
    Commit,
    End,
    Rollback,
    Abort,
    To,
    SetConfig,
    AdvisoryLock,
    Other,
}

fn keyword(word: &[u8]) -> Keyword {
    const TABLE: &[(&str, Keyword)] = &[
        ("set", Keyword::Set),
        ("reset", Keyword::Reset),
        ("local", Keyword::Local),
        ("global", Keyword::Global),
        ("session", Keyword::Session),
        ("authorization", Keyword::Authorization),
        ("transaction", Keyword::Transaction),
        ("constraints", Keyword::Constraints),
        ("discard", Keyword::Discard),
        ("all", Keyword::All),
        ("listen", Keyword::Listen),
        ("prepare", Keyword::Prepare),
        ("deallocate", Keyword::Deallocate),
        ("declare", Keyword::Declare),
        ("with", Keyword::With),
        ("hold", Keyword::Hold),
        ("create", Keyword::Create),
        ("alter", Keyword::Alter),
        ("drop", Keyword::Drop),
        ("temp", Keyword::Temp),
        ("temporary", Keyword::Temp),
        ("into", Keyword::Into),
        ("begin", Keyword::Begin),
        ("start", Keyword::Start),
        ("commit", Keyword::Commit),
        ("end", Keyword::End),
        ("rollback", Keyword::Rollback),
        ("abort", Keyword::Abort),
        ("to", Keyword::To),
        ("set_config", Keyword::SetConfig),
        ("pg_advisory_lock", Keyword::AdvisoryLock),
        ("pg_advisory_lock_shared", Keyword::AdvisoryLock),
        ("pg_try_advisory_lock", Keyword::AdvisoryLock),
        ("pg_try_advisory_lock_shared", Keyword::AdvisoryLock),
    ];
    if word.len() > 27 {
        return Keyword::Other;
    }
    TABLE
        .iter()
        .find(|(name, _)| name.as_bytes().eq_ignore_ascii_case(word))
        .map_or(Keyword::Other, |(_, k)| *k)
}

/// Classifies a SQL text.
pub fn classify(sql: &[u8]) -> Effects {
    let mut effects = Effects::default();
    let mut stmt = Statement::default();
    let mut in_transaction = false;
    for token in Lexer::new(sql) {
        let word = match token {
            Token::Semicolon => {
                stmt = Statement::default();
                continue;
            }
            Token::Word(w) => keyword(w),
            Token::Quoted(_)
            | Token::Other
            | Token::Dot
            | Token::OpenParen
            | Token::CloseParen
            | Token::Comma
            | Token::Cast
            | Token::Comment(_) => {
                // Only a statement's leading words decide its kind.
                if stmt.words < 3 {
                    stmt.words += 1;
                }
                stmt.previous = Keyword::Other;
                continue;
            }
        };
        match word {
            Keyword::SetConfig => effects.touches_settings = true,
            Keyword::AdvisoryLock => effects.pins.insert(Pins::ADVISORY_LOCK),
            _ => {}
        }
        match stmt.words {
            0 => {
                stmt.first = word;
                match word {
                    Keyword::Reset => effects.touches_settings = true,
                    Keyword::Listen => effects.pins.insert(Pins::LISTEN),
                    Keyword::Begin | Keyword::Start => in_transaction = true,
                    Keyword::Create | Keyword::Alter | Keyword::Drop => {
                        effects.changes_schema = true
                    }
                    Keyword::Commit | Keyword::End => {
                        in_transaction = false;
                        effects.may_commit = true;
                        effects.ends_transaction = true;
                    }
                    Keyword::Abort => {
                        in_transaction = false;
                        effects.ends_transaction = true;
                    }
                    _ => {}
                }
            }
            1 => {
                stmt.second = word;
                match (stmt.first, word) {
                    // SET LOCAL / SET TRANSACTION / SET CONSTRAINTS last one transaction.
                    (Keyword::Set, Keyword::Local)
                    | (Keyword::Set, Keyword::Transaction)
                    | (Keyword::Set, Keyword::Constraints)
                    | (Keyword::Set, Keyword::Session) => {}
                    (Keyword::Set, _) => effects.touches_settings = true,
                    (Keyword::Discard, Keyword::All) => {
                        effects.touches_settings = true;
                        effects.drops_prepared = true;
                    }
                    (Keyword::Deallocate, Keyword::All) => effects.drops_prepared = true,
                    (Keyword::Prepare, Keyword::Transaction) => {
                        in_transaction = false;
                        effects.may_commit = true;
                        effects.ends_transaction = true;
                    }
                    (Keyword::Prepare, _) => effects.pins.insert(Pins::SQL_PREPARE),
                    (Keyword::Rollback, Keyword::To) => {}
                    (Keyword::Rollback, _) => {
                        in_transaction = false;
                        effects.ends_transaction = true;
                    }
                    (Keyword::Create, Keyword::Temp) => effects.pins.insert(Pins::TEMP_TABLE),
                    _ => {}
                }
            }
            2 => match (stmt.first, stmt.second, word) {
                (Keyword::Set, Keyword::Session, Keyword::Authorization) => {
                    effects.pins.insert(Pins::SESSION_AUTHORIZATION)
                }
                // SET SESSION CHARACTERISTICS … / SET SESSION name = …
                (Keyword::Set, Keyword::Session, _) => effects.touches_settings = true,
                (Keyword::Deallocate, Keyword::Prepare, Keyword::All) => {
                    effects.drops_prepared = true
                }
                // CREATE GLOBAL|LOCAL TEMP …
                (Keyword::Create, Keyword::Local | Keyword::Global, Keyword::Temp) => {
                    effects.pins.insert(Pins::TEMP_TABLE)
                }
                _ => {}
            },
            _ => {}
        }
        if word == Keyword::Hold && stmt.previous == Keyword::With && stmt.first == Keyword::Declare
        {
            effects.pins.insert(Pins::HOLD_CURSOR);
        }
        if word == Keyword::Temp && stmt.previous == Keyword::Into {
            effects.pins.insert(Pins::TEMP_TABLE);
        }
        // A lone ROLLBACK/COMMIT ends the block even without a second word.
        if stmt.words < 3 {
            stmt.words += 1;
        }
        stmt.previous = word;
    }
    // A trailing ROLLBACK with nothing after it was seen as a first word only.
    if stmt.first == Keyword::Rollback && stmt.words == 1 {
        in_transaction = false;
        effects.ends_transaction = true;
    }
    effects.opens_transaction = in_transaction;
    effects
}

/// The statement name of a text that is exactly one `DEALLOCATE [PREPARE] name`
/// (unquoted names fold to lower case, as the server folds them).
pub fn deallocate_name(sql: &[u8]) -> Option<Vec<u8>> {
    let mut tokens = Lexer::new(sql);
    match tokens.next()? {
        Token::Word(w) if keyword(w) == Keyword::Deallocate => {}
        _ => return None,
    }
    let mut next = tokens.next()?;
    if matches!(next, Token::Word(w) if keyword(w) == Keyword::Prepare) {
        next = tokens.next()?;
    }
    let name = match next {
        Token::Word(w) if keyword(w) != Keyword::All => w.to_ascii_lowercase(),
        Token::Quoted(q) => q.to_vec(),
        _ => return None,
    };
    match tokens.next() {
        None => Some(name),
        Some(Token::Semicolon) if tokens.next().is_none() => Some(name),
        _ => None,
    }
}

/// Names of settings that `SET`/`RESET` statements in `sql` change and that the server's
/// `pg_settings` view does not list: custom (dotted) names and `role`. Appended to `out`,
/// lower-cased, without duplicates.
pub fn unlisted_setting_names(sql: &[u8], out: &mut Vec<String>) {
    let mut words = 0usize;
    let mut name = String::new();
    let mut collecting = false;
    let finish = |name: &mut String, out: &mut Vec<String>| {
        if (name.contains('.') || name == "role") && !out.contains(name) {
            out.push(std::mem::take(name));
        }
        name.clear();
    };
    for token in Lexer::new(sql) {
        if token == Token::Semicolon {
            if collecting {
                finish(&mut name, out);
            }
            words = 0;
            collecting = false;
            continue;
        }
        if words == 0 {
            let first = match token {
                Token::Word(w) => keyword(w),
                _ => Keyword::Other,
            };
            collecting = matches!(first, Keyword::Set | Keyword::Reset);
            words = 1;
            continue;
        }
        words += 1;
        if !collecting {
            continue;
        }
        match token {
            Token::Word(w) if words == 2 && matches!(keyword(w), Keyword::Local) => {
                collecting = false;
            }
            Token::Word(w) if words == 2 && matches!(keyword(w), Keyword::Session) => {}
            Token::Word(w) | Token::Quoted(w) => {
                if !name.is_empty() && !name.ends_with('.') {
                    finish(&mut name, out);
                    collecting = false;
                    continue;
                }
                name.push_str(&String::from_utf8_lossy(w).to_ascii_lowercase());
            }
            Token::Dot => name.push('.'),
            _ => {
                finish(&mut name, out);
                collecting = false;
            }
        }
    }
    if collecting {
        finish(&mut name, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fx(sql: &str) -> Effects {
        classify(sql.as_bytes())
    }

    #[test]
    fn plain_queries_have_no_effects() {
        for sql in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = $1",
            "INSERT INTO t VALUES ('SET x = 1; LISTEN y')",
            "SELECT $$ BEGIN; LISTEN a; $$",
            "-- SET x\nSELECT 1",
            "UPDATE t SET a = 1",
            "SET LOCAL statement_timeout = 5",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SELECT pg_advisory_xact_lock(1)",
            "DEALLOCATE foo",
        ] {
            assert!(fx(sql).is_plain(), "{sql}: {:?}", fx(sql));
            assert!(!fx(sql).opens_transaction, "{sql}");
        }
    }

    #[test]
    fn commits_are_seen_in_any_statement() {
        for sql in [
            "COMMIT",
            "end;",
            "INSERT INTO t VALUES (1); COMMIT",
            "/* x */ Commit work",
            "COMMIT PREPARED 'x'",
            "PREPARE TRANSACTION 'x'",
        ] {
            assert!(fx(sql).may_commit, "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES ('COMMIT')",
            "SELECT 1",
            "ROLLBACK",
            "PREPARE p AS SELECT 1",
            "SELECT commit FROM t",
            "BEGIN",
        ] {
            assert!(!fx(sql).may_commit, "{sql}");
        }
    }

    #[test]
    fn settings_changes_are_seen() {
        for sql in [
            "SET search_path = x",
            "set application_name to 'a'",
            "SET SESSION statement_timeout = 5",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "RESET ALL",
            "reset work_mem",
            "SELECT pg_catalog.set_config('search_path', '', false)",
            "SELECT 1; SET ROLE other",
            "/* hint */ SET x.y = 1",
        ] {
            assert!(fx(sql).touches_settings, "{sql}");
        }
        assert!(fx("ALTER TABLE t ADD COLUMN c int").changes_schema);
        assert!(fx("drop view v").changes_schema);
        assert!(!fx("SELECT 'alter'").changes_schema);
        let discard = fx("DISCARD ALL");
        assert!(discard.touches_settings && discard.drops_prepared);
        assert!(fx("DEALLOCATE ALL").drops_prepared);
        assert!(fx("deallocate prepare all").drops_prepared);
    }

    #[test]
    fn connection_bound_state_pins() {
        let cases = [
            ("LISTEN chan", Pins::LISTEN),
            ("SELECT pg_advisory_lock(1)", Pins::ADVISORY_LOCK),
            (
                "select pg_catalog.pg_try_advisory_lock_shared(1, 2)",
                Pins::ADVISORY_LOCK,
            ),
            ("CREATE TEMP TABLE t (a int)", Pins::TEMP_TABLE),
            ("create temporary table t as select 1", Pins::TEMP_TABLE),
            ("CREATE LOCAL TEMP TABLE t ()", Pins::TEMP_TABLE),
            ("SELECT 1 INTO TEMP t", Pins::TEMP_TABLE),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Pins::HOLD_CURSOR),
            ("PREPARE p AS SELECT 1", Pins::SQL_PREPARE),
            (
                "SET SESSION AUTHORIZATION other",
                Pins::SESSION_AUTHORIZATION,
            ),
        ];
        for (sql, pin) in cases {
            assert!(fx(sql).pins.contains(pin), "{sql}: {:?}", fx(sql));
        }
        assert!(fx("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1")
            .pins
            .is_empty());
        assert!(fx("PREPARE TRANSACTION 'x'").pins.is_empty());
        assert!(fx("CREATE TABLE temp (a int)").pins.is_empty());
    }

    #[test]
    fn single_deallocates_are_recognised() {
        assert_eq!(deallocate_name(b"DEALLOCATE Foo"), Some(b"foo".to_vec()));
        assert_eq!(
            deallocate_name(b"deallocate prepare \"Foo\";"),
            Some(b"Foo".to_vec())
        );
        assert_eq!(deallocate_name(b"DEALLOCATE ALL"), None);
        assert_eq!(deallocate_name(b"DEALLOCATE a; SELECT 1"), None);
        assert_eq!(deallocate_name(b"SELECT 1"), None);
    }

    #[test]
    fn unlisted_names_are_extracted() {
        let mut names = Vec::new();
        unlisted_setting_names(
            b"SET helios.client = '1'; SET search_path TO a; RESET ROLE; set session my.\"Opt\" to 1; SET LOCAL x.y = 1; SET role = other",
            &mut names,
        );
        assert_eq!(names, ["helios.client", "role", "my.opt"]);
    }

    #[test]
    fn open_transactions_are_seen() {
        assert!(fx("BEGIN").opens_transaction);
        assert!(fx("START TRANSACTION READ ONLY").opens_transaction);
        assert!(fx("begin; insert into t values (1)").opens_transaction);
        assert!(fx("BEGIN; SAVEPOINT a; ROLLBACK TO a").opens_transaction);
        assert!(!fx("BEGIN; INSERT INTO t VALUES (1); COMMIT").opens_transaction);
        assert!(!fx("begin; select 1; rollback").opens_transaction);
        assert!(!fx("BEGIN; SELECT 1; END;").opens_transaction);
        assert!(!fx("BEGIN; PREPARE TRANSACTION 'gx'").opens_transaction);
        assert!(!fx("SELECT 'BEGIN'").opens_transaction);
    }
}
