//! The health checker through the running proxy and its admin API: a node's checks while
//! its server runs, stops and comes back (`/nodes`, `/health/ready`, the Prometheus page),
//! a streaming standby's recovery state and lag, a node added by a reload, the server's
//! own words when the checks' password is wrong, and `health.enabled = false`.
//! Every test that stops a server runs its own PostgreSQL.

mod common;

use std::time::Duration;

use common::http::{get, post};
use common::{cluster, proxy_only, wait_until, PgCluster, Proxy, SUPERUSER, SUPERUSER_PASSWORD};
use serde_json::Value;

const FAILURE_THRESHOLD: u64 = 2;
/// Generous: checks run every 0.2 s, so any state shows within a second or two.
const SETTLE: Duration = Duration::from_secs(60);

fn fast_checks() -> String {
    format!(
        "[health]\n\
         check_interval_secs = 0.2\n\
         timeout_ms = 500\n\
         failure_threshold = {FAILURE_THRESHOLD}\n\
         success_threshold = 1\n"
    )
}

fn admin(proxy: &Proxy) -> u16 {
    proxy.admin_port.expect("proxy has an admin port")
}

/// `/nodes/{address}` as JSON.
fn node(proxy: &Proxy, address: &str) -> Value {
    let r = get(admin(proxy), &format!("/nodes/{address}"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Polls `/nodes/{address}` until `cond` holds; panics with the last state and the log.
fn wait_for_node(proxy: &Proxy, address: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(SETTLE, || {
        last = node(proxy, address);
        cond(&last)
    });
    assert!(ok, "node {address} never {what}: {last}\n{}", proxy.log());
    last
}

fn prometheus_healthy_line(proxy: &Proxy, address: &str) -> Option<String> {
    let r = get(admin(proxy), "/metrics/prometheus");
    assert_eq!(r.status, 200);
    let prefix = format!("heliosdb_proxy_node_healthy{{node=\"{address}\"}} ");
    r.body
        .lines()
        .find(|l| l.starts_with(&prefix))
        .map(str::to_string)
}

#[test]
fn a_stopped_server_leaves_routing_and_returns_when_it_is_back() {
    if proxy_only("health down/up", "health checks are the proxy's") {
        return;
    }
    let pg = PgCluster::start();
    let proxy = Proxy::start(&pg, &fast_checks());
    let unchecked = Proxy::start(&pg, "[health]\nenabled = false\n");
    let address = format!("127.0.0.1:{}", pg.port);
    let port = admin(&proxy);

    // (a) Checked and healthy.
    let n = wait_for_node(&proxy, &address, "was checked", |n| {
        n["last_check"].is_string() && n["latency_ms"].as_f64().is_some_and(|l| l > 0.0)
    });
    assert_eq!(n["healthy"], true);
    assert_eq!(n["failure_count"], 0);
    assert_eq!(n["last_error"], Value::Null);
    assert_eq!(n["in_recovery"], false);
    assert_eq!(n["replication_lag_bytes"], Value::Null);
    assert_eq!(get(port, "/health/ready").status, 200);
    let u = node(&unchecked, &address);
    assert_eq!(
        (&u["healthy"], &u["last_check"]),
        (&Value::Bool(true), &Value::Null)
    );

    // (b) Server down: unhealthy once the threshold is reached, and not ready.
    pg.stop_server();
    let n = wait_for_node(&proxy, &address, "turned unhealthy", |n| {
        n["healthy"] == false
    });
    assert!(
        n["failure_count"].as_u64().unwrap() >= FAILURE_THRESHOLD,
        "{n}"
    );
    let error = n["last_error"].as_str().expect("last_error while down");
    assert!(!error.is_empty());
    let ready = get(port, "/health/ready");
    assert_eq!(
        (ready.status, &ready.json()["ready"]),
        (503, &Value::Bool(false))
    );
    assert_eq!(
        prometheus_healthy_line(&proxy, &address).as_deref(),
        Some(format!("heliosdb_proxy_node_healthy{{node=\"{address}\"}} 0").as_str())
    );
    assert!(proxy
        .log()
        .contains(&format!("node {address} is unhealthy")));
    // Without checks nothing marks the node down.
    let u = node(&unchecked, &address);
    assert_eq!(
        (&u["healthy"], &u["last_check"]),
        (&Value::Bool(true), &Value::Null)
    );
    assert_eq!(get(admin(&unchecked), "/health/ready").status, 200);

    // (c) Server back: healthy again, errors cleared, ready, and clients get through.
    pg.restart_server();
    let n = wait_for_node(&proxy, &address, "recovered", |n| n["healthy"] == true);
    assert_eq!(n["failure_count"], 0);
    assert_eq!(n["last_error"], Value::Null);
    assert_eq!(get(port, "/health/ready").status, 200);
    assert_eq!(
        prometheus_healthy_line(&proxy, &address).as_deref(),
        Some(format!("heliosdb_proxy_node_healthy{{node=\"{address}\"}} 1").as_str())
    );
    assert!(proxy
        .log()
        .contains(&format!("node {address} is healthy again")));
    let out = common::psql(
        &proxy,
        SUPERUSER,
        Some(SUPERUSER_PASSWORD),
        &["-Atc", "SELECT 40 + 2"],
        None,
    );
    assert!(out.status.success() && out.stdout.trim() == "42", "{out}");
    unchecked.assert_running();
    // Shutdown stops and joins the checkers.
    let status = proxy.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        proxy.log()
    );
}

#[test]
fn a_standby_added_by_reload_reports_recovery_and_lag() {
    if proxy_only("health standby", "health checks are the proxy's") {
        return;
    }
    let pg = PgCluster::start();
    let standby = pg.start_standby();
    let proxy = Proxy::start(&pg, &fast_checks());
    let primary_address = format!("127.0.0.1:{}", pg.port);
    let standby_address = format!("127.0.0.1:{}", standby.port);
    wait_for_node(&proxy, &primary_address, "was checked", |n| {
        n["last_check"].is_string()
    });

    // The standby joins by reload; the supervisor starts a checker for it.
    let standby_node: toml::Table = toml::from_str(&format!(
        "name = \"standby\"\nhost = \"127.0.0.1\"\nport = {}\nrole = \"standby\"\n",
        standby.port
    ))
    .expect("node TOML");
    proxy.rewrite_config(|config| {
        config
            .get_mut("nodes")
            .and_then(toml::Value::as_array_mut)
            .expect("nodes array")
            .push(toml::Value::Table(standby_node));
    });
    let r = post(admin(&proxy), "/config/reload");
    assert_eq!(r.status, 200, "{}", r.body);

    // Some WAL to replay, so the positions are not both at the start.
    pg.psql_admin(
        common::DATABASE,
        "CREATE TABLE health_wal AS SELECT g FROM generate_series(1, 10000) g;",
    );
    let s = wait_for_node(&proxy, &standby_address, "reported its lag", |n| {
        n["in_recovery"] == true
            && n["replication_lag_bytes"].is_u64()
            && n["replication_lag_seconds"].is_number()
    });
    assert_eq!(s["healthy"], true);
    assert_eq!(s["role"], "standby");
    let p = node(&proxy, &primary_address);
    assert_eq!(p["in_recovery"], false);
    assert_eq!(p["replication_lag_bytes"], Value::Null);
    let threads = proxy.log();
    assert!(
        !threads.contains("cannot start the health checker"),
        "{threads}"
    );

    // Once replay catches up the lag measured against the primary's position drains.
    wait_for_node(&proxy, &standby_address, "caught up", |n| {
        n["replication_lag_bytes"] == 0
    });

    // Removed by the next reload: its checker ends and closes its connection.
    let checks_on_standby = || {
        standby
            .psql_admin(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'heliosdb-proxy-health';",
            )
            .trim()
            .to_string()
    };
    assert_eq!(checks_on_standby(), "1");
    proxy.rewrite_config(|_| {});
    let r = post(admin(&proxy), "/config/reload");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        get(admin(&proxy), &format!("/nodes/{standby_address}")).status,
        404
    );
    assert!(
        wait_until(SETTLE, || checks_on_standby() == "0"),
        "the removed node's checker kept its connection\n{}",
        proxy.log()
    );
    proxy.assert_running();
}

#[test]
fn a_wrong_check_password_shows_the_servers_error() {
    if proxy_only("health auth", "health checks are the proxy's") {
        return;
    }
    let overrides = format!(
        "{}user = \"{SUPERUSER}\"\npassword = \"not-the-password\"\n",
        fast_checks()
    );
    let proxy = Proxy::start(cluster(), &overrides);
    let address = format!("127.0.0.1:{}", cluster().port);
    let n = wait_for_node(&proxy, &address, "failed its login", |n| {
        n["healthy"] == false
    });
    let error = n["last_error"].as_str().expect("last_error");
    assert!(
        error.contains("28P01") && error.contains("password authentication failed"),
        "{error}"
    );
    proxy.assert_running();
}
