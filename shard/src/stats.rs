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
    /// For gauges: the value now.
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One result-cache tier's counters on one shard.
#[derive(Default, Debug)]
pub struct CacheTierStats {
    pub hits: Counter,
    pub misses: Counter,
    pub fills: Counter,
    /// Entries found stale (a table they read was written) and dropped.
    pub stale: Counter,
    /// Gauges: the tier's store now, and entries pushed out by memory pressure so far.
    pub entries: Counter,
    pub bytes: Counter,
    pub evictions: Counter,
}

/// One shard's counters, padded so two shards never share a cache line.
#[repr(align(128))]
#[derive(Default, Debug)]
pub struct ShardStats {
    pub clients_accepted: Counter,
    pub clients_closed: Counter,
    pub clients_rejected: Counter,
    /// Idle clients parked (see `dormant`), and parked clients woken again.
    pub clients_parked: Counter,
    pub clients_woken: Counter,
    pub queries: Counter,
    /// Result cache: lookups that went to the server, read-only statements that may not
    /// be cached, answers stored, answers not stored because a write raced them,
    /// invalidations applied by this shard's writers; and each tier's own counters
    /// (`CACHE_TIERS`: L1, this shard's part of L2, L3).
    pub cache_misses: Counter,
    pub cache_uncacheable: Counter,
    pub cache_fills: Counter,
    pub cache_fills_discarded: Counter,
    pub cache_invalidations: Counter,
    pub cache_tiers: [CacheTierStats; 3],
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
    /// Statements completed, by the server's command tag: reads (SELECT, SHOW, FETCH…).
    pub statements_read: Counter,
    /// Statements completed that change data, schema or settings (everything else).
    pub statements_write: Counter,
    /// From a client's request to the ReadyForQuery that answers it.
    pub query_duration: Histogram,
    /// Time a client waited for a server connection (0 when one was idle).
    pub pool_acquire: Histogram,
    /// Failed logins by `session::failures::AuthFailure` (its index).
    pub auth_failures_by_reason: [Counter; crate::session::failures::AuthFailure::ALL.len()],
    /// Failed logins answered late because their address kept failing.
    pub auth_delayed: Counter,
    /// `auth_query` answers taken from the cache.
    pub auth_query_hits: Counter,
    /// `auth_query` lookups run on a server.
    pub auth_query_lookups: Counter,
    /// `auth_query` lookups that got no answer (no node, login or query failed).
    pub auth_query_errors: Counter,
    /// Sessions the proxy ended at a limit, by `engine::cut::Cut` (its index).
    pub clients_cut: [Counter; 5],
    /// Bytes of partly received client messages held right now (a gauge).
    pub message_memory_bytes: Counter,
    /// Units waiting in the switchover buffer right now (a gauge).
    pub buffered_units: Counter,
    /// Units that found the switchover buffer full (`failover.buffer_max`).
    pub buffer_overflows: Counter,
    /// Units that waited `failover.write_timeout_secs` for a primary in vain.
    pub buffer_timeouts: Counter,
    /// Units whose server connection was lost mid-way while the session went on.
    pub units_lost: Counter,
    /// Units that started over on another connection after theirs was dead on arrival.
    pub units_started_over: Counter,
    /// Pooled-mode logins welcomed without a server connection.
    pub logins_without_server: Counter,
    /// Lost units the proxy set out to replay on a new connection.
    pub replays_attempted: Counter,
    /// Replays that reproduced what the client had and finished the unit.
    pub replays_succeeded: Counter,
    /// Lost units not replayed, or replays given up, by `engine::replay::Refusal` (its
    /// index).
    pub replays_refused: [Counter; 7],
}

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
pub const BUCKET_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;

/// A latency histogram with fixed buckets, written by one shard. Each bucket also keeps
/// the sum of its samples, so an exporter can reproduce both the bucket counts and the
/// total exactly.
#[derive(Default, Debug)]
pub struct Histogram {
    counts: [Counter; BUCKETS],
    sums_us: [Counter; BUCKETS],
}

impl Histogram {
    #[inline]
    pub fn record_us(&self, us: u64) {
        let i = BUCKET_BOUNDS_US.partition_point(|&bound| bound < us);
        self.counts[i].inc();
        self.sums_us[i].add(us);
    }

    /// (count, sum in µs) per bucket, the last one being +Inf.
    pub fn read(&self) -> [(u64, u64); BUCKETS] {
        std::array::from_fn(|i| (self.counts[i].get(), self.sums_us[i].get()))
    }
}

impl ShardStats {
    /// Counts a completed statement by its CommandComplete tag (e.g. `SELECT 1`,
    /// `INSERT 0 1`).
    #[inline]
    pub fn count_statement(&self, tag: &[u8]) {
        if is_read_tag(tag) {
            self.statements_read.inc();
        } else {
            self.statements_write.inc();
        }
    }

    pub fn clients_active(&self) -> u64 {
        self.clients_accepted
            .get()
            .saturating_sub(self.clients_closed.get())
    }
}

/// Command tags of statements that only read. (`COPY n` is either direction and counts
/// as a write.)
fn is_read_tag(tag: &[u8]) -> bool {
    let word = tag.split(|&b| b == b' ' || b == 0).next().unwrap_or(b"");
    matches!(word, b"SELECT" | b"SHOW" | b"FETCH" | b"MOVE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::default();
        for us in [0, 100, 101, 10_000_000, 10_000_001] {
            h.record_us(us);
        }
        let read = h.read();
        assert_eq!(read[0], (2, 100));
        assert_eq!(read[1], (1, 101));
        assert_eq!(read[BUCKETS - 2], (1, 10_000_000));
        assert_eq!(read[BUCKETS - 1], (1, 10_000_001));
    }

    #[test]
    fn statements_are_read_or_write_by_tag() {
        let s = ShardStats::default();
        for tag in [
            &b"SELECT 1\0"[..],
            b"SHOW",
            b"FETCH 10",
            b"INSERT 0 1",
            b"UPDATE 3",
            b"CREATE TABLE",
            b"SET",
        ] {
            s.count_statement(tag);
        }
        assert_eq!(s.statements_read.get(), 3);
        assert_eq!(s.statements_write.get(), 4);
    }
}
