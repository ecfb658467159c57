//! One shard's part of the cache: its L1, its part of L2 and its L3 (see [`Tier`]), what
//! it learned about statement shapes, and the configuration in force.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::config::CacheConfig;

use super::l2::Waiting;
use super::resolve::{self, Resolved};
use super::store::Store;
use super::Epochs;

/// The tiers, in the order a lookup tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// This shard's results by exact request.
    L1 = 0,
    /// Results by exact request, each kept by the shard its key names.
    L2 = 1,
    /// This shard's results by normalized statement and lifted values.
    L3 = 2,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::L1, Tier::L2, Tier::L3];

    pub fn label(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::L3 => "l3",
        }
    }
}

/// Resolutions kept per shard before they are all forgotten and learned again.
const MAX_RESOLUTIONS: usize = 10_000;

pub struct ShardCache {
    pub epochs: Arc<Epochs>,
    stores: [Store; 3],
    /// L2 lookups waiting for their owner's answer.
    pub waiting: Waiting,
    pub shard: usize,
    /// (session fingerprint, statement shape) → what the catalog said.
    resolutions: RefCell<HashMap<(u64, u64), Rc<Resolved>>>,
    config: RefCell<Rc<CacheConfig>>,
    enabled: Cell<bool>,
    /// WAL followers of the databases this shard stored results of (`invalidation =
    /// "wal"`).
    wal: RefCell<HashMap<String, Arc<super::WalFollow>>>,
    /// Whether sessions of a fingerprint run READ COMMITTED unless told otherwise (the
    /// server's `default_transaction_isolation`, learned with the catalog).
    isolation: RefCell<HashMap<u64, bool>>,
    workers: usize,
}

impl ShardCache {
    pub fn new(
        config: &CacheConfig,
        shard: usize,
        workers: usize,
        epochs: Arc<Epochs>,
    ) -> ShardCache {
        let shares = shares(config, workers);
        ShardCache {
            epochs,
            stores: shares.map(Store::new),
            waiting: Waiting::default(),
            shard,
            resolutions: RefCell::default(),
            config: RefCell::new(Rc::new(config.clone())),
            enabled: Cell::new(config.enabled),
            wal: RefCell::default(),
            isolation: RefCell::default(),
            workers,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.get()
    }

    pub fn store(&self, tier: Tier) -> &Store {
        &self.stores[tier as usize]
    }

    /// Whether results read from `database` may be stored now: always, unless writes are
    /// followed in the WAL and that database's follower is not streaming yet.
    pub fn may_fill(&self, database: &str) -> bool {
        if self.config.borrow().invalidation != crate::config::CacheInvalidation::Wal {
            return true;
        }
        if let Some(follow) = self.wal.borrow().get(database) {
            return follow.ready.load(std::sync::atomic::Ordering::SeqCst);
        }
        let follow = self.epochs.wal_follow(database);
        let ready = follow.ready.load(std::sync::atomic::Ordering::SeqCst);
        self.wal.borrow_mut().insert(database.to_string(), follow);
        ready
    }

    /// L2 spans shards: with one there is none.
    pub fn has_l2(&self) -> bool {
        self.workers > 1
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn config(&self) -> Rc<CacheConfig> {
        self.config.borrow().clone()
    }

    /// What is known about a statement shape, if it is still current.
    pub fn resolution(&self, session: u64, shape: u64) -> Option<Rc<Resolved>> {
        let catalog = self.epochs.catalog();
        let mut known = self.resolutions.borrow_mut();
        let found = known.get(&(session, shape))?;
        if resolve::current(found, catalog) {
            return Some(found.clone());
        }
        known.remove(&(session, shape));
        None
    }

    /// Whether the session's default isolation is READ COMMITTED, if learned.
    pub fn read_committed(&self, session: u64) -> Option<bool> {
        self.isolation.borrow().get(&session).copied()
    }

    pub fn learn(&self, session: u64, shape: u64, resolved: Resolved) {
        {
            let mut isolation = self.isolation.borrow_mut();
            if isolation.len() >= MAX_RESOLUTIONS {
                isolation.clear();
            }
            isolation.insert(session, resolved.read_committed);
        }
        let mut known = self.resolutions.borrow_mut();
        if known.len() >= MAX_RESOLUTIONS {
            known.clear();
        }
        known.insert((session, shape), Rc::new(resolved));
    }

    /// Shows the stores' sizes in the shard's counters.
    pub fn publish(&self, stats: &crate::stats::ShardStats) {
        for (store, tier) in self.stores.iter().zip(&stats.cache_tiers) {
            tier.entries.set(store.entries());
            tier.bytes.set(store.bytes());
            tier.evictions.set(store.evictions());
            tier.stale.set(store.stale());
        }
    }

    /// A reloaded configuration: the new memory share, and table overrides applied from
    /// the next resolution on (what was learned under the old ones is forgotten).
    pub fn apply_config(&self, config: &CacheConfig) {
        for (store, bytes) in self.stores.iter().zip(shares(config, self.workers)) {
            store.set_capacity(bytes);
            if !config.enabled {
                store.clear();
            }
        }
        self.resolutions.borrow_mut().clear();
        self.enabled.set(config.enabled);
        *self.config.borrow_mut() = Rc::new(config.clone());
    }
}

/// This shard's share of `max_memory_mb`, in bytes, split between its tiers: L1, its
/// part of L2 (none with one shard) and L3.
fn shares(config: &CacheConfig, workers: usize) -> [u64; 3] {
    let share = config.max_memory_mb * 1024 * 1024 / workers.max(1) as u64;
    if workers > 1 {
        [share / 3, share / 3, share / 3]
    } else {
        [share / 2, 0, share / 2]
    }
}

/// The owner's side of an L2 lookup: its fresh entry for `key`.
pub fn l2_lookup(ctx: &crate::context::ShardCtx, key: u128) -> Option<Arc<super::store::Entry>> {
    let cache = &ctx.cache;
    let found = cache.store(Tier::L2).fresh(key, &cache.epochs);
    let tier = &ctx.stats.cache_tiers[Tier::L2 as usize];
    tier.stale.set(cache.store(Tier::L2).stale());
    tier.entries.set(cache.store(Tier::L2).entries());
    found
}

/// The owner keeps a result another shard stored.
pub fn l2_keep(ctx: &crate::context::ShardCtx, key: u128, entry: Arc<super::store::Entry>) {
    if !ctx.cache.enabled() {
        return;
    }
    ctx.cache.store(Tier::L2).insert(key, entry);
    ctx.stats.cache_tiers[Tier::L2 as usize].fills.inc();
    ctx.cache.publish(&ctx.stats);
}
