//! The control plane: the threads that are not on the query path. It owns the truth about
//! the nodes (configured, enabled, draining, healthy), publishes it to the shards as
//! versioned topology snapshots, gathers the shards' reports, reloads the configuration,
//! and serves the admin REST API, the metrics and the SQL admin console.

pub mod admin;
pub mod cache;
pub mod console;
pub mod failover;
pub mod health;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod wal;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use helios_shard::config::{Config, ConfigError};
use helios_shard::control::{ControlMsg, Detail, ShardLink, ShardSnapshot};
use helios_shard::topology::{Node, Topology};

/// Primary WAL readings kept for time-lag estimates (a few minutes at 1 s checks).
const PRIMARY_POSITIONS_KEPT: usize = 256;

/// How long a shard may take to answer a report request (it reads its mailbox every
/// 50 ms).
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Re-reads the configuration the way the process first read it (file, environment,
/// command-line flags).
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// What the health checker last learned about a node.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub healthy: bool,
    pub last_check: Option<SystemTime>,
    /// Consecutive failed checks (0 after a good one).
    pub failure_count: u32,
    /// Consecutive good checks (0 after a failed one).
    pub success_count: u32,
    pub last_error: Option<String>,
    /// Round trip of the last good check.
    pub latency_ms: f64,
    /// For standbys and replicas: WAL bytes behind the primary.
    pub replication_lag_bytes: Option<u64>,
    /// For standbys and replicas: seconds since the last replayed transaction, or 0 when
    /// everything received has been replayed.
    pub replication_lag_seconds: Option<f64>,
    /// What the server says it is (`pg_is_in_recovery()`).
    pub in_recovery: Option<bool>,
    /// The primary's current WAL position, or the standby's replay position.
    pub wal_lsn: Option<u64>,
    /// A standby: the name it streams under (what `synchronous_standby_names` matches).
    /// The primary: the names of the standbys it reports as synchronous.
    pub replication_names: Vec<String>,
    /// The next transaction id the server will assign, as last checked.
    pub next_xid: Option<u64>,
}

/// One configured node as the control plane tracks it: the [`Node`] the shards are sent,
/// and the record of its health checks. Reads of the node's own fields go through to it.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub node: Node,
    pub health: Health,
    /// The role in the configuration; `node.role` is the tracked one.
    pub configured_role: helios_shard::config::NodeRole,
    /// Made read-only and fenced by a planned switchover (so not a second primary,
    /// though it is not in recovery), until it is seen as a standby.
    pub switched_out: bool,
}

impl NodeStatus {
    fn configured(node: &Node) -> NodeStatus {
        NodeStatus {
            node: node.clone(),
            health: Health {
                healthy: true,
                ..Health::default()
            },
            configured_role: node.role,
            switched_out: false,
        }
    }

    /// Brings the node's routing view (healthy, latency, lag, replay position) up to
    /// what the health record says.
    fn refresh(&mut self) {
        let h = &self.health;
        self.node.healthy = h.healthy;
        self.node.latency_ms = h.latency_ms;
        self.node.lag_ms = h.replication_lag_seconds.map(|s| s * 1000.0);
        self.node.replay_lsn = h
            .in_recovery
            .unwrap_or(false)
            .then_some(h.wal_lsn)
            .flatten();
    }
}

impl std::ops::Deref for NodeStatus {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::ops::DerefMut for NodeStatus {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

struct State {
    config: Arc<Config>,
    nodes: Vec<NodeStatus>,
    version: u64,
    paused: bool,
    tracker: failover::Tracker,
}

/// Why a control request could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Node not found")]
    NodeNotFound,
    #[error("{0}")]
    InvalidConfig(String),
    /// The request does not fit the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// A failover or switchover was tried and did not succeed (500).
    #[error("{0}")]
    Failed(String),
}

/// What a reload changed.
#[derive(Debug, Default, Clone)]
pub struct ReloadReport {
    /// Keys that differ from the running configuration but need a restart to apply.
    pub restart_required: Vec<String>,
    pub nodes_added: Vec<String>,
    pub nodes_removed: Vec<String>,
    pub changed: bool,
}

pub struct Control {
    links: Vec<ShardLink>,
    state: Mutex<State>,
    loader: Option<ConfigLoader>,
    pub started: SystemTime,
    started_at: Instant,
    /// Raised by every topology change, so the health checker can follow node changes.
    health_epoch: std::sync::atomic::AtomicU64,
    /// Recent (time, WAL position) readings of the primary, to turn a standby's replay
    /// position into how far behind in time it is.
    primary_positions: Mutex<std::collections::VecDeque<(Instant, u64)>>,
    pub metrics: metrics::Exporter,
    /// The admin HTTP server's counters.
    pub admin_http: http::Stats,
    /// When a shard last reported each node as suspect (fast detection).
    suspected: Mutex<std::collections::HashMap<String, Instant>>,
    /// Wakes a node's checker (the suspects channel the health supervisor reads).
    wake_tx: Mutex<Option<crossbeam_channel::Sender<String>>>,
    /// The result cache's epochs (shared with every shard).
    pub cache_epochs: Arc<helios_shard::cache::Epochs>,
}

impl Control {
    pub fn new(
        config: Arc<Config>,
        links: Vec<ShardLink>,
        cache_epochs: Arc<helios_shard::cache::Epochs>,
        loader: Option<ConfigLoader>,
    ) -> Result<Arc<Control>, String> {
        let topology = Topology::configured(&config)?;
        let nodes: Vec<NodeStatus> = topology.nodes.iter().map(NodeStatus::configured).collect();
        let mut tracker = failover::Tracker::new(&nodes);
        if !config.health.enabled {
            // Nothing will check it: the configuration's word stands.
            tracker.state = helios_shard::topology::PrimaryState::Confirmed;
        }
        let metrics = metrics::Exporter::new(links.len());
        Ok(Arc::new(Control {
            metrics,
            admin_http: http::Stats::default(),
            links,
            state: Mutex::new(State {
                config,
                nodes,
                version: 0,
                paused: false,
                tracker,
            }),
            loader,
            started: SystemTime::now(),
            started_at: Instant::now(),
            health_epoch: Default::default(),
            primary_positions: Mutex::default(),
            suspected: Mutex::default(),
            wake_tx: Mutex::default(),
            cache_epochs,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    pub fn config(&self) -> Arc<Config> {
        self.state().config.clone()
    }

    pub fn nodes(&self) -> Vec<NodeStatus> {
        self.state().nodes.clone()
    }

    pub fn node(&self, address: &str) -> Option<NodeStatus> {
        self.state()
            .nodes
            .iter()
            .find(|n| n.address == address)
            .cloned()
    }

    pub fn shard_links(&self) -> &[ShardLink] {
        &self.links
    }

    pub fn paused(&self) -> bool {
        self.state().paused
    }

    /// Bumped on every topology or configuration change.
    pub fn epoch(&self) -> u64 {
        self.health_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sends the current topology to every shard.
    fn publish(&self, state: &mut State) {
        state.version += 1;
        let topology = Arc::new(Topology {
            version: state.version,
            nodes: state.nodes.iter().map(|n| n.node.clone()).collect(),
            primary_state: state.tracker.state,
            primary_epoch: state.tracker.epoch,
            primary_first_xid: state.tracker.first_xid,
        });
        self.health_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.broadcast(|| ControlMsg::Topology(topology.clone()));
    }

    fn broadcast(&self, msg: impl Fn() -> ControlMsg) {
        for link in &self.links {
            let _ = link.mailbox.send(msg());
        }
    }

    /// Applies `change` to one node; republishes the topology when routing changed.
    pub fn update_node(
        &self,
        address: &str,
        change: impl FnOnce(&mut NodeStatus),
    ) -> Result<NodeStatus, ControlError> {
        let mut state = self.state();
        let node = state
            .nodes
            .iter_mut()
            .find(|n| n.address == address)
            .ok_or(ControlError::NodeNotFound)?;
        let before = node.node.clone();
        change(node);
        node.refresh();
        let status = node.clone();
        if status.node != before {
            self.publish(&mut state);
        }
        Ok(status)
    }

    /// `POST /nodes/{address}/enable|disable`: the node takes new work again, or none.
    pub fn set_enabled(&self, address: &str, enabled: bool) -> Result<NodeStatus, ControlError> {
        let status = self.update_node(address, |n| {
            n.enabled = enabled;
            if enabled {
                n.draining = false;
            }
        })?;
        log::info!(
            "node {address} {} by the admin API",
            if enabled { "enabled" } else { "disabled" }
        );
        Ok(status)
    }

    /// `POST /nodes/{address}/drain`: no new work; idle connections close now, lent ones
    /// as they come back. Progress shows in `/pools`.
    pub fn drain(&self, address: &str) -> Result<NodeStatus, ControlError> {
        let status = self.update_node(address, |n| n.draining = true)?;
        log::info!("node {address} draining by the admin API");
        Ok(status)
    }

    /// Asks every shard for its report.
    pub fn gather(&self, detail: Detail) -> Vec<ShardSnapshot> {
        let (reply, replies) = crossbeam_channel::unbounded();
        let mut asked = 0;
        for link in &self.links {
            let msg = ControlMsg::Snapshot {
                detail,
                reply: reply.clone(),
            };
            if link.mailbox.send(msg).is_ok() {
                asked += 1;
            }
        }
        drop(reply);
        let deadline = Instant::now() + SHARD_REPLY_TIMEOUT;
        let mut snapshots = Vec::with_capacity(asked);
        while snapshots.len() < asked {
            let left = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(left) {
                Ok(s) => snapshots.push(s),
                Err(_) => break,
            }
        }
        snapshots.sort_by_key(|s| s.shard);
        snapshots
    }

    /// PAUSE (`true`) or RESUME (`false`) on every shard.
    pub fn set_paused(&self, paused: bool) {
        self.state().paused = paused;
        self.broadcast(|| ControlMsg::Pause(paused));
    }

    /// Disconnects the client with proxy id `pid` (SHOW CLIENTS' `id`); false if no
    /// shard has it.
    pub fn kill_client(&self, pid: i32) -> bool {
        let Some(link) = helios_shard::cancel::shard_of_id(pid).and_then(|s| self.links.get(s))
        else {
            return false;
        };
        let (reply, answer) = crossbeam_channel::bounded(1);
        if link
            .mailbox
            .send(ControlMsg::KillClient { pid, reply })
            .is_err()
        {
            return false;
        }
        answer.recv_timeout(SHARD_REPLY_TIMEOUT).unwrap_or(false)
    }

    /// Re-reads the configuration and applies what can change while running: nodes,
    /// weights, pool sizes, timeouts, users, health checks, admin settings. An invalid
    /// file changes nothing.
    pub fn reload(&self) -> Result<ReloadReport, ControlError> {
        let loader = self
            .loader
            .as_ref()
            .ok_or_else(|| ControlError::InvalidConfig("no configuration to reload".into()))?;
        let mut fresh = loader().map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        let topology =
            Topology::configured(&fresh).map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        let mut state = self.state();
        let old = state.config.clone();
        let mut report = ReloadReport::default();
        // What the running process cannot change: keep it, and say so.
        if fresh.listen_address != old.listen_address {
            report.restart_required.push("listen_address".into());
            fresh.listen_address = old.listen_address.clone();
        }
        if fresh.admin_address != old.admin_address {
            report.restart_required.push("admin_address".into());
            fresh.admin_address = old.admin_address.clone();
        }
        if fresh.workers != old.workers {
            report.restart_required.push("workers".into());
            fresh.workers = old.workers;
        }
        if fresh.admin_api != old.admin_api {
            // The admin server sized its pool and limits at start-up.
            report.restart_required.push("admin_api".into());
            fresh.admin_api = old.admin_api.clone();
        }
        report.changed = fresh != *old;
        let mut nodes: Vec<NodeStatus> = Vec::with_capacity(topology.nodes.len());
        for fresh_node in &topology.nodes {
            let mut status = NodeStatus::configured(fresh_node);
            match state.nodes.iter().find(|n| n.address == fresh_node.address) {
                Some(current) => {
                    // Health and an operator's drain carry over; `enabled` follows the
                    // file only when the file changed it.
                    status.health = current.health.clone();
                    status.draining = current.draining;
                    // What failovers decided outlives a reload: a fenced former primary
                    // stays fenced, and the tracked primary keeps its role.
                    status.node.fenced = current.node.fenced;
                    status.switched_out = current.switched_out;
                    status.refresh();
                    let was_configured = old
                        .nodes
                        .iter()
                        .find(|n| n.address() == fresh_node.address)
                        .map(|n| n.enabled);
                    status.enabled = if was_configured == Some(fresh_node.enabled) {
                        current.enabled
                    } else {
                        fresh_node.enabled
                    };
                }
                None => report.nodes_added.push(fresh_node.address.clone()),
            }
            nodes.push(status);
        }
        for gone in &state.nodes {
            if !nodes.iter().any(|n| n.address == gone.address) {
                report.nodes_removed.push(gone.address.clone());
            }
        }
        if let Some(primary) = state.tracker.primary.clone() {
            if !nodes.iter().any(|n| n.address == primary) {
                // The tracked primary left the configuration: none is known until a check
                // confirms one (clients wait in the switchover buffer meanwhile, rather
                // than find a topology with no primary at all).
                state.tracker.primary = None;
                state.tracker.state = helios_shard::topology::PrimaryState::None;
            }
        }
        failover::set_roles(&mut nodes, state.tracker.primary.as_deref());
        let fresh = Arc::new(fresh);
        state.config = fresh.clone();
        state.nodes = nodes;
        for link in &self.links {
            // Each shard gets its own copy, as at startup.
            let _ = link
                .mailbox
                .send(ControlMsg::Config(Arc::new((*fresh).clone())));
        }
        self.publish(&mut state);
        log::info!(
            "configuration reloaded ({}; nodes added {:?}, removed {:?}{})",
            if report.changed {
                "changed"
            } else {
                "unchanged"
            },
            report.nodes_added,
            report.nodes_removed,
            if report.restart_required.is_empty() {
                String::new()
            } else {
                format!(
                    "; needs a restart to change {}",
                    report.restart_required.join(", ")
                )
            }
        );
        drop(state);
        // A snapshot travels each shard's mailbox behind the new configuration: once all
        // have answered, a client that connects after the reload meets the new settings.
        self.gather(Detail::default());
        Ok(report)
    }

    /// Records the primary's WAL position as read at `at`.
    pub fn primary_position(&self, at: Instant, lsn: u64) {
        let mut seen = self
            .primary_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.push_back((at, lsn));
        while seen.len() > PRIMARY_POSITIONS_KEPT {
            seen.pop_front();
        }
    }

    /// How long ago the primary was at or before `replayed`, judged from its readings:
    /// a standby that has replayed that far is at most this far behind in time. `None`
    /// without readings.
    pub fn behind_primary(&self, replayed: u64, now: Instant) -> Option<Duration> {
        let seen = self
            .primary_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (_, latest) = *seen.back()?;
        if replayed >= latest {
            // Caught up with the newest reading.
            return Some(Duration::ZERO);
        }
        // The newest reading at or below what was replayed; past the oldest, its age.
        let at = seen
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replayed)
            .map_or(seen.front()?.0, |(at, _)| *at);
        Some(now.saturating_duration_since(at))
    }

    /// Ready when at least one enabled node passes its health checks.
    pub fn ready(&self) -> bool {
        self.state()
            .nodes
            .iter()
            .any(|n| n.enabled && n.health.healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> Arc<Control> {
        let config =
            Config::from_toml_str("[[nodes]]\nhost = \"127.0.0.1\"\n", []).expect("config");
        Control::new(Arc::new(config), Vec::new(), Arc::default(), None).expect("control")
    }

    #[test]
    fn time_behind_the_primary_comes_from_its_readings() {
        let c = control();
        let t0 = Instant::now();
        assert_eq!(c.behind_primary(10, t0), None);
        for (i, lsn) in [100u64, 200, 300].iter().enumerate() {
            c.primary_position(t0 + Duration::from_secs(i as u64), *lsn);
        }
        let now = t0 + Duration::from_secs(5);
        // Caught up with the newest reading.
        assert_eq!(c.behind_primary(300, now), Some(Duration::ZERO));
        // Replayed as far as the reading taken at t0+1 s: 4 s behind.
        assert_eq!(c.behind_primary(250, now), Some(Duration::from_secs(4)));
        // Older than every reading: at least as old as the oldest.
        assert_eq!(c.behind_primary(50, now), Some(Duration::from_secs(5)));
    }
}
