//! Per-shard backend pools keyed by (node, database, user). A shard never borrows
//! another shard's connections: its share of `max_pool_size` is all it has, and its
//! clients queue FIFO for it up to the acquire timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{BackendConn, BackendError, ConnectSpec};
use crate::stats::ShardStats;
use crate::sync::{self, Slot};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: usize,
    pub database: String,
    pub user: String,
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
    #[error("timed out after {waited_ms} ms waiting for a server connection from pool \"{pool}\" ({max} connections on this worker, all busy)")]
    Timeout {
        pool: String,
        waited_ms: u128,
        max: usize,
    },
    #[error(transparent)]
    Connect(#[from] BackendError),
}

/// What a waiting client is handed: a connection, or the right to open one.
/// (Moved once per wait; boxing the connection would cost an allocation instead.)
#[allow(clippy::large_enum_variant)]
enum Grant {
    Conn(BackendConn),
    Slot,
}

pub struct Pool {
    pub key: PoolKey,
    pub label: String,
    spec: ConnectSpec,
    limits: PoolLimits,
    stats: Arc<ShardStats>,
    next_id: Rc<Cell<u64>>,
    state: RefCell<PoolState>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<BackendConn>,
    /// Connections that exist or are being opened: idle + leased + connecting.
    total: usize,
    waiters: VecDeque<Rc<Slot<Grant>>>,
    created: u64,
    closed: u64,
}

/// A point-in-time view of one pool, for the admin API and tests.
#[derive(Clone, Debug, Default)]
pub struct PoolSnapshot {
    pub label: String,
    pub total: usize,
    pub idle: usize,
    pub waiting: usize,
    pub created: u64,
    pub closed: u64,
    pub max: usize,
}

impl Pool {
    pub fn new(
        key: PoolKey,
        label: String,
        spec: ConnectSpec,
        limits: PoolLimits,
        stats: Arc<ShardStats>,
        next_id: Rc<Cell<u64>>,
    ) -> Rc<Pool> {
        Rc::new(Pool {
            key,
            label,
            spec,
            limits,
            stats,
            next_id,
            state: RefCell::new(PoolState::default()),
        })
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.state.borrow();
        PoolSnapshot {
            label: self.label.clone(),
            total: st.total,
            idle: st.idle.len(),
            waiting: st.waiters.len(),
            created: st.created,
            closed: st.closed,
            max: self.limits.max_size,
        }
    }

    /// No connections and nobody waiting: the pool can be forgotten.
    pub fn is_unused(&self) -> bool {
        let st = self.state.borrow();
        st.total == 0 && st.waiters.is_empty()
    }

    /// Takes an idle connection, opens a new one within the limit, or waits FIFO.
    pub async fn acquire(self: &Rc<Self>) -> Result<BackendConn, AcquireError> {
        if let Some(conn) = self.take_idle() {
            return Ok(conn);
        }
        if self.reserve_slot() {
            return self.open_reserved().await;
        }
        let started = Instant::now();
        self.stats.pool_waits.inc();
        let slot = Slot::new();
        self.state.borrow_mut().waiters.push_back(slot.clone());
        let guard = WaitGuard {
            pool: self,
            slot: &slot,
        };
        let grant = sync::timeout(self.limits.acquire_timeout, slot.wait()).await;
        std::mem::forget(guard);
        self.stats
            .pool_wait_micros
            .add(started.elapsed().as_micros() as u64);
        match grant {
            Some(Grant::Conn(conn)) => Ok(conn),
            Some(Grant::Slot) => self.open_reserved().await,
            None => {
                self.abandon_wait(&slot);
                self.stats.pool_timeouts.inc();
                Err(AcquireError::Timeout {
                    pool: self.label.clone(),
                    waited_ms: started.elapsed().as_millis(),
                    max: self.limits.max_size,
                })
            }
        }
    }

    /// Returns a clean connection (status I, reset done) for reuse.
    pub fn release(&self, mut conn: BackendConn) {
        if conn.created.elapsed() >= self.limits.max_lifetime {
            self.discard(conn);
            return;
        }
        conn.idle_since = Instant::now();
        // Messages for the client that left do not go to the next one.
        conn.notifications.clear();
        let mut pending = Some(conn);
        loop {
            let waiter = self.state.borrow_mut().waiters.pop_front();
            let Some(waiter) = waiter else { break };
            match waiter.put(Grant::Conn(pending.take().expect("conn present"))) {
                Ok(()) => return,
                Err(Grant::Conn(c)) => pending = Some(c),
                Err(Grant::Slot) => unreachable!("a connection was offered"),
            }
        }
        if let Some(conn) = pending {
            self.state.borrow_mut().idle.push(conn);
        }
    }

    /// Drops a connection that must never be reused and frees its slot.
    pub fn discard(&self, conn: BackendConn) {
        glommio::spawn_local(conn.terminate()).detach();
        self.slot_freed();
    }

    /// A connection was lost without being handed back (broken socket).
    pub fn forget(&self) {
        self.slot_freed();
    }

    /// Closes expired idle connections and opens new ones up to `min_idle`.
    pub fn maintain(self: &Rc<Self>) {
        let expired: Vec<BackendConn> = {
            let mut st = self.state.borrow_mut();
            let min_idle = self.limits.min_idle;
            let mut keep = Vec::with_capacity(st.idle.len());
            let mut expired = Vec::new();
            let idle_count = st.idle.len();
            for conn in st.idle.drain(..) {
                let too_old = conn.created.elapsed() >= self.limits.max_lifetime;
                let idle_too_long = conn.idle_since.elapsed() >= self.limits.idle_timeout
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
        let missing = {
            let st = self.state.borrow();
            self.limits.min_idle.saturating_sub(st.idle.len())
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

    fn take_idle(&self) -> Option<BackendConn> {
        loop {
            let conn = self.state.borrow_mut().idle.pop()?;
            if conn.created.elapsed() >= self.limits.max_lifetime || !conn.is_alive() {
                self.discard(conn);
                continue;
            }
            return Some(conn);
        }
    }

    fn reserve_slot(&self) -> bool {
        let mut st = self.state.borrow_mut();
        if st.total < self.limits.max_size {
            st.total += 1;
            true
        } else {
            false
        }
    }

    async fn open_reserved(&self) -> Result<BackendConn, AcquireError> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        // Boxed: the connect future is large and waiting clients should not carry it.
        match Box::pin(BackendConn::connect(&self.spec, id)).await {
            Ok(conn) => {
                self.state.borrow_mut().created += 1;
                self.stats.backends_created.inc();
                Ok(conn)
            }
            Err(e) => {
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

    /// Gives a freed slot to the first live waiter, or back to the pool.
    fn release_slot_only(&self) {
        let mut st = self.state.borrow_mut();
        st.total -= 1;
        while let Some(waiter) = st.waiters.pop_front() {
            if waiter.put(Grant::Slot).is_ok() {
                st.total += 1;
                return;
            }
        }
    }

    fn abandon_wait(&self, slot: &Rc<Slot<Grant>>) {
        self.state
            .borrow_mut()
            .waiters
            .retain(|w| !Rc::ptr_eq(w, slot));
        match slot.abandon() {
            Some(Grant::Conn(conn)) => self.release(conn),
            Some(Grant::Slot) => self.release_slot_only(),
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
