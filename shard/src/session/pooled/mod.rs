//! Transaction and statement pooling: a client holds a server connection only while it
//! has work in flight — a transaction (status T or E), unsynced extended-protocol
//! messages, a COPY, or state that ties it to that connection (LISTEN, advisory locks,
//! temporary tables, WITH HOLD cursors, SQL PREPARE) — and gives it back at the
//! ReadyForQuery that ends the unit. Prepared statements and session settings follow the
//! client to whichever connection serves it next.

pub mod pump;
pub mod responses;
pub mod routing;
pub mod settings;
pub mod upstream;

use std::rc::Rc;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

use crate::backend::{BackendConn, Settings};
use crate::bufpool::Buf;
use crate::cancel::{CancelHandle, CancelTarget};
use crate::codec::tag::status;
use crate::config::PoolMode;
use crate::context::{ShardCtx, UserEntry};
use crate::lease::Lease;
use crate::pool::Pool;

use super::login::{send_fatal, Login};
use super::pump::{PumpEnd, ReadPooled};
use super::{
    acquire_or_report, apply_params, idle_wait, release, report_acquire_error, welcome, Wake,
};
use pump::{DownLane, Flow, PooledPump, UpLane};
use responses::Responses;
use upstream::{ClientStatements, LeaseNotes, Upstream};

/// What the client carries from one server connection to the next.
struct ClientState {
    statements: ClientStatements,
    settings: Settings,
    /// The startup packet's parameters: what RESET goes back to.
    startup: Vec<(String, String)>,
    /// Who the client logs in to servers as, for finding its pool on another node.
    user: Rc<UserEntry>,
    /// Pools on other nodes this client was routed to (read/write splitting).
    pools: routing::NodePools,
    /// The primary's WAL position after this client's last write (0: none yet).
    wrote_at: u64,
    /// The pid the client was given (made up: it has no backend of its own).
    pid: i32,
}

/// Serves a logged-in client in transaction or statement mode.
pub async fn serve(ctx: &Rc<ShardCtx>, mut client: TcpStream, login: Login, mode: PoolMode) {
    let Some(node) = ctx.primary() else {
        send_fatal(&mut client, "08006", "no primary node is available").await;
        return;
    };
    let pool = ctx.pool(&node, &login.database, &login.user);
    let cancel = ctx
        .cancels
        .register(super::client_info(&client, &login), None);
    // The rarely taken paths (login completion, session end, settings restore) live in
    // their own allocations, so the state machine an idle client keeps stays small.
    let state = Box::pin(start(ctx, &pool, &mut client, &login, &cancel)).await;
    drop(login);
    if let Some(mut state) = state {
        run(ctx, pool, client, &cancel, &mut state, mode).await;
    }
    ctx.cancels.unregister(&cancel);
}

/// Completes the client's login on a leased connection: applies its startup parameters,
/// learns the resulting settings, and sends the welcome. The connection goes back at once.
async fn start(
    ctx: &Rc<ShardCtx>,
    pool: &Rc<Pool>,
    client: &mut TcpStream,
    login: &Login,
    cancel: &CancelHandle,
) -> Option<ClientState> {
    let mut backend = acquire_or_report(pool, client).await?;
    let mut buf = ctx.bufs.take();
    if !settings::same(&backend.settings, &Settings::default()) {
        // Start every client from the server's defaults.
        match settings::apply(&mut backend, &Settings::default(), &mut buf).await {
            Ok(None) => {}
            _ => {
                backend.discard();
                send_fatal(client, "08006", "could not reset a server connection").await;
                return None;
            }
        }
    }
    let mut state = ClientState {
        statements: ClientStatements::default(),
        settings: backend.settings.clone(),
        startup: login
            .params
            .iter()
            .filter(|(name, value)| backend.params.get(name) != Some(value.as_str()))
            .cloned()
            .collect(),
        user: login.user.clone(),
        pools: routing::NodePools::default(),
        wrote_at: 0,
        pid: cancel.pid,
    };
    if login
        .params
        .iter()
        .any(|(name, value)| backend.params.get(name) != Some(value.as_str()))
    {
        match apply_params(ctx, &mut backend, &login.params).await {
            Ok(None) => {}
            Ok(Some(err)) => {
                let mut out = Vec::new();
                err.encode(&mut out);
                let _ = client.write_all(&out).await;
                let _ = client.close().await;
                reset_and_release(ctx, backend).await;
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
        let unlisted: Vec<String> = login
            .params
            .iter()
            .filter(|(n, _)| n.contains('.'))
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        match settings::snapshot(&mut backend, &unlisted, &mut buf).await {
            Ok(Ok(snapshot)) => {
                backend.settings = snapshot.clone();
                state.settings = snapshot;
            }
            _ => {
                backend.discard();
                send_fatal(client, "08006", "could not read session settings").await;
                return None;
            }
        }
    }
    drop(buf);
    let welcomed = welcome(client, &backend, cancel).await.is_ok();
    backend.release();
    welcomed.then_some(state)
}

/// Brings a connection back to the server defaults and pools it (or closes it).
async fn reset_and_release(ctx: &ShardCtx, mut backend: Lease) {
    let mut buf = ctx.bufs.take();
    match settings::apply(&mut backend, &Settings::default(), &mut buf).await {
        Ok(None) if backend.status == status::IDLE => backend.release(),
        _ => backend.discard(),
    }
}

/// What ended waiting for the client's next request.
enum Next {
    Request(Buf, usize),
    Gone,
    Drain,
}

/// The pool this client's next transaction should use: the current one, unless its node
/// left service and the topology names another primary that may take work (a reload
/// moved the node, or a failover); then that node's pool for the same database and user.
fn current_pool(ctx: &ShardCtx, pool: Rc<Pool>, user: &UserEntry) -> Rc<Pool> {
    if !pool.is_retired() {
        return pool;
    }
    match ctx.primary() {
        Some(node) if node.routable() && node.address != pool.key.node => {
            ctx.pool(&node, &pool.key.database, user)
        }
        _ => pool,
    }
}

async fn run(
    ctx: &Rc<ShardCtx>,
    mut home: Rc<Pool>,
    mut client: TcpStream,
    cancel: &CancelHandle,
    state: &mut ClientState,
    mode: PoolMode,
) {
    let mut up = UpLane::new(ctx.max_message_size());
    let mut down = DownLane::new();
    let mut responses = Responses::default();
    loop {
        let wake = {
            let request = async {
                match (ReadPooled {
                    stream: &mut client,
                    pool: &ctx.bufs,
                })
                .await
                {
                    Some((buf, n)) => Next::Request(buf, n),
                    None => Next::Gone,
                }
            };
            let drain = async {
                ctx.draining.wait().await;
                Next::Drain
            };
            futures_lite::future::or(request, drain).await
        };
        let (buf, n) = match wake {
            Next::Gone => return,
            Next::Drain => {
                send_fatal(
                    &mut client,
                    "57P01",
                    "terminating connection due to administrator command",
                )
                .await;
                return;
            }
            Next::Request(buf, n) => (buf, n),
        };
        ctx.stats.bytes_from_clients.add(n as u64);
        up.seed(buf, n);
        // DROP DATABASE and the like: the proxy's idle connections there must go first.
        // The fence stays up until this unit of work is over. (Boxed: rare, and kept out
        // of the state an idle client carries.)
        let _fence = match crate::sql::exclusive::exclusive_database_in(up.pending()) {
            Some(database) => Some(Box::pin(crate::fence::fence_database(ctx, &database)).await),
            None => None,
        };
        home = current_pool(ctx, home, &state.user);
        let routed = routing::route(
            ctx,
            &home,
            up.pending(),
            &state.statements,
            &mut state.pools,
            &state.user,
            state.wrote_at,
        );
        let pool = &routed.pool;
        let mut backend = match pool.acquire().await {
            Ok(b) => b,
            Err(e) => {
                report_acquire_error(pool, &mut client, e).await;
                return;
            }
        };
        if !settings::same(&backend.settings, &state.settings) {
            let mut buf = ctx.bufs.take();
            match Box::pin(settings::apply(&mut backend, &state.settings, &mut buf)).await {
                Ok(None) => {}
                Ok(Some(err)) => {
                    log::warn!(
                        "pool {}: could not restore session settings: {err}",
                        pool.label
                    );
                    let mut out = Vec::new();
                    err.encode(&mut out);
                    let _ = client.write_all(&out).await;
                    let _ = client.close().await;
                    Box::pin(reset_and_release(ctx, backend)).await;
                    return;
                }
                Err(_) => {
                    backend.lost();
                    send_fatal(&mut client, "08006", "server connection lost").await;
                    return;
                }
            }
        }
        log::trace!("client {}: leased backend {}", cancel.pid, backend.id);
        cancel.attach(CancelTarget {
            addr: backend.addr,
            key: backend.key,
            backend_id: backend.id,
        });
        let outcome = lease(
            ctx,
            &mut client,
            &mut backend,
            Lanes {
                up: &mut up,
                down: &mut down,
                responses: &mut responses,
            },
            state,
            mode,
            routed.on_read_node,
        )
        .await;
        cancel.detach();
        match outcome {
            LeaseEnd::Released if routed.remember_position => {
                let mut buf = ctx.bufs.take();
                match routing::write_position(&mut backend, &mut buf).await {
                    Ok(lsn) => {
                        log::debug!(
                            target: "heliosdb_proxy::routing",
                            "client {}: wrote up to WAL position {lsn:?}",
                            cancel.pid
                        );
                        state.wrote_at = state.wrote_at.max(lsn.unwrap_or(0));
                        backend.release();
                    }
                    // The connection broke after the unit completed: the client is fine.
                    Err(_) => backend.lost(),
                }
            }
            LeaseEnd::Released => backend.release(),
            LeaseEnd::Ended(end, flow, notes) => {
                let discard = notes.maybe_pinned;
                Box::pin(finish(
                    ctx, client, backend, end, flow, &responses, &up, discard,
                ))
                .await;
                return;
            }
        }
    }
}

enum LeaseEnd {
    /// The client is between transactions; the connection is clean to reuse.
    Released,
    /// The session is over.
    Ended(PumpEnd, Flow, LeaseNotes),
}

/// What a session keeps across leases so that no transaction allocates: its two lanes
/// and its queue of owed answers.
struct Lanes<'a> {
    up: &'a mut UpLane,
    down: &'a mut DownLane,
    responses: &'a mut Responses,
}

/// Serves the client on `backend` until the connection can go back to the pool or the
/// session ends.
async fn lease(
    ctx: &Rc<ShardCtx>,
    client: &mut TcpStream,
    backend: &mut BackendConn,
    lanes: Lanes<'_>,
    state: &mut ClientState,
    mode: PoolMode,
    on_read_node: bool,
) -> LeaseEnd {
    let Lanes {
        up,
        down,
        responses,
    } = lanes;
    responses.start(backend.status);
    let mut flow = Flow {
        hold_when_idle: on_read_node,
        ..Flow::default()
    };
    let mut notes = LeaseNotes::default();
    let config = ctx.config();
    let pool_cfg = &config.pool_mode;
    loop {
        up.activate(&ctx.bufs);
        down.activate(&ctx.bufs);
        let pids = (backend.key.pid, state.pid);
        let end = {
            let BackendConn {
                stream,
                params,
                status,
                statements,
                pending_close,
                ..
            } = &mut *backend;
            PooledPump {
                client: &mut *client,
                server: stream,
                params,
                status,
                up: &mut *up,
                down: &mut *down,
                translate: Upstream {
                    registry: &ctx.statements,
                    client: &mut state.statements,
                    server: statements,
                    pending_close,
                    responses: &mut *responses,
                    notes: &mut notes,
                    capacity: pool_cfg.max_prepared_statements as usize,
                    mode,
                    pin_session_state: pool_cfg.pin_session_state,
                },
                flow: &mut flow,
                stats: &ctx.stats,
                draining: &ctx.draining,
                backend_eof: false,
                pids,
            }
            .await
        };
        if ctx.statements.take_unannounced_change() {
            crate::bus::broadcast_schema_change(ctx).await;
        }
        log::trace!(
            "backend {}: pump ended {end:?}, status {}, unsynced {}, copy {}",
            backend.id,
            backend.status as char,
            responses.unsynced,
            flow.copy_in
        );
        match end {
            PumpEnd::Quiet => {
                up.deactivate();
                down.deactivate();
            }
            other => return LeaseEnd::Ended(other, flow, notes),
        }
        if backend.status == status::IDLE && !responses.unsynced && !flow.copy_in {
            let mut buf = ctx.bufs.take();
            if notes.settings_touched {
                let unlisted = settings::unlisted_names(&state.settings, &notes.unlisted);
                let mut taken = settings::snapshot(backend, &unlisted, &mut buf).await;
                if let Ok(Ok(snapshot)) = &taken {
                    let lost = settings::reset_startup_params(snapshot, &state.startup);
                    if !lost.is_empty() {
                        taken = match settings::set_params(backend, &lost, &mut buf).await {
                            Ok(None) => settings::snapshot(backend, &unlisted, &mut buf).await,
                            Ok(Some(e)) => Ok(Err(e)),
                            Err(e) => Err(e),
                        };
                    }
                }
                match taken {
                    Ok(Ok(snapshot)) => {
                        backend.settings = snapshot.clone();
                        state.settings = snapshot;
                        notes.settings_touched = false;
                        notes.unlisted.clear();
                    }
                    _ => return LeaseEnd::Ended(PumpEnd::BackendGone, flow, notes),
                }
            }
            let pinned = if notes.maybe_pinned && notes.client_spoke {
                match settings::still_pinned(backend, &mut buf).await {
                    Ok(true) => true,
                    Ok(false) => {
                        notes.maybe_pinned = false;
                        false
                    }
                    Err(_) => return LeaseEnd::Ended(PumpEnd::BackendGone, flow, notes),
                }
            } else {
                false
            };
            if !backend.notifications.is_empty() {
                let mut pending = std::mem::take(&mut backend.notifications);
                crate::codec::backend::rewrite_notification_pids(
                    &mut pending,
                    backend.key.pid,
                    state.pid,
                );
                if client.write_all(&pending).await.is_err() {
                    return LeaseEnd::Ended(PumpEnd::ClientGone, flow, notes);
                }
            }
            log::trace!(
                "backend {}: release check: pinned {pinned}, maybe {}, spoke {}",
                backend.id,
                notes.maybe_pinned,
                notes.client_spoke
            );
            notes.client_spoke = false;
            if !pinned && !notes.maybe_pinned {
                return LeaseEnd::Released;
            }
        }
        // Still bound to this connection: wait for either side, holding no buffers.
        if let Some(end) = wait_either(ctx, client, backend, up, down).await {
            return LeaseEnd::Ended(end, flow, notes);
        }
    }
}

/// Waits while the client holds a connection between messages (open transaction,
/// pinned state): whichever side speaks first seeds the pump. `Some` ends the session.
async fn wait_either(
    ctx: &ShardCtx,
    client: &mut TcpStream,
    backend: &mut BackendConn,
    up: &mut UpLane,
    down: &mut DownLane,
) -> Option<PumpEnd> {
    match idle_wait(ctx, client, &mut backend.stream).await {
        Wake::Client(buf, n) => {
            ctx.stats.bytes_from_clients.add(n as u64);
            up.seed(buf, n);
            None
        }
        Wake::Backend(buf, n) => {
            log::trace!(
                "backend {}: spoke while its client was idle ({n} bytes)",
                backend.id
            );
            down.seed(buf, n);
            None
        }
        Wake::ClientGone => Some(PumpEnd::ClientGone),
        Wake::BackendGone => Some(PumpEnd::BackendGone),
        Wake::Drain => Some(PumpEnd::Drain),
    }
}

/// Ends the session: tells the client what it needs to know and gives the connection
/// back clean (rolled back, settings reset) or closes it.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &ShardCtx,
    mut client: TcpStream,
    mut backend: Lease,
    end: PumpEnd,
    flow: Flow,
    responses: &Responses,
    up: &UpLane,
    discard: bool,
) {
    let cancel_running = matches!(end, PumpEnd::ClientGone | PumpEnd::ClientProtocol(_));
    release::tell_client(ctx, backend.pool(), &mut client, &end, flow.server_fatal).await;
    match end {
        PumpEnd::BackendGone => {
            backend.lost();
            return;
        }
        PumpEnd::BackendProtocol(_) => {
            backend.discard();
            return;
        }
        _ => {}
    }
    drop(client);
    // Half a message went to the server: it cannot be brought back to a boundary.
    if !up.unsent().is_empty() || up.mid_message() {
        if !up.unsent().is_empty()
            && !up.mid_message()
            && backend.stream.write_all(up.unsent()).await.is_ok()
        {
            // Whole messages: sent, and their answers are drained below.
        } else {
            backend.discard();
            return;
        }
    }
    let mut track = super::pump::Tracker::new(backend.status);
    track.copy_in = flow.copy_in;
    track.unsynced = responses.unsynced;
    track.in_flight = responses.pending_syncs();
    let reset = if discard {
        release::Reset::DiscardAll
    } else {
        release::Reset::Settings
    };
    release::recover_with(ctx, backend, track, cancel_running, reset).await;
}
