//! Ending a session: tell the client what it needs to know, then bring the backend back
//! to a clean idle state (finish or cancel what is running, roll back, reset) and return
//! it to the pool — or close it when that cannot be done within the time limit.

use std::time::Duration;

use crate::stream::NetStream;
use futures_lite::AsyncWriteExt;

use crate::backend::{BackendConn, Settings};
use crate::cancel::send_cancel;
use crate::codec::frontend;
use crate::codec::tag::status;
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::pool::Pool;
use crate::session::login::send_fatal;
use crate::sync;

use super::cut::{Cut, Limits};
use super::idle::PumpEnd;
use super::lanes::Lanes;
use super::unit::Flow;

/// Ends the session on the unit's connection: tells the client what it needs to know,
/// then gives the connection back clean (work finished or cancelled, rolled back, reset)
/// or closes it.
pub async fn finish(
    ctx: &ShardCtx,
    client: &mut NetStream,
    mut backend: Lease,
    end: PumpEnd,
    flow: &Flow,
    lanes: &Lanes,
    reset: Reset,
) {
    let cancel_running = matches!(
        end,
        PumpEnd::ClientGone | PumpEnd::ClientProtocol(_) | PumpEnd::Cut(_)
    );
    match end {
        // A limit cut the unit short: the client is told only where its stream of
        // server messages is whole (else the error would land inside a row).
        PumpEnd::Cut(cut) if !lanes.down.client_at_boundary() => {
            ctx.stats.clients_cut[cut as usize].inc();
            log::info!("client session ended ({}) mid-message: closed", cut.label());
        }
        _ => tell_client(ctx, backend.pool(), client, &end, flow.server_fatal).await,
    }
    match end {
        PumpEnd::BackendGone => {
            backend.lost();
            return;
        }
        PumpEnd::BackendProtocol(_) | PumpEnd::Diverged => {
            backend.discard();
            return;
        }
        _ => {}
    }
    hang_up(client);
    // Half a message went to the server: it cannot be brought back to a boundary.
    if lanes.up.mid_message() {
        backend.discard();
        return;
    }
    // Whole messages decided on but not yet written still count as sent (their answers
    // are queued): send them, and drain their answers below.
    for part in lanes.up.unsent() {
        if !part.is_empty() && backend.stream.send(part).await.is_err() {
            backend.discard();
            return;
        }
    }
    let work = Unfinished {
        copy_in: flow.copy_in,
        unsynced: lanes.responses.unsynced,
        in_flight: lanes.responses.pending_syncs(),
    };
    recover(ctx, backend, work, cancel_running, reset).await;
}

/// Ends the client's connection now (both directions), so it is not kept waiting while
/// its server connection is brought back; the socket itself closes when the session's
/// task ends.
pub fn hang_up(client: &NetStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket this session owns; no memory is involved.
    unsafe {
        libc::shutdown(client.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Ends a session a limit cut short: FATAL with PostgreSQL's SQLSTATE for it, counted
/// by reason.
pub async fn tell_cut(ctx: &ShardCtx, client: &mut NetStream, cut: Cut) {
    ctx.stats.clients_cut[cut as usize].inc();
    let limit = Limits::new(&ctx.config()).value_for(cut, ctx.message_memory.limit());
    let message = cut.message(limit);
    log::info!("client session ended ({}): {message}", cut.label());
    // A client that reads nothing cannot hold up what follows (cancel, reset).
    let _ = crate::sync::timeout(
        std::time::Duration::from_secs(1),
        send_fatal(client, cut.sqlstate(), &message),
    )
    .await;
}

/// What the departed client left running on its connection.
#[derive(Default)]
struct Unfinished {
    copy_in: bool,
    unsynced: bool,
    /// ReadyForQuery messages still to come.
    in_flight: u32,
}

/// Tells the client why its session ends (nothing when it left by itself) and logs it.
/// When the server's own FATAL already reached the client (`server_fatal`), a vanished
/// server adds nothing: PostgreSQL sends one FATAL and closes.
pub async fn tell_client(
    ctx: &ShardCtx,
    pool: &Pool,
    client: &mut NetStream,
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
        PumpEnd::Cut(cut) => tell_cut(ctx, client, *cut).await,
        PumpEnd::ClientTerminated => {
            let _ = client.close().await;
        }
        PumpEnd::Diverged => {
            send_fatal(
                client,
                "40001",
                "the transaction was replayed after a failover and its results differed",
            )
            .await
        }
        PumpEnd::ClientGone | PumpEnd::Quiet => {}
    }
}

/// Returns a connection whose client left between units (status known, nothing in
/// flight).
pub async fn release_clean(ctx: &ShardCtx, backend: Lease, reset: Reset) {
    recover(ctx, backend, Unfinished::default(), false, reset).await;
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

/// Cleans the connection within `dirty_release_timeout_ms` and pools it, or closes it.
async fn recover(
    ctx: &ShardCtx,
    mut backend: Lease,
    mut work: Unfinished,
    cancel_running: bool,
    reset: Reset,
) {
    let limit = Duration::from_millis(ctx.config().timeouts.dirty_release_timeout_ms);
    let cleaned = sync::timeout(
        limit,
        clean(ctx, &mut backend, &mut work, cancel_running, reset),
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
    work: &mut Unfinished,
    cancel_running: bool,
    reset: Reset,
) -> bool {
    let mut req = Vec::new();
    if work.copy_in {
        frontend::FrontendMessage::CopyFail(b"client disconnected during COPY").encode(&mut req);
        work.copy_in = false;
    }
    if work.unsynced {
        frontend::encode_sync(&mut req);
        work.in_flight += 1;
        work.unsynced = false;
    }
    if !req.is_empty() && backend.stream.send(&req).await.is_err() {
        return false;
    }
    let mut buf = ctx.bufs.take();
    if work.in_flight > 0 {
        if cancel_running {
            send_cancel(
                &backend.addr,
                backend.key,
                Duration::from_millis(ctx.config().timeouts.connect_timeout_ms),
            )
            .await;
        }
        // Errors reported here belong to the departed client's cancelled or failed work.
        if backend.drain(work.in_flight, &mut buf).await.is_err() {
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
                super::settings::apply(backend, &defaults, &mut buf).await,
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
