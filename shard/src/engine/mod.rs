//! The engine: one driver that takes each unit of work of a session — a transaction, or
//! a statement outside one — through the phases of [`phase::Phase`], for every pool mode.
//!
//! A session (per-session context [`session::Session`]) logs in, then repeats: wait for
//! the client holding no buffers; start a unit ([`unit::Unit`]); choose its node; take a
//! connection (or use the one the session keeps); bring it to the session; pump messages
//! both ways until the unit reaches a boundary; then keep, release or discard the
//! connection. The pool modes differ only in what the phases decide: session mode keeps
//! its home connection from login to end (units may still run on read nodes with
//! read/write splitting on); transaction and statement modes give the connection back at
//! each boundary unless state ties the session to it.

pub mod cache;
pub mod carry;
pub mod cursors;
pub mod cut;
pub mod failover;
pub mod fencing;
pub mod finish;
pub mod idle;
pub mod intake;
pub mod journal;
pub mod lanes;
pub mod message;
pub mod phase;
pub mod pinning;
pub mod prepared;
pub mod pump;
pub mod replay;
pub mod responses;
pub mod retry;
pub mod routing;
pub mod session;
pub mod settings;
pub mod stats;
pub mod unit;
pub mod welcome;

use std::rc::Rc;

use crate::stream::NetStream;
use futures_lite::AsyncWriteExt;

use crate::backend::BackendConn;
use crate::codec::backend as be;
use crate::codec::tag::{fe, status};
use crate::config::PoolMode;
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::pool::Pool;
use crate::session::login::{send_fatal, Login};

use cut::Cut;
use idle::{idle_wait, PumpEnd, Wake};
use lanes::Lanes;
use message::MessageCx;
use phase::{Lost, LostAt, Phase, Ready, Release, Start};
use pump::Pump;
use session::{Features, Held, Session};
use unit::{LeaseNotes, Unit};

/// The features every session runs, in the order each point calls them. A future
/// feature (result cache, replay, limits, plugins) is one more element here.
pub type Chain = (
    fencing::Fencing,
    cache::ResultCache,
    routing::Routing,
    settings::SessionSettings,
    prepared::SharedStatements,
    carry::Carry,
    pinning::Pinning,
    stats::Statistics,
    retry::Retry,
);

pub const PHASES: Chain = (
    fencing::Fencing,
    cache::ResultCache,
    routing::Routing,
    settings::SessionSettings,
    prepared::SharedStatements,
    carry::Carry,
    pinning::Pinning,
    stats::Statistics,
    retry::Retry,
);

/// Completes a logged-in client's welcome in `mode`: its session, or `None` when the
/// client was told why there is none. (Kept apart from [`serve`] so the login's state
/// is gone before the session settles into its idle wait.)
pub async fn start(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    login: &Login,
    mode: PoolMode,
) -> Option<Box<Session>> {
    let features = Features::new(&ctx.config(), mode);
    welcome::login(ctx, client, login, features, &PHASES).await
}

/// How [`serve`] left a session.
pub enum Served {
    /// The session is over.
    Over,
    /// It has been idle, holding nothing, since this instant: park it (see `dormant`).
    Idle(std::time::Instant),
}

/// A parked session taken up again.
pub struct Resumed {
    /// When its idle wait began: its idle timeout still counts from there.
    pub since: std::time::Instant,
    /// What woke it, already read.
    pub first: Option<Wake>,
}

/// Serves a welcomed session (or a parked one taken up again) until it ends or may be
/// parked.
pub fn serve<'a>(
    ctx: &'a Rc<ShardCtx>,
    client: &'a mut NetStream,
    session: &'a mut Session,
    resumed: Option<Resumed>,
) -> impl std::future::Future<Output = Served> + 'a {
    run(ctx, client, session, resumed, &PHASES)
}

/// How a unit ended.
enum UnitEnd {
    /// At a boundary, with the phases' decision about the connection.
    Boundary(Release),
    /// The session is over.
    Ended(PumpEnd),
}

/// The pool a unit uses when no phase chose one: the home pool, unless the topology
/// now names another primary that may take work (a reload moved the node, a failover,
/// a demotion); then that node's pool for the same database and user. Looked at only
/// when the topology changed since the session last looked, or the pool left service.
fn home_pool(ctx: &ShardCtx, s: &mut Session) -> Rc<Pool> {
    let version = ctx.topology_version.get();
    if !s.home.is_retired() && s.home_version == version {
        return s.home.clone();
    }
    s.home_version = version;
    let (pool, user) = (&s.home, &s.user);
    match ctx.primary() {
        Some(node) if node.routable() && node.address != pool.key.node => {
            ctx.pool(&node, &pool.key.database, user)
        }
        _ => pool.clone(),
    }
}

/// (Not an `async fn`: its arguments would be kept twice in the future, which an idle
/// client holds for as long as it idles.)
fn run<'a, P: Phase>(
    ctx: &'a Rc<ShardCtx>,
    client: &'a mut NetStream,
    s: &'a mut Session,
    resumed: Option<Resumed>,
    phases: &'a P,
) -> impl std::future::Future<Output = Served> + 'a {
    let (idle_since, woken_by) = match resumed {
        Some(r) => (Some(r.since), r.first.map(Box::new)),
        None => (None, None),
    };
    run_loop(ctx, client, s, idle_since, woken_by, phases)
}

// An explicit async block: as an `async fn` its arguments would be stored twice.
#[allow(clippy::manual_async_fn)]
fn run_loop<'a, P: Phase>(
    ctx: &'a Rc<ShardCtx>,
    client: &'a mut NetStream,
    s: &'a mut Session,
    mut idle_since: Option<std::time::Instant>,
    mut woken_by: Option<Box<Wake>>,
    phases: &'a P,
) -> impl std::future::Future<Output = Served> + 'a {
    async move {
        // The session's lanes and unit context, in one allocation of their own (held by value
        // in this future, the compiler's layout would pad them into a larger idle state),
        // present only while they hold something: a session idle between units keeps just
        // its position in the client's stream.
        let mut desk: Option<Box<(Lanes, Unit)>> = None;
        loop {
            // Bytes the last unit left undecided (it was refused) start the next one.
            let pending = desk.as_ref().is_some_and(|d| d.0.up.has_pending());
            let wake = if pending {
                Wake::Pending
            } else if let Some(wake) = woken_by.take() {
                *wake
            } else {
                // A session holding nothing may be parked once it has idled long enough.
                let parkable = desk.is_none()
                    && s.held.is_none()
                    && client.is_parkable()
                    && ctx.dormitory.may_park(ctx);
                // A resumed session's idle timeout counts from when its wait began.
                let limit = match (s.limits.idle_session, idle_since) {
                    (Some(limit), Some(since)) => Some(limit.saturating_sub(since.elapsed())),
                    (limit, _) => limit,
                };
                idle_wait(
                    ctx,
                    &mut *client,
                    s.held.as_mut().map(|h| &mut h.lease.stream),
                    limit,
                    parkable.then(|| ctx.dormitory.nap()),
                )
                .await
            };
            if let Wake::Park(since) = wake {
                // Parked again without a word from the client (it could not be parked
                // last time): its idle time still counts from the first wait.
                return Served::Idle(idle_since.map_or(since, |first| first.min(since)));
            }
            // The wait it was resumed in is over: the next one starts afresh.
            idle_since = None;
            let (lanes, unit) = &mut **desk.get_or_insert_with(|| {
                let mut lanes = Lanes::resume(ctx.max_message_size(), s.stream_position);
                if s.features.replay {
                    lanes.keep_journal(ctx.config().failover.replay_journal_max_bytes);
                }
                Box::new((lanes, Unit::default()))
            });
            unit.reset();
            let journaled = s.features.replay;
            if journaled {
                lanes.begin_unit();
            }
            s.statements.begin_unit(journaled);
            let from_client = match wake {
                Wake::Pending => true,
                Wake::Client(buf, n) => {
                    ctx.stats.bytes_from_clients.add(n as u64);
                    lanes.up.seed(buf, n);
                    true
                }
                Wake::Backend(buf, n) => {
                    lanes.down.seed(buf, n);
                    false
                }
                Wake::BackendGone if failover::session_movable(s) && s.held.is_some() => {
                    lose_held(s);
                    continue;
                }
                Wake::BackendGone
                    if s.held.is_some() && failover::unmovable_message(s).is_some() =>
                {
                    Box::pin(lose_unmovable(ctx, client, s)).await;
                    return Served::Over;
                }
                other => {
                    Box::pin(end_idle(ctx, client, s, other)).await;
                    return Served::Over;
                }
            };
            unit.position = lanes.up.position();
            // Everything past the wait lives in its own allocation for the unit's length: an
            // idle session keeps only the small state above.
            let cycle = Box::pin(unit_cycle(
                ctx,
                &mut *client,
                s,
                unit,
                lanes,
                from_client,
                phases,
            ))
            .await;
            // The unit is over: a database it needed to itself is open to others again.
            unit.fence = None;
            match cycle {
                Cycle::Next if s.held.is_none() && lanes.disposable() && unit.disposable() => {
                    s.stream_position = lanes.up.position();
                    desk = None;
                }
                Cycle::Next => {}
                Cycle::Over => return Served::Over,
                Cycle::ClientGone => {
                    Box::pin(end_idle(ctx, client, s, Wake::ClientGone)).await;
                    return Served::Over;
                }
            }
        }
    }
}

/// How a unit's cycle ended.
enum Cycle {
    /// At a boundary; the next unit may come.
    Next,
    /// The session is over and the client was told.
    Over,
    /// The client left before the unit needed a connection.
    ClientGone,
}

/// One unit from its start to keeping, releasing or discarding its connection.
async fn unit_cycle<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    from_client: bool,
    phases: &P,
) -> Cycle {
    cache::begin_unit(ctx, s, unit);
    if from_client {
        // The first message is in whole before anything is leased for it.
        lanes.up.activate(&ctx.bufs);
        if let Err(stop) = intake::whole_first_message(
            client,
            &mut lanes.up,
            &ctx.message_memory,
            &s.limits,
            &ctx.stats,
        )
        .await
        {
            return stopped(ctx, client, s, stop).await;
        }
        if lanes.up.request().first() == Some(&fe::TERMINATE) {
            // The client says goodbye between units: nothing to lease for that.
            release_held(ctx, s).await;
            return Cycle::Over;
        }
        match phases.unit_start(s, unit, lanes.up.request()).await {
            Start::Continue => {}
            Start::Answer(bytes, consumed) => {
                lanes.up.answered(consumed);
                if client.send(&bytes).await.is_err() {
                    return Cycle::ClientGone;
                }
                return Cycle::Next;
            }
            Start::Refuse(code, message) => {
                let mut error = Vec::new();
                be::write_error(&mut error, "ERROR", code, &message);
                return refuse_unit(ctx, client, s, lanes, &error).await;
            }
        }
    }
    let mut starts = 0;
    // A connection the unit goes on with after its own was lost (see `replay`).
    let mut resumed: Option<Lease> = None;
    let (mut backend, keep_home, decision) = loop {
        let resuming = resumed.is_some();
        let (mut backend, on_held) = match resumed.take() {
            Some(lease) => (lease, false),
            None => match take_connection(ctx, client, s, unit, lanes, from_client, phases).await {
                Ok(taken) => taken,
                Err(cycle) => return cycle,
            },
        };
        s.point_cancel(Some(&backend));
        lanes.responses.start(backend.status);
        unit.flow.hold_when_idle = unit.on_read_node;
        if from_client && !on_held && starts < MAX_STARTS_OVER && !resuming {
            lanes.up.set_anchor();
        }
        unit.flow.may_start_over = lanes.up.anchored();
        // Notes kept with a connection the session holds carry over from earlier units;
        // whether a COMMIT went out is this unit's alone.
        unit.notes.commit_sent = false;
        // Transaction ids this connection hands out belong to the primary of this epoch.
        unit.epoch = ctx.primary_epoch.get();
        unit.flow.heard_back = false;
        unit.flow.dead_on_arrival = false;
        unit.flow.server_gone = false;
        unit.flow.completed_any = false;
        unit.flow.soften_server_gone = failover::session_detached(s) || s.features.replay;
        // In session mode the connection the session keeps is its home; one taken after
        // the home was lost becomes the new home.
        let keep_home = s.features.keeps_home_connection()
            && (on_held || (s.held.is_none() && !unit.on_read_node));
        let end = serve_unit(ctx, client, s, unit, lanes, &mut backend, keep_home, phases).await;
        if matches!(end, UnitEnd::Ended(_)) {
            // Without the server's last word a write may have committed (a COMMIT settled
            // elsewhere, a connection lost after it): the cache forgets what it touched.
            unit.cache.flush_writes();
        }
        if matches!(end, UnitEnd::Ended(PumpEnd::BackendGone))
            && unit.flow.dead_on_arrival
            && lanes.up.rewind()
        {
            starts += 1;
            start_over(ctx, s, lanes, backend);
            continue;
        }
        lanes.up.clear_anchor();
        if matches!(end, UnitEnd::Ended(PumpEnd::BackendGone))
            && !failover::session_detached(s)
            && failover::unmovable_message(s).is_some()
        {
            backend.pool().suspect();
            forget_answers(s, lanes, &mut backend);
            backend.lost();
            lose_unmovable(ctx, client, s).await;
            return Cycle::Over;
        }
        if matches!(end, UnitEnd::Ended(PumpEnd::BackendGone))
            && !from_client
            && failover::session_movable(s)
            && lanes
                .down
                .delivered
                .as_ref()
                .is_some_and(|d| d.count() == 0)
        {
            // The connection the session kept went away while the session was idle (its
            // server said so): nothing is owed; the next unit takes the session elsewhere.
            backend.pool().suspect();
            log::info!(
                "client {}: the server connection it kept was lost while idle; its state moves with its next unit",
                s.pid()
            );
            forget_answers(s, lanes, &mut backend);
            s.point_cancel(None);
            backend.lost();
            lanes.deactivate();
            return Cycle::Next;
        }
        if matches!(end, UnitEnd::Ended(PumpEnd::BackendGone)) {
            match replay::plan(ctx, s, unit, lanes, backend.status, from_client) {
                Some(Ok(replay::Plan::Settle { xid, owes_tag })) => {
                    return Box::pin(replay::settle(
                        ctx,
                        client,
                        s,
                        unit,
                        lanes,
                        backend,
                        (xid, owes_tag),
                    ))
                    .await;
                }
                Some(Ok(replay::Plan::Replay { hold_last })) => {
                    let recovery = Box::pin(replay::recover(
                        ctx, client, s, unit, lanes, backend, phases, hold_last,
                    ))
                    .await;
                    match recovery {
                        replay::Recovery::Resume(lease) => {
                            resumed = Some(*lease);
                            continue;
                        }
                        replay::Recovery::Over(cycle) => return cycle,
                    }
                }
                Some(Err(refusal)) if unit.replaying.is_some() => {
                    // Lost again mid-replay, and no further replay may follow. Once the
                    // replay had matched, the client is owed what this run owes.
                    if !lanes.down.verifying() {
                        if let Some(r) = unit.replaying.as_mut() {
                            r.owed = failover::owed(lanes);
                            r.in_block = backend.status != status::IDLE;
                            r.at_boundary = lanes.down.client_at_boundary();
                        }
                    }
                    backend.lost();
                    let recovery = Box::pin(replay::give_up(
                        ctx, client, s, unit, lanes, refusal, phases,
                    ))
                    .await;
                    match recovery {
                        replay::Recovery::Resume(lease) => {
                            resumed = Some(*lease);
                            continue;
                        }
                        replay::Recovery::Over(cycle) => return cycle,
                    }
                }
                Some(Err(refusal)) => {
                    log::info!("client {}: lost unit not replayed: {refusal:?}", s.pid());
                    ctx.stats.replays_refused[refusal as usize].inc();
                }
                None => {}
            }
        }
        if matches!(end, UnitEnd::Ended(PumpEnd::Diverged)) {
            match Box::pin(replay::diverged(
                ctx, client, s, unit, lanes, backend, phases,
            ))
            .await
            {
                replay::Recovery::Resume(lease) => {
                    resumed = Some(*lease);
                    continue;
                }
                replay::Recovery::Over(cycle) => return cycle,
            }
        }
        match end {
            UnitEnd::Boundary(decision) => {
                if let Some(carried) = s.carried.as_mut() {
                    let max = ctx.config().failover.replay_journal_max_bytes;
                    cursors::after_unit(&mut carried.cursors, lanes, &s.statements, max);
                }
                if let Some(replayed) = unit.replaying.take() {
                    log::warn!(
                        "client {}: unit replayed after {:.0} ms; the client saw nothing of the lost connection",
                        s.pid(),
                        replayed.since.elapsed().as_secs_f64() * 1000.0
                    );
                }
                break (backend, keep_home, decision);
            }
            UnitEnd::Ended(PumpEnd::BackendGone)
                if failover::survivable(s, unit, lanes, backend.status) =>
            {
                return Box::pin(lost_mid_unit(ctx, client, s, unit, lanes, backend, phases)).await;
            }
            UnitEnd::Ended(end) => {
                log::debug!(
                    "client {}: unit ended with {end:?} (heard back {}, could start over {}, server fatal {}, at boundary {}, mid-message {}, pinned {})",
                    s.pid(),
                    unit.flow.heard_back,
                    unit.flow.may_start_over,
                    unit.flow.server_fatal,
                    lanes.down.client_at_boundary(),
                    lanes.up.mid_message(),
                    s.pinned
                );
                end_on(ctx, client, s, unit, lanes, backend, end).await;
                return Cycle::Over;
            }
        }
    };
    if phases.unit_done(s, unit, &mut backend).await.is_err() {
        // The connection broke after the unit completed: the client has its answers; a
        // session that kept it has lost its home, though.
        backend.lost();
        s.point_cancel(s.held.as_ref().map(|h| &*h.lease as &BackendConn));
        if keep_home {
            send_fatal(client, "08006", "server closed the connection unexpectedly").await;
            return Cycle::Over;
        }
        return Cycle::Next;
    }
    if !backend.notifications.is_empty() {
        // Notifications that arrived during the phases' own exchanges (a catalog lookup,
        // the WAL position) are the client's: it may be waiting for them.
        let mut pending = std::mem::take(&mut backend.notifications);
        be::rewrite_notification_pids(&mut pending, backend.key.pid, s.pid());
        // A client gone by now is noticed by the next wait.
        let _ = client.send(&pending).await;
    }
    match decision {
        Release::Keep => {
            s.held = Some(Box::new(Held {
                lease: backend,
                notes: std::mem::take(&mut unit.notes),
            }))
        }
        Release::Release => backend.release(),
        Release::Discard | Release::Lost => backend.discard(),
    }
    s.point_cancel(s.held.as_ref().map(|h| &*h.lease as &BackendConn));
    Cycle::Next
}

/// A lost connection will answer nothing more: what the unit waited for from it is
/// dropped (client names whose Parse was in flight are forgotten, as PostgreSQL never
/// made them), and so is whatever it had sent towards the client.
fn forget_answers(s: &mut Session, lanes: &mut Lanes, backend: &mut Lease) {
    let mut outcome = responses::Outcome::default();
    lanes
        .responses
        .abandon(&mut backend.statements, &mut outcome);
    s.statements.settle(&mut outcome);
    lanes.down.reset();
}

/// Times one unit may start over on another connection after finding its connection
/// dead on arrival.
const MAX_STARTS_OVER: u32 = 3;

/// The unit's connection answered its first request with a FATAL (it died before reading
/// it): nothing ran and nothing reached the client. Its bookkeeping is undone and the
/// unit goes back to choosing a connection.
fn start_over(ctx: &ShardCtx, s: &mut Session, lanes: &mut Lanes, mut backend: Lease) {
    backend.pool().suspect();
    log::info!(
        "client {}: server connection of pool {} was dead on arrival; the unit starts over",
        s.pid(),
        backend.pool().label
    );
    forget_answers(s, lanes, &mut backend);
    s.point_cancel(None);
    backend.lost();
    ctx.stats.units_started_over.inc();
}

/// The unit's connection was lost mid-way (its server died, or was fenced) and nothing of
/// the session lived there: the client gets `08006` (or `08007` when what was in flight
/// may have committed) and a ReadyForQuery for each request left unanswered, and the
/// session goes on; its next unit runs wherever the topology then says.
async fn lost_mid_unit<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    mut backend: Lease,
    phases: &P,
) -> Cycle {
    backend.pool().suspect();
    // Where a transaction journal replays the unit on a new primary (`Lost::Retry`);
    // without one the unit fails.
    let _ = phases.backend_lost(s, unit, LostAt::InUnit);
    let error = failover::lost_error(unit, backend.status);
    let (readies, sending) = failover::owed(lanes);
    forget_answers(s, lanes, &mut backend);
    s.point_cancel(None);
    let pool = backend.pool().label.clone();
    backend.lost();
    if readies == 0 && !sending {
        // Every answer had reached the client: nothing of its is lost.
        lanes.deactivate();
        return Cycle::Next;
    }
    log::warn!(
        "client {}: server connection of pool {pool} lost mid-unit; the client is told {}",
        s.pid(),
        if error.windows(5).any(|w| w == b"08007") {
            "08007"
        } else {
            "08006"
        }
    );
    ctx.stats.units_lost.inc();
    let mut out = Vec::with_capacity((error.len() + 6) * readies as usize);
    for _ in 0..readies {
        out.extend_from_slice(&error);
        be::write_ready_for_query(&mut out, status::IDLE);
    }
    if !out.is_empty() && client.send(&out).await.is_err() {
        return Cycle::ClientGone;
    }
    if sending {
        // The client is still sending a request: skip it to its Sync, as PostgreSQL
        // skips after an error, and answer that Sync.
        return refuse_unit(ctx, client, s, lanes, &error).await;
    }
    lanes.deactivate();
    Cycle::Next
}

/// Answers a unit the proxy will not run with `error` (an ErrorResponse), skips the
/// rest of the unit as PostgreSQL skips to Sync after an error, and says ReadyForQuery:
/// the session goes on.
async fn refuse_unit(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    lanes: &mut Lanes,
    error: &[u8],
) -> Cycle {
    if client.send(error).await.is_err() {
        return Cycle::ClientGone;
    }
    lanes.up.activate(&ctx.bufs);
    match intake::skip_unit(client, &mut lanes.up, &s.limits, &ctx.stats).await {
        Ok(true) => {}
        Ok(false) => {
            release_held(ctx, s).await;
            return Cycle::Over;
        }
        Err(stop) => return stopped(ctx, client, s, stop).await,
    }
    lanes.up.deactivate();
    let status = s.held.as_ref().map_or(status::IDLE, |h| h.lease.status);
    let mut ready = Vec::with_capacity(6);
    be::write_ready_for_query(&mut ready, status);
    if client.send(&ready).await.is_err() {
        return Cycle::ClientGone;
    }
    Cycle::Next
}

/// Ends a session whose unit stopped before it had a connection: the client left, broke
/// the protocol, or hit a limit.
async fn stopped(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    stop: intake::Stop,
) -> Cycle {
    match stop {
        intake::Stop::Gone => return Cycle::ClientGone,
        intake::Stop::Protocol(e) => {
            ctx.stats.protocol_errors.inc();
            log::info!("client protocol violation: {e}");
            send_fatal(client, e.sqlstate(), &e.to_string()).await;
        }
        intake::Stop::Cut(cut) => finish::tell_cut(ctx, client, cut).await,
    }
    release_held(ctx, s).await;
    Cycle::Over
}

/// Ends the session on the unit's connection (see [`finish::finish`]), then gives back
/// the connection the session keeps, if that is another one.
async fn end_on(
    ctx: &ShardCtx,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &Lanes,
    backend: Lease,
    end: PumpEnd,
) {
    // A database the unit needed to itself is open to others again.
    unit.fence = None;
    s.point_cancel(None);
    let reset = s.reset_for(&unit.notes);
    let held = s.held.take();
    Box::pin(finish::finish(
        ctx, client, backend, end, &unit.flow, lanes, reset,
    ))
    .await;
    if let Some(held) = held {
        let reset = s.reset_for(&held.notes);
        Box::pin(finish::release_clean(ctx, held.lease, reset)).await;
    }
}

/// The connection the unit runs on — the one the session keeps, or a fresh one from the
/// chosen pool brought to the session's state — and whether it is the kept one. `Err`:
/// how the cycle ends instead (the client was told).
async fn take_connection<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    from_client: bool,
    phases: &P,
) -> Result<(Lease, bool), Cycle> {
    // A unit the server started (it spoke first), or one tied to the kept connection,
    // runs there; other units go where the phases say.
    let chosen = if from_client && (s.held.is_none() || s.features.keeps_home_connection()) {
        phases.choose_node(s, unit, lanes.up.request())
    } else {
        None
    };
    let use_held = match (&s.held, &chosen) {
        (Some(_), None) => true,
        (Some(held), Some(pool)) => Rc::ptr_eq(held.lease.pool(), pool),
        (None, _) => false,
    };
    if use_held {
        if let Some(held) = s.held.take() {
            unit.notes = held.notes;
            return Ok((held.lease, true));
        }
    }
    let mut chosen = chosen;
    let mut repicks = 0;
    'pick: loop {
        let pool = match chosen.take() {
            Some(pool) => pool,
            None => {
                s.home = home_pool(ctx, s);
                s.home.clone()
            }
        };
        if from_client
            && !unit.on_read_node
            && ctx.awaiting_primary()
            && !serves_primary(ctx, &pool)
        {
            // A failover is under way: wait in the switchover buffer, then go where the
            // new topology says.
            if let Err(why) = failover::wait_for_primary(ctx).await {
                log::warn!("client {}: {why:?} waiting for a primary", s.pid());
                return Err(refuse_unit(ctx, client, s, lanes, &why.error(ctx)).await);
            }
            chosen = rechoose(s, unit, lanes, phases);
            continue 'pick;
        }
        let taken = acquire_for_unit(
            ctx,
            client,
            s,
            unit,
            lanes,
            from_client,
            phases,
            &pool,
            &mut repicks,
        )
        .await;
        match taken {
            Err(Acquired::Repick) => {
                chosen = rechoose(s, unit, lanes, phases);
                continue 'pick;
            }
            Err(Acquired::Ended(cycle)) => return Err(cycle),
            Ok(backend) => return Ok((backend, false)),
        }
    }
}

/// Is `pool`'s node the primary, and may it take work?
fn serves_primary(ctx: &ShardCtx, pool: &Pool) -> bool {
    ctx.nodes.borrow().iter().any(|n| {
        n.role == crate::config::NodeRole::Primary && n.routable() && *n.address == *pool.key.node
    })
}

/// Another node than `pool`'s now takes the primary's work (a failover went by).
fn primary_moved(ctx: &ShardCtx, pool: &Pool) -> bool {
    ctx.primary()
        .is_some_and(|n| n.routable() && n.address != pool.key.node)
}

/// Times a unit chooses its pool again because the one it waited on left service.
const MAX_REPICKS: u32 = 2;

/// The pool chosen again for a unit whose first choice left service.
fn rechoose<P: Phase>(
    s: &mut Session,
    unit: &mut Unit,
    lanes: &Lanes,
    phases: &P,
) -> Option<Rc<Pool>> {
    unit.sql.clear();
    if s.held.is_none() || s.features.keeps_home_connection() {
        phases.choose_node(s, unit, lanes.up.request())
    } else {
        None
    }
}

/// Why [`acquire_for_unit`] has no connection.
enum Acquired {
    /// The pool's node left service while the unit waited: choose again.
    Repick,
    /// How the cycle ends instead (the client was told).
    Ended(Cycle),
}

/// A connection from `pool`, brought to the session's state by the phases.
#[allow(clippy::too_many_arguments)]
async fn acquire_for_unit<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    from_client: bool,
    phases: &P,
    pool: &Rc<Pool>,
    repicks: &mut u32,
) -> Result<Lease, Acquired> {
    loop {
        let mut backend = match pool.acquire().await {
            Ok(b) => b,
            // The node left service while the unit waited (fenced, or replaced): choose
            // again — the buffer, or the node that took its place.
            Err(_)
                if from_client
                    && pool.is_retired()
                    && (ctx.awaiting_primary() || primary_moved(ctx, pool))
                    && *repicks < MAX_REPICKS =>
            {
                *repicks += 1;
                return Err(Acquired::Repick);
            }
            Err(e) if from_client => {
                // The client holds no connection this unit needed: it loses nothing by
                // being told and trying again later (as PostgreSQL would say of a
                // statement that failed).
                log::warn!("pool {}: {e}", pool.label);
                let mut error = Vec::new();
                e.encode_as_error(&mut error);
                return Err(Acquired::Ended(
                    refuse_unit(ctx, client, s, lanes, &error).await,
                ));
            }
            Err(e) => {
                welcome::report_acquire_error(pool, client, e).await;
                release_held(ctx, s).await;
                return Err(Acquired::Ended(Cycle::Over));
            }
        };
        unit.notes = LeaseNotes::default();
        match phases.after_acquire(s, unit, &mut backend).await {
            Ready::Go => return Ok(backend),
            Ready::Refused(err) => {
                let mut out = Vec::new();
                err.encode(&mut out);
                let _ = client.send(&out).await;
                let _ = client.close().await;
                finish::release_clean(ctx, backend, finish::Reset::Settings).await;
                release_held(ctx, s).await;
                return Err(Acquired::Ended(Cycle::Over));
            }
            Ready::Lost(e) => {
                log::info!("pool {}: connection lost before use: {e}", pool.label);
                pool.suspect();
                backend.lost();
                if phases.backend_lost(s, unit, LostAt::AfterAcquire) == Lost::Retry {
                    continue;
                }
                if from_client {
                    let mut error = Vec::new();
                    be::write_error(&mut error, "ERROR", "08006", "server connection lost");
                    return Err(Acquired::Ended(
                        refuse_unit(ctx, client, s, lanes, &error).await,
                    ));
                }
                send_fatal(client, "08006", "server connection lost").await;
                release_held(ctx, s).await;
                return Err(Acquired::Ended(Cycle::Over));
            }
        }
    }
}

/// The connection the session keeps broke while the session was idle, and the session
/// can move: it goes on without one (its next unit takes a new one).
fn lose_held(s: &mut Session) {
    s.point_cancel(None);
    if let Some(held) = s.held.take() {
        held.lease.pool().suspect();
        log::info!(
            "client {}: the server connection it kept was lost while idle; its state moves with its next unit",
            s.pid()
        );
        held.lease.lost();
    }
}

/// The session's connection was lost and what it kept there cannot move: it ends with
/// `FATAL 08006` naming that.
async fn lose_unmovable(ctx: &ShardCtx, client: &mut NetStream, s: &mut Session) {
    let message = failover::unmovable_message(s).unwrap_or_default();
    log::warn!("client {}: {message}", s.pid());
    replay::Refusal::SessionState.count(ctx);
    s.point_cancel(None);
    if let Some(held) = s.held.take() {
        held.lease.lost();
    }
    send_fatal(client, "08006", &message).await;
}

/// Gives back the connection the session keeps, clean, when the session ends elsewhere.
async fn release_held(ctx: &ShardCtx, s: &mut Session) {
    s.point_cancel(None);
    if let Some(held) = s.held.take() {
        let reset = s.reset_for(&held.notes);
        Box::pin(finish::release_clean(ctx, held.lease, reset)).await;
    }
}

/// Runs one unit on `backend` until it reaches a boundary or the session ends.
#[allow(clippy::too_many_arguments)]
async fn serve_unit<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    backend: &mut Lease,
    keep_home: bool,
    phases: &P,
) -> UnitEnd {
    let pid = s.pid();
    loop {
        lanes.activate(&ctx.bufs);
        let end = {
            let server_pid = backend.key.pid;
            let BackendConn {
                stream,
                params,
                status,
                statements,
                pending_close,
                ..
            } = &mut **backend;
            Pump {
                client: &mut *client,
                server: stream,
                params,
                status,
                up: &mut lanes.up,
                down: &mut lanes.down,
                cx: MessageCx {
                    features: &s.features,
                    registry: &ctx.statements,
                    client: &mut s.statements,
                    server: statements,
                    pending_close,
                    responses: &mut lanes.responses,
                    notes: &mut unit.notes,
                    sql: &mut unit.sql,
                    offset: 0,
                    cache: &mut unit.cache,
                },
                phases,
                flow: &mut unit.flow,
                stats: &ctx.stats,
                draining: &ctx.draining,
                backend_eof: false,
                pids: (server_pid, pid),
                memory: &ctx.message_memory,
                stall_after: s.limits.stall,
                stall: None,
                query_limit: s.limits.query,
                query_deadline: None,
                client_read_pending: false,
                verify_limit: ctx.config().failover.write_timeout(),
                verify_timer: None,
                client_unflushed: false,
                server_unflushed: false,
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
            lanes.responses.unsynced,
            unit.flow.copy_in
        );
        match end {
            // The server said FATAL (the client has it) and closes next.
            PumpEnd::Quiet if unit.flow.server_fatal => {
                return UnitEnd::Ended(PumpEnd::BackendGone)
            }
            PumpEnd::Quiet => {
                // Quiet without a word from the server (the proxy answered): no start over.
                lanes.up.clear_anchor();
                lanes.deactivate();
            }
            other => return UnitEnd::Ended(other),
        }
        if backend.status == status::IDLE && !lanes.responses.unsynced && !unit.flow.copy_in {
            let mut decision = phases.before_release(s, unit, backend).await;
            if decision == Release::Lost {
                return UnitEnd::Ended(PumpEnd::BackendGone);
            }
            if !backend.notifications.is_empty() {
                let mut pending = std::mem::take(&mut backend.notifications);
                be::rewrite_notification_pids(&mut pending, backend.key.pid, pid);
                if client.send(&pending).await.is_err() {
                    return UnitEnd::Ended(PumpEnd::ClientGone);
                }
            }
            if keep_home && decision < Release::Keep {
                decision = Release::Keep;
            }
            // A connection tied to the session in a pooled mode stays with it: the next
            // unit comes back to it (through the idle wait, which watches it too).
            return UnitEnd::Boundary(decision);
        }
        // Mid-unit (open transaction, COPY, unsynced messages): wait for either side,
        // holding no buffers; idle in a transaction only as long as allowed.
        // (Counted from the ReadyForQuery, as PostgreSQL does: not while a Flush's
        // answers or COPY data are awaited.)
        let idle_in_transaction =
            backend.status != status::IDLE && !lanes.responses.unsynced && !unit.flow.copy_in;
        let limit = s.limits.idle_transaction.filter(|_| idle_in_transaction);
        match idle_wait(ctx, client, Some(&mut backend.stream), limit, None).await {
            Wake::Client(buf, n) => {
                ctx.stats.bytes_from_clients.add(n as u64);
                lanes.up.seed(buf, n);
            }
            Wake::Backend(buf, n) => {
                log::trace!(
                    "backend {}: spoke while its client was idle ({n} bytes)",
                    backend.id
                );
                lanes.down.seed(buf, n);
            }
            Wake::ClientGone => return UnitEnd::Ended(PumpEnd::ClientGone),
            Wake::BackendGone => return UnitEnd::Ended(PumpEnd::BackendGone),
            Wake::Drain => return UnitEnd::Ended(PumpEnd::Drain),
            Wake::TimedOut => return UnitEnd::Ended(PumpEnd::Cut(Cut::IdleInTransaction)),
            Wake::Pending | Wake::Park(_) => {
                unreachable!("only the session's own wait reports pending bytes or parks")
            }
        }
    }
}

/// Ends a session that is between units: the client left, the connection the session
/// keeps broke, or the shard drains.
async fn end_idle(ctx: &Rc<ShardCtx>, client: &mut NetStream, s: &mut Session, wake: Wake) {
    s.point_cancel(None);
    let held = s.held.take();
    match (wake, held) {
        (Wake::BackendGone, Some(held)) => {
            held.lease.lost();
            send_fatal(client, "08006", "server closed the connection unexpectedly").await;
        }
        (Wake::TimedOut, held) => {
            finish::tell_cut(ctx, client, Cut::IdleSession).await;
            if let Some(held) = held {
                let reset = s.reset_for(&held.notes);
                finish::release_clean(ctx, held.lease, reset).await;
            }
        }
        (Wake::Drain, held) => {
            send_fatal(
                client,
                "57P01",
                "terminating connection due to administrator command",
            )
            .await;
            if let Some(held) = held {
                let reset = s.reset_for(&held.notes);
                finish::release_clean(ctx, held.lease, reset).await;
            }
        }
        (_, Some(held)) => {
            finish::hang_up(client);
            let reset = s.reset_for(&held.notes);
            finish::release_clean(ctx, held.lease, reset).await;
        }
        (_, None) => {}
    }
}
