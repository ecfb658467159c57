//! A planned switchover (`POST /switchover`): new work for the primary waits in the
//! switchover buffer while the old primary's transactions finish (up to
//! `failover.switchover_drain_secs`); the old primary is made to refuse writes
//! (`default_transaction_read_only`, its remaining sessions ended); the target replays
//! up to the old primary's last WAL position; it is promoted, published, and the buffer
//! drains to it. Autocommit clients see only latency; no committed write is lost.

use std::time::{Duration, Instant};

use helios_shard::config::NodeRole;
use helios_shard::control::{parse_lsn, Detail};
use helios_shard::topology::PrimaryState;
use serde_json::Value;

use super::promote;
use super::FailoverRecord;
use crate::control::{Control, ControlError, NodeStatus};

/// How often the drain and the catch-up are looked at.
const POLL: Duration = Duration::from_millis(20);

/// Why a switchover stopped.
enum SwitchFailure {
    /// Before anything was promoted: the old primary can serve again.
    Before(String),
    /// `pg_promote()` accepted the target but it has not finished.
    Promoting(String),
}

impl From<String> for SwitchFailure {
    fn from(why: String) -> Self {
        SwitchFailure::Before(why)
    }
}

impl From<&str> for SwitchFailure {
    fn from(why: &str) -> Self {
        SwitchFailure::Before(why.to_string())
    }
}

impl Control {
    /// `POST /switchover`: moves the primary role to `target` (or the best standby)
    /// without losing a committed write.
    pub fn switchover(&self, target: Option<&str>) -> Result<Value, ControlError> {
        let (old, target) = self.begin_switchover(target)?;
        match self.switch(&old, &target) {
            Ok(next_xid) => {
                self.record_next_xid(&target.address, next_xid);
                self.end_switchover(Some(&target), &old, None, PrimaryState::Confirmed);
                Ok(self.topology_json())
            }
            Err(SwitchFailure::Promoting(why)) => {
                // pg_promote() accepted it: the target is the primary (pending until seen
                // writable); the old one must never take writes again.
                self.step("promote_slow", why);
                self.end_switchover(Some(&target), &old, None, PrimaryState::Pending);
                Ok(self.topology_json())
            }
            Err(SwitchFailure::Before(why)) => {
                let restored = self.restore_writes(&old);
                let why = match restored {
                    Ok(()) => why,
                    Err(e) => format!("{why}; the old primary still refuses writes: {e}"),
                };
                self.end_switchover(None, &old, Some(&why), PrimaryState::Confirmed);
                Err(ControlError::Failed(format!("switchover failed: {why}")))
            }
        }
    }

    /// Puts the old primary back in service as it was (after a switchover gave up before
    /// promoting anything), checking that it takes writes again.
    fn restore_writes(&self, old: &NodeStatus) -> Result<(), String> {
        let config = self.config();
        let mut last = String::new();
        for _ in 0..3 {
            let reset = promote::run(
                &config,
                old,
                "ALTER SYSTEM RESET default_transaction_read_only",
            )
            .and_then(|_| promote::run(&config, old, "SELECT pg_reload_conf()"))
            .and_then(|_| {
                // The reload is asynchronous: a fresh session sees its outcome.
                std::thread::sleep(Duration::from_millis(50));
                promote::run(&config, old, "SHOW default_transaction_read_only")
            });
            match reset {
                Ok(Some(value)) if value == "off" => return Ok(()),
                Ok(value) => last = format!("default_transaction_read_only is {value:?}"),
                Err(e) => last = e,
            }
            std::thread::sleep(POLL);
        }
        Err(last)
    }

    /// Checks the request, stops new primary work (the old primary drains), and returns
    /// the old primary and the target.
    fn begin_switchover(
        &self,
        target: Option<&str>,
    ) -> Result<(NodeStatus, NodeStatus), ControlError> {
        let mut state = self.state();
        let state = &mut *state;
        if state.tracker.promoting || state.tracker.switching {
            return Err(ControlError::Conflict(
                "a failover or switchover is already under way".into(),
            ));
        }
        let Some(old_address) = state
            .tracker
            .primary
            .clone()
            .filter(|_| state.tracker.state == PrimaryState::Confirmed)
        else {
            return Err(ControlError::Conflict(
                "there is no confirmed primary to switch over from (use POST /failover)".into(),
            ));
        };
        let standby = |n: &&NodeStatus| {
            n.enabled && !n.fenced && n.health.healthy && n.health.in_recovery == Some(true)
        };
        let target = match target {
            Some(t) => {
                let node = state
                    .nodes
                    .iter()
                    .find(|n| n.address == t)
                    .ok_or(ControlError::NodeNotFound)?;
                if !standby(&node) {
                    return Err(ControlError::Conflict(format!(
                        "{t} is not a healthy, enabled standby"
                    )));
                }
                node.clone()
            }
            None => {
                let sync = &state.tracker.sync_standbys;
                state
                    .nodes
                    .iter()
                    .filter(standby)
                    .min_by_key(|n| {
                        (
                            !n.health.replication_names.iter().any(|r| sync.contains(r)),
                            n.health.replication_lag_bytes.unwrap_or(u64::MAX),
                            n.priority.unwrap_or(u32::MAX),
                            n.address.clone(),
                        )
                    })
                    .cloned()
                    .ok_or_else(|| {
                        ControlError::Conflict("no healthy, enabled standby to switch to".into())
                    })?
            }
        };
        let old = state
            .nodes
            .iter_mut()
            .find(|n| n.address == old_address)
            .ok_or(ControlError::NodeNotFound)?;
        // No new work for the old primary: units that need it wait in the buffer.
        old.draining = true;
        let old = old.clone();
        let mut record = FailoverRecord::begin("switchover", Some(old_address.clone()));
        record.step(
            "draining",
            format!(
                "new work for the primary waits; switching to {}",
                target.address
            ),
        );
        state.tracker.current = Some(record);
        state.tracker.switching = true;
        state.tracker.state = PrimaryState::Pending;
        self.publish(state);
        Ok((old, target))
    }

    fn switch(&self, old: &NodeStatus, target: &NodeStatus) -> Result<Option<u64>, SwitchFailure> {
        let config = self.config();
        // In-flight transactions finish, up to the bound.
        let until = Instant::now() + Duration::from_secs_f64(config.failover.switchover_drain_secs);
        loop {
            let busy: usize = self
                .gather(Detail::default())
                .iter()
                .flat_map(|s| s.pools.iter())
                .filter(|p| p.node == old.address)
                .map(|p| p.active())
                .sum();
            if busy == 0 {
                self.step("drained", "no transaction left on the old primary".into());
                break;
            }
            if Instant::now() >= until {
                self.step(
                    "drained",
                    format!("{busy} connection(s) still busy after failover.switchover_drain_secs: ended"),
                );
                break;
            }
            std::thread::sleep(POLL);
        }
        // The old primary refuses writes from now on, and keeps nobody connected.
        promote::run(
            &config,
            old,
            "ALTER SYSTEM SET default_transaction_read_only = on",
        )?;
        promote::run(&config, old, "SELECT pg_reload_conf()")?;
        let ended = promote::run(
            &config,
            old,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )?;
        // Where the last commit record ends (the insert position: under asynchronous
        // commit the write position may trail it), once flushed so it can stream.
        let last = promote::run(&config, old, "SELECT pg_current_wal_insert_lsn()")?
            .as_deref()
            .and_then(parse_lsn)
            .ok_or("the old primary did not say its WAL position")?;
        let until = Instant::now() + Duration::from_secs(config.failover.promote_timeout_secs);
        loop {
            let flushed = promote::run(&config, old, "SELECT pg_current_wal_flush_lsn()")?
                .as_deref()
                .and_then(parse_lsn)
                .unwrap_or(0);
            if flushed >= last {
                break;
            }
            if Instant::now() >= until {
                return Err(SwitchFailure::Before(
                    "the old primary did not flush its last WAL in time".into(),
                ));
            }
            std::thread::sleep(POLL);
        }
        self.step(
            "read_only",
            format!(
                "{}: default_transaction_read_only, {} session(s) ended, WAL at {:X}/{:X}",
                old.address,
                ended.unwrap_or_default(),
                last >> 32,
                last & 0xffff_ffff
            ),
        );
        // The target replays everything the old primary committed.
        let until = Instant::now() + Duration::from_secs(config.failover.promote_timeout_secs);
        loop {
            let replayed = promote::run(&config, target, "SELECT pg_last_wal_replay_lsn()")?
                .as_deref()
                .and_then(parse_lsn)
                .unwrap_or(0);
            if replayed >= last {
                self.step(
                    "caught_up",
                    format!(
                        "{} replayed up to the old primary's last position",
                        target.address
                    ),
                );
                break;
            }
            if Instant::now() >= until {
                return Err(SwitchFailure::Before(format!(
                    "{} did not replay up to {:X}/{:X} within failover.promote_timeout_secs",
                    target.address,
                    last >> 32,
                    last & 0xffff_ffff
                )));
            }
            std::thread::sleep(POLL);
        }
        self.step("promoting", format!("pg_promote() on {}", target.address));
        promote::promote(&config, target).map_err(|e| {
            if e.started {
                SwitchFailure::Promoting(e.message)
            } else {
                SwitchFailure::Before(e.message)
            }
        })
    }

    /// Publishes the outcome: the target as the confirmed primary and the old one fenced
    /// (it must be rebuilt as a standby), or, on failure, the old primary back in service.
    fn end_switchover(
        &self,
        promoted: Option<&NodeStatus>,
        old: &NodeStatus,
        why: Option<&str>,
        target_state: PrimaryState,
    ) {
        let mut state = self.state();
        let state = &mut *state;
        state.tracker.switching = false;
        if let Some(node) = state.nodes.iter_mut().find(|n| n.address == old.address) {
            node.draining = false;
            if promoted.is_some() {
                node.fenced = true;
                node.switched_out = true;
                node.node.role = NodeRole::Standby;
            }
        }
        match promoted {
            Some(target) if target_state == PrimaryState::Confirmed => {
                super::ops::adopt_promoted(state, &target.address);
            }
            Some(target) => {
                // Still leaving recovery: named, confirmed by the next check.
                state.tracker.primary = Some(target.address.clone());
                state.tracker.state = PrimaryState::Pending;
                super::set_roles(&mut state.nodes, Some(&target.address));
            }
            None => {
                state.tracker.state = PrimaryState::Confirmed;
                state.tracker.fail(why.unwrap_or("switchover failed"));
            }
        }
        self.publish(state);
    }
}
