//! What a unit's writes invalidate, gathered as its statements go to the server and
//! applied before the client hears that they completed.

use crate::sql::lexer::{Lexer, Token};

use super::Epochs;

/// The invalidations a unit owes.
#[derive(Default, Debug)]
pub struct Writes {
    /// Table slots its writes reach.
    pub slots: Vec<u32>,
    /// A write whose reach is unknown: everything goes.
    pub everything: bool,
    /// DDL: everything goes, and what statements read is learned again.
    pub catalog: bool,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && !self.everything && !self.catalog
    }

    pub fn add(&mut self, slots: &[u32]) {
        for slot in slots {
            if !self.slots.contains(slot) {
                self.slots.push(*slot);
            }
        }
    }

    /// Moves the epochs: results read before this instant are stale.
    pub fn apply(&self, epochs: &Epochs) {
        if self.catalog {
            epochs.catalog_changed();
        } else if self.everything {
            epochs.invalidate_all();
        } else if !self.slots.is_empty() {
            epochs.invalidate(&self.slots);
        }
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.everything = false;
        self.catalog = false;
    }
}

/// What a statement that is neither a query nor a plain data change may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// No table's rows (SET, LISTEN, VACUUM, transaction control, …).
    Nothing,
    /// Rows of any table (COMMIT PREPARED, statements the list does not know, …).
    Everything,
    /// The catalog itself (CREATE, ALTER, DROP, GRANT, REFRESH, CALL, DO, EXECUTE, …).
    Catalog,
}

/// The widest reach among the statements of `sql`, judged by their leading words.
pub fn reach(sql: &[u8]) -> Reach {
    let mut widest = Reach::Nothing;
    let mut depth = 0usize;
    let mut words = 0usize;
    let mut first: &[u8] = b"";
    for token in Lexer::new(sql) {
        match token {
            Token::Semicolon if depth == 0 => {
                words = 0;
                first = b"";
            }
            Token::OpenParen => depth += 1,
            Token::CloseParen => depth = depth.saturating_sub(1),
            Token::Word(word) if depth == 0 => {
                words += 1;
                let this = if words == 1 {
                    first = word;
                    leading(word)
                } else if words == 2
                    && (first.eq_ignore_ascii_case(b"commit")
                        || first.eq_ignore_ascii_case(b"rollback"))
                    && word.eq_ignore_ascii_case(b"prepared")
                {
                    // A two-phase transaction's changes, made who knows where.
                    Reach::Everything
                } else {
                    continue;
                };
                widest = wider(widest, this);
            }
            _ => {}
        }
    }
    widest
}

fn wider(a: Reach, b: Reach) -> Reach {
    match (a, b) {
        (Reach::Catalog, _) | (_, Reach::Catalog) => Reach::Catalog,
        (Reach::Everything, _) | (_, Reach::Everything) => Reach::Everything,
        _ => Reach::Nothing,
    }
}

fn leading(word: &[u8]) -> Reach {
    // (CALL, DO and EXECUTE run code that may change the catalog too: migration tools
    // wrap DDL in DO blocks.)
    const CATALOG: &[&[u8]] = &[
        b"alter",
        b"call",
        b"cluster",
        b"comment",
        b"create",
        b"do",
        b"drop",
        b"execute",
        b"grant",
        b"import",
        b"reassign",
        b"refresh",
        b"reindex",
        b"revoke",
        b"security",
    ];
    const NOTHING: &[&[u8]] = &[
        b"abort",
        b"analyse",
        b"analyze",
        b"begin",
        b"checkpoint",
        b"close",
        b"commit",
        b"deallocate",
        b"declare",
        b"discard",
        b"end",
        b"fetch",
        b"listen",
        b"load",
        b"lock",
        b"move",
        b"notify",
        b"prepare",
        b"release",
        b"reset",
        b"rollback",
        b"savepoint",
        b"select",
        b"set",
        b"show",
        b"start",
        b"table",
        b"unlisten",
        b"vacuum",
        b"values",
        b"with",
    ];
    let is = |list: &[&[u8]]| list.iter().any(|w| w.eq_ignore_ascii_case(word));
    if is(CATALOG) {
        Reach::Catalog
    } else if is(NOTHING) {
        Reach::Nothing
    } else {
        Reach::Everything
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_reach_by_their_leading_words() {
        assert_eq!(reach(b"SET search_path = a"), Reach::Nothing);
        assert_eq!(reach(b"BEGIN; LISTEN x; COMMIT"), Reach::Nothing);
        assert_eq!(reach(b"CALL refill()"), Reach::Catalog);
        assert_eq!(reach(b"DO $$ BEGIN DELETE FROM t; END $$"), Reach::Catalog);
        assert_eq!(reach(b"VACUUM t; CHECKPOINT"), Reach::Nothing);
        assert_eq!(reach(b"NOTIFY c; UNKNOWNWORD x"), Reach::Everything);
        assert_eq!(reach(b"COMMIT PREPARED 'x'"), Reach::Everything);
        assert_eq!(reach(b"SET x = 1; CREATE TABLE t (a int)"), Reach::Catalog);
        assert_eq!(reach(b"drop view v"), Reach::Catalog);
        assert_eq!(reach(b"REFRESH MATERIALIZED VIEW m"), Reach::Catalog);
    }

    #[test]
    fn applying_moves_the_right_epochs() {
        let epochs = Epochs::default();
        let mut w = Writes::default();
        assert!(w.is_empty());
        w.add(&[3, 3, 4]);
        assert_eq!(w.slots, [3, 4]);
        w.apply(&epochs);
        assert_eq!(
            (epochs.epoch(3), epochs.epoch(4), epochs.global()),
            (1, 1, 0)
        );
        w.everything = true;
        w.apply(&epochs);
        assert_eq!(epochs.global(), 1);
        w.catalog = true;
        w.apply(&epochs);
        assert_eq!((epochs.global(), epochs.catalog()), (2, 1));
    }
}
