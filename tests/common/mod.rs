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
