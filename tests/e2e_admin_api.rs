//! The admin REST API through the running proxy: every endpoint's shape and status codes,
//! the bearer token, disable/enable seen from pg_stat_activity, the drain procedure from
//! the API reference run with curl and jq, reload (HTTP and SIGHUP), and the Prometheus
//! page read by the Python `prometheus_client` parser while traffic moves the counters;
//! and the server's own limits (issue 15): `/health/live` answering through a flood of
//! heavy requests and silent connections, silent connections timed out without a thread
//! each, queued requests of departed clients skipped, and HTTP framing edge cases.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::http::{get, post, request};
use common::proxy::set_pool_size;
use common::{cluster, proxy_only, wait_until, Proxy, SUPERUSER, SUPERUSER_PASSWORD};
use serde_json::Value;

const TOKEN: &str = "s3cret-admin-token";

fn admin(proxy: &Proxy) -> u16 {
    proxy.admin_port.expect("proxy has an admin port")
}

fn node_address() -> String {
    format!("127.0.0.1:{}", cluster().port)
}

/// Connections the proxy holds to the test server for `db` (from pg_stat_activity).
async fn server_connections(db: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    );
    cluster().admin_i64(&sql).await
}

/// A database of its own, so other tests' connections do not show up in counts.
async fn private_database(name: &str) {
    let admin = cluster().admin("postgres").await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_with_the_documented_shapes_and_errors() {
    if proxy_only("endpoints", "the admin API is the proxy's") {
        return;
    }
    let proxy = Proxy::start(cluster(), "");
    let port = admin(&proxy);

    let r = get(port, "/health");
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"status": "ok"}))
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        get(port, "/health/live").json(),
        serde_json::json!({"alive": true})
    );
    let ready = get(port, "/health/ready");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);

    let nodes = get(port, "/nodes").json();
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["address"], node_address());
    assert_eq!(nodes[0]["healthy"], true);
    assert_eq!(nodes[0]["role"], "primary");
    for key in [
        "last_check",
        "failure_count",
        "last_error",
        "latency_ms",
        "replication_lag_bytes",
    ] {
        assert!(nodes[0].get(key).is_some(), "/nodes lacks {key}: {nodes:?}");
    }
    let one = get(port, &format!("/nodes/{}", node_address()));
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["address"], node_address());
    let missing = get(port, "/nodes/10.9.9.9:5432");
    assert_eq!(
        (missing.status, missing.json()),
        (404, serde_json::json!({"error": "Node not found"}))
    );
    let r = post(port, "/nodes/10.9.9.9:5432/disable");
    assert_eq!(r.status, 404);

    let config = get(port, "/config").json();
    assert_eq!(
        config["listen_address"],
        format!("127.0.0.1:{}", proxy.port)
    );
    assert_eq!(config["nodes"][0]["address"], node_address());
    assert_eq!(config["config"]["users"][0]["password"], "<redacted>");
    assert!(
        !get(port, "/config").body.contains(SUPERUSER_PASSWORD),
        "a password leaked through /config"
    );

    let version = get(port, "/version").json();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
    assert!(version["build_time"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));

    // Counters move with traffic; an open session is counted.
    let before = get(port, "/metrics").json();
    let client = proxy.client().await;
    for i in 0..5 {
        client.simple_query(&format!("SELECT {i}")).await.unwrap();
    }
    let after = get(port, "/metrics").json();
    for key in [
        "queries_processed",
        "bytes_received",
        "bytes_sent",
        "connections_accepted",
    ] {
        assert!(
            after[key].as_u64() > before[key].as_u64(),
            "{key} did not move: {before} -> {after}"
        );
    }
    assert_eq!(after["failovers"], 0);
    // The logins and queries allocated something (their sessions, at least).
    for key in ["count", "bytes"] {
        assert!(
            after["allocations"][key].as_u64() > before["allocations"][key].as_u64(),
            "allocations.{key} did not move: {before} -> {after}"
        );
    }
    assert!(after["allocations"]["in_use_bytes"].as_u64() > Some(0));
    assert!(get(port, "/sessions").json()["active_sessions"].as_u64() >= Some(1));
    let pools = get(port, "/pools").json();
    let pool = &pools.as_array().expect("array")[0];
    assert_eq!(pool["node"], node_address());
    for key in [
        "active_connections",
        "idle_connections",
        "pending_requests",
        "total_connections_created",
        "total_connections_closed",
    ] {
        assert!(pool[key].is_u64(), "/pools lacks {key}: {pool}");
    }
    assert!(pool["total_connections_created"].as_u64() >= Some(1));
    drop(client);

    // Errors: unknown path, wrong method, malformed and oversized bodies, bad escapes.
    let r = get(port, "/nope");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = post(port, "/health");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    assert!(r.json()["error"].is_string());
    let r = get(port, &format!("/nodes/{}/disable", node_address()));
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    let path = format!("/nodes/{}/disable", node_address());
    let r = request(port, "POST", &path, &[], b"{not json");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("JSON"));
    let r = request(port, "POST", &path, &[], b"[1,2]");
    assert_eq!(r.status, 400);
    let big = vec![b' '; 100 * 1024];
    let r = request(port, "POST", &path, &[], &big);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("too large"));
    assert_eq!(get(port, "/nodes/%zz").status, 400);
    // None of that changed the node.
    assert_eq!(get(port, "/nodes").json()[0]["enabled"], true);
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_the_bearer_token_when_one_is_set() {
    if proxy_only("token", "the admin API is the proxy's") {
        return;
    }
    let proxy = Proxy::start(cluster(), &format!("admin_token = \"{TOKEN}\""));
    let port = admin(&proxy);
    let path = format!("/nodes/{}/disable", node_address());
    let r = post(port, &path);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = request(
        port,
        "POST",
        &path,
        &[("Authorization", "Bearer wrong-token")],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = request(port, "POST", "/config/reload", &[], b"");
    assert_eq!(r.status, 401);
    // Reads need no token; the token never shows in /config.
    assert_eq!(get(port, "/nodes").status, 200);
    assert!(!get(port, "/config").body.contains(TOKEN));
    let bearer = format!("Bearer {TOKEN}");
    let r = request(port, "POST", &path, &[("Authorization", &bearer)], b"");
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"status": "disabled"}))
    );
    let enable = format!("/nodes/{}/enable", node_address());
    let r = request(port, "POST", &enable, &[("Authorization", &bearer)], b"{}");
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"status": "enabled"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_node_gets_no_new_queries_until_enabled() {
    if proxy_only("disable", "the admin API is the proxy's") {
        return;
    }
    private_database("admin_disable").await;
    let proxy = Proxy::start(
        cluster(),
        "[pool_mode]\nmode = \"transaction\"\nacquire_timeout_ms = 1500\n",
    );
    let port = admin(&proxy);
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "admin_disable")
        .await
        .expect("login");
    client.simple_query("SELECT 1").await.unwrap();
    assert!(server_connections("admin_disable").await >= 1);

    let r = post(port, &format!("/nodes/{}/disable", node_address()));
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("disabled"))
    );
    let node = get(port, &format!("/nodes/{}", node_address())).json();
    assert_eq!(node["enabled"], false);
    assert_eq!(get(port, "/health/ready").status, 503);
    // The idle server connections close; none is opened for new work.
    assert!(
        common::wait_until_async(Duration::from_secs(10), || async {
            server_connections("admin_disable").await == 0
        })
        .await,
        "server connections stayed open after disable"
    );
    let err = client
        .simple_query("SELECT 2")
        .await
        .expect_err("no node takes work");
    assert_eq!(common::sqlstate(&err), "57P03", "{err:?}");
    assert_eq!(server_connections("admin_disable").await, 0);

    let r = post(port, &format!("/nodes/{}/enable", node_address()));
    assert_eq!(r.status, 200);
    assert_eq!(get(port, "/health/ready").status, 200);
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "admin_disable")
        .await
        .expect("login after enable");
    let rows = client.simple_query("SELECT 3").await.unwrap();
    assert!(!rows.is_empty());
    assert!(server_connections("admin_disable").await >= 1);
}

/// The "Drain a node for maintenance" procedure of the API reference, as an operator
/// would run it: curl and jq in a shell script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_procedure_runs_with_curl_and_jq() {
    if proxy_only("drain", "the admin API is the proxy's") {
        return;
    }
    private_database("admin_drain").await;
    let proxy = Proxy::start(cluster(), "[pool_mode]\nmode = \"session\"\n");
    let port = admin(&proxy);
    // Two sessions hold server connections (session pooling).
    let a = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "admin_drain")
        .await
        .unwrap();
    let b = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "admin_drain")
        .await
        .unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();

    let node = node_address();
    let script = format!(
        r#"set -eu
base=http://127.0.0.1:{port}
node={node}
curl -sf -X POST "$base/nodes/$node/drain" | jq -e '.status == "draining"' >/dev/null
for i in $(seq 1 600); do
  active=$(curl -sf "$base/pools" | jq '.[] | select(.node == "'"$node"'") | .active_connections')
  [ "$active" = "0" ] && break
  echo "waiting for $active connections to drain"
  sleep 0.1
done
[ "$active" = "0" ]
curl -sf "$base/pools" | jq -e '.[] | select(.node == "'"$node"'") | .drained' >/dev/null
echo drained
curl -sf -X POST "$base/nodes/$node/enable" | jq -e '.status == "enabled"' >/dev/null
echo enabled
"#
    );
    let child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    // While the script waits, the sessions finish their work and leave.
    assert!(
        wait_until(Duration::from_secs(20), || {
            get(port, "/pools").json()[0]["draining"] == Value::Bool(true)
        }),
        "drain did not show in /pools"
    );
    let progress = get(port, "/pools").json();
    assert_eq!(progress[0]["active_connections"], 2, "{progress}");
    a.simple_query("SELECT 2").await.unwrap();
    drop(a);
    drop(b);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("script output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drain script failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("waiting for 2 connections to drain") || stdout.contains("waiting for 1")
    );
    assert!(
        stdout.contains("drained") && stdout.contains("enabled"),
        "{stdout}"
    );
    assert_eq!(server_connections("admin_drain").await, 0);
    // Back in service.
    let c = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "admin_drain")
        .await
        .unwrap();
    c.simple_query("SELECT 3").await.unwrap();
    assert_eq!(get(port, "/nodes").json()[0]["draining"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_pool_sizes_and_refuses_invalid_files() {
    if proxy_only("reload", "the admin API is the proxy's") {
        return;
    }
    private_database("admin_reload").await;
    // One worker, so the pool size is exactly what one shard may open.
    let proxy = Proxy::start(
        cluster(),
        "workers = 1\n[pool_mode]\nmode = \"session\"\nmax_pool_size = 1\nacquire_timeout_ms = 800\n",
    );
    let port = admin(&proxy);
    let connect = || proxy.connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "admin_reload");
    let first = connect().await.unwrap();
    first.simple_query("SELECT 1").await.unwrap();
    // The pool is full: a second session times out with 53300.
    let err = connect().await.expect_err("pool of one is full");
    assert_eq!(common::sqlstate(&err), "53300", "{err:?}");

    proxy.rewrite_config(|c| set_pool_size(c, 3));
    let r = post(port, "/config/reload");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed"], true);
    assert_eq!(get(port, "/config").json()["pool_max_connections"], 3);
    // The first session kept its connection; two more fit now.
    first.simple_query("SELECT 2").await.unwrap();
    let second = connect().await.expect("room after reload");
    let third = connect().await.expect("room after reload");
    second.simple_query("SELECT 1").await.unwrap();
    third.simple_query("SELECT 1").await.unwrap();
    assert_eq!(server_connections("admin_reload").await, 3);

    // An invalid file is refused with the key named; the running configuration stays.
    let path = proxy.config_path.clone().unwrap();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("max_pool_size = 3", "max_pool_size = 0"),
    )
    .unwrap();
    let r = post(port, "/config/reload");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("max_pool_size"),
        "{}",
        r.body
    );
    assert_eq!(get(port, "/config").json()["pool_max_connections"], 3);
    first.simple_query("SELECT 3").await.unwrap();

    // SIGHUP does the same as the endpoint.
    std::fs::write(
        &path,
        good.replace("max_pool_size = 3", "max_pool_size = 5"),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || {
            get(port, "/config").json()["pool_max_connections"] == 5
        }),
        "SIGHUP did not reload:\n{}",
        proxy.log()
    );
    // A restart-only key is reported, not applied.
    std::fs::write(&path, good.replace("workers = 1", "workers = 2")).unwrap();
    let r = post(port, "/config/reload");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["restart_required"], serde_json::json!(["workers"]));
    // Every session survived.
    for c in [&first, &second, &third] {
        c.simple_query("SELECT 4").await.unwrap();
    }
    proxy.assert_running();
}

fn venv_python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/drivers/venv/bin/python")
}

/// Parses the page with prometheus_client and returns {sample name + labels: value}, plus
/// each family's type under "TYPE <family>".
fn parse_prometheus(text: &str) -> serde_json::Map<String, Value> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    out["TYPE " + family.name] = family.type
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let python = venv_python();
    assert!(
        python.exists(),
        "{} missing: scripts/test.sh installs prometheus_client there",
        python.display()
    );
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the page: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Object(map) => map,
        other => panic!("unexpected parser output {other}"),
    }
}

fn sample(map: &serde_json::Map<String, Value>, key: &str) -> f64 {
    map.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no sample {key} in {map:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_page_parses_and_counters_move_with_traffic() {
    if proxy_only("prometheus", "the admin API is the proxy's") {
        return;
    }
    let proxy = Proxy::start(cluster(), "[pool_mode]\nmode = \"transaction\"\n");
    let port = admin(&proxy);
    let page = get(port, "/metrics/prometheus");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let before = parse_prometheus(&page.body);

    let client = proxy.client().await;
    for i in 0..20 {
        client.simple_query(&format!("SELECT {i}")).await.unwrap();
    }
    client
        .simple_query(
            "CREATE TABLE IF NOT EXISTS prom_writes(x int); INSERT INTO prom_writes VALUES (1)",
        )
        .await
        .unwrap();
    let after = parse_prometheus(&get(port, "/metrics/prometheus").body);

    let node = format!("node={}", node_address());
    assert_eq!(after["TYPE heliosdb_proxy_queries"], "counter");
    assert_eq!(
        after["TYPE heliosdb_proxy_query_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        after["TYPE heliosdb_proxy_pool_acquire_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        after["TYPE heliosdb_proxy_pool_connections_active"],
        "gauge"
    );
    let moved = |key: &str, by: f64| {
        let (b, a) = (sample(&before, key), sample(&after, key));
        assert!(a >= b + by, "{key}: {b} -> {a}");
    };
    moved("heliosdb_proxy_queries_total", 21.0);
    moved("heliosdb_proxy_statements_total{type=read}", 20.0);
    moved("heliosdb_proxy_statements_total{type=write}", 2.0);
    moved("heliosdb_proxy_bytes_received_total", 1.0);
    moved("heliosdb_proxy_bytes_sent_total", 1.0);
    moved("heliosdb_proxy_connections_total", 1.0);
    moved("heliosdb_proxy_allocations_total", 1.0);
    moved("heliosdb_proxy_allocated_bytes_total", 1.0);
    assert!(sample(&after, "heliosdb_proxy_heap_in_use_bytes") > 0.0);
    moved("heliosdb_proxy_query_duration_seconds_count", 21.0);
    moved("heliosdb_proxy_pool_acquire_duration_seconds_count", 21.0);
    let inf = sample(
        &after,
        "heliosdb_proxy_query_duration_seconds_bucket{le=+Inf}",
    );
    assert_eq!(
        inf,
        sample(&after, "heliosdb_proxy_query_duration_seconds_count")
    );
    assert!(sample(&after, "heliosdb_proxy_query_duration_seconds_sum") > 0.0);
    assert_eq!(
        sample(&after, &format!("heliosdb_proxy_node_healthy{{{node}}}")),
        1.0
    );
    assert!(
        sample(
            &after,
            &format!("heliosdb_proxy_pool_connections_idle{{{node}}}")
        ) >= 1.0
    );
    sample(
        &after,
        &format!("heliosdb_proxy_pool_connections_waiting{{{node}}}"),
    );
    sample(
        &after,
        &format!("heliosdb_proxy_node_latency_seconds{{{node}}}"),
    );
    sample(&after, "heliosdb_proxy_failovers_total");
    client
        .simple_query("DROP TABLE IF EXISTS prom_writes")
        .await
        .unwrap();
}

/// A reload that points the primary at another server: pooled clients keep their
/// connections to the proxy and run their next transactions on the new server; the old
/// server's connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_pooled_clients_to_a_changed_node() {
    if proxy_only("reload_node", "the admin API is the proxy's") {
        return;
    }
    let other = common::PgCluster::start();
    let proxy = Proxy::start(cluster(), "[pool_mode]\nmode = \"transaction\"\n");
    let port = admin(&proxy);
    let client = proxy.client().await;
    let server_port = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> String {
        rows.into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .expect("a row")
    };
    let before = server_port(client.simple_query("SHOW port").await.unwrap());
    assert_eq!(before, cluster().port.to_string());

    proxy.rewrite_config(|c| {
        let nodes = c.get_mut("nodes").unwrap().as_array_mut().unwrap();
        nodes[0]
            .as_table_mut()
            .unwrap()
            .insert("port".into(), toml::Value::Integer(other.port.into()));
    });
    let r = post(port, "/config/reload");
    assert_eq!(r.status, 200, "{}", r.body);
    let new_address = format!("127.0.0.1:{}", other.port);
    assert_eq!(r.json()["nodes_added"], serde_json::json!([new_address]));
    assert_eq!(
        r.json()["nodes_removed"],
        serde_json::json!([node_address()])
    );
    assert!(
        common::wait_until_async(Duration::from_secs(10), || async {
            client
                .simple_query("SHOW port")
                .await
                .map(server_port)
                .is_ok_and(|p| p == other.port.to_string())
        })
        .await,
        "the client did not move to the new node:\n{}",
        proxy.log()
    );
    // A new client lands there too; /nodes names only the new node.
    let fresh = proxy.client().await;
    let now = server_port(fresh.simple_query("SHOW port").await.unwrap());
    assert_eq!(now, other.port.to_string());
    let nodes = get(port, "/nodes").json();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert_eq!(nodes[0]["address"], new_address);
    drop(fresh);
    drop(client);
    proxy.stop();
    other.stop();
}

/// One `GET /health/live` with a client-side bound on every step: its status and how
/// long it took, or what went wrong.
fn probe_live(port: u16, limit: Duration) -> Result<(u16, Duration), String> {
    use std::io::{Read, Write};
    let started = std::time::Instant::now();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.set_write_timeout(Some(limit)).unwrap();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read after {:?}: {e}", started.elapsed()))?;
    let took = started.elapsed();
    if took > limit {
        return Err(format!("answered only after {took:?}"));
    }
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    if !text.ends_with("{\"alive\":true}") {
        return Err(format!("unexpected answer {text:?}"));
    }
    Ok((status, took))
}

/// Probes `/health/live` every 50 ms until `stop` is set; every result.
fn probe_loop(
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Result<(u16, Duration), String>>> {
    std::thread::spawn(move || {
        let mut results = Vec::new();
        // Bounded: the flood ends long before this many probes.
        for _ in 0..2400 {
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            let started = std::time::Instant::now();
            results.push(probe_live(port, Duration::from_secs(1)));
            std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
        }
        results
    })
}

/// The admin server's own counters from `GET /metrics`.
fn admin_counters(port: u16) -> Value {
    get(port, "/metrics").json()["admin_api"].clone()
}

fn counter(port: u16, name: &str) -> u64 {
    admin_counters(port)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no admin_api.{name} in /metrics"))
}

/// A number field (`Threads:`, `VmRSS:`) of process `pid`'s /proc status.
fn proc_status(pid: u32, field: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} line"))
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    proc_status(pid, "Threads:")
}

/// Issue 15: 2,000 clients hammering the heavy endpoints plus 500 silent connections
/// must not delay `/health/live`; the excess is shed with 503 instead of queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_heavy_requests_never_delays_the_liveness_probe() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if proxy_only("admin flood", "the admin API is the proxy's") {
        return;
    }
    // Room for the silent connections and part of the flood, so both the worker queue
    // and the over-the-cap path are exercised.
    let proxy = Proxy::start(cluster(), "[admin_api]\nmax_connections = 1000\n");
    let port = admin(&proxy);
    let pid = proxy.pid().expect("proxy pid");
    let rss_before = proc_status(pid, "VmRSS:");
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe_loop(port, stop.clone());

    let mut silent = Vec::with_capacity(500);
    for _ in 0..500 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("silent connect"),
        );
    }
    let flood_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut flood = Vec::with_capacity(2000);
    for i in 0..2000 {
        let path = if i % 2 == 0 {
            "/metrics/prometheus"
        } else {
            "/pools"
        };
        flood.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            // Bounded: at most five requests per client, within the flood's time.
            for _ in 0..5 {
                if tokio::time::Instant::now() >= flood_until {
                    break;
                }
                let exchange = async {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                    let head =
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    s.write_all(head.as_bytes()).await?;
                    let mut raw = Vec::new();
                    s.read_to_end(&mut raw).await?;
                    Ok::<_, std::io::Error>(raw)
                };
                let status = match tokio::time::timeout(Duration::from_secs(30), exchange).await {
                    Ok(Ok(raw)) => String::from_utf8_lossy(&raw)
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse::<u16>().ok())
                        .unwrap_or(0),
                    // Refused or reset under the flood: the client simply failed.
                    _ => 0,
                };
                statuses.push(status);
            }
            statuses
        }));
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for task in flood {
        let done = common::guarded(common::HANG_GUARD, "a flood client", task).await;
        for status in done.expect("flood task") {
            *statuses.entry(status).or_default() += 1;
        }
    }
    stop.store(true, Ordering::Release);
    let probes = tokio::task::spawn_blocking(move || prober.join().expect("probe thread"))
        .await
        .unwrap();
    drop(silent);
    let rss_after = proc_status(pid, "VmRSS:");

    let failures: Vec<&String> = probes.iter().filter_map(|p| p.as_ref().err()).collect();
    let latencies: Vec<Duration> = probes
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(|p| p.1)
        .collect();
    let max = latencies.iter().max().copied().unwrap_or_default();
    let mut sorted = latencies.clone();
    sorted.sort();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    let slowest: Vec<Duration> = sorted.iter().rev().take(5).copied().collect();
    println!(
        "flood: responses by status {statuses:?}; {} probes of /health/live, median {median:?}, \
         max {max:?}, slowest {slowest:?}; RSS {rss_before} kB before, {rss_after} kB after; \
         admin counters {}",
        probes.len(),
        admin_counters(port)
    );
    assert!(probes.len() >= 20, "too few probes ran: {}", probes.len());
    assert!(
        failures.is_empty(),
        "probes failed during the flood: {failures:?}"
    );
    assert!(
        probes.iter().all(|p| matches!(p, Ok((200, _)))),
        "a probe was not 200: {probes:?}"
    );
    assert!(
        statuses.get(&200).is_some_and(|&n| n > 0),
        "no heavy request was served: {statuses:?}"
    );
    assert!(
        statuses.keys().all(|s| matches!(s, 200 | 503)),
        "heavy requests got something other than 200 or 503: {statuses:?}"
    );
    let counters = admin_counters(port);
    assert!(
        counters["requests_rejected_queue_full"].as_u64() > Some(0),
        "{counters}"
    );
    assert!(
        counters["connections_refused"].as_u64() > Some(0),
        "{counters}"
    );
    proxy.assert_running();
}

/// 1,000 connections that never send a byte cost no threads and are closed by the read
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cost_no_threads_and_are_timed_out() {
    use std::io::Read;
    if proxy_only("admin silent", "the admin API is the proxy's") {
        return;
    }
    let proxy = Proxy::start(
        cluster(),
        "[admin_api]\nread_timeout_ms = 2000\nmax_connections = 2000\n",
    );
    let port = admin(&proxy);
    let pid = proxy.pid().expect("proxy pid");
    assert_eq!(get(port, "/health/live").status, 200);
    // The heavy requests' worker threads start with the first one: the counters below
    // are read with them, so they are started before the count.
    let _ = admin_counters(port);
    let before = threads(pid);
    let opened = std::time::Instant::now();
    let silent: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || counter(
            port,
            "connections_open"
        ) >= 1000),
        "the proxy did not take the silent connections: {}",
        admin_counters(port)
    );
    let during = threads(pid);
    println!("threads: {before} before, {during} with 1,000 silent connections open");
    assert!(
        during <= before + 2,
        "threads grew from {before} to {during} with 1,000 silent connections"
    );
    assert_eq!(
        probe_live(port, Duration::from_secs(1)).map(|p| p.0),
        Ok(200)
    );
    // Every one is closed by the proxy (end of stream, or a reset) within the read
    // timeout and a margin.
    for mut stream in silent {
        let left = Duration::from_secs(15).saturating_sub(opened.elapsed());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent connection was not closed in time: {other:?}"),
        }
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed too early: {closed_after:?}"
    );
    assert!(counter(port, "connections_timed_out") >= 1000);
    assert!(wait_until(Duration::from_secs(5), || counter(
        port,
        "connections_open"
    ) <= 1));
    assert!(threads(pid) <= before + 2);
    proxy.assert_running();
}

/// Requests whose clients left while they waited for a worker are dropped unrun, and
/// show in the counters and on the Prometheus page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_of_clients_that_left_are_skipped() {
    use std::io::Write;
    if proxy_only("admin skip", "the admin API is the proxy's") {
        return;
    }
    // One worker, so the requests queue behind each other.
    let proxy = Proxy::start(cluster(), "[admin_api]\nworkers = 1\nqueue_depth = 200\n");
    let port = admin(&proxy);
    for _ in 0..100 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(b"GET /metrics/prometheus HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        // Gone before its answer.
        drop(s);
    }
    let mut last = Value::Null;
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = admin_counters(port);
            last["requests_skipped"].as_u64() >= Some(50)
        }),
        "queued requests of gone clients were not skipped: {last}"
    );
    println!("after 100 abandoned requests: {last}");
    let page = get(port, "/metrics/prometheus").body;
    let skipped = page
        .lines()
        .find_map(|l| l.strip_prefix("heliosdb_proxy_admin_requests_skipped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the skipped counter on the Prometheus page");
    assert!(skipped >= 50.0, "{skipped}");
    assert_eq!(get(port, "/health/live").status, 200);
}

/// What the server does with requests a plain client would not send: keep-alive,
/// HEAD, HTTP/1.0, pipelining, malformed heads, chunked bodies and slow requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_server_frames_requests_and_refuses_bad_ones_as_json() {
    use std::io::{Read, Write};
    if proxy_only("admin http", "the admin API is the proxy's") {
        return;
    }
    let proxy = Proxy::start(
        cluster(),
        "[admin_api]\nread_timeout_ms = 500\nidle_timeout_ms = 800\n",
    );
    let port = admin(&proxy);
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // Reads one response with a Content-Length body from `s`.
    fn response(s: &mut std::net::TcpStream) -> (String, String) {
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut byte).expect("response head"),
                1,
                "closed mid-head: {raw:?}"
            );
            raw.push(byte[0]);
        }
        let head = String::from_utf8(raw).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("Content-Length");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("body");
        (head, String::from_utf8(body).unwrap())
    }
    fn closed(s: &mut std::net::TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(s.read(&mut byte), Ok(0))
    }

    // Keep-alive: two requests, one of them pipelined with HEAD, on one connection.
    let mut s = connect();
    s.write_all(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /version HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let (head, body) = response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Connection: keep-alive"), "{head}");
    assert_eq!(body, r#"{"status":"ok"}"#);
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.contains("Content-Length: 0\r\n"),
        "HEAD announces the GET length: {head}"
    );
    // Nothing follows a HEAD response; the idle connection is closed after the timeout.
    let idle = std::time::Instant::now();
    assert!(closed(&mut s), "idle connection not closed");
    assert!(
        idle.elapsed() >= Duration::from_millis(600),
        "{:?}",
        idle.elapsed()
    );

    // HTTP/1.0 closes after its response.
    let mut s = connect();
    s.write_all(b"GET /health/live HTTP/1.0\r\n\r\n").unwrap();
    let (head, _) = response(&mut s);
    assert!(head.contains("Connection: close"), "{head}");
    assert!(closed(&mut s));

    // Refusals are JSON with the right status, and close the connection.
    for (request, status) in [
        (&b"GARBAGE\x01 / HTTP/1.1\r\n\r\n"[..], 400),
        (
            b"POST /config/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
        ),
        (
            b"POST /config/reload HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
        (
            b"GET /nodes HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            400,
        ),
    ] {
        let mut s = connect();
        s.write_all(request).unwrap();
        let (head, body) = response(&mut s);
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let json: Value = serde_json::from_str(&body).expect("JSON error");
        assert!(json["error"].is_string(), "{body}");
        assert!(closed(&mut s));
    }

    // A request that stops half-way is answered 408 at the read timeout.
    let mut s = connect();
    s.write_all(b"GET /nodes HTTP/1.1\r\nHo").unwrap();
    let (head, body) = response(&mut s);
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert!(body.contains("error"), "{body}");

    // Expect: 100-continue gets its interim response before the body is sent.
    let mut s = connect();
    s.write_all(b"POST /config/reload HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"{}").unwrap();
    let (head, _) = response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    proxy.assert_running();
}
