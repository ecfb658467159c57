//! A minimal SQL tokenizer: just enough to find keywords and identifiers outside string
//! literals, quoted identifiers, dollar-quoted bodies and comments. It never allocates and
//! never fails: unterminated constructs simply run to the end of the input.
//!
//! Comments are skipped unless the lexer is built with [`Lexer::with_comments`], which
//! surfaces their text (routing hints live in comments).

/// One token of interest. Literals, numbers and operators are reported as `Other` so the
/// caller can still tell "next token" apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// An unquoted word (keyword or identifier), as written.
    Word(&'a [u8]),
    /// A double-quoted identifier, without the quotes (doubled quotes left as they are).
    Quoted(&'a [u8]),
    /// `;` — the end of a statement.
    Semicolon,
    /// `.` between qualified names.
    Dot,
    /// `(`
    OpenParen,
    /// `)`
    CloseParen,
    /// `,`
    Comma,
    /// `::` (a type cast follows).
    Cast,
    /// A comment's text without its delimiters; only from [`Lexer::with_comments`].
    Comment(&'a [u8]),
    /// Anything else: literals, numbers, operators, parameters.
    Other,
}

/// Iterates over the tokens of `sql`.
pub struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
    comments: bool,
    /// Where the last token returned starts.
    token_start: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a [u8]) -> Self {
        Lexer {
            sql,
            pos: 0,
            comments: false,
            token_start: 0,
        }
    }

    /// A lexer that reports comments as [`Token::Comment`] instead of skipping them.
    pub fn with_comments(sql: &'a [u8]) -> Self {
        Lexer {
            sql,
            pos: 0,
            comments: true,
            token_start: 0,
        }
    }

    /// Where the next token's search starts (just past the last token).
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// Where the last token returned starts (its opening quote, for a quoted one).
    pub fn token_start(&self) -> usize {
        self.token_start
    }

    fn peek(&self, offset: usize) -> u8 {
        self.sql.get(self.pos + offset).copied().unwrap_or(0)
    }

    /// Skips whitespace and comments (`--` to end of line, nested `/* */`); stops at a
    /// comment when comments are reported, returning its text's range.
    fn skip_blank(&mut self) -> Option<(usize, usize)> {
        loop {
            let c = self.peek(0);
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if c == b'-' && self.peek(1) == b'-' {
                self.pos += 2;
                let start = self.pos;
                while self.pos < self.sql.len() && self.sql[self.pos] != b'\n' {
                    self.pos += 1;
                }
                if self.comments {
                    return Some((start, self.pos));
                }
            } else if c == b'/' && self.peek(1) == b'*' {
                self.pos += 2;
                let start = self.pos;
                let mut end = self.sql.len();
                let mut depth = 1usize;
                while self.pos < self.sql.len() && depth > 0 {
                    if self.peek(0) == b'/' && self.peek(1) == b'*' {
                        depth += 1;
                        self.pos += 2;
                    } else if self.peek(0) == b'*' && self.peek(1) == b'/' {
                        depth -= 1;
                        if depth == 0 {
                            end = self.pos;
                        }
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                    }
                }
                self.pos = self.pos.min(self.sql.len());
                if self.comments {
                    return Some((start, end.min(self.sql.len())));
                }
            } else {
                return None;
            }
        }
    }

    /// Skips a quoted run starting at the opening `quote`; `backslash` honours `\` escapes
    /// (E'' strings). A doubled quote is an escaped quote.
    /// Returns the content's range.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) -> (usize, usize) {
        self.pos += 1;
        let start = self.pos;
        while self.pos < self.sql.len() {
            let c = self.sql[self.pos];
            if backslash && c == b'\\' {
                self.pos += 2;
            } else if c == quote {
                if self.peek(1) == quote {
                    self.pos += 2;
                } else {
                    self.pos += 1;
                    return (start, self.pos - 1);
                }
            } else {
                self.pos += 1;
            }
        }
        self.pos = self.sql.len();
        (start, self.pos)
    }

    /// At a `$`: a dollar-quoted body (`$tag$ … $tag$`) is skipped whole; `$1` is a
    /// parameter. Returns false when it was not a dollar quote.
    fn skip_dollar_quote(&mut self) -> bool {
        let open_start = self.pos;
        let mut end = self.pos + 1;
        while end < self.sql.len() && is_word_byte(self.sql[end]) && self.sql[end] != b'$' {
            end += 1;
        }
        if end >= self.sql.len() || self.sql[end] != b'$' {
            return false;
        }
        // A tag cannot start with a digit ($1 is a parameter).
        if end > open_start + 1 && self.sql[open_start + 1].is_ascii_digit() {
            return false;
        }
        let tag = &self.sql[open_start..=end];
        let mut pos = end + 1;
        while pos + tag.len() <= self.sql.len() {
            if &self.sql[pos..pos + tag.len()] == tag {
                self.pos = pos + tag.len();
                return true;
            }
            pos += 1;
        }
        self.pos = self.sql.len();
        true
    }
}

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let sql = self.sql;
        if let Some((start, end)) = self.skip_blank() {
            return Some(Token::Comment(&sql[start..end]));
        }
        let c = *self.sql.get(self.pos)?;
        self.token_start = self.pos;
        let token = match c {
            b';' => {
                self.pos += 1;
                Token::Semicolon
            }
            b'.' => {
                self.pos += 1;
                Token::Dot
            }
            b'(' => {
                self.pos += 1;
                Token::OpenParen
            }
            b')' => {
                self.pos += 1;
                Token::CloseParen
            }
            b',' => {
                self.pos += 1;
                Token::Comma
            }
            b':' if self.peek(1) == b':' => {
                self.pos += 2;
                Token::Cast
            }
            b'\'' => {
                self.skip_quoted(b'\'', false);
                Token::Other
            }
            b'"' => {
                let (start, end) = self.skip_quoted(b'"', false);
                Token::Quoted(&sql[start..end])
            }
            b'$' => {
                if !self.skip_dollar_quote() {
                    self.pos += 1;
                    while self.pos < sql.len() && sql[self.pos].is_ascii_digit() {
                        self.pos += 1;
                    }
                }
                Token::Other
            }
            c if is_word_start(c) => {
                let start = self.pos;
                while self.pos < sql.len() && is_word_byte(sql[self.pos]) {
                    self.pos += 1;
                }
                let word = &sql[start..self.pos];
                // E'…' (escape string), B'…', X'…', U&'…' prefixes: the literal follows.
                if self.peek(0) == b'\'' && word.len() == 1 {
                    let backslash = word[0].eq_ignore_ascii_case(&b'e');
                    self.skip_quoted(b'\'', backslash);
                    return Some(Token::Other);
                }
                Token::Word(word)
            }
            _ => {
                self.pos += 1;
                Token::Other
            }
        };
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(sql: &str) -> Vec<String> {
        Lexer::new(sql.as_bytes())
            .filter_map(|t| match t {
                Token::Word(w) => Some(String::from_utf8_lossy(w).into_owned()),
                Token::Quoted(w) => Some(format!("\"{}\"", String::from_utf8_lossy(w))),
                Token::Semicolon => Some(";".into()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn skips_literals_and_comments() {
        assert_eq!(
            words("SELECT 'set x' -- listen\n, \"Set\" /* a /* nested */ reset */ FROM t;"),
            ["SELECT", "\"Set\"", "FROM", "t", ";"]
        );
        assert_eq!(
            words("select $$ listen x; $$, $q$ a $ b $q$ x"),
            ["select", "x"]
        );
        assert_eq!(words("select E'it\\'s; set', 'a''b' y"), ["select", "y"]);
        assert_eq!(words("select $1 + $2 z"), ["select", "z"]);
    }

    #[test]
    fn comments_are_reported_on_request() {
        let sql = b"/*+ route=primary */ SELECT -- helios:cache=skip\n 1 /* a /* b */ c */";
        let comments: Vec<&[u8]> = Lexer::with_comments(sql)
            .filter_map(|t| match t {
                Token::Comment(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(
            comments,
            [
                &b"+ route=primary "[..],
                b" helios:cache=skip",
                b" a /* b */ c "
            ]
        );
        assert!(Lexer::new(sql).all(|t| !matches!(t, Token::Comment(_))));
        assert_eq!(
            Lexer::with_comments(b"select /* open").last(),
            Some(Token::Comment(b" open"))
        );
    }

    #[test]
    fn punctuation_is_told_apart() {
        let tokens: Vec<Token> = Lexer::new(b"f(a, b)::int").collect();
        assert_eq!(
            tokens,
            [
                Token::Word(b"f"),
                Token::OpenParen,
                Token::Word(b"a"),
                Token::Comma,
                Token::Word(b"b"),
                Token::CloseParen,
                Token::Cast,
                Token::Word(b"int"),
            ]
        );
    }

    #[test]
    fn unterminated_constructs_end_quietly() {
        assert_eq!(words("select 'open"), ["select"]);
        assert_eq!(words("select /* open"), ["select"]);
        assert_eq!(words("select $x$ open"), ["select"]);
        assert_eq!(words("select \"open"), ["select", "\"open\""]);
    }
}
