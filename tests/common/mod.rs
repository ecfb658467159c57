//! End-to-end test harness shared by every `tests/*.rs` binary: a private PostgreSQL per test
//! binary, the proxy (or PostgreSQL itself, for validating the harness) in front of it, a raw
//! wire-protocol client for what tokio-postgres cannot show, and the psql/pgbench runners.
//!
//! Target selection: `HELIOS_TEST_TARGET=direct` runs every scenario straight against
//! PostgreSQL (scenarios that only make sense for the proxy print a note and return); unset or
//! `proxy` runs them through the real `heliosdb-proxy` binary.
//!
//! Other knobs: `HELIOS_PG_BIN` (directory with initdb/postgres), `HELIOS_TEST_PG_USER` (the
//! account PostgreSQL runs as when the tests run as root), `HELIOS_TEST_KEEP=1` (keep the
//! PostgreSQL directory), `HELIOS_TEST_PROXY_LOG` (RUST_LOG for the proxy, default `info`).
//! None of them reaches the proxy: it reads HELIOS_* variables as configuration overrides.

// Each test binary uses a different subset of the harness.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod cluster;
pub mod http;
pub mod proxy;
pub mod raw;
pub mod tools;

use std::time::Duration;

pub use cluster::{
    cluster, PgCluster, DATABASE, MD5_PASSWORD, MD5_USER, SUPERUSER, SUPERUSER_PASSWORD, TRUST_USER,
};
pub use proxy::{target, Proxy};
pub use raw::RawConn;
pub use tools::{pgbench, psql, run_tool, wait_until, wait_until_async, ToolOutput};

/// Generous guard against hangs: no scenario step should come near it.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// True when `HELIOS_TEST_TARGET=direct`: scenarios talk to PostgreSQL itself.
pub fn is_direct() -> bool {
    match std::env::var("HELIOS_TEST_TARGET") {
        Ok(v) if v == "direct" => true,
        Ok(v) if v.is_empty() || v == "proxy" => false,
        Ok(v) => panic!("HELIOS_TEST_TARGET must be `direct` or `proxy`, not `{v}`"),
        Err(_) => false,
    }
}

/// For scenarios that only make sense through the proxy: prints why the test does nothing
/// in direct mode and returns true so the caller can return early.
pub fn proxy_only(test: &str, why: &str) -> bool {
    if is_direct() {
        println!("note: {test} skipped with HELIOS_TEST_TARGET=direct: {why}");
        true
    } else {
        false
    }
}

/// Runs `fut` under the hang guard `limit`, panicking with `what` if it takes longer.
pub async fn guarded<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// The SQLSTATE of a tokio-postgres error, or "" when it carries none (I/O, closed).
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    err.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// Runs `SELECT pg_sleep(30) /* marker */` on `client`, cancels it with the key the
/// client was given once PostgreSQL shows it running, and checks the query ends with
/// 57014 and the connection goes on. `context` is added to a failed assertion.
pub async fn cancel_stops_a_long_query(
    client: tokio_postgres::Client,
    cluster: &PgCluster,
    marker: &str,
    context: impl Fn() -> String,
) {
    let token = client.cancel_token();
    let sql = format!("SELECT pg_sleep(30) /* {marker} */");
    let query = tokio::spawn(async move {
        let result = client.simple_query(&sql).await;
        (result, client)
    });
    let watch = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    let running = wait_until_async(Duration::from_secs(10), || async {
        cluster.admin_i64(&watch).await == 1
    })
    .await;
    assert!(running, "the long query never started on PostgreSQL");
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send CancelRequest");
    let (result, client) = guarded(Duration::from_secs(10), "cancelled query", query)
        .await
        .expect("query task");
    let err = result.expect_err("the query was cancelled");
    assert_eq!(sqlstate(&err), "57014", "{err:?}\n{}", context());
    let v: i32 = client
        .query_one("SELECT 5", &[])
        .await
        .expect("connection usable after cancel")
        .get(0);
    assert_eq!(v, 5);
}

/// Deterministic pseudo-random bytes (xorshift), so payloads need no RNG dependency.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}
