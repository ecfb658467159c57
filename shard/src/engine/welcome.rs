//! The login phase: completes a logged-in client's startup on a connection of its home
//! pool — startup parameters applied, the session's settings learnt, the welcome sent
//! (AuthenticationOk, the server's parameters, the cancel key, ReadyForQuery). In
//! session mode the connection stays with the session; otherwise it goes back at once.

use std::rc::Rc;

use crate::stream::NetStream;
use futures_lite::AsyncWriteExt;

use crate::backend::Settings;
use crate::cancel::CancelHandle;
use crate::codec::backend as be;
use crate::codec::tag::status;
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::pool::{AcquireError, Pool};
use crate::session::login::{send_fatal, Login};

use super::finish::{release_clean, Reset};
use super::phase::{Phase, Ready};
use super::session::{Features, Held, Registered, Session};
use super::settings;

/// Logs the client in to its home pool, or tells it why not (and returns `None`).
pub async fn login<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    login: &Login,
    features: Features,
    phases: &P,
) -> Option<Box<Session>> {
    let node = loop {
        if ctx.awaiting_primary() {
            // A failover is under way: the login waits for the new primary like a unit.
            if let Err(why) = super::failover::wait_for_primary(ctx).await {
                send_fatal(client, "08006", &why.message(ctx)).await;
                return None;
            }
            continue;
        }
        match ctx.primary() {
            Some(node) => break node,
            None => {
                send_fatal(client, "08006", "no primary node is available").await;
                return None;
            }
        }
    };
    let home = ctx.pool(&node, &login.database, &login.user);
    let keeps = features.keeps_home_connection();
    // The pooled modes' clients get a made-up pid now (they may wait for a connection
    // and be listed meanwhile); a session-mode client gets its backend's real one.
    let early = (!keeps)
        .then(|| Registered::new(ctx, ctx.cancels.register(client_info(client, login), None)));
    if let (Some(cancel), true) = (early.as_ref(), features.follow_settings) {
        if let Some(known) = home.welcome_for(&login.params) {
            // A pooled-mode login like one already welcomed: no server connection. Its
            // settings (startup parameters included) go on with its first unit.
            ctx.stats.logins_without_server.inc();
            welcome(client, &known.params, status::IDLE, cancel)
                .await
                .ok()?;
            let cancel = early.expect("registered above");
            let (settings, startup) = (known.settings.clone(), known.startup.clone());
            return Some(new_session(
                ctx, login, features, cancel, home, settings, startup,
            ));
        }
    }
    let mut backend = acquire_or_report(&home, client).await?;
    let mut buf = ctx.bufs.take();
    if features.follow_settings && !settings::same(&backend.settings, &Settings::default()) {
        // Start every client from the server's defaults.
        if !matches!(
            settings::apply(&mut backend, &Settings::default(), &mut buf).await,
            Ok(None)
        ) {
            backend.discard();
            send_fatal(client, "08006", "could not reset a server connection").await;
            return None;
        }
    }
    let cancel = match early {
        Some(registered) => registered,
        None => Registered::new(
            ctx,
            ctx.cancels
                .register(client_info(client, login), Some(backend.key.pid)),
        ),
    };
    let reset = if keeps { Reset::Query } else { Reset::Settings };
    let startup: Vec<(String, String)> = login
        .params
        .iter()
        .filter(|(name, value)| backend.params.get(name) != Some(value.as_str()))
        .cloned()
        .collect();
    if !startup.is_empty() {
        match settings::apply_startup_params(&mut backend, &login.params, &mut buf).await {
            Ok(None) => {}
            Ok(Some(err)) => {
                let mut out = Vec::new();
                err.encode(&mut out);
                let _ = client.send(&out).await;
                let _ = client.close().await;
                release_clean(ctx, backend, reset).await;
                return None;
            }
            Err(_) => {
                backend.lost();
                send_fatal(
                    client,
                    "08006",
                    "server connection lost while setting parameters",
                )
                .await;
                return None;
            }
        }
    }
    drop(buf);
    let settings = backend.settings.clone();
    let mut session = new_session(ctx, login, features, cancel, home, settings, startup);
    match phases.login(&mut session, &mut backend).await {
        Ready::Go => {}
        Ready::Refused(_) | Ready::Lost(_) => {
            backend.discard();
            send_fatal(client, "08006", "could not read session settings").await;
            return None;
        }
    }
    if welcome(client, &backend.params, backend.status, &session.cancel)
        .await
        .is_err()
    {
        release_clean(ctx, backend, reset).await;
        return None;
    }
    if !keeps && session.features.follow_settings {
        session.home.remember_welcome(
            &login.params,
            backend.params.clone(),
            session.settings.clone(),
            session.startup.clone(),
        );
    }
    if keeps {
        session.point_cancel(Some(&backend));
        session.held = Some(Box::new(Held {
            lease: backend,
            notes: Default::default(),
        }));
    } else {
        backend.release();
    }
    Some(session)
}

/// A logged-in client's session on `home`, before its first unit.
fn new_session(
    ctx: &Rc<ShardCtx>,
    login: &Login,
    features: Features,
    cancel: Registered,
    home: Rc<Pool>,
    settings: Settings,
    startup: Vec<(String, String)>,
) -> Box<Session> {
    Box::new(Session {
        ctx: ctx.clone(),
        features,
        limits: super::cut::Limits::new(&ctx.config()),
        cancel,
        home_version: ctx.topology_version.get(),
        home,
        held: None,
        pinned: false,
        statements: Default::default(),
        settings,
        startup,
        user: login.user.clone(),
        pools: Default::default(),
        wrote_at: 0,
        carried: None,
        stream_position: 0,
        cache_bypass: false,
    })
}

/// Who the client is, for SHOW CLIENTS and KILL_CLIENT.
pub(crate) fn client_info(client: &NetStream, login: &Login) -> crate::cancel::ClientInfo {
    use std::os::fd::AsRawFd;
    crate::cancel::ClientInfo {
        user: login.user.name.as_str().into(),
        database: login.database.as_str().into(),
        application_name: login
            .params
            .iter()
            .find(|(name, _)| name == "application_name")
            .map(|(_, value)| value.as_str().into()),
        addr: login.peer,
        connected: std::time::SystemTime::now(),
        fd: std::cell::Cell::new(client.as_raw_fd()),
    }
}

/// Takes a connection for this client (see [`acquire_watching_client`]), or tells the
/// client why there is none and closes it.
async fn acquire_or_report(pool: &Rc<Pool>, client: &mut NetStream) -> Option<Lease> {
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
pub async fn report_acquire_error(pool: &Pool, client: &mut NetStream, error: AcquireError) {
    log::warn!("pool {}: {error}", pool.label);
    let mut out = Vec::new();
    match error {
        AcquireError::Connect(e) => e.encode_for_client(&mut out),
        other => be::write_error(&mut out, "FATAL", other.sqlstate(), &other.to_string()),
    }
    let _ = client.send(&out).await;
    let _ = client.close().await;
}

/// Waits for a connection, giving up if the client disconnects meanwhile (its place in
/// the queue is then released).
async fn acquire_watching_client(
    pool: &Rc<Pool>,
    client: &mut NetStream,
) -> Option<Result<Lease, AcquireError>> {
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

/// AuthenticationOk, the server's parameters, the cancel key, ReadyForQuery.
async fn welcome(
    client: &mut NetStream,
    params: &crate::backend::ServerParams,
    status: u8,
    cancel: &CancelHandle,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(512);
    be::write_auth_ok(&mut out);
    for (name, value) in params.iter() {
        be::write_parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    be::write_backend_key_data(&mut out, cancel.pid, cancel.secret);
    be::write_ready_for_query(&mut out, status);
    client.send(&out).await
}
