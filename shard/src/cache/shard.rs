//! One shard's part of the cache: its results, what it learned about statement shapes,
//! and the configuration in force.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::config::CacheConfig;

use super::resolve::{self, Resolved};
use super::store::Store;
use super::Epochs;

/// Resolutions kept per shard before they are all forgotten and learned again.
const MAX_RESOLUTIONS: usize = 10_000;

pub struct ShardCache {
    pub epochs: Arc<Epochs>,
    pub store: Store,
    /// (session fingerprint, statement shape) → what the catalog said.
    resolutions: RefCell<HashMap<(u64, u64), Rc<Resolved>>>,
    config: RefCell<Rc<CacheConfig>>,
    enabled: Cell<bool>,
    workers: usize,
}

impl ShardCache {
    pub fn new(config: &CacheConfig, workers: usize, epochs: Arc<Epochs>) -> ShardCache {
        ShardCache {
            epochs,
            store: Store::new(share(config, workers)),
            resolutions: RefCell::default(),
            config: RefCell::new(Rc::new(config.clone())),
            enabled: Cell::new(config.enabled),
            workers,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.get()
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

    pub fn learn(&self, session: u64, shape: u64, resolved: Resolved) {
        let mut known = self.resolutions.borrow_mut();
        if known.len() >= MAX_RESOLUTIONS {
            known.clear();
        }
        known.insert((session, shape), Rc::new(resolved));
    }

    /// Shows the store's size in the shard's counters.
    pub fn publish(&self, stats: &crate::stats::ShardStats) {
        stats.cache_entries.set(self.store.entries());
        stats.cache_bytes.set(self.store.bytes());
        stats.cache_evictions.set(self.store.evictions());
    }

    /// A reloaded configuration: the new memory share, and table overrides applied from
    /// the next resolution on (what was learned under the old ones is forgotten).
    pub fn apply_config(&self, config: &CacheConfig) {
        self.store.set_capacity(share(config, self.workers));
        if !config.enabled {
            self.store.clear();
        }
        self.resolutions.borrow_mut().clear();
        self.enabled.set(config.enabled);
        *self.config.borrow_mut() = Rc::new(config.clone());
    }
}

/// This shard's share of `max_memory_mb`, in bytes.
fn share(config: &CacheConfig, workers: usize) -> u64 {
    config.max_memory_mb * 1024 * 1024 / workers.max(1) as u64
}
