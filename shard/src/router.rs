//! Picks the node for each unit of work (a transaction, or a statement outside one) when
//! read/write splitting is on. Writes, and anything not provably read-only, go to the
//! primary; reads go to a standby or replica chosen by the configured strategy, among
//! those that may take work, are within the lag limit and, after the session wrote, have
//! replayed past its write. Everything here is shard-local: the node facts come from the
//! control thread's topology snapshots, the connection counts from this shard's pools.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use hashbrown::HashMap;

use crate::config::{NodeRole, ReadStrategy, RoutingConfig, SchemaRouteConfig};
use crate::sql::route::{RouteAnalysis, RouteHint, TableRef};
use crate::topology::{primary_of, LocalNode};

/// Why a node was chosen; counted per node and logged at debug level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Writes, DDL, locking reads, calls of functions not known to be read-only, and
    /// transactions not declared READ ONLY.
    Write,
    /// A read, balanced over the read nodes.
    Read,
    /// A transaction opened READ ONLY.
    ReadOnlyTransaction,
    HintPrimary,
    HintStandby,
    HintNearest,
    SchemaRoute,
    /// The session wrote and no read node has replayed that far yet.
    ReadYourWrites,
    /// Every read node is further behind than `max_replica_lag_ms` (or its lag is
    /// unknown).
    ReplicaLag,
    /// No standby or replica may take work.
    NoReadNode,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Write => "write_query",
            Reason::Read => "read_query",
            Reason::ReadOnlyTransaction => "read_only_transaction",
            Reason::HintPrimary => "hint_primary",
            Reason::HintStandby => "hint_standby",
            Reason::HintNearest => "hint_nearest",
            Reason::SchemaRoute => "schema_route",
            Reason::ReadYourWrites => "read_your_writes",
            Reason::ReplicaLag => "replica_lag",
            Reason::NoReadNode => "no_read_node",
        }
    }
}

/// Which nodes a read may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Among {
    /// Any standby or replica.
    ReadNodes,
    /// Standbys and replicas of one role.
    Role(NodeRole),
    /// One node, by name or address.
    Node(Rc<str>),
    /// The lowest-latency node that may take work, the primary included.
    Nearest,
}

/// What a unit of work needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Only the primary may run it.
    Primary(Reason),
    /// It only reads.
    Read(Reason, Among),
}

impl Want {
    /// The unit may write (as opposed to a read sent to the primary by a hint, a schema
    /// route or a fallback): read-your-writes must remember where the primary was after it.
    pub fn may_write(&self) -> bool {
        matches!(self, Want::Primary(Reason::Write))
    }
}

/// A configured `[[schema_routes]]` entry, ready to match.
#[derive(Clone, Debug)]
pub struct SchemaRoute {
    tables: Vec<(Option<String>, String)>,
    among: Among,
}

impl SchemaRoute {
    pub fn compile(routes: &[SchemaRouteConfig]) -> Vec<SchemaRoute> {
        routes
            .iter()
            .map(|r| SchemaRoute {
                tables: r
                    .tables
                    .iter()
                    .map(|t| match t.rsplit_once('.') {
                        Some((schema, name)) => {
                            (Some(schema.to_ascii_lowercase()), name.to_ascii_lowercase())
                        }
                        None => (None, t.to_ascii_lowercase()),
                    })
                    .collect(),
                among: match r.target.as_str() {
                    "primary" => Among::Node("primary".into()),
                    "standby" => Among::Role(NodeRole::Standby),
                    "replica" => Among::Role(NodeRole::Replica),
                    node => Among::Node(node.into()),
                },
            })
            .collect()
    }

    fn matches(&self, table: &TableRef) -> bool {
        self.tables.iter().any(|(schema, name)| {
            *name == table.name
                && match (schema, &table.schema) {
                    (Some(s), Some(t)) => s == t,
                    _ => true,
                }
        })
    }
}

/// Decides what a request wants from its analysis. `routes` are the schema routes.
pub fn want(analysis: &RouteAnalysis, routes: &[SchemaRoute]) -> Want {
    // A hot standby refuses SERIALIZABLE, so such a transaction stays on the primary.
    let reads = analysis.read_only
        && (!analysis.begins_transaction
            || (analysis.read_only_transaction && !analysis.serializable));
    if !reads {
        if analysis.hint.is_some_and(|h| h != RouteHint::Primary) {
            log::debug!(
                target: "heliosdb_proxy::routing",
                "ignoring routing hint {:?} on a statement that writes",
                analysis.hint
            );
        }
        // It goes to the primary because it may write, whatever a hint says.
        return Want::Primary(Reason::Write);
    }
    match analysis.hint {
        Some(RouteHint::Primary) => return Want::Primary(Reason::HintPrimary),
        Some(RouteHint::Standby) => return Want::Read(Reason::HintStandby, Among::ReadNodes),
        Some(RouteHint::Nearest) => return Want::Read(Reason::HintNearest, Among::Nearest),
        None => {}
    }
    for route in routes {
        if analysis.tables.iter().any(|t| route.matches(t)) {
            return match &route.among {
                Among::Node(n) if &**n == "primary" => Want::Primary(Reason::SchemaRoute),
                among => Want::Read(Reason::SchemaRoute, among.clone()),
            };
        }
    }
    if analysis.read_only_transaction {
        Want::Read(Reason::ReadOnlyTransaction, Among::ReadNodes)
    } else {
        Want::Read(Reason::Read, Among::ReadNodes)
    }
}

/// The strategy state of one shard, and its decision counts.
pub struct Router {
    next: Cell<usize>,
    /// Smooth weighted round-robin: each node's current weight.
    current: RefCell<Vec<(Rc<str>, i64)>>,
    rng: Cell<u64>,
    decisions: RefCell<HashMap<(Rc<str>, Reason), u64>>,
}

impl Router {
    pub fn new(seed: u64) -> Router {
        Router {
            next: Cell::new(0),
            current: RefCell::new(Vec::new()),
            rng: Cell::new(seed | 1),
            decisions: RefCell::new(HashMap::new()),
        }
    }

    /// The node for `want`, and why. `wrote_at` is the WAL position of the session's last
    /// write (0 if none); `in_use` counts this shard's server connections in use on a
    /// node. `None` only when no primary is configured.
    pub fn choose(
        &self,
        nodes: &[LocalNode],
        want: &Want,
        strategy: ReadStrategy,
        routing: &RoutingConfig,
        wrote_at: u64,
        in_use: &dyn Fn(&LocalNode) -> usize,
    ) -> Option<(LocalNode, Reason)> {
        let primary = || primary_of(nodes).cloned();
        let (reason, among) = match want {
            Want::Primary(reason) => return self.decided(primary()?, *reason),
            Want::Read(reason, among) => (*reason, among),
        };
        let mut candidates: Vec<&LocalNode> = nodes
            .iter()
            .filter(|n| n.routable())
            .filter(|n| match among {
                Among::ReadNodes => n.role != NodeRole::Primary,
                Among::Role(role) => n.role == *role,
                Among::Node(name) => *n.address == **name || *n.label == **name,
                Among::Nearest => true,
            })
            .collect();
        if candidates.is_empty() {
            return self.decided(primary()?, Reason::NoReadNode);
        }
        let fresh = |n: &&LocalNode| {
            n.role == NodeRole::Primary
                || routing.max_replica_lag_ms == 0
                || n.lag_ms
                    .is_some_and(|lag| lag <= routing.max_replica_lag_ms as f64)
        };
        candidates.retain(fresh);
        if candidates.is_empty() {
            return self.decided(primary()?, Reason::ReplicaLag);
        }
        log::trace!(
            target: "heliosdb_proxy::routing",
            "read candidates {:?} (session wrote at {wrote_at})",
            candidates
                .iter()
                .map(|n| (&*n.address, n.replay_lsn, n.lag_ms))
                .collect::<Vec<_>>()
        );
        if routing.read_your_writes && wrote_at > 0 {
            candidates.retain(|n| {
                n.role == NodeRole::Primary || n.replay_lsn.is_some_and(|lsn| lsn >= wrote_at)
            });
            if candidates.is_empty() {
                return self.decided(primary()?, Reason::ReadYourWrites);
            }
        }
        let strategy = if *among == Among::Nearest {
            ReadStrategy::LatencyBased
        } else {
            strategy
        };
        let chosen = self.pick(&candidates, strategy, in_use).clone();
        self.decided(chosen, reason)
    }

    fn pick<'a>(
        &self,
        candidates: &[&'a LocalNode],
        strategy: ReadStrategy,
        in_use: &dyn Fn(&LocalNode) -> usize,
    ) -> &'a LocalNode {
        if candidates.len() == 1 {
            return candidates[0];
        }
        match strategy {
            ReadStrategy::RoundRobin => {
                let i = self.next.get();
                self.next.set(i.wrapping_add(1));
                candidates[i % candidates.len()]
            }
            ReadStrategy::WeightedRoundRobin => self.weighted(candidates),
            ReadStrategy::LeastConnections => {
                // Ties go round-robin, so an idle cluster still spreads its reads.
                let start = self.next.get();
                self.next.set(start.wrapping_add(1));
                let n = candidates.len();
                (0..n)
                    .map(|k| candidates[(start + k) % n])
                    .min_by_key(|c| in_use(c))
                    .expect("candidates")
            }
            ReadStrategy::LatencyBased => candidates
                .iter()
                .copied()
                .min_by(|a, b| a.latency_ms.total_cmp(&b.latency_ms))
                .expect("candidates"),
            ReadStrategy::RandomTwoChoices => {
                let n = candidates.len();
                let a = self.random() as usize % n;
                let b = (a + 1 + self.random() as usize % (n - 1)) % n;
                let (a, b) = (candidates[a], candidates[b]);
                if in_use(b) < in_use(a) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// Smooth weighted round-robin (as in nginx): every node gains its weight, the
    /// heaviest is chosen and pays back the total, so picks interleave in proportion.
    fn weighted<'a>(&self, candidates: &[&'a LocalNode]) -> &'a LocalNode {
        let mut current = self.current.borrow_mut();
        let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
        if total == 0 {
            drop(current);
            return self.pick(candidates, ReadStrategy::RoundRobin, &|_| 0);
        }
        let mut best: Option<(usize, i64)> = None;
        for (i, c) in candidates.iter().enumerate() {
            let slot = match current.iter().position(|(a, _)| *a == c.address) {
                Some(slot) => slot,
                None => {
                    current.push((c.address.clone(), 0));
                    current.len() - 1
                }
            };
            current[slot].1 += i64::from(c.weight);
            if best.is_none_or(|(_, w)| current[slot].1 > w) {
                best = Some((i, current[slot].1));
            }
        }
        let (i, _) = best.expect("candidates");
        if let Some(entry) = current
            .iter_mut()
            .find(|(a, _)| *a == candidates[i].address)
        {
            entry.1 -= total;
        }
        candidates[i]
    }

    /// xorshift64*: cheap and good enough to break ties between two nodes.
    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn decided(&self, node: LocalNode, reason: Reason) -> Option<(LocalNode, Reason)> {
        *self
            .decisions
            .borrow_mut()
            .entry((node.address.clone(), reason))
            .or_insert(0) += 1;
        log::debug!(
            target: "heliosdb_proxy::routing",
            "Routing query to node={} reason={}",
            node.label,
            reason.as_str()
        );
        Some((node, reason))
    }

    /// Decisions so far: (node address, reason, count).
    pub fn decisions(&self) -> Vec<(String, &'static str, u64)> {
        self.decisions
            .borrow()
            .iter()
            .map(|((node, reason), n)| (node.to_string(), reason.as_str(), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(address: &str, role: NodeRole, weight: u32) -> LocalNode {
        LocalNode {
            address: address.into(),
            label: address.into(),
            addr: crate::nodeaddr::NodeAddr::Tcp("127.0.0.1:1".parse().unwrap()),
            role,
            weight,
            priority: None,
            enabled: true,
            draining: false,
            healthy: true,
            latency_ms: 1.0,
            lag_ms: Some(0.0),
            replay_lsn: Some(100),
            fenced: false,
        }
    }

    fn cluster() -> Vec<LocalNode> {
        vec![
            node("p:1", NodeRole::Primary, 100),
            node("s:1", NodeRole::Standby, 100),
            node("r:1", NodeRole::Replica, 300),
        ]
    }

    fn read() -> Want {
        Want::Read(Reason::Read, Among::ReadNodes)
    }

    fn counts(
        router: &Router,
        nodes: &[LocalNode],
        strategy: ReadStrategy,
        n: usize,
    ) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let (chosen, _) = router
                .choose(
                    nodes,
                    &read(),
                    strategy,
                    &RoutingConfig::default(),
                    0,
                    &|_| 0,
                )
                .unwrap();
            *out.entry(chosen.address.to_string()).or_insert(0) += 1;
        }
        out
    }

    #[test]
    fn writes_go_to_the_primary_and_reads_to_read_nodes() {
        let r = Router::new(7);
        let nodes = cluster();
        let cfg = RoutingConfig::default();
        let (n, why) = r
            .choose(
                &nodes,
                &Want::Primary(Reason::Write),
                ReadStrategy::RoundRobin,
                &cfg,
                0,
                &|_| 0,
            )
            .unwrap();
        assert_eq!((&*n.address, why), ("p:1", Reason::Write));
        let c = counts(&r, &nodes, ReadStrategy::RoundRobin, 1000);
        assert_eq!(c.get("p:1"), None);
        assert_eq!((c["s:1"], c["r:1"]), (500, 500));
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let r = Router::new(7);
        let c = counts(&r, &cluster(), ReadStrategy::WeightedRoundRobin, 1000);
        assert_eq!((c["s:1"], c["r:1"]), (250, 750));
    }

    #[test]
    fn least_connections_and_two_choices_prefer_idle_nodes() {
        let r = Router::new(7);
        let nodes = cluster();
        let busy = |n: &LocalNode| if &*n.address == "s:1" { 5 } else { 1 };
        for strategy in [
            ReadStrategy::LeastConnections,
            ReadStrategy::RandomTwoChoices,
        ] {
            for _ in 0..100 {
                let (n, _) = r
                    .choose(
                        &nodes,
                        &read(),
                        strategy,
                        &RoutingConfig::default(),
                        0,
                        &busy,
                    )
                    .unwrap();
                assert_eq!(&*n.address, "r:1");
            }
        }
        // Without a difference, two choices still spreads.
        let c = counts(&r, &nodes, ReadStrategy::RandomTwoChoices, 1000);
        assert!(c["s:1"] > 300 && c["r:1"] > 300, "{c:?}");
    }

    #[test]
    fn latency_based_takes_the_fastest() {
        let r = Router::new(7);
        let mut nodes = cluster();
        nodes[1].latency_ms = 0.2;
        nodes[2].latency_ms = 0.9;
        let c = counts(&r, &nodes, ReadStrategy::LatencyBased, 100);
        assert_eq!(c["s:1"], 100);
        // `nearest` may pick the primary.
        nodes[0].latency_ms = 0.1;
        let (n, why) = r
            .choose(
                &nodes,
                &Want::Read(Reason::HintNearest, Among::Nearest),
                ReadStrategy::RoundRobin,
                &RoutingConfig::default(),
                0,
                &|_| 0,
            )
            .unwrap();
        assert_eq!((&*n.address, why), ("p:1", Reason::HintNearest));
    }

    #[test]
    fn lag_and_read_your_writes_fall_back_to_the_primary() {
        let r = Router::new(7);
        let mut nodes = cluster();
        let cfg = RoutingConfig {
            max_replica_lag_ms: 100,
            ..RoutingConfig::default()
        };
        nodes[1].lag_ms = Some(500.0);
        nodes[2].lag_ms = None;
        let (n, why) = r
            .choose(&nodes, &read(), ReadStrategy::RoundRobin, &cfg, 0, &|_| 0)
            .unwrap();
        assert_eq!((&*n.address, why), ("p:1", Reason::ReplicaLag));
        nodes[2].lag_ms = Some(10.0);
        let (n, _) = r
            .choose(&nodes, &read(), ReadStrategy::RoundRobin, &cfg, 0, &|_| 0)
            .unwrap();
        assert_eq!(&*n.address, "r:1");
        // The session wrote at 150; r:1 has replayed 100 only.
        let (n, why) = r
            .choose(&nodes, &read(), ReadStrategy::RoundRobin, &cfg, 150, &|_| 0)
            .unwrap();
        assert_eq!((&*n.address, why), ("p:1", Reason::ReadYourWrites));
        nodes[2].replay_lsn = Some(150);
        let (n, why) = r
            .choose(&nodes, &read(), ReadStrategy::RoundRobin, &cfg, 150, &|_| 0)
            .unwrap();
        assert_eq!((&*n.address, why), ("r:1", Reason::Read));
    }

    #[test]
    fn unroutable_read_nodes_leave_reads_to_the_primary() {
        let r = Router::new(7);
        let mut nodes = cluster();
        nodes[1].healthy = false;
        nodes[2].healthy = false;
        let (n, why) = r
            .choose(
                &nodes,
                &read(),
                ReadStrategy::RoundRobin,
                &RoutingConfig::default(),
                0,
                &|_| 0,
            )
            .unwrap();
        assert_eq!((&*n.address, why), ("p:1", Reason::NoReadNode));
        let decisions = r.decisions();
        assert_eq!(decisions, vec![("p:1".to_string(), "no_read_node", 1)]);
    }

    #[test]
    fn schema_routes_and_hints_shape_the_want() {
        let routes = SchemaRoute::compile(&[
            SchemaRouteConfig {
                tables: vec!["Events".into(), "audit.log".into()],
                target: "replica".into(),
            },
            SchemaRouteConfig {
                tables: vec!["orders".into()],
                target: "primary".into(),
            },
        ]);
        let table = |schema: Option<&str>, name: &str| TableRef {
            schema: schema.map(str::to_string),
            name: name.into(),
        };
        let read = |tables: Vec<TableRef>| RouteAnalysis {
            read_only: true,
            tables,
            ..RouteAnalysis::default()
        };
        assert_eq!(
            want(&read(vec![table(None, "events")]), &routes),
            Want::Read(Reason::SchemaRoute, Among::Role(NodeRole::Replica))
        );
        assert_eq!(
            want(&read(vec![table(Some("audit"), "log")]), &routes),
            Want::Read(Reason::SchemaRoute, Among::Role(NodeRole::Replica))
        );
        assert_eq!(
            want(&read(vec![table(Some("other"), "log")]), &routes),
            Want::Read(Reason::Read, Among::ReadNodes)
        );
        assert_eq!(
            want(&read(vec![table(None, "orders")]), &routes),
            Want::Primary(Reason::SchemaRoute)
        );
        let mut hinted = read(vec![table(None, "events")]);
        hinted.hint = Some(RouteHint::Primary);
        assert_eq!(want(&hinted, &routes), Want::Primary(Reason::HintPrimary));
        let write = RouteAnalysis {
            read_only: false,
            hint: Some(RouteHint::Standby),
            ..RouteAnalysis::default()
        };
        assert_eq!(want(&write, &routes), Want::Primary(Reason::Write));
        let tx = RouteAnalysis {
            read_only: true,
            begins_transaction: true,
            ..RouteAnalysis::default()
        };
        assert_eq!(want(&tx, &routes), Want::Primary(Reason::Write));
        let ro_tx = RouteAnalysis {
            read_only: true,
            begins_transaction: true,
            read_only_transaction: true,
            ..RouteAnalysis::default()
        };
        assert_eq!(
            want(&ro_tx, &routes),
            Want::Read(Reason::ReadOnlyTransaction, Among::ReadNodes)
        );
    }
}
