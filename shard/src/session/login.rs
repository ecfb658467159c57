//! The client side of connection startup: SSL/GSS negotiation ('N'), cancel requests,
//! the StartupMessage, and authenticating the client against the configured users.

use std::io;
use std::rc::Rc;

use crate::stream::NetStream;
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::failures::AuthFailure;
use crate::auth::hba::Decision;
use crate::auth::{md5, scram, Secret, ServerCredential};
use crate::cancel::CancelMsg;
use crate::codec::backend as be;
use crate::codec::startup::{self, StartupPacket, MAX_STARTUP_PACKET};
use crate::codec::{frontend, CodecError};
use crate::config::{AuthMethod, SslMode};
use crate::context::{ShardCtx, UserEntry};
use crate::msgio::{MessageReader, ReadError};

/// A client that passed authentication, with what it asked for at startup.
pub struct Login {
    pub user: Rc<UserEntry>,
    pub database: String,
    /// Run-time parameters to establish on the backend (from the startup packet and `options`).
    pub params: Vec<(String, String)>,
    /// `_pq_.` protocol options we do not support.
    pub unsupported_options: Vec<String>,
    /// The client's address (asked of the socket once, when it connected).
    pub peer: Option<std::net::SocketAddr>,
}

/// Why startup ended without a logged-in client. Each carries what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The client went away, or sent a cancel request (the connection is done either way).
    #[error("client closed the connection")]
    Gone,
    #[error("{message}")]
    Fatal { code: &'static str, message: String },
    /// The client could not prove who it is (counted, and damped per address).
    #[error("{message}")]
    AuthFailed {
        code: &'static str,
        message: String,
        reason: AuthFailure,
    },
}

impl LoginError {
    fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        LoginError::Fatal {
            code,
            message: message.into(),
        }
    }
}

impl From<io::Error> for LoginError {
    fn from(_: io::Error) -> Self {
        LoginError::Gone
    }
}

impl From<CodecError> for LoginError {
    fn from(e: CodecError) -> Self {
        LoginError::fatal(e.sqlstate(), e.to_string())
    }
}

impl From<ReadError> for LoginError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Codec(e) => e.into(),
            _ => LoginError::Gone,
        }
    }
}

/// Reads startup packets until a StartupMessage arrives, answering SSL requests with
/// 'S' and a TLS handshake when `[tls]` offers it (else 'N'), GSS requests with 'N', and
/// routing cancel requests; then authenticates.
pub async fn login(ctx: &ShardCtx, stream: &mut NetStream) -> Result<Login, LoginError> {
    let (mut ssl_asked, mut gss_asked) = (false, false);
    let acceptor = ctx.tls.borrow().clone();
    if let Some(acceptor) = &acceptor {
        // PostgreSQL 17's direct TLS: a handshake record instead of a startup packet.
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE_RECORD {
            start_tls(stream, acceptor, true).await?;
            ssl_asked = true;
        }
    }
    loop {
        let packet = read_startup_packet(stream).await?;
        match startup::decode_startup(&packet)? {
            None => return Err(LoginError::fatal("08P01", "incomplete startup packet")),
            Some((request @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest), _)) => {
                let asked = match request {
                    StartupPacket::SslRequest => &mut ssl_asked,
                    _ => &mut gss_asked,
                };
                if std::mem::replace(asked, true) {
                    // Each may be asked once; PostgreSQL then reads the request code as a
                    // protocol version and refuses it at once.
                    return Err(repeated_request(&packet).into());
                }
                match (&request, &acceptor) {
                    (StartupPacket::SslRequest, Some(acceptor)) => {
                        stream.send(b"S").await?;
                        start_tls(stream, acceptor, false).await?;
                    }
                    _ => stream.send(b"N").await?,
                }
            }
            Some((StartupPacket::Cancel { pid, secret }, _)) => {
                crate::bus::route_cancel(ctx, CancelMsg { pid, secret }).await;
                return Err(LoginError::Gone);
            }
            Some((StartupPacket::Startup(msg), _)) => {
                let mut login = parse_startup(ctx, &msg)?;
                if !stream.is_tls() && ctx.config().tls.client_sslmode >= SslMode::Require {
                    // As PostgreSQL with only `hostssl` lines for this client.
                    let host = stream
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    return Err(LoginError::AuthFailed {
                        code: "28000",
                        reason: AuthFailure::NoEncryption,
                        message: format!(
                            "no pg_hba.conf entry for host \"{host}\", user \"{}\", database \"{}\", no encryption",
                            login.user.name, login.database
                        ),
                    });
                }
                let method = hba_method(ctx, stream, &login)?;
                let looked_up = look_up(ctx, &mut login, method).await?;
                negotiate_protocol(stream, msg.minor(), &login.unsupported_options).await?;
                match authenticate(stream, &login.user, method).await {
                    Ok(proof) => {
                        if let Some(credential) = proof {
                            ctx.learn_credential(&login.user, credential);
                        }
                        return Ok(login);
                    }
                    Err(e) => {
                        if looked_up && matches!(e, LoginError::AuthFailed { .. }) {
                            // A password changed on the server is seen at the next try.
                            ctx.auth_query
                                .forget(ctx, &login.database, &login.user.name);
                        }
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// A user no `[[users]]` entry names is looked up with `auth_query` when it is on (not
/// for the admin console, whose users are configured). True when the user came from it.
async fn look_up(
    ctx: &ShardCtx,
    login: &mut Login,
    method: AuthMethod,
) -> Result<bool, LoginError> {
    if login.user.refusal.is_none() || super::console::is_console(&login.database) {
        return Ok(false);
    }
    let name = login.user.name.clone();
    let Some(found) = ctx.auth_query.lookup(ctx, &login.database, &name).await else {
        return Ok(false);
    };
    let found = found.map_err(|e| {
        log::warn!(
            "auth_query for user \"{name}\" in database \"{}\" failed: {e}",
            login.database
        );
        LoginError::fatal(
            "08006",
            format!("could not check the password of user \"{name}\": the server did not answer the lookup"),
        )
    })?;
    login.user = Rc::new(UserEntry::looked_up(&name, method, &found));
    Ok(true)
}

/// The first byte of a TLS handshake record (direct TLS sends it first).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Takes the connection to TLS. Direct TLS must have agreed on ALPN `postgresql`, as
/// PostgreSQL 17 requires.
async fn start_tls(
    stream: &mut NetStream,
    acceptor: &futures_rustls::TlsAcceptor,
    direct: bool,
) -> Result<(), LoginError> {
    if let Err(e) = stream.start_tls(acceptor).await {
        log::info!("client TLS handshake failed: {e}");
        return Err(LoginError::Gone);
    }
    if direct && stream.alpn() != Some(crate::tls::ALPN_POSTGRESQL) {
        return Err(LoginError::fatal(
            "08P01",
            "received direct SSL connection request without ALPN protocol negotiation extension",
        ));
    }
    Ok(())
}

/// The error PostgreSQL gives a second SSLRequest or GSSENCRequest: its code read as a
/// protocol version.
fn repeated_request(packet: &[u8]) -> CodecError {
    let code = packet
        .get(4..8)
        .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    CodecError::UnsupportedProtocol {
        major: (code >> 16) as u16,
        minor: (code & 0xffff) as u16,
    }
}

/// Tells a client that asked for a newer protocol minor or `_pq_` options that we speak
/// 3.0 without them, as PostgreSQL does.
async fn negotiate_protocol(
    stream: &mut NetStream,
    minor: u16,
    options: &[String],
) -> io::Result<()> {
    if minor == 0 && options.is_empty() {
        return Ok(());
    }
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(64);
    be::write_negotiate_protocol_version(&mut out, startup::PROTOCOL_3_0 as i32, &options);
    stream.send(&out).await
}

/// Reads one startup packet. Every packet is at least 8 bytes long, so the first read
/// asks for up to 8 (a whole SSLRequest in one receive) and never takes bytes past the
/// packet; the length is checked as soon as its 4 bytes are in.
async fn read_startup_packet(stream: &mut NetStream) -> Result<Vec<u8>, LoginError> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut head[got..]).await {
            Ok(0) | Err(_) => return Err(LoginError::Gone),
            Ok(n) => got += n,
        }
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        // Not a PostgreSQL client (a Terminate, an HTTP request, noise): PostgreSQL only
        // logs this and hangs up, so a client that sent it hears nothing either.
        log::debug!("invalid length of startup packet ({len}); closing");
        return Err(LoginError::Gone);
    }
    let mut packet = vec![0u8; len];
    packet[..got].copy_from_slice(&head[..got]);
    read_exact_or_gone(stream, &mut packet[got..]).await?;
    Ok(packet)
}

async fn read_exact_or_gone(stream: &mut NetStream, buf: &mut [u8]) -> Result<(), LoginError> {
    stream.read_exact(buf).await.map_err(|_| LoginError::Gone)
}

fn parse_startup(ctx: &ShardCtx, msg: &startup::StartupMessage<'_>) -> Result<Login, LoginError> {
    let user_name = msg.get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        LoginError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    if msg
        .get("replication")
        .is_some_and(|v| v != "false" && v != "0" && v != "off")
    {
        return Err(LoginError::fatal(
            "0A000",
            "replication connections are not supported by the proxy",
        ));
    }
    // A name no [[users]] entry has is asked for a password all the same (and fails
    // as a wrong one does), so logins cannot tell which users exist.
    let user = ctx
        .user(user_name)
        .unwrap_or_else(|| Rc::new(UserEntry::unknown(user_name, ctx.config().auth.method)));
    let database = msg
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user_name)
        .to_string();
    let mut params = Vec::new();
    let mut unsupported_options = Vec::new();
    for (name, value) in msg.params() {
        match name {
            "user" | "database" | "replication" => {}
            "options" => params.extend(parse_options(value)?),
            _ if name.starts_with("_pq_.") => unsupported_options.push(name.to_string()),
            _ => params.push((name.to_string(), value.to_string())),
        }
    }
    Ok(Login {
        user,
        database,
        params,
        unsupported_options,
        peer: None,
    })
}

/// Parses the `options` startup parameter: `-c name=value` and `--name=value` words,
/// with backslash escaping spaces, as the server does.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, LoginError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let setting = if w == "-c" {
            iter.next().ok_or_else(|| {
                LoginError::fatal("22023", "invalid command-line argument: -c needs a setting")
            })?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else {
            return Err(LoginError::fatal(
                "22023",
                format!("invalid command-line argument for server process: {w}"),
            ));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| LoginError::fatal("42601", format!("-c {setting} requires a value")))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

/// The login method: the user's, or what the first matching `auth_hba_file` line says
/// (no line, or `reject`: refused in PostgreSQL's words).
fn hba_method(ctx: &ShardCtx, stream: &NetStream, login: &Login) -> Result<AuthMethod, LoginError> {
    let Some(hba) = ctx.hba.borrow().clone() else {
        return Ok(login.user.method);
    };
    let tls = stream.is_tls();
    let ip = stream
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let (user, database) = (&login.user.name, &login.database);
    let encryption = if tls {
        "SSL encryption"
    } else {
        "no encryption"
    };
    match hba.decide(tls, ip, user, database) {
        Some(Decision::Method(method)) => Ok(method),
        Some(Decision::Reject) => Err(LoginError::AuthFailed {
            code: "28000",
            message: format!(
                "pg_hba.conf rejects connection for host \"{ip}\", user \"{user}\", database \"{database}\", {encryption}"
            ),
            reason: AuthFailure::HbaReject,
        }),
        None => Err(LoginError::AuthFailed {
            code: "28000",
            message: format!(
                "no pg_hba.conf entry for host \"{ip}\", user \"{user}\", database \"{database}\", {encryption}"
            ),
            reason: AuthFailure::NoHbaEntry,
        }),
    }
}

/// Runs the login exchange; on success, returns what the client proved that can log the
/// proxy in to servers as that user (SCRAM keys, the md5 hash, a clear-text password).
async fn authenticate(
    stream: &mut NetStream,
    user: &UserEntry,
    method: AuthMethod,
) -> Result<Option<ServerCredential>, LoginError> {
    // As PostgreSQL: md5 for a role whose only secret is a SCRAM verifier means SCRAM.
    let method = match (method, &user.secret) {
        (AuthMethod::Md5, Some(crate::auth::Secret::Scram(_))) => AuthMethod::ScramSha256,
        _ => method,
    };
    let failed = || LoginError::AuthFailed {
        code: "28P01",
        message: format!("password authentication failed for user \"{}\"", user.name),
        reason: user.refusal.unwrap_or(AuthFailure::WrongPassword),
    };
    let mut proof = None;
    let mut out = Vec::with_capacity(256);
    let mut reader = MessageReader::new(MAX_STARTUP_PACKET);
    match method {
        AuthMethod::Trust => {}
        AuthMethod::Cert => {
            // As PostgreSQL's `cert` method: the verified certificate's CN is the user.
            let Some(cert) = stream.peer_certificate() else {
                return Err(LoginError::AuthFailed {
                    code: "28000",
                    message: "connection requires a valid client certificate".into(),
                    reason: AuthFailure::NoCertificate,
                });
            };
            if crate::tls::common_name(cert).as_deref() != Some(user.name.as_str()) {
                return Err(LoginError::AuthFailed {
                    code: "28000",
                    message: format!(
                        "certificate authentication failed for user \"{}\"",
                        user.name
                    ),
                    reason: AuthFailure::CertificateMismatch,
                });
            }
        }
        AuthMethod::Password => {
            be::write_auth_cleartext(&mut out);
            stream.send(&out).await?;
            let body = read_password_message(stream, &mut reader).await?;
            let password = frontend::decode_password(&body)?;
            if !cleartext_matches(user, password) {
                return Err(failed());
            }
            proof = std::str::from_utf8(password)
                .ok()
                .map(|p| ServerCredential::Password(p.to_string()));
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            be::write_auth_md5(&mut out, salt);
            stream.send(&out).await?;
            let body = read_password_message(stream, &mut reader).await?;
            let response = frontend::decode_password(&body)?;
            let secret = user.secret.as_ref().ok_or_else(failed)?;
            if !md5::verify(secret, &user.name, salt, response) {
                return Err(failed());
            }
            proof = match secret {
                Secret::Md5(hash) => Some(ServerCredential::Md5Hash(hash.clone())),
                Secret::Plain(password) => Some(ServerCredential::Password(password.clone())),
                Secret::Scram(_) => None,
            };
        }
        AuthMethod::ScramSha256 => {
            let verifier = user.scram.clone().ok_or_else(failed)?;
            let mut server = scram::ScramServer::new(verifier);
            be::write_auth_sasl(&mut out, &[scram::MECHANISM]);
            stream.send(&out).await?;
            let body = read_password_message(stream, &mut reader).await?;
            let initial = frontend::decode_sasl_initial(&body)?;
            if initial.mechanism != scram::MECHANISM {
                return Err(LoginError::fatal(
                    "08P01",
                    "client selected an invalid SASL authentication mechanism",
                ));
            }
            let first = server
                .client_first(initial.data.unwrap_or_default())
                .map_err(|e| scram_failure(e, &failed))?;
            out.clear();
            be::write_auth_sasl_continue(&mut out, &first);
            stream.send(&out).await?;
            let body = read_password_message(stream, &mut reader).await?;
            let last = server
                .client_final(&body)
                .map_err(|e| scram_failure(e, &failed))?;
            out.clear();
            be::write_auth_sasl_final(&mut out, &last);
            stream.send(&out).await?;
            // Keys of a verifier the proxy made itself (from a plain password) are no
            // use on a server; the password is.
            proof = match &user.secret {
                Some(Secret::Scram(_)) => server.keys().map(ServerCredential::Scram),
                Some(Secret::Plain(password)) => Some(ServerCredential::Password(password.clone())),
                _ => None,
            };
        }
    }
    if user.refusal == Some(AuthFailure::UnknownUser) {
        // Only reachable without a password (trust, cert): PostgreSQL says the same.
        return Err(LoginError::AuthFailed {
            code: "28000",
            message: format!("role \"{}\" does not exist", user.name),
            reason: AuthFailure::UnknownUser,
        });
    }
    Ok(proof)
}

fn scram_failure(e: scram::ScramError, failed: &dyn Fn() -> LoginError) -> LoginError {
    match e {
        scram::ScramError::BadProof => failed(),
        other => LoginError::fatal(other.sqlstate(), other.to_string()),
    }
}

fn cleartext_matches(user: &UserEntry, password: &[u8]) -> bool {
    user.secret
        .as_ref()
        .is_some_and(|secret| secret.verify_cleartext(&user.name, password))
}

/// Reads one authentication response ('p'); anything else is a protocol violation.
async fn read_password_message(
    stream: &mut NetStream,
    reader: &mut MessageReader,
) -> Result<Vec<u8>, LoginError> {
    let (tag, body) = reader.next(stream).await?;
    if tag != crate::codec::tag::fe::PASSWORD {
        return Err(LoginError::fatal(
            "08P01",
            format!(
                "expected password response, got message type '{}'",
                tag as char
            ),
        ));
    }
    Ok(body)
}

/// Writes a FATAL ErrorResponse and closes; errors writing are ignored (the client may be gone).
pub async fn send_fatal(stream: &mut NetStream, code: &str, message: &str) {
    let mut out = Vec::with_capacity(64 + message.len());
    be::write_error(&mut out, "FATAL", code, message);
    let _ = stream.send(&out).await;
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::parse_options;

    #[test]
    fn options_parse_like_the_server() {
        let got =
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=64kB").unwrap();
        assert_eq!(
            got,
            vec![
                ("search_path".to_string(), "a,b".to_string()),
                ("statement_timeout".to_string(), "5s".to_string()),
                ("work_mem".to_string(), "64kB".to_string()),
            ]
        );
        let got = parse_options(r"-c application_name=my\ app").unwrap();
        assert_eq!(
            got,
            vec![("application_name".to_string(), "my app".to_string())]
        );
        assert!(parse_options("-c").is_err());
        assert!(parse_options("bogus").is_err());
    }
}
