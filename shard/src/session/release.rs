//! Ending a session: tell the client what it needs to know, then bring the backend back
//! to a clean idle state (finish or cancel what is running, roll back, reset) and return
//! it to the pool — or close it when that cannot be done within the time limit.

use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::backend::{BackendConn, Settings};
use crate::cancel::send_cancel;
use crate::codec::frontend;
use crate::codec::tag::status;
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::pool::Pool;
use crate::sync;

use super::login::send_fatal;
use super::pump::{Lane, PumpEnd, Tracker};

pub async fn finish(
    ctx: &ShardCtx,
    mut client: TcpStream,
    backend: Lease,
    end: PumpEnd,
    track: Tracker,
    up: Lane,
) {
    tell_client(ctx, backend.pool(), &mut client, &end, track.server_fatal).await;
    match end {
        PumpEnd::BackendGone => backend.lost(),
        PumpEnd::BackendProtocol(_) => backend.discard(),
        PumpEnd::ClientProtocol(_) => recover(ctx, backend, track, Some(&up), true).await,
        PumpEnd::Drain | PumpEnd::ClientTerminated => {
            recover(ctx, backend, track, Some(&up), false).await
        }
        PumpEnd::ClientGone | PumpEnd::Quiet => {
            drop(client);
            recover(ctx, backend, track, Some(&up), true).await;
        }
    }
}

/// Tells the client why its session ends (nothing when it left by itself) and logs it.
/// When the server's own FATAL already reached the client (`server_fatal`), a vanished
/// server adds nothing: PostgreSQL sends one FATAL and closes.
pub async fn tell_client(
    ctx: &ShardCtx,
    pool: &Pool,
    client: &mut TcpStream,
    end: &PumpEnd,
    server_fatal: bool,
) {
    match end {
        PumpEnd::BackendGone if server_fatal => {
            let _ = client.close().await;
        }
        PumpEnd::BackendGone => {
            send_fatal(client, "08006", "server closed the connection unexpectedly").await
        }
        PumpEnd::BackendProtocol(e) => {
            log::error!("pool {}: server sent invalid data: {e}", pool.label);
            send_fatal(client, "08P01", &format!("server sent invalid data: {e}")).await;
        }
        PumpEnd::ClientProtocol(e) => {
            ctx.stats.protocol_errors.inc();
            log::info!("pool {}: client protocol violation: {e}", pool.label);
            send_fatal(client, e.sqlstate(), &e.to_string()).await;
        }
        PumpEnd::Drain => {
            send_fatal(
                client,
                "57P01",
                "terminating connection due to administrator command",
            )
            .await
        }
        PumpEnd::ClientTerminated => {
            let _ = client.close().await;
        }
        PumpEnd::ClientGone | PumpEnd::Quiet => {}
    }
}

/// Returns a backend whose client left normally (status known, nothing in flight).
pub async fn release_clean(ctx: &ShardCtx, backend: Lease) {
    let track = Tracker::new(backend.status);
    recover(ctx, backend, track, None, false).await;
}

/// How a connection is brought back to a state any client may get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// Session pooling: run `pool_mode.reset_query`.
    Query,
    /// Transaction pooling: reset the session settings, keep the shared prepared statements.
    Settings,
    /// Transaction pooling after connection-bound state: DISCARD ALL.
    DiscardAll,
}

/// Cleans the backend within `dirty_release_timeout_ms` and pools it, or closes it.
async fn recover(
    ctx: &ShardCtx,
    backend: Lease,
    track: Tracker,
    up: Option<&Lane>,
    cancel_running: bool,
) {
    recover_inner(ctx, backend, track, up, cancel_running, Reset::Query).await
}

/// [`recover`] for transaction pooling, whose unsent client bytes were already handled.
pub async fn recover_with(
    ctx: &ShardCtx,
    backend: Lease,
    track: Tracker,
    cancel_running: bool,
    reset: Reset,
) {
    recover_inner(ctx, backend, track, None, cancel_running, reset).await
}

async fn recover_inner(
    ctx: &ShardCtx,
    mut backend: Lease,
    mut track: Tracker,
    up: Option<&Lane>,
    cancel_running: bool,
    reset: Reset,
) {
    let limit = Duration::from_millis(ctx.config().timeouts.dirty_release_timeout_ms);
    let cleaned = sync::timeout(
        limit,
        clean(ctx, &mut backend, &mut track, up, cancel_running, reset),
    )
    .await;
    match cleaned {
        Some(true) => backend.release(),
        _ => {
            log::info!(
                "pool {}: closing a server connection that could not be cleaned for reuse",
                backend.pool().label
            );
            backend.discard()
        }
    }
}

async fn clean(
    ctx: &ShardCtx,
    backend: &mut BackendConn,
    track: &mut Tracker,
    up: Option<&Lane>,
    cancel_running: bool,
    reset: Reset,
) -> bool {
    backend.status = track.status;
    if let Some(up) = up {
        // Half a message went to the server: it cannot be brought back to a boundary.
        if !up.at_boundary() {
            return false;
        }
        // Whole messages the client sent but we had not forwarded yet still count as sent
        // (they were tracked); send them so the server's answers line up with the tracking.
        let pending = up.pending();
        if !pending.is_empty() && backend.stream.write_all(pending).await.is_err() {
            return false;
        }
    }
    let mut req = Vec::new();
    if track.copy_in {
        req.extend_from_slice(&copy_fail_message());
        track.copy_in = false;
    }
    if track.unsynced {
        frontend::encode_sync(&mut req);
        track.in_flight += 1;
        track.unsynced = false;
    }
    if !req.is_empty() && backend.stream.write_all(&req).await.is_err() {
        return false;
    }
    let mut buf = ctx.bufs.take();
    if track.in_flight > 0 {
        if cancel_running {
            send_cancel(
                backend.addr,
                backend.key,
                Duration::from_millis(ctx.config().timeouts.connect_timeout_ms),
            )
            .await;
        }
        // Errors reported here belong to the departed client's cancelled or failed work.
        if backend.drain(track.in_flight, &mut buf).await.is_err() {
            return false;
        }
    }
    if backend.status != status::IDLE {
        let mut rollback = Vec::new();
        frontend::encode_query(&mut rollback, "ROLLBACK");
        match backend.exchange(&rollback, 1, &mut buf).await {
            Ok(None) if backend.status == status::IDLE => {}
            _ => return false,
        }
    }
    let config = ctx.config();
    let query = match reset {
        Reset::Query => config.pool_mode.reset_query.trim(),
        Reset::DiscardAll => "DISCARD ALL",
        Reset::Settings => {
            let defaults = Settings::default();
            return matches!(
                super::pooled::settings::apply(backend, &defaults, &mut buf).await,
                Ok(None)
            ) && backend.status == status::IDLE;
        }
    };
    if !query.is_empty() {
        let mut req = Vec::new();
        frontend::encode_query(&mut req, query);
        match backend.exchange(&req, 1, &mut buf).await {
            Ok(None) if backend.status == status::IDLE => {}
            _ => return false,
        }
        // Whatever the reset query did, the proxy no longer knows what is prepared or set.
        backend.statements.clear();
        backend.pending_close.clear();
        backend.settings = Settings::default();
    }
    true
}

fn copy_fail_message() -> Vec<u8> {
    let mut out = Vec::new();
    let msg = frontend::FrontendMessage::CopyFail(b"client disconnected during COPY");
    msg.encode(&mut out);
    out
}
