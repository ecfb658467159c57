//! Nodes reached over a Unix-domain socket: `host` is the server's socket directory (as
//! libpq and PgBouncer read a `host` starting with `/`), and the proxy connects to
//! `{host}/.s.PGSQL.{port}`. Queries in session and transaction pooling (PostgreSQL itself
//! confirms the backend connection has no client address or port), the console's host and
//! port columns, a cancel forwarded over the socket, auth_query lookups over it, the
//! health checker's view while the server runs, after it stops and once it is back, and
//! `--check-config` on socket directories. The health test runs its own PostgreSQL.

mod common;

use std::time::Duration;

use common::http::get;
use common::proxy::{base_config, merge, proxy_command};
use common::{
    proxy_only, run_tool, sqlstate, wait_until, PgCluster, Proxy, DATABASE, SUPERUSER,
    SUPERUSER_PASSWORD, TRUST_USER,
};
use serde_json::Value;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

/// Checks run every 0.2 s, so any state shows within a second or two.
const SETTLE: Duration = Duration::from_secs(60);

/// The cluster as the only node, reached by its socket directory.
fn unix_node(pg: &PgCluster) -> String {
    format!(
        "[[nodes]]\n\
         name = \"pg\"\n\
         host = \"{}\"\n\
         port = {}\n\
         role = \"primary\"\n",
        pg.socket_dir.display(),
        pg.port
    )
}

/// The node's address as the proxy names it: the socket file.
fn socket_file(pg: &PgCluster) -> String {
    format!("{}/.s.PGSQL.{}", pg.socket_dir.display(), pg.port)
}

fn pooled(mode: &str, pg: &PgCluster) -> String {
    format!(
        "admin_users = [\"{TRUST_USER}\"]\n[pool_mode]\nmode = \"{mode}\"\n{}",
        unix_node(pg)
    )
}

/// The rows of a SHOW on the proxy's SQL console.
async fn show(proxy: &Proxy, what: &str) -> Vec<SimpleQueryRow> {
    let console = proxy
        .connect(TRUST_USER, None, "heliosproxy")
        .await
        .unwrap_or_else(|e| panic!("console: {e:?}\n{}", proxy.log()));
    console
        .simple_query(&format!("SHOW {what}"))
        .await
        .unwrap_or_else(|e| panic!("SHOW {what}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .collect()
}

/// A `pg_sleep(30)` through `proxy` cancelled with the key the proxy gave: the proxy
/// forwards the CancelRequest to the server over the Unix socket.
async fn cancel_a_long_query(pg: &'static PgCluster, proxy: &Proxy, marker: &str) {
    let client = proxy.client().await;
    common::cancel_stops_a_long_query(client, pg, marker, || proxy.log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_cancels_go_over_the_socket_in_session_and_transaction_pooling() {
    if proxy_only(
        "unix-socket nodes",
        "the node's host is the proxy's setting",
    ) {
        return;
    }
    let pg = common::cluster();
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(pg, &pooled(mode, pg));
        let client = proxy.client().await;
        // A backend connected over a Unix socket has no client address, and
        // pg_stat_activity shows its client_port as -1.
        let row = client
            .query_one(
                "SELECT inet_server_addr() IS NULL, current_setting('port')::int, \
                        client_addr IS NULL, client_port \
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}\n{}", proxy.log()));
        let (no_server_addr, port, no_client_addr, client_port): (bool, i32, bool, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert!(no_server_addr, "{mode}: inet_server_addr() is set");
        assert_eq!(port, i32::from(pg.port), "{mode}");
        assert!(no_client_addr, "{mode}: the backend has a client address");
        assert_eq!(client_port, -1, "{mode}: not a Unix-socket backend");
        // Writes and reads in a transaction, and one more statement after it.
        let table = format!("unix_socket_{mode}");
        client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (n int); \
                 BEGIN; INSERT INTO {table} SELECT generate_series(1, 10); COMMIT;"
            ))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let sum: i64 = client
            .query_one(&format!("SELECT sum(n) FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"))
            .get(0);
        assert_eq!(sum, 55, "{mode}");
        client
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
        // The console shows the socket directory and port where PgBouncer's columns
        // have a host and port, and no local port.
        let dir = pg.socket_dir.display().to_string();
        let port = pg.port.to_string();
        let servers = show(&proxy, "SERVERS").await;
        assert!(!servers.is_empty(), "{mode}: no server connection shown");
        for row in &servers {
            assert_eq!(
                (row.get("addr"), row.get("port"), row.get("local_port")),
                (Some(dir.as_str()), Some(port.as_str()), None),
                "{mode}"
            );
        }
        let databases = show(&proxy, "DATABASES").await;
        let app = databases
            .iter()
            .find(|r| r.get("name") == Some(DATABASE))
            .expect("the database is listed");
        assert_eq!(
            (app.get("host"), app.get("port")),
            (Some(dir.as_str()), Some(port.as_str())),
            "{mode}"
        );
        drop(client);

        cancel_a_long_query(pg, &proxy, &format!("helios-unix-cancel-{mode}")).await;

        // The admin API names the node by its socket file.
        let admin = proxy.admin_port.expect("admin port");
        let nodes = get(admin, "/nodes").json();
        let addresses: Vec<&str> = nodes
            .as_array()
            .expect("a list of nodes")
            .iter()
            .filter_map(|n| n["address"].as_str())
            .collect();
        assert_eq!(addresses, [socket_file(pg).as_str()], "{nodes}");
        let status = proxy.stop();
        assert!(
            status.is_some_and(|s| s.success()),
            "{mode}: {status:?}\n{}",
            proxy.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_looks_roles_up_over_the_socket() {
    if proxy_only("unix-socket auth_query", "auth_query is the proxy's") {
        return;
    }
    let pg = common::cluster();
    pg.psql_admin(
        "postgres",
        "CREATE ROLE ux_role LOGIN PASSWORD 'ux-Pa55';\n\
         GRANT ALL ON SCHEMA public TO ux_role;\n",
    );
    let proxy = Proxy::start(
        pg,
        &format!(
            "users = []\n\
             [auth]\nauth_user = \"{SUPERUSER}\"\nauth_password = \"{SUPERUSER_PASSWORD}\"\n\
             {}",
            unix_node(pg)
        ),
    );
    // Known only to PostgreSQL: the proxy looked its password up over the socket.
    let client = proxy
        .connect("ux_role", Some("ux-Pa55"), DATABASE)
        .await
        .unwrap_or_else(|e| panic!("ux_role: {e:?}\n{}", proxy.log()));
    let row = client
        .query_one(
            "SELECT current_user::text, client_port FROM pg_stat_activity \
             WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let (user, client_port): (String, i32) = (row.get(0), row.get(1));
    assert_eq!((user.as_str(), client_port), ("ux_role", -1));
    let Err(err) = proxy.connect("ux_role", Some("wrong"), DATABASE).await else {
        panic!("ux_role logged in with a wrong password");
    };
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");
    drop(client);
    proxy.stop();
}

/// `/nodes/{address}` with the socket path percent-encoded into one path segment.
fn node(admin: u16, address: &str) -> Value {
    let r = get(admin, &format!("/nodes/{}", address.replace('/', "%2F")));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn the_health_checker_reaches_the_node_over_the_socket() {
    if proxy_only("unix-socket health", "health checks are the proxy's") {
        return;
    }
    let pg = PgCluster::start();
    let overrides = format!(
        "[health]\n\
         check_interval_secs = 0.2\n\
         timeout_ms = 500\n\
         failure_threshold = 2\n\
         success_threshold = 1\n\
         {}",
        unix_node(&pg)
    );
    let proxy = Proxy::start(&pg, &overrides);
    let admin = proxy.admin_port.expect("admin port");
    let address = socket_file(&pg);
    let mut last = Value::Null;
    let wait_for = |what: &str, last: &mut Value, cond: &dyn Fn(&Value) -> bool| {
        let ok = wait_until(SETTLE, || {
            *last = node(admin, &address);
            cond(last)
        });
        assert!(ok, "node {address} never {what}: {last}\n{}", proxy.log());
    };

    wait_for("was checked", &mut last, &|n| {
        n["last_check"].is_string() && n["latency_ms"].as_f64().is_some_and(|l| l > 0.0)
    });
    assert_eq!(last["healthy"], true, "{last}");
    assert_eq!(last["last_error"], Value::Null, "{last}");
    assert_eq!(last["in_recovery"], false, "{last}");
    assert_eq!(last["name"], "pg", "{last}");

    // Stopped: the socket file is gone, and the node turns unhealthy saying so.
    pg.stop_server();
    wait_for("turned unhealthy", &mut last, &|n| n["healthy"] == false);
    let error = last["last_error"].as_str().expect("last_error while down");
    assert!(error.contains(&address), "{error}");
    assert_eq!(get(admin, "/health/ready").status, 503);

    // Back: healthy again, and clients get through.
    pg.restart_server();
    wait_for("recovered", &mut last, &|n| n["healthy"] == true);
    let out = common::psql(
        &proxy,
        SUPERUSER,
        Some(SUPERUSER_PASSWORD),
        &["-Atc", "SELECT 40 + 2"],
        None,
    );
    assert!(out.status.success() && out.stdout.trim() == "42", "{out}");
    let status = proxy.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        proxy.log()
    );
}

/// `--check-config` on the base configuration with `overrides` merged in.
fn check_config(overrides: &str) -> common::ToolOutput {
    let mut config = base_config(5432, 16432, 19090);
    merge(&mut config, overrides);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).expect("write config");
    let mut cmd = proxy_command();
    cmd.arg("--config").arg(&path).arg("--check-config");
    run_tool(cmd, None, Duration::from_secs(30))
}

#[test]
fn check_config_takes_absolute_socket_directories_only() {
    if proxy_only("unix-socket check-config", "runs the proxy binary") {
        return;
    }
    let node = |host: &str| format!("[[nodes]]\nhost = \"{host}\"\nport = 5432\n");
    let out = check_config(&node("/var/run/postgresql"));
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(out.stdout.contains("configuration OK"), "{out}");

    let out = check_config(&node("run/pg"));
    assert_ne!(out.status.code(), Some(0), "{out}");
    assert!(out.stderr.contains("nodes[0].host"), "{out}");
    assert!(out.stderr.contains("absolute path"), "{out}");

    // TLS that must be used cannot be, over a Unix socket.
    let out = check_config(&format!(
        "[tls]\nserver_sslmode = \"require\"\n{}",
        node("/var/run/postgresql")
    ));
    assert_ne!(out.status.code(), Some(0), "{out}");
    assert!(out.stderr.contains("tls.server_sslmode"), "{out}");
    assert!(out.stderr.contains("nodes[0]"), "{out}");
}
