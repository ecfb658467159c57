//! The normalized form of a statement (the L3 tier's key): comments dropped, spacing
//! collapsed, unquoted words lower-cased (PostgreSQL folds them anyway), and the
//! constants of conditions and limits lifted out as parameters — so
//! `select * from t where id=42`, `SELECT * FROM t WHERE id = 42 /* x */` and a prepared
//! `SELECT * FROM t WHERE id = $1` bound to `42` come out alike.
//!
//! Only what cannot change the answer's bytes is lifted: constants in WHERE, HAVING, ON,
//! LIMIT and OFFSET (a constant in the select list decides a column's type, and `ORDER
//! BY 1` means a column), and not a typed literal (`date '…'`). Each lifted value keeps
//! the type PostgreSQL gives it: an integer literal is int4 (or int8, numeric), a
//! decimal numeric, a quoted string unknown (resolved by its context, exactly as an
//! untyped parameter is); a parameter has the type its Parse declared (0: unknown).

use super::key::is_operator_byte;
use crate::sql::lexer::{Lexer, Token};

/// Types of lifted values, as PostgreSQL's type oids (0: unknown).
pub const UNKNOWN: u32 = 0;
const INT4: u32 = 23;
const INT8: u32 = 20;
const NUMERIC: u32 = 1700;

/// One lifted value: its type and its text (`None`: SQL NULL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifted<'a> {
    pub type_oid: u32,
    pub value: Option<&'a [u8]>,
}

/// A parameter's declared type and text value (a Bind's, in text format).
pub type Param<'a> = (u32, Option<&'a [u8]>);

/// Clauses whose constants may be lifted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clause {
    Other,
    Condition,
}

/// Writes the normalized form of `sql` to `out` and the lifted values (and every
/// parameter reference, in order) to `values`. `params` are the statement's bound
/// parameters (empty for a simple Query). Returns false when the text cannot be
/// normalized (a parameter reference past `params`, an unterminated literal).
pub fn normalize<'a>(
    sql: &'a [u8],
    params: &[Param<'a>],
    out: &mut Vec<u8>,
    values: &mut Vec<Lifted<'a>>,
) -> bool {
    // The clause at each parenthesis depth (a deeper level inherits its parent's until
    // a SELECT starts a subquery there).
    let mut clauses = [Clause::Other; 33];
    let mut depth = 0usize;
    // The depth of an `IN (…)` list being read, if any.
    let mut in_list: Option<usize> = None;
    let mut lexer = Lexer::new(sql);
    // What came just before: a value may be lifted only right after a comparison, LIKE,
    // LIMIT or OFFSET, or as an element of an IN list (where its type comes from the
    // other side, exactly as an untyped parameter's would).
    let mut before = Before::Other;
    let mut previous_word: &[u8] = b"";
    let mut operator_end = usize::MAX;
    let mut operator = Vec::new();
    while let Some(token) = lexer.next() {
        let (start, end) = (lexer.token_start(), lexer.offset());
        let text = &sql[start..end];
        let is_operator =
            token == Token::Other && text.first().is_some_and(|b| is_operator_byte(*b));
        if is_operator {
            // One operator name is a run of operator bytes written together.
            if start != operator_end {
                operator.clear();
                space(out);
            }
            out.extend_from_slice(text);
            operator.extend_from_slice(text);
            operator_end = end;
            before = if COMPARISONS.contains(&operator.as_slice()) {
                Before::Comparison
            } else {
                Before::Other
            };
            continue;
        }
        operator_end = usize::MAX;
        let clause = clauses[depth.min(32)];
        let liftable = clause == Clause::Condition
            && match before {
                Before::Comparison | Before::LiftingWord => true,
                Before::ListItem => in_list == Some(depth),
                Before::Other => false,
            };
        let mut next_before = Before::Other;
        match token {
            Token::Word(word) => {
                match keyword_clause(word) {
                    // `DISTINCT ON (…)` is part of the select list.
                    Some(Clause::Condition)
                        if word.eq_ignore_ascii_case(b"on")
                            && previous_word.eq_ignore_ascii_case(b"distinct") => {}
                    Some(c) => clauses[depth.min(32)] = c,
                    None if word.eq_ignore_ascii_case(b"select") => {
                        clauses[depth.min(32)] = Clause::Other
                    }
                    None => {}
                }
                if LIFTING_WORDS.iter().any(|w| w.eq_ignore_ascii_case(word)) {
                    next_before = Before::LiftingWord;
                }
                space(out);
                out.extend(word.iter().map(u8::to_ascii_lowercase));
                previous_word = word;
            }
            Token::Quoted(_) => {
                space(out);
                out.extend_from_slice(text);
                previous_word = b"";
            }
            Token::OpenParen => {
                out.push(b'(');
                if previous_word.eq_ignore_ascii_case(b"in") {
                    in_list = Some(depth + 1);
                    next_before = Before::ListItem;
                }
                depth += 1;
                clauses[depth.min(32)] = clause;
                previous_word = b"";
            }
            Token::CloseParen => {
                out.push(b')');
                if in_list == Some(depth) {
                    in_list = None;
                }
                depth = depth.saturating_sub(1);
                previous_word = b"";
            }
            Token::Comma => {
                out.push(b',');
                if in_list == Some(depth) {
                    next_before = Before::ListItem;
                }
                previous_word = b"";
            }
            Token::Semicolon => out.push(b';'),
            Token::Dot => out.push(b'.'),
            Token::Cast => out.extend_from_slice(b"::"),
            Token::Comment(_) => continue,
            Token::Other => {
                previous_word = b"";
                match literal(text) {
                    Some(Literal::String(value)) if liftable => {
                        lift_mark(out);
                        values.push(Lifted {
                            type_oid: UNKNOWN,
                            value: Some(value),
                        });
                    }
                    Some(Literal::Number) => {
                        // The lexer splits numbers: take the whole run of digits.
                        let whole = number_at(sql, start);
                        while lexer.offset() < start + whole.len() {
                            lexer.next();
                        }
                        if liftable {
                            lift_mark(out);
                            values.push(Lifted {
                                type_oid: number_type(whole),
                                value: Some(whole),
                            });
                        } else {
                            space(out);
                            out.extend_from_slice(whole);
                        }
                    }
                    Some(Literal::Param(n)) => {
                        let Some(&(type_oid, value)) = n.checked_sub(1).and_then(|i| params.get(i))
                        else {
                            return false;
                        };
                        if liftable {
                            lift_mark(out);
                        } else {
                            space(out);
                            out.extend_from_slice(text);
                        }
                        values.push(Lifted { type_oid, value });
                    }
                    Some(Literal::String(_)) | None => {
                        if text.first() == Some(&b'\'') && !text.ends_with(b"'") {
                            return false;
                        }
                        space(out);
                        out.extend_from_slice(text);
                    }
                }
            }
        }
        before = next_before;
    }
    true
}

/// What came before a value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Before {
    Comparison,
    LiftingWord,
    ListItem,
    Other,
}

/// Operators whose other side types an untyped value.
const COMPARISONS: &[&[u8]] = &[b"=", b"<>", b"!=", b"<", b">", b"<=", b">="];

/// Words after which a value is lifted.
const LIFTING_WORDS: &[&[u8]] = &[b"like", b"ilike", b"limit", b"offset"];

/// What an `Other` token is.
enum Literal<'a> {
    /// A plain quoted string's content (no E, B, X or U& prefix, no doubled quotes).
    String(&'a [u8]),
    /// A number (its first byte: the lexer reports digits one by one).
    Number,
    /// `$n`.
    Param(usize),
}

fn literal(text: &[u8]) -> Option<Literal<'_>> {
    match text.first()? {
        b'\'' => {
            let inner = text.strip_prefix(b"'")?.strip_suffix(b"'")?;
            // A doubled quote would need unescaping to compare: keep it verbatim.
            (!inner.contains(&b'\'')).then_some(Literal::String(inner))
        }
        b'$' => std::str::from_utf8(&text[1..])
            .ok()?
            .parse()
            .ok()
            .map(Literal::Param),
        c if c.is_ascii_digit() => Some(Literal::Number),
        _ => None,
    }
}

/// The number starting at `at`: digits and a decimal point (an exponent is left to the
/// lexer's next word, so it never swallows what follows it).
fn number_at(sql: &[u8], at: usize) -> &[u8] {
    let mut end = at;
    let digits = |end: &mut usize| {
        while sql.get(*end).is_some_and(u8::is_ascii_digit) {
            *end += 1;
        }
    };
    digits(&mut end);
    if sql.get(end) == Some(&b'.') && sql.get(end + 1).is_some_and(u8::is_ascii_digit) {
        end += 1;
        digits(&mut end);
    }
    &sql[at..end]
}

/// The type PostgreSQL gives a numeric literal.
fn number_type(number: &[u8]) -> u32 {
    if number.iter().all(u8::is_ascii_digit) {
        let text = std::str::from_utf8(number).unwrap_or("");
        if text.parse::<i32>().is_ok() {
            INT4
        } else if text.parse::<i64>().is_ok() {
            INT8
        } else {
            NUMERIC
        }
    } else {
        NUMERIC
    }
}

/// The clause a word starts, if it starts one that matters here.
fn keyword_clause(word: &[u8]) -> Option<Clause> {
    const CONDITIONS: &[&[u8]] = &[b"where", b"having", b"on", b"limit", b"offset"];
    const OTHERS: &[&[u8]] = &[
        b"from",
        b"group",
        b"order",
        b"returning",
        b"values",
        b"window",
        b"union",
        b"intersect",
        b"except",
        b"fetch",
        b"for",
    ];
    if CONDITIONS.iter().any(|k| k.eq_ignore_ascii_case(word)) {
        Some(Clause::Condition)
    } else if OTHERS.iter().any(|k| k.eq_ignore_ascii_case(word)) {
        Some(Clause::Other)
    } else {
        None
    }
}

fn space(out: &mut Vec<u8>) {
    if !out.is_empty() && !matches!(out.last(), Some(b'(' | b'.')) {
        out.push(b' ');
    }
}

/// Writes the mark a lifted value leaves in the normalized text.
fn lift_mark(out: &mut Vec<u8>) {
    space(out);
    out.push(b'?');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm<'a>(sql: &'a str, params: &[Param<'a>]) -> (String, Vec<Lifted<'a>>) {
        let (mut out, mut values) = (Vec::new(), Vec::new());
        assert!(
            normalize(sql.as_bytes(), params, &mut out, &mut values),
            "{sql}"
        );
        (String::from_utf8(out).unwrap(), values)
    }

    #[test]
    fn spellings_of_one_query_meet() {
        let a = norm("select * from t where id=42", &[]);
        let b = norm("SELECT *  FROM t\n WHERE id = 42 /* x */", &[]);
        let c = norm("SELECT * FROM t WHERE id = $1", &[(23, Some(b"42"))]);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            a.1,
            [Lifted {
                type_oid: INT4,
                value: Some(&b"42"[..])
            }]
        );
        // A parameter of unknown type meets a quoted string, not a number.
        let s = norm("SELECT * FROM t WHERE name = 'bob'", &[]);
        assert_eq!(
            s,
            norm("SELECT * FROM t WHERE name = $1", &[(0, Some(b"bob"))])
        );
        assert_ne!(
            a,
            norm("SELECT * FROM t WHERE id = $1", &[(0, Some(b"42"))])
        );
    }

    #[test]
    fn constants_that_shape_the_answer_stay() {
        // Select-list constants, ORDER BY positions and typed literals are kept.
        let (text, values) = norm(
            "SELECT 1, 'a' FROM t WHERE d > date '2024-01-01' AND x IN (1, 2.5) ORDER BY 1 LIMIT 10",
            &[],
        );
        assert_eq!(
            text,
            "select 1, 'a' from t where d > date '2024-01-01' and x in(?, ?) order by 1 limit ?"
        );
        let types: Vec<u32> = values.iter().map(|v| v.type_oid).collect();
        assert_eq!(types, [INT4, NUMERIC, INT4]);
        // A subquery's select list is a select list again.
        let (text, _) = norm(
            "SELECT * FROM t WHERE a = (SELECT 5 FROM u WHERE b = 6)",
            &[],
        );
        assert_eq!(
            text,
            "select * from t where a =(select 5 from u where b = ?)"
        );
        assert_eq!(number_type(b"3000000000"), INT8);
        assert_eq!(number_type(b"1e5"), NUMERIC);
    }

    #[test]
    fn only_values_typed_by_their_context_are_lifted() {
        // Where an untyped parameter fails (no other side to type it), nothing is lifted.
        let (text, values) = norm("SELECT * FROM t WHERE $1 IS NULL", &[(0, Some(b"x"))]);
        assert_eq!(text, "select * from t where $1 is null");
        assert_eq!(values.len(), 1);
        assert_ne!(
            norm("SELECT * FROM t WHERE 'x' IS NULL", &[]).0,
            norm("SELECT * FROM t WHERE $1 IS NULL", &[(0, Some(b"x"))]).0
        );
        // DISTINCT ON belongs to the select list.
        let (text, values) = norm("SELECT DISTINCT ON (1) a, b FROM t", &[]);
        assert_eq!(text, "select distinct on(1) a, b from t");
        assert!(values.is_empty());
        // An exponent never swallows the next word; an operator is read whole.
        assert_ne!(
            norm("SELECT * FROM t WHERE a = 1e1or b = 2", &[]).0,
            norm("SELECT * FROM t WHERE a = 1e1and b = 2", &[]).0
        );
        assert_ne!(
            norm("SELECT * FROM t WHERE a!=-1", &[]).0,
            norm("SELECT * FROM t WHERE a != -1", &[]).0
        );
        assert_eq!(
            norm("SELECT * FROM t WHERE a<=1", &[]).0,
            norm("SELECT * FROM t WHERE a <= 1", &[]).0
        );
    }

    #[test]
    fn parameters_are_kept_in_order_and_checked() {
        let (text, values) = norm(
            "SELECT $2 FROM t WHERE a = $1 AND b = 'x'",
            &[(0, Some(b"1")), (25, None)],
        );
        assert_eq!(text, "select $2 from t where a = ? and b = ?");
        assert_eq!(values.len(), 3);
        assert_eq!(
            values[0],
            Lifted {
                type_oid: 25,
                value: None
            }
        );
        let (mut out, mut values) = (Vec::new(), Vec::new());
        assert!(!normalize(
            b"SELECT * FROM t WHERE a = $3",
            &[],
            &mut out,
            &mut values
        ));
    }
}
