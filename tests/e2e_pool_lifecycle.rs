//! Pool life cycle through the proxy, observed on PostgreSQL itself: min_idle keeps
//! connections open, idle_timeout and max_lifetime close them, a released backend is
//! reused only after the reset query wiped the previous client's session state, and the
//! proxy logs in to a backend that trusts it without a password.
//!
//! Each test uses its own database so the backend counts it reads are its own.

mod common;

use std::time::Duration;

use common::{cluster, target, SUPERUSER, SUPERUSER_PASSWORD, TRUST_USER};

/// Creates `db` on the cluster (once) and returns it.
async fn fresh_database(db: &str) -> String {
    let admin = cluster().admin("postgres").await;
    let exists: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await
        .expect("look up database")
        .get(0);
    if exists == 0 {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
    }
    db.to_string()
}

/// Backends connected to `db`, as PostgreSQL counts them.
async fn backends_on(db: &str) -> i64 {
    cluster()
        .admin_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"
        ))
        .await
}

async fn wait_for_backends(db: &str, wanted: i64) -> bool {
    common::wait_until_async(Duration::from_secs(15), || async {
        backends_on(db).await == wanted
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_connections_are_opened_and_kept() {
    if common::proxy_only(
        "min_idle_connections_are_opened_and_kept",
        "pools are the proxy's",
    ) {
        return;
    }
    let db = fresh_database("lc_min_idle").await;
    let proxy = target("workers = 1\n[pool_mode]\nmax_pool_size = 5\nmin_idle = 3\n");
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login");
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    assert!(
        wait_for_backends(&db, 3).await,
        "min_idle = 3 should keep 3 backends open, PostgreSQL sees {}\n{}",
        backends_on(&db).await,
        proxy.log()
    );
    // They stay: the maintenance pass does not close connections min_idle protects.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(backends_on(&db).await, 3, "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backends_close_after_idle_timeout() {
    if common::proxy_only(
        "idle_backends_close_after_idle_timeout",
        "pools are the proxy's",
    ) {
        return;
    }
    let db = fresh_database("lc_idle_timeout").await;
    let proxy = target("workers = 1\n[pool_mode]\nidle_timeout_secs = 1\n");
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login");
    client.simple_query("SELECT 1").await.expect("query");
    assert_eq!(backends_on(&db).await, 1);
    drop(client);
    assert!(
        wait_for_backends(&db, 0).await,
        "the idle backend was not closed after idle_timeout_secs = 1 ({} left)\n{}",
        backends_on(&db).await,
        proxy.log()
    );
    // The pool opens a new one on demand.
    let again = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login after the pool emptied");
    again.simple_query("SELECT 1").await.expect("query");
}

/// `total_connections_created` and `total_connections_closed` of /pools, for the one node.
fn pool_totals(proxy: &common::Proxy) -> (u64, u64) {
    let port = proxy.admin_port.expect("admin port");
    let pools = common::http::get(port, "/pools").json();
    let node = &pools[0];
    let count = |key: &str| {
        node[key]
            .as_u64()
            .unwrap_or_else(|| panic!("/pools has no {key}: {pools}"))
    };
    (
        count("total_connections_created"),
        count("total_connections_closed"),
    )
}

/// The pool's history survives its connections: once every backend closed (here by
/// idle_timeout, as after a server restart), the totals of /pools stay where they were
/// and only count up afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_totals_only_count_up_after_every_backend_closed() {
    if common::proxy_only(
        "pool_totals_only_count_up_after_every_backend_closed",
        "pools are the proxy's",
    ) {
        return;
    }
    let db = fresh_database("lc_pool_totals").await;
    let proxy = target("workers = 1\n[pool_mode]\nidle_timeout_secs = 1\n");
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login");
    client.simple_query("SELECT 1").await.expect("query");
    drop(client);
    assert!(
        wait_for_backends(&db, 0).await,
        "the idle backend was not closed after idle_timeout_secs = 1"
    );
    let after_close = pool_totals(&proxy);
    assert!(
        after_close.0 >= 1 && after_close.1 >= 1,
        "the opened and closed backend is counted: {after_close:?}"
    );
    // Several maintenance rounds (one a second) pass with the pool empty.
    let mut last = after_close;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = pool_totals(&proxy);
        assert!(
            now.0 >= last.0 && now.1 >= last.1,
            "/pools totals went down from {last:?} to {now:?}"
        );
        last = now;
    }
    let again = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login after the pool emptied");
    again.simple_query("SELECT 1").await.expect("query");
    let reopened = pool_totals(&proxy);
    assert!(
        reopened.0 > after_close.0,
        "a new backend adds to the total: {after_close:?} then {reopened:?}"
    );
}

async fn backend_pid(proxy: &common::Proxy, db: &str) -> i32 {
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), db)
        .await
        .expect("login");
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_are_retired_after_max_lifetime() {
    if common::proxy_only(
        "backends_are_retired_after_max_lifetime",
        "pools are the proxy's",
    ) {
        return;
    }
    let db = fresh_database("lc_lifetime").await;
    let proxy = target("workers = 1\n[pool_mode]\nmax_lifetime_secs = 1\n");
    let first = backend_pid(&proxy, &db).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = backend_pid(&proxy, &db).await;
    assert_ne!(
        first, second,
        "a backend older than max_lifetime_secs was handed out again"
    );
    assert!(
        wait_for_backends(&db, 1).await,
        "the retired backend was not closed ({} open)\n{}",
        backends_on(&db).await,
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_backend_carries_no_session_state() {
    if common::proxy_only(
        "a_reused_backend_carries_no_session_state",
        "reuse is the proxy's",
    ) {
        return;
    }
    let db = fresh_database("lc_reset").await;
    let proxy = target("workers = 1\n[pool_mode]\nmax_pool_size = 1\n");
    let first = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login");
    let pid: i32 = first
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    first
        .batch_execute(
            "SET work_mem = '77kB';
             CREATE TEMP TABLE leftover (x int);
             PREPARE leaked AS SELECT 1;
             LISTEN leaked_channel;
             SELECT pg_advisory_lock(4242);
             DECLARE held CURSOR WITH HOLD FOR SELECT 1;",
        )
        .await
        .expect("set up session state");
    drop(first);

    // max_pool_size = 1: the next client waits for, and gets, the same backend.
    let second = proxy.client_when_free(&db).await;
    let row = second
        .query_one(
            "SELECT pg_backend_pid(),
                    current_setting('work_mem'),
                    (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked'),
                    (SELECT count(*) FROM pg_listening_channels()),
                    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
                    (SELECT count(*) FROM pg_cursors WHERE name = 'held'),
                    to_regclass('pg_temp.leftover') IS NULL",
            &[],
        )
        .await
        .expect("inspect session");
    assert_eq!(row.get::<_, i32>(0), pid, "the backend was not reused");
    assert_eq!(
        row.get::<_, String>(1),
        "4MB",
        "SET leaked to the next client"
    );
    assert_eq!(row.get::<_, i64>(2), 0, "prepared statement leaked");
    assert_eq!(row.get::<_, i64>(3), 0, "LISTEN leaked");
    assert_eq!(row.get::<_, i64>(4), 0, "advisory lock leaked");
    assert_eq!(row.get::<_, i64>(5), 0, "WITH HOLD cursor leaked");
    assert!(row.get::<_, bool>(6), "temp table leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_trusts_the_proxy_needs_no_password() {
    if common::proxy_only(
        "backend_that_trusts_the_proxy_needs_no_password",
        "backend auth is the proxy's",
    ) {
        return;
    }
    // PostgreSQL trusts TRUST_USER on TCP; the proxy logs in as it with no server_password.
    let proxy = target(&format!(
        "[[users]]\nname = \"{TRUST_USER}\"\nauth_method = \"trust\"\n"
    ));
    let client = proxy.trust_client().await;
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(user, TRUST_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_backend_the_server_closed_is_not_handed_out() {
    if common::proxy_only(
        "a_pooled_backend_the_server_closed_is_not_handed_out",
        "pools are the proxy's",
    ) {
        return;
    }
    let db = fresh_database("lc_server_closed").await;
    let proxy = target("workers = 1\n");
    let pid = backend_pid(&proxy, &db).await;
    assert!(wait_for_backends(&db, 1).await, "{}", proxy.log());
    // The server ends the idle pooled connection (as a restart or idle_session_timeout would).
    let admin = cluster().admin("postgres").await;
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed);
    assert!(wait_for_backends(&db, 0).await, "{}", proxy.log());
    // The next client gets a fresh backend, not the dead one and not an error.
    let client = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), &db)
        .await
        .expect("login after the pooled backend died");
    let new_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("query on a fresh backend")
        .get(0);
    assert_ne!(new_pid, pid);
}
