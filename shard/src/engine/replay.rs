//! Replay (`failover.replay`): a unit whose server connection was lost mid-way runs again
//! from its start on a new connection — on the new primary after a failover — when the
//! proxy can show that the client will see nothing different:
//!
//! - nothing of the unit can have committed: no COMMIT went out, and outside a
//!   transaction block it only read (see [`super::journal::rerunnable`]);
//! - the replay reproduces, byte for byte (count and digest), everything the client had
//!   already received during the unit before the client hears anything more, and nothing
//!   the client sent after the lost connection's last byte runs until then.
//!
//! A replay that produces anything else has diverged: the client gets `40001`
//! (serialization_failure), which drivers, ORMs and `pgbench --max-tries` retry, on a
//! connection whose transaction really is aborted, so the client's ROLLBACK (or its next
//! statement's `25P02`) is PostgreSQL's own. A unit that may not re-run is told what
//! [`super::failover`] tells it without replay (`08006`, or `08007` when what was in
//! flight may have committed).

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::codec::backend as be;
use crate::codec::frontend;
use crate::codec::tag::status;
use crate::context::ShardCtx;
use crate::lease::Lease;
use crate::session::login::send_fatal;
use crate::stream::NetStream;

use super::failover;
use super::finish;
use super::journal::{rerunnable, NotRerunnable};
use super::lanes::Lanes;
use super::phase::{Phase, Ready};
use super::responses::CommitXid;
use super::session::Session;
use super::unit::{Flow, LeaseNotes, Unit};
use super::{forget_answers, home_pool, release_held, Cycle};

/// Replays of one unit before the proxy gives up on it.
const MAX_REPLAYS: u32 = 3;

/// Why a lost unit was not replayed, or a replay was given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The replay's answers differed from what the client had (`40001`).
    Diverged,
    /// A COMMIT lost in flight did not commit, as the primary says (`40001`).
    NotCommitted,
    /// What was in flight may have committed (`08007`).
    UnknownOutcome,
    /// The unit outgrew `failover.replay_journal_max_bytes`.
    JournalFull,
    /// State of the session that lived on the lost connection cannot move.
    SessionState,
    /// No primary took the work within `failover.write_timeout_secs`, or the unit was
    /// lost too many times.
    NoPrimary,
    /// The new server refused the session's state.
    ServerRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Diverged,
        Refusal::NotCommitted,
        Refusal::UnknownOutcome,
        Refusal::JournalFull,
        Refusal::SessionState,
        Refusal::NoPrimary,
        Refusal::ServerRefused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Diverged => "diverged",
            Refusal::NotCommitted => "not_committed",
            Refusal::UnknownOutcome => "unknown_outcome",
            Refusal::JournalFull => "journal_full",
            Refusal::SessionState => "session_state",
            Refusal::NoPrimary => "no_primary",
            Refusal::ServerRefused => "server_refused",
        }
    }

    pub fn count(self, ctx: &ShardCtx) {
        ctx.stats.replays_refused[self as usize].inc();
    }
}

/// A replay under way, with what the client was owed when its connection was first lost.
#[derive(Clone, Copy, Debug)]
pub struct Replaying {
    pub attempts: u32,
    /// ReadyForQuery messages owed, and whether the client was still sending a request.
    pub owed: (u32, bool),
    /// The client had seen its transaction block open (status T or E).
    pub in_block: bool,
    /// What the client received ends at a server message boundary.
    pub at_boundary: bool,
    pub since: Instant,
}

/// What becomes of a lost unit.
pub(super) enum Plan {
    /// It runs again from its start. `hold_last`: its last statement (a COMMIT, or an
    /// autocommit write, that the lost server never ran) waits, like what the client sent
    /// after, until the replay has reproduced what the client has.
    Replay { hold_last: bool },
    /// Its COMMIT (or an autocommit write) was in flight with nothing else owed, and the
    /// transaction's id is known (`None`: it had none, having written nothing): the
    /// primary says how it ended. `owes_tag`: the client is owed `COMMIT`'s
    /// CommandComplete too.
    Settle { xid: Option<u64>, owes_tag: bool },
}

/// How a lost unit goes on.
pub(super) enum Recovery {
    /// On this connection, replaying (or, after a divergence, carrying the aborted
    /// transaction).
    Resume(Box<Lease>),
    /// The cycle ends so.
    Over(Cycle),
}

/// Whether the unit whose connection was lost (its last transaction status `last_status`)
/// is replayed: `None` when replay does not apply (off, or the session is tied to the
/// lost connection); else whether it may.
pub(super) fn plan(
    ctx: &ShardCtx,
    s: &Session,
    unit: &Unit,
    lanes: &Lanes,
    last_status: u8,
    from_client: bool,
) -> Option<Result<Plan, Refusal>> {
    let journal = lanes.up.journal.as_ref()?;
    if !from_client
        || !(failover::session_detached(s) || failover::session_movable(s))
        || unit.flow.terminated
        || unit.flow.server_fatal
    {
        return None;
    }
    if unit.replaying.is_none()
        && last_status == status::IDLE
        && failover::owed(lanes) == (0, false)
        && lanes.up.replay_done()
    {
        // Everything the unit sent was answered and it is outside a block: nothing is
        // lost (see `lost_mid_unit`).
        return None;
    }
    if unit
        .replaying
        .as_ref()
        .is_some_and(|r| r.attempts >= MAX_REPLAYS)
    {
        return Some(Err(Refusal::NoPrimary));
    }
    if unit.notes.commit_sent {
        log::debug!(
            "client {}: lost with a commit in flight: {:?}, owed {:?}, at boundary {}",
            s.pid(),
            lanes.responses.commit_xid,
            failover::owed(lanes),
            lanes.down.client_at_boundary()
        );
        let functions = ctx.read_only_functions.borrow().clone();
        return Some(match lanes.responses.commit_xid {
            CommitXid::Learned { xid, owes_tag }
                if failover::owed(lanes) == (1, false) && lanes.down.client_at_boundary() =>
            {
                Ok(Plan::Settle { xid, owes_tag })
            }
            // The server said it was going away without a byte of the answer to the
            // query sent just before the COMMIT: it ran neither; the whole unit, COMMIT
            // included, may run again.
            CommitXid::Asked
                if unit.flow.server_gone
                    && !journal.overflowed
                    && rerunnable(journal.bytes(), &s.statements, &functions, true).is_ok() =>
            {
                Ok(Plan::Replay { hold_last: true })
            }
            _ => Err(Refusal::UnknownOutcome),
        });
    }
    if journal.overflowed {
        return Some(Err(Refusal::JournalFull));
    }
    let functions = ctx.read_only_functions.borrow().clone();
    match rerunnable(journal.bytes(), &s.statements, &functions, false) {
        Ok(()) => Some(Ok(Plan::Replay { hold_last: false })),
        Err(NotRerunnable::WroteOutsideTransaction | NotRerunnable::Committed) => {
            Some(Err(Refusal::UnknownOutcome))
        }
        Err(NotRerunnable::Unknown) => Some(Err(Refusal::UnknownOutcome)),
    }
}

/// Sets the unit up to run again from its start and finds it a new connection.
#[allow(clippy::too_many_arguments)]
pub(super) async fn recover<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    mut backend: Lease,
    phases: &P,
    hold_last: bool,
) -> Recovery {
    backend.pool().suspect();
    let lost_pool = backend.pool().label.clone();
    // While a replay is still reproducing what the client has, the client is owed what
    // it was owed at the first loss; after that, what this run owes.
    let first = unit.replaying.take().map(|r| *r);
    let replaying = match first {
        Some(first) if lanes.down.verifying() => Replaying {
            attempts: first.attempts + 1,
            ..first
        },
        _ => Replaying {
            attempts: first.map_or(1, |f| f.attempts + 1),
            owed: failover::owed(lanes),
            in_block: backend.status != status::IDLE,
            at_boundary: lanes.down.client_at_boundary(),
            since: first.map_or_else(Instant::now, |f| f.since),
        },
    };
    forget_answers(s, lanes, &mut backend);
    s.point_cancel(None);
    backend.lost();
    s.statements.rewind_unit();
    let journal_bytes = lanes.up.journal.as_ref().map_or(0, |j| j.len());
    if !lanes.up.start_replay(unit.position, hold_last) {
        unit.replaying = Some(Box::new(replaying));
        return give_up(ctx, client, s, unit, lanes, Refusal::JournalFull, phases).await;
    }
    if let Some(delivered) = lanes.down.delivered.as_mut() {
        delivered.start_verify();
    }
    unit.replaying = Some(Box::new(replaying));
    unit.on_read_node = false;
    unit.flow = Flow::default();
    ctx.stats.replays_attempted.inc();
    log::warn!(
        "client {}: server connection of pool {lost_pool} lost mid-unit; replaying the unit ({journal_bytes} bytes, {} delivered to the client) on a new connection, attempt {}",
        s.pid(),
        lanes.down.delivered.as_ref().map_or(0, |d| d.count()),
        replaying.attempts
    );
    match replacement(ctx, s, unit, phases).await {
        Ok(lease) => {
            if !lanes.down.verifying() {
                // The client had received nothing of the unit: nothing can differ.
                ctx.stats.replays_succeeded.inc();
            }
            log::info!(
                "client {}: replaying on pool {} after {:.0} ms",
                s.pid(),
                lease.pool().label,
                replaying.since.elapsed().as_secs_f64() * 1000.0
            );
            Recovery::Resume(Box::new(lease))
        }
        Err(refusal) => give_up(ctx, client, s, unit, lanes, refusal, phases).await,
    }
}

/// A connection from the primary's pool as the topology names it, once a primary may
/// take work, by `deadline`; nothing of the session's is on it.
async fn primary_connection(
    ctx: &Rc<ShardCtx>,
    s: &mut Session,
    deadline: Instant,
) -> Result<Lease, Refusal> {
    let pause = Duration::from_millis(ctx.config().failover.fast_probe_ms);
    loop {
        if ctx.awaiting_primary() && failover::wait_for_primary(ctx).await.is_err() {
            return Err(Refusal::NoPrimary);
        }
        s.home = home_pool(ctx, s);
        let pool = s.home.clone();
        match pool.acquire().await {
            Ok(lease) => return Ok(lease),
            Err(e) => log::info!("pool {}: no connection for a replay yet: {e}", pool.label),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Refusal::NoPrimary);
        }
        crate::sync::timeout(left.min(pause), ctx.topology_changed.wait()).await;
    }
}

/// A connection for a replay, brought to the session's state (settings, and what
/// `carry` moves), within `write_timeout_secs`.
async fn replacement<P: Phase>(
    ctx: &Rc<ShardCtx>,
    s: &mut Session,
    unit: &mut Unit,
    phases: &P,
) -> Result<Lease, Refusal> {
    let deadline = Instant::now() + ctx.config().failover.write_timeout();
    loop {
        let mut lease = primary_connection(ctx, s, deadline).await?;
        unit.notes = LeaseNotes::default();
        match phases.after_acquire(s, unit, &mut lease).await {
            Ready::Go => return Ok(lease),
            Ready::Lost(e) => {
                log::info!(
                    "pool {}: connection lost before a replay: {e}",
                    lease.pool().label
                );
                lease.pool().suspect();
                lease.lost();
                if Instant::now() >= deadline {
                    return Err(Refusal::NoPrimary);
                }
            }
            Ready::Refused(e) => {
                log::warn!(
                    "pool {}: refused the session's state for a replay: {e}",
                    lease.pool().label
                );
                // Part of the session's state may be on it: no one else gets it.
                lease.discard();
                return Err(Refusal::ServerRefused);
            }
        }
    }
}

/// The replay reproduced something other than what the client had: it is dropped, and the
/// client gets `40001` for what it was owed. Inside a transaction block the session goes
/// on with a connection whose transaction is aborted, as the client's would be.
pub(super) async fn diverged<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    mut backend: Lease,
    phases: &P,
) -> Recovery {
    forget_answers(s, lanes, &mut backend);
    s.point_cancel(None);
    backend.discard();
    log::warn!(
        "client {}: the replayed unit's answers differ from what the client received; it gets 40001",
        s.pid()
    );
    give_up(ctx, client, s, unit, lanes, Refusal::Diverged, phases).await
}

/// Tells the client what it was owed when a replay is refused or given up, and ends what
/// must end. After a divergence inside a transaction block, the unit goes on with a
/// connection whose transaction is aborted.
pub(super) async fn give_up<P: Phase>(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    refusal: Refusal,
    phases: &P,
) -> Recovery {
    refusal.count(ctx);
    let Some(replaying) = unit.replaying.take() else {
        return Recovery::Over(Cycle::Next);
    };
    if !lanes.up.abandon_replay(unit.position, &ctx.bufs) || !replaying.at_boundary {
        // The client is in the middle of a message either way: nothing can follow.
        if replaying.at_boundary {
            send_fatal(client, code(refusal), &message(refusal)).await;
        } else {
            finish::hang_up(client);
        }
        release_held(ctx, s).await;
        return Recovery::Over(Cycle::Over);
    }
    let aborted = if replaying.in_block && refusal == Refusal::Diverged {
        carrier(ctx, s, unit, phases).await
    } else {
        None
    };
    if replaying.in_block && aborted.is_none() {
        // The client's transaction is gone and nothing can carry it.
        send_fatal(client, code(refusal), &message(refusal)).await;
        release_held(ctx, s).await;
        return Recovery::Over(Cycle::Over);
    }
    let in_failed_block = aborted.is_some();
    let ready_status = if in_failed_block {
        status::FAILED
    } else {
        status::IDLE
    };
    let (readies, sending) = replaying.owed;
    let mut out = Vec::new();
    for i in 0..readies {
        write_owed_error(&mut out, refusal, i > 0 && in_failed_block);
        be::write_ready_for_query(&mut out, ready_status);
    }
    if sending {
        write_owed_error(&mut out, refusal, readies > 0 && in_failed_block);
    }
    let told = client.send(&out).await.is_ok();
    let skipped = told
        && (!sending || {
            // The rest of the request the client was sending is skipped to its Sync, as
            // PostgreSQL skips after an error, and the Sync answered.
            lanes.up.activate(&ctx.bufs);
            let skipped =
                super::intake::skip_unit(client, &mut lanes.up, &s.limits, &ctx.stats).await;
            out.clear();
            be::write_ready_for_query(&mut out, ready_status);
            matches!(skipped, Ok(true)) && client.send(&out).await.is_ok()
        });
    match aborted {
        Some(lease) if skipped => {
            ctx.stats.units_lost.inc();
            if readies == 0 && !sending {
                // The client's next request meets the aborted transaction: its first
                // error is the one owed.
                let mut error = Vec::new();
                write_owed_error(&mut error, refusal, false);
                unit.flow.replace_next_error = Some(error.into_boxed_slice());
            }
            Recovery::Resume(Box::new(lease))
        }
        Some(lease) => {
            lease.discard();
            Recovery::Over(Cycle::ClientGone)
        }
        None if skipped => {
            ctx.stats.units_lost.inc();
            lanes.deactivate();
            Recovery::Over(Cycle::Next)
        }
        None => Recovery::Over(Cycle::ClientGone),
    }
}

/// A connection of the primary's in a transaction block that failed, to carry the rest of
/// a client's transaction whose replay diverged: the client's ROLLBACK ends it there.
async fn carrier<P: Phase>(
    ctx: &Rc<ShardCtx>,
    s: &mut Session,
    unit: &mut Unit,
    phases: &P,
) -> Option<Lease> {
    const ABORT: &str = "BEGIN; DO $helios$BEGIN RAISE EXCEPTION 'replayed transaction diverged after a failover; the client is told 40001' USING ERRCODE = '40001'; END$helios$";
    let mut request = Vec::with_capacity(ABORT.len() + 8);
    frontend::encode_query(&mut request, ABORT);
    let mut buf = ctx.bufs.take();
    // A connection can die under the carrier too (a server restarting after a crash ends
    // every backend a moment after the one that crashed): another is tried.
    for _ in 0..CARRIER_ATTEMPTS {
        // The session's own state comes with it: in session mode it may become its home.
        let mut lease = match replacement(ctx, s, unit, phases).await {
            Ok(lease) => lease,
            Err(why) => {
                log::warn!("no connection to carry an aborted transaction: {why:?}");
                return None;
            }
        };
        match lease.exchange(&request, 1, &mut buf).await {
            Ok(Some(_)) if lease.status == status::FAILED => return Some(lease),
            _ => lease.lost(),
        }
    }
    log::warn!("no connection carried an aborted transaction ({CARRIER_ATTEMPTS} tried)");
    None
}

/// Connections tried to carry an aborted transaction.
const CARRIER_ATTEMPTS: usize = 3;

/// The error for one answer a refused replay owed the client: `40001` for a divergence
/// (`25P02` for the later ones inside the failed block, as PostgreSQL answers them), else
/// what a lost unit gets.
fn write_owed_error(out: &mut Vec<u8>, refusal: Refusal, later_in_failed_block: bool) {
    if later_in_failed_block {
        be::write_error(
            out,
            "ERROR",
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        );
    } else {
        be::write_error(out, "ERROR", code(refusal), &message(refusal));
    }
}

fn code(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Diverged | Refusal::NotCommitted => "40001",
        Refusal::UnknownOutcome => "08007",
        _ => "08006",
    }
}

fn message(refusal: Refusal) -> String {
    match refusal {
        Refusal::Diverged => "could not serialize access: the transaction was replayed on a new server after a failover and its results differed; retry the transaction".into(),
        Refusal::NotCommitted => "could not serialize access: the connection to the server was lost during COMMIT and the transaction did not commit; retry the transaction".into(),
        Refusal::UnknownOutcome => "connection to the server lost while a commit was in flight: whether it committed is unknown".into(),
        Refusal::JournalFull => "connection to the server lost: the transaction was too large to replay (failover.replay_journal_max_bytes)".into(),
        Refusal::SessionState => "connection to the server lost: session state could not be moved to a new server".into(),
        Refusal::NoPrimary => "connection to the server lost: no primary took over in time to replay the transaction (failover.write_timeout_secs)".into(),
        Refusal::ServerRefused => "connection to the server lost: the new server refused the session's settings".into(),
    }
}

/// How a transaction whose COMMIT was lost in flight ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    NotCommitted,
    Unknown,
}

/// Settles a COMMIT lost in flight (`failover.track_commit_outcome`): once a primary may
/// take work, it is asked how the transaction ended, and the client gets the
/// CommandComplete it was owed, `40001` (it did not commit: retry), or `08007` when no
/// one can say. The session goes on.
#[allow(clippy::too_many_arguments)]
pub(super) async fn settle(
    ctx: &Rc<ShardCtx>,
    client: &mut NetStream,
    s: &mut Session,
    unit: &mut Unit,
    lanes: &mut Lanes,
    mut backend: Lease,
    (xid, owes_tag): (Option<u64>, bool),
) -> Cycle {
    let epoch = unit.epoch;
    backend.pool().suspect();
    forget_answers(s, lanes, &mut backend);
    s.point_cancel(None);
    backend.lost();
    unit.replaying = None;
    ctx.stats.replays_attempted.inc();
    let since = Instant::now();
    log::warn!(
        "client {}: server connection lost with a COMMIT in flight (transaction {}); asking the primary how it ended",
        s.pid(),
        xid.map_or_else(|| "without an id".into(), |x| x.to_string())
    );
    let outcome = match xid {
        // It wrote nothing: committed or not, nothing differs.
        None => Outcome::Committed,
        // A bare connection: the question needs nothing of the session's.
        Some(xid) => match primary_connection(
            ctx,
            s,
            Instant::now() + ctx.config().failover.write_timeout(),
        )
        .await
        {
            Ok(mut lease) => {
                let outcome = ask(ctx, &mut lease, xid, epoch).await;
                if lease.status == status::IDLE {
                    lease.release();
                } else {
                    lease.lost();
                }
                outcome
            }
            Err(_) => Outcome::Unknown,
        },
    };
    log::warn!(
        "client {}: the lost COMMIT is settled after {:.0} ms: {outcome:?}",
        s.pid(),
        since.elapsed().as_secs_f64() * 1000.0
    );
    let mut out = Vec::with_capacity(256);
    match outcome {
        Outcome::Committed => {
            ctx.stats.replays_succeeded.inc();
            if owes_tag {
                be::write_command_complete(&mut out, "COMMIT");
            }
        }
        Outcome::NotCommitted => {
            Refusal::NotCommitted.count(ctx);
            write_owed_error(&mut out, Refusal::NotCommitted, false);
        }
        Outcome::Unknown => {
            Refusal::UnknownOutcome.count(ctx);
            ctx.stats.units_lost.inc();
            write_owed_error(&mut out, Refusal::UnknownOutcome, false);
        }
    }
    be::write_ready_for_query(&mut out, status::IDLE);
    lanes.deactivate();
    if client.send(&out).await.is_err() {
        return Cycle::ClientGone;
    }
    Cycle::Next
}

/// How the transaction `xid`, committing on the primary of epoch `epoch`, ended, as the
/// current primary says. An id the primary of a later epoch began at or after was never
/// committed there (it may have been handed out again since).
async fn ask(ctx: &ShardCtx, lease: &mut Lease, xid: u64, epoch: u64) -> Outcome {
    if ctx.primary_epoch.get() != epoch {
        match ctx.primary_first_xid.get() {
            Some(first) if xid >= first => return Outcome::NotCommitted,
            Some(_) => {}
            None => return Outcome::Unknown,
        }
    }
    let deadline = Instant::now() + ctx.config().failover.write_timeout();
    let mut request = Vec::with_capacity(64);
    frontend::encode_query(
        &mut request,
        &format!("SELECT pg_catalog.txid_status({xid})"),
    );
    let mut buf = ctx.bufs.take();
    loop {
        let answer = match lease.fetch(&request, 1, &mut buf).await {
            Ok((rows, None)) => rows.first().and_then(|row| row.first().cloned().flatten()),
            Ok((_, Some(e))) => {
                log::warn!("txid_status({xid}) failed: {e}");
                return Outcome::Unknown;
            }
            Err(e) => {
                log::warn!("txid_status({xid}): connection lost: {e}");
                return Outcome::Unknown;
            }
        };
        match answer.as_deref() {
            Some("committed") => return Outcome::Committed,
            Some("aborted") => return Outcome::NotCommitted,
            // Still finishing (the same server, its COMMIT waiting for a standby).
            Some("in progress") if Instant::now() < deadline => {
                glommio::timer::sleep(Duration::from_millis(20)).await
            }
            _ => return Outcome::Unknown,
        }
    }
}
