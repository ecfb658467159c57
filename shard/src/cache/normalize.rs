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
    let mut lexer = Lexer::new(sql);
    let mut previous: Option<Token<'a>> = None;
    while let Some(token) = lexer.next() {
        let (start, end) = (lexer.token_start(), lexer.offset());
        let text = &sql[start..end];
        let clause = clauses[depth.min(32)];
        match token {
            Token::Word(word) => {
                match keyword_clause(word) {
                    Some(c) => clauses[depth.min(32)] = c,
                    None if word.eq_ignore_ascii_case(b"select") => {
                        clauses[depth.min(32)] = Clause::Other
                    }
                    None => {}
                }
                space(out);
                out.extend(word.iter().map(u8::to_ascii_lowercase));
            }
            Token::Quoted(_) => {
                space(out);
                out.extend_from_slice(text);
            }
            Token::OpenParen => {
                out.push(b'(');
                depth += 1;
                clauses[depth.min(32)] = clause;
            }
            Token::CloseParen => {
                out.push(b')');
                depth = depth.saturating_sub(1);
            }
            Token::Semicolon => out.push(b';'),
            Token::Dot => out.push(b'.'),
            Token::Comma => out.push(b','),
            Token::Cast => out.extend_from_slice(b"::"),
            Token::Comment(_) => {}
            Token::Other => {
                let typed_literal = matches!(previous, Some(Token::Word(w)) if !lifts_after(w));
                match literal(text) {
                    Some(Literal::String(value))
                        if clause == Clause::Condition && !typed_literal =>
                    {
                        placeholder(out);
                        values.push(Lifted {
                            type_oid: UNKNOWN,
                            value: Some(value),
                        });
                    }
                    Some(Literal::Number(value)) if clause == Clause::Condition => {
                        // The lexer splits numbers: take the whole run of digits.
                        let whole = number_at(sql, start);
                        if whole.len() > value.len() {
                            // Reported one byte at a time: skip the rest of it.
                            while lexer.offset() < start + whole.len() {
                                lexer.next();
                            }
                        }
                        placeholder(out);
                        values.push(Lifted {
                            type_oid: number_type(whole),
                            value: Some(whole),
                        });
                    }
                    Some(Literal::Param(n)) => {
                        let Some(&(type_oid, value)) = n.checked_sub(1).and_then(|i| params.get(i))
                        else {
                            return false;
                        };
                        if clause == Clause::Condition {
                            placeholder(out);
                        } else {
                            space(out);
                            out.extend_from_slice(text);
                        }
                        values.push(Lifted { type_oid, value });
                    }
                    Some(Literal::Number(_)) => {
                        let whole = number_at(sql, start);
                        while lexer.offset() < start + whole.len() {
                            lexer.next();
                        }
                        space(out);
                        out.extend_from_slice(whole);
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
        previous = Some(token);
    }
    true
}

/// What an `Other` token is.
enum Literal<'a> {
    /// A plain quoted string's content (no E, B, X or U& prefix, no doubled quotes).
    String(&'a [u8]),
    /// The first byte of a number.
    Number(&'a [u8]),
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
        c if c.is_ascii_digit() => Some(Literal::Number(text)),
        _ => None,
    }
}

/// The number starting at `at`: digits, a decimal point, an exponent.
fn number_at(sql: &[u8], at: usize) -> &[u8] {
    let mut end = at;
    let digits = |end: &mut usize| {
        while sql.get(*end).is_some_and(u8::is_ascii_digit) {
            *end += 1;
        }
    };
    digits(&mut end);
    if sql.get(end) == Some(&b'.') {
        end += 1;
        digits(&mut end);
    }
    if matches!(sql.get(end), Some(b'e' | b'E')) {
        let mut e = end + 1;
        if matches!(sql.get(e), Some(b'+' | b'-')) {
            e += 1;
        }
        if sql.get(e).is_some_and(u8::is_ascii_digit) {
            end = e;
            digits(&mut end);
        }
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

/// Words after which a quoted string is a value of its own, not a typed literal
/// (`date '2024-01-01'`).
fn lifts_after(word: &[u8]) -> bool {
    const WORDS: &[&[u8]] = &[
        b"all",
        b"and",
        b"any",
        b"between",
        b"case",
        b"else",
        b"in",
        b"is",
        b"like",
        b"ilike",
        b"limit",
        b"not",
        b"offset",
        b"on",
        b"or",
        b"similar",
        b"some",
        b"then",
        b"to",
        b"when",
        b"where",
        b"having",
        b"distinct",
        b"from",
        b"escape",
    ];
    WORDS.iter().any(|w| w.eq_ignore_ascii_case(word))
}

fn space(out: &mut Vec<u8>) {
    if !out.is_empty() && !matches!(out.last(), Some(b'(' | b'.')) {
        out.push(b' ');
    }
}

fn placeholder(out: &mut Vec<u8>) {
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
