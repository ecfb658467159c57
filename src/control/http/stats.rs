//! What the admin server did, for `/metrics` and the Prometheus page: enough to see a
//! flood being shed instead of piling up.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    /// Connections accepted, refused ones included.
    pub connections_accepted: Counter,
    /// Connections past `max_connections` that were not a `/health*` probe.
    pub connections_refused: Counter,
    /// Connections open now (refused ones not counted).
    pub connections_open: Gauge,
    /// Connections closed because the client was silent too long (read or idle timeout).
    pub connections_timed_out: Counter,
    /// Responses sent, error responses included.
    pub requests_served: Counter,
    /// Requests answered 503 because every worker was busy and the queue full.
    pub requests_rejected_queue_full: Counter,
    /// Requests answered 503 because they waited longer than `queue_timeout_ms`.
    pub requests_rejected_expired: Counter,
    /// Queued requests dropped unrun because their client had gone.
    pub requests_skipped: Counter,
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
