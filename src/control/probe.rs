//! A small blocking PostgreSQL client for the control threads (the health checker): one
//! `std::net::TcpStream` (or `UnixStream` for a node configured by socket directory), the
//! shard crate's sans-IO codec and client authentication, and a deadline that bounds
//! every step, connect included. It only runs simple Queries and keeps the text values of
//! their rows.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use helios_shard::auth::client::{ClientAuth, ClientAuthError};
use helios_shard::auth::scram::SaltedPasswordCache;
use helios_shard::codec::backend::{self as be, BackendMessage, Fields};
use helios_shard::codec::{frame, frontend, startup};
use helios_shard::config::SslMode;
use helios_shard::nodeaddr::NodeAddr;
use helios_shard::tls::{rustls, ServerTls};

/// Larger messages are refused: probes read a handful of short rows.
const MAX_MESSAGE: usize = 1 << 20;
const APPLICATION_NAME: &str = "heliosdb-proxy-health";
const REPLICATION_APPLICATION_NAME: &str = "heliosdb-proxy-cache";

/// Rows of text values (`None` is NULL) from every statement of one Query.
pub type Rows = Vec<Vec<Option<String>>>;

/// Where and as whom a probe logs in.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub addr: &'a NodeAddr,
    pub user: &'a str,
    pub password: Option<&'a str>,
    pub database: &'a str,
    /// TLS as the shards use it (`tls.server_sslmode`; never over a Unix-domain socket),
    /// and the node's "host:port" for the name its certificate must carry.
    pub tls: Option<&'a ServerTls>,
    pub address: &'a str,
}

/// The probe's socket: plain TCP, TLS over TCP, or a Unix-domain socket.
enum ProbeStream {
    Plain(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl ProbeStream {
    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            ProbeStream::Plain(tcp) => tcp.set_read_timeout(Some(timeout)),
            ProbeStream::Unix(unix) => unix.set_read_timeout(Some(timeout)),
            ProbeStream::Tls(tls) => tls.sock.set_read_timeout(Some(timeout)),
        }
    }

    fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            ProbeStream::Plain(tcp) => tcp.set_write_timeout(Some(timeout)),
            ProbeStream::Unix(unix) => unix.set_write_timeout(Some(timeout)),
            ProbeStream::Tls(tls) => tls.sock.set_write_timeout(Some(timeout)),
        }
    }
}

impl Read for ProbeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ProbeStream::Plain(tcp) => tcp.read(buf),
            ProbeStream::Unix(unix) => unix.read(buf),
            ProbeStream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for ProbeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ProbeStream::Plain(tcp) => tcp.write(buf),
            ProbeStream::Unix(unix) => unix.write(buf),
            ProbeStream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ProbeStream::Plain(tcp) => tcp.flush(),
            ProbeStream::Unix(unix) => unix.flush(),
            ProbeStream::Tls(tls) => tls.flush(),
        }
    }
}

/// Why a probe failed; the text is what `/nodes` shows as `last_error`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: NodeAddr, source: io::Error },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("server connection lost: {0}")]
    Io(io::Error),
    #[error("server closed the connection unexpectedly")]
    Closed,
    /// An ErrorResponse, as the server worded it.
    #[error("{severity} {code}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("server sent an invalid message: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl ProbeError {
    /// The connection is gone (not refused, not rejected): a reused connection that fails
    /// this way is worth one fresh attempt.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ProbeError::Io(_) | ProbeError::Closed)
            || matches!(self, ProbeError::Server { code, .. } if code.starts_with("57P") || code.starts_with("08"))
    }

    fn server(fields: &Fields<'_>) -> ProbeError {
        ProbeError::Server {
            severity: fields.severity().to_string(),
            code: fields.code().to_string(),
            message: fields.message().to_string(),
        }
    }

    fn io(e: io::Error, waiting: &'static str) -> ProbeError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProbeError::Timeout(waiting),
            _ => ProbeError::Io(e),
        }
    }
}

impl From<ClientAuthError> for ProbeError {
    fn from(e: ClientAuthError) -> Self {
        match e {
            ClientAuthError::OutOfOrder(what) => ProbeError::Protocol(what.into()),
            other => ProbeError::Auth(other.to_string()),
        }
    }
}

impl From<helios_shard::codec::CodecError> for ProbeError {
    fn from(e: helios_shard::codec::CodecError) -> Self {
        ProbeError::Protocol(e.to_string())
    }
}

/// One logged-in connection.
pub struct Probe {
    stream: ProbeStream,
    /// Received bytes not yet consumed, from `start`.
    buf: Vec<u8>,
    start: usize,
}

/// Asks for TLS as the shards do: on to TLS when the server agrees, plain when it
/// declines and `server_sslmode` allows that.
fn negotiate_tls(
    mut tcp: TcpStream,
    tls: &ServerTls,
    address: &str,
    deadline: Instant,
) -> Result<ProbeStream, ProbeError> {
    let waiting = "negotiating TLS";
    let mut request = Vec::with_capacity(8);
    startup::encode_ssl_request(&mut request);
    tcp.set_write_timeout(Some(left(deadline, waiting)?))
        .map_err(ProbeError::Io)?;
    tcp.write_all(&request)
        .map_err(|e| ProbeError::io(e, waiting))?;
    tcp.set_read_timeout(Some(left(deadline, waiting)?))
        .map_err(ProbeError::Io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .map_err(|e| ProbeError::io(e, waiting))?;
    match answer[0] {
        b'S' => {
            let name = helios_shard::tls::server_name(address)
                .ok_or_else(|| ProbeError::Tls(format!("{address} is not a valid server name")))?;
            let conn = rustls::ClientConnection::new(tls.config.clone(), name)
                .map_err(|e| ProbeError::Tls(e.to_string()))?;
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            while stream.conn.is_handshaking() {
                stream
                    .sock
                    .set_read_timeout(Some(left(deadline, waiting)?))
                    .map_err(ProbeError::Io)?;
                stream
                    .conn
                    .complete_io(&mut stream.sock)
                    .map_err(|e| ProbeError::Tls(e.to_string()))?;
            }
            Ok(ProbeStream::Tls(Box::new(stream)))
        }
        b'N' if tls.mode < SslMode::Require => Ok(ProbeStream::Plain(tcp)),
        b'N' => Err(ProbeError::Tls(
            "the server does not support SSL, but tls.server_sslmode requires it".into(),
        )),
        other => Err(ProbeError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

/// Connects a Unix-domain socket. That waits only while the server's listen queue is
/// full, and then (on Linux) no longer than the socket's send timeout: `timeout`.
fn connect_unix(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_write_timeout(Some(timeout))?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}

/// Time left before `deadline`, or a timeout error naming what was being waited for.
fn left(deadline: Instant, waiting: &'static str) -> Result<Duration, ProbeError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(ProbeError::Timeout(waiting))
}

impl Probe {
    /// Connects and logs in (trust, cleartext, md5 or SCRAM-SHA-256) before `deadline`.
    pub fn connect(target: Target<'_>, deadline: Instant) -> Result<Probe, ProbeError> {
        Self::open(target, deadline, false)
    }

    /// A logical replication connection (`replication=database`): it runs replication
    /// commands (CREATE_REPLICATION_SLOT, START_REPLICATION) and streams.
    pub fn connect_replication(target: Target<'_>, deadline: Instant) -> Result<Probe, ProbeError> {
        Self::open(target, deadline, true)
    }

    fn open(target: Target<'_>, deadline: Instant, replication: bool) -> Result<Probe, ProbeError> {
        let refused = |source: io::Error| match source.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                ProbeError::Timeout("connecting")
            }
            _ => ProbeError::Connect {
                addr: target.addr.clone(),
                source,
            },
        };
        let stream = match target.addr {
            NodeAddr::Tcp(addr) => {
                let stream = TcpStream::connect_timeout(addr, left(deadline, "connecting")?)
                    .map_err(refused)?;
                stream.set_nodelay(true).map_err(ProbeError::Io)?;
                match target.tls {
                    Some(tls) => negotiate_tls(stream, tls, target.address, deadline)?,
                    None => ProbeStream::Plain(stream),
                }
            }
            // Never TLS over a Unix-domain socket, as with libpq.
            NodeAddr::Unix { path, .. } => ProbeStream::Unix(
                connect_unix(path, left(deadline, "connecting")?).map_err(refused)?,
            ),
        };
        let mut probe = Probe {
            stream,
            buf: Vec::with_capacity(1024),
            start: 0,
        };
        probe.login(target, deadline, replication)?;
        Ok(probe)
    }

    fn login(
        &mut self,
        target: Target<'_>,
        deadline: Instant,
        replication: bool,
    ) -> Result<(), ProbeError> {
        let mut out = Vec::with_capacity(128);
        let mut params = vec![
            ("user", target.user),
            ("database", target.database),
            ("application_name", APPLICATION_NAME),
        ];
        if replication {
            params[2].1 = REPLICATION_APPLICATION_NAME;
            params.push(("replication", "database"));
        }
        startup::encode_startup(&mut out, &params);
        self.send(&out, deadline)?;
        let credential = target
            .password
            .map(|p| helios_shard::auth::ServerCredential::Password(p.to_string()));
        let mut auth = ClientAuth::new(target.user, credential.as_ref());
        // Reconnects are rare (only after a failure): no salted password is kept.
        let mut cache = SaltedPasswordCache::default();
        loop {
            let (tag, body) = self.next(deadline, "logging in")?;
            match be::decode(tag, &body)? {
                BackendMessage::Authentication(request) => {
                    out.clear();
                    auth.answer(request, &mut cache, &mut out)?;
                    if !out.is_empty() {
                        self.send(&out, deadline)?;
                    }
                }
                BackendMessage::ErrorResponse(fields) => return Err(ProbeError::server(&fields)),
                BackendMessage::ReadyForQuery(_) => return Ok(()),
                BackendMessage::ParameterStatus { .. }
                | BackendMessage::BackendKeyData { .. }
                | BackendMessage::NoticeResponse(_)
                | BackendMessage::NegotiateProtocolVersion { .. } => {}
                other => {
                    return Err(ProbeError::Protocol(format!(
                        "unexpected message '{}' during startup",
                        other.tag() as char
                    )))
                }
            }
        }
    }

    /// Runs `sql` as one simple Query and returns the rows of all its statements, or the
    /// server's first error once it is ready again.
    pub fn query(&mut self, sql: &str, deadline: Instant) -> Result<Rows, ProbeError> {
        let mut out = Vec::with_capacity(sql.len() + 6);
        frontend::encode_query(&mut out, sql);
        self.send(&out, deadline)?;
        let mut rows = Rows::new();
        let mut error = None;
        loop {
            let (tag, body) = match self.next(deadline, "waiting for the query result") {
                Ok(message) => message,
                // A server that says why before it hangs up (shutdown) is more telling.
                Err(ProbeError::Closed) if error.is_some() => break,
                Err(e) => return Err(e),
            };
            match be::decode(tag, &body)? {
                BackendMessage::DataRow(values) => rows.push(
                    values
                        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect(),
                ),
                BackendMessage::ErrorResponse(fields) if error.is_none() => {
                    error = Some(ProbeError::server(&fields))
                }
                BackendMessage::ReadyForQuery(_) => break,
                BackendMessage::CopyInResponse(_)
                | BackendMessage::CopyOutResponse(_)
                | BackendMessage::CopyBothResponse(_) => {
                    return Err(ProbeError::Protocol(
                        "COPY is not supported in a health check query".into(),
                    ))
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Sends a command that starts streaming (START_REPLICATION); Ok once the server
    /// answers with CopyBothResponse.
    pub fn start_copy_both(&mut self, sql: &str, deadline: Instant) -> Result<(), ProbeError> {
        let mut out = Vec::with_capacity(sql.len() + 6);
        frontend::encode_query(&mut out, sql);
        self.send(&out, deadline)?;
        loop {
            let (tag, body) = self.next(deadline, "starting replication")?;
            match be::decode(tag, &body)? {
                BackendMessage::CopyBothResponse(_) => return Ok(()),
                BackendMessage::ErrorResponse(fields) => return Err(ProbeError::server(&fields)),
                BackendMessage::NoticeResponse(_) | BackendMessage::ParameterStatus { .. } => {}
                other => {
                    return Err(ProbeError::Protocol(format!(
                        "unexpected message '{}' starting replication",
                        other.tag() as char
                    )))
                }
            }
        }
    }

    /// The next CopyData body of a stream; `None` when the server ended it (CopyDone or
    /// the command's completion). `Err(Timeout)` when nothing came before `deadline`.
    pub fn copy_data(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, ProbeError> {
        loop {
            let (tag, body) = self.next(deadline, "waiting for the stream")?;
            match tag {
                b'd' => return Ok(Some(body)),
                b'c' | b'C' | b'Z' => return Ok(None),
                b'E' => {
                    return Err(match be::decode(tag, &body)? {
                        BackendMessage::ErrorResponse(fields) => ProbeError::server(&fields),
                        _ => ProbeError::Protocol("malformed ErrorResponse".into()),
                    })
                }
                _ => {}
            }
        }
    }

    /// Sends one CopyData message of a stream.
    pub fn send_copy_data(&mut self, data: &[u8], deadline: Instant) -> Result<(), ProbeError> {
        let mut out = Vec::with_capacity(data.len() + 5);
        frontend::encode_copy_data(&mut out, data);
        self.send(&out, deadline)
    }

    /// Ends a stream from this side (CopyDone), then says goodbye.
    pub fn end_copy(mut self, deadline: Instant) {
        let mut out = Vec::with_capacity(10);
        frontend::encode_copy_done(&mut out);
        if self.send(&out, deadline).is_ok() {
            // The server answers with its own CopyDone and the command's completion.
            while let Ok(Some(_)) = self.copy_data(deadline) {}
        }
        self.terminate();
    }

    /// Says goodbye; best effort, bounded by a short write timeout.
    pub fn terminate(mut self) {
        let mut out = Vec::with_capacity(5);
        frontend::encode_terminate(&mut out);
        let _ = self.send(&out, Instant::now() + Duration::from_millis(200));
    }

    fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), ProbeError> {
        let waiting = "sending to the server";
        self.stream
            .set_write_timeout(left(deadline, waiting)?)
            .map_err(ProbeError::Io)?;
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| ProbeError::io(e, waiting))
    }

    /// The next whole message: (tag, body).
    fn next(
        &mut self,
        deadline: Instant,
        waiting: &'static str,
    ) -> Result<(u8, Vec<u8>), ProbeError> {
        loop {
            if let Some((tag, body, total)) =
                frame::split_message(&self.buf[self.start..], MAX_MESSAGE)?
            {
                let body = body.to_vec();
                self.start += total;
                return Ok((tag, body));
            }
            self.buf.drain(..self.start);
            self.start = 0;
            self.stream
                .set_read_timeout(left(deadline, waiting)?)
                .map_err(ProbeError::Io)?;
            let old = self.buf.len();
            self.buf.resize(old + 8192, 0);
            let read = self.stream.read(&mut self.buf[old..]);
            self.buf.truncate(old + read.as_ref().map_or(0, |n| *n));
            match read {
                Ok(0) => return Err(ProbeError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProbeError::io(e, waiting)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A fake server that answers the startup with `script` and then reads until EOF.
    fn serve(script: Vec<u8>) -> &'static NodeAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = Box::leak(Box::new(NodeAddr::Tcp(listener.local_addr().unwrap())));
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut sink = [0u8; 1024];
            let _ = conn.read(&mut sink);
            let _ = conn.write_all(&script);
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
        });
        addr
    }

    fn target(addr: &'static NodeAddr) -> Target<'static> {
        Target {
            addr,
            user: "u",
            password: None,
            database: "d",
            tls: None,
            address: "127.0.0.1:1",
        }
    }

    #[test]
    fn a_login_error_comes_back_with_the_servers_words() {
        let mut script = Vec::new();
        be::write_error(
            &mut script,
            "FATAL",
            "28P01",
            "password authentication failed for user \"u\"",
        );
        let addr = serve(script);
        let err = Probe::connect(target(addr), Instant::now() + Duration::from_secs(5))
            .err()
            .expect("login fails");
        assert_eq!(
            err.to_string(),
            "FATAL 28P01: password authentication failed for user \"u\""
        );
    }

    #[test]
    fn a_unix_socket_node_is_reached_at_its_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let addr = NodeAddr::resolve(dir.path().to_str().unwrap(), 5999).unwrap();
        let NodeAddr::Unix { path, .. } = &addr else {
            panic!("{addr} is not a Unix socket")
        };
        assert!(path.ends_with(".s.PGSQL.5999"));
        // Nothing listens yet: the error names the socket file.
        let addr: &'static NodeAddr = Box::leak(Box::new(addr.clone()));
        let err = Probe::connect(target(addr), Instant::now() + Duration::from_secs(5))
            .err()
            .expect("no server");
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(".s.PGSQL.5999"), "{err}");
        let NodeAddr::Unix { path, .. } = addr else {
            unreachable!()
        };
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut sink = [0u8; 1024];
            let _ = conn.read(&mut sink);
            let mut script = Vec::new();
            be::write_error(
                &mut script,
                "FATAL",
                "3D000",
                "database \"d\" does not exist",
            );
            let _ = conn.write_all(&script);
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
        });
        let err = Probe::connect(target(addr), Instant::now() + Duration::from_secs(5))
            .err()
            .expect("login fails");
        assert_eq!(
            err.to_string(),
            "FATAL 3D000: database \"d\" does not exist"
        );
    }

    #[test]
    fn a_silent_server_times_out_at_the_deadline() {
        let addr = serve(Vec::new());
        let err = Probe::connect(target(addr), Instant::now() + Duration::from_millis(100))
            .err()
            .expect("no answer");
        assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
    }

    #[test]
    fn a_password_request_without_a_password_is_an_auth_error() {
        let mut script = Vec::new();
        be::write_auth_cleartext(&mut script);
        let addr = serve(script);
        let err = Probe::connect(target(addr), Instant::now() + Duration::from_secs(5))
            .err()
            .expect("no password");
        assert!(matches!(err, ProbeError::Auth(_)), "{err}");
    }
}
