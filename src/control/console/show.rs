//! The SHOW commands: PgBouncer's column names, filled from what the proxy measures.
//! A column the proxy does not measure is NULL rather than a made-up number (see the
//! README's "SQL admin console" section for each column's meaning here).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::SystemTime;

use helios_shard::config::{Config, PoolMode};
use helios_shard::control::{ConsoleResult, Detail, ShardSnapshot};
use serde_json::Value;

use super::parse::{Show, COMMANDS};
use crate::control::admin::{iso8601, redact, role_name};
use crate::control::Control;

type Cell = Option<String>;

/// Runs one SHOW.
pub fn show(control: &Control, what: Show) -> ConsoleResult {
    match what {
        Show::Pools => pools(control),
        Show::Stats => stats(control),
        Show::Clients => clients(control),
        Show::Servers => servers(control),
        Show::Databases => databases(control),
        Show::Config => config(control),
        Show::Version => table(
            &["version"],
            vec![vec![text(format!(
                "HeliosProxy {}",
                env!("CARGO_PKG_VERSION")
            ))]],
        ),
        Show::Users => users(control),
        Show::Nodes => nodes(control),
        Show::State => state(control),
        Show::Cache => cache(control),
        Show::Help => table(
            &["command", "description"],
            COMMANDS
                .iter()
                .map(|(syntax, what)| vec![text(syntax), text(what)])
                .collect(),
        ),
    }
}

fn table(columns: &[&str], rows: Vec<Vec<Cell>>) -> ConsoleResult {
    ConsoleResult {
        columns: columns.iter().map(|c| c.to_string()).collect(),
        rows,
        tag: "SHOW".into(),
    }
}

fn text(value: impl ToString) -> Cell {
    Some(value.to_string())
}

/// PgBouncer's timestamp format, e.g. `2026-03-26 10:15:30 UTC`.
fn timestamp(t: SystemTime) -> Cell {
    let iso = iso8601(t);
    Some(format!("{} {} UTC", &iso[..10], &iso[11..19]))
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
        PoolMode::Statement => "statement",
    }
}

/// The pool mode a (database, user) row shows; PgBouncer shows its own admin database
/// as `statement`.
fn row_mode(config: &Config, database: &str, user: &str) -> &'static str {
    if helios_shard::session::console::is_console(database) {
        "statement"
    } else {
        mode_name(config.pool_mode_for(user, database))
    }
}

fn flag(on: bool) -> Cell {
    text(u8::from(on))
}

/// Per (database, user), summed over shards and nodes.
#[derive(Default)]
struct PoolRow {
    clients: usize,
    waiting: usize,
    active: usize,
    idle: usize,
    max_wait_us: u64,
}

fn pools(control: &Control) -> ConsoleResult {
    let config = control.config();
    let snapshots = control.gather(Detail {
        clients: true,
        servers: false,
    });
    let mut rows: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
    for pool in snapshots.iter().flat_map(|s| &s.pools) {
        let row = rows
            .entry((pool.database.clone(), pool.user.clone()))
            .or_default();
        row.waiting += pool.waiting;
        row.active += pool.active();
        row.idle += pool.idle;
        row.max_wait_us = row.max_wait_us.max(pool.max_wait_us);
    }
    for client in snapshots.iter().flat_map(|s| &s.clients) {
        rows.entry((client.database.clone(), client.user.clone()))
            .or_default()
            .clients += 1;
    }
    let rows = rows
        .into_iter()
        .map(|((database, user), row)| {
            let mode = row_mode(&config, &database, &user);
            // A session-mode client registers once it has its server; a pooled one
            // registers first and may then wait.
            let cl_active = if mode == "session" {
                row.clients
            } else {
                row.clients.saturating_sub(row.waiting)
            };
            vec![
                text(&database),
                text(&user),
                text(cl_active),
                text(row.waiting),
                text(0),
                text(0),
                text(row.active),
                text(0),
                text(0),
                text(row.idle),
                text(0),
                text(0),
                text(0),
                text(row.max_wait_us / 1_000_000),
                text(row.max_wait_us % 1_000_000),
                text(mode),
            ]
        })
        .collect();
    table(
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
        ],
        rows,
    )
}

/// The name of SHOW STATS' row of process-wide totals.
pub const ALL_DATABASES: &str = "(all)";

/// Totals the proxy keeps per process (per shard), not per database.
#[derive(Default)]
struct Totals {
    queries: u64,
    received: u64,
    sent: u64,
    query_time_us: u64,
    timed_queries: u64,
}

fn stats(control: &Control) -> ConsoleResult {
    let snapshots = control.gather(Detail::default());
    let uptime = control.uptime().as_secs().max(1);
    // (leases, wait µs) per database.
    let mut per_db: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for pool in snapshots.iter().flat_map(|s| &s.pools) {
        let entry = per_db.entry(pool.database.clone()).or_default();
        entry.0 += pool.leases;
        entry.1 += pool.wait_us;
    }
    let mut totals = Totals::default();
    for link in control.shard_links() {
        let s = &link.stats;
        totals.queries += s.queries.get();
        totals.received += s.bytes_from_clients.get();
        totals.sent += s.bytes_to_clients.get();
        for (count, sum) in s.query_duration.read() {
            totals.timed_queries += count;
            totals.query_time_us += sum;
        }
    }
    let avg = |total: u64, n: u64| text(total.checked_div(n).unwrap_or(0));
    let mut rows: Vec<Vec<Cell>> = per_db
        .iter()
        .map(|(database, &(xacts, wait_us))| {
            vec![
                text(database),
                text(xacts),
                None,
                None,
                None,
                None,
                None,
                text(wait_us),
                avg(xacts, uptime),
                None,
                None,
                None,
                None,
                None,
                avg(wait_us, xacts),
            ]
        })
        .collect();
    let xacts: u64 = per_db.values().map(|v| v.0).sum();
    let wait_us: u64 = per_db.values().map(|v| v.1).sum();
    rows.push(vec![
        text(ALL_DATABASES),
        text(xacts),
        text(totals.queries),
        text(totals.received),
        text(totals.sent),
        None,
        text(totals.query_time_us),
        text(wait_us),
        avg(xacts, uptime),
        avg(totals.queries, uptime),
        avg(totals.received, uptime),
        avg(totals.sent, uptime),
        None,
        avg(totals.query_time_us, totals.timed_queries),
        avg(wait_us, xacts),
    ]);
    table(
        &[
            "database",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "avg_xact_count",
            "avg_query_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
        ],
        rows,
    )
}

/// SHOW CLIENTS and SHOW SERVERS share PgBouncer's column set.
const SOCKET_COLUMNS: [&str; 19] = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "id",
];

fn clients(control: &Control) -> ConsoleResult {
    let config = control.config();
    let listen: Option<SocketAddr> = config.listen_address.parse().ok();
    let snapshots = control.gather(Detail {
        clients: true,
        servers: false,
    });
    let mut list: Vec<_> = snapshots.iter().flat_map(|s| &s.clients).collect();
    list.sort_by_key(|c| c.pid);
    let rows = list
        .into_iter()
        .map(|c| {
            vec![
                text("C"),
                text(&c.user),
                text(&c.database),
                text("active"),
                c.addr.map(|a| a.ip().to_string()),
                c.addr.map(|a| a.port().to_string()),
                listen.map(|a| a.ip().to_string()),
                listen.map(|a| a.port().to_string()),
                timestamp(c.connected),
                None,
                None,
                None,
                text(0),
                text(format!("{:x}", c.pid)),
                c.server.as_ref().map(|a| a.to_string()),
                text(0),
                text(""),
                text(&c.application_name),
                text(c.pid),
            ]
        })
        .collect();
    table(&SOCKET_COLUMNS, rows)
}

fn servers(control: &Control) -> ConsoleResult {
    let nodes = control.nodes();
    let snapshots = control.gather(Detail {
        clients: false,
        servers: true,
    });
    let mut list: Vec<_> = snapshots.iter().flat_map(|s| &s.servers).collect();
    list.sort_by_key(|s| s.id);
    let rows = list
        .into_iter()
        .map(|s| {
            // Connections of a node that takes no new work close as they come back.
            let closing = nodes
                .iter()
                .find(|n| n.address == s.node)
                .is_some_and(|n| !n.enabled || n.draining);
            vec![
                text("S"),
                text(&s.user),
                text(&s.database),
                text(if s.idle { "idle" } else { "active" }),
                text(s.addr.host()),
                text(s.addr.port()),
                None,
                (s.local_port != 0).then(|| s.local_port.to_string()),
                s.connected.and_then(timestamp),
                None,
                text(0),
                text(0),
                flag(closing),
                text(format!("{:x}", s.id)),
                None,
                text(s.backend_pid),
                text(""),
                None,
                text(s.id),
            ]
        })
        .collect();
    table(&SOCKET_COLUMNS, rows)
}

/// Database names clients used (pools exist for them) or the configuration names.
fn database_names(config: &Config, snapshots: &[ShardSnapshot]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = config.databases.iter().map(|d| d.name.clone()).collect();
    names.extend(
        snapshots
            .iter()
            .flat_map(|s| &s.pools)
            .map(|p| p.database.clone()),
    );
    names
}

fn databases(control: &Control) -> ConsoleResult {
    let config = control.config();
    let snapshots = control.gather(Detail::default());
    let paused = control.paused();
    let mut rows = Vec::new();
    for name in database_names(&config, &snapshots) {
        let mode = config
            .databases
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| d.pool_mode)
            .unwrap_or(config.pool_mode.mode);
        for node in control.nodes() {
            let current: usize = snapshots
                .iter()
                .flat_map(|s| &s.pools)
                .filter(|p| p.database == name && p.node == node.address)
                .map(|p| p.total)
                .sum();
            rows.push(vec![
                text(&name),
                text(node.addr.host()),
                text(node.addr.port()),
                text(&name),
                None,
                text(config.pool_mode.max_pool_size),
                text(config.pool_mode.min_idle),
                text(0),
                text(mode_name(mode)),
                text(0),
                text(current),
                flag(paused),
                flag(!node.enabled || node.draining),
            ]);
        }
    }
    table(
        &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool",
            "pool_mode",
            "max_connections",
            "current_connections",
            "paused",
            "disabled",
        ],
        rows,
    )
}

fn users(control: &Control) -> ConsoleResult {
    let config = control.config();
    let snapshots = control.gather(Detail {
        clients: true,
        servers: false,
    });
    let rows = config
        .users
        .iter()
        .map(|u| {
            let servers: usize = snapshots
                .iter()
                .flat_map(|s| &s.pools)
                .filter(|p| p.user == u.name)
                .map(|p| p.total)
                .sum();
            let clients = snapshots
                .iter()
                .flat_map(|s| &s.clients)
                .filter(|c| c.user == u.name)
                .count();
            vec![
                text(&u.name),
                text(config.pool_mode.max_pool_size),
                text(0),
                u.pool_mode.map(|m| mode_name(m).to_string()),
                text(0),
                text(servers),
                text(0),
                text(clients),
            ]
        })
        .collect();
    table(
        &[
            "name",
            "pool_size",
            "reserve_pool_size",
            "pool_mode",
            "max_user_connections",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
        ],
        rows,
    )
}

fn nodes(control: &Control) -> ConsoleResult {
    let rows = control
        .nodes()
        .iter()
        .map(|n| {
            let h = &n.health;
            vec![
                text(&n.address),
                text(&n.label),
                text(role_name(n.role)),
                text(n.weight),
                text(n.enabled),
                text(n.draining),
                text(h.healthy),
                h.last_check.map(iso8601),
                text(h.failure_count),
                h.last_error.clone(),
                text(h.latency_ms),
                h.replication_lag_bytes.map(|v| v.to_string()),
                h.replication_lag_seconds.map(|v| v.to_string()),
                h.in_recovery.map(|v| v.to_string()),
            ]
        })
        .collect();
    table(
        &[
            "address",
            "name",
            "role",
            "weight",
            "enabled",
            "draining",
            "healthy",
            "last_check",
            "failure_count",
            "last_error",
            "latency_ms",
            "replication_lag_bytes",
            "replication_lag_seconds",
            "in_recovery",
        ],
        rows,
    )
}

/// PgBouncer's `active`/`paused`/`suspended`, and when this process started.
/// One row per tier (what the admin API's `GET /cache` shows under `l1`, `l2`, `l3`)
/// and one for the whole cache.
fn cache(control: &Control) -> ConsoleResult {
    use helios_shard::cache::shard::Tier;
    let t = crate::control::cache::CacheTotals::sum(control);
    let mut rows: Vec<Vec<Cell>> = Tier::ALL
        .iter()
        .zip(&t.tiers)
        .map(|(tier, n)| {
            vec![
                text(tier.label()),
                text(n.entries),
                text(n.bytes),
                text(n.hits),
                text(n.misses),
                text(n.fills),
                text(n.evictions),
                text(n.invalidations),
            ]
        })
        .collect();
    rows.push(vec![
        text("total"),
        text(t.entries()),
        text(t.bytes()),
        text(t.hits()),
        text(t.misses),
        text(t.fills),
        text(t.evictions()),
        text(t.invalidations),
    ]);
    table(
        &[
            "tier",
            "entries",
            "bytes",
            "hits",
            "misses",
            "fills",
            "evictions",
            "invalidations",
        ],
        rows,
    )
}

fn state(control: &Control) -> ConsoleResult {
    let paused = control.paused();
    let yes_no = |on: bool| text(if on { "yes" } else { "no" });
    table(
        &["key", "value"],
        vec![
            vec![text("active"), yes_no(!paused)],
            vec![text("paused"), yes_no(paused)],
            vec![text("suspended"), yes_no(false)],
            vec![text("started"), timestamp(control.started)],
            vec![text("uptime_secs"), text(control.uptime().as_secs())],
        ],
    )
}

/// Keys a running process cannot change (a reload keeps the old value).
const RESTART_KEYS: [&str; 4] = ["listen_address", "admin_address", "workers", "admin_api"];

fn config(control: &Control) -> ConsoleResult {
    let mut current = serde_json::to_value(&*control.config()).unwrap_or(Value::Null);
    redact(&mut current);
    let defaults = serde_json::to_value(Config::default()).unwrap_or(Value::Null);
    let mut defaults_flat = Vec::new();
    flatten("", &defaults, &mut defaults_flat);
    let defaults_flat: BTreeMap<String, Cell> = defaults_flat.into_iter().collect();
    let mut flat = Vec::new();
    flatten("", &current, &mut flat);
    let rows = flat
        .into_iter()
        .map(|(key, value)| {
            let top = key.split(['.', '[']).next().unwrap_or("");
            let default = defaults_flat.get(&key).cloned().flatten();
            vec![
                text(&key),
                value,
                default,
                text(if RESTART_KEYS.contains(&top) {
                    "no"
                } else {
                    "yes"
                }),
            ]
        })
        .collect();
    table(&["key", "value", "default", "changeable"], rows)
}

/// Dotted keys (`pool_mode.max_pool_size`, `nodes[0].host`); a list of plain values is
/// one comma-separated value.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, Cell)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                flatten(&join(key), v, out);
            }
        }
        Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::Array(items) => {
            let list: Vec<String> = items.iter().map(scalar).collect();
            out.push((prefix.to_string(), Some(list.join(","))));
        }
        Value::Null => out.push((prefix.to_string(), None)),
        other => out.push((prefix.to_string(), Some(scalar(other)))),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flattens_to_dotted_keys() {
        let value = serde_json::json!({
            "workers": 2,
            "pool_mode": { "mode": "transaction" },
            "admin_users": ["a", "b"],
            "nodes": [{ "host": "h", "port": 5432 }],
            "admin_token": null,
        });
        let mut out = Vec::new();
        flatten("", &value, &mut out);
        let map: BTreeMap<String, Cell> = out.into_iter().collect();
        assert_eq!(map["workers"].as_deref(), Some("2"));
        assert_eq!(map["pool_mode.mode"].as_deref(), Some("transaction"));
        assert_eq!(map["admin_users"].as_deref(), Some("a,b"));
        assert_eq!(map["nodes[0].host"].as_deref(), Some("h"));
        assert_eq!(map["admin_token"], None);
    }

    #[test]
    fn timestamps_look_like_pgbouncer_ones() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_774_520_130);
        assert_eq!(timestamp(t).as_deref(), Some("2026-03-26 10:15:30 UTC"));
    }
}
