//! A minimal synchronous PostgreSQL client (trust login, simple Query), enough for the
//! idle-clients count and the failover workload's writer without a driver dependency.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Res, DB_NAME, DB_USER};

/// Reads from a socket with a read timeout; with `stop`, a timeout only means "look at
/// the flag and go on waiting", so a reader blocked for long (a write held in the
/// proxy's switchover buffer) still ends promptly when told to.
struct Patient<'a> {
    sock: &'a TcpStream,
    stop: Option<&'a AtomicBool>,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut sock = self.sock;
        loop {
            match sock.read(buf) {
                Err(e)
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                        && self.stop.is_some_and(|s| !s.load(Ordering::SeqCst)) =>
                {
                    continue
                }
                r => return r,
            }
        }
    }
}

/// One backend message: its type byte and body.
fn read_message(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    r.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// The SQLSTATE and message fields of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let field = |tag: char| {
        text.split('\0')
            .find_map(|f| f.strip_prefix(tag))
            .unwrap_or("")
            .to_string()
    };
    format!("{} {}", field('C'), field('M')).trim().to_string()
}

/// Opens a connection and logs in (trust): StartupMessage, then reads until
/// ReadyForQuery. A read waiting longer than 15 s fails.
pub(crate) fn login(port: u16) -> Res<TcpStream> {
    connect(port, Duration::from_secs(15), None)
}

/// [`login`] whose reads wait (checking `stop` every `tick`) until `stop` is set.
pub(crate) fn connect(port: u16, tick: Duration, stop: Option<&AtomicBool>) -> Res<TcpStream> {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(tick))
        .map_err(|e| e.to_string())?;
    let _ = sock.set_nodelay(true);
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for kv in ["user", DB_USER, "database", DB_NAME] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    sock.write_all(&msg).map_err(|e| e.to_string())?;
    let mut r = Patient { sock: &sock, stop };
    loop {
        let (kind, rest) = read_message(&mut r).map_err(|e| format!("login: {e}"))?;
        match kind {
            b'Z' => return Ok(sock),
            b'E' => return Err(format!("login refused: {}", error_text(&rest))),
            b'R' if rest.get(..4) != Some(&[0, 0, 0, 0]) => {
                return Err("the server asks for a password (expected trust)".into())
            }
            _ => {}
        }
    }
}

/// The first column of a DataRow body (None for NULL).
fn first_column(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let value = body.get(6..6 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// Sends `sql` as a simple Query and reads until ReadyForQuery. `Ok(Ok(value))` carries
/// the first column of the first row, if any; `Ok(Err(text))` is an ErrorResponse (the
/// connection is still usable); `Err` means the connection broke.
pub(crate) fn simple_query(
    sock: &TcpStream,
    sql: &str,
    stop: Option<&AtomicBool>,
) -> std::io::Result<Result<Option<String>, String>> {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    let mut w = sock;
    w.write_all(&msg)?;
    let mut r = Patient { sock, stop };
    let mut outcome = Ok(None);
    loop {
        match read_message(&mut r)? {
            (b'Z', _) => return Ok(outcome),
            (b'E', body) => outcome = Err(error_text(&body)),
            (b'D', body) if matches!(outcome, Ok(None)) => outcome = Ok(first_column(&body)),
            _ => {}
        }
    }
}
