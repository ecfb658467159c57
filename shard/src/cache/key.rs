//! What identifies a cached result, and what identifies a statement's shape.

use std::sync::OnceLock;

use xxhash_rust::xxh3::Xxh3;

use crate::sql::lexer::{Lexer, Token};

/// A seed drawn once per process: keys and shapes cannot be aimed at one another from
/// outside.
fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(rand::random)
}

fn hasher() -> Xxh3 {
    Xxh3::with_seed(seed())
}

/// The session facts every result depends on besides its statement: database, the
/// user the server sees, and every setting the session changed from the server's
/// defaults (startup parameters and SET: search_path, TimeZone, DateStyle, role, …).
pub fn session_fingerprint(
    database: &str,
    user: &str,
    startup: &[(String, String)],
    settings: &[(String, String)],
) -> u64 {
    let mut h = hasher();
    part(&mut h, database.as_bytes());
    part(&mut h, user.as_bytes());
    for (name, value) in startup {
        part(&mut h, name.as_bytes());
        part(&mut h, value.as_bytes());
    }
    h.update(b"\xff");
    for (name, value) in settings {
        part(&mut h, name.as_bytes());
        part(&mut h, value.as_bytes());
    }
    h.digest()
}

/// Feeds one length-prefixed part, so parts never run into each other.
fn part(h: &mut Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Builds a result key.
pub struct KeyBuilder(Xxh3);

impl KeyBuilder {
    /// `protocol` tells apart answers shaped differently for the same statement (simple
    /// Query, or extended with or without a RowDescription).
    pub fn new(session: u64, protocol: u8) -> Self {
        let mut h = hasher();
        h.update(&session.to_le_bytes());
        h.update(&[protocol]);
        KeyBuilder(h)
    }

    pub fn part(mut self, bytes: &[u8]) -> Self {
        part(&mut self.0, bytes);
        self
    }

    pub fn finish(self) -> u128 {
        self.0.digest128()
    }
}

/// A hash of the statement with literals, comments, spacing and keyword case taken out:
/// statements of one shape read the same tables and call the same functions, so what
/// the catalog says about one holds for all.
pub fn shape(sql: &[u8]) -> u64 {
    let mut h = hasher();
    let mut after_other = false;
    let mut lexer = Lexer::new(sql);
    while let Some(token) = lexer.next() {
        let (code, text): (u8, &[u8]) = match token {
            Token::Word(w) => (1, w),
            Token::Quoted(q) => (2, q),
            Token::Semicolon => (3, b""),
            Token::Dot => (4, b""),
            Token::OpenParen => (5, b""),
            Token::CloseParen => (6, b""),
            Token::Comma => (7, b""),
            Token::Cast => (8, b""),
            Token::Comment(_) => continue,
            Token::Other => {
                let first = sql.get(lexer.token_start()).copied().unwrap_or(0);
                if is_operator_byte(first) {
                    // Operators are part of the shape (a user's operator may call a
                    // function of its own).
                    after_other = false;
                    h.update(&[10, first]);
                    continue;
                }
                // Literals and parameters: one run counts once.
                if after_other {
                    continue;
                }
                after_other = true;
                h.update(&[9]);
                continue;
            }
        };
        after_other = false;
        h.update(&[code]);
        if code == 1 {
            let mut word = [0u8; 64];
            for chunk in text.chunks(64) {
                for (b, w) in word.iter_mut().zip(chunk) {
                    *b = w.to_ascii_lowercase();
                }
                h.update(&word[..chunk.len()]);
            }
            h.update(&[0]);
        } else if !text.is_empty() {
            part(&mut h, text);
        }
    }
    h.digest()
}

/// A byte that can be part of an operator's name.
pub fn is_operator_byte(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

/// The operators a text uses, as whole names (`<=`, `###`), without duplicates.
pub fn operators(sql: &[u8]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut lexer = Lexer::new(sql);
    let mut current = String::new();
    let mut end = 0;
    while let Some(token) = lexer.next() {
        let start = lexer.token_start();
        let first = sql.get(start).copied().unwrap_or(0);
        let operator = token == Token::Other && is_operator_byte(first);
        let continues = operator && start == end;
        if !current.is_empty() && !continues {
            if !found.contains(&current) {
                found.push(std::mem::take(&mut current));
            } else {
                current.clear();
            }
        }
        if operator {
            current.push(first as char);
        }
        end = lexer.offset();
    }
    if !current.is_empty() && !found.contains(&current) {
        found.push(current);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_ignores_literals_spacing_case_and_comments() {
        let a = shape(b"select * from t where id=42");
        assert_eq!(a, shape(b"SELECT *  FROM t\nWHERE id = 7 /* x */"));
        assert_eq!(a, shape(b"SELECT * FROM t WHERE id = 'abc'"));
        assert_ne!(a, shape(b"SELECT * FROM u WHERE id = 42"));
        assert_ne!(a, shape(b"SELECT * FROM \"T\" WHERE id = 42"));
        assert_ne!(shape(b"SELECT f(1)"), shape(b"SELECT g(1)"));
        assert_ne!(
            shape(b"SELECT * FROM t WHERE id = 1"),
            shape(b"SELECT * FROM t WHERE id ### 1")
        );
    }

    #[test]
    fn operators_are_read_whole() {
        assert_eq!(
            operators(b"SELECT a FROM t WHERE a <= 1 AND b ### 'x' AND c = 2 AND d <= 3"),
            ["<=", "###", "="]
        );
        assert!(operators(b"SELECT 'a <= b' FROM t").is_empty());
    }

    #[test]
    fn keys_separate_every_part() {
        let k = |session, protocol, parts: &[&[u8]]| {
            parts
                .iter()
                .fold(KeyBuilder::new(session, protocol), |b, p| b.part(p))
                .finish()
        };
        let base = k(1, 0, &[b"SELECT 1", b""]);
        assert_ne!(base, k(2, 0, &[b"SELECT 1", b""]));
        assert_ne!(base, k(1, 1, &[b"SELECT 1", b""]));
        assert_ne!(base, k(1, 0, &[b"SELECT 1", b"x"]));
        assert_ne!(k(1, 0, &[b"ab", b"c"]), k(1, 0, &[b"a", b"bc"]));
        assert_ne!(
            session_fingerprint("db", "u", &[], &[("search_path".into(), "a".into())]),
            session_fingerprint("db", "u", &[], &[("search_path".into(), "b".into())])
        );
    }
}
