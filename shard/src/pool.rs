//! Per-shard backend pools keyed by (node, database, user). A shard never uses another
//! shard's connections, but `max_pool_size` is one budget for all of them (see
//! [`crate::budget`]): a shard opens a connection when the budget has room, and gives
//! back what it keeps idle while other shards' clients wait. Clients queue FIFO up to
//! the acquire timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::auth::ServerCredential;
use crate::backend::{BackendConn, BackendError, ConnectSpec};
use crate::budget::Budget;
use crate::codec::backend as be;
use crate::config::TimeoutsConfig;
use crate::control::{PoolReport, ServerReport};
use crate::fence::Fences;
use crate::lease::Lease;
use crate::stats::ShardStats;
use crate::sync::{self, Gate, Signal, Slot};

/// First and longest pause between attempts to reach a server that was away.
const RECONNECT_PAUSE_MIN: Duration = Duration::from_millis(50);
const RECONNECT_PAUSE_MAX: Duration = Duration::from_millis(1000);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The node's configured "host:port".
    pub node: Rc<str>,
    pub database: Rc<str>,
    pub user: Rc<str>,
}

/// Sizing and timing rules for one shard's share of a pool.
#[derive(Clone, Debug)]
pub struct PoolLimits {
    pub max_size: usize,
    pub min_idle: usize,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub acquire_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("timed out after {waited_ms} ms waiting for a server connection from pool \"{pool}\" ({max} server connections in all, every one in use; pool_mode.max_pool_size)")]
    Timeout {
        pool: String,
        waited_ms: u128,
        max: usize,
    },
    #[error("no server is available for pool \"{pool}\": its node is disabled, draining or failing health checks (waited {waited_ms} ms)")]
    Unavailable { pool: String, waited_ms: u128 },
    #[error(transparent)]
    Connect(#[from] BackendError),
}

impl AcquireError {
    /// Writes the failure as an ERROR a client's session survives (the server's own
    /// SQLSTATE and text when it refused the login).
    pub fn encode_as_error(&self, out: &mut Vec<u8>) {
        match self {
            AcquireError::Connect(BackendError::Server(e)) => {
                be::write_error(out, "ERROR", e.code(), e.message())
            }
            AcquireError::Connect(BackendError::Auth(_)) => {
                be::write_error(out, "ERROR", "28000", &self.to_string())
            }
            other => be::write_error(out, "ERROR", other.sqlstate(), &other.to_string()),
        }
    }

    /// The SQLSTATE a client is told.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AcquireError::Timeout { .. } => "53300",
            AcquireError::Unavailable { .. } => "57P03",
            AcquireError::Connect(_) => "08006",
        }
    }
}

/// What a waiting client is handed: a connection, or the right to open one.
/// (Moved once per wait; boxing the connection would cost an allocation instead.)
#[allow(clippy::large_enum_variant)]
enum Grant {
    Conn(BackendConn),
    Slot,
    /// The node was fenced: stop waiting here.
    Gone,
}

pub struct Pool {
    pub key: PoolKey,
    pub label: String,
    spec: RefCell<ConnectSpec>,
    limits: RefCell<PoolLimits>,
    stats: Arc<ShardStats>,
    next_id: Rc<Cell<u64>>,
    state: RefCell<PoolState>,
    /// Closed while the shard is PAUSEd.
    gate: Rc<Gate>,
    /// While a fence is up for this pool's database, nothing is opened or kept idle.
    fences: Rc<Fences>,
    /// The node takes no new work: nothing is opened, connections close as they return.
    retired: Cell<bool>,
    /// Retired because the node was fenced: nobody waits here at all.
    severed: Cell<bool>,
    /// Raised when a retired pool's node may take work again.
    reinstated: Signal,
    /// The right to open connections, shared with this key's pools on other shards.
    budget: Arc<Budget>,
    shard: usize,
    suspects: Option<crossbeam_channel::Sender<String>>,
    /// When this pool last reported its node (reports are at most one per interval).
    last_suspected: Cell<Option<Instant>>,
    /// What a login with given startup parameters was welcomed with, so the next such
    /// login in a pooled mode needs no server connection.
    welcomes: RefCell<Vec<(StartupParams, Rc<Welcome>)>>,
}

/// A login's startup parameters, as sent (the key of a remembered welcome).
type StartupParams = Vec<(String, String)>;

/// The welcome a pooled-mode login got: the server's parameters as the client saw them,
/// and the session's settings and startup parameters. Reused for the same startup
/// parameters for [`WELCOME_FOR`].
pub struct Welcome {
    pub params: crate::backend::ServerParams,
    pub settings: crate::backend::Settings,
    pub startup: Vec<(String, String)>,
    at: Instant,
}

/// Different startup parameter sets remembered per pool; past it, the oldest goes.
const WELCOMES_KEPT: usize = 16;
/// How long a remembered welcome is used (server defaults may change meanwhile).
const WELCOME_FOR: Duration = Duration::from_secs(60);

/// A pool reports its node at most this often.
const SUSPECT_EVERY: Duration = Duration::from_millis(50);

#[derive(Default)]
struct PoolState {
    idle: Vec<BackendConn>,
    /// Sockets of the connections lent out, so a fence can cut them mid-use.
    lent: Vec<std::os::fd::RawFd>,
    /// Connections that exist or are being opened: idle + leased + connecting.
    total: usize,
    waiters: VecDeque<(Rc<Slot<Grant>>, Instant)>,
    created: u64,
    closed: u64,
    leases: u64,
    wait_us: u64,
}

/// What every pool of a shard shares with the shard.
pub struct ShardShared {
    pub stats: Arc<ShardStats>,
    /// Numbers server connections across the shard's pools.
    pub next_id: Rc<Cell<u64>>,
    pub gate: Rc<Gate>,
    pub fences: Rc<Fences>,
    /// This pool key's budget, shared with the other shards.
    pub budget: Arc<Budget>,
    /// Which shard the pool is on (its slot in the budget).
    pub shard: usize,
    /// Where a failed connect or a connection lost mid-use is reported, so the health
    /// checker looks at the node at once (fast detection).
    pub suspects: Option<crossbeam_channel::Sender<String>>,
}

impl Pool {
    pub fn new(
        key: PoolKey,
        label: String,
        spec: ConnectSpec,
        limits: PoolLimits,
        shared: ShardShared,
    ) -> Rc<Pool> {
        let ShardShared {
            stats,
            next_id,
            gate,
            fences,
            budget,
            shard,
            suspects,
        } = shared;
        Rc::new(Pool {
            key,
            label,
            spec: RefCell::new(spec),
            limits: RefCell::new(limits),
            stats,
            next_id,
            state: RefCell::new(PoolState::default()),
            gate,
            fences,
            retired: Cell::new(false),
            severed: Cell::new(false),
            reinstated: Signal::default(),
            budget,
            shard,
            suspects,
            last_suspected: Cell::new(None),
            welcomes: RefCell::default(),
        })
    }

    /// The welcome remembered for a login with `startup` parameters, if recent.
    pub fn welcome_for(&self, startup: &[(String, String)]) -> Option<Rc<Welcome>> {
        self.welcomes
            .borrow()
            .iter()
            .find(|(key, w)| key.as_slice() == startup && w.at.elapsed() < WELCOME_FOR)
            .map(|(_, w)| w.clone())
    }

    /// Remembers how a login with `startup` parameters was welcomed.
    pub fn remember_welcome(
        &self,
        startup: &[(String, String)],
        params: crate::backend::ServerParams,
        settings: crate::backend::Settings,
        session_startup: Vec<(String, String)>,
    ) {
        let mut welcomes = self.welcomes.borrow_mut();
        welcomes.retain(|(key, w)| key.as_slice() != startup && w.at.elapsed() < WELCOME_FOR);
        if welcomes.len() >= WELCOMES_KEPT {
            welcomes.remove(0);
        }
        welcomes.push((
            startup.to_vec(),
            Rc::new(Welcome {
                params,
                settings,
                startup: session_startup,
                at: Instant::now(),
            }),
        ));
    }

    /// Tells the health checker this pool's node may be down: a connect failed, or a
    /// connection broke mid-use.
    pub fn suspect(&self) {
        let Some(suspects) = &self.suspects else {
            return;
        };
        let now = Instant::now();
        if self
            .last_suspected
            .get()
            .is_some_and(|at| now.duration_since(at) < SUSPECT_EVERY)
        {
            return;
        }
        self.last_suspected.set(Some(now));
        let _ = suspects.send(self.key.node.to_string());
    }

    /// A lease begins: its socket may have to be cut by a fence.
    pub(crate) fn lent(&self, fd: std::os::fd::RawFd) {
        self.state.borrow_mut().lent.push(fd);
    }

    /// A lease ends (before its socket closes).
    pub(crate) fn returned(&self, fd: std::os::fd::RawFd) {
        let mut st = self.state.borrow_mut();
        if let Some(i) = st.lent.iter().position(|f| *f == fd) {
            st.lent.swap_remove(i);
        }
    }

    /// The node is fenced: idle connections close and lent ones are cut now, so nothing
    /// more reaches a server that may no longer be the primary. Their holders see the
    /// connection end and tell their clients.
    pub fn sever(self: &Rc<Self>) {
        self.set_retired(true);
        self.severed.set(true);
        self.close_idle();
        // Clients waiting here go elsewhere (the switchover buffer, the new primary).
        while let Some(waiter) = self.pop_waiter() {
            let _ = waiter.put(Grant::Gone);
        }
        for fd in self.state.borrow().lent.iter() {
            // SAFETY: shutdown(2) on a socket a lease of this pool still owns (leases
            // remove their fd before the socket closes); no memory is involved.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RDWR);
            }
        }
    }

    /// This pool's figures for the admin API, metrics and the SQL console.
    pub fn report(&self) -> PoolReport {
        let st = self.state.borrow();
        PoolReport {
            node: self.key.node.to_string(),
            database: self.key.database.to_string(),
            user: self.key.user.to_string(),
            mode: None,
            total: st.total,
            idle: st.idle.len(),
            waiting: st.waiters.len(),
            max_wait_us: st
                .waiters
                .front()
                .map_or(0, |(_, since)| since.elapsed().as_micros() as u64),
            max: self.budget.max(),
            created: st.created,
            closed: st.closed,
            leases: st.leases,
            wait_us: st.wait_us,
            retired: self.retired.get(),
        }
    }

    /// The idle connections, for SHOW SERVERS (lent ones are listed by their sessions).
    pub fn idle_servers(&self) -> Vec<ServerReport> {
        self.state
            .borrow()
            .idle
            .iter()
            .map(|conn| self.server_report(conn, true))
            .collect()
    }

    pub fn server_report(&self, conn: &BackendConn, idle: bool) -> ServerReport {
        ServerReport {
            id: conn.id,
            node: self.key.node.to_string(),
            database: self.key.database.to_string(),
            user: self.key.user.to_string(),
            addr: conn.addr.clone(),
            local_port: conn.stream.local_addr().map(|a| a.port()).unwrap_or(0),
            backend_pid: conn.key.pid,
            connected: Some(SystemTime::now() - conn.created.elapsed()),
            idle,
        }
    }

    /// Server connections lent out (or being opened) right now.
    pub fn in_use(&self) -> usize {
        let st = self.state.borrow();
        st.total.saturating_sub(st.idle.len())
    }

    pub fn is_retired(&self) -> bool {
        self.retired.get()
    }

    /// Takes the pool out of service (its node is disabled, draining or unhealthy): idle
    /// connections close now, lent ones when they come back, and nothing new is opened.
    /// Or puts it back, letting waiting clients open connections again.
    pub fn set_retired(self: &Rc<Self>, retired: bool) {
        if !retired {
            self.severed.set(false);
        }
        if self.retired.replace(retired) == retired {
            return;
        }
        if retired {
            self.close_idle();
        } else {
            self.grant_slots();
            self.reinstated.notify();
        }
    }

    /// New TLS settings for connections opened from now on (a reload).
    pub fn set_tls(
        &self,
        tls: Option<(
            crate::tls::ServerTls,
            futures_rustls::rustls::pki_types::ServerName<'static>,
        )>,
    ) {
        self.spec.borrow_mut().tls = tls;
    }

    /// What connections opened from now on log in with (a reload, or a client's login
    /// proved a newer one).
    pub fn set_credential(&self, credential: Option<ServerCredential>) {
        let mut spec = self.spec.borrow_mut();
        if spec.credential != credential {
            spec.credential = credential;
            spec.scram_cache = Rc::default();
        }
    }

    /// New sizing and timing after a configuration reload. A smaller pool shrinks as
    /// connections come back.
    pub fn set_limits(
        self: &Rc<Self>,
        limits: PoolLimits,
        timeouts: &TimeoutsConfig,
        credential: Option<ServerCredential>,
    ) {
        {
            let mut spec = self.spec.borrow_mut();
            spec.connect_timeout = Duration::from_millis(timeouts.connect_timeout_ms);
            spec.login_timeout = Duration::from_millis(timeouts.server_login_timeout_ms);
        }
        self.set_credential(credential);
        self.budget.set_max(limits.max_size);
        *self.limits.borrow_mut() = limits;
        // A smaller budget: idle connections beyond it close now, lent ones as they
        // come back.
        while self.budget.over() {
            let Some(conn) = self.state.borrow_mut().idle.pop() else {
                break;
            };
            self.discard(conn);
        }
        self.grant_slots();
    }

    /// Hands free places in the budget to waiting clients (after the limit grew, the
    /// node came back, or another shard gave connections back).
    pub fn grant_slots(&self) {
        if self.retired.get() {
            return;
        }
        while !self.state.borrow().waiters.is_empty() && self.budget.try_take() {
            let Some(waiter) = self.pop_waiter() else {
                self.budget.give_back();
                return;
            };
            self.state.borrow_mut().total += 1;
            if waiter.put(Grant::Slot).is_err() {
                self.state.borrow_mut().total -= 1;
                self.budget.give_back();
            }
        }
    }

    /// The first waiting client, no longer counted as waiting.
    fn pop_waiter(&self) -> Option<Rc<Slot<Grant>>> {
        let (waiter, _) = self.state.borrow_mut().waiters.pop_front()?;
        self.publish_waiting();
        Some(waiter)
    }

    /// Tells the other shards how many clients wait here.
    fn publish_waiting(&self) {
        let waiting = self.state.borrow().waiters.len();
        self.budget.set_waiting(self.shard, waiting);
    }

    /// Clients of other shards wait for this key's budget, which this shard holds in
    /// connections that sat idle for at least `unused_for`: close them, so those clients
    /// can open their own. A connection that only just came back stays (it is likely to
    /// be used again at once), so a passing burst does not close and reopen connections.
    pub fn yield_idle(&self, unused_for: Duration) {
        let wanted = self.budget.waiting_elsewhere(self.shard);
        if wanted == 0 {
            return;
        }
        let unused: Vec<BackendConn> = {
            let mut st = self.state.borrow_mut();
            // Oldest first: connections are pushed as they come back.
            let stale = st
                .idle
                .iter()
                .take_while(|conn| conn.idle_since.elapsed() >= unused_for)
                .count()
                .min(wanted);
            st.idle.drain(..stale).collect()
        };
        for conn in unused {
            self.discard(conn);
        }
    }

    /// Clients are waiting here.
    pub fn has_waiters(&self) -> bool {
        !self.state.borrow().waiters.is_empty()
    }

    /// No connections, nobody waiting, and none ever opened (a database or user the
    /// server does not know): the pool can be forgotten without its history going
    /// backwards. A pool that ever connected stays, so its counters only count up.
    pub fn is_forgettable(&self) -> bool {
        let st = self.state.borrow();
        st.total == 0 && st.waiters.is_empty() && st.created == 0
    }

    /// Takes an idle connection, opens a new one within the limit, or waits FIFO. While
    /// the shard is paused it waits for RESUME; while the pool is retired it waits (up to
    /// the acquire timeout) for the node to come back.
    ///
    /// A server that cannot be reached or is restarting is tried again, with growing
    /// pauses, until `acquire_timeout` has passed since the call: a client whose unit
    /// arrives while the server is briefly away waits for it rather than failing.
    pub async fn acquire(self: &Rc<Self>) -> Result<Lease, AcquireError> {
        let started = Instant::now();
        let mut pause = RECONNECT_PAUSE_MIN;
        loop {
            match self.acquire_conn().await {
                Ok(conn) if self.severed.get() => {
                    // Handed over, or opened, just as the node was fenced: never used.
                    self.discard(conn);
                    return Err(AcquireError::Unavailable {
                        pool: self.label.clone(),
                        waited_ms: started.elapsed().as_millis(),
                    });
                }
                Ok(conn) => return Ok(Lease::new(conn, self.clone())),
                Err(AcquireError::Connect(e)) if e.is_transient() && !self.retired.get() => {
                    let limit = self.limits.borrow().acquire_timeout;
                    let left = limit.saturating_sub(started.elapsed());
                    if left < pause {
                        return Err(AcquireError::Connect(e));
                    }
                    log::info!("pool {}: {e}; trying again in {pause:?}", self.label);
                    glommio::timer::sleep(pause).await;
                    pause = (pause * 2).min(RECONNECT_PAUSE_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn acquire_conn(self: &Rc<Self>) -> Result<BackendConn, AcquireError> {
        if self.gate.is_closed() {
            self.gate.wait_open().await;
        }
        if self.fenced() {
            // Another client's statement needs this database to itself: wait until it
            // is done (then the database may be gone, which the server will say).
            let limit = self.limits.borrow().acquire_timeout;
            if !self.fences.wait_lifted(&self.key.database, limit).await {
                self.stats.pool_timeouts.inc();
                return Err(AcquireError::Timeout {
                    pool: self.label.clone(),
                    waited_ms: limit.as_millis(),
                    max: self.budget.max(),
                });
            }
        }
        if self.severed.get() {
            return Err(AcquireError::Unavailable {
                pool: self.label.clone(),
                waited_ms: 0,
            });
        }
        if !self.retired.get() {
            if let Some(conn) = self.take_idle() {
                self.stats.pool_acquire.record_us(0);
                self.state.borrow_mut().leases += 1;
                return Ok(conn);
            }
            if self.reserve_slot() {
                self.stats.pool_acquire.record_us(0);
                self.state.borrow_mut().leases += 1;
                return self.open_reserved().await;
            }
        }
        let started = Instant::now();
        self.stats.pool_waits.inc();
        let slot = Slot::new();
        self.state
            .borrow_mut()
            .waiters
            .push_back((slot.clone(), started));
        self.publish_waiting();
        let guard = WaitGuard {
            pool: self,
            slot: &slot,
        };
        let acquire_timeout = self.limits.borrow().acquire_timeout;
        let grant = sync::timeout(acquire_timeout, slot.wait()).await;
        std::mem::forget(guard);
        let waited = started.elapsed();
        self.stats.pool_wait_micros.add(waited.as_micros() as u64);
        self.stats.pool_acquire.record_us(waited.as_micros() as u64);
        {
            let mut st = self.state.borrow_mut();
            st.wait_us += waited.as_micros() as u64;
            st.leases += u64::from(grant.is_some());
        }
        match grant {
            Some(Grant::Conn(conn)) => Ok(conn),
            Some(Grant::Slot) => self.open_reserved().await,
            Some(Grant::Gone) => Err(AcquireError::Unavailable {
                pool: self.label.clone(),
                waited_ms: waited.as_millis(),
            }),
            None => {
                self.abandon_wait(&slot);
                self.stats.pool_timeouts.inc();
                if self.retired.get() {
                    return Err(AcquireError::Unavailable {
                        pool: self.label.clone(),
                        waited_ms: waited.as_millis(),
                    });
                }
                Err(AcquireError::Timeout {
                    pool: self.label.clone(),
                    waited_ms: waited.as_millis(),
                    max: self.budget.max(),
                })
            }
        }
    }

    /// Returns a clean connection (status I, reset done) for reuse (see [`Lease`]).
    pub(crate) fn release(&self, mut conn: BackendConn) {
        if self.retired.get()
            || self.fenced()
            || conn.created.elapsed() >= self.limits.borrow().max_lifetime
            || self.budget.over()
        {
            self.discard(conn);
            return;
        }
        conn.idle_since = Instant::now();
        // Messages for the client that left do not go to the next one.
        conn.notifications.clear();
        let mut pending = Some(conn);
        while let Some(waiter) = self.pop_waiter() {
            match waiter.put(Grant::Conn(pending.take().expect("conn present"))) {
                Ok(()) => return,
                Err(Grant::Conn(c)) => pending = Some(c),
                Err(Grant::Slot | Grant::Gone) => unreachable!("a connection was offered"),
            }
        }
        if let Some(conn) = pending {
            self.state.borrow_mut().idle.push(conn);
        }
    }

    /// Drops a connection that must never be reused and frees its slot.
    pub(crate) fn discard(&self, conn: BackendConn) {
        glommio::spawn_local(conn.terminate()).detach();
        self.slot_freed();
    }

    /// A connection was lost without being handed back (broken socket).
    pub(crate) fn forget(&self) {
        self.slot_freed();
    }

    /// Closes expired idle connections and opens new ones up to `min_idle`.
    pub fn maintain(self: &Rc<Self>) {
        let limits = self.limits.borrow().clone();
        let expired: Vec<BackendConn> = {
            let mut st = self.state.borrow_mut();
            let min_idle = limits.min_idle;
            let mut keep = Vec::with_capacity(st.idle.len());
            let mut expired = Vec::new();
            let idle_count = st.idle.len();
            for conn in st.idle.drain(..) {
                let too_old = conn.created.elapsed() >= limits.max_lifetime;
                let idle_too_long = conn.idle_since.elapsed() >= limits.idle_timeout
                    && idle_count - expired.len() > min_idle;
                if too_old || idle_too_long {
                    expired.push(conn);
                } else {
                    keep.push(conn);
                }
            }
            st.idle = keep;
            expired
        };
        for conn in expired {
            self.discard(conn);
        }
        if self.retired.get() || self.fenced() || self.budget.waiting_elsewhere(self.shard) > 0 {
            return;
        }
        let missing = {
            let st = self.state.borrow();
            limits.min_idle.saturating_sub(st.idle.len())
        };
        for _ in 0..missing {
            if !self.reserve_slot() {
                break;
            }
            let pool = self.clone();
            glommio::spawn_local(async move {
                if let Ok(conn) = pool.open_reserved().await {
                    pool.release(conn);
                }
            })
            .detach();
        }
    }

    /// Closes every idle connection (shutdown).
    pub fn close_idle(&self) {
        let idle: Vec<BackendConn> = self.state.borrow_mut().idle.drain(..).collect();
        for conn in idle {
            self.discard(conn);
        }
    }

    fn fenced(&self) -> bool {
        self.fences.is_fenced(&self.key.database)
    }

    fn take_idle(&self) -> Option<BackendConn> {
        loop {
            let conn = self.state.borrow_mut().idle.pop()?;
            if conn.created.elapsed() >= self.limits.borrow().max_lifetime || !conn.is_alive() {
                self.discard(conn);
                continue;
            }
            return Some(conn);
        }
    }

    fn reserve_slot(&self) -> bool {
        if self.budget.try_take() {
            self.state.borrow_mut().total += 1;
            true
        } else {
            false
        }
    }

    async fn open_reserved(&self) -> Result<BackendConn, AcquireError> {
        if self.fenced() {
            // A slot freed while a fence went up: open nothing there until it is down.
            let limit = self.limits.borrow().acquire_timeout;
            self.fences.wait_lifted(&self.key.database, limit).await;
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        // A copy: a reload may change the spec while this connect is under way.
        let spec = self.spec.borrow().clone();
        // Boxed: the connect future is large and waiting clients should not carry it.
        match Box::pin(BackendConn::connect(&spec, id)).await {
            Ok(conn) => {
                self.state.borrow_mut().created += 1;
                self.stats.backends_created.inc();
                Ok(conn)
            }
            Err(e) => {
                if e.is_transient() {
                    self.suspect();
                }
                self.stats.backend_connect_errors.inc();
                self.release_slot_only();
                Err(e.into())
            }
        }
    }

    fn slot_freed(&self) {
        {
            let mut st = self.state.borrow_mut();
            st.closed += 1;
        }
        self.stats.backends_closed.inc();
        self.release_slot_only();
    }

    /// Gives a freed place in the budget back, then to the first live waiter here if
    /// the budget still has room (a retired pool keeps it free).
    fn release_slot_only(&self) {
        self.state.borrow_mut().total -= 1;
        self.budget.give_back();
        self.grant_slots();
    }

    fn abandon_wait(&self, slot: &Rc<Slot<Grant>>) {
        self.state
            .borrow_mut()
            .waiters
            .retain(|(w, _)| !Rc::ptr_eq(w, slot));
        self.publish_waiting();
        match slot.abandon() {
            Some(Grant::Conn(conn)) => self.release(conn),
            Some(Grant::Slot) => self.release_slot_only(),
            Some(Grant::Gone) => {}
            None => {}
        }
    }
}

/// Makes a waiter that is dropped mid-wait (its client went away) give back whatever
/// it was handed, so nothing leaks from the pool.
struct WaitGuard<'a> {
    pool: &'a Rc<Pool>,
    slot: &'a Rc<Slot<Grant>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.pool.abandon_wait(self.slot);
    }
}
