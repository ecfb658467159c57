//! Statements PostgreSQL runs only while nobody is connected to a database — `DROP
//! DATABASE`, `ALTER DATABASE … RENAME`, `ALTER DATABASE … SET TABLESPACE`, and `CREATE
//! DATABASE … TEMPLATE` (for the template) — fail with 55006 "being accessed by other
//! users" while the proxy keeps idle pooled connections there. This finds the database
//! such a statement needs to itself, so those connections can be closed first.
//!
//! Cheap on the hot path: a request is looked at only when its first word is DROP, ALTER
//! or CREATE and its second is DATABASE.

use super::lexer::{Lexer, Token};
use crate::codec::frame::{split_cstr, split_message};
use crate::codec::tag::fe;

/// The database a SQL text needs no other connections to, if it is one of those statements.
pub fn exclusive_database(sql: &[u8]) -> Option<String> {
    let mut tokens = Lexer::new(sql);
    let verb = word(tokens.next()?)?;
    if ![&b"drop"[..], b"alter", b"create"]
        .iter()
        .any(|v| verb.eq_ignore_ascii_case(v))
    {
        return None;
    }
    let Token::Word(second) = tokens.next()? else {
        return None;
    };
    if !second.eq_ignore_ascii_case(b"database") {
        return None;
    }
    if verb.eq_ignore_ascii_case(b"drop") {
        let mut name = tokens.next()?;
        if is_word(name, b"if") {
            if !is_word(tokens.next()?, b"exists") {
                return None;
            }
            name = tokens.next()?;
        }
        return identifier(name);
    }
    if verb.eq_ignore_ascii_case(b"alter") {
        let name = identifier(tokens.next()?)?;
        let action = tokens.next()?;
        let exclusive = is_word(action, b"rename")
            || (is_word(action, b"set") && is_word(tokens.next()?, b"tablespace"));
        return exclusive.then_some(name);
    }
    if verb.eq_ignore_ascii_case(b"create") {
        // CREATE DATABASE name [WITH] [option [=] value] …: the template is the one that
        // must be free.
        identifier(tokens.next()?)?;
        let mut previous_was_template = false;
        for token in tokens {
            match token {
                Token::Semicolon => return None,
                Token::Other if previous_was_template => continue, // `=`
                _ if previous_was_template => return identifier(token),
                _ => previous_was_template = is_word(token, b"template"),
            }
        }
    }
    None
}

/// The SQL of a frontend Query or Parse message body, if `tag` is one.
fn message_sql(tag: u8, body: &[u8]) -> Option<&[u8]> {
    let sql = match tag {
        fe::QUERY => body,
        fe::PARSE => split_cstr(body)?.1,
        _ => return None,
    };
    let end = sql.iter().position(|&b| b == 0).unwrap_or(sql.len());
    Some(&sql[..end])
}

/// Looks through the complete frontend messages at the start of `bytes` (a client's
/// request as read) for a statement that needs a database to itself.
pub fn exclusive_database_in(bytes: &[u8]) -> Option<String> {
    let mut rest = bytes;
    while let Ok(Some((tag, body, len))) = split_message(rest, usize::MAX >> 1) {
        if let Some(db) = message_sql(tag, body).and_then(exclusive_database) {
            return Some(db);
        }
        rest = &rest[len..];
    }
    None
}

fn word(token: Token<'_>) -> Option<&[u8]> {
    match token {
        Token::Word(w) => Some(w),
        _ => None,
    }
}

fn is_word(token: Token<'_>, expected: &[u8]) -> bool {
    word(token).is_some_and(|w| w.eq_ignore_ascii_case(expected))
}

/// An identifier as PostgreSQL resolves it: unquoted folds to lower case, quoted keeps its
/// case with doubled quotes undone.
fn identifier(token: Token<'_>) -> Option<String> {
    match token {
        Token::Word(w) => Some(String::from_utf8_lossy(w).to_ascii_lowercase()),
        Token::Quoted(q) => Some(String::from_utf8_lossy(q).replace("\"\"", "\"")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(sql: &str) -> Option<String> {
        exclusive_database(sql.as_bytes())
    }

    #[test]
    fn statements_that_need_a_database_to_themselves() {
        assert_eq!(db("DROP DATABASE shop"), Some("shop".into()));
        assert_eq!(db("drop database if exists Shop"), Some("shop".into()));
        assert_eq!(
            db("DROP DATABASE \"My\"\"Db\" WITH (FORCE)"),
            Some("My\"Db".into())
        );
        assert_eq!(db("/* c */ DROP\n DATABASE shop;"), Some("shop".into()));
        assert_eq!(
            db("ALTER DATABASE shop RENAME TO store"),
            Some("shop".into())
        );
        assert_eq!(
            db("ALTER DATABASE shop SET TABLESPACE fast"),
            Some("shop".into())
        );
        assert_eq!(
            db("CREATE DATABASE copy TEMPLATE shop"),
            Some("shop".into())
        );
        assert_eq!(
            db("CREATE DATABASE copy WITH TEMPLATE = \"Shop\" ENCODING 'UTF8'"),
            Some("Shop".into())
        );
    }

    #[test]
    fn statements_that_do_not() {
        for sql in [
            "SELECT 1",
            "DROP TABLE shop",
            "ALTER DATABASE shop SET work_mem = '64MB'",
            "ALTER DATABASE shop OWNER TO bob",
            "CREATE DATABASE copy",
            "CREATE DATABASE copy ENCODING 'UTF8'",
            "DROP DATABASE",
            "DROP",
            "",
        ] {
            assert_eq!(db(sql), None, "{sql}");
        }
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn found_in_query_and_parse_messages() {
        let query = message(b'Q', b"DROP DATABASE a\0");
        assert_eq!(exclusive_database_in(&query), Some("a".into()));
        let pipeline = [
            message(b'P', b"s1\0ALTER DATABASE b RENAME TO c\0\0\0"),
            message(b'B', b"\0s1\0\0\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat();
        assert_eq!(exclusive_database_in(&pipeline), Some("b".into()));
        let plain = [message(b'Q', b"SELECT 1\0"), message(b'S', b"")].concat();
        assert_eq!(exclusive_database_in(&plain), None);
        // A message cut short is not looked at.
        assert_eq!(exclusive_database_in(&query[..query.len() - 3]), None);
    }
}
