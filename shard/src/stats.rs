//! Per-shard counters. Each shard writes only its own block (plain load+store, no locked
//! instructions: a block has a single writer); the control thread reads them all for the
//! admin API and metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A counter written by one shard and read by anyone.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One shard's counters, padded so two shards never share a cache line.
#[repr(align(128))]
#[derive(Default, Debug)]
pub struct ShardStats {
    pub clients_accepted: Counter,
    pub clients_closed: Counter,
    pub clients_rejected: Counter,
    pub queries: Counter,
    pub bytes_from_clients: Counter,
    pub bytes_to_clients: Counter,
    pub backends_created: Counter,
    pub backends_closed: Counter,
    pub backend_connect_errors: Counter,
    pub pool_waits: Counter,
    pub pool_wait_micros: Counter,
    pub pool_timeouts: Counter,
    pub cancels_received: Counter,
    pub cancels_forwarded: Counter,
    pub protocol_errors: Counter,
    pub auth_failures: Counter,
}

impl ShardStats {
    pub fn clients_active(&self) -> u64 {
        self.clients_accepted
            .get()
            .saturating_sub(self.clients_closed.get())
    }
}
