use std::time::SystemTime;

use helios_shard::config::{Config, NodeRole};
use helios_shard::topology::{PrimaryState, Topology};

use super::*;
use crate::control::NodeStatus;

fn config(extra: &str) -> Config {
    Config::from_toml_str(
        &format!(
            "{extra}\n[[nodes]]\nhost = \"127.0.0.1\"\nport = 5001\nrole = \"primary\"\n\
             [[nodes]]\nhost = \"127.0.0.1\"\nport = 5002\nrole = \"standby\"\n\
             [[nodes]]\nhost = \"127.0.0.1\"\nport = 5003\nrole = \"standby\"\npriority = 1\n"
        ),
        [],
    )
    .expect("config")
}

fn nodes(config: &Config) -> Vec<NodeStatus> {
    Topology::configured(config)
        .unwrap()
        .nodes
        .iter()
        .map(NodeStatus::configured)
        .collect()
}

fn checked(node: &mut NodeStatus, healthy: bool, in_recovery: bool) {
    node.health.healthy = healthy;
    node.health.last_check = Some(SystemTime::now());
    node.health.in_recovery = Some(in_recovery);
    node.refresh();
}

const A: &str = "127.0.0.1:5001";
const B: &str = "127.0.0.1:5002";
const C: &str = "127.0.0.1:5003";

#[test]
fn the_configured_primary_is_confirmed_once_seen_writable() {
    let config = config("");
    let mut nodes = nodes(&config);
    let mut t = Tracker::new(&nodes);
    assert_eq!(
        (t.primary.as_deref(), t.state),
        (Some(A), PrimaryState::Pending)
    );
    checked(&mut nodes[0], true, false);
    checked(&mut nodes[1], true, true);
    let out = follow(&mut t, &mut nodes, &config);
    assert!(out.changed && !out.promote);
    assert_eq!(t.state, PrimaryState::Confirmed);
    assert_eq!(t.completed, 0, "no failover happened");
}

#[test]
fn a_primary_declared_down_is_fenced_and_a_standby_promoted() {
    let config = config("");
    let mut nodes = nodes(&config);
    let mut t = Tracker::new(&nodes);
    for (i, rec) in [(0, false), (1, true), (2, true)] {
        checked(&mut nodes[i], true, rec);
    }
    follow(&mut t, &mut nodes, &config);
    checked(&mut nodes[0], false, false);
    let out = follow(&mut t, &mut nodes, &config);
    assert_eq!(
        out,
        Follow {
            changed: true,
            promote: true
        }
    );
    assert!(nodes[0].fenced);
    assert!(!nodes[0].routable());
    assert_eq!((t.primary.as_deref(), t.state), (None, PrimaryState::None));
    assert!(nodes.iter().all(|n| n.node.role != NodeRole::Primary));
    // While promoting, a repeated check of the dead node starts nothing new.
    t.promoting = true;
    assert!(!follow(&mut t, &mut nodes, &config).promote);
    // The promoted standby reports it is writable: it is the primary.
    checked(&mut nodes[2], true, false);
    follow(&mut t, &mut nodes, &config);
    assert_eq!(
        (t.primary.as_deref(), t.state),
        (Some(C), PrimaryState::Confirmed)
    );
    assert_eq!(nodes[2].node.role, NodeRole::Primary);
    assert_eq!(t.completed, 1);
    let last = t.last.as_ref().unwrap();
    assert_eq!(last.outcome.as_deref(), Some("completed"));
    assert_eq!(
        (last.from.as_deref(), last.to.as_deref()),
        (Some(A), Some(C))
    );
    // The old primary comes back writable: still fenced, two writable nodes reported.
    checked(&mut nodes[0], true, false);
    follow(&mut t, &mut nodes, &config);
    assert!(nodes[0].fenced && t.split_brain);
    assert_eq!(t.primary.as_deref(), Some(C));
    // Rebuilt as a standby, it serves reads again.
    checked(&mut nodes[0], true, true);
    follow(&mut t, &mut nodes, &config);
    assert!(!nodes[0].fenced && !t.split_brain);
    assert_eq!(nodes[0].node.role, NodeRole::Standby);
}

#[test]
fn without_auto_promote_an_external_promotion_is_followed() {
    let config = config("[failover]\nauto_promote = false\n");
    let mut nodes = nodes(&config);
    let mut t = Tracker::new(&nodes);
    for (i, rec) in [(0, false), (1, true), (2, true)] {
        checked(&mut nodes[i], true, rec);
    }
    follow(&mut t, &mut nodes, &config);
    checked(&mut nodes[0], false, false);
    assert!(!follow(&mut t, &mut nodes, &config).promote);
    checked(&mut nodes[1], true, false);
    follow(&mut t, &mut nodes, &config);
    assert_eq!(t.primary.as_deref(), Some(B));
}

#[test]
fn the_manual_provider_keeps_its_primary_named() {
    let config = config("[topology]\nprovider = \"manual\"\n");
    let mut nodes = nodes(&config);
    let mut t = Tracker::new(&nodes);
    checked(&mut nodes[0], true, false);
    follow(&mut t, &mut nodes, &config);
    checked(&mut nodes[0], false, false);
    let out = follow(&mut t, &mut nodes, &config);
    assert!(out.changed && !out.promote);
    assert!(nodes[0].fenced);
    assert_eq!(
        (t.primary.as_deref(), t.state),
        (Some(A), PrimaryState::None)
    );
    // A writable standby is not adopted by itself.
    checked(&mut nodes[1], true, false);
    follow(&mut t, &mut nodes, &config);
    assert_eq!(t.primary.as_deref(), Some(A));
    // The named primary back: confirmed and unfenced.
    checked(&mut nodes[0], true, false);
    follow(&mut t, &mut nodes, &config);
    assert_eq!(t.state, PrimaryState::Confirmed);
    assert!(!nodes[0].fenced);
}

#[test]
fn a_lone_primary_that_restarts_is_the_primary_again() {
    let config = Config::from_toml_str(
        "[[nodes]]\nhost = \"127.0.0.1\"\nport = 5001\nrole = \"primary\"\n",
        [],
    )
    .unwrap();
    let mut nodes = nodes(&config);
    let mut t = Tracker::new(&nodes);
    checked(&mut nodes[0], true, false);
    follow(&mut t, &mut nodes, &config);
    checked(&mut nodes[0], false, false);
    // No standby to promote: nothing is started, the failover is recorded as failed.
    assert!(!follow(&mut t, &mut nodes, &config).promote);
    assert!(t
        .last
        .as_ref()
        .unwrap()
        .outcome
        .as_deref()
        .unwrap()
        .starts_with("failed"));
    checked(&mut nodes[0], true, false);
    follow(&mut t, &mut nodes, &config);
    assert_eq!(
        (t.primary.as_deref(), t.state),
        (Some(A), PrimaryState::Confirmed)
    );
    assert!(!nodes[0].fenced);
}
