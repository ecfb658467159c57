//! 1,000 clients that vanish mid-query. Each backend they held must be cancelled and drained
//! (or closed), never left running the abandoned query, and the pool must not grow past its
//! maximum. Alone in its binary so the backend count on PostgreSQL is this test's alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{guarded, target, DATABASE, TRUST_USER};

const CLIENTS: usize = 1000;
const CONCURRENCY: usize = 32;
const MARKER: &str = "helios-churn";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_mid_query_release_backends() {
    let target = Arc::new(target(
        "[pool_mode]\nmax_pool_size = 40\nacquire_timeout_ms = 10000\n",
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    let churn = async {
        for i in 0..CLIENTS {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let target = target.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let mut cfg = target.pg_config(TRUST_USER, None, DATABASE);
                if target.is_direct() {
                    // Lets PostgreSQL notice the vanished client during pg_sleep, as the proxy
                    // must by itself.
                    cfg.options("-c client_connection_check_interval=100");
                }
                let (client, driver) = common::Proxy::connect_with(&cfg)
                    .await
                    .map_err(|e| format!("client {i}: {e:?}"))?;
                let query = tokio::spawn(async move {
                    let _ = client
                        .simple_query(&format!("SELECT pg_sleep(5) /* {MARKER} */"))
                        .await;
                });
                tokio::time::sleep(Duration::from_millis(20 + (i % 10) as u64 * 15)).await;
                // Dropping the socket without Terminate, the query still running.
                driver.abort();
                query.abort();
                Ok::<(), String>(())
            });
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done.expect("churn task") {
                    failures.push(e);
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done.expect("churn task") {
                failures.push(e);
            }
        }
    };
    guarded(Duration::from_secs(120), "1,000 abrupt clients", churn).await;
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients could not connect, first: {}\n{}",
        failures.len(),
        failures[0],
        target.log()
    );
    target.assert_running();

    let cluster = common::cluster();
    let sleeping_sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
         AND query LIKE '%{MARKER}%' AND pid <> pg_backend_pid()"
    );
    let backends_sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}' \
         AND backend_type = 'client backend'"
    );
    let max_pool = target.max_pool_size();
    let last = std::cell::Cell::new((0, 0));
    let settled = common::wait_until_async(Duration::from_secs(30), || async {
        let sleeping = cluster.admin_i64(&sleeping_sql).await;
        let backends = cluster.admin_i64(&backends_sql).await;
        last.set((sleeping, backends));
        sleeping == 0 && backends <= max_pool
    })
    .await;
    let last = last.get();
    assert!(
        settled,
        "after 30 s: {} backends still run the abandoned pg_sleep, {} backends on `{DATABASE}` \
         (pool maximum {max_pool})\n{}",
        last.0,
        last.1,
        target.log()
    );

    for client in [target.trust_client().await, target.client().await] {
        let v: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("fresh client after the churn")
            .get(0);
        assert_eq!(v, 1);
    }
}
