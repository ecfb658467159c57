//! Read/write splitting against a real primary and two streaming standbys
//! (`pg_basebackup -R`): where reads and writes land (proved with `pg_is_in_recovery()`,
//! `inet_server_port()` and inserted rows), each balancing strategy over 1,000 queries,
//! routing hints, transactions, schema routes, the lag threshold (replay paused with
//! `pg_wal_replay_pause()`), read-your-writes 1,000 times, and the decision counters
//! and debug log.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::http::get;
use common::{proxy_only, PgCluster, Proxy};
use tokio_postgres::{Client, SimpleQueryMessage};

/// A primary and two standbys shared by every test of this binary.
struct Cluster {
    primary: PgCluster,
    standbys: [PgCluster; 2],
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The tests share the standbys and one pauses their replay: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let primary = PgCluster::start();
        let standbys = [primary.start_standby(), primary.start_standby()];
        // SAFETY: registers a plain function without captured state; it runs once at exit.
        unsafe { libc::atexit(stop_at_exit) };
        Cluster { primary, standbys }
    })
}

extern "C" fn stop_at_exit() {
    if let Some(c) = CLUSTER.get() {
        for s in &c.standbys {
            s.stop();
        }
        c.primary.stop();
    }
}

/// The proxy config for the three nodes, with `extra` merged in (its tables merge key by
/// key; arrays such as `[[schema_routes]]` are added).
fn config(extra: &str) -> String {
    let mut table: toml::Table = toml::from_str(&base_config()).expect("routing config");
    common::proxy::merge(&mut table, extra);
    toml::to_string(&table).expect("serialise")
}

fn base_config() -> String {
    let c = cluster();
    format!(
        r#"
[pool_mode]
mode = "transaction"
max_pool_size = 8

[load_balancer]
read_write_split = true

[health]
check_interval_secs = 0.2
timeout_ms = 1000

[routing]
lag_check_interval_secs = 0.2
# Only the lag test limits lag: a loaded machine must not turn reads away elsewhere.
max_replica_lag_ms = 0

[[nodes]]
name = "primary"
host = "127.0.0.1"
port = {}
role = "primary"

[[nodes]]
name = "standby-a"
host = "127.0.0.1"
port = {}
role = "standby"
weight = 100

[[nodes]]
name = "standby-b"
host = "127.0.0.1"
port = {}
role = "replica"
weight = 300
"#,
        c.primary.port, c.standbys[0].port, c.standbys[1].port
    )
}

fn proxy(extra: &str) -> Proxy {
    Proxy::start(&cluster().primary, &config(extra))
}

async fn one(client: &Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    rows.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Waits until every standby has replayed what the primary has written so far (its
/// insert position: with `synchronous_commit = off` a commit can be acknowledged before
/// its record reaches the write position).
async fn standbys_caught_up() {
    let c = cluster();
    let primary = c.primary.admin("postgres").await;
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for standby in &c.standbys {
        let s = standby.admin("postgres").await;
        assert!(
            common::wait_until_async(Duration::from_secs(30), || async {
                s.query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
            })
            .await,
            "standby on port {} did not replay to {lsn}",
            standby.port
        );
    }
}

/// Waits until the proxy's health checks have seen every node (lag and replay known).
fn checked(proxy: &Proxy) {
    let port = proxy.admin_port.unwrap();
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            let nodes = get(port, "/nodes").json();
            nodes.as_array().unwrap().iter().all(|n| {
                n["healthy"] == true
                    && n["last_check"].is_string()
                    && (n["role"] == "primary" || n["replication_lag_seconds"].is_number())
            })
        }),
        "nodes not all checked:\n{}",
        get(port, "/nodes").body
    );
    // The shards learn each check through their mailbox, after `/nodes` shows it; a
    // `/pools` snapshot travels the same mailbox, so once it answers every shard routes
    // by the topology seen above.
    assert_eq!(get(port, "/pools").status, 200);
}

async fn setup_table(name: &str) {
    let primary = cluster().primary.admin(common::DATABASE).await;
    primary
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v text)"
        ))
        .await
        .unwrap();
    standbys_caught_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_standbys_and_writes_to_the_primary() {
    if proxy_only("split", "read/write splitting is the proxy's") {
        return;
    }
    let _serial = SERIAL.lock().await;
    setup_table("split_rows").await;
    let proxy = proxy("");
    checked(&proxy);
    let client = proxy.client().await;
    assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "t");
    // Extended protocol (tokio-postgres prepares a named statement) routes the same way.
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    // A write lands on the primary: the row is there, not on a standby's own.
    let on_primary = one(
        &client,
        "INSERT INTO split_rows VALUES (1, 'a') RETURNING pg_is_in_recovery()",
    )
    .await;
    assert_eq!(on_primary, "f");
    let primary = cluster().primary.admin(common::DATABASE).await;
    let n: i64 = primary
        .query_one("SELECT count(*) FROM split_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // Locking reads, unknown functions and explicit transactions go to the primary.
    assert_eq!(
        one(
            &client,
            "SELECT pg_is_in_recovery() FROM split_rows FOR UPDATE"
        )
        .await,
        "f"
    );
    primary
        .batch_execute(
            "CREATE OR REPLACE FUNCTION split_touch() RETURNS bool LANGUAGE sql AS 'SELECT pg_is_in_recovery()'",
        )
        .await
        .unwrap();
    standbys_caught_up().await;
    assert_eq!(one(&client, "SELECT split_touch()").await, "f");
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "f");
    assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.batch_execute("COMMIT").await.unwrap();
    // A transaction opened READ ONLY may run on a standby, start to end. (A session that
    // has not written: this one's reads wait for the standbys to replay its writes.)
    let reader = proxy.client().await;
    reader.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(one(&reader, "SELECT pg_is_in_recovery()").await, "t");
    let port = one(&reader, "SELECT inet_server_port()").await;
    assert_eq!(one(&reader, "SELECT inet_server_port()").await, port);
    reader.batch_execute("COMMIT").await.unwrap();
    // A serializable one may not (a hot standby refuses SERIALIZABLE).
    reader
        .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY")
        .await
        .unwrap();
    assert_eq!(one(&reader, "SELECT pg_is_in_recovery()").await, "f");
    reader.batch_execute("COMMIT").await.unwrap();
    // With no standby able to take work, reads fall back to the primary.
    let admin = proxy.admin_port.unwrap();
    for standby in ["standby-a", "standby-b"] {
        let address = format!(
            "127.0.0.1:{}",
            cluster().standbys[usize::from(standby == "standby-b")].port
        );
        let r = common::http::post(admin, &format!("/nodes/{address}/disable"));
        assert_eq!(r.status, 200);
    }
    // Workers take the new topology on their next tick.
    assert!(
        common::wait_until_async(Duration::from_secs(10), || async {
            one(&client, "SELECT pg_is_in_recovery()").await == "f"
        })
        .await,
        "reads still reach disabled standbys"
    );
    for _ in 0..20 {
        assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "f");
    }
}

/// Ports of the servers that answered `n` reads, counted.
async fn spread(client: &Client, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        *counts
            .entry(one(client, "SELECT inet_server_port()").await)
            .or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_strategy_spreads_1000_reads_as_designed() {
    if proxy_only("strategies", "read/write splitting is the proxy's") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let c = cluster();
    let (a, b) = (
        c.standbys[0].port.to_string(),
        c.standbys[1].port.to_string(),
    );
    let primary = c.primary.port.to_string();
    for strategy in [
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "latency_based",
        "random_two_choices",
    ] {
        // One worker, so one strategy state sees every read; checks slow enough that
        // latency-based sees one measurement during the run.
        let proxy = proxy(&format!(
            "workers = 1\n[load_balancer]\nread_write_split = true\nread_strategy = \"{strategy}\"\n\
             [health]\ncheck_interval_secs = 30\ntimeout_ms = 5000\n[routing]\nlag_check_interval_secs = 30\nmax_replica_lag_ms = 0\n"
        ));
        checked(&proxy);
        let client = proxy.client().await;
        let counts = spread(&client, 1000).await;
        let (on_a, on_b) = (
            counts.get(&a).copied().unwrap_or(0),
            counts.get(&b).copied().unwrap_or(0),
        );
        assert_eq!(
            counts.get(&primary),
            None,
            "{strategy}: a read hit the primary"
        );
        assert_eq!(on_a + on_b, 1000, "{strategy}: {counts:?}");
        match strategy {
            "round_robin" | "least_connections" => {
                assert_eq!((on_a, on_b), (500, 500), "{strategy}")
            }
            "weighted_round_robin" => assert_eq!((on_a, on_b), (250, 750), "{strategy}"),
            "latency_based" => {
                let nodes = get(proxy.admin_port.unwrap(), "/nodes").json();
                let latency = |port: &str| {
                    nodes
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|n| n["address"] == format!("127.0.0.1:{port}"))
                        .unwrap()["latency_ms"]
                        .as_f64()
                        .unwrap()
                };
                let fastest = if latency(&a) <= latency(&b) {
                    on_a
                } else {
                    on_b
                };
                assert_eq!(fastest, 1000, "{strategy}: {counts:?} {nodes}");
            }
            "random_two_choices" => {
                assert!(on_a > 350 && on_b > 350, "{strategy}: {counts:?}")
            }
            _ => unreachable!(),
        }
        println!("{strategy}: {counts:?}");
        drop(client);
        proxy.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_and_schema_routes_pick_the_node() {
    if proxy_only("hints", "read/write splitting is the proxy's") {
        return;
    }
    let _serial = SERIAL.lock().await;
    setup_table("routed_orders").await;
    setup_table("routed_events").await;
    let proxy = proxy(
        "[[schema_routes]]\ntables = [\"routed_orders\"]\ntarget = \"primary\"\n\
         [[schema_routes]]\ntables = [\"public.routed_events\"]\ntarget = \"standby-b\"\n",
    );
    checked(&proxy);
    let client = proxy.client().await;
    let c = cluster();
    assert_eq!(
        one(&client, "/*+ route=primary */ SELECT pg_is_in_recovery()").await,
        "f"
    );
    assert_eq!(
        one(
            &client,
            "SELECT /* helios:route=primary */ pg_is_in_recovery()"
        )
        .await,
        "f"
    );
    assert_eq!(
        one(
            &client,
            "/* helios:route=standby */ SELECT pg_is_in_recovery()"
        )
        .await,
        "t"
    );
    assert_eq!(
        one(
            &client,
            "SELECT /* helios:route=standby helios:cache=skip */ pg_is_in_recovery()"
        )
        .await,
        "t"
    );
    // `nearest` takes any node that may work; an unknown hint is ignored.
    one(&client, "/*+ route=nearest */ SELECT 1").await;
    assert_eq!(
        one(
            &client,
            "/* helios:route=moon */ SELECT pg_is_in_recovery()"
        )
        .await,
        "t"
    );
    // Schema routes: reads of routed_orders stay on the primary; routed_events on standby-b.
    for _ in 0..10 {
        assert_eq!(
            one(
                &client,
                "SELECT pg_is_in_recovery() FROM (SELECT 1) x LEFT JOIN routed_orders ON true LIMIT 1"
            )
            .await,
            "f"
        );
        assert_eq!(
            one(&client, "SELECT inet_server_port() FROM (SELECT 1) x LEFT JOIN routed_events ON true LIMIT 1").await,
            c.standbys[1].port.to_string(),
            "ports: primary {}, standbys {} {}; decisions {}",
            c.primary.port,
            c.standbys[0].port,
            c.standbys[1].port,
            get(proxy.admin_port.unwrap(), "/metrics").json()["routing_decisions"]
        );
    }
    // A hint cannot send a write to a standby.
    assert_eq!(
        one(
            &client,
            "/* helios:route=standby */ INSERT INTO routed_orders VALUES (1, 'x') RETURNING pg_is_in_recovery()"
        )
        .await,
        "f"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_standby_gets_no_reads_until_it_catches_up() {
    if proxy_only("lag", "read/write splitting is the proxy's") {
        return;
    }
    let _serial = SERIAL.lock().await;
    setup_table("lag_rows").await;
    let proxy = proxy("[routing]\nlag_check_interval_secs = 0.1\nmax_replica_lag_ms = 300\n");
    checked(&proxy);
    let client = proxy.client().await;
    let c = cluster();
    let standbys: Vec<Client> = futures_util::future::join_all(
        c.standbys
            .iter()
            .map(|s| async { s.admin("postgres").await }),
    )
    .await;
    for s in &standbys {
        s.batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .unwrap();
    }
    // Writes the standbys receive but do not replay: their replay lag grows.
    let primary = c.primary.admin(common::DATABASE).await;
    let mut landed_on_primary = false;
    for i in 0..200 {
        primary
            .batch_execute(&format!("INSERT INTO lag_rows VALUES ({i}, 'x')"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
        if one(&client, "SELECT pg_is_in_recovery()").await == "f" {
            landed_on_primary = true;
            break;
        }
    }
    assert!(landed_on_primary, "reads kept going to lagging standbys");
    let nodes = get(proxy.admin_port.unwrap(), "/nodes").json();
    for _ in 0..20 {
        assert_eq!(
            one(&client, "SELECT pg_is_in_recovery()").await,
            "f",
            "{nodes}"
        );
    }
    for s in &standbys {
        s.batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
    }
    standbys_caught_up().await;
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            one(&client, "SELECT pg_is_in_recovery()").await == "t"
        })
        .await,
        "reads did not return to the standbys"
    );
    let metrics = get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
    assert!(
        metrics.contains("reason=\"replica_lag\""),
        "no replica_lag decisions counted:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_writes_1000_times() {
    if proxy_only("ryw", "read/write splitting is the proxy's") {
        return;
    }
    let _serial = SERIAL.lock().await;
    setup_table("ryw_rows").await;
    let proxy = Proxy::start_logged(
        &cluster().primary,
        &config("[routing]\nmax_replica_lag_ms = 0\n"),
        Some("info,heliosdb_proxy=debug"),
    );
    checked(&proxy);
    let client = proxy.client().await;
    for i in 0..1000 {
        client
            .simple_query(&format!("INSERT INTO ryw_rows VALUES ({i}, 'v{i}')"))
            .await
            .unwrap();
        let seen = one(
            &client,
            &format!("SELECT count(*) FROM ryw_rows WHERE id = {i}"),
        )
        .await;
        assert_eq!(seen, "1", "read {i} missed its own write");
    }
    // Once a standby has replayed the last write, reads go back to the standbys.
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            one(&client, "SELECT pg_is_in_recovery()").await == "t"
        })
        .await,
        "reads never returned to a standby after the writes"
    );
    let metrics = get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
    for reason in ["write_query", "read_your_writes", "read_query"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "no {reason} decisions counted:\n{metrics}"
        );
    }
    let json = get(proxy.admin_port.unwrap(), "/metrics").json();
    assert!(json["routing_decisions"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    let log = proxy.log();
    assert!(
        log.contains("node=primary reason=write_query")
            && log.contains("reason=read_your_writes")
            && log.contains("reason=read_query"),
        "routing decisions not in the debug log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_splits_reads_and_keeps_session_state_on_the_primary() {
    if proxy_only("session-split", "read/write splitting is the proxy's") {
        return;
    }
    let _serial = SERIAL.lock().await;
    setup_table("session_split").await;
    let proxy = proxy("[pool_mode]\nmode = \"session\"\n");
    checked(&proxy);
    let client = proxy.client().await;
    // The session's home connection is on the primary, and what the client was told is
    // that connection's pid; reads outside a transaction run on a standby.
    client.batch_execute("BEGIN").await.unwrap();
    let home_pid = one(&client, "SELECT pg_backend_pid()::text").await;
    assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.batch_execute("COMMIT").await.unwrap();
    // (Reads wait for a standby to replay past the session's last unit on the primary.)
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            one(&client, "SELECT pg_is_in_recovery()").await == "t"
        })
        .await,
        "reads never reached a standby"
    );
    // Extended protocol with named statements routes the same way.
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    // Settings follow the session to the standby.
    client
        .batch_execute("SET application_name = 'split-session'; SET statement_timeout = '41s'")
        .await
        .unwrap();
    let settings = "SELECT pg_is_in_recovery()::text || ' ' || current_setting('application_name') || ' ' || current_setting('statement_timeout')";
    let seen = std::cell::RefCell::new(Vec::new());
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            let row = one(&client, settings).await;
            let done = row.starts_with("true");
            seen.borrow_mut().push(row);
            done
        })
        .await,
        "the settings read never reached a standby"
    );
    for row in seen.borrow().iter() {
        assert!(
            row.ends_with(" split-session 41s"),
            "settings lost on a node: {row}"
        );
    }
    // Writes go to the primary, and the session reads them back at once.
    for i in 0..50 {
        let on = one(
            &client,
            &format!("INSERT INTO session_split VALUES ({i}, 'v') RETURNING pg_is_in_recovery()"),
        )
        .await;
        assert_eq!(on, "f");
        assert_eq!(
            one(
                &client,
                &format!("SELECT count(*) FROM session_split WHERE id = {i}")
            )
            .await,
            "1",
            "read {i} missed the session's own write"
        );
    }
    // A transaction runs on the primary, start to end, on the session's home connection.
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        one(&client, "SELECT pg_backend_pid()::text").await,
        home_pid
    );
    client.batch_execute("COMMIT").await.unwrap();
    // State that cannot follow the session keeps it on the primary: a temporary table.
    client
        .batch_execute(
            "CREATE TEMP TABLE session_scratch (x int); INSERT INTO session_scratch VALUES (1)",
        )
        .await
        .unwrap();
    assert_eq!(
        one(&client, "SELECT count(*) FROM session_scratch").await,
        "1"
    );
    assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "f");
    assert_eq!(
        one(&client, "SELECT pg_backend_pid()::text").await,
        home_pid
    );
    // Gone again: reads return to the standbys once replay caught up.
    client
        .batch_execute("DROP TABLE session_scratch")
        .await
        .unwrap();
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            one(&client, "SELECT pg_is_in_recovery()").await == "t"
        })
        .await,
        "reads never returned to a standby after the temporary table went"
    );
    // LISTEN pins the same way, and the notification arrives.
    client
        .batch_execute("LISTEN session_split_channel")
        .await
        .unwrap();
    assert_eq!(one(&client, "SELECT pg_is_in_recovery()").await, "f");
    client.batch_execute("UNLISTEN *").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_from_standbys_are_stored_only_once_they_replayed_the_writes() {
    if proxy_only(
        "cache-split",
        "read/write splitting and the cache are the proxy's",
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    setup_table("cache_split_rows").await;
    let primary = cluster().primary.admin(common::DATABASE).await;
    primary
        .batch_execute("INSERT INTO cache_split_rows VALUES (1, 'v0')")
        .await
        .unwrap();
    standbys_caught_up().await;
    let proxy = proxy("[cache]\nenabled = true\n");
    checked(&proxy);
    let admin = proxy.admin_port.unwrap();
    let hits = || get(admin, "/cache").json()["hits"].as_u64().unwrap();
    let client = proxy.client().await;
    let read = "SELECT v FROM cache_split_rows WHERE id = 1";
    // Read on the standbys: stored once the health checks saw the primary's position
    // after the table's last write, and a standby past it.
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            let before = hits();
            assert_eq!(one(&client, read).await, "v0");
            hits() > before
        })
        .await,
        "reads on the standbys were never cached: {}",
        get(admin, "/cache").body
    );
    // A session's own writes: each read after a write sees it (read-your-writes sends it
    // to the primary or a standby that replayed it; the cache never answers older).
    let other = proxy.client().await;
    for i in 1..=50 {
        client
            .simple_query(&format!(
                "UPDATE cache_split_rows SET v = 'v{i}' WHERE id = 1"
            ))
            .await
            .unwrap();
        assert_eq!(one(&client, read).await, format!("v{i}"), "after write {i}");
        // Another session reading meanwhile may see a standby's older row, never a
        // cached one older than that standby's.
        one(&other, read).await;
    }
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            let before = hits();
            assert_eq!(one(&client, read).await, "v50");
            hits() > before
        })
        .await,
        "reads were not cached again after the writes: {}",
        get(admin, "/cache").body
    );
    proxy.stop();
}
