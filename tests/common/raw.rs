//! A minimal blocking wire-protocol client for what tokio-postgres hides: SSLRequest
//! answers, BackendKeyData, ReadyForQuery status bytes, the authentication request a server
//! picks, and deliberately broken input.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger than anything a scenario legitimately receives in one message.
const MAX_MESSAGE: usize = 64 << 20;

/// One backend message.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Message {
    /// ErrorResponse/NoticeResponse fields by code ('C' = SQLSTATE, 'M' = message, ...).
    pub fn fields(&self) -> BTreeMap<char, String> {
        let mut fields = BTreeMap::new();
        let mut rest = self.body.as_slice();
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            fields.insert(
                char::from(code),
                String::from_utf8_lossy(&tail[..end]).into_owned(),
            );
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        fields
    }

    pub fn sqlstate(&self) -> String {
        self.fields().remove(&'C').unwrap_or_default()
    }

    pub fn i32_at(&self, at: usize) -> i32 {
        let bytes: [u8; 4] = self
            .body
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .unwrap_or_else(|| panic!("message '{}' too short: {:?}", self.tag as char, self.body));
        i32::from_be_bytes(bytes)
    }
}

/// What the server said between the StartupMessage and the first ReadyForQuery.
#[derive(Debug, Default)]
pub struct Startup {
    /// Authentication request codes in order (0 = Ok, 3 = cleartext, 5 = md5, 10 = SASL).
    pub auth_codes: Vec<i32>,
    pub backend_key: Option<(i32, i32)>,
    pub params: BTreeMap<String, String>,
    /// The ErrorResponse that ended the startup instead of ReadyForQuery.
    pub error: Option<Message>,
    pub ready_status: Option<u8>,
}

/// Result of one simple Query.
#[derive(Debug, Default)]
pub struct QueryResult {
    pub rows: Vec<Vec<Option<String>>>,
    pub tags: Vec<String>,
    pub error: Option<Message>,
    /// ReadyForQuery status: b'I' idle, b'T' in transaction, b'E' failed transaction.
    pub status: u8,
}

/// How a connection ended after bad input.
#[derive(Debug)]
pub enum Ending {
    /// An ErrorResponse arrived (then the socket closed or the read timed out).
    Error(Message),
    /// The socket was closed (EOF or reset) without an ErrorResponse.
    Closed,
    /// Nothing within the timeout and the socket stays open.
    Silent,
}

pub struct RawConn {
    stream: TcpStream,
}

impl RawConn {
    pub fn connect(port: u16) -> RawConn {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("raw connect to {addr}: {e}"));
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        stream.set_nodelay(true).expect("nodelay");
        RawConn { stream }
    }

    pub fn set_read_timeout(&self, limit: Duration) {
        self.stream
            .set_read_timeout(Some(limit))
            .expect("read timeout");
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Closes the sending half: the peer reads EOF.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Sends several messages (built with [`msg`] and friends) in one write, as a
    /// pipelining driver does.
    pub fn send_all(&mut self, messages: &[Vec<u8>]) {
        self.write_all(&messages.concat()).expect("send messages");
    }

    /// Reads every message up to and including the next ReadyForQuery.
    pub fn read_until_ready(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            let m = self.expect_message("reading up to ReadyForQuery");
            let done = m.tag == b'Z';
            messages.push(m);
            if done {
                return messages;
            }
        }
    }

    /// Reads every message until the server closes the connection (or `limit` of silence,
    /// which panics).
    pub fn read_until_closed(&mut self, limit: Duration) -> Vec<Message> {
        self.set_read_timeout(limit);
        let mut messages = Vec::new();
        loop {
            match self.read_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => return messages,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return messages,
                Err(e) => panic!("connection still open after {messages:?}: {e}"),
            }
        }
    }

    /// Sends an 8-byte negotiation request (SSL or GSSENC) and returns the one-byte answer.
    pub fn negotiate(&mut self, code: i32) -> u8 {
        let mut packet = 8i32.to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        self.write_all(&packet).expect("send negotiation request");
        let mut answer = [0u8; 1];
        self.stream
            .read_exact(&mut answer)
            .expect("one-byte answer to the negotiation request");
        answer[0]
    }

    pub fn send_startup(&mut self, params: &[(&str, &str)]) {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let len = i32::try_from(body.len() + 4).expect("startup length");
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        self.write_all(&packet).expect("send StartupMessage");
    }

    /// Sends one tagged frontend message.
    pub fn send(&mut self, tag: u8, body: &[u8]) -> io::Result<()> {
        let len = i32::try_from(body.len() + 4).expect("message length");
        let mut packet = Vec::with_capacity(body.len() + 5);
        packet.push(tag);
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(body);
        self.write_all(&packet)
    }

    /// The next backend message; Ok(None) on EOF.
    pub fn read_message(&mut self) -> io::Result<Option<Message>> {
        let mut header = [0u8; 5];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let body_len = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_sub(4))
            .filter(|l| *l <= MAX_MESSAGE)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad length {len}"))
            })?;
        let mut body = vec![0u8; body_len];
        self.stream.read_exact(&mut body)?;
        Ok(Some(Message {
            tag: header[0],
            body,
        }))
    }

    fn expect_message(&mut self, during: &str) -> Message {
        match self.read_message() {
            Ok(Some(m)) => m,
            Ok(None) => panic!("connection closed during {during}"),
            Err(e) => panic!("read failed during {during}: {e}"),
        }
    }

    /// Runs the startup for a user the server trusts (no password), reading up to the first
    /// ReadyForQuery or ErrorResponse. Panics if the server asks for a password.
    pub fn startup_trust(&mut self, user: &str, database: &str) -> Startup {
        self.startup_trust_with(user, database, &[])
    }

    /// `startup_trust` with extra startup parameters (application_name, DateStyle, ...).
    pub fn startup_trust_with(
        &mut self,
        user: &str,
        database: &str,
        extra: &[(&str, &str)],
    ) -> Startup {
        let mut params = vec![("user", user), ("database", database)];
        params.extend_from_slice(extra);
        self.send_startup(&params);
        let mut startup = Startup::default();
        loop {
            let m = self.expect_message("startup");
            match m.tag {
                b'R' => {
                    let code = m.i32_at(0);
                    startup.auth_codes.push(code);
                    assert_eq!(
                        code, 0,
                        "server asked {user} for a password (auth code {code})"
                    );
                }
                b'K' => startup.backend_key = Some((m.i32_at(0), m.i32_at(4))),
                b'S' => {
                    let mut parts = m.body.split(|&b| b == 0);
                    let name =
                        String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    let value =
                        String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    startup.params.insert(name, value);
                }
                b'E' => {
                    startup.error = Some(m);
                    return startup;
                }
                b'Z' => {
                    startup.ready_status = m.body.first().copied();
                    return startup;
                }
                b'N' => {}
                other => panic!("unexpected message '{}' during startup", other as char),
            }
        }
    }

    /// Sends a StartupMessage and returns the first authentication request code the server
    /// sends (or panics with the error it sent instead).
    pub fn first_auth_request(&mut self, user: &str, database: &str) -> i32 {
        self.send_startup(&[("user", user), ("database", database)]);
        let m = self.expect_message("startup");
        match m.tag {
            b'R' => m.i32_at(0),
            b'E' => panic!("startup of {user} refused: {:?}", m.fields()),
            other => panic!(
                "expected an authentication request, got '{}'",
                other as char
            ),
        }
    }

    /// After [`RawConn::first_auth_request`] answered SASL: starts a SCRAM-SHA-256
    /// exchange and returns the salt the server offers (`s=` of its first message).
    pub fn scram_salt(&mut self, user: &str) -> String {
        let first = format!("n,,n={user},r=rawclientnonce0123456789");
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&(first.len() as i32).to_be_bytes());
        body.extend_from_slice(first.as_bytes());
        self.send(b'p', &body).expect("send SASLInitialResponse");
        let m = self.expect_message("SCRAM server-first");
        assert_eq!(m.tag, b'R', "expected AuthenticationSASLContinue");
        assert_eq!(m.i32_at(0), 11, "expected AuthenticationSASLContinue");
        let text = String::from_utf8_lossy(&m.body[4..]).into_owned();
        text.split(',')
            .find_map(|part| part.strip_prefix("s="))
            .unwrap_or_else(|| panic!("no salt in {text}"))
            .to_string()
    }

    /// One simple Query, read through ReadyForQuery.
    pub fn simple_query(&mut self, sql: &str) -> QueryResult {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send(b'Q', &body).expect("send Query");
        let mut result = QueryResult::default();
        loop {
            let m = self.expect_message("query");
            match m.tag {
                b'D' => result.rows.push(data_row(&m)),
                b'C' => {
                    let end = m.body.iter().position(|&b| b == 0).unwrap_or(m.body.len());
                    result
                        .tags
                        .push(String::from_utf8_lossy(&m.body[..end]).into_owned());
                }
                b'E' => result.error = Some(m),
                b'Z' => {
                    result.status = m.body.first().copied().unwrap_or(0);
                    return result;
                }
                b'T' | b'N' | b'S' | b'I' => {}
                other => panic!("unexpected message '{}' during query", other as char),
            }
        }
    }

    /// Reads until an ErrorResponse, EOF/reset, or `limit` of silence.
    pub fn read_ending(&mut self, limit: Duration) -> Ending {
        self.set_read_timeout(limit);
        loop {
            match self.read_message() {
                Ok(Some(m)) if m.tag == b'E' => return Ending::Error(m),
                Ok(Some(_)) => continue,
                Ok(None) => return Ending::Closed,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ending::Silent
                }
                Err(_) => return Ending::Closed,
            }
        }
    }

    /// True once the peer has closed the socket (EOF or reset) within `limit`.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.set_read_timeout(limit);
        let mut scratch = [0u8; 4096];
        loop {
            match self.stream.read(&mut scratch) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// One frontend message: tag, length, body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(i32::try_from(body.len() + 4).expect("length")).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Parse of `sql` as statement `name`, parameter types left to the server.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &body)
}

/// Bind of statement `name` to the unnamed portal: no parameters, text results.
pub fn bind(name: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, name);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    msg(b'B', &body)
}

/// Execute of the unnamed portal, all rows.
pub fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

/// Describe of statement `name`.
pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    cstr(&mut body, name);
    msg(b'D', &body)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

/// A simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    msg(b'Q', &body)
}

/// The ErrorResponses among `messages`.
pub fn errors(messages: &[Message]) -> Vec<&Message> {
    messages.iter().filter(|m| m.tag == b'E').collect()
}

/// The first column of every DataRow among `messages`.
pub fn first_column(messages: &[Message]) -> Vec<Option<String>> {
    messages
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| data_row(m).into_iter().next().flatten())
        .collect()
}

fn data_row(m: &Message) -> Vec<Option<String>> {
    let count = u16::from_be_bytes([m.body[0], m.body[1]]);
    let mut at = 2;
    let mut row = Vec::with_capacity(count.into());
    for _ in 0..count {
        let len = m.i32_at(at);
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let len = usize::try_from(len).expect("non-negative length");
            row.push(Some(
                String::from_utf8_lossy(&m.body[at..at + len]).into_owned(),
            ));
            at += len;
        }
    }
    row
}
