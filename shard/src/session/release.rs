//! Ending a session: tell the client what it needs to know, then bring the backend back
//! to a clean idle state (finish or cancel what is running, roll back, reset) and return
//! it to the pool — or close it when that cannot be done within the time limit.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::backend::BackendConn;
use crate::cancel::send_cancel;
use crate::codec::frame::{Scanner, Step, TagSet};
use crate::codec::{backend as be, frontend};
use crate::context::ShardCtx;
use crate::pool::Pool;
use crate::sync;

use super::login::send_fatal;
use super::pump::{Lane, PumpEnd, Tracker};

pub async fn finish(
    ctx: &ShardCtx,
    pool: &Rc<Pool>,
    mut client: TcpStream,
    backend: BackendConn,
    end: PumpEnd,
    track: Tracker,
    up: Lane,
) {
    match end {
        PumpEnd::BackendGone => {
            send_fatal(
                &mut client,
                "08006",
                "server closed the connection unexpectedly",
            )
            .await;
            pool.forget();
            drop(backend);
        }
        PumpEnd::BackendProtocol(e) => {
            log::error!("pool {}: server sent invalid data: {e}", pool.label);
            send_fatal(
                &mut client,
                "08P01",
                &format!("server sent invalid data: {e}"),
            )
            .await;
            pool.discard(backend);
        }
        PumpEnd::ClientProtocol(e) => {
            ctx.stats.protocol_errors.inc();
            log::info!("pool {}: client protocol violation: {e}", pool.label);
            send_fatal(&mut client, e.sqlstate(), &e.to_string()).await;
            recover(ctx, pool, backend, track, up, true).await;
        }
        PumpEnd::Drain => {
            send_fatal(
                &mut client,
                "57P01",
                "terminating connection due to administrator command",
            )
            .await;
            recover(ctx, pool, backend, track, up, false).await;
        }
        PumpEnd::ClientTerminated => {
            let _ = client.close().await;
            recover(ctx, pool, backend, track, up, false).await;
        }
        PumpEnd::ClientGone | PumpEnd::Quiet => {
            drop(client);
            recover(ctx, pool, backend, track, up, true).await;
        }
    }
}

/// Returns a backend whose client left normally (status known, nothing in flight).
pub async fn release_clean(ctx: &ShardCtx, pool: &Rc<Pool>, backend: BackendConn) {
    let track = Tracker::new(backend.status);
    recover(ctx, pool, backend, track, Lane::downstream(), false).await;
}

/// Cleans the backend within `dirty_release_timeout_ms` and pools it, or closes it.
async fn recover(
    ctx: &ShardCtx,
    pool: &Rc<Pool>,
    mut backend: BackendConn,
    mut track: Tracker,
    up: Lane,
    cancel_running: bool,
) {
    let limit = Duration::from_millis(ctx.config.timeouts.dirty_release_timeout_ms);
    let cleaned = sync::timeout(
        limit,
        clean(ctx, &mut backend, &mut track, &up, cancel_running),
    )
    .await;
    match cleaned {
        Some(true) => pool.release(backend),
        _ => {
            log::info!(
                "pool {}: closing a server connection that could not be cleaned for reuse",
                pool.label
            );
            pool.discard(backend)
        }
    }
}

async fn clean(
    ctx: &ShardCtx,
    backend: &mut BackendConn,
    track: &mut Tracker,
    up: &Lane,
    cancel_running: bool,
) -> bool {
    backend.status = track.status;
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
    if track.in_flight > 0 {
        if cancel_running {
            send_cancel(
                backend.addr,
                backend.key,
                Duration::from_millis(ctx.config.timeouts.connect_timeout_ms),
            )
            .await;
        }
        match drain(ctx, backend, track.in_flight).await {
            Some(status) => backend.status = status,
            None => return false,
        }
    }
    let max = ctx.max_message_size();
    if backend.status != b'I' {
        let mut rollback = Vec::new();
        frontend::encode_query(&mut rollback, "ROLLBACK");
        match backend.exchange(&rollback, 1, max).await {
            Ok(None) if backend.status == b'I' => {}
            _ => return false,
        }
    }
    let reset = ctx.config.pool_mode.reset_query.trim();
    if !reset.is_empty() {
        let mut req = Vec::new();
        frontend::encode_query(&mut req, reset);
        match backend.exchange(&req, 1, max).await {
            Ok(None) if backend.status == b'I' => {}
            _ => return false,
        }
    }
    true
}

fn copy_fail_message() -> Vec<u8> {
    let mut out = Vec::new();
    let msg = frontend::FrontendMessage::CopyFail(b"client disconnected during COPY");
    msg.encode(&mut out);
    out
}

/// Reads and discards server output until `syncs` ReadyForQuery messages arrived,
/// without keeping messages (a cancelled COPY TO can be large). Returns the last status.
async fn drain(ctx: &ShardCtx, backend: &mut BackendConn, mut syncs: u32) -> Option<u8> {
    let mut buf = ctx.bufs.take();
    let mut scanner = Scanner::new(be::TAGS, TagSet::new(b"ZS"), usize::MAX >> 1);
    let mut status = backend.status;
    while syncs > 0 {
        let n = backend.stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        let params = &mut backend.params;
        scanner
            .scan(&buf[..n], |tag, body, _| {
                match tag {
                    b'Z' => {
                        syncs = syncs.saturating_sub(1);
                        status = body.first().copied().unwrap_or(b'I');
                    }
                    _ => {
                        if let Ok(be::BackendMessage::ParameterStatus { name, value }) =
                            be::decode(tag, body)
                        {
                            params.set(name, value);
                        }
                    }
                }
                Step::Continue
            })
            .ok()?;
    }
    scanner.at_boundary().then_some(status)
}
