//! One client connection on one shard: startup and authentication, then the admin
//! console or the engine (every pool mode) until the client leaves.

pub mod auth_query;
pub mod console;
pub mod failures;
pub mod login;

use std::rc::Rc;
use std::time::Duration;

use crate::stream::NetStream;

use crate::context::ShardCtx;
use crate::sync;
use login::{send_fatal, LoginError};

/// A session to park, and when its idle wait began.
pub type ToPark = (Box<crate::engine::session::Session>, std::time::Instant);

/// Serves one accepted client connection to its end, or until it has been idle long
/// enough to be parked (see `dormant`): then its session is handed back.
pub async fn serve(ctx: &Rc<ShardCtx>, client: &mut NetStream) -> Option<ToPark> {
    // Everything before the session's first idle wait in its own allocation, gone once
    // the client is welcomed: an idle client's task holds only the engine's small state.
    let mut session = Box::pin(welcome(ctx, client)).await?;
    match crate::engine::serve(ctx, client, &mut session, None).await {
        crate::engine::Served::Idle(since) => Some((session, since)),
        crate::engine::Served::Over => {
            log::debug!(
                "client {}: session ended",
                PeerName(session.cancel.info.addr)
            );
            None
        }
    }
}

/// Startup, authentication and the welcome: the client's session, or `None` when it
/// ended here (refused, gone, or a console session that is over).
async fn welcome(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
) -> Option<Box<crate::engine::session::Session>> {
    let _ = client.set_nodelay(true);
    let peer = client.peer_addr().ok();
    let who = PeerName(peer);
    let startup_timeout = Duration::from_millis(ctx.config().timeouts.startup_timeout_ms);
    let login = match sync::timeout(startup_timeout, Box::pin(login::login(ctx, client))).await {
        None => {
            log::info!("client {who}: startup timed out");
            send_fatal(
                client,
                "08006",
                "timed out waiting for startup and authentication",
            )
            .await;
            return None;
        }
        Some(Err(LoginError::Gone)) => return None,
        Some(Err(LoginError::AuthFailed {
            code,
            message,
            reason,
        })) => {
            ctx.stats.auth_failures.inc();
            ctx.stats.auth_failures_by_reason[reason as usize].inc();
            let delay = match peer {
                Some(addr) => ctx.login_failures.borrow_mut().record(addr.ip()),
                None => std::time::Duration::ZERO,
            };
            if !delay.is_zero() {
                ctx.stats.auth_delayed.inc();
            }
            log::warn!(
                "client {who}: login refused ({code}, {}): {message}{}",
                reason.label(),
                if delay.is_zero() {
                    String::new()
                } else {
                    format!(" (answered after {delay:?}: repeated failures from this address)")
                }
            );
            glommio::timer::sleep(delay).await;
            send_fatal(client, code, &message).await;
            return None;
        }
        Some(Err(LoginError::Fatal { code, message })) => {
            if code == "08P01" {
                ctx.stats.protocol_errors.inc();
            }
            log::warn!("client {who}: login refused ({code}): {message}");
            send_fatal(client, code, &message).await;
            return None;
        }
        Some(Ok(mut login)) => {
            login.peer = peer;
            login
        }
    };
    log::debug!(
        "client {who}: logged in as {} to {}",
        login.user.name,
        login.database
    );
    if console::is_console(&login.database) {
        Box::pin(console::serve(ctx, client, login)).await;
        log::debug!("client {who}: console session ended");
        return None;
    }
    let mode = ctx
        .config()
        .pool_mode_for(&login.user.name, &login.database);
    // The login's state ends with the welcome; an idle session keeps only its own.
    let session = Box::pin(crate::engine::start(ctx, client, &login, mode)).await;
    drop(login);
    if session.is_none() {
        log::debug!("client {who}: not welcomed");
    }
    session
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
