//! A connection from the proxy to a PostgreSQL backend: connect, authenticate as a
//! client, remember the server's parameters and key, and run the proxy's own short
//! exchanges (applying client parameters, reset, rollback). Query traffic does not go
//! through here: sessions pump it byte-for-byte.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::auth::client::{ClientAuth, ClientAuthError};
use crate::auth::scram;
use crate::codec::backend::{self as be, Authentication, BackendMessage};
use crate::codec::frame::{Scanner, Step, TagSet};
use crate::codec::tag::be as server_tag;
use crate::codec::{frontend, startup, CodecError};
use crate::msgio::{MessageReader, ReadError};
use crate::nodeaddr::NodeAddr;
use crate::prepared::ServerStatements;
use crate::stream::NetStream;
use futures_rustls::rustls::pki_types::ServerName;

/// What the proxy needs to open one backend connection.
#[derive(Clone, Debug)]
pub struct ConnectSpec {
    pub addr: NodeAddr,
    pub user: String,
    pub database: String,
    /// Configured (`users.server_password`), or learned from a client's login.
    pub credential: Option<crate::auth::ServerCredential>,
    /// Run-time parameters sent in the startup packet besides user and database.
    pub startup_params: Vec<(&'static str, &'static str)>,
    /// The connect (TCP, or Unix-domain socket).
    pub connect_timeout: Duration,
    /// Startup and authentication after the connect.
    pub login_timeout: Duration,
    pub max_message_size: usize,
    /// SCRAM salted passwords for this credential, shared by every connection of a pool.
    pub scram_cache: Rc<RefCell<scram::SaltedPasswordCache>>,
    /// TLS towards this server (`tls.server_sslmode`), and the name its certificate is
    /// checked against.
    pub tls: Option<(crate::tls::ServerTls, ServerName<'static>)>,
}

/// The backend's real cancel key (never shown to clients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// Parameters the server reported with ParameterStatus, kept current as they change.
#[derive(Clone, Debug, Default)]
pub struct ServerParams(Vec<(String, String)>);

impl ServerParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &[u8], value: &[u8]) {
        let name = String::from_utf8_lossy(name);
        let value = String::from_utf8_lossy(value);
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value.into_owned(),
            None => self.0.push((name.into_owned(), value.into_owned())),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// An ErrorResponse from a backend, kept so it can be relayed to a client verbatim.
#[derive(Clone, Debug)]
pub struct ServerError {
    fields: Vec<(u8, Vec<u8>)>,
}

impl ServerError {
    fn from_fields(fields: &be::Fields<'_>) -> Self {
        ServerError {
            fields: fields.iter().map(|(c, v)| (c, v.to_vec())).collect(),
        }
    }

    fn field(&self, code: u8) -> &str {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .unwrap_or("")
    }

    /// An error of the proxy's own, relayed like a server's.
    pub fn own(severity: &str, code: &str, message: &str) -> Self {
        use crate::codec::tag::field;
        ServerError {
            fields: vec![
                (field::SEVERITY, severity.as_bytes().to_vec()),
                (field::SEVERITY_NONLOCALIZED, severity.as_bytes().to_vec()),
                (field::CODE, code.as_bytes().to_vec()),
                (field::MESSAGE, message.as_bytes().to_vec()),
            ],
        }
    }

    pub fn code(&self) -> &str {
        self.field(crate::codec::tag::field::CODE)
    }

    pub fn message(&self) -> &str {
        self.field(crate::codec::tag::field::MESSAGE)
    }

    /// Writes this error as an ErrorResponse for a client.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let fields: Vec<(u8, &[u8])> = self.fields.iter().map(|(c, v)| (*c, &v[..])).collect();
        be::write_error_fields(out, &fields);
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.message())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: NodeAddr, source: io::Error },
    #[error("timed out connecting to server {0}")]
    ConnectTimeout(NodeAddr),
    #[error("timed out logging in to server {0} (timeouts.server_login_timeout_ms)")]
    LoginTimeout(NodeAddr),
    #[error("server connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("server closed the connection unexpectedly")]
    Closed,
    #[error("server error: {0}")]
    Server(ServerError),
    #[error("server sent an invalid message: {0}")]
    Protocol(String),
    #[error("server authentication failed: {0}")]
    Auth(String),
    #[error("TLS with server {addr}: {reason}")]
    Tls { addr: NodeAddr, reason: String },
}

impl From<CodecError> for BackendError {
    fn from(e: CodecError) -> Self {
        BackendError::Protocol(e.to_string())
    }
}

impl From<ReadError> for BackendError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => BackendError::Io(e),
            ReadError::Closed => BackendError::Closed,
            ReadError::Codec(e) => e.into(),
        }
    }
}

impl BackendError {
    /// A failure that may pass by itself: the server is unreachable, restarting or
    /// shutting down — not a refusal of this user, database or password.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Connect { .. }
            | BackendError::ConnectTimeout(_)
            | BackendError::LoginTimeout(_)
            | BackendError::Io(_)
            | BackendError::Closed => true,
            // cannot_connect_now (starting up, shutting down, in recovery), admin
            // shutdown, crash shutdown, too many connections.
            BackendError::Server(e) => matches!(e.code(), "57P03" | "57P01" | "57P02" | "53300"),
            BackendError::Protocol(_) | BackendError::Auth(_) | BackendError::Tls { .. } => false,
        }
    }

    /// Writes the error a client should see for this failure.
    pub fn encode_for_client(&self, out: &mut Vec<u8>) {
        match self {
            BackendError::Server(e) => e.encode(out),
            BackendError::Auth(_) => be::write_error(out, "FATAL", "28000", &self.to_string()),
            _ => be::write_error(out, "FATAL", "08006", &self.to_string()),
        }
    }
}

/// Asks the server for TLS (an SSLRequest) and, when it agrees, runs the handshake; a
/// server that declines is used in plain text unless `server_sslmode` requires TLS.
async fn negotiate_tls(
    stream: &mut NetStream,
    tls: &crate::tls::ServerTls,
    name: ServerName<'static>,
    addr: &NodeAddr,
) -> Result<(), BackendError> {
    let mut request = Vec::with_capacity(8);
    startup::encode_ssl_request(&mut request);
    stream.send(&request).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => stream
            .connect_tls(&tls.connector, name)
            .await
            .map_err(|e| BackendError::Tls {
                addr: addr.clone(),
                reason: e.to_string(),
            }),
        b'N' if tls.mode < crate::config::SslMode::Require => Ok(()),
        b'N' => Err(BackendError::Tls {
            addr: addr.clone(),
            reason: "the server does not support SSL, but tls.server_sslmode requires it".into(),
        }),
        other => Err(BackendError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

/// Appends a message the server sent on its own, header included, for later delivery.
fn keep_for_client(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    crate::codec::frame::write_parts(out, tag, &[body]);
}

/// One authenticated backend connection.
pub struct BackendConn {
    pub stream: NetStream,
    pub id: u64,
    pub addr: NodeAddr,
    pub key: BackendKey,
    pub params: ServerParams,
    pub created: Instant,
    pub idle_since: Instant,
    /// Transaction status from the last ReadyForQuery: b'I', b'T' or b'E'.
    pub status: u8,
    /// Statements prepared on this connection by transaction/statement pooling.
    pub statements: ServerStatements,
    /// Statement names to Close before this connection's next request (a skipped Close,
    /// or a plan gone stale).
    pub pending_close: Vec<Rc<str>>,
    /// Session settings in effect on this connection (see `engine::settings`).
    pub settings: Settings,
    /// NotificationResponse (and trailing NoticeResponse) messages, whole and raw, that
    /// arrived during the proxy's own exchanges: they belong to the client and are passed
    /// on after the exchange, or dropped when the connection goes back to the pool.
    pub notifications: Vec<u8>,
}

/// Session-level settings as (name, value) pairs sorted by name; shared, never mutated.
pub type Settings = Rc<Vec<(String, String)>>;

/// Rows of text values from one of the proxy's own queries.
pub type Rows = Vec<Vec<Option<String>>>;

impl BackendConn {
    /// Opens, authenticates and waits for the first ReadyForQuery.
    pub async fn connect(spec: &ConnectSpec, id: u64) -> Result<BackendConn, BackendError> {
        let mut stream = NetStream::connect(&spec.addr, spec.connect_timeout)
            .await
            .map_err(|e| {
                if e.kind() == io::ErrorKind::TimedOut {
                    BackendError::ConnectTimeout(spec.addr.clone())
                } else {
                    BackendError::Connect {
                        addr: spec.addr.clone(),
                        source: e,
                    }
                }
            })?;
        stream.set_nodelay(true)?;
        // No TLS over a Unix-domain socket (as libpq): the configuration refuses a
        // server_sslmode that requires it for such a node.
        if let Some((tls, name)) = spec.tls.as_ref().filter(|_| !stream.is_unix()) {
            let negotiated = crate::sync::timeout(
                spec.login_timeout,
                negotiate_tls(&mut stream, tls, name.clone(), &spec.addr),
            );
            match negotiated.await {
                Some(r) => r?,
                None => return Err(BackendError::LoginTimeout(spec.addr.clone())),
            }
        }
        let now = Instant::now();
        let mut conn = BackendConn {
            stream,
            id,
            addr: spec.addr.clone(),
            key: BackendKey { pid: 0, secret: 0 },
            params: ServerParams::default(),
            created: now,
            idle_since: now,
            status: crate::codec::tag::status::IDLE,
            statements: ServerStatements::default(),
            pending_close: Vec::new(),
            settings: Settings::default(),
            notifications: Vec::new(),
        };
        let startup_fut = conn.startup(spec);
        match crate::sync::timeout(spec.login_timeout, startup_fut).await {
            Some(r) => r?,
            None => return Err(BackendError::LoginTimeout(spec.addr.clone())),
        }
        Ok(conn)
    }

    async fn startup(&mut self, spec: &ConnectSpec) -> Result<(), BackendError> {
        let mut out = Vec::with_capacity(128);
        let mut params = vec![("user", spec.user.as_str()), ("database", &spec.database)];
        params.extend(spec.startup_params.iter().copied());
        startup::encode_startup(&mut out, &params);
        self.stream.send(&out).await?;
        let mut reader = MessageReader::new(spec.max_message_size);
        let mut client = ClientAuth::new(&spec.user, spec.credential.as_ref());
        loop {
            let (tag, body) = reader.next(&mut self.stream).await?;
            match be::decode(tag, &body)? {
                BackendMessage::Authentication(auth) => {
                    out.clear();
                    self.answer_auth(auth, spec, &mut client, &mut out)?;
                    if !out.is_empty() {
                        self.stream.send(&out).await?;
                    }
                }
                BackendMessage::ParameterStatus { name, value } => self.params.set(name, value),
                BackendMessage::BackendKeyData { pid, secret } => {
                    self.key = BackendKey { pid, secret }
                }
                BackendMessage::ErrorResponse(fields) => {
                    return Err(BackendError::Server(ServerError::from_fields(&fields)))
                }
                BackendMessage::ReadyForQuery(status) => {
                    self.status = status;
                    return Ok(());
                }
                BackendMessage::NoticeResponse(_)
                | BackendMessage::NegotiateProtocolVersion { .. } => {}
                other => {
                    return Err(BackendError::Protocol(format!(
                        "unexpected message '{}' during startup",
                        other.tag() as char
                    )))
                }
            }
        }
    }

    /// Answers one Authentication request through the shared sans-IO client
    /// ([`ClientAuth`]), naming this server and the config key in the errors.
    fn answer_auth(
        &self,
        auth: Authentication<'_>,
        spec: &ConnectSpec,
        client: &mut ClientAuth<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        client
            .answer(auth, &mut spec.scram_cache.borrow_mut(), out)
            .map_err(|e| match e {
                ClientAuthError::NoPassword => BackendError::Auth(format!(
                    "server {} asks for a password for user \"{}\" and none is configured (users.server_password)",
                    spec.addr, spec.user
                )),
                ClientAuthError::Unfit { asked, held } => BackendError::Auth(format!(
                    "server {} asks for {asked} for user \"{}\", which {held} cannot answer (users.server_password)",
                    spec.addr, spec.user
                )),
                ClientAuthError::OutOfOrder(what) => BackendError::Protocol(what.into()),
                other => BackendError::Auth(other.to_string()),
            })
    }

    /// Sends `request` and reads until `syncs` ReadyForQuery messages arrived (see
    /// [`drain`](Self::drain)). `buf` is scratch space for reads.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        syncs: u32,
        buf: &mut [u8],
    ) -> Result<Option<ServerError>, BackendError> {
        self.stream.send(request).await?;
        self.drain(syncs, buf).await
    }

    /// Reads server output until `syncs` ReadyForQuery messages arrived, keeping the
    /// server parameters and transaction status current and returning the first
    /// ErrorResponse. Other bodies are skipped, not kept, so even a cancelled COPY TO of any
    /// size drains in `buf`'s memory.
    pub async fn drain(
        &mut self,
        syncs: u32,
        buf: &mut [u8],
    ) -> Result<Option<ServerError>, BackendError> {
        self.read_replies(syncs, buf, false).await.map(|(_, e)| e)
    }

    /// Sends a simple Query and appends everything the server answers, up to and
    /// including its ReadyForQuery, to `out` as it came (a replay compares it with what a
    /// client once received).
    pub async fn exchange_raw(
        &mut self,
        request: &[u8],
        buf: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.stream.send(request).await?;
        let mut scanner = Scanner::new(
            be::TAGS,
            TagSet::new(&[server_tag::READY_FOR_QUERY]),
            usize::MAX >> 1,
        );
        loop {
            let n = self.stream.read(buf).await?;
            if n == 0 {
                return Err(BackendError::Closed);
            }
            let mut ready = None;
            scanner.scan(&buf[..n], |_, body, end| {
                ready = Some((end, body.first().copied()));
                Step::Stop
            })?;
            match ready {
                Some((end, status)) => {
                    out.extend_from_slice(&buf[..end]);
                    self.status = status.unwrap_or(b'I');
                    return Ok(());
                }
                None => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends `request` and reads until `syncs` ReadyForQuery messages arrived, keeping the
    /// text values of every DataRow: for the proxy's own small catalog queries.
    pub async fn fetch(
        &mut self,
        request: &[u8],
        syncs: u32,
        buf: &mut [u8],
    ) -> Result<(Rows, Option<ServerError>), BackendError> {
        self.stream.send(request).await?;
        self.read_replies(syncs, buf, true).await
    }

    /// The reading behind [`drain`](Self::drain) and [`fetch`](Self::fetch). Messages the
    /// server sends on its own (NotificationResponse, NoticeResponse, ParameterStatus) may
    /// arrive in the same read as the last ReadyForQuery: they are kept for the client (see
    /// `notifications`) and reading goes on until a message boundary. Anything else after
    /// the last ReadyForQuery is a protocol error.
    async fn read_replies(
        &mut self,
        mut syncs: u32,
        buf: &mut [u8],
        keep_rows: bool,
    ) -> Result<(Rows, Option<ServerError>), BackendError> {
        let mut scanner = Scanner::new(
            be::TAGS,
            TagSet::new(&[
                server_tag::READY_FOR_QUERY,
                server_tag::PARAMETER_STATUS,
                server_tag::ERROR_RESPONSE,
                server_tag::DATA_ROW,
                server_tag::NOTIFICATION_RESPONSE,
                server_tag::NOTICE_RESPONSE,
            ]),
            usize::MAX >> 1,
        );
        let mut rows = Rows::new();
        let mut first_error = None;
        let mut stray = false;
        while syncs > 0 || !scanner.at_boundary() {
            let n = self.stream.read(buf).await?;
            if n == 0 {
                return Err(BackendError::Closed);
            }
            let (params, status) = (&mut self.params, &mut self.status);
            let notifications = &mut self.notifications;
            scanner.scan(&buf[..n], |tag, body, _| {
                if tag == server_tag::NOTIFICATION_RESPONSE
                    || (tag == server_tag::NOTICE_RESPONSE && syncs == 0)
                {
                    keep_for_client(notifications, tag, body);
                }
                match be::decode(tag, body) {
                    Ok(BackendMessage::ParameterStatus { name, value }) => params.set(name, value),
                    _ if syncs == 0 => {
                        stray |= !matches!(
                            tag,
                            server_tag::NOTIFICATION_RESPONSE | server_tag::NOTICE_RESPONSE
                        )
                    }
                    Ok(BackendMessage::ReadyForQuery(s)) => {
                        *status = s;
                        syncs -= 1;
                    }
                    Ok(BackendMessage::ErrorResponse(fields)) if first_error.is_none() => {
                        first_error = Some(ServerError::from_fields(&fields));
                    }
                    Ok(BackendMessage::DataRow(values)) if keep_rows => rows.push(
                        values
                            .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    ),
                    _ => {}
                }
                Step::Continue
            })?;
            if stray {
                return Err(BackendError::Protocol(
                    "server sent data after ReadyForQuery".into(),
                ));
            }
        }
        Ok((rows, first_error))
    }

    /// True when the server has neither closed the connection nor sent anything while it
    /// sat idle in the pool (a server that is shutting a connection down says why first).
    /// Free when the socket was read dry and no event came since; else one non-blocking
    /// peek. (An event not yet collected is caught by the first use: a dead-on-arrival
    /// connection starts the unit over.)
    pub fn is_alive(&self) -> bool {
        if self.stream.known_quiet() {
            return true;
        }
        let mut probe = [0u8; 1];
        // SAFETY: recv on our own socket into a 1-byte stack buffer, never blocking.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// Says goodbye politely; used when a connection leaves the pool for good.
    pub async fn terminate(mut self) {
        let mut out = Vec::with_capacity(5);
        frontend::encode_terminate(&mut out);
        let _ = crate::sync::timeout(Duration::from_secs(1), self.stream.send(&out)).await;
        let _ = self.stream.close().await;
    }
}
