//! The control plane's failover operations: following the primary after every check,
//! promoting a standby (automatically, or for `POST /failover`), naming the primary by
//! hand (`POST /primary`), the probe interval of each node (fast while a node is
//! suspect or a failover is under way), and the `/topology` report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use helios_shard::config::TopologyProviderKind;
use helios_shard::topology::PrimaryState;
use serde_json::{json, Value};

use super::promote::{self, Candidate};
use super::{follow, FailoverRecord};
use crate::control::{Control, ControlError, State};

/// A node reported suspect is probed fast for this long.
const SUSPECT_FOR: Duration = Duration::from_secs(2);

impl Control {
    /// Brings the tracked primary up to date with the latest checks; publishes any
    /// change and starts a promotion when the primary was declared down.
    pub fn follow_primary(self: &Arc<Self>) {
        let promote = {
            let mut state = self.state();
            let state = &mut *state;
            let config = state.config.clone();
            let out = follow(&mut state.tracker, &mut state.nodes, &config);
            if out.changed {
                self.publish(state);
            }
            if out.promote {
                state.tracker.promoting = true;
            }
            out.promote
        };
        if promote {
            let control = self.clone();
            let spawned = std::thread::Builder::new()
                .name("failover".into())
                .spawn(move || {
                    let _ = control.promote_best(None);
                });
            if let Err(e) = spawned {
                log::error!("cannot start the failover thread: {e}");
                self.state().tracker.promoting = false;
            }
        }
    }

    /// Promotes `target` (or the best standby), makes it the primary and publishes it.
    /// The caller has set `tracker.promoting`; it is cleared here.
    pub fn promote_best(&self, target: Option<&str>) -> Result<String, String> {
        let result = self.try_promote(target);
        let mut state = self.state();
        state.tracker.promoting = false;
        if let Err(why) = &result {
            log::error!("failover: {why}");
            // An external promotion may still come; the buffer's bounds apply meanwhile.
            state.tracker.fail(why);
        }
        result
    }

    fn try_promote(&self, target: Option<&str>) -> Result<String, String> {
        let config = self.config();
        let (nodes, sync_names) = {
            let state = self.state();
            (state.nodes.clone(), state.tracker.sync_standbys.clone())
        };
        let standbys: Vec<_> = nodes
            .iter()
            .filter(|n| n.enabled && !n.fenced && n.health.healthy)
            .filter(|n| n.health.in_recovery != Some(false))
            .filter(|n| target.is_none_or(|t| t == n.address))
            .collect();
        if standbys.is_empty() {
            return Err(match target {
                Some(t) => format!("{t} is not a healthy, enabled standby"),
                None => "no healthy, enabled standby to promote".into(),
            });
        }
        let primary_at = self.last_primary_position();
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut refused = Vec::new();
        for node in standbys {
            let sync = node
                .health
                .replication_names
                .iter()
                .any(|name| sync_names.contains(name));
            match promote::measure(&config, node, sync) {
                Ok(c) => match primary_at {
                    Some(at) if at.saturating_sub(c.received) > config.failover.max_lag_bytes => {
                        refused.push(format!(
                            "{} is {} bytes behind (failover.max_lag_bytes {})",
                            c.address,
                            at - c.received,
                            config.failover.max_lag_bytes
                        ))
                    }
                    _ => candidates.push(c),
                },
                Err(e) => refused.push(format!("{}: {e}", node.address)),
            }
        }
        let ranked = promote::rank(candidates);
        self.step(
            "candidates",
            format!(
                "{}{}",
                ranked
                    .iter()
                    .map(|c| format!(
                        "{} (sync {}, received {:X}/{:X})",
                        c.address,
                        c.sync,
                        c.received >> 32,
                        c.received & 0xffff_ffff
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; not eligible: {}", refused.join("; "))
                }
            ),
        );
        for candidate in &ranked {
            let Some(node) = nodes.iter().find(|n| n.address == candidate.address) else {
                continue;
            };
            if let Some(primary) = self.state().tracker.primary.clone() {
                return Err(format!(
                    "{primary} became the primary meanwhile: nothing promoted"
                ));
            }
            self.step(
                "promoting",
                format!("pg_promote() on {}", candidate.address),
            );
            match promote::promote(&config, node) {
                Ok(next_xid) => {
                    self.record_next_xid(&candidate.address, next_xid);
                    self.promoted(&candidate.address);
                    return Ok(candidate.address.clone());
                }
                Err(e) if e.started => {
                    // It is leaving recovery, slowly: it is the one, never a second.
                    self.step(
                        "promote_slow",
                        format!("{}: {}", candidate.address, e.message),
                    );
                    self.promotion_pending(&candidate.address);
                    return Ok(candidate.address.clone());
                }
                Err(e) => self.step(
                    "promote_failed",
                    format!("{}: {}", candidate.address, e.message),
                ),
            }
        }
        Err(format!(
            "no standby could be promoted{}",
            if refused.is_empty() {
                String::new()
            } else {
                format!(" ({})", refused.join("; "))
            }
        ))
    }

    /// Adds a step to the failover under way.
    pub(super) fn step(&self, name: &'static str, detail: String) {
        if let Some(record) = self.state().tracker.current.as_mut() {
            record.step(name, detail);
        }
    }

    /// The next transaction id `address` was seen to assign just after its promotion.
    pub(super) fn record_next_xid(&self, address: &str, next_xid: Option<u64>) {
        let mut state = self.state();
        if let Some(node) = state.nodes.iter_mut().find(|n| n.address == address) {
            if next_xid.is_some() {
                node.health.next_xid = next_xid;
            }
        }
    }

    /// A promotion succeeded: `address` is the primary, confirmed (it left recovery).
    fn promoted(&self, address: &str) {
        let mut state = self.state();
        adopt_promoted(&mut state, address);
        self.publish(&mut state);
    }

    /// A promotion was accepted but has not finished: the node is the primary, pending
    /// until a check sees it writable.
    fn promotion_pending(&self, address: &str) {
        let mut state = self.state();
        let state = &mut *state;
        state.tracker.primary = Some(address.to_string());
        state.tracker.state = PrimaryState::Pending;
        state.tracker.lost_primary = None;
        super::set_roles(&mut state.nodes, Some(address));
        self.publish(state);
    }

    /// `POST /failover`: fence the current primary (every connection to it cut), then
    /// promote `target` or the best standby. Answers once the new primary is published.
    pub fn failover(&self, target: Option<&str>) -> Result<Value, ControlError> {
        {
            let mut state = self.state();
            let state = &mut *state;
            if state.tracker.promoting || state.tracker.switching {
                return Err(ControlError::Conflict(
                    "a failover or switchover is already under way".into(),
                ));
            }
            if let Some(t) = target {
                if !state.nodes.iter().any(|n| n.address == t) {
                    return Err(ControlError::NodeNotFound);
                }
                if state.tracker.primary.as_deref() == Some(t) {
                    return Err(ControlError::Conflict(format!(
                        "{t} is the primary already"
                    )));
                }
            }
            // Nothing is fenced unless a standby can take over.
            let primary = state.tracker.primary.clone();
            let eligible = state.nodes.iter().any(|n| {
                n.enabled
                    && !n.fenced
                    && n.health.healthy
                    && n.health.in_recovery != Some(false)
                    && primary.as_deref() != Some(n.address.as_str())
                    && target.is_none_or(|t| t == n.address)
            });
            if !eligible {
                return Err(ControlError::Conflict(match target {
                    Some(t) => format!("{t} is not a healthy, enabled standby"),
                    None => "no healthy, enabled standby to promote".into(),
                }));
            }
            let old = state.tracker.primary.take();
            state.tracker.lost_primary = old.clone();
            let mut record = FailoverRecord::begin("admin", old.clone());
            if let Some(old) = &old {
                if let Some(node) = state.nodes.iter_mut().find(|n| &n.address == old) {
                    node.fenced = true;
                }
                record.step(
                    "fenced",
                    format!("{old}: every connection cut, no new work"),
                );
            }
            state.tracker.state = PrimaryState::None;
            state.tracker.current = Some(record);
            state.tracker.promoting = true;
            self.publish(state);
        }
        match self.promote_best(target) {
            Ok(_) => Ok(self.topology_json()),
            Err(why) => {
                // Nothing took over: the old primary serves again (if it still can).
                let mut state = self.state();
                let state = &mut *state;
                if let Some(old) = state.tracker.lost_primary.clone() {
                    if let Some(node) = state.nodes.iter_mut().find(|n| n.address == old) {
                        node.fenced = false;
                    }
                    if state
                        .nodes
                        .iter()
                        .any(|n| n.address == old && super::writable(n))
                    {
                        state
                            .tracker
                            .adopt(&mut state.nodes, &old, PrimaryState::Confirmed);
                    }
                    self.publish(state);
                }
                Err(ControlError::Failed(why))
            }
        }
    }

    /// `POST /primary` (manual provider): names `address` the primary. It is pending until
    /// a check sees it writable (probed at once).
    pub fn set_primary(&self, address: &str) -> Result<Value, ControlError> {
        {
            let mut state = self.state();
            let state = &mut *state;
            if state.config.topology.provider != TopologyProviderKind::Manual {
                return Err(ControlError::Conflict(
                    "topology.provider is postgres: the primary is whichever node is writable; use POST /failover to promote one".into(),
                ));
            }
            let Some(node) = state.nodes.iter_mut().find(|n| n.address == address) else {
                return Err(ControlError::NodeNotFound);
            };
            node.fenced = false;
            let old = state.tracker.primary.replace(address.to_string());
            if old.as_deref() != Some(address) {
                let mut record = FailoverRecord::begin("admin", old);
                record.step("named", format!("{address} named primary by the admin API"));
                state.tracker.current = Some(record);
            }
            state.tracker.state = PrimaryState::Pending;
            let writable = state
                .nodes
                .iter()
                .find(|n| n.address == address)
                .is_some_and(super::writable);
            if writable {
                state
                    .tracker
                    .adopt(&mut state.nodes, address, PrimaryState::Confirmed);
            } else {
                super::set_roles(&mut state.nodes, Some(address));
            }
            self.publish(state);
        }
        self.wake(address);
        Ok(self.topology_json())
    }

    /// A shard saw `address` fail (a refused connect, a connection lost mid-use): its
    /// checks run every `failover.fast_probe_ms` for a while.
    pub fn suspect(&self, address: &str) {
        self.suspected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address.to_string(), Instant::now());
    }

    /// Has the checker of `address` check at once (through the same channel the shards
    /// report suspects on).
    pub fn wake(&self, address: &str) {
        if let Some(tx) = self
            .wake_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(address.to_string());
        }
    }

    /// Where shards report suspect nodes; the health supervisor reads it.
    pub fn set_wake(&self, tx: crossbeam_channel::Sender<String>) {
        *self.wake_tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// How long the checker of `address` waits before its next check.
    pub fn check_every(&self, address: &str, normal: Duration) -> Duration {
        let state = self.state();
        let fast = Duration::from_millis(state.config.failover.fast_probe_ms);
        let tracker = &state.tracker;
        let is_primary = tracker.primary.as_deref() == Some(address);
        let failing = state
            .nodes
            .iter()
            .any(|n| n.address == address && n.health.failure_count > 0);
        let suspect = self
            .suspected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(address)
            .is_some_and(|at| at.elapsed() < SUSPECT_FOR);
        // A suspect node, a failing primary, and every node while there is no confirmed
        // primary (to see a promotion, or the old primary's return, at once).
        let hurry = tracker.state != PrimaryState::Confirmed || suspect || (is_primary && failing);
        if hurry {
            normal.min(fast)
        } else {
            normal
        }
    }

    /// The newest WAL position read from the primary.
    pub fn last_primary_position(&self) -> Option<u64> {
        self.primary_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .back()
            .map(|(_, lsn)| *lsn)
    }

    /// Is `address` the tracked primary?
    pub fn is_primary(&self, address: &str) -> bool {
        self.state().tracker.primary.as_deref() == Some(address)
    }

    /// Remembers which standbys the primary calls synchronous.
    pub fn note_sync_standbys(&self, names: Vec<String>) {
        self.state().tracker.sync_standbys = names;
    }

    /// Failover durations not yet given to the exporter's histogram.
    pub fn take_failover_durations(&self) -> Vec<Duration> {
        std::mem::take(&mut self.state().tracker.durations)
    }

    /// (completed failovers, the primary, more than one writable node).
    pub fn failover_figures(&self) -> (u64, Option<String>, bool) {
        let state = self.state();
        (
            state.tracker.completed,
            state.tracker.primary.clone(),
            state.tracker.split_brain,
        )
    }

    /// `GET /topology`.
    pub fn topology_json(&self) -> Value {
        let state = self.state();
        let t = &state.tracker;
        let writable: Vec<&str> = state
            .nodes
            .iter()
            .filter(|n| super::writable(n))
            .map(|n| n.address.as_str())
            .collect();
        json!({
            "provider": match state.config.topology.provider {
                TopologyProviderKind::Postgres => "postgres",
                TopologyProviderKind::Manual => "manual",
            },
            "primary": t.primary,
            "state": t.state.label(),
            "writable_nodes": writable,
            "split_brain": t.split_brain,
            "fenced": state.nodes.iter().filter(|n| n.fenced).map(|n| n.address.as_str()).collect::<Vec<_>>(),
            "failovers": t.completed,
            "failover_in_progress": t.current.as_ref().map(record_json),
            "last_failover": t.last.as_ref().map(record_json),
        })
    }
}

/// `address` left recovery (a promotion the proxy ran): it is the confirmed primary.
pub(super) fn adopt_promoted(state: &mut State, address: &str) {
    if let Some(node) = state.nodes.iter_mut().find(|n| n.address == address) {
        node.health.in_recovery = Some(false);
        node.health.replication_lag_bytes = None;
        node.health.replication_lag_seconds = None;
        node.refresh();
    }
    if let Some(record) = state.tracker.current.as_mut() {
        record.step("confirmed", format!("{address} left recovery"));
    }
    state
        .tracker
        .adopt(&mut state.nodes, address, PrimaryState::Confirmed);
}

fn record_json(r: &FailoverRecord) -> Value {
    json!({
        "trigger": r.trigger,
        "from": r.from,
        "to": r.to,
        "started": crate::control::admin::iso8601(r.started),
        "duration_ms": r.duration.map(|d| d.as_secs_f64() * 1000.0),
        "outcome": r.outcome,
        "steps": r.steps.iter().map(|s| json!({
            "step": s.name,
            "at_ms": s.at.as_secs_f64() * 1000.0,
            "detail": s.detail,
        })).collect::<Vec<_>>(),
    })
}
