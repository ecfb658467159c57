//! What identifies a cached result, and what identifies a statement's shape.

use xxhash_rust::xxh3::Xxh3;

use crate::sql::lexer::{Lexer, Token};

/// The session facts every result depends on besides its statement: database, the
/// user the server sees, and every setting the session changed from the server's
/// defaults (startup parameters and SET: search_path, TimeZone, DateStyle, role, …).
pub fn session_fingerprint(
    database: &str,
    user: &str,
    startup: &[(String, String)],
    settings: &[(String, String)],
) -> u64 {
    let mut h = Xxh3::new();
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
        let mut h = Xxh3::new();
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
    let mut h = Xxh3::new();
    let mut after_other = false;
    for token in Lexer::new(sql) {
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
                // Literals and operators: one run counts once.
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
