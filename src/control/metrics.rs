//! Metrics export. Shards count into their own single-writer blocks (no cross-core
//! traffic on the query path); this module sums them on the control thread and feeds
//! them to a `metrics` recorder from `metrics-exporter-prometheus`, which renders the
//! standard Prometheus text format. A background loop syncs once a second so histogram
//! samples never pile up between scrapes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use helios_shard::control::{Detail, PoolReport};
use helios_shard::engine::cut::Cut;
use helios_shard::session::failures::AuthFailure;
use helios_shard::stats::{Histogram, ShardStats, BUCKET_BOUNDS_US};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde_json::{json, Value};

use super::Control;

const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Per-bucket (count, sum in µs) readings, the last bucket being +Inf.
type Reading = [(u64, u64); BUCKET_BOUNDS_US.len() + 1];

pub struct Exporter {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Histogram readings already fed to the recorder, per shard: (query, acquire).
    fed: Mutex<Vec<(Reading, Reading)>>,
}

impl Exporter {
    pub fn new(shards: usize) -> Exporter {
        let bounds: Vec<f64> = BUCKET_BOUNDS_US.iter().map(|&us| us as f64 / 1e6).collect();
        let recorder = PrometheusBuilder::new()
            .set_buckets(&bounds)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        let empty = [(0, 0); BUCKET_BOUNDS_US.len() + 1];
        Exporter {
            recorder,
            handle,
            fed: Mutex::new(vec![(empty, empty); shards]),
        }
    }
}

/// The HELP text of every metric.
fn describe() {
    let counters = [
        ("heliosdb_proxy_connections_total", "Client connections accepted"),
        ("heliosdb_proxy_connections_closed", "Client connections closed"),
        ("heliosdb_proxy_connections_rejected_total", "Client connections refused at max_client_connections"),
        ("heliosdb_proxy_queries_total", "Client requests (Query, Execute, FunctionCall messages)"),
        ("heliosdb_proxy_statements_total", "Statements completed, by the server's command tag: read (SELECT, SHOW, FETCH, MOVE) or write (everything else)"),
        ("heliosdb_proxy_bytes_received_total", "Bytes received from clients"),
        ("heliosdb_proxy_bytes_sent_total", "Bytes sent to clients"),
        ("heliosdb_proxy_failovers_total", "Failovers completed (a new primary published)"),
        ("heliosdb_proxy_buffer_timeouts_total", "Units that left the switchover buffer without a primary, by reason: timeout (failover.write_timeout_secs) or full (failover.buffer_max)"),
        ("heliosdb_proxy_cache_hits_total", "Result cache lookups answered without a server, by tier"),
        ("heliosdb_proxy_cache_misses_total", "Result cache lookups a tier could not answer, by tier"),
        ("heliosdb_proxy_cache_fills_total", "Results stored in the cache, by tier"),
        ("heliosdb_proxy_cache_wal_commits_total", "Committed transactions read from the primary's WAL whose tables were invalidated, by database"),
        ("heliosdb_proxy_cache_stale_total", "Cached results found stale (a table they read was written) and dropped, by tier"),
        ("heliosdb_proxy_cache_lookups_missed_total", "Lookups of cacheable statements that no tier answered (the statement went to the server)"),
        ("heliosdb_proxy_cache_results_stored_total", "Server answers stored in the cache"),
        ("heliosdb_proxy_cache_fills_discarded_total", "Results not stored because a write to a table they read raced them"),
        ("heliosdb_proxy_cache_uncacheable_total", "Read-only statements the cache may not keep (volatile functions, views over system catalogs, temporary tables, …)"),
        ("heliosdb_proxy_cache_evictions_total", "Cached results pushed out by the memory bound, by tier"),
        ("heliosdb_proxy_cache_invalidations_total", "Cache invalidations (writes through the proxy, admin requests)"),
        ("heliosdb_proxy_units_started_over_total", "Units whose fresh server connection was dead on arrival (a FATAL before any answer): they ran again on another one, unseen by the client"),
        ("heliosdb_proxy_logins_without_server_total", "Pooled-mode logins welcomed from a remembered welcome, without a server connection"),
        ("heliosdb_proxy_clients_parked_total", "Idle clients parked off their tasks (limits.park_idle_client_ms)"),
        ("heliosdb_proxy_clients_woken_total", "Parked clients woken again (they spoke, left, timed out, or the proxy drained)"),
        ("heliosdb_proxy_replays_attempted_total", "Units whose server connection was lost and that the proxy set out to replay on a new one (failover.replay)"),
        ("heliosdb_proxy_replays_succeeded_total", "Replays that reproduced every byte the client had already received (or had nothing to reproduce), and COMMITs lost in flight that the new primary says committed"),
        ("heliosdb_proxy_replays_refused_total", "Lost units not replayed or replays given up, by reason: diverged (40001), not_committed (40001: a COMMIT lost in flight that the new primary says did not commit), unknown_outcome (08007), journal_full, session_state, no_primary, server_refused"),
        ("heliosdb_proxy_units_lost_total", "Units whose server connection was lost mid-way (the client got 08006 or 08007 and its session went on)"),
        ("heliosdb_proxy_server_connections_created_total", "Server connections opened"),
        ("heliosdb_proxy_server_connections_closed_total", "Server connections closed"),
        ("heliosdb_proxy_server_connect_errors_total", "Failed attempts to open a server connection"),
        ("heliosdb_proxy_pool_waits_total", "Times a client queued for a server connection"),
        ("heliosdb_proxy_pool_timeouts_total", "Queued clients that gave up after acquire_timeout_ms"),
        ("heliosdb_proxy_cancels_received_total", "Cancel requests received"),
        ("heliosdb_proxy_cancels_forwarded_total", "Cancel requests forwarded to a server"),
        ("heliosdb_proxy_protocol_errors_total", "Clients disconnected for protocol violations"),
        ("heliosdb_proxy_auth_failures_total", "Failed client logins"),
        ("heliosdb_proxy_routing_decisions_total", "Units of work routed, by node and reason (read/write splitting)"),
        ("heliosdb_proxy_auth_failures_by_reason_total", "Failed client logins by reason: wrong_password, unknown_user, no_certificate, certificate_mismatch, no_encryption, no_hba_entry, hba_reject, password_expired, no_password"),
        ("heliosdb_proxy_auth_delayed_total", "Failed logins answered late because their address kept failing"),
        ("heliosdb_proxy_auth_query_total", "auth_query answers by result: cache_hit, lookup (run on a server), error (no answer)"),
        ("heliosdb_proxy_clients_cut_total", "Client sessions the proxy ended at a limit, by reason (the timeouts, message_memory)"),
        ("heliosdb_proxy_admin_connections_total", "Admin API connections accepted"),
        ("heliosdb_proxy_admin_connections_refused_total", "Admin API connections past admin_api.max_connections that were not a /health probe"),
        ("heliosdb_proxy_admin_connections_timed_out_total", "Admin API connections closed by the read or idle timeout"),
        ("heliosdb_proxy_admin_requests_total", "Admin API responses sent"),
        ("heliosdb_proxy_admin_requests_rejected_total", "Admin API requests answered 503 unrun, by reason: queue_full or expired (waited past admin_api.queue_timeout_ms)"),
        ("heliosdb_proxy_allocations_total", "Heap allocations (and reallocations) made by the process, every thread"),
        ("heliosdb_proxy_allocated_bytes_total", "Bytes those heap allocations asked for"),
        ("heliosdb_proxy_admin_requests_skipped_total", "Queued admin API requests dropped unrun because the client had gone"),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
    }
    let gauges = [
        (
            "heliosdb_proxy_cache_wal_streaming",
            "1 while the WAL follower of the database streams (results of it may be cached), else 0",
        ),
        (
            "heliosdb_proxy_cache_wal_lag_bytes",
            "WAL the primary has reported that the follower has not applied yet, by database",
        ),
        (
            "heliosdb_proxy_cache_wal_lag_seconds",
            "From the primary sending a commit to its invalidation applied (the last commit), by database",
        ),
        (
            "heliosdb_proxy_cache_entries",
            "Results in the cache now, by tier",
        ),
        (
            "heliosdb_proxy_cache_bytes",
            "Memory held by cached results now, by tier",
        ),
        (
            "heliosdb_proxy_connections_active",
            "Client connections open now",
        ),
        (
            "heliosdb_proxy_uptime_seconds",
            "Seconds since the proxy started",
        ),
        (
            "heliosdb_proxy_heap_in_use_bytes",
            "Heap bytes allocated and not yet freed, every thread (allocator overhead aside)",
        ),
        (
            "heliosdb_proxy_message_memory_bytes",
            "Bytes of partly received client messages held now (limits.message_memory per worker)",
        ),
        (
            "heliosdb_proxy_admin_connections_open",
            "Admin API connections open now (within admin_api.max_connections)",
        ),
        (
            "heliosdb_proxy_paused",
            "1 while PAUSEd from the admin console",
        ),
        (
            "heliosdb_proxy_pool_connections_active",
            "Server connections lent to clients (or being opened), per node",
        ),
        (
            "heliosdb_proxy_pool_connections_idle",
            "Idle server connections in the pools, per node",
        ),
        (
            "heliosdb_proxy_pool_connections_waiting",
            "Clients waiting for a server connection, per node",
        ),
        (
            "heliosdb_proxy_node_healthy",
            "1 when the node passes its health checks",
        ),
        (
            "heliosdb_proxy_primary",
            "1 for the node tracked as primary, 0 for the others",
        ),
        (
            "heliosdb_proxy_node_fenced",
            "1 while the node is fenced (declared down as primary, or a former primary still writable)",
        ),
        (
            "heliosdb_proxy_writable_nodes",
            "Nodes reporting themselves writable (more than 1: two primaries)",
        ),
        (
            "heliosdb_proxy_buffered_units",
            "Units waiting in the switchover buffer for a primary",
        ),
        (
            "heliosdb_proxy_clients_parked",
            "Idle clients parked right now: no task, no socket state, only their session",
        ),
        (
            "heliosdb_proxy_node_enabled",
            "1 when the node is enabled and not draining",
        ),
        (
            "heliosdb_proxy_node_latency_seconds",
            "Round trip of the node's last good health check",
        ),
        (
            "heliosdb_proxy_node_check_failures",
            "Consecutive failed health checks of the node",
        ),
        (
            "heliosdb_proxy_node_replication_lag_bytes",
            "WAL bytes a standby or replica is behind the primary",
        ),
        (
            "heliosdb_proxy_node_replication_lag_seconds",
            "Seconds since a standby or replica replayed its last transaction (0 when caught up)",
        ),
    ];
    for (name, help) in gauges {
        describe_gauge!(name, help);
    }
    describe_histogram!(
        "heliosdb_proxy_query_duration_seconds",
        metrics::Unit::Seconds,
        "From a client's request to the ReadyForQuery that answers it"
    );
    describe_histogram!(
        "heliosdb_proxy_failover_duration_seconds",
        metrics::Unit::Seconds,
        "From a primary declared lost to the new one published"
    );
    describe_histogram!(
        "heliosdb_proxy_pool_acquire_duration_seconds",
        metrics::Unit::Seconds,
        "Time clients waited for a server connection"
    );
}

/// Keeps the recorder current in the background until `stop` is set.
pub fn spawn_sync_loop(
    control: Arc<Control>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(SYNC_EVERY);
                sync(&control);
            }
        })
}

/// The Prometheus text page (`GET /metrics/prometheus`).
pub fn prometheus(control: &Control) -> String {
    sync(control);
    control.metrics.handle.render()
}

/// Brings every metric up to date.
fn sync(control: &Control) {
    let exporter = &control.metrics;
    let mut fed = exporter.fed.lock().unwrap_or_else(|e| e.into_inner());
    let links = control.shard_links();
    let totals = Totals::sum(links.iter().map(|l| &*l.stats));
    let snapshots = control.gather(Detail::default());
    let nodes = control.nodes();
    metrics::with_local_recorder(&exporter.recorder, || {
        counter!("heliosdb_proxy_connections_total").absolute(totals.accepted);
        counter!("heliosdb_proxy_connections_closed").absolute(totals.closed);
        gauge!("heliosdb_proxy_connections_active").set(totals.active as f64);
        counter!("heliosdb_proxy_connections_rejected_total").absolute(totals.rejected);
        counter!("heliosdb_proxy_queries_total").absolute(totals.queries);
        counter!("heliosdb_proxy_statements_total", "type" => "read").absolute(totals.reads);
        counter!("heliosdb_proxy_statements_total", "type" => "write").absolute(totals.writes);
        counter!("heliosdb_proxy_bytes_received_total").absolute(totals.bytes_in);
        counter!("heliosdb_proxy_bytes_sent_total").absolute(totals.bytes_out);
        let (failovers, primary, _) = control.failover_figures();
        counter!("heliosdb_proxy_failovers_total").absolute(failovers);
        for duration in control.take_failover_durations() {
            histogram!("heliosdb_proxy_failover_duration_seconds").record(duration.as_secs_f64());
        }
        counter!("heliosdb_proxy_buffer_timeouts_total", "reason" => "timeout")
            .absolute(totals.buffer_timeouts);
        counter!("heliosdb_proxy_buffer_timeouts_total", "reason" => "full")
            .absolute(totals.buffer_overflows);
        counter!("heliosdb_proxy_units_lost_total").absolute(totals.units_lost);
        let cache = super::cache::CacheTotals::sum(control);
        for (tier, n) in helios_shard::cache::shard::Tier::ALL
            .iter()
            .zip(&cache.tiers)
        {
            let tier = tier.label();
            counter!("heliosdb_proxy_cache_hits_total", "tier" => tier).absolute(n.hits);
            counter!("heliosdb_proxy_cache_misses_total", "tier" => tier).absolute(n.misses);
            counter!("heliosdb_proxy_cache_fills_total", "tier" => tier).absolute(n.fills);
            counter!("heliosdb_proxy_cache_evictions_total", "tier" => tier).absolute(n.evictions);
            counter!("heliosdb_proxy_cache_stale_total", "tier" => tier).absolute(n.invalidations);
            gauge!("heliosdb_proxy_cache_entries", "tier" => tier).set(n.entries as f64);
            gauge!("heliosdb_proxy_cache_bytes", "tier" => tier).set(n.bytes as f64);
        }
        counter!("heliosdb_proxy_cache_lookups_missed_total").absolute(cache.misses);
        counter!("heliosdb_proxy_cache_results_stored_total").absolute(cache.fills);
        counter!("heliosdb_proxy_cache_fills_discarded_total").absolute(cache.fills_discarded);
        counter!("heliosdb_proxy_cache_uncacheable_total").absolute(cache.uncacheable);
        counter!("heliosdb_proxy_cache_invalidations_total").absolute(cache.invalidations);
        for (database, follow) in control.cache_epochs.wal_follows() {
            use std::sync::atomic::Ordering::SeqCst;
            gauge!("heliosdb_proxy_cache_wal_streaming", "database" => database.clone())
                .set(if follow.ready.load(SeqCst) { 1.0 } else { 0.0 });
            gauge!("heliosdb_proxy_cache_wal_lag_bytes", "database" => database.clone())
                .set(follow.lag_bytes.load(SeqCst) as f64);
            gauge!("heliosdb_proxy_cache_wal_lag_seconds", "database" => database.clone())
                .set(follow.lag_micros.load(SeqCst) as f64 / 1e6);
            counter!("heliosdb_proxy_cache_wal_commits_total", "database" => database)
                .absolute(follow.commits.load(SeqCst));
        }
        counter!("heliosdb_proxy_replays_attempted_total").absolute(totals.replays_attempted);
        counter!("heliosdb_proxy_replays_succeeded_total").absolute(totals.replays_succeeded);
        for (refusal, count) in helios_shard::engine::replay::Refusal::ALL
            .iter()
            .zip(totals.replays_refused)
        {
            counter!("heliosdb_proxy_replays_refused_total", "reason" => refusal.label())
                .absolute(count);
        }
        counter!("heliosdb_proxy_logins_without_server_total")
            .absolute(totals.logins_without_server);
        counter!("heliosdb_proxy_units_started_over_total").absolute(totals.units_started_over);
        counter!("heliosdb_proxy_clients_parked_total").absolute(totals.parked);
        counter!("heliosdb_proxy_clients_woken_total").absolute(totals.woken);
        gauge!("heliosdb_proxy_clients_parked")
            .set(totals.parked.saturating_sub(totals.woken) as f64);
        gauge!("heliosdb_proxy_buffered_units").set(totals.buffered as f64);
        gauge!("heliosdb_proxy_writable_nodes").set(
            nodes
                .iter()
                .filter(|n| super::failover::writable(n))
                .count() as f64,
        );
        counter!("heliosdb_proxy_server_connections_created_total").absolute(totals.created);
        counter!("heliosdb_proxy_server_connections_closed_total").absolute(totals.backend_closed);
        counter!("heliosdb_proxy_server_connect_errors_total").absolute(totals.connect_errors);
        counter!("heliosdb_proxy_pool_waits_total").absolute(totals.waits);
        counter!("heliosdb_proxy_pool_timeouts_total").absolute(totals.timeouts);
        counter!("heliosdb_proxy_cancels_received_total").absolute(totals.cancels);
        counter!("heliosdb_proxy_cancels_forwarded_total").absolute(totals.cancels_forwarded);
        counter!("heliosdb_proxy_protocol_errors_total").absolute(totals.protocol_errors);
        counter!("heliosdb_proxy_auth_failures_total").absolute(totals.auth_failures);
        for (reason, count) in AuthFailure::ALL.iter().zip(totals.auth_by_reason) {
            counter!("heliosdb_proxy_auth_failures_by_reason_total", "reason" => reason.label())
                .absolute(count);
        }
        counter!("heliosdb_proxy_auth_delayed_total").absolute(totals.auth_delayed);
        for (result, count) in [
            ("cache_hit", totals.auth_query_hits),
            ("lookup", totals.auth_query_lookups),
            ("error", totals.auth_query_errors),
        ] {
            counter!("heliosdb_proxy_auth_query_total", "result" => result).absolute(count);
        }
        for (cut, count) in Cut::ALL.iter().zip(totals.cut) {
            counter!("heliosdb_proxy_clients_cut_total", "reason" => cut.label()).absolute(count);
        }
        gauge!("heliosdb_proxy_message_memory_bytes").set(totals.message_memory as f64);
        gauge!("heliosdb_proxy_uptime_seconds").set(control.uptime().as_secs_f64());
        let heap = crate::alloc_count::totals();
        counter!("heliosdb_proxy_allocations_total").absolute(heap.count);
        counter!("heliosdb_proxy_allocated_bytes_total").absolute(heap.bytes);
        gauge!("heliosdb_proxy_heap_in_use_bytes").set(heap.in_use as f64);
        gauge!("heliosdb_proxy_paused").set(f64::from(u8::from(control.paused())));
        admin_http(&control.admin_http);

        for ((node, reason), count) in routing_decisions(&snapshots) {
            counter!(
                "heliosdb_proxy_routing_decisions_total",
                "node" => node,
                "reason" => reason
            )
            .absolute(count);
        }
        let pools: Vec<&PoolReport> = snapshots.iter().flat_map(|s| s.pools.iter()).collect();
        for node in &nodes {
            let label = node.address.clone();
            let mine = pools.iter().filter(|p| p.node == node.address);
            let (mut active, mut idle, mut waiting) = (0usize, 0usize, 0usize);
            for p in mine {
                active += p.active();
                idle += p.idle;
                waiting += p.waiting;
            }
            gauge!("heliosdb_proxy_pool_connections_active", "node" => label.clone())
                .set(active as f64);
            gauge!("heliosdb_proxy_pool_connections_idle", "node" => label.clone())
                .set(idle as f64);
            gauge!("heliosdb_proxy_pool_connections_waiting", "node" => label.clone())
                .set(waiting as f64);
            let h = &node.health;
            gauge!("heliosdb_proxy_node_healthy", "node" => label.clone())
                .set(f64::from(u8::from(h.healthy)));
            gauge!("heliosdb_proxy_primary", "node" => label.clone()).set(f64::from(u8::from(
                primary.as_deref() == Some(node.address.as_str()),
            )));
            gauge!("heliosdb_proxy_node_fenced", "node" => label.clone())
                .set(f64::from(u8::from(node.fenced)));
            gauge!("heliosdb_proxy_node_enabled", "node" => label.clone())
                .set(f64::from(u8::from(node.enabled && !node.draining)));
            gauge!("heliosdb_proxy_node_latency_seconds", "node" => label.clone())
                .set(h.latency_ms / 1000.0);
            gauge!("heliosdb_proxy_node_check_failures", "node" => label.clone())
                .set(f64::from(h.failure_count));
            if let Some(bytes) = h.replication_lag_bytes {
                gauge!("heliosdb_proxy_node_replication_lag_bytes", "node" => label.clone())
                    .set(bytes as f64);
            }
            if let Some(secs) = h.replication_lag_seconds {
                gauge!("heliosdb_proxy_node_replication_lag_seconds", "node" => label.clone())
                    .set(secs);
            }
        }

        for (link, (query_fed, acquire_fed)) in links.iter().zip(fed.iter_mut()) {
            feed(
                &link.stats.query_duration,
                query_fed,
                "heliosdb_proxy_query_duration_seconds",
            );
            feed(
                &link.stats.pool_acquire,
                acquire_fed,
                "heliosdb_proxy_pool_acquire_duration_seconds",
            );
        }
    });
    exporter.handle.run_upkeep();
}

/// The admin server's own counters.
fn admin_http(stats: &super::http::Stats) {
    counter!("heliosdb_proxy_admin_connections_total").absolute(stats.connections_accepted.get());
    counter!("heliosdb_proxy_admin_connections_refused_total")
        .absolute(stats.connections_refused.get());
    counter!("heliosdb_proxy_admin_connections_timed_out_total")
        .absolute(stats.connections_timed_out.get());
    gauge!("heliosdb_proxy_admin_connections_open").set(stats.connections_open.get() as f64);
    counter!("heliosdb_proxy_admin_requests_total").absolute(stats.requests_served.get());
    counter!("heliosdb_proxy_admin_requests_rejected_total", "reason" => "queue_full")
        .absolute(stats.requests_rejected_queue_full.get());
    counter!("heliosdb_proxy_admin_requests_rejected_total", "reason" => "expired")
        .absolute(stats.requests_rejected_expired.get());
    counter!("heliosdb_proxy_admin_requests_skipped_total").absolute(stats.requests_skipped.get());
}

/// Feeds the samples a shard histogram gained since the last sync: each bucket's new
/// samples are recorded at their mean, which lands them in the same bucket and keeps the
/// histogram's sum exact.
fn feed(source: &Histogram, fed: &mut Reading, name: &'static str) {
    let now = source.read();
    let target = histogram!(name);
    for (i, (&(count, sum), prev)) in now.iter().zip(fed.iter()).enumerate() {
        let new = count.saturating_sub(prev.0);
        if new == 0 {
            continue;
        }
        let mean_us = sum.saturating_sub(prev.1) as f64 / new as f64;
        // Keep the mean strictly inside bucket i despite rounding at the edges.
        let lower = if i == 0 {
            0.0
        } else {
            BUCKET_BOUNDS_US[i - 1] as f64
        };
        let mean_us = if i > 0 && mean_us <= lower {
            lower + 0.5
        } else {
            mean_us
        };
        target.record_many(mean_us / 1e6, new as usize);
    }
    *fed = now;
}

/// Routing decisions summed over shards, by (node, reason).
fn routing_decisions(
    snapshots: &[helios_shard::control::ShardSnapshot],
) -> std::collections::BTreeMap<(String, &'static str), u64> {
    let mut sums = std::collections::BTreeMap::new();
    for (node, reason, count) in snapshots.iter().flat_map(|s| s.routes.iter()) {
        *sums.entry((node.clone(), *reason)).or_insert(0) += count;
    }
    sums
}

/// Counters summed over every shard.
#[derive(Default)]
struct Totals {
    accepted: u64,
    closed: u64,
    active: u64,
    rejected: u64,
    queries: u64,
    reads: u64,
    writes: u64,
    bytes_in: u64,
    bytes_out: u64,
    buffered: u64,
    buffer_timeouts: u64,
    buffer_overflows: u64,
    units_lost: u64,
    units_started_over: u64,
    logins_without_server: u64,
    parked: u64,
    woken: u64,
    replays_attempted: u64,
    replays_succeeded: u64,
    replays_refused: [u64; 7],
    created: u64,
    backend_closed: u64,
    connect_errors: u64,
    waits: u64,
    timeouts: u64,
    cancels: u64,
    cancels_forwarded: u64,
    protocol_errors: u64,
    auth_failures: u64,
    /// Sessions ended at a limit, by `Cut` index.
    cut: [u64; 5],
    auth_by_reason: [u64; AuthFailure::ALL.len()],
    auth_delayed: u64,
    auth_query_hits: u64,
    auth_query_lookups: u64,
    auth_query_errors: u64,
    message_memory: u64,
}

impl Totals {
    fn sum<'a>(stats: impl Iterator<Item = &'a ShardStats>) -> Totals {
        let mut t = Totals::default();
        for s in stats {
            t.accepted += s.clients_accepted.get();
            t.closed += s.clients_closed.get();
            t.active += s.clients_active();
            t.rejected += s.clients_rejected.get();
            t.queries += s.queries.get();
            t.reads += s.statements_read.get();
            t.writes += s.statements_write.get();
            t.bytes_in += s.bytes_from_clients.get();
            t.bytes_out += s.bytes_to_clients.get();
            t.created += s.backends_created.get();
            t.backend_closed += s.backends_closed.get();
            t.connect_errors += s.backend_connect_errors.get();
            t.waits += s.pool_waits.get();
            t.timeouts += s.pool_timeouts.get();
            t.cancels += s.cancels_received.get();
            t.cancels_forwarded += s.cancels_forwarded.get();
            t.protocol_errors += s.protocol_errors.get();
            t.auth_failures += s.auth_failures.get();
            for (sum, counter) in t.cut.iter_mut().zip(&s.clients_cut) {
                *sum += counter.get();
            }
            for (sum, counter) in t.auth_by_reason.iter_mut().zip(&s.auth_failures_by_reason) {
                *sum += counter.get();
            }
            t.auth_delayed += s.auth_delayed.get();
            t.auth_query_hits += s.auth_query_hits.get();
            t.auth_query_lookups += s.auth_query_lookups.get();
            t.auth_query_errors += s.auth_query_errors.get();
            t.message_memory += s.message_memory_bytes.get();
            t.buffered += s.buffered_units.get();
            t.buffer_timeouts += s.buffer_timeouts.get();
            t.buffer_overflows += s.buffer_overflows.get();
            t.units_lost += s.units_lost.get();
            t.units_started_over += s.units_started_over.get();
            t.logins_without_server += s.logins_without_server.get();
            t.parked += s.clients_parked.get();
            t.woken += s.clients_woken.get();
            t.replays_attempted += s.replays_attempted.get();
            t.replays_succeeded += s.replays_succeeded.get();
            for (sum, counter) in t.replays_refused.iter_mut().zip(&s.replays_refused) {
                *sum += counter.get();
            }
        }
        t
    }
}

/// `GET /metrics`: the documented JSON counters, plus the rest of the totals.
pub fn json(control: &Control) -> Value {
    let t = Totals::sum(control.shard_links().iter().map(|l| &*l.stats));
    let routing: Vec<Value> = routing_decisions(&control.gather(Detail::default()))
        .into_iter()
        .map(|((node, reason), count)| json!({"node": node, "reason": reason, "count": count}))
        .collect();
    json!({
        "connections_accepted": t.accepted,
        "connections_closed": t.closed,
        "connections_active": t.active,
        "connections_rejected": t.rejected,
        "queries_processed": t.queries,
        "statements_read": t.reads,
        "statements_write": t.writes,
        "bytes_received": t.bytes_in,
        "bytes_sent": t.bytes_out,
        "failovers": control.failover_figures().0,
        "buffered_units": t.buffered,
        "buffer_timeouts": t.buffer_timeouts,
        "buffer_overflows": t.buffer_overflows,
        "units_lost": t.units_lost,
        "units_started_over": t.units_started_over,
        "logins_without_server": t.logins_without_server,
        "clients_parked": {
            "now": t.parked.saturating_sub(t.woken),
            "parked": t.parked,
            "woken": t.woken,
        },
        "replays": {
            "attempted": t.replays_attempted,
            "succeeded": t.replays_succeeded,
            "refused": helios_shard::engine::replay::Refusal::ALL
                .iter()
                .zip(t.replays_refused)
                .map(|(refusal, n)| (refusal.label().to_string(), json!(n)))
                .collect::<serde_json::Map<_, _>>(),
        },
        "server_connections_created": t.created,
        "server_connections_closed": t.backend_closed,
        "server_connect_errors": t.connect_errors,
        "pool_waits": t.waits,
        "pool_timeouts": t.timeouts,
        "cancels_received": t.cancels,
        "cancels_forwarded": t.cancels_forwarded,
        "protocol_errors": t.protocol_errors,
        "cache": super::cache::json(control),
        "auth_failures": t.auth_failures,
        "auth_failures_by_reason": AuthFailure::ALL
            .iter()
            .zip(t.auth_by_reason)
            .map(|(reason, n)| (reason.label().to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "auth_delayed": t.auth_delayed,
        "auth_query": {
            "cache_hits": t.auth_query_hits,
            "lookups": t.auth_query_lookups,
            "errors": t.auth_query_errors,
        },
        "clients_cut": Cut::ALL
            .iter()
            .zip(t.cut)
            .map(|(cut, n)| (cut.label().to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "message_memory_bytes": t.message_memory,
        "allocations": allocations_json(),
        "uptime_seconds": control.uptime().as_secs(),
        "routing_decisions": routing,
        "admin_api": admin_json(&control.admin_http),
    })
}

/// Heap allocations since the start, every thread: with `queries_processed`, the perf
/// harness derives allocations per query.
fn allocations_json() -> Value {
    let heap = crate::alloc_count::totals();
    json!({"count": heap.count, "bytes": heap.bytes, "in_use_bytes": heap.in_use})
}

/// The admin server's counters in `GET /metrics`.
fn admin_json(stats: &super::http::Stats) -> Value {
    json!({
        "connections_accepted": stats.connections_accepted.get(),
        "connections_refused": stats.connections_refused.get(),
        "connections_timed_out": stats.connections_timed_out.get(),
        "connections_open": stats.connections_open.get(),
        "requests_served": stats.requests_served.get(),
        "requests_rejected_queue_full": stats.requests_rejected_queue_full.get(),
        "requests_rejected_expired": stats.requests_rejected_expired.get(),
        "requests_skipped": stats.requests_skipped.get(),
    })
}
