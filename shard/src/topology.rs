//! The backend nodes, as one type from the control thread to the shards: what the
//! configuration says of a node (address, role, weight, priority), what an operator did
//! (enabled, draining) and what the health checker last saw (healthy, latency, lag,
//! replay position). The control thread publishes immutable, versioned [`Topology`]
//! snapshots; each shard keeps a [`LocalNode`] copy whose strings are shard-local `Rc`s,
//! so counting a routing decision never touches memory another core writes.

use std::rc::Rc;

use crate::config::{Config, NodeRole};
use crate::nodeaddr::NodeAddr;

/// One backend node. `S` is the string type: `String` where it crosses threads,
/// `Rc<str>` on a shard ([`LocalNode`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Node<S = String> {
    /// "host:port" as configured (the socket file's path for a Unix-socket node): the
    /// node's name in the admin API and pool keys.
    pub address: S,
    pub label: S,
    pub addr: NodeAddr,
    pub role: NodeRole,
    pub weight: u32,
    pub priority: Option<u32>,
    /// Not disabled by configuration or the admin API.
    pub enabled: bool,
    /// Being drained: no new work; connections close as they come back.
    pub draining: bool,
    /// Passing health checks (or not checked yet).
    pub healthy: bool,
    /// Round trip of the last good health check (for latency-based reads).
    pub latency_ms: f64,
    /// Standbys and replicas: how far behind in replay time, when known.
    pub lag_ms: Option<f64>,
    /// Standbys and replicas: WAL position replayed, when known (read-your-writes).
    pub replay_lsn: Option<u64>,
    /// Declared down while primary, or a former primary that came back writable: no
    /// work at all, and every connection to it is cut at once.
    pub fenced: bool,
}

/// A node as a shard holds it.
pub type LocalNode = Node<Rc<str>>;

impl<S> Node<S> {
    /// May this node be given new work?
    pub fn routable(&self) -> bool {
        self.enabled && self.healthy && !self.draining && !self.fenced
    }
}

impl Node {
    /// A configured node before any health check: routable if enabled. The address is
    /// resolved here, once.
    pub fn configured(node: &crate::config::NodeConfig) -> Result<Node, String> {
        let addr = NodeAddr::resolve(&node.host, node.port)
            .map_err(|e| format!("node {}: {e}", node.label()))?;
        Ok(Node {
            address: node.address(),
            label: node.label(),
            addr,
            role: node.role,
            weight: node.weight,
            priority: node.priority,
            enabled: node.enabled,
            draining: false,
            healthy: true,
            latency_ms: 0.0,
            lag_ms: None,
            replay_lsn: None,
            fenced: false,
        })
    }

    /// This node with shard-local strings (and socket path).
    pub fn local(&self) -> LocalNode {
        Node {
            address: self.address.as_str().into(),
            label: self.label.as_str().into(),
            addr: self.addr.detached(),
            role: self.role,
            weight: self.weight,
            priority: self.priority,
            enabled: self.enabled,
            draining: self.draining,
            healthy: self.healthy,
            latency_ms: self.latency_ms,
            lag_ms: self.lag_ms,
            replay_lsn: self.replay_lsn,
            fenced: self.fenced,
        }
    }
}

/// How sure the proxy is of the primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrimaryState {
    /// Named (by the configuration, a promotion or the admin API), not yet seen writable.
    #[default]
    Pending,
    /// Seen writable by a check.
    Confirmed,
    /// None: it was lost and no other is known yet (a failover is under way).
    None,
}

impl PrimaryState {
    pub fn label(self) -> &'static str {
        match self {
            PrimaryState::Pending => "pending",
            PrimaryState::Confirmed => "confirmed",
            PrimaryState::None => "none",
        }
    }
}

/// Immutable, versioned view of every node, published by the control thread.
#[derive(Clone, Debug)]
pub struct Topology {
    pub version: u64,
    pub nodes: Vec<Node>,
    pub primary_state: PrimaryState,
    /// Counts the primaries adopted after a loss (a failover, or the lost primary back):
    /// transaction ids from before a change may have been given out again since.
    pub primary_epoch: u64,
    /// The adopted primary's next transaction id when it was adopted: an id from an
    /// earlier epoch at or above it never committed there.
    pub primary_first_xid: Option<u64>,
}

impl Topology {
    /// What a configuration describes before any health check ran: every enabled node
    /// is routable.
    pub fn configured(config: &Config) -> Result<Topology, String> {
        let nodes = config
            .nodes
            .iter()
            .map(Node::configured)
            .collect::<Result<Vec<_>, String>>()?;
        // Trusted as configured until a check says otherwise.
        Ok(Topology {
            version: 0,
            nodes,
            primary_state: PrimaryState::Confirmed,
            primary_epoch: 0,
            primary_first_xid: None,
        })
    }
}

/// The node writes go to among `nodes`: the primary that may take work, else the
/// configured one (its pool then waits for it); `None` only without a primary.
pub fn primary_of<S>(nodes: &[Node<S>]) -> Option<&Node<S>> {
    let primaries = || nodes.iter().filter(|n| n.role == NodeRole::Primary);
    primaries()
        .find(|n| n.routable())
        .or_else(|| primaries().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(address: &str, role: NodeRole, routable: bool) -> Node {
        Node {
            address: address.into(),
            label: address.into(),
            addr: NodeAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
            role,
            weight: 100,
            priority: None,
            enabled: true,
            draining: false,
            healthy: routable,
            latency_ms: 0.0,
            lag_ms: None,
            replay_lsn: None,
            fenced: false,
        }
    }

    #[test]
    fn the_primary_is_the_routable_one_else_the_configured_one() {
        let nodes = [
            node("a", NodeRole::Primary, false),
            node("b", NodeRole::Standby, true),
            node("c", NodeRole::Primary, true),
        ];
        assert_eq!(primary_of(&nodes).unwrap().address, "c");
        assert_eq!(primary_of(&nodes[..2]).unwrap().address, "a");
        assert!(primary_of(&nodes[1..2]).is_none());
        let local: Vec<LocalNode> = nodes.iter().map(Node::local).collect();
        assert_eq!(&*primary_of(&local).unwrap().address, "c");
    }
}
