//! A pool's connection budget, shared by every shard. `max_pool_size` caps the server
//! connections to one (node, database, user) across the whole proxy, not per worker: the
//! kernel spreads clients over the shards unevenly, and a fixed per-shard share made a
//! client wait on one shard while the other shard's connections sat idle.
//!
//! Each shard still owns its connections (a shard never uses another's); only the right
//! to open one is shared. Each shard publishes how many of its clients wait for the key
//! in a slot of its own (one writer per cache line); on its housekeeping tick a shard
//! reads the others' slots and closes connections it left unused while they wait. The
//! shared count is touched only when a connection opens or closes; a release reads it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A counter alone on its cache line, so one shard writing it never slows another
/// reading its neighbour.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicUsize);

/// The budget of one pool key.
#[derive(Debug)]
pub struct Budget {
    max: AtomicUsize,
    /// Connections that exist or are being opened, on every shard.
    used: Padded,
    /// Clients waiting for a connection, per shard (each slot written by its shard only).
    waiting: Box<[Padded]>,
}

impl Budget {
    pub fn new(max: usize, shards: usize) -> Self {
        Budget {
            max: AtomicUsize::new(max.max(1)),
            used: Padded::default(),
            waiting: (0..shards.max(1)).map(|_| Padded::default()).collect(),
        }
    }

    /// Takes the right to open one connection, if the budget has room.
    pub fn try_take(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.used
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < max).then_some(used + 1)
            })
            .is_ok()
    }

    /// A connection closed (or an open failed): its place is free.
    pub fn give_back(&self) {
        let _ = self
            .used
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_sub(1)
            });
    }

    /// More connections exist than a reload now allows.
    pub fn over(&self) -> bool {
        self.used.0.load(Ordering::Acquire) > self.max.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max.max(1), Ordering::Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.0.load(Ordering::Acquire)
    }

    /// `shard` now has `clients` waiting for this key.
    pub fn set_waiting(&self, shard: usize, clients: usize) {
        if let Some(slot) = self.waiting.get(shard) {
            slot.0.store(clients, Ordering::Release);
        }
    }

    /// Clients waiting on every shard but `shard`.
    pub fn waiting_elsewhere(&self, shard: usize) -> usize {
        self.waiting
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != shard)
            .map(|(_, slot)| slot.0.load(Ordering::Acquire))
            .sum()
    }
}

/// (node address, database, server user): what a budget is shared by.
pub type BudgetKey = (String, String, String);

/// Every pool key's budget, found by the shards when they create a pool.
#[derive(Debug, Default)]
pub struct Budgets {
    shards: usize,
    map: Mutex<HashMap<BudgetKey, Arc<Budget>>>,
}

impl Budgets {
    pub fn new(shards: usize) -> Self {
        Budgets {
            shards,
            map: Mutex::default(),
        }
    }

    /// The budget for `key`, created with `max` if no shard has one yet. Budgets no pool
    /// holds any more are dropped here, so clients naming databases at random cannot
    /// grow the map without bound.
    pub fn get(&self, key: BudgetKey, max: usize) -> Arc<Budget> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = map.get(&key) {
            return budget.clone();
        }
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        let budget = Arc::new(Budget::new(max, self.shards));
        map.insert(key, budget.clone());
        budget
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_caps_connections_across_takers() {
        let budget = Budget::new(2, 1);
        assert!(budget.try_take());
        assert!(budget.try_take());
        assert!(!budget.try_take(), "a third connection beyond max");
        budget.give_back();
        assert!(budget.try_take());
        budget.set_max(1);
        assert!(budget.over());
        budget.give_back();
        assert!(!budget.over());
        budget.give_back();
        budget.give_back();
        assert_eq!(budget.used(), 0, "never below zero");
    }

    #[test]
    fn waiting_elsewhere_counts_other_shards_clients() {
        let budget = Budget::new(1, 3);
        budget.set_waiting(0, 2);
        budget.set_waiting(2, 1);
        assert_eq!(budget.waiting_elsewhere(0), 1);
        assert_eq!(budget.waiting_elsewhere(1), 3);
        assert_eq!(budget.waiting_elsewhere(2), 2);
        budget.set_waiting(0, 0);
        budget.set_waiting(2, 0);
        assert_eq!(budget.waiting_elsewhere(1), 0);
        budget.set_waiting(7, 5);
        assert_eq!(budget.waiting_elsewhere(0), 0, "no such shard");
    }

    #[test]
    fn shards_share_one_budget_per_key_and_unused_ones_go() {
        let budgets = Budgets::new(2);
        let key = || ("n".to_string(), "db".to_string(), "u".to_string());
        let a = budgets.get(key(), 3);
        let b = budgets.get(key(), 3);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        for i in 0..200 {
            budgets.get(("n".into(), format!("db{i}"), "u".into()), 1);
        }
        assert!(budgets.len() < 200, "unheld budgets are pruned");
    }
}
