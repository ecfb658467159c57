//! The SQL admin console: a client that logs in to database `heliosproxy` (or
//! `pgbouncer`, for PgBouncer's tools) talks to the proxy itself. It never borrows a
//! backend: each simple query goes to the control plane as a [`ConsoleRequest`], and the
//! answer comes back as rows. The shard thread never blocks on it; the session polls the
//! reply channel between short timer sleeps.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::stream::NetStream;
use crossbeam_channel::TryRecvError;

use super::login::{send_fatal, Login};
use crate::cancel::CancelHandle;
use crate::codec::backend as be;
use crate::codec::frontend::{self, FrontendMessage};
use crate::context::ShardCtx;
use crate::control::{ConsoleError, ConsoleReply, ConsoleRequest, ConsoleResult};
use crate::msgio::{MessageReader, ReadError};

/// Database names that open the console instead of a pooled session.
pub const DATABASES: [&str; 2] = ["heliosproxy", "pgbouncer"];

/// The longest a statement waits for the control plane, unless PAUSE may wait longer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the reply channel is looked at while a statement runs.
const REPLY_POLL: Duration = Duration::from_millis(2);

/// Is this startup database the admin console?
pub fn is_console(database: &str) -> bool {
    DATABASES.contains(&database)
}

/// Serves one console session: checks the user may use the console, welcomes it with the
/// proxy's own parameters, then answers statements until it leaves.
pub async fn serve(ctx: &Rc<ShardCtx>, client: &mut NetStream, login: Login) {
    let user = login.user.name.clone();
    if ctx.config().console_access(&user).is_none() {
        log::warn!("user {user} refused the admin console: not in admin_users or stats_users");
        send_fatal(client, "42501", &not_allowed(&user)).await;
        return;
    }
    let cancel = ctx
        .cancels
        .register(crate::engine::welcome::client_info(client, &login), None);
    if welcome(client, &login, &cancel).await.is_ok() {
        run(ctx, client, &user).await;
    }
    ctx.cancels.unregister(&cancel);
}

fn not_allowed(user: &str) -> String {
    format!("user \"{user}\" is not allowed to use the admin console")
}

/// AuthenticationOk, the console's parameters, the proxy-issued key (so the session shows
/// in SHOW CLIENTS and KILL_CLIENT can end it), ReadyForQuery.
async fn welcome(
    client: &mut NetStream,
    login: &Login,
    cancel: &CancelHandle,
) -> std::io::Result<()> {
    let version = format!("15.0 (HeliosProxy {})", env!("CARGO_PKG_VERSION"));
    let application_name = login
        .params
        .iter()
        .find(|(name, _)| name == "application_name")
        .map(|(_, value)| value.as_str())
        .unwrap_or("");
    let params = [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", application_name),
    ];
    let mut out = Vec::with_capacity(512);
    be::write_auth_ok(&mut out);
    for (name, value) in params {
        be::write_parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    be::write_backend_key_data(&mut out, cancel.pid, cancel.secret);
    be::write_ready_for_query(&mut out, crate::codec::tag::status::IDLE);
    client.send(&out).await
}

/// What ended waiting for the client's next message.
enum Next {
    Message(u8, Vec<u8>),
    Gone,
    Invalid(String),
    Drain,
}

async fn next(ctx: &ShardCtx, client: &mut NetStream, reader: &mut MessageReader) -> Next {
    let read = async {
        match reader.next(client).await {
            Ok((tag, body)) => Next::Message(tag, body),
            Err(ReadError::Codec(e)) => Next::Invalid(e.to_string()),
            Err(_) => Next::Gone,
        }
    };
    let drain = async {
        ctx.draining.wait().await;
        Next::Drain
    };
    futures_lite::future::or(read, drain).await
}

/// The statement loop. Extended-protocol messages are refused once and then skipped up
/// to the Sync, as a server does after an error.
async fn run(ctx: &Rc<ShardCtx>, client: &mut NetStream, user: &str) {
    let mut reader = MessageReader::new(ctx.max_message_size());
    let mut skipping = false;
    loop {
        let (tag, body) = match next(ctx, client, &mut reader).await {
            Next::Message(tag, body) => (tag, body),
            Next::Gone => return,
            Next::Drain => {
                let message = "terminating connection due to administrator command";
                send_fatal(client, "57P01", message).await;
                return;
            }
            Next::Invalid(message) => {
                ctx.stats.protocol_errors.inc();
                send_fatal(client, "08P01", &message).await;
                return;
            }
        };
        let msg = match frontend::decode(tag, &body) {
            Ok(msg) => msg,
            Err(e) => {
                ctx.stats.protocol_errors.inc();
                send_fatal(client, e.sqlstate(), &e.to_string()).await;
                return;
            }
        };
        let mut out = Vec::new();
        match msg {
            FrontendMessage::Terminate => return,
            FrontendMessage::Sync => {
                skipping = false;
                be::write_ready_for_query(&mut out, crate::codec::tag::status::IDLE);
            }
            _ if skipping => continue,
            FrontendMessage::Query(sql) => {
                let sql = String::from_utf8_lossy(sql);
                answer(ctx, user, &sql, &mut out).await;
                be::write_ready_for_query(&mut out, crate::codec::tag::status::IDLE);
            }
            FrontendMessage::Parse { .. }
            | FrontendMessage::Bind(_)
            | FrontendMessage::Describe { .. }
            | FrontendMessage::Execute { .. }
            | FrontendMessage::Close { .. }
            | FrontendMessage::Flush => {
                skipping = true;
                write_error(&mut out, &extended_refused());
            }
            FrontendMessage::FunctionCall(_) => {
                write_error(&mut out, &extended_refused());
                be::write_ready_for_query(&mut out, crate::codec::tag::status::IDLE);
            }
            // Outside COPY a server ignores these too.
            FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail(_) => continue,
            FrontendMessage::Password(_) => {
                ctx.stats.protocol_errors.inc();
                send_fatal(client, "08P01", "unexpected password message").await;
                return;
            }
        }
        if client.send(&out).await.is_err() {
            return;
        }
    }
}

fn extended_refused() -> ConsoleError {
    ConsoleError {
        code: "0A000",
        message: "the admin console supports only the simple query protocol".into(),
    }
}

/// Runs one simple query and appends its results (or its error).
async fn answer(ctx: &ShardCtx, user: &str, sql: &str, out: &mut Vec<u8>) {
    if sql.split(';').all(|part| part.trim().is_empty()) {
        be::BackendMessage::EmptyQueryResponse.encode(out);
        return;
    }
    // Rights follow the running configuration, so a reload can grant or revoke them.
    let reply = match ctx.config().console_access(user) {
        None => Err(ConsoleError {
            code: "42501",
            message: not_allowed(user),
        }),
        Some(admin) => ask(ctx, user, admin, sql).await,
    };
    match reply {
        Ok(results) => {
            for result in &results {
                write_result(out, result);
            }
        }
        Err(e) => write_error(out, &e),
    }
}

/// Sends the statement to the control plane and waits for the answer without blocking
/// the shard: other sessions keep running between polls.
async fn ask(ctx: &ShardCtx, user: &str, admin: bool, sql: &str) -> ConsoleReply {
    let unavailable = |message: &str| ConsoleError {
        code: "58000",
        message: message.into(),
    };
    let Some(console) = ctx.console.as_ref() else {
        return Err(unavailable(
            "the admin console is not available in this process",
        ));
    };
    let (reply, replies) = crossbeam_channel::bounded(1);
    let request = ConsoleRequest {
        user: user.to_string(),
        admin,
        sql: sql.to_string(),
        reply,
    };
    if console.send(request).is_err() {
        return Err(unavailable("the admin console has stopped"));
    }
    // PAUSE may legitimately wait for the shutdown timeout before it answers.
    let pause_bound = Duration::from_secs(ctx.config().timeouts.shutdown_timeout_secs);
    let limit = REPLY_TIMEOUT.max(pause_bound + Duration::from_secs(5));
    let deadline = Instant::now() + limit;
    loop {
        match replies.try_recv() {
            Ok(answer) => return answer,
            Err(TryRecvError::Disconnected) => {
                return Err(unavailable("the admin console dropped the statement"))
            }
            Err(TryRecvError::Empty) if Instant::now() >= deadline => {
                return Err(ConsoleError {
                    code: "57014",
                    message: format!(
                        "the admin console did not answer within {} s",
                        limit.as_secs()
                    ),
                })
            }
            Err(TryRecvError::Empty) => glommio::timer::sleep(REPLY_POLL).await,
        }
    }
}

fn write_error(out: &mut Vec<u8>, e: &ConsoleError) {
    be::write_error(out, "ERROR", e.code, &e.message);
}

/// RowDescription and DataRows (when the result has columns), then CommandComplete.
fn write_result(out: &mut Vec<u8>, result: &ConsoleResult) {
    be::write_text_result(out, &result.columns, &result.rows, &result.tag);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::backend::{decode, BackendMessage};
    use crate::codec::frame::split_message;

    fn messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut rest = bytes;
        let mut out = Vec::new();
        while let Some((tag, body, total)) = split_message(rest, 1 << 20).unwrap() {
            out.push((tag, body.to_vec()));
            rest = &rest[total..];
        }
        assert!(rest.is_empty());
        out
    }

    #[test]
    fn results_encode_as_a_server_would() {
        let result = ConsoleResult {
            columns: vec!["a".into(), "b".into()],
            rows: vec![vec![Some("1".into()), None]],
            tag: "SHOW".into(),
        };
        let mut out = Vec::new();
        write_result(&mut out, &result);
        let msgs = messages(&out);
        assert_eq!(
            msgs.iter().map(|m| m.0).collect::<Vec<_>>(),
            b"TDC".to_vec()
        );
        match decode(b'T', &msgs[0].1).unwrap() {
            BackendMessage::RowDescription(fields) => {
                let names: Vec<_> = fields.iter().map(|f| f.name.to_vec()).collect();
                assert_eq!(names, vec![b"a".to_vec(), b"b".to_vec()]);
            }
            other => panic!("not a RowDescription: {other:?}"),
        }
        match decode(b'D', &msgs[1].1).unwrap() {
            BackendMessage::DataRow(row) => {
                let values: Vec<_> = row.iter().map(|v| v.map(<[u8]>::to_vec)).collect();
                assert_eq!(values, vec![Some(b"1".to_vec()), None]);
            }
            other => panic!("not a DataRow: {other:?}"),
        }
        assert_eq!(
            decode(b'C', &msgs[2].1).unwrap(),
            BackendMessage::CommandComplete(b"SHOW")
        );
    }

    #[test]
    fn a_command_without_rows_sends_only_its_tag() {
        let mut out = Vec::new();
        write_result(
            &mut out,
            &ConsoleResult {
                tag: "PAUSE".into(),
                ..Default::default()
            },
        );
        assert_eq!(messages(&out).len(), 1);
    }

    #[test]
    fn console_databases() {
        assert!(is_console("heliosproxy"));
        assert!(is_console("pgbouncer"));
        assert!(!is_console("postgres"));
    }
}
