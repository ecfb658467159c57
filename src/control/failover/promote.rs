//! Promoting a standby: measure every candidate afresh (the old primary is gone, so its
//! WAL can no longer grow), rank them — a synchronous standby first, then the one that
//! received the most WAL, then `priority` — skip any further behind the last primary
//! position seen than `failover.max_lag_bytes`, run `pg_promote()` on the best, and
//! confirm it left recovery. The operations log in with `[failover] user` (default: the
//! health checks' role), which needs `pg_promote` (a superuser, or a role granted
//! EXECUTE on `pg_catalog.pg_promote`).

use std::time::{Duration, Instant};

use helios_shard::config::Config;
use helios_shard::control::parse_lsn;

use super::super::probe::{Probe, ProbeError, Target};
use super::super::NodeStatus;

/// A standby that may be promoted, as measured just now.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub address: String,
    /// Reported as synchronous by the primary's last check.
    pub sync: bool,
    /// The WAL it has received (and will replay before it is promoted).
    pub received: u64,
    pub priority: Option<u32>,
}

/// Candidates in the order they are tried.
pub fn rank(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    candidates.sort_by(|a, b| {
        b.sync
            .cmp(&a.sync)
            .then(b.received.cmp(&a.received))
            .then(
                a.priority
                    .unwrap_or(u32::MAX)
                    .cmp(&b.priority.unwrap_or(u32::MAX)),
            )
            .then(a.address.cmp(&b.address))
    });
    candidates
}

/// Logs in to `node` for one of the failover's own operations.
fn connect(config: &Config, node: &NodeStatus) -> Result<Probe, ProbeError> {
    let (user, password) = config.failover_credentials();
    let tls = helios_shard::tls::server_connector(&config.tls)
        .ok()
        .flatten();
    let target = Target {
        addr: &node.addr,
        user: &user,
        password: password.as_deref(),
        database: &config.health.database,
        tls: tls.as_ref(),
        address: &node.address,
    };
    let deadline = Instant::now() + Duration::from_millis(config.health.timeout_ms);
    Probe::connect(target, deadline)
}

/// Runs one statement on `node` as the failover role; the first column of the first row.
pub fn run(config: &Config, node: &NodeStatus, sql: &str) -> Result<Option<String>, String> {
    let mut probe = connect(config, node).map_err(|e| e.to_string())?;
    let rows = probe
        .query(sql, deadline(config))
        .map_err(|e| e.to_string())?;
    probe.terminate();
    Ok(rows
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next())
        .flatten())
}

fn deadline(config: &Config) -> Instant {
    Instant::now() + Duration::from_millis(config.health.timeout_ms)
}

/// Measures a standby now: the WAL it received (else replayed). `None` when it cannot be
/// reached or is no longer a standby.
pub fn measure(config: &Config, node: &NodeStatus, sync: bool) -> Result<Candidate, String> {
    let mut probe = connect(config, node).map_err(|e| e.to_string())?;
    let rows = probe
        .query(
            "SELECT pg_is_in_recovery(), \
             COALESCE(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())",
            deadline(config),
        )
        .map_err(|e| e.to_string())?;
    probe.terminate();
    let row = rows.first().ok_or("no row")?;
    if row.first().and_then(|v| v.as_deref()) != Some("t") {
        return Err("not in recovery".into());
    }
    let received = row
        .get(1)
        .and_then(|v| v.as_deref())
        .and_then(parse_lsn)
        .unwrap_or(0);
    Ok(Candidate {
        address: node.address.clone(),
        sync,
        received,
        priority: node.priority,
    })
}

/// How often a promotion is looked at until the standby has left recovery
/// (`pg_promote(true)` itself only looks every 100 ms).
const PROMOTION_POLL: Duration = Duration::from_millis(5);

/// Why a promotion did not finish; `started` once `pg_promote()` accepted it (the node is
/// leaving recovery: no other may be promoted).
#[derive(Debug)]
pub struct PromoteError {
    pub started: bool,
    pub message: String,
}

impl From<String> for PromoteError {
    fn from(message: String) -> Self {
        PromoteError {
            started: false,
            message,
        }
    }
}

impl std::fmt::Display for PromoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `pg_promote()` on `node` and waits until it has left recovery; then the next
/// transaction id it will assign (where its own timeline's ids begin), when it says.
pub fn promote(config: &Config, node: &NodeStatus) -> Result<Option<u64>, PromoteError> {
    let mut probe = connect(config, node).map_err(|e| e.to_string())?;
    let wait = config.failover.promote_timeout_secs;
    let until = Instant::now() + Duration::from_secs(wait);
    let first = |rows: &super::super::probe::Rows| {
        rows.first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref())
            .map(str::to_string)
    };
    let rows = probe
        .query("SELECT pg_catalog.pg_promote(false)", deadline(config))
        .map_err(|e| e.to_string())?;
    if first(&rows).as_deref() != Some("t") {
        return Err(String::from("pg_promote() refused to start the promotion").into());
    }
    let started = |message: String| PromoteError {
        started: true,
        message,
    };
    loop {
        let rows = probe
            .query(
                "SELECT pg_catalog.pg_is_in_recovery(), \
                 pg_catalog.txid_snapshot_xmax(pg_catalog.txid_current_snapshot())",
                deadline(config),
            )
            .map_err(|e| started(e.to_string()))?;
        if first(&rows).as_deref() == Some("f") {
            probe.terminate();
            let next_xid = rows
                .first()
                .and_then(|r| r.get(1))
                .and_then(|v| v.as_deref())
                .and_then(|v| v.parse::<u64>().ok());
            return Ok(next_xid);
        }
        if Instant::now() >= until {
            return Err(started(format!(
                "still in recovery {wait} s after pg_promote() (failover.promote_timeout_secs)"
            )));
        }
        std::thread::sleep(PROMOTION_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(address: &str, sync: bool, received: u64, priority: Option<u32>) -> Candidate {
        Candidate {
            address: address.into(),
            sync,
            received,
            priority,
        }
    }

    #[test]
    fn synchronous_first_then_most_wal_then_priority() {
        let ranked = rank(vec![
            candidate("a:1", false, 900, Some(1)),
            candidate("b:1", true, 800, None),
            candidate("c:1", false, 900, Some(0)),
            candidate("d:1", false, 950, None),
        ]);
        let order: Vec<&str> = ranked.iter().map(|c| c.address.as_str()).collect();
        assert_eq!(order, ["b:1", "d:1", "c:1", "a:1"]);
    }
}
