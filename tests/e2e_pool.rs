//! Pool limits and load: a client that cannot get a backend in time gets 53300 naming the
//! pool, and pgbench runs clean through the proxy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{sqlstate, target, DATABASE, SUPERUSER, SUPERUSER_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_timeout_is_53300_naming_the_pool() {
    if common::proxy_only(
        "acquire_timeout_is_53300_naming_the_pool",
        "pool limits are the proxy's",
    ) {
        return;
    }
    let proxy = target("workers = 1\n[pool_mode]\nmax_pool_size = 2\nacquire_timeout_ms = 300\n");
    let first = proxy.client().await;
    let second = proxy.client().await;
    for client in [&first, &second] {
        client
            .simple_query("SELECT 1")
            .await
            .expect("session holding a backend");
    }
    let third = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
        .await;
    let err = match third {
        Err(e) => e,
        Ok(client) => client
            .simple_query("SELECT 1")
            .await
            .expect_err("a third session got a backend beyond max_pool_size = 2"),
    };
    assert_eq!(sqlstate(&err), "53300", "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    for part in ["pool", DATABASE, SUPERUSER] {
        assert!(
            message.contains(part),
            "53300 message does not name the pool: {message}"
        );
    }
    // The held sessions are unaffected, and a freed backend serves the next client.
    second.simple_query("SELECT 2").await.expect("held session");
    drop(first);
    let reused = common::wait_until_async(Duration::from_secs(10), || async {
        match proxy
            .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
            .await
        {
            Ok(client) => client.simple_query("SELECT 3").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        reused,
        "no client got the backend released by a closed session\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_clean() {
    let target = Arc::new(target("[pool_mode]\nmax_pool_size = 80\n"));
    let t = target.clone();
    let init = tokio::task::spawn_blocking(move || {
        common::pgbench(&t, &["-i", "-s", "1"], Duration::from_secs(180))
    })
    .await
    .expect("pgbench -i task");
    assert!(init.status.success(), "pgbench -i failed:\n{init}");
    let accounts = common::cluster().psql_admin(DATABASE, "SELECT count(*) FROM pgbench_accounts");
    assert_eq!(accounts.trim(), "100000");

    let t = target.clone();
    let run = tokio::task::spawn_blocking(move || {
        common::pgbench(
            &t,
            &["-S", "-c", "32", "-j", "2", "-T", "10"],
            Duration::from_secs(120),
        )
    })
    .await
    .expect("pgbench -S task");
    assert!(run.status.success(), "pgbench -S failed:\n{run}");
    assert!(
        run.stdout.contains("number of failed transactions: 0"),
        "pgbench reported failures:\n{run}"
    );
    assert!(
        !run.stdout.contains("aborted") && !run.stderr.contains("aborted"),
        "pgbench clients aborted:\n{run}"
    );
    let processed: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{run}"));
    assert!(processed > 0, "pgbench processed no transactions:\n{run}");
    target.assert_running();
}
