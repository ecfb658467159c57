//! Which node is the primary, and what happens when it is lost.
//!
//! The [`Tracker`] follows the primary through three states — pending (named, not yet
//! seen writable), confirmed, none (lost; a failover is under way) — from what the health
//! checks observe, under one of two topology providers: `postgres` (the primary is
//! whichever enabled node reports `pg_is_in_recovery() = false`) or `manual` (only the
//! admin API names it). It also fences: a primary declared down gets no more work and
//! every connection to it is cut, and a former primary that comes back writable stays
//! fenced until it is a standby or an operator names it primary. The control plane
//! publishes every change to every shard at once.
//!
//! Promotion itself ([`promote`]) runs on its own thread: rank the standbys, promote the
//! best with `pg_promote()`, confirm, and hand the result back to the tracker.

mod ops;
pub mod promote;
mod switchover;

use std::time::{Duration, Instant, SystemTime};

use helios_shard::config::{Config, NodeRole, TopologyProviderKind};
use helios_shard::topology::PrimaryState;

use super::NodeStatus;

/// One step of a failover, with when it happened.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: &'static str,
    /// Since the failover began.
    pub at: Duration,
    pub detail: String,
}

/// One failover (or switchover), from its trigger to its end.
#[derive(Clone, Debug)]
pub struct FailoverRecord {
    /// `primary_down`, `primary_demoted`, `admin` or `switchover`.
    pub trigger: &'static str,
    pub from: Option<String>,
    pub to: Option<String>,
    pub started: SystemTime,
    began: Instant,
    pub steps: Vec<Step>,
    /// `None` while under way; then `completed` or what went wrong.
    pub outcome: Option<String>,
    pub duration: Option<Duration>,
}

impl FailoverRecord {
    pub fn begin(trigger: &'static str, from: Option<String>) -> FailoverRecord {
        let mut record = FailoverRecord {
            trigger,
            from: from.clone(),
            to: None,
            started: SystemTime::now(),
            began: Instant::now(),
            steps: Vec::new(),
            outcome: None,
            duration: None,
        };
        record.step(
            "detected",
            format!("{trigger}: primary {}", from.as_deref().unwrap_or("(none)")),
        );
        record
    }

    /// Adds a step, logged with its time since the start.
    pub fn step(&mut self, name: &'static str, detail: impl Into<String>) {
        let at = self.began.elapsed();
        let detail = detail.into();
        log::warn!(
            "failover step {name} at {:.0} ms: {detail}",
            at.as_secs_f64() * 1000.0
        );
        self.steps.push(Step { name, at, detail });
    }

    fn end(&mut self, outcome: impl Into<String>) {
        self.outcome = Some(outcome.into());
        self.duration = Some(self.began.elapsed());
    }
}

/// The tracker's state; lives with the nodes under the control plane's lock.
#[derive(Debug)]
pub struct Tracker {
    pub primary: Option<String>,
    pub state: PrimaryState,
    /// The failover under way.
    pub current: Option<FailoverRecord>,
    /// The last one that ended.
    pub last: Option<FailoverRecord>,
    /// Failovers completed since start.
    pub completed: u64,
    /// Durations of completed failovers, for the histogram (taken by the exporter).
    pub durations: Vec<Duration>,
    /// A promotion thread is running.
    pub promoting: bool,
    /// A planned switchover is under way: the tracker leaves the nodes to it.
    pub switching: bool,
    /// More than one node reports itself writable.
    pub split_brain: bool,
    /// Names of the standbys the primary last reported as synchronous.
    pub sync_standbys: Vec<String>,
    /// The primary declared down, while no other has taken its place: should it come
    /// back writable before any standby was promoted, it is the primary again.
    pub lost_primary: Option<String>,
    /// Primaries adopted after a loss so far (see `Topology::primary_epoch`).
    pub epoch: u64,
    /// The last adopted one's next transaction id when adopted.
    pub first_xid: Option<u64>,
}

impl Tracker {
    /// The configured primary, pending until a check sees it writable.
    pub fn new(nodes: &[NodeStatus]) -> Tracker {
        Tracker {
            primary: nodes
                .iter()
                .find(|n| n.role == NodeRole::Primary)
                .map(|n| n.address.clone()),
            state: PrimaryState::Pending,
            current: None,
            last: None,
            completed: 0,
            durations: Vec::new(),
            promoting: false,
            switching: false,
            split_brain: false,
            sync_standbys: Vec::new(),
            lost_primary: None,
            epoch: 0,
            first_xid: None,
        }
    }

    /// Names `address` primary (a promotion finished, or an operator said so) and
    /// ends the failover under way.
    pub fn adopt(&mut self, nodes: &mut [NodeStatus], address: &str, state: PrimaryState) {
        let new_timeline = self.current.is_some()
            || self.state == PrimaryState::None
            || self.primary.as_deref() != Some(address);
        if new_timeline {
            // Transaction ids handed out before may be handed out again from here on:
            // note where this primary's own began.
            self.epoch += 1;
            self.first_xid = nodes
                .iter()
                .find(|n| n.address == address)
                .and_then(|n| n.health.next_xid);
        }
        self.primary = Some(address.to_string());
        self.lost_primary = None;
        self.state = state;
        if let Some(node) = nodes.iter_mut().find(|n| n.address == address) {
            node.fenced = false;
        }
        if let Some(mut record) = self.current.take() {
            record.to = Some(address.to_string());
            record.step("resumed", format!("primary {address}"));
            record.end("completed");
            self.completed += 1;
            if let Some(duration) = record.duration {
                self.durations.push(duration);
            }
            log::warn!(
                "failover completed in {:.0} ms: new primary {address}",
                record.duration.unwrap_or_default().as_secs_f64() * 1000.0
            );
            self.last = Some(record);
        }
        set_roles(nodes, self.primary.as_deref());
    }

    /// Ends the failover under way without a primary (promotion failed or was refused).
    pub fn fail(&mut self, why: &str) {
        if let Some(mut record) = self.current.take() {
            record.step("failed", why);
            record.end(format!("failed: {why}"));
            self.last = Some(record);
        }
    }
}

/// What the control plane must do after [`follow`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Follow {
    /// The topology changed: publish it.
    pub changed: bool,
    /// Start promoting a standby.
    pub promote: bool,
}

/// What the tracked primary's latest check means.
enum PrimaryNews {
    Nothing,
    /// Removed from the configuration by a reload.
    Gone,
    /// Declared down (`true`), or reporting it is in recovery.
    Lost {
        down: bool,
    },
    /// Named but not confirmed, and now seen writable.
    Confirmed,
}

/// Brings the tracker up to date with the nodes' latest checks.
pub fn follow(tracker: &mut Tracker, nodes: &mut [NodeStatus], config: &Config) -> Follow {
    let provider = config.topology.provider;
    let mut out = Follow::default();
    if tracker.switching {
        return out;
    }
    if let Some(address) = tracker.primary.clone() {
        let news = match nodes.iter().find(|n| n.address == address) {
            None => PrimaryNews::Gone,
            Some(node) if !node.health.healthy && !node.fenced => PrimaryNews::Lost { down: true },
            Some(node)
                if provider == TopologyProviderKind::Postgres
                    && node.health.healthy
                    && node.health.in_recovery == Some(true) =>
            {
                PrimaryNews::Lost { down: false }
            }
            Some(node) if tracker.state != PrimaryState::Confirmed && writable(node) => {
                PrimaryNews::Confirmed
            }
            Some(_) => PrimaryNews::Nothing,
        };
        match news {
            PrimaryNews::Nothing => {}
            PrimaryNews::Gone => {
                tracker.primary = None;
                tracker.state = PrimaryState::None;
                out.changed = true;
            }
            PrimaryNews::Lost { down } => {
                let trigger = if down {
                    "primary_down"
                } else {
                    "primary_demoted"
                };
                let mut record = FailoverRecord::begin(trigger, Some(address.clone()));
                if down {
                    tracker.lost_primary = Some(address.clone());
                    if let Some(node) = nodes.iter_mut().find(|n| n.address == address) {
                        node.fenced = true;
                        record.step(
                            "fenced",
                            format!(
                                "{address}: every connection cut, no new work ({})",
                                node.health.last_error.as_deref().unwrap_or("checks failed")
                            ),
                        );
                    }
                }
                if provider == TopologyProviderKind::Postgres {
                    tracker.primary = None;
                }
                tracker.state = PrimaryState::None;
                tracker.current.get_or_insert(record);
                out.changed = true;
                out.promote = down
                    && config.failover.auto_promote
                    && provider == TopologyProviderKind::Postgres
                    && !tracker.promoting;
            }
            PrimaryNews::Confirmed => {
                if let Some(record) = tracker.current.as_mut() {
                    record.step("confirmed", format!("{address} is writable"));
                }
                tracker.adopt(nodes, &address, PrimaryState::Confirmed);
                out.changed = true;
            }
        }
    }
    if tracker.primary.is_none() && provider == TopologyProviderKind::Postgres {
        // An external manager (or our own promotion) made a node writable: that one.
        let adopted = nodes
            .iter()
            .filter(|n| n.enabled && !n.fenced && writable(n))
            .min_by_key(|n| (n.priority.unwrap_or(u32::MAX), n.address.clone()))
            .map(|n| n.address.clone());
        // Else the lost primary itself, back before anything took its place (a restart
        // with no standby to promote): nothing else can have taken writes meanwhile.
        let returned = tracker
            .lost_primary
            .clone()
            .filter(|_| adopted.is_none() && !tracker.promoting)
            .filter(|lost| {
                nodes
                    .iter()
                    .any(|n| &n.address == lost && n.enabled && writable(n))
            });
        if let Some(address) = adopted.or(returned) {
            if let Some(record) = tracker.current.as_mut() {
                record.step(
                    "confirmed",
                    format!("{address} reports it is not in recovery"),
                );
            }
            tracker.adopt(nodes, &address, PrimaryState::Confirmed);
            out.changed = true;
        }
    }
    // A fenced former primary that came back as a standby may serve reads again.
    for node in nodes.iter_mut() {
        if node.fenced
            && node.health.healthy
            && node.health.in_recovery == Some(true)
            && tracker.primary.as_deref() != Some(&node.address)
        {
            log::info!("node {} is a standby now: no longer fenced", node.address);
            node.fenced = false;
            node.switched_out = false;
            out.changed = true;
        }
    }
    // A node adopted above (or still named) needs no promotion; nor can one happen
    // without a standby to promote (then the lost primary's return is awaited).
    out.promote &= tracker.primary.is_none();
    if out.promote && !nodes.iter().any(promotable) {
        out.promote = false;
        tracker.fail("no healthy, enabled standby to promote");
    }
    out.changed |= set_roles(nodes, tracker.primary.as_deref());
    let writers: Vec<&str> = nodes
        .iter()
        .filter(|n| writable(n) && !n.switched_out)
        .map(|n| n.address.as_str())
        .collect();
    let split = writers.len() > 1;
    if split != tracker.split_brain {
        if split {
            log::error!(
                "more than one node is writable: {} (only {} gets writes)",
                writers.join(", "),
                tracker.primary.as_deref().unwrap_or("none")
            );
        } else {
            log::info!("only one node is writable again");
        }
        tracker.split_brain = split;
    }
    out
}

/// A standby that could be promoted: enabled, not fenced, healthy, in recovery.
fn promotable(node: &NodeStatus) -> bool {
    node.enabled && !node.fenced && node.health.healthy && node.health.in_recovery == Some(true)
}

/// Seen healthy and not in recovery by its last check.
pub fn writable(node: &NodeStatus) -> bool {
    node.health.healthy
        && node.health.last_check.is_some()
        && node.health.in_recovery == Some(false)
}

/// The tracked primary gets the primary role; a configured primary that is not it
/// serves as a standby. True when a role changed.
pub(crate) fn set_roles(nodes: &mut [NodeStatus], primary: Option<&str>) -> bool {
    let mut changed = false;
    for node in nodes.iter_mut() {
        let role = if primary == Some(node.address.as_str()) {
            NodeRole::Primary
        } else if node.configured_role == NodeRole::Primary {
            NodeRole::Standby
        } else {
            node.configured_role
        };
        if node.node.role != role {
            node.node.role = role;
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests;
