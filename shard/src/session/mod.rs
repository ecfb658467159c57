//! One client session on one shard, in session pooling mode: log the client in, lease a
//! backend for the whole session, bring it to the client's startup parameters, then move
//! traffic until the client leaves, and hand the backend back clean (or close it).
//!
//! Memory: while a client is idle the session owns no I/O buffers — it waits on a
//! 16-byte read from either socket and borrows pooled buffers only while bytes flow.

pub mod console;
pub mod login;
pub mod pooled;
pub mod pump;
mod release;

use std::rc::Rc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::backend::BackendConn;
use crate::bufpool::Buf;
use crate::cancel::{CancelHandle, CancelTarget};
use crate::codec::backend as be;
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::pool::Pool;
use crate::sync;
use login::{send_fatal, Login, LoginError};
use pump::{Lane, Pump, PumpEnd, ReadPooled, Tracker};

/// Serves one accepted client connection to the end.
pub async fn serve(ctx: Rc<ShardCtx>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let peer = client.peer_addr().ok();
    let who = PeerName(peer);
    let startup_timeout = Duration::from_millis(ctx.config().timeouts.startup_timeout_ms);
    let login =
        match sync::timeout(startup_timeout, Box::pin(login::login(&ctx, &mut client))).await {
            None => {
                log::info!("client {who}: startup timed out");
                send_fatal(
                    &mut client,
                    "08006",
                    "timed out waiting for startup and authentication",
                )
                .await;
                return;
            }
            Some(Err(LoginError::Gone)) => return,
            Some(Err(LoginError::Fatal { code, message })) => {
                if code == "08P01" {
                    ctx.stats.protocol_errors.inc();
                }
                log::warn!("client {who}: login refused ({code}): {message}");
                send_fatal(&mut client, code, &message).await;
                return;
            }
            Some(Ok(login)) => login,
        };
    log::debug!(
        "client {who}: logged in as {} to {}",
        login.user.name,
        login.database
    );
    if console::is_console(&login.database) {
        Box::pin(console::serve(&ctx, client, login)).await;
        log::debug!("client {who}: console session ended");
        return;
    }
    let mode = ctx
        .config()
        .pool_mode_for(&login.user.name, &login.database);
    // Each mode's state machine is allocated on its own: a session task then carries only
    // the one it runs, not the larger of the two.
    match mode {
        crate::config::PoolMode::Session => Box::pin(session_mode(&ctx, client, login)).await,
        pooled => Box::pin(pooled::serve(&ctx, client, login, pooled)).await,
    }
    log::debug!("client {who}: session ended");
}

/// A client address for log lines, formatted only when a line is written.
struct PeerName(Option<std::net::SocketAddr>);

impl std::fmt::Display for PeerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("(unknown)"),
        }
    }
}

async fn session_mode(ctx: &Rc<ShardCtx>, mut client: TcpStream, login: Login) {
    let Some(node) = ctx.primary() else {
        send_fatal(&mut client, "08006", "no primary node is available").await;
        return;
    };
    let pool = ctx.pool(&node, &login.database, &login.user);
    let Some(mut backend) = acquire_or_report(&pool, &mut client).await else {
        return;
    };
    match apply_params(ctx, &mut backend, &login.params).await {
        Ok(None) => {}
        Ok(Some(err)) => {
            let mut out = Vec::new();
            err.encode(&mut out);
            let _ = client.write_all(&out).await;
            let _ = client.close().await;
            release::release_clean(ctx, backend).await;
            return;
        }
        Err(_) => {
            backend.lost();
            send_fatal(
                &mut client,
                "08006",
                "server connection lost while setting parameters",
            )
            .await;
            return;
        }
    }

    // The client sees its backend's real pid: in session pooling that is what
    // pg_backend_pid() and its notifications say.
    let cancel = ctx
        .cancels
        .register(client_info(&client, &login), Some(backend.key.pid));
    drop(login);
    if welcome(&mut client, &backend, &cancel).await.is_err() {
        ctx.cancels.unregister(&cancel);
        release::release_clean(ctx, backend).await;
        return;
    }
    cancel.attach(CancelTarget {
        addr: backend.addr,
        key: backend.key,
        backend_id: backend.id,
    });

    let mut up = Lane::upstream(ctx.max_message_size());
    let mut down = Lane::downstream();
    let mut track = Tracker::new(backend.status);
    let end = forward(
        ctx,
        &mut client,
        &mut backend,
        &mut up,
        &mut down,
        &mut track,
    )
    .await;
    cancel.detach();
    ctx.cancels.unregister(&cancel);
    release::finish(ctx, client, backend, end, track, up).await;
}

/// Who the client is, for SHOW CLIENTS and KILL_CLIENT.
pub(crate) fn client_info(client: &TcpStream, login: &Login) -> crate::cancel::ClientInfo {
    use std::os::fd::AsRawFd;
    crate::cancel::ClientInfo {
        user: login.user.name.as_str().into(),
        database: login.database.as_str().into(),
        application_name: login
            .params
            .iter()
            .find(|(name, _)| name == "application_name")
            .map(|(_, value)| value.as_str().into()),
        addr: client.peer_addr().ok(),
        connected: std::time::SystemTime::now(),
        fd: client.as_raw_fd(),
    }
}

/// Takes a connection for this client (see [`acquire_watching_client`]), or tells the
/// client why there is none and closes it.
pub(crate) async fn acquire_or_report(pool: &Rc<Pool>, client: &mut TcpStream) -> Option<Lease> {
    match acquire_watching_client(pool, client).await? {
        Ok(backend) => Some(backend),
        Err(e) => {
            report_acquire_error(pool, client, e).await;
            None
        }
    }
}

/// FATAL 53300 naming the pool (or the connect error), then close: the client cannot be
/// served.
pub(crate) async fn report_acquire_error(
    pool: &Pool,
    client: &mut TcpStream,
    error: crate::pool::AcquireError,
) {
    log::warn!("pool {}: {error}", pool.label);
    let mut out = Vec::new();
    match error {
        crate::pool::AcquireError::Connect(e) => e.encode_for_client(&mut out),
        other => be::write_error(&mut out, "FATAL", other.sqlstate(), &other.to_string()),
    }
    let _ = client.write_all(&out).await;
    let _ = client.close().await;
}

/// Waits for a backend, giving up if the client disconnects meanwhile (its place in the
/// queue is then released).
pub(crate) async fn acquire_watching_client(
    pool: &Rc<Pool>,
    client: &mut TcpStream,
) -> Option<Result<Lease, crate::pool::AcquireError>> {
    let acquire = async { Some(pool.acquire().await) };
    let watch = async {
        let mut probe = [0u8; 1];
        match client.peek(&mut probe).await {
            Ok(0) | Err(_) => None,
            // The client spoke early; let the acquire decide.
            Ok(_) => std::future::pending().await,
        }
    };
    futures_lite::future::or(acquire, watch).await
}

/// Sets the client's startup parameters on the backend through one extended-protocol
/// round trip (`set_config` with bound values: no quoting, no injection).
pub(crate) async fn apply_params(
    ctx: &ShardCtx,
    backend: &mut BackendConn,
    params: &[(String, String)],
) -> Result<Option<crate::backend::ServerError>, crate::backend::BackendError> {
    let wanted: Vec<&(String, String)> = params
        .iter()
        .filter(|(name, value)| backend.params.get(name) != Some(value.as_str()))
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    pooled::settings::set_params(backend, &wanted, &mut ctx.bufs.take()).await
}

/// Completes the client's startup: AuthenticationOk, the server's parameters, the
/// proxy-issued cancel key, ReadyForQuery.
pub(crate) async fn welcome(
    client: &mut TcpStream,
    backend: &BackendConn,
    cancel: &CancelHandle,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(512);
    be::write_auth_ok(&mut out);
    for (name, value) in backend.params.iter() {
        be::write_parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    be::write_backend_key_data(&mut out, cancel.pid, cancel.secret);
    be::write_ready_for_query(&mut out, backend.status);
    client.write_all(&out).await
}

/// Waits, holding no buffers, until the client or its server speaks (or goes away), or
/// the shard starts draining.
pub(crate) async fn idle_wait(
    ctx: &ShardCtx,
    client: &mut TcpStream,
    server: &mut TcpStream,
) -> Wake {
    let from_client = async {
        match (ReadPooled {
            stream: client,
            pool: &ctx.bufs,
        })
        .await
        {
            Some((buf, n)) => Wake::Client(buf, n),
            None => Wake::ClientGone,
        }
    };
    let from_server = async {
        match (ReadPooled {
            stream: server,
            pool: &ctx.bufs,
        })
        .await
        {
            Some((buf, n)) => Wake::Backend(buf, n),
            None => Wake::BackendGone,
        }
    };
    let drain = async {
        ctx.draining.wait().await;
        Wake::Drain
    };
    futures_lite::future::or(from_client, futures_lite::future::or(from_server, drain)).await
}

/// What woke an idle session.
pub(crate) enum Wake {
    Client(Buf, usize),
    Backend(Buf, usize),
    ClientGone,
    BackendGone,
    Drain,
}

/// Alternates between idle (no buffers; waiting for either socket to become readable)
/// and active (the pump) until the session ends.
async fn forward(
    ctx: &Rc<ShardCtx>,
    client: &mut TcpStream,
    backend: &mut BackendConn,
    up: &mut Lane,
    down: &mut Lane,
    track: &mut Tracker,
) -> PumpEnd {
    loop {
        let wake = idle_wait(ctx, client, &mut backend.stream).await;
        let mut terminated = false;
        // DROP DATABASE and the like: the proxy's idle connections there must go first.
        // The fence stays up until the session is idle again.
        let mut _fence = None;
        match wake {
            Wake::ClientGone => return PumpEnd::ClientGone,
            Wake::BackendGone => return PumpEnd::BackendGone,
            Wake::Drain => return PumpEnd::Drain,
            Wake::Client(buf, n) => {
                if let Some(database) = crate::sql::exclusive::exclusive_database_in(&buf[..n]) {
                    _fence = Some(Box::pin(crate::fence::fence_database(ctx, &database)).await);
                }
                match pump::seed_up(up, buf, n, track, &ctx.stats) {
                    Ok(t) => terminated = t,
                    Err(e) => return PumpEnd::ClientProtocol(e),
                }
            }
            Wake::Backend(buf, n) => {
                if let Err(e) =
                    pump::seed_down(down, buf, n, track, &mut backend.params, &ctx.stats)
                {
                    return PumpEnd::BackendProtocol(e);
                }
            }
        }
        up.activate(&ctx.bufs);
        down.activate(&ctx.bufs);
        let end = Pump {
            client: &mut *client,
            backend: &mut backend.stream,
            params: &mut backend.params,
            up: &mut *up,
            down: &mut *down,
            track: &mut *track,
            stats: &ctx.stats,
            draining: &ctx.draining,
            backend_eof: false,
            client_terminated: terminated,
        }
        .await;
        match end {
            PumpEnd::Quiet => {
                up.deactivate();
                down.deactivate();
            }
            other => return other,
        }
    }
}
