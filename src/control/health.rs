//! The health checker: one thread per node (`health-<address>`) keeps a connection to it,
//! runs `health.query` and a role/WAL-position query every `health.check_interval_secs`,
//! and records the outcome in the node's [`Health`]. Consecutive failures and successes
//! past the configured thresholds flip `healthy`, which `Control::update_node` publishes to
//! the shards at once. A supervisor follows reloads (`Control::epoch`) to start and stop
//! checkers as nodes come and go.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use helios_shard::config::{Config, HealthConfig, NodeRole};
use helios_shard::control::parse_lsn;
use helios_shard::tls::ServerTls;

use super::probe::{Probe, ProbeError, Rows, Target};
use super::{Control, Health};

/// How often the supervisor looks for topology changes and the stop flag.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// Role and WAL position in one round trip. On a primary: its current WAL position; on a
/// standby: replay and receive positions, and seconds since the last replayed
/// transaction (0 when everything received is replayed).
///
/// The last column names replication peers: on a standby, the name it streams under
/// (the `application_name` of its `primary_conninfo`, else `cluster_name`, else
/// `walreceiver`, as PostgreSQL picks it); on the primary, the names of the standbys it
/// calls synchronous (`sync` or `quorum`), comma-separated.
const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() END, \
     CASE WHEN NOT pg_is_in_recovery() THEN NULL \
          WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
          ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END, \
     CASE WHEN pg_is_in_recovery() THEN \
          (SELECT COALESCE(substring(conninfo from 'application_name=([^ ]+)'), \
                           NULLIF(current_setting('cluster_name'), ''), 'walreceiver') \
           FROM pg_stat_wal_receiver) \
     ELSE (SELECT string_agg(application_name, ',') FROM pg_stat_replication \
           WHERE sync_state IN ('sync', 'quorum')) END, \
     txid_snapshot_xmax(txid_current_snapshot()), \
     CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_insert_lsn() END";

/// Starts the supervisor; it stops (and joins every checker) once `stop` is set. Nodes
/// named on `suspects` (by the shards, or the admin API) are checked at once.
pub fn spawn(
    control: Arc<Control>,
    stop: Arc<AtomicBool>,
    suspects: Receiver<String>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || supervise(&control, &stop, &suspects))
}

/// A running checker; dropping `stop` wakes it and tells it to end.
struct Checker {
    stop: Sender<()>,
    /// Asks for a check now.
    wake: Sender<()>,
    thread: JoinHandle<()>,
}

impl Checker {
    fn end(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

fn supervise(control: &Arc<Control>, stop: &AtomicBool, suspects: &Receiver<String>) {
    let mut checkers: HashMap<String, Checker> = HashMap::new();
    let mut seen = None;
    while !stop.load(Ordering::Acquire) {
        let epoch = control.epoch();
        if seen != Some(epoch) {
            seen = Some(epoch);
            reconcile(control, &mut checkers);
        }
        if let Ok(address) = suspects.recv_timeout(SUPERVISE_EVERY) {
            control.suspect(&address);
            if let Some(checker) = checkers.get(&address) {
                let _ = checker.wake.try_send(());
            }
        }
    }
    // Wake every checker first so they wind down together.
    let ending: Vec<Checker> = checkers.into_values().collect();
    let threads: Vec<JoinHandle<()>> = ending
        .into_iter()
        .map(|c| {
            drop(c.stop);
            c.thread
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// One checker per configured node while checks are enabled; none otherwise.
fn reconcile(control: &Arc<Control>, checkers: &mut HashMap<String, Checker>) {
    let enabled = control.config().health.enabled;
    let wanted: Vec<String> = if enabled {
        control
            .nodes()
            .into_iter()
            .map(|n| n.node.address)
            .collect()
    } else {
        Vec::new()
    };
    let gone: Vec<String> = checkers
        .keys()
        .filter(|a| !wanted.contains(a))
        .cloned()
        .collect();
    for address in gone {
        if let Some(checker) = checkers.remove(&address) {
            checker.end();
        }
    }
    if !enabled {
        // Without checks nothing can vouch for a node being down: all count as healthy.
        for node in control.nodes() {
            if !node.health.healthy || node.health.last_check.is_some() {
                let _ = control.update_node(&node.address, |n| {
                    n.health = Health {
                        healthy: true,
                        ..Health::default()
                    }
                });
            }
        }
        return;
    }
    for address in wanted {
        if checkers.contains_key(&address) {
            continue;
        }
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let (wake, woken) = crossbeam_channel::bounded(1);
        let c = control.clone();
        let name = format!("health-{address}");
        match std::thread::Builder::new().name(name).spawn({
            let address = address.clone();
            move || check_loop(&c, &address, &stopped, &woken)
        }) {
            Ok(thread) => {
                checkers.insert(address, Checker { stop, wake, thread });
            }
            Err(e) => log::error!("cannot start the health checker for node {address}: {e}"),
        }
    }
}

/// Checks one node until it leaves the configuration or the supervisor says stop.
fn check_loop(control: &Arc<Control>, address: &str, stopped: &Receiver<()>, woken: &Receiver<()>) {
    let mut conn: Option<Probe> = None;
    // TLS as the shards use it, rebuilt when the configuration changes.
    let mut tls: Option<(Arc<Config>, Option<ServerTls>)> = None;
    loop {
        let started = Instant::now();
        let Some(node) = control.node(address) else {
            break;
        };
        let config = control.config();
        if !matches!(&tls, Some((seen, _)) if Arc::ptr_eq(seen, &config)) {
            let built = helios_shard::tls::server_connector(&config.tls).unwrap_or_else(|e| {
                log::warn!("health checks of {address}: {}: {}", e.key, e.message);
                None
            });
            tls = Some((config.clone(), built));
        }
        let (user, password) = config.health_credentials();
        let target = Target {
            addr: &node.addr,
            user: &user,
            password: password.as_deref(),
            database: &config.health.database,
            tls: tls.as_ref().and_then(|(_, t)| t.as_ref()),
            address,
        };
        let outcome = check(&mut conn, target, &config.health);
        record(control, address, &config.health, outcome);
        control.follow_primary();
        // Standbys and replicas report lag and replay position for routing, so they are
        // checked at least every `routing.lag_check_interval_secs`.
        let mut every = config.health.interval();
        if node.role != NodeRole::Primary {
            every = every.min(Duration::from_secs_f64(
                config.routing.lag_check_interval_secs,
            ));
        }
        // Fast while the node is suspect or a failover is under way.
        let every = control.check_every(address, every);
        let next = started + every;
        crossbeam_channel::select! {
            recv(stopped) -> _ => break,
            recv(woken) -> _ => {}
            default(next.saturating_duration_since(Instant::now())) => {}
        }
    }
    if let Some(probe) = conn {
        probe.terminate();
    }
}

/// What one good check learned.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub latency_ms: f64,
    pub in_recovery: bool,
    /// Current WAL position (primary) or replay position (standby).
    pub wal_lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// See [`ROLE_QUERY`]'s fifth column.
    pub replication_names: Vec<String>,
    /// The next transaction id the server will assign (with its epoch).
    pub next_xid: Option<u64>,
    /// A primary's WAL insert position (every commit acknowledged before `asked` is
    /// below it), and when the query that read it was sent.
    pub insert_lsn: Option<u64>,
    pub asked: Instant,
}

/// One check within `health.timeout_ms`, reusing the kept connection. A kept connection
/// found dead gets one fresh attempt, so a server restart between checks is no failure.
fn check(
    conn: &mut Option<Probe>,
    target: Target<'_>,
    health: &HealthConfig,
) -> Result<Observation, ProbeError> {
    let deadline = Instant::now() + Duration::from_millis(health.timeout_ms);
    let reused = conn.is_some();
    let mut outcome = attempt(conn, target, health, deadline);
    if reused && outcome.as_ref().is_err_and(ProbeError::is_connection_lost) {
        outcome = attempt(conn, target, health, deadline);
    }
    outcome
}

fn attempt(
    conn: &mut Option<Probe>,
    target: Target<'_>,
    health: &HealthConfig,
    deadline: Instant,
) -> Result<Observation, ProbeError> {
    let outcome = (|| {
        let probe = match conn {
            Some(probe) => probe,
            None => conn.insert(Probe::connect(target, deadline)?),
        };
        let sent = Instant::now();
        probe.query(&health.query, deadline)?;
        let latency_ms = sent.elapsed().as_secs_f64() * 1000.0;
        let asked = Instant::now();
        let rows = probe.query(ROLE_QUERY, deadline)?;
        parse_role(&rows, latency_ms, asked)
    })();
    if outcome.is_err() {
        // Whatever state the connection is in, the next check starts afresh.
        *conn = None;
    }
    outcome
}

fn parse_role(rows: &Rows, latency_ms: f64, asked: Instant) -> Result<Observation, ProbeError> {
    let bad = |what: &str| ProbeError::Protocol(format!("role query: {what}"));
    let row = rows.first().ok_or_else(|| bad("no row"))?;
    let column = |i: usize| row.get(i).and_then(|v| v.as_deref());
    let in_recovery = match column(0) {
        Some("t") => true,
        Some("f") => false,
        other => return Err(bad(&format!("pg_is_in_recovery() = {other:?}"))),
    };
    let lsn = |i: usize| match column(i) {
        None => Ok(None),
        Some(text) => parse_lsn(text)
            .map(Some)
            .ok_or_else(|| bad(&format!("not an LSN: {text:?}"))),
    };
    Ok(Observation {
        latency_ms,
        in_recovery,
        wal_lsn: lsn(1)?,
        receive_lsn: lsn(2)?,
        lag_seconds: column(3).and_then(|s| s.parse::<f64>().ok()),
        replication_names: column(4)
            .map(|names| {
                names
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        next_xid: column(5).and_then(|s| s.parse::<u64>().ok()),
        insert_lsn: lsn(6)?,
        asked,
    })
}

/// Bytes a standby is behind: the primary's position minus the standby's replay
/// position; without a known primary position, what it received but has not replayed.
pub fn lag_bytes(primary: Option<u64>, replay: Option<u64>, receive: Option<u64>) -> Option<u64> {
    let replay = replay?;
    primary
        .or(receive)
        .map(|ahead| ahead.saturating_sub(replay))
}

/// Counts a good check; `healthy` returns once `success_threshold` are in a row.
pub fn record_success(
    health: &mut Health,
    config: &HealthConfig,
    now: SystemTime,
    latency_ms: f64,
) {
    health.last_check = Some(now);
    health.latency_ms = latency_ms;
    health.last_error = None;
    health.failure_count = 0;
    health.success_count = health.success_count.saturating_add(1);
    if health.success_count >= config.success_threshold.max(1) {
        health.healthy = true;
    }
}

/// Counts a failed check; `healthy` goes once `failure_threshold` are in a row.
pub fn record_failure(health: &mut Health, config: &HealthConfig, now: SystemTime, error: String) {
    health.last_check = Some(now);
    health.last_error = Some(error);
    health.success_count = 0;
    health.failure_count = health.failure_count.saturating_add(1);
    if health.failure_count >= config.failure_threshold.max(1) {
        health.healthy = false;
    }
}

/// A standby's lag in time: the smaller of the server's own figure (time since its last
/// replayed transaction, 0 when it replayed all it received) and how long ago the
/// primary was where the standby has replayed to. The first alone overstates the lag
/// right after a quiet primary writes again; the second alone, by up to one check
/// interval, under steady writes.
fn replay_lag(control: &Control, seen: &Observation, at: Instant) -> Option<f64> {
    let by_primary = seen
        .wal_lsn
        .and_then(|replayed| control.behind_primary(replayed, at))
        .map(|d| d.as_secs_f64());
    match (seen.lag_seconds, by_primary) {
        (Some(own), Some(primary)) => Some(own.min(primary)),
        (own, primary) => own.or(primary),
    }
}

/// Stores one check's outcome on the node and logs a change of health.
fn record(
    control: &Control,
    address: &str,
    config: &HealthConfig,
    outcome: Result<Observation, ProbeError>,
) {
    // A standby's lag is measured against the primary's last known position.
    let primary_lsn = control
        .nodes()
        .iter()
        .find(|n| n.role == NodeRole::Primary && n.address != address)
        .and_then(|n| n.health.wal_lsn);
    let now = SystemTime::now();
    let checked_at = Instant::now();
    if let Ok(Observation {
        in_recovery: false,
        wal_lsn: Some(lsn),
        ..
    }) = &outcome
    {
        control.primary_position(checked_at, *lsn);
        if let Ok(Observation {
            insert_lsn: Some(insert),
            asked,
            ..
        }) = &outcome
        {
            control.cache_epochs.observe_primary(*asked, *insert);
        }
    }
    if let Ok(seen) = &outcome {
        if !seen.in_recovery && control.is_primary(address) {
            control.note_sync_standbys(seen.replication_names.clone());
        }
    }
    let mut was_healthy = true;
    let updated = control.update_node(address, |n| {
        was_healthy = n.health.healthy;
        let h = &mut n.health;
        match &outcome {
            Ok(seen) => {
                record_success(h, config, now, seen.latency_ms);
                h.in_recovery = Some(seen.in_recovery);
                h.wal_lsn = seen.wal_lsn;
                h.next_xid = seen.next_xid;
                // A standby cut off from its primary no longer shows its stream: the
                // name it had is kept (a failover ranks by it).
                if !(seen.in_recovery && seen.replication_names.is_empty()) {
                    h.replication_names = seen.replication_names.clone();
                }
                let standby = n.node.role != NodeRole::Primary && seen.in_recovery;
                h.replication_lag_bytes = standby
                    .then(|| lag_bytes(primary_lsn, seen.wal_lsn, seen.receive_lsn))
                    .flatten();
                h.replication_lag_seconds = standby
                    .then(|| replay_lag(control, seen, checked_at))
                    .flatten();
            }
            Err(e) => record_failure(h, config, now, e.to_string()),
        }
    });
    let Ok(node) = updated else { return };
    let h = &node.health;
    match (was_healthy, h.healthy) {
        (true, false) => log::warn!(
            "node {address} is unhealthy after {} failed checks: {}",
            h.failure_count,
            h.last_error.as_deref().unwrap_or("")
        ),
        (false, true) => log::info!(
            "node {address} is healthy again after {} good checks",
            h.success_count
        ),
        _ if h.failure_count > 0 => log::debug!(
            "health check of node {address} failed ({} in a row): {}",
            h.failure_count,
            h.last_error.as_deref().unwrap_or("")
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(failures: u32, successes: u32) -> HealthConfig {
        HealthConfig {
            failure_threshold: failures,
            success_threshold: successes,
            ..HealthConfig::default()
        }
    }

    #[test]
    fn lsns_parse_as_high_and_low_words() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for bad in ["", "0", "x/1", "1/", "/1", "1/2/3", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lag_is_against_the_primary_else_what_was_received() {
        assert_eq!(lag_bytes(Some(1000), Some(400), Some(900)), Some(600));
        assert_eq!(lag_bytes(None, Some(400), Some(900)), Some(500));
        assert_eq!(lag_bytes(Some(300), Some(400), None), Some(0));
        assert_eq!(lag_bytes(None, Some(400), None), None);
        assert_eq!(lag_bytes(Some(1000), None, Some(900)), None);
    }

    #[test]
    fn health_flips_only_at_the_thresholds() {
        let cfg = config(3, 2);
        let now = SystemTime::now();
        let mut h = Health {
            healthy: true,
            ..Health::default()
        };
        record_failure(&mut h, &cfg, now, "refused".into());
        record_failure(&mut h, &cfg, now, "refused".into());
        assert!(h.healthy);
        assert_eq!(
            (h.failure_count, h.last_error.as_deref()),
            (2, Some("refused"))
        );
        // A good check in between starts the count again.
        record_success(&mut h, &cfg, now, 1.5);
        assert_eq!((h.failure_count, h.success_count), (0, 1));
        assert_eq!(h.last_error, None);
        for _ in 0..3 {
            record_failure(&mut h, &cfg, now, "refused".into());
        }
        assert!(!h.healthy);
        assert_eq!((h.failure_count, h.success_count), (3, 0));
        record_success(&mut h, &cfg, now, 0.7);
        assert!(!h.healthy, "one success is below success_threshold 2");
        record_success(&mut h, &cfg, now, 0.7);
        assert!(h.healthy);
        assert_eq!(
            (h.failure_count, h.success_count, h.latency_ms),
            (0, 2, 0.7)
        );
        assert_eq!(h.last_check, Some(now));
    }

    #[test]
    fn role_rows_become_an_observation() {
        let row = |values: [Option<&str>; 4]| -> Rows {
            vec![values.iter().map(|v| v.map(str::to_string)).collect()]
        };
        let asked = Instant::now();
        let primary =
            parse_role(&row([Some("f"), Some("0/3000148"), None, None]), 0.4, asked).unwrap();
        assert_eq!(
            primary,
            Observation {
                latency_ms: 0.4,
                in_recovery: false,
                wal_lsn: Some(0x300_0148),
                receive_lsn: None,
                lag_seconds: None,
                replication_names: Vec::new(),
                next_xid: None,
                insert_lsn: None,
                asked,
            }
        );
        let standby = parse_role(
            &row([
                Some("t"),
                Some("0/3000100"),
                Some("0/3000148"),
                Some("1.25"),
            ]),
            0.4,
            asked,
        )
        .unwrap();
        assert!(standby.in_recovery);
        assert_eq!(standby.receive_lsn, Some(0x300_0148));
        assert_eq!(standby.lag_seconds, Some(1.25));
        assert!(parse_role(&Rows::new(), 0.1, asked).is_err());
        assert!(parse_role(&row([Some("t"), Some("junk"), None, None]), 0.1, asked).is_err());
    }
}
